"""Official PixArt-α/Σ ``.pth`` -> ``TextDiTModel`` (whose keys are diffusers' ``PixArtTransformer2DModel``'s).

The released files are ``{'state_dict': ...}`` (training checkpoints add ``state_dict_ema``, optimizer and
scheduler). The key mapping is the one of PixArt-sigma's ``tools/convert_pixart_to_diffusers.py``: fused
self-attention ``qkv`` and cross-attention ``kv_linear`` are split, embedders and the adaLN-single
``t_block`` are renamed, the learned null caption ``y_embedding`` and the fixed ``pos_embed`` are dropped
(diffusers' pipelines encode the empty prompt instead, and positions are computed).

What the weights do not say is the training resolution and the position-interpolation factor PixArt
trained with (``pe_interpolation``), which differ between α and Σ at 256px; both come from the caller
(``image_size``, ``version``), with the text length of ``y_embedding`` (120 tokens α, 300 Σ) as a hint.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from ..models.text_dit import TextDiTModel
from .common import KeyMapper, KeyMismatchError, format_keys, load_strict, need
from .safe_load import load_checkpoint

Version = Literal["alpha", "sigma"]

# PixArt's ``pe_interpolation`` per training image size: PixArt-alpha configs (img256 inherits the base 1.0,
# img512 1.0, img1024 2.0) and PixArt-sigma configs (img256 0.5, img512 1.0, img1024 2.0, img2K 4.0).
PE_INTERPOLATION: dict[str, dict[int, float]] = {
    "alpha": {256: 1.0, 512: 1.0, 1024: 2.0},
    "sigma": {256: 0.5, 512: 1.0, 1024: 2.0, 2048: 4.0},
}
# Caption length of the null embedding: T5 max length 120 (α) / 300 (Σ).
_TOKENS_BY_VERSION = {120: "alpha", 300: "sigma"}
VAE_SCALE = 8
# PixArt-XL/2: 16 heads of 72 for hidden 1152.
DEFAULT_HEAD_DIM = 72


def _num_blocks(keys: Any) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))}
    if idx and idx != set(range(max(idx) + 1)):
        raise KeyMismatchError(f"PixArt checkpoint: block indices are not contiguous: {sorted(idx)}")
    return len(idx)


def guess_version(state_dict: Mapping[str, torch.Tensor]) -> Version | None:
    """α or Σ from the null caption's length (120 vs 300 tokens), if the file has one."""
    y = state_dict.get("y_embedder.y_embedding")
    return _TOKENS_BY_VERSION.get(int(y.shape[0])) if y is not None and y.dim() == 2 else None


def interpolation_scale_for(image_size: int, version: Version | None) -> float:
    """PixArt's positional interpolation factor for a model trained at ``image_size`` pixels."""
    if version is None:
        values = {table[image_size] for table in PE_INTERPOLATION.values() if image_size in table}
        if len(values) == 1:
            return values.pop()
        if not values:
            raise ValueError(f"No PixArt position interpolation known for {image_size}px; pass interpolation_scale")
        raise ValueError(
            f"PixArt-alpha and PixArt-sigma use different position interpolation at {image_size}px "
            f"({PE_INTERPOLATION['alpha'][image_size]} vs {PE_INTERPOLATION['sigma'][image_size]}); pass version "
            "('alpha' or 'sigma', --version)"
        )
    table = PE_INTERPOLATION[version]
    if image_size not in table:
        raise ValueError(
            f"PixArt-{version} was not released at {image_size}px (known: {sorted(table)}); pass interpolation_scale"
        )
    return table[image_size]


