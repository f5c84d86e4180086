"""VDT: backbone attention structure, unified masks, pipeline, converter, video I/O, training, evaluation, UI.

Tiny models only (a few thousand parameters), so the file runs in well under a minute on a shared 2-core CPU.
"""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from dit.convert.common import KeyMismatchError
from dit.convert.vdt_original import convert_vdt_original
from dit.embeddings import sincos_1d, sincos_2d
from dit.models.vdt import VDTModel, vdt_config
from dit.video_masks import (
    TEMPORAL_TYPES,
    VideoMaskGenerator,
    apply_mask,
    block_mask,
    given_frames,
    task_mask,
)
from pipelines.errors import InputError
from pipelines.video import VideoPipeline


def tiny_vdt(frames: int = 4, size: int = 8, seed: int = 0, learn_sigma: bool = False) -> VDTModel:
    torch.manual_seed(seed)
    model = VDTModel(
        sample_size=size,
        num_frames=frames,
        patch_size=2,
        in_channels=3,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        learn_sigma=learn_sigma,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random init zeroes adaLN and the output: perturb so every path matters
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def tiny_pipe(frames: int = 4, size: int = 8) -> VideoPipeline:
    pipe = VideoPipeline(transformer=tiny_vdt(frames, size), scheduler=DPMSolverMultistepScheduler(), fps=4)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_frames(n: int, size: int = 8, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- backbone


def test_configs_and_shapes():
    assert vdt_config("VDT-S/2")["num_layers"] == 12 and vdt_config("VDT-L/2")["attention_head_dim"] == 72
    with pytest.raises(ValueError, match="valid names"):
        vdt_config("VDT-XL/2")
    model = tiny_vdt(learn_sigma=True)
    out = model(torch.randn(2, 3, 4, 8, 8), torch.tensor([3, 900])).sample
    assert out.shape == (2, 6, 4, 8, 8)
    # Other frame counts use the computed time table (the original's is fixed-size).
    assert model(torch.randn(1, 3, 6, 8, 8), 5).sample.shape == (1, 6, 6, 8, 8)
    with pytest.raises(ValueError, match="frames, height, width"):
        model(torch.randn(1, 3, 8, 8), 1)


def test_temporal_attention_mixes_across_frames_only_spatial_within_a_frame():
    block = tiny_vdt().transformer_blocks[0]
    b, t, n, d = 2, 4, 16, block.temporal_fc.in_features
    x = torch.randn(b * t, n, d)
    x2 = x.clone()
    x2[1 * t + 2, 5] += torch.randn(d)  # video 1, frame 2, token 5 (not a constant: LayerNorm would remove it)
    with torch.no_grad():
        dt = (block.temporal(x2, t) - block.temporal(x, t)).reshape(b, t, n, d).abs().sum(-1)
        cond = torch.randn(b, d).repeat_interleave(t, 0)
        ds = super(type(block), block).forward(x2, cond) - super(type(block), block).forward(x, cond)
        ds = ds.reshape(b, t, n, d).abs().sum(-1)
    # temporal: only token 5 of video 1 changes, in every frame
    assert (dt[1, :, 5] > 1e-4).all()
    assert dt[0].sum() == 0 and dt[1, :, [i for i in range(n) if i != 5]].sum() == 0
    # spatial (+ MLP): only frame 2 of video 1 changes, at every token
    assert (ds[1, 2] > 1e-4).all()
    assert ds[0].sum() == 0 and ds[1, [0, 1, 3]].sum() == 0


def test_spatial_processor_gets_the_token_grid():
    seen = []

    class Recording:
        needs_token_grid = True

        def __call__(self, attn, hidden_states, token_grid=None, **kwargs):
            from diffusers.models.attention_processor import AttnProcessor2_0

            seen.append((tuple(hidden_states.shape), token_grid))
            return AttnProcessor2_0()(attn, hidden_states, **kwargs)

    model = tiny_vdt()
    for block in model.transformer_blocks:
        block.attn1.set_processor(Recording())
    x = torch.randn(2, 3, 4, 8, 12)
    model(x, 10)
    assert seen == [((8, 24, 16), (1, 4, 6))] * 2  # per frame: (B*T, h*w, D), one frame's grid
    seen.clear()
    model.register_to_config(spatial_attention_scope="video")
    model(x, 10)
    assert seen == [((2, 96, 16), (4, 4, 6))] * 2  # the whole clip: (B, T*h*w, D), (T, h, w)


def test_efficient_attention_variants_plug_into_the_spatial_attention():
    attention = pytest.importorskip("dit.attention")
    model, x = tiny_vdt(), torch.randn(1, 3, 4, 8, 8)
    with torch.no_grad():
        full = model(x, 10).sample
        attention.set_attention(model, "window", window_size=4)  # a window the size of the frame = full attention
        torch.testing.assert_close(model(x, 10).sample, full, atol=1e-5, rtol=1e-4)
        attention.set_attention(model, "proxy", window_size=2)
        assert model(x, 10).sample.shape == full.shape
        model.register_to_config(spatial_attention_scope="video")  # proxies of every frame's windows
        assert torch.isfinite(model(x, 10).sample).all()


# ---------------------------------------------------------------------------------------------- masks


def test_task_masks():
    t, h, w = 8, 2, 2

    def frames(m):
        return [bool(m[i].all()) for i in range(t)]  # True = frame generated

    assert frames(task_mask("unconditional", t, h, w)) == [True] * 8
    assert frames(task_mask("predict", t, h, w)) == [False] * 4 + [True] * 4
    assert frames(task_mask("predict", t, h, w, num_given=2)) == [False] * 2 + [True] * 6
    assert frames(task_mask("backward", t, h, w, num_given=3)) == [True] * 5 + [False] * 3
    assert given_frames(task_mask("interpolate", t, h, w)) == [0, 2, 4, 6]
    assert given_frames(task_mask("interpolate", t, h, w, stride=3)) == [0, 3, 6]
    assert given_frames(task_mask("animate", t, h, w, frame_index=5)) == [5]
    m = task_mask("complete", t, 8, 8)  # default: a centred box of about half the area
    assert m[:, 1:7, 1:7].all() and (~m[:, 0]).all() and (~m[:, :, 7]).all() and m.sum() == 36 * t
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[:, :8] = True  # pixel-resolution region -> 4x4 latent grid
    assert task_mask("complete", t, 4, 4, region=region)[0].tolist() == [[True, True, False, False]] * 4
    for bad in (dict(task="predict", num_given=8), dict(task="interpolate", stride=1), dict(task="nope")):
        with pytest.raises(ValueError):
            task_mask(num_frames=t, height=h, width=w, **bad)
    x0, xt = torch.zeros(1, 3, t, h, w), torch.ones(1, 3, t, h, w)
    mixed = apply_mask(x0, xt, task_mask("predict", t, h, w)[None])
    assert mixed[:, :, :4].sum() == 0 and (mixed[:, :, 4:] == 1).all()


def test_training_generator_fixes_the_official_bugs():
    g = torch.Generator().manual_seed(0)
    gen = VideoMaskGenerator(4, 8, 8, granularity=2, spatial_prob=1.0)
    for _ in range(60):  # official: e == 0 gave mask[s:-0] = nothing masked, a quarter of the time
        m = gen.spatial(g)
        assert m.any()
        gen_frames = [i for i in range(4) if m[i].any()]
        assert gen_frames == list(range(gen_frames[0], gen_frames[-1] + 1))  # [s, T - e)
    masks = gen(8, generator=g)
    assert masks.shape == (8, 4, 8, 8)
    cells = masks.reshape(8, 4, 4, 2, 4, 2)  # patch granularity: each 2x2 latent cell is all or nothing
    assert (cells.all(dim=(3, 5)) == cells.any(dim=(3, 5))).all()
    short = VideoMaskGenerator(2, 4, 4, spatial_prob=0.0, temporal_weights=[0, 0, 0, 0, 0, 1], random_frame_prob=0.05)
    assert all(short(1, generator=g).any() for _ in range(50))  # "nothing generated" is redrawn
    mix = VideoMaskGenerator(16, 4, 4)
    kinds = [mix.draw(g)[1] for _ in range(600)]
    assert 0.13 < kinds.count("spatial") / 600 < 0.27
    assert set(kinds) == {"spatial", *TEMPORAL_TYPES}
    assert given_frames(mix.temporal("predict")) == list(range(8))  # the paper's 8 of 16
    assert given_frames(mix.temporal("interpolate")) == [0, 4, 8, 12]
    assert block_mask(8, 8, 32, g).sum() >= 16


# ---------------------------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize(
    "task,kwargs,placement",
    [
        ("predict", {}, {0: 2, 1: 3}),  # the clip's last 2 frames start the video
        ("backward", {"num_given": 1}, {3: 0}),
        ("interpolate", {}, {0: 0, 2: 2}),  # full clip: every 2nd frame kept
        ("animate", {"frame_index": 2}, {2: 0}),
    ],
)
def test_given_frames_come_back_unchanged(task, kwargs, placement):
    pipe = tiny_pipe()
    video = random_frames(4)
    out = pipe(task=task, video=video, num_inference_steps=3, seed=0, **kwargs)
    assert out.given == sorted(placement)
    for pos, src in placement.items():
        assert np.array_equal(np.asarray(out.frames[0][pos]), np.asarray(video[src])), (task, pos)
    assert out.records[0].extra["task"] == task and out.records[0].pipeline == "video"
    generated = [i for i in range(4) if i not in placement]
    assert not np.array_equal(np.asarray(out.frames[0][generated[0]]), np.asarray(video[generated[0]]))


@pytest.mark.parametrize(
    "task,kwargs",
    [("predict", {}), ("backward", {"num_given": 1}), ("interpolate", {}), ("animate", {"frame_index": 2})],
)
def test_aligned_video_lines_the_output_up_with_a_reference_clip(task, kwargs):
    """Evaluation and validation strips score output frame i against reference frame i."""
    from pipelines.video import aligned_video

    ref = random_frames(4)
    out = tiny_pipe()(
        task=task,
        video=aligned_video(task, ref, kwargs.get("num_given"), kwargs.get("frame_index", 0)),
        num_inference_steps=2,
        seed=0,
        **kwargs,
    )
    assert out.given
    for j in out.given:
        assert np.array_equal(np.asarray(out.frames[0][j]), np.asarray(ref[j])), (task, j)


def test_completion_keeps_pixels_outside_the_region_and_seeds_reproduce():
    pipe = tiny_pipe()
    video = random_frames(4, seed=1)
    out = pipe(task="complete", video=video, num_inference_steps=3, seed=7, num_videos=2)
    region = out.mask[0]
    for i in range(4):
        got, want = np.asarray(out.frames[0][i]), np.asarray(video[i])
        keep = ~region.repeat_interleave(1, 0).numpy()
        assert np.array_equal(got[keep], want[keep])
    assert out.seeds == [7, 8]
    again = pipe(task="complete", video=video, num_inference_steps=3, seed=8)
    assert np.array_equal(np.asarray(again.frames[0][1]), np.asarray(out.frames[1][1]))
    kwargs = out.records[1].to_call_kwargs(accepted=set(inspect.signature(pipe.__call__).parameters))
    assert kwargs["task"] == "complete" and kwargs["seed"] == 8


def test_pipeline_input_errors():
    pipe = tiny_pipe()
    with pytest.raises(InputError, match="needs given frames"):
        pipe(task="predict", num_inference_steps=2)
    with pytest.raises(InputError, match="at least 3 frames"):
        pipe(task="predict", video=random_frames(2), num_given=3, num_inference_steps=2)
    with pytest.raises(InputError, match="keyframes"):
        pipe(task="interpolate", video=random_frames(1), num_inference_steps=2)
    with pytest.raises(InputError, match="unknown task"):
        pipe(task="dance", video=random_frames(4), num_inference_steps=2)
    with pytest.raises(InputError, match="num_frames"):
        pipe(task="unconditional", num_frames=1, num_inference_steps=2)
    out = pipe(task="unconditional", num_inference_steps=2, seed=0, output_type="np", height=8, width=8)
    assert out.frames.shape == (1, 4, 8, 8, 3) and out.given == []
    # An x0-predicting model (the shipped default) with a sampler that cannot step x0: refused before sampling.
    pipe.scheduler = DPMSolverMultistepScheduler(prediction_type="sample")
    with pytest.raises(InputError, match="'euler_a' cannot sample a model that predicts 'sample'. Choose one of: dpm"):
        pipe(task="unconditional", num_inference_steps=2, scheduler="euler_a")
    assert pipe(task="unconditional", num_inference_steps=2, scheduler="ddpm", output_type="np").frames.shape[1] == 4


def test_save_load_through_registry(tmp_path):
    from pipelines.catalog import Catalog
    from pipelines.loading import load_pipeline

    tiny_pipe().save_pretrained(tmp_path / "tiny-video")
    catalog = Catalog(roots=[tmp_path])
    assert catalog.get("tiny-video").kind == "video"
    pipe = load_pipeline("tiny-video", catalog=catalog)
    assert isinstance(pipe, VideoPipeline) and pipe.num_frames == 4 and pipe.config.fps == 4


# ---------------------------------------------------------------------------------------------- converter


def _timm_attention(x, qkv_w, qkv_b, proj_w, proj_b, heads):
    b, n, d = x.shape
    qkv = F.linear(x, qkv_w, qkv_b).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1)) * (d // heads) ** -0.5
    return F.linear((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d), proj_w, proj_b)


def official_vdt_forward(sd, x, t, heads, patch):
    """The math of RERV/VDT ``VDT.forward`` in eval mode, written out on the official state dict.

    ``x`` is (B, T, C, H, W) as the original takes it; the label is always 0.
    """
    b, frames, c, h, w = x.shape
    x = F.conv2d(x.reshape(b * frames, c, h, w), sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + sd["pos_embed"]
    n, d = x.shape[1:]
    x = x.reshape(b, frames, n, d).transpose(1, 2).reshape(b * n, frames, d) + sd["time_embed"]
    x = x.reshape(b, n, frames, d).transpose(1, 2).reshape(b * frames, n, d)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    tf = torch.cat([torch.cos(args), torch.sin(args)], -1)
    temb = F.linear(F.silu(F.linear(tf, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                    sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])  # fmt: skip
    cond = temb + sd["y_embedder.embedding_table.weight"][0]

    def modulate(z, shift, scale):  # per video, broadcast over its T*N tokens
        z = z.reshape(b, frames * n, d) * (1 + scale[:, None]) + shift[:, None]
        return z.reshape(b * frames, n, d)

    def gate(z, g):
        return (g[:, None] * z.reshape(b, frames * n, d)).reshape(b * frames, n, d)

    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(depth):
        p = f"blocks.{i}."
        mod = F.linear(F.silu(cond), sd[p + "adaLN_modulation.1.weight"], sd[p + "adaLN_modulation.1.bias"])
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=1)
        xt = x.reshape(b, frames, n, d).transpose(1, 2).reshape(b * n, frames, d)
        xt = F.layer_norm(xt, (d,), sd[p + "temporal_norm1.weight"], sd[p + "temporal_norm1.bias"], 1e-5)
        ta = [sd[p + f"temporal_attn.{n}"] for n in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias")]
        res = _timm_attention(xt, *ta, heads)
        res = res.reshape(b, n, frames, d).transpose(1, 2).reshape(b * frames, n, d)
        x = x + F.linear(res, sd[p + "temporal_fc.weight"], sd[p + "temporal_fc.bias"])
        sa = [sd[p + f"attn.{n}"] for n in ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias")]
        a = _timm_attention(modulate(F.layer_norm(x, (d,), eps=1e-6), sh1, sc1), *sa, heads)
        x = x + gate(a, g1)
        hdn = F.gelu(F.linear(modulate(F.layer_norm(x, (d,), eps=1e-6), sh2, sc2), sd[p + "mlp.fc1.weight"],
                              sd[p + "mlp.fc1.bias"]), approximate="tanh")  # fmt: skip
        x = x + gate(F.linear(hdn, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"]), g2)
    shift, scale = F.linear(F.silu(cond), sd["final_layer.adaLN_modulation.1.weight"],
                            sd["final_layer.adaLN_modulation.1.bias"]).chunk(2, dim=1)  # fmt: skip
    x = F.linear(modulate(F.layer_norm(x, (d,), eps=1e-6), shift, scale),
                 sd["final_layer.linear.weight"], sd["final_layer.linear.bias"])  # fmt: skip
    side = h // patch
    out_c = x.shape[-1] // (patch * patch)
    x = x.reshape(b * frames, side, side, patch, patch, out_c)
    x = torch.einsum("nhwpqc->nchpwq", x).reshape(b * frames, out_c, h, w)
    return x.reshape(b, frames, out_c, h, w)


def official_state_dict(frames=3, size=8, patch=2, c=4, d=16, depth=2, seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    sd = {
        "x_embedder.proj.weight": r(d, c, patch, patch),
        "x_embedder.proj.bias": r(d),
        "pos_embed": sincos_2d(d, (size // patch, size // patch))[None],
        "time_embed": sincos_1d(d, torch.arange(frames)).float()[None],
        "t_embedder.mlp.0.weight": r(d, 256),
        "t_embedder.mlp.0.bias": r(d),
        "t_embedder.mlp.2.weight": r(d, d),
        "t_embedder.mlp.2.bias": r(d),
        "y_embedder.embedding_table.weight": r(1001, d),
        "final_layer.linear.weight": r(patch * patch * 2 * c, d),
        "final_layer.linear.bias": r(patch * patch * 2 * c),
        "final_layer.adaLN_modulation.1.weight": r(2 * d, d),
        "final_layer.adaLN_modulation.1.bias": r(2 * d),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        for name, shape in {
            "attn.qkv": (3 * d, d),
            "attn.proj": (d, d),
            "mlp.fc1": (4 * d, d),
            "mlp.fc2": (d, 4 * d),
            "adaLN_modulation.1": (6 * d, d),
            "temporal_attn.qkv": (3 * d, d),
            "temporal_attn.proj": (d, d),
            "temporal_fc": (d, d),
        }.items():
            sd[p + name + ".weight"], sd[p + name + ".bias"] = r(*shape), r(shape[0])
        sd[p + "temporal_norm1.weight"], sd[p + "temporal_norm1.bias"] = 1 + r(d), r(d)
    return sd


def test_converter_reproduces_the_official_forward(tmp_path):
    sd = official_state_dict()
    model = convert_vdt_original(sd, num_heads=2)
    cfg = model.config
    assert (cfg.num_frames, cfg.sample_size, cfg.num_layers, cfg.learn_sigma) == (3, 8, 2, True)
    x = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(1))  # (B, T, C, H, W)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        want = official_vdt_forward(sd, x, t, heads=2, patch=2)
        got = model(x.transpose(1, 2), t).sample.transpose(1, 2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # A file on disk (official {"model": ...} wrapping, torch zip) converts the same way.
    torch.save({"model": sd}, tmp_path / "vdt.pt")
    again = convert_vdt_original(tmp_path / "vdt.pt", num_heads=2)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_converter_is_strict():
    sd = official_state_dict()
    with pytest.raises(KeyMismatchError, match="blocks.0.extra"):
        convert_vdt_original({**sd, "blocks.0.extra.weight": torch.zeros(1)}, num_heads=2)
    missing = {k: v for k, v in sd.items() if k != "blocks.1.temporal_fc.bias"}
    with pytest.raises(KeyMismatchError, match="temporal_fc.bias"):
        convert_vdt_original(missing, num_heads=2)
    with pytest.raises(ValueError, match="time_embed is not the fixed"):
        convert_vdt_original({**sd, "time_embed": sd["time_embed"] + 0.5}, num_heads=2)
    with pytest.raises(ValueError, match="does not match config VDT-S/2"):
        convert_vdt_original(sd, config_name="VDT-S/2")


# ---------------------------------------------------------------------------------------------- video I/O


def test_video_writer_round_trip(tmp_path):
    from pipelines.metadata import GenerationRecord
    from pipelines.video_io import read_record_json, read_video, save_video

    palette = np.array([[255, 255, 255], [200, 30, 30], [20, 40, 220], [0, 0, 0]], dtype=np.uint8)
    rng = np.random.default_rng(0)
    # 4x4-pixel blocks of 4 colours: exact in a GIF, and H.264's 2x2 chroma subsampling keeps them nearly so
    frames = [Image.fromarray(palette[rng.integers(0, 4, (4, 6))]).resize((24, 16), Image.NEAREST) for _ in range(5)]
    record = GenerationRecord(pipeline="video", model="tiny", seed=3, extra={"task": "predict", "fps": 5.0})
    written = save_video(frames, tmp_path / "clip", record, fps=5, formats=("mp4", "gif"))
    back, fps = read_video(written["gif"])
    assert fps == pytest.approx(5, rel=0.05) and len(back) == 5
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back, frames))  # GIF: exact
    back, fps = read_video(written["mp4"])
    assert len(back) == 5 and back[0].size == (24, 16) and fps == pytest.approx(5)
    assert min(10 * np.log10(255**2 / np.mean((np.asarray(a, float) - np.asarray(b, float)) ** 2))
               for a, b in zip(back, frames)) > 25  # fmt: skip  # H.264 yuv420p: lossy
    assert read_record_json(written["mp4"]) == record
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        f.save(folder / f"frame{i * 5}.png")  # natural order: frame5 before frame10
    back, _ = read_video(folder, stride=2)
    assert [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(back, frames[::2])] == [True] * 3
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(InputError, match="could not be decoded"):
        read_video(tmp_path / "bad.mp4")


# ---------------------------------------------------------------------------------------------- data/train/eval


def test_sprites_are_deterministic_and_splits_disjoint(emoji_folder):
    from training.data.video import MovingSpritesDataset, load_sprites

    ds = MovingSpritesDataset(
        num_clips=4, num_frames=5, resolution=24, sprite_size=(8, 10), sprites=load_sprites(emoji_folder, limit=20)
    )
    a, b = ds[2]["pixel_values"], ds[2]["pixel_values"]
    assert a.shape == (3, 5, 24, 24) and torch.equal(a, b) and a.min() >= -1 and a.max() <= 1
    assert not torch.equal(a[:, 0], a[:, 4])  # it moves
    train, test = load_sprites(emoji_folder, "train", limit=30), load_sprites(emoji_folder, "test", limit=3)
    assert {im.tobytes() for im in train}.isdisjoint({im.tobytes() for im in test})


def test_training_resumes_exactly_and_saves_a_pipeline(tmp_path, emoji_folder):
    from training.train_video import VideoTrainer, load_video_config

    def config(out, steps):
        return load_video_config(
            "training/configs/sprites-vdt.yaml",
            [
                f"output_dir={out}",
                f"data.root={emoji_folder}",
                f"optim.max_steps={steps}",
                "optim.batch_size=2",
                "checkpoint.every=2",
                "data.num_clips=8",
                "data.resolution=16",
                "data.num_frames=4",
                "data.sprite_size=[6, 8]",
                "model.num_layers=1",
                "model.attention_head_dim=8",
            ],
        )

    VideoTrainer(config(tmp_path / "a", 4)).train()
    VideoTrainer(config(tmp_path / "b", 2)).train()
    VideoTrainer(config(tmp_path / "b", 4)).train(resume="auto")
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "losses.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "losses.jsonl").read_text().splitlines()]
    assert len(la) == 4 and la == pytest.approx(lb, abs=1e-6)
    pipe = VideoPipeline.from_pretrained(tmp_path / "a" / "pipeline")
    assert pipe.num_frames == 4 and (tmp_path / "a" / "pipeline" / "training_config.yaml").is_file()
    # VDT's sampler: ancestral DDPM clipping x0 to the pixel range, over the training schedule.
    assert type(pipe.scheduler).__name__ == "DDPMScheduler" and pipe.scheduler.config.thresholding
    assert pipe.scheduler.config.prediction_type == "sample"
    with pytest.raises(Exception, match="unknown config key"):
        load_video_config(None, ["masks.typo=1"])
    with pytest.raises(Exception, match="sampler 'euler_a' cannot sample a 'sample' model; choose one of: dpm"):
        load_video_config("training/configs/sprites-vdt.yaml", ["sampler=euler_a"])


def test_metrics_and_baselines():
    from training.evaluate_video import copy_last_frame, evaluate, frechet_distance, linear_blend, psnr, ssim

    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert psnr(x, x).tolist() == [100.0] * 3 and ssim(x, x).allclose(torch.ones(3))
    assert psnr(x, x + 0.1).mean().item() == pytest.approx(20.0, abs=0.01)
    assert ssim(x, 1 - x).mean() < 0.2
    clip = torch.arange(5.0)[:, None, None, None].expand(5, 3, 2, 2)
    assert copy_last_frame(clip, [0, 1])[:, 0, 0, 0].tolist() == [0, 1, 1, 1, 1]
    assert linear_blend(clip, [0, 4])[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]
    rng = np.random.default_rng(0)
    f = rng.normal(size=(200, 4))
    mu, cov = f.mean(0), np.cov(f, rowvar=False)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(mu, cov, mu + 2, cov) == pytest.approx(16, abs=1e-6)
    report = evaluate(tiny_pipe(), [random_frames(4, seed=i) for i in range(2)], steps=2)
    assert set(report["tasks"]["interpolate"]) >= {"model", "copy_last_frame", "linear_blend"}
    # Prediction is given the reference's first frames (evaluate checks the output's given frames against them;
    # handing over the whole clip made the pipeline continue from its last frames, past the reference).
    assert report["tasks"]["predict"]["given_frames"] == [0, 1]
    assert "skipped" in report["fvd"]


def test_video_tab_generates_and_saves(tmp_path):
    import gradio as gr

    from pipelines.catalog import Catalog
    from pipelines.service import GenerationService
    from pipelines.ui_tabs import TabContext, get_tab
    from pipelines.video_io import write_gif
    from pipelines.video_tab import run_video

    tiny_pipe().save_pretrained(tmp_path / "models" / "tiny-video")
    service = GenerationService(Catalog(roots=[tmp_path / "models"]), tmp_path / "out")
    clip = write_gif(random_frames(4), tmp_path / "in.gif", fps=4)
    mp4, gif, seed, status, record = run_video(
        service, "s", "tiny-video", [str(clip)], "predict the next frames", 2, 2, 0, 2, 5, "default"
    )
    assert Path(mp4).is_file() and Path(gif).is_file() and Path(mp4).with_suffix(".json").is_file()
    assert seed == 5 and record["extra"]["task"] == "predict" and "(0, 1 given)" in status
    with pytest.raises(InputError, match="Upload a clip"):
        run_video(service, "s", "tiny-video", None, "animate one image", 2, 2, 0, 2, 5, "default")
    with gr.Blocks():
        handle = get_tab("video").builder(
            TabContext(service=service, kind="video", title="Video", models=["tiny-video"])
        )
    assert len(handle.fill_components) == 7

    # An x0 model (as the shipped default): the menu leaves out the sampler that cannot step it, and a request
    # naming it is refused before any weights load, with the usable ones.
    x0 = tiny_pipe()
    x0.scheduler = DPMSolverMultistepScheduler(prediction_type="sample")
    x0.save_pretrained(tmp_path / "models" / "x0-video")
    service = GenerationService(Catalog(roots=[tmp_path / "models"]), tmp_path / "out")
    from pipelines.video_tab import _scheduler_menu

    assert "euler_a" in _scheduler_menu(service, "tiny-video") and "euler_a" not in _scheduler_menu(service, "x0-video")
    with pytest.raises(
        InputError, match="'euler_a' cannot sample x0-video, which predicts 'sample'; choose one of: dpm"
    ):
        run_video(service, "s", "x0-video", [str(clip)], "predict the next frames", 2, 2, 0, 2, 5, "euler_a")
    assert not service._cache  # refused before loading


def test_video_folder_dataset(tmp_path):
    from pipelines.video_io import write_gif, write_mp4
    from training.data.video import VideoFolderDataset

    write_mp4(random_frames(6, size=16), tmp_path / "a.mp4", fps=4)
    write_gif(random_frames(3, size=16, seed=2), tmp_path / "b.gif", fps=4)
    (tmp_path / "c").mkdir()
    for i, f in enumerate(random_frames(5, size=16, seed=3)):
        f.save(tmp_path / "c" / f"{i:03d}.png")
    ds = VideoFolderDataset(tmp_path, num_frames=2, resolution=8)
    assert [(Path(c.source).name, c.start) for c in ds.clips] == [
        ("a.mp4", 0), ("a.mp4", 2), ("a.mp4", 4), ("b.gif", 0), ("c", 0), ("c", 2)
    ]  # fmt: skip
    item = ds[5]["pixel_values"]
    assert item.shape == (3, 2, 8, 8) and item.min() >= -1 and item.max() <= 1
    assert VideoFolderDataset(tmp_path, num_frames=5, resolution=8).too_short == ["b.gif"]
    with pytest.raises(ValueError, match="no clip of 7 frames"):
        VideoFolderDataset(tmp_path, num_frames=7, resolution=8)


def test_latent_model_with_a_vae_pastes_given_frames_back():
    from tiny_models import tiny_vae

    torch.manual_seed(0)
    transformer = VDTModel(
        sample_size=4, num_frames=4, patch_size=2, in_channels=4, num_layers=1, num_attention_heads=2,
        attention_head_dim=8,
    )  # fmt: skip
    pipe = VideoPipeline(transformer=transformer.eval(), scheduler=DPMSolverMultistepScheduler(), vae=tiny_vae())
    pipe.set_progress_bar_config(disable=True)
    video = random_frames(4, seed=5)
    out = pipe(task="predict", video=video, num_given=1, num_inference_steps=2, seed=0)
    assert out.mask.shape == (4, 4, 4) and out.given == [0]
    assert np.array_equal(np.asarray(out.frames[0][0]), np.asarray(video[3]))  # the clip's last frame starts it
    assert out.frames[0][1].size == (8, 8)
