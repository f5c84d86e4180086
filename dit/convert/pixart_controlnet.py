"""PixArt-δ ControlNet-Transformer checkpoints -> a DiT Studio control adapter file (and the base transformer).

Two source layouts:

* **Official** ``PixArt-XL-2-{512,1024}-ControlNet.pth`` (``{'state_dict': ...}``, ``ControlPixArtHalf``): the whole
  model, ``base_model.*`` (an official PixArt-α state dict) plus ``controlnet.{i}.copied_block.*`` (official
  ``PixArtMSBlock`` keys), ``controlnet.0.before_proj.*`` and ``controlnet.{i}.after_proj.*``. The base converts
  with ``dit.convert.pixart_original``; every copied block with the same block mapping.
* **diffusers research project** (``examples/research_projects/pixart/controlnet_pixart_alpha.py``,
  ``PixArtControlNetAdapterModel``, e.g. ``raulc0399/pixart-alpha-hed-controlnet``):
  ``controlnet_blocks.{i}.transformer_block.*`` (diffusers ``BasicTransformerBlock`` names, which ours share),
  ``controlnet_blocks.0.before_proj.*``, ``controlnet_blocks.{i}.after_proj.*``. This *is* our file layout, so the
  conversion checks every key and shape and adds the metadata.

Checks are strict both ways (every source key used, every adapter weight filled, contiguous block indices, one
``before_proj`` in block 0 only, widths consistent), as for every converter here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .common import KeyMapper, KeyMismatchError, format_keys, sha256_of
from .pixart_original import map_pixart_block

CONTROL_TYPE = "controlnet"


def split_prefixed(state_dict: Mapping[str, torch.Tensor], what: str) -> tuple[dict, dict]:
    """``base_model.*`` and ``controlnet.*`` halves of an official control checkpoint (prefixes removed)."""
    base = {k[len("base_model.") :]: v for k, v in state_dict.items() if k.startswith("base_model.")}
    control = {k[len("controlnet.") :]: v for k, v in state_dict.items() if k.startswith("controlnet.")}
    other = [k for k in state_dict if not k.startswith(("base_model.", "controlnet."))]
    if other:
        raise KeyMismatchError(
            f"{what}: keys outside base_model.* and controlnet.*: {format_keys(other, 8)}; this is not an official "
            "ControlNet/RelaCtrl checkpoint"
        )
    if not control:
        raise KeyMismatchError(f"{what}: no controlnet.* keys (first keys: {format_keys(list(state_dict)[:8], 8)})")
    return base, control


def _indices(keys: Any, pattern: str, what: str) -> list[int]:
    idx = sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})
    if not idx or idx != list(range(len(idx))):
        raise KeyMismatchError(f"{what}: control block indices are missing or not contiguous: {idx}")
    return idx


def controlnet_original_to_ours(control: Mapping[str, torch.Tensor], what: str = "PixArt ControlNet") -> dict:
    """Official ``controlnet.*`` keys (prefix removed) -> our ``controlnet_blocks.*`` adapter keys."""
    m = KeyMapper({f"controlnet.{k}": v for k, v in control.items()}, what)  # full names in messages
    for i in _indices(control, r"(\d+)\.", what):
        src, dst = f"controlnet.{i}", f"controlnet_blocks.{i}"
        map_pixart_block(m, f"{src}.copied_block", f"{dst}.transformer_block")
        if i == 0:
            m.move_linear(f"{src}.before_proj", f"{dst}.before_proj")
        m.move_linear(f"{src}.after_proj", f"{dst}.after_proj")
    return m.finish()


def check_controlnet_layout(tensors: Mapping[str, torch.Tensor], what: str) -> tuple[int, int]:
    """Check our/diffusers' ControlNet adapter layout; returns (number of control blocks, width)."""
    blocks = _indices(tensors, r"controlnet_blocks\.(\d+)\.", what)
    bad = [
        k
        for k in tensors
        if not re.match(r"controlnet_blocks\.\d+\.(transformer_block\.|before_proj\.|after_proj\.)", k)
    ]
    if bad:
        raise KeyMismatchError(f"{what}: keys that are not ControlNet-Transformer weights: {format_keys(bad, 8)}")
    before = sorted({k.split(".")[1] for k in tensors if ".before_proj." in k})
    if before != ["0"]:
        raise KeyMismatchError(f"{what}: before_proj must exist in control block 0 only, found it in blocks {before}")
    for i in blocks:
        for part in ("after_proj.weight", "after_proj.bias", "transformer_block.attn1.to_q.weight"):
            if f"controlnet_blocks.{i}.{part}" not in tensors:
                raise KeyMismatchError(f"{what}: controlnet_blocks.{i}.{part} is missing")
    dim = int(tensors["controlnet_blocks.0.after_proj.weight"].shape[0])
    for k, v in tensors.items():
        if (".after_proj.weight" in k or ".before_proj.weight" in k) and tuple(v.shape) != (dim, dim):
            raise KeyMismatchError(f"{what}: {k} is {tuple(v.shape)}, expected ({dim}, {dim})")
    return len(blocks), dim


