"""Train DiT-3D on point clouds (ShapeNet PC15k or the procedural shape set) under accelerate.

    accelerate launch -m training.train_points --config training/configs/points-dit3d.yaml
    python -m training.train_points --config training/configs/shapenet-chair-dit3d-s4.yaml --set optim.max_steps=100

The paper's recipe: global normalisation of the data (one mean per axis, one std), DDPM with T = 1000 and a
linear β from 1e-4 to 0.02 (airplane: ``warm0.1`` from 1e-5 to 0.008), ε-prediction with an MSE loss, AdamW
without weight decay. It reuses the image trainer's loop (``training.train.Trainer``): the same exact resume
(data order and point subsamples are functions of (seed, epoch)), atomic checkpoints, EMA, ``losses.jsonl``
and the final diffusers pipeline (``PointCloudPipeline``: model + sampler + the data's mean/std + class names).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader

from dit.models.dit3d import DiT3DModel, dit3d_config, init_from_dit2d

from .config import CheckpointConfig, ConfigError, NoiseConfig, OptimConfig, load_dataclass_config
from .data.datasets import AspectRatioBucketSampler
from .train import Trainer, end_cli_process

WARM_SCHEDULES = {"warm0.1": 0.1, "warm0.2": 0.2, "warm0.5": 0.5}


@dataclass
class PointDataConfig:
    source: str = "procedural"  # procedural | shapenet
    root: str | None = None  # shapenet: the ShapeNetCore.v2.PC15k folder
    categories: list[str] | None = None  # procedural: shape classes (all 8); shapenet: names or synset ids
    num_points: int = 2048
    shapes_per_class: int = 200  # procedural training shapes per class
    heldout_per_class: int = 32  # procedural test shapes per class (for training.metrics3d)
    seed: int = 0
    num_workers: int = 0


@dataclass
class PointValidationConfig:
    every: int = 500
    classes: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    clouds_per_class: int = 2
    steps: int = 50
    guidance_scale: float = 1.0
    seed: int = 0


@dataclass
class PointsTrainConfig:
    kind: str = "point-cloud"
    output_dir: str = "runs/points"
    seed: int = 0
    # DiT3DModel kwargs; ``config: DiT-3D-S/4`` (+ ``window: true``) starts from a named size.
    model: dict[str, Any] = field(default_factory=dict)
    init_from_2d: str | None = None  # a 2D DiT checkpoint/directory whose blocks initialise the model
    # Save the sampler with x0 predictions clipped to the training data's range (normalised): stray points cannot
    # fly off. DiT-3D's test.py samples without clipping; set false to match it exactly.
    sample_clip: bool = True
    data: PointDataConfig = field(default_factory=PointDataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: PointValidationConfig = field(default_factory=PointValidationConfig)
    log_every: int = 10
    tensorboard: bool = True

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def load_points_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PointsTrainConfig:
    """Read a YAML config (strict keys, as ``training.config``) and apply ``key.sub=value`` overrides."""
    config = load_dataclass_config(PointsTrainConfig, path, overrides)
    if config.kind != "point-cloud":
        raise ConfigError(f"kind must be point-cloud for training.train_points, got {config.kind!r}")
    if config.data.source not in ("procedural", "shapenet"):
        raise ConfigError(f"data.source must be procedural or shapenet, got {config.data.source!r}")
    if config.data.source == "shapenet" and not config.data.root:
        raise ConfigError("data.source: shapenet needs data.root (the ShapeNetCore.v2.PC15k folder)")
    if config.noise.prediction_type != "epsilon":
        raise ConfigError("DiT-3D trains ε-prediction; set noise.prediction_type: epsilon")
    return config


def betas_for(noise: NoiseConfig) -> list[float] | None:
    """DiT-3D's ``warmN`` schedules (β_end everywhere, a linear ramp over the first N·T steps); None otherwise."""
    if noise.beta_schedule not in WARM_SCHEDULES:
        return None
    t = noise.num_train_timesteps
    betas = np.full(t, noise.beta_end, dtype=np.float64)
    warm = int(t * WARM_SCHEDULES[noise.beta_schedule])
    betas[:warm] = np.linspace(noise.beta_start, noise.beta_end, warm, dtype=np.float64)
    return betas.tolist()


