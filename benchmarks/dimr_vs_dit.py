"""DiMR against DiT: parameters and GFLOPs side by side, from the training configs, optionally CPU time per step.

    python benchmarks/dimr_vs_dit.py                      # emoji-dimr.yaml vs emoji-dit-small.yaml + paper models
    python benchmarks/dimr_vs_dit.py --timing --json out.json

GFLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over one forward pass of one image (matmuls,
convolutions and attention; elementwise ops are not counted). Papers call multiply-accumulates "FLOPs": the DiT
paper's 118.6 GFLOPs for DiT-XL/2 and DiMR's 160 / 331 for DiMR-XL/2R / G/2R are MACs, and this script reproduces
all three (``--paper``, on the meta device, no weights), so the emoji figures below are in the same unit.
``--timing`` measures the process CPU time of training steps (forward, multi-scale or plain MSE loss, backward,
AdamW) at the config's batch size on one thread, which is what "minutes single-threaded" budgets mean on a shared
machine where wall time says little.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from dit import DiMRModel, DiTModel, dimr_config, dit_config  # noqa: E402
from training.build import build_transformer  # noqa: E402
from training.config import load_config  # noqa: E402


def gmacs(model: torch.nn.Module, size: int, channels: int, device: str = "cpu") -> tuple[float, dict[str, float]]:
    """Multiply-accumulates (1e9) of one forward pass on one image, total and per top-level submodule."""
    x = torch.zeros(1, channels, size, size, device=device)
    t = torch.tensor([500], device=device)
    y = torch.tensor([0], device=device)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x, t, y)
    name = type(model).__name__
    parts = {}
    for key, counts in counter.get_flop_counts().items():
        depth = key.count(".")
        if key.startswith(f"{name}.") and (depth == 1 or (depth == 2 and ".branches." in key)):
            parts[key.removeprefix(f"{name}.")] = sum(counts.values()) / 2e9
    return counter.get_total_flops() / 2e9, parts


def step_cpu_seconds(model: torch.nn.Module, batch: int, size: int, classes: int, steps: int = 3) -> float:
    """Median process CPU time of one training step (after one warm-up step)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    y = torch.randint(0, classes, (batch,), generator=g)
    times = []
    for _ in range(steps + 1):
        start = time.process_time()
        out = model(x, t, y)
        loss = out.multi_scale_loss(x) if hasattr(out, "multi_scale_loss") else (out.sample - x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.process_time() - start)
    return sorted(times[1:])[len(times[1:]) // 2]


def describe(name: str, model: torch.nn.Module, size: int, channels: int, device: str = "cpu") -> dict[str, Any]:
    total, parts = gmacs(model, size, channels, device)
    return {
        "model": name,
        "class": type(model).__name__,
        "params_M": sum(p.numel() for p in model.parameters()) / 1e6,
        "gmacs": total,
        "gflops_2x": 2 * total,
        "parts_gmacs": parts,
    }


def paper_models() -> list[dict[str, Any]]:
    rows = []
    for name, make in (
        ("DiMR-XL/2R", lambda: DiMRModel(**dimr_config("DiMR-XL/2R"))),
        ("DiMR-G/2R", lambda: DiMRModel(**dimr_config("DiMR-G/2R"))),
        ("DiT-XL/2", lambda: DiTModel(**dit_config("DiT-XL/2"))),
    ):
        with torch.device("meta"):
            model = make()
        rows.append(describe(name, model, 32, 4, device="meta"))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dimr-config", default=str(ROOT / "training/configs/emoji-dimr.yaml"))
    p.add_argument("--dit-config", default=str(ROOT / "training/configs/emoji-dit-small.yaml"))
    p.add_argument("--num-classes", type=int, default=None, help="default: len(data.categories) of the config")
    p.add_argument("--timing", action="store_true", help="also measure CPU seconds per training step")
    p.add_argument("--no-paper", action="store_true", help="skip the paper-scale models")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rows = []
    for path in (args.dimr_config, args.dit_config):
        config = load_config(path)
        classes = args.num_classes or len(config.data.categories or []) or 10
        torch.manual_seed(0)
        model = build_transformer(config, classes)
        row = describe(Path(path).stem, model, config.data.resolution, 3)
        row.update(batch=config.optim.batch_size, steps=config.optim.max_steps)
        if args.timing:
            row["cpu_s_per_step"] = step_cpu_seconds(model, config.optim.batch_size, config.data.resolution, classes)
            row["cpu_min_budget"] = row["cpu_s_per_step"] * config.optim.max_steps / 60
        rows.append(row)
    if not args.no_paper:
        rows += paper_models()
    print(f"{'model':22s} {'params':>9s} {'GMACs':>9s} {'GFLOPs(2x)':>11s} {'CPU s/step':>11s} {'CPU min':>8s}")
    for r in rows:
        timing = f"{r['cpu_s_per_step']:11.2f} {r['cpu_min_budget']:8.1f}" if "cpu_s_per_step" in r else ""
        print(f"{r['model']:22s} {r['params_M']:8.2f}M {r['gmacs']:9.4f} {r['gflops_2x']:11.4f} {timing}")
        if r["class"] == "DiMRModel":
            print("    " + ", ".join(f"{k} {v:.4f}" for k, v in r["parts_gmacs"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
