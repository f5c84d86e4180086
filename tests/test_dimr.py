"""DiMR: TD norms, the multi-resolution backbone and its multi-scale loss, the official-checkpoint converter, and
training/sampling through the shared trainer and pipelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from PIL import Image

from dit import DiMRModel
from dit.convert.common import KeyMismatchError
from dit.convert.dimr_original import convert_dimr_original, dimr_original_config
from dit.models.dimr import DiMROutput, even_multi_scale_targets, multi_scale_loss
from dit.td_norm import TDLayerNorm, TDRMSNorm, TimeDependentParameter, param_groups, timestep_to_tau


def tiny_dimr(branches: int = 2, text: bool = False, seed: int = 0, **kw) -> DiMRModel:
    torch.manual_seed(seed)
    cfg = dict(
        sample_size=16,
        in_channels=3,
        num_classes=None if text else 5,
        caption_channels=16 if text else None,
        transformer_width=32,
        transformer_mlp_width=48,
        transformer_layers=3,
        num_attention_heads=2,
        conv_widths=[16, 8][: branches - 1],
        conv_mlp_widths=[24, 16][: branches - 1],
        conv_layers=[3, 1][: branches - 1],
        conv_kernel_size=5,
    )
    cfg.update(kw)
    return DiMRModel(**cfg)


def randomize_td(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make param0 != param1 and the gates non-trivial, so time dependence is actually exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TimeDependentParameter):
                for p in (m.param0, m.param1, m.nodecay_weight, m.nodecay_bias):
                    p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return model


# ---------------------------------------------------------------------------------------------------- TD norms


def test_td_parameter_is_the_official_sigmoid_interpolation():
    p = TimeDependentParameter((3,), torch.nn.init.ones_)
    with torch.no_grad():
        p.param0.copy_(torch.tensor([1.0, 2.0, 3.0]))
        p.param1.copy_(torch.tensor([-1.0, 0.0, 1.0]))
        p.nodecay_weight.fill_(1.0)  # w = 2
        p.nodecay_bias.fill_(0.5)
    tau = torch.tensor([-1.0, 0.0, 0.7])
    s = torch.sigmoid(2 * tau[:, None] + 0.5)
    expected = p.param1[None] + s * (p.param0 - p.param1)[None]
    torch.testing.assert_close(p(tau), expected)


def test_timestep_to_tau_matches_the_official_log_snr_mapping():
    k = torch.tensor([0, 499, 999])
    n = k + 1  # the official 1-based step
    official = ((n.float() / 1000) * 8 - 4) / 4  # train.py's "log_snr", divided by 4 in seed_time
    torch.testing.assert_close(timestep_to_tau(k), official)
    torch.testing.assert_close(timestep_to_tau(k), torch.tensor([-0.998, 0.0, 1.0]))


@pytest.mark.parametrize("cls", [TDLayerNorm, TDRMSNorm])
def test_td_norm_with_equal_parameter_sets_is_a_plain_norm(cls):
    torch.manual_seed(0)
    norm = cls(8)
    with torch.no_grad():
        for m in norm.modules():
            if isinstance(m, TimeDependentParameter):
                m.param0.copy_(torch.randn(8))
                m.param1.copy_(m.param0)
                m.nodecay_weight.copy_(torch.randn(8))  # whatever the gate does, p0 == p1 makes it irrelevant
                m.nodecay_bias.copy_(torch.randn(8))
    x = torch.randn(4, 5, 8) * 3 + 1
    tau = torch.tensor([-0.9, 0.1, 0.5, 1.0])
    if cls is TDLayerNorm:
        plain = F.layer_norm(x, (8,), norm.weight.param0, norm.bias.param0, eps=1e-5)
    else:
        plain = x / (x.pow(2).mean(-1, keepdim=True).sqrt() + 1e-8) * norm.scale.param0
    torch.testing.assert_close(norm(x, tau), plain, rtol=1e-5, atol=1e-5)
    # ... and a time-dependent one once the two sets differ: the same input normalised differently per τ.
    with torch.no_grad():
        next(m for m in norm.modules() if isinstance(m, TimeDependentParameter)).param1.add_(1.0)
    same = x[:1].expand(4, -1, -1)
    out = norm(same, tau)
    assert not torch.allclose(out[0], out[3])


def test_nodecay_parameters_get_no_weight_decay():
    model = tiny_dimr()
    decay, no_decay = param_groups(model.named_parameters(), 0.03)
    assert decay["weight_decay"] == 0.03 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith(("nodecay_weight", "nodecay_bias")) for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


# ----------------------------------------------------------------------------------------------- the backbone


@pytest.mark.parametrize("branches", [2, 3])
def test_each_branch_predicts_at_its_resolution(branches):
    model = tiny_dimr(branches).eval()
    assert model.config.patch_size == 2 ** (branches - 1)
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.tensor([10, 900]), torch.tensor([1, 5]))  # 5 = the null class
    sides = [o.shape[-1] for o in out.branch_samples]
    assert sides == [16 // 2 ** (branches - 1 - i) for i in range(branches)]
    assert all(o.shape[:2] == (2, 3) for o in out.branch_samples)
    assert out.sample is out.branch_samples[-1]
    assert out.loss_weights == tuple(4.0 ** -(branches - 1 - i) for i in range(branches))
    sample, all_branches = model(x, torch.tensor([10, 900]), torch.tensor([1, 5]), return_dict=False)
    torch.testing.assert_close(sample, all_branches[-1])
    with pytest.raises(ValueError, match="position tables cover inputs up to 16x16"):
        model(torch.randn(1, 3, 32, 32), 5, torch.tensor([0]))
    with pytest.raises(ValueError, match="multiples of"):
        model(torch.randn(1, 3, 15, 16), 5, torch.tensor([0]))


def test_time_enters_only_through_the_td_norms():
    model = tiny_dimr().eval()
    x, y = torch.randn(1, 3, 16, 16), torch.tensor([2])
    # Fresh TD norms are plain norms: the timestep cannot matter yet.
    torch.testing.assert_close(model(x, 3, y).sample, model(x, 700, y).sample)
    randomize_td(model)
    assert not torch.allclose(model(x, 3, y).sample, model(x, 700, y).sample)
    # A batch of equal timesteps (collapsed to one τ) equals per-sample evaluation.
    xb, yb = x.expand(3, -1, -1, -1), y.expand(3)
    torch.testing.assert_close(model(xb, torch.tensor([700] * 3), yb).sample[0], model(x, 700, y).sample[0])
    mixed = model(xb, torch.tensor([3, 700, 700]), yb).sample
    torch.testing.assert_close(mixed[0], model(x, 3, y).sample[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], model(x, 700, y).sample[0], rtol=1e-5, atol=1e-5)


def test_config_checks_name_the_fix():
    with pytest.raises(ValueError, match="odd number of blocks"):
        tiny_dimr(transformer_layers=4)
    with pytest.raises(ValueError, match="patch_size is 2"):
        tiny_dimr(patch_size=4)
    with pytest.raises(ValueError, match="loss_weights needs 2"):
        tiny_dimr(loss_weights=[1.0])
    with pytest.raises(ValueError, match="not both"):
        tiny_dimr(caption_channels=8)


# ----------------------------------------------------------------------------------------------- the loss


def test_multi_scale_targets_are_sum_pooled_over_the_ratio():
    t = torch.arange(16.0).reshape(1, 1, 4, 4)
    coarse, fine = even_multi_scale_targets(t, 2)
    assert fine is t
    torch.testing.assert_close(coarse[0, 0, 0, 0], (t[0, 0, :2, :2].sum() / 2))
    quarter, half, full = even_multi_scale_targets(t, 3)
    torch.testing.assert_close(quarter.flatten(), t.sum().reshape(1) / 4)
    noise = torch.randn(64, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    for level in even_multi_scale_targets(noise, 3):  # unit variance at every scale: the point of the /ratio
        assert abs(level.var().item() - 1.0) < 0.05


def test_multi_scale_loss_weights_each_branch_against_its_target():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, 8, 8, generator=g)
    preds = (torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 8, 8, generator=g))
    coarse = F.avg_pool2d(target, 2) * 2
    expected = 0.25 * F.mse_loss(preds[0], coarse) + F.mse_loss(preds[1], target)
    torch.testing.assert_close(multi_scale_loss(preds, target, [0.25, 1.0]), expected)
    out = DiMROutput(sample=preds[1], branch_samples=preds, loss_weights=(0.25, 1.0))
    torch.testing.assert_close(out.multi_scale_loss(target), expected)


def test_a_few_training_steps_lower_every_branch_loss():
    model = tiny_dimr(3).train()
    sched = DDPMScheduler()
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    noise = torch.randn(8, 3, 16, 16, generator=g)
    t = torch.randint(0, 1000, (8,), generator=g)
    xt, y = sched.add_noise(x0, noise, t), torch.arange(8) % 5
    model.class_embedder.dropout_prob = 0.0

    def branch_losses() -> list[float]:
        with torch.no_grad():
            out = model(xt, t, y)
        return [F.mse_loss(p, tg).item() for p, tg in zip(out.branch_samples, even_multi_scale_targets(noise, 3))]

    before = branch_losses()
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), 0.0), lr=3e-3)
    for _ in range(15):
        loss = model(xt, t, y).multi_scale_loss(noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = branch_losses()
    assert all(a < 0.8 * b for a, b in zip(after, before)), (before, after)


# ----------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    model = randomize_td(tiny_dimr(3)).eval()
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["_class_name"] == "DiMRModel" and config["patch_size"] == 4
    again = DiMRModel.from_pretrained(tmp_path / "m").eval()
    x = torch.randn(2, 3, 16, 16)
    a = model(x, torch.tensor([5, 600]), torch.tensor([0, 4])).branch_samples
    b = again(x, torch.tensor([5, 600]), torch.tensor([0, 4])).branch_samples
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_class_pipeline_samples_the_finest_branch(tmp_path):
    from pipelines import ClassToImagePipeline, load_pipeline

    model = randomize_td(tiny_dimr()).eval()
    names = {str(i): n for i, n in enumerate(["smileys", "animals", "food", "travel", "flags"])}
    pipe = ClassToImagePipeline(transformer=model, scheduler=DPMSolverMultistepScheduler(), id2label=names)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["food", 1], num_inference_steps=3, seed=4, guidance_scale=2.0, output_type="np")
    assert out.images.shape == (2, 16, 16, 3) and out.records[0].class_name == "food"
    pipe.save_pretrained(tmp_path / "p")
    loaded = load_pipeline(tmp_path / "p")
    assert isinstance(loaded.transformer, DiMRModel)
    again = loaded(["food", 1], num_inference_steps=3, seed=4, guidance_scale=2.0, output_type="np")
    np.testing.assert_array_equal(out.images, again.images)


def test_dimr_generates_in_the_ui_service_and_the_batch_cli(tmp_path):
    """A DiMR pipeline directory is a class-to-image catalog model: the UI's class tab (through the service) and
    batch rows run it like a DiT, and both give the pipeline's own pixels for the same seed."""
    from PIL import Image

    from pipelines import ClassToImagePipeline
    from pipelines.batch import main
    from pipelines.catalog import Catalog
    from pipelines.service import GenerationRequest, GenerationService

    names = {str(i): n for i, n in enumerate(["smileys", "animals", "food", "travel", "flags"])}
    pipe = ClassToImagePipeline(
        transformer=randomize_td(tiny_dimr()).eval(), scheduler=DPMSolverMultistepScheduler(), id2label=names
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "models" / "tiny-dimr")
    want = pipe(["food"], num_inference_steps=3, seed=7, guidance_scale=2.0, output_type="np").images[0]
    want = (want * 255).round().astype(np.uint8)

    service = GenerationService(Catalog(roots=[tmp_path / "models"]), output_dir=tmp_path / "ui")
    request = GenerationRequest(
        model="tiny-dimr", class_label="food", steps=3, seed=7, guidance_scale=2.0, kind="class-to-image"
    )
    result = service.submit(request).wait(60)
    np.testing.assert_array_equal(np.asarray(Image.open(result.paths[0])), want)

    rows = tmp_path / "rows.csv"
    rows.write_text("class,seed,steps,guidance\nfood,7,3,2.0\n", encoding="utf-8")
    out = tmp_path / "batch"
    argv = [str(rows), "--models-dir", str(tmp_path / "models"), "--no-default-models", "--model", "tiny-dimr"]
    assert main([*argv, "-o", str(out), "--quiet"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / "00000-00-7.png")), want)


