"""Video generation with VDT: one pipeline for every task of the unified spatial-temporal mask.

``VideoPipeline(task=..., video=frames)`` places the given frames (or parts of frames) on the latent grid,
builds the task's mask (``dit.video_masks.task_mask``), and runs the shared sampler loop with the clean given
latents re-imposed at every step (``sample(known_latents=..., known_mask=...)``), which is VDT's sampler. The
given frames come back unchanged in the output (pixel-space models: exactly; VAE models: the input pixels are
pasted back over frames that were entirely given).

Where the given frames go, per task (``video`` is a list of frames, e.g. from ``pipelines.video_io.read_video``):

==============  =============================================================================================
unconditional   nothing is given; ``video`` is ignored
predict         the **last** ``num_given`` frames of ``video`` become the first frames: "continue this clip"
backward        the **first** ``num_given`` frames of ``video`` become the last frames: "what came before"
interpolate     keyframes at 0, s, 2s, ...: ``video`` is either those keyframes, or a full-length clip whose
                every s-th frame is kept
animate         ``video[0]`` (one image) at ``frame_index``
complete        ``video`` holds all frames; ``region`` (an ``(H, W)`` bool map, pixels or latents) is generated
                in every frame, the rest is given (default: a centred box of half the area)
custom          ``video`` holds all frames and ``mask`` (``(T, H, W)`` latent grid) says what is generated
==============  =============================================================================================
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

import dit.models.vdt  # noqa: F401  (diffusers loads model_index components only from imported modules)
from dit.video_masks import TASKS, default_num_given, default_stride, given_frames, task_mask

from .base import DiTStudioPipeline, check_count, check_size, check_steps, make_generators, resolves_device_once
from .errors import InputError
from .records import build_records

MAX_FRAMES = 256

#: What each task needs from the caller, for messages and the UI.
TASK_HELP: dict[str, str] = {
    "unconditional": "generate a clip from nothing",
    "predict": "predict the next frames (the clip's last frames are given)",
    "backward": "predict the frames before (the clip's first frames are given)",
    "interpolate": "fill in between keyframes (every s-th frame is given)",
    "animate": "animate one image (it becomes one frame of the clip)",
    "complete": "complete a region of every frame (the rest is given)",
    "custom": "any mask: True where latents are generated",
}


def aligned_video(task: str, clip: Sequence[Any], num_given: int | None = None, frame_index: int = 0) -> Sequence[Any]:
    """What to pass as ``video`` so that output frame ``i`` stands for ``clip[i]`` (evaluation, validation strips).

    The placement rules read a user's clip as context ("continue this clip" takes its *last* frames), so handing a
    full reference clip to ``predict`` would ask for the frames after it. Prediction gets the reference's first
    ``num_given`` frames, backward prediction its last ones, animation the frame at ``frame_index``.
    """
    t = len(clip)
    if task == "predict":
        return clip[: default_num_given(t) if num_given is None else num_given]
    if task == "backward":
        return clip[t - (default_num_given(t) if num_given is None else num_given) :]
    if task == "animate":
        return [clip[frame_index % t]]
    return clip


@dataclass
class VideoGenerationOutput(BaseOutput):
    """Generated clips plus what reproduces them.

    ``frames[i]`` is clip ``i``: a list of PIL images (``output_type="pil"``), or arrays ``(B, T, H, W, 3)``
    (``"np"``), tensors ``(B, T, 3, H, W)`` in [0, 1] (``"pt"``), or latents ``(B, C, T, h, w)``. ``mask`` is the
    task's ``(T, h, w)`` latent-grid mask (True = generated); ``given`` lists the frames given entirely.
    """

    frames: list[list[PIL.Image.Image]] | np.ndarray | torch.Tensor
    seeds: list[int] | None = None
    records: list[Any] = field(default_factory=list)
    interrupted: bool = False
    mask: torch.Tensor | None = None
    given: list[int] = field(default_factory=list)
    fps: float = 8.0


def _frames_to_tensor(video: Any) -> torch.Tensor:
    """Frames as a ``(T, 3, H, W)`` float tensor in [0, 1] (PIL list, uint8/float array, or tensor)."""
    if isinstance(video, PIL.Image.Image):
        video = [video]
    if isinstance(video, (list, tuple)):
        if not video:
            raise InputError("video is empty; give at least one frame.")
        if all(isinstance(f, PIL.Image.Image) for f in video):
            sizes = {f.size for f in video}
            if len(sizes) > 1:
                raise InputError(f"the given frames have different sizes {sorted(sizes)[:3]}; give frames of one size.")
            arr = np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in video])
            return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        video = np.stack([np.asarray(f) for f in video])
    if isinstance(video, np.ndarray):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise InputError(f"a video array must be (frames, height, width, 3), got shape {video.shape}.")
        t = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2)
        return t.float() / 255.0 if video.dtype == np.uint8 else t.float()
    if torch.is_tensor(video):
        if video.dim() != 4 or video.shape[1] != 3:
            raise InputError(f"a video tensor must be (frames, 3, height, width) in [0, 1], got {tuple(video.shape)}.")
        return video.detach().float().cpu()
    raise InputError(f"video must be a list of PIL images, an array or a tensor, got {type(video).__name__}.")


def _fit(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre-crop to the target aspect ratio, then resize (antialiased); untouched when the size already fits."""
    h, w = frames.shape[-2:]
    if (h, w) == (height, width):
        return frames
    target = width / height
    if w / h > target:  # too wide
        cw = max(1, round(h * target))
        frames = frames[..., :, (w - cw) // 2 : (w - cw) // 2 + cw]
    elif w / h < target:
        ch = max(1, round(w / target))
        frames = frames[..., (h - ch) // 2 : (h - ch) // 2 + ch, :]
    out = torch.nn.functional.interpolate(frames, size=(height, width), mode="bicubic", antialias=True)
    return out.clamp(0, 1)


class VideoPipeline(DiTStudioPipeline):
    """VDT video generation for every unified-mask task (see the module docstring for frame placement)."""

    kind = "video"
    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(self, transformer: Any, scheduler: Any, vae: Any = None, fps: float = 8.0):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(fps=float(fps))

    @property
    def num_frames(self) -> int:
        return int(self.transformer.config.num_frames)

    # ---- condition ------------------------------------------------------------------------------------
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """``(T, 3, H, W)`` in [0, 1] -> latents ``(C, T, h, w)`` (pixels in [-1, 1] without a VAE)."""
        x = (frames * 2 - 1).to(self._execution_device)
        vae = getattr(self, "vae", None)
        if vae is not None:
            dist = vae.encode(x.to(vae.dtype)).latent_dist
            x = dist.mode() * vae.config.scaling_factor
        return x.to(self.transformer.dtype).transpose(0, 1)

    def place_frames(
        self,
        task: str,
        frames: torch.Tensor | None,
        num_frames: int,
        num_given: int | None,
        stride: int | None,
        frame_index: int,
    ) -> dict[int, torch.Tensor]:
        """Output position -> given frame, following the task's placement rule."""
        t = num_frames
        if task == "unconditional":
            return {}
        if frames is None:
            raise InputError(f"task {task!r} needs given frames: pass video (a clip, frames or an image).")
        n = frames.shape[0]
        if task == "predict":
            k = default_num_given(t) if num_given is None else num_given
            if n < k:
                raise InputError(f"predict with num_given={k} needs at least {k} frames; the video has {n}.")
            return {i: frames[n - k + i] for i in range(k)}
        if task == "backward":
            k = default_num_given(t) if num_given is None else num_given
            if n < k:
                raise InputError(f"backward with num_given={k} needs at least {k} frames; the video has {n}.")
            return {t - k + i: frames[i] for i in range(k)}
        if task == "interpolate":
            s = default_stride(t) if stride is None else stride
            positions = list(range(0, t, s))
            if n >= t:
                keys = frames[:t][::s]
            elif n >= len(positions):
                keys = frames[: len(positions)]
            else:
                raise InputError(
                    f"interpolate with stride {s} over {t} frames needs {len(positions)} keyframes (for frames "
                    f"{positions}) or a full {t}-frame clip; the video has {n}."
                )
            return dict(zip(positions, keys))
        if task == "animate":
            return {frame_index % t: frames[0]}
        if task in ("complete", "custom"):
            if n < t:
                raise InputError(f"{task} needs all {t} frames (it generates part of each); the video has {n}.")
            return {i: frames[i] for i in range(t)}
        raise InputError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}.")

    def _check_task_args(
        self, task: str, num_frames: int, num_given: int | None, stride: int | None, frame_index: int
    ) -> None:
        if task not in TASKS:
            raise InputError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}.")
        for name, value in (("num_given", num_given), ("stride", stride)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
                raise InputError(f"{name} must be an integer, got {value!r}.")
        if isinstance(frame_index, bool) or not isinstance(frame_index, (int, np.integer)):
            raise InputError(f"frame_index must be an integer, got {frame_index!r}.")
        if task in ("predict", "backward") and num_given is not None and not 1 <= num_given < num_frames:
            raise InputError(f"num_given must be between 1 and {num_frames - 1} for {num_frames} frames.")
        if task == "interpolate" and stride is not None and not 2 <= stride < num_frames:
            raise InputError(f"stride must be between 2 and {num_frames - 1} for {num_frames} frames.")
        if task == "animate" and not 0 <= frame_index < num_frames:
            raise InputError(f"frame_index must be between 0 and {num_frames - 1}.")

    # ---- call -----------------------------------------------------------------------------------------
    @torch.no_grad()
    @resolves_device_once
    def __call__(
        self,
        task: str = "predict",
        video: Any = None,
        num_frames: int | None = None,
        num_given: int | None = None,
        stride: int | None = None,
        frame_index: int = 0,
        region: torch.Tensor | np.ndarray | None = None,
        mask: torch.Tensor | None = None,
        num_inference_steps: int = 25,
        height: int | None = None,
        width: int | None = None,
        num_videos: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | list[int] | None = None,
        scheduler: str | None = None,
        eta: float = 0.0,
        fps: float | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        timesteps: list[int] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> VideoGenerationOutput | tuple:
        """Generate ``num_videos`` clips for ``task`` from the given ``video`` frames.

        Seeds work as in the image pipelines: clip ``i`` uses ``seed + i`` on a CPU generator, so any clip can
        be regenerated alone.
        """
        t = self.num_frames if num_frames is None else num_frames
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 2 <= t <= MAX_FRAMES:
            raise InputError(f"num_frames must be an integer between 2 and {MAX_FRAMES}, got {num_frames!r}.")
        t = int(t)
        self._check_task_args(task, t, num_given, stride, frame_index)
        steps = check_steps(num_inference_steps)
        count = check_count(num_videos, "num_videos")
        sched = self.resolve_scheduler(scheduler)
        height = self.default_size() if height is None else height
        width = self.default_size() if width is None else width
        check_size(height, width, self.vae_scale_factor * self.patch_size)
        fps = float(self.config.get("fps", 8.0) if fps is None else fps)
        if not 0 < fps <= 120:
            raise InputError(f"fps must be between 0 and 120, got {fps}.")

        frames = None
        if video is not None and task != "unconditional":
            frames = _fit(_frames_to_tensor(video), height, width)
        placed = self.place_frames(task, frames, t, num_given, stride, frame_index)
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        if task in ("complete", "custom"):
            try:
                m = task_mask(task, t, h, w, region=region, mask=mask)
            except ValueError as e:
                raise InputError(str(e)) from None
        else:
            m = torch.ones(t, h, w, dtype=torch.bool)
            for i in placed:
                m[i] = False
        if not m.any():
            raise InputError("the mask gives every latent; there is nothing to generate.")

        device = self._execution_device
        known = torch.zeros(self.latent_channels, t, h, w, dtype=self.transformer.dtype, device=device)
        if placed:
            order = sorted(placed)
            enc = self.encode_frames(torch.stack([placed[i] for i in order]))
            known[:, order] = enc
        seeds = None
        if generator is None:
            generator, seeds = make_generators(seed, count)
        shape = (count, self.latent_channels, t, h, w)
        latents = self.prepare_latents(shape, generator, sched, self.transformer.dtype, latents)
        known_b = known[None].expand(count, -1, -1, -1, -1)
        mask_b = m.to(device)[None, None]

        def predict(x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            return self.transformer(x, timestep=timestep, attention_kwargs=attention_kwargs, return_dict=False)[0]

        latents, interrupted = self.sample(
            latents,
            predict,
            sched,
            steps,
            1.0,
            generator=generator,
            eta=eta,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs or ["latents"],
            timesteps=timesteps,
            known_latents=known_b,
            known_mask=mask_b,
        )
        given = given_frames(m)
        if output_type == "latent":
            out_frames: Any = latents
        else:
            paste = {i: placed[i] for i in given if i in placed} if self.vae is not None else {}
            out_frames = self.decode_video(latents, output_type, paste)
        self.maybe_free_model_hooks()
        extra: dict[str, Any] = {"task": task, "num_frames": t, "fps": fps}
        if task in ("predict", "backward"):
            extra["num_given"] = default_num_given(t) if num_given is None else int(num_given)
        if task == "interpolate":
            extra["stride"] = default_stride(t) if stride is None else int(stride)
        if task == "animate":
            extra["frame_index"] = int(frame_index)
        extra["_given_frames"] = given
        if frames is not None and placed:
            digest = hashlib.sha256(torch.stack([placed[i] for i in sorted(placed)]).numpy().tobytes()).hexdigest()
            extra["_input_sha256"] = digest[:16]
        records = build_records(
            self,
            count=count,
            seeds=seeds,
            scheduler=sched,
            steps=steps,
            guidance_scale=1.0,
            height=height,
            width=width,
            extra=extra,
        )
        if not return_dict:
            return (out_frames,)
        return VideoGenerationOutput(
            frames=out_frames, seeds=seeds, records=records, interrupted=interrupted, mask=m, given=given, fps=fps
        )

    def decode_video(
        self, latents: torch.Tensor, output_type: str, paste: dict[int, torch.Tensor] | None = None
    ) -> list[list[PIL.Image.Image]] | np.ndarray | torch.Tensor:
        """``(B, C, T, h, w)`` latents -> frames; ``paste`` puts input pixels back over fully given frames."""
        if output_type not in ("pil", "np", "pt"):
            raise InputError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")
        b, c, t, h, w = latents.shape
        flat = latents.transpose(1, 2).reshape(b * t, c, h, w)
        images = torch.cat([self.decode(flat[i : i + 16]) for i in range(0, b * t, 16)])
        images = (images / 2 + 0.5).clamp(0, 1).float().cpu()
        images = images.reshape(b, t, *images.shape[1:])
        for i, frame in (paste or {}).items():
            images[:, i] = frame.to(images.dtype)
        if output_type == "pt":
            return images
        arr = images.permute(0, 1, 3, 4, 2).numpy()
        if output_type == "np":
            return arr
        return [self.numpy_to_pil(clip) for clip in arr]

    def save(
        self, output: VideoGenerationOutput, stem: str, formats: Sequence[str] = ("mp4", "gif"), scale: int = 0
    ) -> list[dict]:
        """Write each clip of ``output`` as ``<stem>-<i>.mp4/.gif/.json``; ``scale=0`` picks a display scale."""
        from .video_io import display_scale, save_video

        if not isinstance(output.frames, list):
            raise InputError("save() needs PIL frames: call the pipeline with output_type='pil' (the default).")
        written = []
        for i, (clip, record) in enumerate(zip(output.frames, output.records)):
            factor = scale or display_scale(clip[0].size)
            name = stem if len(output.frames) == 1 else f"{stem}-{i}"
            written.append(save_video(clip, name, record, output.fps, formats, factor))
        return written
