"""mirage-serve on the CPU: the real StreamPool with the bundled 32x32 checkpoints, the aiohttp app on
127.0.0.1 in-process, WebSocket clients from aiohttp. Every scenario runs under a 10 s timeout."""
from __future__ import annotations

import asyncio
import collections
import io
import json
import logging
import time
from contextlib import asynccontextmanager, suppress

import numpy as np
import pytest

aiohttp = pytest.importorskip("aiohttp")
from aiohttp import WSMsgType  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from mirage.bridge.pipeline import load_pipeline  # noqa: E402
from mirage.cli.serve import main as serve_cli  # noqa: E402
from mirage.core.video_io import as_uint8, v2v_input, v2v_input_u8  # noqa: E402
from mirage.runtime.pipeline import PipelineError  # noqa: E402
from mirage.runtime.pool import StreamPool  # noqa: E402
from mirage.runtime import server as server_module  # noqa: E402
from mirage.runtime.server import (HEADER, JPEG, PNG, RAW, STAGES, AccessLog, Frame,  # noqa: E402
                                   RedactingFormatter, ServeError, ServerOptions, Stream, decode_frame,
                                   encode_frame, make_app)

from conftest import CKPT_GEN, CKPT_V2V  # noqa: E402

SIZE = 32
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def v2v_pool():
    pool = StreamPool.open(CKPT_V2V, slots=3, device="cpu", load=load_pipeline)
    yield pool
    pool.close()


@pytest.fixture(scope="module")
def gen_pool():
    pool = StreamPool.open(CKPT_GEN, slots=1, device="cpu", load=load_pipeline)
    yield pool
    pool.close()


def run(scenario, timeout: float = TIMEOUT):
    return asyncio.run(asyncio.wait_for(scenario(), timeout))


@asynccontextmanager
async def serving(pool, **options):
    options.setdefault("deadline_ms", 5000.0)  # a shared CI machine may stall a step; lockstep clients lose nothing
    async with TestClient(TestServer(make_app(pool, ServerOptions(**options)), host="127.0.0.1")) as client:
        yield client


def inputs(seed: int, n: int = 4) -> list[np.ndarray]:
    """n random (32, 32, 3) uint8 frames."""
    return list(np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8))


def message(frame_id: int, body: bytes = b"", fmt: int = RAW, ts: float = 0.0) -> bytes:
    return HEADER.pack(frame_id, fmt, ts) + body


def jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG")
    return out.getvalue()


async def connect(client, **query):
    ws = await client.ws_connect("/ws", params={k: str(v) for k, v in query.items()})
    hello = await ws.receive_json()
    return ws, hello


async def reply(ws):
    """The next frame (id, timestamp, payload) or error message; stats messages are skipped."""
    while True:
        msg = await ws.receive()
        if msg.type == WSMsgType.BINARY:
            frame_id, fmt, ts = HEADER.unpack_from(msg.data)
            return frame_id, ts, msg.data[HEADER.size:]
        assert msg.type == WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        if data["type"] != "stats":
            return data


async def lockstep(ws, frames: list[np.ndarray]) -> list[np.ndarray]:
    """Send each frame raw, wait for its reply, return the outputs as (32, 32, 3) uint8."""
    out = []
    for n, rgb in enumerate(frames):
        await ws.send_bytes(message(n, rgb.tobytes(), ts=1000.0 + n))
        frame_id, ts, body = await reply(ws)
        assert (frame_id, ts) == (n, 1000.0 + n)
        out.append(np.frombuffer(body, np.uint8).reshape(SIZE, SIZE, 3))
    return out


def test_frames_come_back_with_their_ids_shape_and_timestamps(v2v_pool):
    async def scenario():
        async with serving(v2v_pool) as client:
            (a, hello), (b, _) = await connect(client), await connect(client)
            assert hello["type"] == "hello" and (hello["width"], hello["height"]) == (SIZE, SIZE)
            assert hello["video_to_video"] is True
            health = await (await client.get("/health")).json()
            assert (health["slots"], health["active"]) == (3, 2) and {"fps", "busy", "step_ms"} <= health.keys()
            raw = await lockstep(a, inputs(1))
            assert len(raw) == 4 and raw[0].std() > 0
            for n, rgb in enumerate(inputs(2, 3)):  # JPEG in, JPEG out
                await b.send_bytes(message(100 + n, jpeg(rgb), JPEG, ts=5.5))
                frame_id, ts, body = await reply(b)
                assert (frame_id, ts) == (100 + n, 5.5)
                assert Image.open(io.BytesIO(body)).size == (SIZE, SIZE)
            png = io.BytesIO()
            Image.fromarray(inputs(4, 1)[0]).save(png, format="PNG")
            await b.send_bytes(message(200, png.getvalue(), PNG))  # PNG in, PNG out
            frame_id, _, body = await reply(b)
            assert frame_id == 200 and Image.open(io.BytesIO(body)).format == "PNG"
            for ws in (a, b):
                await ws.close()
            page = await client.get("/")
            assert page.status == 200 and "<canvas" in await page.text()
            script = await client.get("/static/app.js")
            assert script.status == 200
    run(scenario)


