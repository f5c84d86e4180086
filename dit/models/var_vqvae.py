"""VAR's multi-scale residual VQ-VAE (FoundationVision/VAR ``models/vqvae.py``, ``quant.py``, ``basic_vae.py``).

An image is encoded once by a VQGAN CNN into a feature map ``f`` (C_vae x h x w) and quantised as a *pyramid*
of token maps with one shared codebook: for each scale ``k`` (side ``pn_k``), the residual ``f - f_hat`` is
area-downsampled to ``pn_k x pn_k``, snapped to its nearest code, upsampled back (bicubic), refined by a small
convolution ``phi`` and added to ``f_hat``. The decoder sees only the final ``f_hat``. The transformer
(``dit.models.var``) predicts these token maps coarse to fine.

The CNN halves are diffusers' ``Encoder``/``Decoder`` (``AttnDownEncoderBlock2D`` at the lowest resolution, the
mid block with attention): that is exactly the VQGAN-f16 layout VAR uses (GroupNorm(32, eps 1e-6), SiLU,
nearest-upsample + conv, the asymmetric ``(0,1,0,1)``-pad stride-2 downsample conv, one-head attention), so
we add no second copy of those blocks. ``dit.convert.var_original`` maps the official names onto them and the
equivalence is checked against the official code (see docs/var.md).

Config names follow diffusers' ``VQModel`` where the idea is the same (``block_out_channels`` = VAR's
``ch * ch_mult``, ``layers_per_block`` = ``num_res_blocks``, ``latent_channels`` = ``Cvae``), so pipeline code
that reads a VAE's downsampling factor from ``block_out_channels`` works unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import Decoder, DecoderOutput, Encoder
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

#: Patch-number schedules of the released models (``utils/arg_util.py`` of VAR): image side -> token-map sides.
PATCH_NUMS: dict[int, tuple[int, ...]] = {
    256: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}


def patch_nums_for(resolution: int) -> tuple[int, ...]:
    """VAR's schedule for a released resolution (256, 512 or 1024 px, f16 VQ-VAE)."""
    if resolution not in PATCH_NUMS:
        raise ValueError(f"VAR has patch-number schedules for {sorted(PATCH_NUMS)} px, not {resolution}")
    return PATCH_NUMS[resolution]


def phi_ticks(count: int) -> np.ndarray:
    """Where each of ``count`` partially shared phi convs sits on [0, 1] (VAR's ``PhiPartiallyShared``).

    The official code uses ``linspace(1/3K, 1-1/3K)`` for K=4 (the released setting) and ``1/2K`` margins
    otherwise; scale ``k`` of ``S`` uses the conv whose tick is nearest to ``k / (S-1)`` (first on ties).
    """
    if count == 4:
        return np.linspace(1 / 3 / count, 1 - 1 / 3 / count, count)
    return np.linspace(1 / 2 / count, 1 - 1 / 2 / count, count)


