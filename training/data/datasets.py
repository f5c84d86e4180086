"""Image datasets in the folder layouts people already have, plus aspect-ratio bucketing.

:func:`open_image_folder` detects one of these layouts under ``root``:

``metadata``
    ``metadata.jsonl`` in ``root``, one JSON object per line with ``file_name`` (relative
    to ``root``), optional ``text``, optional ``label`` and optional
    ``conditioning_image_file_name``, as read by Hugging Face ``datasets``' ``imagefolder``
    builder and the diffusers training examples. Labels may be ints or strings (strings
    are mapped to the index of their sorted name). A ``classes.json`` next to it
    (``{"0": "name", ...}`` or a list) supplies ``class_names`` for int labels.
``captions``
    images with a same-name caption file next to them (``a.png`` + ``a.txt``), the
    kohya / ai-toolkit convention. Searched recursively.
``classes``
    one sub-folder per class (``root/cat/*.png``); label = index of the folder name in
    sorted order (as torchvision's ``ImageFolder``); ``class_names`` lists the folders.
``images``
    any other folder of images: no text and no label (unconditional training).

Problems with individual files (unreadable, truncated, too many pixels, missing) are
found at scan time with a cheap header check, skipped and recorded in
``dataset.skipped``; problems with the folder as a whole (empty, a malformed metadata
line, a path escaping the root, every image bad) raise ``ValueError`` with the file and
line to fix. The reasoning: one bad file among 100k should not cost a training run, but
a folder that cannot mean what the user thinks it means should stop before any compute
is spent.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, Dataset

from .images import BadImageError, check_image, load_image

__all__ = [
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "AspectRatioBucketSampler",
    "DatasetWarning",
    "ImageFolderDataset",
    "ImageRecord",
    "SkippedItem",
    "collate_image_batch",
    "detect_format",
    "make_buckets",
    "nearest_bucket",
    "open_image_folder",
]

FORMATS = ("metadata", "captions", "classes", "images")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_FILE = "metadata.jsonl"
CLASSES_FILE = "classes.json"
_EXPECTED_FORMATS = (
    "expected one of: an image folder with metadata.jsonl (file_name, text, label, "
    "conditioning_image_file_name); images with same-name .txt captions (a.png + a.txt); "
    "or one sub-folder of images per class (root/cat/*.png)"
)
_EXAMPLES = 5  # how many example paths a warning or error message lists


class DatasetWarning(UserWarning):
    """Something in a dataset folder was skipped or looks wrong, but training can go on."""


@dataclass(frozen=True)
class SkippedItem:
    """A file left out of the dataset, and why."""

    path: str
    reason: str


@dataclass
class ImageRecord:
    """One usable example found by the scan (image size is upright, i.e. after EXIF)."""

    path: Path
    width: int = 0
    height: int = 0
    text: str | None = None
    label: int | None = None
    conditioning_path: Path | None = None
    caption_path: Path | None = None  # read during the scan (captions format)


@dataclass
class _Scan:
    format: str
    records: list[ImageRecord]
    class_names: list[str] | None = None
    orphan_captions: list[str] = field(default_factory=list)
    missing_captions: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- scanning


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _walk(root: Path) -> tuple[list[Path], list[Path]]:
    """All files under root (sorted, hidden entries skipped), split into images and others."""
    images: list[Path] = []
    others: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if _is_hidden(name):
                continue
            p = Path(dirpath) / name
            (images if p.suffix.lower() in IMAGE_EXTENSIONS else others).append(p)
    return images, others


def detect_format(root: str | os.PathLike[str], caption_extension: str = ".txt") -> str:
    """Return which of :data:`FORMATS` the folder is in (see the module docstring)."""
    root = Path(root)
    if (root / METADATA_FILE).is_file():
        return "metadata"
    images, others = _walk(root)
    return _detect(root, images, others, caption_extension)


def _detect(root: Path, images: list[Path], others: list[Path], caption_extension: str) -> str:
    if (root / METADATA_FILE).is_file():
        return "metadata"
    if not images:
        return "empty"
    ext = caption_extension.lower()
    image_stems = {p.with_suffix("") for p in images}
    if any(p.suffix.lower() == ext and p.with_suffix("") in image_stems for p in others):
        return "captions"
    if all(p.parent != root for p in images):
        return "classes"
    return "images"


def _safe_join(root: Path, file_name: str, where: str) -> Path:
    """Resolve a metadata ``file_name`` inside ``root``, refusing anything that leaves it.

    A metadata file is data, and data must not be able to make training read (or a
    preview UI display) ``/etc/passwd`` or a sibling user's files. The check is lexical,
    so a dataset root that is itself a symlink keeps working.
    """
    if os.path.isabs(file_name) or Path(file_name).drive or file_name.startswith(("/", "\\")):
        raise ValueError(f"{where}: file_name {file_name!r} is an absolute path; it must be relative to {root}")
    joined = os.path.normpath(os.path.join(root, file_name))
    root_norm = os.path.normpath(root)
    if joined != root_norm and not joined.startswith(root_norm + os.sep):
        raise ValueError(f"{where}: file_name {file_name!r} points outside the dataset folder {root}")
    if joined == root_norm:
        raise ValueError(f"{where}: file_name {file_name!r} names the dataset folder itself, not a file")
    return Path(joined)


def _read_classes_json(root: Path) -> list[str] | None:
    path = root / CLASSES_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, list) and all(isinstance(n, str) for n in data):
        return list(data)
    if isinstance(data, dict):
        try:
            mapping = {int(k): str(v) for k, v in data.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f'{path}: keys must be class indices ("0", "1", ...)') from e
        if sorted(mapping) != list(range(len(mapping))):
            raise ValueError(f"{path}: class indices must be 0..{len(mapping) - 1} without gaps")
        return [mapping[i] for i in range(len(mapping))]
    raise ValueError(f"{path}: expected a list of names or an object mapping index -> name")


def _scan_metadata(root: Path, caption_column: str, label_column: str, conditioning_column: str) -> _Scan:
    path = root / METADATA_FILE
    records: list[ImageRecord] = []
    raw_labels: list[tuple[int, Any]] = []  # (record position, raw value) to map after reading
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            file_name = obj.get("file_name")
            if file_name is None:
                raise ValueError(f"{where}: missing required key 'file_name' (keys: {sorted(obj)})")
            if not isinstance(file_name, str) or not file_name.strip():
                raise ValueError(f"{where}: 'file_name' must be a non-empty string, got {file_name!r}")
            image_path = _safe_join(root, file_name, where)
            text = obj.get(caption_column)
            if text is not None and not isinstance(text, str):
                raise ValueError(f"{where}: {caption_column!r} must be a string, got {type(text).__name__}")
            cond_name = obj.get(conditioning_column)
            cond_path = None
            if cond_name not in (None, ""):
                if not isinstance(cond_name, str):
                    raise ValueError(f"{where}: {conditioning_column!r} must be a string")
                cond_path = _safe_join(root, cond_name, where)
            label = obj.get(label_column)
            if label is not None:
                if isinstance(label, bool) or not isinstance(label, (int, str)):
                    raise ValueError(f"{where}: {label_column!r} must be an int or a string, got {label!r}")
                if isinstance(label, int) and label < 0:
                    raise ValueError(f"{where}: {label_column!r} must be >= 0, got {label}")
                raw_labels.append((len(records), label))
            records.append(ImageRecord(path=image_path, text=text, conditioning_path=cond_path))
    if not records:
        raise ValueError(f"{path} lists no images; {_EXPECTED_FORMATS}")

    class_names: list[str] | None = None
    kinds = {type(v) for _, v in raw_labels}
    if kinds == {str}:
        class_names = sorted({v for _, v in raw_labels})
        index = {name: i for i, name in enumerate(class_names)}
        for pos, v in raw_labels:
            records[pos].label = index[v]
    elif kinds == {int}:
        for pos, v in raw_labels:
            records[pos].label = v
        class_names = _read_classes_json(root)
        max_label = max(v for _, v in raw_labels)
        if class_names is not None and max_label >= len(class_names):
            warnings.warn(
                f"{root / CLASSES_FILE} names {len(class_names)} classes but {path} uses label "
                f"{max_label}; ignoring {CLASSES_FILE}",
                DatasetWarning,
                stacklevel=3,
            )
            class_names = None
    elif kinds:
        raise ValueError(f"{path}: {label_column!r} mixes ints and strings; use one kind")
    return _Scan("metadata", records, class_names=class_names)


def _scan_captions(root: Path, images: list[Path], others: list[Path], caption_extension: str) -> _Scan:
    ext = caption_extension.lower()
    captions = {p.with_suffix(""): p for p in others if p.suffix.lower() == ext}
    image_stems = {p.with_suffix("") for p in images}
    records: list[ImageRecord] = []
    missing: list[str] = []
    for p in images:
        cap = captions.get(p.with_suffix(""))
        if cap is None:
            missing.append(str(p))
        records.append(ImageRecord(path=p, caption_path=cap))
    orphans = sorted(str(c) for stem, c in captions.items() if stem not in image_stems)
    return _Scan("captions", records, orphan_captions=orphans, missing_captions=missing)


def _scan_classes(root: Path, images: list[Path]) -> _Scan:
    by_class: dict[str, list[Path]] = {}
    for p in images:
        rel = p.relative_to(root)
        by_class.setdefault(rel.parts[0], []).append(p)
    class_names = sorted(by_class)
    records = [ImageRecord(path=p, label=i) for i, name in enumerate(class_names) for p in by_class[name]]
    return _Scan("classes", records, class_names=class_names)


def _check_record(rec: ImageRecord, max_pixels: int | None, level: str) -> SkippedItem | None:
    """Validate one record's files, filling in its size and caption, or say why it is skipped."""
    try:
        rec.width, rec.height = check_image(rec.path, max_pixels, level=level)
        if rec.conditioning_path is not None:
            check_image(rec.conditioning_path, max_pixels, level=level)
    except BadImageError as e:
        prefix = "" if e.path == str(rec.path) else f"conditioning image {e.path}: "
        return SkippedItem(str(rec.path), prefix + e.reason)
    if rec.caption_path is not None:
        try:
            rec.text = rec.caption_path.read_text(encoding="utf-8-sig").strip()
        except (OSError, UnicodeDecodeError) as e:
            return SkippedItem(str(rec.path), f"caption file {rec.caption_path} unreadable: {e}")
    return None


