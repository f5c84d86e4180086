"""Training configuration: a YAML file of named sections, checked strictly against these dataclasses.

A typo in a config key fails at start-up with the list of valid keys, instead of silently training with a
default, which is the most expensive kind of mistake on a long run.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

KINDS = ("text-to-image", "class-to-image")


T = TypeVar("T")


@dataclass
class DataConfig:
    root: str = "data/emoji"
    resolution: int = 32
    bucketing: bool = False
    bucket_multiple: int = 16
    random_flip: bool = False
    caption_dropout: float = 0.1  # captions replaced by "" (the pipeline's unconditional input)
    categories: list[int] | None = None  # class-to-image: keep only these labels (re-indexed 0..K-1)
    num_workers: int = 0


@dataclass
class TextEncoderConfig:
    pretrained: str | None = None  # a transformers encoder directory; None = a small T5 trained jointly
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    d_ff: int = 256
    max_length: int = 16
    train: bool = True


@dataclass
class NoiseConfig:
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    prediction_type: str = "epsilon"


@dataclass
class OptimConfig:
    batch_size: int = 32
    max_steps: int = 1000
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    z_loss_weight: float = 0.0  # attention-logit z-loss (training.zloss); 1e-4 is a typical weight
    ema_decay: float = 0.9999
    ema_warmup: bool = True


@dataclass
class CheckpointConfig:
    every: int = 500
    keep: int = 2


@dataclass
class ValidationConfig:
    every: int = 500
    prompts: list[str] = field(default_factory=lambda: ["grinning face", "red apple", "dog face", "rocket"])
    classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    images_per_prompt: int = 2
    steps: int = 20
    guidance_scale: float = 3.0
    seed: int = 0


@dataclass
class TrainConfig:
    kind: str = "text-to-image"
    output_dir: str = "runs/train"
    seed: int = 0
    # kwargs of dit.TextDiTModel / dit.DiTModel, e.g. attention_variant: "agent[agent_num=16]" (trained agent attention)
    model: dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    log_every: int = 10
    tensorboard: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    pass


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {', '.join(f'{where}{k}' for k in unknown)}; valid keys in "
            f"{where.rstrip('.') or 'the top level'}: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        sub = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub) and isinstance(sub, type):
            kwargs[name] = _build(sub, value, f"{where}{name}.")
        else:
            kwargs[name] = tuple(value) if name == "betas" else value
    return cls(**kwargs)


def set_path(data: dict[str, Any], key: str, value: Any) -> None:
    """``data["a"]["b"] = value`` for ``key="a.b"``, creating the sections on the way."""
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set {key}: {part} is not a section")
    node[parts[-1]] = value


def load_dataclass_config(
    cls: type[T],
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> T:
    """The one config reader of every trainer: a YAML file, then ``values`` (typed, e.g. from CLI flags:
    ``{"lora.rank": 4}``), then ``key.sub=value`` overrides parsed as YAML, built strictly into ``cls`` (a mistyped
    key fails with the valid ones listed). Checks every trainer shares (``optim.mixed_precision``) happen here."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    for key, value in (values or {}).items():
        set_path(data, key, value)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        set_path(data, key, yaml.safe_load(value))
    config = _build(cls, data, "")
    optim = getattr(config, "optim", None)
    if optim is not None and getattr(optim, "mixed_precision", "no") not in ("no", "fp16", "bf16"):
        raise ConfigError(f"optim.mixed_precision must be no, fp16 or bf16, got {optim.mixed_precision!r}")
    return config


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML config and apply ``key.sub=value`` overrides (values parsed as YAML)."""
    config = load_dataclass_config(TrainConfig, path, overrides)
    if config.kind not in KINDS:
        raise ConfigError(f"kind must be one of {', '.join(KINDS)}, got {config.kind!r}")
    variant = str(config.model.get("attention_variant", "sdpa"))
    if config.optim.z_loss_weight > 0 and variant.split("[", 1)[0].strip() != "sdpa":
        raise ConfigError(
            f"optim.z_loss_weight > 0 records attention logits through its own self-attention processor, which "
            f"would replace model.attention_variant {variant!r}; use one or the other"
        )
    return config
