"""Build what a training config describes: backbone, text encoder and tokenizer, and the final pipeline."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

import dit
from dit import DiTModel, TextDiTModel

from .config import ConfigError, TrainConfig


def noise_scheduler(config: TrainConfig) -> DDPMScheduler:
    n = config.noise
    return DDPMScheduler(
        num_train_timesteps=n.num_train_timesteps,
        beta_schedule=n.beta_schedule,
        beta_start=n.beta_start,
        beta_end=n.beta_end,
        prediction_type=n.prediction_type,
        clip_sample=False,
    )


def sampling_scheduler(config: TrainConfig) -> DPMSolverMultistepScheduler:
    """The scheduler saved with the pipeline: DPM-Solver++(2M) over the training noise schedule."""
    return DPMSolverMultistepScheduler.from_config(noise_scheduler(config).config)


def backbone_class(config: TrainConfig) -> tuple[type, dict[str, Any]]:
    """The backbone class and its kwargs: ``model.backbone`` names a class exported by ``dit`` (e.g. ``DiMRModel``);
    without it, ``TextDiTModel`` for text-to-image and ``DiTModel`` for class-to-image."""
    model = dict(config.model)
    name = model.pop("backbone", None)
    if name is None:
        return (TextDiTModel if config.kind == "text-to-image" else DiTModel), model
    cls = getattr(dit, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        known = sorted(n for n in dir(dit) if n.endswith("Model") and isinstance(getattr(dit, n), type))
        raise ConfigError(f"model.backbone {name!r} is not a backbone exported by dit; known: {', '.join(known)}")
    return cls, model


def build_transformer(config: TrainConfig, num_classes: int | None = None) -> torch.nn.Module:
    """The backbone, freshly initialised. ``model.attention_variant`` (e.g. ``"agent[agent_num=16]"``) is a config
    argument of DiTModel/TextDiTModel: the trained agent processors are built here, trained with the model, and
    saved with it (the pipeline's ``transformer/config.json`` names the variant, so loading rebuilds them)."""
    cls, model = backbone_class(config)
    kwargs: dict[str, Any] = {"sample_size": config.data.resolution, "in_channels": 3}
    if config.kind == "text-to-image":
        kwargs.update(out_channels=3, caption_channels=config.text_encoder.d_model, num_classes=None)
    else:
        kwargs.update(learn_sigma=False)
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
    # The defaults above go only where the class takes them (a text model has no classes, DiMR no learned sigma);
    # the config's own keys are passed as written, so a typo still fails loudly.
    accepted = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    if "attention_variant" in model and "attention_variant" not in accepted:
        raise ConfigError(
            f"model.attention_variant: {cls.__name__} has no swappable attention (its attention is part of its "
            "architecture); attention variants are trained on DiTModel / TextDiTModel (leave model.backbone unset)"
        )
    kwargs.update(model)
    if kwargs.get("learn_sigma"):
        raise ValueError(
            "model.learn_sigma: true needs DiT's hybrid MSE+VLB loss, which training/ does not implement; "
            "set learn_sigma: false (sampling with converted learned-sigma checkpoints works)."
        )
    return cls(**kwargs)


def build_text_encoder(config: TrainConfig, captions: list[str]) -> tuple[Any, Any]:
    """(tokenizer, text encoder): a pretrained pair, or a word tokenizer over the captions plus a small T5."""
    from transformers import AutoModel, AutoTokenizer, T5Config, T5EncoderModel

    tc = config.text_encoder
    if tc.pretrained:
        return AutoTokenizer.from_pretrained(tc.pretrained), AutoModel.from_pretrained(tc.pretrained)
    from .data.tokenizer import build_word_tokenizer

    tokenizer = build_word_tokenizer(captions, max_length=tc.max_length)
    encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=tc.d_model,
            d_kv=tc.d_model // tc.num_heads,
            d_ff=tc.d_ff,
            num_layers=tc.num_layers,
            num_heads=tc.num_heads,
            relative_attention_num_buckets=16,
            dropout_rate=0.0,
            pad_token_id=tokenizer.pad_token_id,
            feed_forward_proj="gated-gelu",
        )
    )
    return tokenizer, encoder


def build_pipeline(
    config: TrainConfig,
    transformer: torch.nn.Module,
    tokenizer: Any = None,
    text_encoder: Any = None,
    id2label: dict[str, str] | None = None,
) -> Any:
    from pipelines import ClassToImagePipeline, TextToImagePipeline

    if config.kind == "text-to-image":
        return TextToImagePipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            transformer=transformer,
            scheduler=sampling_scheduler(config),
            max_sequence_length=config.text_encoder.max_length,
        )
    return ClassToImagePipeline(transformer=transformer, scheduler=sampling_scheduler(config), id2label=id2label)
