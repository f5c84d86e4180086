"""Tests of pipelines.metadata: the generation record, its A1111/JSON forms and PNG I/O."""

from __future__ import annotations

import hashlib
import os
import platform
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from pipelines import metadata
from pipelines.metadata import (
    GenerationRecord,
    attach_record,
    directory_hash,
    file_hash,
    from_a1111,
    library_versions,
    model_hash,
    pnginfo,
    read_record,
    save_png,
)

VERSIONS = {"dit-studio": "0.1.0", "torch": "2.13.0", "diffusers": "0.42.1", "python": "3.11.7"}


def full_record(**overrides) -> GenerationRecord:
    """A record that sets every field to a non-default value."""
    values = dict(
        pipeline="text-to-image",
        model="assets/models/pixart-tiny",
        model_hash="0123456789",
        prompt="a red fox,\nsitting in the snow",
        negative_prompt="blurry, low quality",
        seed=987654321,
        steps=12,
        guidance_scale=3.25,
        scheduler="euler_a",
        width=320,
        height=192,
        batch_index=2,
        attention="proxy",
        adapters=[
            {"name": "ink", "weight": 0.75, "hash": "0a1b2c3d4e"},
            {"name": "local", "weight": 1.0, "hash": None},
        ],
        dtype="bfloat16",
        device="cuda",
        generator_device="cpu",
        versions=dict(VERSIONS),
        extra={"top_k": 900, "control": {"type": "canny", "scale": 0.5}, "Schedule type": "Karras"},
    )
    values.update(overrides)
    return GenerationRecord(**values)


def png_chunks(path: Path) -> list[tuple[bytes, bytes]]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def small_image() -> Image.Image:
    return Image.new("RGB", (8, 6), (200, 30, 60))


# ---------------------------------------------------------------------- PNG round trips


def test_png_round_trip_restores_the_exact_record(tmp_path):
    record = full_record()
    path = save_png(small_image(), tmp_path / "out.png", record)
    assert path == tmp_path / "out.png"
    assert read_record(path) == record
    assert read_record(str(path)) == record
    with Image.open(path) as image:
        assert image.size == (8, 6)
        assert read_record(image) == record


def test_png_round_trip_class_record_and_non_latin_prompt(tmp_path):
    class_record = GenerationRecord(
        pipeline="class-to-image", model="dit-tiny", class_label=207, class_name="golden retriever", versions={}
    )
    text_record = full_record(prompt="猫が窓辺で眠る", negative_prompt=None)
    for name, record in (("class.png", class_record), ("cjk.png", text_record)):
        assert read_record(save_png(small_image(), tmp_path / name, record)) == record


def test_png_reader_prefers_the_lossless_json_chunk(tmp_path):
    # Things the A1111 text cannot carry exactly: an empty (not absent) negative prompt,
    # a string that looks like a number, a private extra entry.
    record = full_record(negative_prompt="", extra={"code": "007", "_job": {"id": 5}})
    assert from_a1111(record.to_a1111()) != record
    assert read_record(save_png(small_image(), tmp_path / "lossless.png", record)) == record


def test_png_has_text_parameters_and_itxt_json(tmp_path):
    record = full_record()
    path = save_png(small_image(), tmp_path / "chunks.png", record)
    chunks = png_chunks(path)
    text = [data for kind, data in chunks if kind == b"tEXt" and data.startswith(b"parameters\0")]
    assert text == [b"parameters\0" + record.to_a1111().encode("latin-1")]
    itxt = [data for kind, data in chunks if kind == b"iTXt" and data.startswith(b"dit_studio\0")]
    assert len(itxt) == 1
    # iTXt layout: key\0 compression-flag compression-method lang\0 translated-key\0 text
    rest = itxt[0][len(b"dit_studio\0") :]
    assert rest[:2] == b"\0\0"  # uncompressed, so other tools can read it without zlib
    _lang, _translated, text = rest[2:].split(b"\0", 2)
    assert GenerationRecord.from_json(text.decode("utf-8")) == record


def test_pnginfo_carries_both_chunks():
    record = full_record()
    info = pnginfo(record)
    payloads = b"".join(data for _, data, *_ in info.chunks)
    assert b"parameters\0" + record.to_a1111().encode("latin-1") in payloads
    assert record.to_json().encode("utf-8") in payloads