def _examples(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_EXAMPLES])
    return shown + (f", ... ({len(items) - _EXAMPLES} more)" if len(items) > _EXAMPLES else "")


# --------------------------------------------------------------------------- dataset


def _center_crop_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Crop the largest centred box with the target aspect ratio, then resize to ``size``.

    The crop is made first (on whole pixels) so the resampling filter cannot pull in
    colour from outside the box; LANCZOS because training images are almost always
    downscaled.
    """
    tw, th = size
    w, h = img.size
    if (w, h) == (tw, th):
        return img
    target = tw / th
    if w / h > target:  # too wide: trim left and right
        cw, ch = max(1, min(w, round(h * target))), h
    else:  # too tall: trim top and bottom
        cw, ch = w, max(1, min(h, round(w / target)))
    left, top = (w - cw) // 2, (h - ch) // 2
    if (cw, ch) != (w, h):
        img = img.crop((left, top, left + cw, top + ch))
    return img if img.size == (tw, th) else img.resize((tw, th), Image.Resampling.LANCZOS)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


class ImageFolderDataset(Dataset):
    """Map-style dataset over scanned :class:`ImageRecord` s; build it with :func:`open_image_folder`.

    Items are dicts ``{"pixel_values": FloatTensor[3, H, W] in [-1, 1], "text": str | None,
    "label": int | None, "conditioning_pixel_values": FloatTensor[3, H, W] | None,
    "index": int}``. Without bucketing every image is centre-cropped to a
    ``resolution`` x ``resolution`` square; :class:`AspectRatioBucketSampler` gives each
    item its own bucket size through :meth:`set_target_sizes`.

    An image that passed the scan but fails to decode later (a truncated JPEG, whose
    header-level check cannot see the end of the file, or a file changed on disk) is
    replaced by the next index's image, cropped to the same size so a bucketed batch
    stays uniform, and a :class:`DatasetWarning` is issued; ``strict=True`` raises
    :class:`~training.data.images.BadImageError` instead. The returned ``"index"`` is
    the index of the example actually returned.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        *,
        root: str | os.PathLike[str],
        resolution: int,
        format: str = "images",
        class_names: Sequence[str] | None = None,
        skipped: Sequence[SkippedItem] = (),
        orphan_captions: Sequence[str] = (),
        missing_captions: Sequence[str] = (),
        random_flip: bool = False,
        max_pixels: int | None = None,
        strict: bool = False,
    ) -> None:
        if resolution <= 0:
            raise ValueError(f"resolution must be positive, got {resolution}")
        self.records = list(records)
        self.root = Path(root)
        self.resolution = int(resolution)
        self.format = format
        self.class_names = list(class_names) if class_names is not None else None
        self.skipped = list(skipped)
        self.orphan_captions = list(orphan_captions)
        self.missing_captions = list(missing_captions)
        self.random_flip = random_flip
        self.max_pixels = max_pixels
        self.strict = strict
        self.runtime_errors: list[SkippedItem] = []  # per process (each DataLoader worker has its own)
        self._target_sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """Upright ``(width, height)`` of every example, for bucketing."""
        return [(r.width, r.height) for r in self.records]

    @property
    def texts(self) -> list[str | None]:
        """Every caption (e.g. to build a tokenizer vocabulary)."""
        return [r.text for r in self.records]

    @property
    def labels(self) -> list[int | None]:
        return [r.label for r in self.records]

    @property
    def num_classes(self) -> int | None:
        """Number of classes: ``len(class_names)`` if known, else max label + 1, else None."""
        if self.class_names is not None:
            return len(self.class_names)
        labels = [lb for lb in self.labels if lb is not None]
        return max(labels) + 1 if labels else None

    def set_target_sizes(self, sizes: Sequence[tuple[int, int]] | None) -> None:
        """Give each example its own output ``(width, height)``; ``None`` = square ``resolution``."""
        if sizes is not None:
            if len(sizes) != len(self.records):
                raise ValueError(f"got {len(sizes)} target sizes for {len(self.records)} examples")
            sizes = [(int(w), int(h)) for w, h in sizes]
        self._target_sizes = sizes

    def target_size(self, index: int) -> tuple[int, int]:
        if self._target_sizes is None:
            return (self.resolution, self.resolution)
        return self._target_sizes[index]

    def _load(self, index: int, size: tuple[int, int]) -> dict[str, Any]:
        rec = self.records[index]
        img = _center_crop_resize(load_image(rec.path, self.max_pixels), size)
        cond = None
        if rec.conditioning_path is not None:
            cond = _center_crop_resize(load_image(rec.conditioning_path, self.max_pixels), size)
        if self.random_flip and torch.rand(()).item() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if cond is not None:  # the control map must stay aligned with its target
                cond = cond.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {
            "pixel_values": _to_tensor(img),
            "text": rec.text,
            "label": rec.label,
            "conditioning_pixel_values": _to_tensor(cond) if cond is not None else None,
            "index": index,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.records)
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n}")
        size = self.target_size(index)
        candidate = index
        for _ in range(min(n, 32)):
            try:
                return self._load(candidate, size)
            except BadImageError as e:
                if self.strict:
                    raise
                self.runtime_errors.append(SkippedItem(e.path, e.reason))
                warnings.warn(f"{e}; using example {(candidate + 1) % n} in its place", DatasetWarning, stacklevel=2)
                candidate = (candidate + 1) % n
        raise RuntimeError(
            f"{self.root}: {len(self.runtime_errors)} images failed to load in a row, last: "
            f"{self.runtime_errors[-1].path}: {self.runtime_errors[-1].reason}"
        )

    def __repr__(self) -> str:
        extra = f", classes={len(self.class_names)}" if self.class_names else ""
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, format={self.format!r}, "
            f"examples={len(self)}, skipped={len(self.skipped)}, resolution={self.resolution}{extra})"
        )


