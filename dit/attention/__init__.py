"""Efficient self-attention for DiT backbones and stock diffusers models, in the diffusers processor protocol.

Variants (``set_attention(model_or_pipeline, variant, **options)``; options may also be written into the
variant, e.g. ``"agentsd[ratio=0.5]"``, which is exactly how a generation record names them):

===================  =============================================================  ======================
variant              what it does                                                   options (defaults)
===================  =============================================================  ======================
``sdpa``             full softmax attention (diffusers ``AttnProcessor2_0``)        -
``window``           attention inside non-overlapping windows (Swin / PT-DiT)       window_size=8
``shifted-window``   as ``window``, every second layer shifted by half a window     window_size=8
``proxy``            PT-DiT proxy tokens, training-free: tokens attend to one        window_size=4, mode=mean,
                     proxy per window (+ exactly to their own window if ``local``)  local=true, seed=0
``agentsd``          AgentSD (ToMe + agent attention), training-free                ratio=0.4, agent_ratio=0.95,
                                                                                    sx=4, sy=4, k_scale2=0.3,
                                                                                    k_shortcut=0.075, use_rand,
                                                                                    seed=0
``agent``            trained agent attention (pooled agents, biases, DWC): adds     agent_num=16, grid_size
                     parameters, so set it before training, not on a trained model  (sample_size/patch_size)
===================  =============================================================  ======================

Processors go on self-attention modules only (``attn1``; cross-attention to text is left alone), and the model
remembers the variant as ``transformer.attention_variant`` (e.g. ``"proxy[window_size=4,mode=mean,local=true,
seed=0]"``), which ``pipelines.base.DiTStudioPipeline.attention_label`` writes into every generation record.
Setting the same variant and options again is a no-op, so a server may call this before every request.

A variant that adds parameters (``agent``) is part of the model: ``set_attention`` writes its label into the
model's config (``attention_variant``, on ``DiTModel``/``TextDiTModel``), so ``save_pretrained`` stores it and
``from_pretrained`` rebuilds the processors before the weights load. Training-free variants record ``"sdpa"`` there:
a saved model never claims processors it does not have. Replacing trained processors keeps them aside on the model,
so setting their label again (or ``"sdpa"`` with ``keep_trained=True``, the UI's default) puts the same weights back.

Backbones whose attention *is* their architecture (PT-DiT, ``native_attention = True``) accept only ``sdpa``,
meaning "the model's own attention"; swapping their window/proxy layers for another variant is refused.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

from ..qk_norm import AcrossHeadsQKNormAttnProcessor, normalizes_across_heads
from .agent import AgentAttnProcessor, AgentSDAttnProcessor, bipartite_soft_matching
from .grid import (
    AttentionConfigError,
    current_timestep,
    current_token_grid,
    normalize_grid,
    resolve_grid,
    token_grid,
)
from .proxy import ProxyAttnProcessor, ProxyTokenMixer, proxy_tokens
from .window import WindowAttnProcessor, make_layout, partition, unpartition

__all__ = [
    "AgentAttnProcessor",
    "AgentSDAttnProcessor",
    "AttentionConfigError",
    "ProxyAttnProcessor",
    "ProxyTokenMixer",
    "WindowAttnProcessor",
    "available_variants",
    "init_attention",
    "bipartite_soft_matching",
    "current_timestep",
    "current_token_grid",
    "format_label",
    "make_layout",
    "normalize_grid",
    "parse_label",
    "partition",
    "proxy_tokens",
    "resolve_grid",
    "self_attention_modules",
    "set_attention",
    "token_grid",
    "trained_variant",
    "unpartition",
]


@dataclass(frozen=True)
class Variant:
    name: str
    defaults: dict[str, Any]
    build: Callable[[Attention, int, dict[str, Any], Any], Any]
    training_free: bool = True
    summary: str = ""
    size_options: tuple[str, ...] = field(default_factory=tuple)  # options that take an int or a tuple of ints


def _grid_size(model: Any, opts: dict[str, Any]) -> tuple[int, int]:
    if opts.get("grid_size") is not None:
        g = opts["grid_size"]
        return (g, g) if isinstance(g, int) else tuple(g)  # type: ignore[return-value]
    cfg = getattr(model, "config", {})
    try:
        side = int(cfg["sample_size"]) // int(cfg["patch_size"])
    except (KeyError, TypeError, ValueError):
        raise AttentionConfigError(
            "agent attention stores its position biases for the training token grid; pass grid_size=(h, w)"
        ) from None
    return side, side


def _full_attention(attn: Attention) -> Any:
    """diffusers' SDPA processor, or ours where the qk-norm spans all heads (PixArt-Σ), which the stock one breaks."""
    return AcrossHeadsQKNormAttnProcessor() if normalizes_across_heads(attn) else AttnProcessor2_0()


