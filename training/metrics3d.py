"""Point-cloud generation metrics over the whole test set: MMD, COV, 1-NNA (with CD and EMD), and JSD.

The definitions are PointFlow's ``metrics/evaluation_metrics.py``, which DiT-3D copies:

* CD(X, Y) = mean_x min_y ‖x - y‖² + mean_y min_x ‖x - y‖² (squared distances, as ``chamfer3D``);
* EMD(X, Y) = the cost of an *approximate* optimal matching divided by N: the ``approxmatch`` algorithm of
  Fan et al. (latent_3d_points' CUDA kernel, which PointFlow and DiT-3D bundle): rounds of soft assignment at
  temperatures -4^j. We run DiT-3D's schedule, j = 7 .. -2 with the last round at temperature 0, so every
  point is fully matched (PointFlow's copy stops at j = -1 and can leave mass unmatched), and PointFlow's
  Euclidean match cost (DiT-3D's PyTorchEMD sums *squared* distances, which is not an EMD in the usual
  sense). The approximation is never below the exact EMD and is typically a few percent above it;
* MMD = mean over references of the distance to the closest sample; COV = fraction of references that are
  the nearest reference of at least one sample; 1-NNA = leave-one-out 1-nearest-neighbour accuracy of
  telling samples from references in their union (50 % is ideal, 100 % means fully separable); JSD =
  Jensen-Shannon divergence (base 2) between the point counts of the two sets on a 28³ grid in the unit
  cube, cells outside the unit sphere dropped (points go to their nearest remaining cell).

Unlike DiT-3D's ``test.py``, which computes every metric per test batch of 64 and averages the batch values
(so COV and 1-NNA see only 64 references at a time and depend on the batch size), ``compute_all_metrics``
takes the whole sample and reference sets at once.

Command line (prints the table)::

    python -m training.metrics3d --model assets/models/points-dit3d             # procedural held-out set
    python -m training.metrics3d --samples gen.npy --refs ref.npy                # any (M, N, 3) arrays
    python -m training.metrics3d --model DIR --shapenet ROOT --category chair    # PC15k test split
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# ---------------------------------------------------------------------------------------------- distances


def _as_tensor(x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x)
    if t.dim() != 3 or t.shape[-1] != 3:
        raise ValueError(f"point sets must be (M, N, 3), got {tuple(t.shape)}")
    return t.float()


def chamfer(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batched CD between clouds x[i] and y[i]: (B, N, 3), (B, M, 3) -> (B,), squared distances."""
    d = torch.cdist(x.float(), y.float()).pow(2)
    return d.min(dim=2).values.mean(dim=1) + d.min(dim=1).values.mean(dim=1)


