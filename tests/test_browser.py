"""The page in a real browser: Debian's chromium, headless, with Chrome's fake camera, against
`mirage-serve` (the bundled checkpoints on the CPU) on 127.0.0.1: the webcam, a video file and the
synthetic source through tiny-v2v, and tiny (generation). The webcam's screenshot goes to tmp_path,
or to docs/serve_screenshot.png with MIRAGE_UPDATE_SCREENSHOT=1 (so that a test run leaves the
tree clean). Skipped where /usr/bin/chromium is absent (.ci/run installs it)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from conftest import CKPT_GEN, CKPT_V2V, ROOT

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver)")
SCREENSHOT = ROOT / "docs" / "serve_screenshot.png"
BLOCK_SCREENSHOT = ROOT / "docs" / "serve_block_screenshot.png"  # the page with a prompt box and a strength slider
STANDIN = Path(__file__).with_name("serve_standin.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model: Path, *options: str, program: tuple[str, ...] = ("-m", "mirage.cli.serve")):
    """`mirage-serve MODEL OPTIONS` on a free loopback port, 2 slots, CPU; yields its URL. `program`: what
    Python runs (tests/serve_standin.py with its arguments: mirage-serve over a stand-in pool)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, *program, str(model), "--port", str(port),
                             "--device", "cpu", "--slots", "2", *options],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            # as conftest.py: one intra-op thread is fastest for these tiny tensors on a shared CPU
                            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("MIRAGE_TEST_THREADS", "1")})
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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(CHROMEDRIVER)))
    yield driver
    try:
        errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, f"the page logged errors: {errors}"  # an exception in app.js, a failed request
    finally:
        driver.quit()


def run_source(browser, source: str, seconds: float, file: Path | None = None) -> int:
    """Pick `source` on the page, start, wait, stop; the frames received meanwhile."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    before = int(browser.find_element(By.ID, "frames-received").text)
    Select(browser.find_element(By.ID, "source")).select_by_value(source)
    if file is not None:
        browser.find_element(By.ID, "file").send_keys(str(file))
    browser.find_element(By.ID, "start").click()
    time.sleep(seconds)
    received = int(browser.find_element(By.ID, "frames-received").text) - before
    assert received >= 3, f"{source}: {received} frames in {seconds} s; the page says: " \
                          f"{browser.find_element(By.ID, 'status').text}"
    return received


def stop(browser) -> None:
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "stop").click()
    time.sleep(0.3)


def screenshot(browser, tmp_path, path: Path) -> None:
    """The page's screenshot to tmp_path, or to `path` in docs/ with MIRAGE_UPDATE_SCREENSHOT=1."""
    shot = path if os.environ.get("MIRAGE_UPDATE_SCREENSHOT") else tmp_path / path.name
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_page_streams_a_webcam_a_video_file_and_a_synthetic_source(browser, tmp_path):
    from selenium.webdriver.common.by import By

    from mirage.core.video_io import VideoWriter

    clip = tmp_path / "clip.mp4"
    with VideoWriter(clip, fps=10) as writer:  # 2 s of a moving bar, 128x128 H.264
        for n in range(20):
            frame = np.full((32, 32, 3), -1.0, np.float32)
            frame[:, n:n + 8] = [1.0, 0.5, -0.5]
            writer.write(frame)
    with serving(CKPT_V2V) as url:
        browser.get(url + "/")
        assert browser.execute_script("return window.mirageStats") is None  # g2g.js stays off without #g2g
        run_source(browser, "webcam", 5)
        assert "video-to-video" in browser.find_element(By.ID, "status").text
        assert browser.find_element(By.ID, "streams").text == "1 of 2"
        assert not browser.find_element(By.ID, "conditioning").is_displayed()  # the U-Net takes no prompt
        screenshot(browser, tmp_path, SCREENSHOT)
        stop(browser)
        run_source(browser, "synthetic", 2)
        stop(browser)
        run_source(browser, "file", 2, clip)