# ---------------------------------------------------------------------- JSON / dict


def test_json_round_trip_and_schema_version():
    record = full_record()
    data = record.to_dict()
    assert data["schema_version"] == metadata.SCHEMA_VERSION
    assert data["adapters"] == record.adapters and data["adapters"] is not record.adapters
    assert GenerationRecord.from_dict(data) == record
    assert GenerationRecord.from_json(record.to_json()) == record
    assert GenerationRecord.from_json(record.to_json(indent=2)) == record


def test_from_dict_keeps_unknown_keys_and_never_invents_versions():
    record = GenerationRecord.from_dict(
        {"pipeline": "text-to-image", "model": "m", "prompt": "p", "steps": "8", "new_field": [1, 2]}
    )
    assert record.versions == {}
    assert record.steps == 8
    assert record.extra == {"_unknown": {"new_field": [1, 2]}}
    assert "new_field" not in record.to_call_kwargs()
    assert "new_field" not in record.to_a1111()


def test_from_dict_rejects_missing_required_fields_and_bad_values():
    with pytest.raises(ValueError, match="model"):
        GenerationRecord.from_dict({"pipeline": "text-to-image"})
    with pytest.raises(ValueError, match="seed"):
        GenerationRecord.from_dict({"pipeline": "x", "model": "m", "seed": "not a number"})
    with pytest.raises(ValueError):
        GenerationRecord.from_json("[1, 2]")
    with pytest.raises(ValueError):
        GenerationRecord.from_json("{not json")


def test_default_versions_are_this_process_versions():
    record = GenerationRecord(pipeline="text-to-image", model="m")
    assert record.versions == library_versions()
    assert record.versions["python"] == platform.python_version()


# ---------------------------------------------------------------------- A1111 text, exact


def test_a1111_exact_text_quotes_commas_and_omits_empty_negative():
    record = GenerationRecord(
        pipeline="text-to-image",
        model="pixart, tiny",
        model_hash="abcdef0123",
        prompt="a red fox in the snow",
        negative_prompt="",
        seed=42,
        width=256,
        height=192,
        adapters=[{"name": "ink", "weight": 0.75, "hash": "0a1b2c3d4e"}],
        versions={"dit-studio": "0.1.0", "torch": "2.13.0"},
        extra={"top_k": 900},
    )
    expected = (
        "a red fox in the snow\n"
        "Steps: 20, Sampler: DPM++ 2M, CFG scale: 4.5, Seed: 42, Size: 256x192, Model hash: abcdef0123, "
        'Model: "pixart, tiny", Lora hashes: "ink: 0a1b2c3d4e", Lora weights: "ink: 0.75", '
        "Pipeline: text-to-image, Attention: sdpa, Dtype: float32, Device: cpu, RNG: CPU, top_k: 900, "
        "Version: dit-studio 0.1.0, Library versions: torch 2.13.0"
    )
    assert record.to_a1111() == expected


def test_a1111_exact_text_with_negative_multiline_and_class_fields():
    record = GenerationRecord(
        pipeline="class-to-image",
        model="dit-tiny",
        class_label=1,
        class_name="goldfish, Carassius auratus",
        seed=7,
        steps=25,
        guidance_scale=4.0,
        scheduler="flow_euler",
        width=64,
        height=64,
        batch_index=3,
        generator_device="cuda",
        versions={},
        extra={"note": "line one\nline two", "_private": "never written", "bad.key": 1, "Seed": 99},
    )
    expected = (
        "Steps: 25, Sampler: flow_euler, CFG scale: 4, Seed: 7, Size: 64x64, Model: dit-tiny, "
        'Pipeline: class-to-image, Class: 1, Class name: "goldfish, Carassius auratus", Batch pos: 3, '
        'Attention: sdpa, Dtype: float32, Device: cpu, RNG: GPU, note: "line one\\nline two"'
    )
    assert record.to_a1111() == expected

    text_record = GenerationRecord(
        pipeline="text-to-image",
        model="m",
        prompt="  first line\nsecond: line  ",
        negative_prompt="ugly",
        scheduler="lcm",
        versions={},
    )
    assert text_record.to_a1111() == (
        "first line\nsecond: line  \nNegative prompt: ugly\n"
        "Steps: 20, Sampler: LCM, CFG scale: 4.5, Seed: 0, Size: 256x256, Model: m, "
        "Pipeline: text-to-image, Attention: sdpa, Dtype: float32, Device: cpu, RNG: CPU"
    )


