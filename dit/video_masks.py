"""VDT's unified spatial-temporal masks: one model, many video tasks, chosen by which latents are given.

A mask has the latent grid's shape ``(T, H, W)`` (broadcast over channels) with **True = generate** and
**False = given**, the convention of ``RERV/VDT`` (``mask_generator.py``, ``diffusion/gaussian_diffusion.py``):

* training feeds the model ``x0 * (1 - M) + x_t * M`` and takes the loss only where ``M = 1``;
* sampling feeds it the clean given latents at every step (``DiTStudioPipeline.sample(known_latents=...)``).

Tasks (:func:`task_mask`): ``unconditional``, ``predict`` (first k frames given), ``backward`` (last k
given), ``interpolate`` (every s-th frame given), ``animate`` (one frame given), ``complete`` (part of every
frame given) and ``custom`` (any mask). The paper's values at 16 frames are k = 8 and s = 4; our defaults scale
with the clip length (k = T // 2, s = max(2, T // 4)) so short clips get the same proportions.

Training mix (:class:`VideoMaskGenerator`), as the original: with probability 0.2 a *spatial* mask (a BEiT block
mask over half of each frame, on frames ``[s, T - e)``, s, e in [0, 3]; the other frames fully given), otherwise
one of six temporal types uniformly: predict, backward, interpolate, unconditional, one random frame given, and
per-frame random (each frame generated with p = 0.8).

Bugs and choices of the official generator that we do **not** copy:

1. ``mask[start_idx:-end_idx] = spatial_mask`` with ``end_idx == 0`` is the empty slice ``mask[s:0]``: a quarter
   of all spatial masks (a twentieth of all training samples) mask nothing, so the sample is fully given and
   contributes zero loss. We use ``mask[s:T - e]``.
2. ``np.int`` was removed in NumPy 1.24, so the official generator no longer runs; we use torch throughout.
3. Fixed k = 8 / s = 4 break on short clips (``mask[8:]`` of an 8-frame clip is empty: "predict" would give
   every frame). Ours scale with T, and ``s + e`` is kept below T so a spatial mask always covers a frame.
4. The per-frame random type can draw "every frame given" (p = 0.2^T); it is redrawn, since it has no loss.
5. The official draws the spatial block at latent-*pixel* resolution, so with patch size 2 a token can be part
   given, part noisy. Ours draws blocks on the token grid (``granularity`` = patch size) and upsamples.
6. The official draws one mask per *batch*; ours draws one per clip (``per_sample=False`` restores the former),
   so every step sees a mix of tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

TASKS = ("unconditional", "predict", "backward", "interpolate", "animate", "complete", "custom")

#: Training mask types of the original, in its index order (0..5), plus "spatial".
TEMPORAL_TYPES = ("predict", "backward", "interpolate", "unconditional", "one_frame", "random_frames")


def default_num_given(num_frames: int) -> int:
    """Frames given for prediction: half the clip (the paper: 8 of 16)."""
    return max(1, num_frames // 2)


def default_stride(num_frames: int) -> int:
    """Interpolation stride: a quarter of the clip, at least 2 (the paper: every 4th of 16)."""
    return max(2, num_frames // 4)


def _check_frames(num_frames: int) -> int:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    return num_frames


def centre_region(height: int, width: int, fraction: float = 0.5) -> torch.Tensor:
    """A centred box covering about ``fraction`` of an ``(H, W)`` frame: the default region to complete."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    bh = max(1, round(height * math.sqrt(fraction)))
    bw = max(1, round(width * math.sqrt(fraction)))
    top, left = (height - bh) // 2, (width - bw) // 2
    region = torch.zeros(height, width, dtype=torch.bool)
    region[top : top + bh, left : left + bw] = True
    return region


