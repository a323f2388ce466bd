"""`mirage-serve`'s server: many live streams through one StreamPool, over HTTP + WebSocket.

Why aiohttp: one small, well-kept dependency gives an asyncio HTTP server, WebSockets and static
files in one process and one event loop, and a test client for all three. FastAPI would add
uvicorn, starlette and pydantic for the same four routes; WebRTC through aiortc would add codecs,
ICE and DTLS that loopback and LAN use do not need, while JPEG frames over a WebSocket are simple
to test, debug and measure.

Routes
    GET /          the page (static/index.html)              the token is checked when one is set
    GET /static/*  its script
    GET /health    JSON: slots, active, fps, busy and step_ms (last second), width, height, video_to_video,
                   idle_step_ms, plan_step_ms and the per-stage timing (stages)
    GET /ws        WebSocket, one stream per connection     ?token=...&seed=N

Protocol (docs/SERVING.md has it in full)
    text    JSON control messages, server -> client: hello, busy, error, stats
    binary  frames, both ways: a 16-byte little-endian header, then the image bytes
            uint32 frame id | uint8 format (1 JPEG, 2 PNG, 3 raw RGB) | 3 zero bytes | float64 timestamp
            The reply to a frame carries its id and timestamp back, in the same format. A generation
            model's client sends the header alone to ask for its next frame.

Flow of a frame
    receiver (one per client)  the stream's ONE undecoded message (newest wins)
    decoder  (one per client)  decode in a codec thread -> the stream's ONE pending frame (newest wins)
    stepper  (one task)        gather pending frames, drop those past the deadline, pool.submit in the step
                               thread; with two steps in flight (a GPU pool) the newest step is held and
                               its pool.collect queued behind the next submit
                               -> each stream's ONE outbox frame, uint8 RGB (newest wins)
    sender   (one per client)  encode in a codec thread -> send; a stats message every second
Nothing on the event loop touches pixels; the pool is driven from one thread only (submit, collect,
attach and detach are serialized there; an attach resets its row after the steps in flight).
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import io
import ipaddress
import logging
import os
import struct
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from mirage.core.errors import MirageError
from mirage.core.video_io import as_uint8, to_float, v2v_input
from mirage.runtime.pool import PoolFull

STATIC = Path(__file__).resolve().parent / "static"
HEADER = struct.Struct("<IB3xd")  # frame id, format, 3 pad bytes, client timestamp (any clock, echoed as is)
JPEG, PNG, RAW = 1, 2, 3
FORMATS = {JPEG: "JPEG", PNG: "PNG", RAW: "raw RGB"}
log = logging.getLogger("mirage.serve")


class ServeError(MirageError):
    """A user error: bad server options, or a bad frame from a client (the message says which)."""


MIN_CALIBRATE_STEPS = 3  # what a GPU pool is calibrated with when calibrate_steps is 0


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None      # required for a non-loopback host; checked on / and /ws
    deadline_ms: float = 100.0    # a frame that has waited longer than this when its step starts is dropped
    max_frame_bytes: int = 1 << 20  # a larger frame gets an error; a message over twice this closes the socket
    batch_wait_ms: float = 5.0    # how long the stepper waits for every stream's frame before stepping without
    stats_interval_s: float = 1.0
    calibrate_steps: int = 0      # at start, time this many steps of the idle pool (nothing commits): /health's
                                  # idle_step_ms, the bare pool's step in this process to set the served one against,
                                  # and the step time the stepper plans with (mirage-serve: 10; a GPU pool gets
                                  # MIN_CALIBRATE_STEPS when 0, as its held steps cannot be timed)
    switch_interval_ms: float = 0.5  # the GIL's switch interval (Python's default 5 ms): how long the step thread,
                                     # back from a GPU call, may wait for the GIL while codec threads run Python

    def __post_init__(self):
        if not self.token and not is_loopback(self.host):
            raise ServeError(f"--host {self.host} is reachable from other machines: pass --token SECRET as well "
                             f"(clients then open /?token=SECRET), or bind 127.0.0.1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


# -- frames: pure functions, run in codec threads ------------------------------------------------
@dataclass(frozen=True)
class Frame:
    id: int
    fmt: int
    client_ts: float
    received: float                # server monotonic clock, for the deadline
    pixels: np.ndarray | None      # the model's input, (H, W, 3) float32; None: a generation model's request
    decoded: float = 0.0           # server monotonic clock when its decode ended (for the queue-wait stage)


def decode_frame(data: bytes, shape: tuple[int, int, int], video_to_video: bool, max_bytes: int,
                 received: float) -> Frame:
    """A client's binary message -> Frame; ServeError names what is wrong with it."""
    if len(data) < HEADER.size:
        raise ServeError(f"a frame message is a {HEADER.size}-byte header, then the image; got {len(data)} bytes")
    frame_id, fmt, client_ts = HEADER.unpack_from(data)
    if fmt not in FORMATS:
        raise ServeError(f"frame {frame_id}: format byte {fmt}; use 1 (JPEG), 2 (PNG) or 3 (raw RGB)")
    payload = memoryview(data)[HEADER.size:]
    if len(payload) > max_bytes:
        raise ServeError(f"frame {frame_id}: {len(payload)} bytes, over the server's limit of {max_bytes}")
    if not video_to_video:
        if payload:
            raise ServeError(f"frame {frame_id}: this generation model takes no input; send the header alone")
        return Frame(frame_id, fmt, client_ts, received, None, time.monotonic())
    if not payload:
        raise ServeError(f"frame {frame_id}: this video-to-video model needs an input image after the header")
    # clients send a plain RGB frame; the model's input is made from it as mirage-run makes it:
    # luma at full resolution plus coarse chroma (the video-to-video task the models are trained on)
    pixels = v2v_input(to_float(_rgb(payload, fmt, shape, frame_id)))  # (H, W, 3) in [-1, 1]
    return Frame(frame_id, fmt, client_ts, received, pixels, time.monotonic())


