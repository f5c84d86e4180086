"""The web UI's tabs: one per generator kind, found through a registry.

``app.py`` builds one tab for every kind the catalog holds, by asking this registry for a builder. A new
generator (VAR, control, video, 3D) adds its tab without editing the UI core::

    from pipelines.ui_tabs import TabContext, TabHandle, register_tab

    @register_tab("video", title="Video")
    def build_video_tab(ctx: TabContext) -> TabHandle:
        ...  # create components inside the current gr.Tab, wire events with api_name=...
        return TabHandle(fill_components=[...], fill=lambda record: [...])

Builders live in modules that :func:`discover` imports: any ``*_tab`` module of the ``pipelines``,
``control`` and ``training`` packages, and entry points in the ``dit_studio.ui_tabs`` group.

This module also holds the built-in tab for image generators (text-to-image and class-to-image), which
streams progress and previews, saves PNGs with metadata and cancels per request.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from .errors import InputError, ModelLoadError
from .metadata import GenerationRecord
from .schedulers import scheduler_names
from .service import (
    ASPECT_PRESETS,
    MAX_BATCH_COUNT,
    MAX_BATCH_SIZE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    GenerationFailed,
    GenerationRequest,
    GenerationService,
    ImagesSaved,
    ModelSpec,
    Progress,
    attention_variants,
    size_for_aspect,
)

log = logging.getLogger(__name__)

DEFAULT_SCHEDULER = "default"
UI_MAX_STEPS = 250
NO_LORA = "none"


@dataclass
class TabContext:
    """What a tab builder gets: the service, its kind's models, and the shared history refresher."""

    service: GenerationService
    kind: str
    title: str
    models: list[str]
    history_outputs: list[Any] = field(default_factory=list)  # components refreshed after a generation
    refresh_history: Callable[..., Any] | None = None


@dataclass
class TabHandle:
    """What a builder returns so "read parameters from a PNG" can fill its form.

    ``fill(record)`` returns one value (or ``gr.skip()``) per component of ``fill_components``.
    """

    fill_components: list[Any] = field(default_factory=list)
    fill: Callable[[GenerationRecord], list[Any]] | None = None


TabBuilder = Callable[[TabContext], TabHandle]


@dataclass(frozen=True)
class TabSpec:
    kind: str
    builder: TabBuilder
    title: str
    order: int


_REGISTRY: dict[str, TabSpec] = {}


def register_tab(kind: str, builder: TabBuilder | None = None, *, title: str | None = None, order: int = 100) -> Any:
    """Register ``builder`` as the tab of generator ``kind`` (usable as a decorator). Re-registering replaces."""

    def add(fn: TabBuilder) -> TabBuilder:
        _REGISTRY[kind] = TabSpec(kind, fn, title or kind.replace("-", " ").capitalize(), order)
        return fn

    return add(builder) if builder is not None else add


def get_tab(kind: str) -> TabSpec | None:
    return _REGISTRY.get(kind)


def registered_tabs() -> list[TabSpec]:
    return sorted(_REGISTRY.values(), key=lambda s: (s.order, s.kind))


def discover(packages: tuple[str, ...] = ("pipelines", "control", "training")) -> list[str]:
    """Import tab plugins: ``*_tab`` modules of ``packages`` and ``dit_studio.ui_tabs`` entry points."""
    loaded = []
    for name in packages:
        try:
            package = importlib.import_module(name)
        except ImportError:
            continue
        for info in pkgutil.iter_modules(getattr(package, "__path__", [])):
            if info.name.endswith("_tab"):
                module = f"{name}.{info.name}"
                try:
                    importlib.import_module(module)
                    loaded.append(module)
                except Exception as e:  # one broken plugin must not take the UI down
                    log.warning("could not load UI tab module %s: %s", module, e)
    try:
        from importlib.metadata import entry_points

        for ep in entry_points(group="dit_studio.ui_tabs"):
            try:
                ep.load()
                loaded.append(ep.value)
            except Exception as e:
                log.warning("could not load UI tab entry point %s: %s", ep.value, e)
    except Exception:
        pass
    return loaded


# ---------------------------------------------------------------------------------------------- helpers


def session_of(request: gr.Request | None) -> str:
    """The browser tab's (or gradio_client's) session: history and cancel are per session."""
    return getattr(request, "session_hash", None) or "anonymous"


def user_error(e: BaseException) -> gr.Error:
    return gr.Error(str(e), print_exception=False)


def steps_state(spec: ModelSpec, steps: int = 20) -> dict[str, Any]:
    """The steps slider for ``spec``: free, or fixed and greyed out for a fixed-schedule model (VAR)."""
    if spec.fixed_steps is not None:
        return {"value": spec.fixed_steps, "interactive": False}
    return {"value": steps, "interactive": True}


