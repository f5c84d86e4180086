"""Evaluate a video model: PSNR/SSIM on prediction and interpolation of held-out clips, against baselines.

    python -m training.evaluate_video --model assets/models/sprites-vdt --clips 32
    python -m training.evaluate_video --model DIR --data-folder held_out_videos/ --i3d i3d_torchscript.pt

For every held-out clip and task the model is given what the task gives (prediction: the first ``num_given``
frames; interpolation: every ``stride``-th frame) and the *generated* frames are compared with the real ones:

* PSNR (dB, pixels in [0, 1]) and SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
  per channel, valid region), averaged over generated frames, then clips;
* baselines on the same frames: **copy-last-frame** (repeat the last given frame; for interpolation, hold the
  previous keyframe) and, for interpolation, **linear blending** of the neighbouring keyframes. A model worth
  shipping should beat copying on prediction;
* FVD (Frechet distance between I3D features of real and generated clips) only when the I3D TorchScript
  weights used by StyleGAN-V / fvd-comparison (``i3d_torchscript.pt``) exist locally (``--i3d PATH``,
  ``$DIT_STUDIO_I3D``, or ``~/.cache/dit-studio/i3d_torchscript.pt``); otherwise it is skipped with a message.
  With few, tiny clips FVD is noisy; it is for real data sets.

Held-out data: the sprites test split (emoji the training split never shows, clips drawn from another seed), or
``--data-folder`` (videos / frame folders, cut into clips as for training).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.schedulers import make_scheduler
from pipelines.video import aligned_video

I3D_DEFAULT = Path.home() / ".cache" / "dit-studio" / "i3d_torchscript.pt"


# ---------------------------------------------------------------------------------------------- metrics


def psnr(a: torch.Tensor, b: torch.Tensor, max_db: float = 100.0) -> torch.Tensor:
    """Per-frame PSNR of ``(..., 3, H, W)`` images in [0, 1]; identical frames get ``max_db``."""
    mse = (a.float() - b.float()).pow(2).flatten(-3).mean(-1)
    return torch.where(mse > 0, 10 * torch.log10(1.0 / mse.clamp_min(1e-20)), torch.full_like(mse, max_db)).clamp(
        max=max_db
    )


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).float()


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-frame SSIM of ``(..., C, H, W)`` images in [0, 1] (mean over channels and the valid region).

    Frames smaller than the window use a window of their own size (a 32 px frame keeps the 11 px window).
    """
    lead, (c, h, w) = a.shape[:-3], a.shape[-3:]
    x = a.reshape(-1, c, h, w).double()
    y = b.reshape(-1, c, h, w).double()
    size = min(window, h, w)
    k = _gaussian_window(size, sigma).double()[None, None].repeat(c, 1, 1, 1)
    c1, c2 = 0.01**2, 0.03**2

    def filt(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, k, groups=c)

    mx, my = filt(x), filt(y)
    sxx = filt(x * x) - mx * mx
    syy = filt(y * y) - my * my
    sxy = filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1).float().reshape(lead)


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^1/2)``; the trace of the root via the symmetric form
    ``sqrt(C1) C2 sqrt(C1)`` (same eigenvalues as ``C1 C2``), so no scipy is needed."""
    c1 = torch.as_tensor(cov1, dtype=torch.float64)
    c2 = torch.as_tensor(cov2, dtype=torch.float64)
    vals, vecs = torch.linalg.eigh(c1)
    root1 = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    middle = root1 @ c2 @ root1
    tr_root = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    diff = torch.as_tensor(mu1, dtype=torch.float64) - torch.as_tensor(mu2, dtype=torch.float64)
    return float(diff @ diff + torch.trace(c1) + torch.trace(c2) - 2 * tr_root)


# ---------------------------------------------------------------------------------------------- baselines


def copy_last_frame(clip: torch.Tensor, given: list[int]) -> torch.Tensor:
    """Every frame becomes the latest given frame at or before it (the first given one before any)."""
    out = clip.clone()
    for i in range(clip.shape[0]):
        before = [g for g in given if g <= i]
        out[i] = clip[before[-1] if before else given[0]]
    return out


def linear_blend(clip: torch.Tensor, given: list[int]) -> torch.Tensor:
    """Linear interpolation between the neighbouring given frames (held past the last one)."""
    out = copy_last_frame(clip, given)
    for lo, hi in zip(given, given[1:]):
        for i in range(lo + 1, hi):
            w = (i - lo) / (hi - lo)
            out[i] = (1 - w) * clip[lo] + w * clip[hi]
    return out


# ---------------------------------------------------------------------------------------------- FVD


def find_i3d(path: str | os.PathLike[str] | None) -> Path | None:
    for candidate in (path, os.environ.get("DIT_STUDIO_I3D"), I3D_DEFAULT):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def i3d_features(detector: Any, clips: torch.Tensor, batch: int = 8) -> np.ndarray:
    """I3D logits-layer features of ``(N, T, 3, H, W)`` clips in [0, 1], as fvd-comparison calls the detector:
    ``(N, 3, T, H, W)`` in [0, 255], ``rescale=True, resize=True, return_features=True``."""
    feats = []
    for i in range(0, clips.shape[0], batch):
        x = clips[i : i + batch].permute(0, 2, 1, 3, 4).float() * 255.0
        with torch.no_grad():
            feats.append(detector(x, rescale=True, resize=True, return_features=True).cpu().numpy())
    return np.concatenate(feats)


def compute_fvd(real: torch.Tensor, fake: torch.Tensor, i3d: Path) -> float:
    # TorchScript holds code as well as weights: load only an I3D file you obtained from a source you trust.
    detector = torch.jit.load(str(i3d), map_location="cpu").eval()
    fr, ff = i3d_features(detector, real), i3d_features(detector, fake)
    return frechet_distance(fr.mean(0), np.cov(fr, rowvar=False), ff.mean(0), np.cov(ff, rowvar=False))


# ---------------------------------------------------------------------------------------------- evaluation


def held_out_clips(pipe: Any, clips: int, data_folder: str | None, emoji_root: str, seed: int) -> list[list[Any]]:
    """Reference clips at the model's frame count and size."""
    from .data.video import MovingSpritesDataset, VideoFolderDataset

    t, size = pipe.num_frames, pipe.default_size()
    if data_folder:
        ds: Any = VideoFolderDataset(data_folder, t, size)
        return [ds.frames(i) for i in range(min(clips, len(ds)))]
    ds = MovingSpritesDataset(emoji_root, num_clips=clips, num_frames=t, resolution=size, split="test", seed=seed)
    return [ds.render(i) for i in range(clips)]