def _rgb(payload: memoryview, fmt: int, shape: tuple[int, int, int], frame_id: int) -> np.ndarray:
    h, w, _ = shape
    if fmt == RAW:
        if len(payload) != h * w * 3:
            raise ServeError(f"frame {frame_id}: {len(payload)} raw bytes; the model takes {w}x{h} RGB "
                             f"= {h * w * 3} bytes")
        return np.frombuffer(payload, np.uint8).reshape(h, w, 3)
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(payload))  # reads the header only: the size is checked before decoding
        if image.size != (w, h):
            raise ServeError(f"frame {frame_id}: {image.size[0]}x{image.size[1]} image; the model takes {w}x{h} "
                             "(resize it before sending)")
        return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ServeError(f"frame {frame_id}: not a readable {FORMATS[fmt]} image ({e})") from e


def encode_frame(frame: Frame, pixels: np.ndarray) -> bytes:
    """The reply to `frame`: its header echoed, then `pixels` ((H, W, 3) in [-1, 1], or uint8 RGB) in the
    frame's format."""
    rgb = as_uint8(pixels)
    if frame.fmt == RAW:
        body = rgb.tobytes()
    else:
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(rgb).save(out, format=FORMATS[frame.fmt], quality=90)
        body = out.getvalue()
    return HEADER.pack(frame.id, frame.fmt, frame.client_ts) + body


def timed_call(fn, *args):
    """fn(*args) and the seconds it took (run in a codec thread: the stage's own work, not its wait)."""
    start = time.monotonic()
    return fn(*args), time.monotonic() - start


# -- the server ------------------------------------------------------------------------------------
STAGES = ("decode", "queue", "step", "pool", "outbox", "encode", "send")
# per frame: decode (in a codec thread: the image and v2v_input), queue (decoded -> its step starts: the wait
# for the step in flight and the batch wait), outbox (its step ended -> its encode starts), encode (in a codec
# thread), send (the socket write); per step: step (the stepper's wall time around the step thread's call)
# and pool (inside the step thread: pool.submit, pool.collect with its wait for the GPU, and the batch's uint8
# conversion). step - pool is the handoff between the event loop and that thread (wake-ups, the GIL).