def size_state(spec: ModelSpec) -> dict[str, Any]:
    """A width/height slider over the sizes ``spec`` serves; greyed out at its own size for VAR (Gradio needs a
    non-empty range, so that slider spans one multiple below it)."""
    return dict(
        minimum=spec.min_side if spec.min_side < spec.max_side else max(0, spec.max_side - spec.multiple),
        maximum=spec.max_side,
        step=spec.multiple,
        value=spec.default_size,
        interactive=spec.min_side < spec.max_side,
    )


def model_markdown(spec: ModelSpec) -> str:
    text = f"**{spec.name}** · {spec.kind} · trained at {spec.default_size}px · sizes in steps of {spec.multiple}px"
    if spec.fixed_steps is not None:
        text = (
            f"**{spec.name}** · {spec.kind} · next-scale prediction: {spec.fixed_steps} steps (one per scale), "
            f"{spec.default_size}px only"
        )
    if spec.kind == "class-to-image":
        text += f" · {len(spec.class_choices())} classes"
    return text


def history_items(service: GenerationService, request: gr.Request | None) -> list[tuple[str, str]]:
    items = []
    for path, record in service.history(session_of(request)):
        what = record.prompt if record.prompt is not None else (record.class_name or f"class {record.class_label}")
        what = what if len(what) <= 60 else what[:57] + "..."
        items.append((str(path), f"{what} · seed {record.seed}"))
    return items


def stream_generation(
    service: GenerationService, req: GenerationRequest, request: gr.Request | None, progress: Any
) -> Iterator[tuple]:
    """Run ``req`` and yield (gallery, preview, seed used, status, info) as it goes.

    Previews and saved images are yielded as they arrive (at most ~4 previews a second), with a
    heartbeat every half second so a Gradio cancel can close this generator promptly; closing it cancels
    the request, so the worker stops after its current step.
    """
    skip = gr.skip()
    try:
        job = service.submit(req, session_of(request))
    except (InputError, ModelLoadError) as e:
        raise user_error(e) from None
    gallery: list[str] = []
    finished = False
    last_yield = 0.0
    try:
        for event in job.events(heartbeat=0.5):
            now = time.monotonic()
            if isinstance(event, Progress):
                if progress is not None:
                    progress((event.done, event.total), desc=event.message or "Sampling", unit="steps")
                if event.message or event.seed is not None:
                    last_yield = now
                    seed = skip if event.seed is None else event.seed
                    yield skip, skip, seed, event.message or "Sampling...", skip
                    continue
                if event.preview is not None and now - last_yield >= 0.25:
                    last_yield = now
                    yield skip, event.preview, skip, f"Step {event.done}/{event.total}", skip
                    continue
            elif isinstance(event, ImagesSaved):
                gallery += [str(p) for p in event.paths]
                last_yield = now
                yield list(gallery), skip, event.records[0].seed, f"Saved {len(gallery)} image(s)...", skip
                continue
            if now - last_yield >= 0.5:  # heartbeat: lets a Gradio cancel close this generator promptly
                last_yield = now
                yield skip, skip, skip, skip, skip
        finished = True
    finally:
        if not finished:  # Gradio closed us (cancel, disconnect): stop the sampling loop too
            job.cancel()
    try:
        result = job.wait()
    except (InputError, ModelLoadError, GenerationFailed) as e:
        raise user_error(e) from None
    info = result.summary()
    if result.records:
        info["record"] = result.records[0].to_dict()
    if result.interrupted:
        status = f"Stopped after {result.steps_done}/{result.steps_total} steps; kept {len(result.paths)} image(s)."
    else:
        seeds = ", ".join(str(s) for s in result.seeds[:16]) + (" ..." if len(result.seeds) > 16 else "")
        status = f"{len(result.paths)} image(s) in {result.seconds:.1f} s · seeds {seeds}"
    seed_used = result.seeds[0] if result.seeds else skip
    yield [str(p) for p in result.paths], None, seed_used, status, info


# ---------------------------------------------------------------------------------------------- image tab