class Phi(nn.Conv2d):
    """``phi(h) = (1 - r) * h + r * conv3x3(h)``: the residual refinement applied to each upsampled scale."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, kernel_size=3, stride=1, padding=1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul(self.ratio)


@dataclass
class VQOutput(BaseOutput):
    """Training forward of the VQ-VAE: reconstruction, the VQ (codebook + commitment) loss, codebook usage.

    ``usage`` is the percentage of codes used per scale (VAR's ``ret_usages``), from the running hit counts.
    """

    sample: torch.Tensor
    vq_loss: torch.Tensor
    usage: list[float] | None = None


class MultiScaleQuantizer(nn.Module):
    """VAR's ``VectorQuantizer2``: residual quantisation over a pyramid of scales with one shared codebook.

    ``share_quant_resi``: 0 = one phi per scale, 1 = one phi for all scales, n > 1 = n phis picked by
    ``phi_ticks`` (4 in the released model). ``quant_resi = 0`` makes phi the identity.
    """

    def __init__(
        self,
        vocab_size: int,
        channels: int,
        patch_nums: Sequence[int],
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        beta: float = 0.25,
        using_znorm: bool = False,
    ):
        super().__init__()
        self.vocab_size, self.channels = vocab_size, channels
        self.patch_nums = tuple(int(p) for p in patch_nums)
        self.beta, self.using_znorm = beta, using_znorm
        count = {0: default_qresi_counts or len(self.patch_nums), 1: 1}.get(share_quant_resi, share_quant_resi)
        self.share_quant_resi = share_quant_resi

        def make() -> nn.Module:
            return Phi(channels, quant_resi) if abs(quant_resi) > 1e-6 else nn.Identity()

        self.phi = nn.ModuleList([make() for _ in range(count)])
        self.ticks = phi_ticks(count)
        self.embedding = nn.Embedding(vocab_size, channels)
        # Running per-scale code hit counts, VAR's ``ema_vocab_hit_SV``: the codebook-usage statistic.
        self.register_buffer("ema_vocab_hit", torch.zeros(len(self.patch_nums), vocab_size))
        self.register_buffer("hit_updates", torch.zeros((), dtype=torch.long))

    # ---- helpers ----------------------------------------------------------------------------------------
    def phi_for(self, si: int, num_scales: int | None = None) -> nn.Module:
        """The phi conv of scale ``si`` (of ``num_scales``, default this quantiser's schedule)."""
        n = num_scales or len(self.patch_nums)
        if self.share_quant_resi == 1 or len(self.phi) == 1:
            return self.phi[0]
        at = si / (n - 1) if n > 1 else 0.0
        return self.phi[int(np.argmin(np.abs(self.ticks - at)))]

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code for each row of ``z`` (N, C), by L2 (or cosine with ``using_znorm``)."""
        weight = self.embedding.weight.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z, dim=-1) @ F.normalize(weight.T, dim=0), dim=1)
        dist = torch.sum(z.square(), dim=1, keepdim=True) + torch.sum(weight.square(), dim=1)
        dist = dist.addmm(z, weight.T, alpha=-2, beta=1)
        return torch.argmin(dist, dim=1)

    def upsample_scale(self, h: torch.Tensor, si: int, size: tuple[int, int], num_scales: int) -> torch.Tensor:
        """Bicubic-upsample a scale's code map to the full feature size (not the last scale), then phi."""
        if si != num_scales - 1:
            h = F.interpolate(h, size=size, mode="bicubic")
        return self.phi_for(si, num_scales)(h)

    def _schedule(self, patch_nums: Sequence | None, h: int, w: int) -> list[tuple[int, int]]:
        hws = [(p, p) if isinstance(p, int) else (int(p[0]), int(p[1])) for p in (patch_nums or self.patch_nums)]
        if hws[-1] != (h, w):
            raise ValueError(f"the last scale {hws[-1]} must equal the feature map size {(h, w)}")
        return hws

    # ---- encoding -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def quantize_pyramid(
        self, f: torch.Tensor, patch_nums: Sequence | None = None, to_fhat: bool = False
    ) -> list[torch.Tensor]:
        """VAR's ``f_to_idxBl_or_fhat``: token ids (B, ph*pw) per scale, or the cumulative ``f_hat`` after each."""
        b, c, h, w = f.shape
        f_rest = f.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        hws = self._schedule(patch_nums, h, w)
        out: list[torch.Tensor] = []
        for si, (ph, pw) in enumerate(hws):
            last = si == len(hws) - 1
            z = f_rest if last else F.interpolate(f_rest, size=(ph, pw), mode="area")
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, c))
            code = self.embedding(idx.view(b, ph, pw)).permute(0, 3, 1, 2).contiguous()
            h_up = self.upsample_scale(code, si, (h, w), len(hws))
            f_hat.add_(h_up)
            f_rest.sub_(h_up)
            out.append(f_hat.clone() if to_fhat else idx.reshape(b, ph * pw))
        return out

    def ids_to_fhat(self, ids: Sequence[torch.Tensor], cumulative: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """VAR's ``embed_to_fhat(all_to_max_scale=True)``: token ids per scale -> ``f_hat`` at the full size."""
        b = ids[0].shape[0]
        side = self.patch_nums[-1]
        n = len(self.patch_nums)
        f_hat = self.embedding.weight.new_zeros(b, self.channels, side, side)
        steps = []
        for si, pn in enumerate(self.patch_nums[: len(ids)]):
            code = self.embedding(ids[si]).transpose(1, 2).reshape(b, self.channels, pn, pn)
            f_hat = f_hat + self.upsample_scale(code, si, (side, side), n)
            if cumulative:
                steps.append(f_hat)
        return steps if cumulative else f_hat

    # ---- VAR's inputs ----------------------------------------------------------------------------------------
    def teacher_forcing_input(self, ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """VAR's ``idxBl_to_var_input``: (B, L - first_l, C) inputs of scales 2..K from the ground-truth ids.

        The input of scale k+1 is ``area_down(f_hat_k, pn_{k+1})``, the running reconstruction after scale k.
        """
        b = ids[0].shape[0]
        side = self.patch_nums[-1]
        n = len(self.patch_nums)
        f_hat = self.embedding.weight.new_zeros(b, self.channels, side, side)
        inputs = []
        for si in range(n - 1):
            pn = self.patch_nums[si]
            code = self.embedding(ids[si]).transpose(1, 2).reshape(b, self.channels, pn, pn)
            f_hat = f_hat + self.phi_for(si, n)(F.interpolate(code, size=(side, side), mode="bicubic"))
            nxt = self.patch_nums[si + 1]
            inputs.append(F.interpolate(f_hat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(inputs, dim=1) if inputs else f_hat.new_zeros(b, 0, self.channels)

    def next_input(self, si: int, f_hat: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """VAR's ``get_next_autoregressive_input``: add scale ``si``'s codes ``h`` (B, C, pn, pn) to ``f_hat``.

        Returns the new ``f_hat`` and the next scale's input ``area_down(f_hat, pn_{si+1})`` (None after the
        last scale). Not in place, so a caller's tensor (e.g. a callback's) is never modified behind its back.
        """
        n = len(self.patch_nums)
        side = self.patch_nums[-1]
        f_hat = f_hat + self.upsample_scale(h, si, (side, side), n)
        if si == n - 1:
            return f_hat, None
        nxt = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(nxt, nxt), mode="area")

    # ---- training -------------------------------------------------------------------------------------------
    def forward(self, f: torch.Tensor, return_usage: bool = False) -> tuple[torch.Tensor, torch.Tensor, list | None]:
        """VAR's training forward: straight-through ``f_hat``, the VQ loss, optionally the usage per scale.

        Loss, as the official code: the mean over scales of ``beta * |f_hat.detach() - f|^2`` (commitment,
        trains the encoder) + ``|f_hat - f.detach()|^2`` (trains the codebook and the phi convs). The
        reconstruction gradient reaches the encoder straight through ``f_hat``.
        """
        dtype = f.dtype
        f = f.float()
        b, c, h, w = f.shape
        f_no_grad = f.detach()
        f_rest = f_no_grad.clone()
        f_hat = torch.zeros_like(f_rest)
        n = len(self.patch_nums)
        loss = f.new_zeros(())
        hits = []
        for si, pn in enumerate(self.patch_nums):
            last = si == n - 1
            z = f_rest if last else F.interpolate(f_rest, size=(pn, pn), mode="area")
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, c))
            hits.append(idx.bincount(minlength=self.vocab_size).float())
            code = self.embedding(idx.view(b, pn, pn)).permute(0, 3, 1, 2).contiguous()
            h_up = self.upsample_scale(code, si, (h, w), n)
            f_hat = f_hat + h_up
            f_rest = f_rest - h_up.detach()
            loss = loss + F.mse_loss(f_hat.detach(), f).mul(self.beta) + F.mse_loss(f_hat, f_no_grad)
        loss = loss / n
        if self.training:
            self._record_hits(torch.stack(hits))
        f_hat = (f_hat.detach() - f_no_grad) + f
        usage = self.usage(tokens_per_scale=b * h * w) if return_usage else None
        return f_hat.to(dtype), loss, usage

    @torch.no_grad()
    def _record_hits(self, hits: torch.Tensor) -> None:
        """Running per-scale hit counts (summed over processes), as VAR: copy, then EMA 0.9, then 0.99.

        The official code advances its counter once per *scale*, so only scale 0 ever takes the first-batch
        copy; we advance it once per batch so every scale starts from its own first counts.
        """
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(hits)
        n = int(self.hit_updates)
        if n == 0:
            self.ema_vocab_hit.copy_(hits)
        else:
            keep = 0.9 if n < 100 else 0.99
            self.ema_vocab_hit.mul_(keep).add_(hits * (1 - keep))
        self.hit_updates += 1

    def usage(self, tokens_per_scale: int) -> list[float]:
        """Percent of codes per scale whose running hits exceed VAR's margin (8% of a uniform share)."""
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        margin = world * tokens_per_scale / self.vocab_size * 0.08
        return [float((row >= margin).float().mean()) * 100 for row in self.ema_vocab_hit]


class VARVQVAE(ModelMixin, ConfigMixin):
    """The VQ-VAE of VAR. Defaults are the released ``vae_ch160v4096z32`` (f16, 4096 codes, 32 channels).

    ``forward(images)`` is the training pass (straight-through reconstruction + VQ loss). Inference uses
    ``encode`` -> ``quantize.quantize_pyramid`` / ``image_to_ids`` and ``decode(f_hat)`` / ``ids_to_image``.
    Images are in [-1, 1].
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        block_out_channels: tuple[int, ...] = (160, 160, 320, 320, 640),
        layers_per_block: int = 2,
        latent_channels: int = 32,
        vocab_size: int = 4096,
        norm_num_groups: int = 32,
        using_sa: bool = True,
        using_mid_sa: bool = True,
        quant_conv_ks: int = 3,
        quant_resi: float = 0.5,
        share_quant_resi: int = 4,
        default_qresi_counts: int = 0,
        beta: float = 0.25,
        using_znorm: bool = False,
        patch_nums: tuple[int, ...] = PATCH_NUMS[256],
    ):
        super().__init__()
        levels = len(block_out_channels)
        down = ["DownEncoderBlock2D"] * levels
        up = ["UpDecoderBlock2D"] * levels
        if using_sa:  # VQGAN attends inside the lowest-resolution level (encoder: last, decoder: first)
            down[-1], up[0] = "AttnDownEncoderBlock2D", "AttnUpDecoderBlock2D"
        self.encoder = Encoder(
            in_channels=in_channels,
            out_channels=latent_channels,
            down_block_types=tuple(down),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            double_z=False,
            mid_block_add_attention=using_mid_sa,
        )
        self.decoder = Decoder(
            in_channels=latent_channels,
            out_channels=out_channels,
            up_block_types=tuple(up),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            mid_block_add_attention=using_mid_sa,
        )
        pad = quant_conv_ks // 2
        self.quant_conv = nn.Conv2d(latent_channels, latent_channels, quant_conv_ks, stride=1, padding=pad)
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, quant_conv_ks, stride=1, padding=pad)
        self.quantize = MultiScaleQuantizer(
            vocab_size,
            latent_channels,
            patch_nums,
            quant_resi=quant_resi,
            share_quant_resi=share_quant_resi,
            default_qresi_counts=default_qresi_counts,
            beta=beta,
            using_znorm=using_znorm,
        )

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The image side the patch-number schedule is for (last token-map side x downsampling)."""
        return int(self.config.patch_nums[-1]) * self.downsample_factor

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> the continuous feature map ``f`` the quantiser works on."""
        return self.quant_conv(self.encoder(images))

    def decode(self, f_hat: torch.Tensor, return_dict: bool = True, clamp: bool = True) -> DecoderOutput | tuple:
        """``f_hat`` (B, C_vae, h, w) -> images in [-1, 1] (VAR's ``fhat_to_img``), diffusers' return convention."""
        out = self.decoder(self.post_quant_conv(f_hat))
        if clamp:
            out = out.clamp(-1, 1)
        return DecoderOutput(sample=out) if return_dict else (out,)

    @torch.no_grad()
    def image_to_ids(self, images: torch.Tensor, patch_nums: Sequence | None = None) -> list[torch.Tensor]:
        """VAR's ``img_to_idxBl``: token ids (B, pn*pn) for every scale of the pyramid."""
        return self.quantize.quantize_pyramid(self.encode(images), patch_nums)

    @torch.no_grad()
    def ids_to_image(self, ids: Sequence[torch.Tensor]) -> torch.Tensor:
        """VAR's ``idxBl_to_img(same_shape=True, last_one=True)``: token pyramid -> images in [-1, 1]."""
        return self.decode(self.quantize.ids_to_fhat(ids), return_dict=False)[0]

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """Encode, quantise over the full pyramid and decode (VAR's ``img_to_reconstructed_img(last_one)``)."""
        return self.decode(self.quantize.quantize_pyramid(self.encode(images), to_fhat=True)[-1], return_dict=False)[0]

    def forward(self, images: torch.Tensor, return_usage: bool = False, return_dict: bool = True) -> VQOutput | tuple:
        """Training pass: reconstruction (not clamped, so the loss sees the raw output), VQ loss, usage."""
        f_hat, vq_loss, usage = self.quantize(self.encode(images), return_usage=return_usage)
        rec = self.decoder(self.post_quant_conv(f_hat))
        if not return_dict:
            return rec, vq_loss, usage
        return VQOutput(sample=rec, vq_loss=vq_loss, usage=usage)
