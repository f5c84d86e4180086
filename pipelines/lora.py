"""LoRA adapters on a pipeline's transformer: load one or several PEFT-format files with weights, swap, unload.

    from pipelines import load_pipeline
    from pipelines.lora import load_loras, unload_loras

    pipe = load_pipeline("emoji-t2i")
    load_loras(pipe, [("runs/style/pytorch_lora_weights.safetensors", 0.8), ("runs/faces", 0.5)])
    image = pipe("red apple", seed=0).images[0]      # the record lists both adapters, weights and hashes
    unload_loras(pipe)

Files are in the layout diffusers writes (``transformer.<module path>.lora_A.weight`` / ``lora_B.weight``, rank and
alpha under the ``lora_adapter_metadata`` safetensors key), so LoRAs from diffusers' training scripts load here and
ours load in diffusers. We apply them with peft directly (``inject_adapter_in_model`` + ``set_peft_model_state_dict``)
instead of diffusers' ``load_lora_weights``, because stock PixArt transformers have no ``PeftAdapterMixin``
(diffusers #9887): one code path then serves our backbones and stock ones alike.

Every file is checked before the model is touched: its bytes must really be safetensors (a pickle renamed
``.safetensors`` is refused, never unpickled), and every key must name a layer of this model with matching shapes.
So a bad file leaves the adapters that were loaded before in place, and the error names the keys that do not fit.
Loading is idempotent: the same list twice changes only the weights; a different list replaces the previous set.
Adapters with weight 0 are kept loaded but switched off, so weight 0 gives exactly the base model's images.

The transformer is shared by every request, so load/unload must not run while the pipeline generates; the UI calls
these between jobs. Calls to load/unload themselves are serialised by a lock.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, ModelLoadError
from .metadata import file_hash

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"  # diffusers' key for the LoraConfig (``loaders/lora_base.py``)
COMPONENT = "transformer"

# Prefixes in front of the module path: diffusers' component prefix, PEFT's own ``save_pretrained`` prefix.
_PREFIXES = ("transformer.", "base_model.model.")
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")
_STATE_ATTR = "_dit_studio_loras"
_LOCK = threading.RLock()
_HASHES: dict[tuple[str, int, int], str] = {}
_SHOW = 5  # how many offending keys an error message names


class LoraLoadError(ModelLoadError):
    """A LoRA file cannot be applied to this pipeline; the message says which file, why, and what to do."""


class LoraBaseModelWarning(UserWarning):
    """A LoRA fits the model's shapes but was trained on a different base model (its recorded hash differs)."""


@dataclass
class LoraFile:
    """A LoRA file read and checked: its PEFT tensors (keys without the component prefix) and metadata."""

    path: Path
    hash: str
    tensors: dict[str, torch.Tensor]
    ranks: dict[str, int]  # module path -> rank
    metadata: dict[str, str] = field(default_factory=dict)
    adapter_config: dict[str, Any] = field(default_factory=dict)  # LoraConfig kwargs from lora_adapter_metadata
    source_keys: dict[str, str] = field(default_factory=dict)  # module path -> a key as written in the file

    @property
    def rank(self) -> int:
        """The most common rank (PEFT's ``r``; layers with another rank go into ``rank_pattern``)."""
        return Counter(self.ranks.values()).most_common(1)[0][0]

    @property
    def alpha(self) -> float:
        """``lora_alpha`` as recorded; a file without metadata gets alpha = rank (scale 1), as diffusers assumes."""
        return float(self.adapter_config.get("lora_alpha", self.rank))

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.ranks)

    @property
    def base_model(self) -> str | None:
        return self.metadata.get("base_model")

    @property
    def base_model_hash(self) -> str | None:
        return self.metadata.get("base_model_hash")

    def lora_config(self) -> Any:
        """The ``peft.LoraConfig`` that recreates exactly these layers (targets = the file's module paths)."""
        from peft import LoraConfig

        kw = self.adapter_config
        rank = self.rank
        rank_pattern = {re.escape(m): r for m, r in self.ranks.items() if r != rank}
        if "lora_alpha" in kw:
            alpha_pattern = dict(kw.get("alpha_pattern") or {})
        else:  # no recorded alpha: every layer at scale 1, whatever its rank
            alpha_pattern = {re.escape(m): r for m, r in self.ranks.items() if r != rank}
        return LoraConfig(
            r=rank,
            lora_alpha=self.alpha,
            target_modules=self.target_modules,
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            use_rslora=bool(kw.get("use_rslora", False)),
            lora_dropout=0.0,
            bias="none",
            inference_mode=True,
        )


