"""The web UI's "Point cloud" tab: pick a class, generate, turn the cloud around (``gr.Model3D``), download.

Discovered by ``pipelines.ui_tabs.discover`` (a ``*_tab`` module) and shown when the catalog holds a
``point-cloud`` model. The image service validates and runs image requests only, so this tab runs its own
requests on the same pipeline cache (``service.pipeline``), with one lock per model (a pipeline keeps per-call
state) and a per-session cancel that stops sampling after the current step. Every cloud is written to the
service's output folder (the only folder the app serves) as PLY + GLB + the record as JSON, plus a PNG
preview carrying the record, so "PNG info" can fill this form back in.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from .errors import InputError, ModelLoadError
from .metadata import GenerationRecord, save_png
from .schedulers import scheduler_names
from .ui_tabs import TabContext, TabHandle, register_tab, session_of, user_error

KIND = "point-cloud"
DEFAULT_SCHEDULER = "default"
MAX_COUNT = 4
UI_MAX_STEPS = 250
UI_MAX_POINTS = 8192
MAX_SEED = 2**53 - 1


@dataclass
class PointCloudRequest:
    model: str
    class_label: str | int
    num_points: int = 2048
    steps: int = 100
    guidance_scale: float = 1.0  # DiT-3D samples and is evaluated without guidance
    scheduler: str | None = None
    seed: int = -1
    count: int = 1


@dataclass
class SavedCloud:
    files: dict[str, Path]  # ply, glb, json, png
    record: GenerationRecord


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise InputError(f"{what} must be a whole number, got {value!r}.")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number, got {value!r}.") from None
    if not as_float.is_integer():
        raise InputError(f"{what} must be a whole number, got {value!r}.")
    return int(as_float)


class PointCloudRunner:
    """Validates and runs point-cloud requests on the service's pipeline cache; saves the files."""

    _counter = itertools.count(1)

    def __init__(self, service: Any):
        self.service = service
        self._cancels: dict[str, set[threading.Event]] = {}
        self._guard = threading.Lock()

    def models(self) -> list[str]:
        return self.service.model_names(KIND)

    def classes(self, model: str) -> list[str]:
        return self.service.spec(model).class_choices() if model in self.models() else []

    def validate(self, req: PointCloudRequest) -> PointCloudRequest:
        """A normalised copy of ``req`` or ``InputError`` naming what to change; loads no model."""
        if req.model not in self.models():
            known = ", ".join(self.models()) or "none"
            raise InputError(f"Unknown point-cloud model {req.model!r}. Available: {known}.")
        spec = self.service.spec(req.model)
        label = req.class_label
        if label is None or (isinstance(label, str) and not label.strip()):
            raise InputError("Choose a class to generate.")
        choices = spec.class_choices()
        if isinstance(label, str) and label.strip() in spec.labels:
            label = spec.labels[label.strip()]
        elif isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
            label = _int(label, "Class")
            if not 0 <= label < len(choices):
                raise InputError(f"Class {label} is out of range: {req.model} has classes 0..{len(choices) - 1}.")
        else:
            raise InputError(f"Unknown class {label!r} for {req.model}. Classes: {', '.join(choices)}.")
        out = PointCloudRequest(**vars(req))
        out.class_label = label
        out.num_points = _int(req.num_points, "Points")
        if not 16 <= out.num_points <= UI_MAX_POINTS:
            raise InputError(f"Points must be between 16 and {UI_MAX_POINTS}, got {out.num_points}.")
        out.steps = _int(req.steps, "Steps")
        if not 1 <= out.steps <= 1000:
            raise InputError(f"Steps must be between 1 and 1000, got {out.steps}.")
        try:
            out.guidance_scale = float(req.guidance_scale)
        except (TypeError, ValueError):
            raise InputError(f"Guidance must be a number, got {req.guidance_scale!r}.") from None
        if not 0 <= out.guidance_scale <= 100:
            raise InputError(f"Guidance must be between 0 and 100, got {req.guidance_scale}.")
        out.scheduler = spec.scheduler_choice(req.scheduler)
        out.seed = _int(-1 if req.seed is None else req.seed, "Seed")
        if not -1 <= out.seed <= MAX_SEED:
            raise InputError(f"Seed must be -1 (random) or between 0 and {MAX_SEED}, got {out.seed}.")
        out.count = _int(req.count, "Count")
        if not 1 <= out.count <= MAX_COUNT:
            raise InputError(f"Count must be between 1 and {MAX_COUNT}, got {out.count}.")
        return out

    def cancel(self, session: str) -> int:
        with self._guard:
            events = list(self._cancels.get(session, ()))
        for e in events:
            e.set()
        return len(events)

    def run(
        self, req: PointCloudRequest, session: str, cancel: threading.Event, progress: Any = None
    ) -> tuple[list[SavedCloud], bool]:
        """Generate and save; ``progress(done, total)`` per step. Returns (saved clouds, interrupted)."""
        import secrets

        with self._guard:
            self._cancels.setdefault(session, set()).add(cancel)
        lock = self.service.model_lock(req.model)  # shared with every other user of the pipeline
        try:
            while not lock.acquire(timeout=0.2):
                if cancel.is_set():
                    return [], True
            try:
                pipe = self.service.pipeline(req.model)

                def on_step(p: Any, i: int, t: Any, tensors: dict) -> dict:
                    if cancel.is_set():
                        p.request_interrupt()
                    if progress is not None:
                        progress(i + 1, req.steps)
                    return {}

                seed = secrets.randbelow(2**32) if req.seed == -1 else req.seed
                out = pipe(
                    [req.class_label],
                    num_points=req.num_points,
                    num_inference_steps=req.steps,
                    guidance_scale=req.guidance_scale,
                    num_clouds_per_label=req.count,
                    seed=seed,
                    scheduler=req.scheduler,
                    callback_on_step_end=on_step,
                )
            finally:
                lock.release()
            if out.interrupted:
                return [], True
            return [self.save(pts, rec) for pts, rec in zip(out.points, out.records)], False
        finally:
            with self._guard:
                self._cancels.get(session, set()).discard(cancel)

    def save(self, points: Any, record: GenerationRecord) -> SavedCloud:
        from .writers3d import render_png, save_point_cloud

        day = self.service.output_dir / time.strftime("%Y-%m-%d")
        name = f"{time.strftime('%H%M%S')}-{next(self._counter):05d}-{record.seed}-{record.class_name or 'cloud'}"
        files = save_point_cloud(points, day / name, record)
        files["png"] = save_png(render_png(points, 384), day / f"{name}.png", record).resolve()
        return SavedCloud({k: Path(v).resolve() for k, v in files.items()}, record)


