"""Load test of `mirage-serve`: how many 30-FPS streams one server keeps up with.

    python scripts/bench_serve.py                                   # bundled tiny-v2v on the CPU
    python scripts/bench_serve.py --random base --device cuda --fast --counts 1,2,4,8,16,24,32

For each stream count N (doubling by default), a fresh `mirage-serve MODEL --slots N` on
127.0.0.1 (a subprocess, so that the clients do not share its interpreter), then N synthetic
WebSocket clients, each sending JPEG (or --format raw) frames at the model's size at --fps on its own random phase,
with perf_counter timestamps that the server echoes. After --warmup seconds, --seconds of
measurement: per-stream delivered FPS, p50/p99 frame latency (send to reply, the whole loop:
JPEG decode, queueing, the batched step, JPEG encode, both socket hops), frames dropped (sent in the
window, never answered), frames crossed (a reply with another client's id: must be 0), and the
server's own counts (stale, late, unsent). Stops after the first N where p99 > --max-p99-ms or the
slowest stream delivers under 95% of --fps. Prints a table, writes JSON to docs/bench/.

--null-step-ms MS puts a pool that computes nothing (each step sleeps MS) behind the same server:
the server's own ceiling (codecs, event loop, threads) on this machine's CPU, at --null-size pixels
(64, or WxH such as 832x480). With --null-block N it is a block model's stand-in (a DiT's): each step
takes N frames of a stream and gives them back as a block, played at --null-rate FPS; send at that
rate (--fps) and judge p99 against block periods (--max-p99-ms):

    python scripts/bench_serve.py --null-step-ms 50 --null-size 832x480 --null-block 4 --null-rate 16 \
        --fps 16 --max-p99-ms 500 --counts 1,2,4

--ray serves through Ray Serve instead (`mirage-serve --ray`: a local Ray, one replica of N slots on
one GPU, or the CPU): the same clients and table, so that the two runs give the Ray path's overhead
(its proxy and the hops between the proxy and the replica) against direct mirage-serve:

    python scripts/bench_serve.py --random base --device cuda --fast --counts 16 --keep-going
    python scripts/bench_serve.py --random base --device cuda --fast --counts 16 --keep-going --ray
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import io
import json
import platform
import random
import shlex
import signal
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

from mirage.runtime.server import HEADER, JPEG, RAW, ServerOptions

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, slots: int, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    if args.null_step_ms is not None:  # this script's own NullPool behind the same server
        cmd = [sys.executable, __file__, "--serve-null",
               f"{port},{slots},{args.null_size},{args.null_step_ms},{args.null_gil_calls},{args.null_depth},"
               f"{args.null_block},{args.null_rate}",
               "--deadline-ms", str(args.deadline_ms), "--batch-wait-ms", str(args.batch_wait_ms),
               "--calibrate-steps", str(args.calibrate_steps), "--switch-interval-ms", str(args.switch_interval_ms)]
    else:
        cmd = [sys.executable, "-m", "mirage.cli.serve", args.model, "--port", str(port), "--slots", str(slots),
               "--device", args.device, "--backend", args.backend, "--deadline-ms", str(args.deadline_ms),
               "--batch-wait-ms", str(args.batch_wait_ms), "--calibrate-steps", str(args.calibrate_steps)] \
            + (["--fast"] if args.fast else []) + (["--ray"] if args.ray else []) \
            + (["--cpu-jpeg"] if args.cpu_jpeg else []) + shlex.split(args.serve_args)
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    while time.monotonic() < start + args.startup_s:
        if proc.poll() is not None:
            sys.exit(f"mirage-serve exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:  # (Ray's proxy answers 404 until the replica has loaded the model: an HTTPError, an OSError)
            with urllib.request.urlopen(url + "/health", timeout=1):
                print(f"server up in {time.monotonic() - start:.1f} s (model load{', Ray start' if args.ray else ''})",
                      flush=True)
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"mirage-serve did not answer within {args.startup_s} s:\n{log.read_text()[-3000:]}")


class NullPool:
    """A StreamPool that computes nothing, so that the load test measures the server alone (codecs,
    event loop, threads) at a given frame size: a GPU stand-in whose steps each take `step_ms`, one
    after the other, from their submit (two in flight, as a GPU pool). collect() sleeps until its
    step is done; with gil_calls > 0 the sleep is cut into that many parts, each a release and
    re-acquisition of the GIL, as a GPU step's host side makes one per CUDA call (uploads, events,
    the graph launch, the wait): what the server's other threads then cost the step shows as
    /health's pool stage above the idle step. With block > 1, a block model's (docs/SERVING.md): a step
    takes `block` frames per stream and hands them back, to be played at video_rate."""

    def __init__(self, slots: int, size: tuple[int, int], step_ms: float, gil_calls: int = 0, depth: int = 2,
                 block: int = 1, video_rate: float = 16.0):
        self.depth = depth
        width, height = size
        self.slots, self.frame_shape, self.video_to_video = slots, (height, width, 3), True
        # the block contract: a block model's frames_in and video rate, or the U-Net's one frame a step, as it comes
        self.frames_in, self.video_rate = (block, video_rate) if block > 1 else (1, None)
        self.controls: dict = {}
        self.restores = block == 1  # a block model (the DiT) takes the frames as sent
        self.active: list[int] = []
        self.step_s, self.gil_calls = step_ms / 1e3, max(1, gil_calls)
        # the server hands a pool uint8 frames; a one-frame input fills its block of 1
        self.last = np.zeros((slots, block, height, width, 3), np.uint8)
        self.in_flight: collections.deque[tuple[float, dict]] = collections.deque()  # (done at, outputs)
        self.free_at = 0.0  # when the "GPU" has finished every step submitted so far

    def attach(self, seed: int = 0) -> int:
        from mirage.runtime.pool import PoolFull

        free = [s for s in range(self.slots) if s not in self.active]
        if not free:
            raise PoolFull(f"all {self.slots} stream slots are busy")
        self.active.append(free[0])
        return free[0]

    def detach(self, slot: int) -> None:
        self.active.remove(slot)

    def submit(self, inputs: dict) -> None:
        for slot, frame in inputs.items():
            self.last[slot] = frame
        self.free_at = max(time.monotonic(), self.free_at) + self.step_s  # the "GPU" runs one step at a time
        self.in_flight.append((self.free_at, {slot: self.last[slot].copy() for slot in inputs}))  # (n, H, W, 3)

    def collect(self) -> dict:
        done, outputs = self.in_flight.popleft()
        for part in range(self.gil_calls, 0, -1):
            time.sleep(max(0.0, done - time.monotonic()) / part)
        return outputs

    def step(self, inputs: dict) -> dict:
        self.submit(inputs)
        return self.collect()


def serve_null(spec: str, args) -> None:
    from aiohttp import web

    from mirage.runtime.server import ServerOptions, make_app

    port, slots, size, step_ms, gil_calls, depth, block, rate = spec.split(",")
    pool = NullPool(int(slots), frame_size(size), float(step_ms), int(gil_calls), int(depth), int(block), float(rate))
    options = ServerOptions(port=int(port), deadline_ms=args.deadline_ms, batch_wait_ms=args.batch_wait_ms,
                            calibrate_steps=args.calibrate_steps, switch_interval_ms=args.switch_interval_ms)
    web.run_app(make_app(pool, options), host="127.0.0.1", port=int(port), print=None)


def random_checkpoint(config: str, folder: Path) -> str:
    """A video-to-video checkpoint of `config` with random weights (speed does not depend on them)."""
    import torch

    from mirage.core.config import TrainConfig, get_config
    from mirage.model.unet import MirageUNet
    from mirage.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    model = MirageUNet(get_config(config, "v2v")).eval()
    return str(save_checkpoint(folder / config, model, model, TrainConfig(), step=0))


def frame_size(text: str) -> tuple[int, int]:
    """--null-size: "64" (square) or "832x480" -> (width, height)."""
    width, _, height = text.partition("x")
    return int(width), int(height or width)


def synthetic_frames(width: int, height: int, count: int, seed: int, fmt: str = "jpeg") -> list[bytes]:
    """`count` frames of a moving disc on a gradient, (height, width) RGB, as JPEGs or raw bytes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    base = rng.uniform(0, 255, 3)
    out = []
    for n in range(count):
        cx, cy = 0.5 + 0.3 * np.sin(n / 5 + seed), 0.5 + 0.3 * np.cos(n / 7 + seed)
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < 0.02
        rgb = np.stack([base[0] * xx, base[1] * yy, base[2] * (1 - xx)], -1)  # (size, size, 3)
        rgb[disc] = 255 - base
        if fmt == "raw":
            out.append(rgb.astype(np.uint8).tobytes())
            continue
        buf = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


