"""Checkpoint converters: official-layout DiT / PixArt, diffusers DiT, and recognising files by their bytes.

The official-layout checkpoints are built here from scratch: either with random tensors shaped as the
official modules would make them, or from a random model of ours through the INVERSE mapping written
independently below (fused qkv/kv concatenated back, names as in facebookresearch/DiT and PixArt). Converting
those back must reproduce every tensor and the forward output. diffusers' own DiT and PixArt models are the
numerical references for the diffusers layouts.
"""

from __future__ import annotations

import argparse
import pickle
import warnings
import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel
from safetensors.torch import save_file

from dit import DiTModel, TextDiTModel
from dit.convert import (
    CheckpointFormatError,
    KeyMismatchError,
    UnsafeCheckpointError,
    convert_diffusers_dit,
    convert_dit_original,
    convert_pixart_original,
    diffusers_dit_config,
    diffusers_dit_to_ours,
    dit_original_config,
    expect_safetensors,
    interpolation_scale_for,
    load_checkpoint,
    load_strict,
    pixart_original_to_diffusers,
    sniff_format,
)
from dit.convert.__main__ import main as convert_main

# --------------------------------------------------------------------------------------------------------------
# helpers


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Random values in every parameter, including the zero-initialised ones a fresh model has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def mae_sincos(dim: int, grid: int) -> torch.Tensor:
    """MAE/DiT 2D sin-cos table in numpy: first half of channels from the column index, second from the row."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angles = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    table = np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)
    return torch.from_numpy(table).float()[None]


def ours_to_official_dit(sd: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """Inverse of the converter, written independently: DiTModel keys -> facebookresearch/DiT keys."""
    out = {
        "x_embedder.proj.weight": sd["pos_embed.proj.weight"],
        "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
        "pos_embed": mae_sincos(sd["pos_embed.proj.weight"].shape[0], grid),
        "t_embedder.mlp.0.weight": sd["timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": sd["timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": sd["timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": sd["timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": sd["class_embedder.embedding_table.weight"],
        "final_layer.linear.weight": sd["final_layer.linear.weight"],
        "final_layer.linear.bias": sd["final_layer.linear.bias"],
        "final_layer.adaLN_modulation.1.weight": sd["final_layer.adaln_modulation.linear.weight"],
        "final_layer.adaLN_modulation.1.bias": sd["final_layer.adaln_modulation.linear.bias"],
    }
    depth = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    for i in range(depth):
        b = f"transformer_blocks.{i}."
        for s in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{s}"] = torch.cat([sd[f"{b}attn1.to_{n}.{s}"] for n in "qkv"], dim=0)
            out[f"blocks.{i}.attn.proj.{s}"] = sd[f"{b}attn1.to_out.0.{s}"]
            out[f"blocks.{i}.mlp.fc1.{s}"] = sd[f"{b}ff.net.0.proj.{s}"]
            out[f"blocks.{i}.mlp.fc2.{s}"] = sd[f"{b}ff.net.2.{s}"]
            out[f"blocks.{i}.adaLN_modulation.1.{s}"] = sd[f"{b}adaln_modulation.linear.{s}"]
    return {k: v.clone() for k, v in out.items()}


def random_official_dit(
    depth: int = 2, hidden: int = 32, patch: int = 2, in_ch: int = 4, classes: int = 10, grid: int = 4, sigma=True
) -> dict[str, torch.Tensor]:
    """Official DiT state dict from scratch, shapes as models.py's modules make them."""
    out_ch = in_ch * (2 if sigma else 1)
    shapes = {
        "x_embedder.proj.weight": (hidden, in_ch, patch, patch),
        "x_embedder.proj.bias": (hidden,),
        "pos_embed": (1, grid * grid, hidden),
        "t_embedder.mlp.0.weight": (hidden, 256),
        "t_embedder.mlp.0.bias": (hidden,),
        "t_embedder.mlp.2.weight": (hidden, hidden),
        "t_embedder.mlp.2.bias": (hidden,),
        "y_embedder.embedding_table.weight": (classes + 1, hidden),
        "final_layer.linear.weight": (patch * patch * out_ch, hidden),
        "final_layer.linear.bias": (patch * patch * out_ch,),
        "final_layer.adaLN_modulation.1.weight": (2 * hidden, hidden),
        "final_layer.adaLN_modulation.1.bias": (2 * hidden,),
    }
    for i in range(depth):
        for name, (o, n) in {
            "attn.qkv": (3 * hidden, hidden),
            "attn.proj": (hidden, hidden),
            "mlp.fc1": (4 * hidden, hidden),
            "mlp.fc2": (hidden, 4 * hidden),
            "adaLN_modulation.1": (6 * hidden, hidden),
        }.items():
            shapes[f"blocks.{i}.{name}.weight"] = (o, n)
            shapes[f"blocks.{i}.{name}.bias"] = (o,)
    sd = {k: torch.randn(s) * 0.05 for k, s in shapes.items()}
    sd["pos_embed"] = mae_sincos(hidden, grid)
    return sd


