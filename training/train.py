"""Train a text-to-image or class-conditional DiT under accelerate.

    accelerate launch -m training.train --config training/configs/emoji-t2i.yaml
    dit-train --config training/configs/emoji-dit.yaml --set optim.max_steps=100

Exact resume: the data order is a pure function of (seed, epoch), every process's RNG state is saved with
the checkpoint, and a resumed run skips the batches already consumed in the current epoch, so it reproduces
the loss sequence of an uninterrupted run (``losses.jsonl``; tested).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dit.td_norm import NO_DECAY_SUFFIXES

from .build import build_pipeline, build_text_encoder, build_transformer, noise_scheduler
from .checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import ConfigError, TrainConfig, load_config
from .data.datasets import AspectRatioBucketSampler, collate_image_batch, open_image_folder
from .validation import save_validation
from .zloss import collect_z_loss, install_z_loss


def use_cpu() -> bool:
    """Whether accelerate must run on the CPU (and form a gloo process group there).

    ``accelerate launch --cpu --num_processes N`` starts one process with accelerate 1.x; several CPU processes
    come from ``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N``, and only form a process
    group when the Accelerator is told it is on the CPU.
    """
    flag = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return flag or not torch.cuda.is_available()


def select_classes(dataset: Any, keep: list[int]) -> None:
    """Keep only examples whose label is in ``keep``, re-indexing labels 0..K-1 in ``keep`` order."""
    remap = {old: new for new, old in enumerate(keep)}
    dataset.records = [dataclasses.replace(r, label=remap[r.label]) for r in dataset.records if r.label in remap]
    if dataset.class_names:
        dataset.class_names = [dataset.class_names[i] for i in keep]
    if not dataset.records:
        raise ValueError(f"no examples left after data.categories={keep}")


def denoising_loss(
    noise_scheduler: Any, x0: torch.Tensor, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The DDPM training loss shared by full training and LoRA fine-tuning (``training.lora``).

    Draws noise and timesteps, calls ``predict(x_t, t)`` (which may draw more randomness, e.g. caption dropout,
    *after* the noise: the order is part of exact resume), and compares the prediction with the target of
    the scheduler's ``prediction_type``. Extra predicted channels (a learned-sigma half) are ignored. A prediction
    with a ``multi_scale_loss(target)`` method (multi-output backbones: ``dit.models.dimr.DiMROutput``) computes its
    own loss, each branch against the target down-sampled to its resolution.
    """
    noise = torch.randn_like(x0)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    xt = noise_scheduler.add_noise(x0, noise, t)
    pred = predict(xt, t)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(x0, noise, t)
    elif kind == "sample":
        target = x0
    else:
        raise ValueError(f"prediction_type {kind!r} is not trainable here; use epsilon, v_prediction or sample.")
    if hasattr(pred, "multi_scale_loss"):
        return pred.multi_scale_loss(target)
    return F.mse_loss(pred.float()[:, : target.shape[1]], target.float())


def open_dataset(config: TrainConfig) -> Any:
    dataset = open_image_folder(config.data.root, config.data.resolution, random_flip=config.data.random_flip)
    if config.kind == "class-to-image":
        if any(label is None for label in dataset.labels):
            raise ValueError(
                f"{config.data.root} has images without a class label; class-to-image training needs "
                "class sub-folders or a 'label' column in metadata.jsonl."
            )
        if config.data.categories:
            select_classes(dataset, list(config.data.categories))
    elif any(not t for t in dataset.texts):
        missing = sum(1 for t in dataset.texts if not t)
        raise ValueError(
            f"{missing} images in {config.data.root} have no caption; text-to-image training needs one each."
        )
    return dataset


