"""Batch generation from a prompts file: ``python -m pipelines.batch PROMPTS --model NAME -o DIR`` (``dit-batch``).

Input, one row per generation setting:

* ``.txt``: one prompt per line (blank lines and lines starting with ``#`` are skipped);
* ``.jsonl``: one JSON object per line (or a JSON string, taken as the prompt);
* ``.csv``: a header row, then one row per line (quoted cells may span lines).

Columns (all optional but the condition; empty cells use the command-line defaults): ``prompt``,
``negative_prompt``, ``seed``, ``steps``, ``guidance``, ``width``, ``height``, ``class``, ``model``,
``scheduler``, ``count``. ``control_image`` / ``adapter`` columns are accepted in the header but a
non-empty value is rejected: control adapters are not supported by the batch CLI yet.

Output, in ``--output-dir``: ``{row:05d}-{i:02d}-{seed}.png`` (PNG with the A1111 ``parameters`` text and
the JSON record) and ``manifest.jsonl``, one line per image in row order:
``{"file", "row", "line", "index", "record"}``.

* The whole file is validated before any model loads; every malformed row is reported with its line
  number. ``--dry-run`` stops there.
* Resumable: a rerun skips images whose file exists and matches its row (checked against the manifest,
  or the PNG's own record). PNGs are written atomically, so a killed run loses at most the images in flight.
* Seeds are explicit or derived from ``--seed`` and the row number, noise is drawn on the CPU per image, so
  the files do not depend on how the work is split: under ``accelerate launch --num_processes N`` the rows
  are spread over the processes, which write the same files, byte for byte, as one process would. Each
  process appends to its own ``manifest.rank{k}.jsonl``; the main process merges them in row order at the end.

Several processes on one machine's CPU: ``accelerate launch --cpu --num_processes N`` starts a single process
unless an MPI hostfile is configured (accelerate's "simple" launcher), so use
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m pipelines.batch ...`` or
``torchrun --nproc_per_node N -m pipelines.batch ...``; on GPUs, ``accelerate launch --num_processes N``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import math
import os
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import ASSETS_MODELS, Catalog
from .errors import InputError, ModelLoadError
from .metadata import GenerationRecord, read_record, save_png
from .schedulers import scheduler_names
from .service import MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS, ModelSpec, model_spec

COLUMNS = (
    "prompt",
    "negative_prompt",
    "seed",
    "steps",
    "guidance",
    "width",
    "height",
    "class",
    "model",
    "scheduler",
    "count",
)
ALIASES = {
    "negative": "negative_prompt",
    "guidance_scale": "guidance",
    "cfg": "guidance",
    "num_inference_steps": "steps",
    "class_label": "class",
    "label": "class",
    "num_images": "count",
}
#: Columns a later release will use; a non-empty value is refused with a clear message until then.
NOT_YET = {
    "control_image": "control images",
    "control": "control images",
    "control_type": "control images",
    "control_scale": "control images",
    "preprocessor": "control images",
    "adapter": "adapters (LoRA / control adapters)",
    "adapters": "adapters (LoRA / control adapters)",
    "adapter_weight": "adapters (LoRA / control adapters)",
    "lora": "adapters (LoRA / control adapters)",
}
MAX_COUNT = 64
MANIFEST = "manifest.jsonl"
FORMATS = (".txt", ".jsonl", ".csv")


@dataclass
class Row:
    index: int  # 0-based among data rows; names the files
    line: int  # 1-based line of the prompts file where the row starts
    values: dict[str, Any]
    broken: bool = False  # unparsable (already reported); kept so row numbers stay stable


@dataclass
class Task:
    """A validated row: everything a pipeline call needs."""

    row: int
    line: int
    model: str
    kind: str
    prompt: str | None
    negative_prompt: str | None
    class_label: int | None
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    scheduler: str | None
    count: int

    def file_name(self, i: int) -> str:
        return f"{self.row:05d}-{i:02d}-{self.seed + i}.png"


@dataclass
class Defaults:
    model: str | None = None
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    count: int = 1


@dataclass
class Problems:
    path: str
    items: list[tuple[int, str]] = field(default_factory=list)

    def add(self, line: int, message: str) -> None:
        self.items.append((line, message))

    def __bool__(self) -> bool:
        return bool(self.items)

    def report(self) -> str:
        lines = [f"{self.path}:{line}: {msg}" for line, msg in sorted(self.items, key=lambda x: x[0])]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- reading


def _normalize_key(key: Any) -> str:
    key = str(key).strip().lower().replace(" ", "_").replace("-", "_")
    return ALIASES.get(key, key)


def read_rows(path: Path, problems: Problems) -> list[Row]:
    """Rows of a ``.txt`` / ``.jsonl`` / ``.csv`` prompts file; malformed lines go to ``problems``."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        problems.add(0, f"unsupported file type {suffix or '(none)'!r}; use one of {', '.join(FORMATS)}")
        return []
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        problems.add(0, f"not UTF-8 text ({e})")
        return []
    except OSError as e:
        problems.add(0, f"cannot read the file ({e.strerror})")
        return []
    rows: list[Row] = []
    if suffix == ".txt":
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append(Row(len(rows), n, {"prompt": line.strip()}))
    elif suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                problems.add(n, f"not valid JSON ({e.msg} at column {e.colno})")
                rows.append(Row(len(rows), n, {}, broken=True))
                continue
            if isinstance(value, str):
                value = {"prompt": value}
            if not isinstance(value, dict):
                problems.add(n, f"expected a JSON object (or a prompt string), got {type(value).__name__}")
                rows.append(Row(len(rows), n, {}, broken=True))
                continue
            rows.append(Row(len(rows), n, {_normalize_key(k): v for k, v in value.items()}))
    else:
        reader = csv.reader(text.splitlines(keepends=True))
        try:
            header = next(reader)
        except StopIteration:
            return []
        except csv.Error as e:
            problems.add(1, f"malformed CSV header ({e})")
            return []
        keys = [_normalize_key(h) for h in header]
        for key in keys:
            if key not in COLUMNS and key not in NOT_YET:
                problems.add(1, f"unknown column {key!r}; columns: {', '.join(COLUMNS)}")
        if len(set(keys)) != len(keys):
            problems.add(1, "a column name appears twice in the header")
        start = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                problems.add(start, f"malformed CSV ({e})")
                break
            if any(c.strip() for c in cells):
                if len(cells) > len(keys):
                    problems.add(start, f"{len(cells)} cells but the header names {len(keys)} columns")
                values = {k: c for k, c in zip(keys, cells) if k in COLUMNS or k in NOT_YET}
                rows.append(Row(len(rows), start, values))
            start = reader.line_num + 1
    return rows


