"""mirage-serve against hostile clients (issue 27), on the CPU and loopback only.

One `mirage-serve` subprocess (4 slots, a token from $MIRAGE_SERVE_TOKEN) serves the whole module, over a
stand-in pool whose step sleeps STEP_MS (tests/serve_standin.py: like a GPU pool's step, it takes neither
a core nor the GIL, so what is measured on a shared 2-core machine is the server and the attack). Each
case runs one attack from up to 3 hostile clients, every loop bounded in count and in time, while one
well-behaved client (its own process) streams JPEG frames at RATE; then it checks that client's frame
rate (at least 80% of RATE) and longest gap between two frames (at most 3 frame periods; with one stream
sending, one pool step per frame), that every slot is free again, and that the server's memory stayed
bounded. The last test reads the server's whole output: the token never appears, and no handler raised.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import WSMsgType  # noqa: E402
from PIL import Image  # noqa: E402
from yarl import URL  # noqa: E402

from mirage.runtime.server import HEADER, JPEG, PNG, RAW  # noqa: E402

CLIENT = Path(__file__).with_name("serve_client.py")
STANDIN = Path(__file__).with_name("serve_standin.py")
TOKEN = "t0ken-" + "a1b2c3d4e5f6a7b8"  # distinctive: any occurrence in the log is a leak
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SLOTS, SIZE = 4, 32
MAX_FRAME = 1 << 20                   # mirage-serve's default --max-frame-bytes
MAX_MESSAGE = 2 * MAX_FRAME + HEADER.size
STEP_MS = 50                          # the stand-in pool's step
RATE = 10.0                           # the well-behaved client's frames per second (the pool could step 20 times)
ATTACK_S = 2.5                        # how long each attack (and the measurement) lasts
SETTLE_S = 0.5                        # the measurement starts this long after the first frame is sent
RSS_GROWTH_MB = 150                   # the server's memory may grow this much over the whole module
RESULTS: dict[str, dict] = {}         # per case: what it measured (printed at the end, for docs/SERVING.md)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.rss_start = self.rss_mb()

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path("/proc/self/status").exists():
        pytest.skip("reads the server's memory from /proc")
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(STANDIN), str(STEP_MS), "--port", str(port), "--device", "cpu",
                                 "--slots", str(SLOTS), "--deadline-ms", "300", "--calibrate-steps", "3"],
                                stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "MIRAGE_SERVE_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("mirage-serve did not listen within 60 s")
        served = Served(proc, port, log)
        served.client = WellBehaved(served.url)
        yield served
        served.client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        print("\nattack suite:", json.dumps(RESULTS, indent=1))


def run(scenario, timeout: float = 30.0):
    return asyncio.run(asyncio.wait_for(scenario, timeout))


# -- frames ------------------------------------------------------------------------------------------------
def encoded(rgb: np.ndarray, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format=fmt, **kw)
    return out.getvalue()


RGB = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
GOOD_JPEG = encoded(RGB, "JPEG")
GOOD_PNG = encoded(RGB, "PNG")


def png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def padded_png(chunks: int) -> bytes:
    """GOOD_PNG with `chunks` empty private chunks after its header (87k of them took Pillow 331 ms)."""
    ihdr_end = 8 + 25
    return GOOD_PNG[:ihdr_end] + png_chunk(b"prVt") * chunks + GOOD_PNG[ihdr_end:]


ZEROS = bytes(16 << 20)
BOMB = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0))


def frame(frame_id: int, body: bytes, fmt: int = JPEG) -> bytes:
    return HEADER.pack(frame_id, fmt, time.monotonic()) + body


def fuzz_corpus(n: int, seed: int) -> list[tuple[int, bytes]]:
    """n (format byte, payload) pairs: images of many formats Pillow knows, sent as PNG or JPEG, each
    mutated (bytes flipped, cut short) or not, plus the header-only bomb and truncated headers."""
    rng = np.random.default_rng(seed)
    seeds = [BOMB, BOMB[:20], GOOD_PNG[:30], GOOD_JPEG[:200], b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n"]
    for fmt, kw in [("PNG", {}), ("JPEG", {}), ("JPEG", {"progressive": True}), ("GIF", {}), ("BMP", {}),
                    ("TIFF", {}), ("PPM", {}), ("WEBP", {}), ("ICO", {}), ("TGA", {}), ("SGI", {}), ("DDS", {}),
                    ("JPEG2000", {})]:
        try:
            seeds.append(encoded(RGB, fmt, **kw))
        except (KeyError, OSError, ValueError):  # a codec this Pillow lacks
            pass
    corpus = []
    for _ in range(n):
        data = bytearray(seeds[rng.integers(len(seeds))])
        for _ in range(rng.integers(0, 4)):
            data[rng.integers(len(data))] = rng.integers(256)
        if rng.random() < 0.3:
            data = data[:rng.integers(1, len(data) + 1)]
        corpus.append((int(rng.choice([JPEG, PNG])), bytes(data)))
    return corpus


# -- a raw WebSocket client: what aiohttp's client will not do (never read, send byte by byte) ---------------
async def raw_connection(port: int, rcvbuf: int | None = None):
    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def raw_websocket(port: int, rcvbuf: int | None = None):
    reader, writer = await raw_connection(port, rcvbuf)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
                 .encode())
    answer = await reader.readuntil(b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return reader, writer


async def raw_close_code(reader) -> int:
    """Read server frames (unmasked) up to the close frame: its status code."""
    while True:
        first, length = await reader.readexactly(2)
        if length in (126, 127):
            length = int.from_bytes(await reader.readexactly(2 if length == 126 else 8), "big")
        body = await reader.readexactly(length)
        if first & 0x0F == 0x8:
            return int.from_bytes(body[:2], "big")


def ws_message(payload: bytes, opcode: int = 2) -> bytes:
    """One masked client frame."""
    n, mask = len(payload), os.urandom(4)
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 1 << 16:
        head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
    masked = np.frombuffer(payload, np.uint8) ^ np.resize(np.frombuffer(mask, np.uint8), n)
    return head + mask + masked.tobytes()


# -- the well-behaved client and the harness ------------------------------------------------------------------
class WellBehaved:
    """The well-behaved client (tests/serve_client.py), in a process of its own: the attackers' work in
    this one must not delay its sends or its clock. Read without threads and with a timeout, so that a
    client that hangs fails the case instead of hanging the suite."""

    def __init__(self, url: str):
        self.proc = subprocess.Popen([sys.executable, str(CLIENT), url, TOKEN, str(RATE)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.buffer = b""

    def start(self, seconds: float) -> None:
        """Returns once it is connected and about to send."""
        self.proc.stdin.write(f"{seconds}\n".encode())
        self.proc.stdin.flush()
        assert self.readline(30.0) == b"ready"

    def arrivals(self, seconds: float) -> list[float]:
        """Its replies' arrival times in the measurement window (after SETTLE_S)."""
        return [t for t in json.loads(self.readline(seconds + 10.0)) if SETTLE_S <= t <= seconds]

    def readline(self, timeout: float) -> bytes:
        end = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, end - time.monotonic()))
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16) if ready else b""
            assert chunk, f"the well-behaved client said nothing for {timeout} s, or ended"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.strip()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


