"""The glass-to-glass benchmark's clients and its server process (scripts/bench_g2g.py drives them; the
numbers come from runtime/g2g.py). Each client returns, per stream, the report runtime/g2g.py reads:
{"now", "started", "records"} on its own clock, in milliseconds.

    browser  headless Chromium, the real page (static/index.html with static/g2g.js on) in N frames of
             static/g2g.html, its fake camera playing a clip whose frames carry the counter code:
             capture -> page -> JPEG -> server -> JPEG -> page -> canvas -> the next animation frame.
             Glass to glass, save the real camera's exposure and the display's scan-out: headless
             Chromium has no screen, so display is when the compositor's frame with those pixels began.
    python   a WebSocket client per stream (aiohttp), sending pre-encoded JPEGs of the same code at the
             model's size on a 1/fps schedule; capture is the schedule's tick, display is when the reply
             is decoded. Not glass to glass (no camera, page or screen): for machines without Chromium,
             as the GPU machine, where it measures the server and the network path only.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mirage.core.errors import MirageError
from mirage.runtime.g2g import COUNTER_PERIOD, code_luma, read_code, write_clip
from mirage.runtime.server import HEADER, JPEG

# The browser client's Chromium: Debian's, or one unpacked in a prefix (scripts/make_chromew.sh packs one for
# machines that cannot install it; scripts/gpu_session.sh's `chrome` stage unpacks it and sets these variables).
BROWSER_ENV = {"MIRAGE_CHROMIUM": "/usr/bin/chromium", "MIRAGE_CHROMEDRIVER": "/usr/bin/chromedriver",
               "MIRAGE_CHROMIUM_LIBRARY_PATH": "", "MIRAGE_CHROMIUM_FLAGS": ""}


@dataclass(frozen=True)
class Browser:
    """Where Chromium and its driver are, the environment both run in and the flags Chromium gets beyond the
    benchmark's own."""
    chromium: Path
    chromedriver: Path
    env: dict[str, str]
    flags: tuple[str, ...]

    def present(self) -> bool:
        return self.chromium.exists() and self.chromedriver.exists()

    def profile_flags(self, folder: Path) -> list[str]:
        """The browser's profile in `folder`; none for Chromium's headless shell (make_chromew.sh's, the smaller
        binary), which opens no page when chromedriver is given a profile (chromedriver then leaves out its
        first URL) and so fails the session: chromedriver's own temporary profile then."""
        return [] if "headless-shell" in self.chromium.name else [f"--user-data-dir={folder}"]

    def version(self) -> str:
        return subprocess.run([self.chromium, "--version"], capture_output=True, text=True, env=self.env) \
            .stdout.strip()


def browser(environ=os.environ) -> Browser:
    """The browser of `environ`: MIRAGE_CHROMIUM and MIRAGE_CHROMEDRIVER (default Debian's /usr/bin/chromium and
    /usr/bin/chromedriver); MIRAGE_CHROMIUM_LIBRARY_PATH (the prefix's library folders) goes before
    LD_LIBRARY_PATH for the driver and the browser alone, since the benchmark's and the server's libraries
    (PyTorch's) must stay the system's; MIRAGE_CHROMIUM_FLAGS: more flags, space-separated (e.g.
    --disable-dev-shm-usage where /dev/shm is small)."""
    get = {k: environ.get(k) or v for k, v in BROWSER_ENV.items()}
    env = dict(environ)
    if get["MIRAGE_CHROMIUM_LIBRARY_PATH"]:
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, (get["MIRAGE_CHROMIUM_LIBRARY_PATH"],
                                                        environ.get("LD_LIBRARY_PATH"))))
    return Browser(Path(get["MIRAGE_CHROMIUM"]), Path(get["MIRAGE_CHROMEDRIVER"]), env,
                   tuple(get["MIRAGE_CHROMIUM_FLAGS"].split()))