def _build_agent(attn: Attention, index: int, opts: dict[str, Any], model: Any) -> AgentAttnProcessor:
    proc = AgentAttnProcessor(attn.heads, attn.inner_dim, _grid_size(model, opts), opts["agent_num"])
    weight = attn.to_q.weight
    return proc.to(device=weight.device, dtype=weight.dtype)


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        Variant("sdpa", {}, lambda attn, i, o, m: _full_attention(attn), summary="full softmax attention"),
        Variant(
            "window",
            {"window_size": 8},
            lambda attn, i, o, m: WindowAttnProcessor(o["window_size"]),
            summary="attention inside non-overlapping windows",
            size_options=("window_size",),
        ),
        Variant(
            "shifted-window",
            {"window_size": 8},
            lambda attn, i, o, m: WindowAttnProcessor(o["window_size"], shift=bool(i % 2)),
            summary="window attention, odd layers shifted by half a window (Swin)",
            size_options=("window_size",),
        ),
        Variant(
            "proxy",
            {"window_size": 4, "mode": "mean", "local": True, "seed": 0},
            lambda attn, i, o, m: ProxyAttnProcessor(o["window_size"], o["mode"], o["local"], o["seed"], i),
            summary="PT-DiT proxy tokens (training-free): one proxy per window + the own window",
            size_options=("window_size",),
        ),
        Variant(
            "agentsd",
            {
                "ratio": 0.4,
                "agent_ratio": 0.95,
                "sx": 4,
                "sy": 4,
                "k_scale2": 0.3,
                "k_shortcut": 0.075,
                "use_rand": True,
                "seed": 0,
            },
            lambda attn, i, o, m: AgentSDAttnProcessor(**o, layer_index=i),
            summary="AgentSD: ToMe token merging + agent attention (training-free)",
        ),
        Variant(
            "agent",
            {"agent_num": 16, "grid_size": None},
            _build_agent,
            training_free=False,
            summary="trained agent attention (pooled agents, position biases, depthwise conv)",
            size_options=("agent_num", "grid_size"),
        ),
    ]
}


def _xformers_available() -> bool:
    try:
        from diffusers.utils import is_xformers_available

        return bool(is_xformers_available())
    except Exception:  # pragma: no cover - a broken optional install must not break the list
        return False


if _xformers_available():  # pragma: no cover - not installed on CPU machines

    def _build_xformers(attn: Attention, index: int, opts: dict[str, Any], model: Any) -> Any:
        from diffusers.models.attention_processor import XFormersAttnProcessor

        if normalizes_across_heads(attn):
            raise AttentionConfigError(
                "xformers' processor applies qk-norm per head; this model normalises across heads (PixArt-Σ). "
                "Use 'sdpa'."
            )
        return XFormersAttnProcessor()

    VARIANTS["xformers"] = Variant("xformers", {}, _build_xformers, summary="full attention through xformers")


def available_variants(include_trained: bool = False) -> list[str]:
    """Variant names, the default (``sdpa``) first. Trained-only forms (``agent``) only when asked: picking them
    for a model that was not trained with them gives noise, so the UI does not offer them."""
    return [name for name, v in VARIANTS.items() if v.training_free or include_trained]


# ---------------------------------------------------------------------------------------------- labels

_LABEL = re.compile(r"^\s*([A-Za-z0-9_-]+)\s*(?:\[(.*)\])?\s*$")


