"""RelaCtrl (control.relactrl): the TDSM's shuffles and math against the official algorithm, the official injection
loop, fixed seeded shuffles, the official-file converter, the relevance script, training and the UI listing."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from test_controlnet_transformer import TINY3, control_data_dir, edges, inputs, randomize  # noqa: F401 (fixture)
from test_convert import ours_to_official_pixart
from tiny_models import perturb, tiny_pixart, tiny_text_pipeline

from control.controlnet_transformer import BlockControl, ControlNetTransformer, ResidualCondition
from control.relactrl import (
    OFFICIAL_GROUPS,
    OFFICIAL_POSITIONS,
    TDSM,
    RelaCtrl,
    placement_from_scores,
    segment_lengths,
    tdsm_group_widths,
    unshuffle,
)
from dit import TextDiTModel
from dit.blocks import t2i_final_modulation, unpatchify
from dit.convert.common import KeyMismatchError
from pipelines.control import ControlInput, ControlTextToImagePipeline

GEN = dict(num_inference_steps=2, guidance_scale=2.0, seed=0, height=8, width=8)
TINY4 = {**TINY3, "num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 8}  # width 32


def test_group_widths_follow_the_official_rule_and_narrow_models_terminate():
    assert tdsm_group_widths(1152, 6) == [192] * 6  # the released model's three sizes
    assert tdsm_group_widths(1152, 2) == [576] * 2
    assert tdsm_group_widths(1152, 4) == [288] * 4
    for dim, groups in [(128, 6), (32, 4), (16, 2), (48, 5)]:
        w = tdsm_group_widths(dim, groups)
        assert sum(w) == dim and all(x % 4 == 0 and x > 0 for x in w)
    assert segment_lengths(16, 4) == [4, 4, 4, 4] and segment_lengths(6, 4) == [2, 2, 1, 1]


def test_shuffle_and_unshuffle_are_inverses_and_the_mixer_is_one_when_attention_is_identity():
    x = torch.randn(2, 96)
    perm = torch.randperm(96)
    assert torch.equal(unshuffle(x[:, perm], perm), x)
    assert torch.equal(unshuffle(x.index_select(1, perm), perm, dim=1), x)
    tdsm = TDSM(32, groups=2)
    for g in range(len(tdsm.attn)):
        tdsm.attn[g] = torch.nn.Identity()  # shuffle -> segments -> identity -> inverse shuffles: nothing moves
    c, t0 = torch.randn(2, 6, 32), torch.randn(2, 6 * 32)
    shift, scale, gate = (tdsm.scale_shift_table[None] + t0.reshape(2, 6, -1)).chunk(6, 1)[:3]
    want = c + gate * (tdsm.norm(c) * (1 + scale) + shift)
    channel = torch.randperm(32)
    tokens = [torch.randperm(6 * w) for w in tdsm.widths]  # 6 tokens: unequal segments (2, 2, 1, 1)
    with torch.no_grad():
        assert torch.allclose(tdsm(c, t0, channel, tokens), want, atol=1e-6)


def _official_tdsm(tdsm: TDSM, c, t0, all_indices: list[int], token_perms) -> torch.Tensor:
    """The official TDSM.forward / TDSM_token.forward with their random permutations passed in."""
    b, n, dim = c.shape
    shift_msa, scale_msa, gate_msa = (tdsm.scale_shift_table[None] + t0.reshape(b, 6, -1)).chunk(6, dim=1)[:3]
    c_ori = c
    c = tdsm.norm(c) * (1 + scale_msa) + shift_msa
    selected, split = [], []
    start = 0
    for width in tdsm.widths:
        selected.append(all_indices[start : start + width])
        split.append(c[:, :, torch.tensor(selected[-1], dtype=torch.long)])
        start += width
    for g, x in enumerate(split):
        N, L, D = x.size()
        flat = x.reshape(N, -1)
        shuffle = token_perms[g]
        shuffled = flat[:, shuffle]
        seg = L * D // 4
        parts = [shuffled[:, i * seg : (i + 1) * seg].view(N, seg // D, D) for i in range(4)]
        attn = tdsm.attn[g]
        processed = []
        for p in parts:  # PixArt's WindowAttention: qkv (B, N, 3, H, hd), softmax(q k^T / sqrt(hd)) v, proj
            B, M, C = p.shape
            qkv = attn.qkv(p).reshape(B, M, 3, attn.heads, C // attn.heads)
            q, k, v = qkv.unbind(2)
            w = torch.softmax(torch.einsum("bmhd,bnhd->bhmn", q, k) / (C // attn.heads) ** 0.5, dim=-1)
            processed.append(attn.proj(torch.einsum("bhmn,bnhd->bmhd", w, v).reshape(B, M, C)))
        out_flat = torch.cat([p.reshape(N, -1) for p in processed], dim=1)
        split[g] = out_flat[:, torch.argsort(shuffle.float()).long()].view(N, L, D)
    output = torch.empty_like(c)
    for g, idx in enumerate(selected):
        output[:, :, idx] = split[g]
    return c_ori + gate_msa * output


def test_tdsm_equals_the_official_algorithm():
    torch.manual_seed(0)
    tdsm = TDSM(32, groups=2)
    randomize(tdsm, seed=1, scale=0.1)
    c, t0 = torch.randn(2, 8, 32), torch.randn(2, 6 * 32)
    channel = torch.randperm(32)
    tokens = [torch.randperm(8 * w) for w in tdsm.widths]
    with torch.no_grad():
        want = _official_tdsm(tdsm, c, t0, channel.tolist(), tokens)
        got = tdsm(c, t0, channel, tokens)
    assert (want - got).abs().max() < 1e-5


def _official_relactrl_forward(model: TextDiTModel, adapter: RelaCtrl, x, text, t, cond) -> torch.Tensor:
    """``ControlPixArtHalf_RelaCtrl.forward``'s loop on our model's parts, with the adapter's fixed shuffles."""
    p = model.config.patch_size
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    h = model.pos_embed(x)
    t0, emb_t = model.adaln_single(t, {"resolution": None, "aspect_ratio": None}, x.shape[0], h.dtype)
    y = model.caption_projection(text)
    c = model.pos_embed(cond).repeat(x.shape[0], 1, 1)
    blocks = model.transformer_blocks
    h = blocks[0](h, t0, y)
    c_skip = None
    for index in range(1, len(blocks)):
        if index - 1 in adapter.positions:
            k = adapter.positions.index(index - 1)
            blk = adapter.blocks[k]
            c = blk.before_proj(c) + h if k == 0 else c + blk.before_proj(h)
            channel, tokens = adapter.permutations(k, h.shape[1], h.device)
            c = blk.tdsm(c, t0, channel, tokens)
            c_skip = blk.after_proj(c)
        h = blocks[index](h + c_skip, t0, y)
    h = t2i_final_modulation(h, model.scale_shift_table, emb_t, model.norm_out)
    return unpatchify(model.proj_out(h), grid, p, model.out_channels)


