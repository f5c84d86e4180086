"""LoRA fine-tuning of a trained or stock DiT backbone on your own image folder.

    python -m training.lora --pipeline emoji-t2i --data my_images/ --output runs/my-lora --rank 8 --steps 500
    accelerate launch -m training.lora --pipeline path/to/PixArt --data my_images/ --output runs/x \\
        --set optim.mixed_precision=bf16 --set optim.gradient_checkpointing=true
    python -m training.lora --config my-lora.yaml --set lora.targets=[to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2]

The base model (a catalog name, a pipeline directory, or a hub id) stays frozen, text encoder and VAE included;
only the PEFT LoRA layers train, in fp32 even under mixed precision. The data folder is any layout
``training.data.datasets.open_image_folder`` reads (``metadata.jsonl``, ``.txt`` captions, class sub-folders whose
names are the model's class names). The result is ``OUTPUT/pytorch_lora_weights.safetensors`` with diffusers' PEFT
key names and rank/alpha under ``lora_adapter_metadata``, plus the base model's name and hash and this run's config,
ready for ``pipelines.lora.load_loras``. The loop, checkpoints (LoRA weights + optimizer + RNG) and exact resume are
those of ``training.train``. Settings: ``--config`` YAML (sections below), then the flags, then ``--set`` overrides.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler

from pipelines.lora import COMPONENT, LORA_METADATA_KEY, LORA_WEIGHT_NAME

from .config import CheckpointConfig, ConfigError, DataConfig, ValidationConfig, load_dataclass_config
from .train import Trainer, end_cli_process

ADAPTER = "default"  # the adapter's name inside the model while training; files carry no adapter name
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---- configuration ----------------------------------------------------------------------------------------
@dataclass
class LoraSection:
    rank: int = 8
    alpha: float = 8.0  # scale = alpha / rank
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))  # module-name suffixes (PEFT matching)
    dropout: float = 0.0
    init: str = "gaussian"  # PEFT init_lora_weights: gaussian (diffusers' scripts) | default (Kaiming A) ; B = 0


@dataclass
class LoraDataConfig(DataConfig):
    resolution: int | None = None  # None: the base model's default image size


@dataclass
class LoraOptimConfig:
    batch_size: int = 4
    max_steps: int = 500
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | fp16 | bf16: the frozen base runs in it, the LoRA stays fp32
    gradient_checkpointing: bool = False


@dataclass
class LoraValidationConfig(ValidationConfig):
    every: int = 0
    prompts: list[str] = field(default_factory=list)  # empty: the first distinct captions of the data
    classes: list[int] = field(default_factory=list)  # empty: the classes present in the data


@dataclass
class LoraTrainConfig:
    pipeline: str = ""  # base model: catalog name, pipeline directory or hub id
    kind: str | None = None  # taken from the pipeline; set only to assert it
    output_dir: str = "runs/lora"
    seed: int = 0
    lora: LoraSection = field(default_factory=LoraSection)
    data: LoraDataConfig = field(default_factory=LoraDataConfig)
    optim: LoraOptimConfig = field(default_factory=LoraOptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: LoraValidationConfig = field(default_factory=LoraValidationConfig)
    log_every: int = 10
    tensorboard: bool = True

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def load_lora_config(
    path: str | Path | None = None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> LoraTrainConfig:
    """YAML file, then ``values`` (``{"lora.rank": 4}``, typed, e.g. from CLI flags), then ``key=value`` overrides
    parsed as YAML; checked strictly, so a mistyped key fails with the valid ones listed."""
    config = load_dataclass_config(LoraTrainConfig, path, overrides, values)
    if not config.pipeline:
        raise ConfigError("no base model: pass --pipeline (a catalog name, pipeline directory or hub id)")
    lc = config.lora
    if isinstance(lc.targets, str):
        lc.targets = [t.strip() for t in lc.targets.split(",") if t.strip()]
    if not isinstance(lc.rank, int) or lc.rank < 1:
        raise ConfigError(f"lora.rank must be a positive integer, got {lc.rank!r}")
    if not isinstance(lc.alpha, (int, float)) or lc.alpha <= 0:
        raise ConfigError(f"lora.alpha must be a positive number, got {lc.alpha!r}")
    if not lc.targets:
        raise ConfigError("lora.targets is empty; name the layers to adapt, e.g. to_q,to_k,to_v,to_out.0")
    if lc.init not in ("gaussian", "default"):
        raise ConfigError(f"lora.init must be gaussian or default, got {lc.init!r}")
    if config.data.categories:
        raise ConfigError("data.categories is not used by LoRA training; class folders map to the model's classes")
    return config


# ---- the LoRA file ----------------------------------------------------------------------------------------
def lora_state_dict(transformer: torch.nn.Module, adapter_name: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The adapter's weights with diffusers' PEFT key names (``transformer.<module>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(transformer, adapter_name=adapter_name)
    return {f"{COMPONENT}.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def save_lora_file(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> Path:
    """Write atomically (temp file + rename), so a run killed mid-save never leaves a truncated LoRA."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    return value


