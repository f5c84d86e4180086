"""Batch generation from a prompts file: ``python -m pipelines.batch PROMPTS --model NAME -o DIR`` (``dit-batch``).

Input, one row per generation setting:

* ``.txt``: one prompt per line (blank lines and lines starting with ``#`` are skipped);
* ``.jsonl``: one JSON object per line (or a JSON string, taken as the prompt);
* ``.csv``: a header row, then one row per line (quoted cells may span lines).

Columns (empty cells use the command-line defaults). Every kind: ``model``, ``seed``, ``count``, ``steps``,
``guidance``, ``scheduler``, ``attention`` (a training-free variant label such as ``agentsd[ratio=0.5]``; empty: the
model's own). Then, by the row's model kind (:mod:`pipelines.batch_kinds`):

* text-to-image: ``prompt``, ``negative_prompt``, ``width``, ``height``, ``lora`` (a ``.safetensors`` file, several
  separated by ``;``), ``lora_weight``;
* class-to-image: ``class`` (name or id), ``width``, ``height``, ``lora``, ``lora_weight``; VAR models run one step
  per scale at their trained size (``steps``/``scheduler``/size are fixed) and take ``top_k`` / ``top_p``;
* control: the text-to-image columns plus ``control_image`` (a file), ``adapter`` (one of the model's
  ``controls/``), ``strength``, ``preprocessor`` (``auto``: the adapter's own; ``none``: the image is the map), or in
  JSONL a ``controls`` list of ``{"image", "adapter", "strength", "preprocessor"}`` objects;
* video: ``task`` (predict, backward, interpolate, animate, complete, unconditional), ``video`` (a clip, GIF,
  frame folder or image), ``num_given``, ``stride``, ``frame_index``; written as MP4 (with ffmpeg) + GIF + JSON;
* point-cloud: ``class``, ``points``; written as PLY + GLB + a preview PNG + JSON.

Relative file names in a row are read from the prompts file's folder. A value in a column its model does not use
is an error (so a typo never silently changes nothing); CSV files may carry every column for mixed rows.

Output, in ``--output-dir``: ``{row:05d}-{i:02d}-{seed}.png`` (PNG with the A1111 ``parameters`` text and
the JSON record; other kinds write their files under the same stem, the record as ``.json``) and
``manifest.jsonl``, one line per output in row order: ``{"file", "files", "row", "line", "index", "record"}``.

* The whole file is validated before any model loads; every malformed row is reported with its line
  number. ``--dry-run`` stops there.
* Resumable: a rerun skips outputs whose files exist and were made from the same row settings (every record
  carries a fingerprint of them, ``extra._batch_key``; checked against the manifest, or the file's own record).
  Files are written atomically, the record last, so a killed run loses at most the outputs in flight.
* A row that fails while running (an unreadable clip, a LoRA that does not fit the model) is reported with its
  line and the run goes on with the other rows; the exit status is then 1.
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
import os
import sys
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .batch_kinds import (
    COMMON_COLUMNS,
    MAX_COUNT,
    Defaults,
    RowCheck,
    Task,
    all_columns,
    as_int,
    blank,
    row_kind,
)
from .catalog import ASSETS_MODELS, Catalog
from .errors import InputError, ModelLoadError
from .metadata import GenerationRecord
from .schedulers import scheduler_names
from .service import ModelSpec, apply_attention, model_spec

COLUMNS = all_columns()
ALIASES = {
    "negative": "negative_prompt",
    "guidance_scale": "guidance",
    "cfg": "guidance",
    "num_inference_steps": "steps",
    "class_label": "class",
    "label": "class",
    "num_images": "count",
    "num_videos": "count",
    "num_clouds": "count",
    "control": "control_image",
    "control_scale": "strength",
    "control_strength": "strength",
    "adapter_weight": "strength",
    "num_points": "points",
    "loras": "lora",
}
MANIFEST = "manifest.jsonl"
BATCH_KEY = "_batch_key"  # record.extra entry: the fingerprint of the row settings that made the output
FORMATS = (".txt", ".jsonl", ".csv")


@dataclass
class Row:
    index: int  # 0-based among data rows; names the files
    line: int  # 1-based line of the prompts file where the row starts
    values: dict[str, Any]
    broken: bool = False  # unparsable (already reported); kept so row numbers stay stable


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
            if key not in COLUMNS:
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
                values = {k: c for k, c in zip(keys, cells) if k in COLUMNS}
                rows.append(Row(len(rows), start, values))
            start = reader.line_num + 1
    return rows


# ---------------------------------------------------------------------------------------------- validating


def derived_seed(base: int, row: int) -> int:
    """The seed of a row that gives none: stable for (``--seed``, row), spread over 32 bits."""
    return int.from_bytes(hashlib.sha256(f"{base}:{row}".encode()).digest()[:4], "big")


def validate_rows(
    rows: list[Row], defaults: Defaults, catalog: Catalog, problems: Problems, base_dir: Path | None = None
) -> list[Task]:
    """Tasks for the valid rows; every problem (with its line) goes to ``problems``. Loads no model.

    ``base_dir``: where relative file names in rows are read from (the prompts file's folder; default: the
    problems' file's folder).
    """
    specs: dict[str, ModelSpec] = {}
    base = Path(base_dir) if base_dir is not None else Path(problems.path).resolve().parent
    tasks: list[Task] = []
    for row in rows:
        if row.broken:
            continue
        task, errors = check_row(row, defaults, catalog, specs, base)
        for message in errors:
            problems.add(row.line, message)
        if task is not None:
            tasks.append(task)
    return tasks


def check_row(
    row: Row, defaults: Defaults, catalog: Catalog, specs: dict[str, ModelSpec], base_dir: Path | None = None
) -> tuple[Task | None, list[str]]:
    """One row -> (its task, []) or (None, every problem found in it)."""
    v = row.values
    errors: list[str] = []
    unknown = [k for k in v if k not in COLUMNS]
    for key in unknown:
        errors.append(f"unknown column {key!r}; columns: {', '.join(COLUMNS)}")
    model = defaults.model if blank(v.get("model")) else v["model"]
    if model is None:
        return None, [*errors, "no model: give --model or a 'model' column"]
    if not isinstance(model, str) or model not in catalog:
        return None, [*errors, f"unknown model {model!r}; available: {', '.join(catalog.names()) or 'none'}"]
    entry = catalog.get(model)
    spec = specs.setdefault(model, model_spec(entry))
    try:
        kind = row_kind(spec.kind)
    except InputError as e:
        return None, [*errors, f"model {model}: {e}"]
    for key in v:
        if key in COLUMNS and key not in COMMON_COLUMNS and key not in kind.columns and not blank(v[key]):
            errors.append(f"column {key!r} does not apply to {spec.kind} models like {model}; leave it empty")
    check = RowCheck(v, defaults, spec, entry.path, base_dir or Path.cwd(), errors)
    params = kind.check(check)
    seed = check.number("seed", as_int, None, -1, 2**63 - 1 - MAX_COUNT)
    count = check.number("count", as_int, defaults.count, 1, MAX_COUNT)
    if errors:
        return None, errors
    if seed is None or seed == -1:
        seed = derived_seed(defaults.seed, row.index)
    task = Task(row.index, row.line, model, spec.kind, seed, count, params, suffix=kind.suffix)
    return task, []


# ---------------------------------------------------------------------------------------------- manifest


def manifest_entry(task: Task, i: int, record: dict[str, Any], files: list[str] | None = None) -> dict[str, Any]:
    files = files or [task.file_name(i)]
    return {"file": files[0], "files": files, "row": task.row, "line": task.line, "index": i, "record": record}


def read_manifests(out_dir: Path) -> dict[str, dict]:
    """Entries of ``manifest.jsonl`` and any ``manifest.rank*.jsonl`` shards, by output stem (later lines win).

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
                    entries[Path(entry["file"]).stem] = entry
    return entries


