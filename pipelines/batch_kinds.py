"""What each generator kind reads from a batch row, how the row runs on its pipeline and how its outputs are saved.

The batch CLI (:mod:`pipelines.batch`) knows rows, seeds, chunks, manifests and resume; everything that differs
between generators lives here, one :class:`RowKind` per kind of the catalog (text-to-image, class-to-image with VAR
as a fixed-schedule variant, control, video, point-cloud). A new generator kind adds one class and one entry in
:data:`ROW_KINDS`.

Validation loads no model: it reads the model's configs (:class:`~pipelines.service.ModelSpec`), checks every
value and resolves files (control images, clips, LoRAs) against the prompts file's folder, so ``--dry-run`` reports
every problem of a file with its line before anything heavy happens.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .metadata import GenerationRecord, read_record, save_png
from .service import MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS, ModelSpec

MAX_COUNT = 64
MAX_POINTS = 100_000
#: Columns every kind reads; each kind adds its own (:attr:`RowKind.columns`).
COMMON_COLUMNS = ("model", "seed", "count", "steps", "guidance", "scheduler", "attention")


# ---------------------------------------------------------------------------------------------- values


def blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def as_int(value: Any, name: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be a whole number, got {value!r}")
        return int(value)
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def as_float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        out = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


@dataclass
class Defaults:
    """The command line's defaults for cells a row leaves empty."""

    model: str | None = None
    negative_prompt: str = ""
    seed: int = 0
    steps: int | None = None  # None: the kind's own default (RowKind.default_steps)
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    count: int = 1


@dataclass
class RowCheck:
    """One row under validation: typed lookups with defaults; every problem is appended to ``errors``."""

    values: dict[str, Any]
    defaults: Defaults
    spec: ModelSpec
    model_path: Path | None  # the catalog model's directory (for its control adapters)
    base_dir: Path  # relative file names in the row are read from here (the prompts file's folder)
    errors: list[str] = field(default_factory=list)

    def given(self, key: str) -> bool:
        return not blank(self.values.get(key))

    def get(self, key: str, default: Any = None) -> Any:
        return self.values[key] if self.given(key) else default

    def number(self, key: str, conv: Any, default: Any, lo: float, hi: float) -> Any:
        raw = self.get(key, default)
        if raw is None:
            return None
        try:
            value = conv(raw, key)
        except ValueError as e:
            self.errors.append(str(e))
            return None
        if not lo <= value <= hi:
            self.errors.append(f"{key} must be between {lo} and {hi}, got {value}")
            return None
        return value

    def text(self, key: str, default: str | None = None, required: str | None = None) -> str | None:
        value = self.get(key, default)
        if value is None:
            if required:
                self.errors.append(required)
            return None
        if not isinstance(value, str):
            self.errors.append(f"{key} must be text, got {type(value).__name__}")
            return None
        if len(value) > MAX_PROMPT_CHARS:
            self.errors.append(f"{key} is {len(value)} characters; the limit is {MAX_PROMPT_CHARS}")
            return None
        return value

    def file(self, value: Any, key: str, folder_ok: bool = False) -> str | None:
        """A file named in the row, resolved against the prompts file's folder (absolute paths as given)."""
        if not isinstance(value, str):
            self.errors.append(f"{key} must be a file name, got {type(value).__name__}")
            return None
        path = Path(value.strip()).expanduser()
        path = path if path.is_absolute() else self.base_dir / path
        if path.is_file() or (folder_ok and path.is_dir()):
            return str(path.resolve())
        where = "" if Path(value).is_absolute() else f" (relative names are read from {self.base_dir})"
        self.errors.append(f"{key} {value!r} does not exist{where}")
        return None

    def refuse(self, keys: tuple[str, ...], why: str) -> None:
        for key in keys:
            if self.given(key):
                self.errors.append(f"model {self.spec.name} {why}; remove the '{key}' value")