def test_injection_is_the_official_loop_zero_init_is_identity_and_shuffles_are_fixed():
    model = perturb(TextDiTModel(**TINY4), seed=1).eval()
    adapter = RelaCtrl.from_transformer(model, positions=[0, 2], groups=[2, 4], seed=7).eval()
    assert adapter.injection_blocks() == [1, 2, 3]  # the skip made after block 0 is re-added to 1 and 2
    bc = BlockControl.attach(model)
    bc.add_adapter("rc", adapter)
    kw = inputs(model)
    cond = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        base = model(**kw).sample
        with bc.conditioned([ResidualCondition(cond, "rc")]):
            assert torch.equal(model(**kw).sample, base)  # zero before/after projections
        randomize(adapter, seed=3)
        want = _official_relactrl_forward(
            model, adapter, kw["hidden_states"], kw["encoder_hidden_states"], kw["timestep"], cond
        )
        with bc.conditioned([ResidualCondition(cond, "rc")]):
            got = model(**kw).sample
            again = model(**kw).sample
        assert (want - got).abs().max() < 1e-5 and torch.equal(got, again)  # fixed at inference
        other = RelaCtrl.from_transformer(model, positions=[0, 2], groups=[2, 4], seed=8).eval()
        other.load_state_dict(adapter.state_dict())
        bc.add_adapter("rc8", other)
        with bc.conditioned([ResidualCondition(cond, "rc8")]):
            assert (model(**kw).sample - got).abs().max() > 1e-4  # another seed, other shuffles
        same = RelaCtrl.from_transformer(model, positions=[0, 2], groups=[2, 4], seed=7).eval()
        assert all(
            torch.equal(a, b) for a, b in zip(same.permutations(1, 16, "cpu")[1], adapter.permutations(1, 16, "cpu")[1])
        )
    adapter.shuffle_training = "random"
    adapter.train()
    assert not torch.equal(adapter.permutations(0, 16, "cpu")[0], adapter.permutations(0, 16, "cpu")[0])