def tiny_dit(learn_sigma: bool = True) -> DiTModel:
    return perturb(
        DiTModel(
            sample_size=8,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            num_attention_heads=2,
            attention_head_dim=16,
            num_classes=10,
            learn_sigma=learn_sigma,
        )
    )


def dit_inputs(batch: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, 4, size, size, generator=g), torch.tensor([3.0, 517.0])[:batch], torch.tensor([1, 10])


def ours_to_official_pixart(sd: dict[str, torch.Tensor], tokens: int, grid: int) -> dict[str, torch.Tensor]:
    """Inverse of the PixArt converter, written independently: diffusers names -> PixArt's ``.pth`` names."""
    ren = {
        "pos_embed.proj": "x_embedder.proj",
        "caption_projection.linear_1": "y_embedder.y_proj.fc1",
        "caption_projection.linear_2": "y_embedder.y_proj.fc2",
        "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "adaln_single.emb.resolution_embedder.linear_1": "csize_embedder.mlp.0",
        "adaln_single.emb.resolution_embedder.linear_2": "csize_embedder.mlp.2",
        "adaln_single.emb.aspect_ratio_embedder.linear_1": "ar_embedder.mlp.0",
        "adaln_single.emb.aspect_ratio_embedder.linear_2": "ar_embedder.mlp.2",
        "adaln_single.linear": "t_block.1",
        "proj_out": "final_layer.linear",
    }
    out: dict[str, torch.Tensor] = {"final_layer.scale_shift_table": sd["scale_shift_table"]}
    for ours, theirs in ren.items():
        for s in ("weight", "bias"):
            if f"{ours}.{s}" in sd:
                out[f"{theirs}.{s}"] = sd[f"{ours}.{s}"]
    depth = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    for i in range(depth):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        out[o + "scale_shift_table"] = sd[b + "scale_shift_table"]
        for s in ("weight", "bias"):
            out[f"{o}attn.qkv.{s}"] = torch.cat([sd[f"{b}attn1.to_{n}.{s}"] for n in "qkv"], dim=0)
            out[f"{o}attn.proj.{s}"] = sd[f"{b}attn1.to_out.0.{s}"]
            out[f"{o}cross_attn.q_linear.{s}"] = sd[f"{b}attn2.to_q.{s}"]
            out[f"{o}cross_attn.kv_linear.{s}"] = torch.cat([sd[f"{b}attn2.to_{n}.{s}"] for n in "kv"], dim=0)
            out[f"{o}cross_attn.proj.{s}"] = sd[f"{b}attn2.to_out.0.{s}"]
            out[f"{o}mlp.fc1.{s}"] = sd[f"{b}ff.net.0.proj.{s}"]
            out[f"{o}mlp.fc2.{s}"] = sd[f"{b}ff.net.2.{s}"]
    caption = sd["caption_projection.linear_1.weight"].shape[1]
    hidden = sd["pos_embed.proj.weight"].shape[0]
    out["y_embedder.y_embedding"] = torch.randn(tokens, caption)
    out["pos_embed"] = torch.zeros(1, grid * grid, hidden)
    return {k: v.clone() for k, v in out.items()}