def point_noise_scheduler(config: PointsTrainConfig) -> DDPMScheduler:
    """The training DDPM: ``fixed_small`` variance and no clipping, as DiT-3D samples (``clip_denoised=False``)."""
    n = config.noise
    trained = betas_for(n)
    return DDPMScheduler(
        num_train_timesteps=n.num_train_timesteps,
        beta_schedule="linear" if trained is not None else n.beta_schedule,
        beta_start=n.beta_start,
        beta_end=n.beta_end,
        trained_betas=trained,
        prediction_type=n.prediction_type,
        variance_type="fixed_small",
        clip_sample=False,
    )


def build_point_transformer(config: PointsTrainConfig, num_classes: int) -> DiT3DModel:
    kwargs = dict(config.model)
    name = kwargs.pop("config", None)
    window = bool(kwargs.pop("window", False))
    base = dit3d_config(name, window=window) if name else {}
    base.update(num_classes=num_classes)
    base.update(kwargs)
    model = DiT3DModel(**base)
    if config.init_from_2d:
        copied = init_from_dit2d(model, config.init_from_2d)
        print(f"initialised {len(copied)} block tensors from the 2D DiT {config.init_from_2d}")
    return model


def open_point_dataset(config: PointsTrainConfig, split: str = "train") -> Any:
    """The configured point-cloud dataset for ``split`` (procedural: train or test; shapenet: any)."""
    d = config.data
    if d.source == "procedural":
        from .data.shapes import CLASS_NAMES, ProceduralShapes

        return ProceduralShapes(
            classes=d.categories or CLASS_NAMES,
            shapes_per_class=d.shapes_per_class if split == "train" else d.heldout_per_class,
            num_points=d.num_points,
            split=split,
            seed=d.seed,
            resample_each_epoch=split == "train",
        )
    from .data.shapenet import ShapeNetPC15k

    return ShapeNetPC15k(d.root, d.categories or ["chair"], split=split, num_points=d.num_points, seed=d.seed)


def dataset_statistics(dataset: Any) -> tuple[list[float], float, float]:
    """The global normalisation of a training set, (mean, std), and the largest normalised |coordinate|.

    A ShapeNet reader has measured them in its statistics pass; procedural shapes are measured here.
    """
    if hasattr(dataset, "train_statistics") and hasattr(dataset, "std"):
        mean, std = np.asarray(dataset.mean, dtype=np.float64).reshape(3), float(dataset.std)
        max_abs = getattr(dataset, "max_abs", None)
        bound = (max_abs + float(np.abs(mean).max())) / std if max_abs is not None else float("inf")
        return [float(v) for v in mean], std, bound
    from .data.shapes import global_stats

    raw = dataset.all_raw_points()
    mean, std = global_stats(raw)
    bound = float(np.abs((raw - mean) / std).max())
    return [float(v) for v in mean], float(std), bound


def collate_points(items: list[dict]) -> dict[str, torch.Tensor]:
    return {
        "points": torch.stack([it["points"] for it in items]),
        "label": torch.tensor([int(it["label"]) for it in items], dtype=torch.long),
    }


