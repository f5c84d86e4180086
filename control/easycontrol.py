"""EasyControl (Zhang et al. 2025, Xiaojiu-z/EasyControl) on PixArt-style DiTs: ours and stock diffusers PixArt.

    from control.easycontrol import Condition, EasyControl
    ec = EasyControl.attach(transformer)              # TextDiTModel or diffusers PixArtTransformer2DModel
    ec.load_adapter("canny.safetensors", "canny")     # or ec.add_adapter("canny", rank=8) to train one
    with ec.conditioned([Condition(latents, "canny", strength=1.0)]):
        eps = transformer(x, text, t).sample          # every call sees the condition; its K/V are computed once

What the method is, and how each part is implemented here:

* **Condition tokens.** The condition image is encoded like the noise input (VAE latents, or pixels for our
  pixel-space models) at a fixed size (``control_size``, "position-aware" resize) and patchified by the backbone's
  own ``pos_embed.proj``. Their 2D sin-cos positions are *interpolated* onto the noise grid (PAI): condition token
  ``j`` sits at noise position ``j * noise_grid / condition_grid``, so a 8x8 condition spreads over a 16x16 image
  (:func:`interpolated_position_table`; with PixArt's base-size rule this is the same table the backbone would give
  the condition grid, which the tests check).
* **Own modulation at t = 0.** Condition tokens pass through every block with the block's weights (norms, FFN,
  projections) but with the adaLN-single vectors of timestep 0, so they do not depend on the denoising step.
* **Condition-injection LoRA, on condition tokens only.** Each adapter is a rank-r LoRA on ``to_q``, ``to_k``,
  ``to_v`` and ``to_out.0`` of every block's self-attention, applied only while condition tokens are projected;
  noise and text tokens never go through it. The delta is scaled by the per-condition strength (EasyControl's
  ``lora_weights[i]``) and by alpha/r. Init as EasyControl's ``LoRALinearLayer`` (= PEFT's "gaussian"): down ~
  N(0, 1/r), up = 0, so a new adapter starts as "condition tokens present, no effect learned".
* **Causal mask.** Noise tokens attend to themselves and to every condition; condition tokens attend only to their
  own condition (block-diagonal), never to noise or text. They also skip cross-attention to the text (the
  official mask keeps text rows out of condition rows), so a condition's features depend on the condition image
  alone, and one cache serves both halves of a classifier-free-guidance batch.
* **KV cache.** Because conditions see only themselves, their K/V in every block are the same at every step: they
  are computed once per image (the first transformer call, from a forward pre-hook) and reused; each step then
  costs the noise tokens' attention plus ``len(conditions) * condition_tokens`` extra keys. ``use_cache=False``
  recomputes them every step (what the official pipeline does without its cache), which the tests use as reference.
* **Relative-position bias** (our addition for absolute-position backbones, ``position_bias`` recorded in the
  adapter; 0 = plain EasyControl): noise -> condition logits get ``-beta * d^2`` with d the distance between the
  noise token and the interpolated position of the condition token, the locality RoPE gives FLUX for free
  (:func:`condition_position_bias` says why it is needed).
* **Several conditions** are run one after another, each with its own adapter and strength, and their K/V are all
  appended for the noise tokens: because conditions never see each other this equals the official joint pass with
  its block-diagonal mask, so adapters trained alone compose zero-shot.

Implementation: a diffusers-protocol attention processor on every block's ``attn1`` (:class:`EasyControlAttnProcessor`)
and a pass-through on ``attn2`` that returns zero while condition tokens are processed; the condition branch
(:meth:`EasyControl.compute_condition_cache`) runs the model's own blocks on the condition tokens. No block is
copied, so the method works on any backbone whose blocks are ``dit.blocks.DiTBlock`` or diffusers'
``BasicTransformerBlock`` with adaLN-single (PixArt-α/Σ).

Deliberate differences from the official FLUX code (see also ``control/flux_official.py``, which loads the official
files with the official math): the output-projection LoRA here is a standard LoRA on ``to_out.0``'s *input* (the
file then means what its PEFT keys say), where the official ``proj_loras`` act on ``to_out``'s *output*; and the cache
is filled from the condition branch alone instead of a warm-up pass with the last 32 noise tokens.

Adapter files are PEFT-format safetensors: ``transformer.transformer_blocks.{i}.attn1.processor.{to_q,to_k,to_v,
to_out.0}.lora_A.weight`` / ``lora_B.weight`` with rank/alpha under ``lora_adapter_metadata`` and
``adapter_type=easycontrol``, the preprocessor, the control size and the base model (name, hash, class, shapes) as
flat metadata. The ``processor`` segment keeps them from being mistaken for a plain LoRA: a plain LoRA loader finds
no such module and refuses the file instead of applying the adapter to every token.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dit.embeddings import sincos_1d
from pipelines.errors import InputError, ModelLoadError

ADAPTER_TYPE = "easycontrol"
COMPONENT = "transformer"
PROJECTIONS: dict[str, str] = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out"}  # file name -> module name
_ATTR = "_dit_studio_easycontrol"


class ControlAdapterError(ModelLoadError):
    """A control adapter file cannot be used with this model; the message names the file, the reason and the fix."""


class ControlBaseModelWarning(UserWarning):
    """A control adapter fits this model's shapes but was trained on another base model (its recorded hash differs)."""