def test_health_splits_a_frame_s_time_into_stages_and_times_the_idle_pool(v2v_pool, monkeypatch):
    # the 3 lockstep frames may take longer than /health's 1 s window on a loaded machine: count them all
    monkeypatch.setattr(server_module, "HEALTH_WINDOW_S", 60.0)

    async def scenario():
        async with serving(v2v_pool, calibrate_steps=2) as client:
            health = await (await client.get("/health")).json()
            assert health["idle_step_ms"] > 0 and all(health["stages"][s]["n"] == 0 for s in STAGES)
            ws, _ = await connect(client)
            await lockstep(ws, inputs(7, 3))
            stages = (await (await client.get("/health")).json())["stages"]
            assert set(stages) == set(STAGES)
            assert stages["decode"]["n"] == stages["queue"]["n"] == 3 and stages["step"]["n"] == stages["pool"]["n"] == 3
            assert stages["encode"]["n"] == stages["send"]["n"] >= 2  # the third reply's send may still be timing
            # the stepper's wall time around the step thread's call holds the time inside it
            assert stages["step"]["mean_ms"] >= stages["pool"]["mean_ms"] > 0
            await ws.close()
    run(scenario)


class ThreadLogPool:
    """No model: logs which thread each submit / collect / attach / detach runs in."""

    depth, slots, frame_shape, video_to_video = 2, 1, (SIZE, SIZE, 3), True
    # the U-Net's block contract: a frame a step, no control, inputs degraded by the server
    frames_in, controls, video_rate, restores = 1, {}, None, True

    def __init__(self):
        self.active, self.calls, self.in_flight = [], [], []

    def _log(self, call: str) -> None:
        import threading

        self.calls.append((call, threading.get_ident()))

    def attach(self, seed: int = 0) -> int:
        self._log("attach")
        self.active.append(0)
        return 0

    def detach(self, slot: int) -> None:
        self._log("detach")
        self.active.remove(slot)

    def submit(self, inputs: dict) -> None:
        self._log("submit")
        self.in_flight.append({slot: frame[None] for slot, frame in inputs.items()})  # (1, H, W, 3) a step, as StreamPool

    def collect(self) -> dict:
        self._log("collect")
        return self.in_flight.pop(0)


def test_one_thread_drives_the_pool():
    """Every pool call in one thread (a collect from another thread gave wrong frames on a GPU)."""
    pool = ThreadLogPool()

    async def scenario():
        async with serving(pool, batch_wait_ms=0) as client:
            ws, _ = await connect(client)
            for n, rgb in enumerate(inputs(8, 3)):
                await ws.send_bytes(message(n, rgb.tobytes()))
                await asyncio.sleep(0.1)
            while (await reply(ws))[0] != 2:  # earlier replies may be replaced by newer ones (newest wins)
                pass
            await ws.close()
    run(scenario)
    names = [c for c, _ in pool.calls]
    assert {"attach", "submit", "collect", "detach"} <= set(names)
    assert len({thread for _, thread in pool.calls}) == 1, pool.calls


class WaitingPool(ThreadLogPool):
    """Two steps in flight (a GPU pool's depth) whose collect waits 0.3 s, as for a GPU step."""

    def collect(self) -> dict:
        self._log("collect")  # when the call starts
        time.sleep(0.3)
        return self.in_flight.pop(0)