def approx_match(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Fan et al.'s approximate matching between equal-size clouds: (B, N, 3) x2 -> match weights (B, N, N).

    A torch transcription of the ``approxmatch`` kernel: each point starts with mass 1; over temperatures
    ``level = -4^j`` (j = 7 .. -1, then 0) every point of x offers its remaining mass to y in proportion to
    ``exp(level·d²)·remaining_y``, y accepts at most what it has left, and the accepted mass is added to the
    match. The last round (level 0) spreads what is left uniformly, so all mass is matched.
    """
    b, n, _ = x.shape
    if y.shape[1] != n:
        raise ValueError("approximate EMD needs clouds of equal size")
    # float32 throughout, as the CUDA kernel.
    d2 = torch.cdist(x.float(), y.float()).pow(2)
    remain_l = torch.ones(b, n)
    remain_r = torch.ones(b, n)
    match = torch.zeros(b, n, n)
    for j in range(7, -3, -1):
        level = 0.0 if j == -2 else -(4.0**j)
        w = torch.exp(level * d2)  # (B, N_x, N_y)
        ratio_l = remain_l / (1e-9 + (w * remain_r[:, None, :]).sum(dim=2))
        sum_r = (w * ratio_l[:, :, None]).sum(dim=1) * remain_r
        consumption = torch.clamp(remain_r / (sum_r + 1e-9), max=1.0)
        ratio_r = consumption * remain_r
        remain_r = torch.clamp(remain_r - sum_r, min=0.0)
        flow = w * ratio_l[:, :, None] * ratio_r[:, None, :]
        match = match + flow
        remain_l = torch.clamp(remain_l - flow.sum(dim=2), min=0.0)
    return match


def emd_approx(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Batched approximate EMD (see ``approx_match``): Euclidean match cost / N -> (B,)."""
    match = approx_match(x, y)
    dist = torch.cdist(x.float(), y.float())
    return (match * dist).sum(dim=(1, 2)) / x.shape[1]


def pairwise(
    a: torch.Tensor,
    b: torch.Tensor,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batch: int | None = None,
    symmetric: bool = False,
    budget: int = 2**24,
) -> torch.Tensor:
    """(len(a), len(b)) matrix of ``fn(a[i], b[j])``; with ``symmetric`` only the upper triangle is computed.

    ``batch`` pairs at a time; by default as many as keep one (batch, N, N) float32 matrix under ``budget``
    elements (64 MB), since CD and EMD hold a few of those at once.
    """
    if batch is None:
        batch = max(1, min(64, budget // (a.shape[1] * b.shape[1])))
    out = torch.zeros(len(a), len(b))
    for i in range(len(a)):
        start = i + 1 if symmetric else 0
        for j0 in range(start, len(b), batch):
            ref = b[j0 : j0 + batch]
            out[i, j0 : j0 + len(ref)] = fn(a[i : i + 1].expand(len(ref), -1, -1), ref)
    if symmetric:
        out = out + out.t()
    return out


# ---------------------------------------------------------------------------------------------- set metrics


def mmd_cov(dist_sample_ref: torch.Tensor) -> dict[str, float]:
    """MMD and COV from an (N_sample, N_ref) distance matrix (PointFlow's ``lgan_mmd_cov``)."""
    n_ref = dist_sample_ref.shape[1]
    nearest_ref = dist_sample_ref.argmin(dim=1)
    return {
        "MMD": float(dist_sample_ref.min(dim=0).values.mean()),
        "COV": float(len(torch.unique(nearest_ref)) / n_ref),
    }


def one_nna(d_rr: torch.Tensor, d_rs: torch.Tensor, d_ss: torch.Tensor) -> dict[str, float]:
    """Leave-one-out 1-NN accuracy on references (label 1) ∪ samples (label 0), PointFlow's ``knn(k=1)``.

    Ties go to the first index (references first), as ``topk`` does there.
    """
    n_r, n_s = d_rr.shape[0], d_ss.shape[0]
    label = torch.cat([torch.ones(n_r), torch.zeros(n_s)])
    m = torch.cat([torch.cat([d_rr, d_rs], 1), torch.cat([d_rs.t(), d_ss], 1)], 0).clone()
    m.fill_diagonal_(float("inf"))
    nearest = m.argmin(dim=0)  # for each point (column), its nearest other point
    pred = label[nearest]
    correct = (pred == label).float()
    return {
        "1-NNA": float(correct.mean()),
        "acc_ref": float(correct[:n_r].mean()),
        "acc_sample": float(correct[n_r:].mean()),
    }


def unit_sphere_grid(resolution: int = 28) -> np.ndarray:
    """Centres of a resolution³ grid over [-0.5, 0.5]³, keeping those inside the sphere of radius 0.5."""
    spacing = 1.0 / (resolution - 1)
    axis = np.arange(resolution) * spacing - 0.5
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    return grid[np.linalg.norm(grid, axis=1) <= 0.5]


def occupancy_counts(clouds: torch.Tensor, resolution: int = 28) -> np.ndarray:
    """How many points of all clouds fall nearest to each in-sphere grid cell (PointFlow's ``grid_counters``)."""
    grid = torch.from_numpy(unit_sphere_grid(resolution)).float()
    counts = torch.zeros(len(grid), dtype=torch.float64)
    for cloud in clouds:
        idx = torch.cdist(cloud.float(), grid).argmin(dim=1)
        counts += torch.bincount(idx, minlength=len(grid)).double()
    return counts.numpy()


def jsd(samples: Any, refs: Any, resolution: int = 28) -> float:
    """Jensen-Shannon divergence (bits) between the two sets' occupancy distributions."""
    p = occupancy_counts(_as_tensor(samples), resolution)
    q = occupancy_counts(_as_tensor(refs), resolution)
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def compute_all_metrics(
    samples: Any, refs: Any, emd: bool = True, batch: int | None = None, emd_points: int | None = None
) -> dict[str, float]:
    """Every metric over the whole sets (not per batch). ``samples``/``refs``: (M, N, 3) in the same units.

    ``emd_points`` evaluates EMD on the first k points of each cloud (the approximate matching is O(N²) per
    pair and dominates the cost on a CPU); CD always uses all points. Returns a flat dict, fractions in [0, 1].
    """
    s, r = _as_tensor(samples), _as_tensor(refs)
    out: dict[str, float] = {"n_samples": len(s), "n_refs": len(r), "points": s.shape[1]}
    metrics = [("CD", chamfer, s, r)]
    if emd:
        k = emd_points or s.shape[1]
        metrics.append(("EMD", emd_approx, s[:, :k], r[:, :k]))
    for name, fn, ss, rr in metrics:
        d_rs = pairwise(rr, ss, fn, batch)
        d_rr = pairwise(rr, rr, fn, batch, symmetric=name == "CD")
        d_ss = pairwise(ss, ss, fn, batch, symmetric=name == "CD")
        for key, value in mmd_cov(d_rs.t()).items():
            out[f"{key}-{name}"] = value
        out[f"1-NNA-{name}"] = one_nna(d_rr, d_rs, d_ss)["1-NNA"]
    out["JSD"] = jsd(s, r)
    return out


# ---------------------------------------------------------------------------------------------- evaluation


def generate_for(pipe: Any, labels: list[int], num_points: int, steps: int, guidance: float, seed: int, batch: int):
    """One generated cloud per reference label (in data units), seeds ``seed + i``."""
    out = []
    for start in range(0, len(labels), batch):
        chunk = labels[start : start + batch]
        res = pipe(chunk, num_points=num_points, num_inference_steps=steps, guidance_scale=guidance, seed=seed + start)
        out.append(np.asarray(res.points))
    return np.concatenate(out)


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """Markdown table: one row per set, percentages for COV/1-NNA, MMD-CD ×10³ and MMD-EMD ×10² (as papers)."""
    cols = [
        ("1-NNA-CD", "1-NNA-CD %", lambda v: f"{100 * v:.2f}"),
        ("1-NNA-EMD", "1-NNA-EMD %", lambda v: f"{100 * v:.2f}"),
        ("COV-CD", "COV-CD %", lambda v: f"{100 * v:.2f}"),
        ("COV-EMD", "COV-EMD %", lambda v: f"{100 * v:.2f}"),
        ("MMD-CD", "MMD-CD ×1e3", lambda v: f"{1e3 * v:.3f}"),
        ("MMD-EMD", "MMD-EMD ×1e2", lambda v: f"{1e2 * v:.3f}"),
        ("JSD", "JSD ×1e2", lambda v: f"{1e2 * v:.3f}"),
    ]
    present = [c for c in cols if any(c[0] in r for r in rows.values())]
    head = "| set | samples | refs | points | " + " | ".join(c[1] for c in present) + " |"
    lines = [head, "|" + "---|" * (4 + len(present))]
    for name, r in rows.items():
        vals = [c[2](r[c[0]]) if c[0] in r and not math.isnan(r[c[0]]) else "-" for c in present]
        lines.append(f"| {name} | {r['n_samples']} | {r['n_refs']} | {r['points']} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def evaluate_model(
    model: str | Path,
    refs: np.ndarray,
    labels: list[int],
    class_names: list[str],
    steps: int = 50,
    guidance: float = 1.0,
    seed: int = 0,
    emd: bool = True,
    emd_points: int | None = None,
    per_class: bool = True,
    pooled: bool = False,
    batch: int = 32,
) -> tuple[dict[str, dict[str, float]], np.ndarray]:
    """Generate one cloud per reference (its class) with ``model``; score per class (as the papers report
    per category) and, with ``pooled``, over all classes at once (quadratic in the whole set: slow on a CPU).

    Returns (table rows, generated clouds).
    """
    from pipelines.loading import load_pipeline

    pipe = load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    samples = generate_for(pipe, labels, refs.shape[1], steps, guidance, seed, batch)
    rows: dict[str, dict[str, float]] = {}
    label_arr = np.asarray(labels)
    if per_class:
        for c in sorted(set(labels)):
            m = label_arr == c
            rows[class_names[c]] = compute_all_metrics(samples[m], refs[m], emd=emd, emd_points=emd_points)
    if pooled or not per_class:
        rows["all"] = compute_all_metrics(samples, refs, emd=emd, emd_points=emd_points)
    return rows, samples


def procedural_refs(model: str | Path, per_class: int, num_points: int, seed: int) -> tuple[np.ndarray, list, list]:
    """The held-out (test split) procedural shapes for the classes a model was trained on."""
    from pipelines.catalog import read_model_index

    from .data.shapes import ProceduralShapes

    index = read_model_index(Path(model))
    names = [index["id2label"][str(i)] for i in range(len(index["id2label"]))]
    data_seed = seed
    cfg_path = Path(model) / "training_config.yaml"
    if cfg_path.is_file():
        import yaml

        data_seed = int((yaml.safe_load(cfg_path.read_text()) or {}).get("data", {}).get("seed", seed))
    ds = ProceduralShapes(names, per_class, num_points, split="test", seed=data_seed, resample_each_epoch=False)
    return ds.all_raw_points(), list(ds.labels), names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=Path, help="(M, N, 3) .npy of generated clouds")
    p.add_argument("--refs", type=Path, help="(M, N, 3) .npy of reference clouds")
    p.add_argument("--model", type=Path, help="a point-cloud pipeline directory (generates the samples)")
    p.add_argument("--shapenet", type=Path, help="PC15k root: score against its test split instead")
    p.add_argument("--category", action="append", default=[], help="ShapeNet categories (default: chair)")
    p.add_argument("--per-class", type=int, default=32, help="procedural held-out shapes per class (default 32)")
    p.add_argument("--points", type=int, default=2048, help="points per cloud (default 2048)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-emd", action="store_true", help="skip EMD (the slow part on a CPU)")
    p.add_argument("--emd-points", type=int, default=None, help="EMD on the first K points of each cloud")
    p.add_argument("--pooled", action="store_true", help="also score all classes together (slow)")
    p.add_argument("--save-samples", type=Path, help="write the generated clouds to this .npy")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    start = time.perf_counter()
    if args.samples is not None or args.refs is not None:
        if args.samples is None or args.refs is None:
            p.error("--samples and --refs go together")
        samples, refs = np.load(args.samples), np.load(args.refs)
        rows = {"all": compute_all_metrics(samples, refs, emd=not args.no_emd, emd_points=args.emd_points)}
    elif args.model is not None:
        if args.shapenet is not None:
            from pipelines.catalog import read_model_index

            from .data.shapenet import ShapeNetPC15k

            index = read_model_index(args.model)
            ds = ShapeNetPC15k(
                args.shapenet,
                args.category or ["chair"],
                split="test",
                num_points=args.points,
                mean=index.get("data_mean"),
                std=index.get("data_std"),
            )
            refs = np.stack([ds.raw_points(i) for i in range(len(ds))])
            model_names = [index["id2label"][str(i)] for i in range(len(index["id2label"]))]
            labels = [model_names.index(ds.class_names[lab]) for lab in ds.labels]
            names = model_names
        else:
            refs, labels, names = procedural_refs(args.model, args.per_class, args.points, args.seed)
        rows, samples = evaluate_model(
            args.model,
            refs,
            labels,
            names,
            args.steps,
            args.guidance,
            args.seed,
            not args.no_emd,
            args.emd_points,
            pooled=args.pooled,
        )
        if args.save_samples is not None:
            np.save(args.save_samples, samples)
    else:
        p.error("give --samples and --refs, or --model")
    print(format_table(rows))
    print(f"\n({time.perf_counter() - start:.0f} s; EMD: approximate matching (Fan et al.), Euclidean cost / N)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
