"""The ControlNet Relevance Score (RelaCtrl, Cao et al. 2025): which control blocks of a trained ControlNet matter?

    python -m training.relevance --pipeline assets/models/emoji-t2i-control --adapter canny-controlnet-full \\
        --data data/emoji --holdout-fraction 0.1 --num-images 48 --out runs/relevance.json

For a trained block-residual adapter (a ControlNet-Transformer, usually one with a control block after every base
block but the last: ``controlnet.num_blocks = L - 1``), each control block is skipped in turn at inference (its
copied block is left out: the control state passes through unchanged and nothing is added to the base block it
fed; ``ResidualControlAdapter.skip``) and the generations are scored with ``training.evaluate_control``'s metrics:

* **quality**: the Fréchet distance of the generated images to the source images (``frechet_distance`` on
  ``image_features``; the paper uses FID);
* **control fidelity**: edge F1 between the preprocessor applied to the output and the input map (the paper uses
  the Hausdorff distance of HED edges; any edge-agreement score ranks the same way when it is monotone).

RelaCtrl then ranks the blocks: F_i is the rank of the quality when block i is skipped and H_i the rank of the
fidelity, both ordered from least to most harm (a higher FD, a lower F1: a higher rank), and

    CRS_i = 1/2 [ (F_i - F_min) / (F_max - F_min) + (H_i - H_min) / (H_max - H_min) ]

so 1 = skipping this block hurts most on both counts, 0 = least. ``control.relactrl.placement_from_scores`` turns
the scores into a RelaCtrl placement (the most relevant positions, wider attention groups for the top ones); the
JSON report (``--out``) is what ``training.train_control``'s ``relactrl.relevance`` reads. Every run uses the same
prompts, maps and seeds, so the differences come from the skipped block alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


def _ranks(values: list[float]) -> list[int]:
    """1-based ranks in ascending order of ``values`` (ties broken by position, so ranks are a permutation)."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    ranks = [0] * len(values)
    for r, i in enumerate(order, start=1):
        ranks[i] = r
    return ranks


def relevance_scores(quality_fd: list[float], edge_f1: list[float]) -> tuple[list[float], list[int], list[int]]:
    """RelaCtrl's CRS from per-block skip results: (CRS, quality ranks F, fidelity ranks H); see the module doc."""
    f = _ranks(list(quality_fd))  # higher FD when skipped = more harm = higher rank
    h = _ranks([-x for x in edge_f1])  # lower F1 when skipped = more harm = higher rank

    def norm(r: list[int]) -> list[float]:
        lo, hi = min(r), max(r)
        return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in r]

    crs = [0.5 * (a + b) for a, b in zip(norm(f), norm(h))]
    return crs, f, h


def score_adapter(
    pipe: Any,
    adapter: str,
    examples: list[tuple[Image.Image, str]],
    preprocessor: str,
    steps: int,
    guidance_scale: float,
    seed: int,
    skip: set[int] | None = None,
) -> dict[str, float]:
    """Generate every example with ``adapter`` (control blocks ``skip`` left out) and score quality and fidelity."""
    from control.controlnet_transformer import BlockControl
    from pipelines.control import make_control_map

    from .evaluate_control import fidelity, frechet_distance, image_features

    size = pipe.default_size()
    module = BlockControl.of(pipe.transformer).adapters[adapter]
    module.skip = set(skip or ())
    outputs, scores = [], []
    try:
        for i, (image, caption) in enumerate(examples):
            cmap = make_control_map(image, (size, size), size, size, preprocessor)
            out = pipe(
                caption,
                control_image=cmap,
                control_adapter=adapter,
                seed=seed + i,
                num_inference_steps=steps,
                guidance_scale=guidance_scale,
                height=size,
                width=size,
            )
            outputs.append(out.images[0])
            scores.append(fidelity(out.images[0], cmap, preprocessor))
    finally:
        module.skip = set()
    sources = image_features([image for image, _ in examples])
    result = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
    result["quality_fd"] = frechet_distance(image_features(outputs), sources)
    return result


