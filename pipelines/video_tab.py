"""The "Video" tab: upload a clip (or frames, or one image), pick a task, watch the result play.

Registered for generator kind ``video`` (``VideoPipeline``); ``app.py`` finds it through ``ui_tabs.discover``.
The action is the API endpoint ``/video``::

    client.predict(model="sprites-vdt", files=[handle_file("clip.mp4")], task="predict the next frames",
                   num_given=4, stride=2, frame_index=0, steps=25, seed=-1, scheduler="default",
                   attention="sdpa", api_name="/video")  # -> (mp4 path, gif path, seed used, status, record)

Generation runs on the shared ``GenerationService``'s model cache, under the model's lock (a pipeline object
never serves two requests at once); the MP4, GIF and JSON record land in the service's output folder, which the
app serves. Stop cancels after the current step.
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr

from .errors import InputError, ModelLoadError
from .metadata import GenerationRecord
from .service import MAX_SEED, MAX_STEPS, GenerationService, apply_attention, attention_variants
from .ui_tabs import DEFAULT_SCHEDULER, TabContext, TabHandle, register_tab, session_of, user_error

#: UI label -> task. The first is the default: the use the shipped model is made for.
TASK_LABELS: dict[str, str] = {
    "predict the next frames": "predict",
    "predict the frames before": "backward",
    "interpolate between keyframes": "interpolate",
    "animate one image": "animate",
    "complete the centre of every frame": "complete",
    "generate from nothing": "unconditional",
}
LABEL_OF = {task: label for label, task in TASK_LABELS.items()}
MAX_INPUT_FRAMES = 256
EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"

_cancel: dict[str, threading.Event] = {}
_cancel_lock = threading.Lock()


def _read_upload(files: Any) -> tuple[list[Any] | None, float | None]:
    """Frames from the upload: one video/GIF file, or several frame images (natural name order)."""
    from .video_io import natural_key, read_video

    if not files:
        return None, None
    paths = [
        str(f if isinstance(f, (str, Path)) else getattr(f, "name", f))
        for f in (files if isinstance(files, list) else [files])
    ]
    if len(paths) == 1:
        return read_video(paths[0], max_frames=MAX_INPUT_FRAMES)
    return read_video(sorted(paths, key=lambda p: natural_key(Path(p).name)), max_frames=MAX_INPUT_FRAMES)


def run_video(
    service: GenerationService,
    session: str,
    model: str,
    files: Any,
    task_label: str,
    num_given: int,
    stride: int,
    frame_index: int,
    steps: int,
    seed: int,
    scheduler: str | None,
    progress: Any = None,
    attention: str | None = None,
) -> tuple[str | None, str | None, int, str, dict]:
    """Validate, generate one clip and save it; returns (mp4, gif, seed, status, record dict)."""
    if not isinstance(model, str) or model not in service.model_names("video"):
        known = ", ".join(service.model_names("video")) or "none"
        raise InputError(f"Unknown video model {model!r}. Available: {known}.")
    task = TASK_LABELS.get(task_label, task_label)
    if task not in LABEL_OF:
        raise InputError(f"Unknown task {task_label!r}. Choose one of: {', '.join(TASK_LABELS)}.")
    steps, seed = int(steps), -1 if seed is None else int(seed)
    if not 1 <= steps <= MAX_STEPS:
        raise InputError(f"Steps must be between 1 and {MAX_STEPS}, got {steps}.")
    if not -1 <= seed <= MAX_SEED:
        raise InputError(f"Seed must be -1 (random) or between 0 and {MAX_SEED}, got {seed}.")
    sched = service.spec(model).scheduler_choice(scheduler)
    variants = attention_variants()
    attention = attention or variants[0]
    if attention not in variants:
        raise InputError(f"Unknown attention variant {attention!r}. Available: {', '.join(variants)}.")
    frames, _ = _read_upload(files)
    if frames is None and task != "unconditional":
        raise InputError(f"Upload a clip, frames or an image to {task_label}.")
    seed = secrets.randbelow(2**32) if seed == -1 else seed
    cancel = threading.Event()
    with _cancel_lock:
        _cancel[session] = cancel
    start = time.perf_counter()
    try:
        with service.model_lock(model):  # never interleave with other users of the pipeline
            pipe = service.pipeline(model)
            apply_attention(pipe, attention)
            t = pipe.num_frames
            kwargs: dict[str, Any] = dict(task=task, video=frames, num_inference_steps=steps, seed=seed)
            kwargs["scheduler"] = sched
            if task in ("predict", "backward"):
                kwargs["num_given"] = max(1, min(int(num_given), t - 1))
            if task == "interpolate":
                kwargs["stride"] = max(2, min(int(stride), t - 1))
            if task == "animate":
                kwargs["frame_index"] = max(0, min(int(frame_index), t - 1))

            def on_step(p: Any, i: int, ts: Any, tensors: dict) -> dict:
                if progress is not None:
                    progress((i + 1, steps), desc="Sampling", unit="steps")
                if cancel.is_set():
                    p.request_interrupt()
                return {}

            out = pipe(**kwargs, callback_on_step_end=on_step)
    except ValueError as e:  # dit.attention's AttentionConfigError (e.g. a window larger than the frame)
        if isinstance(e, InputError) or type(e).__name__ != "AttentionConfigError":
            raise
        raise InputError(str(e)) from None
    finally:
        with _cancel_lock:
            _cancel.pop(session, None)
    if out.interrupted:
        return None, None, seed, "Stopped; nothing saved.", {}
    day = service.output_dir / time.strftime("%Y-%m-%d")
    stem = day / f"{time.strftime('%H%M%S')}-{secrets.token_hex(3)}-{seed}"
    written = pipe.save(out, str(stem))[0]
    record: GenerationRecord = out.records[0]
    given = ", ".join(str(i) for i in out.given) or "none"
    status = (
        f"{task_label}: {t} frames ({given} given) in {time.perf_counter() - start:.1f} s · seed {seed} · "
        f"saved {Path(written.get('mp4') or written['gif']).name}"
    )
    mp4 = str(written["mp4"]) if "mp4" in written else None
    return mp4, str(written["gif"]), seed, status, record.to_dict()


def _scheduler_menu(service: GenerationService, model: str) -> list[str]:
    """The model's own sampler first, then those that can step it (an x0 model cannot use Euler-ancestral)."""
    return [DEFAULT_SCHEDULER, *service.spec(model).schedulers()]


