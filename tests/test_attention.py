"""Efficient attention: every processor against a slow formula-level reference, on fresh random inputs.

Grids include non-square ones, ones the window does not divide and a (frames, h, w) grid. The seed of each test
is drawn fresh and printed, so a failure can be replayed with ``ATTENTION_TEST_SEED=<seed>``.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from dit.attention import (
    AgentAttnProcessor,
    AgentSDAttnProcessor,
    AttentionConfigError,
    ProxyAttnProcessor,
    ProxyTokenMixer,
    WindowAttnProcessor,
    available_variants,
    format_label,
    parse_label,
    set_attention,
    token_grid,
)
from dit.attention import reference as ref
from dit.attention.agent import destination_slots
from dit.attention.grid import normalize_grid, normalize_window

GRIDS = [(6, 5), (4, 4), (5, 7), (2, 3, 5)]


@pytest.fixture(autouse=True)
def fresh_seed():
    seed = int(os.environ.get("ATTENTION_TEST_SEED") or secrets.randbelow(2**31))
    print(f"ATTENTION_TEST_SEED={seed}")
    torch.manual_seed(seed)
    return seed


def make_attn(dim: int = 24, heads: int = 3, qk_norm: str | None = None) -> Attention:
    attn = Attention(query_dim=dim, heads=heads, dim_head=dim // heads, bias=True, qk_norm=qk_norm, eps=1e-6)
    return attn.double()


def tokens(grid: tuple[int, ...], batch: int = 2, dim: int = 24) -> torch.Tensor:
    f, h, w = normalize_grid(grid)
    return torch.randn(batch, f * h * w, dim, dtype=torch.float64)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> None:
    torch.testing.assert_close(a, b.to(a.dtype), atol=tol, rtol=tol)


# ---------------------------------------------------------------------------------------------- window


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("window,shift", [((2, 2), False), ((3, 2), True), ((4, 4), True), ((2, 2, 2), True)])
def test_window_attention_matches_reference(grid, window, shift):
    g3, w3 = normalize_grid(grid), normalize_window(window)
    if any(w > g for w, g in zip(w3, g3)):
        pytest.skip("window larger than grid: covered by the error test")
    attn, x = make_attn(qk_norm="layer_norm"), tokens(grid)
    proc = WindowAttnProcessor(window, shift=shift)
    attn.set_processor(proc)
    close(attn(x, token_grid=grid), ref.window_attention_reference(attn, x, g3, w3, proc.shift))


@pytest.mark.parametrize("grid", [(6, 5), (2, 3, 4)])
def test_one_window_over_the_grid_is_full_attention(grid):
    attn, x = make_attn(), tokens(grid)
    expected = attn(x)  # the stock SDPA processor
    for shift in (False, True):
        attn.set_processor(WindowAttnProcessor(normalize_grid(grid), shift=shift))
        close(attn(x, token_grid=grid), expected)


@pytest.mark.parametrize("qk_norm", ["layer_norm_across_heads", "rms_norm_across_heads"])
def test_qk_norm_across_heads_is_applied_before_the_head_split(qk_norm):
    """PixArt-Σ normalises q and k over all heads at once; every processor must do so before splitting heads."""
    from dit.qk_norm import AcrossHeadsQKNormAttnProcessor, normalizes_across_heads

    attn = Attention(query_dim=24, heads=3, kv_heads=3, dim_head=8, bias=True, qk_norm=qk_norm, eps=1e-6).double()
    with torch.no_grad():  # non-trivial norm weights, so applying them per head would differ
        attn.norm_q.weight.uniform_(0.5, 1.5)
        attn.norm_k.weight.uniform_(0.5, 1.5)
    assert normalizes_across_heads(attn) and not normalizes_across_heads(make_attn(qk_norm="layer_norm"))
    grid = (4, 6)
    x = tokens(grid)
    attn.set_processor(AcrossHeadsQKNormAttnProcessor())
    expected = attn(x)
    attn.set_processor(WindowAttnProcessor(grid))  # one window over the grid is full attention
    close(attn(x, token_grid=grid), expected)
    proc = AgentAttnProcessor(3, 24, grid_size=grid, agent_num=4).double()
    attn.set_processor(proc)
    close(attn(x, token_grid=grid), ref.agent_attention_reference(attn, proc, x, grid))
    attn.set_processor(AgentSDAttnProcessor(0.4, 0.8, sx=2, sy=2, use_rand=False))  # agents take norm_q too
    close(attn(x, token_grid=grid), ref.agentsd_reference(attn, x, grid, 0.4, 0.8, 2, 2, 0.3, 0.075, None))


@pytest.mark.parametrize("qk_norm", ["layer_norm_across_heads", "rms_norm_across_heads"])
def test_models_with_qk_norm_across_heads_take_every_variant(qk_norm):
    from dit import DiTModel
    from dit.qk_norm import AcrossHeadsQKNormAttnProcessor

    model = DiTModel(
        sample_size=16,
        patch_size=2,
        in_channels=3,
        num_layers=1,
        num_attention_heads=2,
        attention_head_dim=8,
        num_classes=4,
        learn_sigma=False,
        qk_norm=qk_norm,
    ).eval()
    args = (torch.randn(1, 3, 16, 16), torch.tensor([3]), torch.tensor([1]))
    with torch.no_grad():
        expected = model(*args).sample
        for label in available_variants(include_trained=True):
            if label == "xformers":
                continue
            set_attention(model, label)
            assert torch.isfinite(model(*args).sample).all(), label
        set_attention(model, "sdpa")  # back to full attention: the across-heads processor, not the stock one
        assert isinstance(model.transformer_blocks[0].attn1.processor, AcrossHeadsQKNormAttnProcessor)
        close(model(*args).sample, expected, tol=1e-6)


def test_shift_moves_the_windows():
    attn, x = make_attn(), tokens((8, 8))
    attn.set_processor(WindowAttnProcessor(4))
    plain = attn(x, token_grid=(8, 8))
    attn.set_processor(WindowAttnProcessor(4, shift=True))
    assert (attn(x, token_grid=(8, 8)) - plain).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------- proxy


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize(
    "window,local,mode", [((2, 2), True, "mean"), ((3, 2), False, "mean"), ((2, 3), True, "first")]
)
def test_proxy_attention_matches_reference(grid, window, local, mode):
    attn, x = make_attn(), tokens(grid)
    attn.set_processor(ProxyAttnProcessor(window, mode=mode, local=local))
    expected = ref.proxy_attention_reference(attn, x, normalize_grid(grid), normalize_window(window), local, mode)
    close(attn(x, token_grid=grid), expected)


def test_proxy_attention_degenerate_cases_are_full_attention():
    attn, x = make_attn(), tokens((5, 6))
    expected = attn(x)
    attn.set_processor(ProxyAttnProcessor(1, local=False))  # one token per proxy
    close(attn(x, token_grid=(5, 6)), expected)
    same = x[:, :1].expand_as(x).contiguous()  # identical tokens: the log-count bias makes proxies exact
    attn.set_processor(AttnProcessor2_0())
    expected = attn(same)
    attn.set_processor(ProxyAttnProcessor((2, 4), local=False))
    close(attn(same, token_grid=(5, 6)), expected)


def test_random_proxies_are_window_members_and_reproducible():
    grid, window = (5, 7), normalize_window((2, 3))
    x = tokens(grid, batch=1)
    members = ref.window_members(normalize_grid(grid), window)
    from dit.attention import make_layout, proxy_tokens

    layout = make_layout(normalize_grid(grid), window)
    gen = torch.Generator().manual_seed(3)
    proxies, counts = proxy_tokens(x, layout, "random", gen)
    assert counts.tolist() == [len(m) for m in members]
    for p, m in zip(proxies[0], members):
        assert any(torch.equal(p, x[0, i]) for i in m)
    attn = make_attn()
    attn.set_processor(ProxyAttnProcessor((2, 3), mode="random", local=False))
    with token_grid(grid, timestep=500):
        a, b = attn(x), attn(x)
    with token_grid(grid, timestep=499):
        c = attn(x)
    close(a, b, 0)
    assert not torch.equal(a, c)  # a fresh draw per step


def test_proxy_token_mixer_matches_reference_and_learns():
    grid = (1, 6, 5)
    mixer = ProxyTokenMixer(24, 3, 8, window_size=(3, 2)).double()
    x = tokens(grid)
    assert mixer(x, grid).abs().max() == 0  # zero-initialised output projection
    torch.nn.init.normal_(mixer.linear_1_visual.weight, std=0.2)
    close(mixer(x, grid), ref.proxy_mixer_reference(mixer, x, grid))
    mixer.zero_grad()
    mixer(x, grid).pow(2).sum().backward()
    for name in ("proxy_attn1.to_q.weight", "pvisual_attn2.to_k.weight", "linear_1_visual.weight"):
        grad = mixer.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------- agent


@pytest.mark.parametrize("grid", [(6, 5), (4, 4), (5, 7)])
@pytest.mark.parametrize("agents", [4, (2, 3)])
def test_agent_attention_matches_reference(grid, agents):
    attn, x = make_attn(), tokens(grid)
    proc = AgentAttnProcessor(3, 24, grid_size=(4, 6), agent_num=agents).double()  # trained on another grid
    attn.set_processor(proc)
    close(attn(x, token_grid=grid), ref.agent_attention_reference(attn, proc, x, grid))


def test_agent_attention_gradients_reach_every_parameter():
    attn, x = make_attn(), tokens((6, 5))
    proc = AgentAttnProcessor(3, 24, grid_size=(6, 5), agent_num=4).double()
    attn.set_processor(proc)
    attn(x, token_grid=(6, 5)).pow(2).sum().backward()
    for name, p in list(proc.named_parameters()) + [("to_q", attn.to_q.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n.split(".")[0] for n, _ in attn.named_parameters()} >= {"processor"}  # saved with the model


def test_agent_bias_cache_follows_the_parameters():
    attn, x = make_attn(), tokens((6, 5))
    proc = AgentAttnProcessor(3, 24, grid_size=(6, 5), agent_num=4).double()
    attn.set_processor(proc)
    with torch.no_grad():
        first = attn(x, token_grid=(6, 5))
        proc.ah_bias.add_(1.0)  # an optimiser step or load_state_dict writes in place
        proc.an_bias.mul_(3.0)
        close(attn(x, token_grid=(6, 5)), ref.agent_attention_reference(attn, proc, x, (6, 5)))
        assert not torch.allclose(attn(x, token_grid=(6, 5)), first)


@pytest.mark.parametrize("grid", [(6, 5), (8, 8), (5, 7)])
@pytest.mark.parametrize("ratio,agent_ratio", [(0.4, 0.8), (0.5, 0.95), (0.3, 0.5), (0.0, 0.8)])
@pytest.mark.parametrize("use_rand", [False, True])
def test_agentsd_matches_reference(grid, ratio, agent_ratio, use_rand):
    attn, x = make_attn(), tokens(grid)
    proc = AgentSDAttnProcessor(ratio, agent_ratio, sx=2, sy=2, use_rand=use_rand, seed=11, layer_index=2)
    attn.set_processor(proc)
    with token_grid(grid, timestep=321):
        got = attn(x)
        gen = proc.generator(x.shape[0])
    pick = None
    if use_rand:
        h, w = grid
        pick = torch.randint(4, (h // 2, w // 2), generator=gen)
        src, dst = destination_slots(h, w, 2, 2, None)
        assert len(dst) == (h // 2) * (w // 2) and len(src) + len(dst) == h * w
    expected = ref.agentsd_reference(attn, x, grid, ratio, agent_ratio, 2, 2, 0.3, 0.075, pick)
    close(got, expected)
    n, n_src = x.shape[1], x.shape[1] - (grid[0] // 2) * (grid[1] // 2)
    merged, agents = n - min(int(n * ratio), n_src), n - min(int(n * agent_ratio), n_src)
    assert proc.last_used_agents == (agents * 2 < merged)  # otherwise plain softmax over the merged tokens


def test_agentsd_fallback_is_full_attention():
    attn, x = make_attn(), tokens((6, 6))
    expected = attn(x)
    proc = AgentSDAttnProcessor(ratio=0.0, agent_ratio=0.4, sx=2, sy=2)  # agents >= N / 2: no agents, no merge
    attn.set_processor(proc)
    close(attn(x, token_grid=(6, 6)), expected)
    assert proc.last_used_agents is False


def test_agentsd_is_self_attention_only():
    attn = make_attn()
    attn.set_processor(AgentSDAttnProcessor())
    x = tokens((4, 4))
    with pytest.raises(AttentionConfigError, match="self-attention"):
        attn(x, encoder_hidden_states=x, token_grid=(4, 4))


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors():
    attn, x = make_attn(), tokens((4, 6))
    attn.set_processor(WindowAttnProcessor(4))
    with pytest.raises(AttentionConfigError, match="has 25 tokens but the sequence has 24"):
        attn(x, token_grid=(5, 5))
    with pytest.raises(AttentionConfigError, match="needs the token grid"):
        attn(x)
    with pytest.raises(AttentionConfigError, match="larger than the token grid"):
        attn(tokens((3, 8)), token_grid=(3, 8))
    for bad in (0, -4, (0, 2)):
        with pytest.raises(AttentionConfigError, match="agent"):
            AgentAttnProcessor(3, 24, (4, 4), agent_num=bad)
        with pytest.raises(AttentionConfigError):
            set_attention(torch.nn.ModuleDict({"attn1": make_attn()}), "agent", agent_num=bad, grid_size=4)
    with pytest.raises(AttentionConfigError, match="not a square"):
        AgentAttnProcessor(3, 24, (4, 4), agent_num=10)
    with pytest.raises(AttentionConfigError, match="unknown attention variant"):
        set_attention(torch.nn.ModuleDict({"attn1": make_attn()}), "flash9")
    with pytest.raises(AttentionConfigError, match="does not take option"):
        set_attention(torch.nn.ModuleDict({"attn1": make_attn()}), "window", ratio=0.5)
    with pytest.raises(AttentionConfigError, match="window_size"):
        WindowAttnProcessor(0)
    with pytest.raises(AttentionConfigError, match="ratio"):
        AgentSDAttnProcessor(ratio=1.5)


# ---------------------------------------------------------------------------------------------- models


def test_labels_round_trip():
    label = format_label("agentsd", {"ratio": 0.5, "sx": 2, "use_rand": False, "window": (4, 2)})
    assert label == "agentsd[ratio=0.5,sx=2,use_rand=false,window=4x2]"
    assert parse_label(label) == ("agentsd", {"ratio": 0.5, "sx": 2, "use_rand": False, "window": (4, 2)})
    assert parse_label("sdpa") == ("sdpa", {})
    assert available_variants()[0] == "sdpa" and "agent" not in available_variants()
    assert "agent" in available_variants(include_trained=True)


def _stock_models():
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import tiny_diffusers_dit, tiny_pixart

    return tiny_pixart(sample_size=8), tiny_diffusers_dit(sample_size=8)


def test_set_attention_on_stock_models_touches_self_attention_only():
    pixart, dit = _stock_models()
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    t, labels = torch.tensor([10, 500]), torch.tensor([1, 2])
    with token_grid((4, 4)):
        base_p = pixart(x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
        base_d = dit(x, timestep=t, class_labels=labels, return_dict=False)[0]
        label = set_attention(pixart, "window", window_size=4)
        assert label == "window[window_size=4]" and pixart.attention_variant == label
        blocks = pixart.transformer_blocks
        assert all(isinstance(b.attn1.processor, WindowAttnProcessor) for b in blocks)
        assert not any(isinstance(b.attn2.processor, WindowAttnProcessor) for b in blocks)
        got = pixart(x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]
        torch.testing.assert_close(got, base_p, atol=1e-5, rtol=1e-5)  # one window = the whole 4x4 grid
        set_attention(dit, "agentsd[ratio=0,agent_ratio=0.4,sx=2,sy=2]")
        got = dit(x, timestep=t, class_labels=labels, return_dict=False)[0]
        torch.testing.assert_close(got, base_d, atol=1e-5, rtol=1e-5)  # AgentSD fallback = full attention
        for variant in ("proxy[window_size=2]", "agentsd[sx=2,sy=2]", "shifted-window[window_size=2]"):
            set_attention(dit, variant)
            out = dit(x, timestep=t, class_labels=labels, return_dict=False)[0]
            assert out.shape == base_d.shape and torch.isfinite(out).all()
        assert [b.attn1.processor.shift for b in dit.transformer_blocks] == [(0, 0, 0), (0, 1, 1)]  # Swin order
        set_attention(dit, "sdpa")
        assert dit.attention_variant == "sdpa"
        torch.testing.assert_close(dit(x, timestep=t, class_labels=labels, return_dict=False)[0], base_d)
    same = pixart.transformer_blocks[0].attn1.processor
    set_attention(pixart, "window[window_size=4]")  # same label: nothing is replaced
    assert pixart.transformer_blocks[0].attn1.processor is same


def test_pipelines_hand_over_the_grid_and_record_the_variant(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_models import save_stock_pixart

    from pipelines import load_pipeline

    pipe = load_pipeline(save_stock_pixart(tmp_path / "pixart", sample_size=8))
    args = dict(prompt="a red cat", num_inference_steps=2, height=16, width=24, output_type="np", seed=3)
    args["use_resolution_binning"] = False
    base = pipe(**args)
    set_attention(pipe, "window", window_size=(2, 3))  # the grid is 4x6 here: not square
    out = pipe(**args)
    assert out.records[0].attention == "window[window_size=2x3]"
    assert out.images.shape == base.images.shape and abs(out.images - base.images).max() > 0
    set_attention(pipe, "window", window_size=(4, 6))
    full = pipe(**args)
    assert abs(full.images - base.images).max() < 2e-3
    set_attention(pipe, "window", window_size=8)
    with pytest.raises(AttentionConfigError, match="larger than the token grid"):
        pipe(**args)


# ---------------------------------------------------------------------------------------------- PT-DiT


def _perturb(model: torch.nn.Module, std: float = 0.05) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)
    return model


@pytest.mark.parametrize("grid", [(4, 6), (5, 7)])
def test_pt_dit_block_matches_the_official_order(grid):
    from dit.models.pt_dit import PTDiTBlock

    block = _perturb(PTDiTBlock(24, 3, 8, "ada_single", 24, window_size=(2, 3)).double(), 0.1)
    x, cond, text = tokens(grid), torch.randn(2, 6 * 24, dtype=torch.float64), torch.randn(2, 5, 24).double()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    bias = ((1 - mask.double()) * -10000.0)[:, None]
    got = block(x, cond, text, bias, token_grid=grid)
    close(got, ref.pt_dit_block_reference(block, x, cond, normalize_grid(grid), text, mask))


def test_pt_dit_models_train_generate_and_reload(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from diffusers import DPMSolverMultistepScheduler
    from tiny_models import tiny_t5, tiny_tokenizer

    from dit import PTDiTClassModel, PTDiTModel
    from pipelines import ClassToImagePipeline, TextToImagePipeline, load_pipeline

    model = PTDiTModel(
        sample_size=8, patch_size=2, in_channels=3, out_channels=3, num_layers=2, num_attention_heads=2,
        attention_head_dim=8, caption_channels=16, window_size=2,
    )  # fmt: skip
    blk = model.transformer_blocks[0]
    assert blk.proxy.linear_1_visual.weight.abs().max() == 0 and blk.linear_2.weight.abs().max() == 0
    x, text, t = torch.randn(2, 3, 8, 12), torch.randn(2, 5, 16), torch.tensor([3, 900])
    _perturb(model.proj_out)  # the zero-initialised final layer would stop every gradient before the blocks
    loss = (model(x, text, t).sample - x).pow(2).mean()
    loss.backward()
    for name in ("proxy.linear_1_visual.weight", "linear_2.weight", "attn1.to_q.weight", "scale_shift_table"):
        grad = blk.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    with pytest.raises(AttentionConfigError, match="own window/proxy attention"):
        set_attention(model, "agentsd")
    assert set_attention(model, "sdpa") == model.attention_variant  # "sdpa" = the model's own attention
    assert model.attention_variant.startswith("pt-dit[window_size=2x2")

    _perturb(model.eval())
    pipe = TextToImagePipeline(
        tokenizer=tiny_tokenizer(), text_encoder=tiny_t5(), transformer=model, scheduler=DPMSolverMultistepScheduler(),
        max_sequence_length=16,
    )  # fmt: skip
    args = dict(prompt="a red cat", num_inference_steps=2, height=8, width=12, output_type="np", seed=1)
    out = pipe(**args)
    assert out.records[0].attention == model.attention_variant and out.images.std() > 0
    pipe.save_pretrained(tmp_path / "pt")
    again = load_pipeline(tmp_path / "pt")
    assert type(again.transformer).__name__ == "PTDiTModel"
    assert abs(again(**args).images - out.images).max() < 1e-6

    from pipelines import Catalog, InputError
    from pipelines.service import GenerationRequest, GenerationService

    service = GenerationService(Catalog(roots=[tmp_path]), tmp_path / "out")
    with pytest.raises(InputError, match="own window/proxy attention"):  # shown as is in the UI
        service.submit(GenerationRequest("pt", prompt="a red cat", steps=1, attention="agentsd")).wait(60)

    cls_model = _perturb(
        PTDiTClassModel(
            sample_size=8, patch_size=2, in_channels=3, num_layers=1, num_attention_heads=2, attention_head_dim=8,
            num_classes=3, learn_sigma=False, window_size=(2, 2),
        )
    )  # fmt: skip
    assert cls_model.transformer_blocks[0].linear_2.weight.abs().sum() > 0  # not zero: see pt_dit's docstring
    cpipe = ClassToImagePipeline(transformer=cls_model.eval(), scheduler=DPMSolverMultistepScheduler())
    images = cpipe(class_labels=[0, 2], num_inference_steps=2, seed=0, output_type="np").images
    assert images.shape == (2, 8, 8, 3)


def test_service_applies_the_chosen_variant(tiny_models_dir, tmp_path):
    """The UI/API path: a request's ``attention`` goes through set_attention and into every PNG's record."""
    from pipelines import Catalog
    from pipelines.metadata import read_record
    from pipelines.service import GenerationRequest, GenerationService

    service = GenerationService(Catalog(roots=[tiny_models_dir]), tmp_path / "out")
    assert "agentsd" in service.validate(GenerationRequest("tiny-t2i", prompt="a cat", attention="agentsd")).attention
    for variant, label in [("agentsd", "agentsd[ratio=0.4,"), ("proxy", "proxy[window_size=4,"), ("sdpa", "sdpa")]:
        req = GenerationRequest("tiny-t2i", prompt="a red cat", steps=2, seed=5, attention=variant)
        result = service.submit(req).wait(timeout=120)
        assert result.records[0].attention.startswith(label)
        assert read_record(result.paths[0]).attention == result.records[0].attention
        pipe = service.pipeline("tiny-t2i")
        assert pipe.transformer.attention_variant == result.records[0].attention