class Busy(Exception):
    """The server answered busy."""


async def client(url: str, index: int, args, window: tuple[float, float], stop: float) -> dict:
    """One stream: send on a 1/fps schedule until `stop`; replies to frames sent inside `window` count."""
    period, start, end = 1.0 / args.fps, *window
    result = {"sent": 0, "latencies_ms": [], "crossed": 0, "late_sends": 0, "max_gap_ms": 0.0, "server": {}}
    last_reply = None
    async with ClientSession() as session, session.ws_connect(url.replace("http", "ws") + "/ws") as ws:
        hello = await ws.receive_json()
        if hello["type"] == "busy":
            raise Busy(hello["message"])
        v2v = hello["video_to_video"]
        frames = synthetic_frames(hello["width"], hello["height"], 16, index, args.format) if v2v else [b""]
        fmt = RAW if args.format == "raw" else JPEG

        async def send():
            tick = time.perf_counter() + random.uniform(0, period)
            n = 0
            while tick < stop:
                await asyncio.sleep(max(0.0, tick - time.perf_counter()))
                now = time.perf_counter()
                if now - tick > period:  # this client fell behind its schedule: the load generator is the bound
                    result["late_sends"] += 1
                await ws.send_bytes(HEADER.pack((index << 24) | n, fmt, now * 1e3) + frames[n % len(frames)])
                if start <= now < end:
                    result["sent"] += 1
                n, tick = n + 1, tick + period

        async def receive():
            nonlocal last_reply
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
                now = time.perf_counter()
                if start <= ts / 1e3 < end:
                    result["latencies_ms"].append(now * 1e3 - ts)
                    if last_reply is not None:  # the longest wait between two frames: a stall shows here
                        result["max_gap_ms"] = max(result["max_gap_ms"], (now - last_reply) * 1e3)
                last_reply = now

        receiver = asyncio.create_task(receive())
        await send()
        await asyncio.sleep(args.grace_s)  # replies still in flight
        receiver.cancel()
        with suppress(asyncio.CancelledError):
            await receiver  # raises a server error the receiver met
    return result


