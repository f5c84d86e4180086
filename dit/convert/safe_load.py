"""Load a checkpoint file into a flat ``{name: tensor}`` dict without ever running code from it.

Checkpoints arrive with whatever extension their uploader chose: DiT ships ``.pt`` (a torch zip pickle),
PixArt ``.pth``, diffusers ``.bin`` or ``.safetensors``, and people rename files. The extension says nothing
about what is inside, and a pickle dressed as ``.safetensors`` is exactly how a malicious file gets past
someone who only trusts safetensors. So the format is decided from the file's first bytes:

* safetensors: an 8-byte little-endian header length, then a JSON header starting with ``{``;
* torch zip pickle (``torch.save`` since 1.6): a zip (``PK\\x03\\x04``) holding ``<name>/data.pkl``;
* legacy torch pickle (``torch.save(..., _use_new_zipfile_serialization=False)``): pickle protocol bytes
  ``0x80 0x02..0x05`` followed by torch's magic number.

Pickles are opened only with ``torch.load(weights_only=True)``, which refuses any object other than
tensors and plain containers; a file that needs more is reported, not loaded. The one class we allow in
addition is ``argparse.Namespace``: facebookresearch/DiT's ``train.py`` stores its ``args`` in every
training checkpoint, and a Namespace is a plain attribute bag whose unpickling runs no code.
"""

from __future__ import annotations

import argparse
import json
import pickle
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

CheckpointFormat = Literal["safetensors", "torch_zip", "torch_legacy"]

# torch.serialization.MAGIC_NUMBER, pickled as a 10-byte LONG1 right after the protocol header.
_TORCH_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_LONG1 = 0x8A

# Containers that training scripts wrap a state dict in, most preferred first.
_EMA_KEYS = ("ema", "state_dict_ema", "model_ema", "ema_state_dict")
_RAW_KEYS = ("model", "state_dict", "module", "net")
# Wrappers that DDP (``module.``) and torch.compile (``_orig_mod.``) add to every parameter name.
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointFormatError(ValueError):
    """The file is not a checkpoint format we read (or not the format its name promises)."""


class UnsafeCheckpointError(ValueError):
    """The pickle holds Python objects beyond tensors and containers; loading it could run code."""


def _describe_unknown(head: bytes, size: int) -> str:
    """A human guess at what a non-checkpoint file is, for the error message."""
    if size == 0:
        return "an empty file (an interrupted download?)"
    text = head.lstrip()
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer file, not the weights (run `git lfs pull`, or download the file itself)"
    if text[:15].lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a login or error page saved in place of the download?)"
    if head.startswith(b"\x1f\x8b"):
        return "a gzip archive (unpack it first)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive without data.pkl (not a torch.save file; an .npz or a zipped folder?)"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return f"a plain Python pickle (protocol {head[1]}) without torch's magic number, not a torch.save file"
    if text[:1] in (b"{", b"["):
        return "a JSON/text file (a config rather than weights?)"
    return f"unrecognised bytes (starts with {head[:16].hex(' ')})"


def sniff_format(path: str | Path) -> CheckpointFormat:
    """Identify a checkpoint by its bytes; raise ``CheckpointFormatError`` describing anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist or is not a file")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(64)
    if len(head) >= 9:
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= size - 8 and head[8:9] == b"{":
            return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile as e:
            raise CheckpointFormatError(f"{path} starts like a zip archive but is corrupt: {e}") from None
        if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "torch_zip"
    if (
        len(head) >= 14
        and head[0] == 0x80
        and 2 <= head[1] <= 5
        and head[2] == _LONG1
        and head[3] == 10
        and head[4:14] == _TORCH_LEGACY_MAGIC
    ):
        return "torch_legacy"
    raise CheckpointFormatError(
        f"{path} is not a checkpoint this loader reads (safetensors or a torch.save file); "
        f"it looks like {_describe_unknown(head, size)}."
    )


def expect_safetensors(path: str | Path) -> None:
    """Insist that a file is really safetensors, whatever its name says.

    A ``.safetensors`` name is a promise that loading runs no code; a pickle behind that name is either a
    mistake or an attack, and in both cases we stop rather than fall back to unpickling.
    """
    path = Path(path)
    try:
        fmt = sniff_format(path)
    except CheckpointFormatError as e:
        raise CheckpointFormatError(f"{path} is named like a safetensors file but is not one: {e}") from None
    if fmt != "safetensors":
        kind = "a torch zip pickle" if fmt == "torch_zip" else "a legacy torch pickle"
        raise CheckpointFormatError(
            f"{path} is named '{path.suffix}' but its bytes are {kind}, not safetensors (a spoofed or mislabelled "
            "extension). Refusing to load it as a pickle; get the real safetensors file, or rename it to .pt "
            "only if you trust its source."
        )
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = f.read(header_len)
    try:
        json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path} has a corrupt safetensors header: {e}") from None


def _torch_load_weights_only(path: Path) -> Any:
    allowed = [argparse.Namespace]
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    try:
        if safe_globals is None:  # torch < 2.5: no scoped allowlist; Namespace-bearing files are refused
            return torch.load(path, map_location="cpu", weights_only=True)
        with safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg or "Unsupported global" in msg or "weights_only" in msg:
            detail = next((line.strip() for line in msg.splitlines() if "GLOBAL" in line), msg.splitlines()[0])
            detail = detail.split(" was not an allowed global")[0]  # keep what it is, not torch's allowlist advice
            raise UnsafeCheckpointError(
                f"{path} contains arbitrary Python objects besides tensors, so it will not be loaded: unpickling "
                "them could run code from the file. If you trust its source, convert it to safetensors with a "
                "trusted tool (load it once in an isolated environment and save the state dict with "
                f"safetensors.torch.save_file), then pass the .safetensors file. ({detail})"
            ) from None
        raise CheckpointFormatError(f"{path} is a torch checkpoint that failed to unpickle: {e}") from None
    except RuntimeError as e:
        raise CheckpointFormatError(f"{path} is a torch checkpoint that could not be read: {e}") from None


def load_raw(path: str | Path) -> Any:
    """Load a file's top-level object (a state dict or a training container) by its sniffed format."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors":
        expect_safetensors(path)
    fmt = sniff_format(path)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # safetensors raises its own SafetensorError for corrupt files
            raise CheckpointFormatError(f"{path} looks like safetensors but could not be read: {e}") from None
    return _torch_load_weights_only(path)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(torch.is_tensor(v) for v in obj.values())


