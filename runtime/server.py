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
    text    JSON messages; server -> client: hello, busy, error, late, stats, applied;
            client -> server: control (a new prompt and/or strength for its own stream)
    binary  frames, both ways: a 16-byte little-endian header, then the image bytes
            uint32 frame id | uint8 format (1 JPEG, 2 PNG, 3 raw RGB) | 3 zero bytes | float64 timestamp
            The reply to a frame carries its id and timestamp back, in the same format; a reply's byte 5 is
            its index among the replies to that frame (a block model makes several frames per request).
            A generation model's client sends the header alone to ask for its next frame (or block).

Flow of a frame
    receiver (one per client)  the stream's ONE undecoded message (a block model: frames_in; newest wins)
    decoder  (one per client)  one decode at a time, at most 2 per planned step and input frame, in a codec
                               thread; only the declared format, its size checked from its header first, its
                               work bounded -> gathered into the stream's ONE pending block of the pool's
                               frames_in frames (the U-Net: one frame; newest wins)
    stepper  (one task)        gather pending blocks, drop those past the deadline, pool.submit in the step
                               thread; with two steps in flight (a GPU pool) the newest step is held and
                               its pool.collect queued behind the next submit
                               -> each stream's playout: the step's frames, uint8 RGB (older ones the sender
                               should have sent already are dropped: newest wins); a stream whose playout
                               would outlast the next step is not stepped yet
    sender   (one per client)  each frame when due: a block's frames spaced at the pool's video rate, not in
                               a burst; encode in a codec thread -> send; a stats message every second
    controls (one per client)  a control message's prompt/strength, validated on arrival, coalesced, applied
                               with pool.control in the step thread (between steps) at most every
                               control_interval_ms
Nothing on the event loop touches pixels, and nothing but a client's own sender waits on its socket; the
pool is driven from one thread only (submit, collect, attach and detach are serialized there; an attach
resets its row after the steps in flight). docs/SERVING.md's "Threat model and limits" says what a
hostile client can and cannot do, and tests/test_serve_attack.py checks it.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import io
import ipaddress
import json
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
REPLY = struct.Struct("<IBB2xd")  # HEADER with byte 5 the reply's index among those to its frame (0: the first)
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
    max_prompt_chars: int = 2000  # a longer prompt in a control message is refused before the text encoder sees
                                  # it (the pool refuses one over the encoder's token limit: Wan's is 512 tokens)
    control_interval_ms: float = 500.0  # a stream's controls are applied at most this often, newer ones in between
                                        # merged into one: a prompt re-encodes text and rebuilds the stream's cache
                                        # in the step thread, which every stream's steps wait behind
    gpu_jpeg: bool = True  # JPEGs batched on the pool's GPU when it has nvJPEG (runtime/codec.py); False: Pillow
    prompt_names: tuple[str, ...] = ()  # the prompts a control may name, offered to clients in the hello (`prompts`:
                                        # the page's suggestions): mirage-serve --prompt-bank's names
    prompt: str | None = None  # the prompt every new stream starts on (mirage-serve --prompt: a bank name or text),
                               # told in the hello (None: given as embeddings, which have no text)

    def __post_init__(self):
        if not self.token and not is_loopback(self.host):
            raise ServeError(f"--host {self.host} is reachable from other machines: pass --token SECRET as well "
                             f"(clients then open /?token=SECRET), or bind 127.0.0.1")

    @property
    def max_message_bytes(self) -> int:
        """The largest message read at all: twice max_frame_bytes, plus the header (an image over
        max_frame_bytes within it is answered with an error). A larger one closes its connection, unread."""
        return 2 * self.max_frame_bytes + HEADER.size

    @property
    def max_control_chars(self) -> int:
        """The longest text message parsed as a control: the prompt limit with every character escaped
        (\\uXXXX), plus room for the other fields. A longer one is refused unparsed."""
        return 6 * self.max_prompt_chars + 256


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


