"""Checkpoint converters: official DiT / diffusers DiT / PixArt-α/Σ files -> our diffusers-format models.

Files are recognised by their bytes and pickles are opened only with ``torch.load(weights_only=True)``
(``safe_load``); every conversion checks that each source key was used and each target parameter filled.
Command line: ``python -m dit.convert {dit,dit-diffusers,pixart} SRC OUT_DIR``.
"""

from .common import KeyMismatchError, load_strict
from .dit_original import (
    convert_diffusers_dit,
    convert_dit_original,
    diffusers_dit_config,
    diffusers_dit_to_ours,
    dit_original_config,
    dit_original_to_ours,
)
from .pixart_original import (
    PE_INTERPOLATION,
    convert_pixart_original,
    interpolation_scale_for,
    pixart_original_config,
    pixart_original_to_diffusers,
)
from .safe_load import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    expect_safetensors,
    load_checkpoint,
    sniff_format,
    unwrap_state_dict,
)

__all__ = [
    "PE_INTERPOLATION",
    "CheckpointFormatError",
    "KeyMismatchError",
    "UnsafeCheckpointError",
    "convert_diffusers_dit",
    "convert_dit_original",
    "convert_pixart_original",
    "diffusers_dit_config",
    "diffusers_dit_to_ours",
    "dit_original_config",
    "dit_original_to_ours",
    "expect_safetensors",
    "interpolation_scale_for",
    "load_checkpoint",
    "load_strict",
    "pixart_original_config",
    "pixart_original_to_diffusers",
    "sniff_format",
    "unwrap_state_dict",
]
