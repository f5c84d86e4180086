"""Training: a tiny run trains, resumes exactly after an interruption, loads in the pipeline; 2 processes work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "training" / "configs" / "tiny-test.yaml"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        arr = np.zeros((20, 20, 3), np.uint8)
        arr[..., i % 3] = 200
        arr[5:15, 5:15] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": ["red apple", "green tree", "blue car"][i % 3], "label": i % 3})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def run_train(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "ACCELERATE_USE_CPU": "1"}
    cmd = (launcher or [sys.executable]) + ["-m", "training.train", "--config", str(CONFIG), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_run(tiny_folder, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    common = ["--set", f"data.root={tiny_folder}", "--resume", "none"]
    run_train(*common, "--set", f"output_dir={full}")
    run_train(*common, "--set", f"output_dir={split}", "--set", "optim.max_steps=3")
    assert len(losses(split)) == 3
    proc = run_train("--set", f"data.root={tiny_folder}", "--set", f"output_dir={split}", "--resume", "auto")
    assert "resumed from" in proc.stdout + proc.stderr
    expected, got = losses(full), losses(split)
    assert len(expected) == len(got) == 6
    assert got == expected  # bit-identical loss sequence, steps 4-6 included
    assert not list(split.glob("*.tmp")), "no half-written checkpoint may remain"

    from pipelines import load_pipeline

    pipe = load_pipeline(split / "pipeline")
    out = pipe("red apple", num_inference_steps=3, seed=0, output_type="np")
    assert out.images.shape == (1, 16, 16, 3)
    again = load_pipeline(full / "pipeline")("red apple", num_inference_steps=3, seed=0, output_type="np")
    np.testing.assert_array_equal(out.images, again.images)  # the resumed run saved the same weights


def test_class_conditional_training_with_two_processes(tiny_folder, tmp_path):
    out = tmp_path / "ddp"
    # accelerate 1.x: `--cpu --num_processes 2` starts ONE process; ACCELERATE_USE_CPU + --multi_gpu starts two on
    # the CPU (gloo). The assertion on the printed process count proves two really ran.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1"]
    proc = run_train(
        "--set", f"data.root={tiny_folder}", "--set", f"output_dir={out}", "--set", "kind=class-to-image",
        "--set", "optim.max_steps=4", "--set", "optim.batch_size=2", "--resume", "none",
        launcher=launcher,
    )  # fmt: skip
    assert (proc.stdout + proc.stderr).count("2 process(es)") >= 1
    assert len(losses(out)) == 4
    from pipelines import ClassToImagePipeline, load_pipeline

    pipe = load_pipeline(out / "pipeline")
    assert isinstance(pipe, ClassToImagePipeline) and pipe.num_classes == 3
    assert len(pipe([0, 2], num_inference_steps=2, seed=1).images) == 2


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="optim.max_step.*valid keys.*max_steps"):
        load_config(CONFIG, ["optim.max_step=3"])
    with pytest.raises(ConfigError, match="kind must be one of"):
        load_config(CONFIG, ["kind=video"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_empty_folder_is_a_clear_cli_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", "--config", str(CONFIG), "--set", f"data.root={tmp_path / 'empty'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "empty" in proc.stderr


@pytest.mark.parametrize("qk_norm", [None, "layer_norm", "layer_norm_across_heads"])
def test_z_loss_processor_is_exact_attention_and_records_logsumexp(qk_norm):
    import torch

    from dit import TextDiTModel
    from training.zloss import collect_z_loss, install_z_loss

    torch.manual_seed(0)
    model = TextDiTModel(
        sample_size=8, patch_size=2, in_channels=3, out_channels=3, num_layers=2, num_attention_heads=2,
        attention_head_dim=8, caption_channels=8, qk_norm=qk_norm,
    )  # fmt: skip
    for p in model.parameters():  # leave the zero-initialised outputs: make attention matter
        torch.nn.init.normal_(p, std=0.3)
    x, e, t = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8), torch.tensor([5, 700])
    expected = model(x, e, t).sample
    procs = install_z_loss(model)
    assert len(procs) == 2
    got = model(x, e, t).sample
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    z = collect_z_loss(procs)
    assert z.item() > 0 and all(p.z is None for p in procs)
    model(x, e, t).sample.sum().backward()  # gradients flow through the explicit path too
    assert model.transformer_blocks[0].attn1.to_q.weight.grad is not None
