"""Evaluate a class- or text-conditional image generator: does it draw what was asked, without copying?

``python -m training.evaluate --pipeline runs/emoji-dit/pipeline --data data/emoji
[--samples-per-class 16 --steps 20 --guidance 3 --seed 0 --classifier runs/emoji-classifier
--out report.json --grid samples.png]``

Three questions, each answered with a number and the baseline it should be read against:

1. **Category accuracy.** A small CNN (:mod:`training.classifier`) trained on the same folder
   classifies every sample. A class-conditional pipeline is asked for each class in turn; a
   text-to-image one is given emoji names drawn from ``metadata.jsonl``, and the target is
   the category of the item the caption belongs to. Top-1 and top-3 are printed beside
   chance (1/K, 3/K) and beside the classifier's own accuracy on held-out *real* images,
   which is the ceiling a perfect generator would reach.
2. **Memorisation.** On 1.9 k training images a diffusion model can learn to return its
   training set. For each sample we take the L2 distance to its nearest training image, in
   pixel space and in the classifier's feature space, and compare it with the training
   set's own leave-one-out nearest-neighbour distances: a sample closer to a training image
   than 99 % of training images are to each other (``<=`` the 1st percentile) is counted
   as a near-copy.
3. **FID**, through torch-fidelity or clean-fid, only when their Inception weights are
   already on disk: this never downloads. Otherwise the report says FID was skipped and
   where to put the weights. At 32 px and a few hundred samples FID is a coarse, biased
   number; use it to compare runs at equal sample counts, not against published figures.

The report is printed as a table and, with ``--out``, written as JSON (with per-sample
predictions and nearest training files, so a near-copy can be looked at).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .classifier import EmojiClassifier, ImageSet, is_held_out, load_classifier, load_image_set

__all__ = [
    "CLEAN_FID_DIR",
    "CLEAN_FID_WEIGHTS",
    "TORCH_FIDELITY_WEIGHTS",
    "Request",
    "category_accuracy",
    "class_map",
    "compute_fid",
    "evaluate",
    "fid_weight_locations",
    "format_report",
    "main",
    "memorisation",
    "nearest_neighbours",
    "pick_captions",
    "save_grid",
]

DEFAULT_CLASSIFIER = "runs/emoji-classifier"

#: torch-fidelity's Inception file; it looks for it in torch hub's ``checkpoints`` folder.
TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
#: clean-fid's TorchScript Inception; clean-fid always looks in ``/tmp`` (``./`` on Windows).
CLEAN_FID_WEIGHTS = "inception-2015-12-05.pt"
CLEAN_FID_DIR = Path("./" if os.name == "nt" else "/tmp")


# --------------------------------------------------------------------------- accuracy


def category_accuracy(
    probs: np.ndarray | torch.Tensor, targets: Sequence[int], class_names: Sequence[str], k: int = 3
) -> dict[str, Any]:
    """Top-1 / top-``k`` accuracy of predictions ``probs[i]`` (scores over classes) against ``targets[i]``.

    Reported overall and per target class, with the uniform chance level beside each
    (``1/K`` and ``k/K`` for ``K`` classes), because "40 %" means little until one knows
    whether there were 3 classes or 30.
    """
    p = torch.as_tensor(np.asarray(probs), dtype=torch.float64)
    t = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    num = p.shape[1]
    kk = min(k, num)
    ranked = p.topk(kk, dim=1).indices if len(p) else torch.zeros(0, kk, dtype=torch.long)
    top1 = (ranked[:, 0] == t) if len(p) else torch.zeros(0, dtype=torch.bool)
    topk = (ranked == t[:, None]).any(dim=1) if len(p) else torch.zeros(0, dtype=torch.bool)

    def mean(x: torch.Tensor) -> float:
        return float(x.double().mean()) if len(x) else float("nan")

    per_class = {}
    for c in sorted(set(t.tolist())):
        sel = t == c
        per_class[class_names[c]] = {"n": int(sel.sum()), "top1": mean(top1[sel]), f"top{k}": mean(topk[sel])}
    return {
        "n": len(t),
        "top1": mean(top1),
        f"top{k}": mean(topk),
        "chance_top1": 1.0 / num,
        f"chance_top{k}": kk / num,
        "per_class": per_class,
        "predicted": ranked[:, 0].tolist(),
    }


# --------------------------------------------------------------------------- memorisation


def nearest_neighbours(
    queries: torch.Tensor, reference: torch.Tensor, exclude_self: bool = False, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """Distance to and index of each query's nearest reference row (L2 over flattened rows).

    ``exclude_self`` is the leave-one-out case (``queries`` is ``reference``): row ``i`` may
    not match itself. The search uses the fast matrix-product form in float64; the winning
    distance is then recomputed directly, so an exact copy reads exactly 0 rather than the
    1e-6 of cancellation error that would make a threshold of 0 miss it.
    """
    q = queries.reshape(len(queries), -1).double()
    r = reference.reshape(len(reference), -1).double()
    if exclude_self and len(q) != len(r):
        raise ValueError("exclude_self needs queries to be the reference set itself")
    if len(r) - int(exclude_self) < 1:
        raise ValueError("need at least one reference image to compare with")
    r2 = (r * r).sum(1)
    idx = torch.empty(len(q), dtype=torch.long)
    for s in range(0, len(q), chunk):
        qc = q[s : s + chunk]
        d2 = (qc * qc).sum(1)[:, None] + r2[None, :] - 2 * qc @ r.T
        if exclude_self:
            rows = torch.arange(len(qc))
            d2[rows, rows + s] = float("inf")
        idx[s : s + chunk] = d2.argmin(dim=1)
    dist = (q - r[idx]).norm(dim=1)
    return dist.float(), idx


def memorisation(
    samples: torch.Tensor, train: torch.Tensor, percentile: float = 1.0, train_loo: torch.Tensor | None = None
) -> dict[str, Any]:
    """Nearest-training-image distances of ``samples`` against the training set's own spacing.

    A sample is a near-copy when its nearest training image is at most as far as the
    ``percentile``-th percentile of the training images' leave-one-out nearest-neighbour
    distances: closer than all but the tightest pairs (skin-tone variants, look-alike flags)
    that the data itself contains. Exact duplicates in the training set (distance 0; the
    emoji set has 25, e.g. two codepoints drawn alike) are left out of that percentile and
    counted separately, or they would pull the threshold to 0 and only bit-exact copies
    would count. ``train_loo`` can be passed to reuse a computation.
    """
    if train_loo is None:
        train_loo, _ = nearest_neighbours(train, train, exclude_self=True)
    dist, idx = nearest_neighbours(samples, train)
    spacing = train_loo[train_loo > 0]
    threshold = float(np.percentile(spacing.numpy(), percentile)) if len(spacing) else 0.0
    near = (dist <= threshold).numpy()
    sample_median = float(dist.median()) if len(dist) else float("nan")
    train_median = float(train_loo.median())
    return {
        "sample_nn_median": sample_median,
        "train_loo_nn_median": train_median,
        "ratio": sample_median / train_median if train_median > 0 else float("nan"),
        "percentile": percentile,
        "threshold": threshold,
        "train_duplicates": int((train_loo == 0).sum()),
        "near_copies": int(near.sum()),
        "near_copy_fraction": float(near.mean()) if len(near) else float("nan"),
        "is_near_copy": near.tolist(),
        "distance": dist.tolist(),
        "nearest": idx.tolist(),
    }


# --------------------------------------------------------------------------- FID


def fid_weight_locations() -> dict[str, Path]:
    """Where each FID backend looks for its Inception weights (computed now: ``TORCH_HOME`` may change)."""
    return {
        "torch-fidelity": Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS,
        "clean-fid": CLEAN_FID_DIR / CLEAN_FID_WEIGHTS,
    }


_MODULES = {"torch-fidelity": "torch_fidelity", "clean-fid": "cleanfid"}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _how_to_enable() -> str:
    loc = fid_weight_locations()
    have = [b for b, m in _MODULES.items() if _installed(m)]
    installed = f"installed here: {', '.join(have)}" if have else "neither is installed here"
    return (
        f"To enable FID, install a backend built for this torch (pip install torch-fidelity, or clean-fid; "
        f"{installed}) "
        f"and put its Inception weights on this machine: torch-fidelity: {TORCH_FIDELITY_WEIGHTS} in "
        f"{loc['torch-fidelity'].parent} (or pass --fid-weights FILE); clean-fid: {CLEAN_FID_WEIGHTS} in "
        f"{loc['clean-fid'].parent}. Nothing is downloaded by this tool."
    )


class _Uint8Images(torch.utils.data.Dataset):
    """``[N, H, W, 3]`` uint8 as the ``[3, H, W]`` uint8 tensors torch-fidelity's input datasets yield."""

    def __init__(self, images: np.ndarray):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.images[i].transpose(2, 0, 1)))


