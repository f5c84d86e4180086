"""Training data layer: folder formats, bucketing, bad input, tokenizer, emoji builder.

Every folder is built in tmp_path from PIL-generated images; nothing touches the network.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from training.data import emoji as emoji_mod
from training.data.datasets import (
    AspectRatioBucketSampler,
    DatasetWarning,
    collate_image_batch,
    make_buckets,
    nearest_bucket,
    open_image_folder,
)
from training.data.images import BadImageError, check_image, load_image
from training.data.tokenizer import build_word_tokenizer

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def png(path: Path, size=(16, 16), color=RED, mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)
    return path


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


def rgb_of(t: torch.Tensor) -> tuple[int, int, int]:
    """Mean colour of a [-1, 1] image tensor, back in 0..255."""
    return tuple(int(round(v)) for v in ((t.mean(dim=(1, 2)) + 1) * 127.5).tolist())


def truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    Image.effect_noise((32, 32), 50).convert("RGB").save(buf, format="PNG")
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return path


# --------------------------------------------------------------------------- formats


def test_metadata_format_text_label_conditioning_and_classes_json(tmp_path):
    png(tmp_path / "img/a.png", color=RED)
    png(tmp_path / "img/b.png", color=GREEN)
    png(tmp_path / "cond/a.png", color=BLUE)
    png(tmp_path / "unlisted.png")  # not in metadata: ignored, as in HF imagefolder
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [
            {
                "file_name": "img/a.png",
                "text": "a red square",
                "label": 1,
                "conditioning_image_file_name": "cond/a.png",
            },
            "",
            {
                "file_name": "img/b.png",
                "text": "a green square",
                "label": 0,
                "conditioning_image_file_name": "cond/a.png",
            },
        ],
    )
    (tmp_path / "classes.json").write_text(json.dumps({"0": "green", "1": "red"}))
    ds = open_image_folder(tmp_path, 8)
    assert ds.format == "metadata" and len(ds) == 2
    assert ds.texts == ["a red square", "a green square"]
    assert ds.labels == [1, 0] and ds.class_names == ["green", "red"] and ds.num_classes == 2
    item = ds[0]
    assert set(item) == {"pixel_values", "text", "label", "conditioning_pixel_values", "index"}
    assert item["pixel_values"].shape == (3, 8, 8) and item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert rgb_of(item["pixel_values"]) == RED
    assert rgb_of(item["conditioning_pixel_values"]) == BLUE
    assert (item["text"], item["label"], item["index"]) == ("a red square", 1, 0)


def test_metadata_string_labels_map_to_sorted_index_and_text_is_optional(tmp_path):
    for n in "abc":
        png(tmp_path / f"{n}.png")
    write_jsonl(
        tmp_path / "metadata.jsonl",
        [{"file_name": "a.png", "label": "dog"}, {"file_name": "b.png", "label": "cat"}, {"file_name": "c.png"}],
    )
    ds = open_image_folder(tmp_path, 8)
    assert ds.class_names == ["cat", "dog"]
    assert ds.labels == [1, 0, None]
    assert ds.texts == [None, None, None]
    assert ds[2]["conditioning_pixel_values"] is None


def test_caption_files_format(tmp_path):
    png(tmp_path / "a.png", color=RED)
    (tmp_path / "a.txt").write_text("  a red square\n")
    png(tmp_path / "sub/b.jpg", color=GREEN)
    (tmp_path / "sub/b.txt").write_text("a green square")
    ds = open_image_folder(tmp_path, 8)
    assert ds.format == "captions"
    by_text = {ds[i]["text"]: rgb_of(ds[i]["pixel_values"]) for i in range(len(ds))}
    assert set(by_text) == {"a red square", "a green square"}
    assert by_text["a red square"] == RED
    assert all(lb is None for lb in ds.labels)


def test_class_per_subfolder_format(tmp_path):
    png(tmp_path / "dog/1.png", color=BLUE)
    png(tmp_path / "dog/2.png", color=BLUE)
    png(tmp_path / "cat/1.png", color=RED)
    png(tmp_path / "bird/nested/1.png", color=GREEN)
    ds = open_image_folder(tmp_path, 8)
    assert ds.format == "classes"
    assert ds.class_names == ["bird", "cat", "dog"]
    got = sorted((ds[i]["label"], rgb_of(ds[i]["pixel_values"])) for i in range(len(ds)))
    assert got == [(0, GREEN), (1, RED), (2, BLUE), (2, BLUE)]
    assert all(t is None for t in ds.texts)


def test_center_crop_keeps_the_middle(tmp_path):
    im = Image.new("RGB", (30, 10), RED)
    im.paste(GREEN, (10, 0, 20, 10))
    im.paste(BLUE, (20, 0, 30, 10))
    im.save(tmp_path / "wide.png")
    ds = open_image_folder(tmp_path, 8)
    px = ds[0]["pixel_values"]
    assert px.shape == (3, 8, 8)
    # Squashing instead of cropping would put red and blue in the edge columns.
    for column in (px[:, :, :1], px[:, :, -1:], px):
        assert rgb_of(column) == GREEN


def test_random_flip_is_off_by_default_and_works_when_on(tmp_path):
    im = Image.new("RGB", (8, 8), RED)
    im.paste(BLUE, (4, 0, 8, 8))
    im.save(tmp_path / "half.png")
    torch.manual_seed(0)
    ds = open_image_folder(tmp_path, 8)
    lefts = {rgb_of(ds[0]["pixel_values"][:, :, :4]) for _ in range(20)}
    assert lefts == {RED}
    flipping = open_image_folder(tmp_path, 8, random_flip=True)
    lefts = {rgb_of(flipping[0]["pixel_values"][:, :, :4]) for _ in range(40)}
    assert lefts == {RED, BLUE}


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_onto_white(tmp_path, mode):
    path = tmp_path / f"t_{mode}.png"
    if mode == "P":
        im = Image.new("P", (8, 8), 0)
        im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        im.putpixel((0, 0), 1)
        im.save(path, transparency=0)  # palette index 0 (black) is transparent
    else:
        Image.new(mode, (8, 8), (0, 0, 0, 0) if mode == "RGBA" else (0, 0)).save(path)
    img = load_image(path)
    assert img.mode == "RGB"
    assert img.getpixel((5, 5)) == WHITE
    if mode == "P":
        assert img.getpixel((0, 0)) == RED


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.new("I;16", (4, 4), 32768).save(path)
    assert load_image(path).getpixel((0, 0)) in {(127, 127, 127), (128, 128, 128)}


def test_exif_orientation_is_applied_in_load_and_scan(tmp_path):
    im = Image.new("RGB", (40, 20), RED)
    im.paste(BLUE, (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: display rotated 90 degrees clockwise
    path = tmp_path / "photo.jpg"
    im.save(path, exif=exif, quality=95)
    assert check_image(path) == (20, 40)
    img = load_image(path)
    assert img.size == (20, 40)
    top, bottom = img.getpixel((10, 5)), img.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # left half (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


# --------------------------------------------------------------------------- bucketing


def test_make_buckets_shape_rules():
    buckets = make_buckets(256, multiple=16, max_aspect=2.0)
    assert (256, 256) in buckets
    for w, h in buckets:
        assert w % 16 == 0 and h % 16 == 0
        assert 0.5 <= w / h <= 2.0
        assert abs(w * h - 256 * 256) / (256 * 256) < 0.12
        assert (h, w) in buckets  # symmetric
    assert len(buckets) >= 5 and len(set(buckets)) == len(buckets)
    assert buckets == sorted(buckets, key=lambda b: b[0] / b[1])
    with pytest.raises(ValueError, match="multiple"):
        make_buckets(250, multiple=16)


def test_nearest_bucket_uses_aspect_ratio():
    buckets = make_buckets(256, 16)
    assert buckets[nearest_bucket(500, 500, buckets)] == (256, 256)
    assert buckets[nearest_bucket(1000, 500, buckets)] == max(buckets, key=lambda b: b[0] / b[1])
    assert buckets[nearest_bucket(500, 1000, buckets)] == min(buckets, key=lambda b: b[0] / b[1])
    w, h = buckets[nearest_bucket(1280, 960, buckets)]
    assert 1.2 < w / h < 1.45


MIXED_SIZES = [(64, 64)] * 11 + [(128, 64)] * 7 + [(64, 128)] * 5 + [(96, 80)] * 6


def _bucket_sampler(**kw) -> AspectRatioBucketSampler:
    kw.setdefault("batch_size", 4)
    return AspectRatioBucketSampler(MIXED_SIZES, base_resolution=32, multiple=8, **kw)


def test_bucket_sampler_batches_share_a_bucket_and_cover_every_index_once():
    s = _bucket_sampler(seed=3)
    assert len(set(s.bucket_ids.tolist())) >= 3
    batches = list(s)
    assert len(batches) == len(s)
    for b in batches:
        assert 1 <= len(b) <= 4
        assert len({int(s.bucket_ids[i]) for i in b}) == 1
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(MIXED_SIZES)))
    wide = s.buckets[s.bucket_ids[11]]
    assert wide[0] > wide[1]  # 128x64 images went to a landscape bucket


def test_bucket_sampler_is_deterministic_per_seed_and_epoch():
    a, b = _bucket_sampler(seed=7), _bucket_sampler(seed=7)
    assert list(a) == list(b)
    epoch0 = list(a)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b) != epoch0
    assert list(_bucket_sampler(seed=8)) != epoch0
    a.set_epoch(0)
    assert list(a) == epoch0
    assert list(_bucket_sampler(seed=7, shuffle=False)) == list(_bucket_sampler(seed=99, shuffle=False))


def test_bucket_sampler_drop_last_keeps_only_full_batches():
    s = _bucket_sampler(drop_last=True)
    batches = list(s)
    assert batches and all(len(b) == 4 for b in batches) and len(batches) == len(s)
    assert len(batches) == sum(n // 4 for n in s.bucket_counts.values())
    assert len(batches) < len(list(_bucket_sampler()))  # some incomplete batches were dropped


def test_bucket_sampler_distributed_split_is_disjoint():
    # drop_last: 6 full batches globally, 3 per rank, no example on both ranks.
    r0 = list(_bucket_sampler(seed=1, num_replicas=2, rank=0, drop_last=True))
    r1 = list(_bucket_sampler(seed=1, num_replicas=2, rank=1, drop_last=True))
    assert len(r0) == len(r1) == 3
    i0, i1 = {i for b in r0 for i in b}, {i for b in r1 for i in b}
    assert i0.isdisjoint(i1)
    assert i0 | i1 == {i for b in _bucket_sampler(seed=1, drop_last=True) for i in b}
    # Without drop_last there are 9 global batches (odd): the list is padded so both ranks
    # take the same number of steps (DDP needs that), and every example is still seen.
    assert len(_bucket_sampler()) == 9
    p0 = _bucket_sampler(seed=1, num_replicas=2, rank=0)
    p1 = _bucket_sampler(seed=1, num_replicas=2, rank=1)
    b0, b1 = list(p0), list(p1)
    assert len(b0) == len(b1) == len(p0) == len(p1) == 5
    assert {i for b in b0 + b1 for i in b} == set(range(len(MIXED_SIZES)))
    assert [set(b) for b in b0[:4]] + [set(b) for b in b1[:4]] == [
        set(b) for b in _bucket_sampler(seed=1).global_batches()[:8:2]
    ] + [set(b) for b in _bucket_sampler(seed=1).global_batches()[1:8:2]]
    with pytest.raises(ValueError):
        _bucket_sampler(num_replicas=2, rank=2)


def test_bucket_sampler_drives_dataset_crop_sizes(tmp_path):
    for i in range(3):
        png(tmp_path / f"wide{i}.png", size=(64, 32))
        png(tmp_path / f"tall{i}.png", size=(32, 64))
        png(tmp_path / f"sq{i}.png", size=(40, 40))
    ds = open_image_folder(tmp_path, 32)
    sampler = AspectRatioBucketSampler(ds, batch_size=2, multiple=8, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate_image_batch)
    seen = []
    for batch in loader:
        shapes = {tuple(p.shape) for p in batch["pixel_values"]}
        assert len(shapes) == 1
        for idx in batch["index"].tolist():
            w, h = sampler.buckets[sampler.bucket_ids[idx]]
            assert batch["pixel_values"].shape[2:] == (h, w)
            seen.append(idx)
    assert sorted(seen) == list(range(9))
    wide_idx = next(i for i, r in enumerate(ds.records) if r.path.name == "wide0.png")
    w, h = ds.target_size(wide_idx)
    assert w > h and w % 8 == 0 and h % 8 == 0


def test_collate_stacks_and_refuses_mixed_batches():
    def item(i, size=8, label=None, cond=False):
        px = torch.zeros(3, size, size)
        return {
            "pixel_values": px,
            "text": f"t{i}",
            "label": label,
            "conditioning_pixel_values": px if cond else None,
            "index": i,
        }

    batch = collate_image_batch([item(0, label=1, cond=True), item(1, label=2, cond=True)])
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    assert batch["label"].tolist() == [1, 2] and batch["label"].dtype == torch.long
    assert batch["conditioning_pixel_values"].shape == (2, 3, 8, 8)
    assert batch["text"] == ["t0", "t1"] and batch["index"].tolist() == [0, 1]
    plain = collate_image_batch([item(0), item(1)])
    assert plain["label"] is None and plain["conditioning_pixel_values"] is None
    with pytest.raises(ValueError, match="sizes"):
        collate_image_batch([item(0, 8), item(1, 16)])
    with pytest.raises(ValueError, match="label"):
        collate_image_batch([item(0, label=1), item(1)])


# --------------------------------------------------------------------------- bad input


def test_empty_folder_error_names_folder_and_formats(tmp_path):
    (tmp_path / "notes.md").write_text("nothing here")
    with pytest.raises(ValueError) as e:
        open_image_folder(tmp_path, 8)
    msg = str(e.value)
    assert str(tmp_path) in msg and "metadata.jsonl" in msg and ".txt" in msg and "sub-folder" in msg
    with pytest.raises(FileNotFoundError):
        open_image_folder(tmp_path / "missing", 8)


def test_orphan_caption_files_are_reported_not_fatal(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a")
    for n in ("ghost1", "ghost2", "ghost3"):
        (tmp_path / f"{n}.txt").write_text("no image")
    with pytest.warns(DatasetWarning, match=r"3 caption files have no image.*ghost1\.txt"):
        ds = open_image_folder(tmp_path, 8)
    assert len(ds) == 1 and len(ds.orphan_captions) == 3


def test_malformed_metadata_line_is_an_error_with_line_number(tmp_path):
    png(tmp_path / "a.png")
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png"}, '{"file_name": "a.png", "text": '])
    with pytest.raises(ValueError, match=r"metadata\.jsonl, line 2: malformed JSON"):
        open_image_folder(tmp_path, 8)


def test_metadata_line_without_file_name_is_an_error_with_line_number(tmp_path):
    png(tmp_path / "a.png")
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png"}, "", {"text": "orphan caption"}])
    with pytest.raises(ValueError, match=r"line 3: missing required key 'file_name'"):
        open_image_folder(tmp_path, 8)


@pytest.mark.parametrize(
    "row",
    [
        {"file_name": "../outside.png"},
        {"file_name": "sub/../../outside.png"},
        {"file_name": "/etc/passwd"},
        {"file_name": "a.png", "conditioning_image_file_name": "../outside.png"},
    ],
)
def test_file_name_escaping_the_root_is_refused(tmp_path, row):
    root = tmp_path / "ds"
    png(root / "a.png")
    png(tmp_path / "outside.png")
    write_jsonl(root / "metadata.jsonl", [{"file_name": "a.png"}, row])
    with pytest.raises(ValueError, match=r"line 2: .*(outside the dataset folder|absolute path)"):
        open_image_folder(root, 8)


def test_bad_images_are_skipped_and_counted(tmp_path):
    for i in range(5):
        png(tmp_path / f"good{i}.png")
    truncated_png(tmp_path / "truncated.png")
    (tmp_path / "fake.png").write_text("not an image")
    png(tmp_path / "huge.png", size=(64, 64))
    with pytest.warns(DatasetWarning, match="skipped 3 of 8"):
        ds = open_image_folder(tmp_path, 8, max_pixels=40 * 40)
    assert len(ds) == 5
    reasons = {Path(s.path).name: s.reason for s in ds.skipped}
    assert set(reasons) == {"truncated.png", "fake.png", "huge.png"}
    assert "truncated" in reasons["truncated.png"] or "corrupt" in reasons["truncated.png"]
    assert "4,096 pixels" in reasons["huge.png"] and "1,600" in reasons["huge.png"]
    assert all(r.path.name.startswith("good") for r in ds.records)


def test_missing_metadata_file_is_skipped_not_fatal(tmp_path):
    png(tmp_path / "a.png")
    write_jsonl(tmp_path / "metadata.jsonl", [{"file_name": "a.png"}, {"file_name": "gone.png"}])
    with pytest.warns(DatasetWarning):
        ds = open_image_folder(tmp_path, 8)
    assert len(ds) == 1 and ds.skipped[0].reason == "file not found"


def test_decompression_bomb_refused_before_decoding(tmp_path, monkeypatch):
    path = png(tmp_path / "bomb.png", size=(100, 50))
    with pytest.raises(BadImageError) as e:
        load_image(path, max_pixels=1000)
    assert e.value.path == str(path) and "5,000 pixels" in str(e.value) and "bomb.png" in str(e.value)
    # The module default applies when no limit is passed.
    monkeypatch.setattr("training.data.images.DEFAULT_MAX_PIXELS", 4999)
    with pytest.raises(BadImageError, match="decompression bomb"):
        check_image(path)
    monkeypatch.setattr("training.data.images.DEFAULT_MAX_PIXELS", 5000)
    assert check_image(path) == (100, 50)


def test_folder_where_every_image_is_bad_is_an_error(tmp_path):
    truncated_png(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"no usable images in .*all 2 were skipped"):
        open_image_folder(tmp_path, 8)


def test_image_that_breaks_after_the_scan_is_replaced_or_raised(tmp_path):
    # A truncated JPEG passes the header-level scan (JPEG verify() reads only the header)
    # and fails on decode: exactly the case __getitem__ must guard.
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 60).convert("RGB").save(buf, format="JPEG")
    (tmp_path / "a_broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    png(tmp_path / "b_good.png", color=GREEN)
    ds = open_image_folder(tmp_path, 8)
    assert len(ds) == 2 and not ds.skipped
    broken = next(i for i, r in enumerate(ds.records) if r.path.name == "a_broken.jpg")
    with pytest.warns(DatasetWarning, match="a_broken.jpg"):
        item = ds[broken]
    assert item["index"] != broken and rgb_of(item["pixel_values"]) == GREEN
    assert [Path(e.path).name for e in ds.runtime_errors] == ["a_broken.jpg"]
    strict = open_image_folder(tmp_path, 8, strict=True)
    with pytest.raises(BadImageError, match="a_broken.jpg"):
        strict[broken]
    # A full scan catches it up front instead.
    with pytest.warns(DatasetWarning, match="skipped 1 of 2"):
        assert len(open_image_folder(tmp_path, 8, verify="full")) == 1


# --------------------------------------------------------------------------- tokenizer


def test_word_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = build_word_tokenizer(["Grinning face", "red apple", "grinning cat face!", None], max_length=6)
    vocab = tok.get_vocab()
    assert [vocab[t] for t in ("[PAD]", "[UNK]", "[BOS]", "[EOS]")] == [0, 1, 2, 3]
    assert {"grinning", "face", "red", "apple", "cat", "!"} <= set(vocab)
    assert tok.tokenize("GRINNING Face!") == ["grinning", "face", "!"]
    enc = tok(["grinning face", "a red apple cat face face"], padding="max_length", max_length=6, truncation=True)
    bos, eos = vocab["[BOS]"], vocab["[EOS]"]
    assert enc["input_ids"][0] == [bos, vocab["grinning"], vocab["face"], eos, 0, 0]
    assert enc["attention_mask"][0] == [1, 1, 1, 1, 0, 0]
    assert enc["input_ids"][1][0] == bos and enc["input_ids"][1][-1] == eos  # truncation keeps [EOS]
    assert enc["input_ids"][1][1] == vocab["[UNK]"]  # "a" never appeared in the captions
    assert tok.model_max_length == 6

    tok.save_pretrained(tmp_path / "tokenizer")
    loaded = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    assert loaded.model_max_length == 6 and loaded.pad_token_id == 0
    again = loaded(["grinning face", "a red apple cat face face"], padding="max_length", max_length=6, truncation=True)
    assert again["input_ids"] == enc["input_ids"]
    assert loaded.decode(again["input_ids"][0], skip_special_tokens=True) == "grinning face"


def test_word_tokenizer_rejects_bad_arguments():
    with pytest.raises(ValueError):
        build_word_tokenizer(["a b"], max_length=2)
    with pytest.raises(ValueError, match="no captions"):
        build_word_tokenizer([None, "  "], max_length=8)


# --------------------------------------------------------------------------- emoji builder


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("tests must not run npm / touch the network")

    monkeypatch.setattr(emoji_mod.subprocess, "run", refuse)


def _fake_package(root: Path) -> Path:
    """A 3-entry emoji.json + 64 px transparent PNGs shaped like emoji-datasource-google."""
    pkg = root / "package"
    img = pkg / "img/google/64"
    img.mkdir(parents=True)
    colors = {"1f600": (250, 200, 0, 255), "1f385": (200, 0, 0, 255), "1f385-1f3fd": (150, 0, 0, 255)}
    colors["1f9ff"] = (0, 0, 200, 255)  # present on disk, but its entry says has_img_google: false
    for name, color in colors.items():
        im = Image.new("RGBA", (64, 64), (0, 0, 0, 0))  # transparent black background
        im.paste(color, (16, 16, 48, 48))
        im.save(img / f"{name}.png")
    entries = [
        {
            "name": "FATHER CHRISTMAS",
            "short_names": ["santa"],
            "image": "1f385.png",
            "category": "People & Body",
            "subcategory": "person-fantasy",
            "sort_order": 372,
            "has_img_google": True,
            "skin_variations": {"1F3FD": {"image": "1f385-1f3fd.png", "has_img_google": True}},
        },
        {
            "name": "GRINNING FACE",
            "short_names": ["grinning"],
            "image": "1f600.png",
            "category": "Smileys & Emotion",
            "subcategory": "face-smiling",
            "sort_order": 1,
            "has_img_google": True,
        },
        {
            "name": "NO GOOGLE IMAGE",
            "short_names": ["nope"],
            "image": "1f9ff.png",
            "category": "Objects",
            "subcategory": "other-object",
            "sort_order": 900,
            "has_img_google": False,
        },
    ]
    (pkg / "emoji.json").write_text(json.dumps(entries))
    (pkg / "package.json").write_text(json.dumps({"name": "emoji-datasource-google", "version": "0.0-test"}))
    return pkg


def _read_meta(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]


def test_emoji_builder_writes_a_dataset_open_image_folder_reads(tmp_path, no_network, capsys):
    pkg = _fake_package(tmp_path / "npm")
    out = tmp_path / "data" / "emoji"
    rc = emoji_mod.main(["--out", str(out), "--size", "16", "--package-dir", str(pkg)])
    assert rc == 0
    meta = _read_meta(out)
    assert [m["text"] for m in meta] == ["grinning face", "father christmas, santa"]  # Unicode order
    assert [m["label"] for m in meta] == [0, 1]
    assert json.loads((out / "classes.json").read_text()) == {"0": "Smileys & Emotion", "1": "People & Body"}
    assert sorted(p.name for p in (out / "images").iterdir()) == ["1f385.png", "1f600.png"]  # no skin tone
    im = Image.open(out / meta[0]["file_name"])
    assert im.size == (16, 16) and im.mode == "RGB"
    assert im.getpixel((0, 0)) == WHITE  # transparent corner composited onto white, not black
    assert im.getpixel((8, 8))[0] > 200
    printed = capsys.readouterr().out
    assert "Smileys & Emotion" in printed and "People & Body" in printed and "wrote 2 images" in printed
    assert json.loads((out / "source.json").read_text())["version"] == "0.0-test"

    ds = open_image_folder(out, 16)
    assert len(ds) == 2 and ds.class_names == ["Smileys & Emotion", "People & Body"]
    assert ds.texts == ["grinning face", "father christmas, santa"]

    # Re-running into its own output is allowed; into a foreign non-empty folder is not.
    assert emoji_mod.main(["--out", str(out), "--package-dir", str(pkg), "--categories", "people & body"]) == 0
    assert [m["text"] for m in _read_meta(out)] == ["father christmas, santa"]
    assert sorted(p.name for p in (out / "images").iterdir()) == ["1f385.png"]  # stale images removed
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "keep.txt").write_text("mine")
    assert emoji_mod.main(["--out", str(tmp_path / "foreign"), "--package-dir", str(pkg)]) == 1
    assert (tmp_path / "foreign" / "keep.txt").read_text() == "mine"


def test_emoji_builder_options(tmp_path, no_network):
    pkg = _fake_package(tmp_path / "npm")
    res = emoji_mod.build_emoji_dataset(
        pkg, tmp_path / "a", size=8, label_by="subcategory", include_skin_variations=True
    )
    assert res.class_names == ["face-smiling", "person-fantasy"]
    assert res.per_class == {"face-smiling": 1, "person-fantasy": 2}
    assert res.per_category == {"Smileys & Emotion": 1, "People & Body": 2}
    assert res.missing == [] and "Objects" not in res.per_category  # has_img_google: false is skipped
    texts = [m["text"] for m in _read_meta(tmp_path / "a")]
    assert "father christmas, santa, medium skin tone" in texts
    res = emoji_mod.build_emoji_dataset(
        pkg, tmp_path / "b", size=8, min_per_class=2, label_by="subcategory", include_skin_variations=True
    )
    assert res.class_names == ["person-fantasy"] and res.dropped_classes == {"face-smiling": 1}
    assert {m["label"] for m in _read_meta(tmp_path / "b")} == {0}
    with pytest.raises(ValueError, match="unknown categories"):
        emoji_mod.build_emoji_dataset(pkg, tmp_path / "c", categories=["Smileys"])


def test_emoji_builder_reads_a_tgz_safely(tmp_path, no_network):
    pkg = _fake_package(tmp_path / "src")
    tgz = tmp_path / "emoji-datasource-google-0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(pkg, arcname="package")
        # Passes the name filter (an image under img/google/64) but climbs out of the cache.
        evil = tarfile.TarInfo("package/img/google/64/" + "../" * 6 + "escaped.png")
        payload = b"should never be written"
        evil.size = len(payload)
        tar.addfile(evil, io.BytesIO(payload))
    resolved = emoji_mod.resolve_package_dir(tgz, cache_dir=tmp_path / "cache")
    assert (resolved / "emoji.json").is_file() and resolved.is_relative_to(tmp_path / "cache")
    assert not list(tmp_path.rglob("escaped.png"))
    res = emoji_mod.build_emoji_dataset(resolved, tmp_path / "out", size=8)
    assert res.written == 2


def test_emoji_caption_rule():
    cap = emoji_mod.emoji_caption
    assert cap("GRINNING FACE", ["grinning"]) == "grinning face"
    assert cap("FATHER CHRISTMAS", ["santa"]) == "father christmas, santa"
    assert cap("THUMBS UP SIGN", ["+1", "thumbsup"]) == "thumbs up sign, thumbsup"
    assert cap("Andorra Flag", ["flag-ad"]) == "andorra flag"
    assert cap("CAT", ["cat2"]) == "cat"
    assert cap("PILE OF POO", ["hankey", "poop"], mode="name") == "pile of poo"
