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

--random CONFIG with a DiT config (wan-1.3b, dit-tiny, ...) serves a random-weight DiT checkpoint written as one
trained here (bf16), with random prompt embeddings (`mirage-serve --dit CONFIG CKPT --prompt-embeds F`): video-to-
video at --strength on a per-frame autoencoder (dit-tiny-taesd) or, with --taehv, through a random TAEHV (`--decoder`,
wan-1.3b at 832x480), else generation (the clients send requests). A block model's table says FPS per stream
against its video rate and p99 in block periods (a block of N latent frames is 4N video frames at 16 FPS: 750 ms
for wan-1.3b), and a count keeps up at p99 <= 2 block periods (--max-p99-ms unless given) and every stream at
>= 95% of the video rate (issue 29: >= 2 streams at 16 FPS each):

    python scripts/bench_serve.py --random wan-1.3b --taehv --device cuda --fps 16 --counts 1,2,3 --keep-going

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

from mirage.core.config import DEFAULT_STRENGTH, DIT_CONFIGS
from mirage.core.dit_step import WAN_VIDEO_RATE
from mirage.core.report import write_json
from mirage.runtime.server import HEADER, JPEG, RAW, REPLY, ServerOptions

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
            + (["--cpu-jpeg"] if args.cpu_jpeg else []) + args.serve_args
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


def random_dit(config: str, folder: Path, taehv: bool, strength: float) -> tuple[str, list[str]]:
    """A DiT checkpoint of `config` as mirage.train.dit saves one (model.safetensors + config.json {"dit": ...},
    its prompt.safetensors: random (text_len, text_dim) embeddings), random weights in bf16, built in bf16 (one
    copy in memory: wan-1.3b's 2.8 GB), and mirage-serve's arguments for it: --dit, --prompt-embeds, and for
    video-to-video (a per-frame autoencoder, or a random TAEHV in its published key layout with `taehv`)
    --strength, with --decoder for the TAEHV."""
    import torch

    from mirage.core.config import get_dit_config
    from mirage.model.dit import WanDiT
    from mirage.model.taehv import Taehv
    from mirage.model.wan_checkpoint import default_dtype
    from mirage.train.dit import PROMPT_FILE, save_dit

    cfg = get_dit_config(config)
    torch.manual_seed(0)
    with default_dtype(torch.bfloat16):
        model = WanDiT(cfg).requires_grad_(False)
    text = torch.randn(1, cfg.text_len, cfg.text_dim)
    out = save_dit(folder / config, model, text, {"step": 0, "random_weights": True})
    del model
    serve = ["--dit", config, "--prompt-embeds", str(out / PROMPT_FILE)]
    if taehv and not cfg.autoencoder:
        torch.save(Taehv().state_dict(), folder / "taew2_1.pth")
        serve += ["--decoder", str(folder / "taew2_1.pth")]
    if taehv or cfg.autoencoder:
        serve += ["--strength", str(strength)]
    return str(out), serve


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
    """One stream: send on a 1/fps schedule until `stop`; replies to frames sent inside `window` count. A block
    model's client sends on past `stop` until the block holding its last counted frame is complete: a block
    answers only once all its frames came, so a cut there would count up to a block of frames dropped."""
    period, start, end = 1.0 / args.fps, *window
    result = {"sent": 0, "latencies_ms": [], "crossed": 0, "late_sends": 0, "max_gap_ms": 0.0, "server": {},
              "replies_per_request": 1}
    last_reply = None
    async with ClientSession() as session, session.ws_connect(url.replace("http", "ws") + "/ws") as ws:
        hello = await ws.receive_json()
        if hello["type"] == "busy":
            raise Busy(hello["message"])
        v2v = hello["video_to_video"]
        result.update(video_to_video=v2v, frames_in=hello.get("frames_in", 1), video_rate=hello.get("video_rate"))
        frames = synthetic_frames(hello["width"], hello["height"], 16, index, args.format) if v2v else [b""]
        fmt = RAW if args.format == "raw" else JPEG

        async def send():
            tick = time.perf_counter() + random.uniform(0, period)
            n = 0
            # not bound to the window's block boundaries: up to frames_in - 1 more frames (a churn client's
            # stop is no window's end, and a U-Net's frames_in is 1: nothing more)
            until = stop + (result["frames_in"] - 1) * period if v2v else stop
            while tick < until:
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
                frame_id, _, index_in_reply, ts = REPLY.unpack_from(msg.data)  # its index among its frame's
                result["replies_per_request"] = max(result["replies_per_request"], index_in_reply + 1)
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
        # replies still in flight: until none came for grace_s, or a block model's two block periods (its last
        # block's frames are paced out over one, after a step): a cut there would count its last frames dropped
        rate = hello.get("video_rate")
        quiet = max(args.grace_s, 2 * max(result["frames_in"], result["replies_per_request"]) / rate) if rate \
            else args.grace_s
        while True:
            seen = last_reply
            await asyncio.sleep(quiet)
            if last_reply == seen:
                break
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
    judged = targets(results, args)
    p99 = float(np.percentile(lat, 99))
    # a generation client's messages are requests, most replaced by a newer one by design (one per block is
    # stepped): only a video-to-video client's unanswered frames are drops
    generates = judged["block_ms"] is not None and not results[0]["video_to_video"]
    return {"streams": streams, "fps_min": min(fps), "fps_mean": float(np.mean(fps)), **judged,
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": p99,
            "p99_blocks": None if judged["block_ms"] is None else p99 / judged["block_ms"],
            "sent": sum(r["sent"] for r in results), "answered": int(sum(len(r["latencies_ms"]) for r in results)),
            "dropped": None if generates else sum(r["sent"] - len(r["latencies_ms"]) for r in results),
            "crossed": sum(r["crossed"] for r in results), "client_late_sends": sum(r["late_sends"] for r in results),
            "max_gap_ms": max(r["max_gap_ms"] for r in results),
            "server_steps_per_s": health["fps"], "server_busy": health["busy"],
            "server_step_ms": health["step_ms"], "idle_step_ms": health.get("idle_step_ms"),
            "jpeg_codec": health.get("jpeg_codec"),  # nvjpeg (batched on the GPU) or pillow (CPU threads)
            **{f"{name}_ms": stage["mean_ms"] for name, stage in health.get("stages", {}).items()},
            **{f"{name}_max_ms": stage["max_ms"] for name, stage in health.get("stages", {}).items()},
            **{f"server_{k}": v for k, v in server.items()}}


