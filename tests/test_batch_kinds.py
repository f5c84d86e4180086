"""Batch rows for every generator kind: VAR (fixed schedule), control, video and point clouds next to the image
rows, the ``attention`` and ``lora`` columns, resume for every kind, and a failing row that does not stop the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_control import adapters, control_pipe  # noqa: F401  (adapters is a fixture)
from test_dit3d import tiny_pipeline as tiny_points_pipeline
from test_var import tiny_transformer as tiny_var_transformer
from test_var import tiny_vae as tiny_var_vae
from test_vdt import tiny_pipe as tiny_video_pipeline
from tiny_models import tiny_text_pipeline

from pipelines import Catalog
from pipelines.batch import Defaults, Problems, main, read_rows, validate_rows
from pipelines.metadata import read_record
from pipelines.var import VARPipeline

SCALES = len(tiny_var_transformer().config.patch_nums)  # VAR's steps: one per scale of its token pyramid


@pytest.fixture(scope="module")
def models(tmp_path_factory, adapters) -> Path:  # noqa: F811
    """A catalog root with one tiny model of every kind the batch CLI runs."""
    root = tmp_path_factory.mktemp("kinds")
    tiny_text_pipeline().save_pretrained(root / "tiny-t2i")
    VARPipeline(
        transformer=tiny_var_transformer(), vae=tiny_var_vae(), id2label={"0": "smileys", "1": "animals", "2": "food"}
    ).save_pretrained(root / "tiny-var")
    tiny_video_pipeline().save_pretrained(root / "tiny-video")
    tiny_points_pipeline().save_pretrained(root / "tiny-points")
    control_pipe(adapters).save_pretrained(root / "tiny-control")
    return root


@pytest.fixture()
def inputs(tmp_path) -> Path:
    """A folder with a control image and a 4-frame GIF, named relative to the prompts file."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(tmp_path / "edges.png")
    frames = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(4)]
    frames[0].save(tmp_path / "clip.gif", save_all=True, append_images=frames[1:], duration=125, loop=0)
    (tmp_path / "broken.gif").write_bytes(b"GIF89a but not really")
    return tmp_path


def _parse(path: Path, models: Path) -> tuple[list, Problems]:
    problems = Problems(str(path))
    tasks = validate_rows(read_rows(path, problems), Defaults(model="tiny-t2i"), Catalog(roots=[models]), problems)
    return tasks, problems


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return path


def test_every_kind_validates_its_own_columns(tmp_path, models, inputs):
    good = _write(
        inputs / "good.jsonl",
        [
            {"prompt": "a red cat", "attention": "agentsd[ratio=0.5]"},
            {"model": "tiny-var", "class": "food", "top_k": 5, "guidance": 2},
            {"model": "tiny-video", "video": "clip.gif", "task": "predict", "num_given": 2, "steps": 3},
            {"model": "tiny-points", "class": "lamp", "points": 64},
            {"model": "tiny-control", "prompt": "cat", "control_image": "edges.png", "adapter": "edges"},
            {
                "model": "tiny-control",
                "prompt": "cat",
                "controls": [
                    {"image": "edges.png", "adapter": "edges", "strength": 0.5},
                    {"image": "edges.png", "adapter": "hole", "preprocessor": "inpaint"},
                ],
            },
        ],
    )
    tasks, problems = _parse(good, models)
    assert not problems, problems.report()
    t2i, var, video, points, control, two = tasks
    assert t2i.params["attention"].startswith("agentsd[ratio=0.5,")
    # VAR runs one step per scale at its own size whatever the defaults say (its record says the same)
    assert (var.steps, var.width, var.params["top_k"], var.guidance) == (SCALES, 8, 5, 2)
    assert video.params["video"] == str((inputs / "clip.gif").resolve()) and video.params["num_given"] == 2
    assert (points.class_label, points.params["points"], points.guidance) == (2, 64, 1.0)
    assert (t2i.steps, points.steps) == (20, 100)  # no --steps: each kind's own default (DiT-3D's DDPM wants 100)
    assert control.params["controls"] == [
        {"image": str((inputs / "edges.png").resolve()), "adapter": "edges", "strength": 1.0, "preprocessor": "auto"}
    ]
    assert [c["adapter"] for c in two.params["controls"]] == ["edges", "hole"]

    bad = _write(
        inputs / "bad.jsonl",
        [
            {"model": "tiny-var", "class": "food", "steps": 20},  # 1
            {"model": "tiny-var", "class": "food", "width": 16, "scheduler": "ddim"},  # 2
            {"model": "tiny-video", "task": "predict"},  # 3 no clip
            {"model": "tiny-video", "video": "missing.mp4", "guidance": 3},  # 4
            {"model": "tiny-points", "class": "lamp", "prompt": "a lamp"},  # 5
            {"model": "tiny-control", "prompt": "cat", "control_image": "edges.png", "adapter": "depth"},  # 6
            {"prompt": "cat", "attention": "agent"},  # 7 trained-only variant
            {"prompt": "cat", "attention": "window[size=3]"},  # 8 unknown option
            {"prompt": "cat", "lora": "nope.safetensors"},  # 9
            {"model": "tiny-t2i", "prompt": "cat", "top_k": 3},  # 10 a VAR setting on a diffusion model
        ],
    )
    _, problems = _parse(bad, models)
    report = problems.report()
    expected = {
        1: f"predicts {SCALES} scales, so steps is always {SCALES}",
        2: "generates only 8 px",
        3: "needs a 'video'",
        4: "video 'missing.mp4' does not exist",
        5: "column 'prompt' does not apply to point-cloud models",
        6: "unknown adapter 'depth' for tiny-control; adapters: edges, hole",
        7: "needs a model trained with it",
        8: "window does not take option(s) size",
        9: "lora 'nope.safetensors' does not exist",
        10: "column 'top_k' does not apply to text-to-image",
    }
    for line, message in expected.items():
        assert any(item == (line, item[1]) and message in item[1] for item in problems.items), (line, report)
    assert (
        2,
        "model tiny-var samples scale by scale (next-scale prediction) and has no scheduler; remove the "
        "'scheduler' value",
    ) in problems.items
    assert any(line == 4 and "takes no guidance scale" in message for line, message in problems.items)