@dataclass
class Task:
    """A validated row: the model, seeds and count, plus ``params``, the kind's JSON-able settings."""

    row: int
    line: int
    model: str
    kind: str
    seed: int
    count: int
    params: dict[str, Any]
    suffix: str = ".png"

    @property
    def prompt(self) -> str | None:
        return self.params.get("prompt")

    @property
    def negative_prompt(self) -> str | None:
        return self.params.get("negative_prompt")

    @property
    def class_label(self) -> int | None:
        return self.params.get("class_label")

    @property
    def steps(self) -> int | None:
        return self.params.get("steps")

    @property
    def guidance(self) -> float | None:
        return self.params.get("guidance")

    @property
    def width(self) -> int | None:
        return self.params.get("width")

    @property
    def height(self) -> int | None:
        return self.params.get("height")

    @property
    def scheduler(self) -> str | None:
        return self.params.get("scheduler")

    @property
    def key(self) -> str:
        """Fingerprint of everything that decides the row's outputs; stored in each record to recognise them."""
        blob = json.dumps([self.model, self.kind, self.params], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]

    def stem(self, i: int) -> str:
        return f"{self.row:05d}-{i:02d}-{self.seed + i}"

    def file_name(self, i: int) -> str:
        return self.stem(i) + self.suffix


# ---------------------------------------------------------------------------------------------- kinds


class RowKind:
    """One generator kind's rows: the columns it reads, the pipeline call, and the files it writes."""

    kind: str = ""
    columns: tuple[str, ...] = ()
    suffix = ".png"  # the main file; ``record_file`` says where the record is
    default_steps = 20  # when neither the row nor --steps gives any: what the kind's pipeline is made for

    def check(self, c: RowCheck) -> dict[str, Any]:
        raise NotImplementedError

    def call(self, pipe: Any, task: Task, seeds: list[int]) -> tuple[list[Any], list[Any]]:
        """Run one chunk; (outputs, records), one each per seed."""
        raise NotImplementedError

    def save(self, output: Any, out_dir: Path, stem: str, record: GenerationRecord) -> list[Path]:
        """Write one output; the file holding the record is written last, so its presence means "complete"."""
        return [save_png(output, out_dir / f"{stem}.png", record)]

    def record_file(self, out_dir: Path, stem: str) -> Path:
        return out_dir / f"{stem}.png"

    def read_record(self, path: Path) -> dict | None:
        try:
            return read_record(path).to_dict()
        except (ValueError, OSError):
            return None

    # shared pieces --------------------------------------------------------------------------------
    def sampling(self, c: RowCheck, guidance: bool = True, kind_guidance: float = 4.5) -> dict[str, Any]:
        steps = c.defaults.steps or self.default_steps
        out: dict[str, Any] = {"steps": c.number("steps", as_int, steps, 1, MAX_STEPS)}
        if guidance:
            default = c.defaults.guidance if c.defaults.guidance is not None else kind_guidance
            out["guidance"] = c.number("guidance", as_float, default, 0, 100)
        else:
            c.refuse(("guidance",), "takes no guidance scale")
        scheduler = c.get("scheduler", c.defaults.scheduler)
        problem = c.spec.scheduler_problem(scheduler)  # unknown, or unable to step this model's prediction type
        if problem is not None:
            c.errors.append(problem)
        out["scheduler"] = scheduler
        out["attention"] = check_attention(c)
        return out

    @staticmethod
    def size(c: RowCheck) -> dict[str, Any]:
        spec = c.spec
        width = c.number("width", as_int, c.defaults.width or spec.default_size, 1, MAX_SIDE)
        height = c.number("height", as_int, c.defaults.height or spec.default_size, 1, MAX_SIDE)
        for key, value in (("width", width), ("height", height)):
            if value is not None and (value % spec.multiple or value < spec.multiple):
                lower = max(spec.multiple, value - value % spec.multiple)
                c.errors.append(
                    f"{key} {value} is not a multiple of {spec.multiple}, which {spec.name} needs "
                    f"(use {lower} or {lower + spec.multiple})"
                )
        return {"width": width, "height": height}

    @staticmethod
    def class_id(c: RowCheck) -> int | None:
        spec = c.spec
        if not c.given("class"):
            c.errors.append(f"model {spec.name} is {spec.kind}: give a 'class' (name or id)")
            return None
        value = c.values["class"]
        if isinstance(value, str) and value.strip() in spec.labels:
            return spec.labels[value.strip()]
        n = spec.num_classes or len(spec.class_choices())
        try:
            idx = as_int(value, "class")
        except ValueError:
            known = ", ".join(spec.class_choices()[:12])
            c.errors.append(f"unknown class {value!r} for model {spec.name} (classes: {known}...)")
            return None
        if not 0 <= idx < n:
            c.errors.append(f"class {idx} is out of range for model {spec.name} (0..{n - 1})")
            return None
        return idx

    @staticmethod
    def lora(c: RowCheck) -> list[tuple[str, float]]:
        if not c.given("lora"):
            c.refuse(("lora_weight",), "has no 'lora' in this row to weigh")
            return []
        raw = c.values["lora"]
        names = raw if isinstance(raw, list) else [p for p in str(raw).split(";") if p.strip()]
        weight = c.number("lora_weight", as_float, 1.0, -4, 4)
        out = []
        for name in names:
            path = c.file(name, "lora")
            if path is not None and not path.endswith(".safetensors"):
                c.errors.append(f"lora {name!r} is not a .safetensors file (PEFT LoRA files are)")
            elif path is not None and weight is not None:
                out.append((path, weight))
        return out

    @staticmethod
    def image_call(task: Task, seeds: list[int]) -> dict[str, Any]:
        p = task.params
        return dict(
            num_inference_steps=p["steps"],
            guidance_scale=p["guidance"],
            height=p.get("height"),
            width=p.get("width"),
            num_images_per_prompt=len(seeds),
            seed=seeds,
            scheduler=p.get("scheduler"),
        )


