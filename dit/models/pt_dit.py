"""PT-DiT (Qihoo-T2X, "Proxy-Tokenized Diffusion Transformer"): global proxy tokens + local window attention.

Official code: Ascend MindSpeed-MM ``mindspeed_mm/models/predictor/dits/pt_dit_diffusers.py``
(``ProxyTokensTransformerBlock``, ``PTDiTDiffuser``). One block, in the official order::

    x += linear_1_visual(pvisual_attn2(norm_before(x), proxy_cross_norm(P + proxy_attn1(proxy_norm1(P)))))
    x += gate_msa * attn1(modulate(norm1(x)))                 window attention      (adaLN, as PixArt/DiT)
    x += linear_2(gate_sw * attn3(modulate_sw(shift_window_norm(x))))   shifted-window attention
    x += attn2(x, text)                                        cross-attention, no norm (PixArt)
    x += gate_mlp * ff(modulate(norm2(x)))

with P one proxy per window (mean of its tokens), ``linear_1_visual`` and ``linear_2`` zero-initialised. The
block is our shared ``DiTBlock`` (same norms, modulation, ``attn1``/``attn2``/``ff``, parameter names) plus the
proxy path (:class:`dit.attention.ProxyTokenMixer`) and the shifted-window branch; ``attn1`` carries a
window processor. The models reuse ``TextDiTModel.forward`` / ``DiTModel.forward`` as they are, so the call
signature, pipelines, LoRA, gradient checkpointing and training are exactly those of the full-attention models.

Differences from the official code, on purpose:

* tokens stay in raster order and windows are cut inside the attention processor (the official model keeps
  them window-major between blocks; the math is the same, and the same model runs on any grid);
* windows that do not divide the grid are padded and masked (the official code requires divisibility), and the
  shift mask is built per grid instead of cached for the first resolution seen;
* the class-conditional variant (adaLN-Zero, for DiT-style ablations such as the paper's PT-DiT/S) keeps
  ``linear_2`` at Xavier init: its shifted-window gate is already zero-initialised, and zeroing both factors of
  ``linear_2(gate * attn)`` would leave both without gradient forever;
* images only: the 3D sin-cos position embedding and video VAE of the released video model are not part of
  this image backbone (the attention processors do take ``(frames, h, w)`` grids).

The official checkpoint (``qihoo360/Qihoo-T2X``, a raw ``.pt``) would load with a key map: block keys
``proxy_attn1``/``pvisual_attn2``/``linear_1_visual``/``proxy_norm1``... live under ``transformer_blocks.{i}.proxy.``
here; the rest keep their names.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..attention import format_label
from ..attention.grid import normalize_window, resolve_grid
from ..attention.proxy import ProxyTokenMixer
from ..attention.window import WindowAttnProcessor
from ..blocks import DiTBlock, FinalLayerAdaLNZero, fused_qkv_xavier_init
from ..embeddings import CaptionProjection, LabelEmbedder, PatchEmbed2D, TimestepEmbedder
from ..modulation import AdaLNSingle, AdaLNZero, modulate
from .dit import DiTModel
from .text_dit import TextDiTModel


class PTDiTBlock(DiTBlock):
    """The shared DiT block with PT-DiT's proxy path and shifted-window branch (see the module docstring)."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        modulation: str = "ada_single",
        cross_attention_dim: int | None = None,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        qk_norm: str | None = None,
        window_size: int | tuple[int, ...] = 8,
        shift_window: bool = True,
        proxy_mode: str = "mean",
        attention_bias: bool = True,
    ):
        super().__init__(
            dim, num_attention_heads, attention_head_dim, modulation, cross_attention_dim, mlp_ratio, norm_eps,
            qk_norm, attention_bias,
        )  # fmt: skip
        self.window = normalize_window(window_size)
        self.proxy = ProxyTokenMixer(
            dim, num_attention_heads, attention_head_dim, self.window, proxy_mode, norm_eps, qk_norm, attention_bias
        )
        self.shift_window = bool(shift_window)
        if self.shift_window:
            self.shift_window_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
            self.attn3 = Attention(
                query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim, bias=attention_bias,
                qk_norm=qk_norm, eps=1e-6, out_bias=True,
            )  # fmt: skip
            self.linear_2 = nn.Linear(dim, dim)
            if modulation == "ada_single":
                self.proxy_scale_shift_table = nn.Parameter(torch.randn(3, dim) / dim**0.5)
            else:
                self.shift_adaln = AdaLNZero(dim, n_chunks=3)
        self.reset_attention()

    def reset_attention(self) -> None:
        """The block's own processors: window on ``attn1``, shifted window on ``attn3``, full on the proxies."""
        self.attn1.set_processor(WindowAttnProcessor(self.window))
        if self.shift_window:
            self.attn3.set_processor(WindowAttnProcessor(self.window, shift=True))
        self.proxy.proxy_attn1.set_processor(AttnProcessor2_0())
        self.proxy.pvisual_attn2.set_processor(AttnProcessor2_0())

    def _shift_modulation(self, cond: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.modulation == "ada_zero":
            return tuple(c[:, None] for c in self.shift_adaln(cond))
        # Official: proxy_scale_shift_table[3, D] + the first three of the six shared t0 chunks.
        t0 = cond.reshape(cond.shape[0], 6, -1)[:, :3]
        return (self.proxy_scale_shift_table[None] + t0).chunk(3, dim=1)

    def forward(
        self,
        hidden_states: torch.Tensor,
        cond: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        token_grid: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        grid = resolve_grid(hidden_states.shape[1], token_grid, "PT-DiT block")
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self._modulation(cond)
        kwargs = dict(attention_kwargs or {})

        hidden_states = hidden_states + self.proxy(hidden_states, grid)

        def windowed(attn: Attention, x: torch.Tensor) -> torch.Tensor:
            extra = {"token_grid": grid} if getattr(attn.processor, "needs_token_grid", False) else {}
            return attn(x, **kwargs, **extra)

        x = modulate(self.norm1(hidden_states), shift_msa, scale_msa)
        hidden_states = hidden_states + gate_msa * windowed(self.attn1, x)
        if self.shift_window:
            shift_sw, scale_sw, gate_sw = self._shift_modulation(cond)
            x = modulate(self.shift_window_norm(hidden_states), shift_sw, scale_sw)
            hidden_states = hidden_states + self.linear_2(gate_sw * windowed(self.attn3, x))
        if self.attn2 is not None:
            hidden_states = hidden_states + self.attn2(
                hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=encoder_attention_mask
            )
        x = modulate(self.norm2(hidden_states), shift_mlp, scale_mlp)
        return hidden_states + gate_mlp * self.ff(x)


def _init_pt_blocks(blocks: nn.ModuleList) -> None:
    """After the base model's init (Xavier everywhere): fused-qkv init for the extra self-attentions, the
    official zero-initialised output projections, and the zero adaLN of the class variant's shift branch."""
    for index, block in enumerate(blocks):
        block.proxy.layer_index = index  # random proxies: a different draw per layer (and per step)
        fused_qkv_xavier_init(block.proxy.proxy_attn1)
        nn.init.zeros_(block.proxy.linear_1_visual.weight)
        nn.init.zeros_(block.proxy.linear_1_visual.bias)
        if block.shift_window:
            fused_qkv_xavier_init(block.attn3)
            if block.modulation == "ada_single":
                nn.init.zeros_(block.linear_2.weight)
                nn.init.zeros_(block.linear_2.bias)
            else:
                nn.init.zeros_(block.shift_adaln.linear.weight)
                nn.init.zeros_(block.shift_adaln.linear.bias)


class _NativeAttention:
    """PT-DiT's attention is its architecture: ``dit.attention.set_attention`` only restores it (``sdpa``)."""

    native_attention = True
    transformer_blocks: nn.ModuleList
    config: Any

    def native_label(self) -> str:
        window = normalize_window(self.config.window_size)
        return format_label(
            "pt-dit",
            {
                "window_size": window[1:] if window[0] == 1 else window,
                "proxy": self.config.proxy_mode,
                "shift": bool(self.config.shift_window),
            },
        )

    def reset_attention(self) -> None:
        for block in self.transformer_blocks:
            block.reset_attention()
        self.attention_variant = self.native_label()


class PTDiTModel(_NativeAttention, ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Text-conditioned PT-DiT: ``TextDiTModel``'s embeddings, adaLN-single, caption projection, final layer and
    forward signature, with PT-DiT blocks. Defaults follow the released image model (XL: 28 x 1152, 8x8 windows,
    one mean proxy per window, shifted windows on)."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["PTDiTBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = 8,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        caption_channels: int = 4096,
        interpolation_scale: float | None = None,
        use_additional_conditions: bool | None = None,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        window_size: int | tuple[int, ...] = 8,
        shift_window: bool = True,
        proxy_mode: str = "mean",
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.out_channels = in_channels if out_channels is None else out_channels
        if use_additional_conditions is None:
            use_additional_conditions = sample_size == 128
        self.use_additional_conditions = use_additional_conditions
        interpolation_scale = interpolation_scale if interpolation_scale is not None else max(sample_size // 64, 1)
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed2D(sample_size, patch_size, in_channels, dim, interpolation_scale)
        self.adaln_single = AdaLNSingle(dim, use_additional_conditions)
        self.caption_projection = CaptionProjection(caption_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [
                PTDiTBlock(
                    dim,
                    num_attention_heads,
                    attention_head_dim,
                    modulation="ada_single",
                    cross_attention_dim=dim,
                    mlp_ratio=mlp_ratio,
                    norm_eps=norm_eps,
                    qk_norm=qk_norm,
                    window_size=window_size,
                    shift_window=shift_window,
                    proxy_mode=proxy_mode,
                )
                for _ in range(num_layers)
            ]
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        self._init_weights()
        self.attention_variant = self.native_label()

    def _init_weights(self) -> None:
        TextDiTModel._init_weights(self)  # type: ignore[arg-type]
        _init_pt_blocks(self.transformer_blocks)

    forward = TextDiTModel.forward


class PTDiTClassModel(_NativeAttention, ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Class-conditional PT-DiT (adaLN-Zero, label embedding with a null class): ``DiTModel``'s embeddings, final
    layer and forward signature with PT-DiT blocks (no text cross-attention), for DiT-style ablations."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["PTDiTBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        qk_norm: str | None = None,
        window_size: int | tuple[int, ...] = 8,
        shift_window: bool = True,
        proxy_mode: str = "mean",
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed2D(sample_size, patch_size, in_channels, dim)
        self.timestep_embedder = TimestepEmbedder(dim)
        self.class_embedder = LabelEmbedder(num_classes, dim, class_dropout_prob)
        self.transformer_blocks = nn.ModuleList(
            [
                PTDiTBlock(
                    dim,
                    num_attention_heads,
                    attention_head_dim,
                    modulation="ada_zero",
                    mlp_ratio=mlp_ratio,
                    qk_norm=qk_norm,
                    window_size=window_size,
                    shift_window=shift_window,
                    proxy_mode=proxy_mode,
                )
                for _ in range(num_layers)
            ]
        )
        self.final_layer = FinalLayerAdaLNZero(dim, patch_size, self.out_channels)
        self._init_weights()
        self.attention_variant = self.native_label()

    def _init_weights(self) -> None:
        DiTModel._init_weights(self)  # type: ignore[arg-type]
        _init_pt_blocks(self.transformer_blocks)

    forward = DiTModel.forward
