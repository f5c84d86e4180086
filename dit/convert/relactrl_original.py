"""Official RelaCtrl ``relactrl_pixart_*.pth`` (360CVGroup/RelaCtrl) -> a DiT Studio ``relactrl`` adapter file.

The released files are ``{'state_dict': ...}`` of ``ControlPixArtMSHalf_RelaCtrl`` (the official script deletes
``pos_embed`` and loads with ``strict=False``): ``base_model.*`` (an official PixArt-α state dict, converted with
``dit.convert.pixart_original``) and, per control block k, ``controlnet.{k}.before_proj.*``,
``controlnet.{k}.after_proj.*``, ``controlnet.{k}.process.scale_shift_table`` and
``controlnet.{k}.process.experts_attn.{g}.attn.{qkv,proj}.*``. Our keys: ``blocks.{k}.{before_proj,after_proj}``,
``blocks.{k}.tdsm.scale_shift_table``, ``blocks.{k}.tdsm.attn.{g}.{qkv,proj}``.

What the weights do not say: where the blocks sit. The official model hard-codes ``c_adding_index = [0, 2, 3, 4, 5,
6, 7, 8, 9, 18, 19]`` (``control.relactrl.OFFICIAL_POSITIONS``), used here unless ``positions`` is given; the group
counts are read from the shapes (and checked against the official width rule), the heads are 4 (official). The
shuffle seed is ours (the official code draws new permutations at every forward); it is recorded in the file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .common import KeyMapper, KeyMismatchError
from .pixart_controlnet import split_prefixed


def relactrl_original_to_ours(control: Mapping[str, torch.Tensor], what: str = "RelaCtrl checkpoint") -> tuple:
    """Official ``controlnet.*`` keys (prefix removed) -> (our adapter keys, groups per block, width)."""
    blocks = sorted({int(m.group(1)) for k in control if (m := re.match(r"(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise KeyMismatchError(f"{what}: control block indices are missing or not contiguous: {blocks}")
    m = KeyMapper({f"controlnet.{k}": v for k, v in control.items()}, what)  # full names in messages
    groups = []
    for k in blocks:
        src, dst = f"controlnet.{k}.", f"blocks.{k}."
        m.move_linear(f"{src}before_proj", f"{dst}before_proj")
        m.move_linear(f"{src}after_proj", f"{dst}after_proj")
        m.move(f"{src}process.scale_shift_table", f"{dst}tdsm.scale_shift_table")
        experts = sorted(
            {int(x.group(1)) for key in control if (x := re.match(rf"{k}\.process\.experts_attn\.(\d+)\.", key))}
        )
        if not experts or experts != list(range(len(experts))):
            raise KeyMismatchError(f"{what}: block {k} has no or non-contiguous experts_attn groups: {experts}")
        for g in experts:
            for part in ("qkv", "proj"):
                m.move_linear(f"{src}process.experts_attn.{g}.attn.{part}", f"{dst}tdsm.attn.{g}.{part}")
        groups.append(len(experts))
    out = m.finish()
    dim = int(out["blocks.0.before_proj.weight"].shape[0])
    return out, groups, dim


def check_relactrl_widths(tensors: Mapping[str, torch.Tensor], groups: Sequence[int], dim: int, heads: int, what: str):
    """Each block's group widths (from ``proj`` shapes) must be the official rule's for its group count."""
    from control.relactrl import tdsm_group_widths

    for k, n in enumerate(groups):
        widths = [int(tensors[f"blocks.{k}.tdsm.attn.{g}.proj.weight"].shape[0]) for g in range(n)]
        expected = tdsm_group_widths(dim, n, heads)
        if widths != expected:
            raise KeyMismatchError(
                f"{what}: block {k} has group widths {widths}; the TDSM rule for {n} groups of a {dim}-wide model "
                f"gives {expected}"
            )


def convert_relactrl_original(
    source: str | Path | Mapping[str, torch.Tensor],
    image_size: int | None = None,
    positions: Sequence[int] | None = None,
    seed: int = 0,
    version: str | None = "alpha",
    num_heads: int | None = None,
    ema: bool = True,
    interpolation_scale: float | None = None,
) -> tuple[torch.nn.Module | None, dict[str, torch.Tensor], dict[str, Any]]:
    """Official RelaCtrl checkpoint -> (base ``TextDiTModel`` or None, adapter tensors, adapter config)."""
    from control.relactrl import OFFICIAL_POSITIONS

    from .common import load_strict
    from .pixart_original import pixart_original_config, pixart_original_to_diffusers
    from .safe_load import load_checkpoint

    what = f"RelaCtrl checkpoint {source if isinstance(source, (str, Path)) else 'state dict'}"
    state_dict = load_checkpoint(source, ema=ema) if isinstance(source, (str, Path)) else dict(source)
    base, control = split_prefixed(state_dict, what)
    tensors, groups, dim = relactrl_original_to_ours(control, what)
    heads = 4
    check_relactrl_widths(tensors, groups, dim, heads, what)
    if positions is None:
        if len(groups) > len(OFFICIAL_POSITIONS):
            raise ValueError(f"{what}: {len(groups)} control blocks but no positions given (official: 11); pass them")
        positions = OFFICIAL_POSITIONS[: len(groups)]
    positions = [int(p) for p in positions]
    if len(positions) != len(groups):
        raise ValueError(f"{what}: {len(groups)} control blocks but {len(positions)} positions were given")
    config = {
        "positions": positions,
        "groups": groups,
        "heads": heads,
        "segments": 4,
        "seed": int(seed),
        "shuffle_training": "random",  # how the official weights were made
        "inner_dim": dim,
    }
    base_model = None
    if base:
        from control.relactrl import RelaCtrl

        from ..models.text_dit import TextDiTModel

        cfg = pixart_original_config(base, image_size, version, num_heads, interpolation_scale)  # type: ignore[arg-type]
        base_model = load_strict(TextDiTModel(**cfg), pixart_original_to_diffusers(base), what).eval()
        load_strict(RelaCtrl.from_config(base_model, config), tensors, what)
    return base_model, tensors, config