@register_tab("video", title="Video", order=40)
def build_video_tab(ctx: TabContext) -> TabHandle:
    service = ctx.service
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=340):
            model = gr.Dropdown(ctx.models, value=ctx.models[0], label="Model", elem_id="video-model")
            files = gr.File(
                label="Clip (mp4, webm, gif, ...) or frame images, or one image",
                file_count="multiple",
                file_types=["video", "image", ".gif"],
                type="filepath",
                elem_id="video-upload",
            )
            task = gr.Radio(list(TASK_LABELS), value=next(iter(TASK_LABELS)), label="Task", elem_id="video-task")
            clip = EXAMPLES / "sprite-clip.gif"
            if clip.is_file():  # a held-out sprite clip (assets/examples/README.md)
                gr.Examples([[[str(clip)], "predict the next frames"]], [files, task], label="Example")
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="video-generate")
                stop = gr.Button("Stop", variant="stop")
            with gr.Accordion("Settings", open=False):
                with gr.Row():
                    num_given = gr.Slider(1, 15, value=4, step=1, label="Frames given (predict)")
                    stride = gr.Slider(2, 8, value=2, step=1, label="Keyframe every (interpolate)")
                    frame_index = gr.Slider(0, 15, value=0, step=1, label="Image becomes frame (animate)")
                with gr.Row():
                    steps = gr.Slider(1, 100, value=25, step=1, label="Steps")
                    scheduler = gr.Dropdown(
                        _scheduler_menu(service, ctx.models[0]), value=DEFAULT_SCHEDULER, label="Scheduler"
                    )
                    seed = gr.Number(-1, label="Seed", info="-1: random", precision=0, minimum=-1, maximum=MAX_SEED)
                variants = attention_variants()
                attention = gr.Dropdown(variants, value=variants[0], label="Spatial attention")
            gr.Markdown(
                "Predict: the clip's **last** frames start the video. Before: its **first** frames end it. "
                "Interpolate: a full clip (every n-th frame kept) or just the keyframes. Animate: the first "
                "image. Complete: the clip's frames, the centre is regenerated."
            )
        with gr.Column(scale=6, min_width=340):
            video = gr.Video(label="Result", autoplay=True, loop=True, interactive=False, elem_id="video-result")
            gif = gr.Image(label="GIF", type="filepath", interactive=False, elem_classes=["pixelated"], height=200)
            seed_used = gr.Number(None, label="Seed used", precision=0, interactive=False)
            status = gr.Markdown(elem_id="video-status")
            with gr.Accordion("Generation record", open=False):
                info = gr.JSON(label="Record")

    def generate(
        model: str,
        files: Any,
        task: str,
        num_given: int,
        stride: int,
        frame_index: int,
        steps: int,
        seed: int,
        scheduler: str,
        attention: str,
        request: gr.Request,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (how Gradio asks for a progress tracker)
    ) -> tuple:
        """Generate a clip for the task from the upload; returns (mp4, gif, seed used, status, record)."""
        try:
            return run_video(
                service,
                session_of(request),
                model,
                files,
                task,
                num_given,
                stride,
                frame_index,
                steps,
                seed,
                scheduler,
                progress,
                attention,
            )
        except (InputError, ModelLoadError) as e:
            raise user_error(e) from None

    model.change(
        lambda name: gr.Dropdown(choices=_scheduler_menu(service, name), value=DEFAULT_SCHEDULER),
        model,
        scheduler,
        api_visibility="private",
        queue=False,
    )
    run.click(
        generate,
        [model, files, task, num_given, stride, frame_index, steps, seed, scheduler, attention],
        [video, gif, seed_used, status, info],
        api_name="video",
        concurrency_id="generate",
    )

    def stop_video(request: gr.Request) -> str:
        with _cancel_lock:
            cancel = _cancel.get(session_of(request))
        if cancel is None:
            return "Nothing is running."
        cancel.set()
        return "Stopping: the current step finishes, then sampling ends."

    stop.click(stop_video, None, status, api_visibility="private", queue=False)

    fill_components = [model, task, num_given, stride, frame_index, steps, seed]

    def fill(record: GenerationRecord) -> list[Any]:
        skip = gr.skip()
        extra = record.extra or {}
        return [
            record.model if record.model in ctx.models else skip,
            LABEL_OF.get(extra.get("task"), skip),
            extra.get("num_given", skip),
            extra.get("stride", skip),
            extra.get("frame_index", skip),
            min(max(record.steps, 1), 100),
            record.seed,
        ]

    return TabHandle(fill_components=fill_components, fill=fill)
