"""Train VAR in its two stages under accelerate: the multi-scale VQ-VAE, then the next-scale transformer.

    python -m training.train_var --config training/configs/emoji-var-vqvae.yaml
    python -m training.train_var --config training/configs/emoji-var.yaml   # stage: var, vqvae_path: the run above

Both stages are ``training.train.Trainer`` subclasses, so they share its accelerate setup, data order, EMA,
atomic checkpoints, exact resume and ``losses.jsonl``; only the model, the loss and what a finished run
writes differ.

* ``stage: vqvae`` trains ``dit.models.var_vqvae.VARVQVAE`` with losses that need no downloaded weights:
  L1 + L2 reconstruction, an L1 loss on image gradients (finite differences, for edges that L2 blurs), and
  VAR's VQ loss (codebook + ``beta`` commitment, straight-through). VAR's own tokenizer was trained with
  LPIPS and a GAN (FoundationVision/vaex); both need pretrained networks, so they are left out. Codebook usage
  (VAR's per-scale running hit counts) is logged to ``codebook.jsonl``; codes unused for a while are
  optionally restarted from encoder features (``loss.restart_every``), the usual cure for a dead codebook.
  The run writes ``output_dir/vqvae`` (diffusers layout) and a reconstruction grid.
* ``stage: var`` trains ``dit.models.var.VARTransformer`` with VAR's teacher-forced cross-entropy: the
  frozen VQ-VAE tokenises each image into its pyramid, the transformer sees the class token and the
  upsampled running reconstruction of the ground truth (``teacher_forcing_input``) and predicts every scale's
  tokens at once under the block-causal mask; labels are dropped with ``cond_drop_rate`` for guidance. The run
  writes ``output_dir/pipeline``: a ``VARPipeline`` (EMA weights) with both stages' configs.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from PIL import Image

from .config import CheckpointConfig, ConfigError, DataConfig, OptimConfig, ValidationConfig, load_dataclass_config
from .train import Trainer, end_cli_process
from .validation import image_grid

STAGES = ("vqvae", "var")


@dataclass
class VQLossConfig:
    l1: float = 1.0
    l2: float = 1.0
    gradient: float = 0.5  # L1 between horizontal/vertical finite differences of output and target
    vq: float = 1.0  # weight of VAR's VQ loss (its beta, the commitment share, is a model setting)
    restart_every: int = 0  # steps between dead-code restarts; 0 = never
    restart_threshold: float = 0.03  # a code is dead below this fraction of a uniform share of hits


@dataclass
class VARObjectiveConfig:
    label_smoothing: float = 0.0  # VAR's --ls (0 in the released runs)


@dataclass
class VARSamplingConfig:
    """Validation sampling (``validation.guidance_scale`` is VAR's cfg)."""

    top_k: int = 0
    top_p: float = 0.0


@dataclass
class VARTrainConfig:
    stage: str = "vqvae"
    kind: str = "class-to-image"  # the data need class labels in both stages (the VQ-VAE ignores them)
    output_dir: str = "runs/var"
    seed: int = 0
    vqvae: dict[str, Any] = field(default_factory=dict)  # kwargs of VARVQVAE
    model: dict[str, Any] = field(default_factory=dict)  # kwargs of VARTransformer
    vqvae_path: str | None = None  # stage var: a vqvae run directory or a VARVQVAE directory
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    loss: VQLossConfig = field(default_factory=VQLossConfig)
    objective: VARObjectiveConfig = field(default_factory=VARObjectiveConfig)
    sampling: VARSamplingConfig = field(default_factory=VARSamplingConfig)
    log_every: int = 10
    tensorboard: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_var_config(path: str | Path | None = None, overrides: list[str] | None = None) -> VARTrainConfig:
    """Read a YAML config strictly (unknown keys are errors) and apply ``key.sub=value`` overrides."""
    config = load_dataclass_config(VARTrainConfig, path, overrides)
    if config.stage not in STAGES:
        raise ConfigError(f"stage must be one of {', '.join(STAGES)}, got {config.stage!r}")
    if config.kind != "class-to-image":
        raise ConfigError("kind must be class-to-image: VAR is class-conditional")
    if config.stage == "var" and not config.vqvae_path:
        raise ConfigError("stage var needs vqvae_path: the output_dir of a finished vqvae run (or a VARVQVAE folder)")
    return config


def image_gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean |d(a) - d(b)| over horizontal and vertical finite differences: a download-free edge loss."""
    dx = (a[..., :, 1:] - a[..., :, :-1]) - (b[..., :, 1:] - b[..., :, :-1])
    dy = (a[..., 1:, :] - a[..., :-1, :]) - (b[..., 1:, :] - b[..., :-1, :])
    return dx.abs().mean() + dy.abs().mean()


def find_vqvae(path: str | Path) -> Path:
    """The VARVQVAE folder inside a vqvae run (``run/vqvae``), a pipeline (``pipe/vae``) or the folder itself."""
    path = Path(path)
    for candidate in (path, path / "vqvae", path / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"no VQ-VAE found at {path}: give the output_dir of a finished 'stage: vqvae' run (it holds vqvae/), "
        "a VARPipeline folder (it holds vae/) or a VARVQVAE folder (config.json + weights)"
    )


class _OptimMixin:
    def build_optimizer(self, params: list[torch.nn.Parameter], use_ema: bool) -> None:
        opt = self.config.optim
        self.ema_params = params
        self.ema = EMAModel(params, decay=opt.ema_decay, use_ema_warmup=opt.ema_warmup) if use_ema else None
        self.optimizer = torch.optim.AdamW(
            params, lr=opt.learning_rate, weight_decay=opt.weight_decay, betas=tuple(opt.betas)
        )
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup", self.optimizer, num_warmup_steps=opt.warmup_steps * self.accelerator.num_processes
        )

    def ema_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """An unwrapped float copy of ``model`` carrying the EMA weights (when EMA is on)."""
        copy_ = copy.deepcopy(self.accelerator.unwrap_model(model)).float().eval()
        if self.ema is not None:
            self.ema.copy_to(list(copy_.parameters()))
        return copy_

    def write_atomic(self, save: Any, name: str) -> Path:
        target, tmp = self.out / name, self.out / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        save(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        return target


class VQVAETrainer(_OptimMixin, Trainer):
    """Stage 1: the multi-scale VQ-VAE (see the module docstring for the losses)."""

    def __init__(self, config: VARTrainConfig):
        from dit.models.var_vqvae import VARVQVAE

        self.config = config
        self.out = Path(config.output_dir)
        self.setup_run()
        self.id2label = None
        vae = VARVQVAE(**config.vqvae)
        if vae.resolution != config.data.resolution:
            raise ValueError(
                f"the VQ-VAE's schedule {tuple(vae.config.patch_nums)} x {vae.downsample_factor} covers "
                f"{vae.resolution} px images but data.resolution is {config.data.resolution}"
            )
        if config.optim.gradient_checkpointing:
            vae.enable_gradient_checkpointing()
        # EMA would average codebook entries that the encoder no longer maps to; off unless asked for.
        self.build_optimizer(list(vae.parameters()), use_ema=config.optim.ema_decay > 0)
        self.vae, self.optimizer, self.lr_scheduler = self.accelerator.prepare(vae, self.optimizer, self.lr_scheduler)
        if self.ema is not None:
            self.accelerator.register_for_checkpointing(self.ema)
        self.models = [self.vae]
        self.global_step = 0
        self._fixed: torch.Tensor | None = None

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        cfg = self.config.loss
        x = batch["pixel_values"].to(self.accelerator.device)
        vae = self.accelerator.unwrap_model(self.vae)
        step = self.global_step + 1
        if cfg.restart_every and step % cfg.restart_every == 0:
            self.restart_dead_codes(vae, x)
        log = self.config.log_every and step % self.config.log_every == 0
        rec, vq_loss, usage = self.vae(x, return_usage=bool(log), return_dict=False)
        rec = rec.float()
        loss = cfg.l1 * (rec - x).abs().mean() + cfg.l2 * F.mse_loss(rec, x)
        if cfg.gradient:
            loss = loss + cfg.gradient * image_gradient_l1(rec, x)
        loss = loss + cfg.vq * vq_loss
        if log and self.accelerator.is_main_process:
            entry = {"step": step, "usage_per_scale": [round(u, 2) for u in usage], "usage": float(np.mean(usage))}
            with (self.out / "codebook.jsonl").open("a") as f:
                f.write(json.dumps(entry) + "\n")
            self.accelerator.log({"codebook_usage": entry["usage"], "vq_loss": vq_loss.item()}, step=step)
        return loss

    @torch.no_grad()
    def restart_dead_codes(self, vae: Any, x: torch.Tensor) -> int:
        """Re-seed codes with few running hits from random encoder features of this batch (same on all ranks)."""
        q = vae.quantize
        if int(q.hit_updates) == 0:
            return 0
        b = x.shape[0]
        side = q.patch_nums[-1]
        uniform = b * side * side / q.vocab_size
        dead = (q.ema_vocab_hit.sum(0) < self.config.loss.restart_threshold * uniform).nonzero()[:, 0]
        if dead.numel() == 0:
            return 0
        f = vae.encode(x).permute(0, 2, 3, 1).reshape(-1, q.channels).float()
        pick = torch.randint(0, f.shape[0], (dead.numel(),), device=f.device)
        new = f[pick] + 0.01 * f.std() * torch.randn(dead.numel(), q.channels, device=f.device)
        q.embedding.weight[dead] = new.to(q.embedding.weight.dtype)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.broadcast(q.embedding.weight.data, 0)
        q.ema_vocab_hit[:, dead] = 0.0  # counted as used only once the encoder really maps to them
        return int(dead.numel())

    def fixed_images(self) -> torch.Tensor:
        if self._fixed is None:
            n = min(16, len(self.dataset))
            idx = np.linspace(0, len(self.dataset) - 1, n).astype(int)
            self._fixed = torch.stack([self.dataset[int(i)]["pixel_values"] for i in idx])
        return self._fixed

    def reconstruction_grid(self, vae: Any) -> Image.Image:
        x = self.fixed_images().to(vae.device)
        with torch.no_grad():
            rec = vae.reconstruct(x)
        pairs = torch.stack([x, rec], dim=1).flatten(0, 1)
        arr = ((pairs.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        return image_grid([Image.fromarray(a) for a in arr], columns=8)

    def validate(self) -> None:
        if not self.accelerator.is_main_process:
            return
        vae = self.ema_copy(self.vae).to(self.accelerator.device)
        path = self.out / "validation" / f"step-{self.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.reconstruction_grid(vae).save(path)
        self.accelerator.print(f"reconstruction grid: {path}")
        self.vae.train()

    def finish(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        vae = self.ema_copy(self.vae)
        target = self.write_atomic(lambda p: vae.save_pretrained(p, safe_serialization=True), "vqvae")
        (target / "training_config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        self.reconstruction_grid(vae.to(acc.device)).save(self.out / "reconstructions.png")
        acc.print(f"saved VQ-VAE to {target}")
        return target


class VARTrainer(_OptimMixin, Trainer):
    """Stage 2: the VAR transformer on a frozen VQ-VAE (teacher-forced cross-entropy)."""

    def __init__(self, config: VARTrainConfig):
        from dit.models.var import VARTransformer
        from dit.models.var_vqvae import VARVQVAE

        self.config = config
        self.out = Path(config.output_dir)
        self.setup_run()
        self.vqvae_dir = find_vqvae(config.vqvae_path)
        self.vqvae = VARVQVAE.from_pretrained(self.vqvae_dir).eval().requires_grad_(False).to(self.accelerator.device)
        if self.vqvae.resolution != config.data.resolution:
            raise ValueError(
                f"the VQ-VAE is for {self.vqvae.resolution} px images, data.resolution is {config.data.resolution}"
            )
        num_classes = len(self.dataset.class_names or []) or (max(self.dataset.labels) + 1)
        names = self.dataset.class_names or [str(i) for i in range(num_classes)]
        self.id2label = {str(i): n for i, n in enumerate(names)}
        vcfg = self.vqvae.config
        kwargs: dict[str, Any] = dict(
            vocab_size=vcfg.vocab_size,
            latent_channels=vcfg.latent_channels,
            patch_nums=tuple(vcfg.patch_nums),
            num_classes=num_classes,
        )
        for key, value in config.model.items():
            if key in kwargs and key != "num_classes" and value != kwargs[key]:
                raise ValueError(f"model.{key}={value} contradicts the VQ-VAE ({kwargs[key]}); leave it out")
        kwargs.update(config.model)
        transformer = VARTransformer(**kwargs)
        if config.optim.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.build_optimizer(list(transformer.parameters()), use_ema=True)
        self.transformer, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            transformer, self.optimizer, self.lr_scheduler
        )
        self.accelerator.register_for_checkpointing(self.ema)
        self.models = [self.transformer]
        self.global_step = 0
        self._tokens: dict[int, list[torch.Tensor]] = {}

    def tokens(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        """The batch's token pyramid; cached per example when images are not augmented (the VQ-VAE is frozen)."""
        device = self.accelerator.device
        if self.config.data.random_flip:
            return self.vqvae.image_to_ids(batch["pixel_values"].to(device))
        index = batch["index"].tolist()
        todo = [i for i, k in enumerate(index) if k not in self._tokens]
        if todo:
            ids = self.vqvae.image_to_ids(batch["pixel_values"][todo].to(device))
            for row, i in enumerate(todo):
                self._tokens[index[i]] = [s[row].cpu() for s in ids]
        return [
            torch.stack([self._tokens[k][s] for k in index]).to(device)
            for s in range(len(self.vqvae.config.patch_nums))
        ]

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        ids = self.tokens(batch)
        with torch.no_grad():
            teacher = self.vqvae.quantize.teacher_forcing_input(ids)
        labels = batch["label"].to(self.accelerator.device)
        logits = self.transformer(labels, teacher)
        target = torch.cat(ids, dim=1)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            target.reshape(-1),
            label_smoothing=self.config.objective.label_smoothing,
        )
        step = self.global_step + 1
        if self.config.log_every and step % self.config.log_every == 0:
            with torch.no_grad():
                last = self.accelerator.unwrap_model(self.transformer).begin_ends[-1][0]
                acc = (logits[:, last:].argmax(-1) == target[:, last:]).float().mean().item()
            self.accelerator.log({"last_scale_accuracy": acc}, step=step)
        return loss

    def _ema_pipeline(self) -> Any:
        from pipelines.var import VARPipeline

        pipe = VARPipeline(transformer=self.ema_copy(self.transformer), vae=self.vqvae, id2label=self.id2label)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate(self) -> None:
        if not self.accelerator.is_main_process:
            return
        v, s = self.config.validation, self.config.sampling
        pipe = self._ema_pipeline().to(self.accelerator.device)
        classes = [c for c in v.classes if c < pipe.num_classes]
        images = pipe(
            classes, num_images_per_prompt=v.images_per_prompt, guidance_scale=v.guidance_scale,
            top_k=s.top_k, top_p=s.top_p, seed=v.seed,
        ).images  # fmt: skip
        path = self.out / "validation" / f"step-{self.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(images, columns=v.images_per_prompt * 4).save(path)
        self.accelerator.print(f"validation grid: {path}")
        self.transformer.train()

    def save_pipeline(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        pipe = self._ema_pipeline()

        def save(path: Path) -> None:
            pipe.save_pretrained(path, safe_serialization=True)
            (path / "training_config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
            stage1 = self.vqvae_dir / "training_config.yaml"
            if stage1.is_file():
                shutil.copyfile(stage1, path / "vqvae_training_config.yaml")

        target = self.write_atomic(save, "pipeline")
        acc.print(f"saved pipeline to {target}")
        return target


def build_trainer(config: VARTrainConfig) -> Trainer:
    return VQVAETrainer(config) if config.stage == "vqvae" else VARTrainer(config)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (training/configs/*var*.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.max_steps=50"
    )
    parser.add_argument("--resume", default="auto", help="'auto' (newest checkpoint in output_dir), 'none', or a path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_var_config(args.config, args.set)
        trainer = build_trainer(config)
    except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.train(resume=args.resume)
    return end_cli_process(0)


if __name__ == "__main__":
    sys.exit(main())
