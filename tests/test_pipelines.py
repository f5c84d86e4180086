"""Pipeline behaviour beyond parity: seeds, callbacks, interruption, records, and every bad input of the issue."""

from __future__ import annotations

import json
import math
import pickle

import numpy as np
import pytest
import torch
from tiny_models import tiny_class_pipeline, tiny_text_pipeline

from pipelines import InputError, ModelLoadError, load_pipeline
from pipelines.catalog import Catalog
from pipelines.metadata import read_record, save_png


@pytest.fixture(scope="module")
def t2i():
    pipe = tiny_text_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def c2i():
    pipe = tiny_class_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_per_image_seeds_regenerate_one_image_alone(t2i):
    batch = t2i("a red cat", num_images_per_prompt=3, seed=10, num_inference_steps=3, output_type="np")
    assert batch.seeds == [10, 11, 12]
    single = t2i("a red cat", seed=12, num_inference_steps=3, output_type="np")
    np.testing.assert_allclose(batch.images[2], single.images[0], atol=1e-4)  # batched matmul rounding
    assert not np.allclose(batch.images[0], batch.images[1])


def test_png_record_reproduces_the_call(t2i, tmp_path):
    out = t2i("a smiling face", negative_prompt="dog", seed=5, num_inference_steps=4, guidance_scale=3.0)
    path = save_png(out.images[0], tmp_path / "a.png", out.records[0])
    record = read_record(path)
    assert record.prompt == "a smiling face" and record.negative_prompt == "dog" and record.seed == 5
    again = t2i(**record.to_call_kwargs(), output_type="pil").images[0]
    assert np.array_equal(np.asarray(again), np.asarray(out.images[0]))


def test_callback_on_step_end_and_interrupt(t2i):
    seen = []

    def callback(pipe, i, t, kwargs):
        seen.append(i)
        if i == 1:
            pipe.request_interrupt()
        return kwargs

    out = t2i("a cat", num_inference_steps=6, seed=0, callback_on_step_end=callback)
    assert seen == [0, 1] and out.interrupted
    # the flag is cleared: the next call runs all its steps
    seen.clear()
    out = t2i("a cat", num_inference_steps=3, seed=0, callback_on_step_end=callback_none(seen))
    assert seen == [0, 1, 2] and not out.interrupted


def callback_none(seen):
    def callback(pipe, i, t, kwargs):
        seen.append(i)
        return kwargs

    return callback


@pytest.mark.parametrize("scheduler", ["dpm++2m", "dpm++2m-karras", "ddim", "ddpm", "euler", "euler_a", "unipc", "lcm"])
def test_every_named_scheduler_runs(c2i, scheduler):
    out = c2i([1], num_inference_steps=3, seed=0, scheduler=scheduler, output_type="np")
    assert np.isfinite(out.images).all()
    assert out.records[0].scheduler == scheduler


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 9}, "multiple of 2"),
        ({"width": 0}, "between 2 and"),
        ({"num_inference_steps": 0}, "between 1 and 1000"),
        ({"num_inference_steps": 10**6}, "between 1 and 1000"),
        ({"guidance_scale": math.nan}, "finite"),
        ({"guidance_scale": "lots"}, "must be a number"),
        ({"scheduler": "warp-drive"}, "Unknown scheduler 'warp-drive'. Choose one of: dpm\\+\\+2m"),
        ({"prompt": ""}, None),
        ({"prompt": "x" * 5000}, "limit is 4000"),
        ({"num_images_per_prompt": 0}, "between 1 and 64"),
        ({"seed": -1}, "non-negative"),
    ],
)
def test_text_bad_input_is_named_before_work(t2i, kwargs, message, monkeypatch):
    calls = []
    forward = t2i.transformer.forward
    monkeypatch.setattr(t2i.transformer, "forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    args = {"prompt": "a cat", "num_inference_steps": 2, **kwargs}
    if message is None:
        out = t2i(**args)  # an empty prompt is allowed: it is the unconditional input
        assert len(out.images) == 1
        return
    with pytest.raises(InputError, match=message):
        t2i(**args)
    assert not calls, "the error must come before any model work"


@pytest.mark.parametrize(
    ("labels", "message"),
    [(7, "out of range: this model has classes 0..3"), ("aminals", "Did you mean: animals"), ([], "empty")],
)
def test_unknown_class_labels(c2i, labels, message):
    with pytest.raises(InputError, match=message):
        c2i(labels, num_inference_steps=2)


def test_missing_and_corrupt_model_directories(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a catalog model"):
        load_pipeline(tmp_path / "nope", catalog=Catalog(roots=[]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(tmp_path / "empty", catalog=Catalog(roots=[]))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model_index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="corrupt"):
        load_pipeline(bad, catalog=Catalog(roots=[]))


def test_pickle_where_safetensors_was_expected(tmp_path):
    path = tmp_path / "t2i"
    tiny_class_pipeline().save_pretrained(path)
    weights = next((path / "transformer").glob("*.safetensors"))
    weights.write_bytes(pickle.dumps({"x": torch.zeros(2)}))
    with pytest.raises(ModelLoadError, match="pickle"):
        load_pipeline(path, catalog=Catalog(roots=[]))


def test_truncated_weights_are_a_load_error(tmp_path):
    path = tmp_path / "c2i"
    tiny_class_pipeline().save_pretrained(path)
    weights = next((path / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ModelLoadError):
        load_pipeline(path, catalog=Catalog(roots=[]))


def test_catalog_lists_kinds(tiny_models_dir):
    catalog = Catalog(roots=[tiny_models_dir])
    assert catalog.names("text-to-image") == ["tiny-t2i"]
    assert catalog.names("class-to-image") == ["tiny-c2i"]
    pipe = load_pipeline("tiny-c2i", catalog=catalog)
    assert pipe.model_name == "tiny-c2i" and len(pipe.model_hash) == 10
    assert json.loads((tiny_models_dir / "tiny-c2i" / "model_index.json").read_text())["_class_name"] == (
        "ClassToImagePipeline"
    )


def test_guidance_channels_guides_only_the_first_channels(c2i):
    kw = dict(num_inference_steps=1, seed=1, guidance_scale=6.0, output_type="latent")  # one step: no feedback
    full = c2i([0], **kw).images
    part = c2i([0], guidance_channels=2, **kw).images
    unguided = c2i([0], **{**kw, "guidance_scale": 1.0}).images
    torch.testing.assert_close(full[:, :2], part[:, :2])
    assert not torch.allclose(full[:, 2], part[:, 2])
    torch.testing.assert_close(part[:, 2], unguided[:, 2])  # channel 2 follows the conditional branch alone


def test_execution_device_is_looked_up_once_per_call(t2i, monkeypatch):
    """diffusers' lookup walks every module for offloading hooks; a call resolves it once and forgets it after."""
    from diffusers import DiffusionPipeline

    lookups = []
    stock = DiffusionPipeline._execution_device

    def counting(self):
        lookups.append(1)
        return stock.fget(self)

    monkeypatch.setattr(DiffusionPipeline, "_execution_device", property(counting))
    t2i("red apple", num_inference_steps=3, seed=0, guidance_scale=3.0)
    assert len(lookups) == 1 and t2i._call_device is None
    with pytest.raises(InputError):
        t2i("red apple", num_inference_steps=0)
    assert t2i._call_device is None  # cleared after a failed call too
    assert t2i._execution_device == torch.device("cpu") and len(lookups) == 3  # outside a call: diffusers' own
