"""Trained attention survives save/load: the variant of a model whose processors carry parameters (agent attention)
is part of its config, so ``from_pretrained`` rebuilds the processors before the weights load; training-free
variants are not persisted; ``training.train`` trains a model with ``model.attention_variant`` from its YAML."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dit import DiTModel, TextDiTModel
from dit.attention import (
    AgentAttnProcessor,
    AttentionConfigError,
    WindowAttnProcessor,
    set_attention,
    trained_variant,
)

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import perturb  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
AGENT_CONFIG = ROOT / "training" / "configs" / "tiny-agent-test.yaml"
COMMON = dict(sample_size=8, patch_size=2, in_channels=3, num_layers=2, num_attention_heads=2, attention_head_dim=8)


def tiny(cls: type, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    if cls is DiTModel:
        return DiTModel(**COMMON, num_classes=4, learn_sigma=False, **kwargs)
    return TextDiTModel(**COMMON, out_channels=3, caption_channels=16, **kwargs)


def run(model: torch.nn.Module, size: tuple[int, int] = (8, 8)) -> torch.Tensor:
    """One forward on fixed random inputs; (8, 8) is the training grid of 4x4 tokens, others exercise the
    interpolated agent biases."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, *size, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        if isinstance(model, DiTModel):
            return model(x, t, torch.tensor([1, 3])).sample
        return model(x, torch.randn(2, 5, 16, generator=g), t).sample


def processor_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if ".attn1.processor." in k}


def saved_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def test_training_free_variants_are_not_persisted(tmp_path):
    model = tiny(DiTModel).eval()
    base = run(model)
    assert model.config.attention_variant == "sdpa" and model.attention_variant == "sdpa"
    assert set_attention(model, "window[window_size=2]") == "window[window_size=2]"
    assert model.config.attention_variant == "sdpa"  # the label lives on the model, not in its config
    model.save_pretrained(tmp_path / "m")
    assert saved_config(tmp_path / "m")["attention_variant"] == "sdpa"
    again = DiTModel.from_pretrained(tmp_path / "m").eval()
    assert again.attention_variant == "sdpa"
    assert all(isinstance(b.attn1.processor, AttnProcessor2_0) for b in again.transformer_blocks)
    torch.testing.assert_close(run(again), base)  # sdpa processors: the saved weights give the unswapped output
    # A training-free variant given to the constructor (a model trained with window attention) stays in its config.
    windowed = tiny(DiTModel, attention_variant="window[window_size=2]")
    windowed.save_pretrained(tmp_path / "w")
    assert saved_config(tmp_path / "w")["attention_variant"] == "window[window_size=2]"
    reloaded = DiTModel.from_pretrained(tmp_path / "w")
    assert isinstance(reloaded.transformer_blocks[1].attn1.processor, WindowAttnProcessor)
    assert reloaded.attention_variant == "window[window_size=2]"


@pytest.mark.parametrize("cls", [DiTModel, TextDiTModel])
def test_agent_trained_model_reloads_with_its_processors(cls, tmp_path):
    model = tiny(cls)
    label = set_attention(model, "agent[agent_num=4]")
    assert label == "agent[agent_num=4,grid_size=4x4]"  # the grid the biases are stored for is in the label
    assert model.config.attention_variant == label
    perturb(model, seed=3)  # every weight, the agent biases and the depthwise conv included ("trained")
    model.eval()
    params = processor_params(model)
    assert len(params) == 2 * 8  # per layer: 6 biases + DWC weight and bias
    outputs = {size: run(model, size) for size in [(8, 8), (12, 8)]}
    model.save_pretrained(tmp_path / "m")
    assert saved_config(tmp_path / "m")["attention_variant"] == label
    again = cls.from_pretrained(tmp_path / "m").eval()
    assert again.attention_variant == label and again.config.attention_variant == label
    assert all(isinstance(b.attn1.processor, AgentAttnProcessor) for b in again.transformer_blocks)
    got = processor_params(again)
    assert got.keys() == params.keys()
    for k in params:
        assert torch.equal(got[k], params[k]), k
    for size, expected in outputs.items():
        torch.testing.assert_close(run(again, size), expected, rtol=0, atol=0)
    # The constructor argument builds the same model as set_attention on a plain one.
    direct = tiny(cls, attention_variant=label)
    assert direct.state_dict().keys() == model.state_dict().keys()


def test_agent_trained_video_model_reloads_with_its_processors(tmp_path):
    """VDT's spatial attention takes agent attention per frame; trained, it persists like DiT's."""
    from dit.models.vdt import VDTModel

    torch.manual_seed(0)
    model = VDTModel(**COMMON, num_frames=3, learn_sigma=False)
    label = set_attention(model, "agent[agent_num=4]")
    assert model.config.attention_variant == label == "agent[agent_num=4,grid_size=4x4]"
    assert isinstance(model.transformer_blocks[0].temporal_attn.processor, AttnProcessor2_0)  # frames: untouched
    perturb(model, seed=5)
    model.eval()
    x = torch.randn(2, 3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x, torch.tensor([10, 700])).sample
    model.save_pretrained(tmp_path / "v")
    again = VDTModel.from_pretrained(tmp_path / "v").eval()
    assert again.attention_variant == label and processor_params(again).keys() == processor_params(model).keys()
    with torch.no_grad():
        torch.testing.assert_close(again(x, torch.tensor([10, 700])).sample, expected, rtol=0, atol=0)
    # Agent attention pools queries on a 2D grid: over a whole clip it is refused with the way out.
    with pytest.raises(AttentionConfigError, match="2D token grids"):
        VDTModel(**COMMON, num_frames=3, spatial_attention_scope="video", attention_variant=label)(x, 10)