def check_attention(c: RowCheck) -> str | None:
    """The row's attention variant label (``None``: the model's own), checked without touching a model."""
    value = c.get("attention")
    if value is None:
        return None
    try:
        from dit.attention import format_label, parse_label, resolve_options
    except ImportError:
        c.errors.append("attention variants are not available in this build")
        return None
    try:
        variant, options = resolve_options(*parse_label(str(value)))
    except ValueError as e:
        c.errors.append(f"attention: {e}")
        return None
    if not variant.training_free:
        c.errors.append(
            f"attention {variant.name!r} needs a model trained with it; leave the column empty to use the model's "
            "own attention, or pick a training-free variant"
        )
        return None
    return format_label(variant.name, options)


class TextToImageRows(RowKind):
    kind = "text-to-image"
    columns = ("prompt", "negative_prompt", "width", "height", "lora", "lora_weight")

    def check(self, c: RowCheck) -> dict[str, Any]:
        params = {
            "prompt": c.text("prompt", required="empty prompt"),
            "negative_prompt": c.text("negative_prompt", c.defaults.negative_prompt) or "",
        }
        c.refuse(("class",), "is text-to-image; the 'class' column is for class-to-image models")
        return {**params, **self.sampling(c), **self.size(c), "lora": self.lora(c)}

    def call(self, pipe: Any, task: Task, seeds: list[int]) -> tuple[list[Any], list[Any]]:
        p = task.params
        out = pipe(p["prompt"], negative_prompt=p["negative_prompt"], **self.image_call(task, seeds))
        return list(out.images), list(out.records)


class ClassToImageRows(RowKind):
    kind = "class-to-image"
    columns = ("class", "width", "height", "lora", "lora_weight", "top_k", "top_p")

    def check(self, c: RowCheck) -> dict[str, Any]:
        c.refuse(("prompt", "negative_prompt"), "is class-to-image; it takes a 'class', not a prompt")
        params: dict[str, Any] = {"class_label": self.class_id(c)}
        if c.spec.fixed_steps is None:  # a diffusion model
            c.refuse(("top_k", "top_p"), "is a diffusion model; top_k/top_p are VAR sampling settings")
            return {**params, **self.sampling(c, kind_guidance=4.0), **self.size(c), "lora": self.lora(c)}
        # VAR: one step per scale of its token pyramid, at its trained size only, its own attention
        name, fixed = c.spec.name, c.spec.fixed_steps
        steps = c.number("steps", as_int, None, 1, MAX_STEPS)
        if steps is not None and steps != fixed:
            c.errors.append(f"model {name} predicts {fixed} scales, so steps is always {fixed}; got {steps}")
        c.refuse(("scheduler",), "samples scale by scale (next-scale prediction) and has no scheduler")
        c.refuse(("attention", "lora", "lora_weight"), "is a VAR model with its own attention")
        for key in ("width", "height"):
            value = c.number(key, as_int, None, 1, MAX_SIDE)
            if value is not None and value != c.spec.default_size:
                c.errors.append(f"{key} {value}: model {name} generates only {c.spec.default_size} px")
        default = c.defaults.guidance if c.defaults.guidance is not None else 4.0
        params.update(
            steps=fixed,
            guidance=c.number("guidance", as_float, default, 0, 100),
            top_k=c.number("top_k", as_int, 900, 0, 1_000_000),
            top_p=c.number("top_p", as_float, 0.95, 0, 1),
            width=c.spec.default_size,
            height=c.spec.default_size,
            lora=[],
        )
        return params

    def call(self, pipe: Any, task: Task, seeds: list[int]) -> tuple[list[Any], list[Any]]:
        kwargs = self.image_call(task, seeds)
        if "top_k" in task.params:
            kwargs.update(top_k=task.params["top_k"], top_p=task.params["top_p"], num_inference_steps=None)
        out = pipe(class_labels=[task.class_label], **kwargs)
        return list(out.images), list(out.records)


