"""Text-to-image pipeline for PixArt-style transformers: ours (``dit.TextDiTModel``) and stock diffusers
PixArt-α/Σ checkpoints, with the same images as diffusers' own PixArt pipelines for the same arguments."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.image_processor import PixArtImageProcessor
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
    ASPECT_RATIO_256_BIN,
    ASPECT_RATIO_512_BIN,
    ASPECT_RATIO_1024_BIN,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN

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

MAX_PROMPT_CHARS = 4000
_BINS = {256: ASPECT_RATIO_2048_BIN, 128: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_256_BIN}


class TextToImagePipeline(DiTStudioPipeline):
    """Prompt -> text encoder -> transformer sampling loop -> VAE (or pixels) -> images.

    ``max_sequence_length`` is 120 for PixArt-α, 300 for PixArt-Σ and our defaults' own length;
    ``use_resolution_binning`` maps a requested size to the nearest trained aspect-ratio bin and resizes
    back, as PixArt does (on by default for stock PixArt checkpoints).
    """

    kind = "text-to-image"
    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        transformer: Any,
        scheduler: Any,
        vae: Any = None,
        max_sequence_length: int = 120,
        use_resolution_binning: bool = False,
    ):
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler, vae=vae
        )
        self.register_to_config(max_sequence_length=max_sequence_length, use_resolution_binning=use_resolution_binning)
        self.image_processor = PixArtImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ---- text ---------------------------------------------------------------------------------------
    def _encode(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        device = self._execution_device
        mask = tokens.attention_mask.to(device)
        embeds = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return embeds, mask

    def encode_prompt(
        self,
        prompt: list[str],
        negative_prompt: list[str] | None,
        num_images_per_prompt: int,
        max_sequence_length: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Prompt (and negative prompt) embeddings and masks, repeated per image. An empty negative prompt is
        encoded like any other text: PixArt's diffusers pipelines use T5("") as the unconditional input."""
        embeds, mask = self._encode(prompt, max_sequence_length)
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.transformer.dtype
        embeds = embeds.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
        mask = mask.repeat_interleave(num_images_per_prompt, dim=0)
        if negative_prompt is None:
            return embeds, mask, None, None
        neg, neg_mask = self._encode(negative_prompt, embeds.shape[1])
        neg = neg.to(dtype).repeat_interleave(num_images_per_prompt, dim=0)
        return embeds, mask, neg, neg_mask.repeat_interleave(num_images_per_prompt, dim=0)

    # ---- checks -------------------------------------------------------------------------------------
    @staticmethod
    def _prompts(prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None) -> tuple[list, list]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if prompt is not None else []
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise InputError("prompt must be a non-empty string or a list of strings.")
        for p in prompts:
            if len(p) > MAX_PROMPT_CHARS:
                raise InputError(f"prompt is {len(p)} characters long; the limit is {MAX_PROMPT_CHARS}.")
        negative_prompt = "" if negative_prompt is None else negative_prompt
        negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negs) != len(prompts):
            raise InputError(f"{len(negs)} negative prompts were given for {len(prompts)} prompts.")
        if any(len(n) > MAX_PROMPT_CHARS for n in negs):
            raise InputError(f"negative prompt is longer than {MAX_PROMPT_CHARS} characters.")
        return prompts, negs

    @torch.no_grad()
    @resolves_device_once
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = "",
        num_inference_steps: int = 20,
        guidance_scale: float = 4.5,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | list[int] | None = None,
        scheduler: str | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        use_resolution_binning: bool | None = None,
        max_sequence_length: int | None = None,
        timesteps: list[int] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clean_caption: bool = False,
    ) -> ImageGenerationOutput | tuple:
        """Generate images for ``prompt``.

        Noise comes from ``generator`` when given (diffusers semantics), else from CPU generators seeded
        ``seed + i`` per image (a random seed when none is given); the seeds used are in the output.
        ``scheduler`` picks a sampler by name for this call only. ``clean_caption`` is accepted for
        signature compatibility with diffusers' PixArt pipelines; caption cleaning is not implemented.
        """
        if clean_caption:
            raise InputError("clean_caption=True is not supported; pass the prompt as you want it encoded.")
        prompts, negs = self._prompts(prompt, negative_prompt)
        steps = check_steps(num_inference_steps)
        guidance = check_guidance(guidance_scale)
        count = check_count(num_images_per_prompt)
        sched = self.resolve_scheduler(scheduler)
        height = self.default_size() if height is None else height
        width = self.default_size() if width is None else width
        check_size(height, width, self.vae_scale_factor * self.patch_size)
        binning = self.config.use_resolution_binning if use_resolution_binning is None else use_resolution_binning
        orig_height, orig_width = height, width
        if binning:
            bins = _BINS.get(int(self.transformer.config.sample_size))
            if bins is None:
                raise InputError(
                    "use_resolution_binning needs a PixArt sample size (32, 64, 128 or 256 latents); "
                    f"this model has {self.transformer.config.sample_size}. Pass use_resolution_binning=False."
                )
            height, width = self.image_processor.classify_height_width_bin(height, width, ratios=bins)
        max_len = max_sequence_length or self.config.max_sequence_length
        total = len(prompts) * count
        seeds = None
        if generator is None:
            generator, seeds = make_generators(seed, total)

        do_cfg = guidance > 1.0
        embeds, mask, neg, neg_mask = self.encode_prompt(prompts, negs if do_cfg else None, count, max_len)
        if do_cfg:
            embeds, mask = torch.cat([neg, embeds]), torch.cat([neg_mask, mask])

        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if getattr(self.transformer, "use_additional_conditions", False):
            res = torch.tensor([height, width]).repeat(total, 1).to(embeds.dtype).to(self._execution_device)
            ar = torch.tensor([float(height / width)]).repeat(total, 1).to(embeds.dtype).to(self._execution_device)
            if do_cfg:
                res, ar = torch.cat([res, res]), torch.cat([ar, ar])
            added = {"resolution": res, "aspect_ratio": ar}

        shape = (total, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        latents = self.prepare_latents(shape, generator, sched, embeds.dtype, latents)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            # Window/proxy/agent attention processors read the token grid from here (stock models can't pass it).
            with token_grid((x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size), timestep=t):
                return self.transformer(
                    x,
                    encoder_hidden_states=embeds,
                    encoder_attention_mask=mask,
                    timestep=t,
                    added_cond_kwargs=added,
                    cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=False,
                )[0]

        latents, interrupted = self.sample(
            latents,
            predict,
            sched,
            steps,
            guidance,
            generator=generator,
            eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs or ["latents"],
            timesteps=timesteps,
        )
        if output_type == "latent":
            images = latents
        else:
            decoded = self.decode(latents)
            if binning:
                decoded = self.image_processor.resize_and_crop_tensor(decoded, orig_width, orig_height)
            images = self.to_output_type(decoded, output_type)
        self.maybe_free_model_hooks()
        records = build_records(
            self,
            count=total,
            seeds=seeds,
            scheduler=sched,
            prompts=[p for p in prompts for _ in range(count)],
            negative_prompts=[n for n in negs for _ in range(count)],
            steps=steps,
            guidance_scale=guidance,
            height=orig_height,
            width=orig_width,
        )
        if not return_dict:
            return (images,)
        return ImageGenerationOutput(images=images, seeds=seeds, records=records, interrupted=interrupted)
