"""PixArt-δ ControlNet-Transformer (control.controlnet_transformer): zero init, the official forward, converters for
the official .pth and the diffusers research-project layout, training, and the control pipeline round trip."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from test_convert import ours_to_official_pixart
from tiny_models import perturb, tiny_pixart, tiny_text_pipeline

from control.controlnet_transformer import BlockControl, ControlNetTransformer, ResidualCondition
from control.easycontrol import ControlAdapterError
from dit import TextDiTModel
from dit.blocks import t2i_final_modulation, unpatchify
from dit.convert.common import KeyMismatchError
from pipelines.control import ControlTextToImagePipeline

GEN = dict(num_inference_steps=2, guidance_scale=2.0, seed=0, height=8, width=8)
TINY3 = dict(
    sample_size=8,
    patch_size=2,
    in_channels=3,
    out_channels=3,
    num_layers=3,
    num_attention_heads=2,
    attention_head_dim=8,
    caption_channels=16,
)


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s = model.config.in_channels, model.config.sample_size
    return dict(
        hidden_states=torch.randn(batch, c, s, s, generator=g),
        encoder_hidden_states=torch.randn(batch, 5, model.config.caption_channels, generator=g),
        timestep=torch.tensor([7, 600][:batch]),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
    )


@pytest.mark.parametrize("model_fn", [lambda: tiny_text_pipeline().transformer, tiny_pixart])
def test_zero_initialised_control_leaves_the_base_output_unchanged(model_fn):
    model = model_fn()
    kw = inputs(model)
    cond = torch.randn(1, *kw["hidden_states"].shape[1:])
    with torch.no_grad():
        base = model(**kw).sample
        bc = BlockControl.attach(model)
        bc.add_adapter("cn", ControlNetTransformer.from_transformer(model, 1).eval())
        with bc.conditioned([ResidualCondition(cond, "cn")]):
            same = model(**kw).sample
        assert torch.equal(base, same)
        # the copies start as the base blocks (PixArt-δ copies them), and only the zero projections gate them
        block = bc.adapters["cn"].controlnet_blocks[0]
        ref = model.transformer_blocks[0].state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in block.transformer_block.state_dict().items())
        block.after_proj.weight.normal_()
        with bc.conditioned([ResidualCondition(cond, "cn")]):
            moved = model(**kw).sample
        assert (moved - base).abs().max() > 1e-3
        with bc.conditioned([ResidualCondition(cond, "cn", strength=0.0)]):
            assert torch.equal(model(**kw).sample, base)
    assert not any("block_control" in k for k in _detached_keys(bc))


def _detached_keys(bc):
    with bc.detached():
        return list(bc.transformer.state_dict())


def _official_forward(model: TextDiTModel, adapter: ControlNetTransformer, x, text, t, cond) -> torch.Tensor:
    """PixArt-α's ``ControlPixArtHalf.forward`` written out on our model's parts (an independent reference)."""
    p = model.config.patch_size
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    h = model.pos_embed(x)
    t0, emb_t = model.adaln_single(t, {"resolution": None, "aspect_ratio": None}, x.shape[0], h.dtype)
    y = model.caption_projection(text)
    c = model.pos_embed(cond).repeat(x.shape[0], 1, 1)  # forward_c: x_embedder(c) + pos_embed
    blocks = model.transformer_blocks
    h = blocks[0](h, t0, y)
    n = len(adapter.controlnet_blocks)
    for index in range(1, n + 1):
        cb = adapter.controlnet_blocks[index - 1]
        c = cb.transformer_block(h + cb.before_proj(c) if index == 1 else c, t0, y)
        h = blocks[index](h + cb.after_proj(c), t0, y)
    for index in range(n + 1, len(blocks)):
        h = blocks[index](h, t0, y)
    h = t2i_final_modulation(h, model.scale_shift_table, emb_t, model.norm_out)
    return unpatchify(model.proj_out(h), grid, p, model.out_channels)


def test_hooked_forward_equals_the_official_controlnet_forward_and_cfg_half_only():
    model = perturb(TextDiTModel(**TINY3), seed=1).eval()
    adapter = ControlNetTransformer.from_transformer(model, 2).eval()
    assert (
        adapter.injection_blocks() == [1, 2] and ControlNetTransformer.from_transformer(model).num_control_blocks == 1
    )
    randomize(adapter, seed=2)
    bc = BlockControl.attach(model)
    bc.add_adapter("cn", adapter)
    kw, cond, want, got = _official_and_ours(model, adapter, bc)
    assert (want - got).abs().max() < 1e-5
    with torch.no_grad():
        base = model(**kw).sample
        small = torch.randn(1, 3, 4, 4)
        with bc.conditioned([ResidualCondition(cond, "cn")], conditional_half_only=True):
            half = model(**kw).sample
        assert torch.equal(half[0], base[0]) and (half[1] - got[1]).abs().max() < 1e-5
        with pytest.raises(Exception, match="generation's size"), bc.conditioned([ResidualCondition(small, "cn")]):
            model(**kw)


def test_blocks_copied_after_the_hooks_are_installed_are_plain_blocks():
    """The pipeline and the trainer attach BlockControl first and copy blocks afterwards (a second adapter, a loaded
    file): the copies must not carry BlockControl's hooks, which would nest control inside the control branch."""
    model = perturb(TextDiTModel(**TINY3), seed=1).eval()
    bc = BlockControl.attach(model)
    adapter = ControlNetTransformer.from_transformer(model, 2).eval()
    randomize(adapter, seed=2)
    bc.add_adapter("cn", adapter)
    for block in adapter.modules():
        assert not block._forward_pre_hooks and not block._forward_hooks
    _, _, want, got = _official_and_ours(model, adapter, bc)
    assert (want - got).abs().max() < 1e-5


