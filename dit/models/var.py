"""VAR: visual autoregressive modelling by next-scale prediction (FoundationVision/VAR ``models/var.py``,
``basic_var.py``), as a diffusers ``ModelMixin`` + ``ConfigMixin``.

The sequence is the token pyramid of ``dit.models.var_vqvae``: scale ``k`` has ``pn_k**2`` tokens, and all
tokens of a scale are predicted at once from every token of the coarser scales (*block-causal* attention:
token i sees token j iff ``level(i) >= level(j)``). Scale 1's input is the start token ``class_emb + pos_start``;
scale k+1's input is ``word_embed(area_down(f_hat_k, pn_{k+1}))``. Every token gets a learned level embedding
and a learned absolute position.

What is specific to VAR and kept exactly (docs/var.md):

* AdaLN blocks whose six vectors come in VAR's order ``(gamma1, gamma2, scale1, scale2, shift1, shift2)``, not
  DiT's ``(shift, scale, gate) x 2``; the conditioning vector is just the class embedding. With
  ``shared_aln`` (the 512 px d36 model) one shared SiLU->Linear feeds every block, which adds its own
  ``scale_shift_table`` (VAR's ``ada_gss``): PixArt's adaLN-single, applied to a class instead of a timestep.
* attention with a fused bias-free qkv plus separate q and v biases (k's bias is fixed at zero); with
  ``attn_l2_norm`` q and k are L2-normalised and q is multiplied per head by ``exp(min(s, ln 100))``
  (``s`` learned, initialised at ln 4), softmax scale 1; otherwise the scale is ``0.25 / sqrt(head_dim)``.
* the head: AdaLN with (scale, shift) (in that order) before Linear(C, V), computed in float32.
* the released initialisation (``init_weights``).

The attention is VAR's own module rather than diffusers' ``Attention`` because sampling appends every
scale's keys and values to a cache across calls (``VARKVCache``), which the diffusers processor protocol
has no place for; the block reuses ``dit``'s ``AdaLNZero``, ``modulate``, ``LabelEmbedder`` and diffusers'
``FeedForward``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..embeddings import LabelEmbedder
from ..modulation import AdaLNZero, modulate
from .var_vqvae import PATCH_NUMS

#: The released transformers (``build_vae_var`` in VAR's ``models/__init__.py``): depth -> image side.
VAR_DEPTHS: dict[int, int] = {16: 256, 20: 256, 24: 256, 30: 256, 36: 512}


def var_config(depth: int, **overrides: Any) -> dict[str, Any]:
    """Config of a released VAR ``var_d{depth}``: width 64*d, d heads, drop-path 0.1*d/24; d36 is 512 px
    with shared AdaLN."""
    if depth not in VAR_DEPTHS:
        raise ValueError(f"VAR was released with depths {sorted(VAR_DEPTHS)}, not {depth}")
    cfg: dict[str, Any] = dict(
        depth=depth,
        embed_dim=64 * depth,
        num_heads=depth,
        drop_path_rate=0.1 * depth / 24,
        shared_aln=depth == 36,
        attn_l2_norm=True,
        patch_nums=PATCH_NUMS[VAR_DEPTHS[depth]],
    )
    cfg.update(overrides)
    return cfg


def level_ids(patch_nums: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    """(L,) the scale index of every token of the pyramid (VAR's ``lvl_1L``)."""
    return torch.cat([torch.full((pn * pn,), i, dtype=torch.long, device=device) for i, pn in enumerate(patch_nums)])


def block_causal_mask(
    patch_nums: Sequence[int], device: torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """VAR's ``attn_bias_for_masking``: (1, 1, L, L), 0 where ``level(i) >= level(j)``, ``-inf`` elsewhere.

    Computed on demand rather than kept as a buffer: it is a function of the schedule, and at 1024 px
    (L = 9451) it would be a 357 MB tensor that sampling with the KV cache never uses.
    """
    lv = level_ids(patch_nums, device)
    zero = torch.zeros((), device=device, dtype=dtype)
    mask = torch.where(lv[:, None] >= lv[None, :], zero, torch.full((), float("-inf"), device=device, dtype=dtype))
    return mask[None, None]


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth (timm's ``drop_path``, scale by keep): drop the whole residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = 1 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class VARKVCache:
    """Keys and values of the scales fed so far, per block; sampling feeds one scale at a time.

    An explicit object (not state inside the attention modules, as the official ``kv_caching`` flag) so
    that a model can serve several samplers, and a forgotten "disable" cannot leak keys into the next call.
    """

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.keys:
            k = torch.cat((self.keys[layer], k), dim=2)
            v = torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    @property
    def length(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0


class VARSelfAttention(nn.Module):
    """VAR's ``SelfAttention``: fused qkv without bias, q/v biases, zero k bias, optional L2-normalised q/k."""

    def __init__(self, dim: int, num_heads: int, attn_l2_norm: bool = True, attn_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        self.attn_drop = attn_drop
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim), persistent=False)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        kv_cache: VARKVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias.to(self.q_bias.dtype), self.v_bias))
        qkv = F.linear(x, self.qkv.weight, bias).view(b, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, n, d) each
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        if kv_cache is not None:
            k, v = kv_cache.extend(layer, k, v)
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=drop, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class VARBlock(nn.Module):
    """VAR's ``AdaLNSelfAttn``: ``x += g1 * Attn(LN(x)(1+s1)+b1); x += g2 * FFN(LN(x)(1+s2)+b2)``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        attn_l2_norm: bool = True,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.dim, self.drop_path = dim, drop_path
        self.attn = VARSelfAttention(dim, num_heads, attn_l2_norm, attn_drop)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation_fn="gelu-approximate", bias=True)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.shared_aln = shared_aln
        if shared_aln:
            self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        else:
            self.adaln_modulation = AdaLNZero(dim, n_chunks=6)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        kv_cache: VARKVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """``cond``: the class embedding (B, C), or with ``shared_aln`` the shared AdaLN output (B, 6, C)."""
        mods = (self.scale_shift_table[None] + cond).unbind(1) if self.shared_aln else self.adaln_modulation(cond)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = (m[:, None] for m in mods)
        h = self.attn(modulate(self.norm(x), shift1, scale1), attn_bias, kv_cache, layer)
        x = x + drop_path(h * gamma1, self.drop_path, self.training)
        h = self.ff(modulate(self.norm(x), shift2, scale2))
        return x + drop_path(h * gamma2, self.drop_path, self.training)


class VARTransformer(ModelMixin, ConfigMixin):
    """The VAR transformer. Defaults are ``var_d16`` (use ``var_config(depth)`` for the others).

    ``forward(class_labels, teacher_input)`` is the teacher-forced training pass and returns logits
    (B, L, vocab_size); sampling goes through ``class_condition``/``start_tokens``/``scale_tokens``/``logits``
    one scale at a time (``pipelines.var.VARPipeline``). ``sample_size`` is the last token-map side, recorded
    so that tools reading ``config.json`` see the trained size as for every other backbone.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["VARBlock"]

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 4096,
        latent_channels: int = 32,
        num_classes: int = 1000,
        depth: int = 16,
        embed_dim: int = 1024,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        shared_aln: bool = False,
        cond_drop_rate: float = 0.1,
        attn_l2_norm: bool = True,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1 * 16 / 24,
        patch_nums: tuple[int, ...] = PATCH_NUMS[256],
        sample_size: int | None = None,
        init_adaln: float = 0.5,
        init_adaln_gamma: float = 1e-5,
        init_head: float = 0.02,
    ):
        super().__init__()
        patch_nums = tuple(int(p) for p in patch_nums)
        if sample_size is None:
            self.register_to_config(sample_size=patch_nums[-1])
        elif sample_size != patch_nums[-1]:
            raise ValueError(f"sample_size {sample_size} must equal the last patch number {patch_nums[-1]}")
        self.gradient_checkpointing = False
        self.patch_nums = patch_nums
        self.num_scales = len(patch_nums)
        self.first_l = patch_nums[0] ** 2
        self.seq_len = sum(pn * pn for pn in patch_nums)
        self.begin_ends: list[tuple[int, int]] = []
        cur = 0
        for pn in patch_nums:
            self.begin_ends.append((cur, cur + pn * pn))
            cur += pn * pn
        c = embed_dim
        std = math.sqrt(1 / c / 3)
        self.word_embed = nn.Linear(latent_channels, c)
        self.class_embedder = LabelEmbedder(num_classes, c, cond_drop_rate)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, c))
        self.pos_embed = nn.Parameter(torch.empty(1, self.seq_len, c))
        self.level_embed = nn.Embedding(self.num_scales, c)
        nn.init.trunc_normal_(self.pos_start, std=std)
        nn.init.trunc_normal_(self.pos_embed, std=std)
        self.shared_adaln = AdaLNZero(c, n_chunks=6) if shared_aln else None
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            [
                VARBlock(c, num_heads, mlp_ratio, norm_eps, shared_aln, attn_l2_norm, attn_drop_rate, rates[i])
                for i in range(depth)
            ]
        )
        self.head_norm = nn.LayerNorm(c, elementwise_affine=False, eps=norm_eps)
        self.head_adaln = AdaLNZero(c, n_chunks=2)  # VAR's AdaLNBeforeHead: (scale, shift)
        self.head = nn.Linear(c, vocab_size)
        self.register_buffer("level_ids", level_ids(patch_nums), persistent=False)
        self.init_weights(init_adaln, init_adaln_gamma, init_head)

    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02) -> None:
        """VAR's ``init_weights(init_std=-1)``: trunc-normal sqrt(1/3C) for Linear/Embedding, residual
        projections / sqrt(2 depth), AdaLN gammas x ``init_adaln_gamma`` and scales/shifts x ``init_adaln``,
        the head x ``init_head``."""
        c = self.config.embed_dim
        std = math.sqrt(1 / c / 3)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std)
        with torch.no_grad():
            self.head.weight.mul_(init_head)
            self.head.bias.zero_()
            self.head_adaln.linear.weight.mul_(init_adaln)
            self.head_adaln.linear.bias.zero_()
            depth = len(self.blocks)
            for block in self.blocks:
                block.attn.proj.weight.div_(math.sqrt(2 * depth))
                block.ff.net[2].weight.div_(math.sqrt(2 * depth))
                if block.shared_aln:
                    block.scale_shift_table[2:].mul_(init_adaln)
                    block.scale_shift_table[:2].mul_(init_adaln_gamma)
                else:
                    lin = block.adaln_modulation.linear
                    lin.weight[2 * c :].mul_(init_adaln)
                    lin.weight[: 2 * c].mul_(init_adaln_gamma)
                    lin.bias.zero_()

    # ---- pieces shared by training and sampling ------------------------------------------------------
    def level_positions(self) -> torch.Tensor:
        """(1, L, C): level embedding + absolute position of every token."""
        return self.level_embed(self.level_ids)[None] + self.pos_embed

    def class_condition(self, class_labels: torch.Tensor) -> torch.Tensor:
        """Class embedding (B, C) with no label dropout (row ``num_classes`` is the null class)."""
        return self.class_embedder.embedding_table(class_labels.reshape(-1))

    def block_condition(self, cond: torch.Tensor) -> torch.Tensor:
        """What the blocks receive: the class embedding, or the shared AdaLN output (B, 6, C)."""
        if self.shared_adaln is None:
            return cond
        return torch.stack(self.shared_adaln(cond), dim=1)

    def start_tokens(self, cond: torch.Tensor) -> torch.Tensor:
        """Scale 1's input (B, first_l, C): class embedding + ``pos_start`` + level/position."""
        b = cond.shape[0]
        sos = cond[:, None].expand(b, self.first_l, -1) + self.pos_start.expand(b, -1, -1)
        return sos + self.level_positions()[:, : self.first_l]

    def scale_tokens(self, features: torch.Tensor, scale: int) -> torch.Tensor:
        """Scale ``scale``'s input from ``area_down(f_hat, pn)`` given as (B, pn*pn, C_vae) or (B, C_vae, pn, pn)."""
        if features.ndim == 4:
            features = features.flatten(2).transpose(1, 2)
        begin, end = self.begin_ends[scale]
        return self.word_embed(features) + self.level_positions()[:, begin:end]

    def logits(
        self,
        tokens: torch.Tensor,
        cond: torch.Tensor,
        attn_bias: torch.Tensor | None = None,
        kv_cache: VARKVCache | None = None,
        last: int | None = None,
    ) -> torch.Tensor:
        """Run the blocks and the head on ``tokens`` (B, n, C); ``cond`` is the class embedding (B, C).

        Training / uncached sampling pass the whole prefix with ``block_causal_mask``; cached sampling passes
        one scale's tokens and a ``VARKVCache`` (no mask: a scale may see all cached scales and itself).
        ``last``: only the last ``last`` positions go through the head (uncached sampling needs one scale).
        """
        block_cond = self.block_condition(cond)
        x = tokens
        for i, block in enumerate(self.blocks):
            if torch.is_grad_enabled() and self.gradient_checkpointing and kv_cache is None:
                x = self._gradient_checkpointing_func(block, x, block_cond, attn_bias, None, i)
            else:
                x = block(x, block_cond, attn_bias, kv_cache, i)
        if last is not None:
            x = x[:, -last:]
        # VAR computes the head in float32; weights in half precision get their own dtype back.
        dtype = self.head.weight.dtype
        scale, shift = self.head_adaln(cond.to(dtype))
        h = modulate(self.head_norm(x.float()), shift.float()[:, None], scale.float()[:, None])
        return self.head(h.to(dtype)).float()

    def forward(
        self,
        class_labels: torch.Tensor,
        teacher_input: torch.Tensor,
        force_drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, L, vocab_size).

        ``teacher_input`` (B, L - first_l, C_vae) is ``VARVQVAE.quantize.teacher_forcing_input(ids)``. In
        training mode labels are replaced by the null class with probability ``cond_drop_rate`` (CFG).
        """
        b = teacher_input.shape[0]
        cond = self.class_embedder(class_labels.reshape(-1), force_drop)
        sos = cond[:, None].expand(b, self.first_l, -1) + self.pos_start.expand(b, -1, -1)
        x = torch.cat((sos, self.word_embed(teacher_input.to(self.word_embed.weight.dtype))), dim=1)
        x = x + self.level_positions()
        mask = block_causal_mask(self.patch_nums, x.device, x.dtype)
        return self.logits(x, cond, mask)
