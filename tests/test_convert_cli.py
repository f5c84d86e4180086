"""``python -m dit.convert {var,dimr,vdt}``: tiny random checkpoints in the official key layouts (the generators of
the converter tests) go through the command line; the result loads (``load_pipeline`` for whole pipelines) and
equals the converter's direct output; wrong and unsafe files get a clear error and exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

sys.path.insert(0, str(Path(__file__).parent))
from test_dimr import official_layout  # noqa: E402
from test_var import official_vae_state_dict, official_var_state_dict  # noqa: E402
from test_vdt import official_state_dict as official_vdt_state_dict  # noqa: E402
from tiny_models import tiny_vae  # noqa: E402

from dit.convert.__main__ import main as convert_main  # noqa: E402
from dit.convert.dimr_original import convert_dimr_original  # noqa: E402
from dit.convert.var_original import convert_var_pipeline, convert_var_transformer  # noqa: E402
from dit.convert.vdt_original import convert_vdt_original  # noqa: E402
from dit.models.dimr import DiMRModel  # noqa: E402
from dit.models.var import VARTransformer  # noqa: E402
from dit.models.vdt import VDTModel  # noqa: E402
from pipelines import load_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TRIPPED: list[str] = []


class Payload:
    """An object a malicious pickle would run code through: unpickling it records a trip."""

    def __setstate__(self, state: dict) -> None:
        TRIPPED.append("unpickled")


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture(scope="module")
def sd_vae(tmp_path_factory) -> Path:
    """A tiny diffusers AutoencoderKL folder (4 latent channels, as the SD VAE) standing in for sd-vae-ft-ema."""
    path = tmp_path_factory.mktemp("vae") / "sd-vae"
    tiny_vae().save_pretrained(path, safe_serialization=True)
    return path


def test_var_kind_writes_a_loadable_pipeline(tmp_path, capsys):
    sd, vsd = official_var_state_dict(), official_vae_state_dict()
    torch.save(sd, tmp_path / "var_d2.pth")
    torch.save(vsd, tmp_path / "vae_tiny.pth")
    names = {"0": "smileys", "1": "animals, pets", "2": "food"}
    (tmp_path / "names.json").write_text(json.dumps(names))
    out = tmp_path / "var-pipe"
    argv = ["var", str(tmp_path / "var_d2.pth"), str(out), "--vae", str(tmp_path / "vae_tiny.pth")]
    assert convert_main([*argv, "--id2label", str(tmp_path / "names.json")]) == 0
    assert "VARPipeline" in capsys.readouterr().out
    pipe = load_pipeline(out)
    direct = convert_var_pipeline(vsd, sd, id2label=names)
    assert type(pipe).__name__ == "VARPipeline" and pipe.get_label_ids("pets") == [1]
    assert_same_weights(pipe.transformer, direct.transformer)
    assert_same_weights(pipe.vae, direct.vae)
    a = pipe(1, seed=4, output_type="np").images
    np.testing.assert_array_equal(a, direct(1, seed=4, output_type="np").images)
    record = json.loads((out / "conversion.json").read_text())
    assert record["kind"] == "var" and len(record["vae"]["source_sha256"]) == 64

    # Without the VQ-VAE: the transformer alone, and the message says what completes it.
    assert convert_main(["var", str(tmp_path / "var_d2.pth"), str(tmp_path / "t")]) == 0
    assert "--vae" in capsys.readouterr().out
    assert_same_weights(VARTransformer.from_pretrained(tmp_path / "t" / "transformer"), convert_var_transformer(sd))
    assert not (tmp_path / "t" / "model_index.json").exists()


def test_dimr_kind_transformer_and_pipeline(tmp_path, capsys, sd_vae):
    sd = official_layout()
    torch.save(sd, tmp_path / "DiMR-tiny_2R.pth")
    src = str(tmp_path / "DiMR-tiny_2R.pth")
    assert convert_main(["dimr", src, str(tmp_path / "t"), "--num-heads", "2"]) == 0
    assert "stabilityai/sd-vae-ft-ema" in capsys.readouterr().out
    loaded = DiMRModel.from_pretrained(tmp_path / "t" / "transformer").eval()
    direct = convert_dimr_original(sd, num_heads=2)
    assert_same_weights(loaded, direct)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t, y = torch.tensor([100, 900]), torch.tensor([5, 2])
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, y).sample, direct(x, t, y).sample, rtol=0, atol=0)

    out = tmp_path / "dimr-pipe"
    assert convert_main(["dimr", src, str(out), "--num-heads", "2", "--vae", str(sd_vae)]) == 0
    pipe = load_pipeline(out)
    assert type(pipe).__name__ == "ClassToImagePipeline" and isinstance(pipe.transformer, DiMRModel)
    assert_same_weights(pipe.transformer, direct)
    cfg = pipe.scheduler.config  # the SD schedule DiMR was trained with
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end, cfg.prediction_type) == (
        "scaled_linear",
        0.00085,
        0.012,
        "epsilon",
    )
    images = pipe(class_labels=[2], num_inference_steps=2, seed=0, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_vdt_kind_transformer_and_pipeline(tmp_path, sd_vae):
    sd = official_vdt_state_dict()
    torch.save({"model": sd}, tmp_path / "vdt.pt")  # the official training script's wrapping
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dit.convert", "vdt", str(tmp_path / "vdt.pt"), str(tmp_path / "t"), "--num-heads"]
    proc = subprocess.run([*cmd, "2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Only the transformer was written" in proc.stdout
    direct = convert_vdt_original(sd, num_heads=2)
    assert_same_weights(VDTModel.from_pretrained(tmp_path / "t" / "transformer"), direct)

    out = tmp_path / "vdt-pipe"
    argv = ["vdt", str(tmp_path / "vdt.pt"), str(out), "--num-heads", "2", "--vae", str(sd_vae)]
    assert convert_main(argv) == 0
    pipe = load_pipeline(out)
    assert type(pipe).__name__ == "VideoPipeline" and pipe.num_frames == 3
    assert_same_weights(pipe.transformer, direct)
    assert pipe.scheduler.config.beta_schedule == "linear" and pipe.vae.config.latent_channels == 4


def test_wrong_and_unsafe_files_are_clear_errors(tmp_path, capsys, sd_vae):
    torch.save({"w": torch.zeros(2), "payload": Payload()}, tmp_path / "evil.pth")
    TRIPPED.clear()
    assert convert_main(["dimr", str(tmp_path / "evil.pth"), str(tmp_path / "o1")]) == 2
    assert "arbitrary Python objects" in capsys.readouterr().err and not TRIPPED

    torch.save({"model": official_vdt_state_dict()}, tmp_path / "vdt.pt")  # a VDT file given as DiMR / as VAR
    assert convert_main(["dimr", str(tmp_path / "vdt.pt"), str(tmp_path / "o2")]) == 2
    assert "DiMR checkpoint: expected stages.0..K keys" in capsys.readouterr().err
    assert convert_main(["var", str(tmp_path / "vdt.pt"), str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: VAR transformer checkpoint: key 'word_embed.weight' is missing") and "x_embedder" in err
    )

    torch.save(official_var_state_dict(), tmp_path / "var.pth")
    argv = ["var", str(tmp_path / "var.pth"), str(tmp_path / "o4"), "--vae", str(tmp_path / "var.pth")]
    assert convert_main(argv) == 2  # the transformer file passed as the VQ-VAE
    assert (
        "error: VAR VQ-VAE checkpoint: key 'encoder.down.0.block.0.conv1.weight' is missing" in capsys.readouterr().err
    )

    torch.save(official_layout(), tmp_path / "dimr.pth")
    dimr = ["dimr", str(tmp_path / "dimr.pth"), str(tmp_path / "o5"), "--num-heads", "2"]
    assert convert_main([*dimr, "--vae", str(tmp_path / "dimr.pth")]) == 2
    assert "give the diffusers VAE folder" in capsys.readouterr().err
    (tmp_path / "fake-vae").mkdir()
    (tmp_path / "fake-vae" / "config.json").write_text("{}")
    (tmp_path / "fake-vae" / "diffusion_pytorch_model.safetensors").write_bytes((tmp_path / "evil.pth").read_bytes())
    assert convert_main([*dimr, "--vae", str(tmp_path / "fake-vae")]) == 2  # a pickle named .safetensors
    assert "bytes are a torch zip pickle" in capsys.readouterr().err and not TRIPPED
    vdt = ["vdt", str(tmp_path / "vdt.pt"), str(tmp_path / "o6"), "--num-heads", "2"]
    wide = tmp_path / "vae8"
    AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=8, layers_per_block=1).save_pretrained(
        wide
    )
    assert convert_main([*vdt, "--vae", str(wide)]) == 2
    assert "latent channels" in capsys.readouterr().err
    assert convert_main(["dit", str(tmp_path / "dimr.pth"), str(tmp_path / "o7"), "--vae", str(sd_vae)]) == 2
    assert "apply to the kinds var, dimr, vdt" in capsys.readouterr().err
    assert convert_main(["vdt", str(tmp_path / "missing.pt"), str(tmp_path / "o8")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))  # nothing is written on an error
