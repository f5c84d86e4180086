"""Agent attention (Han et al., LeapLabTHU/Agent-Attention): a few agent tokens route softmax attention.

Two forms, as in the official repository:

* :class:`AgentAttnProcessor`, the **trained** form (``agent_transformer/models/agent_deit.py``
  ``AgentAttention``), for backbones trained or fine-tuned with it::

      A       = AdaptiveAvgPool2d(ph, pw)(Q on the h x w grid)            n_a = ph * pw agents pooled from queries
      agent_v = softmax(A Kᵀ s + B1) V                                     agents gather from all tokens
      O       = softmax(Q Aᵀ s + B2) agent_v + DWC(V)                      tokens read from the agents
      B1 = bilinear(an_bias 7x7 -> h x w) + ah_bias + aw_bias;  B2 likewise from na/ha/wa;  s = d^-1/2

  DWC is a depthwise 3x3 convolution over V on the token grid. The official biases are sized for one window;
  here ``ah/aw/ha/wa`` are stored for the training grid and linearly interpolated to any other grid (the fix the
  authors suggest for a changed size, issue #20), so one model samples at several resolutions. There is no class
  token, so the official ``ac/ca`` biases do not exist.

* :class:`AgentSDAttnProcessor`, the **training-free** AgentSD form (``agentsd/patch.py``, ``merge.py``) for
  stock models: ToMe merges ``N * ratio`` tokens (one random destination per ``sx x sy`` cell, cosine
  similarity), a second, more aggressive merge removing ``N * agent_ratio`` tokens gives the agents (projected by
  the layer's own ``to_q``), and::

      agent_feat = softmax(A Kᵀ d^-1/2) V
      O          = softmax(Q Aᵀ d^(-k_scale2 / 2)) agent_feat + k_shortcut * V

  on the merged tokens, then unmerged. When the agents are not fewer than half the merged tokens the layer runs
  plain softmax attention on them (pure ToMe; with ``ratio=0``, exactly full attention). Self-attention only.

Deliberate differences from AgentSD's code, all documented in docs/attention.md: it runs inside the attention
processor, so the ToMe similarity is computed on the attention input (after the block's norm/modulation) rather
than on the block input; the destination draw is seeded from (seed, layer, timestep) so the same seed gives the
same image, where AgentSD forks the global RNG; agents are also built when ``ratio`` is 0 (AgentSD skips
matching entirely then); ties in the similarity ranking are broken in raster order (``stable=True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import (
    check_self_attention,
    finish,
    merge_heads,
    output_projection,
    project_kv,
    project_out,
    project_q,
    scale_of,
)
from .grid import AttentionConfigError, current_timestep, resolve_grid


def _pool_shape(agent_num: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(agent_num, bool):
        raise AttentionConfigError(f"agent_num must be a positive int or (rows, cols), got {agent_num!r}")
    if isinstance(agent_num, int):
        if agent_num <= 0:
            raise AttentionConfigError(f"agent_num must be positive, got {agent_num}")
        side = math.isqrt(agent_num)
        if side * side != agent_num:
            raise AttentionConfigError(
                f"agent_num={agent_num} is not a square; agents are pooled on a grid: use a square (9, 16, 49, 64) "
                "or give (rows, cols)."
            )
        return side, side
    try:
        rows, cols = (int(a) for a in agent_num)
    except (TypeError, ValueError):
        raise AttentionConfigError(f"agent_num must be a positive int or (rows, cols), got {agent_num!r}") from None
    if rows <= 0 or cols <= 0:
        raise AttentionConfigError(f"agent pool (rows, cols) must be positive, got {agent_num!r}")
    return rows, cols


def _grid2d(seq_len: int, token_grid: Any, who: str) -> tuple[int, int]:
    f, h, w = resolve_grid(seq_len, token_grid, who)
    if f != 1:
        raise AttentionConfigError(f"{who} works on 2D token grids; got {f} frames. Use window or proxy attention.")
    return h, w


def _resize_axis(bias: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    """Linear interpolation of a bias along one axis (align_corners=False, as the official bilinear resize)."""
    if bias.shape[axis] == size:
        return bias
    moved = bias.movedim(axis, -1)
    flat = moved.reshape(-1, 1, moved.shape[-1])
    out = F.interpolate(flat, size=size, mode="linear", align_corners=False)
    return out.reshape(*moved.shape[:-1], size).movedim(-1, axis)


class AgentAttnProcessor(nn.Module):
    """Trained agent attention as a diffusers processor with its own parameters (biases and DWC).

    Set it on a model before training (``set_attention(model, "agent", agent_num=..)``); its parameters live in
    the model's state dict under ``...attn1.processor.*``. ``grid_size`` is the training token grid, where the
    position biases are stored at full resolution.
    """

    needs_token_grid = True

    def __init__(
        self,
        heads: int,
        inner_dim: int,
        grid_size: tuple[int, int],
        agent_num: int | tuple[int, int] = 16,
        bias_size: int = 7,
        dwc_kernel: int = 3,
    ):
        super().__init__()
        self.pool = _pool_shape(agent_num)
        n_a = self.pool[0] * self.pool[1]
        self.agent_num = n_a
        h0, w0 = (int(g) for g in grid_size)
        if h0 <= 0 or w0 <= 0 or heads <= 0 or inner_dim % heads:
            raise AttentionConfigError(
                f"invalid agent attention shape: heads={heads}, dim={inner_dim}, grid={grid_size}"
            )
        self.grid_size = (h0, w0)
        self.an_bias = nn.Parameter(torch.zeros(heads, n_a, bias_size, bias_size))
        self.na_bias = nn.Parameter(torch.zeros(heads, n_a, bias_size, bias_size))
        self.ah_bias = nn.Parameter(torch.zeros(1, heads, n_a, h0, 1))
        self.aw_bias = nn.Parameter(torch.zeros(1, heads, n_a, 1, w0))
        self.ha_bias = nn.Parameter(torch.zeros(1, heads, h0, 1, n_a))
        self.wa_bias = nn.Parameter(torch.zeros(1, heads, 1, w0, n_a))
        for p in (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias):
            nn.init.trunc_normal_(p, std=0.02)
        self.dwc = nn.Conv2d(inner_dim, inner_dim, dwc_kernel, padding=dwc_kernel // 2, groups=inner_dim)
        self._bias_cache: tuple | None = None

    def biases(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(agent->token bias (1, heads, n_a, N), token->agent bias (1, heads, N, n_a)) for an h x w grid.

        Without autograd (sampling) the result is cached per grid until a parameter changes in place (an optimiser
        step bumps its version), so a 50-step generation resizes the biases once, not 50 times per layer.
        """
        if torch.is_grad_enabled():
            return self._biases(h, w)
        params = (self.an_bias, self.na_bias, self.ah_bias, self.aw_bias, self.ha_bias, self.wa_bias)
        key = (h, w, self.an_bias.device, self.an_bias.dtype, tuple((p.data_ptr(), p._version) for p in params))
        if self._bias_cache is None or self._bias_cache[0] != key:
            self._bias_cache = (key, self._biases(h, w))
        return self._bias_cache[1]

    def _biases(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        heads, n_a = self.an_bias.shape[:2]
        b1 = F.interpolate(self.an_bias, size=(h, w), mode="bilinear").reshape(1, heads, n_a, h * w)
        b1 = b1 + (_resize_axis(self.ah_bias, 3, h) + _resize_axis(self.aw_bias, 4, w)).reshape(1, heads, n_a, h * w)
        b2 = F.interpolate(self.na_bias, size=(h, w), mode="bilinear").reshape(1, heads, n_a, h * w).transpose(-1, -2)
        b2 = b2 + (_resize_axis(self.ha_bias, 2, h) + _resize_axis(self.wa_bias, 3, w)).reshape(1, heads, h * w, n_a)
        return b1, b2

    def agents(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Adaptive average pooling of the queries on the grid: (B, heads, N, d) -> (B, heads, n_a, d)."""
        b, heads, n, d = q.shape
        # (B, N, C) viewed as a channels-last image: no copy of the queries (they come as a transposed view).
        grid = q.transpose(1, 2).reshape(b, h, w, heads * d).permute(0, 3, 1, 2)
        pooled = F.adaptive_avg_pool2d(grid, self.pool)  # (B, C, ph, pw)
        return pooled.permute(0, 2, 3, 1).reshape(b, -1, heads, d).transpose(1, 2)

    def __call__(  # diffusers inspects __call__'s signature to pass token_grid (as its IP-adapter modules do)
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_grid: tuple[int, ...] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        who = type(self).__name__
        check_self_attention(attn, hidden_states, encoder_hidden_states, attention_mask, who)
        h, w = _grid2d(hidden_states.shape[1], token_grid, who)
        q = project_q(attn, hidden_states)
        k, v = project_kv(attn, hidden_states)
        if v.shape[1] * v.shape[-1] != self.dwc.in_channels or q.shape[1] != self.an_bias.shape[0]:
            raise AttentionConfigError(f"{who} was built for another attention width or head count")
        scale = scale_of(attn, q.shape[-1])
        a = self.agents(q, h, w)
        b1, b2 = self.biases(h, w)
        agent_v = F.scaled_dot_product_attention(a, k, v, attn_mask=b1.to(q.dtype), scale=scale)
        out = F.scaled_dot_product_attention(q, a, agent_v, attn_mask=b2.to(q.dtype), scale=scale)
        out = merge_heads(out)
        b, n, c = out.shape
        v_grid = merge_heads(v).reshape(b, h, w, c).permute(0, 3, 1, 2)  # channels-last view, no copy
        out = out + self.dwc(v_grid).permute(0, 2, 3, 1).reshape(b, n, c)
        return project_out(attn, out, hidden_states)


# ---------------------------------------------------------------------------------------------- ToMe / AgentSD


@dataclass
class MergePlan:
    """Which tokens ToMe merges (and which form the agents): the result of bipartite soft matching."""

    n: int
    src: torch.Tensor  # (Ns,) grid positions of source tokens, raster order
    dst: torch.Tensor  # (Nd,) grid positions of destination tokens, raster order
    unm: torch.Tensor  # (B, Ns - r) indices into src that stay
    merged: torch.Tensor  # (B, r) indices into src merged away
    target: torch.Tensor  # (B, r) index into dst each merged source goes to
    agent_unm: torch.Tensor | None = None
    agent_merged: torch.Tensor | None = None
    agent_target: torch.Tensor | None = None

    def _merge(self, x: torch.Tensor, unm: torch.Tensor, merged: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        c = x.shape[-1]
        src, dst = x[:, self.src], x[:, self.dst]
        keep = src.gather(1, unm[..., None].expand(-1, -1, c))
        moved = src.gather(1, merged[..., None].expand(-1, -1, c))
        dst = dst.scatter_reduce(1, target[..., None].expand(-1, -1, c), moved, reduce="mean", include_self=True)
        return torch.cat([keep, dst], dim=1)

    def merge(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, C) -> (merged tokens [unmerged sources, destinations], agent tokens or None)."""
        merged = self._merge(x, self.unm, self.merged, self.target)
        if self.agent_unm is None:
            return merged, None
        return merged, self._merge(x, self.agent_unm, self.agent_merged, self.agent_target)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """Merged (B, M, C) -> (B, N, C): every merged-away source takes its destination's value."""
        b, _, c = y.shape
        n_unm = self.unm.shape[1]
        keep, dst = y[:, :n_unm], y[:, n_unm:]
        out = y.new_empty(b, self.n, c)
        out[:, self.dst] = dst
        src_pos = self.src[self.unm]  # (B, n_unm)
        out.scatter_(1, src_pos[..., None].expand(-1, -1, c), keep)
        moved_pos = self.src[self.merged]
        out.scatter_(1, moved_pos[..., None].expand(-1, -1, c), dst.gather(1, self.target[..., None].expand(-1, -1, c)))
        return out


def destination_slots(
    h: int, w: int, sx: int, sy: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """ToMeSD's dst choice: one token per ``sy x sx`` cell (random, or top-left without a generator).

    Cells only cover the top-left ``(h // sy * sy) x (w // sx * sx)`` part; the remaining border tokens are
    always sources. Returns (src positions, dst positions), each in raster order.
    """
    hsy, wsx = h // sy, w // sx
    if generator is None:
        pick = torch.zeros(hsy, wsx, dtype=torch.long)
    else:
        pick = torch.randint(sy * sx, (hsy, wsx), generator=generator, device=generator.device).cpu()
    rows = torch.arange(hsy)[:, None] * sy + pick // sx
    cols = torch.arange(wsx)[None, :] * sx + pick % sx
    is_dst = torch.zeros(h, w, dtype=torch.bool)
    is_dst[rows, cols] = True
    flat = is_dst.reshape(-1)
    return torch.nonzero(~flat)[:, 0], torch.nonzero(flat)[:, 0]


def bipartite_soft_matching(
    metric: torch.Tensor,
    grid: tuple[int, int],
    sx: int,
    sy: int,
    r: int,
    agent_r: int,
    generator: torch.Generator | None,
) -> MergePlan:
    """ToMeSD's ``bipartite_soft_matching_random2d`` with AgentSD's second (agent) merge, as a :class:`MergePlan`.

    Each source's best destination by cosine similarity; the ``r`` sources with the highest best-similarity are
    merged (mean) into their destinations. The agent merge removes ``agent_r`` sources the same way; it is only
    planned when the agents would be fewer than half of the merged tokens, ``(N - agent_r) * 2 < N - r``.
    """
    b, n, _ = metric.shape
    h, w = grid
    device = metric.device
    src, dst = destination_slots(h, w, sx, sy, generator)
    src, dst = src.to(device), dst.to(device)
    with torch.no_grad():
        m = metric / metric.norm(dim=-1, keepdim=True)
        scores = m[:, src] @ m[:, dst].transpose(-1, -2)
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
    n_src = src.numel()
    r = min(n_src, r)
    plan = MergePlan(n, src, dst, order[:, r:], order[:, :r], best_dst.gather(1, order[:, :r]))
    agent_r = min(n_src, agent_r)
    if (n - agent_r) * 2 < (n - r):
        plan.agent_unm = order[:, agent_r:]
        plan.agent_merged = order[:, :agent_r]
        plan.agent_target = best_dst.gather(1, order[:, :agent_r])
    return plan


class AgentSDAttnProcessor:
    """Training-free AgentSD self-attention (ToMe merge + agent attention + unmerge) for stock models.

    Defaults are AgentSD's recommended setting for the first 20 of 50 steps (``sx=sy=4, ratio=0.4,
    agent_ratio=0.95, k_scale2=0.3, k_shortcut=0.075``). ``use_rand``: random destinations (only with an even
    batch, as AgentSD, so CFG's halves share them), seeded from ``seed``, the layer and the timestep.
    ``upcast``: compute the agent softmaxes in float32 (AgentSD's ``attn_precision="fp32"``).
    """

    needs_token_grid = True

    def __init__(
        self,
        ratio: float = 0.4,
        agent_ratio: float = 0.95,
        sx: int = 4,
        sy: int = 4,
        k_scale2: float = 0.3,
        k_shortcut: float = 0.075,
        use_rand: bool = True,
        seed: int = 0,
        layer_index: int = 0,
        upcast: bool = False,
    ):
        for name, value in (("ratio", ratio), ("agent_ratio", agent_ratio)):
            if not 0.0 <= float(value) < 1.0:
                raise AttentionConfigError(f"{name} must be in [0, 1), got {value!r}")
        for name, value in (("sx", sx), ("sy", sy)):
            if isinstance(value, bool) or int(value) != value or int(value) <= 0:
                raise AttentionConfigError(f"{name} must be a positive integer, got {value!r}")
        self.ratio, self.agent_ratio = float(ratio), float(agent_ratio)
        self.sx, self.sy = int(sx), int(sy)
        self.k_scale2, self.k_shortcut = float(k_scale2), float(k_shortcut)
        self.use_rand, self.seed, self.layer_index, self.upcast = bool(use_rand), int(seed), int(layer_index), upcast
        self.last_used_agents: bool | None = None  # for tests and the benchmark: did the last call use agents?

    def __repr__(self) -> str:
        return (
            f"AgentSDAttnProcessor(ratio={self.ratio}, agent_ratio={self.agent_ratio}, sx={self.sx}, sy={self.sy}, "
            f"k_scale2={self.k_scale2}, k_shortcut={self.k_shortcut})"
        )

    def generator(self, batch: int) -> torch.Generator | None:
        if not self.use_rand or batch % 2:
            return None
        t = current_timestep()
        mixed = self.seed * 1_000_003 + self.layer_index * 7919 + (int(round(t * 1000)) if t is not None else 0)
        return torch.Generator().manual_seed(mixed % (2**63 - 1))

    def plan(self, x: torch.Tensor, grid: tuple[int, int]) -> MergePlan | None:
        n = x.shape[1]
        r, agent_r = int(n * self.ratio), int(n * self.agent_ratio)
        if r <= 0 and (n - agent_r) * 2 >= n:
            return None  # nothing to merge and no agents: full attention
        if self.sy > grid[0] or self.sx > grid[1]:
            raise AttentionConfigError(
                f"AgentSD cell sx={self.sx}, sy={self.sy} is larger than the token grid {grid[0]}x{grid[1]}"
            )
        return bipartite_soft_matching(x, grid, self.sx, self.sy, r, agent_r, self.generator(x.shape[0]))

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_grid: tuple[int, ...] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        who = type(self).__name__
        check_self_attention(attn, hidden_states, encoder_hidden_states, attention_mask, who)
        grid = _grid2d(hidden_states.shape[1], token_grid, who)
        plan = self.plan(hidden_states, grid)
        x, agents = plan.merge(hidden_states) if plan is not None else (hidden_states, None)
        q = project_q(attn, x)
        k, v = project_kv(attn, x)
        scale = scale_of(attn, q.shape[-1])
        self.last_used_agents = agents is not None and agents.shape[1] * 2 < x.shape[1]
        if self.last_used_agents:
            # AgentSD projects the agents with the layer's to_q; with qk-norm they get norm_q like any query.
            out = self._agent(q, k, v, project_q(attn, agents), scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        out = output_projection(attn, merge_heads(out), hidden_states.dtype)
        if plan is not None:
            out = plan.unmerge(out)  # a copy per token commutes with to_out, so unmerging after it is exact
        return finish(attn, out, hidden_states)

    def _agent(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, a: torch.Tensor, scale: float) -> torch.Tensor:
        dtype = q.dtype
        if self.upcast:
            q, k, v, a = q.float(), k.float(), v.float(), a.float()
        agent_feat = F.scaled_dot_product_attention(a, k, v, scale=scale)
        out = F.scaled_dot_product_attention(q, a, agent_feat, scale=scale**self.k_scale2)
        return (out + self.k_shortcut * v).to(dtype)
