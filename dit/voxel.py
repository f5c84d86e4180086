"""Point cloud <-> voxel grid in plain torch: DiT-3D's (PVCNN's) voxelisation and trilinear devoxelisation.

The official code uses CUDA extensions (``avg_voxelize``, ``trilinear_devoxelize``); these are the same maps
written with ``scatter_add`` and ``gather`` so they run on any device, in any float dtype, and are
differentiable with respect to the features (the coordinates are treated as constants, as in the original,
which detaches them).

Conventions (as the CUDA kernels): point clouds are (B, C, N); a grid is (B, C, r, r, r) indexed
``[x, y, z]``, flat index ``x*r² + y*r + z``; normalised coordinates are continuous voxel coordinates in
[0, r-1], with voxel centres at integers.
"""

from __future__ import annotations

import torch


def normalize_coords(coords: torch.Tensor, resolution: int, eps: float = 0.0) -> torch.Tensor:
    """(B, 3, N) points -> continuous voxel coordinates in [0, r-1], per shape.

    PVCNN's ``Voxelization(normalize=True)``: centre each cloud on its mean, scale so the farthest point is at
    distance 0.5 (``/ (2·max‖p - mean‖ + eps)``), shift by 0.5 into the unit cube, multiply by r and clamp
    to [0, r-1]. Per-shape normalisation makes the grid always cover the cloud, whatever the noise level.
    """
    if coords.dim() != 3 or coords.shape[1] != 3:
        raise ValueError(f"coords must be (B, 3, N), got {tuple(coords.shape)}")
    coords = coords.detach().float()
    centred = coords - coords.mean(dim=2, keepdim=True)
    radius = centred.norm(dim=1, keepdim=True).amax(dim=2, keepdim=True)
    # A cloud collapsed to one point has radius 0: PVCNN divides by 0 (eps=0) and gets NaN; put it at the centre.
    denom = (radius * 2.0 + eps).clamp_min(torch.finfo(torch.float32).tiny)
    unit = centred / denom + 0.5
    return (unit * resolution).clamp(0, resolution - 1)


def voxel_indices(norm_coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, 3, N) continuous voxel coordinates -> (B, N) flat indices of the voxel each point rounds to."""
    v = torch.round(norm_coords).long().clamp(0, resolution - 1)
    return v[:, 0] * resolution * resolution + v[:, 1] * resolution + v[:, 2]


def voxelize(features: torch.Tensor, norm_coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """Average the (B, C, N) features of the points falling in each voxel -> (B, C, r, r, r); empty voxels are 0.

    ``avg_voxelize``: a point belongs to the voxel its coordinates round to. Accumulation is in float32 (then
    cast back; float64 stays float64), so half-precision inputs do not lose counts.
    """
    if features.dim() != 3 or norm_coords.shape[0] != features.shape[0] or norm_coords.shape[2] != features.shape[2]:
        raise ValueError(
            f"features must be (B, C, N) matching coords (B, 3, N); got {tuple(features.shape)} "
            f"and {tuple(norm_coords.shape)}"
        )
    b, c, _ = features.shape
    r3 = resolution**3
    idx = voxel_indices(norm_coords, resolution)
    feats = features.to(torch.promote_types(features.dtype, torch.float32))
    sums = feats.new_zeros(b, c, r3).scatter_add_(2, idx[:, None].expand(-1, c, -1), feats)
    counts = feats.new_zeros(b, 1, r3).scatter_add_(2, idx[:, None], torch.ones_like(feats[:, :1]))
    out = sums / counts.clamp_min(1.0)
    return out.reshape(b, c, resolution, resolution, resolution).to(features.dtype)


def devoxelize(grid: torch.Tensor, norm_coords: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of a (B, C, r, r, r) grid at (B, 3, N) continuous voxel coordinates -> (B, C, N).

    ``trilinear_devoxelize``: the 8 corners are ``floor(c)`` and ``floor(c) + 1`` per axis, the upper corner
    used only when the fractional part is positive, so a point exactly on the last voxel (r-1) never reads
    past the grid. The coordinates are the unrounded ones that ``voxelize`` rounded, so each point gets its
    own value, not its voxel's.
    """
    if grid.dim() != 5 or grid.shape[-1] != grid.shape[-2] or grid.shape[-2] != grid.shape[-3]:
        raise ValueError(f"grid must be (B, C, r, r, r), got {tuple(grid.shape)}")
    b, c, r = grid.shape[0], grid.shape[1], grid.shape[-1]
    coords = norm_coords.to(torch.promote_types(grid.dtype, torch.float32)).clamp(0, r - 1)
    lo = coords.floor()
    frac = coords - lo
    lo = lo.long()
    hi = lo + (frac > 0).long()
    flat = grid.reshape(b, c, r**3)
    out = None
    for dx in (0, 1):
        ix = hi[:, 0] if dx else lo[:, 0]
        wx = frac[:, 0] if dx else 1 - frac[:, 0]
        for dy in (0, 1):
            iy = hi[:, 1] if dy else lo[:, 1]
            wy = frac[:, 1] if dy else 1 - frac[:, 1]
            for dz in (0, 1):
                iz = hi[:, 2] if dz else lo[:, 2]
                wz = frac[:, 2] if dz else 1 - frac[:, 2]
                idx = (ix * r + iy) * r + iz
                vals = flat.gather(2, idx[:, None].expand(-1, c, -1))
                term = vals * (wx * wy * wz)[:, None].to(vals.dtype)
                out = term if out is None else out + term
    return out


def points_to_voxels(points: torch.Tensor, resolution: int, eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DiT-3D's input step: the points are both features and coordinates -> (grid, normalised coordinates)."""
    norm = normalize_coords(points, resolution, eps)
    return voxelize(points, norm, resolution), norm
