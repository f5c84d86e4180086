"""The web app through its HTTP API (gradio_client), served in-process on a free 127.0.0.1 port."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402
from serving import serve_app  # noqa: E402

from pipelines import Catalog, InputError  # noqa: E402
from pipelines.metadata import GenerationRecord, read_record  # noqa: E402
from pipelines.service import GenerationRequest, GenerationService, size_for_aspect  # noqa: E402


@pytest.fixture(scope="module")
def served(tiny_models_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    extra = tmp_path_factory.mktemp("more-models")  # holds only loras/
    (extra / "loras").mkdir()
    (extra / "loras" / "style.safetensors").write_bytes(b"\x80\x04not really safetensors")
    argv = ["--models-dir", str(tiny_models_dir), "--models-dir", str(extra), "--no-default-models"]
    with serve_app([*argv, "--output-dir", str(out)]) as (url, service):
        yield SimpleNamespace(client=Client(url, verbose=False), service=service, out=out, url=url)


def test_endpoints_are_named(served):
    names = set(served.client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/text_to_image", "/class_to_image", "/read_parameters", "/history", "/cancel", "/models"} <= names
    models = served.client.predict(api_name="/models")
    assert [m["name"] for m in models["text-to-image"]] == ["tiny-t2i"]
    assert models["class-to-image"][0]["classes"] == ["smileys", "animals", "food", "travel"]


def test_generate_returns_pngs_that_keep_their_metadata(served):
    gallery, preview, seed, status, info = served.client.predict(
        model="tiny-t2i",
        prompt="a red cat",
        negative_prompt="green dog",
        steps=3,
        seed=11,
        batch_size=2,
        batch_count=2,
        api_name="/text_to_image",
    )
    assert len(gallery) == 4 and seed == 11 and "4 image(s)" in status
    records = [read_record(item["image"]) for item in gallery]
    assert [r.seed for r in records] == [11, 12, 13, 14]
    assert {(r.prompt, r.negative_prompt, r.steps, r.model) for r in records} == {
        ("a red cat", "green dog", 3, "tiny-t2i")
    }
    saved = [Path(p) for p in info["images"]]
    assert all(p.is_file() and served.out in p.parents for p in saved)
    # the client got the saved PNG itself, not a re-encoded copy
    assert Path(gallery[0]["image"]).read_bytes() == saved[0].read_bytes()
    assert Image.open(saved[0]).format == "PNG"

    gallery, _, seed, _, info = served.client.predict(
        model="tiny-c2i", class_label="travel", steps=2, seed=4, api_name="/class_to_image"
    )
    record = read_record(gallery[0]["image"])
    assert (record.class_label, record.class_name, record.seed, record.pipeline) == (3, "travel", 4, "class-to-image")

    # seed -1 draws a random seed and reports it
    _, _, seed, _, info = served.client.predict(model="tiny-t2i", prompt="the sun", steps=1, api_name="/text_to_image")
    assert seed >= 0 and info["seeds"] == [seed]


def _wait_running(service, job, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job.status()
        if service.running() and status.progress_data:
            return
        time.sleep(0.05)
    raise AssertionError("the generation never started")


def test_cancel_stops_a_long_generation(served):
    client, service = served.client, served.service
    before = service.stats["interrupted"]
    job = client.submit(model="tiny-t2i", prompt="a blue dog", steps=250, batch_count=16, api_name="/text_to_image")
    _wait_running(service, job)
    start = time.monotonic()
    assert client.predict(api_name="/cancel") == "Cancelled 1 running generation(s)."
    gallery, _, _, status, info = job.result(timeout=30)
    assert time.monotonic() - start < 10
    assert info["interrupted"] and info["steps_done"] < info["steps_total"] == 4000
    assert gallery == [] and status.startswith("Stopped after")

    # Gradio's own cancel (the Stop button's `cancels=`) also stops the sampling loop, not just the stream.
    job = client.submit(model="tiny-t2i", prompt="a blue dog", steps=250, batch_count=16, api_name="/text_to_image")
    _wait_running(service, job)
    job.cancel()
    deadline = time.monotonic() + 10
    while service.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.running() == 0 and service.stats["interrupted"] == before + 2


def test_read_parameters_fills_the_form(served):
    gallery, *_ = served.client.predict(
        model="tiny-t2i",
        prompt="a smiling face",
        negative_prompt="a dog",
        scheduler="euler",
        steps=5,
        guidance_scale=3.5,
        width=12,
        height=6,
        seed=77,
        api_name="/text_to_image",
    )
    result = served.client.predict(handle_file(gallery[0]["image"]), api_name="/read_parameters")
    record, infotext, status = result[:3]
    assert "Text to image" in status
    expected = {
        "prompt": "a smiling face",
        "negative_prompt": "a dog",
        "scheduler": "euler",
        "steps": 5,
        "guidance_scale": 3.5,
        "width": 12,
        "height": 6,
        "seed": 77,
        "model": "tiny-t2i",
    }
    assert {k: record[k] for k in expected} == expected
    assert infotext.startswith("a smiling face\nNegative prompt: a dog\nSteps: 5, Sampler: Euler")
    # the text-to-image form: model, prompt, negative, scheduler, steps, guidance, width, height, seed, batch x2
    form = ["tiny-t2i", "a smiling face", "a dog", "euler", 5, 3.5, 12, 6, 77, 1, 1]
    assert any(list(result[i : i + len(form)]) == form for i in range(3, len(result))), result


def test_bad_requests_get_messages_and_the_server_stays_up(served, tmp_path):
    client = served.client
    bad = [
        (dict(model="tiny-t2i", prompt="   "), "prompt is empty"),
        (dict(model="tiny-t2i", prompt="a" * 5000), "limit is 4000"),
        (dict(model="tiny-t2i", prompt="a cat", width=7), "not a multiple of 2"),
        (dict(model="tiny-t2i", prompt="a cat", width=640), "maximum"),
        (dict(model="../../etc", prompt="a cat"), "Unknown model"),
        (dict(model="tiny-c2i", prompt="a cat"), "is a class-to-image model; this form generates text-to-image"),
        (dict(model="tiny-t2i", prompt="a cat", seed=-5), "less than minimum value -1"),
    ]
    for kwargs, message in bad:
        with pytest.raises(AppError, match=message):
            client.predict(**kwargs, steps=1, api_name="/text_to_image")
    with pytest.raises(AppError, match="(?i)safetensors|not supported yet"):  # a listed LoRA that is not one
        client.predict(model="tiny-t2i", prompt="a cat", lora="style", steps=1, api_name="/text_to_image")
    with pytest.raises(AppError, match="not in the list of choices"):  # never a path
        client.predict(model="tiny-t2i", prompt="a cat", lora="../../x", steps=1, api_name="/text_to_image")
    with pytest.raises(AppError, match="Unknown class 'dragons'"):
        client.predict(model="tiny-c2i", class_label="dragons", steps=1, api_name="/class_to_image")

    not_png = tmp_path / "notes.png"
    not_png.write_text("this is not an image")
    with pytest.raises(AppError, match="not an image"):
        client.predict(handle_file(str(not_png)), api_name="/read_parameters")
    plain = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(plain)
    with pytest.raises(AppError, match="carries no generation parameters"):
        client.predict(handle_file(str(plain)), api_name="/read_parameters")
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(21 * 1024 * 1024))
    with pytest.raises(ValueError, match="exceeds the maximum file size"):  # refused by the client ...
        client.predict(handle_file(str(huge)), api_name="/read_parameters")
    with huge.open("rb") as f:  # ... and by the server, for clients that do not check
        response = httpx.post(f"{served.url}gradio_api/upload", files={"files": ("huge.png", f, "image/png")})
    assert response.status_code == 413, response.text

    # still serving
    gallery, *_ = client.predict(model="tiny-t2i", prompt="a cat", steps=1, api_name="/text_to_image")
    assert len(gallery) == 1


def test_history_and_file_access(served):
    client = served.client
    client.predict(model="tiny-t2i", prompt="a green tree", steps=1, seed=3, api_name="/text_to_image")
    history = client.predict(api_name="/history")
    assert history and history[0]["caption"] == "a green tree · seed 3"
    # another session has its own (empty) history
    assert Client(served.url, verbose=False).predict(api_name="/history") == []
    # nothing outside the output folder is served
    model_file = next(Path(served.service.catalog.get("tiny-t2i").path).rglob("*.safetensors"))
    for path in ("/etc/passwd", str(model_file)):
        response = httpx.get(f"{served.url}gradio_api/file={path}")
        assert response.status_code in (403, 404), path


# ---- the service underneath, without a server ------------------------------------------------------------------


class FakePipe:
    """Counts how many calls run at once on this pipeline."""

    def __init__(self, name):
        self.name, self.active, self.most = name, 0, 0
        self.lock = threading.Lock()

    def set_progress_bar_config(self, **kwargs):
        pass

    def attention_label(self):
        return "sdpa"

    def __call__(self, prompt=None, negative_prompt="", seed=0, num_images_per_prompt=1, class_labels=None, **kwargs):
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        time.sleep(0.2)
        with self.lock:
            self.active -= 1
        seeds = [seed + i for i in range(num_images_per_prompt)]
        records = [GenerationRecord(pipeline="text-to-image", model=self.name, prompt=prompt, seed=s) for s in seeds]
        images = [Image.new("RGB", (8, 8)) for _ in seeds]
        return SimpleNamespace(images=images, records=records, seeds=seeds, interrupted=False)


def test_service_keeps_an_lru_cache_and_one_call_per_pipeline(tiny_models_dir, tmp_path):
    loads, pipes = [], {}

    def loader(name):
        loads.append(name)
        pipes[name] = FakePipe(name)
        return pipes[name]

    service = GenerationService(Catalog(roots=[tiny_models_dir]), tmp_path, cache_size=1, loader=loader)
    jobs = [service.submit(GenerationRequest(model="tiny-t2i", prompt=f"a cat {i}", seed=i), f"s{i}") for i in range(3)]
    results = [job.wait(30) for job in jobs]
    assert [r.seeds for r in results] == [[0], [1], [2]]
    assert loads == ["tiny-t2i"] and pipes["tiny-t2i"].most == 1  # three requests, one load, never interleaved
    assert all(p.is_file() and tmp_path in p.parents for r in results for p in r.paths)
    assert [r.prompt for _, r in service.history("s1")] == ["a cat 1"]

    service.submit(GenerationRequest(model="tiny-c2i", class_label="food"), "s").wait(30)
    service.submit(GenerationRequest(model="tiny-t2i", prompt="a dog"), "s").wait(30)
    assert loads == ["tiny-t2i", "tiny-c2i", "tiny-t2i"] and service.loaded_models() == ["tiny-t2i"]


def test_service_validates_before_loading(tiny_models_dir, tmp_path):
    service = GenerationService(Catalog(roots=[tiny_models_dir]), tmp_path, loader=lambda name: pytest.fail("loaded"))
    spec = service.spec("tiny-t2i")
    assert (spec.multiple, spec.default_size, spec.max_side) == (2, 8, 32)
    assert size_for_aspect(spec, "16:9") == (10, 6) and size_for_aspect(spec, "1:1") == (8, 8)
    cases = [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="a", steps=0), "Steps must be between"),
        (dict(prompt="a", guidance_scale=float("nan")), "finite"),
        (dict(prompt="a", width=34), "between 2 and 32"),
        (dict(prompt="a", height=5), "not a multiple of 2"),
        (dict(prompt="a", batch_size=9), "Batch size"),
        (dict(prompt="a", attention="flash9"), "Unknown attention variant"),
        (dict(prompt="a", lora="style"), "Unknown LoRA 'style'. Available: none installed"),
        (dict(prompt="a", scheduler="warp"), "Unknown scheduler"),
    ]
    for fields, message in cases:
        with pytest.raises(InputError, match=message):
            service.submit(GenerationRequest(model="tiny-t2i", **fields))
    with pytest.raises(InputError, match="Unknown model"):
        service.submit(GenerationRequest(model="/etc/passwd", prompt="a"))