async def slots_free(session, url: str, within: float = 3.0) -> int:
    end = time.monotonic() + within
    while True:
        active = (await (await session.get(url + "/health")).json())["active"]
        if active == 0 or time.monotonic() > end:
            return active
        await asyncio.sleep(0.05)


def attack_case(name: str, attack, server: Served) -> dict:
    """Run `attack(session, server, until)` beside the well-behaved client; check and record the case."""
    async def scenario():
        async with aiohttp.ClientSession() as session:
            found = await attack(session, server, time.monotonic() + ATTACK_S)
            step_ms = (await (await session.get(server.url + "/health")).json())["step_ms"]
            await asyncio.sleep(max(0.0, start + ATTACK_S + 0.1 - time.monotonic()))  # the client has left
            return {**found, "step_ms": step_ms and round(step_ms, 1)}, await slots_free(session, server.url)
    server.client.start(ATTACK_S)
    start = time.monotonic()
    found, active = run(scenario())
    arrivals = server.client.arrivals(ATTACK_S)
    window = ATTACK_S - SETTLE_S
    gaps = np.diff([SETTLE_S, *arrivals, ATTACK_S])
    result = {"fps": round(len(arrivals) / window, 2), "max_gap_ms": round(1e3 * float(gaps.max()), 1),
              "rss_mb": round(server.rss_mb(), 1), **found}
    RESULTS[name] = result
    assert active == 0, f"{name}: {active} slots still taken"
    assert result["fps"] >= 0.8 * RATE, result
    assert result["max_gap_ms"] <= 3e3 / RATE, result
    assert server.rss_mb() - server.rss_start < RSS_GROWTH_MB, result
    assert server.proc.poll() is None
    return result


