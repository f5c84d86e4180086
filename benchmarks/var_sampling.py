"""VAR sampling latency: with and without the KV cache, and against the DiT default at a similar size.

    OMP_NUM_THREADS=1 python -m benchmarks.var_sampling            # CPU, the shipped models
    python -m benchmarks.var_sampling --device cuda --batch 8 --json out.json

Rows:

* ``emoji-var`` (the shipped default, 130-token pyramid) with the KV cache and without it (every scale re-runs
  the whole prefix under the block-causal mask, as a transformer without a cache must);
* ``emoji-var-d6`` the same with a random 6-block transformer, the parameter count of the DiT default;
* ``var-256px`` a random VAR on the released 256 px schedule (10 scales, 680 tokens; depth/width from
  ``--large``), where the cache matters most: uncached sampling processes 1,710 token positions per image
  (the prefix sums) instead of 680, and attention grows with the square of each prefix;
* ``emoji-dit`` the shipped DiT default (or, while it is not shipped yet, a random DiT built from
  ``training/configs/emoji-dit.yaml``, which has the same size and cost) with its default sampler and steps.

Each row is the median of ``--repeats`` timed calls after one warm-up call, classifier-free guidance on (the
batch doubled) as in normal use. VAR rows are timed twice: to the image, and to the tokens (``output_type=
"latent"``: the sampling loop alone, without the VQ-VAE decoder, which costs the same in both modes). Both VAR
modes are checked to give the same result. The uncached mode runs the head on the current scale only, so it
differs from the cached one only in re-running the blocks over the prefix.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "assets" / "models"


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def timed(fn: Any, repeats: int) -> tuple[float, Any]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def var_pipeline(name: str, large: tuple[int, int]) -> Any:
    from pipelines import load_pipeline
    from pipelines.var import VARPipeline

    if not (MODELS / "emoji-var").is_dir() and name.startswith("emoji-var"):
        return None
    if name == "emoji-var":
        return load_pipeline(MODELS / "emoji-var")
    from dit.models.var import VARTransformer

    if name == "emoji-var-d6":  # the shipped VQ-VAE + a random 6-block transformer: the DiT default's size
        shipped = load_pipeline(MODELS / "emoji-var")
        cfg = dict(shipped.transformer.config)
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        cfg["depth"] = 6
        torch.manual_seed(0)
        return VARPipeline(transformer=VARTransformer(**cfg).eval(), vae=shipped.vae)
    from dit.models.var_vqvae import PATCH_NUMS, VARVQVAE

    depth, width = large
    torch.manual_seed(0)
    vae = VARVQVAE(block_out_channels=(16, 16, 32, 32, 64), layers_per_block=1, norm_num_groups=8,
                   latent_channels=32, vocab_size=4096, patch_nums=PATCH_NUMS[256])  # fmt: skip
    transformer = VARTransformer(depth=depth, embed_dim=width, num_heads=width // 64, patch_nums=PATCH_NUMS[256])
    return VARPipeline(transformer=transformer.eval(), vae=vae.eval())


def dit_pipeline() -> tuple[Any, str]:
    from pipelines import load_pipeline

    if (MODELS / "emoji-dit").is_dir():
        return load_pipeline(MODELS / "emoji-dit"), "shipped"
    from diffusers import DPMSolverMultistepScheduler

    from dit import DiTModel
    from pipelines import ClassToImagePipeline

    cfg = yaml.safe_load((ROOT / "training" / "configs" / "emoji-dit.yaml").read_text())
    model = DiTModel(sample_size=32, in_channels=3, learn_sigma=False, num_classes=9, **cfg["model"])
    return ClassToImagePipeline(
        transformer=model.eval(), scheduler=DPMSolverMultistepScheduler()
    ), "random, emoji-dit.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1, help="images per call")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large", default="4,256", help="depth,width of the random 256 px-schedule VAR")
    parser.add_argument("--dit-steps", type=int, default=20)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    large = tuple(int(v) for v in args.large.split(","))
    rows = []
    for name in ("emoji-var", "emoji-var-d6", "var-256px"):
        pipe = var_pipeline(name, large)
        if pipe is None:
            print(f"{name}: not shipped yet, skipped")
            continue
        pipe.set_progress_bar_config(disable=True)
        pipe.to(args.device)
        labels = [0] * args.batch

        def call(cache: bool, kind: str, pipe: Any = pipe, labels: list[int] = labels) -> np.ndarray:
            out = pipe(labels, guidance_scale=2.0, top_k=0, top_p=0.95, seed=0, use_kv_cache=cache, output_type=kind)
            return np.asarray(out.images.float().cpu() if kind == "latent" else out.images)

        n = params(pipe.transformer)
        tokens = pipe.transformer.seq_len
        for kind, what in (("np", "image"), ("latent", "tokens")):  # tokens: the sampling loop without decoding
            cached, a = timed(lambda kind=kind: call(True, kind), args.repeats)
            uncached, b = timed(lambda kind=kind: call(False, kind), args.repeats)
            same = bool(np.abs(a - b).max() < 1e-4)
            for mode, sec in (("kv-cache", cached), ("no cache", uncached)):
                rows.append(dict(model=name, output=what, mode=mode, params=n, tokens=tokens, seconds=sec, same=same))
            print(
                f"{name} ({what}): {n / 1e6:.2f}M params, {tokens} tokens, {pipe.num_scales} scales: KV cache "
                f"{cached:.3f} s, no cache {uncached:.3f} s -> {uncached / cached:.2f}x with the cache (same: {same})"
            )
    dit, origin = dit_pipeline()
    dit.set_progress_bar_config(disable=True)
    dit.to(args.device)
    seconds, _ = timed(
        lambda: dit([0] * args.batch, num_inference_steps=args.dit_steps, guidance_scale=3.0, seed=0, output_type="np"),
        args.repeats,
    )
    n = params(dit.transformer)
    mode = f"{args.dit_steps} steps"
    rows.append(dict(model=f"emoji-dit ({origin})", output="image", mode=mode, params=n, tokens=64, seconds=seconds))
    print(f"emoji-dit ({origin}): {n / 1e6:.2f}M params, {args.dit_steps} DPM++ steps: {seconds:.3f} s")
    print(f"\n{'model':36s} {'output':7s} {'mode':10s} {'params':>8s} {'tokens':>6s} {'seconds':>8s}")
    for r in rows:
        print(
            f"{r['model']:36s} {r['output']:7s} {r['mode']:10s} {r['params'] / 1e6:7.2f}M {r['tokens']:6d} "
            f"{r['seconds']:8.3f}"
        )
    if args.json:
        meta = {"device": args.device, "batch": args.batch, "threads": torch.get_num_threads(), "rows": rows}
        args.json.write_text(json.dumps(meta, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