def build_image_tab(ctx: TabContext) -> TabHandle:
    """The form of the text-to-image and class-to-image generators."""
    service, kind = ctx.service, ctx.kind
    is_text = kind == "text-to-image"
    specs = {name: service.spec(name) for name in ctx.models}
    spec0 = specs[ctx.models[0]]
    slug = kind.replace("-", "_")
    default_guidance = 4.5 if is_text else 4.0

    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=340):
            model = gr.Dropdown(
                ctx.models, value=spec0.name, label="Model", allow_custom_value=True, elem_id=f"{slug}-model"
            )
            model_info = gr.Markdown(model_markdown(spec0))
            if is_text:
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=3,
                    max_length=MAX_PROMPT_CHARS,
                    placeholder="Describe the image",
                    elem_id=f"{slug}-prompt",
                )
                negative = gr.Textbox("", label="Negative prompt", lines=2, max_length=MAX_PROMPT_CHARS)
                condition = [prompt, negative]
            else:
                choices = spec0.class_choices()
                klass = gr.Dropdown(
                    choices,
                    value=choices[0] if choices else None,
                    label="Class",
                    allow_custom_value=True,
                    elem_id=f"{slug}-class",
                )
                condition = [klass]
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id=f"{slug}-generate")
                stop = gr.Button("Stop", variant="stop", elem_id=f"{slug}-stop")
            with gr.Accordion("Sampling", open=True):
                with gr.Row():
                    scheduler = gr.Dropdown(
                        [DEFAULT_SCHEDULER, *scheduler_names()],
                        value=DEFAULT_SCHEDULER,
                        label="Scheduler",
                        interactive=spec0.fixed_steps is None,
                    )
                    steps = gr.Slider(1, UI_MAX_STEPS, step=1, label="Steps", **steps_state(spec0))
                    guidance = gr.Slider(0, 20, value=default_guidance, step=0.1, label="Guidance (CFG)")
                with gr.Row():
                    aspect = gr.Dropdown(
                        list(ASPECT_PRESETS),
                        value="1:1",
                        label="Aspect",
                        scale=1,
                        interactive=spec0.fixed_steps is None,
                    )
                    width = gr.Slider(label="Width", scale=2, **size_state(spec0))
                    height = gr.Slider(label="Height", scale=2, **size_state(spec0))
                with gr.Row():
                    seed = gr.Number(-1, label="Seed", info="-1: random", precision=0, minimum=-1, maximum=MAX_SEED)
                    randomize = gr.Button("Random seed", size="sm", min_width=60)
                    reuse = gr.Button("Reuse last seed", size="sm", min_width=60)
                with gr.Row():
                    batch_size = gr.Slider(1, MAX_BATCH_SIZE, value=1, step=1, label="Batch size")
                    batch_count = gr.Slider(1, MAX_BATCH_COUNT, value=1, step=1, label="Batch count")
            with gr.Accordion("Model options", open=False):
                variants = attention_variants()
                attention = gr.Dropdown(variants, value=variants[0], label="Attention")
                loras = list(service.loras())
                lora = gr.Dropdown([NO_LORA, *loras], value=NO_LORA, label="LoRA", interactive=bool(loras))
                lora_weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="LoRA weight", interactive=bool(loras))
                if not loras:
                    where = ", ".join(str(d) for d in service.lora_dirs) or "<models-dir>/loras/"
                    gr.Markdown(f"No LoRA files found. Put PEFT LoRA `.safetensors` files in {where} and restart.")
        with gr.Column(scale=6, min_width=340):
            preview = gr.Image(
                label="Preview",
                type="pil",
                format="png",
                height=160,
                interactive=False,
                elem_id=f"{slug}-preview",
                elem_classes=["pixelated"],
            )
            gallery = gr.Gallery(
                label="Images",
                columns=4,
                format="png",
                object_fit="contain",
                interactive=False,
                elem_id=f"{slug}-gallery",
                elem_classes=["pixelated"],
            )
            seed_used = gr.Number(
                None, label="Seed used", placeholder="(after a generation)", precision=0, interactive=False
            )
            status = gr.Markdown(elem_id=f"{slug}-status")
            with gr.Accordion("Generation record", open=False):
                info = gr.JSON(label="Record")

    settings = [scheduler, steps, guidance, width, height, seed, batch_size, batch_count, attention, lora, lora_weight]
    outputs = [gallery, preview, seed_used, status, info]

    def make_request(model_name: str, cond: dict, values: tuple) -> GenerationRequest:
        sched, n_steps, cfg, w, h, s, bs, bc, attn, lora_name, lora_w = values
        return GenerationRequest(
            model=model_name,
            scheduler=None if sched in (None, DEFAULT_SCHEDULER) else sched,
            steps=n_steps,
            guidance_scale=cfg,
            width=w,
            height=h,
            seed=-1 if s is None else s,
            batch_size=bs,
            batch_count=bc,
            attention=attn,
            lora=None if lora_name in (None, NO_LORA) else lora_name,
            lora_weight=lora_w,
            kind=kind,
            **cond,
        )

    if is_text:

        def generate(
            model: str,
            prompt: str,
            negative_prompt: str,
            scheduler: str,
            steps: int,
            guidance_scale: float,
            width: int,
            height: int,
            seed: int,
            batch_size: int,
            batch_count: int,
            attention: str,
            lora: str,
            lora_weight: float,
            request: gr.Request,
            progress: gr.Progress = gr.Progress(),  # noqa: B008 (how Gradio asks for a progress tracker)
        ) -> Iterator[tuple]:
            """Generate images from a text prompt; returns (image paths, preview, seed used, status, info)."""
            values = (scheduler, steps, guidance_scale, width, height, seed, batch_size, batch_count)
            values += (attention, lora, lora_weight)
            req = make_request(model, {"prompt": prompt, "negative_prompt": negative_prompt}, values)
            yield from stream_generation(service, req, request, progress)

    else:

        def generate(
            model: str,
            class_label: str,
            scheduler: str,
            steps: int,
            guidance_scale: float,
            width: int,
            height: int,
            seed: int,
            batch_size: int,
            batch_count: int,
            attention: str,
            lora: str,
            lora_weight: float,
            request: gr.Request,
            progress: gr.Progress = gr.Progress(),  # noqa: B008
        ) -> Iterator[tuple]:
            """Generate images of a class; returns (image paths, preview, seed used, status, info)."""
            values = (scheduler, steps, guidance_scale, width, height, seed, batch_size, batch_count)
            values += (attention, lora, lora_weight)
            req = make_request(model, {"class_label": class_label}, values)
            yield from stream_generation(service, req, request, progress)

    gen_event = run.click(
        generate,
        [model, *condition, *settings],
        outputs,
        api_name=slug,
        concurrency_id="generate",
        show_progress="full",
        show_progress_on=[gallery],
    )
    cancellable = [gen_event]
    if is_text:
        submit_event = prompt.submit(
            generate,
            [model, *condition, *settings],
            outputs,
            api_visibility="private",
            concurrency_id="generate",
            show_progress_on=[gallery],
        )
        cancellable.append(submit_event)
    if ctx.refresh_history is not None and ctx.history_outputs:
        for event in cancellable:
            event.then(ctx.refresh_history, None, ctx.history_outputs, api_visibility="private", queue=False)

    def stop_generation(request: gr.Request) -> str:
        n = service.cancel(session_of(request))
        return "Stopping: the current step finishes, then sampling ends." if n else "Nothing is running."

    stop.click(stop_generation, None, status, cancels=cancellable, api_visibility="private", queue=False)

    def on_model(name: str) -> tuple:
        if name not in specs:
            return (gr.skip(),) * (6 if is_text else 7)
        spec = specs[name]
        free = spec.fixed_steps is None
        updates = (
            model_markdown(spec),
            gr.update(**size_state(spec)),
            gr.update(**size_state(spec)),
            gr.update(value="1:1", interactive=free),
            gr.update(**steps_state(spec)),
            gr.update(interactive=free) if free else gr.update(value=DEFAULT_SCHEDULER, interactive=False),
        )
        if not is_text:
            choices = spec.class_choices()
            updates += (gr.update(choices=choices, value=choices[0] if choices else None),)
        return updates

    model.input(
        on_model,
        model,
        [model_info, width, height, aspect, steps, scheduler] + ([] if is_text else [klass]),
        api_visibility="private",
        queue=False,
    )

    def on_aspect(name: str, preset: str) -> tuple:
        if name not in specs or preset not in ASPECT_PRESETS:
            return gr.skip(), gr.skip()
        return size_for_aspect(specs[name], preset)

    aspect.input(on_aspect, [model, aspect], [width, height], api_visibility="private", queue=False)
    randomize.click(lambda: -1, None, seed, api_visibility="private", queue=False)
    reuse.click(lambda s: s if s is not None else -1, seed_used, seed, api_visibility="private", queue=False)

    fill_components = [model, *condition, scheduler, steps, guidance, width, height, seed, batch_size, batch_count]

    def fill(record: GenerationRecord) -> list[Any]:
        skip = gr.skip()
        model_value = record.model if record.model in specs else skip
        if is_text:
            cond = [record.prompt or "", record.negative_prompt or ""]
        else:
            label = record.class_name if record.class_name else record.class_label
            cond = [str(label) if label is not None else skip]
        sched = record.scheduler if record.scheduler in scheduler_names() else DEFAULT_SCHEDULER
        return [
            model_value,
            *cond,
            sched,
            min(max(record.steps, 1), UI_MAX_STEPS),
            record.guidance_scale,
            record.width,
            record.height,
            record.seed,
            1,  # one image: the record's own seed reproduces it
            1,
        ]

    return TabHandle(fill_components=fill_components, fill=fill)


register_tab("text-to-image", build_image_tab, title="Text to image", order=10)
register_tab("class-to-image", build_image_tab, title="Class to image", order=20)
