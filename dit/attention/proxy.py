"""Proxy-token attention (PT-DiT / Qihoo-T2X): one proxy per spatial(-temporal) window carries global context.

Two forms:

* :class:`ProxyTokenMixer` is PT-DiT's trained global path, module for module as in the official
  ``ProxyTokensTransformerBlock`` (MindSpeed-MM ``pt_dit_diffusers.py``)::

      P  = proxy(x)                                     one token per window: mean (v2), random (v1) or first
      P  = P + proxy_attn1(proxy_norm1(P))              global self-attention among proxies
      dx = linear_1_visual(pvisual_attn2(norm_before(x), proxy_cross_norm(P)))   all tokens read the proxies
                                                        (linear_1_visual zero-initialised)

  The PT-DiT block (``dit.models.pt_dit``) adds ``dx`` to the tokens, then runs window and shifted-window
  attention (``dit.attention.window``).

* :class:`ProxyAttnProcessor` is the training-free counterpart for a stock model's self-attention, using the
  layer's own projections. Every token attends to the window proxies (keys/values projected from the pooled
  tokens) with a ``log(count)`` bias, so a proxy weighs as many tokens as it stands for: if a window's tokens
  were identical this would equal full attention exactly. With ``local=True`` a token also attends exactly to
  the tokens of its own window, in the same softmax, instead of to its own window's proxy: PT-DiT's "global
  proxies + local windows" in one pass. The proxy-to-proxy exchange is left out here on purpose: the layer's
  weights were trained to attend to tokens, and a pre-attention of proxies (plus a residual) moves the keys away
  from what the layer expects; it is learnt in the trained form.

Windows that do not divide the grid are padded; a proxy is the mean of (or a sample among) its *real* tokens.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from .base import check_self_attention, merge_heads, project_kv, project_out, project_q, scale_of
from .grid import (
    AttentionConfigError,
    check_window_fits,
    current_timestep,
    normalize_window,
    resolve_grid,
)
from .window import WindowLayout, make_layout, partition, unpartition

PROXY_MODES = ("mean", "random", "first")


def _check_mode(mode: str) -> str:
    if mode not in PROXY_MODES:
        raise AttentionConfigError(f"proxy mode must be one of {', '.join(PROXY_MODES)}, got {mode!r}")
    return mode


def window_valid(layout: WindowLayout, device: torch.device) -> torch.Tensor:
    """``(num_windows, n)`` bool: which slots of each (padded) window hold a real token."""
    ones = torch.ones(1, layout.grid[0] * layout.grid[1] * layout.grid[2], 1, device=device)
    return partition(ones, layout)[0, :, :, 0] > 0.5


def _random_slots(valid: torch.Tensor, batch: int | None, generator: torch.Generator | None) -> torch.Tensor:
    """One uniformly drawn real slot per window (and per batch element when ``batch`` is given)."""
    counts = valid.sum(-1)
    shape = (batch, counts.shape[0]) if batch is not None else (counts.shape[0],)
    u = torch.rand(shape, generator=generator, device=generator.device if generator is not None else None)
    k = (u.to(valid.device) * counts).long().clamp_max(counts - 1)
    rank = valid.long().cumsum(-1) - 1  # rank of each real slot among its window's real slots
    hit = valid & (rank == k[..., None])
    return hit.float().argmax(-1)


def proxy_tokens(
    x: torch.Tensor,
    layout: WindowLayout,
    mode: str = "mean",
    generator: torch.Generator | None = None,
    per_sample: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, N, C)`` tokens -> ``(B, num_windows, C)`` proxies and ``(num_windows,)`` real-token counts.

    ``mean`` averages a window's real tokens (PT-DiT v2, the released model); ``first`` takes its top-left token
    (the official ``mode='first'``); ``random`` takes one uniformly drawn real token (PT-DiT v1), per sample when
    ``per_sample`` (training), else the same slots for the whole batch so CFG's two halves agree.
    """
    xw = partition(x, layout)  # (B, nW, n, C), zero padded
    valid = window_valid(layout, x.device)
    counts = valid.sum(-1)
    if mode == "mean":
        return xw.sum(2) / counts[None, :, None].to(x.dtype), counts
    if mode == "first":
        return xw[:, :, 0], counts  # slot 0 of a window is always inside the grid
    slots = _random_slots(valid, x.shape[0] if per_sample else None, generator)
    if slots.ndim == 1:
        slots = slots[None].expand(x.shape[0], -1)
    index = slots[:, :, None, None].expand(-1, -1, 1, x.shape[-1])
    return xw.gather(2, index)[:, :, 0], counts


def _inference_generator(seed: int, layer: int) -> torch.Generator:
    t = current_timestep()
    mixed = (seed * 1_000_003 + layer * 7919 + (int(round(t * 1000)) if t is not None else 0)) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


