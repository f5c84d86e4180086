"""Video training data: folders of videos or of frame images, and a procedural moving-sprites set.

Every dataset returns ``{"pixel_values": (3, T, H, W) in [-1, 1]}`` (the ``(C, T, H, W)`` layout of
``dit.VDTModel``) and is a pure function of its index, which the trainer's exact resume relies on.

* :class:`VideoFolderDataset`: ``root/*.mp4`` (any ``pipelines.video_io`` format: mp4, webm, gif, ...) and/or
  ``root/<clip>/*.png`` frame folders. Each source is cut into non-overlapping windows of ``num_frames``
  frames (``frame_stride`` apart), centre-cropped and resized to a square.
* :class:`MovingSpritesDataset`: the emoji images of ``data/emoji`` moving over a white canvas, bouncing off
  the walls, rotating and scaling, the procedural motion the shipped default is trained on. Held-out
  evaluation uses emoji the training split never shows (``split="test"``: every 10th emoji).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

MOTIONS = ("bounce", "rotate", "scale")


def frames_to_tensor(frames: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """PIL frames -> ``(3, T, R, R)`` in [-1, 1], centre-cropped to a square and resized (antialiased)."""
    arr = np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in frames])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    h, w = x.shape[-2:]
    side = min(h, w)
    x = x[..., (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    if side != resolution:
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bicubic", antialias=True)
    return (x.clamp(0, 1) * 2 - 1).transpose(0, 1).contiguous()


def collate_video_batch(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    return {"pixel_values": torch.stack([it["pixel_values"] for it in items])}


@dataclass(frozen=True)
class ClipRef:
    source: str
    start: int


def _count_frames(path: Path) -> int:
    from pipelines.video_io import ANIMATED_EXTENSIONS, IMAGE_EXTENSIONS, VIDEO_EXTENSIONS

    suffix = path.suffix.lower()
    if path.is_dir():
        return sum(1 for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))
    if suffix in VIDEO_EXTENSIONS:
        import imageio_ffmpeg

        return int(imageio_ffmpeg.count_frames_and_secs(str(path))[0])
    if suffix in ANIMATED_EXTENSIONS:
        with Image.open(path) as im:
            return int(getattr(im, "n_frames", 1))
    return 0


class VideoFolderDataset(Dataset):
    """Clips cut from the videos and frame folders under ``root`` (see the module docstring)."""

    def __init__(self, root: str | os.PathLike[str], num_frames: int, resolution: int, frame_stride: int = 1):
        from pipelines.video_io import ANIMATED_EXTENSIONS, VIDEO_EXTENSIONS

        self.root = Path(root)
        if not self.root.is_dir():
            raise NotADirectoryError(f"video dataset root {self.root} is not a directory")
        if num_frames < 1 or frame_stride < 1:
            raise ValueError("num_frames and frame_stride must be at least 1")
        self.num_frames, self.resolution, self.frame_stride = num_frames, resolution, frame_stride
        span = num_frames * frame_stride
        sources = []
        for p in sorted(self.root.iterdir()):
            if p.name.startswith("."):
                continue
            if p.is_dir() or p.suffix.lower() in VIDEO_EXTENSIONS + tuple(
                e for e in ANIMATED_EXTENSIONS if e != ".png"
            ):
                sources.append(p)
        self.clips: list[ClipRef] = []
        self.too_short: list[str] = []
        for src in sources:
            n = _count_frames(src)
            if n < span:
                self.too_short.append(src.name)
                continue
            self.clips += [ClipRef(str(src), start) for start in range(0, n - span + 1, span)]
        if not self.clips:
            raise ValueError(
                f"{self.root} holds no clip of {num_frames} frames (stride {frame_stride}): put video files or "
                f"folders of frame images in it ({len(self.too_short)} sources were too short)"
            )

    def __len__(self) -> int:
        return len(self.clips)

    def frames(self, index: int) -> list[Image.Image]:
        from pipelines.video_io import read_video

        ref = self.clips[index]
        span = self.num_frames * self.frame_stride
        frames, _ = read_video(ref.source, max_frames=ref.start + span)
        return frames[ref.start : ref.start + span : self.frame_stride]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"pixel_values": frames_to_tensor(self.frames(index), self.resolution)}


# ---------------------------------------------------------------------------------------------- sprites


def load_sprites(root: str | os.PathLike[str], split: str = "train", limit: int | None = None) -> list[Image.Image]:
    """Emoji images of ``root/metadata.jsonl`` as RGBA sprites (white made transparent).

    ``split``: ``"train"`` (all but every 10th emoji), ``"test"`` (every 10th) or ``"all"``.
    """
    from .images import load_image

    root = Path(root)
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found; build the emoji set with `python -m training.data.emoji`")
    names = [json.loads(line)["file_name"] for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
    if split == "train":
        names = [n for i, n in enumerate(names) if i % 10]
    elif split == "test":
        names = names[::10]
    elif split != "all":
        raise ValueError(f"split must be train, test or all, got {split!r}")
    sprites = []
    for name in names[:limit]:
        rgb = np.asarray(load_image(root / name), dtype=np.float32)
        # Alpha from distance to white: emoji are drawn on white, anti-aliased edges become partly transparent.
        alpha = np.clip((255.0 * 3 - rgb.sum(-1)) / 90.0, 0, 1)
        rgba = np.concatenate([rgb, alpha[..., None] * 255], -1).round().astype(np.uint8)
        sprites.append(Image.fromarray(rgba, "RGBA"))
    if not sprites:
        raise ValueError(f"no sprites in {root} for split {split!r}")
    return sprites


class MovingSpritesDataset(Dataset):
    """Procedural clips: 1..``max_sprites`` emoji moving with constant velocity and bouncing off the walls,
    optionally rotating (constant angular velocity) and scaling (a slow sinusoidal pulse).

    Clip ``i`` is drawn from ``np.random.default_rng([seed, i])``: the same index is always the same clip.
    """

    def __init__(
        self,
        emoji_root: str | os.PathLike[str] = "data/emoji",
        num_clips: int = 10000,
        num_frames: int = 8,
        resolution: int = 32,
        sprite_size: tuple[int, int] = (14, 18),
        max_sprites: int = 1,
        motions: Sequence[str] = MOTIONS,
        speed: tuple[float, float] = (1.0, 2.5),
        split: str = "train",
        seed: int = 0,
        sprites: list[Image.Image] | None = None,
    ):
        bad = sorted(set(motions) - set(MOTIONS))
        if bad or "bounce" not in motions:
            raise ValueError(f"motions must include 'bounce' and be among {MOTIONS}, got {list(motions)}")
        self.sprites = sprites if sprites is not None else load_sprites(emoji_root, split)
        self.num_clips, self.num_frames, self.resolution = int(num_clips), int(num_frames), int(resolution)
        self.sprite_size, self.max_sprites, self.motions = tuple(sprite_size), int(max_sprites), tuple(motions)
        self.speed, self.seed = tuple(speed), int(seed)
        if not 4 <= self.sprite_size[0] <= self.sprite_size[1] < self.resolution:
            raise ValueError(f"sprite_size must be within [4, resolution), got {sprite_size}")

    def __len__(self) -> int:
        return self.num_clips

    def _track(self, rng: np.random.Generator) -> dict[str, Any]:
        r = self.resolution
        size = int(rng.integers(self.sprite_size[0], self.sprite_size[1] + 1))
        angle = float(rng.uniform(0, 2 * math.pi))
        speed = float(rng.uniform(*self.speed))
        track = {
            "sprite": self.sprites[int(rng.integers(len(self.sprites)))],
            "size": size,
            "pos": np.array([rng.uniform(0, r - size), rng.uniform(0, r - size)]),
            "vel": np.array([math.cos(angle), math.sin(angle)]) * speed,
            "spin": 0.0,
            "pulse": 0.0,
            "phase": float(rng.uniform(0, 2 * math.pi)),
        }
        if "rotate" in self.motions and rng.random() < 0.5:
            track["spin"] = float(rng.choice([-1, 1]) * rng.uniform(8, 20))  # degrees per frame
        if "scale" in self.motions and rng.random() < 0.5:
            track["pulse"] = float(rng.uniform(0.15, 0.3))  # relative amplitude
        return track

    def render(self, index: int) -> list[Image.Image]:
        """The clip's frames as PIL images (``index`` decides everything)."""
        rng = np.random.default_rng([self.seed, int(index)])
        r = self.resolution
        tracks = [self._track(rng) for _ in range(int(rng.integers(1, self.max_sprites + 1)))]
        frames = []
        for f in range(self.num_frames):
            canvas = Image.new("RGBA", (r, r), (255, 255, 255, 255))
            for tr in tracks:
                scale = 1.0 + tr["pulse"] * math.sin(tr["phase"] + f * 2 * math.pi / 8)
                side = max(4, int(round(tr["size"] * scale)))
                sprite = tr["sprite"].resize((side, side), Image.LANCZOS)
                if tr["spin"]:
                    sprite = sprite.rotate(tr["spin"] * f, resample=Image.BICUBIC, expand=False)
                centre = tr["pos"] + tr["size"] / 2
                layer = Image.new("RGBA", (r, r), (0, 0, 0, 0))  # paste clips at the borders; composite does not
                layer.paste(sprite, (int(round(centre[0] - side / 2)), int(round(centre[1] - side / 2))))
                canvas.alpha_composite(layer)
            frames.append(canvas.convert("RGB"))
            for tr in tracks:  # move, bouncing off the walls (reflect position and velocity)
                tr["pos"] = tr["pos"] + tr["vel"]
                for axis in range(2):
                    hi = r - tr["size"]
                    if tr["pos"][axis] < 0:
                        tr["pos"][axis], tr["vel"][axis] = -tr["pos"][axis], -tr["vel"][axis]
                    elif tr["pos"][axis] > hi:
                        tr["pos"][axis], tr["vel"][axis] = 2 * hi - tr["pos"][axis], -tr["vel"][axis]
        return frames

    def frames(self, index: int) -> list[Image.Image]:
        return self.render(index)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_clips:
            raise IndexError(index)
        return {"pixel_values": frames_to_tensor(self.render(index), self.resolution)}
