"""Build a real text-image training folder from the Noto emoji set.

    python -m training.data.emoji --out data/emoji --size 32
    python -m training.data.emoji --out data/emoji-animals --label-by subcategory \\
        --categories "Animals & Nature" --min-per-class 10
    python -m training.data.emoji --list            # counts per category/subcategory only

Why this source: the machines that build DiT Studio reach package registries but no
model or dataset hub, and the shipped default models still have to be trained on real
images with real text. The npm package ``emoji-datasource-google`` (emoji-data by Cal
Henderson, MIT) carries Google's Noto emoji images (Apache-2.0) at 64 px, plus
``emoji.json`` with each emoji's name, short names, category and subcategory: about
1,900 distinct images with captions and class labels.

The package is fetched with ``npm pack`` (the registry tarball only, nothing installed)
into ``~/.cache/dit-studio/`` (override with ``--cache-dir`` or ``$DIT_STUDIO_CACHE``),
or taken from ``--package-dir`` (an unpacked package or a ``.tgz``).

Output, readable by :func:`training.data.datasets.open_image_folder` and by Hugging Face
``datasets``' ``imagefolder``::

    out/images/<codepoints>.png   RGB, transparency composited onto white, --size px
    out/metadata.jsonl            {"file_name", "text", "label", "name", "category", "subcategory"}
    out/classes.json              {"0": "<class name>", ...}: label index -> name
    out/source.json               package, version, licence and the options used

Caption rule (``--caption``):

* ``name``: the emoji's Unicode name, lowercased: ``GRINNING FACE`` -> ``"grinning face"``.
* ``name+short`` (default): the name, then each short name that adds a word the name
  does not already contain, joined with ", ": ``FATHER CHRISTMAS`` / ``santa`` ->
  ``"father christmas, santa"``; ``GRINNING FACE`` / ``grinning`` -> ``"grinning face"``.
  Short names are normalised first (``_`` and ``-`` become spaces, trailing digits are
  dropped: ``cat2`` -> ``cat``), and codes that are not words are left out (``+1``,
  ``flag-ad``, ``u7121``, single letters).
* Skin-tone variations (only with ``--include-skin-variations``) append the tone:
  ``"waving hand sign, medium skin tone"``.

Labels: ``--label-by category`` (default) or ``subcategory``; classes are numbered in
Unicode's emoji order (the order of the first emoji of each class), so label 0 is
"Smileys & Emotion" when that category is included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from .images import BadImageError, load_image

__all__ = [
    "EMOJI_PACKAGE",
    "EMOJI_PACKAGE_VERSION",
    "EmojiBuildResult",
    "EmojiItem",
    "build_emoji_dataset",
    "emoji_caption",
    "fetch_emoji_package",
    "load_emoji_items",
    "main",
    "resolve_package_dir",
    "unpack_package",
]

EMOJI_PACKAGE = "emoji-datasource-google"
#: Pinned so a rebuilt dataset (and every model trained from it) is the same dataset.
EMOJI_PACKAGE_VERSION = "16.0.0"
IMAGE_DIR = "img/google/64"
IMAGES_LICENSE = "Apache-2.0 (Noto Emoji, https://github.com/googlefonts/noto-emoji)"
DATA_LICENSE = "MIT (emoji-data by Cal Henderson, https://github.com/iamcal/emoji-data)"
SKIN_TONES = {
    "1F3FB": "light skin tone",
    "1F3FC": "medium-light skin tone",
    "1F3FD": "medium skin tone",
    "1F3FE": "medium-dark skin tone",
    "1F3FF": "dark skin tone",
}
_MARKER = "source.json"  # identifies an output folder this script wrote (safe to overwrite)
_UNPACKED_MARKER = ".unpacked-ok"


def default_cache_dir() -> Path:
    return Path(os.environ.get("DIT_STUDIO_CACHE", "~/.cache/dit-studio")).expanduser()


# --------------------------------------------------------------------------- package


def unpack_package(tgz: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Extract the parts of the npm tarball we use (``emoji.json``, the 64 px Google images,
    licence and readme) into ``dest``; return the package directory (holding emoji.json).

    Only regular files under ``package/`` with plain relative names are extracted: a
    tarball is untrusted input and must not write outside ``dest``. The sprite sheets
    (most of the 74 MB) are skipped. A marker file makes a finished extraction reusable.
    """
    dest = Path(dest)
    pkg = dest / "package"
    if (dest / _UNPACKED_MARKER).is_file() and (pkg / "emoji.json").is_file():
        return pkg
    wanted_top = {"emoji.json", "package.json", "LICENSE", "README.md", "categories.json"}
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tgz, "r:*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            parts = PurePosixPath(member.name).parts
            if len(parts) < 2 or parts[0] != "package" or any(p in ("", ".", "..") for p in parts):
                continue
            rel = "/".join(parts[1:])
            if not (rel in wanted_top or (rel.startswith(IMAGE_DIR + "/") and rel.endswith(".png"))):
                continue
            target = pkg.joinpath(*parts[1:])
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            if src is None:
                continue
            with src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    if not (pkg / "emoji.json").is_file():
        raise ValueError(f"{tgz} does not look like an emoji-datasource package (no package/emoji.json)")
    (dest / _UNPACKED_MARKER).write_text("ok\n")
    return pkg


