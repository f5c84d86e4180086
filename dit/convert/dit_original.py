"""DiT checkpoints -> our ``DiTModel``: the official facebookresearch/DiT ``.pt`` and diffusers' DiT layout.

Official layout (``models.py`` of facebookresearch/DiT): ``x_embedder.proj``, a fixed ``pos_embed``
Parameter, ``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table`` (num_classes + 1 rows, the last the
CFG null class), per block ``attn.qkv`` (timm's fused Linear(D, 3D)), ``attn.proj``, ``mlp.fc{1,2}``,
``adaLN_modulation.1`` (the Linear after SiLU), and ``final_layer.{linear,adaLN_modulation.1}``.
Our ``DiTModel`` keeps the original's math, so only names change (and qkv is split into q, k, v).

diffusers layout (``DiTTransformer2DModel``): the same weights, except that the timestep and label
embedders are copied into every block's ``norm1.emb`` and two details of the math differ (timestep
frequency shift 1 and LayerNorm eps 1e-5 before the MLP). The converted config sets those two knobs so
our model reproduces the diffusers one exactly.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..embeddings import sincos_2d
from ..models.dit import DIT_SIZES, DiTModel, dit_config
from .common import KeyMapper, load_strict, need
from .safe_load import load_checkpoint

# Latent downsampling of the SD VAE DiT was trained with (sd-vae-ft-ema/mse): image_size // 8 = latent size.
VAE_SCALE = 8
_HEADS_BY_HIDDEN = {hidden: heads for _, hidden, heads in DIT_SIZES.values()}


def _num_blocks(keys: Any, pattern: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if idx and idx != set(range(max(idx) + 1)):
        raise ValueError(f"block indices are not contiguous: {sorted(idx)}")
    return len(idx)


def _heads(hidden: int, num_heads: int | None, what: str) -> int:
    """Heads cannot be read from weights; use the explicit value or the paper's table for this width."""
    if num_heads is not None:
        heads = num_heads
    elif hidden in _HEADS_BY_HIDDEN:
        heads = _HEADS_BY_HIDDEN[hidden]
    elif hidden % 64 == 0:
        heads = hidden // 64
        warnings.warn(
            f"{what}: hidden size {hidden} is not one of the paper's DiT sizes; assuming {heads} heads of 64. "
            "Pass num_heads (--num-heads) or a config name if that is wrong.",
            UserWarning,
            stacklevel=3,
        )
    else:
        raise ValueError(f"{what}: cannot infer the number of heads for hidden size {hidden}; pass num_heads")
    if hidden % heads:
        raise ValueError(f"{what}: hidden size {hidden} is not divisible by {heads} heads")
    return heads


def _apply_config_name(cfg: dict[str, Any], config_name: str, what: str) -> None:
    """Check the weights against a named config (e.g. ``DiT-XL/2``) and take its head count."""
    named = dit_config(config_name)
    hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    named_hidden = named["num_attention_heads"] * named["attention_head_dim"]
    wrong = [
        f"{k}: weights {have}, {config_name} {want}"
        for k, have, want in (
            ("depth", cfg["num_layers"], named["num_layers"]),
            ("hidden size", hidden, named_hidden),
            ("patch size", cfg["patch_size"], named["patch_size"]),
        )
        if have != want
    ]
    if wrong:
        raise ValueError(f"{what} does not match config {config_name}: " + "; ".join(wrong))
    cfg["num_attention_heads"] = named["num_attention_heads"]
    cfg["attention_head_dim"] = named["attention_head_dim"]


def _sample_size(from_weights: int | None, image_size: int | None, what: str) -> int:
    from_flag = None
    if image_size is not None:
        if image_size % VAE_SCALE:
            raise ValueError(f"image size {image_size} is not a multiple of the VAE factor {VAE_SCALE}")
        from_flag = image_size // VAE_SCALE
    if from_weights is not None and from_flag is not None and from_weights != from_flag:
        raise ValueError(
            f"{what}: its position table is for {from_weights * VAE_SCALE}px images "
            f"(latent {from_weights}), but image_size={image_size} was given"
        )
    size = from_flag if from_flag is not None else from_weights
    if size is None:
        raise ValueError(
            f"{what}: the training resolution is not stored in the weights; pass image_size (--image-size)"
        )
    return size