def _model_markdown(runner: PointCloudRunner, model: str) -> str:
    if model not in runner.models():
        return ""
    spec = runner.service.spec(model)
    return f"**{model}** · point cloud · voxel grid {spec.default_size}³ · {len(spec.class_choices())} classes"


@register_tab(KIND, title="Point cloud", order=40)
def build_point_cloud_tab(ctx: TabContext) -> TabHandle:
    """Class -> point cloud form: 3D view, downloads (PLY, GLB, JSON record, PNG preview), record."""
    runner = PointCloudRunner(ctx.service)
    models = ctx.models
    first = models[0]
    classes = runner.classes(first)
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=320):
            model = gr.Dropdown(models, value=first, label="Model", elem_id="point-cloud-model")
            info = gr.Markdown(_model_markdown(runner, first))
            klass = gr.Dropdown(
                classes, value=classes[0] if classes else None, label="Class", elem_id="point-cloud-class"
            )
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="point-cloud-generate")
                stop = gr.Button("Stop", variant="stop", elem_id="point-cloud-stop")
            with gr.Accordion("Sampling", open=True):
                with gr.Row():
                    points = gr.Slider(256, UI_MAX_POINTS, value=2048, step=256, label="Points")
                    steps = gr.Slider(1, UI_MAX_STEPS, value=100, step=1, label="Steps")
                with gr.Row():
                    guidance = gr.Slider(0, 10, value=1.0, step=0.1, label="Guidance (CFG; 1 = off)")
                    scheduler = gr.Dropdown(
                        [DEFAULT_SCHEDULER, *scheduler_names()], value=DEFAULT_SCHEDULER, label="Scheduler"
                    )
                with gr.Row():
                    seed = gr.Number(-1, label="Seed", info="-1: random", precision=0, minimum=-1, maximum=MAX_SEED)
                    count = gr.Slider(1, MAX_COUNT, value=1, step=1, label="Clouds")
        with gr.Column(scale=6, min_width=340):
            view = gr.Model3D(
                label="Point cloud (drag to rotate, scroll to zoom)",
                clear_color=(1.0, 1.0, 1.0, 1.0),
                height=420,
                elem_id="point-cloud-view",
            )
            show = gr.Dropdown([], label="Show", visible=False, elem_id="point-cloud-show")
            files = gr.File(label="Download (PLY, GLB, record JSON, preview PNG)", file_count="multiple")
            seed_used = gr.Number(None, label="Seed used", precision=0, interactive=False)
            status = gr.Markdown(elem_id="point-cloud-status")
            with gr.Accordion("Generation record", open=False):
                record_json = gr.JSON(label="Record")
    views = gr.State([])

    def generate(
        model: str,
        class_label: str,
        num_points: int,
        steps: int,
        guidance_scale: float,
        scheduler: str,
        seed: int,
        count: int,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (how Gradio asks for a progress tracker)
    ) -> Iterator[tuple]:
        """Generate point clouds of a class; returns (files: PLY, GLB, JSON, PNG per cloud; view picker; seed used;
        status; record). The GLBs shown in the 3D view stay in session state."""
        skip = gr.skip()
        try:
            req = runner.validate(
                PointCloudRequest(model, class_label, num_points, steps, guidance_scale, scheduler, seed, count)
            )
        except InputError as e:
            raise user_error(e) from None
        events: queue.Queue = queue.Queue()
        cancel = threading.Event()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["value"] = runner.run(req, session_of(request), cancel, lambda d, t: events.put((d, t)))
            except BaseException as e:  # reported below
                result["error"] = e
            finally:
                events.put(None)

        start = time.perf_counter()
        thread = threading.Thread(target=work, name="point-cloud", daemon=True)
        thread.start()
        finished = False
        try:
            while True:
                try:
                    event = events.get(timeout=0.5)
                except queue.Empty:
                    yield (skip,) * 6  # heartbeat: lets a Gradio cancel close this generator promptly
                    continue
                if event is None:
                    break
                if progress is not None:
                    progress(event, desc="Sampling", unit="steps")
            finished = True
        finally:
            if not finished:
                cancel.set()
        if "error" in result:
            e = result["error"]
            if isinstance(e, (InputError, ModelLoadError)):
                raise user_error(e)
            raise gr.Error(f"Generation failed: {type(e).__name__}: {e}", print_exception=False)
        saved, interrupted = result["value"]
        if interrupted:
            yield None, [], gr.update(choices=[], visible=False), skip, "Stopped; nothing was saved.", skip
            return
        glbs = [str(s.files["glb"]) for s in saved]
        all_files = [str(p) for s in saved for p in s.files.values()]
        labels = [f"{i + 1}: seed {s.record.seed}" for i, s in enumerate(saved)]
        show_update = gr.update(choices=labels, value=labels[0], visible=len(saved) > 1)
        took = time.perf_counter() - start
        text = f"{len(saved)} cloud(s) of {req.num_points} points in {took:.1f} s · seeds " + ", ".join(
            str(s.record.seed) for s in saved
        )
        yield all_files, glbs, show_update, saved[0].record.seed, text, saved[0].record.to_dict()

    inputs = [model, klass, points, steps, guidance, scheduler, seed, count]
    outputs = [files, views, show, seed_used, status, record_json]
    event = run.click(
        generate,
        inputs,
        outputs,
        api_name="point_cloud",
        concurrency_id="generate",
        show_progress="full",
        show_progress_on=[view],
    )

    def first_view(paths: list[str]) -> str | None:
        return paths[0] if paths else None

    # Gradio's Model3D does not render a value streamed by a generator, so the view is set by a plain step after.
    event.then(first_view, views, view, api_visibility="private", queue=False)

    def stop_generation(request: gr.Request) -> str:
        n = runner.cancel(session_of(request))
        return "Stopping: the current step finishes, then sampling ends." if n else "Nothing is running."

    stop.click(stop_generation, None, status, cancels=[event], api_visibility="private", queue=False)

    def on_show(choice: str, paths: list[str]) -> Any:
        with contextlib.suppress(ValueError, IndexError, AttributeError):
            return paths[int(str(choice).split(":")[0]) - 1]
        return gr.skip()

    show.input(on_show, [show, views], view, api_visibility="private", queue=False)

    def on_model(name: str) -> tuple:
        choices = runner.classes(name)
        return _model_markdown(runner, name), gr.update(choices=choices, value=choices[0] if choices else None)

    model.input(on_model, model, [info, klass], api_visibility="private", queue=False)

    fill_components = [model, klass, points, steps, guidance, scheduler, seed, count]

    def fill(record: GenerationRecord) -> list[Any]:
        skip = gr.skip()
        label = record.class_name if record.class_name else record.class_label
        n = record.extra.get("num_points", 2048)
        return [
            record.model if record.model in models else skip,
            str(label) if label is not None else skip,
            n if isinstance(n, int) else skip,
            min(max(record.steps, 1), UI_MAX_STEPS),
            record.guidance_scale,
            record.scheduler if record.scheduler in scheduler_names() else DEFAULT_SCHEDULER,
            record.seed,
            1,
        ]

    return TabHandle(fill_components=fill_components, fill=fill)
