"""The glass-to-glass benchmark's measure: a frame counter drawn into the camera's pictures, the clip
that carries it, and the per-frame records of a client turned into the numbers users ask for.

The counter code: the frame (a square, or the central square of a wider picture) is a GRID x GRID
board of black and white cells, 16 bits: a COUNTER_BITS-bit frame counter and a 4-bit check (the
XOR of its nibbles with CHECK_SALT, so that an all-black or all-white picture, or one bit misread,
is no code). Cells of 8 pixels at 32x32 line up with JPEG's 8x8 blocks, and black and white differ
in luma only, which the video-to-video models keep at full resolution: the code survives JPEG both
ways and, where the model keeps the picture's structure, the model too. runtime/static/g2g.js
reads the same code in the browser (same constants, same threshold rule).

A client (runtime/g2g_client.py: headless Chromium with the real page, or a Python WebSocket
client) records per frame, in milliseconds on its own clock:
    id          the sequence number the page sends with the frame (the server echoes it)
    counter_in  the code read from the picture sent (the camera frame it came from)
    capture     when the camera produced that picture (browser: the video frame's captureTime, or its
                presentation time where Chromium gives none; Python: when the picture was made)
    send        when the frame went into the socket
    receive     when its reply arrived (None: never)
    display     when the reply's pixels were on the page (browser: the first animation frame after
                it was drawn on the canvas) or decoded (Python: no screen)
    counter_out the code read from the displayed pixels (None: not legible after the model)
    drawn       False for a reply that came after a newer one and was not shown
Latency is display - capture, matched through `id` (the echoed sequence number): counter_out only
checks what was shown, as the model may not keep the code legible.
"""
from __future__ import annotations

import numpy as np

GRID = 4
COUNTER_BITS = 12
COUNTER_PERIOD = 1 << COUNTER_BITS
CHECK_SALT = 0b1010
MIN_CONTRAST = 24  # luma levels between the darkest and brightest cell below which no code is read
Y_LOW, Y_HIGH = 16, 235  # the clip's black and white (video range luma)


def code_word(counter: int) -> int:
    """The 16 bits of frame `counter` (mod COUNTER_PERIOD): the counter, then its check nibble."""
    n = counter % COUNTER_PERIOD
    check = (n ^ (n >> 4) ^ (n >> 8) ^ CHECK_SALT) & 0xF
    return n | check << COUNTER_BITS


def code_cells(counter: int) -> np.ndarray:
    """(GRID, GRID) bool, True = white: cell (r, c) is bit r * GRID + c of code_word."""
    word = code_word(counter)
    return np.array([(word >> i) & 1 for i in range(GRID * GRID)], bool).reshape(GRID, GRID)


def code_luma(counter: int, size: int) -> np.ndarray:
    """(size, size) uint8 luma of the code of `counter`, cells as even as integer pixels allow."""
    edges = np.arange(size) * GRID // size  # the cell of each row / column
    cells = code_cells(counter)[edges][:, edges]
    return np.where(cells, Y_HIGH, Y_LOW).astype(np.uint8)


def read_code(rgb: np.ndarray) -> int | None:
    """The counter shown by an (S, S, 3) uint8 RGB picture, or None: each cell's mean luma over its
    middle half, thresholded halfway between the darkest and the brightest cell (the model and JPEG move
    levels), then the check."""
    luma = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    size = luma.shape[0]
    means = np.empty(GRID * GRID, np.float32)
    for i in range(GRID * GRID):
        r, c = divmod(i, GRID)
        top, left, cell = r * size / GRID, c * size / GRID, size / GRID
        y0, y1 = int(top + cell / 4), max(int(top + cell / 4) + 1, int(top + 3 * cell / 4))
        x0, x1 = int(left + cell / 4), max(int(left + cell / 4) + 1, int(left + 3 * cell / 4))
        means[i] = luma[y0:y1, x0:x1].mean()
    low, high = means.min(), means.max()
    if high - low < MIN_CONTRAST:
        return None
    word = sum(1 << i for i, m in enumerate(means) if m > (low + high) / 2)
    counter = word & (COUNTER_PERIOD - 1)
    return counter if code_word(counter) == word else None