@dataclass(frozen=True)
class Block:
    """What one step takes from a stream: the pool's frames_in decoded frames (a generation model's: the one
    request), oldest first. Its deadline and its queue stage run from its last frame: the block could not be
    stepped before that frame came."""
    frames: tuple[Frame, ...]

    @property
    def last(self) -> Frame:
        return self.frames[-1]

    def pixels(self) -> np.ndarray:
        """The pool's input for this stream: (H, W, 3) for one frame (a U-Net's), (n, H, W, 3) for a block."""
        return self.frames[0].pixels if len(self.frames) == 1 else np.stack([f.pixels for f in self.frames])


def decode_frame(data: bytes, shape: tuple[int, int, int], video_to_video: bool, max_bytes: int,
                 received: float, jpeg: BatchedJpeg | None = None, restores: bool = True) -> Frame:
    """A client's binary message -> Frame; ServeError names what is wrong with it. `jpeg`: the GPU's
    batched JPEG codec (runtime/codec.py), None: Pillow, in this thread. `restores`: the model restores a
    degraded frame (the U-Net's video-to-video), made here from the one sent; else it takes that frame as is."""
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
    # clients send a plain RGB frame; a restoring model's input is made from it as mirage-run makes it:
    # luma at full resolution plus coarse chroma (the U-Net's video-to-video task); a DiT restyles it as it is
    pixels = _rgb(payload, fmt, shape, frame_id, jpeg)
    pixels = v2v_input_u8(pixels) if restores else pixels  # (H, W, 3) uint8: no float frame is kept
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


def encode_frame(frame: Frame, pixels: np.ndarray, index: int = 0) -> bytes:
    """Reply `index` (0: the first) to `frame`: its header echoed with that index in byte 5, then `pixels`
    ((H, W, 3) in [-1, 1], or uint8 RGB) in the frame's format, by Pillow in this (codec) thread: the GPU's
    JPEG encoder cannot be ordered against a step in flight without waiting for it (model/nvjpeg.py)."""
    rgb = as_uint8(pixels)
    if frame.fmt == RAW:
        body = rgb.tobytes()
    else:
        from PIL import Image

        out = io.BytesIO()
        Image.fromarray(rgb).save(out, format=FORMATS[frame.fmt], quality=JPEG_QUALITY)
        body = out.getvalue()
    return REPLY.pack(frame.id, frame.fmt, index, frame.client_ts) + body


CONTROL_FIELDS = {"type", "slot", "prompt", "strength"}


def parse_control(text: str, slot: int, controls: dict, max_prompt_chars: int) -> dict:
    """A client's text message -> the pool.control arguments it asks for ({"prompt": str, "strength": float},
    either or both); ServeError names what is wrong with it. `controls` is the pool's (what the model accepts:
    {"prompt": True, "strength": (low, high)}, {} for none), `slot` the client's own stream."""
    try:
        message = json.loads(text)
    except ValueError:
        message = None
    if not isinstance(message, dict) or message.get("type") != "control":
        raise ServeError('a text message is a control, {"type": "control", "prompt": ..., "strength": ...}; '
                         "send frames as binary messages (docs/SERVING.md)")
    unknown = set(message) - CONTROL_FIELDS
    if unknown:
        raise ServeError(f"control: unknown field {shorten(min(unknown))}; a control has "
                         f"{', '.join(sorted(CONTROL_FIELDS))}")
    if "slot" in message and (type(message["slot"]) is not int or message["slot"] != slot):
        raise ServeError(f"control: slot {json.dumps(message['slot'])[:24]} is not this connection's stream "
                         f"(slot {slot}): a connection controls its own stream only")
    if not controls:
        raise ServeError("control: this model takes no prompt and no strength")
    change = {}
    if "prompt" in message:
        prompt = message["prompt"]
        if not controls.get("prompt"):
            raise ServeError("control: this model takes no prompt")
        if not isinstance(prompt, str):
            raise ServeError(f"control: prompt must be a string, not {type(prompt).__name__}")
        if len(prompt) > max_prompt_chars:
            raise ServeError(f"control: a prompt of {len(prompt)} characters; the server takes at most "
                             f"{max_prompt_chars}")
        change["prompt"] = prompt
    if "strength" in message:
        strength = message["strength"]
        if not controls.get("strength"):
            raise ServeError("control: this model takes no strength")
        low, high = controls["strength"]
        # bool is an int in Python, and NaN passes no comparison: both refused by name
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not low <= strength <= high:
            raise ServeError(f"control: strength {json.dumps(strength)[:24]}; give a number from {low:g} to {high:g}")
        change["strength"] = float(strength)
    if not change:
        raise ServeError("control: give a prompt, a strength or both")
    return change