def test_works_on_stock_diffusers_pixart():
    model = tiny_pixart()
    adapter = RelaCtrl.from_transformer(model, positions=[0], groups=[2]).eval()
    randomize(adapter, seed=2)
    bc = BlockControl.attach(model)
    bc.add_adapter("rc", adapter)
    kw = inputs(model)
    with torch.no_grad():
        base = model(**kw).sample
        with bc.conditioned([ResidualCondition(torch.randn(1, 4, 16, 16), "rc")]):
            assert (model(**kw).sample - base).abs().max() > 1e-4


def test_placement_from_scores_reproduces_the_released_configuration():
    # scores whose ranking puts the released model's wide-group positions first
    order = [2, 5, 6, 4, 7, 8, 0, 3, 9, 18, 19] + [p for p in range(27) if p not in OFFICIAL_POSITIONS]
    scores = {p: 1.0 - r / 27 for r, p in enumerate(order)}
    positions, groups = placement_from_scores(scores, 11)
    assert tuple(positions) == OFFICIAL_POSITIONS and tuple(groups) == OFFICIAL_GROUPS
    assert placement_from_scores([0.1, 0.9, 0.5, 0.7, 0.2], 3) == ([1, 2, 3], [2, 6, 4])


def test_official_relactrl_pth_converts_strictly(tmp_path):
    from dit.convert.__main__ import main
    from dit.convert.relactrl_original import convert_relactrl_original

    model = perturb(TextDiTModel(**TINY4), seed=3).eval()
    adapter = RelaCtrl.from_transformer(model, positions=[0, 1], groups=[2, 4])
    randomize(adapter, seed=4)
    sd = adapter.state_dict()
    official = {f"base_model.{k}": v for k, v in ours_to_official_pixart(model.state_dict(), 120, 4).items()}
    for k, v in sd.items():  # our names -> RGLC_Block / TDSM / TDSM_token names
        name = k.replace("blocks.", "controlnet.", 1).replace(".tdsm.attn.", ".process.experts_attn.")
        name = name.replace(".qkv.", ".attn.qkv.").replace(".proj.", ".attn.proj.") if "experts_attn" in name else name
        official[name.replace(".tdsm.scale_shift_table", ".process.scale_shift_table")] = v
    del official["base_model.pos_embed"]  # the official script deletes it before loading
    torch.save({"state_dict": official}, tmp_path / "relactrl_pixart_canny_1024.pth")
    args = [
        "relactrl",
        str(tmp_path / "relactrl_pixart_canny_1024.pth"),
        str(tmp_path / "out"),
        "--image-size",
        "64",
        "--interpolation-scale",
        "1",
        "--num-heads",
        "4",
        "--positions",
        "0,1",
        "--seed",
        "5",
        "--name",
        "canny",
    ]
    assert main(args) == 0
    path = tmp_path / "out" / "controls" / "canny.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    cfg = json.loads(meta["adapter_config"])
    assert meta["adapter_type"] == "relactrl" and keys == set(sd)
    assert cfg["positions"] == [0, 1] and cfg["groups"] == [2, 4] and cfg["seed"] == 5 and cfg["heads"] == 4
    base = TextDiTModel.from_pretrained(tmp_path / "out" / "transformer")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.state_dict().items())
    BlockControl.attach(base).load_adapter(path)
    got = BlockControl.of(base).adapters["canny"].state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    _, _, cfg = convert_relactrl_original(official, image_size=64, num_heads=4, interpolation_scale=1.0)
    assert cfg["positions"] == [0, 2]  # the official c_adding_index when none are given
    bad = {k: v for k, v in official.items() if "experts_attn.1.attn.proj" not in k}
    with pytest.raises(KeyMismatchError):
        convert_relactrl_original(bad, image_size=64, num_heads=4, interpolation_scale=1.0, positions=[0, 1])


