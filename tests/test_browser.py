"""The web UI in a real browser (headless Chromium via Playwright): type a prompt, generate, see the image.

Needs Debian's ``chromium`` (``apt-get install chromium``; override with ``CHROMIUM_PATH``) and the Python
``playwright`` package; Playwright's own browser download is not used. Set ``DIT_STUDIO_SCREENSHOT=path.png``
to save a screenshot of the page after the generation (how ``assets/screenshot-ui.png`` is made).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium, or set CHROMIUM_PATH)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

from serving import serve_app  # noqa: E402


@pytest.fixture(scope="module")
def url(tiny_models_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    with serve_app(["--models-dir", str(tiny_models_dir), "--no-default-models", "--output-dir", str(out)]) as (url, _):
        yield url


def test_type_a_prompt_generate_and_see_the_image(url):
    expect = sync_api.expect
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            prompt = page.locator("#text_to_image-prompt textarea")
            expect(prompt).to_be_visible(timeout=30_000)
            prompt.fill("a smiling face with a heart")
            page.locator("#text_to_image-generate").click()
            image = page.locator("#text_to_image-gallery img").first
            expect(image).to_be_visible(timeout=60_000)
            expect(page.locator("#text_to_image-status")).to_contain_text(re.compile(r"1 image\(s\) in"))
            assert ".png" in (image.get_attribute("src") or "")
            seed = page.get_by_label("Seed used")
            assert int(seed.input_value()) >= 0
            shot = os.environ.get("DIT_STUDIO_SCREENSHOT")
            if shot:
                page.screenshot(path=shot, full_page=True)
        finally:
            browser.close()