def timed_call(fn, *args):
    """fn(*args) and the seconds it took (run in a codec thread: the stage's own work, not its wait)."""
    start = time.monotonic()
    return fn(*args), time.monotonic() - start


# -- the server ------------------------------------------------------------------------------------
STAGES = ("decode", "queue", "step", "pool", "outbox", "encode", "send")
# per frame: decode (in a codec thread: the image, its uint8 input), queue (decoded -> its step starts: the wait
# for the step in flight, the batch wait and, in a block, the block's later frames), outbox (due: its step
# ended or, in a block, its paced time -> its encode starts), encode (in a codec
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


COUNTS = ("received", "stale", "late", "sent", "unsent", "errors", "controls")
# stale: replaced by a newer input before its decode or its step; late: past the deadline when its step started
# (at most every other block of a stream; each block is answered with one `late` message);
# unsent: an output dropped before the client could take it, the next one being due as well (newest wins: Stream.land);
# controls: control messages applied (merged ones count once)
MAX_NOTICES = 16  # control messages a stream may have unsent; a client that does not read loses the oldest
SENDING_S = 1.0   # a stream whose last frame is older than this is not waited for
# a video-to-video block landing well behind older frames still to play has its frames spaced down to this fraction
# of the frame period until it is not (Stream.land): 16 FPS video plays at up to 17.8 meanwhile
CATCH_UP = 0.9


@dataclass(frozen=True)
class Reply:
    """One output frame waiting in a stream's playout."""
    frame: Frame          # the input it answers (header echoed)
    index: int            # its index among the replies to that input
    pixels: np.ndarray    # uint8 RGB
    landed: float         # when its step ended (monotonic): it is not sent before
    spacing: float        # seconds from it to the next frame: the video's frame period within a block, else 0