def test_the_next_step_is_submitted_before_the_step_ahead_is_collected():
    """With two steps in flight, step n+1's submit goes into the step thread ahead of step n's
    collect (the GPU computes n+1 while the host waits for n), never more than two steps in flight,
    and every frame comes back in order. The plan is the calibrated step, never learned from held
    steps (whose time includes the hold)."""
    pool = WaitingPool()

    async def scenario():
        async with serving(pool, batch_wait_ms=0, calibrate_steps=2) as client:
            plan = (await (await client.get("/health")).json())["plan_step_ms"]
            assert 250 < plan < 400  # two 0.3 s collects in 0.6 s: the period of steps kept two in flight
            ws, _ = await connect(client)
            frames = inputs(8, 8)
            for n, rgb in enumerate(frames):
                await ws.send_bytes(message(n, rgb.tobytes()))
                await asyncio.sleep(0.05)
            got = []
            while not got or got[-1][0] != 7:  # newest wins: a slow reader may miss some replies
                got.append(await reply(ws))
            ids = [g[0] for g in got]
            assert ids == sorted(ids)
            for n, _, payload in got:  # the pool hands back its input: the server's model input of frame n
                expected = as_uint8(v2v_input(frames[n].astype(np.float32) / 127.5 - 1)[None])[0]
                np.testing.assert_array_equal(np.frombuffer(payload, np.uint8).reshape(SIZE, SIZE, 3), expected)
            assert (await (await client.get("/health")).json())["plan_step_ms"] == plan
            await ws.close()
    run(scenario)
    calls = [c for c, _ in pool.calls]
    served = [c for c in calls[calls.index("attach"):] if c in ("submit", "collect")]  # after the calibration
    in_flight = np.cumsum([1 if c == "submit" else -1 for c in served])  # after each call starts
    assert in_flight.max() == 2 and in_flight.min() >= 0, served
    # frames arrive every 50 ms and a step takes 300 ms: every collect but the last waits with the
    # next step already submitted (at 1 in flight after it starts: the GPU would idle through it)
    at_collect = [n for c, n in zip(served, in_flight) if c == "collect"]
    assert at_collect[:-1] == [1] * (len(at_collect) - 1), served


def test_a_pool_that_holds_steps_is_always_calibrated(v2v_pool):
    """The stepper plans a held step's end with the idle pool's step: a GPU-like pool (depth 2) is
    timed even with calibrate_steps=0; a CPU pool (depth 1) is not, and learns from served steps."""
    async def idle_step_ms(pool):
        async with serving(pool, calibrate_steps=0) as client:
            return (await (await client.get("/health")).json())["idle_step_ms"]
    assert run(lambda: idle_step_ms(ThreadLogPool())) is not None
    assert v2v_pool.depth == 1 and run(lambda: idle_step_ms(v2v_pool)) is None


class SlowPool(ThreadLogPool):
    """One step in flight (a CPU pool's depth) whose collect takes 0.3 s; a submit naming a detached
    slot fails, as StreamPool's does."""

    depth, slots = 1, 2

    def attach(self, seed: int = 0) -> int:
        slot = min({0, 1} - set(self.active))
        self.active.append(slot)
        return slot

    def submit(self, inputs: dict) -> None:
        missing = set(inputs) - set(self.active)
        if missing:
            raise PipelineError(f"slot {missing.pop()} is not attached")
        super().submit(inputs)

    def collect(self) -> dict:
        time.sleep(0.3)
        return super().collect()


def test_a_client_leaving_while_its_frame_waits_disturbs_no_other():
    """A frame gathered for the next step whose client then leaves (while the step ahead computes)
    is dropped from the step, so the other streams' frames in it are computed."""
    pool = SlowPool()

    async def scenario():
        async with serving(pool, batch_wait_ms=50) as client:
            (a, _), (b, _) = await connect(client), await connect(client)
            frames = inputs(8, 2)
            for n in range(2):  # frame 1 of both is gathered while frame 0's step computes
                await a.send_bytes(message(n, frames[n].tobytes()))
                await b.send_bytes(message(n, frames[n].tobytes()))
                await asyncio.sleep(0.1)
            await a.close()
            got = [await reply(b) for _ in range(2)]
            assert all(isinstance(g, tuple) for g in got), got  # frames, not "the server failed" errors
            assert [g[0] for g in got] == [0, 1]
    run(scenario)
    assert "detach" in [c for c, _ in pool.calls]


def test_as_uint8_converts_model_frames_and_passes_uint8_through():
    frames = np.linspace(-1.2, 1.2, 2 * 4 * 4 * 3, dtype=np.float32).reshape(2, 4, 4, 3)  # (B, H, W, 3)
    rgb = as_uint8(frames)
    assert rgb.dtype == np.uint8 and (rgb[0, 0, 0, 0], rgb[-1, -1, -1, -1]) == (0, 255)
    assert as_uint8(rgb) is rgb  # a pipeline with uint8 frames costs nothing here
    assert encode_frame(Frame(1, RAW, 0.0, 0.0, None), frames[1]) == encode_frame(Frame(1, RAW, 0.0, 0.0, None), rgb[1])