def test_all_kinds_generate_resume_and_a_failing_row_does_not_stop_the_run(tmp_path, models, inputs, capsys):
    prompts = _write(
        inputs / "rows.jsonl",
        [
            {"prompt": "a red cat", "seed": 1, "attention": "window[window_size=2]"},
            {"model": "tiny-var", "class": "animals", "seed": 2, "count": 2},
            {"model": "tiny-video", "video": "clip.gif", "task": "predict", "num_given": 2, "steps": 2, "seed": 3},
            {"model": "tiny-points", "class": "chair", "points": 64, "steps": 2, "seed": 4},
            {"model": "tiny-control", "prompt": "cat", "control_image": "edges.png", "adapter": "edges", "seed": 5},
            {"model": "tiny-video", "video": "broken.gif", "steps": 2, "seed": 6},  # fails at run time
            {"prompt": "a blue dog", "seed": 7},
        ],
    )
    out = tmp_path / "out"
    args = [str(prompts), "--models-dir", str(models), "--no-default-models", "--model", "tiny-t2i", "-o", str(out)]
    assert main([*args, "--steps", "2", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "rows.jsonl:6: row 5 failed, skipped" in err and "broken.gif" in err

    entries = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [(e["row"], e["index"]) for e in entries] == [(0, 0), (1, 0), (1, 1), (2, 0), (3, 0), (4, 0), (6, 0)]
    by_row = {e["row"]: e for e in entries if e["index"] == 0}
    assert by_row[0]["record"]["attention"].startswith("window[window_size=2")
    assert by_row[1]["record"]["steps"] == SCALES and by_row[1]["file"] == "00001-00-2.png"
    assert [f.rsplit(".", 1)[1] for f in by_row[2]["files"]][-2:] == ["gif", "json"]
    assert by_row[3]["files"] == ["00003-00-4.ply", "00003-00-4.glb", "00003-00-4.png", "00003-00-4.json"]
    assert [c["adapter"] for c in by_row[4]["record"]["extra"]["_controls"]] == ["edges"]
    for entry in entries:
        for name in entry["files"]:
            assert (out / name).is_file(), name
    # the record read back from each kind's own file is the manifest's
    assert read_record(out / by_row[1]["file"]).to_dict() == by_row[1]["record"]
    assert (
        json.loads((out / "00003-00-4.json").read_text())["extra"]["_batch_key"]
        == by_row[3]["record"]["extra"]["_batch_key"]
    )
    # row 6 ran after the failure, with its model's own attention (row 0's window variant was not left behind)
    assert by_row[6]["record"]["attention"] == "sdpa"

    # a rerun makes only the failed row again (and fails on it again); every finished file is left as it was
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "manifest.jsonl"}
    assert main([*args, "--steps", "2", "--quiet"]) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "manifest.jsonl"} == stamps
    # a changed row setting (VAR guidance) is regenerated, the others still are not
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    rows[1]["guidance"] = 1.5
    rows.pop(5)
    _write(prompts, rows)
    assert main([*args, "--steps", "2", "--quiet"]) == 0
    again = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name.startswith("00000-")}
    assert again == {k: v for k, v in stamps.items() if k.startswith("00000-")}
    assert (out / "00001-00-2.png").stat().st_mtime_ns != stamps["00001-00-2.png"]
