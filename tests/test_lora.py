"""LoRA: train on a tiny folder against tiny saved pipelines (ours and stock PixArt), save in the PEFT/diffusers
layout, load onto pipelines with weights, several at once, with clear errors for bad files and weights."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import save_stock_pixart

from pipelines import InputError, load_pipeline
from pipelines.lora import (
    LORA_WEIGHT_NAME,
    LoraBaseModelWarning,
    LoraLoadError,
    load_loras,
    loaded_loras,
    read_lora,
    unload_loras,
)
from pipelines.metadata import file_hash
from training.lora import LoraTrainer, load_lora_config, main

GEN = dict(num_inference_steps=2, seed=0, output_type="latent")  # latents: the tiny models saturate pixels


@pytest.fixture(scope="module")
def lora_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lora-data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        arr = np.zeros((12, 12, 3), np.uint8)
        arr[..., i % 3] = 200
        arr[3:9, 3:9] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": ["red cat", "green tree", "blue car"][i % 3], "label": i % 3})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def train(pipeline: Path, data: Path, out: Path, **values) -> LoraTrainer:
    base = {
        "pipeline": str(pipeline),
        "data.root": str(data),
        "output_dir": str(out),
        "lora.rank": 4,
        "lora.alpha": 4,
        "optim.max_steps": 3,
        "optim.batch_size": 2,
        "optim.learning_rate": 1e-3,
        "tensorboard": False,
        "log_every": 1,
    }
    trainer = LoraTrainer(load_lora_config(values={**base, **values}))
    trainer.train(resume="none")
    return trainer


@pytest.fixture(scope="module")
def t2i_loras(tiny_models_dir, lora_data, tmp_path_factory) -> tuple[LoraTrainer, Path, Path]:
    """Two LoRAs on tiny-t2i: 'style' (attention, rank 4) and 'faces' (other layers, rank 2, alpha 4)."""
    root = tmp_path_factory.mktemp("loras")
    trainer = train(tiny_models_dir / "tiny-t2i", lora_data, root / "style")
    other = train(
        tiny_models_dir / "tiny-t2i", lora_data, root / "faces-run", **{"seed": 1, "lora.rank": 2,
        "lora.targets": ["to_q", "to_v", "ff.net.2"]},
    )  # fmt: skip
    faces = root / "faces.safetensors"
    (root / "faces-run" / LORA_WEIGHT_NAME).rename(faces)
    assert other.global_step == 3
    return trainer, root / "style" / LORA_WEIGHT_NAME, faces


def test_training_changes_only_the_lora_weights(t2i_loras, tiny_models_dir):
    trainer, _, _ = t2i_loras
    base = load_pipeline(tiny_models_dir / "tiny-t2i")
    base_weights = base.transformer.state_dict()
    model = trainer.accelerator.unwrap_model(trainer.transformer)
    lora_params = 0
    for name, param in model.named_parameters():
        if ".lora_" in name:
            lora_params += 1
            assert param.requires_grad and param.dtype == torch.float32
            if ".lora_B." in name:
                assert param.abs().max() > 0, f"{name} did not train"
        else:
            assert not param.requires_grad, name
            assert torch.equal(param, base_weights[name.replace(".base_layer", "")]), f"{name} changed"
    assert lora_params == 2 * 2 * 4 * 2  # blocks x (attn1, attn2) x (q, k, v, out) x (A, B)
    for name, param in trainer.text_encoder.named_parameters():
        assert not param.requires_grad and torch.equal(param, base.text_encoder.state_dict()[name])
    losses = [json.loads(line) for line in (trainer.out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in losses] == [1, 2, 3]


def test_file_has_peft_keys_and_metadata(t2i_loras, tiny_models_dir):
    _, style, _ = t2i_loras
    with safe_open(str(style), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    pattern = re.compile(
        r"^transformer\.transformer_blocks\.[01]\.attn[12]\.(to_q|to_k|to_v|to_out\.0)\.lora_[AB]\.weight$"
    )
    assert len(keys) == 32 and all(pattern.match(k) for k in keys), keys[:4]
    peft = json.loads(meta["lora_adapter_metadata"])
    assert peft["transformer.r"] == 4 and peft["transformer.lora_alpha"] == 4
    assert sorted(peft["transformer.target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert (meta["rank"], meta["alpha"], meta["base_model"]) == ("4", "4", "tiny-t2i")
    assert json.loads(meta["target_modules"]) == ["to_q", "to_k", "to_v", "to_out.0"]
    assert meta["base_model_hash"] == load_pipeline(tiny_models_dir / "tiny-t2i").model_hash
    config = json.loads(meta["training_config"])
    assert config["lora"]["rank"] == 4 and config["optim"]["max_steps"] == 3 and config["kind"] == "text-to-image"
    info = read_lora(style)
    assert (info.rank, info.alpha, info.base_model) == (4, 4.0, "tiny-t2i")

    # diffusers' own loader reads the file (LoraConfig from the metadata) and gives the same output as ours.
    ours = load_pipeline(tiny_models_dir / "tiny-t2i")
    load_loras(ours, [(style, 1.0)])
    theirs = load_pipeline(tiny_models_dir / "tiny-t2i")
    theirs.transformer.load_lora_adapter(str(style), prefix="transformer", adapter_name="style")
    assert torch.equal(ours("red cat", **GEN).images, theirs("red cat", **GEN).images)


def test_weight_zero_is_the_base_model_and_weight_one_changes_it(t2i_loras, tiny_models_dir):
    _, style, _ = t2i_loras
    pipe = load_pipeline(tiny_models_dir / "tiny-t2i")
    base = pipe("red cat", **GEN).images
    base_png = pipe("red cat", num_inference_steps=2, seed=0, output_type="np").images
    load_loras(pipe, [(style, 0.0)])
    assert torch.equal(pipe("red cat", **GEN).images, base)
    np.testing.assert_array_equal(pipe("red cat", num_inference_steps=2, seed=0, output_type="np").images, base_png)
    load_loras(pipe, [(style, 1.0)])
    one = pipe("red cat", **GEN).images
    assert (one - base).abs().max() > 1e-3
    load_loras(pipe, [(style, 2.0)])  # weight scales the LoRA's contribution
    assert not torch.equal(pipe("red cat", **GEN).images, one)
    unload_loras(pipe)
    assert torch.equal(pipe("red cat", **GEN).images, base)
    assert type(pipe.transformer.transformer_blocks[0].attn1.to_q) is torch.nn.Linear


def test_two_loras_with_weights_are_recorded_and_loading_is_idempotent(t2i_loras, tiny_models_dir):
    _, style, faces = t2i_loras
    pipe = load_pipeline(tiny_models_dir / "tiny-t2i")
    load_loras(pipe, [(style, 0.5)])
    style_only = pipe("red cat", **GEN).images
    record = load_loras(pipe, [(style, 0.5), (str(faces), 0.8)])
    assert record == [
        {"name": "style", "weight": 0.5, "hash": file_hash(style)},
        {"name": "faces", "weight": 0.8, "hash": file_hash(faces)},
    ]
    to_q = pipe.transformer.transformer_blocks[0].attn1.to_q
    assert set(to_q.lora_A) == {"style", "faces"}
    assert to_q.scaling == {"style": 0.5 * 4 / 4, "faces": 0.8 * 4 / 2}  # weight * alpha / rank
    out = pipe("red cat", **GEN)
    assert out.records[0].adapters == record
    assert not torch.equal(out.images, style_only)

    again = load_loras(pipe, [(style, 0.5), (faces, 0.8)])  # same list: nothing stacks
    assert again == record and set(to_q.lora_A) == {"style", "faces"}
    assert torch.equal(pipe("red cat", **GEN).images, out.images)
    assert [e["rank"] for e in loaded_loras(pipe)] == [4, 2]

    load_loras(pipe, [(style, 0.5)])  # a different list replaces the set
    to_q = pipe.transformer.transformer_blocks[0].attn1.to_q
    assert set(to_q.lora_A) == {"style"} and not hasattr(pipe.transformer.transformer_blocks[0].ff.net[2], "lora_A")
    assert torch.equal(pipe("red cat", **GEN).images, style_only)

    names = [r["name"] for r in load_loras(pipe, [(style.parent, 1), (style, 0.2)])]  # folder or file; de-duplicated
    assert names == ["style", "style_2"]
    assert load_loras(pipe, []) == [] and pipe.active_adapters_record == []
    assert pipe("red cat", **GEN).records[0].adapters == []


def test_bad_files_and_weights_give_clear_errors(t2i_loras, tiny_models_dir, tmp_path):
    _, style, faces = t2i_loras
    pipe = load_pipeline(tiny_models_dir / "tiny-t2i")
    load_loras(pipe, [(faces, 0.7)])
    before = list(pipe.active_adapters_record)

    with pytest.raises(LoraLoadError, match="does not exist"):
        load_loras(pipe, [(style, 1.0), (tmp_path / "nope.safetensors", 1.0)])

    pickled = tmp_path / "evil.safetensors"
    torch.save({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, pickled)
    with pytest.raises(LoraLoadError, match="pickle.*not safetensors"):
        load_loras(pipe, [(pickled, 1.0)])

    alien = tmp_path / "alien.safetensors"
    save_file(
        {"transformer.blocks.0.attn.qkv.lora_A.weight": torch.zeros(4, 16),
         "transformer.blocks.0.attn.qkv.lora_B.weight": torch.zeros(48, 4)}, str(alien),
    )  # fmt: skip
    with pytest.raises(LoraLoadError, match=r"does not fit.*modules this model does not have.*blocks\.0\.attn\.qkv"):
        load_loras(pipe, [(alien, 1.0)])

    wide = tmp_path / "wide.safetensors"
    with safe_open(str(style), framework="pt") as f:
        tensors = {k: torch.zeros(f.get_tensor(k).shape[0], 24) if "lora_A" in k else f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(wide))
    with pytest.raises(LoraLoadError, match=r"wrong shape.*LoRA 24->16, model 16->16"):
        load_loras(pipe, [(wide, 1.0)])

    kohya = tmp_path / "kohya.safetensors"
    save_file({"lora_unet_blocks_0_attn_q.lora_down.weight": torch.zeros(4, 16)}, str(kohya))
    with pytest.raises(LoraLoadError, match="kohya"):
        load_loras(pipe, [(kohya, 1.0)])

    full_model = next((tiny_models_dir / "tiny-t2i" / "transformer").glob("*.safetensors"))
    with pytest.raises(LoraLoadError, match="is not a LoRA"):
        load_loras(pipe, [(full_model, 1.0)])

    for weight in (float("nan"), float("inf"), "lots", None, True):
        with pytest.raises(InputError, match="must be a (finite )?number"):
            load_loras(pipe, [(style, weight)])

    assert pipe.active_adapters_record == before  # every failure left the loaded set untouched
    assert set(pipe.transformer.transformer_blocks[0].attn1.to_q.lora_A) == {"faces"}

    pipe.model_hash = "0123456789"  # same shapes, another base model: applied, with a warning naming both
    with pytest.warns(LoraBaseModelWarning, match="trained on tiny-t2i"):
        load_loras(pipe, [(style, 1.0)])


def test_stock_pixart_and_class_dit_get_loras(lora_data, tiny_models_dir, tmp_path, capsys):
    pixart = save_stock_pixart(tmp_path / "pixart")  # diffusers PixArtTransformer2DModel (no PeftAdapterMixin) + VAE
    code = main([
        "--pipeline", str(pixart), "--data", str(lora_data), "--output", str(tmp_path / "px"), "--steps", "2",
        "--batch-size", "2", "--lr", "1e-3", "--rank", "2", "--alpha", "4", "--set", "tensorboard=false",
    ])  # fmt: skip
    assert code == 0
    path = tmp_path / "px" / LORA_WEIGHT_NAME
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["base_model_class"] == "PixArtTransformer2DModel"
        assert "transformer.transformer_blocks.1.attn2.to_out.0.lora_B.weight" in set(f.keys())  # noqa: SIM118
    pipe = load_pipeline(pixart)
    gen = dict(GEN, height=32, width=32, use_resolution_binning=False)
    base = pipe("red cat", **gen).images
    load_loras(pipe, [(path, 0)])
    assert torch.equal(pipe("red cat", **gen).images, base)
    load_loras(pipe, [(path, 1)])
    assert (pipe("red cat", **gen).images - base).abs().max() > 1e-4

    # class-conditional DiTModel, MLP layers included; class labels are the model's ids
    code = main([
        "--pipeline", str(tiny_models_dir / "tiny-c2i"), "--data", str(lora_data), "--output", str(tmp_path / "c2i"),
        "--steps", "2", "--batch-size", "2", "--targets", "to_q,to_v,ff.net.2", "--set", "tensorboard=false",
    ])  # fmt: skip
    assert code == 0
    c2i = load_pipeline(tiny_models_dir / "tiny-c2i")
    assert load_loras(c2i, [(tmp_path / "c2i", 1.0)])[0]["name"] == "c2i"
    assert len(c2i([0, 1], **GEN).images) == 2

    capsys.readouterr()
    code = main(
        ["--pipeline", str(pixart), "--data", str(lora_data), "--output", str(tmp_path / "x"), "--targets", "qkv"]
    )
    assert code == 2 and "match no layer" in capsys.readouterr().err
    assert main(["--pipeline", str(pixart), "--data", str(lora_data), "--set", "lora.rnak=4"]) == 2
    assert "valid keys" in capsys.readouterr().err


def test_resume_continues_the_lora_run_exactly(tiny_models_dir, lora_data, tmp_path):
    common = {"checkpoint.every": 2, "optim.max_steps": 4}
    full = train(tiny_models_dir / "tiny-t2i", lora_data, tmp_path / "full", **common)
    train(tiny_models_dir / "tiny-t2i", lora_data, tmp_path / "split", **{**common, "optim.max_steps": 2})
    assert (tmp_path / "split" / "checkpoint-2" / LORA_WEIGHT_NAME).is_file()  # checkpoints hold the LoRA, no base
    assert not list((tmp_path / "split" / "checkpoint-2").glob("model*.safetensors"))
    values = {"pipeline": str(tiny_models_dir / "tiny-t2i"), "data.root": str(lora_data), "lora.rank": 4,
              "lora.alpha": 4, "optim.batch_size": 2, "optim.learning_rate": 1e-3, "tensorboard": False,
              "output_dir": str(tmp_path / "split"), **common}  # fmt: skip
    resumed = LoraTrainer(load_lora_config(values=values))
    resumed.train(resume="auto")
    assert resumed.global_step == 4

    def losses(run: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run / "losses.jsonl").read_text().splitlines()]

    assert losses(tmp_path / "split") == losses(full.out)
    a, b = read_lora(full.out), read_lora(tmp_path / "split")
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def test_batch_rows_apply_their_loras_and_the_next_row_runs_without(t2i_loras, tiny_models_dir, tmp_path):
    from PIL import Image

    from pipelines.batch import main

    _, style, faces = t2i_loras
    pipe = load_pipeline(tiny_models_dir / "tiny-t2i")
    kw = dict(num_inference_steps=2, seed=3, output_type="np")
    base = pipe("red cat", **kw).images[0]
    load_loras(pipe, [(style, 0.8), (faces, 0.8)])
    both = pipe("red cat", **kw).images[0]
    rows = tmp_path / "rows.jsonl"
    (tmp_path / "loras").mkdir()
    for path in (style, faces):  # relative names are read from the prompts file's folder
        (tmp_path / "loras" / path.name).write_bytes(path.read_bytes())
    lora = f"loras/{style.name};loras/{faces.name}"
    rows.write_text(
        json.dumps({"prompt": "red cat", "seed": 3, "lora": lora, "lora_weight": 0.8})
        + "\n"
        + json.dumps({"prompt": "red cat", "seed": 3})
        + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "out"
    argv = [str(rows), "--models-dir", str(tiny_models_dir), "--no-default-models", "--model", "tiny-t2i"]
    assert main([*argv, "-o", str(out), "--steps", "2", "--quiet"]) == 0
    got = [np.asarray(Image.open(out / name)) for name in ("00000-00-3.png", "00001-00-3.png")]
    np.testing.assert_array_equal(got[0], (both * 255).round().astype(np.uint8))
    np.testing.assert_array_equal(got[1], (base * 255).round().astype(np.uint8))
    record = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["record"]
    assert [(a["weight"]) for a in record["adapters"]] == [0.8, 0.8]
