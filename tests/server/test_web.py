"""Headless Chromium (Debian's chromium, driven by Playwright) loads the web page at /, submits
a prompt, waits for the progress bar to finish and checks that the image is shown. With
ZIMAGE_SCREENSHOT=PATH the page is saved there (docs/serve-web.png in the README was made so)."""
import os
import shutil

import pytest

CHROMIUM = os.environ.get("ZIMAGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium (apt install chromium)")
def test_web_page_generates_an_image(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 560})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/?size=64&steps=6")
            page.fill("#prompt", "a small house by a lake, watercolor")
            page.fill("#seed", "42")
            page.click("#go")
            page.wait_for_selector("#bar[data-done]", timeout=120_000)
            assert page.eval_on_selector("#bar", "b => b.value") == 1
            img = page.wait_for_selector("#result:not([hidden])", timeout=10_000)
            assert img.evaluate("i => i.complete && i.naturalWidth") == 64
            assert "seed 42" in page.inner_text("#status")
            assert page.eval_on_selector_all("#history img", "l => l.length") == 1
            # A second image joins the history.
            page.fill("#seed", "43")
            page.click("#go")
            page.wait_for_function("document.querySelectorAll('#history img').length == 2", timeout=120_000)
            assert not errors, errors
            page.screenshot(path=os.environ.get("ZIMAGE_SCREENSHOT") or str(tmp_path / "serve-web.png"))
        finally:
            browser.close()