async def each(clients: int, one, *args) -> list:
    return await asyncio.gather(*(one(n, *args) for n in range(clients)))


def ws_url(server: Served, **query) -> URL:
    return URL(server.url + "/ws").with_query(query)


# -- the attacks ---------------------------------------------------------------------------------------------
async def decode_failures(session, server, until):
    """3 clients, each frame in lockstep: the 61-byte bomb header, formats Pillow knows but the frame did
    not declare, mutated and cut images. Every frame gets exactly one answer (an error or a frame)."""
    async def one(n):
        ws = await session.ws_connect(server.url + "/ws", headers=AUTH)
        await ws.receive_json()
        sent = errors = frames = 0
        for fmt, body in fuzz_corpus(150, seed=n):
            if time.monotonic() > until:
                break
            await ws.send_bytes(frame(sent, body, fmt))
            sent += 1
            while True:
                msg = await ws.receive()
                if msg.type == WSMsgType.BINARY:
                    frames += 1
                    break
                data = json.loads(msg.data)
                if data["type"] in ("error", "late"):
                    assert " at 0x" not in data["message"] and "<" not in data["message"], data  # no reprs
                    errors += 1
                    break
        await ws.close()
        return sent, errors, frames
    got = await each(3, one)
    sent = sum(g[0] for g in got)
    assert sent == sum(g[1] + g[2] for g in got) and sent >= 30, got
    return {"frames_sent": sent, "errors": sum(g[1] for g in got)}


async def bombs(session, server, until):
    """3 clients sending the bomb header as fast as newest-wins lets them; then each must still stream."""
    async def one(n):
        ws = await session.ws_connect(server.url + "/ws", headers=AUTH)
        await ws.receive_json()
        for k in range(200):
            if time.monotonic() > until - 1.0:
                break
            await ws.send_bytes(frame(k, BOMB, PNG))
            await asyncio.sleep(0.005)
        await ws.send_bytes(frame(999, GOOD_PNG, PNG))
        while (msg := await ws.receive()).type != WSMsgType.BINARY:  # errors, then its good frame comes back
            assert json.loads(msg.data)["type"] in ("error", "stats")
        await ws.close()
        return k
    return {"frames_sent": sum(await each(3, one))}


async def padded_pngs(session, server, until):
    """3 clients streaming 1 MiB PNGs of 87k empty chunks (refused from the chunk count) and PNGs of
    1000 (under the limit: decoded), 20 a second each, never waiting for an answer (a faster flood of
    1 MiB messages is a bandwidth attack on this 2-core machine's loopback, for a proxy to rate-limit)."""
    big, allowed = padded_png(87_000), padded_png(1000)
    assert len(big) <= MAX_FRAME

    async def one(n):
        ws = await session.ws_connect(server.url + "/ws", headers=AUTH)
        await ws.receive_json()
        sent = 0
        while time.monotonic() < until and sent < 400:
            await ws.send_bytes(frame(sent, big if sent % 2 else allowed, PNG))
            sent += 1
            await asyncio.sleep(0.05)
        await ws.close()
        return sent
    return {"frames_sent": sum(await each(3, one))}


async def idle_and_silent(session, server, until):
    """3 clients that connect, send one frame, then stay silent (not waited for); then reconnect."""
    async def one(n):
        cycles = 0
        while time.monotonic() < until - 0.5:
            ws = await session.ws_connect(server.url + "/ws", headers=AUTH)
            await ws.receive_json()
            await ws.send_bytes(frame(0, GOOD_JPEG))
            await asyncio.sleep(1.2)
            await ws.close()
            cycles += 1
        return cycles
    return {"connections": sum(await each(3, one))}


async def churn(session, server, until):
    """3 clients connecting, sending a frame and leaving, over and over (at most 40 times each)."""
    async def one(n):
        for cycles in range(40):
            if time.monotonic() > until:
                break
            ws = await session.ws_connect(server.url + "/ws", headers=AUTH)
            await ws.receive_json()
            await ws.send_bytes(frame(0, GOOD_JPEG))
            await asyncio.sleep(0.02)
            await ws.close()
        return cycles
    return {"connections": sum(await each(3, one))}


