"""Validation grids: sample the fixed prompts/classes with fixed seeds so runs and steps are comparable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import TrainConfig


def image_grid(images: list[Image.Image], columns: int) -> Image.Image:
    w, h = images[0].size
    rows = (len(images) + columns - 1) // columns
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, img in enumerate(images):
        grid.paste(img, ((i % columns) * w, (i // columns) * h))
    return grid


def validation_images(pipe: Any, config: TrainConfig) -> list[Image.Image]:
    v = config.validation
    if config.kind == "text-to-image":
        out = pipe(
            list(v.prompts),
            num_images_per_prompt=v.images_per_prompt,
            num_inference_steps=v.steps,
            guidance_scale=v.guidance_scale,
            seed=v.seed,
        )
    else:
        classes = [c for c in v.classes if c < pipe.num_classes]
        out = pipe(
            classes,
            num_images_per_prompt=v.images_per_prompt,
            num_inference_steps=v.steps,
            guidance_scale=v.guidance_scale,
            seed=v.seed,
        )
    return out.images


def save_validation(pipe: Any, config: TrainConfig, step: int, tracker: Any = None) -> Path:
    images = validation_images(pipe, config)
    grid = image_grid(images, columns=config.validation.images_per_prompt * 4)
    path = Path(config.output_dir) / "validation" / f"step-{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    if tracker is not None:
        tracker.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    return path
