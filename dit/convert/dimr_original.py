"""Official DiMR checkpoints (``QHL067/DiMR`` ``DiMR-{XL,G}_2R_800epochs.pth``) -> our ``DiMRModel``.

The released files are bare ``MRModel`` state dicts (``eval.py`` does ``nnet.load_state_dict(torch.load(path))``).
Key layout, checked against the module tree of qihao067/DiMR@fa141ae (``libs/core/blocks.py``; ``Linear`` and
``Embedding`` there are plain ``nn.Linear``/``nn.Embedding`` from ``common_layers``, ``LayerNorm``/``TDRMSNorm`` the
time-dependent ones from ``sigmoid/module.py``), for stage ``k`` and block ``i``::

    stages.k.input_layer.1.{weight,bias}                      Conv2d (index 0 is EvenDownInterpolate, 2 ChannelLast)
    stages.k.input_layer.3.position_embeddings.weight         learned positions, max_h * max_w rows
    stages.0.class_embeds.weight                              num_classes + 1 rows (the last = null class)
    stages.k.blocks.i.block1.norm.scale.{P}                   TDRMSNorm (norm_type TDRMSN, the released models)
    stages.k.blocks.i.block1.norm.{weight,bias}.{P}           TD LayerNorm instead (norm_type LN)
    stages.k.blocks.i.block1.query_key_value.weight           transformer: fused q|k|v, no bias
    stages.k.blocks.i.block1.condition_key_value.weight       transformer, text models only: fused k|v, no bias
    stages.k.blocks.i.block1.dense.{weight,bias}              transformer: attention output
    stages.k.blocks.i.block1.1.{weight,bias}                  ConvNeXt: depthwise conv (Sequential index 1)
    stages.k.blocks.i.block2.norm.*                           MLP norm, as block1.norm
    stages.k.blocks.i.block2.w{0,1,2}.{weight,bias}           w2(GELU(w0 x) * w1 x)
    stages.k.skip_denses.j.{weight,bias}                      U-ViT long-skip Linear(2D, D)
    stages.k.upsample.0.{weight,bias}.{P}                     TD LayerNorm of the concatenated low-res features
    stages.k.upsample.1.kernel.{weight,bias}                  PixelShuffleUpsample's Linear
    stages.k.upsample.2.{weight,bias}.{P}                     TD LayerNorm after the shuffle
    stages.k.output_layer.0.{weight,bias}.{P}                 TD LayerNorm of the output head
    stages.k.output_layer.2.{weight,bias}                     output Conv2d (index 1 is ChannelFirst)

with ``{P}`` = ``param0, param1, nodecay_weight, nodecay_bias``. (The reference notes guessed the same names from
the source without opening a file; they were confirmed by instantiating the official ``MRModel`` and listing
``state_dict()``.) The mapping to ours is by name, except that q|k|v and k|v are split and ``[w1; w0]`` becomes
diffusers ``GEGLU``'s fused ``proj`` (value half first, gate half second).

``python -m dit.convert.dimr_original SRC OUT_DIR [--config DiMR-XL/2R]`` writes ``OUT_DIR/transformer``. A
DiMR pipeline also needs the SD VAE (``stabilityai/sd-vae-ft-ema``, scaling 0.18215) and the SD scaled-linear
scheduler (``beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"``); the official CFG scale 0.4 in
``ε_c + s(ε_c − ε_u)`` is ``guidance_scale=1.4`` in our pipelines.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..models.dimr import DIMR_SIZES, DiMRModel, dimr_config
from .common import KeyMapper, KeyMismatchError, load_strict, need, save_transformer, sha256_of
from .safe_load import load_checkpoint, sniff_format

TD_PARAMS = ("param0", "param1", "nodecay_weight", "nodecay_bias")
OFFICIAL_HEADS = 16  # both released configs


def _stage_ids(state_dict: Mapping[str, torch.Tensor]) -> list[int]:
    ids = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"stages\.(\d+)\.", k))})
    if not ids or ids != list(range(len(ids))):
        raise KeyMismatchError(
            f"DiMR checkpoint: expected stages.0..K keys, found stage indices {ids} "
            f"(first keys: {list(state_dict)[:5]})"
        )
    return ids


def _count(state_dict: Mapping[str, torch.Tensor], pattern: str) -> int:
    idx = {int(m.group(1)) for k in state_dict if (m := re.match(pattern, k))}
    if idx and idx != set(range(max(idx) + 1)):
        raise KeyMismatchError(f"DiMR checkpoint: indices of {pattern!r} are not contiguous: {sorted(idx)}")
    return len(idx)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def _norm_type(state_dict: Mapping[str, torch.Tensor], stage: int) -> str:
    base = f"stages.{stage}.blocks.0.block2.norm"
    if f"{base}.scale.param0" in state_dict:
        return "td_rmsnorm"
    if f"{base}.weight.param0" in state_dict:
        return "td_layernorm"
    if f"{base}.scale" in state_dict or f"{base}.linear.weight" in state_dict:
        raise ValueError(
            "DiMR checkpoint uses a time-independent norm (norm_type RMSN or ADARMSN); only the time-dependent "
            "TDRMSN and LN variants (the released ones) are supported"
        )
    raise KeyMismatchError(f"DiMR checkpoint: no block norm under {base}")


def dimr_original_config(
    state_dict: Mapping[str, torch.Tensor], config_name: str | None = None, num_heads: int | None = None
) -> dict[str, Any]:
    """Infer the ``DiMRModel`` config from an official state dict's shapes.

    Everything but the head count is in the shapes; heads come from ``config_name``, ``num_heads``, or the
    released models' 16 (with a warning when the widths are not a released config's).
    """
    what = "DiMR checkpoint"
    stages = _stage_ids(state_dict)
    if len(stages) < 2:
        raise ValueError(f"{what}: {len(stages)} stage(s); DiMR has a transformer stage and >= 1 ConvNeXt stage")
    if "stages.0.blocks.0.block1.query_key_value.weight" not in state_dict:
        raise ValueError(f"{what}: stage 0 is not a transformer stage (no block1.query_key_value)")
    proj0 = need(state_dict, "stages.0.input_layer.1.weight", what)
    width, in_channels = proj0.shape[0], proj0.shape[1]
    if tuple(proj0.shape[2:]) != (2, 2):
        raise ValueError(f"{what}: the transformer input conv is {tuple(proj0.shape[2:])}, DiMR uses 2x2 patches")
    out_w = need(state_dict, "stages.0.output_layer.2.weight", what)
    conv_widths, conv_mlp, conv_layers = [], [], []
    kernel = None
    for k in stages[1:]:
        if f"stages.{k}.blocks.0.block1.1.weight" not in state_dict:
            raise ValueError(f"{what}: stage {k} is not a ConvNeXt stage (no block1.1 depthwise conv)")
        conv_widths.append(need(state_dict, f"stages.{k}.input_layer.1.weight", what).shape[0])
        conv_mlp.append(need(state_dict, f"stages.{k}.blocks.0.block2.w0.weight", what).shape[0])
        conv_layers.append(_count(state_dict, rf"stages\.{k}\.blocks\.(\d+)\."))
        ks = need(state_dict, f"stages.{k}.blocks.0.block1.1.weight", what).shape[-1]
        if kernel not in (None, ks):
            raise ValueError(f"{what}: ConvNeXt stages use different kernel sizes ({kernel}, {ks})")
        kernel = ks
    last = stages[-1]
    rows = need(state_dict, f"stages.{last}.input_layer.3.position_embeddings.weight", what).shape[0]
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f"{what}: the finest stage has {rows} positions, not a square grid")
    cfg: dict[str, Any] = dict(
        sample_size=side,
        in_channels=in_channels,
        out_channels=out_w.shape[0],
        transformer_width=width,
        transformer_mlp_width=need(state_dict, "stages.0.blocks.0.block2.w0.weight", what).shape[0],
        transformer_layers=_count(state_dict, r"stages\.0\.blocks\.(\d+)\."),
        num_attention_heads=OFFICIAL_HEADS,
        conv_widths=conv_widths,
        conv_mlp_widths=conv_mlp,
        conv_layers=conv_layers,
        conv_kernel_size=kernel,
        output_kernel_size=out_w.shape[-1],
        norm_type=_norm_type(state_dict, 0),
    )
    if "stages.0.class_embeds.weight" in state_dict:
        cfg["num_classes"] = state_dict["stages.0.class_embeds.weight"].shape[0] - 1
    else:
        cfg["num_classes"] = None
        cond = need(state_dict, "stages.0.blocks.0.block1.condition_key_value.weight", what)
        cfg["caption_channels"] = cond.shape[1]
        warnings.warn(
            f"{what}: a text-conditional DiMR; the official code never defines its text_conditioning module, so the "
            "converted caption_projection is freshly initialised and must be trained.",
            UserWarning,
            stacklevel=2,
        )
    if config_name is not None:
        named = dimr_config(config_name)
        wrong = [
            f"{key}: weights {cfg[key]}, {config_name} {named[key]}"
            for key in (
                "transformer_width",
                "transformer_mlp_width",
                "transformer_layers",
                "conv_widths",
                "conv_mlp_widths",
                "conv_layers",
            )
            if _plain(cfg[key]) != _plain(named[key])
        ]
        if wrong:
            raise ValueError(f"{what} does not match {config_name}: " + "; ".join(wrong))
        cfg["num_attention_heads"] = named["num_attention_heads"]
    elif num_heads is not None:
        cfg["num_attention_heads"] = num_heads
    elif not any((width, conv_widths) == (t[0], [c[0] for c in convs]) for t, convs in DIMR_SIZES.values()):
        warnings.warn(
            f"{what}: widths {width}/{conv_widths} are not a released config; assuming {OFFICIAL_HEADS} heads. "
            "Pass num_heads (--num-heads) if that is wrong.",
            UserWarning,
            stacklevel=2,
        )
    if cfg["transformer_width"] % cfg["num_attention_heads"]:
        raise ValueError(f"{what}: width {width} is not divisible by {cfg['num_attention_heads']} heads")
    return cfg


def _move_td(m: KeyMapper, src: str, dst: str, names: tuple[str, ...]) -> None:
    for name in names:
        for p in TD_PARAMS:
            m.move(f"{src}.{name}.{p}", f"{dst}.{name}.{p}")


def _move_norm(m: KeyMapper, src: str, dst: str, norm_type: str) -> None:
    _move_td(m, src, dst, ("scale",) if norm_type == "td_rmsnorm" else ("weight", "bias"))


def _split_weight(m: KeyMapper, src: str, dsts: list[str]) -> None:
    """A fused bias-free projection (official q|k|v, k|v) -> equal row blocks, in order."""
    t = m.take(f"{src}.weight")
    if t is None:
        return
    if t.shape[0] % len(dsts):
        raise KeyMismatchError(f"{m.what}: {src}.weight has {t.shape[0]} rows, not divisible into {len(dsts)} parts")
    for dst, part in zip(dsts, t.chunk(len(dsts), dim=0)):
        m.out[f"{dst}.weight"] = part.clone()


def _move_gated_mlp(m: KeyMapper, src: str, dst: str) -> None:
    """``w0`` (gate) and ``w1`` (value) -> GEGLU's ``proj`` = [w1; w0]; ``w2`` -> ``net.2``."""
    for suffix in ("weight", "bias"):
        w0, w1 = m.take(f"{src}.w0.{suffix}"), m.take(f"{src}.w1.{suffix}")
        if w0 is not None and w1 is not None:
            m.out[f"{dst}.net.0.proj.{suffix}"] = torch.cat([w1, w0], dim=0)
    m.move_linear(f"{src}.w2", f"{dst}.net.2")


