"""DiT-3D (Mo et al., NeurIPS 2023): a class-conditional DiT that denoises point clouds through a voxel grid.

Forward pass, as the official ``models/dit3d.py``: the noisy points x_t (B, 3, N) are both the features and
the coordinates of a voxelisation (per-shape normalised into an r³ grid, average of the points' xyz per
voxel); the grid is patchified by a ``Conv3d`` into (r/p)³ tokens with a fixed 3D sin-cos table; DiT
adaLN-Zero blocks run with c = t_emb + class_emb; the final layer predicts p³·C values per token, which are
un-patchified to an r³ grid and devoxelised trilinearly at each point's own (unrounded) coordinates, giving a
per-point ε (B, C, N).

It is composed of the shared pieces (``DiTBlock``, ``FinalLayerAdaLNZero``, ``TimestepEmbedder``,
``LabelEmbedder``), so parameter names match ``DiTModel`` block for block; that is what makes the paper's
2D->3D initialisation (``init_from_dit2d``) a plain copy. Differences from the official code, all deliberate:

* 3D window attention is real (``dit.attention_window3d``); the official blocks stay global (issues #14, #30).
* The MLP activation is configurable: ``"gelu"`` (exact, the official DiT-3D default, "for torch 1.7.1") or
  ``"gelu-approximate"`` (tanh, what 2D DiT trained with, a better match for 2D-initialised blocks).
* 2D->3D initialisation copies the blocks for every size; the official XL/2 and XL/8 copy everything *but*
  the blocks (their filter is inverted).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..attention_window3d import WindowAttention3DProcessor
from ..blocks import DiTBlock, FinalLayerAdaLNZero, fused_qkv_xavier_init, xavier_init_linears
from ..embeddings import LabelEmbedder, TimestepEmbedder
from ..embeddings3d import PatchEmbed3D, unpatchify_3d
from ..voxel import devoxelize, normalize_coords, voxelize

# depth, hidden size, heads (DiT-3D ``DiT3D_models``; L is 1152 wide there, not 2D DiT-L's 1024, because the
# 3D sin-cos table needs a width divisible by 3).
DIT3D_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1152, 16),
    "XL": (28, 1152, 16),
}
# The official scripts' window blocks: every third block, window 4 (``scripts/train_*_chair.sh``).
DEFAULT_WINDOW_SIZE = 4
ACTIVATIONS = ("gelu", "gelu-approximate")


def dit3d_config(name: str, window: bool = False, **overrides: Any) -> dict[str, Any]:
    """Config of a named DiT-3D, e.g. ``"DiT-3D-S/4"`` (``"DiT-S/4"`` as the official keys also works).

    ``window=True`` adds the official scripts' 3D window attention: window 4 in blocks 0, 3, 6, ... (S uses
    0, 3, 6, 9; XL 0, 3, ..., 24).
    """
    try:
        size, patch = name.removeprefix("DiT-3D-").removeprefix("DiT-").split("/")
        depth, hidden, heads = DIT3D_SIZES[size]
        patch_size = int(patch)
    except (ValueError, KeyError):
        valid = ", ".join(f"DiT-3D-{s}/{p}" for s in DIT3D_SIZES for p in (2, 4, 8))
        raise ValueError(f"Unknown DiT-3D config {name!r}; valid names: {valid}") from None
    if patch_size not in (2, 4, 8):
        raise ValueError(f"DiT-3D patch size must be 2, 4 or 8, got {patch_size} in {name!r}")
    cfg: dict[str, Any] = dict(
        num_layers=depth, num_attention_heads=heads, attention_head_dim=hidden // heads, patch_size=patch_size
    )
    if window:
        cfg.update(window_size=DEFAULT_WINDOW_SIZE, window_block_indexes=list(range(0, depth - 2, 3)))
    cfg.update(overrides)
    return cfg


class DiT3DModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """DiT-3D denoiser: ``forward(hidden_states (B, 3, N) points, timestep, class_labels) -> (B, C, N)``.

    ``sample_size`` is the voxel resolution r (32 in the paper), ``patch_size`` p in {2, 4, 8} gives (r/p)³
    tokens. ``window_size`` > 0 turns on 3D window attention in ``window_block_indexes``. Hidden size
    (heads x head dim) must be divisible by 6 for the 3D sin-cos table.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 4,
        in_channels: int = 3,
        num_layers: int = 12,
        num_attention_heads: int = 6,
        attention_head_dim: int = 64,
        mlp_ratio: float = 4.0,
        num_classes: int = 55,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = False,
        window_size: int | Sequence[int] = 0,
        window_block_indexes: Sequence[int] = (),
        activation_fn: str = "gelu",
        voxel_eps: float = 0.0,
    ):
        super().__init__()
        dim = num_attention_heads * attention_head_dim
        if dim % 6:
            raise ValueError(f"hidden size {dim} must be divisible by 6 (3D sin-cos table: D/3 per axis, each even)")
        if activation_fn not in ACTIVATIONS:
            raise ValueError(f"activation_fn must be one of {ACTIVATIONS}, got {activation_fn!r}")
        bad = [i for i in window_block_indexes if not 0 <= int(i) < num_layers]
        if bad:
            raise ValueError(f"window_block_indexes {bad} are out of range for {num_layers} blocks")
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed3D(sample_size, patch_size, in_channels, dim)
        self.timestep_embedder = TimestepEmbedder(dim)
        self.class_embedder = LabelEmbedder(num_classes, dim, class_dropout_prob)
        self.transformer_blocks = nn.ModuleList(
            [
                DiTBlock(dim, num_attention_heads, attention_head_dim, "ada_zero", None, mlp_ratio, 1e-6)
                for _ in range(num_layers)
            ]
        )
        if activation_fn == "gelu":
            for block in self.transformer_blocks:
                block.ff.net[0].approximate = "none"
        # A p·p·(p·C) linear is a p³·C linear; ``unpatchify_3d`` reads it in DiT-3D's (p, q, r, c) order.
        self.final_layer = FinalLayerAdaLNZero(dim, patch_size, self.out_channels * patch_size)
        self._init_weights()
        self.window_blocks = sorted({int(i) for i in window_block_indexes}) if self._has_window() else []
        for i in self.window_blocks:
            self.transformer_blocks[i].attn1.set_processor(WindowAttention3DProcessor(window_size))
        self.attention_variant = self._attention_label()

    def _has_window(self) -> bool:
        w = self.config.window_size
        return bool(w) and (isinstance(w, int) or any(int(v) > 0 for v in w))

    def _attention_label(self) -> str:
        if not self.window_blocks:
            return "sdpa"
        w = self.config.window_size
        size = "x".join(str(v) for v in ([w] * 3 if isinstance(w, int) else w))
        return f"window3d-{size}@{','.join(map(str, self.window_blocks))}"

    def _init_weights(self) -> None:
        """DiT-3D's ``initialize_weights`` (the same as 2D DiT's, with the Conv3d flattened like a Linear)."""
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

    @property
    def token_grid(self) -> tuple[int, int, int]:
        g = self.config.sample_size // self.config.patch_size
        return (g, g, g)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.Tensor,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[torch.Tensor]:
        if hidden_states.dim() != 3 or hidden_states.shape[1] != self.config.in_channels:
            raise ValueError(
                f"DiT3DModel expects point clouds of shape (B, {self.config.in_channels}, N), "
                f"got {tuple(hidden_states.shape)}"
            )
        batch = hidden_states.shape[0]
        r = self.config.sample_size
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], device=hidden_states.device)
        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep
        norm_coords = normalize_coords(hidden_states[:, :3], r, self.config.voxel_eps)
        volume = voxelize(hidden_states, norm_coords, r)
        x = self.pos_embed(volume)
        cond = self.timestep_embedder(timestep, dtype=x.dtype) + self.class_embedder(class_labels.reshape(-1))
        grid = self.pos_embed.grid_of(volume)
        for block in self.transformer_blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, cond, None, None, attention_kwargs, grid)
            else:
                x = block(x, cond, attention_kwargs=attention_kwargs, token_grid=grid)
        x = self.final_layer(x, cond)
        out_volume = unpatchify_3d(x, grid, self.config.patch_size, self.out_channels)
        out = devoxelize(out_volume, norm_coords)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


