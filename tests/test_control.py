"""Control: preprocessors, EasyControl on our DiT and stock PixArt (cache, causal mask, the official masked formulation,
composition), adapter files, the control pipeline, control training, the official FLUX LoRA layout, bad input."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tiny_models import perturb, save_stock_pixart, tiny_pixart, tiny_t5, tiny_text_pipeline, tiny_tokenizer

from control.easycontrol import (
    PROJECTIONS,
    Condition,
    ControlAdapterError,
    ControlBaseModelWarning,
    EasyControl,
    condition_tokens,
    interpolated_position_table,
)
from control.preprocessors import (
    PREPROCESSORS,
    PreprocessorUnavailable,
    load_control_image,
    run_preprocessor,
    unavailable_reason,
)
from dit.blocks import t2i_final_modulation, unpatchify
from dit.embeddings import sincos_2d
from dit.modulation import modulate
from pipelines import InputError, load_pipeline
from pipelines.control import ControlInput, ControlTextToImagePipeline, make_control_map

EMOJI = Path(__file__).resolve().parent.parent / "data" / "emoji" / "images" / "1f600.png"
GEN = dict(num_inference_steps=3, seed=0, output_type="latent")  # latents: the tiny models saturate pixels


def emoji() -> Image.Image:
    if EMOJI.is_file():
        return Image.open(EMOJI).convert("RGBA")
    arr = np.zeros((32, 32, 4), np.uint8)
    arr[8:24, 8:24] = (250, 200, 30, 255)
    return Image.fromarray(arr, "RGBA")


def randomize(ec: EasyControl, name: str, seed: int, scale: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ec.parameters(name):
            p.copy_(torch.randn(p.shape, generator=g) * scale)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """Two random adapters ("edges": canny, rank 4; "hole": inpaint, rank 2, alpha 4) for tiny_text_pipeline()."""
    root = tmp_path_factory.mktemp("adapters")
    ec = EasyControl.attach(tiny_text_pipeline().transformer)
    ec.add_adapter("edges", rank=4, metadata={"preprocessor": "canny", "control_size": "8"})
    ec.add_adapter("hole", rank=2, alpha=4, metadata={"preprocessor": "inpaint", "control_size": "8"})
    randomize(ec, "edges", 1)
    randomize(ec, "hole", 2)
    ec.save_adapter("edges", root / "edges.safetensors")
    ec.save_adapter("hole", root / "hole.safetensors")
    return {"edges": root / "edges.safetensors", "hole": root / "hole.safetensors", "root": root}


def control_pipe(adapters: dict[str, Path]) -> ControlTextToImagePipeline:
    pipe = ControlTextToImagePipeline.from_text_pipeline(tiny_text_pipeline())
    pipe.set_progress_bar_config(disable=True)
    pipe.register_control_adapter(adapters["edges"])
    pipe.register_control_adapter(adapters["hole"])
    return pipe


# ---- preprocessors ----------------------------------------------------------------------------------------
def test_every_available_preprocessor_gives_an_rgb_map_of_the_input_size():
    image = emoji().resize((24, 20))
    for name in PREPROCESSORS:
        if unavailable_reason(name):
            continue
        out = run_preprocessor(name, image)
        assert out.mode == "RGB" and out.size == (24, 20), name


def test_canny_finds_the_border_of_a_square_and_nothing_else():
    arr = np.zeros((16, 16, 3), np.uint8)
    arr[4:12, 4:12] = 255
    edges = np.asarray(run_preprocessor("canny", arr))[..., 0] > 0
    ring = np.zeros((16, 16), bool)
    ring[3:13, 3:13] = True
    ring[5:11, 5:11] = False
    assert edges.sum() >= 24 and not (edges & ~ring).any()  # a closed 1-pixel outline at the step, no noise
    assert not np.asarray(run_preprocessor("canny", np.full((16, 16), 0.5)))[..., 0].any()  # flat: no edges


def test_inpaint_blackens_exactly_the_mask_and_accepts_mask_images():
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    mask = np.zeros((8, 8), bool)
    mask[2:5, 1:4] = True
    out = np.asarray(run_preprocessor("inpaint", image, mask=mask))
    assert (out[mask] == 0).all() and (out[~mask] == (200, 100, 50)).all()
    drawn = Image.fromarray(mask.astype(np.uint8) * 255).resize((32, 32), Image.Resampling.NEAREST)
    assert (np.asarray(run_preprocessor("inpaint", image, mask=drawn))[mask] == 0).all()
    with pytest.raises(InputError, match="mask is empty"):
        run_preprocessor("inpaint", image, mask=np.zeros((8, 8), bool))


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_any_image_mode_becomes_rgb(mode, tmp_path):
    src = emoji().convert("RGB").resize((10, 6))
    img = src.convert("L").convert("I;16") if mode == "I;16" else src.convert(mode)
    if mode == "RGBA":
        a = np.asarray(img).copy()
        a[:, :3, 3] = 0  # transparent columns become white, not black
        img = Image.fromarray(a, "RGBA")
    for source in (img, tmp_path / f"x-{mode.replace(';', '')}.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"):
        if isinstance(source, Path):
            img.save(source)
        out = load_control_image(source)
        assert out.mode == "RGB" and out.size == (10, 6)
        if mode == "RGBA":
            assert (np.asarray(out)[:, :3] == 255).all()


def test_bad_images_and_names_are_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    emoji().save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated whatever its size
    with pytest.raises(InputError, match="junk.png"):
        run_preprocessor("canny", tmp_path / "junk.png")
    with pytest.raises(InputError, match="cut.png"):
        run_preprocessor("canny", tmp_path / "cut.png")
    with pytest.raises(InputError, match="does not exist"):
        load_control_image(tmp_path / "missing.png")
    with pytest.raises(InputError, match="not a readable image"):
        load_control_image(b"\x89PNG garbage")
    with pytest.raises(InputError, match="shape"):
        load_control_image(np.zeros((2, 3, 4, 5)))
    with pytest.raises(InputError, match="must be"):
        load_control_image(torch.zeros(3, 4, 4))
    with pytest.raises(InputError, match="Unknown preprocessor 'hed'"):
        run_preprocessor("hed", emoji())
    with pytest.raises(InputError, match="does not take sigma"):
        run_preprocessor("canny", emoji(), sigma=2)
    with pytest.raises(InputError, match="must not exceed"):
        run_preprocessor("canny", emoji(), low_threshold=200, high_threshold=100)
    monkeypatch.setenv("DIT_STUDIO_DEPTH_MODEL", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(PreprocessorUnavailable, match="DIT_STUDIO_DEPTH_MODEL"):
        run_preprocessor("depth", emoji())
    assert "pose" in unavailable_reason("pose")


# ---- EasyControl mechanics --------------------------------------------------------------------------------
@pytest.mark.parametrize("model_fn", [lambda: tiny_text_pipeline().transformer, tiny_pixart])
def test_condition_positions_are_the_noise_grid_interpolated(model_fn):
    model = model_fn()
    pe = model.pos_embed
    dim = pe.proj.out_channels
    same = interpolated_position_table(dim, (4, 4), (4, 4), pe.base_size, pe.interpolation_scale)
    assert torch.allclose(same, sincos_2d(dim, (4, 4), pe.base_size, pe.interpolation_scale)[None], atol=1e-6)
    wide = sincos_2d(dim, (4, 8), pe.base_size, pe.interpolation_scale).view(4, 8, dim)
    spread = interpolated_position_table(dim, (4, 4), (4, 8), pe.base_size, pe.interpolation_scale).view(4, 4, dim)
    assert torch.allclose(spread, wide[:, ::2], atol=1e-6)  # condition column j sits on noise column 2j
    cin = model.config.in_channels
    tokens = condition_tokens(model, torch.randn(1, cin, 8, 8), (4, 8))
    assert tokens.shape == (1, 16, dim)


def _inputs(model, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    cin = model.config.in_channels
    text_dim = model.caption_projection.linear_1.in_features
    x = torch.randn(batch, cin, 8, 8, generator=g)
    return x, torch.randn(batch, 5, text_dim, generator=g), torch.full((batch,), 500)


@pytest.mark.parametrize("model_fn", [lambda: tiny_text_pipeline().transformer, tiny_pixart])
def test_kv_cache_equals_recomputing_and_conditions_ignore_the_noise(model_fn):
    model = model_fn()
    x, text, t = _inputs(model)
    plain = model(x, text, t).sample
    ec = EasyControl.attach(model)
    assert torch.equal(model(x, text, t).sample, plain)  # installed, no condition: the model is unchanged
    ec.add_adapter("a", rank=3)
    randomize(ec, "a", 0)
    cond = torch.randn(1, model.config.in_channels, 8, 8)
    with ec.conditioned([Condition(cond, "a")]):
        cached = [model(x, text, t).sample for _ in range(3)]
        kv = [(k.clone(), v.clone()) for k, v in ec.processors[-1].kv]
        passes_cached = ec.state.passes
        other = model(torch.randn_like(x), text, t + 100).sample  # another step: the cache is reused
        assert ec.state.passes == passes_cached == 1
    with ec.conditioned([Condition(cond, "a")], use_cache=False):
        fresh = model(x, text, t).sample
        model(torch.randn_like(x) * 3, text, t)  # other noise: the condition's K/V must not move
        assert ec.state.passes == 3
        assert all(torch.equal(k, k2) and torch.equal(v, v2) for (k, v), (k2, v2) in zip(kv, ec.processors[-1].kv))
    assert all(torch.equal(c, fresh) for c in cached)
    assert (fresh - plain).abs().max() > 1e-3 and (other - fresh).abs().max() > 1e-3
    ec.detach()
    assert torch.equal(model(x, text, t).sample, plain) and EasyControl.of(model) is None


def _joint_reference(model, x, text, t, conds):
    """EasyControl's own formulation, written from the paper and the official layers_cache.py: ONE masked pass
    over [noise | cond_1 | ... | cond_n] with an additive -1e20 mask (noise rows see all; a condition's rows see
    only its block), LoRA deltas multiplied by a 0/1 row mask, conditions modulated at t = 0 and kept out of the
    text cross-attention. ``conds``: (latents, {block: AdapterLayers}, strength[, beta]); beta adds our
    relative-position bias -beta*d^2 to the noise rows' logits on that condition's columns."""
    p = model.config.patch_size
    batch = x.shape[0]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    h = model.pos_embed(x)
    t0, emb = model.adaln_single(t, None, batch, h.dtype)
    c0, _ = model.adaln_single(torch.zeros(batch), None, batch, h.dtype)
    text = model.caption_projection(text)
    cs = [condition_tokens(model, c[0].expand(batch, -1, -1, -1), grid) for c in conds]
    sizes = [h.shape[1]] + [c.shape[1] for c in cs]
    starts = np.cumsum([0] + sizes)
    total = int(starts[-1])
    mask = torch.zeros(total, total)
    rows = []
    for j in range(len(conds)):
        s, e = int(starts[j + 1]), int(starts[j + 2])
        mask[s:e] = -1e20
        mask[s:e, s:e] = 0
        if len(conds[j]) > 3:  # noise row i, condition column k: -beta * |pos_i - interpolated pos_k|^2
            hc, wc = conds[j][0].shape[-2] // p, conds[j][0].shape[-1] // p
            noise_pos = torch.tensor([(r, c) for r in range(grid[0]) for c in range(grid[1])], dtype=torch.float32)
            cond_pos = torch.tensor(
                [(r * grid[0] / hc, c * grid[1] / wc) for r in range(hc) for c in range(wc)], dtype=torch.float32
            )
            mask[: sizes[0], s:e] = -conds[j][3] * ((noise_pos[:, None] - cond_pos[None]) ** 2).sum(-1)
        rows.append(torch.zeros(total, 1).index_fill_(0, torch.arange(s, e), 1.0))
    for bi, block in enumerate(model.transformer_blocks):
        mods_n, mods_c = block._modulation(t0), block._modulation(c0)
        xs = [modulate(block.norm1(h), mods_n[0], mods_n[1])]
        xs += [modulate(block.norm1(c), mods_c[0], mods_c[1]) for c in cs]
        big = torch.cat(xs, dim=1)
        attn = block.attn1

        def proj(linear, short, inp, bi=bi):
            out = linear(inp)
            for (_, layers, w, *_), row in zip(conds, rows):
                out = out + w * row * getattr(layers[bi], short)(inp * row)
            return out

        heads = attn.heads
        q, k, v = (proj(lin, s, big) for lin, s in ((attn.to_q, "q"), (attn.to_k, "k"), (attn.to_v, "v")))
        q, k, v = (z.view(batch, total, heads, -1).transpose(1, 2) for z in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(batch, total, -1)
        o = proj(attn.to_out[0], "out", o)
        parts = list(o.split(sizes, dim=1))
        h = h + mods_n[2] * parts[0]
        cs = [c + mods_c[2] * part for c, part in zip(cs, parts[1:])]
        h = h + block.attn2(h, encoder_hidden_states=text)
        h = h + mods_n[5] * block.ff(modulate(block.norm2(h), mods_n[3], mods_n[4]))
        cs = [c + mods_c[5] * block.ff(modulate(block.norm2(c), mods_c[3], mods_c[4])) for c in cs]
    h = t2i_final_modulation(h, model.scale_shift_table, emb, model.norm_out)
    return unpatchify(model.proj_out(h), grid, p, model.out_channels)


def test_matches_the_official_single_masked_pass_and_two_adapters_compose_in_any_order():
    model = tiny_text_pipeline().transformer
    x, text, t = _inputs(model)
    ec = EasyControl.attach(model)
    for name, seed in (("a", 1), ("b", 2)):
        ec.add_adapter(name, rank=3, alpha=6)
        randomize(ec, name, seed)
    ca, cb = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4)  # the second at a smaller control size
    layers = {n: {i: p.adapters[n] for i, p in enumerate(ec.processors)} for n in ("a", "b")}
    with torch.no_grad():
        ref = _joint_reference(model, x, text, t, [(ca, layers["a"], 1.0), (cb, layers["b"], 0.5)])
        with ec.conditioned([Condition(ca, "a", 1.0), Condition(cb, "b", 0.5)]):
            both = model(x, text, t).sample
        with ec.conditioned([Condition(cb, "b", 0.5), Condition(ca, "a", 1.0)]):
            swapped = model(x, text, t).sample
        with ec.conditioned([Condition(ca, "a", 1.0)]):
            only_a = model(x, text, t).sample
            ref_a = _joint_reference(model, x, text, t, [(ca, layers["a"], 1.0)])
    assert torch.allclose(both, ref, atol=1e-5) and torch.allclose(only_a, ref_a, atol=1e-5)
    assert torch.allclose(both, swapped, atol=1e-5)  # conditions never see each other: order is irrelevant
    assert (both - only_a).abs().max() > 1e-3
    with torch.no_grad():  # with the relative-position bias (beta per condition), cached or not
        ref_bias = _joint_reference(model, x, text, t, [(ca, layers["a"], 1.0, 0.7), (cb, layers["b"], 0.5, 2.0)])
        conds = [Condition(ca, "a", 1.0, 0.7), Condition(cb, "b", 0.5, 2.0)]
        for cache in (True, False):
            with ec.conditioned(conds, use_cache=cache):
                assert torch.allclose(model(x, text, t).sample, ref_bias, atol=1e-5)
    assert (ref_bias - ref).abs().max() > 1e-3


def test_conditional_half_only_splits_a_cfg_batch():
    model = tiny_text_pipeline().transformer
    x, text, t = _inputs(model, batch=1)
    ec = EasyControl.attach(model)
    ec.add_adapter("a", rank=2)
    randomize(ec, "a", 5)
    cond = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        plain = model(x, text, t).sample
        with ec.conditioned([Condition(cond, "a", 1.0, 1.0)]):
            controlled = model(x, text, t).sample
            ec.state.conditional_half_only = True
            both = model(torch.cat([x, x]), torch.cat([text, text]), torch.cat([t, t])).sample
            ec.state.conditional_half_only = False
    assert torch.allclose(both[:1], plain, atol=1e-6) and torch.allclose(both[1:], controlled, atol=1e-6)


def test_strength_scales_only_the_adapter():
    model = tiny_text_pipeline().transformer
    x, text, t = _inputs(model)
    ec = EasyControl.attach(model)
    ec.add_adapter("a", rank=2)
    randomize(ec, "a", 3)
    ec.add_adapter("zero", rank=2)  # up = 0: condition tokens without any adapter effect
    cond = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        outs = {}
        for name, s in (("a", 0.0), ("zero", 1.0), ("a", 1.0), ("a", 2.0)):
            with ec.conditioned([Condition(cond, name, s)]):
                outs[(name, s)] = model(x, text, t).sample
    assert torch.allclose(outs[("a", 0.0)], outs[("zero", 1.0)], atol=1e-6)
    assert (outs[("a", 2.0)] - outs[("a", 1.0)]).abs().max() > 1e-4


# ---- adapters and the pipeline ----------------------------------------------------------------------------
def test_pipeline_cache_equals_no_cache_and_no_control_is_text_to_image(adapters):
    pipe = control_pipe(adapters)
    base = tiny_text_pipeline()
    base.set_progress_bar_config(disable=True)
    img = emoji()
    a = pipe("red cat", control_image=img, control_adapter="edges", preprocessor="auto", **GEN)
    b = pipe("red cat", control_image=img, control_adapter="edges", preprocessor="auto", use_kv_cache=False, **GEN)
    assert torch.equal(a.images, b.images)
    assert torch.equal(pipe("red cat", **GEN).images, base("red cat", **GEN).images)
    assert (a.images - base("red cat", **GEN).images).abs().max() > 1e-3
    off = pipe("red cat", control_image=img, control_adapter="edges", control_strength=0.0, **GEN)
    assert torch.equal(off.images, base("red cat", **GEN).images)  # strength 0: the condition is off
    # control_cfg: conditions in the conditional CFG half only (so guidance amplifies them); no CFG, no difference
    guided = pipe("red cat", control_image=img, control_adapter="edges", control_cfg=True, **GEN)
    assert (guided.images - a.images).abs().max() > 1e-3 and guided.records[0].extra["control_cfg"] is True
    one = dict(GEN, guidance_scale=1.0)
    assert torch.equal(
        pipe("red cat", control_image=img, control_adapter="edges", control_cfg=True, **one).images,
        pipe("red cat", control_image=img, control_adapter="edges", control_cfg=False, **one).images,
    )
    rec = a.records[0]
    assert rec.pipeline == "control" and rec.extra["Controls"] == "edges 1"
    assert rec.extra["_controls"][0]["preprocessor"] == "canny" and rec.extra["_controls"][0]["control_size"] == 8
    assert a.control_images[0].size == (8, 8)
    assert "Controls: edges 1" in rec.to_a1111() and "controls" not in rec.to_call_kwargs()


def test_saved_adapter_and_saved_pipeline_give_the_same_images(adapters, tmp_path):
    pipe = control_pipe(adapters)
    kw = dict(controls=[ControlInput(emoji(), "edges", 0.8, "canny"), ControlInput(emoji(), "hole", 1.2, "inpaint")])
    first = pipe("red cat", **kw, **GEN).images
    pipe.save_pretrained(tmp_path / "ctl")
    assert sorted(p.name for p in (tmp_path / "ctl" / "controls").iterdir()) == [
        "edges.safetensors",
        "hole.safetensors",
    ]
    with safe_open(str(tmp_path / "ctl" / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert not any("processor" in k for k in f.keys())  # noqa: SIM118 (adapter weights stay out of the model)
    loaded = load_pipeline(tmp_path / "ctl")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is ControlTextToImagePipeline and loaded.kind == "control"
    assert set(loaded.control_adapters()) == {"edges", "hole"}
    again = loaded("red cat", **kw, **GEN).images
    # equal up to float rounding (the reloaded T5 may pick another attention kernel; values here are ~1e2)
    assert torch.allclose(again, first, rtol=1e-5, atol=1e-4), (again - first).abs().max()
    # A fresh adapter object from the file: the same weights, rank and alpha.
    ec = EasyControl.attach(tiny_text_pipeline().transformer)
    info = ec.load_adapter(adapters["hole"], "hole")
    assert (info.rank, info.alpha, info.preprocessor) == (2, 4.0, "inpaint")
    assert all(torch.equal(ec.state_dict("hole")[k], v) for k, v in _file(adapters["hole"]).items())


def _file(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def test_adapter_files_are_peft_format_with_rank_alpha_and_control_metadata(adapters):
    keys = _file(adapters["hole"])
    assert "transformer.transformer_blocks.0.attn1.processor.to_q.lora_A.weight" in keys
    assert len(keys) == 2 * 2 * len(PROJECTIONS)
    with safe_open(str(adapters["hole"]), "pt") as f:
        meta = f.metadata()
    peft = json.loads(meta["lora_adapter_metadata"])
    assert peft["transformer.r"] == 2 and peft["transformer.lora_alpha"] == 4
    assert meta["adapter_type"] == "easycontrol" and meta["preprocessor"] == "inpaint"
    assert meta["base_model_class"] == "TextDiTModel" and meta["base_num_layers"] == "2"


def test_bad_adapters_are_refused_with_the_reason(adapters, tmp_path):
    pipe = control_pipe(adapters)
    other = EasyControl.attach(tiny_pixart())
    other.add_adapter("x", rank=2)
    other.save_adapter("x", tmp_path / "other.safetensors", {"base_model": "PixArt-tiny"})
    with pytest.raises(ControlAdapterError, match="trained on PixArt-tiny.*this base model"):
        pipe.register_control_adapter(tmp_path / "other.safetensors")
    plain = {"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 16)}
    plain["transformer.transformer_blocks.0.attn1.to_q.lora_B.weight"] = torch.zeros(16, 2)
    save_file(plain, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ControlAdapterError, match="plain LoRA"):
        pipe.register_control_adapter(tmp_path / "plain.safetensors")
    partial = {k: v for k, v in _file(adapters["edges"]).items() if "blocks.1." not in k}
    save_file(partial, str(tmp_path / "partial.safetensors"))
    with pytest.raises(ControlAdapterError, match="lacks 4 of 8 layers"):
        pipe.register_control_adapter(tmp_path / "partial.safetensors")
    (tmp_path / "pickle.safetensors").write_bytes(b"\x80\x04\x95fake pickle")
    with pytest.raises(ControlAdapterError, match="safetensors"):
        pipe.register_control_adapter(tmp_path / "pickle.safetensors")
    with pytest.raises(InputError, match="Unknown control adapter 'nope'.*edges, hole"):
        pipe("red cat", control_image=emoji(), control_adapter="nope", **GEN)
    ec = EasyControl.attach(tiny_text_pipeline().transformer)
    ec.load_adapter(adapters["edges"], "edges")
    ec.save_adapter("edges", tmp_path / "elsewhere.safetensors", {"base_model": "other", "base_model_hash": "abc"})
    pipe.register_control_adapter(tmp_path / "elsewhere.safetensors")
    pipe.model_hash = "0123456789"
    with pytest.warns(ControlBaseModelWarning, match="trained on other .abc.; this model's hash is 0123456789"):
        pipe("red cat", control_image=emoji(), control_adapter="elsewhere", **GEN)


def test_bad_control_inputs_are_errors_and_odd_images_are_converted(adapters, tmp_path):
    pipe = control_pipe(adapters)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(InputError, match="bad.png"):
        pipe("red cat", control_image=tmp_path / "bad.png", control_adapter="edges", **GEN)
    with pytest.raises(InputError, match="both control_image and control_adapter"):
        pipe("red cat", control_image=emoji(), **GEN)
    with pytest.raises(InputError, match="at most 4"):
        pipe("red cat", controls=[ControlInput(emoji(), "edges")] * 5, **GEN)
    with pytest.raises(InputError, match="strength"):
        pipe("red cat", control_image=emoji(), control_adapter="edges", control_strength=float("nan"), **GEN)
    with pytest.raises(InputError, match="control_size"):
        pipe("red cat", control_image=emoji(), control_adapter="edges", control_size=7, **GEN)
    # Another aspect, size and mode: centre-cropped to the output's aspect and resized; CMYK/grey converted.
    wide = Image.new("CMYK", (90, 30), (0, 0, 0, 0))
    wide.paste(Image.new("CMYK", (30, 30), (0, 255, 255, 0)), (30, 0))
    out = pipe("red cat", control_image=wide, control_adapter="edges", height=8, width=16, **GEN)
    assert out.images.shape[-2:] == (8, 16) and out.control_images[0].size == (8, 8)
    cmap = make_control_map(wide, 8, 16, 8, None)
    assert np.asarray(cmap)[:, 2:6].mean() < np.asarray(cmap)[:, :2].mean()  # the red middle square kept its place
    grey = pipe("red cat", control_image=emoji().convert("L"), control_adapter="edges", **GEN)
    assert grey.images.shape == out.images.shape[:2] + (8, 8)


def test_stock_pixart_pipeline_with_a_vae(tmp_path):
    stock = load_pipeline(save_stock_pixart(tmp_path / "px"))
    pipe = ControlTextToImagePipeline.from_text_pipeline(stock)
    pipe.set_progress_bar_config(disable=True)
    ec = EasyControl.attach(pipe.transformer)
    ec.add_adapter("x", rank=2)
    randomize(ec, "x", 4)
    ec.save_adapter("x", tmp_path / "x.safetensors")
    pipe.register_control_adapter(tmp_path / "x.safetensors")
    kw = dict(control_image=emoji(), control_adapter="x", use_resolution_binning=False, height=32, width=64, **GEN)
    a = pipe("red cat", **kw)
    b = pipe("red cat", use_kv_cache=False, **kw)
    assert torch.equal(a.images, b.images) and a.images.shape == (1, 4, 16, 32)
    assert (a.images - pipe("red cat", **{k: v for k, v in kw.items() if "control" not in k}).images).abs().max() > 0


# ---- training ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def control_data(tmp_path_factory) -> Path:
    """8 images of coloured squares on white, with captions and pre-made edge maps (conditioning images)."""
    root = tmp_path_factory.mktemp("control-data")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        arr = np.full((8, 8, 3), 255, np.uint8)
        a, b = rng.integers(0, 4, 2)
        arr[a : a + 4, b : b + 4] = rng.integers(0, 200, 3)
        Image.fromarray(arr).save(root / f"{i}.png")
        run_preprocessor("canny", arr).save(root / f"{i}-edges.png")
        rows.append({"file_name": f"{i}.png", "text": ["red cat", "green tree"][i % 2]})
        rows[-1]["conditioning_image_file_name"] = f"{i}-edges.png"
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def _fixed_loss(trainer, batch) -> float:
    torch.manual_seed(123)
    with torch.no_grad():
        return float(trainer.loss(batch))


@pytest.mark.parametrize("source", ["conditioning images", "preprocessor"])
def test_training_lowers_the_loss_and_writes_an_adapter_the_pipeline_loads(source, control_data, tmp_path):
    from training.data.datasets import collate_image_batch
    from training.train_control import ControlTrainer, load_control_config

    tiny_text_pipeline().save_pretrained(tmp_path / "t2i")
    values = {
        "pipeline": str(tmp_path / "t2i"),
        "data.root": str(control_data),
        "output_dir": str(tmp_path / "run"),
        "control.name": "edges",
        "lora.rank": 4,
        "optim.max_steps": 25,
        "optim.batch_size": 8,
        "optim.learning_rate": 3e-2,
        "data.caption_dropout": 0.0,
        "checkpoint.every": 0,
        "tensorboard": False,
    }
    if source == "preprocessor":
        values.update({"control.preprocessor": "inpaint", "control.name": "hole", "data.root": str(tmp_path / "d")})
        (tmp_path / "d").mkdir()
        for p in control_data.glob("[0-9].png"):
            (tmp_path / "d" / p.name).write_bytes(p.read_bytes())
        rows = [json.loads(r) for r in (control_data / "metadata.jsonl").read_text().splitlines()]
        (tmp_path / "d" / "metadata.jsonl").write_text(
            "\n".join(json.dumps({"file_name": r["file_name"], "text": r["text"]}) for r in rows)
        )
    trainer = ControlTrainer(load_control_config(values=values | {"validation.every": 25, "validation.steps": 2}))
    batch = collate_image_batch([trainer.dataset[i] for i in range(8)])
    before = _fixed_loss(trainer, batch)
    trainable = [p for p in trainer.transformer.parameters() if p.requires_grad]
    trainer.loss(batch).backward()  # every trainable weight gets a gradient (what DDP requires)
    assert trainable and all(p.grad is not None for p in trainable)
    trainer.optimizer.zero_grad(set_to_none=True)
    out = trainer.train(resume="none")
    after = _fixed_loss(trainer, batch)
    assert after < 0.97 * before, (before, after)
    assert (tmp_path / "run" / "validation" / "step-0000025.png").is_file()
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["base_model"] == "t2i" and meta["steps"] == "25"
    assert meta["preprocessor"] == ("inpaint" if source == "preprocessor" else "none")
    pipe = ControlTextToImagePipeline.from_pretrained(tmp_path / "t2i")
    pipe.set_progress_bar_config(disable=True)
    name = pipe.register_control_adapter(out)
    res = pipe("red cat", control_image=emoji(), control_adapter=name, preprocessor="auto", **GEN)
    assert res.records[0].extra["_controls"][0]["adapter"] == name


def test_training_config_errors(tmp_path, control_data):
    from training.config import ConfigError
    from training.train_control import load_control_config

    base = {"pipeline": "x", "data.root": str(control_data)}
    with pytest.raises(ConfigError, match="unknown config key"):
        load_control_config(values=base | {"control.preprocesor": "canny"})
    with pytest.raises(ConfigError, match="preprocessor 'hed' is unknown"):
        load_control_config(values=base | {"control.preprocessor": "hed"})
    with pytest.raises(ConfigError, match="not parameters of canny"):
        load_control_config(values=base | {"control.preprocessor": "canny", "control.preprocessor_params": {"x": 1}})
    with pytest.raises(ConfigError, match="no base model"):
        load_control_config(values={"data.root": str(control_data)})


# ---- the official FLUX release ----------------------------------------------------------------------------
def _tiny_flux():
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=16, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )  # fmt: skip
    perturb(transformer, 0.05)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4,
        layers_per_block=1, sample_size=32, shift_factor=0.1, scaling_factor=0.5,
    )  # fmt: skip
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=32, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
            max_position_embeddings=32, projection_dim=32, bos_token_id=0, eos_token_id=1, pad_token_id=0,
        )
    )  # fmt: skip
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), vae=vae, text_encoder=clip.eval(),
        tokenizer=tiny_tokenizer(), text_encoder_2=tiny_t5(), tokenizer_2=tiny_tokenizer(), transformer=transformer,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _official_file(path: Path, seed: int, rank: int = 4, conditions: int = 1, dim: int = 32, blocks=(2, 2)) -> dict:
    """Random weights in the official layout (train/src/layers.py names, as in HF Xiaojiu-Z/EasyControl)."""
    g = torch.Generator().manual_seed(seed)
    t = {}
    for n in range(conditions):
        for prefix, count, projs in (("transformer_blocks", blocks[0], "q k v proj"), ("single_", blocks[1], "q k v")):
            name = prefix if prefix.endswith("blocks") else "single_transformer_blocks"
            for i in range(count):
                for proj in projs.split():
                    t[f"{name}.{i}.attn.processor.{proj}_loras.{n}.down.weight"] = torch.randn(rank, dim, generator=g)
                    t[f"{name}.{i}.attn.processor.{proj}_loras.{n}.up.weight"] = (
                        torch.randn(dim, rank, generator=g) * 0.3
                    )
    save_file(t, str(path))
    return t


def _official_flux_forward(model, latents, prompt_embeds, pooled, guidance, timestep, img_ids, txt_ids, conds):
    """The official transformer_flux.py + layers_cache.py forward (first, uncached pass), written from the paper and
    the code: one sequence [text | noise | cond_1..n] with the -1e20 block mask, row-masked LoRAs (proj on to_out's
    output), conditions modulated by time_text_embed(0, guidance, pooled). ``conds``: (packed, ids, file dict, n, w)."""
    from diffusers.models.embeddings import apply_rotary_emb

    def rope(z, freqs):
        return apply_rotary_emb(z, freqs, sequence_dim=1)

    hid = model.x_embedder(latents)
    cond = model.x_embedder(torch.cat([c[0] for c in conds], dim=1))
    temb = model.time_text_embed(timestep * 1000, guidance * 1000, pooled)
    ctemb = model.time_text_embed(timestep * 0, guidance * 1000, pooled)
    enc = model.context_embedder(prompt_embeds)
    n_txt, n_img, n_cond = enc.shape[1], hid.shape[1], cond.shape[1]
    freqs = model.pos_embed(torch.cat([txt_ids, img_ids] + [c[1] for c in conds], dim=0))
    sizes = [c[0].shape[1] for c in conds]
    total = n_txt + n_img + n_cond
    mask = torch.zeros(total, total)
    row_masks, start = [], n_txt + n_img
    for s in sizes:
        mask[start : start + s] = -1e20
        mask[start : start + s, start : start + s] = 0
        row_masks.append(
            torch.zeros(1, n_img + n_cond, 1).index_fill_(1, torch.arange(start - n_txt, start - n_txt + s), 1)
        )
        start += s

    def lora(z, key_fmt, single):
        out = 0
        for (_, _, weights, n, w), rm in zip(conds, row_masks):
            rm = rm if not single else torch.cat([torch.zeros(1, n_txt, 1), rm], dim=1)
            down, up = weights[key_fmt.format(n=n, part="down")], weights[key_fmt.format(n=n, part="up")]
            out = out + w * ((rm * z) @ down.T @ up.T)
        return out

    def attend(q, k, v):
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return o.transpose(1, 2).flatten(2, 3)

    for i, block in enumerate(model.transformer_blocks):
        a = block.attn
        nh, g_msa, sh_mlp, sc_mlp, g_mlp = block.norm1(hid, emb=temb)
        nc, cg_msa, csh_mlp, csc_mlp, cg_mlp = block.norm1(cond, emb=ctemb)
        ne, e_msa, esh_mlp, esc_mlp, eg_mlp = block.norm1_context(enc, emb=temb)
        x = torch.cat([nh, nc], dim=1)
        key = "transformer_blocks.%d.attn.processor.{p}_loras.{{n}}.{{part}}.weight" % i  # noqa: UP031
        q, k, v = (lin(x) + lora(x, key.format(p=p), False) for lin, p in ((a.to_q, "q"), (a.to_k, "k"), (a.to_v, "v")))
        q, k, v = (z.unflatten(-1, (-1, a.head_dim)) for z in (q, k, v))
        eq, ek, ev = (lin(ne).unflatten(-1, (-1, a.head_dim)) for lin in (a.add_q_proj, a.add_k_proj, a.add_v_proj))
        q = rope(torch.cat([a.norm_added_q(eq), a.norm_q(q)], dim=1), freqs)
        k = rope(torch.cat([a.norm_added_k(ek), a.norm_k(k)], dim=1), freqs)
        o = attend(q, k, torch.cat([ev, v], dim=1))
        e_o, x_o = o[:, :n_txt], a.to_out[0](o[:, n_txt:])
        x_o = x_o + lora(x_o, key.format(p="proj"), False)
        h_o, c_o = x_o[:, :n_img], x_o[:, n_img:]
        hid = hid + g_msa[:, None] * h_o
        hid = hid + g_mlp[:, None] * block.ff(block.norm2(hid) * (1 + sc_mlp[:, None]) + sh_mlp[:, None])
        cond = cond + cg_msa[:, None] * c_o
        cond = cond + cg_mlp[:, None] * block.ff(block.norm2(cond) * (1 + csc_mlp[:, None]) + csh_mlp[:, None])
        enc = enc + e_msa[:, None] * a.to_add_out(e_o)
        enc = enc + eg_mlp[:, None] * block.ff_context(
            block.norm2_context(enc) * (1 + esc_mlp[:, None]) + esh_mlp[:, None]
        )
    hid = torch.cat([enc, hid], dim=1)
    for i, block in enumerate(model.single_transformer_blocks):
        a = block.attn
        nh, gate = block.norm(hid, emb=temb)
        nc, cgate = block.norm(cond, emb=ctemb)
        x = torch.cat([nh, nc], dim=1)
        key = "single_transformer_blocks.%d.attn.processor.{p}_loras.{{n}}.{{part}}.weight" % i  # noqa: UP031
        q, k, v = (lin(x) + lora(x, key.format(p=p), True) for lin, p in ((a.to_q, "q"), (a.to_k, "k"), (a.to_v, "v")))
        q, k, v = (z.unflatten(-1, (-1, a.head_dim)) for z in (q, k, v))
        o = attend(rope(a.norm_q(q), freqs), rope(a.norm_k(k), freqs), v)
        o_h, o_c = o[:, : n_txt + n_img], o[:, n_txt + n_img :]
        hid = hid + gate[:, None] * block.proj_out(torch.cat([o_h, block.act_mlp(block.proj_mlp(nh))], dim=2))
        cond = cond + cgate[:, None] * block.proj_out(torch.cat([o_c, block.act_mlp(block.proj_mlp(nc))], dim=2))
    hid = model.norm_out(hid[:, n_txt:], temb)
    return model.proj_out(hid)


def test_official_flux_files_load_strictly_and_match_the_official_math(tmp_path):
    from control.flux_official import FluxCondition, FluxEasyControl, spatial_ids, subject_ids

    pipe = _tiny_flux()
    model = pipe.transformer
    canny = _official_file(tmp_path / "canny.safetensors", 1)
    multi = _official_file(tmp_path / "subject_inpaint.safetensors", 2, rank=2, conditions=2)
    files = [(tmp_path / "canny.safetensors", 1.0), (tmp_path / "subject_inpaint.safetensors", [0.7, 1.3])]
    ec = FluxEasyControl.install(model, files)
    assert [s.weight for s in ec.slots] == [1.0, 0.7, 1.3] and ec.num_parameters() == (2 * 4 + 2 * 3) * 64 * (4 + 2 + 2)
    assert torch.equal(ec.processors["transformer_blocks.1"].proj_loras[2].up.weight, multi[
        "transformer_blocks.1.attn.processor.proj_loras.1.up.weight"])  # fmt: skip
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 16, generator=g)  # a 4x4 packed noise grid (16 px images)
    embeds, pooled = torch.randn(1, 5, 16, generator=g), torch.randn(1, 32, generator=g)
    guidance, t = torch.tensor([3.5]), torch.tensor([0.7])
    img_ids = spatial_ids((8, 8), (8, 8))
    txt_ids = torch.zeros(5, 3)
    c_spatial, c_subject = torch.randn(1, 4, 16, generator=g), torch.randn(1, 4, 16, generator=g)
    ids_sp, ids_sub = spatial_ids((4, 4), (8, 8)), subject_ids((4, 4))  # a 2x2 condition spread over 4x4
    assert torch.equal(ids_sp[:, 1].unique(), torch.tensor([0.0, 2.0])) and ids_sub[:, 1].min() == 64
    conds = [(c_subject, ids_sub, multi, 0, 0.7), (c_spatial, ids_sp, canny, 0, 1.0)]
    with torch.no_grad():
        ref = _official_flux_forward(model, latents, embeds, pooled, guidance, t, img_ids, txt_ids, conds)
        ec.set_conditions([FluxCondition(c_subject, ids_sub, 1), FluxCondition(c_spatial, ids_sp, 0)])
        kw = dict(hidden_states=latents, encoder_hidden_states=embeds, pooled_projections=pooled, timestep=t,
                  img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)  # fmt: skip
        ours = model(**kw)[0]
        again = model(**{**kw, "timestep": t * 0.5})[0]  # second step: served from the cache
        ec.clear()
        plain = model(**kw)[0]
    assert ec.state.passes == 2 and torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    assert (ours - plain).abs().max() > 1e-3 and (again - ours).abs().max() > 0
    ec.uninstall()
    with torch.no_grad():
        assert torch.equal(model(**kw)[0], plain)


def test_official_flux_generation_and_bad_files(tmp_path):
    from control.flux_official import FluxEasyControl, generate

    pipe = _tiny_flux()
    _official_file(tmp_path / "canny.safetensors", 1)
    FluxEasyControl.install(pipe.transformer, [tmp_path / "canny.safetensors"])
    kw = dict(num_inference_steps=2, max_sequence_length=16, output_type="pt", height=16, width=16, cond_size=16)
    a = generate(pipe, "red cat", spatial_images=[emoji()], generator=torch.Generator().manual_seed(0), **kw).images
    b = generate(pipe, "red cat", [emoji()], use_cache=False, generator=torch.Generator().manual_seed(0), **kw).images
    c = generate(
        pipe, "red cat", subject_images=[emoji().crop((0, 0, 32, 20))], generator=torch.Generator().manual_seed(0), **kw
    ).images  # noqa: E501
    assert a.shape == (1, 3, 16, 16) and torch.equal(a, b) and (a - c).abs().max() > 0
    cfg = dict(kw, negative_prompt="green dog", true_cfg_scale=2.0)  # the negative prompt gets its own cache
    ec = pipe.transformer._dit_studio_flux_easycontrol
    before = ec.state.passes
    d = generate(pipe, "red cat", [emoji()], generator=torch.Generator().manual_seed(0), **cfg).images
    assert ec.state.passes == before + 2
    e = generate(pipe, "red cat", [emoji()], use_cache=False, generator=torch.Generator().manual_seed(0), **cfg).images
    assert torch.equal(d, e)
    with pytest.raises(InputError, match="2 condition images but only 1"):
        generate(pipe, "red cat", [emoji(), emoji()], **kw)
    bad = _official_file(tmp_path / "wide.safetensors", 2, dim=48)
    with pytest.raises(ControlAdapterError, match="width is 32"):
        FluxEasyControl.install(pipe.transformer, [tmp_path / "wide.safetensors"])
    _official_file(tmp_path / "deep.safetensors", 2, blocks=(3, 2))
    with pytest.raises(ControlAdapterError, match="double block 2.*2 double"):
        FluxEasyControl.install(pipe.transformer, [tmp_path / "deep.safetensors"])
    short = {k: v for k, v in bad.items() if "single_transformer_blocks.1." not in k}
    short = {k: (v[:, :32] if v.shape[1] == 48 else v[:32]).contiguous() for k, v in short.items()}
    save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(ControlAdapterError, match="lacks 6 weights"):
        FluxEasyControl.install(pipe.transformer, [tmp_path / "short.safetensors"])
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32)}, str(tmp_path / "peft.safetensors"))
    with pytest.raises(ControlAdapterError, match="not an official EasyControl file"):
        FluxEasyControl.install(pipe.transformer, [tmp_path / "peft.safetensors"])
    # the previously installed LoRAs are still in place after the refused files
    assert torch.equal(generate(pipe, "red cat", [emoji()], generator=torch.Generator().manual_seed(0), **kw).images, a)


# ---- registry ---------------------------------------------------------------------------------------------
def test_control_pipelines_are_registered_as_kind_control(adapters, tmp_path):
    from pipelines.catalog import Catalog
    from pipelines.registry import kind_of

    assert kind_of("ControlTextToImagePipeline") == "control"
    control_pipe(adapters).save_pretrained(tmp_path / "models" / "tiny-control")
    catalog = Catalog(roots=[tmp_path / "models"])
    assert catalog.names("control") == ["tiny-control"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ControlBaseModelWarning)
        pipe = load_pipeline("tiny-control", catalog=catalog)
    assert set(pipe.control_adapters()) == {"edges", "hole"}


# ---- the UI tab -------------------------------------------------------------------------------------------
def test_control_tab_previews_generates_and_saves_records(adapters, tmp_path):
    import gradio as gr

    from pipelines.catalog import Catalog
    from pipelines.control_tab import build_control_tab, control_map_preview, run_control
    from pipelines.metadata import read_record
    from pipelines.service import GenerationService
    from pipelines.ui_tabs import TabContext

    control_pipe(adapters).save_pretrained(tmp_path / "models" / "tiny-control")
    (tmp_path / "models" / "controls").mkdir()  # <models-dir>/controls/: where trained adapters are dropped
    (tmp_path / "models" / "controls" / "mine.safetensors").write_bytes(adapters["edges"].read_bytes())
    service = GenerationService(
        Catalog(roots=[tmp_path / "models"]), tmp_path / "out", lora_dirs=[tmp_path / "models" / "loras"]
    )
    models = ["tiny-control"]
    with gr.Blocks():
        handle = build_control_tab(TabContext(service=service, kind="control", title="Control", models=models))
    preview = control_map_preview(service, models, "tiny-control", emoji(), "canny", "edges", None, 8, 8)
    assert preview.size == (160, 160)  # the 8 px map, enlarged for display
    slots = [
        (emoji(), "canny", "edges", 1.0, None),
        (emoji(), "inpaint", "mine", 0.5, None),
        (None, "canny", "none", 1, None),
    ]
    paths, seed, status, record = run_control(
        service, models, "s1", "tiny-control", "red cat", "", slots, 2, 3.0, 8, 8, 5, 2, True
    )
    assert len(paths) == 2 and seed == 5 and "edges 1, mine 0.5" in status
    saved = read_record(paths[1])
    assert saved.pipeline == "control" and saved.seed == 6 and [c["adapter"] for c in saved.extra["_controls"]] == [
        "edges", "mine"]  # fmt: skip
    assert [p for p, _ in service.history("s1")] == [Path(p) for p in reversed(paths)]
    filled = handle.fill(saved)
    assert filled[1] == "red cat" and filled[8] is False
    assert filled[9:11] == ["edges", 1.0] and filled[11:13] == ["mine", 0.5]
    with pytest.raises(InputError, match="prompt is empty"):
        run_control(service, models, "s1", "tiny-control", " ", "", slots, 2, 3.0, 8, 8, 5, 1, True)
    with pytest.raises(InputError, match="no image"):
        run_control(
            service,
            models,
            "s1",
            "tiny-control",
            "cat",
            "",
            [(None, "canny", "edges", 1, None)],
            2,
            3.0,
            8,
            8,
            5,
            1,
            True,
        )  # noqa: E501
    with pytest.raises(InputError, match="Unknown control adapter"):
        run_control(
            service,
            models,
            "s1",
            "tiny-control",
            "cat",
            "",
            [(emoji(), "canny", "x", 1, None)],
            2,
            3.0,
            8,
            8,
            5,
            1,
            True,
        )  # noqa: E501
    with pytest.raises(InputError, match="Width"):
        run_control(service, models, "s1", "tiny-control", "cat", "", slots, 2, 3.0, 7, 8, 5, 1, True)
