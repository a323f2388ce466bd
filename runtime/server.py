"""`mirage-serve`'s server: many live streams through one StreamPool, over HTTP + WebSocket.

Why aiohttp: one small, well-kept dependency gives an asyncio HTTP server, WebSockets and static
files in one process and one event loop, and a test client for all three. FastAPI would add
uvicorn, starlette and pydantic for the same four routes; WebRTC through aiortc would add codecs,
ICE and DTLS that loopback and LAN use do not need, while JPEG frames over a WebSocket are simple
to test, debug and measure.

Routes
    GET /          the page (static/index.html)              the token is checked when one is set:
                                                             Authorization: Bearer TOKEN, or ?token=TOKEN
    GET /static/*  its script
    GET /health    JSON: slots, active, fps, busy and step_ms (last second), width, height, video_to_video,
                   idle_step_ms, plan_step_ms, the per-stage timing (stages) and jpeg_codec (nvjpeg: batched
                   on the GPU, runtime/codec.py; pillow: in the codec threads)
    GET /ws        WebSocket, one stream per connection     ?seed=N, the token as on /
Neither the token nor any query string reaches the log (AccessLog; run the app with access_log_class=AccessLog).

Protocol (docs/SERVING.md has it in full)
    text    JSON control messages, server -> client: hello, busy, error, late, stats
    binary  frames, both ways: a 16-byte little-endian header, then the image bytes
            uint32 frame id | uint8 format (1 JPEG, 2 PNG, 3 raw RGB) | 3 zero bytes | float64 timestamp
            The reply to a frame carries its id and timestamp back, in the same format. A generation
            model's client sends the header alone to ask for its next frame.

Flow of a frame
    receiver (one per client)  the stream's ONE undecoded message (newest wins)
    decoder  (one per client)  one decode at a time, at most 2 per planned step, in a codec thread; only the
                               declared format, its size checked from its header first, its work bounded
                               -> the stream's ONE pending frame (newest wins)
    stepper  (one task)        gather pending frames, drop those past the deadline, pool.submit in the step
                               thread; with two steps in flight (a GPU pool) the newest step is held and
                               its pool.collect queued behind the next submit
                               -> each stream's ONE outbox frame, uint8 RGB (newest wins)
    sender   (one per client)  encode in a codec thread -> send; a stats message every second
Nothing on the event loop touches pixels, and nothing but a client's own sender waits on its socket; the
pool is driven from one thread only (submit, collect, attach and detach are serialized there; an attach
resets its row after the steps in flight). docs/SERVING.md's "Threat model and limits" says what a
hostile client can and cannot do, and tests/test_serve_attack.py checks it.
"""
from __future__ import annotations

import asyncio
import collections
import hmac
import io
import ipaddress
import logging
import os
import re
import struct
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web
from aiohttp.abc import AbstractAccessLogger

from mirage.core.errors import MirageError
from mirage.core.loop import MAX_SEED
from mirage.core.video_io import as_uint8, v2v_input_u8
from mirage.runtime.codec import BatchedJpeg, gpu_jpeg
from mirage.runtime.pool import PoolFull

STATIC = Path(__file__).resolve().parent / "static"
HEADER = struct.Struct("<IB3xd")  # frame id, format, 3 pad bytes, client timestamp (any clock, echoed as is)
JPEG, PNG, RAW = 1, 2, 3
FORMATS = {JPEG: "JPEG", PNG: "PNG", RAW: "raw RGB"}
log = logging.getLogger("mirage.serve")


class ServeError(MirageError):
    """A user error: bad server options, or a bad frame from a client (the message says which)."""