def _official_and_ours(model: TextDiTModel, adapter: ControlNetTransformer, bc: BlockControl) -> tuple:
    """(inputs, condition, the written-out official forward, ours through BlockControl) on random inputs."""
    kw = inputs(model)
    cond = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        want = _official_forward(model, adapter, kw["hidden_states"], kw["encoder_hidden_states"], kw["timestep"], cond)
        with bc.conditioned([ResidualCondition(cond, "cn")]):
            got = model(**kw).sample
    return kw, cond, want, got


def _official_file(model: TextDiTModel, adapter: ControlNetTransformer) -> dict[str, torch.Tensor]:
    """Our model + adapter written as PixArt-α's ControlPixArtHalf state dict (base_model.*, controlnet.*)."""
    sd = model.state_dict()
    out = {f"base_model.{k}": v for k, v in ours_to_official_pixart(sd, tokens=120, grid=4).items()}
    fake = {k: v for k, v in sd.items() if not k.startswith("transformer_blocks.")}
    for i, cb in enumerate(adapter.controlnet_blocks):
        fake.update({f"transformer_blocks.{i}.{k}": v for k, v in cb.transformer_block.state_dict().items()})
    copied = ours_to_official_pixart(fake, tokens=120, grid=4)
    for i, cb in enumerate(adapter.controlnet_blocks):
        prefix = f"blocks.{i}."
        out.update(
            {f"controlnet.{i}.copied_block.{k[len(prefix) :]}": v for k, v in copied.items() if k.startswith(prefix)}
        )
        projections = {"after_proj": cb.after_proj, **({"before_proj": cb.before_proj} if i == 0 else {})}
        for proj, lin in projections.items():
            out[f"controlnet.{i}.{proj}.weight"] = lin.weight.detach().clone()
            out[f"controlnet.{i}.{proj}.bias"] = lin.bias.detach().clone()
    return out


def test_official_pth_and_diffusers_layout_convert_strictly(tmp_path):
    from dit.convert.__main__ import main
    from dit.convert.pixart_controlnet import convert_pixart_controlnet

    model = perturb(TextDiTModel(**{**TINY3, "sample_size": 8, "caption_channels": 16}), seed=3).eval()
    adapter = ControlNetTransformer.from_transformer(model, 2)
    randomize(adapter, seed=4)
    official = _official_file(model, adapter)
    torch.save({"state_dict": official}, tmp_path / "PixArt-XL-2-512-ControlNet.pth")
    assert (
        main(
            [
                "pixart-controlnet",
                str(tmp_path / "PixArt-XL-2-512-ControlNet.pth"),
                str(tmp_path / "out"),
                "--image-size",
                "64",
                "--interpolation-scale",
                "1",
                "--num-heads",
                "2",
                "--name",
                "hed",
                "--preprocessor",
                "softedge",
            ]
        )
        == 0
    )
    base = TextDiTModel.from_pretrained(tmp_path / "out" / "transformer").eval()
    ref = model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in base.state_dict().items())
    path = tmp_path / "out" / "controls" / "hed.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["adapter_type"] == "controlnet" and json.loads(meta["adapter_config"])["num_blocks"] == 2
    assert meta["preprocessor"] == "softedge" and meta["base_num_layers"] == "3"
    assert keys == set(adapter.state_dict())  # the diffusers research-project names
    loaded = BlockControl.attach(base).load_adapter(path)
    assert loaded.kind == "controlnet"
    got = BlockControl.of(base).adapters["hed"].state_dict()
    assert all(torch.equal(v, adapter.state_dict()[k]) for k, v in got.items())

    # diffusers research project: PixArtControlNetAdapterModel's safetensors (already our layout) converts 1:1
    _, tensors, config = convert_pixart_controlnet(adapter.state_dict())
    assert config == {"num_blocks": 2, "inner_dim": 16} and set(tensors) == keys
    bad = dict(official)
    bad.pop("controlnet.1.after_proj.bias")
    with pytest.raises(KeyMismatchError, match="controlnet"):
        convert_pixart_controlnet(bad, image_size=64, num_heads=2)
    wrong = dict(adapter.state_dict())
    wrong["controlnet_blocks.1.before_proj.weight"] = torch.zeros(16, 16)
    with pytest.raises(KeyMismatchError, match="before_proj must exist in control block 0 only"):
        convert_pixart_controlnet(wrong)