def test_a_stream_gets_the_same_frames_alone_and_beside_others(v2v_pool):
    """Same seed and inputs: identical bytes alone, and beside a twin and a stranger (different seed and
    inputs). A long batch wait makes every step hold one fresh frame of each stream, so the slots advance
    in lockstep in both runs."""
    async def scenario():
        async with serving(v2v_pool, batch_wait_ms=3000) as client:
            ws, _ = await connect(client, seed=7)
            alone = await lockstep(ws, inputs(3))
            await ws.close()
            (a, _), (b, _), (c, _) = [await connect(client, seed=s) for s in (7, 7, 8)]
            together = await asyncio.gather(lockstep(a, inputs(3)), lockstep(b, inputs(3)),
                                            lockstep(c, inputs(4)))
            for ws in (a, b, c):
                await ws.close()
            return alone, together
    alone, (twin_a, twin_b, stranger) = run(scenario)
    for n in range(4):
        np.testing.assert_array_equal(twin_a[n], alone[n])
        np.testing.assert_array_equal(twin_b[n], alone[n])
    assert not np.array_equal(stranger[1], alone[1])  # the check can fail: different streams differ
    # and they are the pool's own frames for the model's input made from those RGB frames
    slot = v2v_pool.attach(seed=7)
    try:
        for n, rgb in enumerate(inputs(3)):
            out = v2v_pool.step({slot: v2v_input_u8(rgb)})[slot][0]  # (1, H, W, 3)
            expected = encode_frame(Frame(n, RAW, 0.0, 0.0, None), out)[HEADER.size:]
            assert alone[n].tobytes() == expected
    finally:
        v2v_pool.detach(slot)


DROPS = ("sent", "unsent", "stale", "late")


async def accounted(ws, count: int) -> tuple[list[int], dict, list[int]]:
    """Read until the stats account for `count` frames: (ids answered, the last stats, ids answered late)."""
    answered, stats, late = [], None, []
    while stats is None or sum(stats[k] for k in DROPS) < count:
        msg = await ws.receive()
        if msg.type == WSMsgType.BINARY:
            answered.append(HEADER.unpack_from(msg.data)[0])
        elif (data := json.loads(msg.data))["type"] == "stats":
            stats = data
        elif data["type"] == "late":
            late.append(data["id"])
    return answered, stats, late


def test_every_frame_is_answered_or_counted_as_dropped(v2v_pool):
    """Frames sent back to back: the newest is always answered; each other one is answered, replaced
    by a newer one before its decode or step (stale) or its output before sending (unsent), or past
    the deadline (late), and the stats message says how many."""
    async def scenario():
        async with serving(v2v_pool, stats_interval_s=0.2) as client:
            ws, _ = await connect(client)
            for n, rgb in enumerate(inputs(30, 6)):
                await ws.send_bytes(message(n, rgb.tobytes()))
            answered, stats, _ = await accounted(ws, 6)
            await ws.close()
            return answered, stats
    answered, stats = run(scenario)
    assert answered[-1] == 5 and answered == sorted(answered)
    assert stats["sent"] == len(answered) and sum(stats[k] for k in DROPS) == 6


def test_a_deadline_nothing_meets_still_answers_every_other_frame(v2v_pool):
    async def scenario():
        async with serving(v2v_pool, deadline_ms=1e-3, stats_interval_s=0.2) as client:
            ws, _ = await connect(client)
            answered, late = [], []
            for n, rgb in enumerate(inputs(31, 4)):  # one at a time: each frame reaches a step
                await ws.send_bytes(message(n, rgb.tobytes()))
                got, _, dropped = await accounted(ws, n + 1)
                answered, late = answered + got, late + dropped
            await ws.close()
            return answered, late
    assert run(scenario) == ([1, 3], [0, 2])  # every frame answered: with a frame, or as dropped late


def test_a_silent_client_does_not_hold_up_the_others(v2v_pool):
    """The batch wait waits for streams that send; a client silent for a second is not waited for."""
    async def scenario():
        async with serving(v2v_pool, batch_wait_ms=3000) as client:
            (silent, _), (sender, _) = await connect(client), await connect(client)
            await asyncio.sleep(1.1)
            start = asyncio.get_running_loop().time()
            await lockstep(sender, inputs(40, 3))
            elapsed = asyncio.get_running_loop().time() - start
            for ws in (silent, sender):
                await ws.close()
            return elapsed
    assert run(scenario) < 2.5  # waiting for the silent one would take 3 s per frame


