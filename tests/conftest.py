"""Shared fixtures: tiny pipelines saved in our own layout, as the UI, batch and training tests use them."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import tiny_class_pipeline, tiny_text_pipeline


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    """A catalog root holding ``tiny-t2i`` and ``tiny-c2i`` in diffusers pipeline layout."""
    root = tmp_path_factory.mktemp("models")
    tiny_text_pipeline().save_pretrained(root / "tiny-t2i")
    tiny_class_pipeline().save_pretrained(root / "tiny-c2i")
    return root


@pytest.fixture(scope="session")
def emoji_folder(tmp_path_factory) -> Path:
    """A small stand-in for ``data/emoji`` (which a fresh clone does not have): coloured discs on white, in the
    same layout (``metadata.jsonl`` with ``file_name``, ``text``, ``label``; ``classes.json``)."""
    import json

    import numpy as np
    from PIL import Image, ImageDraw

    root = tmp_path_factory.mktemp("emoji")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    names = ["smileys", "animals", "food"]
    rows = []
    for i in range(40):
        label = i % 3
        img = Image.new("RGB", (32, 32), "white")
        colour = tuple(int(c) for c in rng.integers(0, 230, 3))
        r = int(rng.integers(6, 14))
        cx, cy = (int(v) for v in rng.integers(r, 32 - r, 2))
        ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        img.save(root / "images" / f"{i:03d}.png")
        rows.append({"file_name": f"images/{i:03d}.png", "text": f"{names[label]} disc {i}", "label": label})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "classes.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}))
    return root