def test_attention_variants_keep_dimr_on_its_own_processor():
    from diffusers.models.attention_processor import AttnProcessor2_0

    from dit.attention import AttentionConfigError, set_attention
    from dit.models.dimr import DiMRAttnProcessor

    model = randomize_td(tiny_dimr()).eval()
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    expected = model(x, 50, y).sample
    with pytest.raises(AttentionConfigError, match="sdpa"):
        set_attention(model, "window[window_size=2]")
    model.set_attn_processor(AttnProcessor2_0())  # stock SDPA is the same attention for a class-conditional DiMR
    torch.testing.assert_close(model(x, 50, y).sample, expected, rtol=1e-5, atol=1e-5)
    assert set_attention(model, "sdpa") == "sdpa"
    assert all(isinstance(p, DiMRAttnProcessor) for p in model.attn_processors.values())


def test_text_conditioned_dimr_attends_to_the_prompt():
    from tiny_models import tiny_t5, tiny_tokenizer

    from pipelines import TextToImagePipeline

    model = randomize_td(tiny_dimr(text=True)).eval()
    pipe = TextToImagePipeline(
        tokenizer=tiny_tokenizer(),
        text_encoder=tiny_t5(),
        transformer=model,
        scheduler=DPMSolverMultistepScheduler(),
        max_sequence_length=16,
    )
    pipe.set_progress_bar_config(disable=True)
    apple = pipe("red apple", num_inference_steps=2, seed=0, output_type="np").images
    car = pipe("blue car", num_inference_steps=2, seed=0, output_type="np").images
    assert apple.shape == (1, 16, 16, 3) and not np.allclose(apple, car)
    # Padded text tokens are masked: changing their embeddings changes nothing.
    x, emb = torch.randn(1, 3, 16, 16), torch.randn(1, 4, 16)
    mask = torch.tensor([[1, 1, 0, 0]])
    moved = emb.clone()
    moved[:, 2:] += 5
    a = model(x, 10, encoder_hidden_states=emb, encoder_attention_mask=mask).sample
    b = model(x, 10, encoder_hidden_states=moved, encoder_attention_mask=mask).sample
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dimr-data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        arr = np.zeros((16, 16, 3), np.uint8)
        arr[..., i % 2] = 200
        arr[4:12, 4:12] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": ["red apple", "blue car"][i % 2], "label": i % 2})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