def compute_fid(real: np.ndarray, fake: np.ndarray, weights: str | Path | None = None) -> dict[str, Any]:
    """FID between uint8 ``[N, H, W, 3]`` image sets, or a "skipped" record saying why and how to enable it.

    Never downloads: torch-fidelity gets an explicit weights path, and clean-fid is only
    called when its file is already where it would otherwise fetch it to.
    """
    if len(real) < 2 or len(fake) < 2:
        return {"status": "skipped", "message": "FID skipped: needs at least 2 real and 2 generated images."}
    loc = fid_weight_locations()
    candidates: list[tuple[str, Path]]
    if weights is not None:
        path = Path(weights)
        backend = "clean-fid" if path.suffix == ".pt" else "torch-fidelity"
        candidates = [(backend, path)]
    else:
        candidates = list(loc.items())
    found = [(b, p) for b, p in candidates if p.is_file()]
    usable = [(b, p) for b, p in found if _installed(_MODULES[b])]
    if not usable:
        if found:
            have = ", ".join(f"{p} (for {b})" for b, p in found)
            why = f"Inception weights found at {have}, but that backend is not installed."
        else:
            looked = ", ".join(str(p) for _, p in candidates)
            why = f"no Inception weights found locally (looked for {looked})."
        return {"status": "skipped", "message": f"FID skipped: {why} {_how_to_enable()}"}
    backend, path = usable[0]
    try:
        if backend == "torch-fidelity":
            import torch_fidelity

            metrics = torch_fidelity.calculate_metrics(
                input1=_Uint8Images(fake),
                input2=_Uint8Images(real),
                fid=True,
                cuda=torch.cuda.is_available(),
                feature_extractor_weights_path=str(path),
                cache=False,
                verbose=False,
            )
            value = float(metrics["frechet_inception_distance"])
        else:
            from cleanfid import fid as cleanfid

            with tempfile.TemporaryDirectory() as tmp:
                dirs = []
                for name, images in (("real", real), ("fake", fake)):
                    d = Path(tmp) / name
                    d.mkdir()
                    for i, im in enumerate(images):
                        Image.fromarray(im).save(d / f"{i:05d}.png")
                    dirs.append(str(d))
                device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
                value = float(cleanfid.compute_fid(dirs[1], dirs[0], mode="clean", device=device, num_workers=0))
    except Exception as e:  # a backend/version mismatch should not lose the rest of the report
        return {"status": "failed", "backend": backend, "weights": str(path), "message": f"FID failed: {e!r}"}
    return {
        "status": "ok",
        "backend": backend,
        "weights": str(path),
        "fid": value,
        "n_real": len(real),
        "n_fake": len(fake),
    }