MIN_CALIBRATE_STEPS = 3  # what a GPU pool is calibrated with when calibrate_steps is 0
PLAN_STEPS = 5  # a CPU pool plans with the median of this many served steps: a slow period is gone in 3


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None      # required for a non-loopback host; checked on / and /ws
    deadline_ms: float = 100.0    # a frame that has waited longer than this when its step starts is dropped
    max_frame_bytes: int = 1 << 20  # a larger image gets an error; a message over max_message_bytes closes the socket
    batch_wait_ms: float = 5.0    # how long the stepper waits for every stream's frame before stepping without
    stats_interval_s: float = 1.0
    calibrate_steps: int = 0      # at start, time this many steps of the idle pool (nothing commits): /health's
                                  # idle_step_ms, the bare pool's step in this process to set the served one against,
                                  # and the step time the stepper plans with (mirage-serve: 10; a GPU pool gets
                                  # MIN_CALIBRATE_STEPS when 0, as its held steps cannot be timed)
    switch_interval_ms: float = 0.5  # the GIL's switch interval (Python's default 5 ms): how long the step thread,
                                     # back from a GPU call, may wait for the GIL while codec threads run Python
    gpu_jpeg: bool = True  # JPEGs batched on the pool's GPU when it has nvJPEG (runtime/codec.py); False: Pillow

    def __post_init__(self):
        if not self.token and not is_loopback(self.host):
            raise ServeError(f"--host {self.host} is reachable from other machines: pass --token SECRET as well "
                             f"(clients then open /?token=SECRET), or bind 127.0.0.1")

    @property
    def max_message_bytes(self) -> int:
        """The largest message read at all: twice max_frame_bytes, plus the header (an image over
        max_frame_bytes within it is answered with an error). A larger one closes its connection, unread."""
        return 2 * self.max_frame_bytes + HEADER.size


def shorten(value: str, limit: int = 24) -> str:
    """A client's value, quoted and cut, for a message back to it."""
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


TOKEN_QUERY = re.compile(r"(token=)[^&\s'\"]*")


class RedactingFormatter(logging.Formatter):
    """A log formatter that writes `secret` (the token) as "<token>" and any `token=VALUE` as `token=<...>`,
    wherever they appear, tracebacks included: aiohttp's own errors quote request lines and headers."""

    def __init__(self, fmt: str, secret: str | None):
        super().__init__(fmt)
        self.secret = secret

    def format(self, record: logging.LogRecord) -> str:
        text = TOKEN_QUERY.sub(r"\1<...>", super().format(record))
        return text.replace(self.secret, "<token>") if self.secret else text


class AccessLog(AbstractAccessLogger):
    """aiohttp's access log without the query string or any header: a browser's WebSocket can only carry
    the token in the query (/ws?token=...), and a page's requests repeat its own query in their Referer."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info('%s "%s %s" %d %d %.1fms', request.remote, request.method, request.path,
                         response.status, response.body_length, 1e3 * time)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


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
    pixels: np.ndarray | None      # the model's input, (H, W, 3) uint8; None: a generation model's request
    decoded: float = 0.0           # server monotonic clock when its decode ended (for the queue-wait stage)


def decode_frame(data: bytes, shape: tuple[int, int, int], video_to_video: bool, max_bytes: int,
                 received: float, jpeg: BatchedJpeg | None = None) -> Frame:
    """A client's binary message -> Frame; ServeError names what is wrong with it. `jpeg`: the GPU's
    batched JPEG codec (runtime/codec.py), None: Pillow, in this thread."""
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
    pixels = v2v_input_u8(_rgb(payload, fmt, shape, frame_id, jpeg))  # (H, W, 3) uint8: no float frame is kept
    return Frame(frame_id, fmt, client_ts, received, pixels, time.monotonic())


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_CHUNKS = 1024  # libpng writes 8 KiB IDAT chunks: 128 for a 1 MiB frame. Pillow reads chunks in Python
                       # holding the GIL: a 1 MiB PNG of 87k empty chunks took it 331 ms
MAX_JPEG_MARKERS = 64  # segments before the first scan (Pillow reads them in Python); encoders write ~10
MAX_JPEG_SCANS = 64    # a progressive JPEG has ~10 scans, and each is a pass over the whole image


def _rgb(payload: memoryview, fmt: int, shape: tuple[int, int, int], frame_id: int,
         jpeg: BatchedJpeg | None = None) -> np.ndarray:
    """The frame's pixels, decoded only as the declared format, and only once its header has shown the
    model's size and a bounded amount of work; anything the decoder (Pillow, or `jpeg` for a JPEG) raises
    is this frame's error."""
    h, w, _ = shape
    if fmt == RAW:
        if len(payload) != h * w * 3:
            raise ServeError(f"frame {frame_id}: {len(payload)} raw bytes; the model takes {w}x{h} RGB "
                             f"= {h * w * 3} bytes")
        return np.frombuffer(payload, np.uint8).reshape(h, w, 3)
    data = bytes(payload)
    size = _png_size(data, frame_id) if fmt == PNG else _jpeg_size(data, frame_id)
    if size != (w, h):
        raise ServeError(f"frame {frame_id}: {size[0]}x{size[1]} image; the model takes {w}x{h} "
                         "(resize it before sending)")
    if fmt == JPEG and jpeg is not None:
        try:
            rgb = jpeg.decode(data)
        except Exception as e:  # noqa: BLE001 (as Pillow's below: the frame's)
            raise ServeError(f"frame {frame_id}: not a readable JPEG image ({type(e).__name__})") from e
        if rgb.shape != (h, w, 3):  # what was decoded must be what was checked
            raise ServeError(f"frame {frame_id}: not a readable JPEG image (header size mismatch)")
        return rgb
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(data), formats=[FORMATS[fmt]])
        if image.size != (w, h):  # what Pillow read must be what was checked
            raise ValueError("header size mismatch")
        return np.asarray(image.convert("RGB"))
    except Exception as e:  # noqa: BLE001 (every Pillow failure, from a bomb check to a truncated chunk: the frame's)
        raise ServeError(f"frame {frame_id}: not a readable {FORMATS[fmt]} image ({type(e).__name__})") from e


