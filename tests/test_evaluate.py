"""Evaluation: the category classifier learns, the metrics compute what they claim, FID skips without weights,
and ``python -m training.evaluate`` runs end to end on tiny pipelines."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import evaluate as ev
from training.classifier import (
    is_held_out,
    load_classifier,
    load_image_set,
    save_classifier,
    train_classifier,
)

# Named as tiny_models.tiny_class_pipeline names its classes, so the pipeline and classifier match by name.
CLASSES = ["smileys", "animals", "food", "travel"]
COLOURS = [(230, 40, 40), (40, 200, 40), (40, 40, 230), (230, 210, 30)]
CAPTIONS = [["grinning face", "smiling face"], ["cat face", "dog"], ["red heart", "tree"], ["car", "sun and moon"]]
PER_CLASS = 24


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory) -> Path:
    """Four trivially separable classes: solid colours with a little noise, in the metadata.jsonl layout."""
    root = tmp_path_factory.mktemp("colours")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for c, colour in enumerate(COLOURS):
        for i in range(PER_CLASS):
            arr = np.clip(np.array(colour) + rng.normal(0, 12, (16, 16, 3)), 0, 255).astype(np.uint8)
            name = f"images/c{c}_{i:02d}.png"
            Image.fromarray(arr).save(root / name)
            rows.append({"file_name": name, "text": CAPTIONS[c][i % 2], "label": c})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "classes.json").write_text(json.dumps({str(i): n for i, n in enumerate(CLASSES)}))
    return root


@pytest.fixture(scope="module")
def classifier_dir(colour_folder, tmp_path_factory) -> tuple[Path, dict]:
    torch.set_num_threads(1)
    data = load_image_set(colour_folder, 16)
    model, metrics = train_classifier(data, val_fraction=0.25, max_steps=40, batch_size=32, width=8, log_every=0)
    out = save_classifier(model, tmp_path_factory.mktemp("clf") / "classifier", metrics)
    return out, metrics


@pytest.fixture
def no_fid_weights(tmp_path, monkeypatch) -> Path:
    """Point both FID backends' weight locations at empty folders."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(ev, "CLEAN_FID_DIR", tmp_path / "cleanfid")
    return tmp_path


# --------------------------------------------------------------------------- classifier


def test_held_out_split_is_a_stable_hash_of_the_name():
    names = [f"images/{i:05x}.png" for i in range(3000)]
    first = [is_held_out(n, 0.1) for n in names]
    assert first == [is_held_out(n, 0.1) for n in reversed(names)][::-1]  # order-independent
    assert 0.08 < np.mean(first) < 0.12
    assert not any(is_held_out(n, 0.0) for n in names) and all(is_held_out(n, 1.0) for n in names)
    # a larger fraction only adds items: the old held-out set stays held out
    assert all(is_held_out(n, 0.2) for n, h in zip(names, first) if h)


def test_classifier_learns_separable_classes_and_round_trips(classifier_dir, colour_folder):
    path, metrics = classifier_dir
    assert metrics["num_val"] > 10 and metrics["num_train"] + metrics["num_val"] == 4 * PER_CLASS
    assert metrics["val"]["top1"] >= 0.9, metrics["val"]  # chance is 0.25
    model, saved = load_classifier(path)
    assert (path / "diffusion_pytorch_model.safetensors").is_file()
    assert saved["val"]["top1"] == metrics["val"]["top1"]
    assert list(model.config.class_names) == CLASSES and list(model.config.categories) == [0, 1, 2, 3]
    data = load_image_set(colour_folder, 16)
    probs, feats = model.predict(data.images)
    assert (probs.argmax(1) == data.labels).float().mean() >= 0.9
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(feats)), atol=1e-5)


def test_classifier_keeps_and_reindexes_categories(colour_folder):
    data = load_image_set(colour_folder, 16)
    model, metrics = train_classifier(data, [3, 1], val_fraction=0.25, max_steps=2, batch_size=16, width=4, log_every=0)
    assert list(model.config.categories) == [3, 1] and list(model.config.class_names) == ["travel", "animals"]
    assert metrics["num_train"] + metrics["num_val"] == 2 * PER_CLASS
    with pytest.raises(ValueError, match="no images"):
        train_classifier(data, [7], max_steps=1)


def test_missing_classifier_says_how_to_train_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m training.classifier"):
        load_classifier(tmp_path / "nothing")


# --------------------------------------------------------------------------- metrics