def test_a_full_pool_answers_busy_and_a_freed_slot_is_reused(v2v_pool):
    async def scenario():
        async with serving(v2v_pool) as client:
            held = [await connect(client) for _ in range(3)]
            ws = await client.ws_connect("/ws")
            busy = await ws.receive_json()
            assert busy["type"] == "busy" and "3" in busy["message"]
            closed = await ws.receive()
            assert closed.type == WSMsgType.CLOSE and closed.data == 1013  # try again later
            await held[0][0].close()
            ws, hello = await connect(client)
            assert hello["type"] == "hello"
            for w in [ws] + [w for w, _ in held[1:]]:
                await w.close()
    run(scenario)


def test_bad_frames_get_an_error_and_nothing_else_is_disturbed(v2v_pool):
    max_bytes = 4096

    async def scenario():
        async with serving(v2v_pool, max_frame_bytes=max_bytes) as client:
            (good, _), (bad, _) = await connect(client), await connect(client)
            small = np.zeros((16, 16, 3), np.uint8)
            cases = {"3 bytes": b"abc",
                     "format byte 9": message(0, b"x", fmt=9),
                     "16x16 image": message(1, jpeg(small), JPEG),
                     "768 raw bytes": message(2, small.tobytes()),
                     "not a readable JPEG": message(3, b"garbage" * 10, JPEG),
                     "over the server's limit": message(4, bytes(max_bytes + 1)),
                     "needs an input image": message(5)}
            outputs = []
            for n, (expected, data) in enumerate(cases.items()):
                await bad.send_bytes(data)
                answer = await reply(bad)
                assert answer["type"] == "error" and expected in answer["message"], (expected, answer)
                outputs += await lockstep(good, inputs(10 + n, 1))  # the neighbour streams on meanwhile
            await bad.send_str("hello?")
            assert (await reply(bad))["type"] == "error"
            assert len(await lockstep(bad, inputs(5, 2))) == 2  # the bad client itself carries on
            await bad.send_bytes(message(6, bytes(3 * max_bytes)))  # too big to read at all: closed
            closed = await bad.receive()
            assert closed.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.ERROR)
            assert len(await lockstep(good, inputs(20, 2))) == 2
            await good.close()
            return outputs
    assert len(run(scenario)) == 7


def test_a_vanished_client_frees_its_slot(v2v_pool):
    async def active(client):
        return (await (await client.get("/health")).json())["active"]

    async def scenario():
        async with serving(v2v_pool) as client:
            ws, _ = await connect(client)
            await lockstep(ws, inputs(6, 1))
            assert await active(client) == 1
            ws._response.connection.transport.abort()  # no close frame: the TCP connection just ends
            for _ in range(100):
                if await active(client) == 0:
                    return True
                await asyncio.sleep(0.05)
            return False
    assert run(scenario)


def test_a_generation_model_streams_on_request(gen_pool):
    async def scenario():
        async with serving(gen_pool) as client:
            ws, hello = await connect(client, seed=3)
            assert hello["video_to_video"] is False
            frames = []
            for n in range(3):
                await ws.send_bytes(message(n, fmt=RAW))
                frame_id, _, body = await reply(ws)
                assert frame_id == n
                frames.append(np.frombuffer(body, np.uint8))
            await ws.send_bytes(message(9, b"\0" * 10))
            assert "takes no input" in (await reply(ws))["message"]
            await ws.close()
            return frames
    frames = run(scenario)
    assert frames[0].size == SIZE * SIZE * 3 and not np.array_equal(frames[0], frames[1])


def test_the_token_guards_the_page_and_the_socket(v2v_pool):
    async def scenario():
        async with serving(v2v_pool, token="s3cret") as client:
            assert (await client.get("/")).status == 401
            assert (await client.get("/", params={"token": "wrong"})).status == 401
            assert (await client.get("/", params={"token": "s3cret"})).status == 200
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect("/ws")
            assert refused.value.status == 401
            ws, hello = await connect(client, token="s3cret")
            assert hello["type"] == "hello"
            await ws.close()
    run(scenario)


def test_a_bad_seed_is_refused(v2v_pool):
    async def scenario():
        async with serving(v2v_pool) as client:
            for query in ({"seed": "-1"}, {"seed": "x"}, {"seed": "²"}, {"seed": "9" * 5000}, {"seed": str(2**63)},
                          {"seed": "١"}, {"sed": "1"}, [("seed", "1"), ("seed", "2")]):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await client.ws_connect("/ws", params=query)
                assert refused.value.status == 400, query  # not 500
            health = await (await client.get("/health")).json()
            assert health["active"] == 0
            ws, hello = await connect(client, seed=2**63 - 1)
            assert hello["seed"] == 2**63 - 1
            await ws.close()
    run(scenario)


