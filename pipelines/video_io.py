"""Reading clips and writing generated videos: MP4 (H.264) and GIF, each with its generation record beside it.

Inputs people have: a video file (``.mp4 .webm .mov .avi .mkv .m4v``, decoded by the ffmpeg that the
``imageio-ffmpeg`` wheel ships), an animated ``.gif``/``.webp``/``.png`` (PIL), a folder of frame images
(sorted in natural order, ``frame2`` before ``frame10``), or a single image (a one-frame clip). Every path ends
in the same thing: a list of upright RGB ``PIL.Image`` frames and a frame rate.

Outputs: ``<stem>.mp4`` (H.264, yuv420p, so every browser and Gradio's ``gr.Video`` plays it), ``<stem>.gif``
(PIL; exact for clips of at most 256 colours) and ``<stem>.json`` holding the ``GenerationRecord``, so a video
can be reproduced like a PNG. Files are written to a temporary name and renamed, so a reader never sees half a
file. Tiny model outputs (32 px) are upscaled nearest-neighbour for display (``display_scale``); the record
keeps the generated size.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageSequence, UnidentifiedImageError

from .errors import InputError
from .metadata import GenerationRecord

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mov", ".avi", ".mkv", ".m4v", ".mpg", ".mpeg")
ANIMATED_EXTENSIONS = (".gif", ".webp", ".png", ".apng")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_FRAMES = 1024
MAX_FRAME_PIXELS = 4096 * 4096
DEFAULT_FPS = 8.0


def natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def ffmpeg_available() -> bool:
    """Whether MP4 can be read and written here (the ``imageio-ffmpeg`` wheel bundles an ffmpeg binary)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return True
    except Exception:
        return False


def _need_ffmpeg(what: str) -> Any:
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
        return imageio_ffmpeg
    except Exception:
        raise InputError(
            f"{what} needs ffmpeg: install it with `pip install imageio-ffmpeg` (the wheel includes ffmpeg), "
            "or use GIF / a folder of frame images instead."
        ) from None


def _check_size(path: Path, size: tuple[int, int]) -> None:
    w, h = size
    if w <= 0 or h <= 0 or w * h > MAX_FRAME_PIXELS:
        raise InputError(f"{path.name}: frames of {w}x{h} pixels are not supported (limit {MAX_FRAME_PIXELS}).")


def _read_ffmpeg(path: Path, max_frames: int, stride: int) -> tuple[list[Image.Image], float]:
    ffmpeg = _need_ffmpeg(f"Reading {path.suffix} files")
    frames: list[Image.Image] = []
    reader = None
    try:
        reader = ffmpeg.read_frames(str(path), pix_fmt="rgb24")
        meta = next(reader)
        w, h = meta["size"]
        _check_size(path, (w, h))
        fps = float(meta.get("fps") or DEFAULT_FPS)
        for i, raw in enumerate(reader):
            if i % stride == 0:
                arr = np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3)
                frames.append(Image.fromarray(arr.copy(), "RGB"))
                if len(frames) >= max_frames:
                    break
    except InputError:
        raise
    except (OSError, RuntimeError, StopIteration, KeyError, ValueError) as e:
        raise InputError(f"{path.name} could not be decoded as a video ({type(e).__name__}: {e}).") from None
    finally:
        if reader is not None:
            reader.close()  # stops the ffmpeg process when we leave early
    return frames, fps / stride


def _read_animated(path: Path, max_frames: int, stride: int) -> tuple[list[Image.Image], float]:
    from training.data.images import to_rgb

    try:
        with Image.open(path) as im:
            _check_size(path, im.size)
            durations, frames = [], []
            for i, frame in enumerate(ImageSequence.Iterator(im)):
                if i % stride:
                    continue
                durations.append(frame.info.get("duration") or 0)
                frames.append(to_rgb(frame.copy()))
                if len(frames) >= max_frames:
                    break
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise InputError(f"{path.name} is not an image or animation DiT Studio can read ({e}).") from None
    ms = float(np.median(durations)) if durations and max(durations) > 0 else 1000.0 / DEFAULT_FPS
    return frames, 1000.0 / ms / stride


def _read_folder(path: Path, max_frames: int, stride: int) -> tuple[list[Image.Image], float]:
    from training.data.images import BadImageError, load_image

    files = sorted(
        (
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        ),
        key=lambda p: natural_key(p.name),
    )
    if not files:
        raise InputError(f"{path} holds no frame images ({', '.join(IMAGE_EXTENSIONS)}).")
    frames = []
    for f in files[::stride][:max_frames]:
        try:
            frames.append(load_image(f, max_pixels=MAX_FRAME_PIXELS))
        except BadImageError as e:
            raise InputError(f"frame {f.name}: {e.reason}") from None
    sizes = {im.size for im in frames}
    if len(sizes) > 1:
        raise InputError(f"the frames in {path.name} have different sizes ({sorted(sizes)[:3]}); resize them alike.")
    return frames, DEFAULT_FPS / stride


