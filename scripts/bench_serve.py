"""Load test of `mirage-serve`: how many 30-FPS streams one server keeps up with.

    python scripts/bench_serve.py                                   # bundled tiny-v2v on the CPU
    python scripts/bench_serve.py artifacts/base --device cuda --counts 1,2,4,8,16,24,32

For each stream count N (doubling by default), a fresh `mirage-serve MODEL --slots N` on
127.0.0.1 (a subprocess, so that the clients do not share its interpreter), then N synthetic
WebSocket clients, each sending JPEG frames at the model's size at --fps on its own random phase,
with perf_counter timestamps that the server echoes. After --warmup seconds, --seconds of
measurement: per-stream delivered FPS, p50/p99 frame latency (send to reply, the whole loop:
JPEG decode, queueing, the batched step, JPEG encode, both socket hops), frames dropped (sent in the
window, never answered), frames crossed (a reply with another client's id: must be 0), and the
server's own counts (stale, late, unsent). Stops after the first N where p99 > --max-p99-ms or the
slowest stream delivers under 95% of --fps. Prints a table, writes JSON to docs/bench/.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

import numpy as np
from aiohttp import ClientSession, WSMsgType
from PIL import Image

from mirage.runtime.server import HEADER, JPEG

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, slots: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "mirage.cli.serve", args.model, "--port", str(port), "--slots", str(slots),
           "--device", args.device, "--backend", args.backend, "--deadline-ms", str(args.deadline_ms),
           "--batch-wait-ms", str(args.batch_wait_ms)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + args.startup_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"mirage-serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"mirage-serve did not answer within {args.startup_s} s:\n{log.read_text()[-3000:]}")


def synthetic_jpegs(size: int, count: int, seed: int) -> list[bytes]:
    """`count` JPEGs of a moving disc on a gradient, (size, size) RGB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(0, 255, 3)
    out = []
    for n in range(count):
        cx, cy = 0.5 + 0.3 * np.sin(n / 5 + seed), 0.5 + 0.3 * np.cos(n / 7 + seed)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < 0.02
        rgb = np.stack([base[0] * xx, base[1] * yy, base[2] * (1 - xx)], -1)  # (size, size, 3)
        rgb[disc] = 255 - base
        buf = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


async def client(url: str, index: int, args, window: tuple[float, float], stop: float) -> dict:
    """One stream: send on a 1/fps schedule until `stop`; replies to frames sent inside `window` count."""
    period, start, end = 1.0 / args.fps, *window
    result = {"sent": 0, "latencies_ms": [], "crossed": 0, "late_sends": 0, "server": {}}
    async with ClientSession() as session, session.ws_connect(url.replace("http", "ws") + "/ws") as ws:
        hello = await ws.receive_json()
        if hello["type"] != "hello":
            raise RuntimeError(f"client {index}: {hello}")
        v2v = hello["video_to_video"]
        frames = synthetic_jpegs(hello["width"], 16, index) if v2v else [b""]

        async def send():
            tick = time.perf_counter() + random.uniform(0, period)
            n = 0
            while tick < stop:
                await asyncio.sleep(max(0.0, tick - time.perf_counter()))
                now = time.perf_counter()
                if now - tick > period:  # this client fell behind its schedule: the load generator is the bound
                    result["late_sends"] += 1
                await ws.send_bytes(HEADER.pack((index << 24) | n, JPEG, now * 1e3) + frames[n % len(frames)])
                if start <= now < end:
                    result["sent"] += 1
                n, tick = n + 1, tick + period

        async def receive():
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if data["type"] == "stats":
                        result["server"] = data
                    elif data["type"] == "error":
                        raise RuntimeError(f"client {index}: {data['message']}")
                    continue
                frame_id, _, ts = HEADER.unpack_from(msg.data)
                if frame_id >> 24 != index:
                    result["crossed"] += 1
                if start <= ts / 1e3 < end:
                    result["latencies_ms"].append(time.perf_counter() * 1e3 - ts)

        receiver = asyncio.create_task(receive())
        await send()
        await asyncio.sleep(args.grace_s)  # replies still in flight
        receiver.cancel()
        with suppress(asyncio.CancelledError):
            await receiver  # raises a server error the receiver met
    return result