def unwrap_state_dict(obj: Any, ema: bool = True, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Find the model weights inside a training container and return them as a flat dict.

    DiT's ``train.py`` saves ``{model, ema, opt, args}``, PixArt ``{state_dict, state_dict_ema, optimizer,
    ...}``; released files are usually the bare state dict. ``ema`` picks the EMA weights where both are
    present (EMA is what the papers sample with); a file with only one set yields that set, with a warning
    only when raw weights were asked for and only EMA ones exist. ``module.``/``_orig_mod.`` prefixes from DDP and
    ``torch.compile`` are removed.
    """
    while isinstance(obj, Mapping) and not _is_state_dict(obj):
        ema_key = next((k for k in _EMA_KEYS if isinstance(obj.get(k), Mapping)), None)
        raw_key = next((k for k in _RAW_KEYS if isinstance(obj.get(k), Mapping)), None)
        if ema_key is None and raw_key is None:
            break
        if ema and ema_key is not None:
            chosen = ema_key
        elif not ema and raw_key is not None:
            chosen = raw_key
        else:
            chosen = ema_key or raw_key
            if not ema:  # asked for raw weights explicitly, but the file only has EMA ones
                warnings.warn(
                    f"{source}: no non-EMA weights in this file; using '{chosen}'.", UserWarning, stacklevel=2
                )
        obj = obj[chosen]
    if not isinstance(obj, Mapping):
        raise CheckpointFormatError(f"{source} holds a {type(obj).__name__}, not a state dict")
    tensors = {str(k): v for k, v in obj.items() if torch.is_tensor(v)}
    if not tensors:
        raise CheckpointFormatError(
            f"{source} holds no tensors at its top level and no known weights container "
            f"(looked for {', '.join(_EMA_KEYS + _RAW_KEYS)}); top-level keys: {sorted(map(str, obj))[:20]}"
        )
    others = sorted(str(k) for k, v in obj.items() if not torch.is_tensor(v))
    if others:
        warnings.warn(f"{source}: ignoring non-tensor entries {others[:10]}", UserWarning, stacklevel=2)
    return strip_prefixes(tensors, source)


def strip_prefixes(state_dict: Mapping[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Remove the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) wrappers from parameter names."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(_PREFIXES):
            name = name.split(".", 1)[1]
        if name in out:
            raise CheckpointFormatError(f"{source}: {key!r} and another key both become {name!r} after unwrapping")
        out[name] = value
    return out


def load_checkpoint(path: str | Path, ema: bool = True) -> dict[str, torch.Tensor]:
    """Load weights from a safetensors / torch zip / legacy torch file, recognised by its bytes.

    Returns a flat ``{name: tensor}`` dict on the CPU, unwrapped from common training containers
    (``ema`` chooses EMA weights where both are present) with DDP/compile prefixes removed. Raises
    ``CheckpointFormatError`` for files that are not checkpoints (naming what they look like) and
    ``UnsafeCheckpointError`` for pickles that would need arbitrary Python objects.
    """
    return unwrap_state_dict(load_raw(path), ema=ema, source=str(path))
