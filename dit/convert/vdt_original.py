"""Official VDT checkpoints (``RERV/VDT``, e.g. the Sky Time-Lapse unified model) -> our ``VDTModel``.

Official layout (``models.py``; a flat DiT-style state dict, possibly wrapped as ``{"model": ...}`` or
``{"ema": ...}``): ``x_embedder.proj``, fixed ``pos_embed`` [1, N, D] and ``time_embed`` [1, T, D] Parameters,
``t_embedder.mlp.{0,2}``, ``y_embedder.embedding_table`` [1001, D], and per block ``attn.qkv`` (fused),
``attn.proj``, ``mlp.fc{1,2}``, ``adaLN_modulation.1``, ``temporal_norm1`` (affine LayerNorm), ``temporal_attn.qkv``,
``temporal_attn.proj`` and ``temporal_fc``; then ``final_layer.{linear,adaLN_modulation.1}``.

What changes on the way (the math does not):

* fused qkv are split into diffusers' ``to_q/to_k/to_v``;
* ``pos_embed`` and ``time_embed`` are dropped after checking they are the fixed sin-cos tables our model
  computes (a mismatch is an error: the converted model could not reproduce the original);
* the original always embeds label 0 (VDT has no classes), so ``c = t_emb + y_table[0]``: row 0 is folded into
  the timestep MLP's last bias. Row 1000 is the label-*dropout* row, drawn only while training; it is dropped.

Unlike the original's ``load_checkpoint`` (``strict=False``, silently dropping shape mismatches and
interpolating ``pos_embed``), every key must be used and every parameter filled; failures name the keys.

Command line: ``python -m dit.convert.vdt_original SRC OUT_DIR [--config VDT-L/2]``.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..embeddings import sincos_2d
from ..models.vdt import VDT_SIZES, VDTModel, vdt_config
from .common import KeyMapper, KeyMismatchError, load_strict, need, save_transformer, sha256_of
from .dit_original import _num_blocks
from .safe_load import CheckpointFormatError, UnsafeCheckpointError, load_checkpoint, sniff_format

WHAT = "VDT checkpoint"
_HEADS_BY_HIDDEN = {hidden: heads for _, hidden, heads in VDT_SIZES.values()}


def vdt_original_config(
    state_dict: Mapping[str, torch.Tensor], config_name: str | None = None, num_heads: int | None = None
) -> dict[str, Any]:
    """Infer the ``VDTModel`` config of an official VDT state dict from its tensor shapes.

    Frames come from ``time_embed``, the latent size from ``pos_embed``; heads are not in the shapes, so they
    come from ``config_name`` (``VDT-L/2``), ``num_heads``, or the paper's table for the width.
    """
    proj = need(state_dict, "x_embedder.proj.weight", WHAT)
    hidden, in_channels, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    depth = _num_blocks(state_dict, r"blocks\.(\d+)\.attn\.qkv\.weight$")
    if depth == 0:
        raise KeyMismatchError(f"{WHAT}: no blocks.N.attn.qkv weights; this is not an official VDT state dict")
    if "blocks.0.temporal_attn.qkv.weight" not in state_dict:
        raise KeyMismatchError(
            f"{WHAT}: blocks.0.temporal_attn is missing; image-mode VDT (mode='image') has no temporal attention "
            "and is a plain DiT: convert it with `python -m dit.convert dit`"
        )
    out_features = need(state_dict, "final_layer.linear.weight", WHAT).shape[0]
    out_channels, rem = divmod(out_features, patch * patch)
    if rem or out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(f"{WHAT}: final_layer.linear has {out_features} outputs, not patch^2 * (1 or 2) * channels")
    tokens = need(state_dict, "pos_embed", WHAT).shape[-2]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ValueError(f"{WHAT}: pos_embed has {tokens} tokens, not a square grid")
    frames = need(state_dict, "time_embed", WHAT).shape[-2]
    if config_name is not None:
        named = vdt_config(config_name)
        named_hidden = named["num_attention_heads"] * named["attention_head_dim"]
        wrong = [
            f"{k}: weights {have}, {config_name} {want}"
            for k, have, want in (
                ("depth", depth, named["num_layers"]),
                ("hidden size", hidden, named_hidden),
                ("patch size", patch, named["patch_size"]),
            )
            if have != want
        ]
        if wrong:
            raise ValueError(f"{WHAT} does not match config {config_name}: " + "; ".join(wrong))
        heads = named["num_attention_heads"]
        if num_heads is not None and num_heads != heads:
            raise ValueError(f"num_heads={num_heads} contradicts {config_name} ({heads} heads)")
    elif num_heads is not None:
        heads = num_heads
    elif hidden in _HEADS_BY_HIDDEN:
        heads = _HEADS_BY_HIDDEN[hidden]
    else:
        raise ValueError(f"{WHAT}: hidden size {hidden} is not VDT-S or VDT-L; pass num_heads (--num-heads)")
    if hidden % heads:
        raise ValueError(f"{WHAT}: hidden size {hidden} is not divisible by {heads} heads")
    return dict(
        sample_size=side * patch,
        num_frames=frames,
        patch_size=patch,
        in_channels=in_channels,
        num_layers=depth,
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        mlp_ratio=need(state_dict, "blocks.0.mlp.fc1.weight", WHAT).shape[0] / hidden,
        learn_sigma=out_channels == 2 * in_channels,
    )


def vdt_original_to_ours(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an official VDT state dict to ``VDTModel`` keys (every source key must be used)."""
    m = KeyMapper(state_dict, WHAT)
    m.move_linear("x_embedder.proj", "pos_embed.proj")
    m.drop("pos_embed")
    m.drop("time_embed")
    m.move_linear("t_embedder.mlp.0", "timestep_embedder.linear_1")
    m.move_linear("t_embedder.mlp.2", "timestep_embedder.linear_2")
    table = m.take("y_embedder.embedding_table.weight")
    bias = m.out.get("timestep_embedder.linear_2.bias")
    if table is not None and bias is not None:
        # c = t_emb + y_emb(0): fold the constant into the last bias of the timestep MLP.
        m.out["timestep_embedder.linear_2.bias"] = (bias.double() + table[0].double()).to(bias.dtype)
    for i in range(_num_blocks(state_dict, r"blocks\.(\d+)\.")):
        src, dst = f"blocks.{i}", f"transformer_blocks.{i}"
        m.split_linear(f"{src}.attn.qkv", [f"{dst}.attn1.to_q", f"{dst}.attn1.to_k", f"{dst}.attn1.to_v"])
        m.move_linear(f"{src}.attn.proj", f"{dst}.attn1.to_out.0")
        m.move_linear(f"{src}.mlp.fc1", f"{dst}.ff.net.0.proj")
        m.move_linear(f"{src}.mlp.fc2", f"{dst}.ff.net.2")
        m.move_linear(f"{src}.adaLN_modulation.1", f"{dst}.adaln_modulation.linear")
        m.move_linear(f"{src}.temporal_norm1", f"{dst}.temporal_norm")
        m.split_linear(
            f"{src}.temporal_attn.qkv",
            [f"{dst}.temporal_attn.to_q", f"{dst}.temporal_attn.to_k", f"{dst}.temporal_attn.to_v"],
        )
        m.move_linear(f"{src}.temporal_attn.proj", f"{dst}.temporal_attn.to_out.0")
        m.move_linear(f"{src}.temporal_fc", f"{dst}.temporal_fc")
    m.move_linear("final_layer.linear", "final_layer.linear")
    m.move_linear("final_layer.adaLN_modulation.1", "final_layer.adaln_modulation.linear")
    return m.finish()


