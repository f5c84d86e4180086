"""Our pipelines on stock diffusers checkpoints give diffusers' own images (float32, <= 1/255 on uint8)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from tiny_models import save_stock_dit, save_stock_pixart

from pipelines import ClassToImagePipeline, TextToImagePipeline, load_pipeline


def _uint8(images: np.ndarray) -> np.ndarray:
    return (np.asarray(images) * 255).round().astype(np.int16)


@pytest.mark.parametrize("sigma", [False, True], ids=["pixart-alpha", "pixart-sigma"])
@pytest.mark.parametrize("scheduler", [None, "ddim", "euler"])
def test_text_pipeline_matches_diffusers_pixart(tmp_path, sigma, scheduler):
    path = save_stock_pixart(tmp_path / "pixart", sigma=sigma)
    ref = DiffusionPipeline.from_pretrained(path)
    ours = load_pipeline(path)
    assert isinstance(ours, TextToImagePipeline)
    if scheduler is not None:
        from pipelines import make_scheduler

        ref.scheduler = make_scheduler(scheduler, ref.scheduler.config)
    args = dict(
        prompt=["a red cat", "a smiling face with a heart"],
        negative_prompt="green dog",
        num_inference_steps=4,
        guidance_scale=4.5,
        height=32,
        width=32,
        output_type="np",
        use_resolution_binning=False,
    )
    expected = ref(**args, generator=torch.Generator().manual_seed(7), clean_caption=False).images
    got = ours(**args, generator=torch.Generator().manual_seed(7), scheduler=scheduler).images
    assert expected.shape == got.shape == (2, 32, 32, 3)
    assert np.abs(_uint8(expected) - _uint8(got)).max() <= 1
    assert expected.std() > 0.01  # the comparison is between real, non-constant images


def test_text_pipeline_matches_pixart_alpha_micro_conditions_and_binning(tmp_path):
    """sample_size 128 switches on PixArt-α's size micro-conditions; binning maps 96x64 to a trained bin."""
    path = save_stock_pixart(tmp_path / "pixart", sigma=False, sample_size=32, vae_blocks=4)
    ref = DiffusionPipeline.from_pretrained(path)
    ours = load_pipeline(path)
    args = dict(
        prompt="a blue star", num_inference_steps=3, guidance_scale=3.0, height=192, width=256, output_type="np"
    )
    expected = ref(**args, generator=torch.Generator().manual_seed(1), clean_caption=False).images
    got = ours(**args, generator=torch.Generator().manual_seed(1)).images
    assert expected.shape == got.shape == (1, 192, 256, 3)
    assert np.abs(_uint8(expected) - _uint8(got)).max() <= 1


def test_micro_conditions_reach_the_transformer(tmp_path):
    from tiny_models import tiny_pixart

    model = tiny_pixart(sample_size=128)
    assert model.use_additional_conditions
    x, e, t = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 16), torch.tensor([3])
    a = model(
        x, e, t, added_cond_kwargs={"resolution": torch.tensor([[64.0, 64.0]]), "aspect_ratio": torch.tensor([[1.0]])}
    )
    b = model(
        x, e, t, added_cond_kwargs={"resolution": torch.tensor([[64.0, 32.0]]), "aspect_ratio": torch.tensor([[2.0]])}
    )
    assert not torch.allclose(a.sample, b.sample)


@pytest.mark.parametrize("scheduler", [None, "dpm++2m"])
def test_class_pipeline_matches_diffusers_dit(tmp_path, scheduler):
    path = save_stock_dit(tmp_path / "dit")
    ref = DiffusionPipeline.from_pretrained(path)
    ours = load_pipeline(path)
    assert isinstance(ours, ClassToImagePipeline)
    if scheduler is not None:
        from pipelines import make_scheduler

        ref.scheduler = make_scheduler(scheduler, ref.scheduler.config)
    expected = ref(
        class_labels=[0, 2],
        num_inference_steps=5,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images
    got = ours(
        class_labels=[0, 2],
        num_inference_steps=5,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
        scheduler=scheduler,
    ).images
    assert expected.shape == got.shape
    assert np.abs(_uint8(expected) - _uint8(got)).max() <= 1
    assert expected.std() > 0.01


def test_class_names_resolve_like_dit_pipeline(tmp_path):
    ours = load_pipeline(save_stock_dit(tmp_path / "dit"))
    assert ours.get_label_ids(["goldfish", "white shark", 1]) == [1, 2, 1]
    assert ours.num_classes == 1000