# --------------------------------------------------------------------------- generation


@dataclass
class Request:
    """One image to generate: its condition, the classifier class it should land in, and its grid row."""

    condition: int | str  # pipeline class id, or a caption
    target: int  # classifier class index
    row: str  # grid row / report group (class or category name)
    seed: int = 0
    file_name: str | None = None  # the data item a caption came from
    held_out: bool | None = None  # whether that item is in the classifier's held-out split
    extra: dict[str, Any] = field(default_factory=dict)


def _norm(name: Any) -> str:
    return " ".join(str(name).lower().replace("_", " ").split())


def class_map(pipe: Any, classifier: EmojiClassifier) -> dict[int, int]:
    """Pipeline class id -> classifier class index, matched by name (case and spacing ignored).

    By name rather than by id because the two may be trained on different subsets of a
    folder's categories. Pipeline classes without a match are left out (and reported);
    when no names match at all but the counts agree, ids are taken as identical.
    """
    names = [_norm(n) for n in classifier.config.class_names or []]
    mapping: dict[int, int] = {}
    for i in range(pipe.num_classes):
        name = pipe.class_name(i)
        if name is not None and _norm(name) in names:
            mapping[i] = names.index(_norm(name))
    if not mapping and pipe.num_classes == int(classifier.config.num_classes):
        mapping = {i: i for i in range(pipe.num_classes)}
    if not mapping:
        raise ValueError(
            f"none of the pipeline's classes ({[pipe.class_name(i) for i in range(pipe.num_classes)]}) match the "
            f"classifier's ({list(classifier.config.class_names or [])}); train the classifier on the same data"
        )
    return mapping