# ---------------------------------------------------------------------------------------------- LoRA layers


class ConditionLoRA(nn.Module):
    """``up(down(x)) * alpha / r``; down has no bias (EasyControl's ``LoRALinearLayer``, PEFT's lora_A/lora_B)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        init: str = "gaussian",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)
        self.rank, self.alpha = int(rank), float(alpha)
        self.scale = self.alpha / self.rank
        if init == "gaussian":
            nn.init.normal_(self.down.weight, std=1.0 / rank)
        elif init == "default":  # PEFT's default (Kaiming-uniform A)
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        else:
            raise ValueError(f"init must be 'gaussian' or 'default', got {init!r}")
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.down.weight
        return (self.up(self.down(x.to(w.dtype))) * self.scale).to(x.dtype)


class AdapterLayers(nn.Module):
    """One adapter's four LoRAs in one self-attention layer (named q/k/v/out, so PEFT suffix targets such as
    ``to_q`` never match them)."""

    def __init__(self, attn: nn.Module, rank: int, alpha: float, init: str, dtype: torch.dtype | None = None):
        super().__init__()
        device = attn.to_q.weight.device
        dtype = dtype or attn.to_q.weight.dtype
        for proj, short in PROJECTIONS.items():
            base = _linear(attn, proj)
            self.add_module(short, ConditionLoRA(base.in_features, base.out_features, rank, alpha, init, device, dtype))


def _linear(attn: nn.Module, proj: str) -> nn.Linear:
    module = attn.to_out[0] if proj == "to_out.0" else getattr(attn, proj)
    if hasattr(module, "get_base_layer"):  # a PEFT-wrapped Linear (a plain LoRA loaded as well)
        module = module.get_base_layer()
    return module


# ---------------------------------------------------------------------------------------------- conditions


@dataclass
class Condition:
    """One condition: its encoded image (B or 1, C, h, w) in the model's input space, an adapter, a strength, and
    the adapter's relative-position bias (``position_bias``, see :func:`condition_position_bias`; 0 = none)."""

    latents: torch.Tensor
    adapter: str
    strength: float = 1.0
    position_bias: float = 0.0


@dataclass
class _State:
    """Shared by the processors of one transformer: what is being computed, and the conditions in use."""

    mode: str = "noise"  # "noise": noise tokens (attend to cached conditions); "condition": a condition's tokens
    adapter: str | None = None
    strength: float = 1.0
    conditions: list[Condition] = field(default_factory=list)
    use_cache: bool = True
    conditional_half_only: bool = False  # CFG batches: conditions in the second (conditional) half only
    cache_key: tuple | None = None
    biases: list[torch.Tensor | None] = field(default_factory=list)  # per condition: (noise, cond) logit bias
    passes: int = 0  # condition passes computed (the tests count them)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


