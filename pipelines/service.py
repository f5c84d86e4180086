"""The generation service behind the web UI: model cache, validation, per-request cancel, output folder, history.

It knows nothing about Gradio, so the UI, the API endpoints and tests drive the same code:

* models come only from the :class:`~pipelines.catalog.Catalog` (shipped defaults, ``--models-dir`` roots and
  ``--model`` paths given at start-up); a request names a model, never a path;
* loaded pipelines live in a small LRU cache, one per model name, each with its own lock so two requests never
  interleave on one pipeline (a pipeline keeps per-call state such as its interrupt flag);
* :meth:`GenerationService.submit` validates a :class:`GenerationRequest` (raising
  :class:`~pipelines.errors.InputError` with the fix) and runs it on a worker thread; the returned :class:`Job`
  streams progress, previews and saved images, and :meth:`Job.cancel` stops *that* request after the current
  sampling step (cooperatively, through ``callback_on_step_end`` -> ``pipe.request_interrupt()``);
* every image is written with :func:`~pipelines.metadata.save_png` (A1111 ``parameters`` + JSON record) into
  the output folder and remembered in the session's history.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import math
import queue
import secrets
import threading
import time
import warnings
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import Catalog, CatalogEntry
from .errors import InputError, ModelLoadError
from .metadata import GenerationRecord, file_hash, read_record, save_png
from .schedulers import scheduler_names

MAX_PROMPT_CHARS = 4000  # as TextToImagePipeline; checked here so a request fails before any model loads
MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_BATCH_SIZE = 8
MAX_BATCH_COUNT = 16
MAX_SEED = 2**53 - 1  # the largest integer a browser's number input keeps exactly
DEFAULT_MAX_PIXELS = 2048 * 2048
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_PIXELS = 64 * 1024 * 1024
HISTORY_PER_SESSION = 200
HISTORY_SESSIONS = 1000

#: name -> width:height ratio of the aspect presets the UI offers.
ASPECT_PRESETS: dict[str, float] = {
    "1:1": 1.0,
    "4:3": 4 / 3,
    "3:4": 3 / 4,
    "3:2": 3 / 2,
    "2:3": 2 / 3,
    "16:9": 16 / 9,
    "9:16": 9 / 16,
}


# ---------------------------------------------------------------------------------------------- model facts


@dataclass(frozen=True)
class ModelSpec:
    """What the UI and the batch CLI need to know about a catalog model, read from its configs (no weights)."""

    name: str
    kind: str
    multiple: int  # height and width must be multiples of this (VAE factor x patch size)
    default_size: int  # the trained resolution in pixels
    labels: dict[str, int] = field(default_factory=dict)  # class name -> id (class-to-image)
    num_classes: int | None = None
    pipeline_class: str | None = None  # model_index.json's _class_name
    # Generators with a fixed schedule (VAR: one step per scale of its token pyramid) run exactly this many steps
    # at exactly ``default_size``; forms and batch rows do not offer steps, scheduler or size for them.
    fixed_steps: int | None = None
    default_points: int | None = None  # point-cloud models: the points per cloud they were trained with
    prediction_type: str | None = None  # the saved scheduler's: which samplers can step this model

    @property
    def max_side(self) -> int:
        """Largest height/width served: 4x the trained side (16x its area), within ``MAX_SIDE``; a fixed-schedule
        model (VAR) serves only its trained size."""
        if self.fixed_steps is not None:
            return self.default_size
        limit = min(MAX_SIDE, 4 * self.default_size)
        return max(self.multiple, limit - limit % self.multiple)

    @property
    def min_side(self) -> int:
        return self.default_size if self.fixed_steps is not None else self.multiple

    def schedulers(self) -> list[str]:
        """The sampler names this model can use (all of them when its prediction type is unknown)."""
        return scheduler_names(self.prediction_type)

    def scheduler_problem(self, name: str | None) -> str | None:
        """What is wrong with sampling this model with ``name`` (a batch-row message), or None if nothing is."""
        if name in (None, "", "default"):
            return None
        usable = ", ".join(self.schedulers())
        if name not in scheduler_names():
            return f"unknown scheduler {name!r}; choose one of: {usable}"
        if name not in self.schedulers():
            return (
                f"scheduler {name!r} cannot sample {self.name}, which predicts {self.prediction_type!r}; "
                f"choose one of: {usable}"
            )
        return None

    def scheduler_choice(self, name: str | None) -> str | None:
        """``None`` for the model's own sampler, else ``name`` once it is known to step this model.

        Checked here, before any weights load, for every form that names a sampler (batch rows use
        :meth:`scheduler_problem`).
        """
        problem = self.scheduler_problem(name)
        if problem is not None:
            raise InputError(problem[0].upper() + problem[1:] + ".")
        return None if name in (None, "", "default") else name

    def class_choices(self) -> list[str]:
        """Class names ordered by id, or ids as strings when the model has no names."""
        if self.labels:
            by_id: dict[int, str] = {}
            for name, idx in self.labels.items():
                by_id.setdefault(idx, name)
            return [by_id[i] for i in sorted(by_id)]
        return [str(i) for i in range(self.num_classes or 0)]


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def model_spec(entry: CatalogEntry) -> ModelSpec:
    """Size rules and class names of a catalog model from ``model_index.json`` and component configs."""
    index = _read_json(entry.path / "model_index.json")
    transformer = _read_json(entry.path / "transformer" / "config.json")
    vae_factor = 1
    vae_entry = index.get("vae")
    if isinstance(vae_entry, list) and vae_entry and vae_entry[0] is not None:
        blocks = _read_json(entry.path / "vae" / "config.json").get("block_out_channels") or [0] * 4
        vae_factor = 2 ** (len(blocks) - 1)
    patch = int(transformer.get("patch_size") or 1)
    sample = int(transformer.get("sample_size") or 32)
    labels: dict[str, int] = {}
    for key, value in (index.get("id2label") or {}).items():
        for name in str(value).split(","):
            if name.strip() and str(key).isdigit():
                labels.setdefault(name.strip(), int(key))
    num_classes = transformer.get("num_classes") or transformer.get("num_embeds_ada_norm")
    if entry.kind not in ("class-to-image", "point-cloud"):
        num_classes = None
    pipeline_class = index.get("_class_name")
    fixed_steps = None
    if pipeline_class == "VARPipeline" and isinstance(transformer.get("patch_nums"), list):
        fixed_steps = len(transformer["patch_nums"])
    points = index.get("num_points")
    prediction = _read_json(entry.path / "scheduler" / "scheduler_config.json").get("prediction_type")
    return ModelSpec(
        name=entry.name,
        kind=entry.kind,
        multiple=max(1, vae_factor * patch),
        default_size=sample * vae_factor,
        labels=dict(sorted(labels.items(), key=lambda kv: (kv[1], kv[0]))),
        num_classes=int(num_classes) if num_classes else None,
        pipeline_class=pipeline_class if isinstance(pipeline_class, str) else None,
        fixed_steps=fixed_steps,
        default_points=int(points) if isinstance(points, int) and not isinstance(points, bool) else None,
        prediction_type=prediction if isinstance(prediction, str) else None,
    )


def size_for_aspect(spec: ModelSpec, preset: str) -> tuple[int, int]:
    """(width, height) with the model's trained pixel area, the preset's aspect ratio and the model's multiple."""
    if preset not in ASPECT_PRESETS:
        raise InputError(f"Unknown aspect preset {preset!r}. Choose one of: {', '.join(ASPECT_PRESETS)}.")
    ratio = ASPECT_PRESETS[preset]
    area = spec.default_size**2
    m = spec.multiple

    def snap(v: float) -> int:
        return int(max(m, min(spec.max_side, round(v / m) * m)))

    return snap(math.sqrt(area * ratio)), snap(math.sqrt(area / ratio))