def pick_captions(
    data: ImageSet,
    classifier: EmojiClassifier,
    per_category: int,
    seed: int = 0,
    split: str = "any",
    val_fraction: float = 0.1,
) -> list[tuple[str, int, str, bool]]:
    """``per_category`` captions per classifier class, drawn reproducibly from the data's captioned items.

    Returns ``(caption, classifier class, file name, held out)``. ``split`` restricts the
    draw to the classifier's held-out items (``"val"``), the rest (``"train"``) or neither
    (``"any"``); the generator itself saw every item, so this only matters for the classifier.
    """
    if split not in ("any", "val", "train"):
        raise ValueError(f"split must be 'any', 'val' or 'train', got {split!r}")
    cats = list(classifier.config.categories or range(int(classifier.config.num_classes)))
    rng = np.random.default_rng(seed)
    out = []
    for c, category in enumerate(cats):
        pool = []
        for i in range(len(data)):
            if int(data.labels[i]) != int(category) or not data.texts[i]:
                continue
            held = is_held_out(data.file_names[i], val_fraction)
            if split == "any" or (split == "val") == held:
                pool.append((data.texts[i], c, data.file_names[i], held))
        if pool:
            chosen = sorted(rng.choice(len(pool), size=min(per_category, len(pool)), replace=False).tolist())
            out.extend(pool[j] for j in chosen)
    return out


def generate(
    pipe: Any, requests: list[Request], steps: int, guidance: float, batch_size: int = 64, log: bool = True
) -> np.ndarray:
    """Run the pipeline over ``requests`` in batches; ``[N, H, W, 3]`` float in [0, 1].

    Each image is generated from its own seed, so results do not depend on ``batch_size``.
    """
    out = []
    text = getattr(pipe, "kind", "") == "text-to-image"
    start = time.perf_counter()
    for s in range(0, len(requests), batch_size):
        chunk = requests[s : s + batch_size]
        conds = [r.condition for r in chunk]
        kwargs = {
            "num_images_per_prompt": 1,
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "seed": [r.seed for r in chunk],
            "output_type": "np",
        }
        result = pipe(conds, **kwargs) if text else pipe(class_labels=conds, **kwargs)
        out.append(np.asarray(result.images, dtype=np.float32))
        if log:
            done = min(s + batch_size, len(requests))
            print(f"generated {done}/{len(requests)} ({time.perf_counter() - start:.0f}s)", file=sys.stderr, flush=True)
    return np.concatenate(out) if out else np.zeros((0, 1, 1, 3), np.float32)


# --------------------------------------------------------------------------- grid


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: bitmap font only
        return ImageFont.load_default()


def _fit_lines(text: str, font: Any, width: float, max_lines: int) -> list[str]:
    """Word-wrap ``text`` to ``width`` pixels in ``font``, at most ``max_lines``, ending in "..." when cut.

    Measured in pixels rather than characters, and never splitting a word, so "blueberries"
    is not printed as "blueberrie / s" under a 64 px tile.
    """
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    cut = len(lines) > max_lines
    lines = lines[:max_lines]
    for i, line in enumerate(lines):
        last = i == len(lines) - 1
        if font.getlength(line) <= width and not (last and cut):
            continue
        while line and font.getlength(line + "...") > width:
            line = line[:-1]
        lines[i] = line.rstrip(" ,") + "..."
    return lines