class ControlRows(TextToImageRows):
    """A text-to-image row plus conditions: ``control_image`` / ``adapter`` / ``strength`` / ``preprocessor``
    columns for one, or (JSONL) ``controls: [{"image", "adapter", "strength", "preprocessor"}, ...]``."""

    kind = "control"
    columns = (*TextToImageRows.columns, "control_image", "adapter", "strength", "preprocessor", "controls")

    def adapters(self, c: RowCheck) -> list[str]:
        """The adapters the model directory ships (registered by name when the pipeline loads)."""
        from .control import CONTROLS_DIR

        folder = c.model_path / CONTROLS_DIR if c.model_path is not None else None
        return sorted(p.stem for p in folder.glob("*.safetensors")) if folder and folder.is_dir() else []

    def check(self, c: RowCheck) -> dict[str, Any]:
        params = super().check(c)
        if params.pop("lora"):
            c.errors.append(f"model {c.spec.name}: LoRAs are not applied to control pipelines; remove 'lora'")
        if c.given("controls"):
            c.refuse(("control_image", "adapter", "strength", "preprocessor"), "takes 'controls' or single columns")
            raw = c.values["controls"]
            entries = raw if isinstance(raw, list) else None
            if entries is None or not all(isinstance(e, dict) for e in entries):
                c.errors.append('controls must be a list of {"image", "adapter", "strength", "preprocessor"} objects')
                entries = []
        else:
            entries = [{k: c.values.get(k) for k in ("control_image", "adapter", "strength", "preprocessor")}]
            entries[0]["image"] = entries[0].pop("control_image")
            if all(blank(v) for v in entries[0].values()):
                entries = []
        known = self.adapters(c)
        controls = []
        for n, entry in enumerate(entries, 1):
            where = f"control {n}: " if len(entries) > 1 else ""
            unknown = set(entry) - {"image", "adapter", "strength", "preprocessor"}
            if unknown:
                c.errors.append(f"{where}unknown key(s) {', '.join(sorted(unknown))}")
            image = None if blank(entry.get("image")) else c.file(entry["image"], f"{where}control_image")
            if blank(entry.get("image")):
                c.errors.append(f"{where}no control image; give 'control_image' (a file) with the adapter")
            adapter = entry.get("adapter")
            if blank(adapter):
                c.errors.append(f"{where}no adapter; choose one of {', '.join(known) or 'none (this model has none)'}")
            elif adapter not in known:
                c.errors.append(f"{where}unknown adapter {adapter!r} for {c.spec.name}; adapters: {', '.join(known)}")
            try:
                strength = 1.0 if blank(entry.get("strength")) else as_float(entry["strength"], "strength")
                if not -4 <= strength <= 4:
                    raise ValueError(f"strength must be between -4 and 4, got {strength}")
            except ValueError as e:
                c.errors.append(f"{where}{e}")
                strength = None
            preprocessor = entry.get("preprocessor")
            preprocessor = "auto" if blank(preprocessor) else str(preprocessor).strip()
            if preprocessor not in ("auto", "none"):
                from control.preprocessors import available_preprocessors

                if preprocessor not in available_preprocessors():
                    choices = ", ".join(["auto", "none", *available_preprocessors()])
                    c.errors.append(f"{where}unknown preprocessor {preprocessor!r}; choose one of {choices}")
            controls.append({"image": image, "adapter": adapter, "strength": strength, "preprocessor": preprocessor})
        return {**params, "controls": controls}

    def call(self, pipe: Any, task: Task, seeds: list[int]) -> tuple[list[Any], list[Any]]:
        from .control import ControlInput

        p = task.params
        controls = [ControlInput(e["image"], e["adapter"], e["strength"], e["preprocessor"]) for e in p["controls"]]
        out = pipe(p["prompt"], p["negative_prompt"], controls=controls, **self.image_call(task, seeds))
        return list(out.images), list(out.records)