# ----------------------------------------------------------------------------------------------------------------
# 2D -> 3D initialisation


def _dit2d_state_dict(source: Any) -> dict[str, torch.Tensor]:
    """Weights of a 2D DiT in our ``DiTModel`` naming from a model, a state dict, a directory or a file."""
    from ..convert.dit_original import convert_diffusers_dit, dit_original_to_ours
    from ..convert.safe_load import load_checkpoint

    if isinstance(source, nn.Module):
        return dict(source.state_dict())
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            sub = path / "transformer" if (path / "transformer").is_dir() else path
            config = sub / "config.json"
            if config.is_file() and '"DiTModel"' in config.read_text(encoding="utf-8"):
                from .dit import DiTModel

                return dict(DiTModel.from_pretrained(sub).state_dict())
            return dict(convert_diffusers_dit(sub).state_dict())
        source = load_checkpoint(path)
    state = dict(source)
    if any(k.startswith("blocks.") for k in state):  # official facebookresearch/DiT naming
        return dit_original_to_ours(state, "2D DiT checkpoint")
    return state


def init_from_dit2d(model: DiT3DModel, source: Any, strict_depth: bool = True) -> list[str]:
    """Copy a 2D DiT's transformer blocks into ``model``, as DiT-3D's ``pretrained=True`` does.

    ``source``: a ``DiTModel``, its state dict, a directory (ours or diffusers' DiT), or an official
    ``DiT-XL-2-*.pt`` / ``DiT-S-4.pth`` (EMA weights when present). Only ``transformer_blocks.*`` is copied:
    the patch embedding, position table, timestep/class embedders and final layer stay at their init, since
    their shapes (Conv3d, p³·3 outputs, 55 classes) have no 2D counterpart. Widths must match (DiT-3D-L is
    1152 wide, 2D DiT-L 1024, so L cannot be initialised from 2D). Returns the copied keys.
    """
    state = _dit2d_state_dict(source)
    blocks = {k: v for k, v in state.items() if k.startswith("transformer_blocks.")}
    if not blocks:
        raise ValueError("the 2D checkpoint has no transformer blocks (keys 'transformer_blocks.*' or 'blocks.*')")
    depth_2d = len({k.split(".")[1] for k in blocks})
    depth_3d = len(model.transformer_blocks)
    if depth_2d != depth_3d:
        if strict_depth:
            raise ValueError(
                f"the 2D DiT has {depth_2d} blocks and the 3D model {depth_3d}; pick the matching size "
                "(S/B: 12, XL: 28) or pass strict_depth=False to copy the first min(...) blocks"
            )
        blocks = {k: v for k, v in blocks.items() if int(k.split(".")[1]) < depth_3d}
    target = model.state_dict()
    wrong = [
        f"{k} (2D {tuple(v.shape)}, 3D {tuple(target[k].shape)})"
        for k, v in blocks.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    unknown = sorted(k for k in blocks if k not in target)
    if wrong or unknown:
        detail = "; ".join(filter(None, [", ".join(wrong[:4]), ", ".join(unknown[:4])]))
        raise ValueError(f"the 2D DiT blocks do not fit this DiT-3D (different width or MLP ratio?): {detail}")
    missing = [k for k in target if k.startswith("transformer_blocks.") and k not in blocks]
    if missing and strict_depth:
        raise ValueError(f"the 2D checkpoint lacks block weights: {', '.join(missing[:6])}")
    with torch.no_grad():
        for k, v in blocks.items():
            target[k].copy_(v.to(target[k].dtype))
    return sorted(blocks)


def dit3d_from_dit2d(name: str, source: Any, **overrides: Any) -> DiT3DModel:
    """A new DiT-3D of config ``name`` whose blocks come from a 2D DiT (see ``init_from_dit2d``)."""
    model = DiT3DModel(**dit3d_config(name, **overrides))
    init_from_dit2d(model, source)
    return model
