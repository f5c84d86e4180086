"""DiT Studio backbones: diffusers ``ModelMixin`` models built from one set of blocks.

The top-level names are import names so a saved ``model_index.json`` can say
``"transformer": ["dit", "TextDiTModel"]`` and load with plain ``DiffusionPipeline.from_pretrained``.
"""

from .models.dimr import DiMRModel, dimr_config
from .models.dit import DIT_SIZES, DiTModel, dit_config
from .models.pt_dit import PTDiTClassModel, PTDiTModel
from .models.text_dit import TextDiTModel

__all__ = [
    "DIT_SIZES",
    "DiMRModel",
    "DiTModel",
    "PTDiTClassModel",
    "PTDiTModel",
    "TextDiTModel",
    "dimr_config",
    "dit_config",
]