def test_category_accuracy_on_hand_made_predictions():
    probs = np.array(
        [
            [0.7, 0.1, 0.1, 0.1],  # target 0: top-1 right
            [0.4, 0.3, 0.2, 0.1],  # target 1: second -> top-3 only
            [0.4, 0.3, 0.2, 0.1],  # target 3: last -> wrong in both
            [0.1, 0.1, 0.6, 0.2],  # target 2: top-1 right
        ]
    )
    acc = ev.category_accuracy(probs, [0, 1, 3, 2], ["a", "b", "c", "d"])
    assert acc["top1"] == pytest.approx(0.5) and acc["top3"] == pytest.approx(0.75)
    assert acc["chance_top1"] == pytest.approx(0.25) and acc["chance_top3"] == pytest.approx(0.75)
    assert acc["per_class"]["b"] == {"n": 1, "top1": 0.0, "top3": 1.0}
    assert acc["per_class"]["d"] == {"n": 1, "top1": 0.0, "top3": 0.0}
    assert acc["per_class"]["c"]["top1"] == 1.0
    assert acc["predicted"] == [0, 0, 0, 2]


def test_memorisation_flags_copies_not_new_images():
    rng = np.random.default_rng(1)
    train = torch.from_numpy(rng.random((60, 3, 8, 8))).float()
    train[10] = train[11]  # an exact duplicate in the data must not pull the threshold to 0
    samples = torch.stack(
        [
            train[3].clone(),  # exact copy
            (train[5] + 0.01 * torch.from_numpy(rng.standard_normal((3, 8, 8))).float()).clamp(0, 1),  # near copy
            torch.from_numpy(rng.random((3, 8, 8))).float(),  # new image
        ]
    )
    m = ev.memorisation(samples, train)
    assert m["is_near_copy"] == [True, True, False]
    assert m["nearest"][:2] == [3, 5] and m["distance"][0] == 0.0
    assert m["train_loo_nn_median"] > 1.0 and m["threshold"] > 0.5  # leave-one-out: never the image itself
    assert m["train_duplicates"] == 2
    assert m["near_copies"] == 2 and m["near_copy_fraction"] == pytest.approx(2 / 3)
    loo, idx = ev.nearest_neighbours(train, train, exclude_self=True)
    assert (idx != torch.arange(len(train))).all() and int((loo > 0).sum()) == 58
    assert idx[10] == 11 and idx[11] == 10


def test_pipeline_classes_map_to_classifier_classes_by_name(classifier_dir):
    model, _ = load_classifier(classifier_dir[0])
    pipe = types.SimpleNamespace(num_classes=3, class_name=lambda i: ["Food", "smileys", "dragons"][i])
    assert ev.class_map(pipe, model) == {0: 2, 1: 0}  # "dragons" has no classifier class
    unnamed = types.SimpleNamespace(num_classes=2, class_name=lambda i: None)
    with pytest.raises(ValueError, match="match"):
        ev.class_map(unnamed, model)


# --------------------------------------------------------------------------- FID


def test_fid_is_skipped_with_a_clear_message_without_weights(no_fid_weights):
    real = np.zeros((4, 16, 16, 3), np.uint8)
    report = ev.compute_fid(real, real + 1)
    assert report["status"] == "skipped"
    msg = report["message"]
    assert msg.startswith("FID skipped")
    expected = no_fid_weights / "torch-home" / "hub" / "checkpoints"
    assert str(expected / ev.TORCH_FIDELITY_WEIGHTS) in msg  # where it looked, and where to put the file
    assert str(no_fid_weights / "cleanfid") in msg and "--fid-weights" in msg and "pip install" in msg
    explicit = ev.compute_fid(real, real, weights=no_fid_weights / "mine.pth")
    assert explicit["status"] == "skipped" and "mine.pth" in explicit["message"]


def test_fid_runs_torch_fidelity_when_weights_are_present(no_fid_weights, monkeypatch):
    weights = ev.fid_weight_locations()["torch-fidelity"]
    weights.parent.mkdir(parents=True)
    weights.write_bytes(b"")
    calls = {}

    def calculate_metrics(input1, input2, fid, feature_extractor_weights_path, **kwargs):
        calls.update(fake=input1, real=input2, weights=feature_extractor_weights_path)
        return {"frechet_inception_distance": 12.5}

    fake_module = types.ModuleType("torch_fidelity")
    fake_module.__spec__ = importlib.machinery.ModuleSpec("torch_fidelity", None)
    fake_module.calculate_metrics = calculate_metrics
    monkeypatch.setitem(sys.modules, "torch_fidelity", fake_module)
    real = np.full((5, 16, 16, 3), 7, np.uint8)
    report = ev.compute_fid(real, np.zeros((3, 16, 16, 3), np.uint8))
    assert report["status"] == "ok" and report["fid"] == 12.5 and report["backend"] == "torch-fidelity"
    assert calls["weights"] == str(weights)
    assert len(calls["real"]) == 5 and len(calls["fake"]) == 3
    item = calls["real"][0]
    assert item.dtype == torch.uint8 and tuple(item.shape) == (3, 16, 16) and int(item[0, 0, 0]) == 7