def _png_size(data: bytes, frame_id: int) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after counting the chunks up to IEND."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ServeError(f"frame {frame_id}: not a readable PNG image (no PNG signature and IHDR chunk)")
    pos = len(PNG_SIGNATURE)
    for _ in range(MAX_PNG_CHUNKS):
        if pos + 8 > len(data):
            break
        length, kind = struct.unpack_from(">I4s", data, pos)
        pos += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            break
    else:
        raise ServeError(f"frame {frame_id}: a PNG of over {MAX_PNG_CHUNKS} chunks; the server reads at most that")
    return struct.unpack_from(">II", data, 16)


def _jpeg_size(data: bytes, frame_id: int) -> tuple[int, int]:
    """(width, height) from the first start-of-frame segment, after bounding the segments and scans."""
    if not data.startswith(b"\xff\xd8"):
        raise ServeError(f"frame {frame_id}: not a readable JPEG image (no start-of-image marker)")
    # 0xFF 0xDA only ever starts a scan: inside entropy-coded data a 0xFF byte is followed by 0x00
    if data.count(b"\xff\xda") > MAX_JPEG_SCANS:
        raise ServeError(f"frame {frame_id}: a JPEG of over {MAX_JPEG_SCANS} scans; the server decodes at most that")
    pos = 2
    for _ in range(MAX_JPEG_MARKERS):
        if pos + 9 > len(data) or data[pos] != 0xFF:
            break
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker == 0xFF:  # a fill byte before a marker
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            height, width = struct.unpack_from(">HH", data, pos + 5)
            return width, height
        if marker == 0xDA:  # a scan before any frame header
            break
        pos += 2 + length
    raise ServeError(f"frame {frame_id}: not a readable JPEG image (no frame header within "
                     f"{MAX_JPEG_MARKERS} segments)")


JPEG_QUALITY = 90


def encode_frame(frame: Frame, pixels: np.ndarray, jpeg: BatchedJpeg | None = None) -> bytes:
    """The reply to `frame`: its header echoed, then `pixels` ((H, W, 3) in [-1, 1], or uint8 RGB) in the
    frame's format (a JPEG by `jpeg`, the GPU's batched codec, when given)."""
    rgb = as_uint8(pixels)
    if frame.fmt == RAW:
        body = rgb.tobytes()
    elif frame.fmt == JPEG and jpeg is not None:
        body = jpeg.encode(rgb, JPEG_QUALITY)
    else:
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(rgb).save(out, format=FORMATS[frame.fmt], quality=JPEG_QUALITY)
        body = out.getvalue()
    return HEADER.pack(frame.id, frame.fmt, frame.client_ts) + body