CHURN = 255  # the client index of the stream that comes and goes


async def churn(url: str, args, stop: float) -> None:
    """--churn: one more stream attaching, sending for 0.3 s and detaching, over and over; the
    measured streams' longest gap between frames shows what each attach and detach costs them."""
    while time.perf_counter() < stop:
        try:
            await client(url, CHURN, args, (0.0, 0.0), min(stop, time.perf_counter() + 0.3))
        except Busy:  # its previous connection's slot is not detached yet
            await asyncio.sleep(0.05)


async def load(url: str, streams: int, args) -> tuple[list[dict], dict]:
    """Each client's results, and the server's /health from the middle of the measured window."""
    now = time.perf_counter()
    window = (now + args.warmup_s, now + args.warmup_s + args.seconds)
    churning = asyncio.create_task(churn(url, args, window[1])) if args.churn else None

    async def health() -> dict:
        await asyncio.sleep(args.warmup_s + args.seconds / 2)
        async with ClientSession() as session, session.get(url + "/health") as r:
            return await r.json()
    *results, mid = await asyncio.gather(*(client(url, i, args, window, window[1]) for i in range(streams)),
                                         health())
    if churning:
        await churning
    return results, mid


def summarize(streams: int, results: list[dict], health: dict, args) -> dict:
    if "per_replica" in health:  # mirage-serve --ray: the one replica's own /health
        health = health["per_replica"][0]
    lat = np.concatenate([r["latencies_ms"] for r in results]) if any(r["latencies_ms"] for r in results) \
        else np.array([np.inf])
    fps = [len(r["latencies_ms"]) / args.seconds for r in results]
    server = {k: sum(r["server"].get(k, 0) for r in results) for k in ("stale", "late", "unsent")}
    return {"streams": streams, "fps_min": min(fps), "fps_mean": float(np.mean(fps)),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "sent": sum(r["sent"] for r in results), "answered": int(sum(len(r["latencies_ms"]) for r in results)),
            "dropped": sum(r["sent"] - len(r["latencies_ms"]) for r in results),
            "crossed": sum(r["crossed"] for r in results), "client_late_sends": sum(r["late_sends"] for r in results),
            "max_gap_ms": max(r["max_gap_ms"] for r in results),
            "server_steps_per_s": health["fps"], "server_busy": health["busy"],
            "server_step_ms": health["step_ms"], "idle_step_ms": health.get("idle_step_ms"),
            "jpeg_codec": health.get("jpeg_codec"),  # nvjpeg (batched on the GPU) or pillow (CPU threads)
            **{f"{name}_ms": stage["mean_ms"] for name, stage in health.get("stages", {}).items()},
            **{f"{name}_max_ms": stage["max_ms"] for name, stage in health.get("stages", {}).items()},
            **{f"server_{k}": v for k, v in server.items()}}


