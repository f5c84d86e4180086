"""Class-conditional DiT (Peebles & Xie), faithful to facebookresearch/DiT rather than diffusers' port.

Where diffusers' ``DiTTransformer2DModel`` differs, we keep the original's math (see docs/dit-faithfulness.md):
one timestep/label embedder for the whole model (diffusers copies them into every block), timestep
frequencies ``exp(-ln 1e4 * i / 128)`` (diffusers divides by 127), LayerNorm eps 1e-6 in the MLP branch
(diffusers 1e-5), and Xavier init over the fused qkv. ``dit.convert`` loads both the original ``.pt`` and
a diffusers DiT directory into this model.
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
from ..blocks import (
    DiTBlock,
    FinalLayerAdaLNZero,
    fused_qkv_xavier_init,
    grid_of,
    unpatchify,
    xavier_init_linears,
)
from ..embeddings import LabelEmbedder, PatchEmbed2D, TimestepEmbedder

# depth, hidden size, heads (facebookresearch/DiT ``DiT_models``).
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}


def dit_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Config of a named DiT, e.g. ``"DiT-XL/2"`` or ``"DiT-S/8"`` (the paper's 12 models)."""
    try:
        size, patch = name.removeprefix("DiT-").split("/")
        depth, hidden, heads = DIT_SIZES[size]
        patch_size = int(patch)
    except (ValueError, KeyError):
        valid = ", ".join(f"DiT-{s}/{p}" for s in DIT_SIZES for p in (2, 4, 8))
        raise ValueError(f"Unknown DiT config {name!r}; valid names: {valid}") from None
    if patch_size not in (2, 4, 8):
        raise ValueError(f"DiT patch size must be 2, 4 or 8, got {patch_size} in {name!r}")
    cfg = dict(
        num_layers=depth,
        num_attention_heads=heads,
        attention_head_dim=hidden // heads,
        patch_size=patch_size,
    )
    cfg.update(overrides)
    return cfg


class DiTModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """DiT with adaLN-Zero blocks; ``forward(hidden_states, timestep, class_labels)`` like diffusers' DiT.

    ``learn_sigma=True`` doubles the output channels (ε and the variance interpolation ``v``), as the
    released DiT-XL/2 checkpoints do.

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
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        qk_norm: str | None = None,
        timestep_freq_shift: float = 0.0,
        mlp_norm_eps: float = 1e-6,
        attention_variant: str = "sdpa",
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed2D(sample_size, patch_size, in_channels, dim)
        self.timestep_embedder = TimestepEmbedder(dim, downscale_freq_shift=timestep_freq_shift)
        self.class_embedder = LabelEmbedder(num_classes, dim, class_dropout_prob)
        self.transformer_blocks = nn.ModuleList(
            [
                DiTBlock(dim, num_attention_heads, attention_head_dim, "ada_zero", None, mlp_ratio, 1e-6, qk_norm)
                for _ in range(num_layers)
            ]
        )
        if mlp_norm_eps != 1e-6:
            for block in self.transformer_blocks:
                block.norm2.eps = mlp_norm_eps
        self.final_layer = FinalLayerAdaLNZero(dim, patch_size, self.out_channels)
        self._init_weights()
        # Last, so processors with parameters (agent attention) exist before from_pretrained loads their weights.
        init_attention(self, attention_variant)

    def _init_weights(self) -> None:
        xavier_init_linears(self)
        for block in self.transformer_blocks:
            fused_qkv_xavier_init(block.attn1)
        w = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        nn.init.normal_(self.class_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.timestep_embedder.linear_2.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.adaln_modulation.linear.weight)
            nn.init.zeros_(block.adaln_modulation.linear.bias)
        for p in (self.final_layer.adaln_modulation.linear, self.final_layer.linear):
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        batch = hidden_states.shape[0]
        grid = grid_of(hidden_states, self.config.patch_size)
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=hidden_states.device)
        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep
        x = self.pos_embed(hidden_states)
        cond = self.timestep_embedder(timestep, dtype=x.dtype) + self.class_embedder(class_labels.reshape(-1))
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, cond, None, None, attention_kwargs, grid)
            else:
                x = block(x, cond, attention_kwargs=attention_kwargs, token_grid=grid)
        x = self.final_layer(x, cond)
        out = unpatchify(x, grid, self.config.patch_size, self.out_channels)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
