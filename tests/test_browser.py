"""The page in a real browser: Debian's chromium, headless, with Chrome's fake camera, against
`mirage-serve` (the bundled tiny-v2v on the CPU) on 127.0.0.1. Skipped where /usr/bin/chromium is
absent (.ci/run installs it). Saves the screenshot docs/serve_screenshot.png."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import CKPT_V2V, ROOT

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver)")
SCREENSHOT = ROOT / "docs" / "serve_screenshot.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mirage.cli.serve", str(CKPT_V2V), "--port", str(port),
                             "--device", "cpu", "--slots", "2"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):  # up to 30 s: import torch, load the model
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    json.load(r)
                break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode()
                time.sleep(0.1)
        else:
            pytest.fail("mirage-serve did not answer /health within 30 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream",
                 "--use-fake-ui-for-media-stream", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'chromium'}",
                 "--window-size=1000,760"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    yield driver
    driver.quit()


def test_the_page_streams_the_fake_webcam_through_the_model(server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(server + "/")
    Select(browser.find_element(By.ID, "source")).select_by_value("webcam")
    browser.find_element(By.ID, "start").click()
    time.sleep(5)
    received = int(browser.find_element(By.ID, "frames-received").text)
    status = browser.find_element(By.ID, "status").text
    assert received >= 10, f"{received} frames in 5 s; the page says: {status}"
    assert "video-to-video" in status
    assert browser.find_element(By.ID, "streams").text == "1 of 2"
    browser.save_screenshot(str(SCREENSHOT))