def dimr_original_to_ours(state_dict: Mapping[str, torch.Tensor], what: str = "DiMR checkpoint") -> dict[str, Any]:
    """Rename an official ``MRModel`` state dict to ``DiMRModel`` keys; every source key must be used."""
    m = KeyMapper(state_dict, what)
    if m.has("stages.0.class_embeds.weight"):
        m.move("stages.0.class_embeds.weight", "class_embedder.embedding_table.weight")
    for k in _stage_ids(state_dict):
        src, dst = f"stages.{k}", f"branches.{k}"
        transformer = k == 0
        norm_type = _norm_type(state_dict, k)
        m.move_linear(f"{src}.input_layer.1", f"{dst}.proj_in")
        m.move(f"{src}.input_layer.3.position_embeddings.weight", f"{dst}.pos_embed.weight")
        if k > 0:
            _move_td(m, f"{src}.upsample.0", f"{dst}.upsample.norm_in", ("weight", "bias"))
            m.move_linear(f"{src}.upsample.1.kernel", f"{dst}.upsample.proj")
            _move_td(m, f"{src}.upsample.2", f"{dst}.upsample.norm_out", ("weight", "bias"))
        for i in range(_count(state_dict, rf"stages\.{k}\.blocks\.(\d+)\.")):
            s, d = f"{src}.blocks.{i}", f"{dst}.blocks.{i}"
            if transformer:
                _move_norm(m, f"{s}.block1.norm", f"{d}.norm1", norm_type)
                _split_weight(
                    m, f"{s}.block1.query_key_value", [f"{d}.attn1.to_q", f"{d}.attn1.to_k", f"{d}.attn1.to_v"]
                )
                m.move_linear(f"{s}.block1.dense", f"{d}.attn1.to_out.0")
                if m.has(f"{s}.block1.condition_key_value.weight"):
                    m.split_linear(
                        f"{s}.block1.condition_key_value", [f"{d}.attn1.add_k_proj", f"{d}.attn1.add_v_proj"]
                    )
            else:
                m.move_linear(f"{s}.block1.1", f"{d}.dwconv")
            _move_norm(m, f"{s}.block2.norm", f"{d}.norm2", norm_type)
            _move_gated_mlp(m, f"{s}.block2", f"{d}.ff")
        for j in range(_count(state_dict, rf"stages\.{k}\.skip_denses\.(\d+)\.")):
            m.move_linear(f"{src}.skip_denses.{j}", f"{dst}.skip_projs.{j}")
        _move_td(m, f"{src}.output_layer.0", f"{dst}.norm_out", ("weight", "bias"))
        m.move_linear(f"{src}.output_layer.2", f"{dst}.proj_out")
    return m.finish()