def _parse_value(text: str) -> Any:
    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    if re.fullmatch(r"\d+(x\d+){1,2}", low):
        return tuple(int(p) for p in low.split("x"))
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return "x".join(str(int(v)) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse_label(label: str) -> tuple[str, dict[str, Any]]:
    """``"agentsd[ratio=0.5,sx=2]"`` -> ``("agentsd", {"ratio": 0.5, "sx": 2})``; a bare name has no options."""
    match = _LABEL.match(str(label))
    if not match:
        raise AttentionConfigError(f"cannot read attention variant {label!r}; write it as name or name[key=value,...]")
    name, body = match.group(1), match.group(2)
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in (body or "").split(","))):
        if "=" not in item:
            raise AttentionConfigError(f"attention option {item!r} in {label!r} must look like key=value")
        key, value = item.split("=", 1)
        options[key.strip()] = _parse_value(value)
    return name, options


def format_label(name: str, options: dict[str, Any]) -> str:
    """The inverse of :func:`parse_label`: ``name`` or ``name[k=v,...]`` in the variant's option order."""
    if not options:
        return name
    return f"{name}[{','.join(f'{k}={_format_value(v)}' for k, v in options.items())}]"


def _coerce(variant: Variant, key: str, value: Any) -> Any:
    default = variant.defaults[key]
    if key in variant.size_options:
        if value is None and default is None:
            return None
        if isinstance(value, bool):
            raise AttentionConfigError(f"{variant.name} option {key} must be an int or a tuple of ints, got {value!r}")
        if isinstance(value, (list, tuple)):
            return tuple(int(v) for v in value)
        return int(value)
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if not isinstance(value, bool):
            raise AttentionConfigError(f"{variant.name} option {key} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise AttentionConfigError(f"{variant.name} option {key} must be an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AttentionConfigError(f"{variant.name} option {key} must be a number, got {value!r}")
        return float(value)
    return value


def resolve_options(name: str, options: dict[str, Any]) -> tuple[Variant, dict[str, Any]]:
    """The variant and its full option set (defaults filled, types checked, unknown keys refused)."""
    if name not in VARIANTS:
        known = ", ".join(available_variants(include_trained=True))
        raise AttentionConfigError(f"unknown attention variant {name!r}; available: {known}")
    variant = VARIANTS[name]
    unknown = sorted(set(options) - set(variant.defaults))
    if unknown:
        valid = ", ".join(variant.defaults) or "none"
        raise AttentionConfigError(f"{name} does not take option(s) {', '.join(unknown)}; its options: {valid}")
    resolved = {k: _coerce(variant, k, options.get(k, d)) for k, d in variant.defaults.items()}
    return variant, resolved


# ---------------------------------------------------------------------------------------------- applying


def self_attention_modules(model: Any) -> list[tuple[str, Attention]]:
    """The self-attention modules a variant replaces: every ``attn1`` that is not a cross-attention."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, Attention) and name.rsplit(".", 1)[-1] == "attn1" and not module.is_cross_attention:
            found.append((name, module))
    return found


CONFIG_KEY = "attention_variant"  # the config field of backbones that persist their attention variant


def _is_trained(label: str) -> bool:
    """Whether a label names a variant whose processors carry learned parameters (``agent``)."""
    try:
        name, _ = parse_label(label)
    except AttentionConfigError:
        return False
    return name in VARIANTS and not VARIANTS[name].training_free


def _record(model: Any, value: str) -> None:
    """Write ``value`` into ``model.config.attention_variant`` when the model has that field (our backbones)."""
    config = getattr(model, "config", None)
    register = getattr(model, "register_to_config", None)
    if register is None or not hasattr(config, "keys") or CONFIG_KEY not in config:
        return
    if config[CONFIG_KEY] != value:
        register(**{CONFIG_KEY: value})


def trained_variant(model_or_pipeline: Any) -> str | None:
    """The label of the trained processors a model holds, in use or kept aside by :func:`set_attention`; else None.

    A model trained with ``agent`` attention has its attention weights in these processors; a server uses this to
    know that the model's own attention is not plain SDPA (see ``set_attention(..., keep_trained=True)``).
    """
    model = getattr(model_or_pipeline, "transformer", None)
    model = model_or_pipeline if model is None else model
    current = getattr(model, "attention_variant", "sdpa")
    if isinstance(current, str) and _is_trained(current):
        return current
    kept = getattr(model, "_kept_trained_attention", None)
    return kept[0] if kept else None


def _restore_kept(model: Any, label: str, modules: list[tuple[str, Attention]]) -> list[Any] | None:
    """The trained processors kept aside under ``label``, moved to the layers' current device and dtype."""
    kept = getattr(model, "_kept_trained_attention", None)
    if not kept or kept[0] != label or len(kept[1]) != len(modules):
        return None
    model._kept_trained_attention = None
    out = []
    for (_, module), proc in zip(modules, kept[1]):
        weight = module.to_q.weight
        out.append(proc.to(device=weight.device, dtype=weight.dtype) if isinstance(proc, nn.Module) else proc)
    return out


def set_attention(model_or_pipeline: Any, variant: str, *, keep_trained: bool = False, **options: Any) -> str:
    """Put ``variant`` on every self-attention module of a model (or of ``pipeline.transformer``).

    Returns the label recorded as ``transformer.attention_variant``. Errors (:class:`AttentionConfigError`, a
    ``ValueError``) name the fix: unknown variants or options, bad values, a model without self-attention.
    Window sizes and grids are checked at call time, against the grid the pipeline hands over.

    Variants with parameters (``agent``) are recorded in the model's config (``attention_variant``) so a saved model
    reloads with them; any other variant records ``"sdpa"`` there. Trained processors that another variant replaces
    are kept aside (not in the state dict), and setting their label again puts those same weights back.
    ``keep_trained=True`` reads a plain ``"sdpa"`` as "the model's own attention" on a model that holds trained
    processors, as it already means for PT-DiT and DiMR: a UI whose default is ``sdpa`` then keeps an agent-trained
    model on its agent attention instead of running it with attention it was never trained for.
    """
    model = getattr(model_or_pipeline, "transformer", None)
    model = model_or_pipeline if model is None else model
    name, parsed = parse_label(variant)
    merged = {**parsed, **options}
    if getattr(model, "native_attention", False):
        if name != "sdpa" or merged:
            raise AttentionConfigError(
                f"{type(model).__name__} has its own window/proxy attention built into its architecture; "
                f"attention variants apply to full-attention models (DiT, PixArt). Choose 'sdpa' (the model's own)."
            )
        model.reset_attention()
        return model.attention_variant
    own = trained_variant(model) if keep_trained and name == "sdpa" and not merged else None
    if own is not None:
        name, merged = parse_label(own)
    spec, resolved = resolve_options(name, merged)
    if spec.name == "agent":
        from .agent import _pool_shape

        _pool_shape(resolved["agent_num"])  # a bad agent count fails here, not at the first forward
        if resolved["grid_size"] is None:  # the label (and a saved config) names the grid the biases are stored for
            resolved["grid_size"] = _grid_size(model, resolved)
    label = format_label(spec.name, resolved)
    current = getattr(model, "attention_variant", "sdpa")
    if current == label:
        return label
    modules = self_attention_modules(model)
    if not modules:
        raise AttentionConfigError(f"{type(model).__name__} has no self-attention modules named attn1 to replace")
    processors = _restore_kept(model, label, modules) if not spec.training_free else None
    if processors is None:
        processors = [spec.build(module, i, resolved, model) for i, (_, module) in enumerate(modules)]
    if isinstance(current, str) and _is_trained(current):
        # Keep the trained weights (outside the state dict, so a save does not claim them) for the way back.
        model._kept_trained_attention = (current, [module.processor for _, module in modules])
        warnings.warn(
            f"{type(model).__name__}: {label} replaces the trained attention processors {current}; a model trained "
            f"with them is not meant to run without them. They are kept: set_attention(model, {current!r}) puts "
            "them back.",
            stacklevel=2,
        )
    for (_, module), proc in zip(modules, processors):
        module.set_processor(proc)
    model.attention_variant = label
    _record(model, label if not spec.training_free else "sdpa")
    return label


def init_attention(model: Any, variant: str | None) -> None:
    """Apply a backbone's ``attention_variant`` config argument at the end of its ``__init__``.

    ``from_pretrained`` builds the model from its config before it loads the weights, so processors with
    parameters (``agent``) exist by the time their ``...attn1.processor.*`` weights arrive. The config keeps the
    resolved label; a training-free variant given here stays in the config too (the model was built with it).
    """
    model.attention_variant = "sdpa"
    variant = "sdpa" if variant is None else str(variant)
    name, options = parse_label(variant)
    if name == "sdpa" and not options:
        _record(model, "sdpa")
        return
    label = set_attention(model, variant)
    _record(model, label)