def fetch_emoji_package(version: str = EMOJI_PACKAGE_VERSION, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Download (once) and unpack ``emoji-datasource-google@version``; return the package dir.

    Uses ``npm pack``, which downloads just the registry tarball (verified against the
    registry's integrity hash by npm) without installing anything.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tgz = cache / f"{EMOJI_PACKAGE}-{version}.tgz"
    if not tgz.is_file():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                f"npm is needed to download {EMOJI_PACKAGE}@{version}; install Node.js, or download the "
                "tarball elsewhere and pass --package-dir path/to/package.tgz"
            )
        print(f"downloading {EMOJI_PACKAGE}@{version} with npm pack into {cache} ...", file=sys.stderr)
        proc = subprocess.run(
            [npm, "pack", f"{EMOJI_PACKAGE}@{version}", "--silent"],
            cwd=cache,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"npm pack {EMOJI_PACKAGE}@{version} failed:\n{proc.stderr.strip()}")
        if not tgz.is_file():  # npm printed a different file name
            names = [ln.strip() for ln in proc.stdout.splitlines() if ln.strip().endswith(".tgz")]
            if not names or not (cache / names[-1]).is_file():
                raise RuntimeError(f"npm pack succeeded but produced no tarball in {cache}")
            (cache / names[-1]).rename(tgz)
    return unpack_package(tgz, cache / f"{EMOJI_PACKAGE}-{version}")


def resolve_package_dir(
    package_dir: str | os.PathLike[str] | None,
    version: str = EMOJI_PACKAGE_VERSION,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Turn ``--package-dir`` (None, a directory, or a ``.tgz``) into a directory with emoji.json."""
    if package_dir is None:
        return fetch_emoji_package(version, cache_dir)
    p = Path(package_dir).expanduser()
    if p.is_file():
        cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        stem = p.name.removesuffix(".tgz").removesuffix(".tar.gz")
        return unpack_package(p, cache / stem)
    for candidate in (p, p / "package"):
        if (candidate / "emoji.json").is_file():
            return candidate
    raise FileNotFoundError(f"{p} holds no emoji.json (expected an unpacked {EMOJI_PACKAGE} or its .tgz)")


# --------------------------------------------------------------------------- entries


@dataclass
class EmojiItem:
    """One image to write: the source file and everything the metadata line needs."""

    image: str  # file name inside img/google/64
    name: str
    caption: str
    category: str
    subcategory: str
    sort_order: float


_NOT_A_WORD = re.compile(r"[^a-z ]")


def _short_name_words(short_name: str) -> str | None:
    """``sweat_smile`` -> ``sweat smile``; ``cat2`` -> ``cat``; codes like ``+1``, ``flag-ad``,
    ``u7121`` -> None (they are identifiers, not words a person would type)."""
    s = short_name.lower().replace("_", " ").replace("-", " ").strip()
    s = re.sub(r"\d+$", "", s).strip()
    if not s or _NOT_A_WORD.search(s) or s.startswith("flag ") or len(s) < 2:
        return None
    return re.sub(r"\s+", " ", s)


def emoji_caption(name: str, short_names: Sequence[str] = (), mode: str = "name+short") -> str:
    """The caption rule described in the module docstring."""
    if mode not in ("name", "name+short"):
        raise ValueError(f"caption mode must be 'name' or 'name+short', got {mode!r}")
    base = re.sub(r"\s+", " ", name.strip().lower())
    if mode == "name":
        return base
    words = set(re.findall(r"[a-z]+", base))
    parts = [base]
    for sn in short_names:
        extra = _short_name_words(sn)
        if extra is None or extra in parts:
            continue
        if set(extra.split()) <= words:
            continue
        parts.append(extra)
        words |= set(extra.split())
    return ", ".join(parts)


def _tone_caption(key: str) -> str:
    tones = [SKIN_TONES.get(code.upper()) for code in key.split("-")]
    return ", ".join(t for t in tones if t)


def load_emoji_items(
    package_dir: str | os.PathLike[str],
    *,
    include_skin_variations: bool = False,
    caption: str = "name+short",
) -> list[EmojiItem]:
    """Every emoji in ``emoji.json`` that has a Google image, in Unicode order.

    Skin-tone variations are left out by default: they repeat the same shape in five
    colours, which would multiply the people categories five-fold and teach mostly skin
    colour.
    """
    package_dir = Path(package_dir)
    path = package_dir / "emoji.json"
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a JSON list of emoji entries")
    items: list[EmojiItem] = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not e.get("has_img_google") or not e.get("image"):
            continue
        name = e.get("name") or (e.get("short_names") or [e.get("short_name") or ""])[0]
        if not name:
            continue
        base = EmojiItem(
            image=str(e["image"]),
            name=name,
            caption=emoji_caption(name, e.get("short_names") or [], caption),
            category=str(e.get("category") or "Uncategorized"),
            subcategory=str(e.get("subcategory") or "uncategorized"),
            sort_order=float(e.get("sort_order", i)),
        )
        items.append(base)
        if include_skin_variations:
            for key, var in sorted((e.get("skin_variations") or {}).items()):
                if not isinstance(var, dict) or not var.get("has_img_google") or not var.get("image"):
                    continue
                tone = _tone_caption(key)
                items.append(
                    EmojiItem(
                        image=str(var["image"]),
                        name=f"{name}: {tone}" if tone else name,
                        caption=f"{base.caption}, {tone}" if tone else base.caption,
                        category=base.category,
                        subcategory=base.subcategory,
                        sort_order=base.sort_order,
                    )
                )
    items.sort(key=lambda it: it.sort_order)  # stable: variations stay after their base
    return items


def _match_names(requested: Sequence[str] | None, available: Sequence[str], what: str) -> set[str] | None:
    if not requested:
        return None
    lookup = {a.lower(): a for a in available}
    chosen, unknown = set(), []
    for r in requested:
        hit = lookup.get(r.strip().lower())
        if hit is None:
            unknown.append(r)
        else:
            chosen.add(hit)
    if unknown:
        raise ValueError(f"unknown {what}: {unknown}; available: {sorted(available)}")
    return chosen


# --------------------------------------------------------------------------- build


@dataclass
class EmojiBuildResult:
    """What :func:`build_emoji_dataset` wrote, for printing and for tests."""

    out_dir: Path
    class_names: list[str]
    per_class: dict[str, int]
    per_category: dict[str, int]
    per_subcategory: dict[tuple[str, str], int]
    written: int
    missing: list[str] = field(default_factory=list)  # emoji.json entries whose image file is absent/bad
    dropped_classes: dict[str, int] = field(default_factory=dict)  # below --min-per-class


def _prepare_out_dir(out: Path, force: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (out / _MARKER).is_file() and not force:
        raise FileExistsError(
            f"{out} is not empty and was not written by this script; choose another --out or pass --force"
        )
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "images", ignore_errors=True)
    for name in ("metadata.jsonl", "classes.json", _MARKER):
        (out / name).unlink(missing_ok=True)


def build_emoji_dataset(
    package_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    size: int = 32,
    label_by: str = "category",
    categories: Sequence[str] | None = None,
    subcategories: Sequence[str] | None = None,
    include_skin_variations: bool = False,
    caption: str = "name+short",
    min_per_class: int = 1,
    max_per_class: int | None = None,
    force: bool = False,
) -> EmojiBuildResult:
    """Write the training folder described in the module docstring; return the counts.

    ``categories`` / ``subcategories`` filter by name (case-insensitive; an unknown name
    is an error listing the real ones, so a typo cannot silently yield an empty class).
    Classes with fewer than ``min_per_class`` images are dropped before labels are
    numbered, so labels stay contiguous; ``max_per_class`` keeps only the first N of a
    class in Unicode order (e.g. to stop 259 country flags dominating), deterministically.
    """
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if max_per_class is not None and max_per_class < 1:
        raise ValueError(f"max_per_class must be >= 1, got {max_per_class}")
    if label_by not in ("category", "subcategory"):
        raise ValueError(f"label_by must be 'category' or 'subcategory', got {label_by!r}")
    package_dir = Path(package_dir)
    out = Path(out_dir)
    items = load_emoji_items(package_dir, include_skin_variations=include_skin_variations, caption=caption)
    cats = _match_names(categories, sorted({it.category for it in items}), "categories")
    subs = _match_names(subcategories, sorted({it.subcategory for it in items}), "subcategories")
    items = [it for it in items if (cats is None or it.category in cats) and (subs is None or it.subcategory in subs)]

    def class_of(it: EmojiItem) -> str:
        return it.category if label_by == "category" else it.subcategory

    # Load first, so classes are counted on images that really exist.
    image_dir = package_dir / IMAGE_DIR
    loaded: list[tuple[EmojiItem, Image.Image]] = []
    missing: list[str] = []
    for it in items:
        try:
            img = load_image(image_dir / it.image)
        except BadImageError as e:
            missing.append(f"{it.image} ({it.name}): {e.reason}")
            continue
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.LANCZOS)
        loaded.append((it, img))

    counts = Counter(class_of(it) for it, _ in loaded)
    dropped = {c: n for c, n in counts.items() if n < min_per_class}
    loaded = [(it, img) for it, img in loaded if class_of(it) not in dropped]
    if max_per_class is not None:
        kept: Counter = Counter()
        capped = []
        for it, img in loaded:
            if kept[class_of(it)] < max_per_class:
                kept[class_of(it)] += 1
                capped.append((it, img))
        loaded = capped
    if not loaded:
        raise ValueError(
            f"no emoji images selected from {package_dir} (filters: categories={categories}, "
            f"subcategories={subcategories}, min_per_class={min_per_class})"
        )
    first_seen: dict[str, float] = {}
    for it, _ in loaded:
        first_seen.setdefault(class_of(it), it.sort_order)
    class_names = sorted(first_seen, key=lambda c: (first_seen[c], c))
    label_of = {c: i for i, c in enumerate(class_names)}

    _prepare_out_dir(out, force)
    (out / "images").mkdir()
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for it, img in loaded:
            file_name = f"images/{Path(it.image).stem}.png"
            img.save(out / file_name, format="PNG")
            row: dict[str, Any] = {
                "file_name": file_name,
                "text": it.caption,
                "label": label_of[class_of(it)],
                "name": it.name,
                "category": it.category,
                "subcategory": it.subcategory,
            }
            meta.write(json.dumps(row, ensure_ascii=False) + "\n")
    (out / "classes.json").write_text(
        json.dumps({str(i): c for i, c in enumerate(class_names)}, indent=1, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    per_category = Counter(it.category for it, _ in loaded)
    per_subcategory = Counter((it.category, it.subcategory) for it, _ in loaded)
    per_class = Counter(class_of(it) for it, _ in loaded)
    version = None
    with contextlib.suppress(OSError, ValueError):  # provenance only; a missing package.json is fine
        version = json.loads((package_dir / "package.json").read_text(encoding="utf-8")).get("version")
    source = {
        "package": EMOJI_PACKAGE,
        "version": version,
        "images": f"{IMAGE_DIR} (Google Noto emoji, 64 px)",
        "images_license": IMAGES_LICENSE,
        "data_license": DATA_LICENSE,
        "options": {
            "size": size,
            "label_by": label_by,
            "categories": sorted(cats) if cats else None,
            "subcategories": sorted(subs) if subs else None,
            "include_skin_variations": include_skin_variations,
            "caption": caption,
            "min_per_class": min_per_class,
            "max_per_class": max_per_class,
        },
        "count": len(loaded),
        "missing_images": len(missing),
    }
    (out / _MARKER).write_text(json.dumps(source, indent=1) + "\n", encoding="utf-8")
    return EmojiBuildResult(
        out_dir=out,
        class_names=class_names,
        per_class={c: per_class[c] for c in class_names},
        per_category=dict(per_category),
        per_subcategory=dict(per_subcategory),
        written=len(loaded),
        missing=missing,
        dropped_classes=dropped,
    )


# --------------------------------------------------------------------------- CLI


def _print_table(title: str, rows: list[tuple[str, int]]) -> None:
    print(title)
    width = max((len(r) for r, _ in rows), default=0)
    for name, n in rows:
        print(f"  {name:<{width}}  {n:5d}")


def _print_inventory(items: Sequence[EmojiItem]) -> None:
    by_cat: dict[str, Counter] = {}
    order: dict[str, float] = {}
    for it in items:
        by_cat.setdefault(it.category, Counter())[it.subcategory] += 1
        order.setdefault(it.category, it.sort_order)
    for cat in sorted(by_cat, key=lambda c: order[c]):
        subs = by_cat[cat]
        print(f"{cat}: {sum(subs.values())}")
        for sub, n in subs.most_common():
            print(f"    {sub:<28} {n:5d}")


def _split_list(value: str | None) -> list[str] | None:
    if not value:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: ``python -m training.data.emoji --help``."""
    ap = argparse.ArgumentParser(
        prog="python -m training.data.emoji",
        description="Build a text-image training folder from the Noto emoji images in the npm package "
        f"{EMOJI_PACKAGE} (metadata.jsonl + classes.json, readable by open_image_folder).",
    )
    ap.add_argument("--out", type=Path, help="output folder (e.g. data/emoji)")
    ap.add_argument("--size", type=int, default=32, help="output side in pixels (source images are 64 px)")
    ap.add_argument("--package-dir", help="unpacked package folder or .tgz (default: npm pack into the cache)")
    ap.add_argument("--version", default=EMOJI_PACKAGE_VERSION, help="package version to npm pack")
    ap.add_argument("--cache-dir", type=Path, default=None, help="download cache (default ~/.cache/dit-studio)")
    ap.add_argument("--label-by", choices=("category", "subcategory"), default="category")
    ap.add_argument("--categories", help='comma-separated categories to keep, e.g. "Animals & Nature,Food & Drink"')
    ap.add_argument("--subcategories", help="comma-separated subcategories to keep, e.g. animal-mammal,food-fruit")
    ap.add_argument("--min-per-class", type=int, default=1, help="drop classes with fewer images")
    ap.add_argument("--max-per-class", type=int, default=None, help="keep at most N images per class")
    ap.add_argument("--include-skin-variations", action="store_true", help="also write skin-tone variants")
    ap.add_argument("--caption", choices=("name", "name+short"), default="name+short", help="caption rule")
    ap.add_argument("--force", action="store_true", help="write into a non-empty folder not made by this script")
    ap.add_argument("--list", action="store_true", help="only print counts per category and subcategory")
    args = ap.parse_args(argv)
    if not args.list and args.out is None:
        ap.error("--out is required (or use --list)")
    try:
        package_dir = resolve_package_dir(args.package_dir, args.version, args.cache_dir)
        if args.list:
            _print_inventory(
                load_emoji_items(
                    package_dir, include_skin_variations=args.include_skin_variations, caption=args.caption
                )
            )
            return 0
        result = build_emoji_dataset(
            package_dir,
            args.out,
            size=args.size,
            label_by=args.label_by,
            categories=_split_list(args.categories),
            subcategories=_split_list(args.subcategories),
            include_skin_variations=args.include_skin_variations,
            caption=args.caption,
            min_per_class=args.min_per_class,
            max_per_class=args.max_per_class,
            force=args.force,
        )
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    _print_table(
        f"wrote {result.written} images to {result.out_dir} ({args.size}x{args.size}); per category:",
        sorted(result.per_category.items(), key=lambda kv: -kv[1]),
    )
    if args.label_by == "subcategory":
        _print_table(
            "per class (label: subcategory):",
            [(f"{i}: {c}", result.per_class[c]) for i, c in enumerate(result.class_names)],
        )
    if result.dropped_classes:
        print(f"dropped classes under --min-per-class {args.min_per_class}: {result.dropped_classes}")
    if result.missing:
        print(f"{len(result.missing)} entries skipped (image missing or unreadable), e.g. {result.missing[:3]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