def save_grid(
    rows: Sequence[tuple[str, Sequence[np.ndarray], Sequence[str] | None]],
    path: str | Path,
    tile: int = 64,
    label_width: int = 150,
) -> Path:
    """One row per class / prompt group: a name on the left, then its samples (upscaled, nearest neighbour).

    ``rows`` holds ``(row label, images in [0, 1] HxWx3, optional caption per image)``; a
    caption is written under its tile. Nearest-neighbour upscaling keeps 32 px samples
    honest: a README reader sees the pixels the model made, not an interpolation.
    """
    cols = max((len(imgs) for _, imgs, _ in rows), default=1) or 1
    has_captions = any(caps for _, _, caps in rows)
    cap_h = 26 if has_captions else 0
    pad = 4
    font, small = _font(13), _font(10)
    width = label_width + cols * (tile + pad) + pad
    height = len(rows) * (tile + cap_h + pad) + pad
    canvas = Image.new("RGB", (width, max(height, 1)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images, captions) in enumerate(rows):
        y = pad + r * (tile + cap_h + pad)
        lines = textwrap.wrap(label, 20)[:3]
        for j, line in enumerate(lines):
            draw.text((pad, y + tile // 2 - 8 * len(lines) + 16 * j), line, fill="black", font=font)
        for c, img in enumerate(images):
            x = label_width + pad + c * (tile + pad)
            arr = (np.clip(np.asarray(img), 0, 1) * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(arr).resize((tile, tile), Image.Resampling.NEAREST), (x, y))
            if captions and c < len(captions):
                for j, line in enumerate(_fit_lines(captions[c], small, tile, 2)):
                    draw.text((x, y + tile + 1 + 12 * j), line, fill="dimgray", font=small)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# --------------------------------------------------------------------------- evaluation


def _to_unit(images: torch.Tensor) -> torch.Tensor:
    return (images.float() + 1) / 2


def evaluate(
    pipeline: str | Path | Any,
    data: str | Path,
    classifier: str | Path = DEFAULT_CLASSIFIER,
    *,
    samples_per_class: int = 16,
    images_per_caption: int = 1,
    caption_split: str = "any",
    steps: int = 20,
    guidance: float = 3.0,
    seed: int = 0,
    batch_size: int = 64,
    percentile: float = 1.0,
    fid: bool = True,
    fid_weights: str | Path | None = None,
    grid: str | Path | None = None,
    grid_cols: int = 8,
    log: bool = True,
) -> dict[str, Any]:
    """Generate, classify, measure distances to the training set, FID if possible; return the report dict.

    ``samples_per_class`` is per class for a class-conditional pipeline and per category for
    a text-to-image one (``ceil(N / images_per_caption)`` captions each), so both kinds are
    scored on the same number of images.
    """
    from pipelines import load_pipeline

    t0 = time.perf_counter()
    pipe = load_pipeline(pipeline) if isinstance(pipeline, (str, Path)) else pipeline
    pipe.set_progress_bar_config(disable=True)
    kind = getattr(pipe, "kind", "unknown")
    if kind not in ("class-to-image", "text-to-image"):
        raise ValueError(f"evaluate handles class-to-image and text-to-image pipelines, not {kind!r}")
    clf, clf_metrics = load_classifier(classifier) if isinstance(classifier, (str, Path)) else (classifier, {})
    clf_names = list(clf.config.class_names or [str(i) for i in range(int(clf.config.num_classes))])
    clf_cats = list(clf.config.categories or range(int(clf.config.num_classes)))
    val_fraction = float(clf_metrics.get("val_fraction", 0.1))
    data_clf = load_image_set(data, int(clf.config.resolution))

    notes: list[str] = []
    requests: list[Request] = []
    if kind == "class-to-image":
        cmap = class_map(pipe, clf)
        unmatched = [pipe.class_name(i) or str(i) for i in range(pipe.num_classes) if i not in cmap]
        if unmatched:
            notes.append(f"pipeline classes without a classifier class, not evaluated: {unmatched}")
        for pid, cid in cmap.items():
            for _ in range(samples_per_class):
                requests.append(Request(pid, cid, clf_names[cid]))
        train_categories = {clf_cats[c] for c in cmap.values()}
    else:
        per_cat = math.ceil(samples_per_class / images_per_caption)
        captions = pick_captions(data_clf, clf, per_cat, seed, caption_split, val_fraction)
        for text, cid, file_name, held in captions:
            for _ in range(images_per_caption):
                requests.append(Request(text, cid, clf_names[cid], file_name=file_name, held_out=held))
        train_categories = None  # a text model trains on every captioned item
        skipped = sorted({int(v) for v in data_clf.labels.tolist()} - set(clf_cats) - {-1})
        if skipped:
            notes.append(f"captions of dataset labels {skipped} not sampled: the classifier has no such class")
    if not requests:
        raise ValueError("nothing to generate: no classes or captions matched the classifier")
    for i, r in enumerate(requests):
        r.seed = seed + i

    images = generate(pipe, requests, steps, guidance, batch_size, log)
    t_gen = time.perf_counter() - t0
    samples = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # [N, 3, H, W] in [0, 1]
    probs, feats = clf.predict(samples * 2 - 1)
    targets = [r.target for r in requests]
    acc = category_accuracy(probs.numpy(), targets, clf_names)

    # The generator's training set, at the sample resolution (pixels) and the classifier's (features).
    keep = [train_categories is None or int(v) in train_categories for v in data_clf.labels.tolist()]
    train_clf = data_clf.subset(keep)
    res = int(samples.shape[-1])
    train_px = train_clf if res == data_clf.images.shape[-1] else load_image_set(data, res).subset(keep)
    _, train_feats = clf.predict(train_clf.images)
    mem_px = memorisation(samples, _to_unit(train_px.images), percentile)
    mem_ft = memorisation(feats, train_feats, percentile)

    if fid:
        to_u8 = lambda x: (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # noqa: E731
        fid_report = compute_fid(to_u8(_to_unit(train_px.images)), to_u8(samples), fid_weights)
    else:
        fid_report = {"status": "skipped", "message": "FID skipped: --no-fid given."}

    per_sample = []
    for i, r in enumerate(requests):
        entry = {
            "index": i,
            "seed": r.seed,
            "condition": r.condition,
            "target": clf_names[r.target],
            "predicted": clf_names[acc["predicted"][i]],
            "pixel_nn": train_px.file_names[mem_px["nearest"][i]],
            "pixel_nn_distance": mem_px["distance"][i],
            "feature_nn": train_clf.file_names[mem_ft["nearest"][i]],
            "feature_nn_distance": mem_ft["distance"][i],
            "near_copy_pixel": mem_px["is_near_copy"][i],
            "near_copy_feature": mem_ft["is_near_copy"][i],
        }
        if r.file_name is not None:
            entry.update(caption_file=r.file_name, caption_held_out=r.held_out)
        per_sample.append(entry)

    grid_path = None
    if grid:
        rows: dict[str, tuple[list[np.ndarray], list[str]]] = {}
        seen: set[str] = set()
        for i, r in enumerate(requests):
            imgs, caps = rows.setdefault(r.row, ([], []))
            # t2i: one tile per caption (its first image), so a row shows several names of its category
            if kind == "text-to-image" and (r.condition in seen):
                continue
            seen.add(str(r.condition))
            if len(imgs) < grid_cols:
                imgs.append(images[i])
                caps.append(str(r.condition))
        grid_rows = [(name, imgs, caps if kind == "text-to-image" else None) for name, (imgs, caps) in rows.items()]
        grid_path = str(save_grid(grid_rows, grid))

    for m in (mem_px, mem_ft):
        for key in ("is_near_copy", "distance", "nearest"):
            m.pop(key)
    predicted = acc.pop("predicted")
    # what the classifier saw, whatever was asked: a generator that collapses onto one look shows up here
    acc["predicted_counts"] = {name: predicted.count(c) for c, name in enumerate(clf_names)}
    real_val = (clf_metrics.get("val") or {}) if clf_metrics else {}
    return {
        "pipeline": str(pipeline) if isinstance(pipeline, (str, Path)) else type(pipeline).__name__,
        "kind": kind,
        "data": str(data),
        "classifier": {
            "path": str(classifier) if isinstance(classifier, (str, Path)) else None,
            "classes": clf_names,
            "real_heldout_top1": real_val.get("top1"),
            "real_heldout_top3": real_val.get("top3"),
            "real_heldout_n": real_val.get("n"),
        },
        "settings": {
            "samples_per_class": samples_per_class,
            "images_per_caption": images_per_caption if kind == "text-to-image" else None,
            "caption_split": caption_split if kind == "text-to-image" else None,
            "steps": steps,
            "guidance": guidance,
            "seed": seed,
            "resolution": res,
        },
        "num_samples": len(requests),
        "num_train_images": len(train_px),
        "accuracy": acc,
        "memorisation": {"pixel": mem_px, "feature": mem_ft},
        "fid": fid_report,
        "grid": grid_path,
        "notes": notes,
        "seconds": {"generation": round(t_gen, 1), "total": round(time.perf_counter() - t0, 1)},
        "samples": per_sample,
    }


def _pct(x: float | None) -> str:
    return "   n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}%"


def format_report(report: dict[str, Any]) -> str:
    """The report as the plain-text table the CLI prints."""
    s, acc, clf = report["settings"], report["accuracy"], report["classifier"]
    lines = [
        f"{report['pipeline']} ({report['kind']}): {report['num_samples']} samples at {s['resolution']} px, "
        f"{s['steps']} steps, guidance {s['guidance']}, seed {s['seed']}",
        f"classifier {clf['path']}: real held-out images top-1 {_pct(clf['real_heldout_top1'])}, "
        f"top-3 {_pct(clf['real_heldout_top3'])} (the ceiling for generated images)",
        "",
        f"{'category accuracy':<28}{'n':>5}{'top-1':>9}{'top-3':>9}",
    ]
    for name, v in acc["per_class"].items():
        lines.append(f"  {name[:26]:<26}{v['n']:>5}{_pct(v['top1']):>9}{_pct(v['top3']):>9}")
    lines.append(f"  {'overall':<26}{acc['n']:>5}{_pct(acc['top1']):>9}{_pct(acc['top3']):>9}")
    lines.append(f"  {'chance (uniform)':<26}{'':>5}{_pct(acc['chance_top1']):>9}{_pct(acc['chance_top3']):>9}")
    px, ft = report["memorisation"]["pixel"], report["memorisation"]["feature"]
    pct_label = f"near-copy threshold (train p{px['percentile']:g} of LOO)"
    lines += [
        "",
        f"{'memorisation (nearest training image, L2)':<44}{'pixel':>10}{'feature':>10}",
        f"  {'median, samples':<42}{px['sample_nn_median']:>10.3f}{ft['sample_nn_median']:>10.3f}",
        f"  {'median, training leave-one-out':<42}{px['train_loo_nn_median']:>10.3f}{ft['train_loo_nn_median']:>10.3f}",
        f"  {pct_label:<42}{px['threshold']:>10.3f}{ft['threshold']:>10.3f}",
        f"  {'training images with an exact duplicate':<42}{px['train_duplicates']:>10}{ft['train_duplicates']:>10}",
        f"  {'near copies (<= threshold)':<42}{_pct(px['near_copy_fraction']):>10}{_pct(ft['near_copy_fraction']):>10}",
        f"  (pixel L2 on [0, 1] RGB at {s['resolution']} px over {report['num_train_images']} training images; "
        "feature L2 on unit-normalised classifier features)",
        "",
    ]
    f = report["fid"]
    if f["status"] == "ok":
        lines.append(f"FID ({f['backend']}): {f['fid']:.2f}  ({f['n_fake']} samples vs {f['n_real']} training images)")
    else:
        lines.append(f["message"])
    for note in report["notes"]:
        lines.append(f"note: {note}")
    if report.get("grid"):
        lines.append(f"grid: {report['grid']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="pipeline directory, catalog name or hub id")
    p.add_argument("--data", required=True, help="the image folder the pipeline was trained on")
    p.add_argument("--classifier", default=DEFAULT_CLASSIFIER, help="from python -m training.classifier")
    p.add_argument("--samples-per-class", type=int, default=16, help="per class (class model) or category (text)")
    p.add_argument("--images-per-caption", type=int, default=1, help="text models: images per sampled caption")
    p.add_argument("--caption-split", choices=["any", "val", "train"], default="any")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--percentile", type=float, default=1.0, help="near-copy threshold percentile")
    p.add_argument("--no-fid", action="store_true", help="do not attempt FID")
    p.add_argument("--fid-weights", default=None, help=f"torch-fidelity Inception weights ({TORCH_FIDELITY_WEIGHTS})")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--grid", default=None, help="save a sample grid PNG here (one row per class / category)")
    p.add_argument("--grid-cols", type=int, default=8)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report = evaluate(
        args.pipeline,
        args.data,
        args.classifier,
        samples_per_class=args.samples_per_class,
        images_per_caption=args.images_per_caption,
        caption_split=args.caption_split,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        percentile=args.percentile,
        fid=not args.no_fid,
        fid_weights=args.fid_weights,
        grid=args.grid,
        grid_cols=args.grid_cols,
    )
    print(format_report(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"report: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
