"""3D counterparts of ``dit.embeddings``: the sin-cos position table of a voxel-token grid and the voxel patch embed.

Kept beside, not inside, ``dit.embeddings`` so the 2D code every image model depends on is untouched; the
1D table underneath is the shared ``sincos_1d``, so the 3D table cannot drift from the 2D one in frequency
exponents or the sin/cos order.
"""

from __future__ import annotations

import torch
from torch import nn

from .embeddings import sincos_1d


def _as_grid(grid: int | tuple[int, int, int]) -> tuple[int, int, int]:
    if isinstance(grid, int):
        return (grid, grid, grid)
    grid = tuple(int(g) for g in grid)
    if len(grid) != 3:
        raise ValueError(f"a 3D token grid needs three sides (X, Y, Z), got {grid}")
    return grid  # type: ignore[return-value]


def sincos_3d(embed_dim: int, grid_size: int | tuple[int, int, int]) -> torch.Tensor:
    """DiT-3D's fixed 3D sin-cos table, shape (X*Y*Z, D), rows in ``(x, y, z)`` C order.

    As ``get_3d_sincos_pos_embed`` in DiT-3D: an ``ij`` meshgrid over ``arange`` of each side, D/3 channels per
    axis (each an MAE 1D table: sin half then cos half), concatenated x, y, z. The row order matches
    ``Conv3d(...).flatten(2)`` of a (B, D, X, Y, Z) volume, i.e. token ``x*Y*Z + y*Z + z``.
    """
    if embed_dim % 6:
        raise ValueError(
            f"embed_dim must be divisible by 6 for a 3D sin-cos embedding (D/3 per axis, each even), got {embed_dim}"
        )
    gx, gy, gz = _as_grid(grid_size)
    axes = torch.meshgrid(
        torch.arange(gx, dtype=torch.float64),
        torch.arange(gy, dtype=torch.float64),
        torch.arange(gz, dtype=torch.float64),
        indexing="ij",
    )
    per_axis = embed_dim // 3
    return torch.cat([sincos_1d(per_axis, a) for a in axes], dim=1).float()


class PatchEmbed3D(nn.Module):
    """``Conv3d(k = s = p)`` over an r³ voxel volume plus the fixed 3D sin-cos table.

    The table is a non-persistent buffer (a function of the config, so checkpoints need not carry it, and the
    official ``pos_embed`` entry of a DiT-3D checkpoint is dropped on conversion). Other grids than the trained
    one are computed on the fly.
    """

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        if sample_size % patch_size:
            raise ValueError(f"voxel resolution {sample_size} is not a multiple of the patch size {patch_size}")
        self.patch_size = patch_size
        grid = sample_size // patch_size
        self._grid = (grid, grid, grid)
        self.proj = nn.Conv3d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self.register_buffer("pos_embed", sincos_3d(embed_dim, self._grid)[None], persistent=False)

    def grid_of(self, volume: torch.Tensor) -> tuple[int, int, int]:
        p = self.patch_size
        return (volume.shape[-3] // p, volume.shape[-2] // p, volume.shape[-1] // p)

    def position_table(self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if grid == self._grid:
            return self.pos_embed.to(device=device, dtype=dtype)
        return sincos_3d(self.proj.out_channels, grid)[None].to(device=device, dtype=dtype)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, Z) voxels -> (B, X/p * Y/p * Z/p, D) tokens with positions added."""
        grid = self.grid_of(volume)
        x = self.proj(volume.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        return x + self.position_table(grid, x.device, x.dtype)


def unpatchify_3d(x: torch.Tensor, grid: tuple[int, int, int], patch_size: int, channels: int) -> torch.Tensor:
    """(B, X*Y*Z, p³·C) tokens -> (B, C, X·p, Y·p, Z·p), DiT-3D's ``unpatchify_voxels`` (``nxyzpqrc->ncxpyqzr``)."""
    gx, gy, gz = grid
    p = patch_size
    x = x.reshape(x.shape[0], gx, gy, gz, p, p, p, channels)
    x = torch.einsum("nxyzpqrc->ncxpyqzr", x)
    return x.reshape(x.shape[0], channels, gx * p, gy * p, gz * p)
