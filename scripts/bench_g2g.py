"""Glass-to-glass benchmark of `mirage-serve`: capture -> model -> pixels on the page, per frame.

    python scripts/bench_g2g.py                                  # bundled tiny-v2v, CPU, Chromium, 1 and 2 streams
    python scripts/bench_g2g.py --client python --random base-512 --device cuda --fast --streams 1,8
                                                                 # a GPU machine without Chromium: NOT glass to glass
    python scripts/bench_g2g.py --floor-step-ms 5                # the harness's floor: a stand-in pool, no model

For each stream count N: a fresh `mirage-serve MODEL --slots N` on 127.0.0.1, then N clients for
--seconds (the first --warmup-s not counted). --client browser (headless Chromium, the real page with
its #g2g instrumentation, a fake camera playing a clip whose frames carry a frame counter) measures
from the camera frame's capture to the animation frame that shows the reply; --client python (a
WebSocket client per stream) from a scheduled frame to its decoded reply, which leaves out the page
and the screen. Prints a table and writes JSON to docs/bench/ (runtime/g2g.py defines every field).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import urllib.request
import sys
import tempfile
from pathlib import Path

from bench_serve import device_name, random_checkpoint, slug  # this folder's: the same model, device and file names
from mirage.core.errors import MirageError
from mirage.core.report import write_json
from mirage.runtime.g2g import summarize
from mirage.runtime.g2g_client import browser, browser_streams, python_streams, serving

ROOT = Path(__file__).resolve().parent.parent
CLIENTS = {"browser": "glass to glass: headless Chromium, fake camera -> the page -> the server -> the page's canvas "
                      "(display: the animation frame that carries the reply; no physical screen)",
           "python": "NOT glass to glass: a Python WebSocket client per stream, scheduled JPEG -> the server -> "
                     "the decoded reply (no camera, page or screen)"}


def server_command(args, model: str, slots: int) -> list[str]:
    """mirage-serve MODEL, or with --floor-step-ms, mirage-serve over tests/serve_standin.py's pool (each step
    sleeps that long and echoes its inputs): the harness's own floor, everything but the model."""
    serve = [str(ROOT / "tests" / "serve_standin.py"), str(args.floor_step_ms), "--size", str(args.floor_size)] \
        if args.floor_step_ms is not None else ["-m", "mirage.cli.serve"]
    return [sys.executable, *serve, model, "--slots", str(slots), "--device", args.device,
            "--deadline-ms", str(args.deadline_ms)] + (["--fast"] if args.fast else []) + args.serve_args


def read_health(url: str, into: dict) -> None:
    """/health's JSON into `into` (left empty when the server does not answer: the run says why)."""
    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as r:
            into.update(json.load(r))
    except OSError:
        pass


def row_line(row: dict) -> str:
    lat = row["latency_ms"]
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return (f"N={row['streams']:3d}  fps/stream min {row['fps_min']:5.1f}  p50 {fmt(lat['p50'])} ms  "
            f"p99 {fmt(lat['p99'])} ms  jitter {fmt(row['jitter_ms'])} ms  first frame "
            f"{fmt(row['time_to_first_frame_ms'])} ms  dropped {row['dropped']}/{row['sent']}  "
            f"out of order {row['out_of_order']}  counter legible {row['counter_out_legible']}/{row['displayed']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=str(ROOT / "checkpoints" / "tiny-v2v"))
    p.add_argument("--random", metavar="CONFIG", help="serve a random-weight video-to-video checkpoint of this config")
    p.add_argument("--client", choices=tuple(CLIENTS), default="browser")
    p.add_argument("--streams", default="1,2", help="stream counts, one server each")
    p.add_argument("--seconds", type=float, default=10.0, help="seconds each count streams, warm-up included")
    p.add_argument("--warmup-s", type=float, default=3.0, help="the first seconds, not counted")
    p.add_argument("--grace-s", type=float, default=1.0, help="frames sent in the last seconds are not counted "
                   "(their replies may still be on the way: keep it above the p99 latency)")
    p.add_argument("--fps", type=int, default=30, help="the camera's (and the python client's) frame rate; the "
                                                      "page samples it at its own 30 FPS")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fast", action="store_true")
    p.add_argument("--deadline-ms", type=float, default=100.0)
    p.add_argument("--floor-step-ms", type=float, default=None, help="serve a stand-in pool whose step sleeps this "
                   "long and echoes its input instead of the model: the page, browser and server alone")
    p.add_argument("--floor-size", type=int, default=32, help="--floor-step-ms's frame side in pixels (512: the "
                   "page's and the codecs' work at base-512's size)")
    p.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="more mirage-serve options (last)")
    p.add_argument("--json", type=Path, default=None, help="default: docs/bench/DATE_g2g_CLIENT_DEVICE_MODEL.json")
    args = p.parse_args()

    load = os.getloadavg()  # before this run's own processes: the machine's other work
    device = device_name(args.device)
    label = f"floor-{args.floor_step_ms:g}ms-{args.floor_size}px" if args.floor_step_ms is not None \
        else args.random or Path(args.model).name
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = random_checkpoint(args.random, Path(tmp)) if args.random else args.model
            for streams in (int(n) for n in args.streams.split(",")):
                health = {}
                with serving(server_command(args, model, streams), startup_s=600) as url:
                    # the server's own /health (its stages: where a frame's time goes) halfway through
                    midway = functools.partial(read_health, url, health)
                    reports = browser_streams(url, streams, args.seconds, args.fps, Path(tmp), midway=midway) \
                        if args.client == "browser" else python_streams(url, streams, args.seconds, args.fps, midway)
                row = summarize(reports, 1e3 * args.warmup_s, 1e3 * args.grace_s)
                row["client_status"] = [r["status"] for r in reports]  # the page's status line; python: errors
                row["server_health"] = health
                rows.append(row)
                print(row_line(row), flush=True)
    except MirageError as e:
        sys.exit(f"error: {e}")
    today = datetime.date.today().isoformat()
    path = args.json or ROOT / "docs" / "bench" / f"{today}_g2g_{args.client}_{slug(device)}_{label}.json"
    version = browser().version() if args.client == "browser" else None
    report = {"date": today, "device": device, "model": label, "random_weights": bool(args.random),
              "client": args.client, "measures": CLIENTS[args.client], "browser": version,
              "command": " ".join(sys.argv), "load_average_before_1m_5m_15m": load,
              "latency_uses": "the echoed sequence number (id): display - capture of the frame sent with that id; "
                              "counter_out (the code read from the shown pixels) only checks it",
              **{k: getattr(args, k) for k in ("seconds", "warmup_s", "grace_s", "fps", "fast", "deadline_ms",
                                               "floor_step_ms", "floor_size")},
              "rows": rows}
    write_json(path, report)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