def keeps_up(row: dict, args) -> bool:
    return row["p99_ms"] <= args.max_p99_ms and row["fps_min"] >= 0.95 * args.fps


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
    p.add_argument("--random", metavar="CONFIG", help="serve a random-weight video-to-video checkpoint of this "
                   "config (tiny, small, base, seed880m) instead of MODEL")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("--fast", action="store_true", help="mirage-serve --fast (Inductor, GPU)")
    p.add_argument("--counts", default="1,2,4,8,16,24,32,48,64", help="stream counts to try, in order")
    p.add_argument("--format", choices=("jpeg", "raw"), default="jpeg", help="what the clients send (and get "
                   "back): JPEG as the page does, or raw RGB, which costs the server no codec")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second each client sends")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per count")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--grace-s", type=float, default=0.5)
    p.add_argument("--startup-s", type=float, default=300.0, help="how long the server may take to load")
    p.add_argument("--deadline-ms", type=float, default=100.0)
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="the server's --batch-wait-ms")
    p.add_argument("--serve-args", default="", help="more mirage-serve options, one string (a DiT: '--dit wan-1.3b "
                   "--decoder taew2_1.pth --strength 0.6 --prompt-embeds p.safetensors')")
    p.add_argument("--cpu-jpeg", action="store_true", help="mirage-serve --cpu-jpeg: Pillow in CPU threads, not "
                   "nvJPEG batched on the GPU (the before / after of the codec)")
    p.add_argument("--churn", action="store_true", help="one more stream attaching and detaching all along "
                   "(a spare slot), to see what that costs the others (max gap)")
    p.add_argument("--ray", action="store_true", help="serve through Ray Serve (mirage-serve --ray, a local Ray "
                   "with one replica) instead of mirage-serve's own server")
    p.add_argument("--null-step-ms", type=float, default=None,
                   help="serve a pool that computes nothing, each step sleeping this long: the server alone")
    p.add_argument("--null-size", default="64", help="frame size of --null-step-ms: 64, or WxH (832x480)")
    p.add_argument("--null-block", type=int, default=1, help="--null-step-ms's frames per step and stream (a "
                   "block model's stand-in when over 1)")
    p.add_argument("--null-rate", type=float, default=16.0, help="with --null-block: the video rate its blocks "
                   "play at")
    p.add_argument("--null-gil-calls", type=int, default=0, help="--null-step-ms's sleep cut into this many GIL "
                   "releases, as a GPU step's CUDA calls make (0: one sleep)")
    p.add_argument("--null-depth", type=int, default=2, help="--null-step-ms's steps in flight at once (2 as a GPU "
                   "pool; 1: the server waits for each step before submitting the next)")
    p.add_argument("--switch-interval-ms", type=float, default=ServerOptions.switch_interval_ms,
                   help="the null server's GIL switch interval (mirage-serve keeps ServerOptions' default)")
    p.add_argument("--calibrate-steps", type=int, default=20, help="the server times this many idle-pool steps "
                   "at start (idle step ms: the bare step, to set the served one against)")
    p.add_argument("--serve-null", help=argparse.SUPPRESS)  # PORT,SLOTS,SIZE,STEP_MS: the subprocess side
    p.add_argument("--keep-going", action="store_true", help="measure every count, not only up to the first "
                   "that fails the p99 / FPS rule")
    p.add_argument("--max-p99-ms", type=float, default=33.0)
    p.add_argument("--json", type=Path, default=None, help="default: docs/bench/DATE_serve_DEVICE_MODEL.json")
    args = p.parse_args()
    if args.serve_null:
        return serve_null(args.serve_null, args)

    device = device_name("cpu" if args.null_step_ms is not None else args.device)
    label = (args.random or (f"null-{args.null_size}px-{args.null_step_ms:g}ms"
                             + (f"-block{args.null_block}" if args.null_block > 1 else "") if args.null_step_ms is not None
                             else Path(args.model).name)) + ("-ray" if args.ray else "")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.random:
            args.model = random_checkpoint(args.random, Path(tmp))
        for streams in (int(c) for c in args.counts.split(",")):
            proc, url = start_server(args, streams + args.churn, Path(tmp) / f"serve_{streams}.log")
            try:
                results, health = asyncio.run(load(url, streams, args))
            finally:
                proc.send_signal(signal.SIGINT)  # as Ctrl-C: mirage-serve --ray then stops the Ray it started
                proc.wait(timeout=60)
            row = summarize(streams, results, health, args)
            rows.append(row)
            print(f"N={streams:3d}  fps/stream min {row['fps_min']:5.1f} mean {row['fps_mean']:5.1f}  "
                  f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  dropped {row['dropped']}  "
                  f"crossed {row['crossed']}  pool busy {row['server_busy']:.2f}", flush=True)
            if not keeps_up(row, args) and not args.keep_going:
                break

    columns = {"streams": "streams", "fps_min": "fps/stream min", "fps_mean": "mean", "p50_ms": "p50 ms",
               "p99_ms": "p99 ms", "sent": "sent", "dropped": "dropped", "crossed": "crossed",
               "server_stale": "srv stale", "server_late": "srv late", "server_steps_per_s": "srv steps/s",
               "server_busy": "srv busy", "server_step_ms": "srv step ms", "max_gap_ms": "max gap ms",
               "client_late_sends": "client late sends"}
    # where a frame's time goes in the server (means over one second mid-window, ms): stage -> column
    stages = {"idle_step_ms": "idle step", "pool_ms": "pool (in step thread)", "step_ms": "step (stepper wall)",
              "decode_ms": "decode", "queue_ms": "queue", "outbox_ms": "outbox", "encode_ms": "encode",
              "send_ms": "send", "pool_max_ms": "pool max", "queue_max_ms": "queue max"}
    print(f"\nmirage-serve {label} on {device}, {args.fps:g} FPS per client, {args.seconds:g} s measured\n")
    print(" | ".join(columns.values()))
    for row in rows:
        print(" | ".join(f"{row[k]:.2f}" if isinstance(row[k], float) else str(row[k]) for k in columns))
    print("\nper-stage means, ms (idle step: the bare pool in the server process before any stream; pool: the "
          "served step inside the step thread; step - pool: the handoff; queue: decoded -> step start)\n")
    print(" | ".join(["streams", *stages.values()]))
    for row in rows:
        print(" | ".join([str(row["streams"]), *("-" if row.get(k) is None else f"{row[k]:.2f}" for k in stages)]))
    best = max([r["streams"] for r in rows if keeps_up(r, args)], default=0)
    print(f"\nmost streams kept up (p99 <= {args.max_p99_ms:g} ms, every stream >= 95% of {args.fps:g} FPS): {best}")
    today = datetime.date.today().isoformat()
    path = args.json or ROOT / "docs" / "bench" / f"{today}_serve_{slug(device)}_{label}.json"
    report = {"date": today, "device": device, "model": label, "random_weights": bool(args.random),
              "command": " ".join(sys.argv), "kept_up": best,
              **{k: getattr(args, k) for k in ("ray", "backend", "fast", "format", "fps", "seconds", "batch_wait_ms",
                                               "deadline_ms", "max_p99_ms", "churn", "null_step_ms", "null_size",
                                               "null_gil_calls", "null_depth", "null_block", "null_rate",
                                               "calibrate_steps",
                                               "switch_interval_ms")},
              "rows": rows}
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
