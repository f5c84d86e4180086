"""DiMR (Liu et al., "Alleviating Distortion in Image Generation via Multi-Resolution Diffusion Models"):
a transformer at the coarsest resolution feeding ConvNeXt branches at finer ones, timed by TD norms.

Faithful to qihao067/DiMR (``libs/core/blocks.py`` ``MRModel``/``Stage``), in our module names:

- **Branches, coarse to fine.** With R branches on an S×S input, branch i works at S / 2^(R−1−i). Branch 0 is a
  transformer over 2×2-patch tokens of the input area-downsampled by 2^(R−2) (``EvenDownInterpolate`` + Conv
  k=s=2); branches 1..R−1 are ConvNeXt stages (Conv 1×1 on the input area-downsampled to their resolution). "2R"
  = transformer at 1/2 + ConvNeXt at 1 (the released 256 px models); "3R" = 1/4, 1/2, 1 (the paper's 512 px).
- **Inputs.** Each branch adds a *learned* position table (official ``PositionEmbeddings``: row-major over a
  maximum grid, so smaller inputs use its top-left corner). The transformer branch prepends a class token
  (``LabelEmbedder``; the null class is ``num_classes``, 1000 for ImageNet — the official ``Embedding(1001)``), or,
  for text conditioning, appends the projected text tokens as extra keys/values of every self-attention
  (official ``condition_key_value``), masked by the text attention mask.
- **U-ViT long skips in every branch**: L = 2·k + 1 blocks, k "in" blocks, a middle one, k "out" blocks; each
  out block first maps concat(x, skip) with Linear(2D→D).
- **Feeding the next branch**: the branch input and every block output (L + 1 feature maps, class token removed)
  are concatenated along channels -> TD-LN -> PixelShuffle-Linear (D_in·(L+1) -> D_out·2·2, then 2×2 shuffle)
  -> TD-LN, and added to the next branch's input.
- **One output head per branch** (TD-LN -> Conv k×k -> C) at the branch's own resolution. Sampling uses the
  finest; training uses all (:func:`multi_scale_loss`: the finest against ε, coarser ones against the sum-pooled
  ε / ratio, weights [1/4, 1] for 2R).
- **Blocks**: pre-norm (TD-RMSNorm) self-attention without qkv bias, and a gated-GELU MLP
  ``w2(GELU(w0 x) · w1 x)`` (diffusers ``FeedForward(activation_fn="geglu")``, whose fused ``proj`` holds
  ``[w1; w0]``). ConvNeXt blocks: depthwise k×k conv residual (no norm), then the same MLP. The noise level
  enters only through the TD norms (``dit.td_norm``); there is no timestep embedding.

Differences from the official code, on purpose: τ is passed to the norms instead of being stored in them before
the call (thread safety; same numbers); attention is diffusers' ``Attention`` (``to_q/to_k/to_v/to_out``) with
:class:`DiMRAttnProcessor`, which computes SDPA in float32 as the original does, so other processors can be set
on a class-conditional model; the official text path refers to a ``text_conditioning`` module it never defines,
which we fill with PixArt's caption projection (``CaptionProjection``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention import AttentionMixin, FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from ..embeddings import CaptionProjection, LabelEmbedder
from ..td_norm import TDLayerNorm, collapse_tau, make_td_norm, timestep_to_tau

# (transformer width, MLP width, blocks, heads), [(ConvNeXt width, MLP width, blocks)] of the released models
# (``configs/DiMR-{XL,G}-2R_imagenet256.py``). Block counts are the real ones: the official ``num_blocks=20``
# builds ``20 // 2 * 2 + 1 = 21`` blocks.
DIMR_SIZES: dict[str, tuple[tuple[int, int, int, int], list[tuple[int, int, int]]]] = {
    "DiMR-XL/2R": ((960, 1920, 39, 16), [(480, 960, 21)]),
    "DiMR-G/2R": ((1152, 2304, 57, 16), [(576, 1152, 29)]),
}


def dimr_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Config of a released DiMR (``"DiMR-XL/2R"``, ``"DiMR-G/2R"``: ImageNet 256, SD-VAE latents 32×32×4)."""
    if name not in DIMR_SIZES:
        raise ValueError(f"Unknown DiMR config {name!r}; valid names: {', '.join(DIMR_SIZES)}")
    (width, mlp, layers, heads), convs = DIMR_SIZES[name]
    cfg: dict[str, Any] = dict(
        sample_size=32,
        in_channels=4,
        num_classes=1000,
        transformer_width=width,
        transformer_mlp_width=mlp,
        transformer_layers=layers,
        num_attention_heads=heads,
        conv_widths=[c[0] for c in convs],
        conv_mlp_widths=[c[1] for c in convs],
        conv_layers=[c[2] for c in convs],
    )
    cfg.update(overrides)
    return cfg


