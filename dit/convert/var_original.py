"""Official VAR checkpoints -> our ``VARVQVAE`` + ``VARTransformer`` (and a ready ``VARPipeline`` directory).

``vae_ch160v4096z32.pth`` and ``var_d{16,20,24,30,36}.pth`` (huggingface.co/FoundationVision/var) are bare
state dicts of FoundationVision/VAR's ``VQVAE`` and ``VAR``. They are read only through
``dit.convert.safe_load`` (format sniffed from the bytes, pickles with ``weights_only=True``), every source key
must be used or deliberately dropped, and every parameter of our models must be filled (``KeyMapper`` +
``load_strict``).

Renames (ours on the right):

* VQ-VAE CNN, LDM/taming layout -> diffusers ``Encoder``/``Decoder``: ``down.{i}.block.{j}`` ->
  ``down_blocks.{i}.resnets.{j}`` (``nin_shortcut`` -> ``conv_shortcut``), ``down.{i}.attn.{j}.{norm,qkv,proj_out}``
  -> ``attentions.{j}.{group_norm, to_q/to_k/to_v, to_out.0}`` (the fused 1x1 qkv conv is split and its 1x1
  kernels become Linear weights), ``down.{i}.downsample`` -> ``downsamplers.0``, ``mid.block_{1,2}`` /
  ``mid.attn_1`` -> ``mid_block.resnets.{0,1}`` / ``mid_block.attentions.0``, ``norm_out`` -> ``conv_norm_out``;
  the decoder's ``up.{i}`` is diffusers' ``up_blocks.{n-1-i}`` (diffusers lists them coarse to fine).
* quantiser: ``quant_resi.qresi_ls.{k}`` / ``quant_resi.qresi`` / ``quant_resi.{k}`` (partially / fully /
  not shared phi) -> ``phi.{k}``; ``ema_vocab_hit_SV`` -> ``ema_vocab_hit``.
* transformer: ``class_emb`` -> ``class_embedder.embedding_table``, ``pos_1LC`` -> ``pos_embed``, ``lvl_embed`` ->
  ``level_embed``, ``attn.mat_qkv`` -> ``attn.qkv``, ``attn.scale_mul_1H11`` -> ``attn.scale_mul``, ``ffn.fc{1,2}``
  -> ``ff.net.{0.proj,2}``, ``ada_lin.1`` -> ``adaln_modulation.linear``, ``ada_gss`` (1,1,6,C) ->
  ``scale_shift_table`` (6,C), ``shared_ada_lin.1`` -> ``shared_adaln.linear``, ``head_nm.ada_lin.1`` ->
  ``head_adaln.linear``. The buffers ``lvl_1L``, ``attn_bias_for_masking`` and ``attn.zero_k_bias`` are functions
  of the config: they are checked (and give the patch-number schedule) and dropped.

Command line::

    python -m dit.convert.var_original --vae vae_ch160v4096z32.pth --var var_d16.pth OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..models.var import VAR_DEPTHS, VARTransformer, block_causal_mask, level_ids
from ..models.var_vqvae import PATCH_NUMS, VARVQVAE
from .common import KeyMapper, KeyMismatchError, load_strict, need, sha256_of
from .safe_load import load_checkpoint


def _indices(keys: Any, pattern: str) -> list[int]:
    found = sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})
    if found and found != list(range(len(found))):
        raise KeyMismatchError(f"indices matching {pattern!r} are not contiguous: {found}")
    return found


def _state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return load_checkpoint(source) if isinstance(source, (str, Path)) else dict(source)


# ---------------------------------------------------------------------------------------------- VQ-VAE


def vae_original_config(
    state_dict: Mapping[str, torch.Tensor],
    patch_nums: Sequence[int] | None = None,
    quant_resi: float = 0.5,
    norm_num_groups: int = 32,
) -> dict[str, Any]:
    """Infer the ``VARVQVAE`` config of an official VQ-VAE state dict from its shapes.

    Not stored in the file, so taken from arguments: the phi mixing ratio (0.5 in the release), the GroupNorm
    groups (32) and the patch-number schedule (the 256 px one unless given; the file only says how many
    scales it tracked usage for).
    """
    what = "VAR VQ-VAE checkpoint"
    sd = state_dict
    levels = _indices(sd, r"encoder\.down\.(\d+)\.")
    if not levels:
        need(sd, "encoder.down.0.block.0.conv1.weight", what)
    channels = [int(need(sd, f"encoder.down.{i}.block.0.conv1.weight", what).shape[0]) for i in levels]
    conv_in = int(need(sd, "encoder.conv_in.weight", what).shape[0])
    if conv_in != channels[0]:
        raise KeyMismatchError(f"{what}: conv_in has {conv_in} channels but the first level {channels[0]}")
    layers = len(_indices(sd, r"encoder\.down\.0\.block\.(\d+)\."))
    embedding = need(sd, "quantize.embedding.weight", what)
    quant_conv = need(sd, "quant_conv.weight", what)
    if "quantize.quant_resi.qresi_ls.0.weight" in sd:
        share, counts = len(_indices(sd, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.")), 0
    elif "quantize.quant_resi.qresi.weight" in sd:
        share, counts = 1, 0
    elif "quantize.quant_resi.0.weight" in sd:
        share, counts = 0, len(_indices(sd, r"quantize\.quant_resi\.(\d+)\."))
    else:  # quant_resi = 0: phi is the identity
        share, counts, quant_resi = 4, 0, 0.0
    schedule = tuple(patch_nums) if patch_nums is not None else PATCH_NUMS[256]
    if share == 0 and counts == len(schedule):
        counts = 0
    hits = sd.get("quantize.ema_vocab_hit_SV")
    if hits is not None and patch_nums is None and hits.shape[0] != len(schedule):
        raise ValueError(
            f"{what}: it tracked code usage over {hits.shape[0]} scales, not the {len(schedule)} of the 256 px "
            "schedule; pass patch_nums (or --resolution) for the schedule it was trained with"
        )
    return dict(
        block_out_channels=tuple(channels),
        layers_per_block=layers,
        latent_channels=int(embedding.shape[1]),
        vocab_size=int(embedding.shape[0]),
        norm_num_groups=norm_num_groups,
        using_sa=f"encoder.down.{levels[-1]}.attn.0.qkv.weight" in sd,
        using_mid_sa="encoder.mid.attn_1.qkv.weight" in sd,
        quant_conv_ks=int(quant_conv.shape[-1]),
        quant_resi=quant_resi,
        share_quant_resi=share,
        default_qresi_counts=counts,
        patch_nums=schedule,
    )


def _move_attn(m: KeyMapper, src: str, dst: str) -> None:
    """LDM ``AttnBlock`` (1x1 convs, fused qkv) -> diffusers ``Attention`` (Linear q, k, v, out)."""
    m.move(f"{src}.norm.weight", f"{dst}.group_norm.weight")
    m.move(f"{src}.norm.bias", f"{dst}.group_norm.bias")
    w, b = m.take(f"{src}.qkv.weight"), m.take(f"{src}.qkv.bias")
    if w is not None and b is not None:
        for name, wp, bp in zip(("to_q", "to_k", "to_v"), w.chunk(3, 0), b.chunk(3, 0)):
            m.out[f"{dst}.{name}.weight"] = wp.reshape(wp.shape[0], wp.shape[1]).clone()
            m.out[f"{dst}.{name}.bias"] = bp.clone()
    w = m.take(f"{src}.proj_out.weight")
    if w is not None:
        m.out[f"{dst}.to_out.0.weight"] = w.reshape(w.shape[0], w.shape[1]).clone()
    m.move(f"{src}.proj_out.bias", f"{dst}.to_out.0.bias")


def _move_resnet(m: KeyMapper, src: str, dst: str) -> None:
    for name in ("norm1", "conv1", "norm2", "conv2"):
        m.move_linear(f"{src}.{name}", f"{dst}.{name}")
    if m.has(f"{src}.nin_shortcut.weight"):
        m.move_linear(f"{src}.nin_shortcut", f"{dst}.conv_shortcut")


def vae_original_to_ours(state_dict: Mapping[str, torch.Tensor], num_scales: int) -> dict[str, torch.Tensor]:
    """Rename an official VQ-VAE state dict to ``VARVQVAE`` keys (see the module docstring)."""
    m = KeyMapper(state_dict, "VAR VQ-VAE checkpoint")
    levels = _indices(state_dict, r"encoder\.down\.(\d+)\.")
    n = len(levels)
    for side in ("encoder", "decoder"):
        m.move_linear(f"{side}.conv_in", f"{side}.conv_in")
        _move_resnet(m, f"{side}.mid.block_1", f"{side}.mid_block.resnets.0")
        _move_resnet(m, f"{side}.mid.block_2", f"{side}.mid_block.resnets.1")
        if m.has(f"{side}.mid.attn_1.qkv.weight"):
            _move_attn(m, f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0")
        m.move_linear(f"{side}.norm_out", f"{side}.conv_norm_out")
        m.move_linear(f"{side}.conv_out", f"{side}.conv_out")
    for i in levels:
        src, dst = f"encoder.down.{i}", f"encoder.down_blocks.{i}"
        for j in _indices(state_dict, rf"{re.escape(src)}\.block\.(\d+)\."):
            _move_resnet(m, f"{src}.block.{j}", f"{dst}.resnets.{j}")
        for j in _indices(state_dict, rf"{re.escape(src)}\.attn\.(\d+)\."):
            _move_attn(m, f"{src}.attn.{j}", f"{dst}.attentions.{j}")
        if i != n - 1:
            m.move_linear(f"{src}.downsample.conv", f"{dst}.downsamplers.0.conv")
        src, dst = f"decoder.up.{i}", f"decoder.up_blocks.{n - 1 - i}"
        for j in _indices(state_dict, rf"{re.escape(src)}\.block\.(\d+)\."):
            _move_resnet(m, f"{src}.block.{j}", f"{dst}.resnets.{j}")
        for j in _indices(state_dict, rf"{re.escape(src)}\.attn\.(\d+)\."):
            _move_attn(m, f"{src}.attn.{j}", f"{dst}.attentions.{j}")
        if i != 0:
            m.move_linear(f"{src}.upsample.conv", f"{dst}.upsamplers.0.conv")
    m.move_linear("quant_conv", "quant_conv")
    m.move_linear("post_quant_conv", "post_quant_conv")
    m.move("quantize.embedding.weight", "quantize.embedding.weight")
    for pattern, prefix in (
        (r"quantize\.quant_resi\.qresi_ls\.(\d+)\.", "quantize.quant_resi.qresi_ls.{}"),
        (r"quantize\.quant_resi\.(\d+)\.", "quantize.quant_resi.{}"),
    ):
        for k in _indices(state_dict, pattern):
            m.move_linear(prefix.format(k), f"quantize.phi.{k}")
    if m.has("quantize.quant_resi.qresi.weight"):
        m.move_linear("quantize.quant_resi.qresi", "quantize.phi.0")
    hits = m.drop("quantize.ema_vocab_hit_SV")
    vocab = state_dict["quantize.embedding.weight"].shape[0]
    if hits is not None and tuple(hits.shape) == (num_scales, vocab):
        m.out["quantize.ema_vocab_hit"] = hits.float().clone()
        m.out["quantize.hit_updates"] = torch.tensor(100, dtype=torch.long)  # a trained model: steady-state EMA
    else:  # the official loader also replaces hit counts of another scale count with fresh ones
        m.out["quantize.ema_vocab_hit"] = torch.zeros(num_scales, vocab)
        m.out["quantize.hit_updates"] = torch.tensor(0, dtype=torch.long)
    return m.finish()


def convert_var_vae(
    source: str | Path | Mapping[str, torch.Tensor],
    patch_nums: Sequence[int] | None = None,
    quant_resi: float = 0.5,
    norm_num_groups: int = 32,
) -> VARVQVAE:
    """Official ``vae_*.pth`` (path or state dict) -> ``VARVQVAE`` with every weight checked in."""
    sd = _state_dict(source)
    cfg = vae_original_config(sd, patch_nums, quant_resi, norm_num_groups)
    model = VARVQVAE(**cfg)
    load_strict(model, vae_original_to_ours(sd, len(cfg["patch_nums"])), "VAR VQ-VAE checkpoint")
    return model.eval()


# ---------------------------------------------------------------------------------------------- transformer


def patch_nums_from_levels(lvl_1L: torch.Tensor) -> tuple[int, ...]:
    """The patch-number schedule encoded by VAR's ``lvl_1L`` buffer (level of every token)."""
    counts = torch.bincount(lvl_1L.reshape(-1).long()).tolist()
    sides = [math.isqrt(c) for c in counts]
    if any(s * s != c for s, c in zip(sides, counts)):
        raise KeyMismatchError(f"lvl_1L has per-level token counts {counts}, which are not all squares")
    return tuple(sides)


