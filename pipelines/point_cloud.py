"""Class -> point cloud with DiT-3D: the shared sampler loop over (B, 3, N) points, then de-normalisation.

The model works in DiT-3D's globally normalised coordinates ((p - mean) / std over the training set); the
pipeline's config carries that mean and std, so ``points`` come out in the data's own units (ShapeNet: unit
bounding-box diagonal, y up) and can be written as PLY/GLB as they are (``pipelines.writers3d``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.utils import BaseOutput

# Imported so that ``model_index.json``'s ``["dit.models.dit3d", "DiT3DModel"]`` resolves: diffusers only
# loads components from modules that are already imported.
from dit.models.dit3d import DiT3DModel

from .base import DiTStudioPipeline, check_count, check_guidance, check_steps, make_generators, resolves_device_once
from .errors import InputError
from .records import build_records

MIN_POINTS = 16
MAX_POINTS = 100_000


@dataclass
class PointCloudOutput(BaseOutput):
    """Generated clouds and what reproduces each one.

    ``points``: (B, N, 3) float32 numpy array (``output_type="np"``), a torch tensor (``"pt"``), or the raw
    normalised model-space latents (B, 3, N) (``"latent"``). ``seeds[i]``/``records[i]`` belong to cloud i.
    """

    points: np.ndarray | torch.Tensor
    seeds: list[int] | None = None
    records: list[Any] = field(default_factory=list)
    interrupted: bool = False
    class_labels: list[int] = field(default_factory=list)


class PointCloudPipeline(DiTStudioPipeline):
    """Class label(s) -> DiT-3D sampling loop -> (B, N, 3) points.

    ``id2label`` maps ids to names (``"0": "chair"``), so labels can be names or ints. ``data_mean`` (3
    floats) and ``data_std`` (one float) undo the training normalisation. Defaults follow DiT-3D: no
    classifier-free guidance (``guidance_scale=1``), 2,048 points; a model trained with class dropout can be
    guided (``guidance_scale`` > 1) like any DiT. ``training.train_points`` saves DiT-3D's ancestral DDPM as the
    sampler (100 steps by default here, 1000 in the paper): deterministic solvers (``scheduler="ddim"`` or
    ``"dpm++2m"``) pull the clouds of a small, briefly trained model into blobs.
    """

    kind = "point-cloud"
    model_cpu_offload_seq = "transformer"

    def __init__(
        self,
        transformer: DiT3DModel,
        scheduler: Any,
        id2label: dict | None = None,
        data_mean: Sequence[float] | None = None,
        data_std: float | None = None,
        num_points: int = 2048,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        mean = [float(v) for v in (data_mean if data_mean is not None else (0.0, 0.0, 0.0))]
        if len(mean) != 3:
            raise ValueError(f"data_mean must have 3 values (x, y, z), got {mean}")
        std = float(data_std if data_std is not None else 1.0)
        if not std > 0:
            raise ValueError(f"data_std must be positive, got {std}")
        self.register_to_config(id2label=id2label, data_mean=mean, data_std=std, num_points=int(num_points))
        self.labels: dict[str, int] = {}
        for key, value in (id2label or {}).items():
            for name in str(value).split(","):
                if name.strip():
                    self.labels[name.strip()] = int(key)

    # ---- labels ------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_classes)

    def class_name(self, label: int) -> str | None:
        names = (self.config.id2label or {}).get(str(label)) or (self.config.id2label or {}).get(label)
        return str(names).split(",")[0].strip() if names else None

    def class_names(self) -> list[str]:
        """Names ordered by id (ids as strings where a class has no name)."""
        return [self.class_name(i) or str(i) for i in range(self.num_classes)]

    def get_label_ids(self, labels: str | int | Sequence[str | int]) -> list[int]:
        """Ids for labels given as ints, numeric strings or names; unknown names get close-match hints."""
        items = [labels] if isinstance(labels, (str, int, np.integer)) else list(labels)
        ids = []
        for item in items:
            if isinstance(item, bool):
                raise InputError(f"class label must be an int or a name, got {item!r}.")
            if isinstance(item, (int, np.integer)) or (isinstance(item, str) and item.strip().isdigit()):
                idx = int(item)
                if not 0 <= idx < self.num_classes:
                    raise InputError(f"class {idx} is out of range: this model has classes 0..{self.num_classes - 1}.")
                ids.append(idx)
                continue
            if not isinstance(item, str):
                raise InputError(f"class label must be an int or a name, got {item!r}.")
            if item.strip() in self.labels:
                ids.append(self.labels[item.strip()])
                continue
            hint = difflib.get_close_matches(item.strip(), list(self.labels), n=3)
            known = f" Did you mean: {', '.join(hint)}?" if hint else f" Classes: {', '.join(self.class_names())}."
            if not self.labels:
                known = f" This model has no class names; use an integer 0..{self.num_classes - 1}."
            raise InputError(f"unknown class {item!r}.{known}")
        if not ids:
            raise InputError("class_labels is empty; give at least one class.")
        return ids

    @staticmethod
    def check_points(num_points: Any) -> int:
        if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)):
            raise InputError(f"num_points must be an integer, got {num_points!r}.")
        if not MIN_POINTS <= int(num_points) <= MAX_POINTS:
            raise InputError(f"num_points must be between {MIN_POINTS} and {MAX_POINTS}, got {num_points}.")
        return int(num_points)

    # ---- normalisation -----------------------------------------------------------------------------
    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3, N) model-space points -> (B, N, 3) points in data units (``x * std + mean``)."""
        mean = torch.tensor(self.config.data_mean, dtype=torch.float32, device=latents.device)
        return latents.float().transpose(1, 2) * float(self.config.data_std) + mean

    def normalize(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) points in data units -> (B, 3, N) model space: the inverse of ``denormalize``."""
        mean = torch.tensor(self.config.data_mean, dtype=torch.float32, device=points.device)
        return ((points.float() - mean) / float(self.config.data_std)).transpose(1, 2)

    # ---- the call ----------------------------------------------------------------------------------
    @torch.no_grad()
    @resolves_device_once
    def __call__(
        self,
        class_labels: int | str | list[int | str],
        num_points: int | None = None,
        num_inference_steps: int = 100,
        guidance_scale: float = 1.0,
        num_clouds_per_label: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | list[int] | None = None,
        scheduler: str | None = None,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        timesteps: list[int] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> PointCloudOutput | tuple:
        """Generate ``num_clouds_per_label`` clouds of ``num_points`` points per class label.

        Seeds: with ``seed=s`` (or none: a random one), cloud i uses its own CPU generator seeded ``s + i``,
        so any single cloud can be regenerated alone from its record. ``latents`` (B, 3, N) replace the
        initial noise (in model space).
        """
        ids = self.get_label_ids(class_labels)
        steps = check_steps(num_inference_steps)
        guidance = check_guidance(guidance_scale)
        count = check_count(num_clouds_per_label, "num_clouds_per_label")
        n = self.check_points(self.config.num_points if num_points is None else num_points)
        if output_type not in ("np", "pt", "latent"):
            raise InputError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}.")
        sched = self.resolve_scheduler(scheduler)
        labels = [i for i in ids for _ in range(count)]
        total = len(labels)
        if latents is not None and tuple(latents.shape) != (total, 3, n):
            raise InputError(f"latents must have shape {(total, 3, n)} for {total} clouds of {n} points.")
        seeds = None
        if generator is None:
            generator, seeds = make_generators(seed, total)
        device = self._execution_device
        cond = torch.tensor(labels, device=device)
        do_cfg = guidance > 1.0
        label_input = torch.cat([torch.full_like(cond, self.num_classes), cond]) if do_cfg else cond
        latents = self.prepare_latents((total, 3, n), generator, sched, self.transformer.dtype, latents)

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.transformer(
                x, timestep=t, class_labels=label_input, attention_kwargs=attention_kwargs, return_dict=False
            )[0]

        latents, interrupted = self.sample(
            latents,
            predict,
            sched,
            steps,
            guidance,
            generator=generator,
            eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs or ["latents"],
            timesteps=timesteps,
        )
        if output_type == "latent":
            points: np.ndarray | torch.Tensor = latents
        else:
            points = self.denormalize(latents)
            if output_type == "np":
                points = points.cpu().numpy().astype(np.float32)
        self.maybe_free_model_hooks()
        r = int(self.transformer.config.sample_size)
        records = build_records(
            self,
            count=total,
            seeds=seeds,
            scheduler=sched,
            class_labels=labels,
            class_names=[self.class_name(i) for i in labels],
            steps=steps,
            guidance_scale=guidance,
            height=r,  # the voxel grid the model sees (r³); a point cloud has no pixel size
            width=r,
            extra={"num_points": n},
        )
        if not return_dict:
            return (points,)
        return PointCloudOutput(
            points=points, seeds=seeds, records=records, interrupted=interrupted, class_labels=labels
        )
