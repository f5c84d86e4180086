"""VAR (next-scale prediction) as a class-to-image pipeline: class label(s) -> token pyramid -> VQ-VAE -> images.

VAR has no noise schedule, so there is no scheduler loop: the loop runs over the *scales* of the token pyramid
(10 at 256 px). Everything else is the shared machinery of ``DiTStudioPipeline``: per-image CPU seeds
(``make_generators``), the same input checks, one ``GenerationRecord`` per image, ``progress_bar`` (one tick
per scale), ``callback_on_step_end`` (once per scale, ``latents`` = the running ``f_hat``, so previews decode
the image as it sharpens) and ``request_interrupt``.

Sampling follows VAR's ``autoregressive_infer_cfg``:

* classifier-free guidance on logits with the batch doubled as ``[cond, uncond]``, ramped linearly over the
  scales: at scale k of K, ``t = guidance_scale * k / (K-1)`` and ``logits = (1+t) cond - t uncond``. So
  ``guidance_scale`` is VAR's ``cfg`` (0 = off; the README's FID setting is 1.5, its demo uses 4), not the
  ``uncond + g (cond - uncond)`` scale of the diffusion pipelines: at the last scale it equals ``g = 1 + cfg``.
* top-k then top-p filtering (VAR's ``sample_with_top_k_top_p_``), then one multinomial draw per token from
  each image's own generator, so image i depends only on its own seed (for one image this is exactly the
  official sampler's random stream);
* the KV cache: each scale feeds only its own tokens and attends to the cached keys of all coarser scales.
  ``use_kv_cache=False`` re-runs the whole prefix under the block-causal mask instead (same tokens; for
  testing and the benchmark);
* optional ``more_smooth`` (VAR's Gumbel-softmax soft codes, for visualisation only).

Zero-shot editing (in-painting, out-painting, class-conditional editing) is VAR's teacher forcing of known
tokens: ``image`` is tokenised by the VQ-VAE and, at *every* scale, tokens outside ``mask_image`` are replaced
by the image's own tokens before they feed the next scale, so the generated region is conditioned on its
surroundings at every resolution. ``mask_image`` follows diffusers' convention: white = regenerate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.image_processor import VaeImageProcessor

from dit.models.var import VARKVCache, block_causal_mask

from .base import (
    DiTStudioPipeline,
    ImageGenerationOutput,
    check_count,
    check_guidance,
    check_steps,
    make_generators,
    resolves_device_once,
)
from .class_to_image import ClassToImagePipeline
from .errors import InputError
from .records import build_records
from .schedulers import scheduler_names

SCHEDULER_LABEL = "next-scale"


def filter_top_k_top_p(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """VAR's ``sample_with_top_k_top_p_`` filter (not in place): ``-inf`` outside the top-k / the nucleus.

    Top-k keeps every logit >= the k-th largest (ties kept); top-p sorts ascending and removes the tokens whose
    cumulative probability is <= 1 - p, always keeping the most likely one.
    """
    logits = logits.clone()
    vocab = logits.shape[-1]
    if top_k > 0 and top_k < vocab:
        kth = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum_(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(sorted_idx.ndim - 1, sorted_idx, remove), -torch.inf)
    return logits


def sample_tokens(logits: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One multinomial draw per token, image b from ``generators[b]`` on the CPU (device-independent)."""
    probs = logits.softmax(dim=-1).float().cpu()
    rows = [
        torch.multinomial(probs[b], num_samples=1, replacement=True, generator=g)[:, 0]
        for b, g in enumerate(generators)
    ]
    return torch.stack(rows).to(logits.device)


def gumbel_soft_codes(
    logits: torch.Tensor, tau: float, generators: Sequence[torch.Generator | None], codebook: torch.Tensor
) -> torch.Tensor:
    """VAR's ``more_smooth``: Gumbel-softmax (soft) mixtures of codes, noise from each image's generator."""
    out = []
    for b, g in enumerate(generators):
        noise = -torch.empty(logits[b].shape, dtype=logits.dtype).exponential_(generator=g).log()
        y = ((logits[b] + noise.to(logits.device)) / tau).softmax(-1)
        out.append(y @ codebook.to(y.dtype))
    return torch.stack(out)


