"""Time-dependent normalisation (DiMR's TD-LN and TD-RMSNorm): the noise level enters through the norm parameters.

DiMR has no adaLN and no timestep embedding at all. Every affine parameter of every normalisation layer is a
:class:`TimeDependentParameter` that interpolates between two learned values,

    p(τ) = p1 + σ(w·τ + b) · (p0 − p1),    w = 1 + nodecay_weight,  b = nodecay_bias,

(``libs/core/sigmoid/module.py`` and ``kernel.py::tdp_torch`` of qihao067/DiMR). ``nodecay_weight`` and
``nodecay_bias`` start at zero and, as their names say, are excluded from weight decay
(:func:`param_groups`); ``param0`` and ``param1`` start equal (ones for scales, zeros for offsets), so a fresh
TD norm *is* a plain norm, and it stays one whenever ``param0 == param1``.

**τ from the noise level.** The official ``train.py``/``eval.py`` feed the model
``log_snr = 8·n/1000 − 4`` for the 1-based discrete step ``n ∈ {1..1000}`` (a linear stand-in, not the true
log-SNR of the schedule) and ``TimeDependentParameter.seed_time`` uses ``τ = log_snr / 4``. Our pipelines and
trainer use diffusers' 0-based DDPM timesteps ``k ∈ {0..N−1}``, where ``alphas_cumprod[k]`` is the official
step ``n = k + 1``. Hence (:func:`timestep_to_tau`)

    τ(k) = (8·(k+1)/N − 4) / 4 = 2·(k+1)/N − 1  ∈ (−1, 1],

i.e. τ = −0.998 at the cleanest step and τ = 1 at pure noise for N = 1000. Fractional timesteps (continuous-time
samplers) map by the same formula, as DPM-Solver's ``t_continuous · N`` does in the official sampler.

τ is passed explicitly to every norm call instead of being "seeded" into the modules before the forward pass as
the official code does: module state would make two concurrent requests on one model (the UI serves several)
race each other. As in ``seed_time``, a batch whose τ are all equal evaluates the parameters once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

NO_DECAY_SUFFIXES = (".nodecay_weight", ".nodecay_bias")


def timestep_to_tau(timestep: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """0-based DDPM timestep(s) ``k`` -> DiMR's time condition ``τ = 2(k+1)/N − 1`` (float32, same shape)."""
    if num_train_timesteps <= 0:
        raise ValueError(f"num_train_timesteps must be positive, got {num_train_timesteps}")
    n = timestep.to(torch.float32) + 1.0
    return (n / num_train_timesteps * 8.0 - 4.0) / 4.0


def collapse_tau(tau: torch.Tensor) -> torch.Tensor:
    """(B,) -> (1,) when every entry is equal (sampling), so the parameters are evaluated once per call."""
    tau = tau.reshape(-1)
    if tau.numel() > 1 and bool((tau == tau[0]).all()):
        return tau[:1]
    return tau


class TimeDependentParameter(nn.Module):
    """A parameter that depends on τ: ``param1 + sigmoid((1 + nodecay_weight)·τ + nodecay_bias)·(param0 − param1)``.

    Parameter names are the official ones, so a DiMR checkpoint's ``*.param0/param1/nodecay_weight/nodecay_bias``
    load by name.
    """

    def __init__(self, shape: tuple[int, ...], init: Callable[[torch.Tensor], object]):
        super().__init__()
        self.shape = tuple(shape)
        w = torch.empty(*shape)
        init(w)
        self.param0 = nn.Parameter(w.clone())
        self.param1 = nn.Parameter(w.clone())
        self.nodecay_weight = nn.Parameter(torch.zeros(*shape))
        self.nodecay_bias = nn.Parameter(torch.zeros(*shape))

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        """τ of shape (T,) -> values of shape (T, *shape)."""
        tau = tau.reshape(-1, *([1] * len(self.shape))).to(self.param0.dtype)
        gate = torch.sigmoid(tau * (self.nodecay_weight + 1) + self.nodecay_bias)
        return torch.addcmul(self.param1, gate, self.param0 - self.param1)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def _per_sample(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(T, D) values -> broadcastable over x of shape (B, ..., D), T in {1, B}."""
    if value.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"time condition has {value.shape[0]} entries for a batch of {x.shape[0]}")
    return value.reshape(value.shape[0], *([1] * (x.ndim - 2)), value.shape[-1])


class TDLayerNorm(nn.Module):
    """LayerNorm over the last dim whose weight and bias are :class:`TimeDependentParameter` (official ``LayerNorm``).

    eps 1e-5 as in the official module. Normalisation is computed in float32 and cast back.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = TimeDependentParameter((dim,), nn.init.ones_)
        self.bias = TimeDependentParameter((dim,), nn.init.zeros_)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"TDLayerNorm({self.dim}) got {x.shape[-1]} channels")
        normed = F.layer_norm(x.float(), (self.dim,), eps=self.eps)
        out = torch.addcmul(_per_sample(self.bias(tau), x).float(), _per_sample(self.weight(tau), x).float(), normed)
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


class TDRMSNorm(nn.Module):
    """RMSNorm with a time-dependent scale, exactly the official ``TDRMSNorm``: ``x / (rms(x) + eps) · scale(τ)``.

    Note the official placement of eps (added to the RMS, not under the square root) and its value 1e-8; both are
    kept so converted checkpoints reproduce. No offset (the official default ``bias=False``).
    """

    def __init__(self, dim: int, eps: float = 1e-8):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.scale = TimeDependentParameter((dim,), nn.init.ones_)

    def forward(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"TDRMSNorm({self.dim}) got {x.shape[-1]} channels")
        xf = x.float()
        rms = xf.norm(2, dim=-1, keepdim=True) * self.dim**-0.5
        out = xf / (rms + self.eps) * _per_sample(self.scale(tau), x).float()
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}"


NORM_TYPES = {"td_rmsnorm": TDRMSNorm, "td_layernorm": TDLayerNorm}


def make_td_norm(norm_type: str, dim: int) -> nn.Module:
    """The block norm of a DiMR config: ``td_rmsnorm`` (official ``TDRMSN``, the released models) or
    ``td_layernorm`` (official ``LN``, which in DiMR is also time-dependent)."""
    try:
        return NORM_TYPES[norm_type](dim)
    except KeyError:
        raise ValueError(f"norm_type must be one of {', '.join(NORM_TYPES)}, got {norm_type!r}") from None


def is_no_decay(name: str) -> bool:
    return name.endswith(NO_DECAY_SUFFIXES)


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups as DiMR's ``utils.trainable_parameters``: the sigmoid's ``nodecay_*`` get no weight decay.

    Decaying them would pull every gate towards σ(τ) and the TD norms towards a fixed time response.
    """
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (no_decay if is_no_decay(name) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
