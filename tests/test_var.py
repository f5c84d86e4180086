"""VAR: block-causal mask, KV cache, VQ-VAE round trip, the converter on the official key layout, the pipeline,
and both training stages, on tiny random models (CPU, seconds)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dit.convert.common import KeyMismatchError
from dit.convert.var_original import (
    convert_var_pipeline,
    convert_var_transformer,
    convert_var_vae,
    patch_nums_from_levels,
)
from dit.models.var import VARKVCache, VARTransformer, block_causal_mask, level_ids, var_config
from dit.models.var_vqvae import PATCH_NUMS, VARVQVAE, phi_ticks
from pipelines.errors import InputError
from pipelines.var import VARPipeline, filter_top_k_top_p

PN = (1, 2, 4)  # 21 tokens; f2 VQ-VAE -> 8x8 images


def perturb(model: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def tiny_vae(seed: int = 0) -> VARVQVAE:
    torch.manual_seed(seed)
    vae = VARVQVAE(
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, vocab_size=32,
        norm_num_groups=4, patch_nums=PN, share_quant_resi=2,
    )  # fmt: skip
    return perturb(vae, 0.02, seed).eval()


def tiny_transformer(seed: int = 0, shared_aln: bool = False) -> VARTransformer:
    torch.manual_seed(seed)
    model = VARTransformer(
        vocab_size=32, latent_channels=4, num_classes=3, depth=2, embed_dim=32, num_heads=2,
        shared_aln=shared_aln, patch_nums=PN, drop_path_rate=0.0,
    )  # fmt: skip
    return perturb(model, 0.3, seed).eval()


@pytest.fixture(scope="module")
def pipe() -> VARPipeline:
    p = VARPipeline(
        transformer=tiny_transformer(), vae=tiny_vae(), id2label={"0": "smileys", "1": "animals", "2": "food"}
    )
    p.set_progress_bar_config(disable=True)
    return p


# ---------------------------------------------------------------------------------------------- the mask


def test_block_causal_mask_shape_and_content():
    mask = block_causal_mask(PN)
    assert mask.shape == (1, 1, 21, 21)
    lv = level_ids(PN)
    assert lv.tolist() == [0] + [1] * 4 + [2] * 16
    m = mask[0, 0]
    for i in range(21):
        for j in range(21):
            assert m[i, j].item() == (0.0 if lv[i] >= lv[j] else -math.inf)
    # a scale sees itself completely and every coarser scale, never a finer one
    assert torch.isfinite(m[1:5, :5]).all() and torch.isinf(m[1:5, 5:]).all() and torch.isfinite(m[5:]).all()
    assert sum(p * p for p in PATCH_NUMS[256]) == 680 == block_causal_mask(PATCH_NUMS[256]).shape[-1]


def test_teacher_forced_logits_are_block_causal():
    model = tiny_transformer()
    labels = torch.tensor([0, 2])
    x = torch.randn(2, 20, 4)
    with torch.no_grad():
        ref = model(labels, x)
        y = x.clone()
        y[:, 4:] = torch.randn(2, 16, 4)  # change the input of the last scale (positions 5..20)
        out = model(labels, y)
    assert ref.shape == (2, 21, 32)
    torch.testing.assert_close(out[:, :5], ref[:, :5], rtol=0, atol=0)  # coarser scales cannot see it
    assert (out[:, 5:] - ref[:, 5:]).abs().max() > 1e-3


def test_kv_cached_sampling_gives_the_same_tokens_as_uncached(pipe):
    seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for cached in (True, False):

        def grab(p, i, t, tensors, cached=cached):
            seen[cached].append(tensors["latents"].clone())
            return {}

        pipe([0, 1, 2], seed=5, guidance_scale=2.0, top_k=8, top_p=0.9, use_kv_cache=cached,
             output_type="latent", callback_on_step_end=grab)  # fmt: skip
    assert len(seen[True]) == len(seen[False]) == len(PN)
    for a, b in zip(seen[True], seen[False]):  # the running f_hat after every scale: same tokens at each
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # and the cache really holds every scale's keys: feeding scales one by one equals the masked full pass
    model = pipe.transformer
    cond = model.class_condition(torch.tensor([1]))
    tokens = [model.start_tokens(cond)] + [
        model.scale_tokens(torch.randn(1, pn * pn, 4), i) for i, pn in enumerate(PN) if i
    ]
    cache = VARKVCache()
    with torch.no_grad():
        stepwise = torch.cat([model.logits(t, cond, kv_cache=cache) for t in tokens], dim=1)
        full = model.logits(torch.cat(tokens, 1), cond, block_causal_mask(PN))
    assert cache.length == 21
    torch.testing.assert_close(stepwise, full, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------- VQ-VAE


def test_vqvae_encode_decode_round_trip(tmp_path):
    vae = tiny_vae()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    ids = vae.image_to_ids(x)
    assert [tuple(i.shape) for i in ids] == [(2, 1), (2, 4), (2, 16)]
    assert all(int(i.max()) < 32 for i in ids)
    f_hats = vae.quantize.quantize_pyramid(vae.encode(x), to_fhat=True)
    torch.testing.assert_close(vae.quantize.ids_to_fhat(ids), f_hats[-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(vae.ids_to_image(ids), vae.reconstruct(x), rtol=0, atol=1e-6)
    # the teacher-forcing input of scale k+1 is the running reconstruction after scale k, area-downsampled
    tf = vae.quantize.teacher_forcing_input(ids)
    assert tf.shape == (2, 20, 4)
    torch.testing.assert_close(tf[:, 4:], F.interpolate(f_hats[1], size=(4, 4), mode="area").flatten(2).transpose(1, 2))
    # the training pass decodes the same f_hat (straight-through), and its VQ loss reaches the codebook
    vae.train()
    out = vae(x, return_usage=True)
    torch.testing.assert_close(out.sample.clamp(-1, 1), vae.reconstruct(x), rtol=0, atol=1e-5)
    out.vq_loss.backward()
    assert vae.quantize.embedding.weight.grad.abs().sum() > 0
    assert len(out.usage) == 3 and int(vae.quantize.hit_updates) == 1
    vae.eval()
    vae.save_pretrained(tmp_path / "vae")
    again = VARVQVAE.from_pretrained(tmp_path / "vae")
    assert all(torch.equal(a, b) for a, b in zip(again.image_to_ids(x), ids))
    assert phi_ticks(4).tolist() == pytest.approx([1 / 12, 13 / 36, 23 / 36, 11 / 12])
    # which of the 4 shared phi convs each of the 10 scales of the released model uses (as the official code)
    q = VARVQVAE(block_out_channels=(32,), layers_per_block=1, latent_channels=4, vocab_size=8).quantize
    assert [list(q.phi).index(q.phi_for(si)) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


# ---------------------------------------------------------------------------------------------- converter


def official_vae_state_dict(ch=32, ch_mult=(1, 2), blocks=1, z=4, vocab=32, n_phi=4, levels=3, seed=0):
    """A random state dict with the key names and shapes of FoundationVision/VAR's VQVAE (basic_vae.py)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, cin, cout, k=3):
        sd[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g) * (0.5 / math.sqrt(cin * k * k))
        sd[f"{name}.bias"] = torch.randn(cout, generator=g) * 0.01

    def norm(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout), norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c), conv(f"{name}.qkv", c, 3 * c, 1), conv(f"{name}.proj_out", c, c, 1)

    n = len(ch_mult)
    conv("encoder.conv_in", 3, ch)
    cin = ch
    for i, m in enumerate(ch_mult):
        for j in range(blocks):
            resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
            cin = ch * m
            if i == n - 1:
                attn(f"encoder.down.{i}.attn.{j}", cin)
        if i != n - 1:
            conv(f"encoder.down.{i}.downsample.conv", cin, cin)
    for side in ("encoder", "decoder"):
        c = ch * ch_mult[-1]
        resnet(f"{side}.mid.block_1", c, c), attn(f"{side}.mid.attn_1", c), resnet(f"{side}.mid.block_2", c, c)
    norm("encoder.norm_out", cin), conv("encoder.conv_out", cin, z)
    conv("decoder.conv_in", z, ch * ch_mult[-1])
    cin = ch * ch_mult[-1]
    for i in reversed(range(n)):
        for j in range(blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", cin, ch * ch_mult[i])
            cin = ch * ch_mult[i]
            if i == n - 1:
                attn(f"decoder.up.{i}.attn.{j}", cin)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", cin, cin)
    norm("decoder.norm_out", cin), conv("decoder.conv_out", cin, 3)
    conv("quant_conv", z, z), conv("post_quant_conv", z, z)
    sd["quantize.embedding.weight"] = torch.randn(vocab, z, generator=g)
    for k in range(n_phi):
        conv(f"quantize.quant_resi.qresi_ls.{k}", z, z)
    sd["quantize.ema_vocab_hit_SV"] = torch.rand(levels, vocab, generator=g)
    return sd


def official_var_state_dict(pn=PN, depth=2, c=32, heads=2, cvae=4, vocab=32, classes=3, seed=0):
    """A random state dict with the key names and shapes of FoundationVision/VAR's VAR (var.py, basic_var.py)."""
    g = torch.Generator().manual_seed(seed)
    length = sum(p * p for p in pn)

    def r(*shape, s=0.1):
        return torch.randn(*shape, generator=g) * s

    sd = {
        "word_embed.weight": r(c, cvae), "word_embed.bias": r(c), "class_emb.weight": r(classes + 1, c),
        "pos_start": r(1, pn[0] ** 2, c), "pos_1LC": r(1, length, c), "lvl_embed.weight": r(len(pn), c),
        "head_nm.ada_lin.1.weight": r(2 * c, c), "head_nm.ada_lin.1.bias": r(2 * c),
        "head.weight": r(vocab, c), "head.bias": r(vocab),
    }  # fmt: skip
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update({
            p + "attn.mat_qkv.weight": r(3 * c, c, s=0.3), p + "attn.q_bias": r(c), p + "attn.v_bias": r(c),
            p + "attn.zero_k_bias": torch.zeros(c),
            p + "attn.scale_mul_1H11": torch.full((1, heads, 1, 1), 4.0).log() + r(1, heads, 1, 1),
            p + "attn.proj.weight": r(c, c), p + "attn.proj.bias": r(c),
            p + "ffn.fc1.weight": r(4 * c, c), p + "ffn.fc1.bias": r(4 * c),
            p + "ffn.fc2.weight": r(c, 4 * c), p + "ffn.fc2.bias": r(c),
            p + "ada_lin.1.weight": r(6 * c, c, s=0.3), p + "ada_lin.1.bias": r(6 * c, s=0.3),
        })  # fmt: skip
    lv = level_ids(pn)
    sd["lvl_1L"] = lv[None]
    sd["attn_bias_for_masking"] = torch.where(lv[:, None] >= lv[None], 0.0, -torch.inf)[None, None]
    return sd


def reference_var_logits(sd, labels, x_in, heads, eps=1e-6):
    """VAR's teacher-forced forward written out from the official code, on the official state dict."""
    c = sd["word_embed.weight"].shape[0]
    cond = sd["class_emb.weight"][labels]
    x = torch.cat([cond[:, None] + sd["pos_start"], F.linear(x_in, sd["word_embed.weight"], sd["word_embed.bias"])], 1)
    x = x + (sd["lvl_embed.weight"][sd["lvl_1L"][0]][None] + sd["pos_1LC"])
    b, n, _ = x.shape
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        ada = F.linear(F.silu(cond), sd[p + "ada_lin.1.weight"], sd[p + "ada_lin.1.bias"]).view(-1, 1, 6, c)
        g1, g2, s1, s2, b1, b2 = ada.unbind(2)
        h = F.layer_norm(x, (c,), eps=eps) * (1 + s1) + b1
        bias = torch.cat([sd[p + "attn.q_bias"], sd[p + "attn.zero_k_bias"], sd[p + "attn.v_bias"]])
        q, k, v = F.linear(h, sd[p + "attn.mat_qkv.weight"], bias).view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q = F.normalize(q, dim=-1) * sd[p + "attn.scale_mul_1H11"].clamp_max(math.log(100)).exp()
        k = F.normalize(k, dim=-1)
        att = ((q @ k.transpose(-1, -2)) + sd["attn_bias_for_masking"]).softmax(-1) @ v
        x = (
            x
            + F.linear(att.transpose(1, 2).reshape(b, n, c), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"]) * g1
        )
        h = F.layer_norm(x, (c,), eps=eps) * (1 + s2) + b2
        h = F.gelu(F.linear(h, sd[p + "ffn.fc1.weight"], sd[p + "ffn.fc1.bias"]), approximate="tanh")
        x = x + F.linear(h, sd[p + "ffn.fc2.weight"], sd[p + "ffn.fc2.bias"]) * g2
    scale, shift = (
        F.linear(F.silu(cond), sd["head_nm.ada_lin.1.weight"], sd["head_nm.ada_lin.1.bias"]).view(-1, 1, 2, c).unbind(2)
    )
    h = F.layer_norm(x, (c,), eps=eps) * (1 + scale) + shift
    return F.linear(h, sd["head.weight"], sd["head.bias"])


def test_converter_on_the_official_key_layout():
    sd = official_var_state_dict()
    model = convert_var_transformer(sd)
    cfg = model.config
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.num_classes, tuple(cfg.patch_nums)) == (2, 32, 2, 3, PN)
    labels, x_in = torch.tensor([2, 0]), torch.randn(2, 20, 4)
    with torch.no_grad():
        ours = model(labels, x_in)
    torch.testing.assert_close(ours, reference_var_logits(sd, labels, x_in, heads=2), rtol=0, atol=2e-5)

    vsd = official_vae_state_dict()
    vae = convert_var_vae(vsd, patch_nums=(1, 2, 4))
    assert tuple(vae.config.block_out_channels) == (32, 64) and vae.config.share_quant_resi == 4
    w = vsd["encoder.mid.attn_1.qkv.weight"]  # the fused 1x1 qkv conv is split in q, k, v order
    torch.testing.assert_close(vae.encoder.mid_block.attentions[0].to_k.weight, w[64:128, :, 0, 0])
    torch.testing.assert_close(
        vae.decoder.up_blocks[0].attentions[1].to_out[0].weight, vsd["decoder.up.1.attn.1.proj_out.weight"][..., 0, 0]
    )
    torch.testing.assert_close(vae.quantize.phi[3].weight, vsd["quantize.quant_resi.qresi_ls.3.weight"])
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    assert vae.reconstruct(x).shape == (1, 3, 8, 8)

    pipe = convert_var_pipeline(vsd, sd, id2label={"0": "a", "1": "b", "2": "c"})
    assert isinstance(pipe, VARPipeline) and pipe.default_size() == 8

    with pytest.raises(KeyMismatchError, match="blocks.0.attn.extra"):
        convert_var_transformer({**sd, "blocks.0.attn.extra": torch.zeros(1)})
    broken = {k: v for k, v in sd.items() if k != "blocks.1.ffn.fc2.bias"}
    with pytest.raises(KeyMismatchError, match="blocks.1.ffn.fc2.bias"):
        convert_var_transformer(broken)
    with pytest.raises(KeyMismatchError, match="decoder.up.0.block.1.conv2.weight"):
        convert_var_vae({k: v for k, v in vsd.items() if k != "decoder.up.0.block.1.conv2.weight"}, (1, 2, 4))
    assert patch_nums_from_levels(level_ids(PATCH_NUMS[512])) == PATCH_NUMS[512]
    assert var_config(36)["shared_aln"] and var_config(16)["embed_dim"] == 1024


def test_converter_reads_a_weights_only_file(tmp_path):
    path = tmp_path / "var_tiny.pth"
    torch.save(official_var_state_dict(), path)
    model = convert_var_transformer(path)
    assert model.config.depth == 2
    shared = official_var_state_dict(seed=1)
    for i in range(2):  # the d36 layout: per-block ada_gss + one shared_ada_lin
        shared.pop(f"blocks.{i}.ada_lin.1.weight"), shared.pop(f"blocks.{i}.ada_lin.1.bias")
        shared[f"blocks.{i}.ada_gss"] = torch.randn(1, 1, 6, 32)
    shared["shared_ada_lin.1.weight"], shared["shared_ada_lin.1.bias"] = torch.randn(6 * 32, 32), torch.randn(6 * 32)
    model = convert_var_transformer(shared)
    assert model.config.shared_aln
    torch.testing.assert_close(model.blocks[1].scale_shift_table, shared["blocks.1.ada_gss"][0, 0])


# ---------------------------------------------------------------------------------------------- the pipeline


def test_pipeline_seeds_records_callbacks_and_errors(pipe):
    out = pipe(
        ["smileys", 2], num_images_per_prompt=2, seed=10, num_inference_steps=20, scheduler="ddim", output_type="np"
    )
    assert out.images.shape == (4, 8, 8, 3) and out.seeds == [10, 11, 12, 13]
    rec = out.records[3]
    assert (rec.class_label, rec.seed, rec.steps, rec.scheduler, rec.width) == (2, 13, 3, "next-scale", 8)
    assert rec.extra == {"top_k": 900, "top_p": 0.95} and rec.pipeline == "class-to-image"
    alone = pipe(2, seed=13, output_type="np")  # image i depends only on its own seed
    np.testing.assert_allclose(alone.images[0], out.images[3], atol=1e-6)
    again = pipe(**rec.to_call_kwargs(), output_type="np")  # a record reproduces its image
    np.testing.assert_allclose(again.images[0], out.images[3], atol=1e-6)

    calls = []

    def stop_after_two(p, i, t, tensors):
        calls.append((i, t, tuple(tensors["latents"].shape)))
        if i == 1:
            p.request_interrupt()
        return {}

    out = pipe(0, seed=1, callback_on_step_end=stop_after_two)
    assert out.interrupted and calls == [(0, 1, (1, 4, 4, 4)), (1, 2, (1, 4, 4, 4))]
    assert not pipe(0, seed=1).interrupted

    logits = torch.tensor([[[0.0, 1.0, 2.0, 3.0]]])
    assert torch.isinf(filter_top_k_top_p(logits, top_k=2)).tolist() == [[[True, True, False, False]]]
    assert torch.isinf(filter_top_k_top_p(logits, top_p=0.5)).sum() == 3
    for kwargs, match in (
        ({"height": 16}, "trained size"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"image": Image.new("RGB", (8, 8))}, "both image and mask_image"),
        ({"scheduler": "warp-drive"}, "Unknown scheduler"),
    ):
        with pytest.raises(InputError, match=match):
            pipe(0, **kwargs)
    with pytest.raises(InputError, match="unknown class"):
        pipe("spaceships")