PIXART_TINY = dict(
    sample_size=32,  # 256px
    patch_size=2,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=24,  # hidden 48: divisible by 3 for the size micro-conditions
    caption_channels=20,
)


def pixart_inputs(micro: bool) -> dict:
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(2, 6)
    mask[1, 3:] = 0
    kw = dict(
        hidden_states=torch.randn(2, 4, 32, 32, generator=g),
        encoder_hidden_states=torch.randn(2, 6, 20, generator=g),
        timestep=torch.tensor([10.0, 700.0]),
        encoder_attention_mask=mask,
    )
    if micro:
        kw["added_cond_kwargs"] = {
            "resolution": torch.tensor([[256.0, 256.0], [256.0, 192.0]]),
            "aspect_ratio": torch.tensor([[1.0], [0.75]]),
        }
    else:
        kw["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return kw


class Tripwire:
    """An object whose unpickling would call ``_trip``: weights_only must refuse it before that happens."""

    def __reduce__(self):
        return (_trip, ())


TRIPPED: list[bool] = []


def _trip() -> Tripwire:
    TRIPPED.append(True)
    return Tripwire()


# --------------------------------------------------------------------------------------------------------------
# official DiT


def test_dit_official_roundtrip_every_tensor_and_output():
    model = tiny_dit()
    official = ours_to_official_dit(model.state_dict(), grid=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the stored sin-cos pos_embed must match ours: no warning
        converted = convert_dit_original(official, num_heads=2)
    for key in ("sample_size", "patch_size", "in_channels", "num_layers", "num_attention_heads", "num_classes"):
        assert converted.config[key] == model.config[key], key
    assert converted.config.learn_sigma is True and converted.config.mlp_ratio == 4.0
    ref, got = model.state_dict(), converted.state_dict()
    assert set(ref) == set(got)
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    x, t, y = dit_inputs()
    with torch.no_grad():
        assert torch.allclose(model(x, t, y).sample, converted(x, t, y).sample, atol=1e-6)


def test_dit_config_inference_from_scratch_dict():
    sd = random_official_dit(depth=2, hidden=384, patch=4, grid=8, sigma=False)  # DiT-S width, 256px latent 32
    cfg = dit_original_config(sd)
    assert cfg["num_layers"] == 2 and cfg["patch_size"] == 4 and cfg["sample_size"] == 32
    assert (cfg["num_attention_heads"], cfg["attention_head_dim"]) == (6, 64)
    assert cfg["learn_sigma"] is False and cfg["num_classes"] == 10 and cfg["mlp_ratio"] == 4.0
    with pytest.raises(ValueError, match="512"):
        dit_original_config(sd, image_size=512)
    with pytest.raises(ValueError, match="depth: weights 2, DiT-S/4 12"):
        dit_original_config(sd, config_name="DiT-S/4")
    xl = {k: v for k, v in random_official_dit(depth=1, hidden=1152, grid=2).items()}
    assert dit_original_config(xl)["num_attention_heads"] == 16  # XL: 16 heads of 72, not hidden / 64


def test_dit_strict_check_names_missing_and_extra_keys():
    sd = random_official_dit()
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.attn.rel_pos_h"] = torch.zeros(3)
    with pytest.raises(KeyMismatchError) as e:
        convert_dit_original(sd, num_heads=2)
    assert "blocks.1.mlp.fc2.bias" in str(e.value) and "blocks.0.attn.rel_pos_h" in str(e.value)


def test_load_strict_names_unfilled_and_unknown_target_keys():
    model = tiny_dit()
    sd = dict(model.state_dict())
    sd.pop("final_layer.linear.bias")
    sd["final_layer.bogus"] = torch.zeros(1)
    with pytest.raises(KeyMismatchError, match=r"final_layer\.linear\.bias.*final_layer\.bogus"):
        load_strict(DiTModel(**model.config), sd)


def test_dit_training_checkpoint_ema_choice_and_prefixes(tmp_path):
    raw, ema = random_official_dit(), random_official_dit()
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-4)
    ckpt = {
        "model": {f"module.{k}": v for k, v in raw.items()},
        "ema": OrderedDict((f"_orig_mod.{k}", v) for k, v in ema.items()),
        "opt": opt.state_dict(),
        "args": argparse.Namespace(model="DiT-XL/2", image_size=256, global_batch_size=256),
    }
    torch.save(ckpt, tmp_path / "0050000.pt")
    got = load_checkpoint(tmp_path / "0050000.pt")
    assert set(got) == set(ema) and all(torch.equal(got[k], ema[k]) for k in ema)
    got = load_checkpoint(tmp_path / "0050000.pt", ema=False)
    assert all(torch.equal(got[k], raw[k]) for k in raw)


# --------------------------------------------------------------------------------------------------------------
# diffusers DiT


def tiny_diffusers_dit(out_channels: int | None, seed: int = 0) -> DiTTransformer2DModel:
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=out_channels,
        num_layers=3,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    perturb(model, seed)
    sd = model.state_dict()
    with torch.no_grad():  # as released: every block's embedder copy equals block 0's
        for k, v in sd.items():
            if ".norm1.emb." in k and not k.startswith("transformer_blocks.0."):
                v.copy_(sd["transformer_blocks.0." + k.split(".", 2)[2]])
    return model.eval()


@pytest.mark.parametrize("out_channels", [8, None])
def test_diffusers_dit_matches_diffusers_output(out_channels):
    ref = tiny_diffusers_dit(out_channels)
    sd = ref.state_dict()
    ours = DiTModel(**diffusers_dit_config(sd, dict(ref.config)))
    load_strict(ours, diffusers_dit_to_ours(sd))
    assert ours.config.timestep_freq_shift == 1.0 and ours.config.mlp_norm_eps == 1e-5
    assert ours.config.learn_sigma is (out_channels == 8)
    x, t, y = dit_inputs()
    with torch.no_grad():
        want = ref(x, timestep=t, class_labels=y).sample
        got = ours.eval()(x, t, y).sample
    assert (want - got).abs().max().item() < 1e-5
    # The two knobs are what make it exact: our faithful defaults give a different model.
    faithful = DiTModel(**{**dict(ours.config), "timestep_freq_shift": 0.0, "mlp_norm_eps": 1e-6})
    faithful.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (faithful.eval()(x, t, y).sample - want).abs().max().item() > 1e-5


def test_diffusers_dit_folder_and_unequal_copies_warn(tmp_path):
    ref = tiny_diffusers_dit(8)
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    ours = convert_diffusers_dit(tmp_path / "pipe")
    x, t, y = dit_inputs()
    with torch.no_grad():
        assert (ref(x, timestep=t, class_labels=y).sample - ours(x, t, y).sample).abs().max() < 1e-5
    sd = dict(ref.state_dict())
    sd["transformer_blocks.2.norm1.emb.timestep_embedder.linear_1.bias"] = torch.zeros(32)
    with pytest.warns(UserWarning, match="embedder copies differ"):
        diffusers_dit_to_ours(sd)


# --------------------------------------------------------------------------------------------------------------
# PixArt


@pytest.mark.parametrize("micro", [False, True])
def test_pixart_official_roundtrip_and_diffusers_match(micro):
    model = perturb(TextDiTModel(**PIXART_TINY, interpolation_scale=0.5, use_additional_conditions=micro), seed=3)
    official = ours_to_official_pixart(model.state_dict(), tokens=300, grid=16)  # 300 tokens: PixArt-Sigma
    converted = convert_pixart_original(official, num_heads=2)  # size from pos_embed, version from y_embedding
    assert converted.config.interpolation_scale == 0.5 and converted.config.sample_size == 32
    assert converted.config.use_additional_conditions is micro
    ref, got = model.state_dict(), converted.state_dict()
    assert set(ref) == set(got) and all(torch.equal(ref[k], got[k]) for k in ref)

    diffusers_model = PixArtTransformer2DModel(
        **PIXART_TINY, cross_attention_dim=48, interpolation_scale=0.5, use_additional_conditions=micro
    )
    diffusers_model.load_state_dict(pixart_original_to_diffusers(official), strict=True)
    inputs = pixart_inputs(micro)
    with torch.no_grad():
        want = diffusers_model.eval()(**inputs).sample
        got_ours = converted(**inputs).sample
        got_orig = model(**inputs).sample
    assert (want - got_ours).abs().max().item() < 1e-5
    assert torch.allclose(got_orig, got_ours, atol=1e-6)


def test_pixart_interpolation_tables():
    assert interpolation_scale_for(512, None) == 1.0
    assert interpolation_scale_for(1024, "alpha") == 2.0
    assert interpolation_scale_for(256, "alpha") == 1.0
    assert interpolation_scale_for(256, "sigma") == 0.5
    assert interpolation_scale_for(2048, "sigma") == 4.0
    with pytest.raises(ValueError, match="version"):
        interpolation_scale_for(256, None)
    with pytest.raises(ValueError, match="2048"):
        interpolation_scale_for(2048, "alpha")


def test_pixart_alpha_image_size_and_unsupported_features():
    model = perturb(TextDiTModel(**PIXART_TINY, interpolation_scale=1.0, use_additional_conditions=False))
    official = ours_to_official_pixart(model.state_dict(), tokens=120, grid=16)
    del official["pos_embed"]
    with pytest.raises(ValueError, match="image_size"):
        convert_pixart_original(official, num_heads=2)
    assert convert_pixart_original(official, image_size=256, num_heads=2).config.interpolation_scale == 1.0

    with_qk = dict(official)
    for i in range(2):
        for n in ("q_norm", "k_norm"):
            with_qk[f"blocks.{i}.attn.{n}.weight"] = torch.ones(48)
            with_qk[f"blocks.{i}.attn.{n}.bias"] = torch.zeros(48)
    mapped = pixart_original_to_diffusers(with_qk)
    assert "transformer_blocks.1.attn1.norm_k.bias" in mapped
    with_qk["blocks.0.attn.q_norm.weight"] = torch.full((48,), 2.0)  # non-trivial, so it must reach the model
    sigma_qk = convert_pixart_original(with_qk, image_size=256, num_heads=2)
    block = sigma_qk.transformer_blocks[0]
    assert sigma_qk.config.qk_norm == "layer_norm_across_heads"
    assert isinstance(block.attn1.norm_q, torch.nn.LayerNorm) and block.attn1.norm_q.normalized_shape == (48,)
    assert block.attn1.norm_q.eps == 1e-5 and block.attn2.norm_q is None  # Σ: self-attention only
    torch.testing.assert_close(block.attn1.norm_q.weight, torch.full((48,), 2.0))

    kv = dict(official, **{"blocks.1.attn.sr.weight": torch.zeros(48, 1, 2, 2)})
    with pytest.raises(NotImplementedError, match="KV compression"):
        pixart_original_to_diffusers(kv)


# --------------------------------------------------------------------------------------------------------------
# recognising files by their bytes


def test_pickle_named_safetensors_is_rejected(tmp_path):
    path = tmp_path / "model.safetensors"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointFormatError, match="spoofed"):
        expect_safetensors(path)
    with pytest.raises(CheckpointFormatError, match="spoofed"):
        load_checkpoint(path)