def relevance(
    pipeline: str,
    adapter: str,
    data: str | Path,
    num_images: int = 32,
    steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
    holdout_fraction: float = 0.0,
    preprocessor: str | None = None,
    num_blocks: int | None = None,
) -> dict[str, Any]:
    """Skip each control block of ``adapter`` in turn; return the per-block scores, ranks, CRS and a placement."""
    from control.relactrl import placement_from_scores
    from pipelines import load_pipeline
    from pipelines.control import check_control_pipeline
    from pipelines.errors import InputError

    from .evaluate_control import EDGE_PREPROCESSORS, _examples

    pipe = check_control_pipeline(load_pipeline(pipeline))
    pipe.set_progress_bar_config(disable=True)
    info = pipe.load_control_adapter(adapter)
    if getattr(info, "kind", "easycontrol") not in ("controlnet", "relactrl"):
        raise InputError(
            f"{adapter} is an {getattr(info, 'kind', 'easycontrol')} adapter; the relevance score needs "
            "a ControlNet-Transformer (adapter.kind: controlnet) with control blocks to skip."
        )
    pre = preprocessor or info.preprocessor or "none"
    if pre not in EDGE_PREPROCESSORS:
        raise InputError(f"the relevance score measures edge fidelity; {adapter} uses {pre!r} (use a canny adapter)")
    from control.controlnet_transformer import BlockControl

    module = BlockControl.of(pipe.transformer).adapters[info.name]
    positions = list(getattr(module, "positions", range(module.num_control_blocks)))
    examples = _examples(data, pipe.default_size(), num_images, holdout_fraction, seed)
    args = (examples, pre, steps, guidance_scale, seed)
    full = score_adapter(pipe, info.name, *args)
    rows = []
    for i in range(module.num_control_blocks):
        s = score_adapter(pipe, info.name, *args, skip={i})
        rows.append({"index": i, "position": positions[i], "feeds_block": positions[i] + 1, **s})
    crs, f, h = relevance_scores([r["quality_fd"] for r in rows], [r["edge_f1"] for r in rows])
    for r, c, fr, hr in zip(rows, crs, f, h):
        r.update(crs=c, rank_quality=fr, rank_fidelity=hr)
    scores = {r["position"]: r["crs"] for r in rows}
    n = num_blocks or max(1, round(len(rows) / 3))
    suggested_positions, suggested_groups = placement_from_scores(scores, n)
    return {
        "pipeline": str(pipeline),
        "adapter": info.name,
        "adapter_kind": info.kind,
        "preprocessor": pre,
        "num_images": len(examples),
        "steps": steps,
        "guidance_scale": guidance_scale,
        "holdout_fraction": holdout_fraction,
        "full": full,
        "blocks": rows,
        "suggested": {"positions": suggested_positions, "groups": suggested_groups},
    }


def format_table(report: dict[str, Any]) -> str:
    full = report["full"]
    lines = [
        f"ControlNet Relevance Score of {report['adapter']} ({report['num_images']} images, {report['steps']} steps, "
        f"CFG {report['guidance_scale']}); all blocks: quality FD {full['quality_fd']:.3f}, "
        f"edge F1 {full['edge_f1']:.3f}",
        f"{'skipped':>8}{'after base':>11}{'quality FD':>12}{'edge F1':>9}{'rank F':>8}{'rank H':>8}{'CRS':>7}",
    ]
    for r in report["blocks"]:
        lines.append(
            f"{r['index']:>8}{r['position']:>11}{r['quality_fd']:>12.3f}{r['edge_f1']:>9.3f}"
            f"{r['rank_quality']:>8}{r['rank_fidelity']:>8}{r['crs']:>7.2f}"
        )
    s = report["suggested"]
    lines.append(f"RelaCtrl placement (relactrl.positions / relactrl.groups): {s['positions']} / {s['groups']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="control pipeline (catalog name or directory)")
    p.add_argument("--adapter", required=True, help="a ControlNet-Transformer adapter name or .safetensors file")
    p.add_argument("--data", default="data/emoji", help="image folder with captions (default data/emoji)")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout-fraction", type=float, default=0.0, help="score on the held-out split only")
    p.add_argument("--preprocessor", help="override the adapter's recorded preprocessor")
    p.add_argument("--num-blocks", type=int, help="RelaCtrl blocks to suggest (default: a third of the positions)")
    p.add_argument("--out", help="write the report as JSON (what train_control's relactrl.relevance reads)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from pipelines.errors import InputError, ModelLoadError

    args = parse_args(argv)
    try:
        report = relevance(
            args.pipeline,
            args.adapter,
            args.data,
            args.num_images,
            args.steps,
            args.guidance,
            args.seed,
            args.holdout_fraction,
            args.preprocessor,
            args.num_blocks,
        )
    except (InputError, ModelLoadError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
