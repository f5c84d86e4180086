"""Train a VDT video model with unified spatial-temporal mask modelling, under accelerate.

    accelerate launch -m training.train_video --config training/configs/sprites-vdt.yaml
    python -m training.train_video --config training/configs/sprites-vdt.yaml --set optim.max_steps=100

The sibling of ``training.train`` for video: it reuses that trainer's loop (accumulation, EMA, atomic
checkpoints, exact resume, ``losses.jsonl``) and config sections (``noise``, ``optim``, ``checkpoint``), and
replaces the data, the model and the loss:

* data: the procedural moving-sprites set (``data.source: sprites``) or a folder of videos / frame folders
  (``data.source: folder``), see ``training.data.video``;
* model: ``dit.VDTModel`` (``model:`` holds its kwargs, or ``model.config: VDT-S/2`` for a named size);
* loss: VDT's. Each clip draws a mask from ``dit.video_masks.VideoMaskGenerator`` (the paper's mix, without the
  official generator's bugs); the model sees ``x0`` where given and ``x_t`` where generated; the epsilon MSE is
  taken where generated only. ``masks.loss: masked_mean`` (default) averages over generated elements, so each
  generated token weighs the same whatever the task; ``official`` averages over all elements as the original's
  ``mean_flat(err * mask)`` does (tasks with more given frames then weigh less).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader

from dit.models.vdt import VDTModel, vdt_config
from dit.video_masks import TEMPORAL_TYPES, VideoMaskGenerator, apply_mask
from pipelines.schedulers import make_scheduler, scheduler_names
from pipelines.video import aligned_video

from .build import noise_scheduler
from .config import CheckpointConfig, ConfigError, NoiseConfig, OptimConfig, load_dataclass_config
from .data.datasets import AspectRatioBucketSampler
from .data.video import MovingSpritesDataset, VideoFolderDataset, collate_video_batch
from .train import Trainer, end_cli_process
from .validation import image_grid


@dataclass
class VideoDataConfig:
    source: str = "sprites"  # sprites | folder
    root: str = "data/emoji"  # sprites: the emoji folder; folder: videos and/or frame folders
    resolution: int = 32
    num_frames: int = 8
    frame_stride: int = 1  # folder: keep every n-th frame
    num_clips: int = 20000  # sprites: clips per epoch
    max_sprites: int = 1
    sprite_size: list[int] = field(default_factory=lambda: [14, 18])
    motions: list[str] = field(default_factory=lambda: ["bounce", "rotate", "scale"])
    speed: list[float] = field(default_factory=lambda: [1.0, 2.5])
    num_workers: int = 0


@dataclass
class MaskConfig:
    spatial_prob: float = 0.2
    spatial_ratio: float = 0.5
    random_frame_prob: float = 0.8
    num_given: int | None = None  # predict/backward; None = num_frames // 2 (the paper: 8 of 16)
    stride: int | None = None  # interpolate; None = max(2, num_frames // 4) (the paper: 4 of 16)
    temporal_weights: list[float] | None = None  # over predict, backward, interpolate, unconditional, one_frame,
    # random_frames; None = uniform (the paper)
    per_sample: bool = True
    loss: str = "masked_mean"  # masked_mean | official


@dataclass
class VideoValidationConfig:
    every: int = 500
    tasks: list[str] = field(default_factory=lambda: ["predict", "interpolate", "unconditional"])
    num_clips: int = 2
    steps: int = 20
    seed: int = 0


@dataclass
class VideoTrainConfig:
    kind: str = "video"
    output_dir: str = "runs/train-video"
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)  # kwargs of dit.VDTModel; "config": "VDT-S/2" for a size
    data: VideoDataConfig = field(default_factory=VideoDataConfig)
    masks: MaskConfig = field(default_factory=MaskConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: VideoValidationConfig = field(default_factory=VideoValidationConfig)
    fps: float = 8.0
    sampler: str = "ddpm"  # the saved pipeline's scheduler (a pipelines.schedulers short name)
    log_every: int = 10
    tensorboard: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_video_config(path: str | Path | None = None, overrides: list[str] | None = None) -> VideoTrainConfig:
    """Read a YAML config and apply ``key.sub=value`` overrides; unknown keys fail with the valid ones."""
    config = load_dataclass_config(VideoTrainConfig, path, overrides)
    if config.kind != "video":
        raise ConfigError(f"kind must be 'video' for training.train_video, got {config.kind!r}")
    if config.data.source not in ("sprites", "folder"):
        raise ConfigError(f"data.source must be 'sprites' or 'folder', got {config.data.source!r}")
    if config.masks.loss not in ("masked_mean", "official"):
        raise ConfigError(f"masks.loss must be 'masked_mean' or 'official', got {config.masks.loss!r}")
    if config.masks.temporal_weights is not None and len(config.masks.temporal_weights) != len(TEMPORAL_TYPES):
        raise ConfigError(f"masks.temporal_weights needs {len(TEMPORAL_TYPES)} weights: {', '.join(TEMPORAL_TYPES)}")
    if getattr(config.optim, "z_loss_weight", 0):
        raise ConfigError("optim.z_loss_weight is not supported by training.train_video; leave it at 0")
    if config.sampler not in scheduler_names(config.noise.prediction_type):
        raise ConfigError(
            f"sampler {config.sampler!r} cannot sample a {config.noise.prediction_type!r} model; "
            f"choose one of: {', '.join(scheduler_names(config.noise.prediction_type))}"
        )
    return config


def build_video_transformer(config: VideoTrainConfig) -> VDTModel:
    """``VDTModel`` for the data's frames/resolution in pixel space (3 channels, no learned sigma)."""
    model = dict(config.model)
    kwargs: dict[str, Any] = vdt_config(model.pop("config")) if "config" in model else {}
    kwargs.update(
        sample_size=config.data.resolution, num_frames=config.data.num_frames, in_channels=3, learn_sigma=False
    )
    kwargs.update(model)
    if kwargs.get("learn_sigma"):
        raise ValueError("model.learn_sigma: true needs the hybrid MSE+VLB loss, which training/ does not implement")
    return VDTModel(**kwargs)


