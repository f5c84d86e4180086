"""The web UI's Control tab: upload an image, pick a preprocessor (with a preview of the map), an adapter and a
strength per condition, several conditions at once, and generate with a control model.

Found by ``pipelines.ui_tabs.discover`` (a ``*_tab`` module). Models of kind ``"control"`` (directories whose
``model_index.json`` names ``ControlTextToImagePipeline``) are served here. Adapters are listed by name, never by path:
the model directory's ``controls/*.safetensors`` and every ``<models-dir>/controls/*.safetensors`` (where
``training.train_control`` output can be copied). Each adapter is shown with its kind (EasyControl,
ControlNet-Transformer, RelaCtrl, read from the file's ``adapter_type``); nothing here depends on the kind: the
pipeline picks the method from the file. Endpoints: ``/control`` (generate) and ``/control_preprocess``
(the map the model will see, for a preview).

Generation runs under the service's per-model lock on its cached pipeline and saves PNGs with the generation record
(the adapters, strengths, preprocessors and a hash of every control map are in it) into the service's output folder
and the session's history, like the image tab; "read parameters" refills the prompt, settings and adapters (the
control images themselves are not stored in the PNG, so they must be uploaded again).
"""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path
from typing import Any

import gradio as gr
import PIL.Image

from .errors import InputError, ModelLoadError
from .metadata import GenerationRecord
from .ui_tabs import TabContext, TabHandle, model_markdown, register_tab, session_of, user_error

SLOTS = 3
NO_ADAPTER = "none"
UI_MAX_STEPS = 250
_CANCEL: dict[str, threading.Event] = {}
_CANCEL_LOCK = threading.Lock()


# ---------------------------------------------------------------------------------------------- adapters


def adapter_files(service: Any, model: str) -> dict[str, Path]:
    """Adapter name -> file for ``model``: its own ``controls/`` first, then ``<models-dir>/controls/``."""
    from .control import CONTROLS_DIR

    found: dict[str, Path] = {}
    dirs = []
    with contextlib.suppress(ModelLoadError):
        dirs.append(service.catalog.get(model).path / CONTROLS_DIR)
    dirs += [Path(d).parent / CONTROLS_DIR for d in getattr(service, "lora_dirs", [])]
    for directory in dirs:
        if directory.is_dir():
            for path in sorted(directory.glob("*.safetensors")):
                name, n = path.stem, 2
                while name in found and found[name].resolve() != path.resolve():
                    name, n = f"{path.stem}-{n}", n + 1
                found.setdefault(name, path.resolve())
    return found