def _match_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Cached condition K/V (Bc, H, L, d) for a noise batch: shared (Bc = 1) or per image, repeated for CFG halves."""
    if t.shape[0] == batch:
        return t
    if batch % t.shape[0] == 0:
        return t.repeat(batch // t.shape[0], *([1] * (t.ndim - 1)))
    raise InputError(f"{t.shape[0]} condition images cannot be matched to a batch of {batch} images.")


class _ConditionKVDone(Exception):
    """Raised by the last block's processor once a condition's K/V are cached: nothing after them is ever read."""


class EasyControlAttnProcessor(nn.Module):
    """``attn1`` processor: plain SDPA self-attention for noise tokens plus every cached condition K/V; for condition
    tokens (mode "condition") self-attention among themselves with the active adapter's LoRA, caching K/V."""

    def __init__(self, state: _State, original: Any = None):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self._state = state
        self._original = original
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.last = False  # the last block: its condition outputs are never used

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("EasyControlAttnProcessor is a self-attention processor (attn1); it got text states.")
        if getattr(attn, "spatial_norm", None) is not None or getattr(attn, "group_norm", None) is not None:
            raise ValueError("EasyControl supports DiT self-attention without spatial/group norm.")
        if hidden_states.ndim != 3:
            raise ValueError(
                f"EasyControl expects (batch, tokens, dim) hidden states, got {tuple(hidden_states.shape)}"
            )
        if self._state.mode == "condition":
            return self._condition(attn, hidden_states)
        return self._noise(attn, hidden_states, attention_mask)

    def _finish(self, attn: nn.Module, out: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out = attn.to_out[1](out)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _condition(self, attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
        state = self._state
        if state.adapter not in self.adapters:
            raise KeyError(f"adapter {state.adapter!r} is not loaded")
        lora = self.adapters[state.adapter]
        s = float(state.strength)
        q = attn.to_q(x) + s * lora.q(x)
        k = attn.to_k(x) + s * lora.k(x)
        v = attn.to_v(x) + s * lora.v(x)
        q, k, v = (_heads(t, attn.heads) for t in (q, k, v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        self.kv.append((k, v))  # after norm_k: per-token, so caching before or after is the same
        if self.last:
            raise _ConditionKVDone  # the rest of the last block would only feed condition outputs nobody reads
        o = F.scaled_dot_product_attention(q, k, v)  # a condition sees only itself
        o = o.transpose(1, 2).reshape(x.shape[0], -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        out = attn.to_out[0](o) + s * lora.out(o)
        return self._finish(attn, out, x)

    def _noise(self, attn: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (_heads(proj(x), attn.heads) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if mask is not None:
            mask = attn.prepare_attention_mask(mask, length, batch)
            mask = mask.view(batch, attn.heads, -1, mask.shape[-1])
        if self.kv and self._state.conditional_half_only and batch % 2 == 0:
            # CFG batch [uncond | cond]: conditions only in the conditional half (diffusers ControlNet's guess
            # mode), so classifier-free guidance amplifies the control along with the prompt.
            h = batch // 2
            mu, mc = (None, None) if mask is None else (mask[:h], mask[h:])
            o = torch.cat([self._attend(q[:h], k[:h], v[:h], mu, False), self._attend(q[h:], k[h:], v[h:], mc, True)])
        else:
            o = self._attend(q, k, v, mask, True)
        o = o.transpose(1, 2).reshape(batch, -1, q.shape[1] * q.shape[-1]).to(q.dtype)
        return self._finish(attn, attn.to_out[0](o), x)

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, conditions: bool
    ) -> torch.Tensor:
        """SDPA of noise queries over their own keys plus (if ``conditions``) every cached condition's keys."""
        batch, length = q.shape[0], q.shape[2]
        if conditions and self.kv:
            ks = [k] + [_match_batch(ck, batch).to(k.dtype) for ck, _ in self.kv]
            vs = [v] + [_match_batch(cv, batch).to(v.dtype) for _, cv in self.kv]
            k, v = torch.cat(ks, dim=2), torch.cat(vs, dim=2)
            biases = self._state.biases
            if any(b is not None for b in biases):  # relative-position bias towards the aligned condition tokens
                parts = [torch.zeros(length, length, device=q.device, dtype=q.dtype)]
                parts += [
                    (b if b is not None else torch.zeros(length, ck.shape[2])).to(device=q.device, dtype=q.dtype)
                    for b, (ck, _) in zip(biases, self.kv)
                ]
                bias = torch.cat(parts, dim=1)
                mask = bias if mask is None else F.pad(mask, (0, bias.shape[1] - mask.shape[-1])) + bias
            elif mask is not None:  # noise tokens see every condition token
                mask = F.pad(mask, (0, k.shape[2] - mask.shape[-1]), value=0.0)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class ConditionCrossAttentionSkip:
    """``attn2`` processor: the original one for noise tokens; zero for condition tokens (they see no text)."""

    def __init__(self, state: _State, original: Any):
        self._state = state
        self.original = original

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if self._state.mode == "condition":
            return torch.zeros_like(hidden_states)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


# ---------------------------------------------------------------------------------------------- positions


def interpolated_position_table(
    embed_dim: int,
    condition_grid: tuple[int, int],
    noise_grid: tuple[int, int],
    base_size: float,
    interpolation_scale: float = 1.0,
) -> torch.Tensor:
    """(1, hc*wc, D) sin-cos table of a condition grid spread over the noise grid (EasyControl's PAI).

    Condition token (r, c) gets the position of noise token ``(r * hn / hc, c * wn / wc)``, written in the
    backbone's coordinates (PixArt: ``index / (n / base_size) / interpolation_scale``), with the layout of
    ``dit.embeddings.sincos_2d`` (first half of the channels encodes the column, second half the row).
    """
    (hc, wc), (hn, wn) = condition_grid, noise_grid
    rows = torch.arange(hc, dtype=torch.float64) * (hn / hc) / (hn / base_size) / interpolation_scale
    cols = torch.arange(wc, dtype=torch.float64) * (wn / wc) / (wn / base_size) / interpolation_scale
    gw, gh = torch.meshgrid(cols, rows, indexing="xy")
    table = torch.cat([sincos_1d(embed_dim // 2, gw), sincos_1d(embed_dim // 2, gh)], dim=1)
    return table.float()[None]


def condition_position_bias(
    beta: float, condition_grid: tuple[int, int], noise_grid: tuple[int, int]
) -> torch.Tensor | None:
    """(noise tokens, condition tokens) attention-logit bias ``-beta * d^2``, d the distance (in noise-grid cells)
    between noise token i and the interpolated position of condition token j; None for ``beta == 0``.

    Why: EasyControl's position interpolation works on FLUX because RoPE makes every attention logit depend on
    relative position, so a noise token already prefers the condition token at its place. A backbone with absolute
    sin-cos positions (PixArt, our DiTs) has no such prior: on the emoji default the attention of a noise token on
    the same-position token is 2-3% of its mass (uniform: 1.6%), and an adapter trained without it learns to *hide*
    the conditions (attention on them 45% -> 2%, same loss with shuffled maps) instead of using them. This bias is
    the relative-position term RoPE would give, for noise -> condition logits only; ``beta = 0`` is plain EasyControl.
    """
    if not beta:
        return None
    (hc, wc), (hn, wn) = condition_grid, noise_grid
    rn, cn = torch.meshgrid(torch.arange(hn, dtype=torch.float32), torch.arange(wn, dtype=torch.float32), indexing="ij")
    rc, cc = torch.meshgrid(torch.arange(hc, dtype=torch.float32), torch.arange(wc, dtype=torch.float32), indexing="ij")
    noise = torch.stack([rn.flatten(), cn.flatten()], dim=1)
    cond = torch.stack([rc.flatten() * (hn / hc), cc.flatten() * (wn / wc)], dim=1)
    return -float(beta) * torch.cdist(noise, cond) ** 2


def condition_tokens(transformer: nn.Module, latents: torch.Tensor, noise_grid: tuple[int, int]) -> torch.Tensor:
    """Patchify a condition with the backbone's own patch embedding and add interpolated positions."""
    pe = transformer.pos_embed
    if getattr(pe, "pos_embed_max_size", None):
        raise ValueError("EasyControl needs PixArt-style positions; SD3-style cropped position tables are unsupported.")
    x = pe.proj(latents.to(pe.proj.weight.dtype))
    grid = (x.shape[-2], x.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    if getattr(pe, "layer_norm", False):
        x = pe.norm(x)
    if getattr(pe, "pos_embed", None) is None:
        return x
    table = interpolated_position_table(x.shape[-1], grid, noise_grid, pe.base_size, pe.interpolation_scale)
    return x + table.to(device=x.device, dtype=x.dtype)


def _run_block(block: nn.Module, x: torch.Tensor, t0: torch.Tensor) -> torch.Tensor:
    """One block on condition tokens with the t = 0 modulation (our DiTBlock, or diffusers' PixArt block)."""
    from dit.blocks import DiTBlock

    if isinstance(block, DiTBlock):
        return block(x, t0)
    if getattr(block, "norm_type", None) == "ada_norm_single":
        return block(x, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None, timestep=t0)
    raise TypeError(f"EasyControl supports DiTBlock and PixArt (ada_norm_single) blocks, not {type(block).__name__}")


def check_adapter_file(lora: Any, transformer: nn.Module) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """Check a read adapter file (``pipelines.lora.read_lora``) against ``transformer``: kind, layout, block count
    and shapes; returns ``{(block, projection): (lora_A, lora_B)}`` or raises :class:`ControlAdapterError`."""
    blocks = list(transformer.transformer_blocks)
    meta = lora.metadata
    where = f"Control adapter {lora.path}"
    trained = f" It was trained on {lora.base_model} ({meta.get('base_model_class', '?')})." if lora.base_model else ""
    kind = meta.get("adapter_type")
    if kind not in (None, "", ADAPTER_TYPE):
        raise ControlAdapterError(f"{where} is a {kind!r} adapter, not an EasyControl adapter.")
    if not any(".processor." in m for m in lora.target_modules):
        raise ControlAdapterError(
            f"{where} is a plain LoRA (keys like {next(iter(lora.source_keys.values()))!r}), not a control "
            "adapter: load it with the LoRA picker / pipelines.lora.load_loras instead."
        )
    found: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    bad: list[str] = []
    n = len(blocks)
    for module in lora.target_modules:
        parts = module.split(".")
        ok = (
            len(parts) >= 5
            and parts[0] == "transformer_blocks"
            and parts[1].isdigit()
            and parts[2] == "attn1"
            and parts[3] == "processor"
            and ".".join(parts[4:]) in PROJECTIONS
        )
        if not ok:
            bad.append(lora.source_keys[module])
            continue
        i, proj = int(parts[1]), ".".join(parts[4:])
        if i >= n:
            raise ControlAdapterError(
                f"{where} has layers for block {i}, but this {type(transformer).__name__} has {n} blocks."
                f"{trained} Use an adapter trained on this base model."
            )
        a = lora.tensors[f"{module}.lora_A.weight"]
        b = lora.tensors[f"{module}.lora_B.weight"]
        base = _linear(blocks[i].attn1, proj)
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise ControlAdapterError(
                f"{where}: {lora.source_keys[module]} is {a.shape[1] if a.ndim == 2 else '?'}->"
                f"{b.shape[0] if b.ndim == 2 else '?'}, but this model's {proj} is {base.in_features}->"
                f"{base.out_features}.{trained} Use an adapter trained on this base model."
            )
        found[(i, proj)] = (a, b)
    if bad:
        raise ControlAdapterError(f"{where} has keys that are not EasyControl layers, e.g. {', '.join(bad[:5])}.")
    missing = sorted({(i, p) for i in range(n) for p in PROJECTIONS} - set(found))
    if missing:
        i, proj = missing[0]
        raise ControlAdapterError(
            f"{where} lacks {len(missing)} of {n * len(PROJECTIONS)} layers (e.g. transformer_blocks.{i}.attn1."
            f"processor.{proj}): it was made for a model with fewer blocks.{trained} Use an adapter trained on "
            "this base model."
        )
    return found


# ---------------------------------------------------------------------------------------------- the controller


@dataclass
class AdapterInfo:
    """A loaded adapter: its rank/alpha and where it came from (metadata as recorded in the file)."""

    name: str
    rank: int
    alpha: float
    path: str | None = None
    hash: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def preprocessor(self) -> str | None:
        return self.metadata.get("preprocessor") or None

    @property
    def position_bias(self) -> float:
        try:
            value = float(self.metadata.get("position_bias") or 0.0)
        except ValueError:
            return 0.0
        return value if math.isfinite(value) and value >= 0 else 0.0

    @property
    def control_size(self) -> int | None:
        value = self.metadata.get("control_size")
        return int(value) if value and str(value).isdigit() else None


class EasyControl:
    """EasyControl on one transformer: its processors, adapters, conditions and condition cache.

    Use :meth:`attach` (idempotent) rather than the constructor. :meth:`detach` restores the original processors.
    """

    def __init__(self, transformer: nn.Module):
        blocks = getattr(transformer, "transformer_blocks", None)
        if blocks is None or not hasattr(transformer, "pos_embed") or not hasattr(transformer, "adaln_single"):
            raise TypeError(
                f"EasyControl needs a PixArt-style transformer (pos_embed, adaln_single, transformer_blocks); "
                f"got {type(transformer).__name__}"
            )
        self.transformer = transformer
        self.blocks = list(blocks)
        self.state = _State()
        self.processors: list[EasyControlAttnProcessor] = []
        self._originals: list[tuple[Any, Any]] = []
        self.adapters: dict[str, AdapterInfo] = {}
        for block in self.blocks:
            original1 = block.attn1.processor
            original2 = block.attn2.processor if getattr(block, "attn2", None) is not None else None
            self._originals.append((original1, original2))
            proc = EasyControlAttnProcessor(self.state, original1)
            block.attn1.set_processor(proc)
            if original2 is not None:
                block.attn2.set_processor(ConditionCrossAttentionSkip(self.state, original2))
            self.processors.append(proc)
        self.processors[-1].last = True
        self._hook = transformer.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        setattr(transformer, _ATTR, self)

    @classmethod
    def attach(cls, transformer: nn.Module) -> EasyControl:
        """The controller of ``transformer``, installing it on first use."""
        existing = getattr(transformer, _ATTR, None)
        return existing if isinstance(existing, EasyControl) else cls(transformer)

    @staticmethod
    def of(transformer: nn.Module) -> EasyControl | None:
        existing = getattr(transformer, _ATTR, None)
        return existing if isinstance(existing, EasyControl) else None

    def detach(self) -> None:
        """Remove every trace: original processors back, hook removed, adapters dropped."""
        self.clear_conditions()
        for block, (o1, o2) in zip(self.blocks, self._originals):
            block.attn1.set_processor(o1)
            if o2 is not None:
                block.attn2.set_processor(o2)
        self._hook.remove()
        if getattr(self.transformer, _ATTR, None) is self:
            delattr(self.transformer, _ATTR)
        self.adapters.clear()

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """Temporarily the plain model (to save it without the adapters in its state dict)."""
        for block, (o1, o2) in zip(self.blocks, self._originals):
            block.attn1.set_processor(o1)
            if o2 is not None:
                block.attn2.set_processor(o2)
        try:
            yield
        finally:
            for block, proc, (_, o2) in zip(self.blocks, self.processors, self._originals):
                block.attn1.set_processor(proc)
                if o2 is not None:
                    block.attn2.set_processor(ConditionCrossAttentionSkip(self.state, o2))

    # ---- adapters -----------------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        rank: int = 8,
        alpha: float | None = None,
        init: str = "gaussian",
        dtype: torch.dtype | None = torch.float32,
        metadata: dict[str, str] | None = None,
    ) -> list[nn.Parameter]:
        """Create a new adapter (fp32 by default: trainable); returns its parameters."""
        if not name or "." in name:
            raise ValueError(f"adapter name must be non-empty and without dots, got {name!r}")
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} is already loaded")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        alpha = float(rank if alpha is None else alpha)
        for block, proc in zip(self.blocks, self.processors):
            proc.adapters[name] = AdapterLayers(block.attn1, rank, alpha, init, dtype)
        self.adapters[name] = AdapterInfo(name, rank, alpha, metadata=dict(metadata or {}))
        return self.parameters(name)

    def parameters(self, name: str) -> list[nn.Parameter]:
        return [p for proc in self.processors for p in proc.adapters[name].parameters()]

    def dead_parameters(self, name: str) -> list[nn.Parameter]:
        """The last block's q and out LoRAs: they only shape condition outputs after the last block, which nothing
        reads (true of the official model too), so they never get a gradient. Trainers freeze them (DDP requires
        every trainable parameter to be used); files keep them (zero ``up``) so every block has the same layout."""
        layers = self.processors[-1].adapters[name]
        return [*layers.q.parameters(), *layers.out.parameters()]

    def num_parameters(self, name: str) -> int:
        return sum(p.numel() for p in self.parameters(name))

    def remove_adapter(self, name: str) -> None:
        for proc in self.processors:
            if name in proc.adapters:
                del proc.adapters[name]
        self.adapters.pop(name, None)

    def state_dict(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter in the file layout (PEFT keys under ``transformer.``), fp32 on CPU."""
        out = {}
        for i, proc in enumerate(self.processors):
            layers = proc.adapters[name]
            for proj, short in PROJECTIONS.items():
                lora = getattr(layers, short)
                key = f"{COMPONENT}.transformer_blocks.{i}.attn1.processor.{proj}"
                out[f"{key}.lora_A.weight"] = lora.down.weight.detach().to("cpu", torch.float32).contiguous()
                out[f"{key}.lora_B.weight"] = lora.up.weight.detach().to("cpu", torch.float32).contiguous()
        return out

    def file_metadata(self, name: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        """Safetensors metadata: diffusers' ``lora_adapter_metadata`` (a LoraConfig) plus what control needs."""
        from pipelines.lora import LORA_METADATA_KEY

        info = self.adapters[name]
        targets = [f"processor.{p}" for p in PROJECTIONS]
        peft_config = {
            f"{COMPONENT}.r": info.rank,
            f"{COMPONENT}.lora_alpha": info.alpha,
            f"{COMPONENT}.target_modules": targets,
            f"{COMPONENT}.init_lora_weights": "gaussian",
            f"{COMPONENT}.lora_dropout": 0.0,
            f"{COMPONENT}.bias": "none",
            f"{COMPONENT}.use_rslora": False,
            f"{COMPONENT}.peft_type": "LORA",
        }
        attn = self.blocks[0].attn1
        meta = {
            "format": "pt",
            LORA_METADATA_KEY: json.dumps(peft_config, indent=2, sort_keys=True),
            "adapter_type": ADAPTER_TYPE,
            "rank": str(info.rank),
            "alpha": f"{info.alpha:g}",
            "target_modules": json.dumps(targets),
            "base_model_class": type(self.transformer).__name__,
            "base_num_layers": str(len(self.blocks)),
            "base_inner_dim": str(_linear(attn, "to_q").in_features),
            "base_in_channels": str(self.transformer.config.in_channels),
            "base_patch_size": str(self.transformer.config.patch_size),
        }
        meta.update({k: v for k, v in info.metadata.items() if k not in meta})
        meta.update({k: str(v) for k, v in (extra or {}).items()})
        return meta

    def save_adapter(self, name: str, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        from training.lora import save_lora_file

        return save_lora_file(self.state_dict(name), path, self.file_metadata(name, metadata))

    def load_adapter(
        self, path: str | Path, name: str | None = None, base_hash: str | None = None, hash_value: str | None = None
    ) -> AdapterInfo:
        """Load (or reload) an adapter file, checked before anything is changed.

        Raises :class:`ControlAdapterError` for a file that is not safetensors, is a plain LoRA, misses layers or
        has other shapes (an adapter for another base model: the message names the base it was trained on).
        Warns :class:`ControlBaseModelWarning` if the shapes fit but the recorded base-model hash is not
        ``base_hash``.
        """
        from pipelines.lora import LoraLoadError, read_lora

        try:
            lora = read_lora(path, hash_value=hash_value)
        except LoraLoadError as e:
            raise ControlAdapterError(str(e)) from None
        name = name or Path(lora.path).stem
        tensors = check_adapter_file(lora, self.transformer)
        if base_hash and lora.base_model_hash and lora.base_model_hash != base_hash:
            warnings.warn(
                f"Control adapter {lora.path.name} was trained on {lora.base_model or 'another model'} "
                f"({lora.base_model_hash}); this "
                f"model's hash is {base_hash}. The shapes fit, so it is applied, but it may not control as intended.",
                ControlBaseModelWarning,
                stacklevel=2,
            )
        self.remove_adapter(name)
        alpha = lora.alpha
        rank = lora.rank
        dtype = self.blocks[0].attn1.to_q.weight.dtype
        for i, (block, proc) in enumerate(zip(self.blocks, self.processors)):
            layers = AdapterLayers(block.attn1, rank, alpha, "gaussian", dtype)
            for proj, short in PROJECTIONS.items():
                a, b = tensors[(i, proj)]
                lora_layer = getattr(layers, short)
                if a.shape[0] != rank:  # another rank in this layer: rebuild it with alpha/r of that rank
                    base = _linear(block.attn1, proj)
                    lora_layer = ConditionLoRA(
                        base.in_features, base.out_features, a.shape[0], alpha, "gaussian", base.weight.device, dtype
                    )
                    layers.add_module(short, lora_layer)
                with torch.no_grad():
                    lora_layer.down.weight.copy_(a)
                    lora_layer.up.weight.copy_(b)
            proc.adapters[name] = layers
        info = AdapterInfo(name, rank, alpha, str(lora.path), lora.hash, dict(lora.metadata))
        self.adapters[name] = info
        return info

    # ---- conditions and the cache -------------------------------------------------------------------
    def set_conditions(self, conditions: Sequence[Condition], use_cache: bool = True) -> None:
        """Conditions for the following transformer calls (until :meth:`clear_conditions`)."""
        for c in conditions:
            if c.adapter not in self.adapters:
                raise InputError(f"Control adapter {c.adapter!r} is not loaded. Loaded: {', '.join(self.adapters)}.")
            if not torch.is_tensor(c.latents) or c.latents.ndim != 4:
                raise InputError("A condition must be a (batch, channels, height, width) tensor.")
            if not math.isfinite(float(c.strength)):
                raise InputError(f"Control strength must be a finite number, got {c.strength!r}.")
            if not math.isfinite(float(c.position_bias)) or c.position_bias < 0:
                raise InputError(f"position_bias must be a finite number >= 0, got {c.position_bias!r}.")
        self.state.conditions = list(conditions)
        self.state.use_cache = bool(use_cache)
        self.invalidate()

    def clear_conditions(self) -> None:
        """Drop the conditions and their cache (call after every image, as the official ``clear_cache``)."""
        self.state.conditions = []
        self.invalidate()

    def invalidate(self) -> None:
        self.state.cache_key = None
        self.state.biases = []
        for proc in self.processors:
            proc.kv = []

    @contextlib.contextmanager
    def conditioned(self, conditions: Sequence[Condition], use_cache: bool = True) -> Iterator[EasyControl]:
        self.set_conditions(conditions, use_cache)
        try:
            yield self
        finally:
            self.clear_conditions()

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.state
        if not state.conditions:
            if any(proc.kv for proc in self.processors):
                self.invalidate()
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        added = kwargs.get("added_cond_kwargs", args[3] if len(args) > 3 else None)
        p = int(self.transformer.config.patch_size)
        grid = (hidden.shape[-2] // p, hidden.shape[-1] // p)
        key = (grid, hidden.dtype, hidden.device)
        if not state.use_cache or state.cache_key != key:
            self.compute_condition_cache(grid, added, hidden.dtype)
            state.cache_key = key
        return None

    def compute_condition_cache(
        self, noise_grid: tuple[int, int], added_cond_kwargs: dict | None = None, dtype: torch.dtype | None = None
    ) -> None:
        """Run every condition through the blocks (t = 0, own adapter, no text, no noise) and keep its K/V."""
        state = self.state
        model = self.transformer
        dtype = dtype or model.pos_embed.proj.weight.dtype
        for proc in self.processors:
            proc.kv = []
        state.biases = []
        p = int(model.config.patch_size)
        try:
            for cond in state.conditions:
                state.mode, state.adapter, state.strength = "condition", cond.adapter, float(cond.strength)
                grid = (cond.latents.shape[-2] // p, cond.latents.shape[-1] // p)
                state.biases.append(condition_position_bias(float(cond.position_bias), grid, noise_grid))
                x = condition_tokens(model, cond.latents.to(dtype), noise_grid)
                batch = x.shape[0]
                added = None
                if added_cond_kwargs:
                    added = {k: (v[:batch] if torch.is_tensor(v) else v) for k, v in added_cond_kwargs.items()}
                t = torch.zeros(batch, device=x.device)
                t0, _ = model.adaln_single(t, added_cond_kwargs=added, batch_size=batch, hidden_dtype=x.dtype)
                try:
                    for block in self.blocks:
                        x = _run_block(block, x, t0)
                except _ConditionKVDone:
                    pass
                state.passes += 1
        finally:
            state.mode, state.adapter = "noise", None