def adapter_metadata(
    kind: str,
    config: dict[str, Any],
    dim: int,
    base_layers: int | None,
    source: str | Path | None,
    preprocessor: str | None = None,
    base_model: str | None = None,
) -> dict[str, str]:
    meta = {
        "format": "pt",
        "adapter_type": kind,
        "adapter_config": json.dumps(config, sort_keys=True),
        "base_inner_dim": str(dim),
        "base_model_class": "TextDiTModel",
        "control_size": "",
        "preprocessor": preprocessor or "none",
        "software": "dit-studio dit.convert",
    }
    if base_layers is not None:
        meta["base_num_layers"] = str(base_layers)
    if base_model:
        meta["base_model"] = base_model
    if source is not None and Path(source).is_file():
        meta["source"] = Path(source).name
        meta["source_sha256"] = sha256_of(source)
    return meta


def save_adapter_file(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}, str(path), metadata)
    return path


def convert_pixart_controlnet(
    source: str | Path | Mapping[str, torch.Tensor],
    image_size: int | None = None,
    version: str | None = "alpha",
    num_heads: int | None = None,
    ema: bool = True,
    interpolation_scale: float | None = None,
) -> tuple[torch.nn.Module | None, dict[str, torch.Tensor], dict[str, Any]]:
    """Official ControlNet ``.pth`` or diffusers-layout adapter -> (base ``TextDiTModel`` or None, adapter tensors,
    adapter config). The base is built (and checked) when the file has ``base_model.*`` keys."""
    from .common import load_strict
    from .pixart_original import pixart_original_config, pixart_original_to_diffusers
    from .safe_load import load_checkpoint

    what = f"PixArt ControlNet {source if isinstance(source, (str, Path)) else 'state dict'}"
    if isinstance(source, (str, Path)) and Path(source).is_dir():  # a diffusers PixArtControlNetAdapterModel folder
        files = sorted(Path(source).glob("*.safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"{source}: expected one .safetensors file in the folder, found {len(files)}")
        source = files[0]
    state_dict = load_checkpoint(source, ema=ema) if isinstance(source, (str, Path)) else dict(source)
    base_model = None
    if any(k.startswith("controlnet_blocks.") for k in state_dict):
        tensors = dict(state_dict)
    else:
        base, control = split_prefixed(state_dict, what)
        tensors = controlnet_original_to_ours(control, what)
        if base:
            from ..models.text_dit import TextDiTModel

            cfg = pixart_original_config(base, image_size, version, num_heads, interpolation_scale)  # type: ignore[arg-type]
            base_model = load_strict(TextDiTModel(**cfg), pixart_original_to_diffusers(base), what).eval()
    n, dim = check_controlnet_layout(tensors, what)
    if base_model is not None:
        from control.controlnet_transformer import ControlNetTransformer

        load_strict(ControlNetTransformer.from_transformer(base_model, n), tensors, what)  # shapes vs the base
    return base_model, tensors, {"num_blocks": n, "inner_dim": dim}


def write_converted_adapter(
    kind: str,
    base: torch.nn.Module | None,
    tensors: Mapping[str, torch.Tensor],
    config: dict[str, Any],
    out_dir: str | Path,
    name: str,
    source: str | Path | None,
    preprocessor: str | None = None,
) -> dict[str, Path]:
    """Write ``OUT/controls/<name>.safetensors`` (+ ``OUT/transformer/`` for a file that carried its base)."""
    from .common import save_transformer

    out = Path(out_dir)
    written = {}
    layers = len(base.transformer_blocks) if base is not None else None
    if base is not None:
        record = {"kind": f"{kind} base", "source": Path(source).name if source is not None else None}
        written["transformer"] = save_transformer(base, out, record)
    meta = adapter_metadata(kind, config, int(config["inner_dim"]), layers, source, preprocessor)
    written["adapter"] = save_adapter_file(tensors, out / "controls" / f"{name}.safetensors", meta)
    return written
