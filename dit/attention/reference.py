"""Slow references written from the formulas, for tests: explicit masks, explicit softmax, loops over tokens.

Nothing here reuses the fast code paths (no partition/roll, no SDPA, no scatter): windows and Swin regions come
from token coordinates, proxies and agents from loops over their members, interpolation and the depthwise
convolution from their textbook definitions. The fast processors are right when they agree with these.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch

from ..qk_norm import normalizes_across_heads


def _heads(attn: Any, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, attn.heads, c // attn.heads).permute(0, 2, 1, 3)


def _merge(x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return x.permute(0, 2, 1, 3).reshape(b, n, h * d)


def qkv(attn: Any, xq: torch.Tensor, xkv: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Per-head q, k, v of a diffusers ``Attention`` (with its qk-norm), the module's own Linear layers."""
    xkv = xq if xkv is None else xkv
    q, k, v = attn.to_q(xq), attn.to_k(xkv), attn.to_v(xkv)
    across = normalizes_across_heads(attn)  # PixArt-Σ: one norm over all heads, before the split
    if attn.norm_q is not None and across:
        q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = _heads(attn, q), _heads(attn, k), _heads(attn, v)
    if attn.norm_q is not None and not across:
        q, k = attn.norm_q(q), attn.norm_k(k)
    return q, k, v


def out_proj(attn: Any, o: torch.Tensor) -> torch.Tensor:
    return attn.to_out[0](_merge(o))


def softmax_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, allowed: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """softmax(q kᵀ scale + bias) v with disallowed keys removed, row by row (exp / sum, no fused kernel)."""
    logits = torch.einsum("bhid,bhjd->bhij", q.double(), k.double()) * scale
    if bias is not None:
        logits = logits + bias.double()
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for i in range(q.shape[-2]):
        keys = torch.arange(k.shape[-2]) if allowed is None else torch.nonzero(allowed[i])[:, 0]
        row = logits[..., i, keys]
        w = torch.exp(row - row.max(-1, keepdim=True).values)
        w = w / w.sum(-1, keepdim=True)
        out[..., i, :] = torch.einsum("bhj,bhjd->bhd", w, v.double()[..., keys, :])
    return out.to(q.dtype)