# ---------------------------------------------------------------------------------------------- validating


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _int(value: Any, name: str) -> int:
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


def _float(value: Any, name: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        out = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return out


def derived_seed(base: int, row: int) -> int:
    """The seed of a row that gives none: stable for (``--seed``, row), spread over 32 bits."""
    return int.from_bytes(hashlib.sha256(f"{base}:{row}".encode()).digest()[:4], "big")


def _class_id(spec: ModelSpec, value: Any) -> int:
    if isinstance(value, str) and value.strip() in spec.labels:
        return spec.labels[value.strip()]
    n = spec.num_classes or len(spec.class_choices())
    try:
        idx = _int(value, "class")
    except ValueError:
        known = ", ".join(spec.class_choices()[:12])
        raise ValueError(f"unknown class {value!r} for model {spec.name} (classes: {known}...)") from None
    if not 0 <= idx < n:
        raise ValueError(f"class {idx} is out of range for model {spec.name} (0..{n - 1})")
    return idx


def validate_rows(rows: list[Row], defaults: Defaults, catalog: Catalog, problems: Problems) -> list[Task]:
    """Tasks for the valid rows; every problem (with its line) goes to ``problems``. Loads no model."""
    specs: dict[str, ModelSpec] = {}
    tasks: list[Task] = []
    for row in rows:
        if row.broken:
            continue
        task, errors = check_row(row, defaults, catalog, specs)
        for message in errors:
            problems.add(row.line, message)
        if task is not None:
            tasks.append(task)
    return tasks


def check_row(
    row: Row, defaults: Defaults, catalog: Catalog, specs: dict[str, ModelSpec]
) -> tuple[Task | None, list[str]]:
    """One row -> (its task, []) or (None, every problem found in it)."""
    errors: list[str] = []
    v = row.values

    def get(key: str, default: Any = None) -> Any:
        return default if _blank(v.get(key)) else v[key]

    for key in v:
        if key in NOT_YET and not _blank(v[key]):
            errors.append(
                f"column {key!r} is not supported yet: the batch CLI cannot apply {NOT_YET[key]}; "
                "remove the column or leave it empty"
            )
        elif key not in COLUMNS and key not in NOT_YET:
            errors.append(f"unknown column {key!r}; columns: {', '.join(COLUMNS)}")
    model = get("model", defaults.model)
    spec = None
    if model is None:
        errors.append("no model: give --model or a 'model' column")
    elif not isinstance(model, str) or model not in catalog:
        errors.append(f"unknown model {model!r}; available: {', '.join(catalog.names()) or 'none'}")
    else:
        spec = specs.setdefault(model, model_spec(catalog.get(model)))
    prompt, negative, class_id = None, None, None
    if spec is not None and spec.kind == "text-to-image":
        prompt = get("prompt")
        if prompt is None:
            errors.append("empty prompt")
        elif not isinstance(prompt, str):
            errors.append(f"prompt must be text, got {type(prompt).__name__}")
        elif len(prompt) > MAX_PROMPT_CHARS:
            errors.append(f"prompt is {len(prompt)} characters; the limit is {MAX_PROMPT_CHARS}")
        negative = get("negative_prompt", defaults.negative_prompt)
        if not isinstance(negative, str) or len(negative) > MAX_PROMPT_CHARS:
            errors.append(f"negative_prompt must be text of at most {MAX_PROMPT_CHARS} characters")
        if not _blank(v.get("class")):
            errors.append(f"model {model} is text-to-image; the 'class' column is for class-to-image models")
    elif spec is not None and spec.kind == "class-to-image":
        if _blank(v.get("class")):
            errors.append(f"model {model} is class-to-image: give a 'class' (name or id)")
        else:
            try:
                class_id = _class_id(spec, v["class"])
            except ValueError as e:
                errors.append(str(e))
        for key in ("prompt", "negative_prompt"):
            if not _blank(v.get(key)):
                errors.append(f"model {model} is class-to-image; it takes a 'class', not a '{key}'")
    elif spec is not None:
        errors.append(f"model {model} is a {spec.kind} model, which the batch CLI does not run yet")

    def number(key: str, conv: Any, default: Any, lo: float, hi: float) -> Any:
        raw = get(key, default)
        if raw is None:
            return None
        try:
            value = conv(raw, key)
        except ValueError as e:
            errors.append(str(e))
            return None
        if not lo <= value <= hi:
            errors.append(f"{key} must be between {lo} and {hi}, got {value}")
            return None
        return value

    seed = number("seed", _int, None, -1, 2**63 - 1 - MAX_COUNT)
    steps = number("steps", _int, defaults.steps, 1, MAX_STEPS)
    kind_guidance = 4.0 if spec is not None and spec.kind == "class-to-image" else 4.5
    guidance = number("guidance", _float, defaults.guidance if defaults.guidance is not None else kind_guidance, 0, 100)
    count = number("count", _int, defaults.count, 1, MAX_COUNT)
    size = spec.default_size if spec is not None else None
    width = number("width", _int, defaults.width or size, 1, MAX_SIDE)
    height = number("height", _int, defaults.height or size, 1, MAX_SIDE)
    if spec is not None:
        for key, value in (("width", width), ("height", height)):
            if value is not None and (value % spec.multiple or value < spec.multiple):
                lower = max(spec.multiple, value - value % spec.multiple)
                errors.append(
                    f"{key} {value} is not a multiple of {spec.multiple}, which {spec.name} needs "
                    f"(use {lower} or {lower + spec.multiple})"
                )
    scheduler = get("scheduler", defaults.scheduler)
    if scheduler is not None and scheduler not in scheduler_names():
        errors.append(f"unknown scheduler {scheduler!r}; choose one of {', '.join(scheduler_names())}")
    if errors:
        return None, errors
    if seed is None or seed == -1:
        seed = derived_seed(defaults.seed, row.index)
    return (
        Task(
            row=row.index,
            line=row.line,
            model=model,
            kind=spec.kind,
            prompt=prompt,
            negative_prompt=negative,
            class_label=class_id,
            seed=seed,
            steps=steps,
            guidance=guidance,
            width=width,
            height=height,
            scheduler=scheduler,
            count=count,
        ),
        [],
    )


# ---------------------------------------------------------------------------------------------- manifest


def manifest_entry(task: Task, i: int, record: GenerationRecord) -> dict[str, Any]:
    return {"file": task.file_name(i), "row": task.row, "line": task.line, "index": i, "record": record.to_dict()}


def read_manifests(out_dir: Path) -> dict[str, dict]:
    """Entries of ``manifest.jsonl`` and any ``manifest.rank*.jsonl`` shards, by file (later lines win).

    Partial last lines (a run killed while appending) are skipped.
    """
    entries: dict[str, dict] = {}
    paths = [out_dir / MANIFEST, *sorted(out_dir.glob("manifest.rank*.jsonl"))]
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and isinstance(entry.get("file"), str):
                    entries[entry["file"]] = entry
    return entries


def _matches(task: Task, i: int, record: dict[str, Any] | None) -> bool:
    """Whether a stored record was made from this row (so the image need not be regenerated)."""
    if not isinstance(record, dict):
        return False
    want = {
        "model": task.model,
        "prompt": task.prompt,
        "negative_prompt": task.negative_prompt if task.prompt is not None else None,
        "class_label": task.class_label,
        "seed": task.seed + i,
        "steps": task.steps,
        "width": task.width,
        "height": task.height,
    }
    if any(record.get(k) != v for k, v in want.items()):
        return False
    if task.scheduler is not None and record.get("scheduler") != task.scheduler:
        return False
    with contextlib.suppress(TypeError, ValueError):
        return math.isclose(float(record.get("guidance_scale")), task.guidance, rel_tol=0, abs_tol=1e-9)
    return False


def done_record(out_dir: Path, task: Task, i: int, manifest: dict[str, dict]) -> dict | None:
    """The stored record of image ``i`` of ``task`` when its file exists and was made from this row."""
    name = task.file_name(i)
    path = out_dir / name
    if not path.is_file():
        return None
    entry = manifest.get(name)
    if entry is not None and _matches(task, i, entry.get("record")):
        return entry["record"]
    try:  # saved, but the run was killed before its manifest line was written
        record = read_record(path).to_dict()
    except (ValueError, OSError):
        return None
    return record if _matches(task, i, record) else None


def append_line(path: Path, entry: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_manifest(out_dir: Path, tasks: list[Task]) -> int:
    """Merge the shards into ``manifest.jsonl``: one line per finished image, in row order. Atomic."""
    stored = read_manifests(out_dir)
    lines = []
    for task in tasks:
        for i in range(task.count):
            record = done_record(out_dir, task, i, stored)
            if record is not None:
                entry = {"file": task.file_name(i), "row": task.row, "line": task.line, "index": i, "record": record}
                lines.append(json.dumps(entry, ensure_ascii=False) + "\n")
    tmp = out_dir / f".{MANIFEST}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_dir / MANIFEST)
    for shard in out_dir.glob("manifest.rank*.jsonl"):
        with contextlib.suppress(FileNotFoundError):
            shard.unlink()
    return len(lines)


# ---------------------------------------------------------------------------------------------- running


@dataclass
class Chunk:
    task: Task
    indices: list[int]  # images of the row made in one pipeline call


def plan_chunks(tasks: list[Task], batch_size: int) -> list[Chunk]:
    """Fixed chunks (images ``0..b-1``, ``b..2b-1``, ... of each row): a call's batch never depends on what
    is already done or on the number of processes, so the pixels never do either."""
    chunks = []
    for task in tasks:
        for start in range(0, task.count, batch_size):
            chunks.append(Chunk(task, list(range(start, min(task.count, start + batch_size)))))
    return chunks


def run_chunk(pipe: Any, chunk: Chunk) -> list[tuple[Any, GenerationRecord]]:
    task = chunk.task
    kwargs: dict[str, Any] = dict(
        num_inference_steps=task.steps,
        guidance_scale=task.guidance,
        height=task.height,
        width=task.width,
        num_images_per_prompt=len(chunk.indices),
        seed=[task.seed + i for i in chunk.indices],
        scheduler=task.scheduler,
    )
    if task.prompt is not None:
        out = pipe(task.prompt, negative_prompt=task.negative_prompt or "", **kwargs)
    else:
        out = pipe(class_labels=[task.class_label], **kwargs)
    records = list(out.records)
    for record, i in zip(records, chunk.indices):
        record.batch_index = i  # the image's place in its row, whatever the chunking
    return list(zip(out.images, records))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="dit-batch", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("prompts", type=Path, help="prompts file: .txt (one prompt a line), .jsonl or .csv")
    p.add_argument("--model", help="default model: a catalog name or a pipeline directory (rows may override)")
    p.add_argument("--models-dir", action="append", default=[], type=Path, help="extra catalog root (repeatable)")
    p.add_argument("--no-default-models", action="store_true", help=f"do not use the shipped {ASSETS_MODELS}")
    p.add_argument("-o", "--output-dir", type=Path, default=None, help="default: outputs/batch-<prompts file name>")
    p.add_argument("--negative-prompt", default="", help="default negative prompt")
    p.add_argument("--seed", type=int, default=0, help="base of the seeds derived for rows that give none")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=None, help="default: 4.5 text, 4.0 class models")
    p.add_argument("--width", type=int, default=None, help="default: the model's trained size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--scheduler", default=None, choices=scheduler_names(), help="default: the model's own")
    p.add_argument("--count", type=int, default=1, help="images per row (rows may override)")
    p.add_argument("--batch-size", type=int, default=1, help="images of a row made per pipeline call")
    p.add_argument("--device", default=None, help="default: the accelerate process's device")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--dry-run", action="store_true", help="validate the whole file, report, load no model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch-size must be at least 1")
    return args


def _use_cpu(device: str | None) -> bool:
    """Whether the processes run on the CPU. ``PartialState`` forms a multi-CPU (gloo) group only when told so;
    ``ACCELERATE_USE_CPU`` is what ``accelerate launch --cpu`` sets."""
    import torch

    if device is not None:
        return device == "cpu"
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _main_process() -> bool:
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say = print if _main_process() else (lambda *a, **k: None)
    roots = ([] if args.no_default_models else [ASSETS_MODELS]) + list(args.models_dir)
    extra, default_model = [], args.model
    if args.model and args.model not in Catalog(roots=roots) and Path(args.model).is_dir():
        extra.append(Path(args.model))
    try:
        catalog = Catalog(roots=roots, extra_paths=extra)
    except ModelLoadError as e:
        say(f"dit-batch: {e}", file=sys.stderr)
        return 2
    if extra:
        default_model = catalog.names()[-1]  # the name the catalog gave the --model directory
    out_dir = args.output_dir or Path("outputs") / f"batch-{args.prompts.stem}"
    defaults = Defaults(
        model=default_model,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
        count=args.count,
    )
    problems = Problems(str(args.prompts))
    rows = read_rows(args.prompts, problems)
    tasks = validate_rows(rows, defaults, catalog, problems)
    if problems:
        say(f"dit-batch: {len(problems.items)} problem(s) in {args.prompts}; nothing was generated:", file=sys.stderr)
        say(problems.report(), file=sys.stderr)
        return 2
    if not tasks:
        say(f"dit-batch: {args.prompts} has no rows.", file=sys.stderr)
        return 2
    total = sum(t.count for t in tasks)
    manifest = read_manifests(out_dir) if out_dir.is_dir() else {}
    done = sum(done_record(out_dir, t, i, manifest) is not None for t in tasks for i in range(t.count))
    models = list(OrderedDict.fromkeys(t.model for t in tasks))
    say(f"{len(tasks)} rows, {total} images ({done} already in {out_dir}), models: {', '.join(models)}")
    if args.dry_run:
        say("dry run: the file is valid; nothing was generated.")
        return 0
    return generate(args, catalog, tasks, out_dir, manifest)


def generate(args: argparse.Namespace, catalog: Catalog, tasks: list[Task], out_dir: Path, manifest: dict) -> int:
    import torch
    from accelerate import PartialState
    from diffusers.utils import logging as diffusers_logging
    from tqdm.auto import tqdm
    from transformers.utils import logging as transformers_logging

    from .loading import load_pipeline

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
    state = PartialState(cpu=_use_cpu(args.device))
    rank, world = state.process_index, state.num_processes
    device = args.device or str(state.device)
    if state.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.glob(".*.tmp"):  # left by a run killed mid-write; never a finished file
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
    state.wait_for_everyone()  # no process writes before the clean-up
    chunks = plan_chunks(tasks, args.batch_size)
    mine = chunks[rank::world]  # round-robin over a fixed plan: every process derives the same split
    order = {m: n for n, m in enumerate(OrderedDict.fromkeys(t.model for t in tasks))}
    mine.sort(key=lambda c: (order[c.task.model], c.task.row, c.indices[0]))  # one model load per model
    pending = []
    for chunk in mine:
        missing = [i for i in chunk.indices if done_record(out_dir, chunk.task, i, manifest) is None]
        if missing:
            pending.append((chunk, missing))
    shard = out_dir / f"manifest.rank{rank}.jsonl"
    bar = tqdm(
        total=sum(len(m) for _, m in pending),
        desc=f"rank {rank}" if world > 1 else "dit-batch",
        unit="img",
        position=rank,
        disable=args.quiet,
    )
    status = 0
    pipe, pipe_model = None, None
    try:
        for chunk, missing in pending:
            if chunk.task.model != pipe_model:
                pipe = None
                pipe = load_pipeline(
                    chunk.task.model, torch_dtype=getattr(torch, args.dtype), device=device, catalog=catalog
                )
                pipe.set_progress_bar_config(disable=True)
                pipe_model = chunk.task.model
            for image, record in run_chunk(pipe, chunk):
                i = record.batch_index
                if i not in missing:
                    continue  # done by an earlier run: its file is left untouched
                save_png(image, out_dir / chunk.task.file_name(i), record)
                append_line(shard, manifest_entry(chunk.task, i, record))
                bar.update()
    except (InputError, ModelLoadError) as e:
        print(f"dit-batch (rank {rank}): {e}", file=sys.stderr)
        status = 1
    finally:
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        n = write_manifest(out_dir, tasks)
        who = f"{world} processes" if world > 1 else "1 process"
        print(f"{n}/{sum(t.count for t in tasks)} images in {out_dir} ({who}; manifest: {out_dir / MANIFEST})")
    state.wait_for_everyone()
    return status


if __name__ == "__main__":
    sys.exit(main())
