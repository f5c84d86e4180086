"""Pieces every converter shares: strict key bookkeeping, the final strict load, and the save.

A converter that silently leaves a key behind, or a model parameter at its random init, produces a
model that loads and runs and makes bad images. Every conversion here therefore proves both directions:
every source key was used (or deliberately dropped), and every target parameter was filled with a
tensor of the right shape. Failures name the keys.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


class KeyMismatchError(ValueError):
    """Source and target key sets do not match one-to-one; the message lists the offending names."""


def format_keys(keys: Iterable[str], limit: int = 20) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def need(state_dict: Mapping[str, torch.Tensor], key: str, what: str) -> torch.Tensor:
    """A tensor the config inference cannot do without; a clear error (not a KeyError) if it is absent."""
    if key not in state_dict:
        raise KeyMismatchError(
            f"{what}: key {key!r} is missing, so this is not the layout this converter reads "
            f"(first keys: {format_keys(list(state_dict)[:8], 8)})"
        )
    return state_dict[key]


class KeyMapper:
    """Consumes a source state dict key by key, remembering what was missing and what was never used.

    Missing keys are collected rather than raised one at a time so that a failed conversion reports
    everything wrong with a file at once.
    """

    def __init__(self, source: Mapping[str, torch.Tensor], what: str = "checkpoint"):
        self.source = dict(source)
        self.what = what
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.out: dict[str, torch.Tensor] = {}

    def has(self, key: str) -> bool:
        return key in self.source

    def take(self, key: str) -> torch.Tensor | None:
        if key not in self.source:
            self.missing.append(key)
            return None
        self.used.add(key)
        return self.source[key]

    def drop(self, key: str) -> torch.Tensor | None:
        """Mark a key as deliberately unused (e.g. a fixed position table we recompute)."""
        if key in self.source:
            self.used.add(key)
            return self.source[key]
        return None

    def move(self, src: str, dst: str) -> None:
        t = self.take(src)
        if t is not None:
            self.out[dst] = t

    def move_linear(self, src: str, dst: str) -> None:
        self.move(f"{src}.weight", f"{dst}.weight")
        self.move(f"{src}.bias", f"{dst}.bias")

    def split_linear(self, src: str, dsts: list[str]) -> None:
        """Split a fused Linear (qkv, kv) along its output dim into equal parts, in order."""
        for suffix in ("weight", "bias"):
            t = self.take(f"{src}.{suffix}")
            if t is None:
                continue
            if t.shape[0] % len(dsts):
                raise KeyMismatchError(
                    f"{self.what}: {src}.{suffix} has {t.shape[0]} rows, not divisible into {len(dsts)} parts"
                )
            for dst, part in zip(dsts, t.chunk(len(dsts), dim=0)):
                self.out[f"{dst}.{suffix}"] = part.clone()

    def unused(self) -> list[str]:
        return sorted(set(self.source) - self.used)

    def finish(self) -> dict[str, torch.Tensor]:
        """Return the converted dict, or raise naming the missing and the unused source keys."""
        problems = []
        if self.missing:
            problems.append(f"missing from the source: {format_keys(self.missing)}")
        if self.unused():
            problems.append(f"present in the source but not converted: {format_keys(self.unused())}")
        if problems:
            raise KeyMismatchError(
                f"{self.what}: the key layout is not what this converter expects; " + "; ".join(problems)
            )
        return self.out


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str = "checkpoint") -> nn.Module:
    """Load ``state_dict`` into ``model`` after checking names and shapes both ways; report by name."""
    target = model.state_dict()
    missing = set(target) - set(state_dict)
    extra = set(state_dict) - set(target)
    shapes = [
        f"{k} (converted {tuple(state_dict[k].shape)}, model {tuple(target[k].shape)})"
        for k in sorted(set(target) & set(state_dict))
        if tuple(state_dict[k].shape) != tuple(target[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"model parameters not filled: {format_keys(missing)}")
    if extra:
        problems.append(f"converted keys the model does not have: {format_keys(extra)}")
    if shapes:
        problems.append(f"shape mismatches: {format_keys(shapes)}")
    if problems:
        raise KeyMismatchError(f"{what}: converted weights do not fit {type(model).__name__}; " + "; ".join(problems))
    model.load_state_dict(dict(state_dict), strict=True)
    return model


def sha256_of(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def save_transformer(
    model: nn.Module, out_dir: str | Path, provenance: dict[str, Any], dtype: torch.dtype | None = None
) -> Path:
    """Write ``out_dir/transformer/`` (config.json + safetensors) and a ``conversion.json`` record.

    Only the transformer is written: the VAE, text encoder and scheduler are separate, already-diffusers
    downloads, and the caller tells the user which ones to combine it with.
    """
    target = Path(out_dir) / "transformer"
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(target, safe_serialization=True)
    (target / "conversion.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    return target