class Recent:
    """Timed samples of the last second, for /health: their count, mean and maximum."""

    def __init__(self):
        self.samples: collections.deque[tuple[float, float]] = collections.deque()  # (monotonic time, value)

    def add(self, value: float, now: float) -> None:
        self.samples.append((now, value))

    def summary(self, now: float) -> dict:
        while self.samples and self.samples[0][0] < now - 1.0:
            self.samples.popleft()
        values = [v for _, v in self.samples]
        return {"n": len(values), "mean_ms": 1e3 * sum(values) / len(values) if values else None,
                "max_ms": 1e3 * max(values) if values else None}


COUNTS = ("received", "stale", "late", "sent", "unsent", "errors")
# stale: replaced by a newer input before its decode or its step; late: past the deadline when its step started
# (at most every other frame of a stream);
# unsent: an output replaced by a newer one before the client could take it


@dataclass(eq=False)
class Stream:
    slot: int
    ws: web.WebSocketResponse
    raw: tuple[bytes, float] | None = None                  # newest message and its arrival, not yet decoded
    raw_ready: asyncio.Event = field(default_factory=asyncio.Event)  # `raw` has a message
    pending: Frame | None = None                            # newest decoded input, not yet stepped
    outbox: tuple[Frame, np.ndarray, float] | None = None   # newest output (uint8 RGB) and when its step ended
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # the outbox has a frame
    dropped_late: bool = False                              # its last frame was dropped past the deadline
    last_frame: float = field(default_factory=time.monotonic)  # when its last frame arrived (or it connected)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))


async def settle(task: asyncio.Task) -> None:
    """Wait for a step's finishing task; a bug in it is logged with its traceback, and the stepper goes on."""
    try:
        await task
    except Exception:  # noqa: BLE001
        log.exception("finishing a pool step failed")


