"""RelaCtrl (Cao et al. 2025, 360CVGroup/RelaCtrl): relevance-guided control blocks with the Two-Dimensional
Shuffle Mixer, on PixArt-style DiTs (ours and stock diffusers PixArt), as a :class:`BlockControl` adapter.

    from control.relactrl import RelaCtrl
    adapter = RelaCtrl.from_transformer(transformer, positions=[0, 1, 3], groups=[2, 4, 4], seed=0)
    BlockControl.attach(transformer).add_adapter("canny-relactrl", adapter)

**Placement and sizes** (official ``diffusion/model/nets/pixart_relactrl_v1.py``, ``ControlPixArtHalf_RelaCtrl``):
K control blocks sit after the base blocks chosen by the ControlNet Relevance Score (``positions``; officially
``c_adding_index = [0, 2, 3, 4, 5, 6, 7, 8, 9, 18, 19]`` of 28), and each block's TDSM is split into ``groups``
channel groups (officially ``prior2 = [6, 2, 6, 4, 2, 2, 4, 4, 6, 6, 6]``: the three most relevant positions get
2 wide groups, the next three 4, the rest 6 narrow ones). :func:`placement_from_scores` turns relevance scores
into both (``training.relevance`` computes the scores).

**RGLC block** k (``before_proj``/``after_proj``: zero-initialised Linear(D, D)):

    k = 0:  c = TDSM(x + before_proj(c_embed))     c_embed = frozen base patch embedding + sin-cos positions
    k > 0:  c = TDSM(c + before_proj(x))           (the base hidden state is re-injected at every block)
    skip = after_proj(c)

**Injection, exactly as the official loop**: for base blocks 1..L-1, if block ``b - 1`` is a control position the
control block is run on the input of block ``b`` and its ``skip`` replaces the held one; then block ``b`` runs on
``x + skip`` with the *latest* ``skip``. So a skip is re-added at every following base block until the next control
position (officially blocks 11-18 all receive the skip made after block 9, and blocks 20-27 the one made after
19); base blocks before the first position receive nothing.

**TDSM** (replaces self-attention, cross-attention and FFN; there is no FFN and no text):

1. ``shift, scale, gate`` from ``scale_shift_table[6, D] + t0`` (the msa third only); ``h = LN(c)(1 + scale) + shift``.
2. Permute the D channels and cut them into ``groups`` groups (:func:`tdsm_group_widths`, multiples of 8 x heads).
3. Per group (width d): flatten the (L, d) tokens x channels of each sample, permute all L*d elements (this mixes
   the token and channel axes), cut into ``segments`` = 4 segments, view each as (L/4, d) pseudo-tokens, run one
   shared multi-head attention (4 heads, qkv with bias, PixArt's ``WindowAttention``) within each segment,
   concatenate, undo the permutation.
4. Put the channels back; ``c = c_in + gate * out``.

**Differences from the official code** (also in docs/control.md):

* The shuffles are *seedable and fixed*: permutation k (channel) and (k, g, L) (token-channel) are drawn from
  ``seed`` (stored in the adapter file's ``adapter_config``), so a generation is reproducible. The official code
  draws fresh ``torch.randperm`` at every forward, at inference too (so its images are not reproducible from the
  seed). Training uses the fixed shuffles by default (what is trained is what runs); ``shuffle_training="random"``
  draws fresh ones per forward as the official code does.
* Any width and token count: group widths use the official rule (equal split rounded to multiples of 8 x heads =
  32) where it applies, and halve the multiple for narrow models (the official rule loops forever when
  ``groups * 32 > D``); a token count that is not a multiple of 4 gives segments differing by one pseudo-token
  (the official ``view`` fails).
* The official ``scale_shift_table`` has 6 rows of which 3 are used; it is kept (files convert 1:1).

Adapter files: ``adapter_type=relactrl``, ``adapter_config`` = {positions, groups, heads, segments, seed,
shuffle_training, inner_dim}, keys ``blocks.{k}.{before_proj,after_proj}.*``, ``blocks.{k}.tdsm.scale_shift_table``,
``blocks.{k}.tdsm.attn.{g}.{qkv,proj}.*``. Official ``relactrl_pixart_*.pth`` convert with
``dit.convert.relactrl_original``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .controlnet_transformer import BlockCall, ResidualControlAdapter, _zero_linear, base_blocks, inner_dim

ADAPTER_TYPE = "relactrl"
#: The released PixArt-α 1024 configuration (28 blocks).
OFFICIAL_POSITIONS = (0, 2, 3, 4, 5, 6, 7, 8, 9, 18, 19)
OFFICIAL_GROUPS = (6, 2, 6, 4, 2, 2, 4, 4, 6, 6, 6)
#: Groups by relevance tier (most relevant third, middle third, rest), read off the released configuration.
GROUP_TIERS = (2, 4, 6)


def tdsm_group_widths(dim: int, groups: int, heads: int = 4) -> list[int]:
    """Channel-group widths of a TDSM: ``groups`` near-equal widths, each a multiple of ``8 * heads``, summing to dim.

    The official ``distribute_dim_4_TDSM_token`` (gives 6 x 192, 2 x 576, 4 x 288 for D = 1152). Narrow models: the
    multiple is halved until ``groups`` groups fit (never below ``heads``), then groups are capped at
    ``dim // multiple``; the official loop does not terminate there.
    """
    if groups < 1:
        raise ValueError(f"a TDSM needs at least one group, got {groups}")
    if dim % heads:
        raise ValueError(f"width {dim} is not divisible by {heads} heads")
    multiple = 8 * heads
    while multiple > heads and (dim % multiple or dim // multiple < groups):
        multiple //= 2
    if dim % multiple:
        raise ValueError(f"width {dim} cannot be split into groups of multiples of {heads}")
    groups = min(groups, dim // multiple)
    base, rem = divmod(dim, groups)
    widths = [base + 1 if i < rem else base for i in range(groups)]
    widths = [w + (-w) % multiple for w in widths]
    diff = dim - sum(widths)
    i = 0
    while diff:
        step = multiple if diff > 0 else -multiple
        if widths[i] + step > 0:
            widths[i] += step
            diff -= step
        i = (i + 1) % groups
    return widths


def _seeded_perm(n: int, device: torch.device, *key: Any) -> torch.Tensor:
    """A permutation of ``n`` drawn from a generator seeded by ``key`` (same on every machine and call)."""
    seed = int.from_bytes(hashlib.sha256(repr(key).encode()).digest()[:8], "little") & ((1 << 63) - 1)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g).to(device)


def segment_lengths(tokens: int, segments: int) -> list[int]:
    """Pseudo-tokens per segment: ``tokens / segments`` each (official), the first ``tokens % segments`` one more."""
    base, rem = divmod(tokens, segments)
    return [base + 1 if i < rem else base for i in range(segments) if base + (1 if i < rem else 0) > 0]


class GroupAttention(nn.Module):
    """PixArt's ``WindowAttention`` without relative positions: fused qkv (bias), SDPA over heads, proj."""

    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"group width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, d))