def video_sampling_scheduler(config: VideoTrainConfig) -> SchedulerMixin:
    """``config.sampler`` over the training schedule, clipping the predicted x0 to the data range [-1, 1] at every
    step (diffusers' ``thresholding`` with ``sample_max_value=1``), as VDT's sampler does (``clip_denoised=True``).
    Pixel-space models only: a latent model's range is not [-1, 1].

    The default is ancestral DDPM, VDT's own sampler. On the shipped x0-predicting default it beat DPM-Solver++(2M)
    at 25 steps on both tasks (prediction 17.84 vs 17.32 dB, interpolation 20.54 vs 20.02 dB, 32 held-out clips):
    the deterministic solver breaks the sprite into patch-sized pieces where the model is unsure.
    """
    base = noise_scheduler(config)  # type: ignore[arg-type]  # reads config.noise only
    return make_scheduler(config.sampler, {**base.config, "thresholding": True, "sample_max_value": 1.0})


def open_video_dataset(config: VideoTrainConfig, split: str = "train", seed: int | None = None) -> Any:
    d = config.data
    if d.source == "folder":
        return VideoFolderDataset(d.root, d.num_frames, d.resolution, d.frame_stride)
    return MovingSpritesDataset(
        d.root,
        num_clips=d.num_clips,
        num_frames=d.num_frames,
        resolution=d.resolution,
        sprite_size=tuple(d.sprite_size),
        max_sprites=d.max_sprites,
        motions=d.motions,
        speed=tuple(d.speed),
        split=split,
        seed=config.seed if seed is None else seed,
    )


def masked_denoising_loss(
    noise_scheduler: Any, model: Any, x0: torch.Tensor, masks: VideoMaskGenerator, reduction: str = "masked_mean"
) -> torch.Tensor:
    """VDT's training loss for ``(B, C, T, H, W)`` clips (see the module docstring).

    Randomness order (noise, timesteps, then masks) is fixed: exact resume depends on it.
    """
    noise = torch.randn_like(x0)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    xt = noise_scheduler.add_noise(x0, noise, t)
    mask = masks(x0.shape[0], device=x0.device)  # (B, T, H, W), True = generate
    pred = model(apply_mask(x0, xt, mask), t).sample
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, t)
    elif kind == "sample":
        target = x0
    else:
        raise ValueError(f"prediction_type {kind!r} is not trainable here; use epsilon, v_prediction or sample.")
    weight = mask[:, None].to(torch.float32)
    err = (pred.float()[:, : target.shape[1]] - target.float()) ** 2 * weight
    if reduction == "official":
        return err.mean()
    return err.sum() / (weight.sum() * target.shape[1]).clamp_min(1.0)