def even_multi_scale_targets(target: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """``target`` at 1/2^(levels−1) ... 1/2, 1 of its size, coarse first: r×r sum-pool divided by r.

    The official ``sde.even_multi_scale_targets(scale_correction=True)``: dividing the sum of r² i.i.d. unit
    Gaussians by r keeps a noise target at unit variance at every scale.
    """
    height, width = target.shape[-2:]
    out = []
    for level in reversed(range(levels)):
        ratio = 2**level
        if height % ratio or width % ratio:
            raise ValueError(f"a {height}x{width} target cannot be pooled by {ratio} for {levels} branches")
        out.append(target if ratio == 1 else F.avg_pool2d(target, ratio) * ratio)
    return out


def default_loss_weights(num_branches: int) -> list[float]:
    """[1/4, 1] for 2R (the official ``loss_coeffs``); 4^−(R−1−i) in general (our choice for 3R: [1/16, 1/4, 1],
    the branch's share of pixels; the 3R weights were not released)."""
    return [4.0 ** -(num_branches - 1 - i) for i in range(num_branches)]


def multi_scale_loss(
    branch_samples: tuple[torch.Tensor, ...] | list[torch.Tensor], target: torch.Tensor, weights: list[float]
) -> torch.Tensor:
    """Σ_i w_i · MSE(branch_i, target pooled to branch_i's resolution) (official ``LSimple`` in ``train.py``)."""
    if len(weights) != len(branch_samples):
        raise ValueError(f"{len(weights)} loss weights for {len(branch_samples)} branch outputs")
    targets = even_multi_scale_targets(target.float(), len(branch_samples))
    loss = target.new_zeros((), dtype=torch.float32)
    for pred, tgt, w in zip(branch_samples, targets, weights):
        if pred.shape[-2:] != tgt.shape[-2:]:
            raise ValueError(f"branch output {tuple(pred.shape)} does not match its target {tuple(tgt.shape)}")
        loss = loss + w * F.mse_loss(pred.float()[:, : tgt.shape[1]], tgt)
    return loss


@dataclass
class DiMROutput(BaseOutput):
    """``sample``: the finest branch's prediction (what pipelines sample with). ``branch_samples``: every branch's
    prediction, coarse to fine, for the multi-scale loss; ``loss_weights`` their weights."""

    sample: torch.Tensor
    branch_samples: tuple[torch.Tensor, ...] = ()
    loss_weights: tuple[float, ...] = ()

    def multi_scale_loss(self, target: torch.Tensor) -> torch.Tensor:
        """The training loss against the full-resolution ``target`` (``training.train`` calls this hook)."""
        return multi_scale_loss(self.branch_samples, target, list(self.loss_weights))


class DiMRAttnProcessor:
    """Self-attention over the image tokens, plus text tokens as extra keys/values when given; SDPA in float32.

    The official ``SelfAttention`` concatenates ``condition_key_value(text)`` to the image keys and values and masks
    padded text tokens; here those projections are the ``Attention`` module's ``add_k_proj``/``add_v_proj``.
    """

    joint_added_kv = True

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(batch, x.shape[1], attn.heads, -1).transpose(1, 2).float()

        q, k, v = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        mask = None
        if encoder_hidden_states is not None:
            if getattr(attn, "add_k_proj", None) is None:
                raise ValueError("this DiMR has no text projections (caption_channels is None); do not pass text")
            k = torch.cat([k, heads(attn.add_k_proj(encoder_hidden_states))], dim=2)
            v = torch.cat([v, heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
            if attention_mask is not None:
                keep = torch.ones(batch, tokens, dtype=torch.bool, device=hidden_states.device)
                mask = torch.cat([keep, attention_mask.to(hidden_states.device).bool()], dim=1)[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, tokens, -1).to(hidden_states.dtype)
        return attn.to_out[1](attn.to_out[0](out))


def _gated_mlp(dim: int, mlp_dim: int) -> FeedForward:
    return FeedForward(dim, inner_dim=mlp_dim, activation_fn="geglu", bias=True)


class DiMRTransformerBlock(nn.Module):
    """x + Attn(TDNorm(x)); x + GatedMLP(TDNorm(x)): the official ``TransformerBlock`` (``SelfAttention`` +
    ``MLPBlock``)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, norm_type: str, dropout: float = 0.0, text_kv: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer width {dim} is not divisible by {heads} heads")
        self.norm1 = make_td_norm(norm_type, dim)
        self.attn1 = Attention(
            query_dim=dim,
            heads=heads,
            dim_head=dim // heads,
            bias=False,
            out_bias=True,
            added_kv_proj_dim=dim if text_kv else None,
            added_proj_bias=False,
            processor=DiMRAttnProcessor(),
        )
        self.norm2 = make_td_norm(norm_type, dim)
        self.ff = _gated_mlp(dim, mlp_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: torch.Tensor,
        tau: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        kwargs = dict(attention_kwargs or {})
        if encoder_hidden_states is not None:
            if not getattr(self.attn1.processor, "joint_added_kv", False):
                raise ValueError(
                    f"{type(self.attn1.processor).__name__} cannot attend to text the DiMR way (text as extra keys "
                    "and values of the self-attention); use dit.models.dimr.DiMRAttnProcessor on a text DiMR."
                )
            kwargs.update(encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask)
        x = x + self.dropout(self.attn1(self.norm1(x, tau), **kwargs))
        return x + self.dropout(self.ff(self.norm2(x, tau)))


class DiMRConvNeXtBlock(nn.Module):
    """x + DWConv(x); x + GatedMLP(TDNorm(x)) on channels-last maps (official ``ConvNeXtBlock``: no norm before the
    depthwise conv)."""

    def __init__(self, dim: int, mlp_dim: int, kernel_size: int, norm_type: str, dropout: float = 0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm2 = make_td_norm(norm_type, dim)
        self.ff = _gated_mlp(dim, mlp_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, tau: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        x = x + self.dropout(self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
        return x + self.dropout(self.ff(self.norm2(x, tau)))


class DiMRUpsample(nn.Module):
    """TD-LN -> Linear(D_in -> D_out·r·r) -> r×r pixel shuffle -> TD-LN (official ``upsample`` +
    ``PixelShuffleUpsample``; channel order (r_h, r_w, C) as its reshape/transpose)."""

    def __init__(self, dim_in: int, dim_out: int, ratio: int = 2):
        super().__init__()
        self.ratio = ratio
        self.norm_in = TDLayerNorm(dim_in)
        self.proj = nn.Linear(dim_in, dim_out * ratio * ratio)
        self.norm_out = TDLayerNorm(dim_out)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        r = self.ratio
        x = self.proj(self.norm_in(x, tau))
        b, h, w, c = x.shape
        x = x.reshape(b, h, w, r, r, c // (r * r)).transpose(2, 3).reshape(b, h * r, w * r, c // (r * r))
        return self.norm_out(x, tau)


class DiMRBranch(nn.Module):
    """One resolution of DiMR (official ``Stage``): input embedding, U-shaped blocks with long skips, output head.

    Returns the branch's prediction (B, C, h, w) and its L + 1 feature maps (B, h, w, D) for the next branch.
    """

    def __init__(
        self,
        kind: str,
        in_channels: int,
        out_channels: int,
        dim: int,
        mlp_dim: int,
        num_layers: int,
        pos_grid: int,
        input_downsample: int,
        norm_type: str,
        output_kernel_size: int,
        heads: int = 1,
        kernel_size: int = 7,
        dropout: float = 0.0,
        lowres_dim: int | None = None,
        text_kv: bool = False,
    ):
        super().__init__()
        if num_layers < 1 or num_layers % 2 == 0:
            raise ValueError(
                f"a DiMR branch needs an odd number of blocks (k in, 1 middle, k out for the long skips), got "
                f"{num_layers}; the official num_blocks=N builds N // 2 * 2 + 1"
            )
        self.kind = kind
        self.input_downsample = input_downsample
        self.pos_grid = pos_grid
        patch = 2 if kind == "transformer" else 1
        self.proj_in = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)
        self.pos_embed = nn.Embedding(pos_grid * pos_grid, dim)
        self.upsample = DiMRUpsample(lowres_dim, dim) if lowres_dim is not None else None
        if kind == "transformer":
            self.blocks = nn.ModuleList(
                [DiMRTransformerBlock(dim, heads, mlp_dim, norm_type, dropout, text_kv) for _ in range(num_layers)]
            )
        else:
            self.blocks = nn.ModuleList(
                [DiMRConvNeXtBlock(dim, mlp_dim, kernel_size, norm_type, dropout) for _ in range(num_layers)]
            )
        self.skip_projs = nn.ModuleList([nn.Linear(2 * dim, dim) for _ in range(num_layers // 2)])
        self.norm_out = TDLayerNorm(dim)
        self.proj_out = nn.Conv2d(dim, out_channels, output_kernel_size, padding=output_kernel_size // 2)
        self.gradient_checkpointing = False

    def embed(self, images: torch.Tensor, tau: torch.Tensor, lowres: torch.Tensor | None) -> torch.Tensor:
        if self.input_downsample > 1:
            h, w = images.shape[-2:]
            images = F.interpolate(images, size=(h // self.input_downsample, w // self.input_downsample), mode="area")
        x = self.proj_in(images).permute(0, 2, 3, 1)
        _, h, w, _ = x.shape
        if h > self.pos_grid or w > self.pos_grid:
            raise ValueError(
                f"DiMR's learned position table covers {self.pos_grid}x{self.pos_grid} positions at this branch; "
                f"the input gives {h}x{w}. Generate at most the model's sample_size."
            )
        rows = torch.arange(h, device=x.device)[:, None] * self.pos_grid
        idx = rows + torch.arange(w, device=x.device)[None, :]
        x = x + self.pos_embed(idx)[None].to(x.dtype)
        if lowres is not None:
            x = x + self.upsample(lowres, tau)
        return x

    def _block(self, block: nn.Module, *args: Any) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self,
        images: torch.Tensor,
        tau: torch.Tensor,
        lowres: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.embed(images, tau, lowres)
        b, h, w, d = x.shape
        if self.kind == "transformer":
            x = x.reshape(b, h * w, d)
            if prefix is not None:
                x = torch.cat([prefix.to(x.dtype), x], dim=1)
        extra = (encoder_hidden_states, encoder_attention_mask, attention_kwargs) if self.kind == "transformer" else ()
        features = [x]
        skips = []
        n = len(self.blocks) // 2
        for block in self.blocks[:n]:
            x = self._block(block, x, tau, *extra)
            features.append(x)
            skips.append(x)
        x = self._block(self.blocks[n], x, tau, *extra)
        features.append(x)
        for proj, block in zip(self.skip_projs, self.blocks[n + 1 :]):
            x = proj(torch.cat([x, skips.pop()], dim=-1))
            x = self._block(block, x, tau, *extra)
            features.append(x)
        if self.kind == "transformer":
            strip = 0 if prefix is None else prefix.shape[1]
            x = x[:, strip:].reshape(b, h, w, d)
            features = [f[:, strip:].reshape(b, h, w, d) for f in features]
        out = self.proj_out(self.norm_out(x, tau).permute(0, 3, 1, 2))
        return out, features


class DiMRModel(ModelMixin, ConfigMixin, PeftAdapterMixin, AttentionMixin):
    """Multi-resolution DiMR backbone; ``forward(hidden_states, timestep, class_labels)`` like ``DiTModel``.

    Class-conditional when ``num_classes`` is set (class token; null class ``num_classes``), text-conditional when
    ``caption_channels`` is set (``forward(..., encoder_hidden_states=, encoder_attention_mask=)`` like
    ``TextDiTModel``). Returns :class:`DiMROutput` (or ``(sample, branch_samples)``): pipelines sample the finest
    branch; ``training.train`` uses ``DiMROutput.multi_scale_loss``.

    ``patch_size`` is not a free choice: the coarsest (transformer) branch sees the input in 2^(R−1)-pixel
    tokens, and that is what ``config.patch_size`` records so pipelines ask for sizes that are multiples of it.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiMRTransformerBlock", "DiMRConvNeXtBlock"]
    # ``dit.attention.set_attention`` keeps models with ``native_attention`` on their own processors: the
    # window/proxy/agent variants need a bare token grid, and DiMR's sequence has a class token in front (or text
    # keys/values appended), so only "sdpa" (``DiMRAttnProcessor``) applies.
    native_attention = True
    attention_variant = "sdpa"

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_classes: int | None = 1000,
        class_dropout_prob: float = 0.1,
        caption_channels: int | None = None,
        transformer_width: int = 960,
        transformer_mlp_width: int = 1920,
        transformer_layers: int = 39,
        num_attention_heads: int = 16,
        conv_widths: list[int] | tuple[int, ...] = (480,),
        conv_mlp_widths: list[int] | tuple[int, ...] = (960,),
        conv_layers: list[int] | tuple[int, ...] = (21,),
        conv_kernel_size: int = 7,
        output_kernel_size: int = 3,
        norm_type: str = "td_rmsnorm",
        dropout: float = 0.0,
        num_train_timesteps: int = 1000,
        loss_weights: list[float] | None = None,
        block_grad_to_lowres: bool = False,
        patch_size: int | None = None,
    ):
        super().__init__()
        conv_widths, conv_mlp_widths, conv_layers = list(conv_widths), list(conv_mlp_widths), list(conv_layers)
        if not (len(conv_widths) == len(conv_mlp_widths) == len(conv_layers)) or not conv_widths:
            raise ValueError(
                "conv_widths, conv_mlp_widths and conv_layers need one entry per ConvNeXt branch (at least one); got "
                f"{conv_widths}, {conv_mlp_widths}, {conv_layers}"
            )
        if num_classes is not None and caption_channels is not None:
            raise ValueError("set num_classes (class-conditional) or caption_channels (text-conditional), not both")
        branches = 1 + len(conv_widths)
        stride = 2 ** (branches - 1)
        if patch_size is not None and patch_size != stride:
            raise ValueError(
                f"patch_size is {stride} for a {branches}-branch DiMR (its transformer sees 2^(R-1)-pixel tokens); "
                f"got {patch_size}. Leave it unset."
            )
        if sample_size % stride:
            raise ValueError(f"sample_size {sample_size} must be a multiple of {stride} for {branches} branches")
        weights = list(loss_weights) if loss_weights is not None else default_loss_weights(branches)
        if len(weights) != branches:
            raise ValueError(f"loss_weights needs {branches} entries (one per branch, coarse first), got {weights}")
        self.register_to_config(patch_size=stride)
        self.num_branches = branches
        self.loss_weights = tuple(float(w) for w in weights)
        self.out_channels = out_channels or in_channels
        self.class_embedder = (
            LabelEmbedder(num_classes, transformer_width, class_dropout_prob) if num_classes is not None else None
        )
        self.caption_projection = (
            CaptionProjection(caption_channels, transformer_width) if caption_channels is not None else None
        )
        common = dict(norm_type=norm_type, output_kernel_size=output_kernel_size, dropout=dropout)
        layers = [
            DiMRBranch(
                "transformer",
                in_channels,
                self.out_channels,
                transformer_width,
                transformer_mlp_width,
                transformer_layers,
                pos_grid=sample_size // stride,
                input_downsample=stride // 2,
                heads=num_attention_heads,
                text_kv=caption_channels is not None,
                **common,
            )
        ]
        prev_dim, prev_layers = transformer_width, transformer_layers
        for i, (width, mlp, n) in enumerate(zip(conv_widths, conv_mlp_widths, conv_layers)):
            down = 2 ** (branches - 2 - i)
            layers.append(
                DiMRBranch(
                    "convnext",
                    in_channels,
                    self.out_channels,
                    width,
                    mlp,
                    n,
                    pos_grid=sample_size // down,
                    input_downsample=down,
                    kernel_size=conv_kernel_size,
                    lowres_dim=prev_dim * (prev_layers + 1),
                    **common,
                )
            )
            prev_dim, prev_layers = width, n
        self.branches = nn.ModuleList(layers)
        self._init_weights()

    def _init_weights(self) -> None:
        """Official init: trunc-normal(0.02) Linear weights and embeddings, zero biases; convs keep PyTorch's."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=0.02)

    def reset_attention(self) -> None:
        """Put DiMR's own processor back on every attention module (``set_attention(model, "sdpa")``)."""
        self.set_attn_processor(DiMRAttnProcessor())
        self.attention_variant = "sdpa"

    def time_condition(self, timestep: torch.Tensor | float | int, batch: int, device: torch.device) -> torch.Tensor:
        """DDPM timestep(s) -> τ of shape (B,) or (1,) (``dit.td_norm.timestep_to_tau``)."""
        t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], device=device)
        t = t.reshape(-1).to(device)
        if t.numel() not in (1, batch):
            raise ValueError(f"{t.numel()} timesteps for a batch of {batch}")
        return collapse_tau(timestep_to_tau(t, self.config.num_train_timesteps))

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        added_cond_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> DiMROutput | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """``added_cond_kwargs`` is accepted for ``TextToImagePipeline`` compatibility and ignored (no size
        conditioning); ``cross_attention_kwargs`` is an alias of ``attention_kwargs``."""
        batch = hidden_states.shape[0]
        stride = self.config.patch_size
        if hidden_states.ndim != 4 or hidden_states.shape[-2] % stride or hidden_states.shape[-1] % stride:
            raise ValueError(
                f"DiMR takes (B, C, H, W) inputs with H and W multiples of {stride}; got {tuple(hidden_states.shape)}"
            )
        size = self.config.sample_size
        if hidden_states.shape[-2] > size or hidden_states.shape[-1] > size:
            raise ValueError(
                f"this DiMR's learned position tables cover inputs up to {size}x{size} (its sample_size); got "
                f"{hidden_states.shape[-2]}x{hidden_states.shape[-1]}. Ask for at most {size}x{size} "
                "(times the VAE factor for a latent model); smaller sizes work."
            )
        tau = self.time_condition(timestep, batch, hidden_states.device)
        prefix = None
        if self.class_embedder is not None:
            if class_labels is None:
                raise ValueError("this DiMR is class-conditional: pass class_labels (num_classes is the null class)")
            prefix = self.class_embedder(class_labels.reshape(-1).to(hidden_states.device))[:, None]
        text = mask = None
        if self.caption_projection is not None:
            if encoder_hidden_states is None:
                raise ValueError("this DiMR is text-conditional: pass encoder_hidden_states")
            text = self.caption_projection(encoder_hidden_states.to(hidden_states.dtype))
            mask = encoder_attention_mask
        kwargs = attention_kwargs if attention_kwargs is not None else cross_attention_kwargs
        outputs = []
        lowres = None
        for i, branch in enumerate(self.branches):
            out, features = branch(hidden_states, tau, lowres, prefix, text, mask, kwargs)
            outputs.append(out)
            if i + 1 < len(self.branches):
                lowres = torch.cat(features, dim=-1)
                if self.config.block_grad_to_lowres:
                    lowres = lowres.detach()
        if not return_dict:
            return (outputs[-1], tuple(outputs))
        return DiMROutput(sample=outputs[-1], branch_samples=tuple(outputs), loss_weights=self.loss_weights)


__all__ = [
    "DIMR_SIZES",
    "DiMRAttnProcessor",
    "DiMRModel",
    "DiMROutput",
    "default_loss_weights",
    "dimr_config",
    "even_multi_scale_targets",
    "multi_scale_loss",
]