async def connection_flood(session, server, until):
    """50 WebSocket connections at once, twice: 3 get the free slots, the others `busy` and close 1013."""
    async def one(n, answered):
        ws = await session.ws_connect(server.url + "/ws", headers=AUTH)
        first = await ws.receive_json()
        if first["type"] == "busy":
            closed = await ws.receive()
            assert closed.type == WSMsgType.CLOSE and closed.data == 1013
        answered.append(first["type"])
        while len(answered) < 50:  # those that got a slot keep it until all 50 are answered
            await asyncio.sleep(0.02)
        await ws.close()
        return first["type"]
    answers = []
    for _ in range(2):
        answers += await each(50, one, [])
    assert answers.count("hello") <= 2 * (SLOTS - 1) and answers.count("busy") >= 2 * (50 - SLOTS + 1)
    return {"connections": len(answers), "busy": answers.count("busy")}


async def non_reading(session, server, until):
    """3 clients with a 4 KiB receive buffer that send frames at 50 FPS and never read a byte."""
    async def one(n):
        reader, writer = await raw_websocket(server.port, rcvbuf=4096)
        sent = 0
        while time.monotonic() < until and sent < 200:
            writer.write(ws_message(frame(sent, GOOD_JPEG)))
            await asyncio.wait_for(writer.drain(), 1.0)
            sent += 1
            await asyncio.sleep(0.02)
        writer.transport.abort()
        return sent
    return {"frames_sent": sum(await each(3, one))}


async def slowloris(session, server, until):
    """3 clients holding 10 connections each, writing a request's headers one byte every 0.1 s."""
    request = f"GET /ws?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: {'a' * 200}\r\n".encode()

    async def one(n):
        connections = [await raw_connection(server.port) for _ in range(10)]
        written = 0
        while time.monotonic() < until and written < len(request):
            for _, writer in connections:
                writer.write(request[written:written + 1])
            written += 1
            await asyncio.sleep(0.1)
        for _, writer in connections:
            writer.transport.abort()
        return len(connections)
    return {"connections": sum(await each(3, one))}


async def oversize(session, server, until):
    """Messages over the cap, plain (one byte over) and deflate-compressed (16 MiB of zeros in 16
    KiB), and a frame header declaring 2**62 bytes: each closes its own connection (1009), nothing read."""
    async def closed_by(ws) -> int:
        while (msg := await ws.receive()).type not in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR):
            pass
        return msg.data if msg.type == WSMsgType.CLOSE else ws.close_code

    async def one(n):
        codes = []
        for _ in range(3):
            if time.monotonic() > until - 0.5:
                break
            if n == 0:
                ws = await session.ws_connect(server.url + "/ws", headers=AUTH)
                try:
                    await ws.send_bytes(bytes(MAX_MESSAGE + 1))
                except ConnectionError:  # closed (and reset) before this client had written it all
                    codes.append("reset")
                    continue
            elif n == 1:
                ws = await session.ws_connect(server.url + "/ws", headers=AUTH, compress=15)
                await ws.send_bytes(ZEROS, compress=15)
            else:
                reader, writer = await raw_websocket(server.port)
                writer.write(bytes([0x82, 0x80 | 127]) + (1 << 62).to_bytes(8, "big") + os.urandom(4) + bytes(1024))
                codes.append(await asyncio.wait_for(raw_close_code(reader), 5.0))
                writer.transport.abort()
                continue
            codes.append(await closed_by(ws))
        return codes
    codes = [c for got in await each(3, one) for c in got]
    assert 1009 in codes and set(codes) <= {1009, "reset"}, codes
    return {"connections": len(codes)}


async def refusal(request) -> int | str:
    """The HTTP status that refuses `request` (a GET or a WebSocket handshake), or "reset" if the server
    dropped the connection before the request was all written."""
    try:
        response = await request
    except aiohttp.WSServerHandshakeError as e:
        return e.status
    except aiohttp.ClientConnectionError:
        return "reset"
    if isinstance(response, aiohttp.ClientWebSocketResponse):
        await response.close()
        return "connected"
    response.release()
    return response.status


