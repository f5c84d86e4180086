"""The generation record: everything needed to reproduce one generated image.

One :class:`GenerationRecord` per image feeds three consumers, so they can never
disagree about what was run:

* the PNG file, which gets two text chunks:

  - ``parameters`` (tEXt, iTXt when the text is not latin-1): the AUTOMATIC1111
    "infotext", the de-facto interchange format that Civitai, Fooocus, ComfyUI
    nodes and most image browsers read;
  - ``dit_studio`` (iTXt): the exact record as JSON, lossless, preferred on read;

* the UI, which shows the record and can re-run it (:meth:`GenerationRecord.to_call_kwargs`);
* the batch manifest, which stores :meth:`GenerationRecord.to_dict` per image.

This module deliberately imports neither torch nor diffusers, so reading metadata
(UI "PNG info" tab, manifest tools, tests) stays fast and works without them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import platform
import re
import secrets
from collections.abc import Collection, Iterable
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

__all__ = [
    "A1111_SAMPLERS",
    "JSON_CHUNK",
    "PARAMETERS_CHUNK",
    "SCHEMA_VERSION",
    "GenerationRecord",
    "attach_record",
    "directory_hash",
    "file_hash",
    "from_a1111",
    "library_versions",
    "model_hash",
    "pnginfo",
    "read_record",
    "save_png",
]

#: PNG text key of the A1111 infotext (the interop format).
PARAMETERS_CHUNK = "parameters"
#: PNG iTXt key of our lossless JSON record.
JSON_CHUNK = "dit_studio"
#: Bumped when the JSON layout changes incompatibly; written by ``to_dict``.
SCHEMA_VERSION = 1

#: Our scheduler names -> the sampler names A1111 writes (and Civitai & co. understand).
#: Schedulers without an A1111 counterpart are written under their own name.
A1111_SAMPLERS: dict[str, str] = {
    "dpm++2m": "DPM++ 2M",
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "lcm": "LCM",
    "ddpm": "DDPM",
    "heun": "Heun",
    "unipc": "UniPC",
}
_SAMPLER_TO_SCHEDULER = {v.lower(): k for k, v in A1111_SAMPLERS.items()}

# Packages whose versions decide whether a seed reproduces bit-for-bit.
_VERSIONED_PACKAGES = ("dit-studio", "torch", "diffusers", "transformers")

# A1111 keys: a word character, then word characters, spaces, '-' or '/'.
_KEY_RE = re.compile(r"(\w[\w \-/]*?)\s*:\s*")
_KEY_FULL_RE = re.compile(r"\w(?:[\w \-/]*[\w\-/])?")
# Extra entries spelled like Python parameters are call arguments (see to_call_kwargs).
_CALL_ARG_RE = re.compile(r"[a-z][a-z0-9_]*")
_LORA_TAG_RE = re.compile(r"<lora:([^:>]+)(?::([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?))?[^>]*>")
# Keys whose presence marks an infotext line as the parameter line.
_STANDARD_KEYS = frozenset({"Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Model hash"})
_WEIGHT_SUFFIXES = (".safetensors", ".bin")


@functools.lru_cache(maxsize=1)
def _installed_versions() -> tuple[tuple[str, str], ...]:
    found = []
    for name in _VERSIONED_PACKAGES:
        try:
            found.append((name, importlib_metadata.version(name)))
        except importlib_metadata.PackageNotFoundError:
            continue
    found.append(("python", platform.python_version()))
    return tuple(found)


def library_versions() -> dict[str, str]:
    """Versions of the packages that decide whether a seed reproduces the same pixels.

    A CPU generator gives the same noise everywhere, but kernels and scheduler code
    change between releases, so a record without versions cannot explain a mismatch.
    Packages that are not installed (e.g. ``dit-studio`` run from a checkout) are
    skipped rather than recorded as unknown. Looked up once per process (the lookup
    scans ``sys.path``); a fresh dict is returned so callers may edit it.
    """
    return dict(_installed_versions())


@dataclass
class GenerationRecord:
    """Everything needed to reproduce one image; see the module docstring for its consumers.

    ``seed`` is the seed actually used for *this* image: a batch never implies
    ``seed + batch_index``. ``extra`` holds pipeline-specific settings; entries whose
    key is a lower-case identifier (``top_k``, ``control_scale``) are call arguments
    (:meth:`to_call_kwargs`), other keys are informational (e.g. ``"Schedule type"``
    read from another tool's infotext); keys starting with ``_`` are bookkeeping and
    only travel in the JSON form.
    """

    pipeline: str
    model: str
    model_hash: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    class_label: int | None = None
    class_name: str | None = None
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 4.5
    scheduler: str = "dpm++2m"
    width: int = 256
    height: int = 256
    batch_index: int = 0
    attention: str = "sdpa"
    adapters: list[dict] = field(default_factory=list)
    dtype: str = "float32"
    device: str = "cpu"
    generator_device: str = "cpu"
    versions: dict[str, str] = field(default_factory=library_versions)
    extra: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ JSON / dict

    def to_dict(self) -> dict[str, Any]:
        """A deep-copied plain dict (JSON-ready when ``extra`` is), plus ``schema_version``.

        This is the manifest row and the payload of the ``dit_studio`` PNG chunk.
        """
        data = asdict(self)
        data["schema_version"] = SCHEMA_VERSION
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRecord:
        """Rebuild a record from :meth:`to_dict` output (or a manifest row).

        * ``pipeline`` and ``model`` are required; everything else has its default.
        * A missing ``versions`` becomes ``{}``, never this process's versions: the
          record describes a past run and must not claim libraries it did not use.
        * Unknown top-level keys (written by a newer DiT Studio, or added by hand) are
          not dropped: they are kept in ``extra["_unknown"]`` so that re-saving the
          record loses nothing, and are never passed to a pipeline.
        * Scalars are coerced to the field types (``"20"`` -> ``20``); a value that
          cannot be coerced raises :class:`ValueError` naming the field.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a generation record must be a JSON object, got {type(data).__name__}")
        data = copy.deepcopy(data)
        data.pop("schema_version", None)
        missing = [name for name in ("pipeline", "model") if data.get(name) is None]
        if missing:
            raise ValueError(f"generation record lacks required field(s): {', '.join(missing)}")
        known = {f.name for f in fields(cls)}
        unknown = {k: data.pop(k) for k in list(data) if k not in known}
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            try:
                kwargs[name] = _coerce_field(name, value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"generation record field {name!r} has a bad value {value!r}: {exc}") from exc
        kwargs.setdefault("versions", {})
        record = cls(**kwargs)
        if unknown:
            record.extra.setdefault("_unknown", {}).update(unknown)
        return record

    def to_json(self, indent: int | None = None) -> str:
        """The record as JSON text (non-ASCII kept as is, so prompts stay readable)."""
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=indent)

    @classmethod
    def from_json(cls, text: str | bytes) -> GenerationRecord:
        """Parse :meth:`to_json` output; malformed JSON raises :class:`ValueError`."""
        return cls.from_dict(json.loads(text))

    # ------------------------------------------------------------------ A1111 infotext

    def a1111_params(self) -> dict[str, Any]:
        """The key/value pairs of the infotext's last line, in writing order (None = omitted).

        Standard A1111 keys come first, in A1111's order, so other tools find them
        where they expect; our own fields follow; then ``extra`` entries whose key is a
        valid infotext key and is not already used; ``Version`` stays last as in A1111.
        """
        params: dict[str, Any] = {
            "Steps": self.steps,
            "Sampler": A1111_SAMPLERS.get(self.scheduler, self.scheduler),
            "CFG scale": self.guidance_scale,
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash,
            "Model": self.model or None,
        }
        hashes, weights = [], []
        for adapter in self.adapters:
            # A1111 strips these characters from names so the nested list stays parseable.
            name = str(adapter.get("name", "")).replace(":", "").replace(",", "")
            if adapter.get("hash"):
                hashes.append(f"{name}: {adapter['hash']}")
            weights.append(f"{name}: {_format_value(float(adapter.get('weight', 1.0)))}")
        params["Lora hashes"] = ", ".join(hashes) or None
        params["Lora weights"] = ", ".join(weights) or None
        params.update(
            {
                "Pipeline": self.pipeline,
                "Class": self.class_label,
                "Class name": self.class_name,
                "Batch pos": self.batch_index or None,
                "Attention": self.attention,
                "Dtype": self.dtype,
                "Device": self.device,
                "RNG": _rng_to_a1111(self.generator_device),
            }
        )
        studio = self.versions.get("dit-studio")
        tail = {
            "Version": f"dit-studio {studio}" if studio else None,
            "Library versions": ", ".join(f"{k} {v}" for k, v in self.versions.items() if k != "dit-studio") or None,
        }
        taken = {k for k, v in {**params, **tail}.items() if v is not None}
        for key, value in self.extra.items():
            if key.startswith("_") or key in taken or not _KEY_FULL_RE.fullmatch(key):
                continue
            params[key] = value
        for key, value in tail.items():
            # An extra entry of the same name (another tool's "Version") fills a gap, last.
            fallback = params.pop(key, None)
            params[key] = value if value is not None else fallback
        return params

    def to_a1111(self) -> str:
        """The exact A1111 ``parameters`` text.

        Layout (as A1111's ``create_infotext``): the prompt, then ``Negative prompt: ...``
        (line omitted when the negative prompt is empty), then one line
        ``", ".join(k if k == v else f"{k}: {quote(v)}")`` over :meth:`a1111_params`,
        skipping ``None``; the whole string is stripped.
        """
        items = []
        for key, value in self.a1111_params().items():
            if value is None:
                continue
            text = _format_value(value)
            items.append(key if key == text else f"{key}: {_quote(text)}")
        text = self.prompt or ""
        if self.negative_prompt:
            text += f"\nNegative prompt: {self.negative_prompt}"
        return f"{text}\n{', '.join(items)}".strip()

    @classmethod
    def from_a1111(cls, text: str) -> GenerationRecord:
        """Parse A1111 infotext, ours or another tool's.

        The last line is the parameter line when it parses as ``key: value`` pairs
        (quoted values may hold commas, colons and escaped newlines), at least three of
        them, including a standard key such as ``Steps``; otherwise all lines are prompt.
        Lines before a line starting ``Negative prompt:`` are the prompt (multi-line
        prompts work), the rest the negative prompt.

        Keys we know fill the fields; any other key goes to ``extra`` under its own
        spelling, with JSON-looking values decoded (``"2"`` -> 2) and ``True``/``False``
        as booleans. For text written by another tool, adapters come from
        ``Lora hashes`` and ``<lora:name:weight>`` prompt tags. Fields the text does not
        mention keep their defaults, except ``versions``, which stays empty unless the
        text lists them. Our own records survive ``to_a1111`` -> ``from_a1111`` intact as
        long as strings have no surrounding whitespace and ``extra`` string values do
        not look like JSON; the JSON chunk is the lossless path.
        """
        lines = text.replace("\r\n", "\n").strip().split("\n")
        if lines == [""]:
            raise ValueError("empty A1111 parameters text")
        pairs = _parse_param_line(lines[-1])
        if _is_param_line(pairs):
            lines = lines[:-1]
        else:
            pairs = []
        prompt_lines: list[str] = []
        negative_lines: list[str] = []
        in_negative = False
        for line in lines:
            if not in_negative and line.startswith("Negative prompt:"):
                in_negative = True
                line = line[len("Negative prompt:") :].lstrip()
            (negative_lines if in_negative else prompt_lines).append(line)
        prompt = "\n".join(prompt_lines) or None
        negative = "\n".join(negative_lines) if in_negative else None

        params = dict(pairs)
        ours = "Pipeline" in params
        values: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative or None, "versions": {}}
        extra: dict[str, Any] = {}
        adapters: dict[str, dict[str, Any]] = {}
        for key, raw in pairs:
            try:
                if not _apply_known_key(key, raw, values, extra, adapters):
                    extra[key] = _decode_extra(raw)
            except ValueError:
                extra[key] = raw  # a known key with an unreadable value: keep it verbatim
        if not ours and prompt:
            # Another tool: adapter weights live in the prompt as <lora:name:weight>.
            for match in _LORA_TAG_RE.finditer(prompt):
                entry = adapters.setdefault(match.group(1), {"name": match.group(1), "weight": 1.0, "hash": None})
                if match.group(2) is not None:
                    entry["weight"] = float(match.group(2))
        values.setdefault("pipeline", "class-to-image" if values.get("class_label") is not None else "text-to-image")
        values.setdefault("model", "")
        values["adapters"] = list(adapters.values())
        values["extra"] = extra
        return cls(**values)

    # ------------------------------------------------------------------ re-running

    def to_call_kwargs(self, accepted: Collection[str] | None = None) -> dict[str, Any]:
        """Keyword arguments for our pipelines' ``__call__`` that reproduce this image.

        * A record with a prompt gives ``prompt`` and ``negative_prompt`` (possibly None);
          one with a class label gives ``class_labels=[label]``.
        * Always: ``num_inference_steps``, ``guidance_scale``, ``height``, ``width``,
          ``seed``, ``scheduler``.
        * Rule for ``extra``: an entry is a call argument when its key is a lower-case
          Python identifier (``top_k``, ``control_scale``); keys in other spellings
          (``"Schedule type"`` from another tool's infotext) or starting with ``_`` are
          informational. Extra entries never override the fields above.
        * ``accepted``: if given (e.g. ``inspect.signature(pipe.__call__).parameters``),
          only those names are returned, so one record can drive pipelines with
          different signatures.

        Adapters, attention, dtype and device are pipeline *state*, not call arguments:
        load them before calling. Values are deep copies.
        """
        kwargs: dict[str, Any] = {}
        if self.prompt is not None:
            kwargs["prompt"] = self.prompt
            kwargs["negative_prompt"] = self.negative_prompt
        if self.class_label is not None:
            kwargs["class_labels"] = [self.class_label]
        kwargs.update(
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            height=self.height,
            width=self.width,
            seed=self.seed,
            scheduler=self.scheduler,
        )
        for key, value in self.extra.items():
            if _CALL_ARG_RE.fullmatch(key) and key not in kwargs:
                kwargs[key] = copy.deepcopy(value)
        if accepted is not None:
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        return kwargs


