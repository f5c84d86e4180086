"""Evaluate a control adapter: does the output follow the control map, and what does control cost?

    python -m training.evaluate_control --pipeline assets/models/emoji-t2i-control --adapter canny \\
        --data data/emoji --holdout-fraction 0.1 --num-images 64 --out runs/eval-canny.json --grid canny.png

1. **Control fidelity.** For each evaluation image the adapter's preprocessor (recorded in the adapter file) makes the
   control map; the pipeline generates from the image's caption and that map; the same preprocessor is applied to the
   output and compared with the input map: edge F1 with a 1-pixel tolerance for binary edge maps (canny, scribble),
   SSIM for every map (grey level; for ``inpaint`` the masked area is black in both, so the known-region PSNR against
   the source image is reported as well). The same prompts and seeds without control give the baseline the numbers
   must be read against (an uncontrolled image follows a random edge map only by chance).
2. **Quality.** The Fréchet distance between the generated images and the source images, in a small fixed feature
   space (:func:`image_features`: 8 x 8 RGB thumbnails; no network weights, so it runs anywhere; a coarse stand-in
   for FID that ranks runs at equal sample counts, the use ``training.relevance`` makes of it).
3. **Cost.** Extra parameters of the adapter (and as a fraction of the transformer), FLOPs of one transformer call
   with and without control (``torch.utils.flop_counter``, batch 1, the condition branch included; EasyControl with
   its cache filled), and latency per image: the base
   text-to-image call, control with the condition K/V cached (computed once per image), and control with the K/V
   recomputed at every step (what the cache saves; EasyControl only), each the median of ``--repeats`` timed calls
   after a warm-up. All three adapter kinds (EasyControl, ControlNet-Transformer, RelaCtrl) are measured the same way.

With ``--holdout-fraction f`` the images are drawn from the split ``training.classifier.is_held_out`` assigns to
held-out (train with ``control.holdout_fraction: f`` so the adapter never saw them). The report is printed and, with
``--out``, written as JSON; ``--grid`` saves rows of [map | with control | without control].
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

EDGE_PREPROCESSORS = ("canny", "scribble")


# ---- metrics ----------------------------------------------------------------------------------------------
def _gray(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("L"), dtype=np.float64)
    arr = np.asarray(image, dtype=np.float64)
    return arr if arr.ndim == 2 else arr[..., :3].mean(-1)


def edge_f1(pred: Image.Image | np.ndarray, target: Image.Image | np.ndarray, tolerance: int = 1) -> dict[str, float]:
    """Precision/recall/F1 of binary edge maps (> 127 is an edge), a match within ``tolerance`` pixels counting.

    Two empty maps agree perfectly (F1 = 1); an empty prediction of a non-empty target has recall 0.
    """
    p = torch.from_numpy(_gray(pred) > 127)[None, None].float()
    t = torch.from_numpy(_gray(target) > 127)[None, None].float()
    k = 2 * tolerance + 1
    p_near = F.max_pool2d(p, k, stride=1, padding=tolerance) > 0
    t_near = F.max_pool2d(t, k, stride=1, padding=tolerance) > 0
    n_p, n_t = float(p.sum()), float(t.sum())
    if n_p == 0 and n_t == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    precision = float((p.bool() & t_near).sum()) / n_p if n_p else 0.0
    recall = float((t.bool() & p_near).sum()) / n_t if n_t else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def ssim(a: Image.Image | np.ndarray, b: Image.Image | np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004) of two grey images in 0..255: Gaussian window, K1 = .01, K2 = .03, valid region.

    The window shrinks (odd, <= the image side) for images smaller than 11 px.
    """
    x = torch.from_numpy(_gray(a))[None, None]
    y = torch.from_numpy(_gray(b))[None, None]
    if x.shape != y.shape:
        raise ValueError(f"SSIM needs equal sizes, got {tuple(x.shape[-2:])} and {tuple(y.shape[-2:])}")
    side = min(x.shape[-2:])
    window = min(window, side if side % 2 else side - 1)
    r = torch.arange(window, dtype=torch.float64) - window // 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    g = (g / g.sum())[:, None] * (g / g.sum())[None, :]
    w = g[None, None]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = F.conv2d(x, w), F.conv2d(y, w)
    vx = F.conv2d(x * x, w) - mx**2
    vy = F.conv2d(y * y, w) - my**2
    cov = F.conv2d(x * y, w) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return float(s.mean())


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray | None = None) -> float:
    """PSNR (dB, 8-bit) of two RGB arrays, over the pixels where ``where`` is True."""
    diff = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
    if where is not None:
        diff = diff[where]
    mse = float(diff.mean()) if diff.size else 0.0
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def image_features(images: list[Image.Image], size: int = 8) -> np.ndarray:
    """(N, size*size*3) features in [0, 1]: area-averaged RGB thumbnails (what :func:`frechet_distance` compares)."""
    rows = [
        np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BOX), np.float64) / 255.0 for im in images
    ]
    return np.stack([r.reshape(-1) for r in rows])


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets: |mu_a - mu_b|^2 + tr(Ca + Cb - 2 (Ca Cb)^1/2).

    The trace of the matrix square root is the sum of the square roots of the eigenvalues of Ca^1/2 Cb Ca^1/2
    (symmetric, so ``eigh`` is exact; no scipy). Needs at least two samples per set.
    """
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least two samples per set")
    ta, tb = torch.from_numpy(np.asarray(a, np.float64)), torch.from_numpy(np.asarray(b, np.float64))
    mu = ta.mean(0) - tb.mean(0)
    ca, cb = torch.cov(ta.T), torch.cov(tb.T)
    w, v = torch.linalg.eigh(ca)
    root_a = (v * w.clamp_min(0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp_min(0).sqrt().sum()
    return float(mu @ mu + torch.trace(ca) + torch.trace(cb) - 2 * cross)


def transformer_flops(pipe: Any, control: dict[str, Any] | None, size: int, prompt: str = "") -> tuple[int, int]:
    """FLOPs of the first and of a later transformer call (batch 1, ``size`` px) with the given control arguments.

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention) on a 2-step call
    without CFG. EasyControl computes its condition branch in the first call only (the K/V cache), so the two
    differ; ControlNet-Transformer and RelaCtrl run their branch at every call.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(query: Any, key: Any, value: Any, *args: Any, out_val: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(query, key, value)

    calls: list[int] = []
    # PyTorch's table has no entry for the CPU flash kernel SDPA dispatches to, which would count attention as 0.
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    counter = FlopCounterMode(display=False, custom_mapping={cpu_sdpa: sdpa} if cpu_sdpa is not None else None)
    model = pipe.transformer

    def before(module: Any, args: Any, kwargs: Any) -> None:
        counter.__enter__()

    def after(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        counter.__exit__(None, None, None)
        calls.append(counter.get_total_flops())  # entering the mode resets its counts: this is one call

    h1 = model.register_forward_pre_hook(before, with_kwargs=True, prepend=True)
    h2 = model.register_forward_hook(after, with_kwargs=True)
    try:
        pipe(prompt, num_inference_steps=2, guidance_scale=1.0, height=size, width=size, seed=0, **(control or {}))
    finally:
        h1.remove()
        h2.remove()
    return int(calls[0]), int(calls[-1])


def fidelity(
    output: Image.Image,
    control_map: Image.Image,
    preprocessor: str,
    source: Image.Image | None = None,
    mask: np.ndarray | None = None,
) -> dict[str, float]:
    """The preprocessor applied to ``output`` (at the map's size) against the input map."""
    from control.preprocessors import run_preprocessor

    out = output.resize(control_map.size, Image.Resampling.LANCZOS) if output.size != control_map.size else output
    params = {"mask": mask} if preprocessor == "inpaint" and mask is not None else {}
    remapped = run_preprocessor(preprocessor, out, **params)
    scores = {"ssim": ssim(remapped, control_map)}
    if preprocessor in EDGE_PREPROCESSORS:
        scores.update({f"edge_{k}": v for k, v in edge_f1(remapped, control_map).items()})
    if preprocessor == "inpaint" and source is not None and mask is not None:
        src = np.asarray(source.resize(out.size, Image.Resampling.LANCZOS).convert("RGB"))
        scores["psnr_known"] = psnr(np.asarray(out.convert("RGB")), src, ~mask)
    return scores


# ---- evaluation -------------------------------------------------------------------------------------------
def _examples(data: str | Path, resolution: int, n: int, holdout: float, seed: int) -> list[tuple[Image.Image, str]]:
    from training.classifier import is_held_out
    from training.data.datasets import open_image_folder

    ds = open_image_folder(data, resolution)
    idx = [
        i
        for i, r in enumerate(ds.records)
        if not holdout or is_held_out(r.path.relative_to(ds.root).as_posix(), holdout)
    ]
    rng = np.random.default_rng(seed)
    rng.shuffle(idx)
    out = []
    for i in idx[:n]:
        item = ds[i]
        arr = ((item["pixel_values"].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        out.append((Image.fromarray(np.ascontiguousarray(arr), "RGB"), item["text"] or ""))
    if not out:
        raise ValueError(f"no evaluation images in {data} (holdout fraction {holdout})")
    return out


def _timed(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def evaluate(
    pipeline: str,
    adapter: str,
    data: str | Path,
    num_images: int = 32,
    steps: int = 20,
    guidance_scale: float = 3.0,
    strength: float = 1.0,
    seed: int = 0,
    holdout_fraction: float = 0.0,
    repeats: int = 5,
    preprocessor: str | None = None,
    grid: str | Path | None = None,
    control_cfg: bool | None = None,
) -> dict[str, Any]:
    """Fidelity with and without control, quality, extra parameters, FLOPs and latency; see the module docstring."""
    from control.controlnet_transformer import BlockControl
    from control.easycontrol import EasyControl
    from control.preprocessors import inpaint_mask
    from pipelines import load_pipeline
    from pipelines.control import check_control_pipeline, make_control_map

    pipe = check_control_pipeline(load_pipeline(pipeline))
    pipe.set_progress_bar_config(disable=True)
    info = pipe.load_control_adapter(adapter)
    pre = preprocessor or info.preprocessor or "none"
    size = pipe.default_size()
    control_size = info.control_size or size
    examples = _examples(data, size, num_images, holdout_fraction, seed)
    kw = dict(num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size)
    with_c: list[dict[str, float]] = []
    without_c: list[dict[str, float]] = []
    rows: list[list[Image.Image]] = []
    for i, (image, caption) in enumerate(examples):
        mask = (
            inpaint_mask((control_size, control_size), "random", seed=seed * 100003 + i) if pre == "inpaint" else None
        )
        params = {"mask": mask} if mask is not None else {}
        cmap = make_control_map(image, control_size, size, size, pre, params)
        ctl = pipe(
            caption,
            control_image=cmap,
            control_adapter=info.name,
            control_strength=strength,
            control_cfg=control_cfg,
            seed=seed + i,
            **kw,
        )
        base = pipe(caption, seed=seed + i, **kw)
        with_c.append(fidelity(ctl.images[0], cmap, pre, image, mask))
        without_c.append(fidelity(base.images[0], cmap, pre, image, mask))
        rows.append([cmap.resize((size, size), Image.Resampling.NEAREST), ctl.images[0], base.images[0]])
    sources = image_features([image for image, _ in examples])
    quality = {
        "with_control": frechet_distance(image_features([r[1] for r in rows]), sources) if len(rows) > 1 else None,
        "without_control": frechet_distance(image_features([r[2] for r in rows]), sources) if len(rows) > 1 else None,
    }

    def mean(scores: list[dict[str, float]]) -> dict[str, float]:
        return {k: float(np.mean([s[k] for s in scores if np.isfinite(s[k])])) for k in scores[0]}

    kind = getattr(info, "kind", "easycontrol")
    if kind == "easycontrol":
        extra = EasyControl.of(pipe.transformer).num_parameters(info.name)
    else:
        extra = BlockControl.of(pipe.transformer).num_parameters(info.name)
    total = sum(
        p.numel()
        for name, p in pipe.transformer.named_parameters()
        if ".processor." not in name and not name.startswith("block_control_adapters.")
    )
    image, caption = examples[0]
    map_size = (size, size) if kind != "easycontrol" else control_size
    cmap = make_control_map(image, map_size, size, size, pre, {"mask": "center"} if pre == "inpaint" else {})
    ctl_kw = {"control_image": cmap, "control_adapter": info.name, "control_cfg": False}
    first, later = transformer_flops(pipe, ctl_kw, size, caption)
    flops = {"base": transformer_flops(pipe, None, size, caption)[1], "control": later, "control_first_call": first}
    flops["control_extra_fraction"] = flops["control"] / flops["base"] - 1 if flops["base"] else None
    lat = {
        "base_s": _timed(lambda: pipe(caption, seed=0, **kw), repeats),
        "control_kv_cache_s": _timed(
            lambda: pipe(caption, control_image=cmap, control_adapter=info.name, seed=0, control_cfg=control_cfg, **kw),
            repeats,
        ),
    }
    if kind == "easycontrol":  # the other kinds have no condition cache: their branch depends on the noisy image
        lat["control_no_cache_s"] = _timed(
            lambda: pipe(
                caption,
                control_image=cmap,
                control_adapter=info.name,
                seed=0,
                use_kv_cache=False,
                control_cfg=control_cfg,
                **kw,
            ),
            repeats,
        )
    lat["kv_cache_speedup"] = lat["control_no_cache_s"] / lat["control_kv_cache_s"] if kind == "easycontrol" else None
    lat["control_overhead_with_cache"] = lat["control_kv_cache_s"] / lat["base_s"] - 1
    report = {
        "pipeline": str(pipeline),
        "adapter": info.name,
        "adapter_kind": kind,
        "adapter_path": info.path,
        "preprocessor": pre,
        "control_size": control_size,
        "image_size": size,
        "num_images": len(examples),
        "steps": steps,
        "guidance_scale": guidance_scale,
        "strength": strength,
        "control_cfg": bool(pipe.config.get("control_cfg", False) if control_cfg is None else control_cfg),
        "holdout_fraction": holdout_fraction,
        "fidelity_with_control": mean(with_c),
        "fidelity_without_control": mean(without_c),
        "quality_fd": quality,
        "flops_per_call": flops,
        "extra_parameters": extra,
        "transformer_parameters": total,
        "extra_parameter_fraction": extra / total,
        "latency_per_image": lat,
        "threads": torch.get_num_threads(),
        "per_image": [{"with": a, "without": b} for a, b in zip(with_c, without_c)],
    }
    if grid:
        from training.validation import image_grid

        tiles = [t for row in rows[:16] for t in row]
        path = Path(grid)
        path.parent.mkdir(parents=True, exist_ok=True)
        image_grid(tiles, columns=3).resize((3 * size * 4, len(rows[:16]) * size * 4), Image.Resampling.NEAREST).save(
            path
        )
        report["grid"] = str(path)
    return report


def format_report(r: dict[str, Any]) -> str:
    w, wo, lat = r["fidelity_with_control"], r["fidelity_without_control"], r["latency_per_image"]
    lines = [
        f"adapter {r['adapter']} ({r['preprocessor']}, control {r['control_size']} px) on {r['pipeline']}: "
        f"{r['num_images']} images, {r['steps']} steps, CFG {r['guidance_scale']}, strength {r['strength']}, "
        f"control in the conditional CFG half only: {r['control_cfg']}",
        f"{'metric':<14}{'with control':>14}{'without':>10}",
    ]
    for key in w:
        lines.append(f"{key:<14}{w[key]:>14.3f}{wo[key]:>10.3f}")
    q = r.get("quality_fd") or {}
    if q.get("with_control") is not None:
        lines.append(
            f"{'quality FD':<14}{q['with_control']:>14.3f}{q['without_control']:>10.3f}  (to the source images)"
        )
    lines.append(
        f"extra parameters: {r['extra_parameters']:,} ({100 * r['extra_parameter_fraction']:.1f}% of the transformer)"
    )
    fl = r.get("flops_per_call")
    if fl and fl.get("control_extra_fraction") is not None:
        lines.append(
            f"FLOPs per transformer call: base {fl['base'] / 1e6:.1f} M, with control {fl['control'] / 1e6:.1f} M "
            f"({100 * fl['control_extra_fraction']:+.1f}%; first call {fl['control_first_call'] / 1e6:.1f} M)"
        )
    if lat.get("kv_cache_speedup") is not None:
        lines.append(
            f"latency per image ({r['threads']} thread(s)): base {lat['base_s'] * 1000:.0f} ms, control with KV cache "
            f"{lat['control_kv_cache_s'] * 1000:.0f} ms, without {lat['control_no_cache_s'] * 1000:.0f} ms "
            f"(cache speed-up x{lat['kv_cache_speedup']:.2f}; "
            f"control overhead {100 * lat['control_overhead_with_cache']:+.0f}%)"
        )
    else:
        lines.append(
            f"latency per image ({r['threads']} thread(s)): base {lat['base_s'] * 1000:.0f} ms, control "
            f"{lat['control_kv_cache_s'] * 1000:.0f} ms "
            f"(control overhead {100 * lat['control_overhead_with_cache']:+.0f}%)"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="control or text-to-image pipeline (catalog name or directory)")
    p.add_argument("--adapter", required=True, help="adapter name registered with the pipeline, or a .safetensors file")
    p.add_argument("--data", default="data/emoji", help="image folder with captions (default data/emoji)")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout-fraction", type=float, default=0.0, help="evaluate on the held-out split only")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per latency figure (median)")
    p.add_argument("--preprocessor", help="override the adapter's recorded preprocessor")
    p.add_argument("--out", help="write the report as JSON")
    p.add_argument("--grid", help="save rows of [map | with control | without control]")
    p.add_argument("--control-cfg", choices=["yes", "no"], help="conditions in the conditional CFG half only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipelines.errors import InputError, ModelLoadError

    args = parse_args(argv)
    try:
        report = evaluate(
            args.pipeline,
            args.adapter,
            args.data,
            args.num_images,
            args.steps,
            args.guidance,
            args.strength,
            args.seed,
            args.holdout_fraction,
            args.repeats,
            args.preprocessor,
            args.grid,
            None if args.control_cfg is None else args.control_cfg == "yes",
        )
    except (InputError, ModelLoadError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