class G2GError(MirageError):
    """The benchmark could not run: the server did not start, a stream was refused, Chromium is missing."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(command: list[str], startup_s: float = 120.0):
    """`command` (mirage-serve and its options, without --port) on a free loopback port; yields its URL
    once /health answers, and stops it as Ctrl-C would at the end. Its output goes to a temporary log,
    quoted in the error when it does not start."""
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen([*command, "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + startup_s
            while not _answers(url + "/health"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise G2GError(f"the server did not start ({' '.join(command)}): "
                                   f"{log.read().decode(errors='replace')[-2000:]}")
                time.sleep(0.1)
            yield url
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1):
            return True
    except OSError:
        return False


# -- the Python client ------------------------------------------------------------------------------
def code_jpegs(size: int, count: int) -> list[bytes]:
    """JPEGs (quality 90, as the page sends) of the codes of frames 0 .. count - 1 at size x size."""
    from PIL import Image

    out = []
    for n in range(count):
        buf = io.BytesIO()
        Image.fromarray(np.repeat(code_luma(n, size)[:, :, None], 3, 2)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _shown_code(jpeg: bytes) -> int | None:
    from PIL import Image

    return read_code(np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))


async def python_stream(url: str, seconds: float, fps: float, clip: list[bytes], decoder: ThreadPoolExecutor) \
        -> dict:
    """One stream for `seconds` at `fps`, sending clip[n % len(clip)] as frame n (the JPEGs of code_jpegs;
    [b""] for a generation model: the header alone). Replies are decoded in `decoder`'s threads, off the
    loop that sends."""
    from aiohttp import ClientSession, WSMsgType

    loop, now = asyncio.get_running_loop(), lambda: time.perf_counter() * 1e3
    started, records, errors = now(), {}, []
    async with ClientSession() as session, session.ws_connect(url.replace("http", "ws", 1) + "/ws") as ws:
        hello = await ws.receive_json()
        if hello["type"] != "hello":
            raise G2GError(f"the server refused a stream: {hello.get('message', hello)}")

        async def receive():
            newest = -1
            async for msg in ws:
                if msg.type != WSMsgType.BINARY:
                    message = json.loads(msg.data) if msg.type == WSMsgType.TEXT else {}
                    if message.get("type") == "error":  # the server refused a frame: the run says why
                        errors.append(message["message"])
                    continue
                frame_id = HEADER.unpack_from(msg.data)[0]
                r = records[frame_id]
                r["receive"] = now()
                if frame_id < newest:  # as the page: an older frame is never shown over a newer one
                    continue
                newest = frame_id
                try:
                    shown = await loop.run_in_executor(decoder, _shown_code, msg.data[HEADER.size:]) \
                        if clip[0] else None
                except OSError:  # PIL's "cannot identify image": a broken reply is the server's bug, reported
                    errors.append("replies that are not an image a decoder reads (their counter: not legible)")
                    shown = None
                r["drawn"] = r["display"] = now()
                r["counter_out"] = shown

        receiver = asyncio.create_task(receive())
        first = now()
        for n in range(int(seconds * fps) + 1):
            tick = first + 1e3 * n / fps  # the camera's frame n
            await asyncio.sleep(max(0.0, tick - now()) / 1e3)
            records[n] = {"id": n, "counter_in": n % COUNTER_PERIOD if clip[0] else None, "capture": tick,
                          "capture_source": "schedule", "sample": tick, "send": None, "receive": None,
                          "drawn": None, "display": None, "counter_out": None}
            await ws.send_bytes(HEADER.pack(n, JPEG, tick) + clip[n % len(clip)])
            records[n]["send"] = now()
        await asyncio.sleep(1.0)  # replies in flight
        receiver.cancel()
        with suppress(asyncio.CancelledError):
            await receiver
    return {"now": now(), "started": started, "records": list(records.values()),
            "status": "; ".join(dict.fromkeys(errors)) or "ok"}


def python_streams(url: str, streams: int, seconds: float, fps: float, midway=lambda: None) -> list[dict]:
    """`streams` Python clients at once, each for `seconds` (plus a second for the last replies); the clip
    is encoded first, at the model's size from /health, so that no stream's time holds it. midway() is
    called (in a thread) halfway through."""
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        health = json.load(r)
    clip = code_jpegs(health["width"], min(int(seconds * fps) + 1, COUNTER_PERIOD)) if health["video_to_video"] \
        else [b""]

    async def run() -> list[dict]:
        with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as decoder:
            async def halfway():
                await asyncio.sleep(seconds / 2)
                await asyncio.get_running_loop().run_in_executor(None, midway)
            *reports, _ = await asyncio.gather(*(python_stream(url, seconds, fps, clip, decoder)
                                                 for _ in range(streams)), halfway())
            return reports
    return asyncio.run(run())


# -- the browser client -----------------------------------------------------------------------------
PAGES_READY = """return [...document.querySelectorAll('iframe')].every(f => f.contentWindow.mirageStats
    && f.contentDocument.readyState === 'complete');"""
START = """for (const f of document.querySelectorAll('iframe')) {
  const d = f.contentDocument; d.getElementById('source').value = 'webcam'; d.getElementById('start').click(); }"""
REPORTS = """return [...document.querySelectorAll('iframe')].map(f => ({...f.contentWindow.mirageStats.report(),
    status: f.contentDocument.getElementById('status').textContent}));"""


def browser_streams(url: str, streams: int, seconds: float, fps: int, workdir: Path, token: str | None = None,
                    midway=lambda: None) -> list[dict]:
    """`streams` copies of the page in one headless Chromium, each streaming its fake camera (a clip of the
    counter code at `fps`, long enough for the run) for `seconds`, then their reports (with the page's
    status line); midway() is called halfway through. Needs Chromium, its driver (browser(): Debian's
    chromium and chromium-driver, or MIRAGE_CHROMIUM and MIRAGE_CHROMEDRIVER) and selenium."""
    chrome = browser()
    if not chrome.present():
        raise G2GError(f"the browser client needs Chromium at {chrome.chromium} and chromedriver at "
                       f"{chrome.chromedriver} (apt-get install chromium chromium-driver, or MIRAGE_CHROMIUM and "
                       "MIRAGE_CHROMEDRIVER); --client python runs without them (not glass to glass)")
    try:
        from selenium import webdriver
    except ImportError as e:
        raise G2GError("the browser client needs selenium (pip install selenium)") from e
    workdir.mkdir(parents=True, exist_ok=True)
    clip = workdir / "g2g_clip.y4m"
    write_clip(clip, min(COUNTER_PERIOD, int((seconds + 10) * fps)), fps, 120)  # 10 s for the browser's start
    options = webdriver.ChromeOptions()
    options.binary_location = str(chrome.chromium)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-video-capture={clip}", "--use-fake-ui-for-media-stream",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
                 *chrome.profile_flags(workdir / "chromium"), "--window-size=1700,1400", *chrome.flags):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(str(chrome.chromedriver),
                                                                               env=chrome.env))
    try:
        query = f"?streams={streams}" + (f"&token={token}" if token else "")
        driver.get(f"{url}/static/g2g.html{query}")
        deadline = time.monotonic() + 30
        while not driver.execute_script(PAGES_READY):
            if time.monotonic() > deadline:
                raise G2GError("the pages did not load within 30 s")
            time.sleep(0.1)
        driver.execute_script(START)
        time.sleep(seconds / 2)
        midway()
        time.sleep(seconds / 2 + 1.0)  # and a second for the last replies
        return driver.execute_script(REPORTS)
    finally:
        driver.quit()