class Server:
    def __init__(self, pool, options: ServerOptions):
        self.pool, self.options = pool, options
        self.streams: dict[int, Stream] = {}
        self.wake = asyncio.Event()  # a frame arrived or a stream left
        self.steps: collections.deque[tuple[float, float]] = collections.deque()  # (end, seconds in flight, not
        # counting the overlap with the step before) of recent steps
        self.stages = {name: Recent() for name in STAGES}
        self.idle_step_ms: float | None = None  # set by calibrate()
        self.last_step_end = 0.0
        self.step_s = 0.0    # the step time the stepper plans with (`due`): on a pool that holds steps (a GPU)
        # the calibrated period of idle steps kept two in flight, never learned (a held step's collect waits for
        # the next submit, so its measured time holds that wait too; learning from it lengthened `due`, then the
        # hold, then the step: 24 streams fell to 18 FPS on an H100); on a CPU pool a recent mean of served steps
        self.submit_s = 0.0  # a submit's time in the step thread, recent mean
        self.due = 0.0       # when the steps in flight are expected to be done
        # One thread touches the pool: submits, collects, attaches and detaches, in the order the event loop
        # asks for them (collecting in a second thread while the first submitted gave wrong frames on an
        # H100 with captured graphs, tests/gpu/test_gpu_serve.py, 2026-11-25). With two steps in flight
        # (a GPU pool) the stepper queues step n's collect only after step n+1's submit, so the GPU
        # computes step n+1 while this thread waits for and converts step n.
        self.step_thread = ThreadPoolExecutor(1, thread_name_prefix="mirage-step")
        self.codec = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="mirage-codec")

    def timed(self, stage: str, start: float) -> float:
        now = time.monotonic()
        self.stages[stage].add(now - start, now)
        return now

    def submit_pool(self, inputs: dict) -> float:
        """In the step thread: start a pool step (on a GPU it returns once launched); the seconds taken."""
        start = time.monotonic()
        self.pool.submit(inputs)
        return time.monotonic() - start

    def collect_pool(self) -> tuple[dict[int, np.ndarray], float]:
        """In the step thread: the oldest step's outputs as uint8 RGB, the seconds taken. One vectorized
        conversion of the whole batch here, instead of one per stream in the codec threads."""
        start = time.monotonic()
        outputs = self.pool.collect()
        slots = list(outputs)
        rgb = as_uint8(np.stack([outputs[s] for s in slots])) if slots else []  # (n, H, W, 3) uint8
        return dict(zip(slots, rgb)), time.monotonic() - start

    def step_pool(self, inputs: dict) -> float:
        """A whole step, synchronously (the calibration's): its seconds."""
        return self.submit_pool(inputs) + self.collect_pool()[1]

    def calibrate(self, steps: int) -> None:
        """In the step thread, before any stream: the idle pool's step (every row computed, none committed)."""
        inputs = {}
        self.step_pool(inputs)  # warm: first-call costs stay out of the number
        seconds = [self.step_pool(inputs) for _ in range(steps)]
        self.idle_step_ms = 1e3 * sorted(seconds)[len(seconds) // 2]
        self.step_s = self.pipelined_step_s(steps) if self.pool.depth > 1 else self.idle_step_ms / 1e3
        log.info("idle pool step: %.2f ms (median of %d), planned step %.2f ms", self.idle_step_ms, len(seconds),
                 1e3 * self.step_s)

    def pipelined_step_s(self, steps: int) -> float:
        """In the step thread: the period of idle steps kept two in flight, as the stepper keeps them."""
        start = time.monotonic()
        self.submit_pool({})
        for _ in range(steps - 1):
            self.submit_pool({})
            self.collect_pool()
        self.collect_pool()
        return (time.monotonic() - start) / steps

    def in_step_thread(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self.step_thread, fn, *args)

    def in_codec_thread(self, fn, *args):
        return asyncio.get_running_loop().run_in_executor(self.codec, fn, *args)

    def load(self) -> dict:
        """Over the last second: pool steps (each advances every stream by one frame), the share of
        the time with a pool step in flight, the mean step in ms (from its submit to its outputs), the
        idle pool's step (calibrate), the step the stepper plans with, and each stage's count, mean and
        maximum (STAGES). On a pool that holds steps (a GPU) a step is in flight until its collect, which
        waits for the next submit: `busy` and `step_ms` then include that hold and say nothing of the
        GPU's own occupancy; on a CPU pool, busy near 1 means the model is the bound."""
        now = time.monotonic()
        since = now - 1.0
        while self.steps and self.steps[0][0] < since:
            self.steps.popleft()
        inside = sum(min(seconds, end - since) for end, seconds in self.steps)  # a step may start before `since`
        stages = {name: recent.summary(now) for name, recent in self.stages.items()}
        return {"fps": len(self.steps), "busy": round(inside, 3), "step_ms": stages["step"]["mean_ms"],
                "idle_step_ms": self.idle_step_ms, "plan_step_ms": round(1e3 * self.step_s, 3), "stages": stages}

    def check_token(self, request: web.Request) -> None:
        token = self.options.token
        if token and not hmac.compare_digest(request.query.get("token", "").encode(), token.encode()):
            raise web.HTTPUnauthorized(text="missing or wrong token: open the page as /?token=SECRET\n")

    # -- HTTP ----------------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        self.check_token(request)
        return web.FileResponse(STATIC / "index.html")

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    def status(self) -> dict:
        """/health's JSON (runtime/ray_app.py gathers it from every replica)."""
        h, w, _ = self.pool.frame_shape
        return {"slots": self.pool.slots, "active": len(self.pool.active), **self.load(),
                "width": w, "height": h, "video_to_video": self.pool.video_to_video}

    # -- one client ------------------------------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self.check_token(request)
        seed = self.seed_of(request)
        ws = web.WebSocketResponse(max_msg_size=self.max_msg_size, heartbeat=10.0)
        await ws.prepare(request)
        await self.stream(ws, seed, request.remote)
        return ws

    @staticmethod
    def seed_of(request: web.Request) -> int:
        seed = request.query.get("seed", "0")
        if not seed.isdigit():
            raise web.HTTPBadRequest(text=f"seed={seed!r}: give a non-negative integer\n")
        return int(seed)

    @property
    def max_msg_size(self) -> int:
        """A larger message is not read: the socket is closed (1009)."""
        return 2 * self.options.max_frame_bytes + HEADER.size

    async def stream(self, ws, seed: int, remote: str | None, **hello) -> None:
        """One stream over an accepted WebSocket, until it closes: aiohttp's, or any object with its
        send_json, send_bytes, close and message iteration (runtime/ray_app.py's, inside a Ray Serve
        replica). `hello`: more fields for the hello message."""
        try:
            slot = await self.in_step_thread(self.pool.attach, seed)
        except PoolFull as e:
            await ws.send_json({"type": "busy", "message": str(e), "slots": self.pool.slots})
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"busy")
            return
        stream = self.streams[slot] = Stream(slot, ws)
        helpers = [asyncio.create_task(self.decode_loop(stream)), asyncio.create_task(self.send_loop(stream))]
        try:
            h, w, _ = self.pool.frame_shape
            await ws.send_json({"type": "hello", "slot": slot, "seed": seed, "width": w, "height": h,
                                "video_to_video": self.pool.video_to_video, "slots": self.pool.slots,
                                "deadline_ms": self.options.deadline_ms,
                                "max_frame_bytes": self.options.max_frame_bytes, **hello})
            log.info("stream in slot %d attached (seed %d, %s)", slot, seed, remote)
            async for msg in ws:
                if msg.type == WSMsgType.ERROR:  # e.g. over the hard size cap: aiohttp closes it (1009)
                    break
                await self.receive(stream, msg, time.monotonic())
        except ConnectionError:  # it left while we answered it
            pass
        finally:
            del self.streams[slot]
            self.wake.set()  # the stepper may be waiting for this stream's frame
            for task in helpers:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task
            await self.in_step_thread(self.pool.detach, slot)
            log.info("stream in slot %d detached: %s", slot, stream.counts)

    async def receive(self, stream: Stream, msg, received: float) -> None:
        """Keep the newest message only: a client sending faster than frames are decoded and stepped
        loses its older ones here, before any work is spent on them."""
        if msg.type != WSMsgType.BINARY:
            stream.counts["errors"] += 1
            await stream.ws.send_json({"type": "error", "message": "send frames as binary messages: a 16-byte "
                                       "header, then the image (docs/SERVING.md)"})
            return
        stream.counts["received"] += 1
        if stream.raw is not None:
            stream.counts["stale"] += 1
        stream.raw = (msg.data, received)
        stream.raw_ready.set()

    async def decode_loop(self, stream: Stream) -> None:
        try:
            while True:
                await stream.raw_ready.wait()
                stream.raw_ready.clear()
                (data, received), stream.raw = stream.raw, None
                try:
                    frame = await self.in_codec_thread(timed_call, decode_frame, data, self.pool.frame_shape,
                                                       self.pool.video_to_video, self.options.max_frame_bytes,
                                                       received)
                except ServeError as e:
                    stream.counts["errors"] += 1
                    await stream.ws.send_json({"type": "error", "message": str(e)})
                    continue
                frame, seconds = frame
                self.stages["decode"].add(seconds, frame.decoded)
                if stream.pending is not None:
                    stream.counts["stale"] += 1
                stream.pending = frame
                stream.last_frame = received
                self.wake.set()
        except ConnectionError:  # the client left; its handler cleans up
            return

    async def send_loop(self, stream: Stream) -> None:
        loop = asyncio.get_running_loop()
        next_stats = loop.time() + self.options.stats_interval_s
        try:
            while True:
                with suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stream.ready.wait(), max(0.0, next_stats - loop.time()))
                stream.ready.clear()
                if stream.outbox is not None:
                    (frame, pixels, stepped), stream.outbox = stream.outbox, None
                    self.timed("outbox", stepped)
                    data, seconds = await self.in_codec_thread(timed_call, encode_frame, frame, pixels)
                    self.stages["encode"].add(seconds, time.monotonic())
                    start = time.monotonic()
                    await stream.ws.send_bytes(data)
                    self.timed("send", start)
                    stream.counts["sent"] += 1
                if loop.time() >= next_stats:
                    next_stats = loop.time() + self.options.stats_interval_s
                    await stream.ws.send_json({"type": "stats", "streams": len(self.streams),
                                               "slots": self.pool.slots, **self.load(), **stream.counts})
        except ConnectionError:  # the client left; its handler cleans up
            return

    # -- the stepper -------------------------------------------------------------------------------
    async def stepper(self) -> None:
        """Submit each batch as soon as it is ready, with up to pool.depth steps in flight; each
        in-flight step is finished (collected, handed to its streams) by its own task, in order. With
        depth 2 the newest step is `held`: its collect is queued in the step thread behind the next
        step's submit (or once it is due with no next batch), never ahead of it."""
        in_flight: collections.deque[asyncio.Task] = collections.deque()  # steps whose collect is queued
        held = None  # (batch, start, submit_s) of a submitted step whose collect is not queued yet

        def release() -> None:
            nonlocal held
            in_flight.append(asyncio.create_task(self.finish(*held)))
            held = None

        try:
            while True:
                batch = await self.next_batch(until=None if held is None else self.due)
                if batch is None:  # the held step is due and no frame came: collect it
                    release()
                    continue
                while len(in_flight) + (held is not None) >= self.pool.depth:  # held < depth: in_flight has one
                    await settle(in_flight.popleft())
                # streams that left while this batch waited: their slots are detached (or reused) by now
                batch = [(s, f) for s, f in batch if self.streams.get(s.slot) is s]
                if not batch:
                    continue
                inputs = {s.slot: f.pixels for s, f in batch} if self.pool.video_to_video else {}
                start = time.monotonic()
                for _, f in batch:
                    self.stages["queue"].add(start - f.decoded, start)
                try:
                    submit_s = await self.in_step_thread(self.submit_pool, inputs)
                except Exception:  # noqa: BLE001 (a bug: log it, tell those clients, keep serving the others)
                    await self.failed(batch)
                    continue
                self.submit_s += 0.1 * (submit_s - self.submit_s)
                self.due = max(start, self.due) + self.step_s
                if held is not None:
                    release()  # queued behind this submit in the step thread
                held = (batch, start, submit_s)
                if self.pool.depth == 1:  # nothing to overlap (a CPU pool computes in submit)
                    release()
        finally:
            for task in in_flight:
                task.cancel()

    async def finish(self, batch: list[tuple[Stream, Frame]], start: float, submit_s: float) -> None:
        try:
            outputs, collect_s = await self.in_step_thread(self.collect_pool)
        except Exception:  # noqa: BLE001 (as in stepper)
            await self.failed(batch)
            return
        end = self.timed("step", start)
        self.stages["pool"].add(submit_s + collect_s, end)
        alone = end - max(start, self.last_step_end)  # in-flight steps overlap: count that time once
        self.steps.append((end, alone))
        if self.pool.depth == 1:  # nothing held: learn it (a held step's time includes its hold, so a GPU pool
            self.step_s += 0.1 * (alone - self.step_s)  # plans with its calibration)
        self.last_step_end = end
        for s, f in batch:
            if self.streams.get(s.slot) is not s:  # it left during the step
                continue
            if s.outbox is not None:
                s.counts["unsent"] += 1
            s.outbox = (f, outputs[s.slot], end)
            s.ready.set()

    async def failed(self, batch: list[tuple[Stream, Frame]]) -> None:
        log.exception("a pool step failed")
        for s, f in batch:
            s.counts["errors"] += 1
            with suppress(ConnectionError):
                await s.ws.send_json({"type": "error", "message": f"frame {f.id}: the server failed to "
                                      "compute it (its log has the traceback)"})

    async def next_batch(self, until: float | None = None) -> list[tuple[Stream, Frame]] | None:
        """Wait for a frame (None if none came by `until`, a time.monotonic(), when given), then up to
        batch_wait_ms for every sending stream's (with a step in flight: up to that step's expected end,
        so that the next step goes in full rather than as an early, emptier step that holds the GPU and
        every frame behind it); take the pending frames,
        dropping (and counting) those older than the deadline, but never two of a stream in a row:
        when steps take longer than the deadline, a stream whose frames always arrive early in a
        step would otherwise have every frame dropped and starve while the others stream on."""
        pending = lambda: any(s.pending is not None for s in self.streams.values())  # noqa: E731
        while True:
            await self.wait_until(pending, None if until is None else until - time.monotonic())
            if not pending():
                return None
            # a stream silent for a second (a client that has not started, or stopped sending) is not waited for
            sending = [s for s in self.streams.values() if time.monotonic() - s.last_frame < 1.0]
            wait = max(self.options.batch_wait_ms / 1e3, self.due - self.submit_s - time.monotonic())
            await self.wait_until(lambda: all(s.pending is not None for s in sending), wait)
            now, batch = time.monotonic(), []
            for s in self.streams.values():
                frame, s.pending = s.pending, None
                if frame is None:
                    continue
                late = (now - frame.received) * 1e3 > self.options.deadline_ms
                if late and not s.dropped_late:
                    s.counts["late"] += 1
                else:
                    batch.append((s, frame))
                s.dropped_late = late and not s.dropped_late
            if batch:
                return batch

    async def wait_until(self, condition, timeout: float | None = None) -> None:
        end = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while not condition():
            self.wake.clear()
            left = None if end is None else end - asyncio.get_running_loop().time()
            if left is not None and left <= 0:
                return
            try:
                await asyncio.wait_for(self.wake.wait(), left)
            except asyncio.TimeoutError:
                return

    # -- lifetime ----------------------------------------------------------------------------------
    async def lifetime(self, app: web.Application):
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(self.options.switch_interval_ms / 1e3)
        # a pool that holds steps (depth 2) is always calibrated: the plan must not come from held steps
        steps = self.options.calibrate_steps or (MIN_CALIBRATE_STEPS if self.pool.depth > 1 else 0)
        if steps:
            await self.in_step_thread(self.calibrate, steps)
        stepper = asyncio.create_task(self.stepper())
        yield
        stepper.cancel()
        with suppress(asyncio.CancelledError):
            await stepper
        sys.setswitchinterval(switch_interval)
        self.step_thread.shutdown()
        self.codec.shutdown()

    async def close_streams(self, app: web.Application) -> None:
        for s in list(self.streams.values()):
            await s.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


SERVER = web.AppKey("server", Server)


def make_app(pool, options: ServerOptions = ServerOptions()) -> web.Application:
    """The aiohttp application serving `pool` (a mirage.runtime.pool.StreamPool, opened and closed by
    the caller)."""
    server = Server(pool, options)
    app = web.Application()
    app[SERVER] = server
    app.router.add_get("/", server.index)
    app.router.add_get("/health", server.health)
    app.router.add_get("/ws", server.websocket)
    app.router.add_static("/static", STATIC)
    app.cleanup_ctx.append(server.lifetime)
    app.on_shutdown.append(server.close_streams)
    return app


__all__ = ["ServerOptions", "ServeError", "make_app", "decode_frame", "encode_frame", "HEADER", "JPEG", "PNG", "RAW"]
