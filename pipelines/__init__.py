"""DiT Studio generators as diffusers pipelines, and the one way to load them."""

from .base import DiTStudioPipeline, ImageGenerationOutput
from .catalog import Catalog, default_catalog
from .class_to_image import ClassToImagePipeline
from .errors import InputError, ModelLoadError
from .loading import load_pipeline
from .schedulers import make_scheduler, scheduler_names
from .text_to_image import TextToImagePipeline

__all__ = [
    "Catalog",
    "ClassToImagePipeline",
    "DiTStudioPipeline",
    "ImageGenerationOutput",
    "InputError",
    "ModelLoadError",
    "TextToImagePipeline",
    "default_catalog",
    "load_pipeline",
    "make_scheduler",
    "scheduler_names",
]