@pytest.mark.parametrize(
    ("ours", "a1111"),
    [
        ("dpm++2m", "DPM++ 2M"),
        ("ddim", "DDIM"),
        ("euler", "Euler"),
        ("euler_a", "Euler a"),
        ("lcm", "LCM"),
        ("ddpm", "DDPM"),
        ("my_flow", "my_flow"),
    ],
)
def test_sampler_names_map_both_ways(ours, a1111):
    record = GenerationRecord(pipeline="text-to-image", model="m", prompt="p", scheduler=ours, versions={})
    assert f"Sampler: {a1111}," in record.to_a1111()
    assert from_a1111(record.to_a1111()).scheduler == ours


def test_a1111_round_trip_of_our_own_records():
    for record in (
        full_record(),
        full_record(generator_device="cuda:1", batch_index=0, adapters=[], extra={}),
        GenerationRecord(pipeline="class-to-image", model="dit", class_label=3, class_name="x, y", versions={}),
    ):
        assert from_a1111(record.to_a1111()) == record


# ---------------------------------------------------------------------- A1111 text from other tools

FOREIGN = (
    "masterpiece, <lora:add_detail:0.6> portrait\n"
    "of an old sailor\n"
    "Negative prompt: lowres, bad hands\n"
    "worst quality\n"
    "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3141592653, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned, Denoising strength: 0.35, "
    'Hashes: {"model": "6ce0161689"}, Lora hashes: "add_detail: 7c6bad76eb54, film: 0a0b0c0d0e", '
    "Hires fix, Version: v1.10.1"
)


def test_from_a1111_reads_another_tools_text():
    record = from_a1111(FOREIGN)
    assert record.prompt == "masterpiece, <lora:add_detail:0.6> portrait\nof an old sailor"
    assert record.negative_prompt == "lowres, bad hands\nworst quality"
    assert (record.steps, record.guidance_scale, record.seed) == (30, 7.0, 3141592653)
    assert (record.width, record.height) == (512, 768)
    assert record.scheduler == "dpm++2m"
    assert (record.model, record.model_hash) == ("v1-5-pruned", "6ce0161689")
    assert record.pipeline == "text-to-image"
    assert record.adapters == [
        {"name": "add_detail", "weight": 0.6, "hash": "7c6bad76eb54"},
        {"name": "film", "weight": 1.0, "hash": "0a0b0c0d0e"},
    ]
    assert record.versions == {}
    assert record.extra == {
        "Schedule type": "Karras",
        "Denoising strength": 0.35,
        "Hashes": {"model": "6ce0161689"},
        "Hires fix": "Hires fix",
        "Version": "v1.10.1",
    }
    # Foreign keys are informational: they are not passed to a pipeline...
    assert set(record.to_call_kwargs()) == {
        "prompt",
        "negative_prompt",
        "num_inference_steps",
        "guidance_scale",
        "height",
        "width",
        "seed",
        "scheduler",
    }
    # ...but they are written back when the record is saved again.
    again = record.to_a1111()
    assert "Denoising strength: 0.35" in again and "Version: v1.10.1" in again and ", Hires fix," in again


def test_from_a1111_without_negative_line_and_prompt_only_text():
    record = from_a1111("a cat: cute, fluffy\nSteps: 4, Sampler: Euler, Seed: 5, Size: 64x32")
    assert record.prompt == "a cat: cute, fluffy"
    assert record.negative_prompt is None
    assert (record.steps, record.scheduler, record.seed, record.width, record.height) == (4, "euler", 5, 64, 32)
    # No parameter line at all: everything is prompt, nothing else invented.
    plain = from_a1111("just a prompt, with commas")
    assert plain.prompt == "just a prompt, with commas" and plain.steps == 20 and plain.extra == {}
    with pytest.raises(ValueError):
        from_a1111("   ")


# ---------------------------------------------------------------------- reading files


def test_read_record_falls_back_to_a1111_text_when_json_is_missing(tmp_path):
    info = PngInfo()
    info.add_text("parameters", FOREIGN)
    path = tmp_path / "a1111.png"
    small_image().save(path, pnginfo=info)
    assert read_record(path) == from_a1111(FOREIGN)
    assert read_record(path).seed == 3141592653


