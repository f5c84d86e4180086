"""Official DiT-3D checkpoints (DiT-3D/DiT-3D ``train.py``) -> our ``DiT3DModel``.

The official training script saves ``{'epoch', 'model_state', 'optimizer_state'[, 'ema']}``, where the weights
belong to a wrapper (``Model.model``), usually under DDP: keys look like ``model.module.blocks.0.attn.qkv.weight``.
Below the wrapper the names are facebookresearch/DiT's (``x_embedder.proj`` is a Conv3d, ``final_layer.linear``
has p³·C outputs), so the 2D renaming (``dit_original_to_ours``) applies as is and every key is checked.

Window attention is not in the weights (the official windowed blocks have the same parameters and, because of
the bug described in ``dit.attention_window3d``, computed global attention). A converted checkpoint therefore
reproduces the official outputs with ``window_size=0``, the default here; turning windows on changes the model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..embeddings3d import sincos_3d
from ..models.dit3d import DIT3D_SIZES, DiT3DModel
from .common import load_strict, need
from .dit_original import dit_original_to_ours
from .safe_load import load_raw, strip_prefixes, unwrap_state_dict


def dit3d_state_dict(obj: Any, ema: bool = True, source: str = "DiT-3D checkpoint") -> dict[str, torch.Tensor]:
    """The model weights of an official DiT-3D file's top-level object, wrapper prefixes removed."""
    if isinstance(obj, Mapping) and not all(torch.is_tensor(v) for v in obj.values()):
        if ema and isinstance(obj.get("ema"), Mapping):
            obj = obj["ema"]
        elif isinstance(obj.get("model_state"), Mapping):
            obj = obj["model_state"]
    state = unwrap_state_dict(obj, ema=ema, source=source)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key
        while name.startswith(("model.", "module.")):
            name = name.split(".", 1)[1]
        out[name] = value
    return strip_prefixes(out, source)


def dit3d_original_config(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict[str, Any]:
    """Infer the ``DiT3DModel`` config from an official state dict's shapes (heads from DiT-3D's size table)."""
    what = "DiT-3D checkpoint"
    proj = need(state_dict, "x_embedder.proj.weight", what)
    if proj.dim() != 5:
        raise ValueError(f"{what}: x_embedder.proj is {proj.dim() - 2}D, not a Conv3d; is this a 2D DiT?")
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = len({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    heads = num_heads or next((h for _, w, h in DIT3D_SIZES.values() if w == hidden), None)
    if heads is None:
        raise ValueError(f"{what}: hidden size {hidden} is not a DiT-3D size; pass num_heads")
    out_features = need(state_dict, "final_layer.linear.weight", what).shape[0]
    out_channels = out_features // patch**3
    # The token grid side from the stored position table, else the paper's voxel size 32.
    side = round(state_dict["pos_embed"].shape[-2] ** (1 / 3)) if "pos_embed" in state_dict else 32 // patch
    return dict(
        sample_size=side * patch,
        patch_size=patch,
        in_channels=in_channels,
        num_layers=depth,
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        mlp_ratio=need(state_dict, "blocks.0.mlp.fc1.weight", what).shape[0] / hidden,
        num_classes=need(state_dict, "y_embedder.embedding_table.weight", what).shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels,
        activation_fn="gelu",
    )


def convert_dit3d_original(
    source: str | Path | Mapping[str, Any], num_heads: int | None = None, ema: bool = True, **overrides: Any
) -> DiT3DModel:
    """Official DiT-3D checkpoint (path, container or state dict) -> ``DiT3DModel``, every weight checked in."""
    obj = load_raw(source) if isinstance(source, (str, Path)) else source
    state = dit3d_state_dict(obj, ema=ema, source=str(source) if isinstance(source, (str, Path)) else "state dict")
    cfg = dit3d_original_config(state, num_heads)
    cfg.update(overrides)
    model = DiT3DModel(**cfg)
    load_strict(model, dit_original_to_ours(state, "DiT-3D checkpoint"), "DiT-3D checkpoint")
    if "pos_embed" in state:
        stored = state["pos_embed"].float().reshape(-1, state["pos_embed"].shape[-1])
        if not torch.allclose(stored, sincos_3d(stored.shape[-1], model.token_grid), atol=1e-4):
            raise ValueError("the checkpoint's pos_embed is not DiT-3D's fixed 3D sin-cos table")
    return model.eval()
