"""Which pipeline classes DiT Studio serves, and the kind of generator each is.

The catalog reads a model directory's ``model_index.json`` ``_class_name`` and asks this registry for its
kind (which UI tab, which batch rows); ``load_pipeline`` asks it for the class. A new generator (VAR, video,
3D, control) adds one line to ``BUILTIN`` or calls ``register_pipeline``; nothing else in the loading code or
the UI core changes. Classes are imported lazily, so listing the catalog does not import every backend.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class PipelineSpec:
    class_name: str
    kind: str  # "text-to-image", "class-to-image", "video", "point-cloud", ...
    target: str | None  # "module:Class" of our implementation; None for stock diffusers pipelines we wrap
    stock: bool = False


BUILTIN: list[PipelineSpec] = [
    PipelineSpec("TextToImagePipeline", "text-to-image", "pipelines.text_to_image:TextToImagePipeline"),
    PipelineSpec("ClassToImagePipeline", "class-to-image", "pipelines.class_to_image:ClassToImagePipeline"),
    PipelineSpec("PointCloudPipeline", "point-cloud", "pipelines.point_cloud:PointCloudPipeline"),
    PipelineSpec("VideoPipeline", "video", "pipelines.video:VideoPipeline"),
    PipelineSpec("ControlTextToImagePipeline", "control", "pipelines.control:ControlTextToImagePipeline"),
    PipelineSpec("PixArtAlphaPipeline", "text-to-image", None, stock=True),
    PipelineSpec("PixArtSigmaPipeline", "text-to-image", None, stock=True),
    PipelineSpec("DiTPipeline", "class-to-image", None, stock=True),
    PipelineSpec("VARPipeline", "class-to-image", "pipelines.var:VARPipeline"),
]

_REGISTRY: dict[str, PipelineSpec] = {spec.class_name: spec for spec in BUILTIN}


def register_pipeline(class_name: str, kind: str, target: str) -> None:
    """Serve pipelines whose ``model_index.json`` says ``_class_name: class_name`` with ``target``."""
    _REGISTRY[class_name] = PipelineSpec(class_name, kind, target)


def spec_for(class_name: str) -> PipelineSpec | None:
    return _REGISTRY.get(class_name)


def kind_of(class_name: str) -> str | None:
    spec = _REGISTRY.get(class_name)
    return spec.kind if spec else None


def pipeline_class(class_name: str) -> type:
    spec = _REGISTRY[class_name]
    if spec.target is None:
        raise KeyError(f"{class_name} is a stock diffusers pipeline; load_pipeline wraps it")
    module, _, name = spec.target.partition(":")
    return getattr(importlib.import_module(module), name)


def served_class_names() -> list[str]:
    return sorted(_REGISTRY)