def test_read_record_falls_back_when_json_chunk_is_corrupt(tmp_path):
    record = full_record()
    info = PngInfo()
    info.add_text("parameters", record.to_a1111())
    info.add_itxt("dit_studio", "{truncated")
    path = tmp_path / "corrupt.png"
    small_image().save(path, pnginfo=info)
    assert read_record(path) == record  # the A1111 text of our records is complete

    only_bad = tmp_path / "only-bad.png"
    info = PngInfo()
    info.add_itxt("dit_studio", "{truncated")
    small_image().save(only_bad, pnginfo=info)
    with pytest.raises(ValueError, match="not a valid generation record"):
        read_record(only_bad)


def test_read_record_reads_a1111_jpeg_user_comment(tmp_path):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + FOREIGN.encode("utf-16-be")
    path = tmp_path / "a1111.jpg"
    small_image().save(path, exif=exif.tobytes())
    assert read_record(path) == from_a1111(FOREIGN)


def test_read_record_error_on_png_without_metadata(tmp_path):
    path = tmp_path / "plain.png"
    small_image().save(path)
    with pytest.raises(ValueError, match="carries no generation parameters") as info:
        read_record(path)
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="carries no generation parameters"):
        read_record(small_image())


def test_read_record_error_on_non_image_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("Steps: 20, Seed: 1, Size: 64x64\n")
    with pytest.raises(ValueError, match="not an image") as info:
        read_record(path)
    assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError):
        read_record(tmp_path / "missing.png")


def test_attach_record_survives_a_gradio_style_reencode(tmp_path):
    record = full_record()
    image = attach_record(small_image(), record)
    assert read_record(image) == record
    # gradio's encode_pil_to_bytes copies string entries of image.info into text chunks.
    info = PngInfo()
    for key, value in image.info.items():
        info.add_text(key, value)
    path = tmp_path / "gradio.png"
    image.save(path, pnginfo=info)
    assert read_record(path) == record


def test_json_chunk_after_image_data_is_found(tmp_path):
    record = full_record()
    path = tmp_path / "late.png"
    small_image().save(path)
    data = path.read_bytes()
    payload = b"dit_studio\0\0\0\0\0" + record.to_json().encode("utf-8")
    chunk = struct.pack(">I", len(payload)) + b"iTXt" + payload
    chunk += struct.pack(">I", zlib.crc32(b"iTXt" + payload) & 0xFFFFFFFF)
    iend = data.rindex(b"IEND") - 4
    path.write_bytes(data[:iend] + chunk + data[iend:])
    assert read_record(path) == record


# ---------------------------------------------------------------------- atomic save


def test_save_png_leaves_no_temp_file_and_overwrites(tmp_path):
    out = tmp_path / "nested" / "img.png"
    save_png(small_image(), out, full_record(seed=1))
    save_png(small_image(), out, full_record(seed=2))
    assert sorted(p.name for p in out.parent.iterdir()) == ["img.png"]
    assert read_record(out).seed == 2
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_png_failure_keeps_old_file_and_removes_temp(tmp_path):
    out = tmp_path / "img.png"
    save_png(small_image(), out, full_record(seed=1))
    before = out.read_bytes()

    image = small_image()

    def crash(fp, *args, **kwargs):
        fp.write(b"\x89PNG half written")
        raise OSError("disk full")

    image.save = crash
    with pytest.raises(OSError, match="disk full"):
        save_png(image, out, full_record(seed=2))
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]