class PointTrainer(Trainer):
    """``Trainer`` for DiT-3D: same loop, checkpoints and resume; point datasets and the point-cloud pipeline."""

    def __init__(self, config: PointsTrainConfig):
        self.config = config
        self.out = Path(config.output_dir)
        opt = config.optim
        self.setup_run()
        self.noise = point_noise_scheduler(config)
        self.tokenizer = self.text_encoder = None
        self.train_text = False
        names = list(self.dataset.class_names)
        self.id2label = {str(i): n for i, n in enumerate(names)}
        self.transformer = build_point_transformer(config, len(names))
        if opt.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        params = list(self.transformer.parameters())
        self.ema_params = params
        self.ema = EMAModel(params, decay=opt.ema_decay, use_ema_warmup=opt.ema_warmup)
        self.optimizer = torch.optim.AdamW(
            params, lr=opt.learning_rate, weight_decay=opt.weight_decay, betas=tuple(opt.betas)
        )
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup", self.optimizer, num_warmup_steps=opt.warmup_steps * self.accelerator.num_processes
        )
        self.transformer, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.transformer, self.optimizer, self.lr_scheduler
        )
        self.accelerator.register_for_checkpointing(self.ema)
        self.models = [self.transformer]
        self.global_step = 0

    def setup_run(self) -> None:
        config, opt = self.config, self.config.optim
        self.accelerator = Accelerator(
            gradient_accumulation_steps=opt.gradient_accumulation_steps,
            mixed_precision=opt.mixed_precision,
            log_with="tensorboard" if config.tensorboard else None,
            project_dir=str(self.out),
        )
        set_seed(config.seed, device_specific=True)
        self.dataset = open_point_dataset(config, "train")
        self.data_mean, self.data_std, self.data_bound = dataset_statistics(self.dataset)
        self.dataset.set_normalization(self.data_mean, self.data_std)
        # One "bucket": a plain shuffled batch sampler whose order is a function of (seed, epoch).
        self.sampler = AspectRatioBucketSampler(
            [(1, 1)] * len(self.dataset),
            opt.batch_size,
            buckets=[(1, 1)],
            shuffle=True,
            drop_last=True,
            seed=config.seed,
            num_replicas=self.accelerator.num_processes,
            rank=self.accelerator.process_index,
        )
        if len(self.sampler) == 0:
            raise ValueError(
                f"{len(self.dataset)} shapes make no full batch of {opt.batch_size} per process; "
                "lower optim.batch_size."
            )

    def batches_for(self, epoch: int, skip: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)
        batches = list(self.sampler)[skip:]
        return DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=collate_points,
            num_workers=self.config.data.num_workers,
            generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch),
        )

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """x0 of a batch: the normalised points as (B, 3, N)."""
        return batch["points"].to(self.accelerator.device).transpose(1, 2).contiguous()

    def predict(self, xt: torch.Tensor, t: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.transformer(xt, t, batch["label"].to(self.accelerator.device)).sample

    def _ema_pipeline(self) -> Any:
        import copy

        from pipelines.point_cloud import PointCloudPipeline

        transformer = copy.deepcopy(self.accelerator.unwrap_model(self.transformer)).float().eval()
        self.ema.copy_to(list(transformer.parameters()))
        pipe = PointCloudPipeline(
            transformer=transformer,
            scheduler=self.sampling_scheduler(),
            id2label=self.id2label,
            data_mean=self.data_mean,
            data_std=self.data_std,
            num_points=self.config.data.num_points,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def sampling_scheduler(self) -> DDPMScheduler:
        """Ancestral DDPM, as DiT-3D samples: deterministic solvers (DDIM, DPM-Solver) pull an undertrained point
        model's clouds into blobs (docs/dit3d.md). x0 is clipped to 1.1x the data's range (``sample_clip``)."""
        clip = self.config.sample_clip and np.isfinite(self.data_bound)
        return DDPMScheduler.from_config(
            self.noise.config,
            clip_sample=bool(clip),
            clip_sample_range=round(1.1 * self.data_bound, 3) if clip else 1.0,
        )

    def validate(self) -> None:
        if not self.accelerator.is_main_process:
            return
        path = save_point_validation(self._ema_pipeline(), self.config, self.global_step)
        self.accelerator.print(f"validation clouds: {path}")
        for model in self.models:
            model.train()


def save_point_validation(pipe: Any, config: PointsTrainConfig, step: int) -> Path:
    """Sample the validation classes with fixed seeds; write a PNG grid (rows = classes) and the PLYs."""
    from pipelines.writers3d import render_png, write_ply

    from .validation import image_grid

    v = config.validation
    classes = [c for c in v.classes if c < pipe.num_classes] or [0]
    out = pipe(
        classes,
        num_clouds_per_label=v.clouds_per_class,
        num_inference_steps=v.steps,
        guidance_scale=v.guidance_scale,
        seed=v.seed,
    )
    folder = Path(config.output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    for i, (pts, label) in enumerate(zip(out.points, out.class_labels)):
        write_ply(folder / f"step-{step:07d}-{i:02d}-{pipe.class_name(label) or label}.ply", pts)
    grid = image_grid([render_png(p, 160) for p in out.points], columns=v.clouds_per_class)
    path = folder / f"step-{step:07d}.png"
    grid.save(path)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (training/configs/*dit3d*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. optim.max_steps=50")
    parser.add_argument(
        "--resume", default="auto", help="'auto' (newest checkpoint in output_dir), 'none', or a checkpoint path"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_points_config(args.config, args.set)
        trainer = PointTrainer(config)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.train(resume=args.resume)
    return end_cli_process(0)


if __name__ == "__main__":
    sys.exit(main())
