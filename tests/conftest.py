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