class VideoTrainer(Trainer):
    """``training.train.Trainer`` with video data, the VDT backbone and the masked loss."""

    def __init__(self, config: VideoTrainConfig):
        self.config = config
        self.out = Path(config.output_dir)
        opt = config.optim
        self.setup_run()
        self.noise = noise_scheduler(config)  # type: ignore[arg-type]  # reads config.noise only
        self.tokenizer = self.text_encoder = None
        self.id2label = None
        self.train_text = False
        self.transformer = build_video_transformer(config)
        patch = self.transformer.config.patch_size
        m = config.masks
        self.masks = VideoMaskGenerator(
            config.data.num_frames,
            config.data.resolution,
            config.data.resolution,
            granularity=patch,
            spatial_prob=m.spatial_prob,
            spatial_ratio=m.spatial_ratio,
            random_frame_prob=m.random_frame_prob,
            num_given=m.num_given,
            stride=m.stride,
            per_sample=m.per_sample,
            temporal_weights=m.temporal_weights,
        )
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
        self.dataset = open_video_dataset(config)
        res = config.data.resolution
        # All clips have one size: the bucket sampler with one bucket is a seeded, resumable, sharded shuffler.
        self.sampler = AspectRatioBucketSampler(
            [(res, res)] * len(self.dataset),
            opt.batch_size,
            buckets=[(res, res)],
            shuffle=True,
            drop_last=True,
            seed=config.seed,
            num_replicas=self.accelerator.num_processes,
            rank=self.accelerator.process_index,
        )
        if len(self.sampler) == 0:
            raise ValueError(
                f"{len(self.dataset)} clips make no full batch of {opt.batch_size} per process; lower optim.batch_size."
            )

    def batches_for(self, epoch: int, skip: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        return DataLoader(
            self.dataset,
            batch_sampler=list(self.sampler)[skip:],
            collate_fn=collate_video_batch,
            num_workers=self.config.data.num_workers,
            generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch),
        )

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        x0 = batch["pixel_values"].to(self.accelerator.device)
        return masked_denoising_loss(self.noise, self.transformer, x0, self.masks, self.config.masks.loss)

    def _ema_pipeline(self) -> Any:
        from pipelines.video import VideoPipeline

        transformer = copy.deepcopy(self.accelerator.unwrap_model(self.transformer)).float().eval()
        self.ema.copy_to(list(transformer.parameters()))
        pipe = VideoPipeline(
            transformer=transformer, scheduler=video_sampling_scheduler(self.config), fps=self.config.fps
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate(self) -> None:
        if not self.accelerator.is_main_process:
            return
        path = save_video_validation(self._ema_pipeline(), self.config, self.global_step)
        self.accelerator.print(f"validation strip: {path}")
        for model in self.models:
            model.train()


def save_video_validation(pipe: Any, config: VideoTrainConfig, step: int) -> Path:
    """One PNG per step: for each task, rows of held-out clips: reference frames above generated ones."""
    v = config.validation
    held_out = open_video_dataset(config, split="test", seed=config.seed + 10_000)
    rows = []
    for task in v.tasks:
        for i in range(min(v.num_clips, len(held_out))):
            ref = held_out.frames(i)
            out = pipe(task=task, video=aligned_video(task, ref), num_inference_steps=v.steps, seed=v.seed + i)
            rows += [*ref, *out.frames[0]]
    grid = image_grid(rows, columns=config.data.num_frames)
    path = Path(config.output_dir) / "validation" / f"step-{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (training/configs/*-vdt.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. optim.max_steps=50")
    parser.add_argument("--resume", default="auto", help="'auto', 'none', or a checkpoint path")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_video_config(args.config, args.set)
        trainer = VideoTrainer(config)
    except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.train(resume=args.resume)
    return end_cli_process(0)


if __name__ == "__main__":
    sys.exit(main())