# ---- reading and checking ---------------------------------------------------------------------------------
def resolve_lora_path(path: str | os.PathLike[str]) -> Path:
    """A LoRA file, or a training output folder holding ``pytorch_lora_weights.safetensors``."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / LORA_WEIGHT_NAME).is_file():
            return p / LORA_WEIGHT_NAME
        raise LoraLoadError(f"LoRA folder {p} has no {LORA_WEIGHT_NAME}; pass the .safetensors file itself.")
    if not p.is_file():
        raise LoraLoadError(f"LoRA file {p} does not exist.")
    return p


def _cached_hash(path: Path) -> str:
    """``file_hash`` (A1111-style short sha256), cached by (path, size, mtime) so re-applying a list is cheap."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = file_hash(path)
    return _HASHES[key]


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    from dit.convert.safe_load import expect_safetensors

    try:
        expect_safetensors(path)
    except ValueError as e:
        raise LoraLoadError(f"LoRA {e}") from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as e:  # safetensors raises its own error type for truncated files
        raise LoraLoadError(f"LoRA {path} is a damaged safetensors file: {e}") from None
    return tensors, metadata


def _adapter_config(metadata: dict[str, str], path: Path) -> dict[str, Any]:
    raw = metadata.get(LORA_METADATA_KEY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        warnings.warn(
            f"{path.name}: unreadable {LORA_METADATA_KEY}; using rank from shapes, alpha = rank.", stacklevel=3
        )
        return {}
    if not isinstance(data, dict):
        return {}
    prefix = f"{COMPONENT}."
    if any(k.startswith(prefix) for k in data):
        data = {k.removeprefix(prefix): v for k, v in data.items() if k.startswith(prefix)}
    return data


def _parse_keys(path: Path, raw: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, int], dict]:
    """File keys -> PEFT keys without prefix, per-module ranks, and one source key per module (for messages)."""
    keys = list(raw)
    if not keys:
        raise LoraLoadError(f"LoRA {path} holds no tensors.")
    if any("lora_down" in k or "lora_up" in k or k.startswith(("lora_unet_", "lora_te")) for k in keys):
        raise LoraLoadError(
            f"LoRA {path} is in the kohya/A1111 layout (keys like {keys[0]!r}); DiT Studio reads PEFT/diffusers "
            "LoRAs (transformer.<module>.lora_A.weight / lora_B.weight). Convert it, or save it with diffusers."
        )
    other = sorted({k.split(".", 1)[0] for k in keys if k.startswith(("text_encoder", "unet."))})
    if other:
        raise LoraLoadError(
            f"LoRA {path} has weights for {', '.join(other)}; DiT Studio applies LoRAs to the transformer only."
        )
    tensors: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    source: dict[str, str] = {}
    unknown = []
    for key in keys:
        name = next((key[len(p) :] for p in _PREFIXES if key.startswith(p)), key)
        m = _KEY.match(name)
        if m is None:
            unknown.append(key)
            continue
        tensors[name] = raw[key]
        parts.setdefault(m["module"], {})[m["part"]] = raw[key]
        source.setdefault(m["module"], key)
    if not tensors:
        raise LoraLoadError(
            f"{path} is not a LoRA: none of its {len(keys)} keys is a PEFT LoRA weight (e.g. {keys[0]!r}). "
            "Full model weights load as a model, not as a LoRA."
        )
    if unknown:
        raise LoraLoadError(
            f"LoRA {path} has {len(unknown)} keys that are not PEFT LoRA weights (lora_A/lora_B), e.g. "
            f"{', '.join(unknown[:_SHOW])}. DoRA, LoRA biases and other adapter types are not supported."
        )
    ranks = {}
    for module, pair in parts.items():
        if set(pair) != {"lora_A", "lora_B"}:
            lacking = "lora_B" if "lora_A" in pair else "lora_A"
            raise LoraLoadError(f"LoRA {path} is incomplete: {source[module]} has no matching {lacking} weight.")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.ndim < 2 or b.ndim < 2 or b.shape[1] != a.shape[0]:
            raise LoraLoadError(
                f"LoRA {path}: {module} has inconsistent shapes lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)}."
            )
        ranks[module] = int(a.shape[0])
    return tensors, ranks, source