def coords(grid: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    return list(itertools.product(*(range(g) for g in grid)))


def window_allowed(
    grid: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int]
) -> torch.Tensor:
    """Which token may attend to which under (shifted) window attention, from coordinates alone.

    Along each axis of the grid padded to a multiple of the window (size P), a token at c sits at c' = (c - s)
    mod P after the cyclic shift; its window is c' // win and its Swin region is 0 for c' < P - win, 1 for
    c' < P - s, else 2 (s = 0 where a window covers the axis). Two tokens attend iff window and region agree.
    """
    shift = tuple(0 if w >= g else s for s, w, g in zip(shift, window, grid))
    padded = [math.ceil(g / w) * w for g, w in zip(grid, window)]

    def key(c: tuple[int, ...]) -> tuple:
        out = []
        for a in range(3):
            cp = (c[a] - shift[a]) % padded[a]
            region = 0 if not shift[a] else (0 if cp < padded[a] - window[a] else 1 if cp < padded[a] - shift[a] else 2)
            out += [cp // window[a], region]
        return tuple(out)

    keys = [key(c) for c in coords(grid)]
    n = len(keys)
    return torch.tensor([[keys[i] == keys[j] for j in range(n)] for i in range(n)])


def window_attention_reference(
    attn: Any, x: torch.Tensor, grid: tuple[int, int, int], window: tuple[int, int, int],
    shift: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:  # fmt: skip
    q, k, v = qkv(attn, x)
    o = softmax_attention(q, k, v, attn.scale, window_allowed(grid, window, shift))
    return out_proj(attn, o)


def window_members(grid: tuple[int, int, int], window: tuple[int, int, int]) -> list[list[int]]:
    """Token indices (raster order) of each window, windows in raster order; partial windows at the far end."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for idx, c in enumerate(coords(grid)):
        groups.setdefault(tuple(ci // wi for ci, wi in zip(c, window)), []).append(idx)
    return [groups[key] for key in sorted(groups)]


def proxies_reference(x: torch.Tensor, members: list[list[int]], mode: str = "mean") -> torch.Tensor:
    if mode == "mean":
        return torch.stack([x[:, m].mean(1) for m in members], dim=1)
    if mode == "first":
        return torch.stack([x[:, m[0]] for m in members], dim=1)
    raise ValueError(mode)


def proxy_attention_reference(
    attn: Any, x: torch.Tensor, grid: tuple[int, int, int], window: tuple[int, int, int], local: bool,
    mode: str = "mean",
) -> torch.Tensor:  # fmt: skip
    """Each token attends to every window proxy (bias log of its token count); with ``local``, to its own
    window's tokens instead of its own proxy. Keys and values come from the layer's projections."""
    members = window_members(grid, window)
    proxies = proxies_reference(x, members, mode)
    q, k, v = qkv(attn, x)
    _, kp, vp = qkv(attn, proxies)
    n, p = x.shape[1], len(members)
    owner = torch.empty(n, dtype=torch.long)
    for w, m in enumerate(members):
        owner[m] = w
    keys_k = torch.cat([kp, k], dim=2) if local else kp
    keys_v = torch.cat([vp, v], dim=2) if local else vp
    bias = torch.tensor([math.log(len(m)) for m in members] + ([0.0] * n if local else []), dtype=torch.float64)
    allowed = torch.ones(n, keys_k.shape[2], dtype=torch.bool)
    if local:
        for i in range(n):
            allowed[i, owner[i]] = False  # not the own proxy ...
            allowed[i, p:] = owner == owner[i]  # ... but the own window's tokens
    o = softmax_attention(q, keys_k, keys_v, attn.scale, allowed, bias)
    return out_proj(attn, o)


def full_attention_reference(attn: Any, xq: torch.Tensor, xkv: torch.Tensor | None = None) -> torch.Tensor:
    q, k, v = qkv(attn, xq, xkv)
    return out_proj(attn, softmax_attention(q, k, v, attn.scale))


def proxy_mixer_reference(mixer: Any, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """PT-DiT's global path: mean proxies, proxy self-attention with residual, cross-attention, zero-init Linear."""
    p = proxies_reference(x, window_members(grid, mixer.window), "mean")
    p = p + full_attention_reference(mixer.proxy_attn1, mixer.proxy_norm1(p))
    out = full_attention_reference(mixer.pvisual_attn2, mixer.norm_before(x), mixer.proxy_cross_norm(p))
    return mixer.linear_1_visual(out)


# ---------------------------------------------------------------------------------------------- agents


def _linear_weights(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of 1D linear interpolation with half-pixel centres (align_corners=False)."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(math.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[o, i0] += 1 - frac
        m[o, i1] += frac
    return m


def _resize2d(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear resize of the last two dims, separably."""
    mh, mw = _linear_weights(t.shape[-2], h), _linear_weights(t.shape[-1], w)
    return torch.einsum("yi,...ij,xj->...yx", mh, t.double(), mw)


def agent_biases_reference(proc: Any, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    an = _resize2d(proc.an_bias, h, w)  # (heads, n_a, h, w)
    ah = torch.einsum("yi,...ix->...yx", _linear_weights(proc.ah_bias.shape[3], h), proc.ah_bias.double())
    aw = torch.einsum("...yi,xi->...yx", proc.aw_bias.double(), _linear_weights(proc.aw_bias.shape[4], w))
    b1 = an[None] + ah + aw  # (1, heads, n_a, h, w)
    na = _resize2d(proc.na_bias, h, w)  # (heads, n_a, h, w)
    ha = torch.einsum("yi,bhixa->bhyxa", _linear_weights(proc.ha_bias.shape[2], h), proc.ha_bias.double())
    wa = torch.einsum("bhyia,xi->bhyxa", proc.wa_bias.double(), _linear_weights(proc.wa_bias.shape[3], w))
    b2 = na.permute(0, 2, 3, 1)[None] + ha + wa  # (1, heads, h, w, n_a)
    heads, n_a = proc.an_bias.shape[:2]
    return b1.reshape(1, heads, n_a, h * w), b2.reshape(1, heads, h * w, n_a)


def adaptive_pool_reference(t: torch.Tensor, h: int, w: int, rows: int, cols: int) -> torch.Tensor:
    """(B, heads, N, d) on an h x w grid -> (B, heads, rows*cols, d).

    Cell i spans rows [floor(i*h/rows), ceil((i+1)*h/rows)), and likewise for columns (adaptive average pooling).
    """
    grid = t.reshape(*t.shape[:2], h, w, t.shape[-1])
    cells = []
    for i in range(rows):
        for j in range(cols):
            y0, y1 = (i * h) // rows, -((-(i + 1) * h) // rows)
            x0, x1 = (j * w) // cols, -((-(j + 1) * w) // cols)
            cells.append(grid[:, :, y0:y1, x0:x1].mean(dim=(2, 3)))
    return torch.stack(cells, dim=2)


def depthwise_conv_reference(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) zero-padded depthwise k x k convolution by explicit sums over the kernel."""
    _, _, h, w = v.shape
    k = weight.shape[-1]
    pad = k // 2
    padded = torch.zeros(v.shape[0], v.shape[1], h + 2 * pad, w + 2 * pad, dtype=v.dtype)
    padded[:, :, pad : pad + h, pad : pad + w] = v
    out = bias[None, :, None, None].expand(v.shape[0], -1, h, w).clone()
    for dy in range(k):
        for dx in range(k):
            out = out + weight[None, :, 0, dy, dx, None, None] * padded[:, :, dy : dy + h, dx : dx + w]
    return out


def agent_attention_reference(attn: Any, proc: Any, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """O = softmax(Q Aᵀ s + B2) softmax(A Kᵀ s + B1) V + DWC(V), A = adaptive-avg-pooled Q."""
    h, w = grid
    q, k, v = qkv(attn, x)
    a = adaptive_pool_reference(q, h, w, *proc.pool)
    b1, b2 = agent_biases_reference(proc, h, w)
    agent_v = softmax_attention(a, k, v, attn.scale, bias=b1)
    o = _merge(softmax_attention(q, a, agent_v, attn.scale, bias=b2))
    v_img = _merge(v).permute(0, 2, 1).reshape(x.shape[0], -1, h, w)
    dwc = depthwise_conv_reference(v_img, proc.dwc.weight, proc.dwc.bias).reshape(x.shape[0], -1, h * w)
    return attn.to_out[0](o + dwc.permute(0, 2, 1))


# ---------------------------------------------------------------------------------------------- AgentSD


def tome_reference(
    x: torch.Tensor, grid: tuple[int, int], sx: int, sy: int, r: int, pick: torch.Tensor | None
) -> tuple[list[list[list[int]]], list[int]]:
    """ToMeSD's bipartite soft matching written as loops, per batch element.

    Destinations: in each full ``sy x sx`` cell the token at offset ``pick[cell]`` (row-major offset; top-left
    when ``pick`` is None). Every other token is a source; each source's best destination is the one of highest
    cosine similarity; the ``r`` sources of highest best-similarity (ties: earlier source first) are merged.
    Returns, per batch element, the groups of token indices forming each merged token, and the number of
    destinations.
    """
    h, w = grid
    dst = []
    for cy in range(h // sy):
        for cx in range(w // sx):
            off = 0 if pick is None else int(pick[cy, cx])
            dst.append((cy * sy + off // sx) * w + cx * sx + off % sx)
    dst = sorted(dst)
    src = [i for i in range(h * w) if i not in set(dst)]
    r = min(r, len(src))
    groups_per_batch = []
    for b in range(x.shape[0]):
        unit = x[b].double() / x[b].double().norm(dim=-1, keepdim=True)
        best = []
        for s in src:
            sims = [float(unit[s] @ unit[d]) for d in dst]
            best.append((max(sims), sims.index(max(sims))))
        order = sorted(range(len(src)), key=lambda i: -best[i][0])  # Python's sort is stable
        merged = set(order[:r])
        groups = [[src[i]] for i in range(len(src)) if i not in merged]
        for j, d in enumerate(dst):
            groups.append([d] + [src[i] for i in order[:r] if best[i][1] == j])
        groups_per_batch.append(groups)
    return groups_per_batch, len(dst)


def agentsd_reference(
    attn: Any, x: torch.Tensor, grid: tuple[int, int], ratio: float, agent_ratio: float, sx: int, sy: int,
    k_scale2: float, k_shortcut: float, pick: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """AgentSD on one self-attention layer: merge, agent attention (or softmax fallback), unmerge, to_out."""
    n = x.shape[1]
    r, agent_r = int(n * ratio), int(n * agent_ratio)
    groups, _ = tome_reference(x, grid, sx, sy, r, pick)
    agent_groups, _ = tome_reference(x, grid, sx, sy, agent_r, pick)
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        xm = torch.stack([x[b, g].mean(0) for g in groups[b]])[None]
        q, k, v = qkv(attn, xm)
        agents = torch.stack([x[b, g].mean(0) for g in agent_groups[b]])[None]
        if len(agent_groups[b]) * 2 >= len(groups[b]):  # agents not fewer than half: plain softmax (ToMe)
            o = softmax_attention(q, k, v, attn.scale)
        else:
            a, _, _ = qkv(attn, agents)  # the agents are projected with to_q
            feat = softmax_attention(a, k, v, attn.scale)
            o = softmax_attention(q, a, feat, attn.scale**k_scale2) + k_shortcut * v
        ym = out_proj(attn, o)[0]
        for t, g in enumerate(groups[b]):
            for i in g:
                out[b, i] = ym[t]
    return out


# ---------------------------------------------------------------------------------------------- PT-DiT


def pt_dit_block_reference(
    block: Any, x: torch.Tensor, cond: torch.Tensor, grid: tuple[int, int, int],
    text: torch.Tensor | None = None, text_mask: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """The official block order: proxies -> window -> shifted window -> text -> MLP (see dit.models.pt_dit)."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block._modulation(cond)
    x = x + proxy_mixer_reference(block.proxy, x, grid)
    h = block.norm1(x) * (1 + scale_msa) + shift_msa
    x = x + gate_msa * window_attention_reference(block.attn1, h, grid, block.window)
    if block.shift_window:
        shift_sw, scale_sw, gate_sw = block._shift_modulation(cond)
        h = block.shift_window_norm(x) * (1 + scale_sw) + shift_sw
        half = tuple(w // 2 for w in block.window)
        x = x + block.linear_2(gate_sw * window_attention_reference(block.attn3, h, grid, block.window, half))
    if block.attn2 is not None:
        q, k, v = qkv(block.attn2, x, text)
        bias = None if text_mask is None else ((1 - text_mask.double()) * -10000.0)[:, None, None, :]
        x = x + out_proj(block.attn2, softmax_attention(q, k, v, block.attn2.scale, bias=bias))
    h = block.norm2(x) * (1 + scale_mlp) + shift_mlp
    return x + gate_mlp * block.ff(h)
