"""Train a control adapter for a text-to-image model on your own images: EasyControl (``control.easycontrol``,
the default), PixArt-δ's ControlNet-Transformer (``adapter.kind: controlnet``) or RelaCtrl (``adapter.kind: relactrl``).

    python -m training.train_control --config training/configs/control-canny.yaml
    python -m training.train_control --pipeline emoji-t2i --data my_images/ --preprocessor canny --output runs/canny
    accelerate launch -m training.train_control --config my.yaml --set optim.mixed_precision=bf16

Data: any folder ``training.data.datasets.open_image_folder`` reads, with captions. Either ``metadata.jsonl`` rows
carry ``conditioning_image_file_name`` (the control map of each image, as diffusers' ControlNet scripts and HF
``imagefolder`` expect), or the folder holds images only and ``control.preprocessor`` names the preprocessor that
turns each training image into its map on the fly (``control.preprocessors``; ``inpaint`` draws a random mask per
example). When both are present the conditioning images are used and the preprocessor is only recorded.

Only the adapter trains (EasyControl: rank/alpha LoRA on the condition tokens' q/k/v/out projections; ControlNet:
the copied blocks and zero projections; RelaCtrl: its control blocks; all fp32); the base model, its text encoder
and VAE stay frozen. ControlNet-Transformer and RelaCtrl see the control map at the training image's size (their
residuals are added token by token); ``relactrl.relevance`` reads the placement from a ``training.relevance``
report. The loop, accelerate, checkpoints (adapter + optimizer + RNG) and exact resume are
``training.lora.LoraTrainer``'s (which is ``training.train.Trainer``'s). Validation grids show, per example, the
control map next to the images generated from it. The result is ``OUTPUT/<control.name>.safetensors``: EasyControl:
PEFT keys, rank/alpha under ``lora_adapter_metadata``; the other kinds: their module keys and ``adapter_config``; and
the preprocessor, control size and base model (name, hash, class,
shapes) as metadata, ready for ``ControlTextToImagePipeline.register_control_adapter`` and the UI's Control tab.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.lora import LORA_WEIGHT_NAME

from .config import CheckpointConfig, ConfigError, ValidationConfig, load_dataclass_config
from .lora import LoraDataConfig, LoraOptimConfig, LoraTrainer
from .train import end_cli_process


# ---- configuration ----------------------------------------------------------------------------------------
@dataclass
class ControlLoraSection:
    rank: int = 8
    alpha: float = 8.0  # scale = alpha / rank (EasyControl: alpha = rank)
    init: str = "gaussian"  # down ~ N(0, 1/r) as EasyControl / PEFT "gaussian"; "default": Kaiming; up = 0


ADAPTER_KINDS = ("easycontrol", "controlnet", "relactrl")


@dataclass
class AdapterSection:
    kind: str = "easycontrol"  # easycontrol | controlnet (PixArt-δ ControlNet-Transformer) | relactrl


@dataclass
class ControlNetSection:
    num_blocks: int | None = None  # copies of the first N base blocks; None: half (PixArt-δ: 13 of 28)


@dataclass
class RelaCtrlSection:
    positions: list[int] = field(default_factory=list)  # base blocks the control blocks follow (or from relevance)
    groups: list[int] = field(default_factory=list)  # channel groups per block; empty: from relevance, else 2 each
    relevance: str | None = None  # a training.relevance JSON report: positions and groups from its scores
    num_blocks: int | None = None  # with relevance: how many of the most relevant positions (default: a third)
    heads: int = 4
    segments: int = 4
    seed: int = 0  # the fixed shuffles (recorded in the adapter)
    shuffle_training: str = "fixed"  # "random": fresh shuffles every forward while training (the official code)


@dataclass
class ControlSection:
    name: str = "control"  # adapter name and output file stem
    preprocessor: str | None = None  # images-only data: computed per image; else recorded only
    preprocessor_params: dict[str, Any] = field(default_factory=dict)
    control_size: int | None = None  # condition resolution in pixels; None: data.resolution
    holdout_fraction: float = 0.0  # leave out the images training.classifier.is_held_out assigns (for evaluation)
    position_bias: float = 1.0  # noise -> condition logit bias -beta*d^2 (control.easycontrol); 0: plain EasyControl


@dataclass
class ControlValidationConfig(ValidationConfig):
    every: int = 0
    prompts: list[str] = field(default_factory=list)  # empty: the captions of the validation examples
    images: list[str] = field(default_factory=list)  # source images; empty: the first examples of the data
    num_examples: int = 4
    images_per_prompt: int = 2
    strength: float = 1.0


@dataclass
class ControlTrainConfig:
    pipeline: str = ""  # base text-to-image model: catalog name, pipeline directory or hub id
    kind: str | None = None  # informational; the base must be a text-to-image (or control) pipeline
    output_dir: str = "runs/control"
    seed: int = 0
    adapter: AdapterSection = field(default_factory=AdapterSection)
    lora: ControlLoraSection = field(default_factory=ControlLoraSection)
    controlnet: ControlNetSection = field(default_factory=ControlNetSection)
    relactrl: RelaCtrlSection = field(default_factory=RelaCtrlSection)
    control: ControlSection = field(default_factory=ControlSection)
    data: LoraDataConfig = field(default_factory=LoraDataConfig)
    optim: LoraOptimConfig = field(default_factory=LoraOptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ControlValidationConfig = field(default_factory=ControlValidationConfig)
    log_every: int = 10
    tensorboard: bool = True

    def to_dict(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def load_control_config(
    path: str | Path | None = None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> ControlTrainConfig:
    """YAML file, then ``values`` (typed, e.g. from flags), then ``key=value`` overrides; checked strictly."""
    from control.preprocessors import PREPROCESSORS, unavailable_reason

    config = load_dataclass_config(ControlTrainConfig, path, overrides, values)
    if not config.pipeline:
        raise ConfigError("no base model: pass --pipeline (a catalog name, pipeline directory or hub id)")
    lc, cc = config.lora, config.control
    if not isinstance(lc.rank, int) or lc.rank < 1:
        raise ConfigError(f"lora.rank must be a positive integer, got {lc.rank!r}")
    if not isinstance(lc.alpha, (int, float)) or lc.alpha <= 0:
        raise ConfigError(f"lora.alpha must be a positive number, got {lc.alpha!r}")
    if lc.init not in ("gaussian", "default"):
        raise ConfigError(f"lora.init must be gaussian or default, got {lc.init!r}")
    if not isinstance(cc.name, str) or not cc.name or not all(ch.isalnum() or ch in "-_" for ch in cc.name):
        raise ConfigError(f"control.name must be letters, digits, '-' or '_', got {cc.name!r}")
    if cc.preprocessor is not None:
        if cc.preprocessor not in PREPROCESSORS:
            raise ConfigError(f"control.preprocessor {cc.preprocessor!r} is unknown; choose from {list(PREPROCESSORS)}")
        reason = unavailable_reason(cc.preprocessor)
        if reason:
            raise ConfigError(f"control.preprocessor {cc.preprocessor}: {reason}")
        allowed = set(PREPROCESSORS[cc.preprocessor].params)
        unknown = sorted(set(cc.preprocessor_params) - allowed)
        if unknown:
            raise ConfigError(f"control.preprocessor_params {unknown} are not parameters of {cc.preprocessor}")
    if not isinstance(cc.position_bias, (int, float)) or not 0 <= cc.position_bias < 1e4:
        raise ConfigError(f"control.position_bias must be a number >= 0, got {cc.position_bias!r}")
    if not isinstance(cc.preprocessor_params, dict):
        raise ConfigError("control.preprocessor_params must be a mapping")
    if config.data.categories:
        raise ConfigError("data.categories is not used by control training")
    if not isinstance(cc.holdout_fraction, (int, float)) or not 0 <= cc.holdout_fraction < 1:
        raise ConfigError(f"control.holdout_fraction must be in [0, 1), got {cc.holdout_fraction!r}")
    kind = config.adapter.kind
    if kind not in ADAPTER_KINDS:
        raise ConfigError(f"adapter.kind must be one of {', '.join(ADAPTER_KINDS)}, got {kind!r}")
    if kind != "easycontrol":
        if config.optim.gradient_checkpointing:
            raise ConfigError(f"adapter.kind {kind} runs in block hooks; set optim.gradient_checkpointing: false")
        if cc.control_size is not None and cc.control_size != config.data.resolution:
            raise ConfigError(
                f"adapter.kind {kind} adds the condition token by token, so control.control_size must be the image "
                f"size (data.resolution); leave it unset"
            )
    rc = config.relactrl
    if rc.shuffle_training not in ("fixed", "random"):
        raise ConfigError(f"relactrl.shuffle_training must be fixed or random, got {rc.shuffle_training!r}")
    if kind == "relactrl" and not rc.positions and not rc.relevance:
        raise ConfigError("adapter.kind relactrl needs relactrl.positions or relactrl.relevance (a relevance report)")
    if rc.groups and rc.positions and len(rc.groups) != len(rc.positions):
        raise ConfigError(f"relactrl.groups {rc.groups} must have one entry per position {rc.positions}")
    return config


def _base_name(pipeline: str) -> str:
    path = Path(pipeline).expanduser()
    if not path.exists():
        return pipeline  # a catalog name or hub id
    path = path.resolve()
    return path.parent.name if path.name == "pipeline" else path.name  # runs/<name>/pipeline -> <name>


def _to_pil(x: torch.Tensor) -> Image.Image:
    arr = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)


# ---- the trainer ------------------------------------------------------------------------------------------
class ControlTrainer(LoraTrainer):
    """``LoraTrainer`` whose trainable weights are one EasyControl adapter instead of a plain LoRA."""

    def __init__(self, config: ControlTrainConfig):
        from pipelines.text_to_image import TextToImagePipeline

        super().__init__(config)  # loads and freezes the base, calls _add_lora, builds the optimizer
        if not isinstance(self.pipe, TextToImagePipeline):
            raise ConfigError(f"{config.pipeline} is a {self.pipe.kind} model; control needs a text-to-image model")
        self.base_kind = config.kind
        config.kind = "text-to-image"  # the base's conditioning path (LoraTrainer.predict)
        multiple = self.pipe.vae_scale_factor * self.pipe.patch_size
        cc = config.control
        if cc.control_size is None or self.kind != "easycontrol":
            cc.control_size = int(config.data.resolution)
        if cc.control_size % multiple:
            raise ConfigError(f"control.control_size={cc.control_size} is not a multiple of {multiple} for this model")
        self.pre_params = dict(cc.preprocessor_params)
        if cc.preprocessor == "inpaint" and "mask" not in self.pre_params:
            self.pre_params["mask"] = "random"  # a new mask per example; "center" would teach a single hole
        has_maps = [r.conditioning_path is not None for r in self.dataset.records]
        if not all(has_maps) and cc.preprocessor is None:
            raise ConfigError(
                f"{sum(not m for m in has_maps)} images in {config.data.root} have no conditioning_image_file_name; "
                "add one per row of metadata.jsonl or set control.preprocessor (e.g. canny) to compute the maps"
            )
        recorded = {"preprocessor": cc.preprocessor or "none"}  # what validation (and the saved file) use
        if self.kind == "easycontrol":
            recorded.update(control_size=str(cc.control_size), position_bias=f"{float(cc.position_bias):g}")
            self.control.adapters[cc.name].metadata.update(recorded)
        else:
            self.control.info[cc.name].metadata.update(recorded)
        self.use_maps = all(has_maps)
        self._maps: dict[int, torch.Tensor] = {}
        from pipelines.control import ControlTextToImagePipeline

        self.control_pipe = ControlTextToImagePipeline.from_text_pipeline(self.pipe, control_size=cc.control_size)
        self.control_pipe.set_progress_bar_config(disable=True)
        self.examples = self._validation_examples()

    # ---- setup ------------------------------------------------------------------------------------------
    def setup_run(self) -> None:
        """``Trainer.setup_run``, then drop the held-out split (so evaluation sees maps the adapter never saw)."""
        super().setup_run()
        fraction = float(self.config.control.holdout_fraction or 0.0)
        if not fraction:
            return
        from training.data.datasets import AspectRatioBucketSampler

        from .classifier import is_held_out

        ds, opt, res = self.dataset, self.config.optim, self.config.data.resolution
        ds.records = [r for r in ds.records if not is_held_out(r.path.relative_to(ds.root).as_posix(), fraction)]
        if not ds.records:
            raise ConfigError(f"control.holdout_fraction={fraction} leaves no training images")
        self.sampler = AspectRatioBucketSampler(
            ds,
            opt.batch_size,
            base_resolution=res,
            multiple=self.config.data.bucket_multiple,
            buckets=None if self.config.data.bucketing else [(res, res)],
            shuffle=True,
            drop_last=True,
            seed=self.config.seed,
            num_replicas=self.accelerator.num_processes,
            rank=self.accelerator.process_index,
        )

    @property
    def kind(self) -> str:
        return self.config.adapter.kind

    def _add_lora(self, transformer: torch.nn.Module) -> Any:
        if self.kind != "easycontrol":
            return self._add_residual_adapter(transformer)
        from control.easycontrol import EasyControl

        lc, cc = self.config.lora, self.config.control
        self.control = EasyControl.attach(transformer)
        if cc.name in self.control.adapters:
            self.control.remove_adapter(cc.name)
        self.control.add_adapter(cc.name, lc.rank, lc.alpha, lc.init, dtype=torch.float32)
        for p in self.control.dead_parameters(cc.name):
            p.requires_grad_(False)
        return None

    def _add_residual_adapter(self, transformer: torch.nn.Module) -> None:
        """A ControlNet-Transformer (copies of the first N base blocks) or a RelaCtrl adapter, trainable in fp32."""
        from control.controlnet_transformer import BlockControl, ControlNetTransformer
        from control.relactrl import RelaCtrl

        name = self.config.control.name
        self.control = BlockControl.attach(transformer)
        self.control.remove_adapter(name)
        if self.kind == "controlnet":
            try:
                adapter: Any = ControlNetTransformer.from_transformer(transformer, self.config.controlnet.num_blocks)
            except ValueError as e:
                raise ConfigError(f"controlnet.num_blocks: {e}") from None
        else:
            positions, groups = relactrl_placement(self.config.relactrl, len(transformer.transformer_blocks))
            rc = self.config.relactrl
            try:
                adapter = RelaCtrl.from_transformer(
                    transformer, positions, groups, rc.heads, rc.segments, rc.seed, rc.shuffle_training
                )
            except ValueError as e:
                raise ConfigError(f"relactrl: {e}") from None
        adapter.to(device=next(transformer.parameters()).device, dtype=torch.float32).requires_grad_(True)
        self.control.add_adapter(name, adapter)
        return None

    def _fill_validation(self) -> None:
        """Prompts are filled with the validation examples in ``__init__`` (they need the preprocessor)."""

    def _validation_examples(self) -> list[tuple[str, Image.Image]]:
        v, cc = self.config.validation, self.config.control
        size = int(cc.control_size)
        out: list[tuple[str, Image.Image]] = []
        if v.images:
            from control.preprocessors import load_control_image

            prompts = list(v.prompts) or [""] * len(v.images)
            if len(prompts) != len(v.images):
                raise ConfigError(f"validation.prompts ({len(prompts)}) must match validation.images ({len(v.images)})")
            for prompt, path in zip(prompts, v.images):
                out.append((prompt, self.control_map(load_control_image(path), size, seed=len(out))))
            return out
        n = min(v.num_examples, len(self.dataset))
        for i in range(n):
            rec = self.dataset.records[i]
            if self.use_maps:
                from training.data.images import load_image

                cmap = load_image(rec.conditioning_path).resize((size, size), Image.Resampling.LANCZOS)
            else:
                cmap = self.control_map(_to_pil(self.dataset[i]["pixel_values"]), size, seed=i)
            prompt = v.prompts[i] if i < len(v.prompts) else (rec.text or "")
            out.append((prompt, cmap))
        return out

    # ---- one step ---------------------------------------------------------------------------------------
    def control_map(self, image: Image.Image, size: int | tuple[int, int], seed: int | None = None) -> Image.Image:
        """A training image -> its control map at the control size (resize first, as the pipeline does); a
        ``(height, width)`` size for the residual kinds."""
        from control.preprocessors import run_preprocessor

        wh = (size, size) if isinstance(size, int) else (int(size[1]), int(size[0]))
        if image.size != wh:
            image = image.resize(wh, Image.Resampling.LANCZOS)
        params = dict(self.pre_params)
        if self.config.control.preprocessor == "inpaint":
            params.setdefault("seed", seed)
        return run_preprocessor(self.config.control.preprocessor, image, **params)

    def condition_latents(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's control maps in the model's input space (pixels in [-1, 1], or scaled VAE latents).

        EasyControl: at the square control size; ControlNet-Transformer / RelaCtrl: at the batch's image size."""
        size = int(self.config.control.control_size)
        device = self.accelerator.device
        hw = (size, size) if self.kind == "easycontrol" else tuple(batch["pixel_values"].shape[-2:])
        if self.use_maps:
            maps = batch["conditioning_pixel_values"].to(device)
            if tuple(maps.shape[-2:]) != hw:
                maps = F.interpolate(maps, size=hw, mode="bilinear", antialias=True, align_corners=False)
        else:
            tensors = []
            # Deterministic maps (all but inpaint's random masks) of unflipped images are computed once per image.
            cacheable = self.config.control.preprocessor != "inpaint" and not self.config.data.random_flip
            for x, index in zip(batch["pixel_values"], batch["index"].tolist()):
                if cacheable and index in self._maps:
                    tensors.append(self._maps[index])
                    continue
                # Random masks draw their seed from the saved torch RNG, so an exactly resumed run draws the same
                # masks; cached maps draw nothing (a resumed run starts with an empty cache).
                seed = None if cacheable else int(torch.randint(0, 2**31 - 1, ()).item())
                tensors.append(_to_tensor(self.control_map(_to_pil(x), size if hw == (size, size) else hw, seed)))
                if cacheable:
                    self._maps[index] = tensors[-1]
            maps = torch.stack(tensors).to(device)
        if self.vae is None:
            return maps
        with torch.no_grad():
            z = self.vae.encode(maps.to(self.vae.dtype)).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((z - shift) * self.vae.config.scaling_factor).float()

    def predict(self, xt: torch.Tensor, t: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        from control.easycontrol import Condition

        cond = self.condition_latents(batch).to(self.weight_dtype)
        if self.kind != "easycontrol":
            from control.controlnet_transformer import ResidualCondition

            self.control.set_conditions([ResidualCondition(cond, self.config.control.name, 1.0)])
            try:
                return super().predict(xt, t, batch)
            finally:
                self.control.clear_conditions()
        # Recomputed every step (no cache): the adapter changes and the batch's maps differ. The conditions stay set
        # until the next step, so a gradient-checkpointed backward still finds the conditions' K/V.
        cc = self.config.control
        self.control.set_conditions([Condition(cond, cc.name, 1.0, float(cc.position_bias))], use_cache=False)
        return super().predict(xt, t, batch)

    # ---- saving -----------------------------------------------------------------------------------------
    def lora_metadata(self) -> dict[str, str]:
        cc = self.config.control
        model = self.accelerator.unwrap_model(self.transformer)
        if self.kind != "easycontrol":
            return {
                "base_model": _base_name(self.config.pipeline),
                "base_model_hash": str(getattr(self.pipe, "model_hash", None) or ""),
                "kind": "control",
                "preprocessor": cc.preprocessor or "none",
                "preprocessor_params": json.dumps(cc.preprocessor_params, sort_keys=True, default=str),
                "conditioning": "conditioning_image_file_name" if self.use_maps else f"preprocessor:{cc.preprocessor}",
                "steps": str(self.global_step),
                "training_config": json.dumps(self.config.to_dict(), sort_keys=True, default=str),
                "software": "dit-studio training.train_control",
            }
        return {
            "base_model": _base_name(self.config.pipeline),
            "base_model_hash": str(getattr(self.pipe, "model_hash", None) or ""),
            "base_model_class": type(model).__name__,
            "kind": "control",
            "preprocessor": cc.preprocessor or "none",
            "preprocessor_params": json.dumps(cc.preprocessor_params, sort_keys=True, default=str),
            "control_size": str(cc.control_size),
            "position_bias": f"{float(cc.position_bias):g}",
            "conditioning": "conditioning_image_file_name" if self.use_maps else f"preprocessor:{cc.preprocessor}",
            "steps": str(self.global_step),
            "training_config": json.dumps(self.config.to_dict(), sort_keys=True, default=str),
            "software": "dit-studio training.train_control",
        }

    def write_lora(self, path: str | Path) -> Path:
        return self.control.save_adapter(self.config.control.name, path, self.lora_metadata())

    def _load_hook(self, models: list, input_dir: str) -> None:
        from control.easycontrol import PROJECTIONS, check_adapter_file
        from pipelines.lora import read_lora

        if self.kind != "easycontrol":
            from control.controlnet_transformer import read_residual_adapter
            from dit.convert.common import load_strict

            models.pop()
            file = read_residual_adapter(Path(input_dir) / LORA_WEIGHT_NAME)
            adapter = self.control.adapters[self.config.control.name]
            load_strict(adapter, {k: v.to(next(adapter.parameters()).dtype) for k, v in file.tensors.items()})
            return
        model = self.accelerator.unwrap_model(models.pop())
        lora = read_lora(Path(input_dir) / LORA_WEIGHT_NAME)
        found = check_adapter_file(lora, model)
        name = self.config.control.name
        with torch.no_grad():
            for (i, proj), (a, b) in found.items():
                layer = getattr(self.control.processors[i].adapters[name], PROJECTIONS[proj])
                layer.down.weight.copy_(a)
                layer.up.weight.copy_(b)

    def finish(self) -> Path | None:
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        path = self.write_lora(self.out / f"{self.config.control.name}.safetensors")
        acc.print(f"saved control adapter to {path}")
        return path

    def validate(self) -> None:
        from .validation import image_grid

        acc = self.accelerator
        if not acc.is_main_process or not self.examples:
            return
        model = acc.unwrap_model(self.transformer)
        model.eval()
        v = self.config.validation
        tiles: list[Image.Image] = []
        for prompt, cmap in self.examples:
            out = self.control_pipe(
                prompt,
                control_image=cmap,
                control_adapter=self.config.control.name,
                control_strength=v.strength,
                num_images_per_prompt=v.images_per_prompt,
                num_inference_steps=v.steps,
                guidance_scale=v.guidance_scale,
                seed=v.seed,
            )
            size = out.images[0].size
            tiles += [cmap.resize(size, Image.Resampling.NEAREST), *out.images]
        grid = image_grid(tiles, columns=1 + v.images_per_prompt)
        path = self.out / "validation" / f"step-{self.global_step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        if self.config.tensorboard:
            tracker = acc.get_tracker("tensorboard", unwrap=True)
            tracker.add_image("validation", np.asarray(grid), self.global_step, dataformats="HWC")
        acc.print(f"validation grid: {path}")
        model.train()


def relactrl_placement(rc: RelaCtrlSection, num_layers: int) -> tuple[list[int], list[int]]:
    """RelaCtrl positions and group counts: given explicitly, or from a ``training.relevance`` report's scores."""
    from control.relactrl import GROUP_TIERS, placement_from_scores

    if rc.positions:
        return list(rc.positions), list(rc.groups) or [GROUP_TIERS[0]] * len(rc.positions)
    path = Path(str(rc.relevance))
    if not path.is_file():
        raise ConfigError(f"relactrl.relevance: no relevance report at {path} (python -m training.relevance --out ...)")
    report = json.loads(path.read_text(encoding="utf-8"))
    scores = {int(row["position"]): float(row["crs"]) for row in report.get("blocks", [])}
    if not scores or max(scores) > num_layers - 2:
        raise ConfigError(f"relactrl.relevance: {path} has no scores for positions 0..{num_layers - 2} of this model")
    n = rc.num_blocks or max(1, round(len(scores) / 3))
    try:
        return placement_from_scores(scores, int(n))
    except ValueError as e:
        raise ConfigError(f"relactrl.num_blocks: {e}") from None


# ---- command line -----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config with the sections of ControlTrainConfig")
    parser.add_argument("--pipeline", help="base text-to-image model: catalog name, pipeline directory or hub id")
    parser.add_argument("--data", help="image folder (metadata.jsonl with conditioning_image_file_name, or images)")
    parser.add_argument("--output", help="output folder (adapter, checkpoints, losses.jsonl, validation grids)")
    parser.add_argument("--name", help="adapter name / output file stem (default: control)")
    parser.add_argument("--preprocessor", help="compute control maps with this preprocessor (e.g. canny, inpaint)")
    parser.add_argument("--control-size", type=int, help="condition resolution in pixels (default: data resolution)")
    parser.add_argument("--kind", choices=ADAPTER_KINDS, help="adapter kind (default easycontrol)")
    parser.add_argument("--rank", type=int, help="LoRA rank r (default 8)")
    parser.add_argument("--alpha", type=float, help="LoRA alpha; scale = alpha / rank (default 8)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 500)")
    parser.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    parser.add_argument("--batch-size", type=int, help="images per step and process (default 4)")
    parser.add_argument("--seed", type=int, help="seed of adapter init, data order, masks and noise (default 0)")
    parser.add_argument("--resolution", type=int, help="training image size (default: the model's)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. validation.every=100"
    )
    parser.add_argument(
        "--resume", default="auto", help="'auto' (newest checkpoint in the output), 'none', or a checkpoint path"
    )
    return parser.parse_args(argv)


_FLAGS = {
    "pipeline": "pipeline",
    "data": "data.root",
    "output": "output_dir",
    "name": "control.name",
    "preprocessor": "control.preprocessor",
    "control_size": "control.control_size",
    "kind": "adapter.kind",
    "rank": "lora.rank",
    "alpha": "lora.alpha",
    "steps": "optim.max_steps",
    "lr": "optim.learning_rate",
    "batch_size": "optim.batch_size",
    "seed": "seed",
    "resolution": "data.resolution",
}


def main(argv: list[str] | None = None) -> int:
    from pipelines.errors import InputError, ModelLoadError

    args = parse_args(argv)
    values = {key: getattr(args, flag) for flag, key in _FLAGS.items() if getattr(args, flag) is not None}
    try:
        config = load_control_config(args.config, args.set, values)
        trainer = ControlTrainer(config)
    except (ConfigError, ValueError, FileNotFoundError, NotADirectoryError, InputError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    trainer.train(resume=args.resume)
    return end_cli_process(0)


if __name__ == "__main__":
    sys.exit(main())