def check_lora_fits(lora: LoraFile, transformer: nn.Module) -> None:
    """Raise ``LoraLoadError`` naming the keys whose module is missing from ``transformer`` or has other shapes."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = dict(transformer.named_modules())
    missing, wrong = [], []
    for module_name in lora.target_modules:
        key = lora.source_keys[module_name]
        module = modules.get(module_name)
        if module is None:
            missing.append(key)
            continue
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        a = lora.tensors[f"{module_name}.lora_A.weight"]
        b = lora.tensors[f"{module_name}.lora_B.weight"]
        if isinstance(module, nn.Linear):
            want = (module.in_features, module.out_features)
            got = (a.shape[1], b.shape[0]) if a.ndim == 2 and b.ndim == 2 else None
        elif isinstance(module, nn.Conv2d):
            want = (module.in_channels, module.out_channels)
            got = (a.shape[1], b.shape[0]) if a.ndim == 4 and b.ndim == 4 else None
        else:
            wrong.append(f"{key} (targets a {type(module).__name__}, not a Linear/Conv2d layer)")
            continue
        if got != want:
            wrong.append(f"{key} (LoRA {got[0] if got else '?'}->{got[1] if got else '?'}, model {want[0]}->{want[1]})")
    if not missing and not wrong:
        return
    total = len(lora.target_modules)
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} of {total} LoRA layers name modules this model does not have, e.g. "
            + ", ".join(missing[:_SHOW])
        )
    if wrong:
        problems.append(f"{len(wrong)} of {total} have the wrong shape, e.g. " + ", ".join(wrong[:_SHOW]))
    trained = f" It was trained on {lora.base_model} ({lora.base_model_hash})." if lora.base_model else ""
    raise LoraLoadError(
        f"LoRA {lora.path} does not fit this {type(transformer).__name__}: {'; '.join(problems)}.{trained} "
        "Use a LoRA trained on this base model."
    )


def read_lora(
    path: str | os.PathLike[str], transformer: nn.Module | None = None, hash_value: str | None = None
) -> LoraFile:
    """Read a PEFT-format LoRA file (or a folder holding one), checking bytes, keys and, given a transformer, fit.

    Safe to call on untrusted files: only safetensors are opened, and nothing is applied to any model.
    """
    p = resolve_lora_path(path)
    raw, metadata = _read_safetensors(p)
    tensors, ranks, source = _parse_keys(p, raw)
    config = _adapter_config(metadata, p)
    if config.get("use_dora"):
        raise LoraLoadError(f"LoRA {p} is a DoRA adapter; only plain LoRA is supported.")
    lora = LoraFile(p, hash_value or _cached_hash(p), tensors, ranks, metadata, config, source)
    if transformer is not None:
        check_lora_fits(lora, transformer)
    return lora


# ---- applying ---------------------------------------------------------------------------------------------
def _weight(value: Any, what: str) -> float:
    if isinstance(value, bool) or value is None:
        raise InputError(f"The weight of LoRA {what} must be a number, got {value!r}.")
    try:
        weight = float(value)
    except (TypeError, ValueError):
        raise InputError(f"The weight of LoRA {what} must be a number, got {value!r}.") from None
    if not math.isfinite(weight):
        raise InputError(f"The weight of LoRA {what} must be a finite number, got {value!r}.")
    return weight


def _requests(loras: Sequence[Any]) -> list[tuple[Path, float]]:
    single_pair = isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[1], (int, float))
    if isinstance(loras, (str, os.PathLike)) or single_pair:
        raise InputError("Pass a list of LoRAs, e.g. [(path, 0.8)], not a single entry.")
    out = []
    for item in loras:
        if isinstance(item, (str, os.PathLike)):
            path, weight = item, 1.0
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            path, weight = item
        else:
            raise InputError(f"Each LoRA must be a path or a (path, weight) pair, got {item!r}.")
        if not isinstance(path, (str, os.PathLike)):
            raise InputError(f"A LoRA path must be a string or a path, got {path!r}.")
        out.append((resolve_lora_path(path), _weight(weight, Path(path).name)))
    return out


def _adapter_names(paths: list[Path]) -> list[str]:
    """Adapter names from file stems (the folder name for diffusers' generic file name), made unique and safe as
    PEFT module keys (no dots, no clash with ``nn.ModuleDict`` attributes)."""
    names: list[str] = []
    reserved = set(dir(nn.ModuleDict()))
    for p in paths:
        stem = p.parent.name if p.name == LORA_WEIGHT_NAME and p.parent.name else p.stem
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "lora"
        if base in reserved:
            base += "_lora"
        name, n = base, 2
        while name in names:
            name, n = f"{base}_{n}", n + 1
        names.append(name)
    return names


def _remove_lora_layers(transformer: nn.Module) -> None:
    """Put every base layer back in place of its LoRA wrapper: the model is then exactly the base model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(transformer.named_modules()):
        if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
            parent_name, _, child = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            setattr(parent, child, module.get_base_layer())
    if "peft_config" in transformer.__dict__:
        del transformer.peft_config
    if getattr(transformer, "_hf_peft_config_loaded", False):  # adapters diffusers' PeftAdapterMixin had loaded
        transformer._hf_peft_config_loaded = False


def _inject(transformer: nn.Module, name: str, lora: LoraFile) -> None:
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*peft_config.*")  # "several adapters": intended here
        inject_adapter_in_model(lora.lora_config(), transformer, adapter_name=name)
    result = set_peft_model_state_dict(transformer, lora.tensors, adapter_name=name)
    tag = re.compile(rf"\.lora_[AB]\.{re.escape(name)}\.")
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if tag.search(k)]
    if unexpected or missing:
        raise LoraLoadError(
            f"LoRA {lora.path.name} did not load cleanly: unexpected {unexpected[:_SHOW]}, missing {missing[:_SHOW]}."
        )