def dit_original_config(
    state_dict: Mapping[str, torch.Tensor],
    config_name: str | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
) -> dict[str, Any]:
    """Infer the ``DiTModel`` config of an official DiT state dict from its tensor shapes.

    Depth, width, patch size, input channels, learned sigma and class count are all visible in shapes;
    the head count is not, so it comes from ``config_name`` (preferred), ``num_heads``, or the paper's
    table for the width. The latent size comes from ``pos_embed``'s token count or ``image_size``.
    """
    what = "DiT checkpoint"
    proj = need(state_dict, "x_embedder.proj.weight", what)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = _num_blocks(state_dict, r"blocks\.(\d+)\.attn\.qkv\.weight$")
    out_features = need(state_dict, "final_layer.linear.weight", what).shape[0]
    out_channels, rem = divmod(out_features, patch * patch)
    if rem or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"{what}: final_layer.linear has {out_features} outputs; expected patch^2 * in_channels "
            f"({patch * patch * in_channels}) or twice that (learned sigma)"
        )
    grid_from_weights = None
    if "pos_embed" in state_dict:
        tokens = state_dict["pos_embed"].shape[-2]
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"{what}: pos_embed has {tokens} tokens, not a square grid")
        grid_from_weights = side * patch
    heads = _heads(hidden, num_heads, what) if config_name is None else 1
    cfg: dict[str, Any] = dict(
        sample_size=_sample_size(grid_from_weights, image_size, what),
        patch_size=patch,
        in_channels=in_channels,
        num_layers=depth,
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        mlp_ratio=need(state_dict, "blocks.0.mlp.fc1.weight", what).shape[0] / hidden,
        num_classes=need(state_dict, "y_embedder.embedding_table.weight", what).shape[0] - 1,
        learn_sigma=out_channels == 2 * in_channels,
    )
    if config_name is not None:
        _apply_config_name(cfg, config_name, what)
        if num_heads is not None and num_heads != cfg["num_attention_heads"]:
            raise ValueError(f"num_heads={num_heads} contradicts {config_name} ({cfg['num_attention_heads']} heads)")
    return cfg


def dit_original_to_ours(
    state_dict: Mapping[str, torch.Tensor], what: str = "DiT checkpoint"
) -> dict[str, torch.Tensor]:
    """Rename an official DiT state dict to ``DiTModel`` keys; every source key must be used.

    ``pos_embed`` is dropped: it is the fixed MAE sin-cos table, which our model computes from its config
    (``check_pos_embed`` verifies the two agree).
    """
    m = KeyMapper(state_dict, what)
    m.move_linear("x_embedder.proj", "pos_embed.proj")
    m.drop("pos_embed")
    m.move_linear("t_embedder.mlp.0", "timestep_embedder.linear_1")
    m.move_linear("t_embedder.mlp.2", "timestep_embedder.linear_2")
    m.move("y_embedder.embedding_table.weight", "class_embedder.embedding_table.weight")
    for i in range(_num_blocks(state_dict, r"blocks\.(\d+)\.")):
        src, dst = f"blocks.{i}", f"transformer_blocks.{i}"
        m.split_linear(f"{src}.attn.qkv", [f"{dst}.attn1.to_q", f"{dst}.attn1.to_k", f"{dst}.attn1.to_v"])
        m.move_linear(f"{src}.attn.proj", f"{dst}.attn1.to_out.0")
        m.move_linear(f"{src}.mlp.fc1", f"{dst}.ff.net.0.proj")
        m.move_linear(f"{src}.mlp.fc2", f"{dst}.ff.net.2")
        m.move_linear(f"{src}.adaLN_modulation.1", f"{dst}.adaln_modulation.linear")
    m.move_linear("final_layer.linear", "final_layer.linear")
    m.move_linear("final_layer.adaLN_modulation.1", "final_layer.adaln_modulation.linear")
    return m.finish()