def timed_call(fn, *args):
    """fn(*args) and the seconds it took (run in a codec thread: the stage's own work, not its wait)."""
    start = time.monotonic()
    return fn(*args), time.monotonic() - start


# -- the server ------------------------------------------------------------------------------------
STAGES = ("decode", "queue", "step", "pool", "outbox", "encode", "send")
# per frame: decode (in a codec thread: the image, its uint8 input), queue (decoded -> its step starts: the wait
# for the step in flight and the batch wait), outbox (its step ended -> its encode starts), encode (in a codec
# thread), send (the socket write); per step: step (the stepper's wall time around the step thread's call)
# and pool (inside the step thread: pool.submit, pool.collect with its wait for the GPU, and the batch's uint8
# conversion). step - pool is the handoff between the event loop and that thread (wake-ups, the GIL).


HEALTH_WINDOW_S = 1.0  # /health's stages summarise the samples of this last stretch of time


class Recent:
    """Timed samples of the last HEALTH_WINDOW_S, for /health: their count, mean and maximum."""

    def __init__(self):
        self.samples: collections.deque[tuple[float, float]] = collections.deque()  # (monotonic time, value)

    def add(self, value: float, now: float) -> None:
        self.samples.append((now, value))

    def summary(self, now: float) -> dict:
        while self.samples and self.samples[0][0] < now - HEALTH_WINDOW_S:
            self.samples.popleft()
        values = [v for _, v in self.samples]
        return {"n": len(values), "mean_ms": 1e3 * sum(values) / len(values) if values else None,
                "max_ms": 1e3 * max(values) if values else None}


COUNTS = ("received", "stale", "late", "sent", "unsent", "errors")
# stale: replaced by a newer input before its decode or its step; late: past the deadline when its step started
# (at most every other frame of a stream; each is answered with a `late` message);
# unsent: an output replaced by a newer one before the client could take it
MAX_NOTICES = 16  # control messages a stream may have unsent; a client that does not read loses the oldest
SENDING_S = 1.0   # a stream whose last frame is older than this is not waited for


