"""The shipped defaults in a real browser, as a person meets them after `python app.py`: upload an image to the
control tab and generate with the canny adapter; upload a clip to the video tab and predict the next frames.

Needs Debian's ``chromium`` and the ``playwright`` package (see tests/test_browser.py). Set
``DIT_STUDIO_SCREENSHOTS=DIR`` to save a screenshot of each tab after its generation (how the README's
``assets/screenshot-*.png`` are made).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

from serving import serve_app  # noqa: E402


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    with serve_app(["--output-dir", str(out)]) as (url, _):  # the shipped catalog, as `python app.py`
        yield url


@pytest.fixture()
def page(url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url, wait_until="domcontentloaded")
            yield page
        finally:
            browser.close()


def _screenshot(page, name: str) -> None:
    folder = os.environ.get("DIT_STUDIO_SCREENSHOTS")
    if folder:
        page.screenshot(path=str(Path(folder) / f"screenshot-{name}.png"), full_page=True)


def test_control_tab_upload_an_image_pick_canny_and_generate(page):
    expect = sync_api.expect
    page.get_by_role("tab", name="Control").click()
    page.locator("#control-image-1 input[type=file]").set_input_files(str(EXAMPLES / "astonished-face.png"))
    expect(page.locator("#control-preview-1 img")).to_be_visible(timeout=60_000)  # the canny map it will follow
    adapter = page.get_by_label("Adapter").first
    expect(adapter).to_have_value(re.compile(r"^canny\b(?!-)"))  # the EasyControl canny adapter, preselected
    page.locator("#control-prompt textarea").fill("astonished face")
    page.locator("#control-generate").click()
    expect(page.locator("#control-status")).to_contain_text("image(s) in", timeout=120_000)
    expect(page.locator("#control-status")).to_contain_text("canny 1")
    assert page.locator("#control-gallery img").count() >= 1
    _screenshot(page, "control")


def test_video_tab_upload_a_clip_and_predict_the_next_frames(page):
    expect = sync_api.expect
    page.get_by_role("tab", name="Video").click()
    page.locator("#video-upload input[type=file]").set_input_files(str(EXAMPLES / "sprite-clip.gif"))
    page.get_by_label("predict the next frames").check()
    page.locator("#video-generate").click()
    expect(page.locator("#video-status")).to_contain_text("predict the next frames", timeout=120_000)
    expect(page.locator("#video-status")).to_contain_text("given")
    expect(page.locator("#video-result video")).to_be_visible(timeout=60_000)
    _screenshot(page, "video")


def test_text_tab_type_a_prompt_and_get_four_images(page):
    expect = sync_api.expect
    page.locator("#text_to_image-prompt textarea").fill("grinning face")
    page.get_by_label("Batch size").first.fill("4")
    page.get_by_label("Batch size").first.press("Enter")
    page.locator("#text_to_image-generate").click()
    expect(page.locator("#text_to_image-status")).to_contain_text("4 image(s)", timeout=120_000)
    assert page.locator("#text_to_image-gallery img").count() >= 4
    _screenshot(page, "text-to-image")