def check_pos_embed(state_dict: Mapping[str, torch.Tensor], model: DiTModel, atol: float = 1e-4) -> None:
    """Warn if the file's ``pos_embed`` is not the sin-cos table our model computes (e.g. a learned one)."""
    if "pos_embed" not in state_dict:
        return
    stored = state_dict["pos_embed"].float().reshape(-1, state_dict["pos_embed"].shape[-1])
    grid = model.config.sample_size // model.config.patch_size
    ours = sincos_2d(stored.shape[-1], (grid, grid))
    if stored.shape != ours.shape or not torch.allclose(stored, ours, atol=atol):
        diff = (stored - ours).abs().max().item() if stored.shape == ours.shape else float("nan")
        warnings.warn(
            f"The checkpoint's pos_embed differs from the fixed sin-cos table (max diff {diff:.3g}); the converted "
            "model uses the computed table, so outputs will differ from the original if it was trained.",
            UserWarning,
            stacklevel=2,
        )


def convert_dit_original(
    source: str | Path | Mapping[str, torch.Tensor],
    config_name: str | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
    ema: bool = True,
) -> DiTModel:
    """Official DiT checkpoint (path or state dict) -> ``DiTModel`` with every weight checked in."""
    state_dict = load_checkpoint(source, ema=ema) if isinstance(source, (str, Path)) else dict(source)
    cfg = dit_original_config(state_dict, config_name, image_size, num_heads)
    converted = dit_original_to_ours(state_dict)
    model = DiTModel(**cfg)
    load_strict(model, converted, "DiT checkpoint")
    check_pos_embed(state_dict, model)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# diffusers DiTTransformer2DModel layout