def test_stock_diffusers_pixart_blocks_have_the_research_project_keys():
    model = tiny_pixart()
    adapter = ControlNetTransformer.from_transformer(model, 1)
    keys = set(adapter.state_dict())
    assert "controlnet_blocks.0.transformer_block.attn1.to_q.weight" in keys
    assert "controlnet_blocks.0.before_proj.weight" in keys and "controlnet_blocks.0.after_proj.bias" in keys
    ours = ControlNetTransformer.from_transformer(TextDiTModel(**TINY3), 1)
    stripped = {k.split(".", 3)[-1] for k in keys if ".transformer_block." in k}
    assert stripped == {k.split(".", 3)[-1] for k in ours.state_dict() if ".transformer_block." in k}


# ---- pipeline and training ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def control_data_dir(tmp_path_factory):
    """8 coloured squares on white with captions and their canny maps as conditioning images."""
    import numpy as np

    from control.preprocessors import run_preprocessor

    root = tmp_path_factory.mktemp("residual-control-data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        arr = np.full((8, 8, 3), 255, np.uint8)
        a, b = rng.integers(0, 4, 2)
        arr[a : a + 4, b : b + 4] = rng.integers(0, 200, 3)
        Image.fromarray(arr).save(root / f"{i}.png")
        run_preprocessor("canny", arr).save(root / f"{i}-edges.png")
        text = ["red cat", "green tree"][i % 2]
        rows.append({"file_name": f"{i}.png", "text": text, "conditioning_image_file_name": f"{i}-edges.png"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def edges() -> Image.Image:
    img = Image.new("RGB", (8, 8), "white")
    img.paste((200, 30, 30), (2, 2, 6, 6))
    return img


def test_save_load_round_trip_through_the_control_pipeline(tmp_path):
    pipe = ControlTextToImagePipeline.from_text_pipeline(tiny_text_pipeline())
    pipe.set_progress_bar_config(disable=True)
    bc = BlockControl.attach(pipe.transformer)
    adapter = ControlNetTransformer.from_transformer(pipe.transformer, 1)
    randomize(adapter, seed=5, scale=0.5)
    bc.add_adapter("canny-controlnet", adapter.eval(), {"preprocessor": "canny"})
    path = bc.save_adapter("canny-controlnet", tmp_path / "canny-controlnet.safetensors")
    base = pipe("red cat", **GEN).images[0]
    live = pipe("red cat", control_image=edges(), control_adapter="canny-controlnet", preprocessor="auto", **GEN)
    assert live.images[0].tobytes() != base.tobytes()
    bc.detach()
    pipe.register_control_adapter(path)
    assert pipe.control_adapters()["canny-controlnet"]["kind"] == "controlnet"
    from pipelines.control import ControlInput

    out = pipe("red cat", controls=[ControlInput(edges(), "canny-controlnet", 1.0, "auto")], **GEN)
    assert out.images[0].tobytes() == live.images[0].tobytes()
    rec = out.records[0].extra["_controls"][0]
    assert rec["adapter_kind"] == "controlnet" and rec["control_size"] == 8 and rec["preprocessor"] == "canny"
    pipe.save_pretrained(tmp_path / "pipe")
    again = ControlTextToImagePipeline.from_pretrained(tmp_path / "pipe")
    again.set_progress_bar_config(disable=True)
    out2 = again("red cat", controls=[ControlInput(edges(), "canny-controlnet", 1.0, "auto")], **GEN)
    assert out2.images[0].tobytes() == live.images[0].tobytes()
    (saved,) = (tmp_path / "pipe" / "transformer").glob("*.safetensors")
    with safe_open(str(saved), "pt") as f:
        assert not any("block_control" in k for k in f.keys())  # noqa: SIM118 (the base was saved alone)
    assert (tmp_path / "pipe" / "controls" / "canny-controlnet.safetensors").is_file()

    other = TextDiTModel(**{**TINY3, "num_attention_heads": 4})
    wrong = BlockControl.attach(other)
    wrong.add_adapter("w", ControlNetTransformer.from_transformer(other, 1))
    bad = wrong.save_adapter("w", tmp_path / "w.safetensors", {"base_model": "other-model"})
    with pytest.raises(ControlAdapterError, match="other-model"):
        pipe.register_control_adapter(bad)


def test_training_a_controlnet_lowers_the_loss_and_the_pipeline_loads_it(tmp_path, control_data_dir):
    from training.data.datasets import collate_image_batch
    from training.train_control import ControlTrainer, load_control_config

    tiny_text_pipeline().save_pretrained(tmp_path / "t2i")
    values = {
        "pipeline": str(tmp_path / "t2i"),
        "data.root": str(control_data_dir),
        "output_dir": str(tmp_path / "run"),
        "adapter.kind": "controlnet",
        "controlnet.num_blocks": 1,
        "control.name": "edges-cn",
        "optim.max_steps": 20,
        "optim.batch_size": 8,
        "optim.learning_rate": 1e-2,
        "data.caption_dropout": 0.0,
        "checkpoint.every": 10,
        "tensorboard": False,
        "validation.every": 20,
        "validation.steps": 2,
    }
    trainer = ControlTrainer(load_control_config(values=values))
    batch = collate_image_batch([trainer.dataset[i] for i in range(8)])
    torch.manual_seed(123)
    with torch.no_grad():
        before = float(trainer.loss(batch))
    out = trainer.train(resume="none")
    torch.manual_seed(123)
    with torch.no_grad():
        after = float(trainer.loss(batch))
    assert after < 0.97 * before, (before, after)
    assert (tmp_path / "run" / "validation" / "step-0000020.png").is_file()
    resumed = ControlTrainer(load_control_config(values=values | {"validation.every": 0}))
    again = resumed.train(resume="auto")  # the checkpoint's adapter file goes back into the adapter (_load_hook)
    with safe_open(str(out), "pt") as a, safe_open(str(again), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118
    pipe = ControlTextToImagePipeline.from_pretrained(tmp_path / "t2i")
    pipe.set_progress_bar_config(disable=True)
    name = pipe.register_control_adapter(out)
    assert pipe.control_adapters()[name]["kind"] == "controlnet"
    res = pipe("red cat", control_image=edges(), control_adapter=name, **GEN)
    assert res.records[0].extra["_controls"][0]["adapter_kind"] == "controlnet"
    from training.config import ConfigError

    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_control_config(values=values | {"optim.gradient_checkpointing": True})
    with pytest.raises(ConfigError, match="adapter.kind"):
        load_control_config(values=values | {"adapter.kind": "t2i-adapter"})


def test_evaluate_control_measures_residual_adapters_quality_and_attention_flops(tmp_path, control_data_dir):
    import numpy as np

    from training.evaluate_control import evaluate, frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 3))
    assert abs(frechet_distance(a, a)) < 1e-9
    assert abs(frechet_distance(a, a + 2.0) - 12.0) < 1e-6  # |mu shift|^2 = 3 * 2^2, same covariance
    pipe = ControlTextToImagePipeline.from_text_pipeline(tiny_text_pipeline())
    bc = BlockControl.attach(pipe.transformer)
    adapter = ControlNetTransformer.from_transformer(pipe.transformer, 1)
    randomize(adapter, seed=5, scale=0.5)
    bc.add_adapter("cn", adapter.eval(), {"preprocessor": "canny"})
    bc.save_adapter("cn", tmp_path / "pipe" / "controls" / "cn.safetensors")
    bc.detach()
    pipe.save_pretrained(tmp_path / "pipe")
    report = evaluate(str(tmp_path / "pipe"), "cn", control_data_dir, num_images=2, steps=2, repeats=1)
    assert report["adapter_kind"] == "controlnet" and report["extra_parameters"] == sum(
        p.numel() for p in adapter.parameters()
    )
    flops = report["flops_per_call"]
    # one copied block of two, plus the projections: between +40% and +70% of the base call, attention included
    assert 0.4 < flops["control_extra_fraction"] < 0.7, flops
    assert report["quality_fd"]["with_control"] >= 0 and "edge_f1" in report["fidelity_with_control"]
    assert report["latency_per_image"]["kv_cache_speedup"] is None  # no condition cache for this kind