def _matches(task: Task, i: int, record: Any) -> bool:
    """Whether a stored record was made from this row's settings (so the output need not be made again)."""
    if not isinstance(record, dict) or not isinstance(record.get("extra"), dict):
        return False
    return (
        record["extra"].get(BATCH_KEY) == task.key
        and record.get("seed") == task.seed + i
        and record.get("model") == task.model
    )


def done_record(out_dir: Path, task: Task, i: int, manifest: dict[str, dict]) -> tuple[dict, list[str]] | None:
    """(record, files) of output ``i`` of ``task`` when its files exist and were made from this row."""
    kind = row_kind(task.kind)
    stem = task.stem(i)
    path = kind.record_file(out_dir, stem)
    if not path.is_file():
        return None
    entry = manifest.get(stem)
    if entry is not None and _matches(task, i, entry.get("record")):
        files = [f for f in entry.get("files") or [entry["file"]] if isinstance(f, str)]
        if all((out_dir / f).is_file() for f in files):
            return entry["record"], files
    record = kind.read_record(path)  # saved, but the run was killed before its manifest line was written
    if not _matches(task, i, record):
        return None
    files = sorted(p.name for p in out_dir.glob(f"{stem}.*") if not p.name.startswith("."))
    primary = [f for f in files if f.endswith(task.suffix)]
    return record, primary + [f for f in files if f not in primary]


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
            done = done_record(out_dir, task, i, stored)
            if done is not None:
                entry = manifest_entry(task, i, *done)
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