def diffusers_dit_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``DiTTransformer2DModel`` state dict to ``DiTModel`` keys.

    diffusers keeps a copy of the timestep and label embedders in every block (``norm1.emb``) but, as
    released, all copies are identical; we take block 0's (the one diffusers' final layer uses too) and
    warn if any copy differs, since our single-embedder model could then not reproduce it. Pair the result
    with ``diffusers_dit_config`` (frequency shift 1, MLP LayerNorm eps 1e-5).
    """
    what = "diffusers DiT checkpoint"
    m = KeyMapper(state_dict, what)
    depth = _num_blocks(state_dict, r"transformer_blocks\.(\d+)\.")
    emb = "transformer_blocks.0.norm1.emb"
    m.move_linear(f"{emb}.timestep_embedder.linear_1", "timestep_embedder.linear_1")
    m.move_linear(f"{emb}.timestep_embedder.linear_2", "timestep_embedder.linear_2")
    m.move(f"{emb}.class_embedder.embedding_table.weight", "class_embedder.embedding_table.weight")
    differing = []
    prefix0 = f"{emb}."
    for i in range(1, depth):
        prefix = f"transformer_blocks.{i}.norm1.emb."
        for key in [k for k in state_dict if k.startswith(prefix)]:
            ref = state_dict.get(prefix0 + key[len(prefix) :])
            m.drop(key)
            if ref is None or ref.shape != state_dict[key].shape or not torch.equal(ref, state_dict[key]):
                differing.append(key)
    if differing:
        warnings.warn(
            f"{what}: the per-block embedder copies differ from block 0's ({len(differing)} tensors, e.g. "
            f"{differing[0]}); using block 0's. The converted model will not match the diffusers one exactly.",
            UserWarning,
            stacklevel=2,
        )
    m.move_linear("pos_embed.proj", "pos_embed.proj")
    m.drop("pos_embed.pos_embed")  # only present if someone saved the buffer; it is computed
    for i in range(depth):
        b = f"transformer_blocks.{i}"
        for name in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"):
            m.move_linear(f"{b}.{name}", f"{b}.{name}")
        m.move_linear(f"{b}.norm1.linear", f"{b}.adaln_modulation.linear")
    m.move_linear("proj_out_1", "final_layer.adaln_modulation.linear")
    m.move_linear("proj_out_2", "final_layer.linear")
    return m.finish()


def diffusers_dit_config(
    state_dict: Mapping[str, torch.Tensor],
    diffusers_config: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
) -> dict[str, Any]:
    """``DiTModel`` config reproducing a diffusers DiT: shapes from the weights, the rest from its config.

    Sets ``timestep_freq_shift=1.0`` (diffusers' ``Timesteps(downscale_freq_shift=1)``) and
    ``mlp_norm_eps`` to diffusers' ``norm_eps`` (1e-5 by default) so the outputs agree exactly.
    """
    what = "diffusers DiT checkpoint"
    dcfg = dict(diffusers_config or {})
    norm_type = dcfg.get("norm_type", "ada_norm_zero")
    if norm_type != "ada_norm_zero":
        raise ValueError(f"{what}: norm_type {norm_type!r} is not DiT's ada_norm_zero")
    proj = need(state_dict, "pos_embed.proj.weight", what)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    out_features = need(state_dict, "proj_out_2.weight", what).shape[0]
    out_channels, rem = divmod(out_features, patch * patch)
    if rem or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"{what}: proj_out_2 has {out_features} outputs, not patch^2 * (1 or 2) * in_channels")
    if num_heads is None and "num_attention_heads" in dcfg:
        num_heads = int(dcfg["num_attention_heads"])
    heads = _heads(hidden, num_heads, what)
    sample_size = _sample_size(dcfg.get("sample_size"), image_size, what)
    return dict(
        sample_size=sample_size,
        patch_size=patch,
        in_channels=in_channels,
        num_layers=_num_blocks(state_dict, r"transformer_blocks\.(\d+)\."),
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        mlp_ratio=need(state_dict, "transformer_blocks.0.ff.net.0.proj.weight", what).shape[0] / hidden,
        num_classes=need(
            state_dict, "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight", what
        ).shape[0]
        - 1,
        learn_sigma=out_channels == 2 * in_channels,
        timestep_freq_shift=1.0,
        mlp_norm_eps=float(dcfg.get("norm_eps", 1e-5)),
    )


def _load_diffusers_dir(path: Path, ema: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and config of a diffusers model folder (or a pipeline folder with ``transformer/``)."""
    if (path / "transformer").is_dir():
        path = path / "transformer"
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    for index_name in ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state_dict: dict[str, torch.Tensor] = {}
            for shard in shards:
                state_dict.update(load_checkpoint(path / shard, ema=ema))
            return state_dict, config
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        if (path / name).is_file():
            return load_checkpoint(path / name, ema=ema), config
    raise FileNotFoundError(f"No diffusion_pytorch_model.safetensors/.bin (or sharded index) in {path}")


def convert_diffusers_dit(
    source: str | Path | Mapping[str, torch.Tensor],
    diffusers_config: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    num_heads: int | None = None,
    ema: bool = True,
) -> DiTModel:
    """diffusers DiT (folder, weights file, or state dict) -> ``DiTModel`` that reproduces it exactly."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        state_dict, folder_config = _load_diffusers_dir(Path(source), ema)
        diffusers_config = diffusers_config or folder_config
    elif isinstance(source, (str, Path)):
        state_dict = load_checkpoint(source, ema=ema)
    else:
        state_dict = dict(source)
    cfg = diffusers_dit_config(state_dict, diffusers_config, image_size, num_heads)
    model = DiTModel(**cfg)
    load_strict(model, diffusers_dit_to_ours(state_dict), "diffusers DiT checkpoint")
    return model.eval()