def test_safetensors_named_pt_and_legacy_pickle_load(tmp_path):
    sd = {"a": torch.randn(3, 2), "b": torch.arange(4)}
    save_file(sd, tmp_path / "weights.pt")
    assert sniff_format(tmp_path / "weights.pt") == "safetensors"
    got = load_checkpoint(tmp_path / "weights.pt")
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    expect_safetensors(tmp_path / "weights.pt")

    torch.save({"state_dict": OrderedDict(sd)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    assert sniff_format(tmp_path / "legacy.pth") == "torch_legacy"
    assert torch.equal(load_checkpoint(tmp_path / "legacy.pth")["a"], sd["a"])
    torch.save({"state_dict": OrderedDict(sd)}, tmp_path / "zip.bin")
    assert sniff_format(tmp_path / "zip.bin") == "torch_zip"
    assert torch.equal(load_checkpoint(tmp_path / "zip.bin")["b"], sd["b"])


def test_pickle_with_arbitrary_object_is_refused_without_running_it(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(2), "payload": Tripwire()}, path)
    TRIPPED.clear()
    with pytest.raises(UnsafeCheckpointError, match="arbitrary Python objects") as e:
        load_checkpoint(path)
    assert "safetensors" in str(e.value) and str(path) in str(e.value)
    assert not TRIPPED


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (bytes(range(7, 200)) * 3, "unrecognised bytes"),
        (b"", "empty file"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 12\n", "Git LFS"),
        (pickle.dumps({"w": [1, 2]}, protocol=4), "plain Python pickle"),
        (b"<!DOCTYPE html><html>denied</html>", "HTML"),
    ],
)
def test_non_checkpoints_get_a_clear_error(tmp_path, content, expected):
    path = tmp_path / "DiT-XL-2-256x256.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=expected) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