def open_image_folder(
    root: str | os.PathLike[str],
    resolution: int,
    *,
    format: str = "auto",
    random_flip: bool = False,
    caption_column: str = "text",
    label_column: str = "label",
    conditioning_column: str = "conditioning_image_file_name",
    caption_extension: str = ".txt",
    max_pixels: int | None = None,
    verify: str = "header",
    scan_workers: int = 8,
    strict: bool = False,
) -> ImageFolderDataset:
    """Scan ``root``, detect its layout, validate every image, and return the dataset.

    ``format``: ``"auto"`` or one of :data:`FORMATS`. ``random_flip`` is off by default
    because captions often name a direction ("left arrow") that a flip would falsify.
    ``max_pixels`` caps image size (decompression-bomb guard; default
    :data:`~training.data.images.DEFAULT_MAX_PIXELS`). ``verify``: ``"header"``
    (cheap: header + PIL ``verify()``), ``"full"`` (decode everything now; slow, catches
    all corruption) or ``"none"`` (trust the files; sizes and the pixel limit still
    come from the headers).

    Raises ``FileNotFoundError``/``NotADirectoryError`` for a bad ``root``, and
    ``ValueError`` for an empty folder, a malformed or unsafe ``metadata.jsonl``, or a
    folder in which no image is usable. Skipped files are listed in ``dataset.skipped``
    and summarised in a :class:`DatasetWarning`.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset path {root} is not a folder; {_EXPECTED_FORMATS}")
    if verify not in ("header", "full", "none"):
        raise ValueError(f"verify must be 'header', 'full' or 'none', got {verify!r}")
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be 'auto' or one of {FORMATS}, got {format!r}")

    if format == "metadata" or (format == "auto" and (root / METADATA_FILE).is_file()):
        if not (root / METADATA_FILE).is_file():
            raise ValueError(f"format='metadata' but {root / METADATA_FILE} does not exist")
        scan = _scan_metadata(root, caption_column, label_column, conditioning_column)
    else:
        images, others = _walk(root)
        fmt = _detect(root, images, others, caption_extension) if format == "auto" else format
        if not images:
            raise ValueError(f"no images found in {root} ({', '.join(sorted(IMAGE_EXTENSIONS))}); {_EXPECTED_FORMATS}")
        if fmt == "captions":
            scan = _scan_captions(root, images, others, caption_extension)
        elif fmt == "classes":
            loose = [str(p) for p in images if p.parent == root]
            if loose:
                raise ValueError(
                    f"format='classes' but {len(loose)} images sit directly in {root} rather than in a "
                    f"class sub-folder: {_examples(loose)}"
                )
            scan = _scan_classes(root, images)
        else:
            scan = _Scan("images", [ImageRecord(path=p) for p in images])

    def check(rec: ImageRecord) -> SkippedItem | None:
        return _check_record(rec, max_pixels, verify)

    if scan_workers > 1 and len(scan.records) > 64:  # I/O bound: threads overlap the file reads
        with ThreadPoolExecutor(max_workers=scan_workers) as pool:
            results = list(pool.map(check, scan.records))
    else:
        results = [check(r) for r in scan.records]
    checked = [rec for rec, skip in zip(scan.records, results) if skip is None]
    skipped = [skip for skip in results if skip is not None]

    if not checked:
        reasons = Counter(s.reason for s in skipped)
        detail = "; ".join(f"{r} (x{n})" for r, n in reasons.most_common(_EXAMPLES))
        raise ValueError(
            f"no usable images in {root}: all {len(skipped)} were skipped. Reasons: {detail}. "
            f"Examples: {_examples([s.path for s in skipped])}"
        )
    if skipped:
        warnings.warn(
            f"{root}: skipped {len(skipped)} of {len(scan.records)} images "
            f"(e.g. {'; '.join(f'{s.path}: {s.reason}' for s in skipped[:3])}); "
            "the full list is in dataset.skipped",
            DatasetWarning,
            stacklevel=2,
        )
    if scan.orphan_captions:
        warnings.warn(
            f"{root}: {len(scan.orphan_captions)} caption files have no image with the same name "
            f"and were ignored: {_examples(scan.orphan_captions)}",
            DatasetWarning,
            stacklevel=2,
        )
    if scan.missing_captions:
        warnings.warn(
            f"{root}: {len(scan.missing_captions)} images have no {caption_extension} caption and get "
            f"text=None: {_examples(scan.missing_captions)}",
            DatasetWarning,
            stacklevel=2,
        )
    return ImageFolderDataset(
        checked,
        root=root,
        resolution=resolution,
        format=scan.format,
        class_names=scan.class_names,
        skipped=skipped,
        orphan_captions=scan.orphan_captions,
        missing_captions=scan.missing_captions,
        random_flip=random_flip,
        max_pixels=max_pixels,
        strict=strict,
    )


def collate_image_batch(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack dataset items into a batch.

    ``pixel_values`` / ``conditioning_pixel_values`` become ``[B, 3, H, W]`` tensors,
    ``label`` a LongTensor and ``index`` a LongTensor; ``text`` stays a list (the
    training script tokenizes). A field absent from every item is ``None``; absent from
    only some items is an error, because silently dropping labels or control images
    for part of a batch would train the wrong thing.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    shapes = {tuple(it["pixel_values"].shape) for it in items}
    if len(shapes) > 1:
        raise ValueError(
            f"batch mixes image sizes {sorted(shapes)}; use AspectRatioBucketSampler so a batch "
            "shares one bucket, or train at a single resolution"
        )

    def optional(key: str, make) -> Any:
        values = [it.get(key) for it in items]
        present = [v is not None for v in values]
        if not any(present):
            return None
        if not all(present):
            missing = [int(it["index"]) for it, p in zip(items, present) if not p]
            raise ValueError(f"{key!r} is missing for examples {missing} but present for others in the batch")
        return make(values)

    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "text": [it.get("text") for it in items],
        "label": optional("label", lambda v: torch.tensor(v, dtype=torch.long)),
        "conditioning_pixel_values": optional("conditioning_pixel_values", torch.stack),
        "index": torch.tensor([int(it["index"]) for it in items], dtype=torch.long),
    }


# --------------------------------------------------------------------------- bucketing


def make_buckets(base_resolution: int, multiple: int = 16, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """Bucket sizes ``(width, height)`` with area close to ``base_resolution**2``.

    Both sides are multiples of ``multiple`` (pick the VAE factor times the patch size,
    e.g. 8 or 16, so every bucket patchifies exactly), aspect ratios stay within
    ``[1/max_aspect, max_aspect]``, the set is symmetric (every landscape bucket has its
    portrait twin) and contains the square. One bucket per short-side step keeps the
    count small, so batches do not fragment. Sorted by aspect ratio, narrowest first.
    """
    if multiple <= 0 or base_resolution <= 0:
        raise ValueError("base_resolution and multiple must be positive")
    if base_resolution % multiple:
        raise ValueError(f"base_resolution {base_resolution} must be a multiple of {multiple}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    area = base_resolution * base_resolution
    buckets: set[tuple[int, int]] = set()
    for short in range(multiple, base_resolution + 1, multiple):
        long = max(multiple, round(area / short / multiple) * multiple)
        if long < short or long / short > max_aspect + 1e-9:
            continue
        buckets.add((long, short))
        buckets.add((short, long))
    return sorted(buckets, key=lambda wh: (wh[0] / wh[1], wh[0]))


def nearest_bucket(width: int, height: int, buckets: Sequence[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is nearest (in log space, so 2:1 and 1:2
    are equally far from 1:1). Ties go to the earlier bucket, so assignment is stable."""
    if width <= 0 or height <= 0:
        raise ValueError(f"invalid image size {width}x{height}")
    target = math.log(width / height)
    dists = [abs(target - math.log(w / h)) for w, h in buckets]
    return int(min(range(len(buckets)), key=lambda i: (round(dists[i], 12), i)))