def _fill_caption_projection(model: DiMRModel, converted: dict[str, torch.Tensor]) -> None:
    if model.caption_projection is not None:
        for name, tensor in model.caption_projection.state_dict().items():
            converted.setdefault(f"caption_projection.{name}", tensor.clone())


def convert_dimr_original(
    source: str | Path | Mapping[str, torch.Tensor],
    config_name: str | None = None,
    num_heads: int | None = None,
    ema: bool = True,
) -> DiMRModel:
    """Official DiMR checkpoint (path or state dict) -> ``DiMRModel`` with every weight checked in."""
    state_dict = load_checkpoint(source, ema=ema) if isinstance(source, (str, Path)) else dict(source)
    cfg = dimr_original_config(state_dict, config_name, num_heads)
    converted = dimr_original_to_ours(state_dict)
    model = DiMRModel(**cfg)
    _fill_caption_projection(model, converted)
    load_strict(model, converted, "DiMR checkpoint")
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dit.convert.dimr_original",
        description="Convert an official DiMR .pth (DiMR-XL_2R / DiMR-G_2R) into a DiT Studio DiMRModel.",
        epilog=(
            "Only OUT_DIR/transformer/ is written. Combine it with the VAE stabilityai/sd-vae-ft-ema (scaling "
            "0.18215) and a DDPM/DPM-Solver scheduler with beta_schedule=scaled_linear, beta_start=0.00085, "
            "beta_end=0.012 in a ClassToImagePipeline; the paper's CFG 0.4 is guidance_scale=1.4."
        ),
    )
    parser.add_argument("src", type=Path, help="checkpoint file (.pth/.pt/.safetensors)")
    parser.add_argument("out_dir", type=Path, help="output folder; the model goes to OUT_DIR/transformer/")
    parser.add_argument("--config", dest="config_name", choices=sorted(DIMR_SIZES), help="check against a config")
    parser.add_argument("--num-heads", type=int, help="attention heads, if not the released 16")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    args = parser.parse_args(argv)
    try:
        model = convert_dimr_original(args.src, args.config_name, args.num_heads)
    except (ValueError, OSError) as e:  # KeyMismatchError and the safe loader's errors are ValueErrors
        print(f"error: {e}", file=sys.stderr)
        return 2
    record = {"kind": "dimr", "source": args.src.name, "source_format": sniff_format(args.src)}
    record["source_sha256"] = sha256_of(args.src)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    target = save_transformer(model, args.out_dir, record, dtype)
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
