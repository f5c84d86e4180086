"""The batch CLI: parsing, per-row overrides, dry-run errors with line numbers, resume after a kill, and a
two-process accelerate run that writes the same bytes as one process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import Catalog
from pipelines.batch import Defaults, Problems, main, read_rows, validate_rows
from pipelines.metadata import read_record

ROOT = Path(__file__).resolve().parent.parent


def _catalog(models: Path) -> Catalog:
    return Catalog(roots=[models])


def _parse(path: Path, models: Path, **defaults) -> tuple[list, Problems]:
    problems = Problems(str(path))
    rows = read_rows(path, problems)
    tasks = validate_rows(rows, Defaults(model="tiny-t2i", **defaults), _catalog(models), problems)
    return tasks, problems


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_txt_one_prompt_per_line(tmp_path, tiny_models_dir):
    path = tmp_path / "p.txt"
    path.write_text("a red cat\n\n# a comment\n  a blue dog  \nthe sun\n", encoding="utf-8")
    tasks, problems = _parse(path, tiny_models_dir, steps=3, count=2)
    assert not problems
    assert [(t.row, t.line, t.prompt) for t in tasks] == [(0, 1, "a red cat"), (1, 4, "a blue dog"), (2, 5, "the sun")]
    assert all(t.steps == 3 and t.count == 2 and t.width == t.height == 8 and t.guidance == 4.5 for t in tasks)
    assert len({t.seed for t in tasks}) == 3  # derived seeds differ per row ...
    again, _ = _parse(path, tiny_models_dir, steps=3, count=2)
    assert [t.seed for t in again] == [t.seed for t in tasks]  # ... and are stable across runs


def test_jsonl_and_csv_per_row_overrides(tmp_path, tiny_models_dir):
    jsonl = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "a red cat", "seed": 5, "steps": 4, "guidance": 2.5, "width": 12, "height": 6, "count": 3},
        {"prompt": "a dog", "negative_prompt": "green", "scheduler": "euler"},
        {"model": "tiny-c2i", "class": "food"},
        {"model": "tiny-c2i", "class": 3, "guidance_scale": 1.0},
        "just a prompt string",
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    tasks, problems = _parse(jsonl, tiny_models_dir)
    assert not problems, problems.report()
    a, b, c, d, e = tasks
    assert (a.seed, a.steps, a.guidance, a.width, a.height, a.count) == (5, 4, 2.5, 12, 6, 3)
    assert a.file_name(2) == "00000-02-7.png"
    assert (b.negative_prompt, b.scheduler, b.steps) == ("green", "euler", 20)
    assert (c.kind, c.class_label, c.prompt, c.guidance) == ("class-to-image", 2, None, 4.0)
    assert (d.class_label, d.guidance) == (3, 1.0)
    assert e.prompt == "just a prompt string"

    csv_path = tmp_path / "p.csv"
    csv_path.write_text(
        'prompt,seed,steps,model,class,control_image\n"a red, cat",1,2,,,\n,,,tiny-c2i,animals,\n"two\nlines",9,,,,\n',
        encoding="utf-8",
    )
    tasks, problems = _parse(csv_path, tiny_models_dir)
    assert not problems, problems.report()
    assert [(t.row, t.line) for t in tasks] == [(0, 2), (1, 3), (2, 4)]
    assert (tasks[0].prompt, tasks[0].seed, tasks[0].steps) == ("a red, cat", 1, 2)
    assert (tasks[1].model, tasks[1].class_label) == ("tiny-c2i", 1)
    assert (tasks[2].prompt, tasks[2].seed) == ("two\nlines", 9)


def test_dry_run_reports_every_bad_row_with_its_line(tmp_path, tiny_models_dir, capsys, monkeypatch):
    import pipelines.loading

    def no_loading(*a, **k):
        raise AssertionError("a model was loaded before the file was validated")

    monkeypatch.setattr(pipelines.loading, "load_pipeline", no_loading)
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"prompt": "a red cat"}',  # 1 fine
                '{"prompt": "x", "steps": "many", "width": 7}',  # 2 two problems
                "{not json",  # 3
                '{"prompt": "sun", "control_image": "edges.png"}',  # 4 a control column on a text-to-image model
                "",  # 5 blank: skipped
                '{"class": "food"}',  # 6 class for a text model
                '{"model": "tiny-c2i", "class": "dragons"}',  # 7 unknown class
                '{"model": "nope", "prompt": "x"}',  # 8 unknown model
                '{"prompt": "", "scheduler": "warp"}',  # 9 empty prompt + unknown scheduler
                '{"prompt": "ok", "count": 0, "guidance": "nan"}',  # 10
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    args = [str(path), "--models-dir", str(tiny_models_dir), "--no-default-models", "--model", "tiny-t2i"]
    rc = main([*args, "-o", str(out), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 2
    expected = {
        2: ["steps must be an integer", "width 7 is not a multiple of 2"],
        3: ["not valid JSON"],
        4: ["column 'control_image' does not apply to text-to-image models"],
        6: ["'class' column is for class-to-image"],
        7: ["unknown class 'dragons'"],
        8: ["unknown model 'nope'"],
        9: ["empty prompt", "unknown scheduler 'warp'"],
        10: ["count must be between 1 and 64", "guidance must be finite"],
    }
    reported = [text.split("bad.jsonl:", 1)[1] for text in err.splitlines() if "bad.jsonl:" in text]
    for line, messages in expected.items():
        for message in messages:
            assert any(r.startswith(f"{line}: ") and message in r for r in reported), (line, message, reported)
    assert {int(r.split(":", 1)[0]) for r in reported} == set(expected)
    assert "bad.jsonl:1:" not in err and "bad.jsonl:5:" not in err
    assert not out.exists()

    # a valid file passes the dry run and still generates nothing
    good = tmp_path / "good.csv"
    good.write_text("prompt,count\na red cat,2\n", encoding="utf-8")
    rc = main(
        [
            str(good),
            "--models-dir",
            str(tiny_models_dir),
            "--no-default-models",
            "--model",
            "tiny-t2i",
            "-o",
            str(out),
            "--dry-run",
        ]
    )
    assert rc == 0 and "1 rows, 2 outputs" in capsys.readouterr().out
    assert not out.exists()


def test_csv_header_and_file_type_errors(tmp_path, tiny_models_dir):
    bad = tmp_path / "p.csv"
    bad.write_text("prompt,colour\na cat,red\n", encoding="utf-8")
    _, problems = _parse(bad, tiny_models_dir)
    assert "p.csv:1: unknown column 'colour'" in problems.report()
    other = tmp_path / "p.yaml"
    other.write_text("- a cat\n", encoding="utf-8")
    _, problems = _parse(other, tiny_models_dir)
    assert "unsupported file type '.yaml'" in problems.report()


def _manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def test_in_process_run_writes_pngs_and_manifest_and_rerun_is_a_no_op(tmp_path, tiny_models_dir):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        '{"prompt": "a red cat", "seed": 3, "count": 2}\n{"model": "tiny-c2i", "class": "animals", "seed": 8}\n',
        encoding="utf-8",
    )
    out = tmp_path / "out"
    args = [
        str(prompts),
        "--models-dir",
        str(tiny_models_dir),
        "--no-default-models",
        "--model",
        "tiny-t2i",
        "-o",
        str(out),
    ]
    assert main([*args, "--steps", "2", "--quiet"]) == 0
    names = ["00000-00-3.png", "00000-01-4.png", "00001-00-8.png"]
    assert sorted(p.name for p in out.glob("*.png")) == names
    entries = _manifest(out)
    assert [e["file"] for e in entries] == names
    assert [(e["row"], e["line"], e["index"]) for e in entries] == [(0, 1, 0), (0, 1, 1), (1, 2, 0)]
    for entry in entries:
        record = read_record(out / entry["file"])
        assert record.to_dict() == entry["record"]
    assert entries[1]["record"]["seed"] == 4 and entries[1]["record"]["batch_index"] == 1
    assert entries[2]["record"]["class_name"] == "animals" and entries[2]["record"]["model"] == "tiny-c2i"
    assert not list(out.glob("manifest.rank*"))

    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
    manifest_before = (out / "manifest.jsonl").read_bytes()
    assert main([*args, "--steps", "2", "--quiet"]) == 0
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")} == before
    assert (out / "manifest.jsonl").read_bytes() == manifest_before

    # a changed row is regenerated, not mistaken for done
    assert main([*args, "--steps", "3", "--quiet"]) == 0
    assert all(e["record"]["steps"] == 3 for e in _manifest(out))


def test_resume_after_kill(tmp_path, tiny_models_dir):
    prompts = tmp_path / "p.txt"
    words = [f"{c} {t}" for c in ("a red", "a blue", "a green") for t in ("cat", "dog", "star", "tree", "car")]
    prompts.write_text("\n".join(words) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "pipelines.batch", str(prompts), "--models-dir", str(tiny_models_dir)]
    cmd += ["--no-default-models", "--model", "tiny-t2i", "-o", str(out), "--steps", "6", "--quiet"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("*.png")):
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "no image appeared within 60 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    survivors = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.png")}
    assert 1 <= len(survivors) < len(words), "the run was not interrupted midway"
    assert not (out / "manifest.jsonl").exists()  # merged only at the end of a run

    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) == len(words) and [int(n[:5]) for n in pngs] == list(range(len(words)))
    for name, stamp in survivors.items():  # finished images were not regenerated
        path = out / name
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp
    entries = _manifest(out)
    assert [e["file"] for e in entries] == pngs
    assert [e["record"]["prompt"] for e in entries] == words
    assert not list(out.glob(".*.tmp")) and not list(out.glob("manifest.rank*"))


@pytest.mark.skipif(
    shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
    reason="accelerate CLI not installed",
)
def test_two_processes_write_the_same_bytes_as_one(tmp_path, tiny_models_dir):
    prompts = tmp_path / "p.csv"
    prompts.write_text(
        "prompt,seed,count,model,class\na red cat,1,2,,\na blue dog,,1,,\n,,2,tiny-c2i,food\nthe sun,7,2,,\n",
        encoding="utf-8",
    )
    common = [str(prompts), "--models-dir", str(tiny_models_dir), "--no-default-models", "--model", "tiny-t2i"]
    common += ["--steps", "2", "--quiet"]
    one = tmp_path / "one"
    assert main([*common, "-o", str(one)]) == 0

    two = tmp_path / "two"
    launcher = Path(sys.executable).with_name("accelerate")
    # `accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's simple launcher, no MPI);
    # the torchrun-based launcher with ACCELERATE_USE_CPU gives two CPU processes in a gloo group.
    cmd = [str(launcher) if launcher.exists() else "accelerate", "launch", "--multi_gpu", "--num_processes", "2"]
    cmd += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["-m", "pipelines.batch", *common, "-o", str(two)]
    run = subprocess.run(
        cmd, cwd=ROOT, env={**_env(), "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=180
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 processes" in run.stdout

    files = sorted(p.name for p in one.iterdir())
    assert files == sorted(p.name for p in two.iterdir())
    assert len([f for f in files if f.endswith(".png")]) == 7 and "manifest.jsonl" in files
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
