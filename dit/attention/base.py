"""What every processor in this package shares with diffusers' ``AttnProcessor2_0``: the projections in, the
projection out, and the checks that the module is a plain self-attention on a token sequence.

Keeping this in one place means a LoRA on ``to_q``/``to_out``, PixArt-Σ's qk-norm, ``residual_connection``
and ``rescale_output_factor`` behave in our processors exactly as in the stock one.
"""

from __future__ import annotations

from typing import Any

import torch

from ..qk_norm import normalizes_across_heads
from .grid import AttentionConfigError


def check_self_attention(
    attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: Any, attention_mask: Any, who: str
) -> None:
    """Window, proxy and agent attention replace *self*-attention over image tokens; anything else is an error."""
    if encoder_hidden_states is not None:
        raise AttentionConfigError(
            f"{who} is a self-attention processor; it was called with encoder_hidden_states (cross-attention). "
            "Set it on self-attention modules only (dit.attention.set_attention does)."
        )
    if attention_mask is not None:
        raise AttentionConfigError(f"{who} does not take a self-attention mask (the token grid defines its masks).")
    if hidden_states.ndim != 3:
        raise AttentionConfigError(
            f"{who} expects (batch, tokens, channels) hidden states, got {tuple(hidden_states.shape)}"
        )
    if getattr(attn, "spatial_norm", None) is not None or getattr(attn, "group_norm", None) is not None:
        raise AttentionConfigError(f"{who} supports transformer attention without spatial/group norm (DiT, PixArt).")


def split_heads(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """(B, N, heads*d) -> (B, heads, N, d)."""
    b, n, inner = x.shape
    return x.view(b, n, attn.heads, inner // attn.heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, d) -> (B, N, heads*d)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def project_q(attn: Any, x: torch.Tensor) -> torch.Tensor:
    """``to_q`` and qk-norm, split into heads: (B, heads, N, d). A norm over all heads (PixArt-Σ) goes first."""
    q = attn.to_q(x)
    if getattr(attn, "norm_q", None) is None:
        return split_heads(attn, q)
    if normalizes_across_heads(attn):
        return split_heads(attn, attn.norm_q(q))
    return attn.norm_q(split_heads(attn, q))


def project_kv(attn: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    k = attn.to_k(x)
    if getattr(attn, "norm_k", None) is None:
        k = split_heads(attn, k)
    elif normalizes_across_heads(attn):
        k = split_heads(attn, attn.norm_k(k))
    else:
        k = attn.norm_k(split_heads(attn, k))
    return k, split_heads(attn, attn.to_v(x))


def output_projection(attn: Any, out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Merged-head output -> ``to_out`` (Linear, Dropout), without the residual."""
    return attn.to_out[1](attn.to_out[0](out.to(dtype)))


def finish(attn: Any, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The module's ``residual_connection`` and ``rescale_output_factor`` settings, as ``AttnProcessor2_0``."""
    if getattr(attn, "residual_connection", False):
        out = out + residual
    return out / getattr(attn, "rescale_output_factor", 1.0)


def project_out(attn: Any, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Merged-head output -> ``to_out``, then the residual/rescale settings."""
    return finish(attn, output_projection(attn, out, residual.dtype), residual)


def scale_of(attn: Any, head_dim: int) -> float:
    return float(getattr(attn, "scale", head_dim**-0.5))