def attention_variants() -> list[str]:
    """Attention variants the backbones offer: ``dit.attention.available_variants()`` when it exists."""
    try:
        from dit.attention import available_variants  # type: ignore[import-not-found]
    except ImportError:
        return ["sdpa"]
    try:
        variants = [str(v) for v in available_variants()]
    except Exception:  # a broken optional backend must not take the UI down
        return ["sdpa"]
    return variants or ["sdpa"]


def apply_attention(pipe: Any, variant: str | None) -> None:
    """Put attention ``variant`` (a label such as ``agentsd[ratio=0.5]``) on ``pipe``'s transformer unless it is
    already there; errors become :class:`InputError` naming the fix. ``None`` keeps what the pipeline has, and
    ``"sdpa"`` (every form's default) means the model's own attention: a model trained with agent attention keeps it.
    """
    if variant is None or variant == pipe.attention_label():
        return
    try:
        from dit.attention import set_attention  # type: ignore[import-not-found]
    except ImportError:
        raise InputError(f"Attention variant {variant!r} cannot be set on this model yet.") from None
    try:
        set_attention(pipe.transformer, variant, keep_trained=True)
    except ValueError as e:  # dit.attention.AttentionConfigError: the message names the fix
        raise InputError(str(e)) from None


# ---------------------------------------------------------------------------------------------- requests