def _linear_suffixes(model: torch.nn.Module) -> list[str]:
    """Short names of a model's Linear layers as PEFT targets take them (``to_q``, ``to_out.0``, ``ff.net.2``)."""
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            parts = name.split(".")
            keep = 1
            while keep < len(parts) and (parts[-keep].isdigit() or parts[-keep] == "proj"):
                keep += 1
            out.add(".".join(parts[-keep:]))
    return sorted(out)


# ---- the trainer ------------------------------------------------------------------------------------------
class LoraTrainer(Trainer):
    """``training.train.Trainer`` with a frozen, loaded pipeline and a PEFT LoRA as the only trainable weights."""

    def __init__(self, config: LoraTrainConfig):
        from pipelines import load_pipeline

        self.config = config
        self.out = Path(config.output_dir)
        opt = config.optim
        self.weight_dtype = _DTYPES[opt.mixed_precision]
        dtype = None if self.weight_dtype == torch.float32 else self.weight_dtype  # None: as saved
        self.pipe = load_pipeline(config.pipeline, torch_dtype=dtype)
        self.pipe.set_progress_bar_config(disable=True)
        if "use_resolution_binning" in self.pipe.config:  # validation samples at the (square) training size
            self.pipe.register_to_config(use_resolution_binning=False)
        pipe = self.pipe
        if config.kind not in (None, pipe.kind):
            raise ConfigError(f"kind: {config.kind} was set, but {config.pipeline} is a {pipe.kind} model")
        config.kind = pipe.kind
        multiple = pipe.vae_scale_factor * pipe.patch_size
        if config.data.resolution is None:
            config.data.resolution = pipe.default_size()
        if config.data.resolution % multiple:
            raise ConfigError(
                f"data.resolution={config.data.resolution} is not a multiple of {multiple} (VAE factor x patch size)"
            )
        if config.data.bucketing and config.data.bucket_multiple % multiple:
            raise ConfigError(f"data.bucket_multiple must be a multiple of {multiple} for this model")
        self.setup_run()
        if pipe.kind == "class-to-image":
            self._match_labels()
        self._fill_validation()

        # The training noise schedule is the base model's, read from its scheduler config.
        self.noise = DDPMScheduler.from_config(pipe.scheduler.config)
        self.transformer = pipe.transformer
        self.text_encoder = getattr(pipe, "text_encoder", None)
        self.tokenizer = getattr(pipe, "tokenizer", None)
        self.vae = getattr(pipe, "vae", None)
        self.train_text = False
        self.text_max_length = int(pipe.config.get("max_sequence_length") or 120)
        device = self.accelerator.device
        for frozen in (self.transformer, self.text_encoder, self.vae):
            if frozen is not None:
                frozen.requires_grad_(False)
        for frozen in (self.text_encoder, self.vae):
            if frozen is not None:
                frozen.to(device).eval()

        self.lora_config = self._add_lora(self.transformer)
        if opt.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        params = [p for p in self.transformer.parameters() if p.requires_grad]
        for p in params:  # fp32 trainable weights under fp16/bf16 (what diffusers' cast_training_params does)
            p.data = p.data.float()
        self.ema, self.ema_params = None, params
        self.optimizer = torch.optim.AdamW(
            params, lr=opt.learning_rate, weight_decay=opt.weight_decay, betas=tuple(opt.betas)
        )
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup", self.optimizer, num_warmup_steps=opt.warmup_steps * self.accelerator.num_processes
        )
        self.transformer, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.transformer, self.optimizer, self.lr_scheduler
        )
        self.models = [self.transformer]
        # Checkpoints hold the LoRA file (not the frozen base) next to the optimizer and RNG state.
        self.accelerator.register_save_state_pre_hook(self._save_hook)
        self.accelerator.register_load_state_pre_hook(self._load_hook)
        self.global_step = 0

    # ---- setup ------------------------------------------------------------------------------------------
    def _add_lora(self, transformer: torch.nn.Module) -> Any:
        from peft import LoraConfig, inject_adapter_in_model

        lc = self.config.lora
        config = LoraConfig(
            r=lc.rank,
            lora_alpha=lc.alpha,
            target_modules=list(lc.targets),
            lora_dropout=lc.dropout,
            init_lora_weights="gaussian" if lc.init == "gaussian" else True,
        )
        try:
            inject_adapter_in_model(config, transformer, adapter_name=ADAPTER)
        except ValueError as e:
            raise ConfigError(
                f"lora.targets {list(lc.targets)} match no layer of {type(transformer).__name__} ({e}). "
                f"Its Linear layers end in: {', '.join(_linear_suffixes(transformer))}"
            ) from None
        return config

    def _match_labels(self) -> None:
        """Class folders are matched to the base model's classes by name; bare integer labels are model ids."""
        import dataclasses

        from pipelines.errors import InputError

        ds, pipe = self.dataset, self.pipe
        if ds.class_names:
            try:
                ids = pipe.get_label_ids(list(ds.class_names))
            except InputError as e:
                raise ValueError(
                    f"{self.config.data.root}: a class name is not one of the model's classes: {e}"
                ) from None
            ds.records = [dataclasses.replace(r, label=ids[r.label]) for r in ds.records]
            ds.class_names = None
        bad = sorted({lbl for lbl in ds.labels if lbl is None or not 0 <= lbl < pipe.num_classes}, key=str)
        if bad:
            raise ValueError(f"labels {bad[:5]} are not classes of this model (0..{pipe.num_classes - 1})")

    def _fill_validation(self) -> None:
        v = self.config.validation
        if self.config.kind == "text-to-image" and not v.prompts:
            v.prompts = list(dict.fromkeys(t for t in self.dataset.texts if t))[:4]
        if self.config.kind == "class-to-image" and not v.classes:
            v.classes = sorted(set(self.dataset.labels))[:4]

    # ---- one step ---------------------------------------------------------------------------------------
    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """Pixels for pixel-space models; VAE latents (scaled as the pipeline's ``decode`` unscales) otherwise."""
        x = batch["pixel_values"].to(self.accelerator.device)
        if self.vae is None:
            return x
        with torch.no_grad():
            z = self.vae.encode(x.to(self.vae.dtype)).latent_dist.sample()
        return z.float() * self.vae.config.scaling_factor

    def predict(self, xt: torch.Tensor, t: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        xt = xt.to(self.weight_dtype)
        if self.config.kind != "text-to-image":
            return super().predict(xt, t, batch)
        emb, mask = self.encode_text(list(batch["text"]))
        model = self.accelerator.unwrap_model(self.transformer)
        added: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if getattr(model, "use_additional_conditions", False):  # PixArt-α 1024: image size as a condition
            h, w = (s * self.pipe.vae_scale_factor for s in xt.shape[-2:])
            n = xt.shape[0]
            added = {
                "resolution": torch.tensor([[h, w]], dtype=self.weight_dtype, device=xt.device).repeat(n, 1),
                "aspect_ratio": torch.tensor([[h / w]], dtype=self.weight_dtype, device=xt.device).repeat(n, 1),
            }
        return self.transformer(
            xt,
            encoder_hidden_states=emb.to(self.weight_dtype),
            encoder_attention_mask=mask,
            timestep=t,
            added_cond_kwargs=added,
        ).sample

    # ---- saving -----------------------------------------------------------------------------------------
    def lora_metadata(self) -> dict[str, str]:
        """Safetensors metadata: diffusers' ``lora_adapter_metadata`` (the LoraConfig, ``transformer.``-prefixed,
        which ``LoraConfig(**...)`` reads back) plus flat, human-readable facts about the adapter and its base."""
        peft_config = {f"{COMPONENT}.{k}": _jsonable(v) for k, v in self.lora_config.to_dict().items()}
        lc = self.config.lora
        base = self.config.pipeline
        base_name = base if not Path(base).expanduser().exists() else Path(base).expanduser().resolve().name
        return {
            "format": "pt",
            LORA_METADATA_KEY: json.dumps(peft_config, indent=2, sort_keys=True),
            "rank": str(lc.rank),
            "alpha": f"{lc.alpha:g}",
            "target_modules": json.dumps(list(lc.targets)),
            "base_model": base_name,
            "base_model_hash": str(getattr(self.pipe, "model_hash", None) or ""),
            "base_model_class": type(self.accelerator.unwrap_model(self.transformer)).__name__,
            "kind": str(self.config.kind),
            "steps": str(self.global_step),
            "training_config": json.dumps(self.config.to_dict(), sort_keys=True, default=str),
            "software": "dit-studio training.lora",
        }

    def write_lora(self, path: str | Path) -> Path:
        model = self.accelerator.unwrap_model(self.transformer)
        return save_lora_file(lora_state_dict(model), path, self.lora_metadata())

    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            self.write_lora(Path(output_dir) / LORA_WEIGHT_NAME)
        weights.clear()  # the frozen base is not checkpointed

    def _load_hook(self, models: list, input_dir: str) -> None:
        from peft import set_peft_model_state_dict

        from pipelines.lora import read_lora

        model = self.accelerator.unwrap_model(models.pop())
        lora = read_lora(Path(input_dir) / LORA_WEIGHT_NAME, model)
        result = set_peft_model_state_dict(model, lora.tensors, adapter_name=ADAPTER)
        if result.unexpected_keys:
            raise ValueError(f"checkpoint {input_dir} has LoRA keys this run lacks: {result.unexpected_keys[:5]}")

    def finish(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        path = self.write_lora(self.out / LORA_WEIGHT_NAME)
        acc.print(f"saved LoRA to {path}")
        return path

    def validate(self) -> None:
        from .validation import save_validation

        acc = self.accelerator
        if not acc.is_main_process:
            return
        model = acc.unwrap_model(self.transformer)
        model.eval()
        tracker = acc.get_tracker("tensorboard", unwrap=True) if self.config.tensorboard else None
        path = save_validation(self.pipe, self.config, self.global_step, tracker)
        acc.print(f"validation grid: {path}")
        model.train()


# ---- command line -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config with the sections of LoraTrainConfig")
    parser.add_argument("--pipeline", help="base model: catalog name, pipeline directory or hub id")
    parser.add_argument("--data", help="image folder (metadata.jsonl, .txt captions or class sub-folders)")
    parser.add_argument("--output", help="output folder (LoRA file, checkpoints, losses.jsonl)")
    parser.add_argument("--rank", type=int, help="LoRA rank r (default 8)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / rank (default 8)")
    parser.add_argument("--targets", help="comma-separated module names to adapt (default to_q,to_k,to_v,to_out.0)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 500)")
    parser.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    parser.add_argument("--batch-size", type=int, help="images per step and process (default 4)")
    parser.add_argument("--seed", type=int, help="seed of LoRA init, data order and noise (default 0)")
    parser.add_argument("--resolution", type=int, help="training image size (default: the model's)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.mixed_precision=bf16"
    )
    parser.add_argument(
        "--resume", default="auto", help="'auto' (newest checkpoint in the output), 'none', or a checkpoint path"
    )
    return parser.parse_args(argv)


_FLAGS = {
    "pipeline": "pipeline",
    "data": "data.root",
    "output": "output_dir",
    "rank": "lora.rank",
    "alpha": "lora.alpha",
    "targets": "lora.targets",
    "steps": "optim.max_steps",
    "lr": "optim.learning_rate",
    "batch_size": "optim.batch_size",
    "seed": "seed",
    "resolution": "data.resolution",
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    values = {key: getattr(args, flag) for flag, key in _FLAGS.items() if getattr(args, flag) is not None}
    if "lora.targets" in values:
        values["lora.targets"] = [t.strip() for t in values["lora.targets"].split(",") if t.strip()]
    try:
        config = load_lora_config(args.config, args.set, values)
        trainer = LoraTrainer(config)
    except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.train(resume=args.resume)
    return end_cli_process(0)


if __name__ == "__main__":
    sys.exit(main())
