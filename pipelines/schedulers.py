"""Schedulers by the short names the UI, the batch CLI and the PNG metadata share.

Each is built from the model's own scheduler config (betas, prediction type, timestep spacing), so switching
sampler never changes the noise schedule the model was trained with.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .errors import InputError

# name -> (class, overrides applied on top of the model's scheduler config)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++2m-karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {"variance_type": "fixed_small"}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}

# What each sampler can step with. diffusers' Euler-ancestral has no x0 ("sample") branch and fails mid-run.
_ALL_PREDICTIONS = frozenset({"epsilon", "sample", "v_prediction"})
_PREDICTIONS: dict[str, frozenset[str]] = {"euler_a": frozenset({"epsilon", "v_prediction"})}

_BY_CLASS = {cls.__name__: name for name, (cls, over) in SCHEDULERS.items() if not over.get("use_karras_sigmas")}


def can_step(name: str, prediction_type: str) -> bool:
    """Whether sampler ``name`` can step a model trained to predict ``prediction_type``."""
    return prediction_type in _PREDICTIONS.get(name, _ALL_PREDICTIONS)


def scheduler_names(prediction_type: str | None = None) -> list[str]:
    """Every short name, or those that can sample a model trained for ``prediction_type``."""
    if prediction_type is None:
        return list(SCHEDULERS)
    return [name for name in SCHEDULERS if can_step(name, prediction_type)]


def make_scheduler(name: str, base_config: dict[str, Any]) -> SchedulerMixin:
    """A fresh scheduler ``name`` built from ``base_config`` (a scheduler's ``.config``)."""
    key = name.strip().lower()
    if key not in SCHEDULERS:
        raise InputError(f"Unknown scheduler {name!r}. Choose one of: {', '.join(SCHEDULERS)}.")
    cls, overrides = SCHEDULERS[key]
    config = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    prediction = config.get("prediction_type", "epsilon")
    if not can_step(key, prediction):
        raise InputError(
            f"Scheduler {name!r} cannot sample a model that predicts {prediction!r}. "
            f"Choose one of: {', '.join(scheduler_names(prediction))}."
        )
    if config.get("variance_type") in ("learned", "learned_range"):
        # Our loop drops the predicted variance before stepping (as diffusers' DiT/PixArt pipelines do).
        config["variance_type"] = "fixed_small"
    config.update(overrides)
    return cls.from_config(config)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """Our short name for a scheduler instance (its class name when it is not one of ours)."""
    if isinstance(scheduler, DPMSolverMultistepScheduler) and scheduler.config.get("use_karras_sigmas"):
        return "dpm++2m-karras"
    return _BY_CLASS.get(type(scheduler).__name__, type(scheduler).__name__)