def map_pixart_block(m: KeyMapper, src: str, dst: str) -> None:
    """One official ``PixArtBlock``/``PixArtMSBlock`` (``src`` prefix) -> diffusers/``DiTBlock`` keys (``dst``).

    Shared with the ControlNet converter (``dit.convert.pixart_controlnet``), whose copied blocks are PixArt blocks.
    """
    m.move(f"{src}.scale_shift_table", f"{dst}.scale_shift_table")
    m.split_linear(f"{src}.attn.qkv", [f"{dst}.attn1.to_q", f"{dst}.attn1.to_k", f"{dst}.attn1.to_v"])
    m.move_linear(f"{src}.attn.proj", f"{dst}.attn1.to_out.0")
    if m.has(f"{src}.attn.q_norm.weight"):
        m.move_linear(f"{src}.attn.q_norm", f"{dst}.attn1.norm_q")
        m.move_linear(f"{src}.attn.k_norm", f"{dst}.attn1.norm_k")
    m.move_linear(f"{src}.cross_attn.q_linear", f"{dst}.attn2.to_q")
    m.split_linear(f"{src}.cross_attn.kv_linear", [f"{dst}.attn2.to_k", f"{dst}.attn2.to_v"])
    m.move_linear(f"{src}.cross_attn.proj", f"{dst}.attn2.to_out.0")
    m.move_linear(f"{src}.mlp.fc1", f"{dst}.ff.net.0.proj")
    m.move_linear(f"{src}.mlp.fc2", f"{dst}.ff.net.2")


