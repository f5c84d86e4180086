"""``load_pipeline``: a catalog name, a local directory or a hub id -> a ready DiT Studio pipeline.

Stock diffusers PixArt-α/Σ and DiT directories are loaded with diffusers and re-wrapped in our pipelines
(same components, our sampler loop, records and validation); our own directories load through their
pipeline class (``TextToImagePipeline.from_pretrained`` works too), whose components name importable
modules (``["dit.models.text_dit", "TextDiTModel"]``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from .base import DiTStudioPipeline
from .catalog import Catalog, default_catalog, read_model_index
from .class_to_image import ClassToImagePipeline
from .errors import ModelLoadError
from .metadata import directory_hash
from .registry import pipeline_class, served_class_names, spec_for
from .schedulers import make_scheduler
from .text_to_image import TextToImagePipeline

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

STOCK_TEXT = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


def resolve_model_path(name_or_path: str | Path, catalog: Catalog | None = None) -> Path:
    """Catalog name -> its directory; existing directory -> itself; ``org/name`` -> hub snapshot."""
    text = str(name_or_path)
    catalog = catalog or default_catalog()
    if text in catalog:
        return catalog.get(text).path
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path} is a file; give the pipeline directory that holds model_index.json.")
        return path
    if _HUB_ID.match(text):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
        except Exception as e:  # offline, unknown repo, auth
            raise ModelLoadError(
                f"Could not fetch {text!r} from the model hub ({type(e).__name__}: {e}). On a machine without "
                "network access, download it elsewhere and pass the local directory."
            ) from None
    known = ", ".join(catalog.names()) or "none"
    raise ModelLoadError(f"{text!r} is neither a catalog model ({known}), a local directory, nor a hub id.")


def check_weight_files(path: Path) -> None:
    """Refuse a pickle disguised as ``.safetensors`` (or a corrupt one) before any model is built."""
    from dit.convert.safe_load import expect_safetensors

    for f in sorted(path.rglob("*.safetensors")):
        try:
            expect_safetensors(f)
        except ValueError as e:
            raise ModelLoadError(str(e)) from None


def load_pipeline(
    name_or_path: str | Path,
    torch_dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    scheduler: str | None = None,
    catalog: Catalog | None = None,
    **kwargs: Any,
) -> DiTStudioPipeline:
    """Load a generator by catalog name, local directory or hub id, ready to call.

    ``scheduler`` replaces the model's default sampler by name (see ``pipelines.schedulers``).
    """
    path = resolve_model_path(name_or_path, catalog)
    index = read_model_index(path)
    check_weight_files(path)
    class_name = index["_class_name"]
    load_kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    load_kwargs.update(kwargs)
    try:
        if class_name in STOCK_TEXT:
            stock = DiffusionPipeline.from_pretrained(path, **load_kwargs)
            c = stock.components
            pipe = TextToImagePipeline(
                tokenizer=c["tokenizer"],
                text_encoder=c["text_encoder"],
                transformer=c["transformer"],
                scheduler=c["scheduler"],
                vae=c["vae"],
                max_sequence_length=STOCK_TEXT[class_name],
                use_resolution_binning=True,
            )
        elif class_name == "DiTPipeline":
            stock = DiffusionPipeline.from_pretrained(path, **load_kwargs)
            pipe = ClassToImagePipeline(
                transformer=stock.transformer, scheduler=stock.scheduler, vae=stock.vae, id2label=index.get("id2label")
            )
        elif (spec := spec_for(class_name)) is not None and not spec.stock:
            pipe = pipeline_class(class_name).from_pretrained(path, **load_kwargs)
        else:
            raise ModelLoadError(
                f"{path} holds a {class_name}, which DiT Studio does not serve. Served: "
                f"{', '.join(served_class_names())}."
            )
    except ModelLoadError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelLoadError(f"Could not load the model in {path}: {type(e).__name__}: {e}") from None
    pipe.model_name = str(name_or_path)
    transformer_dir = path / "transformer"
    pipe.model_hash = directory_hash(transformer_dir if transformer_dir.is_dir() else path)
    if scheduler is not None:
        pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    if device is not None:
        pipe.to(device)
    return pipe
