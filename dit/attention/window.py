"""Window and shifted-window self-attention (Swin; PT-DiT's local attention), on any 2D or 3D token grid.

Tokens attend only within non-overlapping ``(f, h, w)`` windows. With a shift, the grid is cyclically rolled by
``-shift`` first and tokens that the roll brought together from opposite borders are kept apart by Swin's region
mask, so a shifted layer links neighbouring windows of the previous layer without wrap-around.

A grid that the window does not divide is padded at the far end of each axis (after the roll, as Swin pads
before rolling). Unlike Swin, which pads with zeros and lets real tokens attend to those zeros, padded keys are
masked out here, so a token's output never depends on how much padding its window happened to get; with a
dividing window both are the same. PT-DiT's official code requires a dividing window and caches its shift mask
for the first resolution it sees; here masks are built per grid (and cached per grid and device).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .base import check_self_attention, merge_heads, project_kv, project_out, project_q, scale_of
from .grid import AttentionConfigError, check_window_fits, normalize_window, resolve_grid


@dataclass(frozen=True)
class WindowLayout:
    """How an ``(f, h, w)`` grid is cut into windows: padding, shift and window counts per axis."""

    grid: tuple[int, int, int]
    window: tuple[int, int, int]
    shift: tuple[int, int, int]

    @property
    def padded(self) -> tuple[int, int, int]:
        return tuple(-(-g // w) * w for g, w in zip(self.grid, self.window))  # type: ignore[return-value]

    @property
    def counts(self) -> tuple[int, int, int]:
        return tuple(p // w for p, w in zip(self.padded, self.window))  # type: ignore[return-value]

    @property
    def num_windows(self) -> int:
        f, h, w = self.counts
        return f * h * w

    @property
    def window_tokens(self) -> int:
        f, h, w = self.window
        return f * h * w

    @property
    def needs_padding(self) -> bool:
        return self.padded != self.grid

    @property
    def shifted(self) -> bool:
        return any(self.shift)


def make_layout(
    grid: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int] = (0, 0, 0)
) -> WindowLayout:
    if any(not 0 <= s < w for s, w in zip(shift, window)):
        raise AttentionConfigError(f"shift {shift} must be >= 0 and smaller than the window {window} on every axis")
    # A window that covers an axis has nothing to shift along it (Swin sets shift 0 when window >= resolution).
    shift = tuple(0 if w >= g else s for s, w, g in zip(shift, window, grid))  # type: ignore[assignment]
    return WindowLayout(tuple(grid), tuple(window), shift)  # type: ignore[arg-type]


def partition(x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """``(..., N, C)`` in raster order over the grid -> ``(..., num_windows, window_tokens, C)``.

    Pads the far end of each axis with zeros, then rolls by ``-shift``, then cuts windows (window raster order,
    tokens in raster order inside each window).
    """
    lead, c = x.shape[:-2], x.shape[-1]
    f, h, w = layout.grid
    pf, ph, pw = layout.padded
    x = x.reshape(-1, f, h, w, c)
    if layout.needs_padding:
        x = F.pad(x, (0, 0, 0, pw - w, 0, ph - h, 0, pf - f))
    if layout.shifted:
        x = torch.roll(x, shifts=tuple(-s for s in layout.shift), dims=(1, 2, 3))
    nf, nh, nw = layout.counts
    wf, wh, ww = layout.window
    x = x.view(-1, nf, wf, nh, wh, nw, ww, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(*lead, layout.num_windows, layout.window_tokens, c)


def unpartition(x: torch.Tensor, layout: WindowLayout) -> torch.Tensor:
    """Inverse of :func:`partition`: windows -> raster order, roll back, drop the padding."""
    lead, c = x.shape[:-3], x.shape[-1]
    nf, nh, nw = layout.counts
    wf, wh, ww = layout.window
    x = x.reshape(-1, nf, nh, nw, wf, wh, ww, c).permute(0, 1, 4, 2, 5, 3, 6, 7)
    x = x.reshape(-1, *layout.padded, c)
    if layout.shifted:
        x = torch.roll(x, shifts=layout.shift, dims=(1, 2, 3))
    f, h, w = layout.grid
    if layout.needs_padding:
        x = x[:, :f, :h, :w]
    return x.reshape(*lead, f * h * w, c)


def _region_labels(padded: int, window: int, shift: int) -> torch.Tensor:
    """Swin's three slices along one axis of the *rolled* grid: [0, P-win), [P-win, P-shift), [P-shift, P)."""
    labels = torch.zeros(padded, dtype=torch.long)
    if shift:
        labels[padded - window : padded - shift] = 1
        labels[padded - shift :] = 2
    return labels


