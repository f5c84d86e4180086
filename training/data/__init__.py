"""Training data: image folders in common layouts, bucketing, safe image loading,
the emoji dataset builder and the small word-level tokenizer.

Names are imported lazily so ``python -m training.data.emoji`` does not pay for
importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AspectRatioBucketSampler": "datasets",
    "DatasetWarning": "datasets",
    "FORMATS": "datasets",
    "IMAGE_EXTENSIONS": "datasets",
    "ImageFolderDataset": "datasets",
    "ImageRecord": "datasets",
    "SkippedItem": "datasets",
    "collate_image_batch": "datasets",
    "detect_format": "datasets",
    "make_buckets": "datasets",
    "nearest_bucket": "datasets",
    "open_image_folder": "datasets",
    "BadImageError": "images",
    "DEFAULT_MAX_PIXELS": "images",
    "check_image": "images",
    "load_image": "images",
    "to_rgb": "images",
    "build_word_tokenizer": "tokenizer",
    "build_emoji_dataset": "emoji",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
