"""The glass-to-glass benchmark (runtime/g2g.py, runtime/g2g_client.py, static/g2g.js): the frame
counter survives JPEG and reads back, the clip carries it, the summary counts what it says, and
against a real server (loopback) the measured times are consistent and a slower server shows as a
larger latency, through the Python client and through headless Chromium with the real page (skipped
where /usr/bin/chromium is absent)."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import CKPT_V2V, ROOT
from mirage.runtime.g2g import (CHECK_SALT, COUNTER_PERIOD, GRID, check_records, code_luma, code_word, read_code,
                                stream_summary, summarize, write_clip)
from mirage.runtime.g2g_client import browser, browser_streams, python_streams, serving

STANDIN = ROOT / "tests" / "serve_standin.py"


def through_jpeg(luma: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(np.repeat(luma[:, :, None], 3, 2)).save(buf, "JPEG", quality=90)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("size", [32, 50, 64, 512])
def test_every_counter_reads_back_through_jpeg(size):
    for n in [*range(0, COUNTER_PERIOD, 97), COUNTER_PERIOD - 1]:
        assert read_code(through_jpeg(code_luma(n, size))) == n
    # levels moved and squeezed (as the model and a colour conversion do): still read
    squeezed = (code_luma(1234, size).astype(np.float32) * 0.3 + 90).astype(np.uint8)
    assert read_code(through_jpeg(squeezed)) == 1234


def test_a_wrong_bit_or_a_flat_picture_is_no_code():
    cells = code_luma(777, 32)
    flipped = cells.copy()
    flipped[:8, :8] = 251 - flipped[:8, :8]  # cell 0 (bit 0) inverted: the check no longer holds
    assert read_code(np.repeat(flipped[:, :, None], 3, 2)) is None
    for level in (0, 128, 255):
        assert read_code(np.full((32, 32, 3), level, np.uint8)) is None
    assert code_word(0) >> 12 == CHECK_SALT and code_word(COUNTER_PERIOD + 5) == code_word(5)


def test_the_clip_shows_frame_n_in_its_central_square(tmp_path):
    clip = tmp_path / "clip.y4m"
    write_clip(clip, 5, 30, 48)
    data = clip.read_bytes()
    header, _, body = data.partition(b"\n")
    assert header == b"YUV4MPEG2 W64 H48 F30:1 Ip A1:1 C420jpeg"
    frame_bytes = len(b"FRAME\n") + 64 * 48 * 3 // 2
    assert len(body) == 5 * frame_bytes
    for n in range(5):
        start = n * frame_bytes + len(b"FRAME\n")
        luma = np.frombuffer(body[start:start + 64 * 48], np.uint8).reshape(48, 64)
        assert read_code(np.repeat(luma[:, 8:56, None], 3, 2)) == n
        assert (luma[:, :8] == luma[0, 0]).all()  # outside the square: flat


def record(i, capture, display=None, receive=None, counter_out=None):
    return {"id": i, "counter_in": i, "capture": capture, "capture_source": "schedule", "sample": capture,
            "send": capture + 1, "receive": receive if receive is not None else (display - 2 if display else None),
            "drawn": display, "display": display, "counter_out": counter_out}


def test_the_summary_counts_latency_drops_order_and_first_frame():
    # frames every 10 ms from t=100; latency 30, 40, 30, 40...; frame 3 never answered; frame 5's reply after 6's
    records = [record(i, 100 + 10 * i, 130 + 10 * i + 10 * (i % 2), counter_out=i) for i in range(10)]
    records[3].update(receive=None, drawn=None, display=None, counter_out=None)
    records[5].update(receive=records[6]["receive"] + 1, drawn=None, display=None, counter_out=None)
    report = {"started": 90.0, "now": 300.0, "records": records}
    s = stream_summary(report, warmup_ms=0.0, grace_ms=0.0)
    assert (s["sent"], s["displayed"], s["dropped"], s["out_of_order"], s["sent_out_of_order"]) == (10, 8, 2, 1, 0)
    assert s["time_to_first_frame_ms"] == pytest.approx(130 - 90)
    shown_latency = [30 + 10 * (i % 2) for i in range(10) if i not in (3, 5)]
    assert s["latency_ms"]["p50"] == pytest.approx(np.percentile(shown_latency, 50))
    assert s["latency_ms"]["mean"] == pytest.approx(np.mean(shown_latency))
    assert s["jitter_ms"] == pytest.approx(np.mean(np.abs(np.diff(shown_latency))))
    assert s["fps"] == pytest.approx(8 / 0.210)
    assert (s["counter_out_legible"], s["counter_out_matches"], s["problems"]) == (8, 8, [])
    assert s["capture_fit"]["ms_per_frame"] == pytest.approx(10) and s["capture_fit"]["residual_ms"] < 1e-6
    records[8]["send"] = records[9]["send"] + 1  # sent after frame 9: one out of order on the way out
    assert stream_summary(report, 0.0, 0.0)["sent_out_of_order"] == 1
    records[8]["send"] = records[8]["capture"] + 1
    # the window: frames sent in the warm-up or the grace are not counted
    assert stream_summary(report, warmup_ms=35.0, grace_ms=130.0)["sent"] == 4  # sends 131 .. 161: ids 3 .. 6
    both = summarize([report, report], 0.0, 0.0)
    assert (both["streams"], both["sent"], both["dropped"]) == (2, 20, 4)


def test_inconsistent_records_are_named():
    good = record(0, 100.0, 150.0, counter_out=0)
    assert check_records([good]) == []
    assert "display" in check_records([{**good, "display": 120.0}])[0]  # before drawn
    assert "capture" in check_records([{**good, "capture": 104.0}])[0]  # after sample
    assert "shown 9" in check_records([{**good, "counter_out": 9}])[0]


def standin(step_ms: float, slots: int) -> list[str]:
    """mirage-serve over tests/serve_standin.py's pool: each step sleeps step_ms and echoes its inputs, so the
    code comes back legible and the server's delay is known."""
    return [sys.executable, str(STANDIN), str(step_ms), str(CKPT_V2V), "--device", "cpu", "--slots", str(slots),
            "--deadline-ms", "2000", "--calibrate-steps", "0"]