class Trainer:
    """One training run: built from a config, resumable, writes a diffusers pipeline at the end."""

    def __init__(self, config: TrainConfig):
        self.config = config
        self.out = Path(config.output_dir)
        opt = config.optim
        self.setup_run()
        self.noise = noise_scheduler(config)
        self.tokenizer = self.text_encoder = None
        self.id2label = None
        if config.kind == "text-to-image":
            self.tokenizer, self.text_encoder = build_text_encoder(config, [t or "" for t in self.dataset.texts])
            self.transformer = build_transformer(config)
        else:
            num_classes = len(self.dataset.class_names or []) or (max(self.dataset.labels) + 1)
            names = self.dataset.class_names or [str(i) for i in range(num_classes)]
            self.id2label = {str(i): n for i, n in enumerate(names)}
            self.transformer = build_transformer(config, num_classes)
        if opt.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if opt.z_loss_weight > 0:
            self.z_loss_processors = install_z_loss(self.transformer)
        train_text = self.text_encoder is not None and config.text_encoder.train
        self.train_text = train_text
        self.text_max_length = config.text_encoder.max_length
        if self.text_encoder is not None and not train_text:
            self.text_encoder.requires_grad_(False)
        params = list(self.transformer.parameters()) + (list(self.text_encoder.parameters()) if train_text else [])
        self.ema_params = params
        self.ema = EMAModel(params, decay=opt.ema_decay, use_ema_warmup=opt.ema_warmup)
        # DiMR's time-dependent norms: their sigmoid's ``nodecay_*`` parameters get no weight decay (official).
        no_decay = {id(p) for n, p in self.transformer.named_parameters() if n.endswith(NO_DECAY_SUFFIXES)}
        groups: Any = params
        if no_decay:
            groups = [
                {"params": [p for p in params if id(p) not in no_decay]},
                {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0},
            ]
        self.optimizer = torch.optim.AdamW(
            groups, lr=opt.learning_rate, weight_decay=opt.weight_decay, betas=tuple(opt.betas)
        )
        self.lr_scheduler = get_scheduler(
            "constant_with_warmup",
            self.optimizer,
            num_warmup_steps=opt.warmup_steps * self.accelerator.num_processes,
        )
        models = [self.transformer] + ([self.text_encoder] if self.text_encoder is not None else [])
        prepared = self.accelerator.prepare(*models, self.optimizer, self.lr_scheduler)
        self.transformer = prepared[0]
        if self.text_encoder is not None:
            self.text_encoder = prepared[1]
        self.optimizer, self.lr_scheduler = prepared[-2], prepared[-1]
        self.accelerator.register_for_checkpointing(self.ema)
        self.models = models
        self.global_step = 0

    def setup_run(self) -> None:
        """Accelerator, seeds, dataset and the resumable batch sampler: what every training script shares."""
        config, opt = self.config, self.config.optim
        self.accelerator = Accelerator(
            cpu=use_cpu(),
            gradient_accumulation_steps=opt.gradient_accumulation_steps,
            mixed_precision=opt.mixed_precision,
            log_with="tensorboard" if config.tensorboard else None,
            project_dir=str(self.out),
        )
        self.accelerator.print(f"{self.accelerator.num_processes} process(es) on {self.accelerator.device}")
        set_seed(config.seed, device_specific=True)
        self.dataset = open_dataset(config)
        res = config.data.resolution
        self.sampler = AspectRatioBucketSampler(
            self.dataset,
            opt.batch_size,
            base_resolution=res,
            multiple=config.data.bucket_multiple,
            buckets=None if config.data.bucketing else [(res, res)],
            shuffle=True,
            drop_last=True,
            seed=config.seed,
            num_replicas=self.accelerator.num_processes,
            rank=self.accelerator.process_index,
        )
        if len(self.sampler) == 0:
            raise ValueError(
                f"{len(self.dataset)} images make no full batch of {opt.batch_size} per process; "
                "lower optim.batch_size."
            )

    # ---- one step -----------------------------------------------------------------------------------
    def encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        drop = torch.rand(len(texts)) < self.config.data.caption_dropout
        texts = ["" if d else t for t, d in zip(texts, drop.tolist())]
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            max_length=self.text_max_length,
            truncation=True,
            return_tensors="pt",
        )
        device = self.accelerator.device
        mask = tokens.attention_mask.to(device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_text):  # a frozen encoder needs no graph
            return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0], mask

    def latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """The clean sample x0 of a batch: the pixels themselves for our pixel-space models."""
        return batch["pixel_values"].to(self.accelerator.device)

    def predict(self, xt: torch.Tensor, t: torch.Tensor, batch: dict[str, Any]) -> Any:
        if self.config.kind == "text-to-image":
            emb, mask = self.encode_text(list(batch["text"]))
            out = self.transformer(xt, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=t)
        else:
            out = self.transformer(xt, t, batch["label"].to(self.accelerator.device))
        return out if hasattr(out, "multi_scale_loss") else out.sample  # multi-output models keep every branch

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        loss = denoising_loss(self.noise, self.latents(batch), lambda xt, t: self.predict(xt, t, batch))
        if getattr(self, "z_loss_processors", None):
            loss = loss + self.config.optim.z_loss_weight * collect_z_loss(self.z_loss_processors)
        return loss

    # ---- the run ------------------------------------------------------------------------------------
    def resume(self, resume: str | None) -> None:
        if resume in (None, "none"):
            return
        path = latest_checkpoint(self.out) if resume == "auto" else Path(resume)
        if path is None:
            return
        self.global_step = load_checkpoint(self.accelerator, path)
        self.accelerator.print(f"resumed from {path} at step {self.global_step}")

    def batches_for(self, epoch: int, skip: int) -> DataLoader:
        self.sampler.set_epoch(epoch)
        batches = list(self.sampler)[skip:]
        return DataLoader(
            self.dataset,
            batch_sampler=batches,
            collate_fn=collate_image_batch,
            num_workers=self.config.data.num_workers,
            # Its own generator: a DataLoader iterator otherwise draws its worker seed from the global RNG,
            # so a run resumed mid-epoch (one extra iterator) would shift the noise stream.
            generator=torch.Generator().manual_seed(self.config.seed * 100003 + epoch),
        )

    def train(self, resume: str | None = "auto") -> Path | None:
        cfg, acc = self.config, self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        acc.init_trackers("dit-studio")
        self.resume(resume)
        accum = cfg.optim.gradient_accumulation_steps
        per_epoch = len(self.sampler)
        consumed = self.global_step * accum
        epoch, skip = divmod(consumed, per_epoch)
        losses_path = self.out / "losses.jsonl"
        if acc.is_main_process and losses_path.exists():
            # Keep only the steps the restored state has seen: a run killed after its last checkpoint
            # logged steps that the resumed run will compute again.
            kept = [ln for ln in losses_path.read_text().splitlines() if json.loads(ln)["step"] <= self.global_step]
            losses_path.write_text("".join(ln + "\n" for ln in kept))
        progress = tqdm(
            total=cfg.optim.max_steps, initial=self.global_step, disable=not acc.is_local_main_process, desc="train"
        )
        for model in self.models:
            model.train()
        running: list[float] = []
        while self.global_step < cfg.optim.max_steps:
            for batch in self.batches_for(epoch, skip):
                with acc.accumulate(*self.models):
                    loss = self.loss(batch)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.optim.grad_clip:
                        acc.clip_grad_norm_(self.ema_params, cfg.optim.grad_clip)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                running.append(loss.detach().float())
                if not acc.sync_gradients:
                    continue
                self.global_step += 1
                if self.ema is not None:
                    self.ema.step(self.ema_params)
                step_loss = acc.gather(torch.stack(running).mean()[None]).mean().item()
                running = []
                if not math.isfinite(step_loss):
                    raise FloatingPointError(f"loss became {step_loss} at step {self.global_step}; lower the LR.")
                if acc.is_main_process:
                    with losses_path.open("a") as f:
                        f.write(json.dumps({"step": self.global_step, "loss": step_loss}) + "\n")
                if self.global_step % cfg.log_every == 0:
                    acc.log({"loss": step_loss, "lr": self.lr_scheduler.get_last_lr()[0]}, step=self.global_step)
                progress.update()
                progress.set_postfix(loss=f"{step_loss:.4f}")
                if cfg.checkpoint.every and self.global_step % cfg.checkpoint.every == 0:
                    save_checkpoint(acc, self.out, self.global_step, cfg.checkpoint.keep)
                if cfg.validation.every and self.global_step % cfg.validation.every == 0:
                    self.validate()
                if self.global_step >= cfg.optim.max_steps:
                    break
            epoch, skip = epoch + 1, 0
        progress.close()
        result = self.finish()
        acc.end_training()
        return result

    def finish(self) -> Path | None:
        """What a finished run writes (a full pipeline here; a LoRA file in ``training.lora``)."""
        return self.save_pipeline()

    def _ema_pipeline(self) -> Any:
        """A pipeline over unwrapped copies of the models carrying the EMA weights."""
        import copy

        acc = self.accelerator
        transformer = copy.deepcopy(acc.unwrap_model(self.transformer)).float().eval()
        encoder = copy.deepcopy(acc.unwrap_model(self.text_encoder)).float().eval() if self.text_encoder else None
        params = list(transformer.parameters())
        if encoder is not None and self.config.text_encoder.train:
            params += list(encoder.parameters())
        self.ema.copy_to(params)
        pipe = build_pipeline(self.config, transformer, self.tokenizer, encoder, self.id2label)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def validate(self) -> None:
        if not self.accelerator.is_main_process:
            return
        tracker = None
        if self.config.tensorboard:
            tracker = self.accelerator.get_tracker("tensorboard", unwrap=True)
        path = save_validation(self._ema_pipeline(), self.config, self.global_step, tracker)
        self.accelerator.print(f"validation grid: {path}")
        for model in self.models:
            model.train()

    def save_pipeline(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        pipe = self._ema_pipeline()
        target = self.out / "pipeline"
        tmp = self.out / "pipeline.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        acc.print(f"saved pipeline to {target}")
        return target


def end_cli_process(code: int = 0) -> int:
    """Return ``code``; in a multi-process launch, end the process here instead, once everything is written.

    A finished multi-process run can hang at interpreter exit: the DDP reducer holds the last reference to the
    gloo process group, whose destructor joins its worker threads while holding the GIL, and a worker that is still
    dropping the last collective's work (a barrier keeps the step's ``all_gather`` alive) needs the GIL to free its
    tensors. Seen once in CI as rank 1 stuck in ``~ProcessGroupGloo`` after rank 0 had exited. By the time a trainer
    returns, the pipeline or adapter is saved atomically, the loss log closed and the trackers finished
    (``end_training``), so nothing is lost by skipping the teardown.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (training/configs/*.yaml)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.max_steps=50"
    )
    parser.add_argument(
        "--resume", default="auto", help="'auto' (newest checkpoint in output_dir), 'none', or a checkpoint path"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        trainer = Trainer(config)
    except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.train(resume=args.resume)
    return end_cli_process(0)


if __name__ == "__main__":
    sys.exit(main())
