"""ShapeNetCore.v2.PC15k (the point clouds PointFlow released and DiT-3D trains on), read lazily.

Layout: ``<root>/<synset id>/{train,val,test}/<model id>.npy``, each an (15000, 3) float array sampled from a
ShapeNetCore.v2 mesh (y up, unit bounding-box diagonal). PointFlow's reader, which DiT-3D copies, keeps the
first 10,000 points of every shape for training and the last 5,000 for evaluation, subsamples 2,048 at random
per access, and normalises *globally*: one mean per axis and one scalar std over every coordinate of the
training split, reused for val/test. This reader does the same, with two deliberate differences:

* files are read on access (``np.load(mmap_mode="r")``) and the statistics are accumulated in one streaming
  pass, instead of holding the whole split in memory (the chair training split alone is 830 MB as float32);
* the random subsample is drawn without replacement (PointFlow's ``np.random.choice`` default repeats points,
  which adds duplicates and no information), from a generator seeded by (seed, epoch, index) so training
  resumes exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

# ShapeNetCore.v2 synset ids of the 55 categories PC15k covers (ShapeNet's taxonomy; PointFlow's names).
SYNSET_TO_CATEGORY: dict[str, str] = {
    "02691156": "airplane", "02747177": "can", "02773838": "bag", "02801938": "basket", "02808440": "bathtub",
    "02818832": "bed", "02828884": "bench", "02843684": "birdhouse", "02871439": "bookshelf", "02876657": "bottle",
    "02880940": "bowl", "02924116": "bus", "02933112": "cabinet", "02942699": "camera", "02946921": "tin_can",
    "02954340": "cap", "02958343": "car", "02992529": "cellphone", "03001627": "chair", "03046257": "clock",
    "03085013": "keyboard", "03207941": "dishwasher", "03211117": "monitor", "03261776": "earphone",
    "03325088": "faucet", "03337140": "file", "03467517": "guitar", "03513137": "helmet", "03593526": "jar",
    "03624134": "knife", "03636649": "lamp", "03642806": "laptop", "03691459": "speaker", "03710193": "mailbox",
    "03759954": "microphone", "03761084": "microwave", "03790512": "motorcycle", "03797390": "mug",
    "03928116": "piano", "03938244": "pillow", "03948459": "pistol", "03991062": "pot", "04004475": "printer",
    "04074963": "remote_control", "04090263": "rifle", "04099429": "rocket", "04225987": "skateboard",
    "04256520": "sofa", "04330267": "stove", "04379243": "table", "04401088": "telephone", "04460130": "tower",
    "04468005": "train", "04530566": "vessel", "04554684": "washer",
}  # fmt: skip
CATEGORY_TO_SYNSET = {v: k for k, v in SYNSET_TO_CATEGORY.items()}
SPLITS = ("train", "val", "test")
TRAIN_POINTS = 10_000  # PointFlow: points [:10000] are the training points of every shape ...
TEST_POINTS = 5_000  # ... and [10000:15000] the evaluation points.


def resolve_categories(categories: str | Sequence[str]) -> list[str]:
    """Category names or synset ids (or ``"all"``) -> synset ids, with a clear error for unknown names."""
    items = [categories] if isinstance(categories, str) else list(categories)
    if items == ["all"]:
        return sorted(SYNSET_TO_CATEGORY)
    out = []
    for item in items:
        item = str(item).strip()
        if item in SYNSET_TO_CATEGORY:
            out.append(item)
        elif item in CATEGORY_TO_SYNSET:
            out.append(CATEGORY_TO_SYNSET[item])
        else:
            raise ValueError(
                f"unknown ShapeNet category {item!r}; use a name ({', '.join(sorted(CATEGORY_TO_SYNSET)[:8])}, ...) "
                "or an 8-digit synset id"
            )
    if len(set(out)) != len(out):
        raise ValueError(f"categories {items} name the same synset twice")
    return out


class ShapeNetPC15k:
    """A map-style dataset over PC15k: ``{"points": (num_points, 3) float32 tensor, "label": category index}``.

    ``point_subset``: ``"train"`` (points [:10000]), ``"test"`` ([10000:]) or ``"all"``; by default the train
    split uses the training points and val/test the evaluation points, as PointFlow does. Shapes with fewer
    than 15,000 points (other exports) use all their points. ``mean``/``std`` default to the statistics of the
    *train* split of the same root and categories (computed on first use), so val/test are normalised as
    the model saw its training data.
    """

    def __init__(
        self,
        root: str | Path,
        categories: str | Sequence[str] = "chair",
        split: str = "train",
        num_points: int = 2048,
        point_subset: str | None = None,
        random_subsample: bool | None = None,
        mean: Sequence[float] | None = None,
        std: float | None = None,
        seed: int = 0,
    ):
        self.root = Path(root)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"{self.root} does not exist; point data.root to the ShapeNetCore.v2.PC15k folder "
                "(the one holding synset folders such as 03001627/)"
            )
        self.synsets = resolve_categories(categories)
        self.class_names = [SYNSET_TO_CATEGORY[s] for s in self.synsets]
        self.split = split
        self.num_points = int(num_points)
        self.point_subset = point_subset or ("train" if split == "train" else "test")
        if self.point_subset not in ("train", "test", "all"):
            raise ValueError(f"point_subset must be train, test or all, got {self.point_subset!r}")
        self.random_subsample = split == "train" if random_subsample is None else random_subsample
        self.seed = int(seed)
        self.epoch = 0
        self.files, self.labels = self._list(split)
        if not self.files:
            raise FileNotFoundError(
                f"no .npy shapes under {self.root}/<synset>/{split}/ for {', '.join(self.class_names)}; "
                f"expected the PC15k layout, e.g. {self.root}/{self.synsets[0]}/{split}/<model id>.npy"
            )
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither (then the train split's statistics are used)")
        self.max_abs: float | None = None  # largest |raw coordinate| of the train split, when measured
        if mean is None:
            self.mean, self.std = self.train_statistics()
        else:
            self.mean, self.std = np.asarray(mean, np.float32).reshape(1, 3), float(std)

    def _list(self, split: str) -> tuple[list[Path], list[int]]:
        files, labels = [], []
        for label, synset in enumerate(self.synsets):
            folder = self.root / synset / split
            if not folder.is_dir():
                continue
            found = sorted(folder.glob("*.npy"))
            files += found
            labels += [label] * len(found)
        return files, labels

    def _load(self, path: Path) -> np.ndarray:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as e:
            raise ValueError(f"{path} is not a readable .npy point cloud ({e})") from None
        if arr.ndim != 2 or arr.shape[1] != 3 or len(arr) == 0:
            raise ValueError(f"{path} holds an array of shape {arr.shape}; expected (num_points, 3)")
        return arr

    def _subset(self, arr: np.ndarray) -> np.ndarray:
        if len(arr) < TRAIN_POINTS + TEST_POINTS or self.point_subset == "all":
            return arr
        return arr[:TRAIN_POINTS] if self.point_subset == "train" else arr[TRAIN_POINTS:]

    def train_statistics(self) -> tuple[np.ndarray, float]:
        """Global mean (per axis) and scalar std over every point of the train split (streaming, float64)."""
        files = self._list("train")[0] if self.split != "train" else self.files
        if not files:
            raise FileNotFoundError(
                f"no train split under {self.root} for {', '.join(self.class_names)} to take normalisation "
                "statistics from; pass mean and std explicitly"
            )
        n, total, total_sq, max_abs = 0, np.zeros(3), 0.0, 0.0
        for path in files:
            arr = np.asarray(self._load(path), dtype=np.float64)
            n += len(arr)
            total += arr.sum(axis=0)
            total_sq += float((arr * arr).sum())
            max_abs = max(max_abs, float(np.abs(arr).max()))
        self.max_abs = max_abs
        mean = total / n
        # PointFlow: std of all coordinates about their common (scalar) mean.
        common = mean.mean()
        std = float(np.sqrt(max(total_sq / (3 * n) - common * common, 0.0)))
        return mean.astype(np.float32).reshape(1, 3), std

    def __len__(self) -> int:
        return len(self.files)

    def set_normalization(self, mean: Sequence[float] | np.ndarray, std: float) -> None:
        self.mean, self.std = np.asarray(mean, np.float32).reshape(1, 3), float(std)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def raw_points(self, index: int) -> np.ndarray:
        """(num_points, 3) un-normalised points of shape ``index`` (subsampled as configured)."""
        arr = self._subset(self._load(self.files[index]))
        n = self.num_points
        if self.random_subsample:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            idx = rng.choice(len(arr), n, replace=len(arr) < n)
        else:
            idx = np.arange(n) % len(arr)
        return np.asarray(arr[np.sort(idx)], dtype=np.float32)

    def __getitem__(self, index: int) -> dict:
        import torch

        pts = (self.raw_points(index) - self.mean) / self.std
        return {"points": torch.from_numpy(pts.astype(np.float32)), "label": self.labels[index]}