def from_a1111(text: str) -> GenerationRecord:
    """Module-level alias of :meth:`GenerationRecord.from_a1111`."""
    return GenerationRecord.from_a1111(text)


# ---------------------------------------------------------------------- field coercion

_INT_FIELDS = {"seed", "steps", "width", "height", "batch_index"}
_STR_FIELDS = {"pipeline", "model", "scheduler", "attention", "dtype", "device", "generator_device"}
_OPTIONAL_STR_FIELDS = {"model_hash", "prompt", "negative_prompt", "class_name"}


def _as_int(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("expected an integer, got a boolean")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("expected an integer")
    return int(value)


def _coerce_field(name: str, value: Any) -> Any:
    if name in _INT_FIELDS:
        return _as_int(value)
    if name == "class_label":
        return None if value is None else _as_int(value)
    if name == "guidance_scale":
        return float(value)
    if name in _STR_FIELDS:
        if value is None:
            raise ValueError("may not be null")
        return str(value)
    if name in _OPTIONAL_STR_FIELDS:
        return None if value is None else str(value)
    if name == "adapters":
        if not isinstance(value, list):
            raise TypeError("expected a list of adapters")
        adapters = []
        for item in value:
            if not isinstance(item, dict) or "name" not in item:
                raise TypeError("each adapter must be an object with a 'name'")
            adapter = dict(item)
            adapter["name"] = str(adapter["name"])
            adapter["weight"] = float(adapter.get("weight", 1.0))
            adapter["hash"] = None if adapter.get("hash") is None else str(adapter["hash"])
            adapters.append(adapter)
        return adapters
    if name == "versions":
        if not isinstance(value, dict):
            raise TypeError("expected an object")
        return {str(k): str(v) for k, v in value.items()}
    if name == "extra":
        if not isinstance(value, dict):
            raise TypeError("expected an object")
        return value
    return value


# ---------------------------------------------------------------------- infotext helpers


def _quote(text: str) -> str:
    """A1111's quote(): JSON-quote a value only when it would break the parameter line."""
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _format_value(value: Any) -> str:
    """How a Python value is spelled in infotext (floats without a useless ``.0``)."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, str):
        return value
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _decode_extra(raw: str) -> Any:
    """Best-effort typed value for an unknown infotext key (inverse of _format_value)."""
    if raw in ("True", "False"):
        return raw == "True"
    if raw and (raw[0] in "{[-" or raw[0].isdigit() or raw in ("true", "false", "null")):
        try:
            return json.loads(raw)
        except ValueError:
            pass
    return raw


def _rng_to_a1111(device: str) -> str:
    # A1111's "RNG" setting: CPU (portable noise) or GPU (device noise).
    if device == "cpu":
        return "CPU"
    if device == "cuda":
        return "GPU"
    return device


def _rng_from_a1111(value: str) -> str:
    return {"CPU": "cpu", "GPU": "cuda"}.get(value, value.lower())


def _scheduler_from_sampler(value: str, extra: dict[str, Any]) -> str:
    found = _SAMPLER_TO_SCHEDULER.get(value.lower())
    if found:
        return found
    # A1111 before 1.9 folded the sigma schedule into the sampler name.
    if value.endswith(" Karras"):
        found = _SAMPLER_TO_SCHEDULER.get(value[: -len(" Karras")].lower())
        if found:
            extra.setdefault("Schedule type", "Karras")
            return found
    return value


def _split_named(text: str) -> list[tuple[str, str]]:
    """Parse ``"a: x, b: y"`` (the value of Lora hashes / Lora weights / Library versions)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.rpartition(":")
        if not sep:
            raise ValueError(f"expected 'name: value', got {part!r}")
        out.append((name.strip(), value.strip()))
    return out


def _apply_known_key(
    key: str, raw: str, values: dict[str, Any], extra: dict[str, Any], adapters: dict[str, dict[str, Any]]
) -> bool:
    """Store one infotext pair in ``values``; False when the key is not one we know."""
    if key == "Steps":
        values["steps"] = int(raw)
    elif key == "Sampler":
        values["scheduler"] = _scheduler_from_sampler(raw, extra)
    elif key == "CFG scale":
        values["guidance_scale"] = float(raw)
    elif key == "Seed":
        values["seed"] = int(raw)
    elif key == "Size":
        width, sep, height = raw.lower().partition("x")
        if not sep:
            raise ValueError(raw)
        values["width"], values["height"] = int(width), int(height)
    elif key == "Model hash":
        values["model_hash"] = raw
    elif key == "Model":
        values["model"] = raw
    elif key in ("Lora hashes", "Lora weights"):
        parsed = _split_named(raw)
        for name, value in parsed:
            entry = adapters.setdefault(name, {"name": name, "weight": 1.0, "hash": None})
            if key == "Lora hashes":
                entry["hash"] = value
            else:
                entry["weight"] = float(value)
    elif key == "Pipeline":
        values["pipeline"] = raw
    elif key == "Class":
        values["class_label"] = int(raw)
    elif key == "Class name":
        values["class_name"] = raw
    elif key == "Batch pos":
        values["batch_index"] = int(raw)
    elif key == "Attention":
        values["attention"] = raw
    elif key == "Dtype":
        values["dtype"] = raw
    elif key == "Device":
        values["device"] = raw
    elif key == "RNG":
        values["generator_device"] = _rng_from_a1111(raw)
    elif key == "Version" and raw.startswith("dit-studio "):
        values["versions"]["dit-studio"] = raw[len("dit-studio ") :]
    elif key == "Library versions":
        for part in raw.split(","):
            name, sep, version = part.strip().rpartition(" ")
            if not sep:
                raise ValueError(raw)
            values["versions"][name] = version
    else:
        return False
    return True


def _parse_param_line(line: str) -> list[tuple[str, str]]:
    """Split an infotext parameter line into (key, value) pairs.

    Grammar: items separated by commas; an item is ``key: value`` where value is a JSON
    string (may hold commas, colons, escapes), an unquoted JSON object/array (some
    tools write ``Hashes: {...}`` bare), or text up to the next comma; or a bare ``key``
    (A1111 writes ``k`` alone when the value equals the key). Like A1111, segments that
    fit none of these are skipped; :func:`_is_param_line` decides if the line counts.
    """
    pairs: list[tuple[str, str]] = []
    decoder = json.JSONDecoder()
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] in " \t":
            i += 1
        if i >= n:
            break
        match = _KEY_RE.match(line, i)
        if not match:
            j = line.find(",", i)
            j = n if j < 0 else j
            token = line[i:j].strip()
            i = j + 1
            if _KEY_FULL_RE.fullmatch(token):
                pairs.append((token, token))
            continue
        key = match.group(1).strip()
        i = match.end()
        value = None
        if i < n and line[i] in '"{[':
            try:
                decoded, end = decoder.raw_decode(line, i)
            except ValueError:
                decoded, end = None, -1
            rest = line[end:].lstrip(" \t") if end >= 0 else ""
            if end >= 0 and (not rest or rest[0] == ","):
                value = decoded if isinstance(decoded, str) else line[i:end]
                i = n - len(rest) + 1
        if value is None:
            j = line.find(",", i)
            j = n if j < 0 else j
            value = line[i:j].strip()
            i = j + 1
        pairs.append((key, value))
    return pairs


