"""adaLN conditioning: the per-block adaLN-Zero of DiT and the shared adaLN-single of PixArt.

Both produce the same six vectors (shift, scale, gate for attention and for the MLP) in DiT's order, so one
block implementation serves both; only where the six vectors come from differs.
"""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import TimestepEmbedder


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` with (B, D) or (B, 1, D) modulation broadcast over tokens."""
    if shift.dim() == 2:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


class AdaLNZero(nn.Module):
    """DiT's per-block ``adaLN_modulation``: SiLU -> Linear(D, 6D), zero-initialised so a block starts as identity."""

    def __init__(self, hidden_size: int, n_chunks: int = 6):
        super().__init__()
        self.n_chunks = n_chunks
        self.act = nn.SiLU()
        self.linear = nn.Linear(hidden_size, n_chunks * hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(self.act(c)).chunk(self.n_chunks, dim=-1)


class CombinedTimestepSizeEmbeddings(nn.Module):
    """t embedding plus optional PixArt-α size/aspect-ratio micro-conditions (added to t before ``t_block``)."""

    def __init__(self, hidden_size: int, use_additional_conditions: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(hidden_size)
        self.use_additional_conditions = use_additional_conditions
        if use_additional_conditions:
            self.resolution_embedder = TimestepEmbedder(hidden_size // 3)
            self.aspect_ratio_embedder = TimestepEmbedder(hidden_size // 3)

    def forward(
        self,
        timestep: torch.Tensor,
        resolution: torch.Tensor | None,
        aspect_ratio: torch.Tensor | None,
        batch_size: int,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        emb = self.timestep_embedder(timestep, dtype=dtype)
        if self.use_additional_conditions:
            if resolution is None or aspect_ratio is None:
                raise ValueError(
                    "This model was trained with size micro-conditions: pass added_cond_kwargs="
                    "{'resolution': (B, 2) tensor of (height, width), 'aspect_ratio': (B, 1) tensor}."
                )
            res = self.resolution_embedder(resolution.reshape(-1), dtype=dtype).reshape(batch_size, -1)
            ar = self.aspect_ratio_embedder(aspect_ratio.reshape(-1), dtype=dtype).reshape(batch_size, -1)
            emb = emb + torch.cat([res, ar], dim=1)
        return emb


class AdaLNSingle(nn.Module):
    """PixArt's adaLN-single: one shared ``t_block`` (SiLU -> Linear(D, 6D)) for all blocks.

    Returns ``(t0, embedded_timestep)``: the six stacked vectors every block adds to its own
    ``scale_shift_table``, and the plain t embedding that the final layer uses (PixArt feeds the final layer
    t, not t0).
    """

    def __init__(self, hidden_size: int, use_additional_conditions: bool = False):
        super().__init__()
        self.emb = CombinedTimestepSizeEmbeddings(hidden_size, use_additional_conditions)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(hidden_size, 6 * hidden_size)

    def forward(
        self,
        timestep: torch.Tensor,
        added_cond_kwargs: dict | None,
        batch_size: int,
        hidden_dtype: torch.dtype,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        added = added_cond_kwargs or {}
        embedded = self.emb(timestep, added.get("resolution"), added.get("aspect_ratio"), batch_size, hidden_dtype)
        return self.linear(self.silu(embedded)), embedded