def test_save_png_fsyncs_before_replacing(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(metadata.os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(metadata.os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    save_png(small_image(), tmp_path / "img.png", full_record())
    assert "replace" in events
    assert "fsync" in events[: events.index("replace")]


# ---------------------------------------------------------------------- call kwargs


def test_to_call_kwargs_for_text_record():
    record = full_record(extra={"top_k": 900, "control": {"scale": 0.5}, "Schedule type": "Karras", "_x": 1})
    kwargs = record.to_call_kwargs()
    assert kwargs == {
        "prompt": "a red fox,\nsitting in the snow",
        "negative_prompt": "blurry, low quality",
        "num_inference_steps": 12,
        "guidance_scale": 3.25,
        "height": 192,
        "width": 320,
        "seed": 987654321,
        "scheduler": "euler_a",
        "top_k": 900,
        "control": {"scale": 0.5},
    }
    kwargs["control"]["scale"] = 9.0
    assert record.extra["control"] == {"scale": 0.5}


def test_to_call_kwargs_for_class_record_and_accepted_filter():
    record = GenerationRecord(
        pipeline="class-to-image",
        model="dit",
        class_label=207,
        seed=3,
        steps=50,
        guidance_scale=1.5,
        scheduler="ddim",
        width=64,
        height=64,
        extra={"seed": 123, "top_k": 10},
        versions={},
    )
    kwargs = record.to_call_kwargs()
    assert kwargs == {
        "class_labels": [207],
        "num_inference_steps": 50,
        "guidance_scale": 1.5,
        "height": 64,
        "width": 64,
        "seed": 3,
        "scheduler": "ddim",
        "top_k": 10,
    }
    accepted = {"class_labels", "num_inference_steps", "guidance_scale", "seed"}
    assert record.to_call_kwargs(accepted) == {k: kwargs[k] for k in accepted}


# ---------------------------------------------------------------------- hashes and versions


def test_file_hash_is_streamed_sha256_prefix(tmp_path):
    data = os.urandom((1 << 20) * 2 + 123)  # spans several read chunks
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert file_hash(path) == digest[:10]
    assert file_hash(path, length=64) == digest
    assert model_hash(path) == digest[:10]


def make_model_dir(root: Path, order: list[str], weights: dict[str, bytes]) -> Path:
    for name in order:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(weights[name])
    return root


def test_directory_hash_is_stable_and_tracks_weights_only(tmp_path):
    weights = {
        "transformer/diffusion_pytorch_model.safetensors": b"transformer weights",
        "vae/diffusion_pytorch_model.safetensors": b"vae weights",
        "text_encoder/pytorch_model.bin": b"encoder weights",
    }
    names = list(weights)
    a = make_model_dir(tmp_path / "a", names, weights)
    b = make_model_dir(tmp_path / "b", names[::-1], weights)
    (b / "model_index.json").write_text("{}")
    (b / ".cache").mkdir()
    (b / ".cache" / "stale.safetensors").write_bytes(b"ignored")
    assert directory_hash(a) == directory_hash(b)
    assert len(directory_hash(a)) == 10 and model_hash(a) == directory_hash(a)

    (b / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"other vae")
    assert directory_hash(b) != directory_hash(a)

    swapped = dict(weights)
    swapped["transformer/diffusion_pytorch_model.safetensors"] = weights["vae/diffusion_pytorch_model.safetensors"]
    swapped["vae/diffusion_pytorch_model.safetensors"] = weights["transformer/diffusion_pytorch_model.safetensors"]
    c = make_model_dir(tmp_path / "c", names, swapped)
    assert directory_hash(c) != directory_hash(a)

    # The path is part of the hash: the same file as another component is another model.
    t = make_model_dir(tmp_path / "t", ["transformer/w.safetensors"], {"transformer/w.safetensors": b"w"})
    v = make_model_dir(tmp_path / "v", ["vae/w.safetensors"], {"vae/w.safetensors": b"w"})
    assert directory_hash(t) != directory_hash(v)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no .*weight files"):
        directory_hash(empty)


def test_library_versions_skips_missing_packages(monkeypatch):
    real_version = metadata.importlib_metadata.version

    def fake_version(name):
        if name == "diffusers":
            raise metadata.importlib_metadata.PackageNotFoundError(name)
        return real_version(name)

    metadata._installed_versions.cache_clear()
    monkeypatch.setattr(metadata.importlib_metadata, "version", fake_version)
    try:
        versions = library_versions()
        assert "diffusers" not in versions
        assert versions["torch"] == real_version("torch")
        assert versions["python"] == platform.python_version()
        versions["torch"] = "edited"
        assert library_versions()["torch"] == real_version("torch")
    finally:
        metadata._installed_versions.cache_clear()


def test_directory_hash_does_not_depend_on_listing_order(tmp_path, monkeypatch):
    weights = {f"part{i}/model.safetensors": f"weights {i}".encode() for i in range(5)}
    root = make_model_dir(tmp_path / "m", list(weights), weights)
    expected = directory_hash(root)
    real_rglob = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(list(real_rglob(self, pattern))))
    assert directory_hash(root) == expected
