"""The model catalog: the shipped defaults in ``assets/models/`` plus directories named on the command line.

The UI and the batch CLI load models only through this catalog (or paths the operator gave at start-up),
never from a path inside a request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .registry import kind_of

ASSETS_MODELS = Path(__file__).resolve().parent.parent / "assets" / "models"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    path: Path
    kind: str
    class_name: str


def read_model_index(path: Path) -> dict:
    """The parsed ``model_index.json`` of a pipeline directory (raises ``ModelLoadError`` with the fix)."""
    from .errors import ModelLoadError

    index = Path(path) / "model_index.json"
    if not Path(path).is_dir():
        raise ModelLoadError(f"Model directory {path} does not exist.")
    if not index.is_file():
        raise ModelLoadError(
            f"{path} is not a diffusers pipeline directory: it has no model_index.json. Point to the folder "
            "that holds model_index.json (e.g. a saved pipeline or a downloaded hub snapshot)."
        )
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{index} is corrupt ({e}); re-download or re-save the model.") from None
    if not isinstance(data, dict) or "_class_name" not in data:
        raise ModelLoadError(f"{index} has no _class_name; it is not a diffusers model_index.json.")
    return data


def _ordered_children(root: Path) -> list[Path]:
    """A root's model folders, those named in its ``ORDER`` file first (the UI preselects the first of a kind)."""
    children = sorted(p for p in root.iterdir() if p.is_dir())
    order_file = root / "ORDER"
    if not order_file.is_file():
        return children
    wanted = [ln.strip() for ln in order_file.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    rank = {name: i for i, name in enumerate(wanted)}
    return sorted(children, key=lambda p: (rank.get(p.name, len(rank)), p.name))


class Catalog:
    """Named models available to the app. ``extra_paths`` are directories given by the operator."""

    def __init__(self, roots: list[Path] | None = None, extra_paths: list[Path] | None = None):
        self.entries: dict[str, CatalogEntry] = {}
        for root in roots if roots is not None else [ASSETS_MODELS]:
            if Path(root).is_dir():
                for child in _ordered_children(Path(root)):
                    if (child / "model_index.json").is_file():
                        self._add(child.name, child)
        for path in extra_paths or []:
            self._add(Path(path).name, Path(path))

    def _add(self, name: str, path: Path) -> None:
        index = read_model_index(path)
        kind = kind_of(index["_class_name"]) or "unknown"
        base, n = name, 2
        while name in self.entries:
            name, n = f"{base}-{n}", n + 1
        self.entries[name] = CatalogEntry(name, Path(path).resolve(), kind, index["_class_name"])

    def names(self, kind: str | None = None) -> list[str]:
        return [e.name for e in self.entries.values() if kind is None or e.kind == kind]

    def kinds(self) -> list[str]:
        return sorted({e.kind for e in self.entries.values()})

    def get(self, name: str) -> CatalogEntry:
        from .errors import ModelLoadError

        if name not in self.entries:
            raise ModelLoadError(f"Unknown model {name!r}. Available: {', '.join(self.entries) or 'none'}.")
        return self.entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self.entries


def default_catalog() -> Catalog:
    return Catalog()