@dataclass(eq=False)
class Stream:
    slot: int
    ws: web.WebSocketResponse
    raw: collections.deque[tuple[bytes, float]] = field(default_factory=lambda: collections.deque(maxlen=1))
    # the newest messages and their arrival, not yet decoded: one, or a block model's frames_in (Server.stream)
    raw_ready: asyncio.Event = field(default_factory=asyncio.Event)  # `raw` has a message
    decoding: Future | None = None                          # its decode in a codec thread (at most one a stream)
    gathering: list[Frame] = field(default_factory=list)    # decoded inputs of the block not yet complete
    pending: Block | None = None                            # newest complete block, not yet stepped
    playout: collections.deque[Reply] = field(default_factory=collections.deque)  # outputs not yet sent, in order
    next_send: float = 0.0                                  # the earliest the next output may go (monotonic)
    control: dict = field(default_factory=dict)             # pool.control arguments not yet applied (merged)
    control_ready: asyncio.Event = field(default_factory=asyncio.Event)  # `control` has something
    notices: collections.deque[dict] = field(default_factory=lambda: collections.deque(maxlen=MAX_NOTICES))
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # the playout or the notices have something
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

    def gather(self, frame: Frame, frames_in: int) -> None:
        """Add a decoded input; with the block's frames_in there (1 for a generation model's request), it is
        the pending block, replacing an unstepped older one (its frames counted stale)."""
        self.gathering.append(frame)
        if len(self.gathering) < max(1, frames_in):
            return
        if self.pending is not None:
            self.counts["stale"] += len(self.pending.frames)
        self.pending, self.gathering = Block(tuple(self.gathering)), []

    def land(self, block: Block, frames: np.ndarray, landed: float, period: float,
             slack: float | None = None) -> None:
        """A step's outputs for this stream ((n, H, W, 3) uint8) into its playout, spaced by `period` when n > 1.
        Output k answers input k of the block; outputs beyond its inputs (a generation request's block)
        answer its last input with indices 1, 2, ... Older outputs that the sender should have taken by
        now, the one after them being due as well, are dropped (unsent): for one frame a step (the U-Net)
        newest wins; a block model's client that reads too slowly catches up instead of lagging further,
        while the older block's frames still to be played (the server held the step until they nearly
        were: Server.ready_for_step) are kept, this block chained after them. Given a `slack` (video-to-video;
        a generation stream's playout may hold a block more by design, Server.next_batch) and chained more than
        that behind, its frames play a little faster (down to CATCH_UP periods apart) until the next block's
        first frame is due no more than that behind: a video-rate client's blocks land one play time apart, so
        a delay once (a slow step) otherwise stayed in every later frame. Within the slack (a quarter block)
        the playout absorbs a step's jitter instead: caught up at once, a block landing early was a gap when
        the next one landed on time. (Served wan-1.3b, 2 streams, before: p50 1685 ms and p99 1708, where
        gathering a block and its step make 1181; a standing delay fits that narrow spread.)"""
        while self.playout and self.due() + self.playout[0].spacing < landed:
            self.next_send = self.due() + self.playout.popleft().spacing  # the schedule goes on as if it went
            self.counts["unsent"] += 1
        spacing = period if len(frames) > 1 else 0.0
        if len(frames) > 1 and slack is not None:
            behind = self.playout_start(landed) - landed - slack  # beyond the slack, older frames push it back
            spacing = max(CATCH_UP * period, period - max(0.0, behind) / len(frames))  # n: to the next block's
        for k, pixels in enumerate(frames):
            j = min(k, len(block.frames) - 1)
            self.playout.append(Reply(block.frames[j], k - j, pixels, landed, spacing))
        self.ready.set()

    def due(self) -> float | None:
        """When the next output goes out (None: none waiting): when its step ended, or one spacing after
        the output before it was due, whichever is later."""
        return max(self.next_send, self.playout[0].landed) if self.playout else None

    def playout_start(self, landed: float) -> float:
        """When an output landing at `landed` would go out, after those now waiting."""
        after = self.playout_end() + self.playout[-1].spacing if self.playout else self.next_send
        return max(after, landed)

    def playout_end(self) -> float:
        """When the last output now waiting will go out (-inf: none waiting)."""
        end, at = float("-inf"), self.next_send
        for reply in self.playout:
            end = max(at, reply.landed)
            at = end + reply.spacing
        return end


async def settle(task: asyncio.Task) -> None:
    """Wait for a step's finishing task; a bug in it is logged with its traceback, and the stepper goes on."""
    try:
        await task
    except Exception:  # noqa: BLE001
        log.exception("finishing a pool step failed")


