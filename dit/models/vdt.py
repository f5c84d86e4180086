"""VDT (Lu et al., ICLR 2024): a video diffusion transformer with divided space-time attention.

Faithful to ``RERV/VDT`` ``models.py`` (the unified spatial-temporal mask release):

* every frame is patchified on its own (one ``PatchEmbed2D``, i.e. a Conv2d plus the fixed 2D sin-cos table)
  and a fixed 1D sin-cos *time* table is added per frame (the original adds ``time_embed[1, T, D]`` in the
  ``(b n) t m`` layout, which is the same as adding row ``t`` to every token of frame ``t``);
* each block first runs **temporal attention**: tokens at one spatial position attend across the frames,
  through an affine ``LayerNorm`` (eps 1e-5), attention with qkv bias and a ``temporal_fc`` Linear, added as a
  plain residual (no adaLN, no gate); then **spatial attention** within each frame and the MLP, both with
  adaLN-Zero from ``c = t_emb (+ y_emb)``. The modulation belongs to the video and is broadcast to its frames;
* the final layer is DiT's (adaLN, Linear to ``p*p*C_out``), ``C_out = 2C`` with learned sigma.

The spatial part of a block *is* our ``DiTBlock``: :class:`VDTBlock` subclasses it and adds the temporal
branch, so VDT shares the DiT math (and every attention processor) instead of copying it.

Differences from the original, none of which changes the math of a converted checkpoint:

* layout ``(B, C, T, H, W)`` in and out (diffusers' video convention, so the shared sampler loop's "channel
  dim 1" rules for learned sigma and partial guidance hold); the original takes ``(B, T, C, H, W)``;
* the class embedder is gone: the original always feeds label 0 (it has no classes), so its row 0 is a
  constant that ``dit.convert.vdt_original`` folds into the timestep MLP's last bias. Row 1000, which the
  original's label *dropout* swaps in during training only, is never used at sampling;
* the time and 2D position tables are computed for any number of frames and grid (the original's are
  fixed-size parameters that must match ``num_frames`` and the square training grid).

Attention processors (``dit.attention.set_attention``) go on the spatial attention, ``attn1`` of ``DiTBlock``.
A processor that declares ``needs_token_grid = True`` gets the grid of exactly the tokens it sees:

* ``spatial_attention_scope="frame"`` (default, VDT): ``attn1`` sees one frame, ``(B*T, h*w, D)`` with
  ``token_grid=(1, h, w)``; window / proxy processors then work within each frame, a training-free stand-in for
  the per-frame attention the model was trained with;
* ``"video"``: ``attn1`` sees the whole clip, ``(B, T*h*w, D)`` with ``token_grid=(T, h, w)``. With window or
  proxy processors that is PT-DiT's spatial-temporal windows (proxy tokens of every frame's windows attended
  globally); with the default full attention it is joint space-time attention. It changes the model's math,
  so it is for training, not for checkpoints trained per frame. The MLP and modulation are per token, so only
  the attention differs between the two.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.attention_processor import Attention
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..attention import init_attention
from ..blocks import DiTBlock, FinalLayerAdaLNZero, fused_qkv_xavier_init, unpatchify, xavier_init_linears
from ..embeddings import PatchEmbed2D, TimestepEmbedder, sincos_1d

# depth, hidden size, heads (RERV/VDT ``VDT_models``: VDT-L/2 and VDT-S/2).
VDT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "L": (28, 1152, 16),
}


def vdt_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Config of a named VDT, ``"VDT-S/2"`` or ``"VDT-L/2"`` (other patch sizes are allowed: ``VDT-S/4``)."""
    try:
        size, patch = name.removeprefix("VDT-").split("/")
        depth, hidden, heads = VDT_SIZES[size]
        patch_size = int(patch)
    except (ValueError, KeyError):
        valid = ", ".join(f"VDT-{s}/2" for s in VDT_SIZES)
        raise ValueError(f"Unknown VDT config {name!r}; valid names: {valid}") from None
    if patch_size < 1:
        raise ValueError(f"VDT patch size must be positive, got {patch_size} in {name!r}")
    cfg = dict(num_layers=depth, num_attention_heads=heads, attention_head_dim=hidden // heads, patch_size=patch_size)
    cfg.update(overrides)
    return cfg


class VDTBlock(DiTBlock):
    """``DiTBlock`` (spatial attention + MLP with adaLN-Zero) preceded by VDT's temporal attention branch.

    ``forward(x, cond, num_frames)`` takes ``x`` as ``(B*T, N, D)`` (frames of a video consecutive) and ``cond``
    as ``(B, D)``, one modulation per video broadcast to its frames (the original's broadcast).
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0):
        super().__init__(dim, num_attention_heads, attention_head_dim, "ada_zero", None, mlp_ratio, 1e-6)
        # The original's ``temporal_norm1 = nn.LayerNorm(hidden_size)``: affine, PyTorch's default eps.
        self.temporal_norm = nn.LayerNorm(dim)
        self.temporal_attn = Attention(
            query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim, bias=True, out_bias=True
        )
        self.temporal_fc = nn.Linear(dim, dim)

    def temporal(self, hidden_states: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Attention across frames at each spatial position: ``(B*T, N, D) -> (B*N, T, D) -> back``."""
        bt, n, d = hidden_states.shape
        b = bt // num_frames
        x = hidden_states.reshape(b, num_frames, n, d).transpose(1, 2).reshape(b * n, num_frames, d)
        res = self.temporal_attn(self.temporal_norm(x))
        res = res.reshape(b, n, num_frames, d).transpose(1, 2).reshape(bt, n, d)
        return hidden_states + self.temporal_fc(res)

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        cond: torch.Tensor,
        num_frames: int,
        attention_kwargs: dict[str, Any] | None = None,
        token_grid: tuple[int, ...] | None = None,
        scope: str = "frame",
    ) -> torch.Tensor:
        """``token_grid`` is the clip's ``(T, h, w)``; ``scope`` says what the spatial attention sees."""
        x = self.temporal(hidden_states, num_frames)
        bt, n, d = x.shape
        grid = token_grid[-2:] if token_grid is not None else None
        if scope == "video":
            grid3 = (num_frames, *grid) if grid is not None else None
            out = super().forward(
                x.reshape(bt // num_frames, num_frames * n, d),
                cond,
                attention_kwargs=attention_kwargs,
                token_grid=grid3,
            )
            return out.reshape(bt, n, d)
        grid3 = (1, *grid) if grid is not None else None
        cond = cond.repeat_interleave(num_frames, dim=0)
        return super().forward(x, cond, attention_kwargs=attention_kwargs, token_grid=grid3)


class VDTModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """VDT backbone: ``forward(hidden_states (B, C, T, H, W), timestep)`` -> ``(B, C_out, T, H, W)``.

    The model is told nothing about which frames are given: as in the paper, the unified mask is applied to
    its *input* (clean latents where given, noisy ones elsewhere; see ``dit.video_masks``) and the model
    learns to tell them apart.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["VDTBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        num_frames: int = 16,
        patch_size: int = 2,
        in_channels: int = 4,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        mlp_ratio: float = 4.0,
        learn_sigma: bool = True,
        spatial_attention_scope: str = "frame",
        attention_variant: str = "sdpa",
    ):
        super().__init__()
        if spatial_attention_scope not in ("frame", "video"):
            raise ValueError(f"spatial_attention_scope must be 'frame' or 'video', got {spatial_attention_scope!r}")
        dim = num_attention_heads * attention_head_dim
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed2D(sample_size, patch_size, in_channels, dim)
        self.register_buffer("time_embed", self.time_table(num_frames, dim)[None], persistent=False)
        self.timestep_embedder = TimestepEmbedder(dim)
        self.transformer_blocks = nn.ModuleList(
            [VDTBlock(dim, num_attention_heads, attention_head_dim, mlp_ratio) for _ in range(num_layers)]
        )
        self.final_layer = FinalLayerAdaLNZero(dim, patch_size, self.out_channels)
        self._init_weights()
        # Last, so processors with parameters (agent attention) exist before from_pretrained loads their weights.
        init_attention(self, attention_variant)

    @staticmethod
    def time_table(num_frames: int, dim: int) -> torch.Tensor:
        """The original's ``get_1d_sincos_pos_embed_from_grid(D, arange(T))``: (T, D), sin half first."""
        return sincos_1d(dim, torch.arange(num_frames)).float()

    def _init_weights(self) -> None:
        # The original's initialize_weights: Xavier for every Linear (temporal ones included, so temporal_fc
        # is NOT zero at init), Xavier over the fused qkv, patch conv as a Linear, N(0, 0.02) timestep MLP,
        # zeroed adaLN and output layers.
        xavier_init_linears(self)
        for block in self.transformer_blocks:
            fused_qkv_xavier_init(block.attn1)
            fused_qkv_xavier_init(block.temporal_attn)
        w = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        nn.init.normal_(self.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.timestep_embedder.linear_2.weight, std=0.02)
        for block in self.transformer_blocks:
            nn.init.zeros_(block.adaln_modulation.linear.weight)
            nn.init.zeros_(block.adaln_modulation.linear.bias)
        for p in (self.final_layer.adaln_modulation.linear, self.final_layer.linear):
            nn.init.zeros_(p.weight)
            nn.init.zeros_(p.bias)

    def time_embedding(self, num_frames: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if num_frames == self.time_embed.shape[1]:
            return self.time_embed.to(device=device, dtype=dtype)
        return self.time_table(num_frames, self.time_embed.shape[-1])[None].to(device=device, dtype=dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        if hidden_states.dim() != 5:
            raise ValueError(
                f"VDTModel expects video latents of shape (batch, channels, frames, height, width), "
                f"got {tuple(hidden_states.shape)}"
            )
        b, c, t, h, w = hidden_states.shape
        p = self.config.patch_size
        if h % p or w % p:
            raise ValueError(f"frame size {h}x{w} is not a multiple of the patch size {p}")
        grid = (h // p, w // p)
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=hidden_states.device)
        timestep = timestep.reshape(-1).expand(b) if timestep.numel() == 1 else timestep.reshape(-1)
        frames = hidden_states.transpose(1, 2).reshape(b * t, c, h, w)
        x = self.pos_embed(frames)  # (B*T, N, D) with the 2D table
        n, d = x.shape[1], x.shape[2]
        x = (x.reshape(b, t, n, d) + self.time_embedding(t, x.device, x.dtype)[:, :, None]).reshape(b * t, n, d)
        cond = self.timestep_embedder(timestep, dtype=x.dtype)  # (B, D): one modulation per video
        token_grid = (t, *grid)
        scope = self.config.spatial_attention_scope
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, cond, t, attention_kwargs, token_grid, scope)
            else:
                x = block(x, cond, t, attention_kwargs=attention_kwargs, token_grid=token_grid, scope=scope)
        x = self.final_layer(x, cond.repeat_interleave(t, dim=0))
        out = unpatchify(x, grid, p, self.out_channels)  # (B*T, C_out, H, W)
        out = out.reshape(b, t, self.out_channels, h, w).transpose(1, 2)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)