def test_relevance_script_on_a_tiny_controlnet(tmp_path, control_data_dir, capsys):  # noqa: F811
    from training.relevance import main, relevance_scores

    crs, f, h = relevance_scores([1.0, 3.0, 2.0], [0.9, 0.5, 0.8])
    assert f == [1, 3, 2] and h == [1, 3, 2] and crs == [0.0, 1.0, 0.5]
    pipe = ControlTextToImagePipeline.from_text_pipeline(tiny_text_pipeline())
    model = pipe.transformer
    bc = BlockControl.attach(model)
    adapter = ControlNetTransformer.from_transformer(model, 1)
    randomize(adapter, seed=6, scale=0.5)
    bc.add_adapter("cn", adapter, {"preprocessor": "canny"})
    bc.save_adapter("cn", tmp_path / "t2i" / "controls" / "cn.safetensors")
    bc.detach()
    pipe.save_pretrained(tmp_path / "t2i")
    out = tmp_path / "relevance.json"
    code = main(
        [
            "--pipeline",
            str(tmp_path / "t2i"),
            "--adapter",
            "cn",
            "--data",
            str(control_data_dir),
            "--num-images",
            "4",
            "--steps",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    assert "ControlNet Relevance Score" in table and "CRS" in table
    report = json.loads(out.read_text())
    assert [r["position"] for r in report["blocks"]] == [0] and report["suggested"]["positions"] == [0]
    assert report["blocks"][0]["quality_fd"] != report["full"]["quality_fd"]  # skipping the block changed images


def test_training_relactrl_from_a_relevance_report_and_the_control_tab_lists_it(tmp_path, control_data_dir):  # noqa: F811
    from training.config import ConfigError
    from training.train_control import ControlTrainer, load_control_config

    tiny_text_pipeline().save_pretrained(tmp_path / "t2i")
    report = tmp_path / "relevance.json"
    report.write_text(json.dumps({"blocks": [{"position": 0, "crs": 1.0}]}))
    values = {
        "pipeline": str(tmp_path / "t2i"),
        "data.root": str(control_data_dir),
        "output_dir": str(tmp_path / "run"),
        "adapter.kind": "relactrl",
        "relactrl.relevance": str(report),
        "control.name": "edges-rc",
        "control.preprocessor": "canny",
        "optim.max_steps": 20,
        "optim.batch_size": 8,
        "optim.learning_rate": 2e-2,
        "data.caption_dropout": 0.0,
        "checkpoint.every": 0,
        "tensorboard": False,
        "validation.every": 0,
    }
    trainer = ControlTrainer(load_control_config(values=values))
    from training.data.datasets import collate_image_batch

    batch = collate_image_batch([trainer.dataset[i] for i in range(8)])
    torch.manual_seed(123)
    with torch.no_grad():
        before = float(trainer.loss(batch))
    trainable = [p for p in trainer.transformer.parameters() if p.requires_grad]
    trainer.loss(batch).backward()
    assert trainable and all(p.grad is not None for p in trainable)  # what DDP requires
    trainer.optimizer.zero_grad(set_to_none=True)
    path = trainer.train(resume="none")
    torch.manual_seed(123)
    with torch.no_grad():
        after = float(trainer.loss(batch))
    assert after < 0.97 * before, (before, after)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["adapter_type"] == "relactrl" and json.loads(meta["adapter_config"])["positions"] == [0]
    assert meta["preprocessor"] == "canny" and meta["base_model"] == "t2i"

    pipe = ControlTextToImagePipeline.from_pretrained(tmp_path / "t2i")
    pipe.set_progress_bar_config(disable=True)
    pipe.register_control_adapter(path, "canny-relactrl")
    out = pipe("red cat", controls=[ControlInput(edges(), "canny-relactrl", 1.0, "auto")], **GEN)
    again = pipe("red cat", controls=[ControlInput(edges(), "canny-relactrl", 1.0, "auto")], **GEN)
    assert out.images[0].tobytes() == again.images[0].tobytes()  # fixed shuffles: reproducible
    assert out.records[0].extra["_controls"][0]["adapter_kind"] == "relactrl"

    from pipelines.control_tab import adapter_choices_for

    (tmp_path / "t2i" / "controls").mkdir()
    (tmp_path / "t2i" / "controls" / "canny-relactrl.safetensors").write_bytes(path.read_bytes())
    labels = dict(
        (v, k)
        for k, v in adapter_choices_for(
            {"canny-relactrl": tmp_path / "t2i" / "controls" / "canny-relactrl.safetensors"}
        )
    )
    assert "relactrl" in labels["canny-relactrl"]

    with pytest.raises(ConfigError, match="relactrl.positions or relactrl.relevance"):
        load_control_config(values={k: v for k, v in values.items() if k != "relactrl.relevance"})