def test_switching_away_and_back_keeps_the_trained_weights(tmp_path):
    model = tiny(DiTModel)
    label = set_attention(model, "agent[agent_num=4]")
    perturb(model, seed=4)
    model.eval()
    expected = run(model)
    params = processor_params(model)
    with pytest.warns(UserWarning, match="replaces the trained attention processors"):
        set_attention(model, "proxy[window_size=2]")
    assert model.config.attention_variant == "sdpa" and not processor_params(model)
    assert trained_variant(model) == label  # kept aside, outside the state dict
    model.save_pretrained(tmp_path / "swapped")  # a save now claims (and holds) only what is in use
    assert saved_config(tmp_path / "swapped")["attention_variant"] == "sdpa"
    reloaded = DiTModel.from_pretrained(tmp_path / "swapped")
    assert not processor_params(reloaded) and trained_variant(reloaded) is None

    assert set_attention(model, label) == label  # back: the same weights, not a fresh random init
    assert model.config.attention_variant == label
    for k, v in processor_params(model).items():
        assert torch.equal(v, params[k]), k
    torch.testing.assert_close(run(model), expected, rtol=0, atol=0)

    # The UI's default "sdpa" with keep_trained=True means "the model's own attention", as for PT-DiT.
    with pytest.warns(UserWarning):
        set_attention(model, "window[window_size=2]")
    assert set_attention(model, "sdpa", keep_trained=True) == label
    torch.testing.assert_close(run(model), expected, rtol=0, atol=0)
    assert set_attention(model, "sdpa", keep_trained=True) == label  # already there: a no-op
    with pytest.warns(UserWarning):
        assert set_attention(model, "sdpa") == "sdpa"  # plain sdpa really is full attention
    assert model.config.attention_variant == "sdpa"
    assert isinstance(model.transformer_blocks[0].attn1.processor, AttnProcessor2_0)


def test_bad_attention_variant_config_is_a_clear_error():
    with pytest.raises(AttentionConfigError, match="unknown attention variant"):
        tiny(DiTModel, attention_variant="agnet[agent_num=4]")
    with pytest.raises(AttentionConfigError, match="not a square"):
        tiny(TextDiTModel, attention_variant="agent[agent_num=5]")

    from training.build import build_transformer
    from training.config import ConfigError, load_config

    config = load_config(AGENT_CONFIG, ["model.backbone=PTDiTModel", "model.window_size=2"])
    with pytest.raises(ConfigError, match="attention_variant: PTDiTModel has no swappable attention"):
        build_transformer(config)
    with pytest.raises(ConfigError, match="z_loss_weight"):
        load_config(AGENT_CONFIG, ["optim.z_loss_weight=0.0001"])


def test_training_with_agent_attention_from_yaml(emoji_folder, tmp_path, monkeypatch):
    """``python -m training.train`` with ``model.attention_variant`` in the YAML: the saved pipeline loads with the
    trained agent processors, reports them, and records them in every generation record."""
    from safetensors.torch import load_file

    from pipelines import load_pipeline
    from training.train import main

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    out = tmp_path / "run"
    args = ["--config", str(AGENT_CONFIG), "--set", f"data.root={emoji_folder}", "--set", f"output_dir={out}"]
    assert main(args) == 0
    label = "agent[agent_num=4,grid_size=4x4]"
    assert saved_config(out / "pipeline" / "transformer")["attention_variant"] == label
    pipe = load_pipeline(out / "pipeline")
    assert pipe.attention_label() == label
    blocks = pipe.transformer.transformer_blocks
    assert all(isinstance(b.attn1.processor, AgentAttnProcessor) for b in blocks)
    # The processor weights in use are the trained ones from the file (not the constructor's fresh init).
    saved = load_file(next((out / "pipeline" / "transformer").glob("*.safetensors")))
    loaded = processor_params(pipe.transformer)
    assert loaded and all(torch.equal(v, saved[k]) for k, v in loaded.items())
    assert len(loaded) == 2 * 8 and loaded.keys() <= saved.keys()
    result = pipe("red apple", num_inference_steps=2, seed=0, output_type="np")
    assert result.images.shape == (1, 16, 16, 3)
    assert result.records[0].attention == label

    # The UI's default ("sdpa") keeps an agent-trained model on its own attention; a training-free choice and
    # the default again give back the same trained processors (the service runs every tab's attention choice).
    from pipelines.service import apply_attention

    apply_attention(pipe, "sdpa")
    assert pipe.attention_label() == label
    apply_attention(pipe, "window[window_size=2]")
    assert not isinstance(blocks[0].attn1.processor, AgentAttnProcessor)
    apply_attention(pipe, "sdpa")
    assert pipe.attention_label() == label and processor_params(pipe.transformer).keys() == loaded.keys()
    again = pipe("red apple", num_inference_steps=2, seed=0, output_type="np")
    assert (again.images == result.images).all()