@functools.lru_cache(maxsize=64)
def _window_mask_cpu(layout: WindowLayout) -> torch.Tensor | None:
    if not layout.shifted and not layout.needs_padding:
        return None
    pf, ph, pw = layout.padded
    lf, lh, lw = (_region_labels(p, w, s) for p, w, s in zip(layout.padded, layout.window, layout.shift))
    region = (lf[:, None, None] * 9 + lh[None, :, None] * 3 + lw[None, None, :]).reshape(1, -1, 1)
    # Validity lives in the unrolled frame; partition() pads and rolls it exactly like the tokens.
    valid = torch.ones(1, layout.grid[0] * layout.grid[1] * layout.grid[2], 1)
    valid = partition(valid, layout)[0, :, :, 0] > 0.5  # (windows, n)
    no_roll = WindowLayout(layout.padded, layout.window, (0, 0, 0))
    region = partition(region.float(), no_roll)[0, :, :, 0]  # labels are defined on the rolled grid already
    same = region[:, :, None] == region[:, None, :]
    eye = torch.eye(layout.window_tokens, dtype=torch.bool)
    # Padded queries attend to themselves so no row is empty (their outputs are dropped by unpartition).
    return same & (valid[:, None, :] | eye)


_MASKS: dict[tuple[WindowLayout, str], torch.Tensor | None] = {}


def window_mask(layout: WindowLayout, device: torch.device) -> torch.Tensor | None:
    """Boolean ``(num_windows, n, n)`` mask (True = may attend), or None when every window is full and unshifted."""
    key = (layout, str(device))
    if key not in _MASKS:
        if len(_MASKS) > 64:
            _MASKS.clear()
        mask = _window_mask_cpu(layout)
        _MASKS[key] = None if mask is None else mask.to(device)
    return _MASKS[key]


def windowed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: WindowLayout, scale: float
) -> torch.Tensor:
    """SDPA inside windows for ``(B, heads, N, d)`` q/k/v; returns ``(B, heads, N, d)`` in raster order."""
    b, heads, _, d = q.shape
    qw, kw, vw = (partition(t, layout) for t in (q, k, v))  # (B, heads, nW, n, d)
    n_win, n = layout.num_windows, layout.window_tokens
    mask = window_mask(layout, q.device)
    if mask is not None:
        mask = mask[None].expand(heads, n_win, n, n).reshape(1, heads * n_win, n, n)
    out = F.scaled_dot_product_attention(
        qw.reshape(b, heads * n_win, n, d),
        kw.reshape(b, heads * n_win, n, d),
        vw.reshape(b, heads * n_win, n, d),
        attn_mask=mask,
        scale=scale,
    )
    return unpartition(out.view(b, heads, n_win, n, d), layout)


class WindowAttnProcessor:
    """(Shifted-)window self-attention in the diffusers ``AttnProcessor`` protocol.

    ``window_size``: int (square), ``(h, w)`` or ``(f, h, w)`` tokens. ``shift``: ``False``, ``True`` (half
    the window, as Swin and PT-DiT) or explicit per-axis sizes. The grid comes from ``token_grid=`` (our
    blocks) or :func:`dit.attention.token_grid` (pipelines around stock models). A window larger than the grid
    along an axis is an error; one window covering the whole grid is exactly full attention.
    """

    needs_token_grid = True

    def __init__(self, window_size: int | tuple[int, ...] = 8, shift: bool | int | tuple[int, ...] = False):
        self.window = normalize_window(window_size)
        if shift is True:
            self.shift = tuple(w // 2 for w in self.window)
        elif shift is False or shift == 0:
            self.shift = (0, 0, 0)
        else:
            self.shift = normalize_window(shift, "shift") if not isinstance(shift, int) else (0, shift, shift)
        if any(not 0 <= s < w for s, w in zip(self.shift, self.window)):
            raise AttentionConfigError(f"shift {shift!r} must be smaller than the window {window_size!r}")

    def __repr__(self) -> str:
        return f"WindowAttnProcessor(window={self.window}, shift={self.shift})"

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
        layout = make_layout(grid, self.window, self.shift)
        q = project_q(attn, hidden_states)
        k, v = project_kv(attn, hidden_states)
        out = windowed_attention(q, k, v, layout, scale_of(attn, q.shape[-1]))
        return project_out(attn, merge_heads(out), hidden_states)