def write_clip(path, frames: int, fps: int, height: int) -> None:
    """A Y4M clip (what Chromium's fake camera plays, --use-file-for-fake-video-capture) of `frames`
    frames, frame n showing the code of n in the central square of a 4:3 picture of `height` rows: the
    page center-crops the camera to a square, and a camera scaled to another 4:3 size keeps it whole."""
    height -= height % 4
    width = height * 4 // 3
    left = (width - height) // 2
    luma = np.full((height, width), Y_LOW, np.uint8)
    chroma = np.full(height * width // 2, 128, np.uint8).tobytes()  # both 4:2:0 planes: no colour
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for n in range(frames):
            luma[:, left:left + height] = code_luma(n, height)
            f.write(b"FRAME\n" + luma.tobytes() + chroma)


# -- a client's records -> numbers ----------------------------------------------------------------
ORDER = ("capture", "sample", "send", "receive", "drawn", "display")  # each frame's times, never decreasing


def check_records(records: list[dict]) -> list[str]:
    """What is inconsistent in a stream's records (empty: nothing): a time before the one ahead of it in
    ORDER, a reply or display without a send, a counter read back that is another frame's."""
    problems = []
    for r in records:
        times = [(k, r[k]) for k in ORDER if r.get(k) is not None]
        problems += [f"frame {r['id']}: {a} {ta:.3f} after {b} {tb:.3f}"
                     for (a, ta), (b, tb) in zip(times, times[1:]) if ta > tb]
        if r.get("receive") is not None and r.get("send") is None:
            problems.append(f"frame {r['id']}: a reply to a frame never sent")
        if None not in (r.get("counter_out"), r.get("counter_in")) and r["counter_out"] != r["counter_in"]:
            problems.append(f"frame {r['id']}: sent counter {r['counter_in']}, shown {r['counter_out']}")
    return problems


def _ms(values) -> dict:
    """p50 / p99 (numpy's percentile, as core/report) and mean of a list of milliseconds; None when empty."""
    if not len(values):
        return {"p50": None, "p99": None, "mean": None}
    v = np.asarray(values, float)
    return {"p50": float(np.percentile(v, 50)), "p99": float(np.percentile(v, 99)), "mean": float(v.mean())}


def measured(report: dict, warmup_ms: float, grace_ms: float) -> list[dict]:
    """The records of frames sent inside the window [started + warmup_ms, now - grace_ms], by id."""
    since, until = report["started"] + warmup_ms, report["now"] - grace_ms
    return sorted((r for r in report["records"] if r["send"] is not None and since <= r["send"] <= until),
                  key=lambda r: r["id"])


def capture_fit(records: list[dict]) -> dict | None:
    """Least squares capture = a + b * counter_in over the records with a counter (None: under 3)."""
    pairs = np.array([(r["counter_in"], r["capture"]) for r in records if r["counter_in"] is not None], float)
    if len(pairs) < 3 or np.ptp(pairs[:, 0]) == 0:
        return None
    slope, intercept = np.polyfit(pairs[:, 0], pairs[:, 1], 1)
    residual = pairs[:, 1] - (intercept + slope * pairs[:, 0])
    return {"ms_per_frame": float(slope), "residual_ms": float(np.std(residual)),
            "residual_max_ms": float(np.max(np.abs(residual)))}


def after_a_newer(values: list[float]) -> int:
    """How many of `values` come after a larger one."""
    return int(np.sum(np.asarray(values[1:]) < np.maximum.accumulate(values)[:-1])) if len(values) > 1 else 0


def stream_summary(report: dict, warmup_ms: float, grace_ms: float) -> dict:
    """One stream's numbers from its client's report ({now, started, records}, client clock ms). Frames
    count when sent inside the window [started + warmup_ms, now - grace_ms]; a frame sent there and never
    displayed is dropped (the server skipped it, or its reply came after a newer one and was not shown).
        time_to_first_frame_ms  started (the user pressed start) -> the first frame displayed
        latency_ms              capture -> display (p50, p99, mean); stages_ms: its parts, between ORDER's times
        jitter_ms               mean |difference| of consecutive frames' latencies (RFC 3550's, unsmoothed)
        interval_ms             between consecutive displays; fps: frames displayed per second of window
        out_of_order            replies that arrived after a newer frame's reply; sent_out_of_order: frames
                                the client sent after a newer one (the page's JPEG encodes are asynchronous)
        counter_*               the code: camera frames the page skipped or sent twice, legible and matching
                                counters among those displayed
        capture_fit             capture against counter_in, a straight line: the camera's frame period
                                (ms_per_frame) and how far the captures stray from it (residual_ms): a check
                                that capture is the camera's clock, not the page's"""
    records, window = report["records"], measured(report, warmup_ms, grace_ms)
    problems = check_records(records)
    displays = [r["display"] for r in records if r["display"] is not None]
    shown = sorted((r for r in window if r["display"] is not None), key=lambda r: r["display"])
    latency = [r["display"] - r["capture"] for r in shown]
    received = sorted((r for r in window if r["receive"] is not None), key=lambda r: r["receive"])
    sends = [r["send"] for r in window]
    counters = [r["counter_in"] for r in window if r["counter_in"] is not None]
    steps = np.diff(counters)
    legible = [r for r in shown if r["counter_out"] is not None]
    window_s = max(report["now"] - grace_ms - report["started"] - warmup_ms, 1e-9) / 1e3
    return {
        "sent": len(window), "displayed": len(shown), "dropped": len(window) - len(shown),
        "out_of_order": after_a_newer([r["id"] for r in received]),
        "sent_out_of_order": after_a_newer(sends), "fps": len(shown) / window_s,
        "time_to_first_frame_ms": min(displays) - report["started"] if displays else None,
        "latency_ms": _ms(latency),
        "stages_ms": {f"{a}_to_{b}": _ms([r[b] - r[a] for r in shown]) for a, b in zip(ORDER, ORDER[1:])},
        "jitter_ms": float(np.mean(np.abs(np.diff(latency)))) if len(latency) > 1 else None,
        "interval_ms": _ms(np.diff([r["display"] for r in shown])),
        "capture_source": sorted({r["capture_source"] for r in window}),
        "capture_fit": capture_fit(window),
        "counter_in_read": len(counters), "counter_skipped": int(np.sum(np.maximum(steps - 1, 0))),
        "counter_repeated": int(np.sum(steps == 0)), "counter_backwards": int(np.sum(steps < 0)),
        "counter_out_legible": len(legible),
        "counter_out_matches": sum(r["counter_out"] == r["counter_in"] for r in legible),
        "problem_count": len(problems), "problems": problems[:10],
    }


def summarize(reports: list[dict], warmup_ms: float, grace_ms: float) -> dict:
    """N streams' numbers: each stream's, and over all of them (latencies pooled, counts summed; the
    slowest stream's fps and first frame, the largest jitter)."""
    per_stream = [stream_summary(r, warmup_ms, grace_ms) for r in reports]
    latency = [r["display"] - r["capture"] for rep in reports for r in measured(rep, warmup_ms, grace_ms)
               if r["display"] is not None]
    first = [s["time_to_first_frame_ms"] for s in per_stream]
    return {"streams": len(reports), "latency_ms": _ms(latency),
            "fps_min": min(s["fps"] for s in per_stream), "fps_mean": float(np.mean([s["fps"] for s in per_stream])),
            "time_to_first_frame_ms": None if None in first else max(first),
            "jitter_ms": max((s["jitter_ms"] for s in per_stream if s["jitter_ms"] is not None), default=None),
            **{k: sum(s[k] for s in per_stream) for k in ("sent", "displayed", "dropped", "out_of_order",
                                                          "counter_out_legible", "counter_out_matches",
                                                          "problem_count")},
            "per_stream": per_stream}