def read_video(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    max_frames: int = MAX_FRAMES,
    stride: int = 1,
) -> tuple[list[Image.Image], float]:
    """Frames (upright RGB PIL images) and frame rate of a video file, animation, frame folder or image list.

    ``stride`` keeps every n-th frame (and divides the frame rate); at most ``max_frames`` are decoded, so a
    long upload costs no more than the frames used.
    """
    if stride < 1 or max_frames < 1:
        raise InputError(f"stride and max_frames must be at least 1, got {stride} and {max_frames}.")
    if not isinstance(source, (str, os.PathLike)):
        paths = [Path(p) for p in source]
        if not paths:
            raise InputError("No frames were given.")
        from training.data.images import BadImageError, load_image

        try:
            frames = [load_image(p, max_pixels=MAX_FRAME_PIXELS) for p in paths[::stride][:max_frames]]
        except BadImageError as e:
            raise InputError(f"frame {Path(e.path).name}: {e.reason}") from None
        if len({im.size for im in frames}) > 1:
            raise InputError("The frames have different sizes; upload frames of one size.")
        return frames, DEFAULT_FPS / stride
    path = Path(source)
    if path.is_dir():
        return _read_folder(path, max_frames, stride)
    if not path.is_file():
        raise InputError(f"{path} does not exist.")
    suffix = path.suffix.lower()
    if suffix in VIDEO_EXTENSIONS:
        frames, fps = _read_ffmpeg(path, max_frames, stride)
    elif suffix in ANIMATED_EXTENSIONS or suffix in IMAGE_EXTENSIONS:
        frames, fps = _read_animated(path, max_frames, stride)
    else:
        known = ", ".join(VIDEO_EXTENSIONS + IMAGE_EXTENSIONS)
        raise InputError(f"{path.name}: unsupported file type {suffix or '(none)'}; use one of {known}.")
    if not frames:
        raise InputError(f"{path.name} has no frames.")
    return frames, fps


# ---------------------------------------------------------------------------------------------- writing


def _as_frames(frames: Sequence[Image.Image] | np.ndarray) -> list[Image.Image]:
    if isinstance(frames, np.ndarray):
        arr = frames
        if arr.dtype != np.uint8:
            arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise InputError(f"frames must be (T, H, W, 3), got shape {arr.shape}")
        return [Image.fromarray(a, "RGB") for a in arr]
    out = [f.convert("RGB") for f in frames]
    if not out:
        raise InputError("There are no frames to write.")
    if len({f.size for f in out}) > 1:
        raise InputError("All frames of a video must have one size.")
    return out


def upscale(frames: Sequence[Image.Image], scale: int) -> list[Image.Image]:
    """Nearest-neighbour upscaling for display (keeps tiny generated pixels crisp)."""
    if scale <= 1:
        return list(frames)
    return [f.resize((f.width * scale, f.height * scale), Image.NEAREST) for f in frames]


def display_scale(size: tuple[int, int], target: int = 256) -> int:
    """The integer factor that brings a small frame to about ``target`` pixels on its longer side."""
    return max(1, target // max(size))


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}{path.suffix}")


def write_gif(
    frames: Sequence[Image.Image] | np.ndarray, path: str | os.PathLike[str], fps: float = DEFAULT_FPS
) -> Path:
    """An endlessly looping GIF, written atomically. Exact when the clip has at most 256 colours."""
    images = _as_frames(frames)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    duration = max(20, int(round(1000.0 / max(fps, 0.1))))  # browsers clamp < 20 ms
    images[0].save(
        tmp,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=duration,
        loop=0,
        optimize=False,
        disposal=1,
    )
    os.replace(tmp, path)
    return path


def write_mp4(
    frames: Sequence[Image.Image] | np.ndarray,
    path: str | os.PathLike[str],
    fps: float = DEFAULT_FPS,
    quality: int = 18,
) -> Path:
    """H.264 MP4 (yuv420p, even sizes: odd ones are padded by one pixel), written atomically.

    ``quality`` is x264's CRF (0 lossless .. 51; 18 is visually lossless).
    """
    ffmpeg = _need_ffmpeg("Writing MP4")
    images = _as_frames(frames)
    w, h = images[0].size
    pw, ph = w + w % 2, h + h % 2
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    writer = ffmpeg.write_frames(
        str(tmp),
        (pw, ph),
        fps=float(fps),
        codec="libx264",
        pix_fmt_in="rgb24",
        pix_fmt_out="yuv420p",
        output_params=["-crf", str(int(quality)), "-movflags", "+faststart"],
        macro_block_size=1,
        ffmpeg_log_level="error",
    )
    try:
        writer.send(None)
        for im in images:
            arr = np.asarray(im, dtype=np.uint8)
            if (pw, ph) != (w, h):
                arr = np.pad(arr, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge")
            writer.send(np.ascontiguousarray(arr))
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def write_record(record: GenerationRecord, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(record.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_record_json(path: str | os.PathLike[str]) -> GenerationRecord:
    """The record written beside a video (``<stem>.json``); a video path finds its sibling."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        path = path.with_suffix(".json")
    try:
        return GenerationRecord.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise InputError(f"{path.name} holds no DiT Studio generation record ({e}).") from None


def save_video(
    frames: Sequence[Image.Image] | np.ndarray,
    stem: str | os.PathLike[str],
    record: GenerationRecord | None = None,
    fps: float = DEFAULT_FPS,
    formats: Sequence[str] = ("mp4", "gif"),
    scale: int = 1,
) -> dict[str, Path]:
    """Write ``<stem>.mp4`` / ``<stem>.gif`` (upscaled ``scale`` x for display) and ``<stem>.json``.

    MP4 is skipped, not failed, when ffmpeg is missing and GIF is also asked for; the returned dict names what
    was written.
    """
    images = upscale(_as_frames(frames), scale)
    stem = Path(stem)
    out: dict[str, Path] = {}
    for fmt in formats:
        if fmt == "mp4":
            if not ffmpeg_available() and "gif" in formats:
                continue
            out["mp4"] = write_mp4(images, stem.with_suffix(".mp4"), fps)
        elif fmt == "gif":
            out["gif"] = write_gif(images, stem.with_suffix(".gif"), fps)
        else:
            raise InputError(f"unknown video format {fmt!r}; use mp4 and/or gif.")
    if record is not None:
        out["json"] = write_record(record, stem.with_suffix(".json"))
    return out