def test_zip_without_data_pkl_is_not_a_torch_file(tmp_path):
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("arr_0.npy", b"\x93NUMPY")
    with pytest.raises(CheckpointFormatError, match="without data.pkl"):
        sniff_format(path)


# --------------------------------------------------------------------------------------------------------------
# command line


def test_cli_dit_and_pixart(tmp_path, capsys):
    model = tiny_dit()
    official = ours_to_official_dit(model.state_dict(), grid=4)
    torch.save({"model": official, "ema": official, "args": argparse.Namespace(model="tiny")}, tmp_path / "d.pt")
    assert convert_main(["dit", str(tmp_path / "d.pt"), str(tmp_path / "out_dit"), "--num-heads", "2"]) == 0
    printed = capsys.readouterr().out
    assert "stabilityai/sd-vae-ft-ema" in printed and "Only the transformer" in printed
    loaded = DiTModel.from_pretrained(tmp_path / "out_dit" / "transformer")
    assert (tmp_path / "out_dit" / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    x, t, y = dit_inputs()
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, y).sample, model(x, t, y).sample, atol=1e-6)

    text = perturb(TextDiTModel(**PIXART_TINY, interpolation_scale=1.0, use_additional_conditions=False))
    pix = ours_to_official_pixart(text.state_dict(), tokens=120, grid=16)
    torch.save({"state_dict": pix}, tmp_path / "PixArt-tiny.pth")
    argv = ["pixart", str(tmp_path / "PixArt-tiny.pth"), str(tmp_path / "out_pix"), "--num-heads", "2"]
    assert convert_main([*argv, "--version", "alpha"]) == 0
    assert "PixArt-alpha/PixArt-XL-2-512x512" in capsys.readouterr().out
    loaded = TextDiTModel.from_pretrained(tmp_path / "out_pix" / "transformer")
    assert loaded.config.interpolation_scale == 1.0 and loaded.config.sample_size == 32

    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    assert convert_main(["dit", str(tmp_path / "junk.pt"), str(tmp_path / "out_junk")]) == 2
    assert "junk.pt" in capsys.readouterr().err