def test_zero_shot_editing_teacher_forces_the_known_tokens(pipe):
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    keep_all = Image.new("L", (8, 8), 0)  # black: nothing to regenerate -> every scale takes the image's tokens
    out = pipe(1, seed=3, image=source, mask_image=keep_all, output_type="pt")
    pixels = pipe.image_processor.preprocess(source, height=8, width=8)
    torch.testing.assert_close(out.images, (pipe.vae.reconstruct(pixels) / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-5)
    assert out.records[0].extra["_edit"]["masked_tokens"] == 0

    half = np.zeros((8, 8), np.uint8)
    half[:, 4:] = 255  # regenerate the right half (out-/in-painting)
    seen = []
    pipe(1, seed=3, image=source, mask_image=Image.fromarray(half), output_type="latent",
         callback_on_step_end=lambda p, i, t, d: seen.append(d["latents"].clone()) or {})  # fmt: skip
    masks = pipe.edit_masks(Image.fromarray(half), 1, 8)
    assert masks[0].min() == 1  # one-token scales always come from the image
    assert masks[-1][0, 0, :, :2].min() == 1 and masks[-1][0, 0, :, 2:].max() == 0
    assert len(seen) == 3
    # the last scale's codes in the kept columns are the image's own: phi(h) in column 0 sees only kept tokens
    quant = pipe.vae.quantize
    src = quant.embedding(pipe.vae.image_to_ids(pixels)[-1]).transpose(1, 2).reshape(1, 4, 4, 4)
    torch.testing.assert_close((seen[-1] - seen[-2])[..., 0], quant.phi_for(2)(src)[..., 0], rtol=0, atol=1e-5)
    assert (seen[-1] - seen[-2] - quant.phi_for(2)(src))[..., 3].abs().max() > 1e-3  # the rest was regenerated


def test_saved_pipeline_loads_through_the_registry_and_serves_the_ui(pipe, tmp_path):
    from pipelines import load_pipeline
    from pipelines.catalog import Catalog
    from pipelines.service import GenerationRequest, GenerationService, model_spec

    pipe.save_pretrained(tmp_path / "models" / "tiny-var")
    loaded = load_pipeline(tmp_path / "models" / "tiny-var")
    assert isinstance(loaded, VARPipeline) and loaded.get_label_ids("animals") == [1]
    a = pipe(1, seed=4, output_type="np").images
    np.testing.assert_allclose(loaded(1, seed=4, output_type="np").images, a, atol=1e-6)

    catalog = Catalog(roots=[tmp_path / "models"])
    spec = model_spec(catalog.get("tiny-var"))
    assert (spec.kind, spec.default_size, spec.multiple, spec.num_classes) == ("class-to-image", 8, 2, 3)
    service = GenerationService(catalog, output_dir=tmp_path / "out")
    job = service.submit(
        GenerationRequest(
            model="tiny-var", class_label="animals", steps=20, seed=4, guidance_scale=4.0, kind="class-to-image"
        )
    )
    totals = {event.total for event in job.events() if hasattr(event, "total")}
    result = job.wait(60)
    assert len(result.paths) == 1 and result.records[0].steps == 3
    # the form's 20 steps became VAR's 3 scales before the job started: progress counts the steps that run
    assert totals == {3} and (result.steps_done, result.steps_total) == (3, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(result.paths[0])), (a[0] * 255).round().astype(np.uint8))
    assert (spec.fixed_steps, spec.min_side, spec.max_side) == (3, 8, 8)  # the UI offers only these
    with pytest.raises(InputError, match="generates only 8x8 images"):
        service.validate(GenerationRequest(model="tiny-var", class_label=0, width=16))
    assert service.validate(GenerationRequest(model="tiny-var", class_label=0, scheduler="ddim")).scheduler is None

    import app

    demo = app.build_demo(service)  # the class tab opens on VAR: a fixed steps slider and a one-size range
    sliders = {c.label: c for c in demo.blocks.values() if type(c).__name__ == "Slider"}
    assert (sliders["Steps"].value, sliders["Steps"].interactive) == (3, False)
    assert (sliders["Width"].value, sliders["Width"].maximum, sliders["Width"].interactive) == (8, 8, False)


