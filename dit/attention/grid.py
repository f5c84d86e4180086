"""How an attention processor learns the token grid it is working on.

A processor in the diffusers protocol sees a flat ``(B, N, C)`` sequence. Window, proxy and agent attention
need the grid those N tokens came from: ``(h, w)`` for images, ``(f, h, w)`` for video. Guessing a square from
N is wrong for every non-square image, so the grid is always *handed over*:

* our own blocks (``dit.blocks.DiTBlock`` and the PT-DiT block) pass ``token_grid=`` to processors that set
  ``needs_token_grid = True``;
* stock diffusers models (PixArt, DiT) cannot, so the pipeline wraps each transformer call in
  ``with token_grid((h, w), timestep=t):`` and processors read :func:`current_token_grid`. A user driving a
  stock model by hand does the same.

The timestep travels along so that processors with a random element (AgentSD's random ToMe destinations,
random proxy sampling) can draw it reproducibly: same seed, same image, different draw per step.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


class AttentionConfigError(ValueError):
    """An attention variant or its options are invalid, or the token grid does not fit the input."""


@dataclass(frozen=True)
class _Context:
    grid: tuple[int, ...]
    timestep: float | None


_CONTEXT: contextvars.ContextVar[_Context | None] = contextvars.ContextVar("dit_attention_token_grid", default=None)


def normalize_grid(grid: Sequence[int]) -> tuple[int, int, int]:
    """``(h, w)`` or ``(f, h, w)`` -> ``(f, h, w)`` with positive ints; anything else is an error."""
    try:
        dims = tuple(int(g) for g in grid)
    except (TypeError, ValueError):
        raise AttentionConfigError(
            f"token grid must be (height, width) or (frames, height, width), got {grid!r}"
        ) from None
    if len(dims) not in (2, 3) or any(d <= 0 for d in dims) or any(int(g) != g for g in grid):
        raise AttentionConfigError(
            f"token grid must be 2 or 3 positive integers (height, width) or (frames, height, width), got {grid!r}"
        )
    return dims if len(dims) == 3 else (1, *dims)  # type: ignore[return-value]


@contextlib.contextmanager
def token_grid(grid: Sequence[int], timestep: torch.Tensor | float | None = None) -> Iterator[tuple[int, int, int]]:
    """Declare the token grid (and optionally the timestep) for attention processors called inside the block.

    Nested uses restore the outer grid on exit; the value is per thread / per asyncio task (a contextvar), so
    concurrent generations on different threads do not see each other's grids.
    """
    dims = normalize_grid(grid)
    t: float | None = None
    if timestep is not None:
        t = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
    token = _CONTEXT.set(_Context(tuple(int(g) for g in grid), t))
    try:
        yield dims
    finally:
        _CONTEXT.reset(token)


def current_token_grid() -> tuple[int, ...] | None:
    """The grid declared by the innermost :func:`token_grid`, as given (2 or 3 ints), or None."""
    ctx = _CONTEXT.get()
    return ctx.grid if ctx is not None else None


def current_timestep() -> float | None:
    """The timestep declared with the grid, or None when the caller did not give one."""
    ctx = _CONTEXT.get()
    return ctx.timestep if ctx is not None else None


def resolve_grid(seq_len: int, explicit: Sequence[int] | None, who: str) -> tuple[int, int, int]:
    """The ``(f, h, w)`` grid of an ``N``-token sequence: the ``token_grid=`` argument, else the context.

    Raises :class:`AttentionConfigError` naming the fix when there is no grid or when it does not multiply out
    to the sequence length (e.g. extra condition tokens were concatenated to the image tokens).
    """
    grid = explicit if explicit is not None else current_token_grid()
    if grid is None:
        raise AttentionConfigError(
            f"{who} needs the token grid (height, width) of its input. Our pipelines and backbones pass it; when "
            "calling a stock diffusers model yourself, wrap the call in "
            "`with dit.attention.token_grid((latent_height // patch_size, latent_width // patch_size)):`."
        )
    f, h, w = normalize_grid(grid)
    if f * h * w != seq_len:
        shape = "x".join(str(g) for g in grid)
        raise AttentionConfigError(
            f"{who}: the token grid {shape} has {f * h * w} tokens but the sequence has {seq_len}. "
            "The grid must describe exactly the tokens given to self-attention."
        )
    return f, h, w


def normalize_window(window: int | Sequence[int], name: str = "window_size") -> tuple[int, int, int]:
    """An int (square, one frame), ``(h, w)`` or ``(f, h, w)`` window -> ``(f, h, w)`` of positive ints."""
    if isinstance(window, bool):
        raise AttentionConfigError(f"{name} must be an int or a tuple of ints, got {window!r}")
    if isinstance(window, int):
        dims: tuple[int, ...] = (1, window, window)
    else:
        try:
            dims = tuple(int(x) for x in window)
        except (TypeError, ValueError):
            raise AttentionConfigError(f"{name} must be an int or a tuple of ints, got {window!r}") from None
        if len(dims) == 2:
            dims = (1, *dims)
    if len(dims) != 3 or any(d <= 0 for d in dims):
        raise AttentionConfigError(
            f"{name} must be positive: an int, (height, width) or (frames, h, w); got {window!r}"
        )
    return dims  # type: ignore[return-value]


def check_window_fits(grid: tuple[int, int, int], window: tuple[int, int, int], who: str) -> None:
    """A window larger than the grid along any axis is a configuration error, not something to clamp silently."""
    names = ("frames", "height", "width")
    for axis, (g, win) in enumerate(zip(grid, window)):
        if win > g:
            raise AttentionConfigError(
                f"{who}: window {'x'.join(map(str, window[-2:] if window[0] == 1 else window))} is larger than the "
                f"token grid {'x'.join(map(str, grid[-2:] if grid[0] == 1 else grid))} along {names[axis]} "
                f"({win} > {g}). Use a smaller window or a larger image."
            )