@pytest.mark.parametrize("kind", ["class-to-image", "text-to-image"])
def test_trainer_trains_dimr_and_saves_a_pipeline(kind, tiny_folder, tmp_path):
    from pipelines import load_pipeline
    from training.config import load_config
    from training.train import Trainer

    cfg = {
        "kind": kind,
        "output_dir": str(tmp_path / "run"),
        "data": {"root": str(tiny_folder), "resolution": 16},
        "model": {
            "backbone": "DiMRModel",
            "transformer_width": 32,
            "transformer_mlp_width": 48,
            "transformer_layers": 3,
            "num_attention_heads": 2,
            "conv_widths": [16],
            "conv_mlp_widths": [24],
            "conv_layers": [1],
        },
        "text_encoder": {"d_model": 16, "num_layers": 1, "num_heads": 2, "d_ff": 32, "max_length": 8},
        "optim": {"batch_size": 4, "max_steps": 3, "learning_rate": 1e-3, "weight_decay": 0.03},
        "checkpoint": {"every": 0},
        "validation": {"every": 0},
        "tensorboard": False,
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    trainer = Trainer(load_config(tmp_path / "c.yaml"))
    assert isinstance(trainer.accelerator.unwrap_model(trainer.transformer), DiMRModel)
    groups = trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.03, 0.0]
    # The loss the trainer optimises is the multi-scale one.
    batch = next(iter(trainer.batches_for(0, 0)))
    pred = trainer.predict(torch.zeros(4, 3, 16, 16), torch.full((4,), 500), batch)
    assert isinstance(pred, DiMROutput) and len(pred.branch_samples) == 2
    path = trainer.train(resume="none")
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(np.isfinite(losses))
    pipe = load_pipeline(path)
    assert isinstance(pipe.transformer, DiMRModel)
    cond = [0, 1] if kind == "class-to-image" else "red apple"
    assert np.asarray(pipe(cond, num_inference_steps=2, seed=0, output_type="np").images).shape[1:] == (16, 16, 3)