def var_original_config(
    state_dict: Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    patch_nums: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Infer the ``VARTransformer`` config of an official ``var_d*.pth`` from its shapes and buffers."""
    what = "VAR transformer checkpoint"
    sd = state_dict
    word = need(sd, "word_embed.weight", what)
    embed_dim, latent_channels = int(word.shape[0]), int(word.shape[1])
    depth = len(_indices(sd, r"blocks\.(\d+)\."))
    if depth == 0:
        need(sd, "blocks.0.attn.mat_qkv.weight", what)
    l2 = "blocks.0.attn.scale_mul_1H11" in sd
    if l2:
        heads = int(sd["blocks.0.attn.scale_mul_1H11"].shape[1])
        if num_heads is not None and num_heads != heads:
            raise ValueError(f"{what}: its per-head scales say {heads} heads, not num_heads={num_heads}")
    else:
        heads = num_heads if num_heads is not None else embed_dim // 64  # VAR: head dim 64
    if "lvl_1L" in sd:
        schedule = patch_nums_from_levels(sd["lvl_1L"])
        if patch_nums is not None and tuple(patch_nums) != schedule:
            raise ValueError(f"{what}: it was built for patch_nums {schedule}, not {tuple(patch_nums)}")
    elif patch_nums is not None:
        schedule = tuple(patch_nums)
    else:
        raise ValueError(f"{what}: no lvl_1L buffer to read the patch-number schedule from; pass patch_nums")
    seq_len = int(need(sd, "pos_1LC", what).shape[1])
    if seq_len != sum(p * p for p in schedule):
        raise KeyMismatchError(f"{what}: pos_1LC has {seq_len} positions, the schedule {schedule} has a different L")
    hidden = int(need(sd, "blocks.0.ffn.fc1.weight", what).shape[0])
    return dict(
        vocab_size=int(need(sd, "head.weight", what).shape[0]),
        latent_channels=latent_channels,
        num_classes=int(need(sd, "class_emb.weight", what).shape[0]) - 1,
        depth=depth,
        embed_dim=embed_dim,
        num_heads=heads,
        mlp_ratio=hidden / embed_dim,
        shared_aln="shared_ada_lin.1.weight" in sd,
        attn_l2_norm=l2,
        drop_path_rate=0.1 * depth / 24 if depth in VAR_DEPTHS else 0.0,  # training only; not in the file
        patch_nums=schedule,
    )


def var_original_to_ours(state_dict: Mapping[str, torch.Tensor], patch_nums: Sequence[int]) -> dict[str, torch.Tensor]:
    """Rename an official VAR state dict to ``VARTransformer`` keys, checking the dropped buffers."""
    what = "VAR transformer checkpoint"
    m = KeyMapper(state_dict, what)
    m.move_linear("word_embed", "word_embed")
    m.move("class_emb.weight", "class_embedder.embedding_table.weight")
    m.move("pos_start", "pos_start")
    m.move("pos_1LC", "pos_embed")
    m.move("lvl_embed.weight", "level_embed.weight")
    if m.has("shared_ada_lin.1.weight"):
        m.move_linear("shared_ada_lin.1", "shared_adaln.linear")
    for i in _indices(state_dict, r"blocks\.(\d+)\."):
        src, dst = f"blocks.{i}", f"blocks.{i}"
        m.move(f"{src}.attn.mat_qkv.weight", f"{dst}.attn.qkv.weight")
        m.move(f"{src}.attn.q_bias", f"{dst}.attn.q_bias")
        m.move(f"{src}.attn.v_bias", f"{dst}.attn.v_bias")
        zero_k = m.drop(f"{src}.attn.zero_k_bias")
        if zero_k is not None and zero_k.abs().max() != 0:
            raise KeyMismatchError(f"{what}: {src}.attn.zero_k_bias is not zero; this is not VAR's attention")
        if m.has(f"{src}.attn.scale_mul_1H11"):
            m.move(f"{src}.attn.scale_mul_1H11", f"{dst}.attn.scale_mul")
        m.move_linear(f"{src}.attn.proj", f"{dst}.attn.proj")
        m.move_linear(f"{src}.ffn.fc1", f"{dst}.ff.net.0.proj")
        m.move_linear(f"{src}.ffn.fc2", f"{dst}.ff.net.2")
        if m.has(f"{src}.ada_gss"):
            gss = m.take(f"{src}.ada_gss")
            m.out[f"{dst}.scale_shift_table"] = gss.reshape(6, -1).clone()
        else:
            m.move_linear(f"{src}.ada_lin.1", f"{dst}.adaln_modulation.linear")
    m.move_linear("head_nm.ada_lin.1", "head_adaln.linear")
    m.move_linear("head", "head")
    lvl = m.drop("lvl_1L")
    if lvl is not None and not torch.equal(lvl.reshape(-1).long(), level_ids(patch_nums)):
        raise KeyMismatchError(f"{what}: lvl_1L does not match patch_nums {tuple(patch_nums)}")
    bias = m.drop("attn_bias_for_masking")
    if bias is not None and not torch.equal(bias.float(), block_causal_mask(patch_nums)):
        raise KeyMismatchError(f"{what}: attn_bias_for_masking is not VAR's block-causal mask for {tuple(patch_nums)}")
    return m.finish()


def convert_var_transformer(
    source: str | Path | Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    patch_nums: Sequence[int] | None = None,
) -> VARTransformer:
    """Official ``var_d*.pth`` (path or state dict) -> ``VARTransformer`` with every weight checked in."""
    sd = _state_dict(source)
    cfg = var_original_config(sd, num_heads, patch_nums)
    model = VARTransformer(**cfg)
    load_strict(model, var_original_to_ours(sd, cfg["patch_nums"]), "VAR transformer checkpoint")
    return model.eval()


def check_pair(vae: VARVQVAE, transformer: VARTransformer) -> None:
    """A VQ-VAE and a transformer belong together: same codebook size, channels and schedule."""
    problems = []
    if vae.config.vocab_size != transformer.config.vocab_size:
        problems.append(f"vocab {vae.config.vocab_size} vs {transformer.config.vocab_size}")
    if vae.config.latent_channels != transformer.config.latent_channels:
        problems.append(f"latent channels {vae.config.latent_channels} vs {transformer.config.latent_channels}")
    if tuple(vae.config.patch_nums) != tuple(transformer.config.patch_nums):
        problems.append(f"patch_nums {tuple(vae.config.patch_nums)} vs {tuple(transformer.config.patch_nums)}")
    if problems:
        raise ValueError("the VQ-VAE and the transformer do not fit together: " + "; ".join(problems))


def convert_var_pipeline(
    vae_source: str | Path | Mapping[str, torch.Tensor],
    var_source: str | Path | Mapping[str, torch.Tensor],
    num_heads: int | None = None,
    id2label: dict[str, str] | None = None,
) -> Any:
    """Both official files -> a ``VARPipeline`` (the VQ-VAE takes the transformer's schedule)."""
    from pipelines.var import VARPipeline

    transformer = convert_var_transformer(var_source, num_heads)
    vae = convert_var_vae(vae_source, transformer.config.patch_nums)
    check_pair(vae, transformer)
    return VARPipeline(transformer=transformer, vae=vae, id2label=id2label)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dit.convert.var_original",
        description="Convert the official VAR VQ-VAE + transformer .pth files into a DiT Studio VARPipeline directory "
        "(loaded only with torch.load(weights_only=True)).",
    )
    parser.add_argument("--vae", type=Path, required=True, help="vae_ch160v4096z32.pth")
    parser.add_argument("--var", type=Path, required=True, help="var_d16.pth / var_d20 / ... / var_d36.pth")
    parser.add_argument("out_dir", type=Path, help="output pipeline directory (model_index.json, vae/, transformer/)")
    parser.add_argument("--num-heads", type=int, help="only for models trained without attn_l2_norm")
    parser.add_argument("--id2label", type=Path, help="JSON file {id: 'name, synonym'} for class names in the UI")
    args = parser.parse_args(argv)
    try:
        id2label = json.loads(args.id2label.read_text(encoding="utf-8")) if args.id2label else None
        pipe = convert_var_pipeline(args.vae, args.var, args.num_heads, id2label)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    pipe.save_pretrained(args.out_dir, safe_serialization=True)
    record = {
        "kind": "var",
        "vae": {"source": args.vae.name, "sha256": sha256_of(args.vae)},
        "transformer": {"source": args.var.name, "sha256": sha256_of(args.var)},
    }
    (Path(args.out_dir) / "conversion.json").write_text(json.dumps(record, indent=2) + "\n")
    params = sum(p.numel() for p in pipe.transformer.parameters())
    print(f"Wrote VARPipeline ({params / 1e6:.1f}M transformer parameters) to {args.out_dir}")
    return 0


__all__ = [
    "check_pair",
    "convert_var_pipeline",
    "convert_var_transformer",
    "convert_var_vae",
    "patch_nums_from_levels",
    "vae_original_config",
    "vae_original_to_ours",
    "var_original_config",
    "var_original_to_ours",
]

if __name__ == "__main__":
    sys.exit(main())