@dataclass
class GenerationRequest:
    """One form submission: ``batch_count`` pipeline calls of ``batch_size`` images each."""

    model: str
    prompt: str | None = None
    negative_prompt: str | None = ""
    class_label: str | int | None = None
    scheduler: str | None = None
    steps: int = 20
    guidance_scale: float = 4.5
    width: int | None = None
    height: int | None = None
    seed: int = -1  # -1: a random seed, shown back in the result
    batch_size: int = 1
    batch_count: int = 1
    attention: str = "sdpa"
    lora: str | None = None
    lora_weight: float = 1.0
    kind: str | None = None  # the generator kind the caller expects (the UI tab / API endpoint)


@dataclass
class GenerationResult:
    paths: list[Path]
    records: list[GenerationRecord]
    seeds: list[int]
    interrupted: bool
    steps_done: int
    steps_total: int
    seconds: float

    def summary(self) -> dict[str, Any]:
        return {
            "images": [str(p) for p in self.paths],
            "seeds": self.seeds,
            "interrupted": self.interrupted,
            "steps_done": self.steps_done,
            "steps_total": self.steps_total,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Progress:
    """A worker event: steps done so far (over all calls of the request) and an optional preview image."""

    done: int
    total: int
    preview: Any = None  # PIL image
    message: str | None = None
    seed: int | None = None  # the first seed of the request, once chosen


@dataclass
class ImagesSaved:
    paths: list[Path]
    records: list[GenerationRecord]


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise InputError(f"{what} must be an integer, got {value!r}.")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise InputError(f"{what} must be a whole number, got {value!r}.")
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    if isinstance(value, int):
        return value
    raise InputError(f"{what} must be an integer, got {value!r}.")


def _as_float(value: Any, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a number, got {value!r}.") from None
    if isinstance(value, bool) or not math.isfinite(out):
        raise InputError(f"{what} must be a finite number, got {value!r}.")
    return out


# ---------------------------------------------------------------------------------------------- jobs


class Job:
    """A request running on a worker thread. Iterate :meth:`events`, then read :attr:`result`/:attr:`error`."""

    _ids = itertools.count(1)

    def __init__(self, request: GenerationRequest, session: str):
        self.id = next(self._ids)
        self.request = request
        self.session = session
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.result: GenerationResult | None = None
        self.error: BaseException | None = None
        self._events: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None

    def cancel(self) -> None:
        """Stop this request after its current sampling step (other requests are not affected)."""
        self.cancelled.set()

    def post(self, event: Any) -> None:
        self._events.put(event)

    def events(self, heartbeat: float | None = None) -> Iterator[Any]:
        """Worker events until the job ends; with ``heartbeat``, ``None`` when nothing came for that long."""
        while True:
            try:
                event = self._events.get(timeout=heartbeat)
            except queue.Empty:
                if self.done.is_set() and self._events.empty():
                    return
                yield None
                continue
            if event is _END:
                return
            yield event

    def wait(self, timeout: float | None = None) -> GenerationResult:
        """Block until the job ends; its result, or re-raise its error."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"generation job {self.id} still running after {timeout} s")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


_END = object()


# ---------------------------------------------------------------------------------------------- the service


class GenerationService:
    """Serve generation requests on the catalog's models (see the module docstring)."""

    def __init__(
        self,
        catalog: Catalog,
        output_dir: str | Path = "outputs",
        *,
        device: str | None = None,
        torch_dtype: Any = None,
        cache_size: int = 2,
        lora_dirs: list[Path] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        loader: Callable[..., Any] | None = None,
    ):
        self.catalog = catalog
        self.output_dir = Path(output_dir).resolve()
        self.device = device
        self.torch_dtype = torch_dtype
        self.cache_size = max(1, int(cache_size))
        self.max_pixels = int(max_pixels)
        self.lora_dirs = [Path(d) for d in (lora_dirs or [])]
        self._loader = loader
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._model_locks: dict[str, threading.Lock] = {}
        self._jobs: dict[int, Job] = {}
        self._jobs_lock = threading.Lock()
        self._history: OrderedDict[str, deque] = OrderedDict()
        self._history_lock = threading.Lock()
        self._counter = itertools.count(1)
        self._specs: dict[str, ModelSpec] = {}
        self.stats = {"completed": 0, "interrupted": 0, "failed": 0}

    # ---- catalog ------------------------------------------------------------------------------------
    def model_names(self, kind: str | None = None) -> list[str]:
        return self.catalog.names(kind)

    def kinds(self) -> list[str]:
        return self.catalog.kinds()

    def spec(self, model: str) -> ModelSpec:
        if not isinstance(model, str) or model not in self.catalog:
            known = ", ".join(self.catalog.names()) or "none (start the app with --model PATH or --models-dir DIR)"
            raise InputError(f"Unknown model {model!r}. Available models: {known}.")
        if model not in self._specs:
            self._specs[model] = model_spec(self.catalog.get(model))
        return self._specs[model]

    def loras(self) -> dict[str, Path]:
        """LoRA files (``*.safetensors``) in the ``loras/`` folders, by display name. Requests pick by name."""
        found: dict[str, Path] = {}
        for directory in self.lora_dirs:
            if not directory.is_dir():
                continue
            for path in sorted(directory.glob("*.safetensors")):
                name, n = path.stem, 2
                while name in found:
                    name, n = f"{path.stem}-{n}", n + 1
                found[name] = path.resolve()
        return found

    # ---- validation ---------------------------------------------------------------------------------
    def validate(self, req: GenerationRequest) -> GenerationRequest:
        """A normalised copy of ``req`` or :class:`InputError` naming what to change. Loads no model."""
        spec = self.spec(req.model)
        if req.kind is not None and spec.kind != req.kind:
            raise InputError(
                f"Model {req.model!r} is a {spec.kind} model; this form generates {req.kind}. "
                f"Pick one of: {', '.join(self.model_names(req.kind)) or 'none'}."
            )
        out = GenerationRequest(**vars(req))
        if spec.kind == "text-to-image":
            if not isinstance(req.prompt, str) or not req.prompt.strip():
                raise InputError("The prompt is empty; describe the image you want.")
            if len(req.prompt) > MAX_PROMPT_CHARS:
                raise InputError(f"The prompt is {len(req.prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.")
            neg = req.negative_prompt or ""
            if not isinstance(neg, str):
                raise InputError("The negative prompt must be text.")
            if len(neg) > MAX_PROMPT_CHARS:
                raise InputError(f"The negative prompt is {len(neg)} characters long; the limit is {MAX_PROMPT_CHARS}.")
            out.prompt, out.negative_prompt, out.class_label = req.prompt, neg, None
        elif spec.kind == "class-to-image":
            out.class_label = self._check_class(spec, req.class_label)
            out.prompt = out.negative_prompt = None
        else:
            raise InputError(f"Model {req.model!r} is a {spec.kind} model; this request is for image generators.")
        # a fixed-schedule model (VAR) has no scheduler to choose
        out.scheduler = None if spec.fixed_steps is not None else spec.scheduler_choice(req.scheduler)
        # VAR runs one step per scale whatever the form says; progress and records count those steps
        out.steps = spec.fixed_steps or _as_int(req.steps, "Steps")
        if not 1 <= out.steps <= MAX_STEPS:
            raise InputError(f"Steps must be between 1 and {MAX_STEPS}, got {out.steps}.")
        out.guidance_scale = _as_float(req.guidance_scale, "Guidance scale")
        if not 0 <= out.guidance_scale <= 100:
            raise InputError(f"Guidance scale must be between 0 and 100, got {out.guidance_scale}.")
        out.width = spec.default_size if req.width in (None, 0) else _as_int(req.width, "Width")
        out.height = spec.default_size if req.height in (None, 0) else _as_int(req.height, "Height")
        m = spec.multiple
        for what, v in (("Width", out.width), ("Height", out.height)):
            if spec.min_side == spec.max_side and v != spec.max_side:
                raise InputError(f"{spec.name} generates only {spec.max_side}x{spec.max_side} images; {what} is {v}.")
            if not m <= v <= spec.max_side:
                raise InputError(f"{what} must be between {m} and {spec.max_side} pixels for {spec.name}, got {v}.")
            if v % m:
                raise InputError(
                    f"{what} {v} is not a multiple of {m}, which {spec.name} needs; "
                    f"use {max(m, v - v % m)} or {v - v % m + m}."
                )
        if out.width * out.height > self.max_pixels:
            raise InputError(
                f"{out.width}x{out.height} is {out.width * out.height} pixels; this server allows at most "
                f"{self.max_pixels} per image. Choose a smaller size."
            )
        out.seed = _as_int(req.seed, "Seed")
        if not -1 <= out.seed <= MAX_SEED:
            raise InputError(f"Seed must be -1 (random) or between 0 and {MAX_SEED}, got {out.seed}.")
        out.batch_size = _as_int(req.batch_size, "Batch size")
        if not 1 <= out.batch_size <= MAX_BATCH_SIZE:
            raise InputError(f"Batch size must be between 1 and {MAX_BATCH_SIZE}, got {out.batch_size}.")
        out.batch_count = _as_int(req.batch_count, "Batch count")
        if not 1 <= out.batch_count <= MAX_BATCH_COUNT:
            raise InputError(f"Batch count must be between 1 and {MAX_BATCH_COUNT}, got {out.batch_count}.")
        variants = attention_variants()
        out.attention = req.attention or variants[0]
        if out.attention not in variants:
            raise InputError(f"Unknown attention variant {out.attention!r}. Available: {', '.join(variants)}.")
        if req.lora in (None, "", "none", "None"):
            out.lora = None
        else:
            loras = self.loras()
            if req.lora not in loras:
                known = ", ".join(loras) or "none installed"
                raise InputError(f"Unknown LoRA {req.lora!r}. Available: {known}.")
        out.lora_weight = _as_float(req.lora_weight, "LoRA weight")
        if not -4 <= out.lora_weight <= 4:
            raise InputError(f"LoRA weight must be between -4 and 4, got {out.lora_weight}.")
        return out

    @staticmethod
    def _check_class(spec: ModelSpec, label: Any) -> int:
        if label is None or (isinstance(label, str) and not label.strip()):
            raise InputError("Choose a class to generate.")
        if isinstance(label, bool):
            raise InputError(f"Class must be a name or an id, got {label!r}.")
        if isinstance(label, str) and label.strip() in spec.labels:
            return spec.labels[label.strip()]
        if isinstance(label, (int, float)) or (isinstance(label, str) and label.strip().isdigit()):
            idx = _as_int(label, "Class")
            n = spec.num_classes or len(spec.class_choices())
            if not 0 <= idx < n:
                raise InputError(f"Class {idx} is out of range: {spec.name} has classes 0..{n - 1}.")
            return idx
        shown = ", ".join(spec.class_choices()[:20])
        raise InputError(f"Unknown class {label!r} for {spec.name}. Classes: {shown}.")

    # ---- model cache --------------------------------------------------------------------------------
    def model_lock(self, model: str) -> threading.Lock:
        """The lock every user of ``model``'s pipeline holds while calling it (form tabs, API, other kinds' tabs):
        a pipeline keeps per-call state (interrupt flag, loaded adapters, attention processors)."""
        with self._cache_lock:
            return self._model_locks.setdefault(model, threading.Lock())

    def _load(self, model: str) -> Any:
        if self._loader is not None:
            return self._loader(model)
        from .loading import load_pipeline

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
            return load_pipeline(model, torch_dtype=self.torch_dtype, device=self.device, catalog=self.catalog)

    def pipeline(self, model: str) -> Any:
        """The loaded pipeline for ``model`` (LRU-cached). Call with the model's lock held."""
        with self._cache_lock:
            if model in self._cache:
                self._cache.move_to_end(model)
                return self._cache[model]
        pipe = self._load(model)
        pipe.set_progress_bar_config(disable=True)
        evicted = []
        with self._cache_lock:
            self._cache[model] = pipe
            while len(self._cache) > self.cache_size:
                evicted.append(self._cache.popitem(last=False))
        if evicted:
            del evicted
            gc.collect()
            with contextlib.suppress(Exception):
                import torch

                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        return pipe

    def loaded_models(self) -> list[str]:
        with self._cache_lock:
            return list(self._cache)

    # ---- running ------------------------------------------------------------------------------------
    def submit(self, req: GenerationRequest, session: str = "default", preview_every: int | None = None) -> Job:
        """Validate ``req`` (raises :class:`InputError` at once) and start it on a worker thread."""
        req = self.validate(req)
        job = Job(req, session)
        with self._jobs_lock:
            self._jobs[job.id] = job
        job.thread = threading.Thread(
            target=self._run, args=(job, preview_every), name=f"generate-{job.id}", daemon=True
        )
        job.thread.start()
        return job

    def cancel(self, session: str) -> int:
        """Cancel every running or waiting request of ``session``; how many were cancelled."""
        with self._jobs_lock:
            jobs = [j for j in self._jobs.values() if j.session == session and not j.done.is_set()]
        for job in jobs:
            job.cancel()
        return len(jobs)

    def running(self) -> int:
        with self._jobs_lock:
            return sum(not j.done.is_set() for j in self._jobs.values())

    def _run(self, job: Job, preview_every: int | None) -> None:
        try:
            job.result = self._generate(job, preview_every)
            self.stats["interrupted" if job.result.interrupted else "completed"] += 1
        except BaseException as e:  # reported to the caller through the job
            job.error = e if isinstance(e, (InputError, ModelLoadError)) else _wrap(e)
            self.stats["failed"] += 1
        finally:
            job.done.set()
            job.post(_END)
            with self._jobs_lock:
                self._jobs.pop(job.id, None)

    def _generate(self, job: Job, preview_every: int | None) -> GenerationResult:
        req = job.request
        start = time.perf_counter()
        total = req.steps * req.batch_count
        lock = self.model_lock(req.model)
        if not lock.acquire(blocking=False):
            job.post(Progress(0, total, message=f"Waiting for {req.model} (busy with another request)..."))
            while not lock.acquire(timeout=0.2):
                if job.cancelled.is_set():
                    return GenerationResult([], [], [], True, 0, total, time.perf_counter() - start)
        try:
            if job.cancelled.is_set():
                return GenerationResult([], [], [], True, 0, total, time.perf_counter() - start)
            if req.model not in self.loaded_models():
                job.post(Progress(0, total, message=f"Loading {req.model}..."))
            pipe = self.pipeline(req.model)
            apply_attention(pipe, req.attention)
            with self._lora(pipe, req):
                return self._sample(job, pipe, preview_every, start)
        finally:
            lock.release()

    def _sample(self, job: Job, pipe: Any, preview_every: int | None, start: float) -> GenerationResult:
        req = job.request
        total = req.steps * req.batch_count
        every = preview_every or max(1, req.steps // 8)
        base_seed = secrets.randbelow(2**32) if req.seed == -1 else req.seed
        job.post(Progress(0, total, seed=base_seed))
        paths: list[Path] = []
        records: list[GenerationRecord] = []
        seeds: list[int] = []
        done = 0
        interrupted = False
        for k in range(req.batch_count):
            if job.cancelled.is_set():
                interrupted = True
                break
            offset = k * req.steps

            def on_step(p: Any, i: int, t: Any, tensors: dict, offset: int = offset) -> dict:
                nonlocal done
                done = offset + i + 1
                if job.cancelled.is_set():
                    p.request_interrupt()  # this pipeline runs only this request (model lock)
                preview = None
                if (i + 1) % every == 0 or i + 1 == req.steps:
                    preview = _preview(p, tensors.get("latents"))
                job.post(Progress(done, total, preview))
                return {}

            kwargs: dict[str, Any] = dict(
                num_inference_steps=req.steps,
                guidance_scale=req.guidance_scale,
                height=req.height,
                width=req.width,
                num_images_per_prompt=req.batch_size,
                seed=base_seed + k * req.batch_size,
                scheduler=req.scheduler,
                callback_on_step_end=on_step,
            )
            if req.prompt is not None:
                out = pipe(req.prompt, negative_prompt=req.negative_prompt or "", **kwargs)
            else:
                out = pipe(class_labels=[req.class_label], **kwargs)
            if out.interrupted:
                interrupted = True
                break
            saved = [self.save_image(image, record) for image, record in zip(out.images, out.records)]
            paths += saved
            records += out.records
            seeds += list(out.seeds or [])
            self.remember(job.session, saved, out.records)
            job.post(ImagesSaved(saved, list(out.records)))
        return GenerationResult(paths, records, seeds, interrupted, done, total, time.perf_counter() - start)

    def save_image(self, image: Any, record: GenerationRecord) -> Path:
        """Save into the dated output folder under a unique name, with the record; the absolute path."""
        day = time.strftime("%Y-%m-%d")
        name = f"{time.strftime('%H%M%S')}-{next(self._counter):05d}-{record.seed}.png"
        return save_png(image, self.output_dir / day / name, record).resolve()

    @contextlib.contextmanager
    def _lora(self, pipe: Any, req: GenerationRequest) -> Iterator[None]:
        """Apply the requested LoRA (or none) for this call; runs under the model's lock.

        Uses ``pipelines.lora`` (peft on the transformer, kept loaded between requests that ask for the same
        file) where it is available, else a diffusers-style ``pipe.load_lora_weights``; otherwise a LoRA request
        is answered with "not supported yet".
        """
        try:
            from .lora import load_loras, loaded_loras
        except Exception:  # not available in this build
            load_loras = loaded_loras = None
        if load_loras is not None:
            if req.lora is None and not loaded_loras(pipe):
                yield
                return
            wanted = [(self.loras()[req.lora], req.lora_weight)] if req.lora is not None else []
            try:
                load_loras(pipe, wanted)
            except (InputError, ModelLoadError) as e:
                message = str(e)
                for path, _ in wanted:  # name the file, not where it sits on the server
                    message = message.replace(str(path), path.name)
                raise InputError(message) from None
            yield
            return
        if req.lora is None:
            yield
            return
        if not hasattr(pipe, "load_lora_weights"):
            raise InputError(
                f"LoRA is not supported yet for {req.model} ({type(pipe).__name__}); choose 'none' in the LoRA picker."
            )
        path = self.loras()[req.lora]
        from dit.convert.safe_load import expect_safetensors

        try:
            expect_safetensors(path)
        except ValueError as e:
            raise InputError(str(e)) from None
        pipe.load_lora_weights(str(path), adapter_name=req.lora)
        if hasattr(pipe, "set_adapters"):
            pipe.set_adapters([req.lora], [req.lora_weight])
        pipe.active_adapters_record = [{"name": req.lora, "weight": req.lora_weight, "hash": file_hash(path)}]
        try:
            yield
        finally:
            pipe.active_adapters_record = []
            if hasattr(pipe, "unload_lora_weights"):
                pipe.unload_lora_weights()

    # ---- history ------------------------------------------------------------------------------------
    def remember(self, session: str, paths: list[Path], records: list[GenerationRecord]) -> None:
        """Add saved files to ``session``'s history (what the History tab lists)."""
        with self._history_lock:
            entries = self._history.setdefault(session, deque(maxlen=HISTORY_PER_SESSION))
            self._history.move_to_end(session)
            for path, record in zip(paths, records):
                entries.append((path, record))
            while len(self._history) > HISTORY_SESSIONS:
                self._history.popitem(last=False)

    def history(self, session: str) -> list[tuple[Path, GenerationRecord]]:
        """This session's images, newest first (files deleted since are left out)."""
        with self._history_lock:
            entries = list(self._history.get(session, ()))
        return [(p, r) for p, r in reversed(entries) if p.is_file()]

    # ---- reading parameters back ------------------------------------------------------------------
    @staticmethod
    def read_parameters(path: str | Path) -> GenerationRecord:
        """The record stored in an uploaded image; :class:`InputError` for anything that is not one."""
        from PIL import Image, UnidentifiedImageError

        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError:
            raise InputError("The upload did not arrive; upload the PNG again.") from None
        if size > MAX_UPLOAD_BYTES:
            raise InputError(f"The file is {size // 1_000_000} MB; the limit is {MAX_UPLOAD_BYTES // 1_000_000} MB.")
        try:
            with Image.open(path) as image:
                w, h = image.size
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError):
            raise InputError("That file is not an image DiT Studio can read; upload a PNG it generated.") from None
        if w * h > MAX_UPLOAD_PIXELS:
            raise InputError(f"The image is {w}x{h}; images above {MAX_UPLOAD_PIXELS} pixels are refused.")
        try:
            return read_record(path)
        except (ValueError, OSError) as e:
            text = str(e).replace(str(path), "The image")
            raise InputError(text) from None


class GenerationFailed(RuntimeError):
    """An unexpected error inside a pipeline call; its message is safe to show."""


def _wrap(e: BaseException) -> BaseException:
    if isinstance(e, (KeyboardInterrupt, SystemExit)):
        return e
    return GenerationFailed(f"Generation failed: {type(e).__name__}: {e}")


def _preview(pipe: Any, latents: Any) -> Any:
    """A small PIL preview of the first image of the batch from the current latents."""
    if latents is None:
        return None
    try:
        import torch
        from PIL import Image

        with torch.no_grad():
            image = pipe.to_output_type(pipe.decode(latents[:1]), "pil")[0]
        side = max(image.size)
        if side < 128:  # tiny models: make the preview visible without smoothing it
            scale = 128 // side + (128 % side > 0)
            image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
        elif side > 256:
            image.thumbnail((256, 256))
        return image
    except Exception:  # a preview must never break a generation
        return None