# ---------------------------------------------------------------------------------------------- training


def test_training_both_stages(tmp_path):
    from training.train_var import build_trainer, load_var_config

    root = tmp_path / "data"
    root.mkdir()
    rows = []
    rng = np.random.default_rng(0)
    for i in range(8):
        arr = np.zeros((8, 8, 3), np.uint8)
        arr[..., i % 2] = 200
        arr[2:6, 2:6] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(root / f"{i}.png")
        rows.append(f'{{"file_name": "{i}.png", "label": {i % 2}}}')
    (root / "metadata.jsonl").write_text("\n".join(rows))
    common = [f"data.root={root}", "data.resolution=8", "optim.batch_size=4", "optim.max_steps=3", "log_every=1",
              "tensorboard=false", "checkpoint.every=0", "validation.every=0"]  # fmt: skip
    vq = load_var_config(None, [*common, "stage=vqvae", f"output_dir={tmp_path / 'vq'}", "loss.restart_every=2",
                               "vqvae={block_out_channels: [8, 16], layers_per_block: 1, latent_channels: 4, "
                               "vocab_size: 32, norm_num_groups: 4, patch_nums: [1, 2, 4]}"])  # fmt: skip
    assert build_trainer(vq).train(resume="none") == tmp_path / "vq" / "vqvae"
    usage = (tmp_path / "vq" / "codebook.jsonl").read_text().splitlines()
    assert len(usage) == 3 and "usage_per_scale" in usage[0]
    stage2 = [*common, "stage=var", f"output_dir={tmp_path / 'var'}", f"vqvae_path={tmp_path / 'vq'}"]
    var = load_var_config(None, [*stage2, "model={depth: 1, embed_dim: 32, num_heads: 2}"])
    target = build_trainer(var).train(resume="none")
    losses = [
        float(line.split('"loss": ')[1].rstrip("}"))
        for line in (tmp_path / "var" / "losses.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 3 and abs(losses[0] - math.log(32)) < 1.0  # cross-entropy starts near ln(vocab)
    from pipelines import load_pipeline

    out = load_pipeline(target)([0, 1], seed=0, output_type="np")
    assert out.images.shape == (2, 8, 8, 3)
    assert (target / "vqvae_training_config.yaml").is_file()