def test_the_page_keeps_few_frames_unanswered(browser):
    """Over a stand-in answering frame by frame at 5 FPS (a 200 ms step) and the 30 FPS fake camera: the page
    skips frames rather than queue them, never more than MAX_AHEAD (4) sampled after the newest answered, where
    it had a step's worth of camera frames and more in flight (each costing an encode, then dropped by the
    server)."""
    from selenium.webdriver.common.by import By

    with serving(CKPT_V2V, program=(str(STANDIN), "200")) as url:
        browser.get(url + "/")
        run_source(browser, "webcam", 1)
        in_flight = []
        for _ in range(40):
            in_flight.append(browser.execute_script("return nextId - 1 - lastReply.id"))
            time.sleep(0.05)
        assert max(in_flight) <= browser.execute_script("return MAX_AHEAD"), in_flight
        assert "video-to-video" in browser.find_element(By.ID, "status").text


def test_a_generation_model_streams_without_input_behind_a_token(browser):
    from selenium.webdriver.common.by import By

    with serving(CKPT_GEN, "--token", "s3cret") as url:
        browser.get(url + "/?token=s3cret")  # the page passes its query on to /ws
        run_source(browser, "synthetic", 3)
        assert "generation" in browser.find_element(By.ID, "status").text


def wait_for_status(browser, text: str, seconds: float = 5.0) -> None:
    from selenium.webdriver.common.by import By

    for _ in range(int(seconds / 0.1)):
        if text in browser.find_element(By.ID, "status").text:
            return
        time.sleep(0.1)
    pytest.fail(f"the page did not say {text!r}; it says {browser.find_element(By.ID, 'status').text!r}")


def test_a_block_model_s_prompt_box_and_strength_slider_send_control_messages(browser, tmp_path):
    """Over the stand-in block model (blocks of 4 frames at 16 FPS, a prompt and a strength, streams starting at
    strength 0.6 as mirage-serve --strength 0.6 starts them): frames arrive, the prompt box and the slider show,
    the slider at the stream's 0.60 (the hello's), with no control sent to replace it by the page's default;
    typing a prompt or moving the slider is applied by the server (its `applied` answer on the page)."""
    from selenium.webdriver.common.by import By

    with serving(CKPT_V2V, program=(str(STANDIN), "20", "--block", "4", "--strength", "0.6")) as url:
        browser.get(url + "/")
        run_source(browser, "synthetic", 2)
        for element in ("conditioning", "prompt", "strength"):
            assert browser.find_element(By.ID, element).is_displayed(), element
        assert browser.find_element(By.ID, "strength").get_attribute("value") == "0.6"
        assert browser.find_element(By.ID, "strength-value").text == "0.60"
        assert "applied" not in browser.find_element(By.ID, "status").text
        browser.find_element(By.ID, "prompt").send_keys("a watercolor fox")
        wait_for_status(browser, 'applied: prompt "a watercolor fox"')
        screenshot(browser, tmp_path, BLOCK_SCREENSHOT)
        browser.execute_script("const s = document.getElementById('strength'); s.value = '0.8';"
                               "s.dispatchEvent(new Event('input'));")
        wait_for_status(browser, "applied: strength 0.80")
        assert browser.find_element(By.ID, "strength-value").text == "0.80"


def test_the_page_offers_a_served_dit_s_bank_prompts_and_applies_one(browser):
    """mirage-serve of the bundled DiT with its prompt bank: the page generates, its prompt box shows the
    stream's starting prompt (the hello's, --prompt's) and suggests the bank's names (the hello's `prompts`),
    and a name typed there is applied to the stream."""
    from selenium.webdriver.common.by import By

    dit = ROOT / "checkpoints" / "dit-tiny-taesd"
    with serving(dit, "--dit", "dit-tiny-taesd", "--prompt", "trained", "--prompt-bank",
                 str(dit / "prompts.safetensors")) as url:
        browser.get(url + "/")
        run_source(browser, "synthetic", 3)
        names = browser.execute_script("return [...document.querySelectorAll('#prompt-names option')]"
                                       ".map((o) => o.value)")
        assert names == ["empty", "trained"]
        box = browser.find_element(By.ID, "prompt")
        assert box.get_attribute("placeholder") == "e.g. empty, trained"
        assert box.get_attribute("value") == "trained" and "applied" not in browser.find_element(By.ID, "status").text
        box.clear()
        box.send_keys("empty")
        wait_for_status(browser, 'applied: prompt "empty"')