class Server:
    def __init__(self, pool, options: ServerOptions):
        self.pool, self.options = pool, options
        # the block contract (docs/SERVING.md): input frames a step takes per stream, the conditioning
        # pool.control accepts, the rate the output plays at (None: as it comes)
        self.frames_in: int = pool.frames_in
        self.controls: dict = pool.controls
        self.video_rate: float | None = pool.video_rate
        self.restores: bool = pool.restores  # its input is the sent frame degraded (the U-Net's), else as sent
        self.frame_period = 1.0 / self.video_rate if self.video_rate else 0.0
        # a block model's step waits for a stream this many frames or fewer from its block (a quarter block, one at
        # least: a client may send a block's frames back to back), up to their time, align_s (next_batch, align)
        self.align_frames = max(1, self.frames_in // 4)
        self.align_s = self.align_frames * self.frame_period if self.frames_in > 1 else 0.0
        # a block plays for frames_in periods, and the next one replaces it by then (newest wins): a block
        # model's deadline is at least that, or a step longer than deadline_ms would drop every other block
        # (a model of one input frame a step, the U-Net, keeps the deadline it is given)
        block_ms = 1e3 * self.frames_in * self.frame_period if self.frames_in > 1 else 0.0
        self.deadline_ms = max(options.deadline_ms, block_ms)
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
        """In the step thread: the oldest step's outputs as uint8 RGB (n, H, W, 3) per slot, the seconds taken.
        One vectorized conversion of the whole batch here, instead of one per stream in the codec threads
        (per stream only where rows made blocks of different lengths: Wan's VAE's first block is shorter)."""
        start = time.monotonic()
        outputs = self.pool.collect()
        slots = list(outputs)
        frames = [outputs[s] for s in slots]  # (n, H, W, 3) each: n frames of one step (the U-Net's n = 1)
        if len({f.shape for f in frames}) == 1:
            frames = list(as_uint8(np.stack(frames)))
        else:
            frames = [as_uint8(f) for f in frames]
        return dict(zip(slots, frames)), time.monotonic() - start

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

    def block_contract(self) -> dict:
        """What the hello message tells a client about blocks and controls: input frames a step takes
        (0: a generation model's request), the rate the output plays at (null: as it comes), and what a
        control message may set ({"prompt": true, "strength": [low, high]}; {}: nothing) with the prompt's
        length limit and the prompts known by name (a prompt bank's)."""
        return {"frames_in": self.frames_in, "video_rate": self.video_rate, "controls": self.controls,
                "max_prompt_chars": self.options.max_prompt_chars, "prompts": list(self.options.prompt_names)}

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
        # a block model's client may send a block's frames back to back: they wait together, undecoded
        stream = self.streams[slot] = Stream(slot, ws, raw=collections.deque(maxlen=max(1, self.frames_in)))
        helpers = [asyncio.create_task(self.helper(stream, loop))
                   for loop in (self.decode_loop, self.send_loop, self.control_loop)]
        try:
            # the stream's own starting values of its controls (a DiT's strength: mirage-serve --strength), for
            # a client to show, not to replace with its own defaults
            current = await self.in_step_thread(self.pool.conditioning, slot) if self.controls else {}
            if self.options.prompt is not None:  # the pool keeps a prompt as its embeddings only
                current["prompt"] = self.options.prompt
            h, w, _ = self.pool.frame_shape
            await ws.send_json({"type": "hello", "slot": slot, "seed": seed, "width": w, "height": h,
                                "video_to_video": self.pool.video_to_video, "slots": self.pool.slots,
                                "deadline_ms": self.deadline_ms, "max_frame_bytes": self.options.max_frame_bytes,
                                **self.block_contract(), **current, **hello})
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
        """Keep the newest message only (a block model: the newest frames_in, a block's worth): a client
        sending faster than frames are decoded and stepped loses its older ones here, before any work is
        spent on them. A text message is a control."""
        if msg.type == WSMsgType.TEXT:
            self.receive_control(stream, msg.data)
            return
        if msg.type != WSMsgType.BINARY:
            stream.error("send frames as binary messages: a 16-byte header, then the image (docs/SERVING.md)")
            return
        stream.counts["received"] += 1
        if len(stream.raw) == stream.raw.maxlen:
            stream.counts["stale"] += 1
        stream.raw.append((msg.data, received))
        stream.raw_ready.set()

    def receive_control(self, stream: Stream, text: str) -> None:
        """Validate a control message on the event loop (its size bounded first: parsing it is cheap), and
        merge it into the stream's unapplied control: the newest prompt and the newest strength win."""
        if len(text) > self.options.max_control_chars:
            stream.error(f"a text message of {len(text)} characters; a control takes at most "
                         f"{self.options.max_control_chars}")
            return
        try:
            change = parse_control(text, stream.slot, self.controls, self.options.max_prompt_chars)
        except ServeError as e:
            stream.error(str(e))
            return
        stream.control.update(change)
        stream.control_ready.set()

    async def control_loop(self, stream: Stream) -> None:
        """Apply a stream's controls in the step thread, so between two steps (a prompt: its text encoded and
        the stream's cache rebuilt by the pool), at most every control_interval_ms: a client cannot keep
        the step thread, which every stream's steps wait behind, re-encoding prompts. A refusal (a prompt
        over the text encoder's limit, no text encoder) is one error to this client."""
        next_control = 0.0
        while True:
            await stream.control_ready.wait()
            await asyncio.sleep(max(0.0, next_control - time.monotonic()))
            stream.control_ready.clear()
            change, stream.control = stream.control, {}
            applied, _ = await self.answered(stream, "apply the control", "control: ",
                                             self.in_step_thread(functools.partial(self.pool.control, stream.slot,
                                                                                   **change)))
            next_control = time.monotonic() + self.options.control_interval_ms / 1e3
            if applied:
                stream.counts["controls"] += 1
                stream.tell({"type": "applied", **change})

    async def answered(self, stream: Stream, what: str, prefix: str, work) -> tuple[bool, object]:
        """Await `work` for `stream`: (True, its result), or (False, None) after one error to that client
        alone: a user error's message (MirageError, ServeError among them), or for a bug, its traceback
        logged and "the server could not `what`"."""
        try:
            return True, await work
        except MirageError as e:
            stream.error(f"{prefix}{e}")
        except Exception:  # noqa: BLE001 (a bug, but this client's: answer it and go on)
            log.exception("stream in slot %d: failed to %s", stream.slot, what)
            stream.error(f"{prefix}the server could not {what} (its log has the traceback)")
        return False, None

    async def decode_loop(self, stream: Stream) -> None:
        """One decode at a time per stream, started at most twice per planned step and frame the step takes
        (a block model takes frames_in of a stream a step) and never taking more than half of a codec
        thread's time: a client that sends faster, or frames slow to decode, cost that client its older
        frames (newest wins), not the others their codec threads and the GIL."""
        next_decode = 0.0
        while True:
            await stream.raw_ready.wait()
            await asyncio.sleep(max(0.0, next_decode - time.monotonic()))
            data, received = stream.raw.popleft()
            if not stream.raw:
                stream.raw_ready.clear()
            start = time.monotonic()
            stream.decoding = self.codec.submit(timed_call, decode_frame, data, self.pool.frame_shape,
                                                self.pool.video_to_video, self.options.max_frame_bytes, received,
                                                self.jpeg, self.restores)
            try:
                decoded, result = await self.answered(stream, "decode that frame", "",
                                                      asyncio.wrap_future(stream.decoding))
            finally:
                stream.decoding = None
                next_decode = start + max(self.step_s / (2 * max(1, self.frames_in)), 2 * (time.monotonic() - start))
            if not decoded:
                continue
            frame, seconds = result
            self.stages["decode"].add(seconds, frame.decoded)
            stream.gather(frame, self.frames_in)
            stream.last_frame = received
            self.wake.set()

    async def send_loop(self, stream: Stream) -> None:
        """The stream's messages, and its outputs each when due (Stream.due): a block's frames go out at the
        video rate, not in a burst, each stream on its own clock, so pacing one holds up no other."""
        next_stats = time.monotonic() + self.options.stats_interval_s
        while True:
            due = stream.due()
            wake = next_stats if due is None else min(due, next_stats)
            with suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stream.ready.wait(), max(0.0, wake - time.monotonic()))
            stream.ready.clear()
            while stream.notices:
                await stream.ws.send_json(stream.notices.popleft())
            due = stream.due()
            if due is not None and due <= time.monotonic():
                reply = stream.playout.popleft()
                stream.next_send = due + reply.spacing
                self.timed("outbox", due)
                data, seconds = await self.in_codec_thread(timed_call, encode_frame, reply.frame, reply.pixels,
                                                           reply.index)
                self.stages["encode"].add(seconds, time.monotonic())
                start = time.monotonic()
                await stream.ws.send_bytes(data)
                self.timed("send", start)
                stream.counts["sent"] += 1
            if time.monotonic() >= next_stats:
                next_stats = time.monotonic() + self.options.stats_interval_s
                await stream.ws.send_json({"type": "stats", "streams": len(self.streams),
                                           "slots": self.pool.slots, **self.load(), **stream.counts})

    # -- the stepper -------------------------------------------------------------------------------
    async def stepper(self) -> None:
        """Submit each batch (every ready stream's pending block) as soon as it is ready, with up to
        pool.depth steps in flight; each in-flight step is finished (collected, handed to its streams) by
        its own task, in order. With
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
                inputs = {s.slot: b.pixels() for s, b in batch} if self.pool.video_to_video else {}
                start = time.monotonic()
                for _, b in batch:
                    for f in b.frames:
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

    async def finish(self, batch: list[tuple[Stream, Block]], start: float, submit_s: float) -> None:
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
        for s, b in batch:
            if self.streams.get(s.slot) is s:  # not if it left during the step
                s.land(b, outputs[s.slot], end, self.frame_period,
                       self.align_s if self.pool.video_to_video else None)

    def learn(self, seconds: float, idle: bool) -> None:
        """A CPU pool's plan: the median of its last served steps, those before an idle second forgotten;
        with nothing in flight after this step, nothing is due any more."""
        if idle:
            self.served.clear()
        self.served.append(seconds)
        self.step_s = sorted(self.served)[len(self.served) // 2]
        self.due = min(self.due, time.monotonic())
        self.wake.set()  # a batch gathering for the step ahead's end: that end is now

    def failed(self, batch: list[tuple[Stream, Block]]) -> None:
        log.exception("a pool step failed")
        for s, b in batch:
            s.error(f"frame {b.last.id}: the server failed to compute it (its log has the traceback)")

    def ready_for_step(self, stream: Stream, now: float) -> bool:
        """It has a pending block, and its playout runs dry before a step started now would end, give or take
        align_s: a stream whose outputs play slower than it sends (a block model's client sending faster than
        the video rate, or a generation client asking at any rate) waits, its newer blocks replacing the
        pending one, instead of growing its playout. A one-frame model's playout is due at once: never held.
        The slack is for a video-to-video client sending at the video rate, whose block completes as its
        previous block's last frames play: a step that lands a little later than planned (a held collect,
        a busy GPU) would otherwise hold its next block until its playout ran dry, and that hold, repeated
        every block, became standing latency (2 null-model streams of 450 ms steps: 1418 ms at p50, against
        1189 ms for one)."""
        return stream.pending is not None and self.ready_at(stream) <= now

    def ready_at(self, stream: Stream) -> float:
        """When a step started would end as the stream's playout runs dry, less align_s (ready_for_step)."""
        return stream.playout_end() - self.step_s - self.align_s

    def release_at(self) -> float | None:
        """When the first stream held by its playout becomes ready for a step (None: none is held)."""
        now = time.monotonic()
        return min((t for s in self.streams.values() if s.pending is not None and (t := self.ready_at(s)) > now),
                   default=None)

    async def next_batch(self, until: float | None = None) -> list[tuple[Stream, Block]] | None:
        """Wait for a ready block (None if none came by `until`, a time.monotonic(), when given), then up to
        batch_wait_ms for every sending stream's (with a step in flight: up to that step's expected end,
        so that the next step goes in full rather than as an early, emptier step that holds the GPU and
        every frame behind it; a block model's stream a quarter of a block or less from its block: until
        those frames are due, `align_s`); take the pending frames,
        dropping (and counting) those older than the deadline, but never two of a stream in a row:
        when steps take longer than the deadline, a stream whose frames always arrive early in a
        step would otherwise have every frame dropped and starve while the others stream on. Then a
        video-to-video block model's streams caught mid-block are aligned (align)."""
        pending = lambda: any(self.ready_for_step(s, time.monotonic()) for s in self.streams.values())  # noqa: E731
        # the streams waited for: those sending (a frame in the last SENDING_S; not a client that has not
        # started, or stopped) with none pending, taken afresh at every arrival and leave; of a block model's,
        # those within a quarter block of their block (the others are aligned instead)
        awaited = lambda: any(s.pending is None and s.sending(time.monotonic())  # noqa: E731
                              and (self.frames_in <= 1 or self.missing(s) <= self.align_frames)
                              for s in self.streams.values())
        while True:
            await self.wait_until(pending, lambda: min((t for t in (until, self.release_at()) if t is not None),
                                                       default=None))
            if not pending():
                if until is not None and time.monotonic() >= until:
                    return None
                continue  # a held stream's release passed: asked again
            first = time.monotonic()
            await self.wait_until(lambda: not awaited(),
                                  lambda: max(first + self.options.batch_wait_ms / 1e3, self.due - self.submit_s,
                                              first + self.align_s))
            now, batch = time.monotonic(), []
            for s in self.streams.values():
                # a generation pool advances every attached row each step: a stream held by its playout
                # that has asked joins rather than have its row's block made and lost (its playout then
                # holds one more block, and from then on it is in step with the others)
                if s.pending is None or not (self.ready_for_step(s, now) or not self.pool.video_to_video):
                    continue
                block, s.pending = s.pending, None
                frame = block.last
                waited_ms = (now - frame.received) * 1e3
                # a generation request carries no input that could go stale: dropping it would only throw away
                # its row's block, which the step makes anyway (a skip in that stream's video)
                late = self.pool.video_to_video and waited_ms > self.deadline_ms
                if late and not s.dropped_late:
                    s.counts["late"] += len(block.frames)
                    # a block's ids, each named: newest wins drops a client's frames between them, so its first
                    # and last ids are no range ("frames 70 to 74" was a block of 2)
                    dropped = f"frame {frame.id}" if len(block.frames) == 1 else \
                        f"the block of frames {', '.join(str(f.id) for f in block.frames)}"
                    s.tell({"type": "late", "id": frame.id, "message": f"{dropped} waited {waited_ms:.0f} "
                            f"ms, over the {self.deadline_ms:g} ms deadline: dropped"})
                else:
                    batch.append((s, block))
                s.dropped_late = late and not s.dropped_late
            if batch:
                self.align(batch)
                return batch

    def align(self, batch: list[tuple[Stream, Block]]) -> None:
        """A video-to-video block model's step advances every row's cache whether it has a block or not, so
        streams whose blocks complete out of phase would each cost a whole step (2 streams of wan-1.3b
        half a block apart: 2.7 steps a second of 450 ms, more than the GPU has). So a sending stream caught
        mid-block by this step, beyond the quarter block waited for, drops the frames it gathered before the
        batch's newest block was complete (counted stale; under a block, once): its next block then completes
        one block after the batch's, whenever this step starts, and from then on it steps with them. A
        stream's first block (the stream just attached) is where this happens."""
        if self.frames_in <= 1 or not self.pool.video_to_video:
            return
        stepping = {s.slot for s, _ in batch}
        complete = max(b.last.received for _, b in batch)  # when the batch's newest block was
        for s in self.streams.values():
            if s.slot in stepping or s.pending is not None or not s.sending(time.monotonic()) \
                    or self.missing(s) <= self.align_frames:  # its frames came: it steps next, nothing lost
                continue
            kept = [f for f in s.gathering if f.received > complete]
            s.counts["stale"] += len(s.gathering) - len(kept)
            s.gathering = kept

    def missing(self, stream: Stream) -> int:
        """Frames a block model's stream has yet to send for its block: those it sent count once they arrive,
        decoded or not."""
        arrived = len(stream.gathering) + len(stream.raw) + (stream.decoding is not None)
        return self.frames_in - arrived

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
