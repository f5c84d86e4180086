"""Embeddings shared by every backbone: patches, 2D sin-cos positions, timesteps, labels, sizes, captions.

One implementation each, so that DiT, the PixArt-style text model and the later backbones cannot drift apart
in the small details (frequency exponents, the order of sin and cos, the position-interpolation rule) that
decide whether a converted checkpoint reproduces its original.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """MAE-style 1D sin-cos table: first half sin, second half cos, frequencies 1/10000^(i/(D/2))."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even for a sin-cos embedding, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = positions.reshape(-1).to(torch.float64)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(
    embed_dim: int,
    grid_size: tuple[int, int],
    base_size: int | None = None,
    interpolation_scale: float = 1.0,
) -> torch.Tensor:
    """2D sin-cos position table of shape (h*w, D), row-major over (h, w).

    PixArt's rule: coordinates are ``arange(n) / (n / base_size) / interpolation_scale`` so that a model trained
    at one resolution sees the same coordinate range at another. With ``base_size = n`` and scale 1 this is
    exactly DiT/MAE's ``arange(n)``. As in MAE, the first half of the channels encodes the column (w) index
    and the second half the row (h) index.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2D sin-cos embedding, got {embed_dim}")
    h, w = grid_size
    base = base_size if base_size is not None else h
    grid_h = torch.arange(h, dtype=torch.float64) / (h / base) / interpolation_scale
    grid_w = torch.arange(w, dtype=torch.float64) / (w / base) / interpolation_scale
    gw, gh = torch.meshgrid(grid_w, grid_h, indexing="xy")
    emb_w = sincos_1d(embed_dim // 2, gw)
    emb_h = sincos_1d(embed_dim // 2, gh)
    return torch.cat([emb_w, emb_h], dim=1).float()


class PatchEmbed2D(nn.Module):
    """Conv patchify plus a fixed 2D sin-cos position table, recomputed for any grid the input has.

    The table for the training grid is a non-persistent buffer (it is a function of the config, so checkpoints
    need not carry it); other grids (other resolutions or aspect ratios) are computed on the fly with the same
    base-size rule, which is what lets one model sample at several sizes.
    """

    def __init__(
        self,
        sample_size: int,
        patch_size: int,
        in_channels: int,
        embed_dim: int,
        interpolation_scale: float = 1.0,
        base_size: int | None = None,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.interpolation_scale = interpolation_scale
        grid = sample_size // patch_size
        self.base_size = base_size if base_size is not None else grid
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self.register_buffer(
            "pos_embed",
            sincos_2d(embed_dim, (grid, grid), self.base_size, interpolation_scale)[None],
            persistent=False,
        )
        self._grid = (grid, grid)

    def position_table(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if grid == self._grid:
            return self.pos_embed.to(device=device, dtype=dtype)
        table = sincos_2d(self.proj.out_channels, grid, self.base_size, self.interpolation_scale)
        return table[None].to(device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        x = self.proj(x).flatten(2).transpose(1, 2)
        return x + self.position_table((h, w), x.device, x.dtype)


def timestep_frequencies(
    timesteps: torch.Tensor, dim: int = 256, max_period: float = 10000.0, downscale_freq_shift: float = 0.0
) -> torch.Tensor:
    """Sinusoidal timestep features ``[cos, sin]``.

    DiT and PixArt use ``exp(-ln(max_period) * i / half)`` (shift 0). diffusers' DiT port uses shift 1
    (``i / (half - 1)``); the argument exists only so that a converted diffusers-DiT checkpoint can be
    reproduced, never as our default.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(exponent / (half - downscale_freq_shift))
    args = timesteps.reshape(-1).float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar -> sinusoid -> Linear -> SiLU -> Linear (names follow diffusers' ``TimestepEmbedding``)."""

    def __init__(self, hidden_size: int, frequency_dim: int = 256, downscale_freq_shift: float = 0.0):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.downscale_freq_shift = downscale_freq_shift
        self.linear_1 = nn.Linear(frequency_dim, hidden_size)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        freqs = timestep_frequencies(t, self.frequency_dim, downscale_freq_shift=self.downscale_freq_shift)
        freqs = freqs.to(dtype or self.linear_1.weight.dtype)
        return self.linear_2(self.act(self.linear_1(freqs)))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, the null class used for classifier-free guidance.

    Row ``num_classes`` is the null class (1000 for ImageNet), as in DiT. Label dropout happens here during
    training so that every class-conditional backbone drops labels the same way.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.1):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor, force_drop: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and self.dropout_prob > 0 and force_drop is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        elif force_drop is not None:
            labels = torch.where(force_drop.bool(), torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class CaptionProjection(nn.Module):
    """PixArt's ``y_proj``: text-encoder features -> model width (Linear, GELU-tanh, Linear)."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(caption)))
