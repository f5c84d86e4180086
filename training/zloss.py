"""Attention-logit z-loss: an optional stability term for training (with qk-norm, from the stability literature).

A diffusion transformer's output is regressed with MSE, so the original output-softmax z-loss has nothing to
act on; the softmax that does blow up in long runs is attention's. This processor computes self-attention
explicitly, keeps ``mean(logsumexp(logits)^2)`` of the step, and the trainer adds ``weight * sum`` over layers,
which keeps attention logits from drifting to large magnitudes. It is slower than SDPA (the logits are
materialised), so it is opt-in (``optim.z_loss_weight``) and for training only.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import Attention


class ZLossAttnProcessor:
    """Plain softmax self-attention that records the z-loss term of its logits."""

    def __init__(self) -> None:
        self.z: torch.Tensor | None = None

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("ZLossAttnProcessor is for self-attention (attn1) only")
        batch, tokens, _ = hidden_states.shape
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        across = _across_heads(attn)
        if across:  # PixArt-Σ form: one norm over all heads, before the split
            q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.view(batch, tokens, attn.heads, -1).transpose(1, 2) for x in (q, k, v))
        if attn.norm_q is not None and not across:
            q, k = attn.norm_q(q), attn.norm_k(k)
        logits = (q @ k.transpose(-1, -2)).float() * attn.scale
        if attention_mask is not None:
            logits = logits + attention_mask
        log_z = torch.logsumexp(logits, dim=-1)
        self.z = (log_z**2).mean()
        out = torch.softmax(logits, dim=-1).to(v.dtype) @ v
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return attn.to_out[1](attn.to_out[0](out))


def _across_heads(attn: Attention) -> bool:
    shape = getattr(attn.norm_q, "normalized_shape", None)
    return shape is not None and shape[-1] == attn.to_q.out_features and attn.heads > 1


def install_z_loss(model: torch.nn.Module) -> list[ZLossAttnProcessor]:
    """Put a recording processor on every self-attention (``attn1``) of ``model``; returns them."""
    processors = []
    for name, module in model.named_modules():
        if isinstance(module, Attention) and name.endswith("attn1"):
            proc = ZLossAttnProcessor()
            module.set_processor(proc)
            processors.append(proc)
    if not processors:
        raise ValueError("no self-attention (attn1) modules found for the z-loss")
    return processors


def collect_z_loss(processors: list[ZLossAttnProcessor]) -> torch.Tensor:
    terms = [p.z for p in processors if p.z is not None]
    for p in processors:
        p.z = None
    return torch.stack(terms).sum()