def test_a_reachable_host_needs_a_token():
    for host in ("127.0.0.1", "::1", "localhost"):
        ServerOptions(host=host)
    ServerOptions(host="0.0.0.0", token="s3cret")
    with pytest.raises(ServeError, match="--token"):
        ServerOptions(host="0.0.0.0")
    result = CliRunner().invoke(serve_cli, ["--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--token" in result.output and "Traceback" not in result.output


def test_cli_help_names_every_option():
    result = CliRunner().invoke(serve_cli, ["--help"])
    assert result.exit_code == 0
    for option in ("--host", "--port", "--slots", "--token", "--device", "--backend", "--deadline-ms",
                   "--max-frame-bytes", "--max-prompt-chars", "--control-interval-ms"):
        assert option in result.output


def test_one_pool_per_device_behind_one_server():
    """--device a,b: the server drives a PoolGroup; two clients land on two pools, and each gets
    the frames it gets from a single pool of the same batch (two CPU pools stand in for two GPUs)."""
    from mirage.runtime.pool import PoolGroup

    frames = inputs(4, n=2)

    async def scenario(pool):
        async with serving(pool) as client:
            (a, hello), (b, _) = await connect(client, seed=3), await connect(client, seed=4)
            assert hello["slots"] == pool.slots
            outs = await asyncio.gather(lockstep(a, frames), lockstep(b, frames))
            return outs, sorted(pool.active)

    with PoolGroup.open(CKPT_V2V, slots=1, devices=["cpu", "cpu"], load=load_pipeline) as group:
        assert group.devices == ["cpu", "cpu"] and (group.restores, group.frames_in) == (True, 1)  # mirage-serve's banner
        (got_a, got_b), active = run(lambda: scenario(group))
        assert active == [0, 1]  # one stream on each pool
    with StreamPool.open(CKPT_V2V, slots=1, device="cpu", load=load_pipeline) as single:
        want = []
        for seed in (3, 4):
            async def one(seed=seed):
                async with serving(single) as client:
                    ws, _ = await connect(client, seed=seed)
                    return await lockstep(ws, frames)
            want.append(run(one))
    for got, exp in zip((got_a, got_b), want):
        for g, e in zip(got, exp):
            np.testing.assert_array_equal(g, e)


# -- hostile clients (issue 27; the live attack suite is tests/test_serve_attack.py) ----------------------
def png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    import zlib

    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png(rgb: np.ndarray, padding_chunks: int = 0) -> bytes:
    """rgb as a PNG, with `padding_chunks` empty private chunks after its header."""
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG")
    data = out.getvalue()
    return data[:33] + png_chunk(b"prVt") * padding_chunks + data[33:]


def decode(payload: bytes, fmt: int):
    return decode_frame(message(7, payload, fmt), (SIZE, SIZE, 3), True, 1 << 20, 0.0)


def test_only_the_declared_format_is_decoded_and_its_header_checked_first():
    rgb = inputs(50, 1)[0]
    bomb = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", (20000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0]))
    tiff, gif = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb).save(tiff, format="TIFF")
    Image.fromarray(rgb).save(gif, format="GIF")
    refused = {"20000x20000 image": (bomb, PNG),  # 61 bytes: Pillow would raise DecompressionBombError
               "not a readable PNG": (tiff.getvalue(), PNG),
               "not a readable JPEG": (gif.getvalue(), JPEG),
               "not a readable JPEG image (no start": (b"%!PS-Adobe-3.0 EPSF-3.0\n" + bytes(64), JPEG),
               "not a readable PNG image (no PNG": (jpeg(rgb), PNG),
               "over 1024 chunks": (png(rgb, 87_000), PNG),  # 1 MiB: Pillow took 331 ms on it
               "not a readable PNG image (Unident": (png(rgb)[:33] + bytes(40), PNG),
               "over 64 scans": (jpeg(rgb)[:-2] + b"\xff\xda\x00\x02" * 65 + b"\xff\xd9", JPEG)}
    for expected, (payload, fmt) in refused.items():
        start = time.monotonic()
        with pytest.raises(ServeError, match="frame 7: ") as error:
            decode(payload, fmt)
        assert expected in str(error.value) and " at 0x" not in str(error.value), (expected, error.value)
        assert time.monotonic() - start < 0.1, expected  # the header is enough to refuse it
    decoded = decode(png(rgb, 1000), PNG)  # under the chunk limit: an ordinary frame
    np.testing.assert_array_equal(decoded.pixels, v2v_input_u8(rgb))  # bytes: no float frame on the host
    assert decoded.pixels.dtype == np.uint8
    assert decode(jpeg(rgb), JPEG).pixels.shape == (SIZE, SIZE, 3)


def test_mutated_frames_decode_or_raise_one_serve_error():
    """A fuzz (fixed seed) of cut and bit-flipped images of many formats, sent as PNG or JPEG: each
    decodes or raises ServeError, nothing else (a DecompressionBombError, ValueError, TypeError or
    NotImplementedError from Pillow once killed the stream's decode task and leaked its slot)."""
    rng = np.random.default_rng(0)
    rgb = inputs(51, 1)[0]
    seeds = []
    for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "PPM", "WEBP", "TGA", "SGI", "DDS", "JPEG2000"):
        out = io.BytesIO()
        with suppress(KeyError, OSError):  # a codec this Pillow lacks
            Image.fromarray(rgb).save(out, format=fmt)
            seeds.append(out.getvalue())
    outcomes = collections.Counter()
    for _ in range(1500):
        data = bytearray(seeds[rng.integers(len(seeds))])
        for _ in range(rng.integers(0, 4)):
            data[rng.integers(len(data))] = rng.integers(256)
        data = data[:rng.integers(1, len(data) + 1)] if rng.random() < 0.5 else data
        try:
            decode(bytes(data), int(rng.choice([JPEG, PNG])))
            outcomes["decoded"] += 1
        except ServeError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 500 and outcomes["decoded"] > 10, outcomes