def test_python_client_a_slower_server_is_a_larger_latency():
    p50 = {}
    for step_ms in (5, 150):
        with serving(standin(step_ms, 1)) as url:
            (report,) = python_streams(url, 1, seconds=2.0, fps=20)
        s = stream_summary(report, warmup_ms=500.0, grace_ms=300.0)
        assert s["problems"] == [] and s["displayed"] >= 3
        assert s["counter_out_legible"] == s["counter_out_matches"] == s["displayed"]
        p50[step_ms] = s["latency_ms"]["p50"]
    assert p50[150] >= 150 and p50[150] - p50[5] >= 100, p50


def test_the_browser_is_debians_unless_the_environment_names_one():
    default = browser({"LD_LIBRARY_PATH": "/opt/x"})
    assert (default.chromium, default.chromedriver) == (Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver"))
    assert default.env == {"LD_LIBRARY_PATH": "/opt/x"} and default.flags == ()  # Debian's: nothing changed
    unpacked = browser({"MIRAGE_CHROMIUM": "/tmp/c/chrome", "MIRAGE_CHROMEDRIVER": "/tmp/c/driver", "HOME": "/root",
                        "MIRAGE_CHROMIUM_LIBRARY_PATH": "/tmp/c/lib:/tmp/c/usr/lib", "LD_LIBRARY_PATH": "/opt/x",
                        "MIRAGE_CHROMIUM_FLAGS": "--disable-dev-shm-usage  --foo=1"})
    assert (unpacked.chromium, unpacked.chromedriver) == (Path("/tmp/c/chrome"), Path("/tmp/c/driver"))
    assert unpacked.env["LD_LIBRARY_PATH"] == "/tmp/c/lib:/tmp/c/usr/lib:/opt/x" and unpacked.env["HOME"] == "/root"
    assert unpacked.flags == ("--disable-dev-shm-usage", "--foo=1") and not unpacked.present()
    assert browser({"MIRAGE_CHROMIUM_LIBRARY_PATH": "/tmp/c/lib"}).env["LD_LIBRARY_PATH"] == "/tmp/c/lib"
    assert default.profile_flags(Path("/w")) == unpacked.profile_flags(Path("/w")) == ["--user-data-dir=/w"]
    shell = browser({"MIRAGE_CHROMIUM": "/tmp/c/usr/lib/chromium/chromium-headless-shell"})
    assert shell.profile_flags(Path("/w")) == []  # chromedriver's own profile: the shell opens no page with ours


needs_chromium = pytest.mark.skipif(not browser().present(),
                                    reason="needs Debian's chromium and chromium-driver (or MIRAGE_CHROMIUM...)")


@needs_chromium
def test_browser_glass_to_glass_with_the_bundled_model(tmp_path):
    pytest.importorskip("selenium")
    with serving([sys.executable, "-m", "mirage.cli.serve", str(CKPT_V2V), "--device", "cpu", "--slots", "1"]) as url:
        (report,) = browser_streams(url, 1, seconds=4.0, fps=30, workdir=tmp_path)
    assert "video-to-video" in report["status"]
    s = stream_summary(report, warmup_ms=1000.0, grace_ms=500.0)
    assert s["problems"] == [], s["problems"]  # capture <= sample <= send <= receive <= drawn <= display
    assert s["displayed"] >= 3 and s["time_to_first_frame_ms"] > 0
    assert s["capture_source"] == ["captureTime"]  # the camera's own timestamp, not the page's sampling
    assert 28 < s["capture_fit"]["ms_per_frame"] < 40  # ... on the camera's clock: one frame of the 30 FPS clip apart
    assert s["counter_in_read"] == s["sent"] and s["counter_backwards"] == 0  # the camera's counter, in order
    assert s["counter_out_matches"] >= s["displayed"] // 2  # tiny-v2v keeps the code legible
    assert s["latency_ms"]["p50"] >= s["stages_ms"]["send_to_receive"]["p50"]


@needs_chromium
def test_browser_two_streams_a_slower_server_is_a_larger_latency(tmp_path):
    pytest.importorskip("selenium")
    p50 = {}
    for step_ms in (5, 200):
        with serving([*standin(step_ms, 2), "--token", "s3cret"]) as url:  # g2g.html passes ?token= on
            reports = browser_streams(url, 2, seconds=3.0, fps=30, workdir=tmp_path / str(step_ms), token="s3cret")
        row = summarize(reports, 1000.0, 500.0)
        assert row["streams"] == 2 and all(s["displayed"] >= 3 for s in row["per_stream"]), row
        assert all(s["problems"] == [] for s in row["per_stream"])
        assert row["counter_out_matches"] == row["displayed"]  # the stand-in echoes: every code comes back
        p50[step_ms] = row["latency_ms"]["p50"]
    assert p50[200] >= 200 and p50[200] - p50[5] >= 120, p50