async def load(url: str, streams: int, args) -> list[dict]:
    now = time.perf_counter()
    window = (now + args.warmup_s, now + args.warmup_s + args.seconds)
    return await asyncio.gather(*(client(url, i, args, window, window[1]) for i in range(streams)))


def summarize(streams: int, results: list[dict], health: dict, args) -> dict:
    lat = np.concatenate([r["latencies_ms"] for r in results]) if any(r["latencies_ms"] for r in results) \
        else np.array([np.inf])
    fps = [len(r["latencies_ms"]) / args.seconds for r in results]
    server = {k: sum(r["server"].get(k, 0) for r in results) for k in ("stale", "late", "unsent")}
    return {"streams": streams, "fps_min": min(fps), "fps_mean": float(np.mean(fps)),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "sent": sum(r["sent"] for r in results), "answered": int(sum(len(r["latencies_ms"]) for r in results)),
            "dropped": sum(r["sent"] - len(r["latencies_ms"]) for r in results),
            "crossed": sum(r["crossed"] for r in results), "client_late_sends": sum(r["late_sends"] for r in results),
            "server_steps_per_s": health.get("fps"), **{f"server_{k}": v for k, v in server.items()}}


def device_name(device: str) -> str:
    if device.startswith("cuda") or device == "auto":
        try:
            import torch

            if torch.cuda.is_available():
                return torch.cuda.get_device_name(0)
        except ImportError:
            pass
    return f"CPU ({platform.processor() or platform.machine()})"


def slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=str(ROOT / "checkpoints" / "tiny-v2v"))
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("--counts", default="1,2,4,8,16,24,32,48,64", help="stream counts to try, in order")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second each client sends")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per count")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--grace-s", type=float, default=0.5)
    p.add_argument("--startup-s", type=float, default=300.0, help="how long the server may take to load")
    p.add_argument("--deadline-ms", type=float, default=100.0)
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="the server's --batch-wait-ms")
    p.add_argument("--max-p99-ms", type=float, default=33.0)
    p.add_argument("--json", type=Path, default=None, help="default: docs/bench/DATE_serve_DEVICE.json")
    args = p.parse_args()

    device = device_name(args.device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for streams in (int(c) for c in args.counts.split(",")):
            proc, url = start_server(args, streams, Path(tmp) / f"serve_{streams}.log")
            try:
                results = asyncio.run(load(url, streams, args))
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    health = json.load(r)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            row = summarize(streams, results, health, args)
            rows.append(row)
            print(f"N={streams:3d}  fps/stream min {row['fps_min']:5.1f} mean {row['fps_mean']:5.1f}  "
                  f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  dropped {row['dropped']}  "
                  f"crossed {row['crossed']}", flush=True)
            if row["p99_ms"] > args.max_p99_ms or row["fps_min"] < 0.95 * args.fps:
                break

    header = ("streams", "fps/stream min", "mean", "p50 ms", "p99 ms", "sent", "dropped", "crossed",
              "srv stale", "srv late", "client late sends")
    keys = ("streams", "fps_min", "fps_mean", "p50_ms", "p99_ms", "sent", "dropped", "crossed", "server_stale",
            "server_late", "client_late_sends")
    print(f"\nmirage-serve {args.model} on {device}, {args.fps:g} FPS per client, {args.seconds:g} s measured\n")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(f"{row[k]:.1f}" if isinstance(row[k], float) else str(row[k]) for k in keys))
    kept_up = [r["streams"] for r in rows if r["p99_ms"] <= args.max_p99_ms and r["fps_min"] >= 0.95 * args.fps]
    print(f"\nmost streams kept up (p99 <= {args.max_p99_ms:g} ms, every stream >= 95% of {args.fps:g} FPS): "
          f"{max(kept_up) if kept_up else 'none'}")
    today = datetime.date.today().isoformat()
    path = args.json or ROOT / "docs" / "bench" / f"{today}_serve_{slug(device)}.json"
    path.write_text(json.dumps({"date": today, "device": device, "model": args.model, "backend": args.backend,
                                "batch_wait_ms": args.batch_wait_ms, "deadline_ms": args.deadline_ms,
                                "command": " ".join(sys.argv), "fps": args.fps, "seconds": args.seconds,
                                "max_p99_ms": args.max_p99_ms, "kept_up": max(kept_up) if kept_up else 0,
                                "rows": rows}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