def _is_param_line(pairs: list[tuple[str, str]]) -> bool:
    with_values = [k for k, v in pairs if k != v]
    return len(with_values) >= 3 and any(k in _STANDARD_KEYS for k in with_values)


# ---------------------------------------------------------------------- PNG I/O


def pnginfo(record: GenerationRecord) -> PngInfo:
    """PNG text chunks for ``record``: ``parameters`` (A1111) and iTXt ``dit_studio`` (JSON).

    ``parameters`` is tEXt like A1111 writes it; Pillow switches to iTXt by itself when
    the text is not latin-1 (A1111 does the same), so non-English prompts survive.
    """
    info = PngInfo()
    info.add_text(PARAMETERS_CHUNK, record.to_a1111())
    info.add_itxt(JSON_CHUNK, record.to_json())
    return info


def attach_record(image: Image.Image, record: GenerationRecord) -> Image.Image:
    """Put the record into ``image.info`` and return the image.

    For images that leave through a library rather than :func:`save_png`: Gradio's
    PNG encoder copies string entries of ``info`` into text chunks, and
    :func:`read_record` reads a PIL image's ``info``.
    """
    image.info[PARAMETERS_CHUNK] = record.to_a1111()
    image.info[JSON_CHUNK] = record.to_json()
    return image


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; not possible (nor needed) on every OS.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_png(image: Image.Image, path: str | os.PathLike[str], record: GenerationRecord) -> Path:
    """Write ``image`` as a PNG carrying ``record``, atomically; return the path.

    The PNG goes to a hidden temporary file in the destination directory, is fsynced,
    then ``os.replace``d over ``path``: readers (the UI gallery, a resumed batch that
    skips existing files) see either no file or a complete one, never half a PNG, even
    if the process is killed. On an exception the temporary file is removed; only a
    hard kill mid-write can leave a ``.<name>.*.tmp`` behind, and never at ``path``.
    The file gets the usual permissions (0666 minus umask), like a plain ``open``.
    Missing parent directories are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = pnginfo(record)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    fd = os.open(tmp, flags, 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)
    return path


def _decode_user_comment(data: Any) -> str | None:
    """Text of an EXIF UserComment (how A1111 stores infotext in JPEG/WebP)."""
    if isinstance(data, str):
        return data or None
    if not isinstance(data, bytes) or len(data) < 8:
        return None
    prefix, body = data[:8], data[8:]
    if prefix.startswith(b"UNICODE"):
        # piexif writes UTF-16 big-endian; some writers use little-endian.
        encoding = "utf-16-be" if body[:1] == b"\x00" else "utf-16-le"
        text = body.decode(encoding, errors="replace")
    elif prefix.startswith(b"ASCII"):
        text = body.decode("ascii", errors="replace")
    else:
        text = data.decode("utf-8", errors="replace")
    return text.strip("\x00 ") or None


def _image_texts(image: Image.Image) -> dict[str, str]:
    texts = {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}
    if JSON_CHUNK not in texts and PARAMETERS_CHUNK not in texts:
        # PNG text chunks after the image data only show up once the file is read.
        with contextlib.suppress(Exception):
            texts.update({k: v for k, v in getattr(image, "text", {}).items() if isinstance(v, str)})
    if PARAMETERS_CHUNK not in texts:
        with contextlib.suppress(Exception):
            comment = _decode_user_comment(image.getexif().get_ifd(0x8769).get(0x9286))
            if comment:
                texts[PARAMETERS_CHUNK] = comment
    return texts


def _record_from_image(image: Image.Image, name: str) -> GenerationRecord:
    texts = _image_texts(image)
    json_problem = None
    if JSON_CHUNK in texts:
        try:
            return GenerationRecord.from_json(texts[JSON_CHUNK])
        except ValueError as exc:
            json_problem = exc
    if texts.get(PARAMETERS_CHUNK, "").strip():
        return GenerationRecord.from_a1111(texts[PARAMETERS_CHUNK])
    if json_problem is not None:
        raise ValueError(
            f"{name}: its {JSON_CHUNK!r} chunk is not a valid generation record ({json_problem}) "
            f"and it has no A1111 {PARAMETERS_CHUNK!r} text to fall back on"
        )
    raise ValueError(
        f"{name} carries no generation parameters: it has neither a {JSON_CHUNK!r} JSON chunk "
        f"nor A1111 {PARAMETERS_CHUNK!r} text (was it saved by another program or re-encoded?)"
    )


def read_record(source: str | os.PathLike[str] | Image.Image) -> GenerationRecord:
    """The generation record stored in an image file or a PIL image.

    Prefers the lossless ``dit_studio`` JSON; falls back to A1111 ``parameters`` text
    (PNG text chunk or JPEG/WebP EXIF UserComment), so images from other tools load
    too. Raises :class:`ValueError` naming the file when it carries neither, or when
    it is not an image at all; a missing file raises :class:`FileNotFoundError`.
    """
    if isinstance(source, Image.Image):
        name = getattr(source, "filename", "") or "the image"
        return _record_from_image(source, str(name))
    path = Path(source)
    try:
        image = Image.open(path)
    except UnidentifiedImageError as exc:
        raise ValueError(f"{path} is not an image file (cannot read generation parameters from it)") from exc
    with image:
        return _record_from_image(image, str(path))


# ---------------------------------------------------------------------- hashes


def file_hash(path: str | os.PathLike[str], length: int = 10) -> str:
    """First ``length`` hex digits of the file's sha256, read in chunks (weights are GBs).

    With the default length this is A1111's "Model hash" (its sha256-based short hash),
    so hashes we write match what Civitai and A1111 show for the same file.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(functools.partial(handle.read, 1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:length]


def _weight_files(root: Path) -> Iterable[tuple[str, Path]]:
    for candidate in root.rglob("*"):
        relative = candidate.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue  # e.g. .cache/ left by huggingface_hub downloads
        if candidate.name.endswith(_WEIGHT_SUFFIXES) and candidate.is_file():
            yield relative.as_posix(), candidate


def directory_hash(path: str | os.PathLike[str], length: int = 10) -> str:
    """Short hash of a diffusers model directory's weights.

    sha256 over ``relative/path\\0<sha256 of file>\\n`` for every ``*.safetensors`` /
    ``*.bin`` file, sorted by relative POSIX path: independent of file-system order and
    of configs/READMEs, but it changes when any weight changes or a component is swapped
    (the path is part of the hash). Raises :class:`ValueError` when there are no weights.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    files = sorted(_weight_files(root))
    if not files:
        raise ValueError(f"{root} contains no *.safetensors or *.bin weight files to hash")
    digest = hashlib.sha256()
    for relative, file in files:
        digest.update(f"{relative}\0{file_hash(file, 64)}\n".encode())
    return digest.hexdigest()[:length]


def model_hash(path: str | os.PathLike[str], length: int = 10) -> str:
    """:func:`file_hash` for a single checkpoint file, :func:`directory_hash` for a model dir."""
    return directory_hash(path, length) if Path(path).is_dir() else file_hash(path, length)
