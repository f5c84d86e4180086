"""SDPA self-attention with PixArt-Σ's qk-norm: one LayerNorm over all heads, applied before the head split.

diffusers' ``AttnProcessor2_0`` applies ``norm_q``/``norm_k`` after splitting heads, which only fits per-head
norms; with ``qk_norm="layer_norm_across_heads"`` (or ``"rms_norm_across_heads"``) it fails. Our blocks use this
processor in that case, and every ``dit.attention`` processor asks :func:`normalizes_across_heads` where to apply
the norms.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

ACROSS_HEADS = ("layer_norm_across_heads", "rms_norm_across_heads")


def norm_width(norm: Any) -> int | None:
    """The feature width a LayerNorm / RMSNorm normalises over, or None for other modules."""
    shape = getattr(norm, "normalized_shape", None)  # nn.LayerNorm
    shape = getattr(norm, "dim", None) if shape is None else shape  # diffusers' RMSNorm stores a torch.Size
    if isinstance(shape, (tuple, list, torch.Size)) and len(shape):
        return int(shape[-1])
    return None


def normalizes_across_heads(attn: Attention) -> bool:
    """Whether ``attn``'s qk-norm spans all heads (applied to ``to_q(x)`` before the head split)."""
    norm = getattr(attn, "norm_q", None)
    if norm is None or attn.heads == 1:
        return False
    return norm_width(norm) == attn.inner_dim


class AcrossHeadsQKNormAttnProcessor:
    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch, tokens, _ = hidden_states.shape
        q = attn.norm_q(attn.to_q(hidden_states))
        k = attn.norm_k(attn.to_k(context))
        v = attn.to_v(context)
        q, k, v = (x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2) for x in (q, k, v))
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, k.shape[2], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, scale=attn.scale)
        out = out.transpose(1, 2).reshape(batch, tokens, -1).to(q.dtype)
        return attn.to_out[1](attn.to_out[0](out))