def task_mask(
    task: str,
    num_frames: int,
    height: int,
    width: int,
    *,
    num_given: int | None = None,
    stride: int | None = None,
    frame_index: int = 0,
    region: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``(T, H, W)`` bool mask (True = generate) of a task on a ``T x H x W`` latent grid.

    ``num_given`` (predict/backward), ``stride`` (interpolate: frames 0, s, 2s, ... given), ``frame_index``
    (animate), ``region`` (complete: an ``(H, W)`` bool map of what to generate in every frame, default a
    centred box of half the area; other sizes are resized nearest-neighbour) and ``mask`` (custom).
    """
    t = _check_frames(num_frames)
    out = torch.ones(t, height, width, dtype=torch.bool)
    if task == "unconditional":
        return out
    if task in ("predict", "backward"):
        k = default_num_given(t) if num_given is None else int(num_given)
        if not 1 <= k < t:
            raise ValueError(f"{task}: num_given must be between 1 and {t - 1} for {t} frames, got {num_given}")
        if task == "predict":
            out[:k] = False
        else:
            out[t - k :] = False
        return out
    if task == "interpolate":
        s = default_stride(t) if stride is None else int(stride)
        if not 2 <= s < t:
            raise ValueError(f"interpolate: stride must be between 2 and {t - 1} for {t} frames, got {stride}")
        out[::s] = False
        return out
    if task == "animate":
        if not -t <= frame_index < t:
            raise ValueError(f"animate: frame_index must be between 0 and {t - 1}, got {frame_index}")
        out[frame_index] = False
        return out
    if task == "complete":
        region = centre_region(height, width) if region is None else resize_region(region, height, width)
        if not region.any():
            raise ValueError("complete: the region to generate is empty; mark part of the frame")
        if region.all():
            raise ValueError("complete: the region covers the whole frame; use 'unconditional' instead")
        return region[None].expand(t, height, width).clone()
    if task == "custom":
        if mask is None:
            raise ValueError("custom: pass mask, a (T, H, W) bool tensor with True where frames are generated")
        m = torch.as_tensor(mask).bool()
        if m.shape != (t, height, width):
            raise ValueError(f"custom: mask has shape {tuple(m.shape)}, expected {(t, height, width)}")
        return m.clone()
    raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")


def resize_region(region: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An ``(h, w)`` bool region at another resolution: a latent cell is generated if any of its pixels is."""
    r = torch.as_tensor(region).bool()
    if r.dim() != 2:
        raise ValueError(f"region must be a 2D (height, width) map, got shape {tuple(r.shape)}")
    if r.shape == (height, width):
        return r.clone()
    if r.shape[0] % height == 0 and r.shape[1] % width == 0:  # pixel map -> latent grid: any-pooling
        fh, fw = r.shape[0] // height, r.shape[1] // width
        return r.reshape(height, fh, width, fw).any(dim=3).any(dim=1)
    return torch.nn.functional.interpolate(r[None, None].float(), size=(height, width), mode="nearest")[0, 0] > 0.5


def given_frames(mask: torch.Tensor) -> list[int]:
    """Frames that are entirely given (nothing generated) in a ``(T, H, W)`` mask."""
    return [i for i in range(mask.shape[0]) if not bool(mask[i].any())]


def upsample(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """A token-grid mask ``(..., h, w)`` -> latent resolution ``(..., h*f, w*f)``."""
    if factor == 1:
        return mask
    return mask.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


# --------------------------------------------------------------------------------------------- training mix


def _uniform(lo: float, hi: float, g: torch.Generator | None) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _randint(lo: int, hi: int, g: torch.Generator | None) -> int:
    """Uniform integer in [lo, hi], both inclusive (Python's ``random.randint``)."""
    return int(torch.randint(lo, hi + 1, (), generator=g).item())


def block_mask(
    height: int,
    width: int,
    num_masking: float,
    generator: torch.Generator | None = None,
    min_num_patches: int = 4,
    min_aspect: float = 0.3,
) -> torch.Tensor:
    """BEiT's block-wise masking (``MaskingGenerator``): rectangles of random area and aspect until about
    ``num_masking`` cells are covered. Returns an ``(H, W)`` bool map, True = masked."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < num_masking:
        max_mask = min(num_masking - count, num_masking)
        delta = 0
        for _ in range(10):
            target = _uniform(min_num_patches, max_mask, generator)
            aspect = math.exp(_uniform(*log_aspect, generator))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top = _randint(0, height - h, generator)
                left = _randint(0, width - w, generator)
                block = mask[top : top + h, left : left + w]
                fresh = h * w - int(block.sum())
                if 0 < fresh <= max_mask:
                    block[:] = True
                    delta += fresh
            if delta > 0:
                break
        if delta == 0:
            break
        count += delta
    return mask


@dataclass
class VideoMaskGenerator:
    """Draws training masks as VDT does (see the module docstring for the mix and the fixed bugs).

    ``granularity`` is the patch size: masks are drawn on the token grid and upsampled, so no token is part
    given. ``num_given``/``stride`` default to the clip-length-scaled paper values.
    """

    num_frames: int
    height: int
    width: int
    granularity: int = 1
    spatial_prob: float = 0.2
    spatial_ratio: float = 0.5
    max_edge_frames: int = 3
    random_frame_prob: float = 0.8
    num_given: int | None = None
    stride: int | None = None
    per_sample: bool = True
    temporal_weights: Sequence[float] | None = None  # over TEMPORAL_TYPES; None = uniform (the paper)

    def __post_init__(self) -> None:
        _check_frames(self.num_frames)
        if self.height % self.granularity or self.width % self.granularity:
            raise ValueError(f"latent size {self.height}x{self.width} is not a multiple of {self.granularity}")
        self.grid = (self.height // self.granularity, self.width // self.granularity)
        weights = self.temporal_weights if self.temporal_weights is not None else [1.0] * len(TEMPORAL_TYPES)
        if len(weights) != len(TEMPORAL_TYPES) or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"temporal_weights needs {len(TEMPORAL_TYPES)} non-negative weights, got {weights}")
        self._weights = torch.tensor([float(w) for w in weights])
        if self.num_frames < 2:
            raise ValueError("VDT masks need at least 2 frames")

    def temporal(self, kind: str, generator: torch.Generator | None = None) -> torch.Tensor:
        """One temporal mask on the token grid, ``(T, h, w)``."""
        t, (h, w) = self.num_frames, self.grid
        k = self.num_given if self.num_given is not None else default_num_given(t)
        if kind == "predict":
            return task_mask("predict", t, h, w, num_given=min(k, t - 1))
        if kind == "backward":
            return task_mask("backward", t, h, w, num_given=min(k, t - 1))
        if kind == "interpolate":
            s = self.stride if self.stride is not None else default_stride(t)
            return task_mask("interpolate", t, h, w, stride=min(s, t - 1))
        if kind == "unconditional":
            return task_mask("unconditional", t, h, w)
        if kind == "one_frame":
            return task_mask("animate", t, h, w, frame_index=_randint(0, t - 1, generator))
        if kind == "random_frames":
            while True:
                frames = torch.rand(t, generator=generator) < self.random_frame_prob
                if frames.any():
                    return frames[:, None, None].expand(t, h, w).clone()
        raise ValueError(f"unknown temporal mask type {kind!r}; one of {TEMPORAL_TYPES}")

    def spatial(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A block mask over ``spatial_ratio`` of each frame on frames ``[s, T - e)``; other frames given."""
        t, (h, w) = self.num_frames, self.grid
        s = _randint(0, min(self.max_edge_frames, t - 1), generator)
        e = _randint(0, min(self.max_edge_frames, t - 1 - s), generator)
        out = torch.zeros(t, h, w, dtype=torch.bool)
        block = block_mask(h, w, self.spatial_ratio * h * w, generator)
        if not block.any():  # grids too small for a block (e.g. 2x2): mask one random cell instead
            block.view(-1)[_randint(0, h * w - 1, generator)] = True
        out[s : t - e] = block
        return out

    def draw(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, str]:
        """One mask at latent resolution ``(T, H, W)`` and its type name."""
        if torch.rand((), generator=generator).item() < self.spatial_prob:
            kind, m = "spatial", self.spatial(generator)
        else:
            kind = TEMPORAL_TYPES[int(torch.multinomial(self._weights, 1, generator=generator).item())]
            m = self.temporal(kind, generator)
        return upsample(m, self.granularity), kind

    def __call__(
        self, batch_size: int = 1, generator: torch.Generator | None = None, device: torch.device | None = None
    ) -> torch.Tensor:
        """``(B, T, H, W)`` bool masks, one per clip (or one shared by the batch with ``per_sample=False``)."""
        if self.per_sample:
            masks = torch.stack([self.draw(generator)[0] for _ in range(batch_size)])
        else:
            masks = self.draw(generator)[0][None].expand(batch_size, -1, -1, -1).clone()
        return masks.to(device) if device is not None else masks


def apply_mask(x0: torch.Tensor, x_t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """VDT's model input ``x0 * (1 - M) + x_t * M`` for ``(B, C, T, H, W)`` latents and a ``(B, T, H, W)`` mask."""
    return torch.where(mask[:, None].to(x_t.device), x_t, x0)