def targets(results: list[dict], args) -> dict:
    """What a count is judged against. A U-Net's frames: --fps each, p99 <= --max-p99-ms (33 unless given). A
    block model's (the hello's video_rate, docs/SERVING.md) play at its video rate, so that is the rate a stream
    keeps (video-to-video: the rate its client sends at, if lower), and its latency counts in block periods: a
    block's frames (a video-to-video step's frames_in; a generation request's replies) over the video rate, 4N
    frames at 16 FPS for N latent frames (wan-1.3b: 750 ms); p99 <= 2 of them unless --max-p99-ms is given."""
    first = results[0]
    rate = first.get("video_rate")
    if not rate:
        return {"target_fps": args.fps, "block_ms": None, "max_p99_ms": args.max_p99_ms or 33.0}
    frames = first["frames_in"] if first["video_to_video"] else max(r["replies_per_request"] for r in results)
    block_ms = 1e3 * frames / rate
    return {"target_fps": min(args.fps, rate) if first["video_to_video"] else rate, "block_ms": block_ms,
            "max_p99_ms": args.max_p99_ms or 2 * block_ms}


def keeps_up(row: dict) -> bool:
    return row["p99_ms"] <= row["max_p99_ms"] and row["fps_min"] >= 0.95 * row["target_fps"]


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
    p.add_argument("--random", metavar="CONFIG", help="serve a random-weight checkpoint of this config instead of "
                   "MODEL: a U-Net's video-to-video (tiny, small, base, seed880m), or a DiT's (wan-1.3b, dit-tiny, "
                   "dit-tiny-taesd, ...: --taehv, --strength)")
    p.add_argument("--taehv", action="store_true", help="--random DiT without a per-frame autoencoder: also a "
                   "random TAEHV (mirage-serve --decoder), its video-to-video at --strength; without it, generation")
    p.add_argument("--strength", type=float, default=DEFAULT_STRENGTH, help="a --random DiT's video-to-video "
                   "strength (mirage-serve --strength)")
    p.add_argument("--device", default="auto")
    p.add_argument("--backend", default="auto")
    p.add_argument("--fast", action="store_true", help="mirage-serve --fast (Inductor, GPU)")
    p.add_argument("--counts", default="1,2,4,8,16,24,32,48,64", help="stream counts to try, in order")
    p.add_argument("--format", choices=("jpeg", "raw"), default="jpeg", help="what the clients send (and get "
                   "back): JPEG as the page does, or raw RGB, which costs the server no codec")
    p.add_argument("--fps", type=float, default=None, help="frames per second each client sends (default 30; a "
                   "--random DiT's: its video rate, 16)")
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
    p.add_argument("--max-p99-ms", type=float, default=None, help="a count keeps up at p99 under this (default: "
                   "33 ms, a block model's 2 block periods)")
    p.add_argument("--json", type=Path, default=None, help="default: docs/bench/DATE_serve_DEVICE_MODEL.json")
    args = p.parse_args()
    if args.serve_null:
        return serve_null(args.serve_null, args)

    device = device_name("cpu" if args.null_step_ms is not None else args.device)
    label = (args.random or (f"null-{args.null_size}px-{args.null_step_ms:g}ms"
                             + (f"-block{args.null_block}" if args.null_block > 1 else "") if args.null_step_ms is not None
                             else Path(args.model).name)) + ("-taehv" if args.taehv else "") \
        + ("-ray" if args.ray else "")
    today = datetime.date.today().isoformat()
    path = args.json or ROOT / "docs" / "bench" / f"{today}_serve_{slug(device)}_{label}.json"
    rows = []
    if args.fps is None:  # clients faster than a block model's video rate only have their frames dropped
        args.fps = float(WAN_VIDEO_RATE) if args.random in DIT_CONFIGS else 30.0
    args.serve_args = shlex.split(args.serve_args)  # mirage-serve's arguments beyond MODEL (a random DiT's first)
    with tempfile.TemporaryDirectory() as tmp:
        if args.random in DIT_CONFIGS:
            args.model, dit_args = random_dit(args.random, Path(tmp), args.taehv, args.strength)
            args.serve_args = dit_args + args.serve_args
        elif args.random:
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
            print(f"N={streams:3d}  fps/stream min {row['fps_min']:5.1f} mean {row['fps_mean']:5.1f} "
                  f"(of {row['target_fps']:g})  p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms"
                  + (f" = {row['p99_blocks']:.2f} block periods of {row['block_ms']:.0f} ms"
                     if row["block_ms"] is not None else "")
                  + f"  dropped {row['dropped']}  crossed {row['crossed']}  pool busy {row['server_busy']:.2f}",
                  flush=True)
            write_report(path, today, device, label, rows, args)  # after each count: a cut run keeps its rows
            if not keeps_up(row) and not args.keep_going:
                break

    columns = {"streams": "streams", "fps_min": "fps/stream min", "fps_mean": "mean", "target_fps": "target fps",
               "p50_ms": "p50 ms", "p99_ms": "p99 ms", "block_ms": "block period ms", "p99_blocks": "p99 in blocks",
               "sent": "sent", "dropped": "dropped", "crossed": "crossed",
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
        print(" | ".join(cell(row[k]) for k in columns))
    print("\nper-stage means, ms (idle step: the bare pool in the server process before any stream; pool: the "
          "served step inside the step thread; step - pool: the handoff; queue: decoded -> step start)\n")
    print(" | ".join(["streams", *stages.values()]))
    for row in rows:
        print(" | ".join([str(row["streams"]), *(cell(row.get(k)) for k in stages)]))
    print(f"\n{verdict(rows)}")
    print(f"wrote {path}")


def cell(value) -> str:
    return "-" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def verdict(rows: list[dict]) -> str:
    """The most streams kept up, as streams x FPS per stream at the p99 that held (issue 29's form for a block
    model: p99 in block periods)."""
    if not rows:
        return "no count measured"
    kept, rule = [r for r in rows if keeps_up(r)], rows[0]
    bound = f"p99 <= {rule['max_p99_ms']:g} ms" + (f" = {rule['max_p99_ms'] / rule['block_ms']:g} block periods of "
                                                    f"{rule['block_ms']:g} ms" if rule["block_ms"] else "")
    head = f"most streams kept up ({bound}, every stream >= 95% of {rule['target_fps']:g} FPS): "
    if not kept:
        return head + "0"
    best = max(kept, key=lambda r: r["streams"])
    blocks = f" = {best['p99_blocks']:.2f} block periods" if best["block_ms"] else ""
    return head + (f"{best['streams']} streams x {best['fps_min']:.1f} FPS per stream (the slowest), p99 "
                   f"{best['p99_ms']:.0f} ms{blocks}")


def write_report(path: Path, today: str, device: str, label: str, rows: list[dict], args) -> None:
    kept = [r["streams"] for r in rows if keeps_up(r)]
    report = {"date": today, "device": device, "model": label, "random_weights": bool(args.random),
              "command": " ".join(sys.argv), "kept_up": max(kept, default=0), "verdict": verdict(rows),
              "serve_args": args.serve_args,
              **{k: getattr(args, k) for k in ("ray", "backend", "fast", "format", "fps", "seconds", "batch_wait_ms",
                                               "deadline_ms", "max_p99_ms", "churn", "null_step_ms", "null_size",
                                               "null_gil_calls", "null_depth", "null_block", "null_rate",
                                               "calibrate_steps", "switch_interval_ms", "taehv", "strength")},
              "rows": rows}
    write_json(path, report)  # atomic: it is rewritten after every count, and a run may be cut (timeout) mid-way


if __name__ == "__main__":
    main()