def check_fixed_tables(state_dict: Mapping[str, torch.Tensor], model: VDTModel, atol: float = 1e-4) -> None:
    """The file's ``pos_embed``/``time_embed`` must be the sin-cos tables the model computes."""
    dim = model.time_embed.shape[-1]
    grid = model.config.sample_size // model.config.patch_size
    expected = {
        "pos_embed": sincos_2d(dim, (grid, grid)),
        "time_embed": VDTModel.time_table(model.config.num_frames, dim),
    }
    for key, ours in expected.items():
        stored = state_dict[key].float().reshape(-1, dim)
        if stored.shape != ours.shape or not torch.allclose(stored, ours, atol=atol):
            diff = (stored - ours).abs().max().item() if stored.shape == ours.shape else float("nan")
            raise ValueError(
                f"{WHAT}: {key} is not the fixed sin-cos table (max difference {diff:.3g}); VDT never trains it, "
                "so this file was modified and the converted model could not reproduce it"
            )


def convert_vdt_original(
    source: str | Path | Mapping[str, torch.Tensor],
    config_name: str | None = None,
    num_heads: int | None = None,
    ema: bool = True,
) -> VDTModel:
    """Official VDT checkpoint (path or state dict) -> ``VDTModel`` with every weight checked in."""
    state_dict = load_checkpoint(source, ema=ema) if isinstance(source, (str, Path)) else dict(source)
    cfg = vdt_original_config(state_dict, config_name, num_heads)
    model = VDTModel(**cfg)
    load_strict(model, vdt_original_to_ours(state_dict), WHAT)
    check_fixed_tables(state_dict, model)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dit.convert.vdt_original",
        description="Convert an official VDT .pt (RERV/VDT) into a DiT Studio VDTModel (OUT_DIR/transformer/).",
        epilog=(
            "VDT works on SD-VAE latents (scaling 0.18215): pair the transformer with the VAE "
            "'stabilityai/sd-vae-ft-ema' (or sd-vae-ft-mse) and a DDPM linear-beta scheduler "
            "(1000 steps, 1e-4..0.02) in a VideoPipeline."
        ),
    )
    parser.add_argument("src", type=Path, help="checkpoint file (.pt/.pth/.safetensors)")
    parser.add_argument("out_dir", type=Path, help="output folder; the model goes to OUT_DIR/transformer/")
    parser.add_argument("--config", dest="config_name", help="VDT-S/2 or VDT-L/2 (checked against the weights)")
    parser.add_argument("--num-heads", type=int, help="attention heads, if the width is not VDT-S/L")
    parser.add_argument("--non-ema", action="store_true", help="use the raw weights where a file has EMA and raw")
    args = parser.parse_args(argv)
    try:
        model = convert_vdt_original(args.src, args.config_name, args.num_heads, ema=not args.non_ema)
    except (CheckpointFormatError, UnsafeCheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = {"kind": "vdt", "source": args.src.name, "source_format": sniff_format(args.src)}
    record["source_sha256"] = sha256_of(args.src)
    target = save_transformer(model, args.out_dir, record)
    print(f"Wrote VDTModel ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) to {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