@pytest.mark.parametrize("failure", [Image.DecompressionBombError("bomb"), ValueError("truncated"),
                                     NotImplementedError("tiff"), TypeError("tiff"), OSError("bad"),
                                     Exception("anything")], ids=lambda e: type(e).__name__)
def test_every_decode_failure_is_answered_and_frees_the_slot(v2v_pool, monkeypatch, failure):
    """The stream's decode raising anything answers one error, the stream goes on, and its slot is
    free once it leaves."""
    import mirage.runtime.server as server

    def failing(data, *args):
        if data[HEADER.size:] == b"boom":
            raise failure
        return decode_frame(data, *args)
    monkeypatch.setattr(server, "decode_frame", failing)

    async def scenario():
        async with serving(v2v_pool) as client:
            ws, _ = await connect(client)
            await ws.send_bytes(message(1, b"boom"))
            answer = await reply(ws)
            assert answer["type"] == "error" and " at 0x" not in answer["message"], answer
            assert len(await lockstep(ws, inputs(52, 1))) == 1  # the stream carries on
            await ws.close()
            return await slots_free(client)
    assert run(scenario) == 0


def test_a_stream_whose_decode_task_dies_frees_its_slot(v2v_pool, monkeypatch):
    """A bug that kills a stream's decode loop itself closes that stream (1011) and frees its slot."""
    def broken(self, message):
        raise RuntimeError("a bug")
    monkeypatch.setattr(Stream, "error", broken)

    async def scenario():
        async with serving(v2v_pool) as client:
            (ws, _), (other, _) = await connect(client), await connect(client)
            await ws.send_bytes(b"abc")  # a short header: its error kills the loop
            closed = await ws.receive()
            assert closed.type == WSMsgType.CLOSE and closed.data == 1011
            assert len(await lockstep(other, inputs(53, 1))) == 1
            await other.close()
            return await slots_free(client)
    assert run(scenario) == 0


async def slots_free(client) -> int:
    """The active streams once the server has caught up (0 within 2 s, if every slot is freed)."""
    for _ in range(40):
        active = (await (await client.get("/health")).json())["active"]
        if active == 0:
            break
        await asyncio.sleep(0.05)
    return active


class SlowThenFastPool(SlowPool):
    """A CPU-like pool whose first `slow` steps take 0.5 s, the next ones 0.02 s."""

    slow = 3

    def collect(self) -> dict:
        time.sleep(0.5 if self.slow > 0 else 0.02)
        self.slow -= 1
        return ThreadLogPool.collect(self)


