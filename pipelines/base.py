"""What every DiT Studio pipeline shares: input checks, seeds, the sampler loop, decoding, the output.

The loop is written once here and used by every generator, so classifier-free guidance, learned-sigma
handling, ``callback_on_step_end`` and cooperative interruption behave the same everywhere.
"""

from __future__ import annotations

import functools
import inspect
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .errors import InputError
from .schedulers import make_scheduler, scheduler_name

MAX_STEPS = 1000
MAX_SIDE = 4096
MAX_IMAGES = 64


@dataclass
class ImageGenerationOutput(BaseOutput):
    """Images plus what is needed to reproduce each one.

    ``seeds[i]`` is the seed of image ``i`` when the pipeline drew the noise from seeds (``seed=`` argument
    or none given); ``None`` when the caller passed its own ``generator``. ``records`` are
    ``pipelines.metadata.GenerationRecord`` objects, one per image, ready for ``save_png``.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    seeds: list[int] | None = None
    records: list[Any] = field(default_factory=list)
    interrupted: bool = False


def check_steps(num_inference_steps: Any) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise InputError(f"num_inference_steps must be an integer, got {num_inference_steps!r}.")
    if not 1 <= int(num_inference_steps) <= MAX_STEPS:
        raise InputError(f"num_inference_steps must be between 1 and {MAX_STEPS}, got {num_inference_steps}.")
    return int(num_inference_steps)


def check_guidance(guidance_scale: Any) -> float:
    try:
        value = float(guidance_scale)
    except (TypeError, ValueError):
        raise InputError(f"guidance_scale must be a number, got {guidance_scale!r}.") from None
    if not math.isfinite(value) or value < 0 or value > 100:
        raise InputError(f"guidance_scale must be a finite number between 0 and 100, got {guidance_scale!r}.")
    return value


def check_size(height: Any, width: Any, multiple: int) -> tuple[int, int]:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise InputError(f"{name} must be an integer number of pixels, got {value!r}.")
        if not multiple <= value <= MAX_SIDE:
            raise InputError(f"{name} must be between {multiple} and {MAX_SIDE} pixels, got {value}.")
        if value % multiple:
            lower, upper = value - value % multiple, value - value % multiple + multiple
            raise InputError(
                f"{name}={value} is not a multiple of {multiple} (VAE downsampling x patch size) for this model; "
                f"use {max(lower, multiple)} or {upper}."
            )
    return int(height), int(width)


def check_count(n: Any, what: str = "num_images_per_prompt") -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_IMAGES:
        raise InputError(f"{what} must be an integer between 1 and {MAX_IMAGES}, got {n!r}.")
    return int(n)


def make_generators(seed: int | Sequence[int] | None, count: int) -> tuple[list[torch.Generator], list[int]]:
    """One CPU generator per image, seeded ``seed + i`` (or the given list), so image ``i`` can be
    regenerated alone from its own seed, on any device (CPU noise is the same everywhere)."""
    if seed is None:
        seed = secrets.randbelow(2**32)
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        if not 0 <= seed < 2**63:
            raise InputError(f"seed must be a non-negative integer below 2**63, got {seed}.")
        seeds = [int(seed) + i for i in range(count)]
    else:
        seeds = [int(s) for s in seed]
        if len(seeds) != count:
            raise InputError(f"{len(seeds)} seeds were given for {count} images; give one seed per image or one seed.")
    return [torch.Generator("cpu").manual_seed(s) for s in seeds], seeds


def resolves_device_once(call: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a pipeline's ``__call__`` so ``_execution_device`` is looked up once per call.

    diffusers' ``_execution_device`` walks every module of every component looking for offloading hooks; a call
    asks for it several times (latents, the loop, records), which measured about 2% of a small model's call.
    Offloading is set up between calls, so one lookup per call sees the same hooks. Nested calls (a subclass
    calling ``super().__call__``) share the outer lookup.
    """

    @functools.wraps(call)
    def wrapper(self: DiTStudioPipeline, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_call_device", None) is not None:
            return call(self, *args, **kwargs)
        self._call_device = DiffusionPipeline._execution_device.fget(self)  # type: ignore[attr-defined]
        try:
            return call(self, *args, **kwargs)
        finally:
            self._call_device = None

    return wrapper


class DiTStudioPipeline(DiffusionPipeline):
    """Base of our pipelines: the shared sampler loop and helpers. Not a generator by itself."""

    _callback_tensor_inputs = ["latents"]
    kind: str = "generic"

    # ---- state diffusers users expect -------------------------------------------------------------
    @property
    def interrupt(self) -> bool:
        return getattr(self, "_interrupt", False)

    @property
    def _execution_device(self) -> torch.device:
        device = getattr(self, "_call_device", None)
        return device if device is not None else super()._execution_device

    def request_interrupt(self) -> None:
        """Ask a running call to stop after the current step (thread-safe: a plain flag)."""
        self._interrupt = True

    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        if vae is None:
            return 1
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def patch_size(self) -> int:
        return int(self.transformer.config.patch_size)

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def default_size(self) -> int:
        return int(self.transformer.config.sample_size) * self.vae_scale_factor

    def resolve_scheduler(self, name: str | None) -> SchedulerMixin:
        """The pipeline's scheduler, or a fresh one by name for this call only (concurrent calls are safe)."""
        if name is None:
            return self.scheduler
        return make_scheduler(name, self.scheduler.config)

    def scheduler_label(self, scheduler: SchedulerMixin) -> str:
        return scheduler_name(scheduler)

    # ---- the loop -----------------------------------------------------------------------------------
    def prepare_latents(
        self,
        shape: tuple[int, ...],
        generator: torch.Generator | list[torch.Generator] | None,
        scheduler: SchedulerMixin,
        dtype: torch.dtype,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * scheduler.init_noise_sigma

    def sample(
        self,
        latents: torch.Tensor,
        predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        scheduler: SchedulerMixin,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        guidance_channels: int | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        timesteps: list[int] | None = None,
        known_latents: torch.Tensor | None = None,
        known_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, bool]:
        """Run the scheduler loop; ``predict(x, t)`` returns the model output for a (CFG-doubled) batch.

        With guidance the batch is ``[uncond, cond]`` and ``eps = uncond + g * (cond - uncond)``; with
        ``guidance_channels=k`` only the first k channels are guided (original DiT guides 3 of 4). A second
        half of output channels (learned sigma) is dropped before the scheduler step. Returns the final
        latents and whether the loop was interrupted.

        ``known_latents`` with ``known_mask`` (broadcastable to the latents, True where the value is
        *generated*, False where it is given) re-impose clean given latents at every step: the model input
        carries ``known_latents`` wherever the mask is False (after ``scale_model_input``, so the model sees the
        clean values it was trained with, as VDT's sampler does), and the returned latents hold them exactly.
        """
        device = self._execution_device
        do_cfg = guidance_scale > 1.0
        if timesteps is not None:
            scheduler.set_timesteps(timesteps=timesteps, device=device)
        else:
            scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs: dict[str, Any] = {}
        params = set(inspect.signature(scheduler.step).parameters)
        if "eta" in params:
            step_kwargs["eta"] = eta
        if "generator" in params:
            step_kwargs["generator"] = generator
        channels = latents.shape[1]
        known = keep_mask = None
        if known_latents is not None:
            if known_mask is None:
                raise ValueError("known_latents needs known_mask (True where latents are generated)")
            known = known_latents.to(device=latents.device, dtype=latents.dtype)
            keep_mask = known_mask.to(latents.device).bool()
            if do_cfg:
                keep_mask = torch.cat([keep_mask.expand_as(known)] * 2)
        interrupted = False
        self._interrupt = False
        self._num_timesteps = len(scheduler.timesteps)
        with self.progress_bar(total=len(scheduler.timesteps)) as progress:
            for i, t in enumerate(scheduler.timesteps):
                if self.interrupt:
                    interrupted = True
                    break
                x_in = torch.cat([latents] * 2) if do_cfg else latents
                x_in = scheduler.scale_model_input(x_in, t)
                if known is not None:
                    x_in = torch.where(keep_mask, x_in, torch.cat([known] * 2) if do_cfg else known)
                t_in = t if torch.is_tensor(t) else torch.tensor(t, device=device)
                t_in = t_in.reshape(1).to(device).expand(x_in.shape[0])
                out = predict(x_in, t_in)
                if out.shape[1] == 2 * channels:
                    out = out[:, :channels]
                if do_cfg:
                    uncond, cond = out.chunk(2)
                    if guidance_channels is None:
                        out = uncond + guidance_scale * (cond - uncond)
                    else:
                        k = guidance_channels
                        guided = uncond[:, :k] + guidance_scale * (cond[:, :k] - uncond[:, :k])
                        out = torch.cat([guided, cond[:, k:]], dim=1)
                latents = scheduler.step(out, t, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = {"latents": latents}
                    feed = {k: local[k] for k in callback_on_step_end_tensor_inputs if k in local}
                    result = callback_on_step_end(self, i, t, feed) or {}
                    latents = result.get("latents", latents)
                progress.update()
        if self.interrupt:
            interrupted = True
        self._interrupt = False
        if known is not None:
            latents = torch.where(known_mask.to(latents.device).bool(), latents, known)
        return latents, interrupted

    # ---- decode -------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1]. Pixel-space models (no VAE) are their own decoder."""
        vae = getattr(self, "vae", None)
        if vae is None:
            return latents
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]

    @staticmethod
    def to_output_type(images: torch.Tensor, output_type: str) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        arr = images.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return arr
        return DiffusionPipeline.numpy_to_pil(arr)

    def model_identity(self) -> tuple[str, str | None]:
        """(name, short hash) of the loaded model, as recorded in PNG metadata."""
        name = getattr(self, "model_name", None) or self.config.get("_name_or_path") or "unknown"
        return str(name), getattr(self, "model_hash", None)

    def attention_label(self) -> str:
        """The attention variant in use; set by ``dit.attention.set_attention`` (default: SDPA)."""
        return getattr(self.transformer, "attention_variant", "sdpa")
