"""PixArt-style text-to-image DiT: adaLN-single, cross-attention to text tokens, caption projection.

Parameter names are those of diffusers' ``PixArtTransformer2DModel``, so a converted PixArt-α/Σ ``.pth``
and a diffusers PixArt directory load into this model unchanged, and a stock diffusers PixArt model can be
used as a numerical reference for ours. What this model adds: optional qk-norm (PixArt-Σ's option, and a
training-stability knob), any text encoder width, pixel-space or latent inputs, any grid size.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..attention import init_attention
from ..blocks import DiTBlock, fused_qkv_xavier_init, grid_of, t2i_final_modulation, unpatchify, xavier_init_linears
from ..embeddings import CaptionProjection, PatchEmbed2D
from ..modulation import AdaLNSingle


class TextDiTModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Text-conditioned DiT with the call signature of diffusers' PixArt transformer.

    ``forward(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs, encoder_attention_mask)``;
    ``encoder_attention_mask`` is the tokenizer's (B, L) 1/0 mask (padding tokens are not attended).

    ``attention_variant`` is a ``dit.attention`` label applied last in ``__init__``; ``set_attention`` records trained
    variants (``agent``) here, so ``from_pretrained`` rebuilds their processors before their weights load.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]

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
        attention_variant: str = "sdpa",
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.out_channels = in_channels if out_channels is None else out_channels
        if use_additional_conditions is None:
            use_additional_conditions = sample_size == 128  # PixArt-α 1024-MS convention
        self.use_additional_conditions = use_additional_conditions
        interpolation_scale = interpolation_scale if interpolation_scale is not None else max(sample_size // 64, 1)
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed2D(sample_size, patch_size, in_channels, dim, interpolation_scale)
        self.adaln_single = AdaLNSingle(dim, use_additional_conditions)
        self.caption_projection = CaptionProjection(caption_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [
                DiTBlock(dim, num_attention_heads, attention_head_dim, "ada_single", dim, mlp_ratio, norm_eps, qk_norm)
                for _ in range(num_layers)
            ]
        )
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        self._init_weights()
        # Last, so processors with parameters (agent attention) exist before from_pretrained loads their weights.
        init_attention(self, attention_variant)

    def _init_weights(self) -> None:
        """PixArt's ``initialize_weights``: Xavier everywhere, N(0, .02) embedders, zero cross-attn out."""
        xavier_init_linears(self)
        for block in self.transformer_blocks:
            fused_qkv_xavier_init(block.attn1)
            nn.init.zeros_(block.attn2.to_out[0].weight)
            nn.init.zeros_(block.attn2.to_out[0].bias)
        w = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        emb = self.adaln_single.emb
        for lin in (emb.timestep_embedder.linear_1, emb.timestep_embedder.linear_2, self.adaln_single.linear):
            nn.init.normal_(lin.weight, std=0.02)
        for lin in (self.caption_projection.linear_1, self.caption_projection.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        if attention_mask is not None:
            raise ValueError("TextDiTModel does not take a self-attention mask; pass encoder_attention_mask.")
        batch = hidden_states.shape[0]
        grid = grid_of(hidden_states, self.config.patch_size)
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=hidden_states.device)
        if timestep.numel() == 1:
            timestep = timestep.reshape(-1).expand(batch)
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            bias = (1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0
            encoder_attention_mask = bias.unsqueeze(1)

        x = self.pos_embed(hidden_states)
        t0, embedded_t = self.adaln_single(timestep, added_cond_kwargs, batch, x.dtype)
        text = self.caption_projection(encoder_hidden_states).view(batch, -1, x.shape[-1])
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(
                    block, x, t0, text, encoder_attention_mask, cross_attention_kwargs, grid
                )
            else:
                x = block(x, t0, text, encoder_attention_mask, cross_attention_kwargs, grid)
        x = t2i_final_modulation(x, self.scale_shift_table, embedded_t, self.norm_out)
        out = unpatchify(self.proj_out(x), grid, self.config.patch_size, self.out_channels)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