def pixart_original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official PixArt state dict to diffusers/``TextDiTModel`` keys; every source key is accounted for.

    Optional parts follow the file: size/aspect-ratio micro-conditions (α-1024-MS) when ``csize_embedder``
    is present, and PixArt-Σ's self-attention qk-norm (``attn.q_norm``/``k_norm`` -> ``attn1.norm_q``/
    ``norm_k``, diffusers' names) when present. KV-compression weights (``attn.sr``/``attn.norm``) have no
    counterpart and are reported as unconverted.
    """
    what = "PixArt checkpoint"
    m = KeyMapper(state_dict, what)
    m.move_linear("x_embedder.proj", "pos_embed.proj")
    m.move_linear("y_embedder.y_proj.fc1", "caption_projection.linear_1")
    m.move_linear("y_embedder.y_proj.fc2", "caption_projection.linear_2")
    m.move_linear("t_embedder.mlp.0", "adaln_single.emb.timestep_embedder.linear_1")
    m.move_linear("t_embedder.mlp.2", "adaln_single.emb.timestep_embedder.linear_2")
    if m.has("csize_embedder.mlp.0.weight") or m.has("ar_embedder.mlp.0.weight"):
        for src, dst in (("csize_embedder", "resolution_embedder"), ("ar_embedder", "aspect_ratio_embedder")):
            m.move_linear(f"{src}.mlp.0", f"adaln_single.emb.{dst}.linear_1")
            m.move_linear(f"{src}.mlp.2", f"adaln_single.emb.{dst}.linear_2")
    m.move_linear("t_block.1", "adaln_single.linear")
    for i in range(_num_blocks(state_dict)):
        map_pixart_block(m, f"blocks.{i}", f"transformer_blocks.{i}")
    m.move_linear("final_layer.linear", "proj_out")
    m.move("final_layer.scale_shift_table", "scale_shift_table")
    m.drop("y_embedder.y_embedding")
    m.drop("pos_embed")
    unsupported = [k for k in m.unused() if re.match(r"blocks\.\d+\.attn\.(sr|norm)\.", k)]
    if unsupported:
        raise NotImplementedError(
            f"{what} uses PixArt-Sigma KV compression ({format_keys(unsupported, 4)}), which TextDiTModel and "
            "diffusers' PixArtTransformer2DModel do not implement; it cannot be converted."
        )
    return m.finish()


def pixart_original_config(
    state_dict: Mapping[str, torch.Tensor],
    image_size: int | None = None,
    version: Version | None = None,
    num_heads: int | None = None,
    interpolation_scale: float | None = None,
) -> dict[str, Any]:
    """Infer the ``TextDiTModel`` config of an official PixArt state dict.

    Shapes give depth, width, patch, channels, caption width, MLP ratio and whether micro-conditions are
    used. Heads default to width / 72 (PixArt-XL/2). The latent size comes from ``image_size`` // 8 or the
    stored ``pos_embed``; the interpolation factor from ``version`` and size (see ``PE_INTERPOLATION``).
    """
    what = "PixArt checkpoint"
    proj = need(state_dict, "x_embedder.proj.weight", what)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    out_features = need(state_dict, "final_layer.linear.weight", what).shape[0]
    out_channels, rem = divmod(out_features, patch * patch)
    if rem:
        raise ValueError(f"{what}: final_layer.linear has {out_features} outputs, not a multiple of patch^2")
    if num_heads is None:
        if hidden % DEFAULT_HEAD_DIM:
            raise ValueError(f"{what}: hidden size {hidden} is not a multiple of 72; pass num_heads (--num-heads)")
        num_heads = hidden // DEFAULT_HEAD_DIM
    if hidden % num_heads:
        raise ValueError(f"{what}: hidden size {hidden} is not divisible by {num_heads} heads")

    from_weights = None
    if "pos_embed" in state_dict:
        tokens = state_dict["pos_embed"].shape[-2]
        side = int(round(tokens**0.5))
        if side * side == tokens:
            from_weights = side * patch
    if image_size is not None:
        if image_size % VAE_SCALE:
            raise ValueError(f"image size {image_size} is not a multiple of the VAE factor {VAE_SCALE}")
        if from_weights is not None and from_weights != image_size // VAE_SCALE:
            raise ValueError(
                f"{what}: its pos_embed is for {from_weights * VAE_SCALE}px, but image_size={image_size} was given"
            )
        sample_size = image_size // VAE_SCALE
    elif from_weights is not None:
        sample_size = from_weights
    else:
        raise ValueError(
            f"{what}: the training resolution is not stored in the weights; pass image_size (--image-size)"
        )

    hinted = guess_version(state_dict)
    if version is None:
        version = hinted
    elif hinted is not None and hinted != version:
        warnings.warn(
            f"{what}: version={version!r} was given, but its null caption has the token length of PixArt-{hinted}",
            UserWarning,
            stacklevel=2,
        )
    if interpolation_scale is None:
        interpolation_scale = interpolation_scale_for(sample_size * VAE_SCALE, version)

    qk_norm = None
    if "blocks.0.attn.q_norm.weight" in state_dict:
        # PixArt-Σ's optional qk-norm: one LayerNorm(hidden) across heads, eps 1e-5, self-attention only.
        qk_norm = "layer_norm_across_heads"
    return dict(
        sample_size=sample_size,
        patch_size=patch,
        in_channels=in_channels,
        out_channels=out_channels,
        num_layers=_num_blocks(state_dict),
        num_attention_heads=num_heads,
        attention_head_dim=hidden // num_heads,
        mlp_ratio=need(state_dict, "blocks.0.mlp.fc1.weight", what).shape[0] / hidden,
        caption_channels=need(state_dict, "y_embedder.y_proj.fc1.weight", what).shape[1],
        interpolation_scale=float(interpolation_scale),
        use_additional_conditions="csize_embedder.mlp.0.weight" in state_dict,
        qk_norm=qk_norm,
    )


def convert_pixart_original(
    source: str | Path | Mapping[str, torch.Tensor],
    image_size: int | None = None,
    version: Version | None = None,
    num_heads: int | None = None,
    interpolation_scale: float | None = None,
    ema: bool = True,
) -> TextDiTModel:
    """Official PixArt-α/Σ checkpoint (path or state dict) -> ``TextDiTModel`` with every weight checked in."""
    state_dict = load_checkpoint(source, ema=ema) if isinstance(source, (str, Path)) else dict(source)
    converted = pixart_original_to_diffusers(state_dict)
    cfg = pixart_original_config(state_dict, image_size, version, num_heads, interpolation_scale)
    model = TextDiTModel(**cfg)
    load_strict(model, converted, "PixArt checkpoint")
    return model.eval()