class VideoRows(RowKind):
    """``task`` (predict, backward, interpolate, animate, complete, unconditional) on the clip, frame folder or
    image in ``video``; ``num_given`` / ``stride`` / ``frame_index`` as the pipeline takes them."""

    kind = "video"
    columns = ("task", "video", "num_given", "stride", "frame_index")
    suffix = ".json"
    default_steps = 25  # VideoPipeline's default (DPM-Solver++)

    def check(self, c: RowCheck) -> dict[str, Any]:
        from dit.video_masks import TASKS

        c.refuse(("prompt", "negative_prompt", "class", "width", "height"), "is a video model")
        task = c.get("task", "predict")
        if task not in TASKS:
            c.errors.append(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        video = None
        if task != "unconditional":
            if c.given("video"):
                video = c.file(c.values["video"], "video", folder_ok=True)
            else:
                c.errors.append(f"task {task!r} needs a 'video' (a clip, a GIF, a folder of frames or an image)")
        else:
            c.refuse(("video",), "generates from nothing for task 'unconditional'")
        params: dict[str, Any] = {"task": task, "video": video, **self.sampling(c, guidance=False)}
        for key, lo in (("num_given", 1), ("stride", 2), ("frame_index", 0)):
            params[key] = c.number(key, as_int, None, lo, 10_000)
        return params

    def call(self, pipe: Any, task: Task, seeds: list[int]) -> tuple[list[Any], list[Any]]:
        from .video_io import read_video

        p = task.params
        frames = read_video(p["video"])[0] if p["video"] else None
        kwargs = {k: p[k] for k in ("num_given", "stride") if p[k] is not None}
        if p["frame_index"] is not None:
            kwargs["frame_index"] = p["frame_index"]
        out = pipe(
            task=p["task"],
            video=frames,
            num_inference_steps=p["steps"],
            scheduler=p["scheduler"],
            num_videos=len(seeds),
            seed=seeds,
            **kwargs,
        )
        return [(clip, getattr(out, "fps", None)) for clip in out.frames], list(out.records)

    def save(self, output: Any, out_dir: Path, stem: str, record: GenerationRecord) -> list[Path]:
        from .video_io import DEFAULT_FPS, display_scale, save_video

        clip, fps = output
        written = save_video(clip, out_dir / stem, record, fps or DEFAULT_FPS, scale=display_scale(clip[0].size))
        return [written[k] for k in ("mp4", "gif", "json") if k in written]

    def record_file(self, out_dir: Path, stem: str) -> Path:
        return out_dir / f"{stem}.json"

    def read_record(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None


class PointCloudRows(VideoRows):
    """A ``class`` (name or id) and ``points``; written as PLY, GLB, a preview PNG and the record JSON."""

    kind = "point-cloud"
    columns = ("class", "points")
    default_steps = 100  # DiT-3D samples with ancestral DDPM; 20 steps of it leave noisy clouds

    def check(self, c: RowCheck) -> dict[str, Any]:
        c.refuse(("prompt", "negative_prompt", "width", "height"), "is a point-cloud model")
        default_guidance = c.defaults.guidance if c.defaults.guidance is not None else 1.0
        return {
            "class_label": self.class_id(c),
            "points": c.number("points", as_int, c.spec.default_points or 2048, 16, MAX_POINTS),
            **self.sampling(c, kind_guidance=default_guidance),
        }

    def call(self, pipe: Any, task: Task, seeds: list[int]) -> tuple[list[Any], list[Any]]:
        p = task.params
        out = pipe(
            [p["class_label"]],
            num_points=p["points"],
            num_inference_steps=p["steps"],
            guidance_scale=p["guidance"],
            num_clouds_per_label=len(seeds),
            seed=seeds,
            scheduler=p["scheduler"],
        )
        return list(out.points), list(out.records)

    def save(self, output: Any, out_dir: Path, stem: str, record: GenerationRecord) -> list[Path]:
        from .writers3d import render_png, save_point_cloud

        preview = save_png(render_png(output, 384), out_dir / f"{stem}.png", record)
        files = save_point_cloud(output, out_dir / stem, record)  # the record JSON is its last file
        return [files["ply"], files["glb"], preview, files["json"]]


ROW_KINDS: dict[str, RowKind] = {
    k.kind: k for k in (TextToImageRows(), ClassToImageRows(), ControlRows(), VideoRows(), PointCloudRows())
}


def row_kind(kind: str) -> RowKind:
    if kind not in ROW_KINDS:
        raise InputError(f"the batch CLI does not run {kind} models; kinds: {', '.join(ROW_KINDS)}")
    return ROW_KINDS[kind]


def all_columns() -> tuple[str, ...]:
    seen = dict.fromkeys(COMMON_COLUMNS)
    for kind in ROW_KINDS.values():
        seen.update(dict.fromkeys(kind.columns))
    return tuple(seen)
