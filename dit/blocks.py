"""The transformer block every 2D backbone is composed of, and the shared final layers.

One block class covers DiT (adaLN-Zero, no text) and PixArt (adaLN-single, cross-attention to text):
the math after the six modulation vectors is identical, so keeping it in one place is what guarantees
the backbones agree. Attention is diffusers' ``Attention`` module, so any processor in the diffusers
protocol (SDPA, xformers, and ours in ``dit.attention``) can be set on our models and stock ones alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from .modulation import AdaLNZero, modulate
from .qk_norm import ACROSS_HEADS, AcrossHeadsQKNormAttnProcessor


class DiTBlock(nn.Module):
    """Pre-norm attention + MLP with gated modulation; optional un-normed cross-attention (PixArt order).

    ``modulation="ada_zero"``: the block owns SiLU->Linear(D, 6D) applied to the conditioning vector c.
    ``modulation="ada_single"``: the block owns only a learned ``scale_shift_table`` (6, D) added to the
    shared t0 from ``AdaLNSingle``.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        modulation: str = "ada_zero",
        cross_attention_dim: int | None = None,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        qk_norm: str | None = None,
        attention_bias: bool = True,
    ):
        super().__init__()
        if modulation not in ("ada_zero", "ada_single"):
            raise ValueError(f"modulation must be 'ada_zero' or 'ada_single', got {modulation!r}")
        self.modulation = modulation
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        # qk-norm normalises self-attention only, as PixArt-Σ does; "layer_norm_across_heads" is Σ's form
        # (one LayerNorm over all heads, PyTorch's default eps 1e-5). diffusers sizes an across-heads norm from
        # kv_heads, so it must be given.
        across = qk_norm in ACROSS_HEADS
        self.attn1 = Attention(
            query_dim=dim,
            heads=num_attention_heads,
            kv_heads=num_attention_heads if across else None,
            dim_head=attention_head_dim,
            bias=attention_bias,
            qk_norm=qk_norm,
            eps=1e-5 if qk_norm == "layer_norm_across_heads" else 1e-6,
            out_bias=True,
        )
        if across:
            self.attn1.set_processor(AcrossHeadsQKNormAttnProcessor())
        self.attn2 = None
        if cross_attention_dim is not None:
            self.attn2 = Attention(
                query_dim=dim,
                cross_attention_dim=cross_attention_dim,
                heads=num_attention_heads,
                dim_head=attention_head_dim,
                bias=attention_bias,
                out_bias=True,
            )
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate", bias=True)
        if modulation == "ada_zero":
            self.adaln_modulation = AdaLNZero(dim)
        else:
            self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def _modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.modulation == "ada_zero":
            return tuple(c[:, None] for c in self.adaln_modulation(cond))
        batch = cond.shape[0]
        return (self.scale_shift_table[None] + cond.reshape(batch, 6, -1)).chunk(6, dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cond: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        token_grid: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._modulation(cond)
        kwargs = dict(attention_kwargs or {})
        if token_grid is not None and getattr(self.attn1.processor, "needs_token_grid", False):
            kwargs["token_grid"] = token_grid
        x = modulate(self.norm1(hidden_states), shift_msa, scale_msa)
        hidden_states = hidden_states + gate_msa * self.attn1(x, **kwargs)
        if self.attn2 is not None:
            hidden_states = hidden_states + self.attn2(
                hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask
            )
        x = modulate(self.norm2(hidden_states), shift_mlp, scale_mlp)
        return hidden_states + gate_mlp * self.ff(x)


class FinalLayerAdaLNZero(nn.Module):
    """DiT's final layer: adaLN (shift, scale) from c, LayerNorm, Linear to p*p*C; all zero-initialised."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.adaln_modulation = AdaLNZero(dim, n_chunks=2)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaln_modulation(cond)
        return self.linear(modulate(self.norm(x), shift, scale))


def t2i_final_modulation(
    x: torch.Tensor, table: torch.Tensor, embedded_timestep: torch.Tensor, norm: nn.Module
) -> torch.Tensor:
    """PixArt's ``T2IFinalLayer`` before its Linear: (table[2, D] + t) -> shift, scale; LayerNorm; modulate.

    A function rather than a module so the parameters stay top-level (``scale_shift_table``, ``norm_out``,
    ``proj_out``), the names diffusers' PixArt checkpoints use.
    """
    shift, scale = (table[None] + embedded_timestep[:, None].to(table.dtype)).chunk(2, dim=1)
    return norm(x) * (1 + scale) + shift


def unpatchify(x: torch.Tensor, grid: tuple[int, int], patch_size: int, channels: int) -> torch.Tensor:
    """(B, h*w, p*p*C) tokens -> (B, C, h*p, w*p) image, the inverse of the conv patch embedding."""
    h, w = grid
    x = x.reshape(x.shape[0], h, w, patch_size, patch_size, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(x.shape[0], channels, h * patch_size, w * patch_size)


def xavier_init_linears(module: nn.Module) -> None:
    """DiT/PixArt ``_basic_init``: Xavier-uniform weights and zero biases for every Linear."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def fused_qkv_xavier_init(attn: Attention) -> None:
    """Initialise separate q/k/v as the original fused Linear(D, 3D) would be (Xavier bound over 4D).

    DiT and PixArt use timm's fused qkv; initialising the three projections independently would give a
    sqrt(2) larger initial scale than the original trains from.
    """
    dim_in, dim_out = attn.to_q.in_features, attn.to_q.out_features
    bound = math.sqrt(6.0 / (dim_in + 3 * dim_out))
    for lin in (attn.to_q, attn.to_k, attn.to_v):
        nn.init.uniform_(lin.weight, -bound, bound)


def grid_of(hidden_states: torch.Tensor, patch_size: int) -> tuple[int, int]:
    return hidden_states.shape[-2] // patch_size, hidden_states.shape[-1] // patch_size