class TDSM(nn.Module):
    """The Two-Dimensional Shuffle Mixer of one control block (see the module docstring)."""

    def __init__(self, dim: int, groups: int, heads: int = 4, segments: int = 4, norm_eps: float = 1e-6):
        super().__init__()
        self.dim, self.heads, self.segments = int(dim), int(heads), int(segments)
        self.widths = tdsm_group_widths(dim, groups, heads)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.attn = nn.ModuleList([GroupAttention(w, heads) for w in self.widths])

    def mix_group(self, h: torch.Tensor, g: int, perm: torch.Tensor) -> torch.Tensor:
        """Token-channel shuffle of group ``g``'s (B, L, d) features, attention within segments, inverse shuffle."""
        b, length, d = h.shape
        flat = h.reshape(b, length * d)[:, perm]
        lengths = segment_lengths(length, self.segments)
        if len(set(lengths)) == 1:  # the official case: equal segments, one batched attention call
            out = self.attn[g](flat.reshape(b * len(lengths), lengths[0], d)).reshape(b, length * d)
        else:
            parts = flat.split([n * d for n in lengths], dim=1)
            out = torch.cat([self.attn[g](p.reshape(b, n, d)).reshape(b, n * d) for p, n in zip(parts, lengths)], 1)
        return unshuffle(out, perm).reshape(b, length, d)

    def forward(
        self,
        c: torch.Tensor,
        t0: torch.Tensor,
        channel_perm: torch.Tensor,
        token_perms: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        b = c.shape[0]
        shift, scale, gate = (self.scale_shift_table[None] + t0.reshape(b, 6, -1)).chunk(6, dim=1)[:3]
        h = self.norm(c) * (1 + scale) + shift
        h = h[..., channel_perm]
        outs = [self.mix_group(part, g, token_perms[g]) for g, part in enumerate(h.split(self.widths, dim=-1))]
        out = unshuffle(torch.cat(outs, dim=-1), channel_perm, dim=-1)
        return c + gate * out


def unshuffle(x: torch.Tensor, perm: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """The inverse of ``x.index_select(dim, perm)``: element ``i`` goes back to position ``perm[i]``."""
    return x.index_select(dim, torch.argsort(perm))


class RelaCtrlBlock(nn.Module):
    """``RGLC_Block``: zero-initialised ``before_proj``/``after_proj`` around one TDSM."""

    def __init__(self, dim: int, groups: int, heads: int = 4, segments: int = 4):
        super().__init__()
        self.before_proj = _zero_linear(dim)
        self.tdsm = TDSM(dim, groups, heads, segments)
        self.after_proj = _zero_linear(dim)


class RelaCtrl(ResidualControlAdapter):
    """RelaCtrl control blocks after the base blocks ``positions`` with ``groups`` channel groups each."""

    adapter_type: ClassVar[str] = ADAPTER_TYPE

    def __init__(
        self,
        dim: int,
        num_base_layers: int,
        positions: Sequence[int],
        groups: Sequence[int],
        heads: int = 4,
        segments: int = 4,
        seed: int = 0,
        shuffle_training: str = "fixed",
    ):
        super().__init__()
        positions, groups = [int(p) for p in positions], [int(g) for g in groups]
        if not positions or len(positions) != len(groups):
            raise ValueError(f"positions {positions} and groups {groups} must be non-empty and of equal length")
        if sorted(set(positions)) != positions or positions[0] < 0 or positions[-1] > num_base_layers - 2:
            raise ValueError(
                f"positions must be increasing base-block indices in 0..{num_base_layers - 2} (a control block "
                f"feeds the block after its position), got {positions}"
            )
        if shuffle_training not in ("fixed", "random"):
            raise ValueError(f"shuffle_training must be 'fixed' or 'random', got {shuffle_training!r}")
        if segments < 1:
            raise ValueError(f"segments must be >= 1, got {segments}")
        self.dim, self.num_base_layers = int(dim), int(num_base_layers)
        self.positions, self.groups = positions, groups
        self.heads, self.segments, self.seed = int(heads), int(segments), int(seed)
        self.shuffle_training = shuffle_training
        self.blocks = nn.ModuleList([RelaCtrlBlock(dim, g, heads, segments) for g in groups])
        self._perms: dict[tuple, torch.Tensor] = {}

    @classmethod
    def from_transformer(
        cls,
        transformer: nn.Module,
        positions: Sequence[int],
        groups: Sequence[int] | None = None,
        heads: int = 4,
        segments: int = 4,
        seed: int = 0,
        shuffle_training: str = "fixed",
    ) -> RelaCtrl:
        groups = list(groups) if groups is not None else [GROUP_TIERS[0]] * len(positions)
        return cls(
            inner_dim(transformer),
            len(base_blocks(transformer)),
            positions,
            groups,
            heads,
            segments,
            seed,
            shuffle_training,
        )

    @classmethod
    def from_config(cls, transformer: nn.Module, config: dict[str, Any]) -> RelaCtrl:
        return cls.from_transformer(
            transformer,
            config["positions"],
            config["groups"],
            int(config.get("heads", 4)),
            int(config.get("segments", 4)),
            int(config.get("seed", 0)),
            str(config.get("shuffle_training", "fixed")),
        )

    def adapter_config(self) -> dict[str, Any]:
        return {
            "positions": self.positions,
            "groups": self.groups,
            "widths": [blk.tdsm.widths for blk in self.blocks],
            "heads": self.heads,
            "segments": self.segments,
            "seed": self.seed,
            "shuffle_training": self.shuffle_training,
            "inner_dim": self.dim,
        }

    @property
    def num_control_blocks(self) -> int:
        return len(self.blocks)

    def injection_blocks(self) -> list[int]:
        active = [p for k, p in enumerate(self.positions) if k not in self.skip]
        return list(range(active[0] + 1, self.num_base_layers)) if active else []

    # ---- shuffles -----------------------------------------------------------------------------------
    def permutations(self, k: int, tokens: int, device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Block ``k``'s channel permutation and per-group token-channel permutations for ``tokens`` tokens."""
        if self.training and self.shuffle_training == "random":  # the official behaviour: fresh at every forward
            widths = self.blocks[k].tdsm.widths
            return torch.randperm(self.dim, device=device), [torch.randperm(tokens * w, device=device) for w in widths]
        key = (k, tokens, str(device))
        if key not in self._perms:
            widths = self.blocks[k].tdsm.widths
            channel = _seeded_perm(self.dim, device, "relactrl-channel", self.seed, k)
            token = [
                _seeded_perm(tokens * w, device, "relactrl-token", self.seed, k, g, tokens)
                for g, w in enumerate(widths)
            ]
            self._perms[key] = (channel, token)
        return self._perms[key]

    # ---- the official injection loop ----------------------------------------------------------------
    def step(self, block_index: int, call: BlockCall, state: dict[str, Any]) -> torch.Tensor | None:
        j = block_index - 1
        if j in self.positions:
            k = self.positions.index(j)
            if k not in self.skip:
                blk = self.blocks[k]
                x = call.hidden_states
                # k == 0 (the official block_index 0): the embedded condition enters; later: x is re-injected
                c = x + blk.before_proj(state["c"]) if k == 0 else state["c"] + blk.before_proj(x)
                channel, token = self.permutations(k, x.shape[1], x.device)
                c = blk.tdsm(c, call.t0, channel, token)
                state["c"] = c
                state["skip"] = blk.after_proj(c)
        return state.get("skip")


def placement_from_scores(
    scores: dict[int, float] | Sequence[float],
    num_blocks: int,
    tiers: Sequence[int] = GROUP_TIERS,
) -> tuple[list[int], list[int]]:
    """RelaCtrl's placement from ControlNet Relevance Scores: the ``num_blocks`` most relevant positions (sorted),
    and their group counts by relevance tier (top third ``tiers[0]`` groups, i.e. the widest attention, middle
    third ``tiers[1]``, the rest ``tiers[2]``), the rule the released configuration follows.

    ``scores`` maps a position (the base block a control block follows) to its score; a sequence means positions
    0, 1, ... Higher = more relevant.
    """
    items = dict(enumerate(scores)) if not isinstance(scores, dict) else dict(scores)
    if not 1 <= num_blocks <= len(items):
        raise ValueError(f"num_blocks must be between 1 and {len(items)}, got {num_blocks}")
    ranked = sorted(items, key=lambda p: (-items[p], p))[:num_blocks]
    third = max(1, num_blocks // 3)  # 11 blocks: 3 + 3 + 5, as released
    tier_of = {p: tiers[min(r // third, len(tiers) - 1)] for r, p in enumerate(ranked)}
    positions = sorted(ranked)
    return positions, [tier_of[p] for p in positions]