async def bad_requests(session, server, until):
    """Wrong tokens (Bearer and query, empty, 10 kB, non-ASCII), bad seeds and query values, path
    traversal: each refused (401, 400, 403/404) without a slot, and no file outside static/ served."""
    # the last two are over aiohttp's 8190-byte line limit: its error log quotes the line, with the token
    tokens = ["", "wrong", TOKEN[:-1], TOKEN + "x", "%ff%fe", "ü" * 8, "x" * 10_000, TOKEN + "x" * 10_000]
    seeds = ["²", "9" * 5000, "-1", "1e3", " 1", str(2**63), "0x10", "١٢"]
    paths = ["/static/../server.py", "/static/..%2fserver.py", "/static/%2e%2e/server.py",
             "/static/%2e%2e%2fserver.py", "/static/....//server.py", "/static/..\\server.py",
             "/static/%5c..%5cserver.py", "/../../etc/passwd", "/static/../../../../etc/passwd",
             "/static/%252e%252e/server.py", "/static/.%2e/.%2e/core/errors.py", "/static//etc/passwd",
             "/static/app.js%00.txt", "/static/", "/static", "/static/.", "/%2e%2e/server.py", "//etc/passwd",
             "/static/..;/server.py", "/static/app.js/..%2f..%2fserver.py", "/.git/config", "/static/.git",
             "/static/%c0%ae%c0%ae/server.py", "/static/..%c0%afserver.py", "/./../server.py",
             "/static/../../pyproject.toml", "/static/%2E%2E/%2E%2E/pyproject.toml", "/ws/../health?x",
             "/static/index.html/../../server.py"]
    counts = {"tokens": 0, "seeds": 0, "paths": 0}
    for token in tokens:
        for how in ({"headers": {"Authorization": f"Bearer {token}"}}, {"params": {"token": token}}):
            # over aiohttp's 8190-byte line limit: 400, or the connection dropped before it was all sent
            refused = {400, "reset"} if len(token) > 8190 else {401}
            for request in (session.ws_connect(server.url + "/ws", **how), session.get(server.url + "/", **how)):
                assert await refusal(request) in refused, (token[:20], how.keys())
            counts["tokens"] += 1
    for seed in seeds:
        for extra in ({"seed": seed}, {"seed": "1", "colour": seed}):
            assert await refusal(session.ws_connect(ws_url(server, token=TOKEN, **extra))) == 400, extra
            counts["seeds"] += 1
    for path in paths:
        async with session.get(URL(server.url + path, encoded=True)) as response:
            body = await response.read()
            assert response.status in (200, 400, 403, 404, 405), (path, response.status)
            for secret in (b"def make_app", b"root:", b"[project]", b"[core]", b"class MirageError"):
                assert secret not in body, path
            counts["paths"] += 1
    return counts


async def text_flood(session, server, until):
    """3 clients sending 300 text messages each without reading: their errors queue at most MAX_NOTICES."""
    async def one(n):
        ws = await session.ws_connect(server.url + "/ws", headers=AUTH)
        await ws.receive_json()
        for k in range(300):
            await ws.send_str("hello?" * 100)
        await asyncio.sleep(0.5)
        await ws.close()
        return 300
    return {"messages": sum(await each(3, one))}


async def nothing(session, server, until):
    """No attack: the baseline."""
    await asyncio.sleep(until - time.monotonic())
    return {}


ATTACKS = {"baseline": nothing, "decode_failures": decode_failures, "bombs": bombs, "padded_pngs": padded_pngs,
           "idle_and_silent": idle_and_silent, "churn": churn, "connection_flood": connection_flood,
           "non_reading": non_reading, "slowloris": slowloris, "oversize": oversize,
           "bad_requests": bad_requests, "text_flood": text_flood}


@pytest.mark.parametrize("name", list(ATTACKS))
def test_a_well_behaved_stream_survives(server, name):
    attack_case(name, ATTACKS[name], server)


def test_no_token_and_no_failure_in_the_log(server):
    """After every case above (or alone: the banner and a connection with the token in its query)."""
    async def scenario():
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(ws_url(server, token=TOKEN, seed=3))
            assert (await ws.receive_json())["type"] == "hello"
            await ws.close()
            assert (await session.get(server.url + "/", params={"token": TOKEN})).status == 200
    run(scenario())
    time.sleep(0.3)
    log = server.log.read_text()
    assert "mirage-serve:" in log and "MIRAGE_SERVE_TOKEN" in log  # the banner names the token's source
    assert '"GET /ws" 101' in log  # the access log is on
    assert TOKEN not in log
    # aiohttp logs the requests it cannot parse with a traceback of its own; none may pass through ours
    for failure in ('runtime/server.py"', "Task exception was never retrieved", " failed"):
        assert failure not in log, log[log.index(failure) - 2000:log.index(failure) + 2000]