def test_unknown_backbone_is_a_config_error(tmp_path):
    from training.build import build_transformer
    from training.config import ConfigError, TrainConfig

    config = TrainConfig(kind="class-to-image", model={"backbone": "DiMR"})
    with pytest.raises(ConfigError, match="model.backbone 'DiMR'.*DiMRModel"):
        build_transformer(config, 3)
    small = dict(transformer_width=16, transformer_mlp_width=16, transformer_layers=1, num_attention_heads=2)
    small.update(conv_widths=[8], conv_mlp_widths=[8], conv_layers=[1])
    model = build_transformer(TrainConfig(kind="class-to-image", model={"backbone": "DiMRModel", **small}), 3)
    assert isinstance(model, DiMRModel) and model.config.num_classes == 3 and model.config.in_channels == 3


# ----------------------------------------------------------------------------------------------- the converter

TD = ("param0", "param1", "nodecay_weight", "nodecay_bias")


def official_layout(width=32, mlp=48, layers=3, conv=(16, 24, 3), classes=5, channels=4, seed=0) -> dict:
    """A tiny state dict in the layout of the official ``MRModel`` (``libs/core/blocks.py``), 2R, TDRMSN blocks.

    Names as listed by instantiating the official module tree: Sequential indices included (``input_layer.1``,
    ``input_layer.3.position_embeddings``, ``block1.1``, ``output_layer.{0,2}``, ``upsample.{0,1.kernel,2}``).
    """
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.2

    def td(prefix: str, dim: int) -> None:
        for p in TD:
            sd[f"{prefix}.{p}"] = r(dim)

    def stage(k: int, dim: int, hidden: int, n: int, patch: int, grid: int, transformer: bool, lowres: int | None):
        s = f"stages.{k}"
        sd[f"{s}.input_layer.1.weight"], sd[f"{s}.input_layer.1.bias"] = r(dim, channels, patch, patch), r(dim)
        sd[f"{s}.input_layer.3.position_embeddings.weight"] = r(grid * grid, dim)
        if lowres:
            td(f"{s}.upsample.0.weight", lowres)
            td(f"{s}.upsample.0.bias", lowres)
            sd[f"{s}.upsample.1.kernel.weight"], sd[f"{s}.upsample.1.kernel.bias"] = r(dim * 4, lowres), r(dim * 4)
            td(f"{s}.upsample.2.weight", dim)
            td(f"{s}.upsample.2.bias", dim)
        for i in range(n):
            b = f"{s}.blocks.{i}"
            if transformer:
                td(f"{b}.block1.norm.scale", dim)
                sd[f"{b}.block1.query_key_value.weight"] = r(3 * dim, dim)
                sd[f"{b}.block1.dense.weight"], sd[f"{b}.block1.dense.bias"] = r(dim, dim), r(dim)
            else:
                sd[f"{b}.block1.1.weight"], sd[f"{b}.block1.1.bias"] = r(dim, 1, 5, 5), r(dim)
            td(f"{b}.block2.norm.scale", dim)
            for w, shape in (("w0", (hidden, dim)), ("w1", (hidden, dim)), ("w2", (dim, hidden))):
                sd[f"{b}.block2.{w}.weight"], sd[f"{b}.block2.{w}.bias"] = r(*shape), r(shape[0])
        for j in range(n // 2):
            sd[f"{s}.skip_denses.{j}.weight"], sd[f"{s}.skip_denses.{j}.bias"] = r(dim, 2 * dim), r(dim)
        td(f"{s}.output_layer.0.weight", dim)
        td(f"{s}.output_layer.0.bias", dim)
        sd[f"{s}.output_layer.2.weight"], sd[f"{s}.output_layer.2.bias"] = r(channels, dim, 3, 3), r(channels)

    stage(0, width, mlp, layers, 2, 4, True, None)
    sd["stages.0.class_embeds.weight"] = r(classes + 1, width)
    stage(1, conv[0], conv[1], conv[2], 1, 8, False, width * (layers + 1))
    return sd


def test_converter_reads_the_official_layout():
    sd = official_layout()
    cfg = dimr_original_config(sd, num_heads=2)
    assert cfg["sample_size"] == 8 and cfg["in_channels"] == 4 and cfg["num_classes"] == 5
    assert (cfg["transformer_width"], cfg["transformer_mlp_width"], cfg["transformer_layers"]) == (32, 48, 3)
    assert (cfg["conv_widths"], cfg["conv_mlp_widths"], cfg["conv_layers"]) == ([16], [24], [3])
    assert cfg["conv_kernel_size"] == 5 and cfg["norm_type"] == "td_rmsnorm"
    model = convert_dimr_original(sd, num_heads=2)
    ours = model.state_dict()
    # Fused q|k|v split in order; time-dependent parameters by name; the class table with its null row.
    qkv = sd["stages.0.blocks.1.block1.query_key_value.weight"]
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        torch.testing.assert_close(ours[f"branches.0.blocks.1.attn1.{name}.weight"], qkv[32 * i : 32 * (i + 1)])
    for p in TD:
        torch.testing.assert_close(
            ours[f"branches.1.upsample.norm_in.weight.{p}"], sd[f"stages.1.upsample.0.weight.{p}"]
        )
    torch.testing.assert_close(ours["class_embedder.embedding_table.weight"], sd["stages.0.class_embeds.weight"])
    # The gated MLP computes the official w2(GELU(w0 x) * w1 x).
    x = torch.randn(2, 7, 16)
    b = "stages.1.blocks.2.block2"
    ref = F.linear(
        F.gelu(F.linear(x, sd[f"{b}.w0.weight"], sd[f"{b}.w0.bias"]))
        * F.linear(x, sd[f"{b}.w1.weight"], sd[f"{b}.w1.bias"]),
        sd[f"{b}.w2.weight"],
        sd[f"{b}.w2.bias"],
    )
    torch.testing.assert_close(model.branches[1].blocks[2].ff(x), ref)
    # The converted model runs and is time dependent.
    out = model(torch.randn(1, 4, 8, 8), torch.tensor([100]), torch.tensor([5]))
    assert [o.shape[-1] for o in out.branch_samples] == [4, 8]


# The official ``MRModel`` (qihao067/DiMR@fa141ae, TDRMSN, 2 stages as above), loaded strictly with
# ``official_layout()`` and run once on this input: per branch (mean, mean |.|, out[1, 2, 1, :4]).
OFFICIAL_OUTPUTS = [
    (0.15712595, 0.47620437, [0.33520144, 0.26931593, 0.28494856, 0.33785203]),
    (-0.21756276, 0.35956681, [-0.38136634, -0.72638243, -0.83811176, -0.67254978]),
]


def test_converted_model_reproduces_the_official_outputs():
    model = convert_dimr_original(official_layout(), num_heads=2)
    x = torch.linspace(-1, 1, 2 * 4 * 64).reshape(2, 4, 8, 8)
    with torch.no_grad():  # official: log_snr = 8 (k + 1) / 1000 - 4 for our 0-based k; class 5 = null class
        out = model(x, torch.tensor([100, 900]), torch.tensor([5, 2])).branch_samples
    for o, (mean, abs_mean, row) in zip(out, OFFICIAL_OUTPUTS):
        assert o.mean().item() == pytest.approx(mean, abs=1e-5)
        assert o.abs().mean().item() == pytest.approx(abs_mean, abs=1e-5)
        torch.testing.assert_close(o[1, 2, 1, :4], torch.tensor(row), rtol=0, atol=1e-5)


def test_converter_refuses_a_layout_it_does_not_know():
    sd = official_layout()
    sd["stages.0.blocks.0.block1.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError, match="not converted: stages.0.blocks.0.block1.extra.weight"):
        convert_dimr_original(sd, num_heads=2)
    sd = official_layout()
    del sd["stages.1.upsample.1.kernel.bias"]
    with pytest.raises(KeyMismatchError, match="missing from the source: stages.1.upsample.1.kernel.bias"):
        convert_dimr_original(sd, num_heads=2)
    with pytest.raises(ValueError, match="does not match DiMR-XL/2R"):
        dimr_original_config(official_layout(), "DiMR-XL/2R")