@dataclass(eq=False)
class Stream:
    slot: int
    ws: web.WebSocketResponse
    raw: tuple[bytes, float] | None = None                  # newest message and its arrival, not yet decoded
    raw_ready: asyncio.Event = field(default_factory=asyncio.Event)  # `raw` has a message
    decoding: Future | None = None                          # its decode in a codec thread (at most one a stream)
    pending: Frame | None = None                            # newest decoded input, not yet stepped
    outbox: tuple[Frame, np.ndarray, float] | None = None   # newest output (uint8 RGB) and when its step ended
    notices: collections.deque[dict] = field(default_factory=lambda: collections.deque(maxlen=MAX_NOTICES))
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # the outbox or the notices have something
    dropped_late: bool = False                              # its last frame was dropped past the deadline
    last_frame: float | None = None                         # when its last decoded frame arrived (None: none yet)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTS, 0))

    def tell(self, message: dict) -> None:
        """Queue a control message for the stream's sender: nothing but the sender ever waits on this
        client's socket, so a client that does not read holds up no one else."""
        self.notices.append(message)
        self.ready.set()

    def error(self, message: str) -> None:
        self.counts["errors"] += 1
        self.tell({"type": "error", "message": message})

    def sending(self, now: float) -> bool:
        return self.last_frame is not None and now - self.last_frame < SENDING_S


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
        # hold, then the step: 24 streams fell to 18 FPS on an H100); on a CPU pool the median of the last
        # PLAN_STEPS served steps, forgotten after an idle second: a moving average stayed inflated after a slow
        # period, and a new stream then waited seconds for a `due` far ahead
        self.served: collections.deque[float] = collections.deque(maxlen=PLAN_STEPS)  # a CPU pool's last steps
        self.submit_s = 0.0  # a submit's time in the step thread, recent mean
        self.due = 0.0       # when the steps in flight are expected to be done
        # One thread touches the pool: submits, collects, attaches and detaches, in the order the event loop
        # asks for them (collecting in a second thread while the first submitted gave wrong frames on an
        # H100 with captured graphs, tests/gpu/test_gpu_serve.py, 2026-11-25). With two steps in flight
        # (a GPU pool) the stepper queues step n's collect only after step n+1's submit, so the GPU
        # computes step n+1 while this thread waits for and converts step n.
        self.step_thread = ThreadPoolExecutor(1, thread_name_prefix="mirage-step")
        self.codec = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="mirage-codec")
        self.jpeg = gpu_jpeg(pool) if options.gpu_jpeg else None  # called from the codec threads

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
        """The token from `Authorization: Bearer T` or `?token=T` (a browser's WebSocket cannot set headers),
        compared in constant time."""
        token = self.options.token
        if not token:
            return
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = request.query.get("token", "")
        if not hmac.compare_digest(given.encode("utf-8", "surrogatepass"), token.encode()):
            raise web.HTTPUnauthorized(text="missing or wrong token: send 'Authorization: Bearer TOKEN', "
                                            "or open the page as /?token=TOKEN\n")

    def query_seed(self, request: web.Request) -> int:
        """/ws's query: `seed` (0 to MAX_SEED, default 0) and `token`, each at most once."""
        unknown = set(request.query) - {"seed", "token"}
        if unknown:
            raise web.HTTPBadRequest(text=f"unknown query parameter {shorten(min(unknown))}: /ws takes seed and "
                                          "token\n")
        if any(len(request.query.getall(key)) > 1 for key in request.query):
            raise web.HTTPBadRequest(text="give each query parameter once\n")
        seed = request.query.get("seed", "0")
        # isdigit alone admits '²' and other digits int() refuses; the length bound keeps int() cheap
        if not (seed.isascii() and seed.isdigit() and len(seed) <= len(str(MAX_SEED)) and int(seed) <= MAX_SEED):
            raise web.HTTPBadRequest(text=f"seed={shorten(seed)}: give an integer from 0 to {MAX_SEED}\n")
        return int(seed)

    # -- HTTP ----------------------------------------------------------------------------------------
    async def index(self, request: web.Request) -> web.StreamResponse:
        self.check_token(request)
        return web.FileResponse(STATIC / "index.html")

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())

    def status(self) -> dict:
        """/health's JSON (bridge/ray_app.py gathers it from every replica)."""
        h, w, _ = self.pool.frame_shape
        return {"slots": self.pool.slots, "active": len(self.pool.active), **self.load(),
                "width": w, "height": h, "video_to_video": self.pool.video_to_video,
                "jpeg_codec": self.jpeg.name if self.jpeg is not None else "pillow"}

    # -- one client ------------------------------------------------------------------------------
    async def websocket(self, request: web.Request) -> web.WebSocketResponse:
        self.check_token(request)
        seed = self.query_seed(request)
        ws = web.WebSocketResponse(max_msg_size=self.max_msg_size, heartbeat=10.0)
        await ws.prepare(request)
        await self.stream(ws, seed, request.remote)
        return ws

    @property
    def max_msg_size(self) -> int:
        """aiohttp refuses a message of max_msg_size bytes or more (closing with 1009): one of up to
        max_message_bytes is read, and answered with an error when its image is over max_frame_bytes."""
        return self.options.max_message_bytes + 1

    async def stream(self, ws, seed: int, remote: str | None, **hello) -> None:
        """One stream over an accepted WebSocket, until it closes: aiohttp's, or any object with its
        send_json, send_bytes, close and message iteration (bridge/ray_app.py's, inside a Ray Serve
        replica). `hello`: more fields for the hello message."""
        try:
            slot = await self.in_step_thread(self.pool.attach, seed)
        except PoolFull as e:
            with suppress(ConnectionError):
                await ws.send_json({"type": "busy", "message": str(e), "slots": self.pool.slots})
                await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"busy")
            return
        stream = self.streams[slot] = Stream(slot, ws)
        helpers = [asyncio.create_task(self.helper(stream, loop)) for loop in (self.decode_loop, self.send_loop)]
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
                self.receive(stream, msg, time.monotonic())
        except ConnectionError:  # it left while we answered it
            pass
        finally:
            await self.leave(stream, helpers)

    async def leave(self, stream: Stream, helpers: list[asyncio.Task]) -> None:
        """Every way out of a stream's handler ends here, and the slot is detached on each: after a
        helper's failure, a client gone mid-send, or this handler's cancellation. Its decode in flight
        (a codec thread cannot be stopped) is waited for first, so that a client that reconnects at
        once never has two decodes running."""
        del self.streams[stream.slot]
        self.wake.set()  # the stepper may be waiting for this stream's frame
        for task in helpers:
            task.cancel()
        try:
            decoding = [asyncio.wrap_future(stream.decoding)] if stream.decoding is not None else []
            await asyncio.gather(*helpers, *decoding, return_exceptions=True)
        finally:
            detached = self.step_thread.submit(self.pool.detach, stream.slot)  # queued even if we are cancelled
        await asyncio.wrap_future(detached)
        log.info("stream in slot %d detached: %s", stream.slot, stream.counts)

    async def helper(self, stream: Stream, loop) -> None:
        """Run one of a stream's loops; a bug in it is logged and closes that stream only."""
        try:
            await loop(stream)
        except ConnectionError:  # the client left; its handler cleans up
            pass
        except Exception:  # noqa: BLE001
            log.exception("stream in slot %d: %s failed", stream.slot, loop.__name__)
            with suppress(ConnectionError):
                await stream.ws.close(code=WSCloseCode.INTERNAL_ERROR, message=b"server error")

    def receive(self, stream: Stream, msg, received: float) -> None:
        """Keep the newest message only: a client sending faster than frames are decoded and stepped
        loses its older ones here, before any work is spent on them."""
        if msg.type != WSMsgType.BINARY:
            stream.error("send frames as binary messages: a 16-byte header, then the image (docs/SERVING.md)")
            return
        stream.counts["received"] += 1
        if stream.raw is not None:
            stream.counts["stale"] += 1
        stream.raw = (msg.data, received)
        stream.raw_ready.set()

    async def decode_loop(self, stream: Stream) -> None:
        """One decode at a time per stream, started at most twice per planned step (the pool takes one
        frame of a stream a step) and never taking more than half of a codec thread's time: a client that
        sends faster, or frames slow to decode, cost that client its older frames (newest wins), not the
        others their codec threads and the GIL."""
        next_decode = 0.0
        while True:
            await stream.raw_ready.wait()
            await asyncio.sleep(max(0.0, next_decode - time.monotonic()))
            stream.raw_ready.clear()
            (data, received), stream.raw = stream.raw, None
            start = time.monotonic()
            stream.decoding = self.codec.submit(timed_call, decode_frame, data, self.pool.frame_shape,
                                                self.pool.video_to_video, self.options.max_frame_bytes, received,
                                                self.jpeg)
            try:
                frame, seconds = await asyncio.wrap_future(stream.decoding)
            except ServeError as e:
                stream.error(str(e))
                continue
            except Exception:  # noqa: BLE001 (a bug, but the client's frame: answer it and go on)
                log.exception("stream in slot %d: decoding a frame failed", stream.slot)
                stream.error("the server could not decode that frame (its log has the traceback)")
                continue
            finally:
                stream.decoding = None
                next_decode = start + max(self.step_s / 2, 2 * (time.monotonic() - start))
            self.stages["decode"].add(seconds, frame.decoded)
            if stream.pending is not None:
                stream.counts["stale"] += 1
            stream.pending = frame
            stream.last_frame = received
            self.wake.set()

    async def send_loop(self, stream: Stream) -> None:
        loop = asyncio.get_running_loop()
        next_stats = loop.time() + self.options.stats_interval_s
        while True:
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stream.ready.wait(), max(0.0, next_stats - loop.time()))
            stream.ready.clear()
            while stream.notices:
                await stream.ws.send_json(stream.notices.popleft())
            if stream.outbox is not None:
                (frame, pixels, stepped), stream.outbox = stream.outbox, None
                self.timed("outbox", stepped)
                data, seconds = await self.in_codec_thread(timed_call, encode_frame, frame, pixels, self.jpeg)
                self.stages["encode"].add(seconds, time.monotonic())
                start = time.monotonic()
                await stream.ws.send_bytes(data)
                self.timed("send", start)
                stream.counts["sent"] += 1
            if loop.time() >= next_stats:
                next_stats = loop.time() + self.options.stats_interval_s
                await stream.ws.send_json({"type": "stats", "streams": len(self.streams),
                                           "slots": self.pool.slots, **self.load(), **stream.counts})

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
                    self.failed(batch)
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
            self.failed(batch)
            return
        end = self.timed("step", start)
        self.stages["pool"].add(submit_s + collect_s, end)
        alone = end - max(start, self.last_step_end)  # in-flight steps overlap: count that time once
        self.steps.append((end, alone))
        if self.pool.depth == 1:  # nothing held: learn it (a held step's time includes its hold, so a GPU pool
            self.learn(alone, idle=start - self.last_step_end > SENDING_S)  # plans with its calibration)
        self.last_step_end = end
        for s, f in batch:
            if self.streams.get(s.slot) is not s:  # it left during the step
                continue
            if s.outbox is not None:
                s.counts["unsent"] += 1
            s.outbox = (f, outputs[s.slot], end)
            s.ready.set()

    def learn(self, seconds: float, idle: bool) -> None:
        """A CPU pool's plan: the median of its last served steps, those before an idle second forgotten;
        with nothing in flight after this step, nothing is due any more."""
        if idle:
            self.served.clear()
        self.served.append(seconds)
        self.step_s = sorted(self.served)[len(self.served) // 2]
        self.due = min(self.due, time.monotonic())
        self.wake.set()  # a batch gathering for the step ahead's end: that end is now

    def failed(self, batch: list[tuple[Stream, Frame]]) -> None:
        log.exception("a pool step failed")
        for s, f in batch:
            s.error(f"frame {f.id}: the server failed to compute it (its log has the traceback)")

    async def next_batch(self, until: float | None = None) -> list[tuple[Stream, Frame]] | None:
        """Wait for a frame (None if none came by `until`, a time.monotonic(), when given), then up to
        batch_wait_ms for every sending stream's (with a step in flight: up to that step's expected end,
        so that the next step goes in full rather than as an early, emptier step that holds the GPU and
        every frame behind it); take the pending frames,
        dropping (and counting) those older than the deadline, but never two of a stream in a row:
        when steps take longer than the deadline, a stream whose frames always arrive early in a
        step would otherwise have every frame dropped and starve while the others stream on."""
        pending = lambda: any(s.pending is not None for s in self.streams.values())  # noqa: E731
        # the streams waited for: those sending (a frame in the last SENDING_S; not a client that has not
        # started, or stopped) with none pending, taken afresh at every arrival and leave
        awaited = lambda: any(s.pending is None and s.sending(time.monotonic())  # noqa: E731
                              for s in self.streams.values())
        while True:
            await self.wait_until(pending, lambda: until)
            if not pending():
                return None
            first = time.monotonic()
            await self.wait_until(lambda: not awaited(),
                                  lambda: max(first + self.options.batch_wait_ms / 1e3, self.due - self.submit_s))
            now, batch = time.monotonic(), []
            for s in self.streams.values():
                frame, s.pending = s.pending, None
                if frame is None:
                    continue
                waited_ms = (now - frame.received) * 1e3
                late = waited_ms > self.options.deadline_ms
                if late and not s.dropped_late:
                    s.counts["late"] += 1
                    s.tell({"type": "late", "id": frame.id, "message": f"frame {frame.id} waited {waited_ms:.0f} "
                            f"ms, over the {self.options.deadline_ms:g} ms deadline: dropped"})
                else:
                    batch.append((s, frame))
                s.dropped_late = late and not s.dropped_late
            if batch:
                return batch

    async def wait_until(self, condition, deadline) -> None:
        """Until condition() holds or deadline() (a time.monotonic(), None: none) passes; both are asked
        again at every wake (a frame arrived, a stream left, a step ended)."""
        while not condition():
            self.wake.clear()
            end = deadline()
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                return
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.wake.wait(), left)

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
        if self.jpeg is not None:
            self.jpeg.close()

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


__all__ = ["ServerOptions", "ServeError", "AccessLog", "RedactingFormatter", "make_app", "decode_frame", "encode_frame",
           "HEADER", "JPEG", "PNG", "RAW"]