def run_chunk(pipe: Any, chunk: Chunk, base_attention: str | None = None) -> list[tuple[Any, GenerationRecord]]:
    """Apply the row's attention (else the model's own, ``base_attention``) and LoRAs, then run the pipeline on
    the chunk's seeds; (output, record) pairs."""
    task = chunk.task
    kind = row_kind(task.kind)
    apply_attention(pipe, task.params.get("attention") or base_attention)
    if "lora" in task.params:
        from .lora import load_loras, loaded_loras

        if task.params["lora"] or loaded_loras(pipe):
            load_loras(pipe, [tuple(x) for x in task.params["lora"]])
    outputs, records = kind.call(pipe, task, [task.seed + i for i in chunk.indices])
    for record, i in zip(records, chunk.indices):
        record.batch_index = i  # the output's place in its row, whatever the chunking
        record.extra[BATCH_KEY] = task.key
    return list(zip(outputs, records))


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
    p.add_argument("--steps", type=int, default=None, help="default: 20 images, 25 video, 100 point clouds")
    p.add_argument("--guidance", type=float, default=None, help="default: 4.5 text, 4.0 class, 1.0 point-cloud models")
    p.add_argument("--width", type=int, default=None, help="default: the model's trained size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--scheduler", default=None, choices=scheduler_names(), help="default: the model's own")
    p.add_argument("--count", type=int, default=1, help="outputs per row (rows may override)")
    p.add_argument("--batch-size", type=int, default=1, help="outputs of a row made per pipeline call")
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
    tasks = validate_rows(rows, defaults, catalog, problems, args.prompts.resolve().parent)
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
    say(f"{len(tasks)} rows, {total} outputs ({done} already in {out_dir}), models: {', '.join(models)}")
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
        unit="out",
        position=rank,
        disable=args.quiet,
    )
    status = 0
    pipe, pipe_model, base_attention, failed_models = None, None, None, set()
    try:
        for chunk, missing in pending:
            task = chunk.task
            if task.model in failed_models:
                continue
            if task.model != pipe_model:
                pipe = None
                try:
                    dtype = getattr(torch, args.dtype)
                    pipe = load_pipeline(task.model, torch_dtype=dtype, device=device, catalog=catalog)
                except (InputError, ModelLoadError) as e:
                    print(f"dit-batch (rank {rank}): cannot load {task.model}; its rows skipped: {e}", file=sys.stderr)
                    failed_models.add(task.model)
                    status = 1
                    continue
                pipe.set_progress_bar_config(disable=True)
                pipe_model, base_attention = task.model, pipe.attention_label()
            try:
                results = run_chunk(pipe, chunk, base_attention)
            except (InputError, ModelLoadError, ValueError) as e:  # ValueError: attention/LoRA fit, named in e
                print(f"dit-batch: {args.prompts}:{task.line}: row {task.row} failed, skipped: {e}", file=sys.stderr)
                status = 1
                continue
            kind = row_kind(task.kind)
            for output, record in results:
                i = record.batch_index
                if i not in missing:
                    continue  # done by an earlier run: its files are left untouched
                files = kind.save(output, out_dir, task.stem(i), record)
                append_line(shard, manifest_entry(task, i, record.to_dict(), [Path(f).name for f in files]))
                bar.update()
    finally:
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        n = write_manifest(out_dir, tasks)
        who = f"{world} processes" if world > 1 else "1 process"
        print(f"{n}/{sum(t.count for t in tasks)} outputs in {out_dir} ({who}; manifest: {out_dir / MANIFEST})")
    state.wait_for_everyone()
    return status


if __name__ == "__main__":
    sys.exit(main())