# --------------------------------------------------------------------------- end to end


class CopyingPipeline:
    """A class-conditional 'generator' that returns a training image of the asked class: a perfect memoriser."""

    kind = "class-to-image"

    def __init__(self, data):
        self.data = data
        self.num_classes = len(CLASSES)

    def class_name(self, i: int) -> str:
        return CLASSES[i]

    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def __call__(self, class_labels, seed, output_type, **kwargs):
        picks = [int(np.flatnonzero(self.data.labels.numpy() == c)[s % PER_CLASS]) for c, s in zip(class_labels, seed)]
        images = ((self.data.images[picks] + 1) / 2).permute(0, 2, 3, 1).numpy()
        return types.SimpleNamespace(images=images)


def test_evaluate_catches_a_memorising_generator(colour_folder, classifier_dir, no_fid_weights):
    data = load_image_set(colour_folder, 16)
    report = ev.evaluate(CopyingPipeline(data), colour_folder, classifier_dir[0], samples_per_class=3, log=False)
    assert report["num_samples"] == 12 and report["accuracy"]["top1"] >= 0.9
    assert report["memorisation"]["pixel"]["near_copy_fraction"] == 1.0
    assert report["memorisation"]["feature"]["near_copy_fraction"] == 1.0
    assert all(s["pixel_nn_distance"] == 0.0 for s in report["samples"])
    assert report["fid"]["status"] == "skipped"


@pytest.mark.parametrize("name", ["tiny-c2i", "tiny-t2i"])
def test_evaluate_cli_end_to_end(name, tiny_models_dir, colour_folder, classifier_dir, no_fid_weights, capsys):
    out, grid = no_fid_weights / "report.json", no_fid_weights / "grid.png"
    argv = ["--pipeline", str(tiny_models_dir / name), "--data", str(colour_folder), "--classifier"]
    argv += [str(classifier_dir[0]), "--samples-per-class", "2", "--steps", "2", "--out", str(out), "--grid", str(grid)]
    assert ev.main(argv) == 0
    printed = capsys.readouterr().out
    assert "chance (uniform)" in printed and "near copies" in printed and "FID skipped" in printed

    report = json.loads(out.read_text())
    assert report["num_samples"] == 8 and len(report["samples"]) == 8
    assert [s["seed"] for s in report["samples"]] == list(range(8))  # one seed per image: reproducible alone
    assert report["settings"]["resolution"] == 8  # the tiny pipelines draw 8 px; the classifier reads 16 px
    acc = report["accuracy"]
    assert set(acc["per_class"]) == set(CLASSES) and acc["chance_top1"] == 0.25
    assert acc["top1"] == pytest.approx(np.mean([s["target"] == s["predicted"] for s in report["samples"]]))
    assert acc["predicted_counts"] == {c: [s["predicted"] for s in report["samples"]].count(c) for c in CLASSES}
    for kind in ("pixel", "feature"):
        m = report["memorisation"][kind]
        assert m["train_loo_nn_median"] > 0 and 0 <= m["near_copy_fraction"] <= 1
    assert report["num_train_images"] == 4 * PER_CLASS
    assert report["fid"]["status"] == "skipped"
    if name == "tiny-t2i":
        meta = {r["file_name"]: r for r in map(json.loads, (colour_folder / "metadata.jsonl").read_text().splitlines())}
        for s in report["samples"]:  # the target is the category of the item whose caption was used
            assert meta[s["caption_file"]]["text"] == s["condition"]
            assert CLASSES[meta[s["caption_file"]]["label"]] == s["target"]
    else:
        assert [s["target"] for s in report["samples"]] == [c for c in CLASSES for _ in range(2)]
    img = Image.open(grid)
    assert img.height >= 4 * 64  # one row per class / category
    assert report["seconds"]["total"] < 60