def _to_tensor(frames: list[Any]) -> torch.Tensor:
    arr = np.stack([np.asarray(f.convert("RGB"), dtype=np.float32) / 255.0 for f in frames])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)


def evaluate(
    pipe: Any,
    refs: list[list[Any]],
    tasks: tuple[str, ...] = ("predict", "interpolate"),
    steps: int = 25,
    seed: int = 0,
    num_given: int | None = None,
    stride: int | None = None,
    i3d: Path | None = None,
) -> dict[str, Any]:
    """Metrics per task for the model and the baselines (see the module docstring)."""
    report: dict[str, Any] = {"clips": len(refs), "frames": pipe.num_frames, "size": pipe.default_size(), "tasks": {}}
    for task in tasks:
        scores: dict[str, dict[str, list[float]]] = {}
        reals, fakes = [], []
        given: list[int] = []
        for i, ref in enumerate(refs):
            real = _to_tensor(ref)
            # Prediction gets only the reference's first frames: handed the whole clip, the pipeline would
            # continue from its *last* frames and generate frames after the reference ends.
            context = aligned_video(task, ref, num_given)
            out = pipe(
                task=task, video=context, num_given=num_given, stride=stride, num_inference_steps=steps, seed=seed + i
            )
            given = out.given
            got = _to_tensor([out.frames[0][j] for j in given])
            if got.shape[-2:] == real.shape[-2:] and not torch.allclose(got, real[given], atol=1.5 / 255):
                raise RuntimeError(
                    f"{task}: the output's given frames {given} differ from the reference's frames at those positions, "
                    "so the generated frames would be scored against frames the model was not asked for"
                )
            gen = [j for j in range(real.shape[0]) if j not in given]
            candidates = {"model": _to_tensor(out.frames[0]), "copy_last_frame": copy_last_frame(real, given)}
            if task == "interpolate":
                candidates["linear_blend"] = linear_blend(real, given)
            for name, clip in candidates.items():
                s = scores.setdefault(name, {"psnr": [], "ssim": []})
                s["psnr"].append(psnr(clip[gen], real[gen]).mean().item())
                s["ssim"].append(ssim(clip[gen], real[gen]).mean().item())
            reals.append(real)
            fakes.append(candidates["model"])
        entry: dict[str, Any] = {"given_frames": given}
        for name, s in scores.items():
            entry[name] = {k: float(np.mean(v)) for k, v in s.items()}
            entry[name]["psnr_std"] = float(np.std(s["psnr"]))
        if i3d is not None:
            entry["fvd"] = compute_fvd(torch.stack(reals), torch.stack(fakes), i3d)
        report["tasks"][task] = entry
    if i3d is None:
        report["fvd"] = (
            "skipped: no I3D weights found. Put the StyleGAN-V / fvd-comparison 'i3d_torchscript.pt' at "
            f"{I3D_DEFAULT} (or pass --i3d PATH / set DIT_STUDIO_I3D) to compute FVD."
        )
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['clips']} held-out clips of {report['frames']} frames at {report['size']} px"]
    for task, entry in report["tasks"].items():
        lines.append(f"{task} (given frames {entry['given_frames']}):")
        for name in ("model", "copy_last_frame", "linear_blend"):
            if name in entry:
                e = entry[name]
                lines.append(f"  {name:16s} PSNR {e['psnr']:6.2f} dB (±{e['psnr_std']:.2f})  SSIM {e['ssim']:.4f}")
        if "fvd" in entry:
            lines.append(f"  FVD {entry['fvd']:.2f}")
    if isinstance(report.get("fvd"), str):
        lines.append(f"FVD {report['fvd']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="video pipeline directory or catalog name")
    p.add_argument("--clips", type=int, default=32, help="held-out clips")
    p.add_argument("--steps", type=int, default=25, help="sampling steps")
    p.add_argument("--scheduler", default=None, help="sampler short name (default: the model's own), e.g. ddpm")
    p.add_argument("--tasks", nargs="+", default=["predict", "interpolate"], choices=["predict", "interpolate"])
    p.add_argument("--num-given", type=int, default=None, help="prediction: frames given (default T // 2)")
    p.add_argument("--stride", type=int, default=None, help="interpolation: every n-th frame given")
    p.add_argument("--data-folder", default=None, help="held-out videos / frame folders instead of sprites")
    p.add_argument("--emoji-root", default="data/emoji", help="emoji folder for the sprites test split")
    p.add_argument("--seed", type=int, default=10_000, help="seed of the held-out sprite clips")
    p.add_argument("--i3d", default=None, help="i3d_torchscript.pt for FVD")
    p.add_argument("--out", default=None, help="write the report as JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipelines.loading import load_pipeline

    pipe = load_pipeline(args.model)
    pipe.set_progress_bar_config(disable=True)
    if getattr(pipe, "kind", None) != "video":
        print(f"error: {args.model} is not a video model", file=sys.stderr)
        return 2
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    refs = held_out_clips(pipe, args.clips, args.data_folder, args.emoji_root, args.seed)
    i3d = find_i3d(args.i3d)
    report = evaluate(pipe, refs, tuple(args.tasks), args.steps, 0, args.num_given, args.stride, i3d)
    report["scheduler"] = type(pipe.scheduler).__name__
    print(format_report(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if all(math.isfinite(e["model"]["psnr"]) for e in report["tasks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
