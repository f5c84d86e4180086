"""Class-to-image pipeline for DiT: ours (``dit.DiTModel``) and stock diffusers DiT-XL-2 checkpoints,
with the same images as diffusers' ``DiTPipeline`` for the same arguments."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from dit.attention.grid import token_grid

from .base import (
    DiTStudioPipeline,
    ImageGenerationOutput,
    check_count,
    check_guidance,
    check_size,
    check_steps,
    make_generators,
    resolves_device_once,
)
from .errors import InputError
from .records import build_records


class ClassToImagePipeline(DiTStudioPipeline):
    """Class label(s) -> transformer sampling loop -> VAE (or pixels) -> images.

    ``id2label`` maps ids to comma-separated names (DiT's ImageNet convention), so labels can be given as
    ints or names. The null class is ``num_classes`` (1000 for ImageNet DiT). ``guidance_channels=3``
    reproduces the original DiT's sampling, which guides only the first three latent channels; the default
    guides all, as diffusers' ``DiTPipeline`` does.
    """

    kind = "class-to-image"
    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: Any, scheduler: Any, vae: Any = None, id2label: dict | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(id2label=id2label)
        self.labels: dict[str, int] = {}
        for key, value in (id2label or {}).items():
            for name in str(value).split(","):
                if name.strip():
                    self.labels[name.strip()] = int(key)
        self.labels = dict(sorted(self.labels.items()))

    @property
    def num_classes(self) -> int:
        cfg = self.transformer.config
        if "num_classes" in cfg:
            return int(cfg.num_classes)
        return int(cfg.get("num_embeds_ada_norm") or 1000)  # diffusers DiTTransformer2DModel

    def class_name(self, label: int) -> str | None:
        names = (self.config.id2label or {}).get(str(label)) or (self.config.id2label or {}).get(label)
        return str(names).split(",")[0].strip() if names else None

    def get_label_ids(self, labels: str | Sequence[str | int]) -> list[int]:
        """Ids for labels given as ints, numeric strings or names; unknown names get close-match hints."""
        items = [labels] if isinstance(labels, (str, int)) else list(labels)
        ids = []
        for item in items:
            if isinstance(item, bool):
                raise InputError(f"class label must be an int or a name, got {item!r}.")
            if isinstance(item, int) or (isinstance(item, str) and item.strip().isdigit()):
                idx = int(item)
                if not 0 <= idx < self.num_classes:
                    raise InputError(
                        f"class label {idx} is out of range: this model has classes 0..{self.num_classes - 1}."
                    )
                ids.append(idx)
                continue
            if not isinstance(item, str):
                raise InputError(f"class label must be an int or a name, got {item!r}.")
            if item.strip() in self.labels:
                ids.append(self.labels[item.strip()])
                continue
            hint = difflib.get_close_matches(item.strip(), list(self.labels), n=3)
            known = f" Did you mean: {', '.join(hint)}?" if hint else ""
            if not self.labels:
                known = f" This model has no class names; use an integer 0..{self.num_classes - 1}."
            raise InputError(f"unknown class {item!r}.{known}")
        if not ids:
            raise InputError("class_labels is empty; give at least one class.")
        return ids

    @torch.no_grad()
    @resolves_device_once
    def __call__(
        self,
        class_labels: int | str | list[int | str],
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | list[int] | None = None,
        scheduler: str | None = None,
        eta: float = 0.0,
        guidance_channels: int | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        timesteps: list[int] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> ImageGenerationOutput | tuple:
        """Generate ``num_images_per_prompt`` images per class label (see ``TextToImagePipeline`` for seeds)."""
        ids = self.get_label_ids(class_labels)
        steps = check_steps(num_inference_steps)
        guidance = check_guidance(guidance_scale)
        count = check_count(num_images_per_prompt)
        if guidance_channels is not None and not 1 <= guidance_channels <= self.latent_channels:
            raise InputError(f"guidance_channels must be between 1 and {self.latent_channels}.")
        sched = self.resolve_scheduler(scheduler)
        height = self.default_size() if height is None else height
        width = self.default_size() if width is None else width
        check_size(height, width, self.vae_scale_factor * self.patch_size)
        labels = [i for i in ids for _ in range(count)]
        total = len(labels)
        seeds = None
        if generator is None:
            generator, seeds = make_generators(seed, total)
        device = self._execution_device
        cond = torch.tensor(labels, device=device)
        do_cfg = guidance > 1.0
        label_input = torch.cat([torch.full_like(cond, self.num_classes), cond]) if do_cfg else cond
        shape = (total, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = self.prepare_latents(shape, generator, sched, self.transformer.dtype, latents)
        is_ours = "num_classes" in self.transformer.config

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            kwargs = {"attention_kwargs": attention_kwargs} if is_ours else {}
            # Window/proxy/agent attention processors read the token grid from here (stock models can't pass it).
            with token_grid((x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size), timestep=t):
                return self.transformer(x, timestep=t, class_labels=label_input, return_dict=False, **kwargs)[0]

        latents, interrupted = self.sample(
            latents,
            predict,
            sched,
            steps,
            guidance,
            generator=generator,
            eta=eta,
            guidance_channels=guidance_channels,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs or ["latents"],
            timesteps=timesteps,
        )
        images = latents if output_type == "latent" else self.to_output_type(self.decode(latents), output_type)
        self.maybe_free_model_hooks()
        records = build_records(
            self,
            count=total,
            seeds=seeds,
            scheduler=sched,
            class_labels=labels,
            class_names=[self.class_name(i) for i in labels],
            steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            extra={"guidance_channels": guidance_channels} if guidance_channels else None,
        )
        if not return_dict:
            return (images,)
        return ImageGenerationOutput(images=images, seeds=seeds, records=records, interrupted=interrupted)
