"""A real browser on /ui: Debian's headless Chromium, driven by Selenium through Debian's chromedriver.

Nothing is downloaded: the browser and driver are the system packages (`.ci/run` installs them).
Without them the test is skipped, unless PIPELINE_REQUIRE_BROWSER=1 (set by CI) makes that a failure.
"""

from __future__ import annotations

import os
import shutil
import time

import httpx
import numpy as np
from PIL import Image
import pytest

from test_service import toy_files

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        message = "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("PIPELINE_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-extensions", f"--user-data-dir={tmp_path / 'chromium'}",
                 "--window-size=1280,2000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_state(driver, states: tuple[str, ...], timeout: float = 30) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = driver.execute_script("return document.body.dataset.state || ''")
        if state in states:
            return state
        time.sleep(0.1)
    raise AssertionError(f"the page did not reach {states} in {timeout} s")


def test_ui_shows_what_classify_returns(served, toy_folder, browser, tmp_path_factory, capsys):
    from selenium.webdriver.common.by import By

    url, _, _ = served
    jpeg = next(p for p in toy_files(toy_folder) if p.suffix == ".jpg" and p.parent.name == "boat")
    expected = httpx.post(f"{url}/classify", files={"image": (jpeg.name, jpeg.read_bytes(), "image/jpeg")}).json()

    browser.get(f"{url}/ui")
    browser.find_element(By.ID, "file").send_keys(str(jpeg))
    assert wait_for_state(browser, ("done", "error")) == "done", browser.find_element(By.ID, "error").text

    label = browser.find_element(By.ID, "label")
    assert label.get_attribute("data-label") == expected["label"]
    assert label.text == f"{expected['label']} {expected['probabilities'][expected['label']]:.2f}"
    bars = browser.find_elements(By.CSS_SELECTOR, "#bars .bar")
    shown = {bar.get_attribute("data-class"): float(bar.get_attribute("data-probability")) for bar in bars}
    assert shown == expected["probabilities"]  # the very numbers /classify returns
    for bar in bars:
        name = bar.get_attribute("data-class")
        assert bar.find_element(By.CSS_SELECTOR, ".value").text == f"{expected['probabilities'][name]:.3f}"
    # Every picture the page shows has loaded and has a size.
    images = browser.find_elements(By.CSS_SELECTOR, "main img")
    assert len(images) >= 3 + 4 + 2 + 3  # preview, input, saliency; 4 kernels; filters, responses; 3 LeNet stages
    for image in images:
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", image), \
            image.get_attribute("alt")
    assert "Grad-CAM" in browser.find_element(By.ID, "saliency-caption").text
    # The out-of-scope flag is the answer's: shown as a warning when true, hidden when false.
    scope = browser.find_element(By.ID, "scope")
    assert scope.get_attribute("data-out-of-scope") == str(expected["out_of_scope"]).lower()
    assert scope.is_displayed() is expected["out_of_scope"]

    # Noise is flagged by the service: the page then says so above the bars.
    noise = tmp_path_factory.mktemp("noise") / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(noise)
    flagged = httpx.post(f"{url}/classify", files={"image": ("noise.png", noise.read_bytes(), "image/png")}).json()
    browser.execute_script("document.body.dataset.state = ''")
    browser.find_element(By.ID, "file").send_keys(str(noise))
    assert wait_for_state(browser, ("done", "error")) == "done"
    assert scope.get_attribute("data-out-of-scope") == str(flagged["out_of_scope"]).lower()
    if flagged["out_of_scope"]:
        assert "none of the classes" in scope.text

    shot = tmp_path_factory.mktemp("screenshots") / "ui.png"
    browser.save_screenshot(str(shot))
    with capsys.disabled():
        print(f"\nscreenshot of /ui: {shot}")

    # A file that is not an image: the page shows the service's sentence, not a broken picture.
    bad = tmp_path_factory.mktemp("bad") / "notes.jpg"
    bad.write_text("not really a jpeg")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    assert wait_for_state(browser, ("error",)) == "error"
    assert "notes.jpg" in browser.find_element(By.ID, "error").text