def test_the_plan_recovers_from_a_slow_period_and_an_idle_client_holds_no_one():
    """After slow steps, the planned step falls back within 3 fast ones (the moving average it replaces
    was still at 95 ms after 4), and a client that connects and stays idle holds up no one (with a slow
    plan and an idle client counted as sending, one stream once froze for 11.6 s)."""
    pool = SlowThenFastPool()

    async def scenario():
        async with serving(pool, batch_wait_ms=5) as client:
            ws, _ = await connect(client)
            await lockstep_ids(ws, range(3))  # the slow steps
            idle, _ = await connect(client)
            start = time.monotonic()
            await lockstep_ids(ws, range(3, 7))
            elapsed = time.monotonic() - start
            plan = (await (await client.get("/health")).json())["plan_step_ms"]
            await idle.close()
            await ws.close()
            return elapsed, plan
    elapsed, plan = run(scenario)
    assert plan < 50 and elapsed < 1.5, (plan, elapsed)


def test_a_wait_ends_when_the_stream_it_waits_for_leaves():
    """The batch waits for every sending stream's frame; one that leaves meanwhile is not waited for."""
    pool = SlowPool()

    async def scenario():
        async with serving(pool, batch_wait_ms=2000) as client:
            (a, _), (b, _) = await connect(client), await connect(client)
            await asyncio.gather(lockstep_ids(a, [0]), lockstep_ids(b, [0]))  # both are sending streams now
            start = time.monotonic()
            await a.send_bytes(message(1, inputs(1, 1)[0].tobytes()))  # the step waits for b's frame ...
            await asyncio.sleep(0.2)
            await b.close()  # ... which never comes
            assert (await reply(a))[0] == 1
            await a.close()
            return time.monotonic() - start
    assert run(scenario) < 1.2  # 0.2 s, then a 0.3 s step: not the 2 s batch wait


async def lockstep_ids(ws, ids) -> None:
    for n in ids:
        await ws.send_bytes(message(n, inputs(n, 1)[0].tobytes()))
        assert (await reply(ws))[0] == n


def test_the_token_in_a_bearer_header_and_never_in_the_log(v2v_pool, caplog):
    token = "s3cret-token"

    async def scenario():
        app = make_app(v2v_pool, ServerOptions(token=token, deadline_ms=5000.0))
        server = TestServer(app, host="127.0.0.1")
        await server.start_server(access_log_class=AccessLog)  # as the CLI runs it
        async with TestClient(server) as client:
            bearer = {"Authorization": f"Bearer {token}"}
            assert (await client.get("/", headers=bearer)).status == 200
            assert (await client.get("/", params={"token": token, "seed": "2"})).status == 200
            assert (await client.get("/", headers={"Authorization": "Bearer wrong"})).status == 401
            assert (await client.get("/", headers={"Authorization": f"Basic {token}"})).status == 401
            ws = await client.ws_connect("/ws", headers=bearer)
            assert (await ws.receive_json())["type"] == "hello"
            await ws.close()
            ws, _ = await connect(client, token=token, seed=1)
            await ws.close()
    with caplog.at_level(logging.DEBUG):
        run(scenario)
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert sum(line.startswith('127.0.0.1 "GET /" 200 ') for line in access) == 2, access  # the path, no query
    assert not any(token in r.getMessage() for r in caplog.records)
    # and whatever a library logs, the CLI's formatter writes neither the token nor any token= value
    formatter = RedactingFormatter("%(message)s", token)
    record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "bad line %r /ws?token=%s&seed=1",
                               (f"Bearer {token}", "other"), None)
    assert formatter.format(record) == "bad line 'Bearer <token>' /ws?token=<...>&seed=1"


def test_messages_up_to_the_documented_size_are_read(v2v_pool):
    """A message of max_message_bytes (2 x max_frame_bytes + 16) is read and answered with an error; one
    byte more closes that connection (1009), as docs/SERVING.md says (deflated: two bytes more)."""
    max_bytes = 4096

    async def scenario():
        async with serving(v2v_pool, max_frame_bytes=max_bytes) as client:
            ws, _ = await connect(client)
            await ws.send_bytes(message(1, bytes(2 * max_bytes)))
            assert "over the server's limit" in (await reply(ws))["message"]
            await ws.send_bytes(message(2, bytes(2 * max_bytes + 1)))
            closed = await ws.receive()
            assert closed.type == WSMsgType.CLOSE and closed.data == 1009
            # deflated, measured once inflated; aiohttp lets one byte more through there (`>`, not `>=`)
            for extra, closes in ((1, False), (2, True)):
                ws = await client.ws_connect("/ws", compress=15)
                await ws.receive_json()
                await ws.send_bytes(message(3, bytes(2 * max_bytes + extra)), compress=15)
                answer = await ws.receive()
                assert (answer.type, answer.data) == (WSMsgType.CLOSE, 1009) if closes else \
                    "over the server's limit" in json.loads(answer.data)["message"]
                await ws.close()
            return await slots_free(client)
    assert run(scenario) == 0