def _apply_weights(transformer: nn.Module, weights: list[tuple[str, float]]) -> None:
    """Activate the adapters with a non-zero weight and scale each one (scale = weight * alpha / rank)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    active = [name for name, w in weights if w != 0.0]
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(active, inference_mode=True)
            if hasattr(module, "set_scale"):
                for name, w in weights:
                    module.set_scale(name, w)


def _warn_other_base(pipe: Any, lora: LoraFile) -> None:
    ours = getattr(pipe, "model_hash", None)
    if ours and lora.base_model_hash and ours != lora.base_model_hash:
        warnings.warn(
            f"LoRA {lora.path.name} was trained on {lora.base_model} ({lora.base_model_hash}); this pipeline's model "
            f"is {getattr(pipe, 'model_name', '?')} ({ours}). The shapes fit, so it is applied, but it may not look "
            "as intended.",
            LoraBaseModelWarning,
            stacklevel=3,
        )


def load_loras(pipe: Any, loras: Sequence[tuple[str | os.PathLike[str], float] | str | os.PathLike[str]]) -> list[dict]:
    """Apply LoRAs ``[(path, weight), ...]`` to ``pipe.transformer``, replacing whatever set was loaded before.

    A path may be a ``.safetensors`` file or a training output folder. Returns the adapters as recorded in every
    image's generation record (``pipe.active_adapters_record``): ``[{"name", "weight", "hash"}, ...]``.
    Raises ``InputError`` for a weight that is not a finite number and ``LoraLoadError`` for a missing, unsafe or
    ill-fitting file; in both cases the previously loaded adapters stay as they were. An empty list unloads all.
    """
    requests = _requests(loras)
    transformer = pipe.transformer
    with _LOCK:
        current: list[dict] = getattr(pipe, _STATE_ATTR, None) or []
        hashes = [_cached_hash(p) for p, _ in requests]
        wanted = [(str(p.resolve()), h) for (p, _), h in zip(requests, hashes)]
        if wanted != [(e["path"], e["hash"]) for e in current]:
            files = [read_lora(p, transformer, h) for (p, _), h in zip(requests, hashes)]  # all checked first
            for lora in files:
                _warn_other_base(pipe, lora)
            names = _adapter_names([p for p, _ in requests])
            unload_loras(pipe)
            try:
                for name, lora in zip(names, files):
                    _inject(transformer, name, lora)
            except Exception:
                unload_loras(pipe)
                raise
            current = [
                {"name": n, "path": path, "hash": h, "rank": f.rank, "alpha": f.alpha}
                for n, (path, h), f in zip(names, wanted, files)
            ]
        for entry, (_, weight) in zip(current, requests):
            entry["weight"] = weight
        _apply_weights(transformer, [(e["name"], e["weight"]) for e in current])
        setattr(pipe, _STATE_ATTR, current)
        pipe.active_adapters_record = [{"name": e["name"], "weight": e["weight"], "hash": e["hash"]} for e in current]
        return [dict(r) for r in pipe.active_adapters_record]


def unload_loras(pipe: Any) -> None:
    """Remove every LoRA from ``pipe.transformer``, restoring the base model exactly."""
    with _LOCK:
        _remove_lora_layers(pipe.transformer)
        setattr(pipe, _STATE_ATTR, [])
        pipe.active_adapters_record = []


def loaded_loras(pipe: Any) -> list[dict]:
    """The adapters now applied: name, path, hash, rank, alpha and weight of each (for the UI)."""
    return [dict(e) for e in getattr(pipe, _STATE_ATTR, None) or []]
