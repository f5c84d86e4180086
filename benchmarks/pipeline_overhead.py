"""Our pipelines against diffusers' reference pipelines on the same checkpoint: time and peak memory ratios.

    python benchmarks/pipeline_overhead.py            # a mid-size random PixArt-Σ and DiT, CPU
    python benchmarks/pipeline_overhead.py --device cuda --layers 28 --width 1152   # full-width blocks on a GPU

Time: median of interleaved calls (ours, reference, ours, ...), so a busy machine slows both alike, in fresh child
processes per implementation ("time ratio") and with both pipelines loaded in one process, call by call ("1-proc
ratio"). On a shared 2-core VM the child-process ratio moved by +-15% between runs (how threads and memory land in
a fresh process); the one-process ratio is the steadier figure there.
Memory: peak RSS (CPU) or peak CUDA allocation of a fresh process per implementation.
Target: ratio <= 1.02 (no overhead).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def build(kind: str, path: Path, layers: int, width: int, sample: int) -> None:
    import torch
    from diffusers import (
        DDIMScheduler,
        DiTPipeline,
        DiTTransformer2DModel,
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )
    from tiny_models import perturb, tiny_t5, tiny_tokenizer, tiny_vae

    torch.manual_seed(0)
    heads = max(width // 64, 1)
    if kind == "pixart":
        tr = PixArtTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4, out_channels=8,
            num_layers=layers, cross_attention_dim=width, sample_size=sample, caption_channels=16,
        )  # fmt: skip
        pipe = PixArtSigmaPipeline(
            tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), vae=tiny_vae(), transformer=perturb(tr),
            scheduler=DPMSolverMultistepScheduler(),
        )  # fmt: skip
    else:
        tr = DiTTransformer2DModel(
            num_attention_heads=heads, attention_head_dim=width // heads, in_channels=4, out_channels=8,
            num_layers=layers, sample_size=sample,
        )  # fmt: skip
        pipe = DiTPipeline(transformer=perturb(tr), vae=tiny_vae(), scheduler=DDIMScheduler())
    pipe.save_pretrained(path)


def call_args(kind: str, sample: int, steps: int) -> dict:
    if kind == "pixart":
        return dict(prompt=["a red cat", "a blue car"], num_inference_steps=steps, guidance_scale=4.5,
                    height=sample * 2, width=sample * 2, output_type="np", use_resolution_binning=False)  # fmt: skip
    return dict(class_labels=[1, 2], num_inference_steps=steps, guidance_scale=4.0, output_type="np")


def load(impl: str, path: Path, device: str):
    import torch
    from diffusers import DiffusionPipeline

    from pipelines import load_pipeline

    pipe = DiffusionPipeline.from_pretrained(path) if impl == "reference" else load_pipeline(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), torch


def run_one(kind: str, impl: str, path: Path, device: str, sample: int, steps: int, repeats: int) -> dict:
    """Child process: load one implementation, run it, report its timings and peak memory."""
    pipe, torch = load(impl, path, device)
    args = call_args(kind, sample, steps)
    extra = {"clean_caption": False} if (impl == "reference" and kind == "pixart") else {}
    times = []
    for i in range(repeats + 1):
        gen = torch.Generator().manual_seed(i)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(**args, **extra, generator=gen)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"times": times, "peak_mib": peak}


def same_process_ratio(kind: str, path: Path, device: str, sample: int, steps: int, calls: int) -> float:
    """Median time of ours over median time of the reference, both loaded here and called alternately."""
    ours, torch = load("ours", path, device)
    ref, _ = load("reference", path, device)
    args = call_args(kind, sample, steps)
    extra = {"clean_caption": False} if kind == "pixart" else {}
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for i in range(calls + 1):
        for name, pipe, kwargs in (("ours", ours, {}), ("reference", ref, extra)):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            pipe(**args, **kwargs, generator=torch.Generator().manual_seed(i))
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first call of each warms up
                times[name].append(time.perf_counter() - start)
    return statistics.median(times["ours"]) / statistics.median(times["reference"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--sample", type=int, default=16, help="latent side")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating child processes per implementation")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "IMPL"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, impl = args.child
        res = run_one(kind, impl, Path(args.path), args.device, args.sample, args.steps, args.repeats)
        print(json.dumps(res))
        return
    print(f"device={args.device} layers={args.layers} width={args.width} latent={args.sample} steps={args.steps}")
    header = ("pipeline", "ours s", "diffusers s", "time ratio", "1-proc ratio", "ours MiB", "ref MiB", "mem ratio")
    widths = (10, 10, 13, 12, 14, 10, 9, 11)
    print("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" for i, (h, w) in enumerate(zip(header, widths))))
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("pixart", "dit"):
            path = Path(tmp) / kind
            build(kind, path, args.layers, args.width, args.sample)
            results: dict[str, dict[str, list[float]]] = {"ours": {"t": [], "m": []}, "reference": {"t": [], "m": []}}
            for _ in range(args.rounds):
                for impl in ("ours", "reference"):
                    cmd = [sys.executable, __file__, "--child", kind, impl, "--path", str(path)]
                    for flag in ("device", "sample", "steps", "repeats"):
                        cmd += [f"--{flag}", str(getattr(args, flag))]
                    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
                    res = json.loads(proc.stdout.strip().splitlines()[-1])
                    results[impl]["t"] += res["times"]
                    results[impl]["m"].append(res["peak_mib"])
            ours_t, ref_t = statistics.median(results["ours"]["t"]), statistics.median(results["reference"]["t"])
            ours_m, ref_m = statistics.median(results["ours"]["m"]), statistics.median(results["reference"]["m"])
            same = same_process_ratio(kind, path, args.device, args.sample, args.steps, args.repeats * args.rounds)
            print(
                f"{kind:<10}{ours_t:>10.3f}{ref_t:>13.3f}{ours_t / ref_t:>12.3f}{same:>14.3f}{ours_m:>10.0f}"
                f"{ref_m:>9.0f}{ours_m / ref_m:>11.3f}"
            )


if __name__ == "__main__":
    main()