class VARPipeline(DiTStudioPipeline):
    """Class-conditional VAR generator (``kind = "class-to-image"``: the UI's class tab and the batch CLI
    serve it like the DiT pipelines). Components: ``transformer`` (``dit.models.var.VARTransformer``) and
    ``vae`` (``dit.models.var_vqvae.VARVQVAE``); no scheduler."""

    kind = "class-to-image"
    model_cpu_offload_seq = "transformer->vae"
    _callback_tensor_inputs = ["latents"]

    # Label handling is the class pipeline's (ids, numeric strings or names with close-match hints).
    num_classes = ClassToImagePipeline.num_classes
    class_name = ClassToImagePipeline.class_name
    get_label_ids = ClassToImagePipeline.get_label_ids

    def __init__(self, transformer: Any, vae: Any, id2label: dict | None = None):
        super().__init__()
        self.register_modules(transformer=transformer, vae=vae)
        self.register_to_config(id2label=id2label)
        self.labels: dict[str, int] = {}
        for key, value in (id2label or {}).items():
            for name in str(value).split(","):
                if name.strip():
                    self.labels[name.strip()] = int(key)
        self.labels = dict(sorted(self.labels.items()))
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_convert_rgb=True)
        self.mask_processor = VaeImageProcessor(
            vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    # ---- what the base class reads from a diffusion transformer ------------------------------------------
    @property
    def patch_size(self) -> int:
        return 1

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.latent_channels)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return tuple(int(p) for p in self.transformer.config.patch_nums)

    @property
    def num_scales(self) -> int:
        """VAR's number of steps: one per scale, fixed by the model."""
        return len(self.patch_nums)

    def scheduler_label(self, scheduler: Any) -> str:
        return SCHEDULER_LABEL

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``f_hat`` -> images in [-1, 1] (the VQ-VAE decoder; also what previews call on each scale)."""
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    # ---- editing inputs -------------------------------------------------------------------------------------
    def edit_masks(self, mask_image: Any, count: int, size: int) -> list[torch.Tensor]:
        """Per scale, (count, 1, pn, pn) floats: 1 where the source image's tokens are kept.

        The pixel mask (white = regenerate) is reduced to the last token map (a token is kept when most of it
        is known) and then resized per scale as VAR's demo does (bilinear, > 0.5); scales of at most 3 tokens
        are always taken from the image (VAR's ``replace_embedding``).
        """
        regen = self.mask_processor.preprocess(mask_image, height=size, width=size)
        if regen.shape[0] not in (1, count):
            raise InputError(f"mask_image has {regen.shape[0]} masks for {count} images; give one, or one per image.")
        keep = 1 - regen.float().expand(count, -1, -1, -1)
        side = self.patch_nums[-1]
        keep = (F.interpolate(keep, size=(side, side), mode="area") > 0.5).float()
        masks = []
        for pn in self.patch_nums:
            m = (F.interpolate(keep, size=(pn, pn), mode="bilinear", align_corners=False) > 0.5).float()
            masks.append(torch.ones_like(m) if pn * pn <= 3 else m)
        return masks

    def source_tokens(self, image: Any, count: int, size: int) -> tuple[list[torch.Tensor], str]:
        """The image to edit as a token pyramid (count, pn*pn) per scale, plus a short content hash."""
        pixels = self.image_processor.preprocess(image, height=size, width=size)
        if pixels.shape[0] not in (1, count):
            raise InputError(f"image has {pixels.shape[0]} images for {count} outputs; give one, or one per image.")
        digest = hashlib.sha256(pixels.float().numpy().tobytes()).hexdigest()[:12]
        pixels = pixels.expand(count, -1, -1, -1).to(self._execution_device, self.vae.dtype)
        return self.vae.image_to_ids(pixels), digest

    # ---- the call -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    @resolves_device_once
    def __call__(
        self,
        class_labels: int | str | list[int | str],
        guidance_scale: float = 4.0,
        top_k: int = 900,
        top_p: float = 0.95,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | list[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        scheduler: str | None = None,
        more_smooth: bool = False,
        image: Any = None,
        mask_image: Any = None,
        use_kv_cache: bool = True,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImageGenerationOutput | tuple:
        """Generate ``num_images_per_prompt`` images per class label.

        ``num_inference_steps`` and ``scheduler`` are accepted so the UI, the batch CLI and generation records
        drive VAR like the diffusion pipelines, and are ignored: VAR always runs one step per scale of its
        pyramid (recorded as ``steps``), and its "scheduler" is next-scale prediction. ``height``/``width``
        may only be the model's own size. ``image`` + ``mask_image`` edit an image (module docstring).
        """
        ids = self.get_label_ids(class_labels)
        cfg = check_guidance(guidance_scale)
        count = check_count(num_images_per_prompt)
        if num_inference_steps is not None:
            check_steps(num_inference_steps)
        if scheduler not in (None, "", "default", SCHEDULER_LABEL) and scheduler not in scheduler_names():
            raise InputError(
                f"Unknown scheduler {scheduler!r}; VAR ignores the scheduler (it predicts scale by scale)."
            )
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise InputError(f"top_k must be a non-negative integer (0 = off), got {top_k!r}.")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 <= float(top_p) <= 1:
            raise InputError(f"top_p must be a number between 0 and 1 (0 = off), got {top_p!r}.")
        size = self.default_size()
        for name, value in (("height", height), ("width", width)):
            if value is not None and value != size:
                raise InputError(
                    f"{name}={value}: VAR generates only at its trained size ({size}x{size}); its token pyramid "
                    f"{self.patch_nums} is fixed. Leave {name} empty or use {size}."
                )
        unknown = set(callback_on_step_end_tensor_inputs or []) - set(self._callback_tensor_inputs)
        if unknown:
            raise InputError(f"callback_on_step_end_tensor_inputs may only name {self._callback_tensor_inputs}.")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise InputError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        if (image is None) != (mask_image is None):
            raise InputError("Editing needs both image and mask_image (white = regenerate); give both or neither.")
        labels = [i for i in ids for _ in range(count)]
        total = len(labels)
        seeds = None
        if generator is None:
            generator, seeds = make_generators(seed, total)
        gens = list(generator) if isinstance(generator, (list, tuple)) else [generator] * total
        if len(gens) != total:
            raise InputError(f"{len(gens)} generators were given for {total} images; give one per image.")

        device = self._execution_device
        model, quant = self.transformer, self.vae.quantize
        source = keep = None
        extra: dict[str, Any] = {"top_k": int(top_k), "top_p": float(top_p)}
        if more_smooth:
            extra["more_smooth"] = True
        if image is not None:
            source, digest = self.source_tokens(image, total, size)
            keep = [m.to(device, self.vae.dtype) for m in self.edit_masks(mask_image, total, size)]
            extra["_edit"] = {"image_sha256": digest, "masked_tokens": int((keep[-1] == 0).sum())}

        do_cfg = cfg > 0
        cond = model.class_condition(torch.tensor(labels, device=device))
        if do_cfg:
            null = model.class_condition(torch.full((total,), model.config.num_classes, device=device))
            cond = torch.cat([cond, null])
        side, k_last = self.patch_nums[-1], self.num_scales - 1
        f_hat = torch.zeros(total, self.latent_channels, side, side, device=device, dtype=self.vae.dtype)
        tokens = model.start_tokens(cond)
        cache = VARKVCache() if use_kv_cache else None
        prefix = None
        interrupted = False
        self._interrupt = False
        self._num_timesteps = self.num_scales
        with self.progress_bar(total=self.num_scales) as progress:
            for si, pn in enumerate(self.patch_nums):
                if self.interrupt:
                    interrupted = True
                    break
                if cache is not None:
                    logits = model.logits(tokens, cond, kv_cache=cache)
                else:
                    prefix = tokens if prefix is None else torch.cat([prefix, tokens], dim=1)
                    mask = block_causal_mask(self.patch_nums[: si + 1], device, prefix.dtype)
                    logits = model.logits(prefix, cond, mask, last=pn * pn)
                ratio = si / k_last if k_last else 0.0
                if do_cfg:
                    t = cfg * ratio
                    logits = (1 + t) * logits[:total] - t * logits[total:]
                logits = filter_top_k_top_p(logits, int(top_k), float(top_p))
                idx = sample_tokens(logits, gens)
                if more_smooth:
                    tau = max(0.27 * (1 - ratio * 0.95), 0.005)  # VAR's schedule (from MaskGIT)
                    h = gumbel_soft_codes(logits.mul(1 + ratio), tau, gens, quant.embedding.weight)
                else:
                    h = quant.embedding(idx)
                h = h.transpose(1, 2).reshape(total, self.latent_channels, pn, pn).to(f_hat.dtype)
                if source is not None:
                    known = quant.embedding(source[si]).transpose(1, 2).reshape_as(h).to(h.dtype)
                    h = known * keep[si] + h * (1 - keep[si])
                f_hat, next_map = quant.next_input(si, f_hat, h)
                if callback_on_step_end is not None:
                    local = {"latents": f_hat}
                    names = callback_on_step_end_tensor_inputs or ["latents"]
                    result = callback_on_step_end(self, si, pn, {k: local[k] for k in names if k in local}) or {}
                    if result.get("latents") is not None and result["latents"] is not f_hat:
                        f_hat = result["latents"]
                        if si < k_last:
                            nxt = self.patch_nums[si + 1]
                            next_map = F.interpolate(f_hat, size=(nxt, nxt), mode="area")
                if si < k_last:
                    tokens = model.scale_tokens(next_map.to(model.dtype), si + 1)
                    if do_cfg:
                        tokens = tokens.repeat(2, 1, 1)
                progress.update()
        if self.interrupt:
            interrupted = True
        self._interrupt = False
        images = f_hat if output_type == "latent" else self.to_output_type(self.decode(f_hat), output_type)
        self.maybe_free_model_hooks()
        records = build_records(
            self,
            count=total,
            seeds=seeds,
            scheduler=None,
            class_labels=labels,
            class_names=[self.class_name(i) for i in labels],
            steps=self.num_scales,
            guidance_scale=cfg,
            height=size,
            width=size,
            extra=extra,
        )
        if not return_dict:
            return (images,)
        return ImageGenerationOutput(images=images, seeds=seeds, records=records, interrupted=interrupted)