def adapter_metadata(path: Path) -> dict[str, str]:
    """The adapter file's safetensors metadata (header only; {} for an unreadable file)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return {}


ADAPTER_KIND_LABELS = {"easycontrol": "EasyControl", "controlnet": "ControlNet-Transformer", "relactrl": "RelaCtrl"}


def adapter_choices_for(files: dict[str, Path]) -> list[tuple[str, str]]:
    """Dropdown choices ``(label, name)``: the adapter name with its kind (from the file's ``adapter_type``);
    EasyControl adapters first (the cheapest per step, and the one the first slot preselects), then by name."""
    from .control import adapter_kind

    order = list(ADAPTER_KIND_LABELS)
    rows = []
    for name, path in files.items():
        kind = adapter_kind(adapter_metadata(path))
        rank = order.index(kind) if kind in order else len(order)
        rows.append((rank, name, f"{name} · {ADAPTER_KIND_LABELS.get(kind, kind)}"))
    return [(label, name) for _, name, label in sorted(rows)]


def model_control_cfg(service: Any, model: str) -> bool:
    """The model directory's default for ``control_cfg`` (conditions in the conditional CFG half only)."""
    try:
        index = json.loads((service.catalog.get(model).path / "model_index.json").read_text(encoding="utf-8"))
    except (ModelLoadError, OSError, ValueError):
        return False
    return bool(index.get("control_cfg", False))


def preprocessor_choices() -> list[tuple[str, str]]:
    from control.preprocessors import list_preprocessors, unavailable_reason

    out = []
    for info in list_preprocessors():
        label = info.title if unavailable_reason(info.name) is None else f"{info.title} (needs weights)"
        out.append((label, info.name))
    return out


# ---------------------------------------------------------------------------------------------- actions


def _check_model(service: Any, models: list[str], model: str) -> Any:
    if model not in models:
        raise InputError(f"Unknown control model {model!r}. Available: {', '.join(models) or 'none'}.")
    return service.spec(model)


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a whole number, got {value!r}.") from None
    if v != v or not v.is_integer() or not lo <= v <= hi:
        raise InputError(f"{what} must be a whole number between {lo} and {hi}, got {value!r}.")
    return int(v)


def control_map_preview(
    service: Any,
    models: list[str],
    model: str,
    image: Any,
    preprocessor: str,
    adapter: str,
    mask: Any,
    width: int,
    height: int,
) -> PIL.Image.Image | None:
    """The control map the model will see for this condition (upscaled for display when tiny)."""
    from .control import adapter_kind, control_map_size, make_control_map

    if image is None:
        return None
    spec = _check_model(service, models, model)
    files = adapter_files(service, model)
    meta = adapter_metadata(files[adapter]) if adapter in files else {}
    recorded = meta.get("control_size", "")
    w = _int(width or spec.default_size, "Width", spec.multiple, spec.max_side)
    h = _int(height or spec.default_size, "Height", spec.multiple, spec.max_side)
    kind = adapter_kind(meta) if meta else "easycontrol"
    size = control_map_size(kind, int(recorded) if recorded.isdigit() else None, w, h, spec.default_size)
    params = {"mask": mask} if preprocessor == "inpaint" and mask is not None else {}
    cmap = make_control_map(image, size, w, h, preprocessor or "none", params)
    side = max(cmap.size)
    if side < 160:
        scale = -(-160 // side)
        cmap = cmap.resize((cmap.width * scale, cmap.height * scale), PIL.Image.Resampling.NEAREST)
    return cmap


def run_control(
    service: Any,
    models: list[str],
    session: str,
    model: str,
    prompt: str,
    negative_prompt: str,
    slots: list[tuple[Any, str, str, float, Any]],
    steps: int,
    guidance_scale: float,
    width: int,
    height: int,
    seed: int,
    batch_size: int,
    use_kv_cache: bool,
    progress: Any = None,
    control_cfg: bool | None = None,
) -> tuple[list[str], int, str, dict]:
    """Validate, generate under the model's lock, save PNGs with records; (paths, seed used, status, record)."""
    import secrets
    import time

    from .base import check_guidance
    from .control import ControlInput, check_control_pipeline

    spec = _check_model(service, models, model)
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("The prompt is empty; describe the image you want.")
    steps = _int(steps, "Steps", 1, UI_MAX_STEPS)
    guidance = check_guidance(guidance_scale)
    w = _int(width or spec.default_size, "Width", spec.multiple, spec.max_side)
    h = _int(height or spec.default_size, "Height", spec.multiple, spec.max_side)
    if w % spec.multiple or h % spec.multiple:
        raise InputError(f"Width and height must be multiples of {spec.multiple} for {model}.")
    if w * h > service.max_pixels:
        raise InputError(f"{w}x{h} is more than this server's {service.max_pixels} pixels per image.")
    count = _int(batch_size, "Batch size", 1, 8)
    seed = _int(-1 if seed is None else seed, "Seed", -1, 2**53 - 1)
    seed = secrets.randbelow(2**32) if seed == -1 else seed
    files = adapter_files(service, model)
    controls = []
    for k, (image, preprocessor, adapter, strength, mask) in enumerate(slots, start=1):
        if image is None and adapter in (None, "", NO_ADAPTER):
            continue
        if image is None:
            raise InputError(f"Condition {k} has adapter {adapter!r} but no image; upload one or set it to 'none'.")
        if adapter in (None, "", NO_ADAPTER):
            raise InputError(f"Condition {k} has an image but no adapter; pick one (e.g. canny) or remove the image.")
        if adapter not in files:
            raise InputError(f"Unknown control adapter {adapter!r}. Available: {', '.join(files) or 'none'}.")
        params = {"mask": mask} if preprocessor == "inpaint" and mask is not None else {}
        controls.append(ControlInput(image, adapter, strength, preprocessor or "none", params))

    with _CANCEL_LOCK:
        cancel = _CANCEL.setdefault(session, threading.Event())
    cancel.clear()
    lock = service.model_lock(model)
    start = time.perf_counter()
    with lock:
        pipe = check_control_pipeline(service.pipeline(model))
        for c in controls:
            if c.adapter not in pipe.control_adapters():
                pipe.register_control_adapter(files[c.adapter], c.adapter)

        def on_step(p: Any, i: int, t: Any, tensors: dict) -> dict:
            if progress is not None:
                progress((i + 1, steps), desc="Sampling", unit="steps")
            if cancel.is_set():
                p.request_interrupt()
            return {}

        out = pipe(
            prompt,
            negative_prompt or "",
            controls=controls,
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=w,
            height=h,
            num_images_per_prompt=count,
            seed=seed,
            use_kv_cache=bool(use_kv_cache),
            control_cfg=None if control_cfg is None else bool(control_cfg),
            callback_on_step_end=on_step,
        )
    if out.interrupted:
        return [], seed, "Stopped; no image was saved.", {}
    paths = [service.save_image(image, record) for image, record in zip(out.images, out.records)]
    service.remember(session, paths, out.records)
    names = ", ".join(f"{c.adapter} {c.strength:g}" for c in controls) or "no control"
    status = f"{len(paths)} image(s) in {time.perf_counter() - start:.1f} s · seed {seed} · {names}"
    return [str(p) for p in paths], seed, status, out.records[0].to_dict()


# ---------------------------------------------------------------------------------------------- the tab


@register_tab("control", title="Control", order=30)
def build_control_tab(ctx: TabContext) -> TabHandle:
    service, models = ctx.service, ctx.models
    spec0 = service.spec(models[0])

    def adapter_choices(model: str) -> list[tuple[str, str]]:
        none = [(NO_ADAPTER, NO_ADAPTER)]
        return none + adapter_choices_for(adapter_files(service, model)) if model in models else none

    slot_components: list[tuple[Any, ...]] = []
    with gr.Row(equal_height=False):
        with gr.Column(scale=5, min_width=340):
            model = gr.Dropdown(models, value=models[0], label="Model", elem_id="control-model")
            model_info = gr.Markdown(model_markdown(spec0))
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="Describe the image", elem_id="control-prompt")
            negative = gr.Textbox("", label="Negative prompt", lines=1)
            with gr.Row():
                run = gr.Button("Generate", variant="primary", elem_id="control-generate")
                stop = gr.Button("Stop", variant="stop")
            choices = adapter_choices(models[0])
            for k in range(SLOTS):
                with gr.Accordion(f"Condition {k + 1}", open=k == 0):
                    with gr.Row():
                        image = gr.Image(label="Image", type="pil", height=180, elem_id=f"control-image-{k + 1}")
                        preview = gr.Image(
                            label="Control map (what the model sees)",
                            type="pil",
                            format="png",
                            height=180,
                            interactive=False,
                            elem_classes=["pixelated"],
                            elem_id=f"control-preview-{k + 1}",
                        )
                    with gr.Row():
                        pre = gr.Dropdown(preprocessor_choices(), value="canny", label="Preprocessor")
                        adapter = gr.Dropdown(
                            choices, value=choices[1][1] if k == 0 and len(choices) > 1 else NO_ADAPTER, label="Adapter"
                        )
                        strength = gr.Slider(0, 2, value=1.0, step=0.05, label="Strength")
                    mask = gr.Image(
                        label="Inpainting mask (white = repaint; none = centre box)", type="pil", height=120
                    )
                slot_components.append((image, pre, adapter, strength, mask, preview))
            with gr.Accordion("Sampling", open=True):
                with gr.Row():
                    steps = gr.Slider(1, UI_MAX_STEPS, value=20, step=1, label="Steps")
                    guidance = gr.Slider(0, 20, value=3.0, step=0.1, label="Guidance (CFG)")
                with gr.Row():
                    width = gr.Slider(
                        spec0.multiple, spec0.max_side, value=spec0.default_size, step=spec0.multiple, label="Width"
                    )
                    height = gr.Slider(
                        spec0.multiple, spec0.max_side, value=spec0.default_size, step=spec0.multiple, label="Height"
                    )
                with gr.Row():
                    seed = gr.Number(-1, label="Seed", info="-1: random", precision=0, minimum=-1)
                    batch_size = gr.Slider(1, 8, value=4, step=1, label="Images")
                    kv_cache = gr.Checkbox(True, label="Cache condition K/V (faster, same images)")
                    control_cfg = gr.Checkbox(
                        model_control_cfg(service, models[0]),
                        label="Amplify the control with CFG",
                        info="conditions in the conditional half of the guidance batch only",
                    )
        with gr.Column(scale=6, min_width=340):
            gallery = gr.Gallery(
                label="Images",
                columns=4,
                format="png",
                interactive=False,
                elem_classes=["pixelated"],
                elem_id="control-gallery",
            )
            seed_used = gr.Number(None, label="Seed used", precision=0, interactive=False)
            status = gr.Markdown(elem_id="control-status")
            with gr.Accordion("Generation record", open=False):
                info = gr.JSON(label="Record")

    def preprocess(
        model: str,
        image: PIL.Image.Image | None = None,
        preprocessor: str = "canny",
        adapter: str = NO_ADAPTER,
        mask: PIL.Image.Image | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> PIL.Image.Image | None:
        """The control map the model will see for an image, preprocessor and adapter (a preview)."""
        try:
            return control_map_preview(service, models, model, image, preprocessor, adapter, mask, width, height)
        except (InputError, ModelLoadError) as e:
            raise user_error(e) from None

    for k, (image, pre, adapter, _strength, mask, preview) in enumerate(slot_components):
        inputs = [model, image, pre, adapter, mask, width, height]
        for j, trigger in enumerate((image.change, pre.change, mask.change, adapter.change)):
            trigger(
                preprocess,
                inputs,
                preview,
                api_name="control_preprocess" if (k, j) == (0, 0) else None,
                api_visibility="public" if (k, j) == (0, 0) else "private",
                queue=False,
            )

        def pick_preprocessor(model: str, name: str) -> Any:
            path = adapter_files(service, model).get(name)
            recorded = adapter_metadata(path).get("preprocessor") if path else None
            return recorded if recorded in {v for _, v in preprocessor_choices()} else gr.skip()

        adapter.input(pick_preprocessor, [model, adapter], pre, api_visibility="private", queue=False)

    flat = [c for slot in slot_components for c in slot[:5]]

    def generate(
        model: str,
        prompt: str,
        negative_prompt: str = "",
        image_1: PIL.Image.Image | None = None,
        preprocessor_1: str = "canny",
        adapter_1: str = NO_ADAPTER,
        strength_1: float = 1.0,
        mask_1: PIL.Image.Image | None = None,
        image_2: PIL.Image.Image | None = None,
        preprocessor_2: str = "canny",
        adapter_2: str = NO_ADAPTER,
        strength_2: float = 1.0,
        mask_2: PIL.Image.Image | None = None,
        image_3: PIL.Image.Image | None = None,
        preprocessor_3: str = "canny",
        adapter_3: str = NO_ADAPTER,
        strength_3: float = 1.0,
        mask_3: PIL.Image.Image | None = None,
        steps: int = 20,
        guidance_scale: float = 3.0,
        width: int | None = None,
        height: int | None = None,
        seed: int = -1,
        batch_size: int = 4,
        use_kv_cache: bool = True,
        control_cfg: bool = False,
        request: gr.Request = None,
        progress: gr.Progress = gr.Progress(),  # noqa: B008 (how Gradio asks for a progress tracker)
    ) -> tuple:
        """Generate images that follow control images; returns (image paths, seed used, status, record)."""
        slots = [
            (image_1, preprocessor_1, adapter_1, strength_1, mask_1),
            (image_2, preprocessor_2, adapter_2, strength_2, mask_2),
            (image_3, preprocessor_3, adapter_3, strength_3, mask_3),
        ]
        try:
            paths, used, text, record = run_control(
                service,
                models,
                session_of(request),
                model,
                prompt,
                negative_prompt,
                slots,
                steps,
                guidance_scale,
                width,
                height,
                seed,
                batch_size,
                use_kv_cache,
                progress,
                control_cfg,
            )
        except (InputError, ModelLoadError) as e:
            raise user_error(e) from None
        return paths, used, text, record

    settings = [steps, guidance, width, height, seed, batch_size, kv_cache, control_cfg]
    event = run.click(
        generate,
        [model, prompt, negative, *flat, *settings],
        [gallery, seed_used, status, info],
        api_name="control",
        concurrency_id="generate",
        show_progress_on=[gallery],
    )
    if ctx.refresh_history is not None and ctx.history_outputs:
        event.then(ctx.refresh_history, None, ctx.history_outputs, api_visibility="private", queue=False)

    def stop_generation(request: gr.Request) -> str:
        with _CANCEL_LOCK:
            flag = _CANCEL.get(session_of(request))
        if flag is not None:
            flag.set()
        return "Stopping after the current step."

    stop.click(stop_generation, None, status, cancels=[event], api_visibility="private", queue=False)

    def on_model(name: str) -> tuple:
        if name not in models:
            return (gr.skip(),) * (4 + SLOTS)
        spec = service.spec(name)
        size = dict(minimum=spec.multiple, maximum=spec.max_side, step=spec.multiple, value=spec.default_size)
        new = adapter_choices(name)
        return (model_markdown(spec), gr.update(**size), gr.update(**size), model_control_cfg(service, name)) + tuple(
            gr.update(choices=new, value=NO_ADAPTER) for _ in range(SLOTS)
        )

    model.input(
        on_model,
        model,
        [model_info, width, height, control_cfg, *(s[2] for s in slot_components)],
        api_visibility="private",
        queue=False,
    )

    fill_components = [model, prompt, negative, steps, guidance, width, height, seed, control_cfg]
    fill_components += [c for slot in slot_components for c in (slot[2], slot[3])]

    def fill(record: GenerationRecord) -> list[Any]:
        skip = gr.skip()
        values = [
            record.model if record.model in models else skip,
            record.prompt or "",
            record.negative_prompt or "",
            min(max(record.steps, 1), UI_MAX_STEPS),
            record.guidance_scale,
            record.width,
            record.height,
            record.seed,
            bool(record.extra["control_cfg"]) if "control_cfg" in record.extra else skip,
        ]
        controls = record.extra.get("_controls") or []
        if isinstance(controls, str):
            try:
                controls = json.loads(controls)
            except json.JSONDecodeError:
                controls = []
        for k in range(SLOTS):
            c = controls[k] if k < len(controls) and isinstance(controls[k], dict) else None
            values += [c.get("adapter", NO_ADAPTER), float(c.get("strength", 1.0))] if c else [NO_ADAPTER, 1.0]
        return values

    return TabHandle(fill_components=fill_components, fill=fill)