class AspectRatioBucketSampler(BatchSampler):
    """Yields batches of indices that all fall in one aspect-ratio bucket.

    Each image goes to the bucket with the nearest aspect ratio (:func:`nearest_bucket`
    over :func:`make_buckets`), so a wide photo is trained wide instead of having its
    sides cropped away. Order is a pure function of ``(seed, epoch)``: call
    :meth:`set_epoch` each epoch (as with ``DistributedSampler``) to reshuffle, and the
    same epoch always gives the same batches, which is what exact resume needs.

    ``sizes`` is a sequence of ``(width, height)`` or a dataset with ``image_sizes``; if
    that dataset has ``set_target_sizes`` (as :class:`ImageFolderDataset` does) it is
    told each example's bucket size here, so the crop the dataset makes always matches
    the batch the sampler forms.

    Distributed: with ``num_replicas > 1`` every rank builds the same global batch list
    and takes every ``num_replicas``-th batch starting at ``rank``, so ranks are disjoint
    and have equal length (the list is padded by repeating its first batches, or, with
    ``drop_last``, trimmed). Under ``accelerate``, leave ``num_replicas=1``:
    ``accelerator.prepare(dataloader)`` shards batch samplers itself.

    ``drop_last`` drops each bucket's incomplete last batch; otherwise it is yielded
    smaller.
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int]] | Any,
        batch_size: int,
        *,
        base_resolution: int | None = None,
        multiple: int = 16,
        max_aspect: float = 2.0,
        buckets: Sequence[tuple[int, int]] | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        dataset = None
        if hasattr(sizes, "image_sizes"):
            dataset = sizes
            sizes = dataset.image_sizes
            if base_resolution is None:
                base_resolution = getattr(dataset, "resolution", None)
        sizes = [(int(w), int(h)) for w, h in sizes]
        if not sizes:
            raise ValueError("AspectRatioBucketSampler needs at least one image")
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got {rank}/{num_replicas}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if buckets is None:
            if base_resolution is None:
                raise ValueError("pass base_resolution (or buckets, or a dataset with .resolution)")
            buckets = make_buckets(base_resolution, multiple, max_aspect)
        self.buckets: list[tuple[int, int]] = [(int(w), int(h)) for w, h in buckets]
        if not self.buckets:
            raise ValueError("no buckets")
        # torch's BatchSampler keeps these attributes; accelerate and friends read them.
        super().__init__(range(len(sizes)), batch_size, drop_last)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.epoch = 0
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.bucket_ids = np.array([nearest_bucket(w, h, self.buckets) for w, h in sizes], dtype=np.int64)
        self.target_sizes = [self.buckets[b] for b in self.bucket_ids]
        if dataset is not None and hasattr(dataset, "set_target_sizes"):
            dataset.set_target_sizes(self.target_sizes)

    @property
    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Examples per bucket size (only non-empty buckets), for logging."""
        counts = np.bincount(self.bucket_ids, minlength=len(self.buckets))
        return {self.buckets[i]: int(c) for i, c in enumerate(counts) if c}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _num_global_batches(self) -> int:
        counts = np.bincount(self.bucket_ids, minlength=len(self.buckets))
        if self.drop_last:
            return int(sum(c // self.batch_size for c in counts))
        return int(sum(-(-c // self.batch_size) for c in counts))

    def global_batches(self, epoch: int | None = None) -> list[list[int]]:
        """All ranks' batches for ``epoch`` (default: the current one), before splitting."""
        epoch = self.epoch if epoch is None else int(epoch)
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        for b in range(len(self.buckets)):
            idx = np.flatnonzero(self.bucket_ids == b)
            if self.shuffle:
                idx = rng.permutation(idx)
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                if len(chunk) < self.batch_size and self.drop_last:
                    break
                batches.append([int(i) for i in chunk])
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.global_batches()
        if self.num_replicas > 1:
            total = len(batches)
            if self.drop_last:
                batches = batches[: total - total % self.num_replicas]
            elif total % self.num_replicas and total:
                pad = self.num_replicas - total % self.num_replicas
                batches = batches + [batches[i % total] for i in range(pad)]
            batches = batches[self.rank :: self.num_replicas]
        yield from batches

    def __len__(self) -> int:
        total = self._num_global_batches()
        if self.num_replicas == 1:
            return total
        if self.drop_last:
            return total // self.num_replicas
        return -(-total // self.num_replicas)