class ProxyTokenMixer(nn.Module):
    """PT-DiT's global path (proxy extraction, proxy self-attention, injection by cross-attention).

    Parameter names are the official ones, so a converter maps ``transformer_blocks.{i}.proxy_attn1.*``,
    ``pvisual_attn2.*`` and ``linear_1_visual.*`` one to one. Returns the update to add to the tokens.
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        window_size: int | tuple[int, ...] = 8,
        mode: str = "mean",
        norm_eps: float = 1e-6,
        qk_norm: str | None = None,
        attention_bias: bool = True,
    ):
        super().__init__()
        self.window = normalize_window(window_size)
        self.mode = _check_mode(mode)
        self.seed = 0
        self.layer_index = 0
        self.proxy_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.proxy_attn1 = Attention(
            query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim, bias=attention_bias,
            qk_norm=qk_norm, eps=1e-6, out_bias=True,
        )  # fmt: skip
        self.proxy_cross_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.norm_before = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.pvisual_attn2 = Attention(
            query_dim=dim, cross_attention_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim,
            bias=attention_bias, qk_norm=qk_norm, eps=1e-6, out_bias=True,
        )  # fmt: skip
        self.linear_1_visual = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear_1_visual.weight)
        nn.init.zeros_(self.linear_1_visual.bias)

    def proxies(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        check_window_fits(grid, self.window, "PT-DiT proxy tokens")
        layout = make_layout(grid, self.window)
        gen = None if self.training or self.mode != "random" else _inference_generator(self.seed, self.layer_index)
        return proxy_tokens(x, layout, self.mode, gen, per_sample=self.training)[0]

    def forward(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        p = self.proxies(x, grid)
        p = p + self.proxy_attn1(self.proxy_norm1(p))
        out = self.pvisual_attn2(self.norm_before(x), encoder_hidden_states=self.proxy_cross_norm(p))
        return self.linear_1_visual(out)


class ProxyAttnProcessor:
    """Training-free proxy-token self-attention for stock models (see the module docstring for the math).

    ``window_size``: tokens per proxy window (int, ``(h, w)`` or ``(f, h, w)``). ``mode``: ``mean`` |
    ``random`` | ``first``. ``local``: also attend exactly within the own window. ``chunk_windows``: with
    ``local`` the scores are built this many windows at a time (memory bound; the result does not depend on it).
    """

    needs_token_grid = True

    def __init__(
        self,
        window_size: int | tuple[int, ...] = 4,
        mode: str = "mean",
        local: bool = True,
        seed: int = 0,
        layer_index: int = 0,
        chunk_windows: int = 256,
    ):
        self.window = normalize_window(window_size)
        self.mode = _check_mode(mode)
        self.local = bool(local)
        self.seed = int(seed)
        self.layer_index = int(layer_index)
        self.chunk_windows = max(1, int(chunk_windows))

    def __repr__(self) -> str:
        return f"ProxyAttnProcessor(window={self.window}, mode={self.mode!r}, local={self.local})"

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_grid: tuple[int, ...] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        who = type(self).__name__
        check_self_attention(attn, hidden_states, encoder_hidden_states, attention_mask, who)
        grid = resolve_grid(hidden_states.shape[1], token_grid, who)
        check_window_fits(grid, self.window, who)
        layout = make_layout(grid, self.window)
        gen = _inference_generator(self.seed, self.layer_index) if self.mode == "random" else None
        proxies, counts = proxy_tokens(hidden_states, layout, self.mode, gen)
        q = project_q(attn, hidden_states)
        kp, vp = project_kv(attn, proxies)  # (B, heads, P, d)
        scale = scale_of(attn, q.shape[-1])
        log_counts = counts.to(q.dtype).log()
        if not self.local:
            bias = log_counts[None, None, None, :].expand(1, 1, q.shape[2], -1)
            out = F.scaled_dot_product_attention(q, kp, vp, attn_mask=bias, scale=scale)
        else:
            k, v = project_kv(attn, hidden_states)
            out = self._local_and_proxies(q, k, v, kp, vp, log_counts, layout, scale)
        return project_out(attn, merge_heads(out), hidden_states)

    def _local_and_proxies(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kp: torch.Tensor,
        vp: torch.Tensor,
        log_counts: torch.Tensor,
        layout: WindowLayout,
        scale: float,
    ) -> torch.Tensor:
        """One softmax over [own window's real tokens] + [every other window's proxy, biased by log count]."""
        qw, kw, vw = (partition(t, layout) for t in (q, k, v))  # (B, h, nW, n, d)
        valid = window_valid(layout, q.device)  # (nW, n)
        n_win = layout.num_windows
        neg = torch.finfo(q.dtype).min
        eye = torch.eye(layout.window_tokens, dtype=torch.bool, device=q.device)
        outs = []
        for start in range(0, n_win, self.chunk_windows):
            sl = slice(start, min(n_win, start + self.chunk_windows))
            ql, kl, vl = qw[:, :, sl], kw[:, :, sl], vw[:, :, sl]
            s_loc = (ql @ kl.transpose(-1, -2)) * scale  # (B, h, c, n, n)
            key_ok = valid[sl][:, None, :] | eye  # padded queries see themselves: no empty rows
            s_loc = s_loc.masked_fill(~key_ok, neg)
            s_glb = torch.einsum("bhcnd,bhpd->bhcnp", ql, kp) * scale + log_counts
            own = torch.arange(sl.start, sl.stop, device=q.device)
            s_glb[:, :, torch.arange(sl.stop - sl.start, device=q.device), :, own] = neg
            logits = torch.cat([s_loc, s_glb], dim=-1)
            weights = logits.to(torch.promote_types(q.dtype, torch.float32)).softmax(-1).to(q.dtype)
            n = layout.window_tokens
            outs.append(weights[..., :n] @ vl + torch.einsum("bhcnp,bhpd->bhcnd", weights[..., n:], vp))
        return unpartition(torch.cat(outs, dim=2), layout)
