"""mirage-serve with a block model (issue 29): the block contract of docs/SERVING.md over tests/serve_standin.py's
BlockPool, a DiT-like pool of blocks of 4 frames at 20 FPS that takes a prompt and a strength. Inputs
gathered into blocks, a block's frames paced at the video rate (not in a burst) on each stream's own clock,
generation stepped only as its playout runs dry, control messages validated, merged, applied between steps
and routed to the sender's stream only."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

pytest.importorskip("aiohttp")
from aiohttp import WSMsgType  # noqa: E402

from mirage.core.video_io import as_uint8, to_float  # noqa: E402
from mirage.runtime.server import REPLY  # noqa: E402

from serve_standin import BlockPool, SleepPool  # noqa: E402
from test_serve import connect, inputs, message, run, serving  # noqa: E402

BLOCK, RATE, STEP_S = 4, 20.0, 0.02  # a 50 ms frame period: a block plays over 150 ms from its first frame


async def replies(ws, count: int) -> list[tuple]:
    """The next `count` frames as (arrival, id, index, uint8 pixels) and the text messages meanwhile (stats
    skipped)."""
    frames, texts = [], []
    while len(frames) < count:
        msg = await ws.receive()
        if msg.type == WSMsgType.BINARY:
            frame_id, _, index, _ = REPLY.unpack_from(msg.data)
            frames.append((time.monotonic(), frame_id, index,
                           np.frombuffer(msg.data[REPLY.size:], np.uint8).reshape(32, 32, 3)))
        elif json.loads(msg.data)["type"] != "stats":
            texts.append(json.loads(msg.data))
    return frames, texts


async def text(ws) -> dict:
    """The next text message other than stats."""
    while True:
        msg = await ws.receive()
        assert msg.type == WSMsgType.TEXT, msg
        data = json.loads(msg.data)
        if data["type"] != "stats":
            return data


async def send_block(ws, frames: list[np.ndarray], first_id: int) -> None:
    for n, rgb in enumerate(frames):
        await ws.send_bytes(message(first_id + n, rgb.tobytes()))


def model_input(rgb: np.ndarray) -> np.ndarray:
    """What the BlockPool hands back for a sent frame at strength 0: the frame as sent (a DiT restyles frames as
    they come, restores False: the server does not degrade them as it does the U-Net's), through [-1, 1] floats."""
    return as_uint8(to_float(rgb))


def test_a_block_s_frames_are_paced_at_the_video_rate_each_stream_on_its_own_clock():
    """Each stream's block of 4 comes back as 4 frames answering their inputs, spaced by the 50 ms frame
    period (a burst would land within a few ms); two streams' blocks are paced at once (interleaved), not
    one stream's after the other's."""
    pool = BlockPool(2, STEP_S, BLOCK, RATE)

    async def scenario():
        async with serving(pool, batch_wait_ms=50) as client:
            (a, hello), (b, _) = await connect(client), await connect(client)
            assert (hello["frames_in"], hello["video_rate"]) == (BLOCK, RATE)
            sent = {a: inputs(1), b: inputs(2)}
            await asyncio.gather(send_block(a, sent[a], 10), send_block(b, sent[b], 20))
            (got_a, _), (got_b, _) = await asyncio.gather(replies(a, BLOCK), replies(b, BLOCK))
            for got, first_id, rgb in ((got_a, 10, sent[a]), (got_b, 20, sent[b])):
                assert [(i, k) for _, i, k, _ in got] == [(first_id + n, 0) for n in range(BLOCK)]
                for (_, _, _, pixels), frame in zip(got, rgb):
                    np.testing.assert_array_equal(pixels, model_input(frame))
                times = [t for t, *_ in got]
                gaps = np.diff(times)
                assert times[-1] - times[0] >= 0.8 * (BLOCK - 1) / RATE, gaps  # a burst: a few ms
                assert (gaps >= 0.6 / RATE).sum() >= 2, gaps  # a late wake-up may shorten one gap (catching up)
            # paced at once: b's first frame comes before a's last (one sender after the other: after it)
            assert got_b[0][0] < got_a[-1][0] and got_a[0][0] < got_b[-1][0]
    run(scenario)


def test_a_block_model_s_deadline_is_at_least_its_block_s_play_time():
    """A block of 4 at 20 FPS plays 200 ms: with a 1 ms deadline asked for, blocks whose step starts within
    200 ms of their last frame are stepped, not dropped as late. A model of one input frame a step keeps
    the deadline it is given."""
    pool = BlockPool(1, STEP_S, BLOCK, RATE)

    async def scenario():
        async with serving(pool, deadline_ms=1.0) as client:
            ws, hello = await connect(client)
            assert hello["deadline_ms"] == pytest.approx(1e3 * BLOCK / RATE)
            for n in range(2):
                await send_block(ws, inputs(n), 4 * n)
                got, texts = await replies(ws, BLOCK)
                assert [i for _, i, _, _ in got] == list(range(4 * n, 4 * n + 4)) and texts == []
    run(scenario)

    class RatedPool(SleepPool):  # one input frame a step, with a video rate (the U-Net's pool under the contract)
        frames_in, video_rate = 1, RATE

    async def one_frame_deadline():
        async with serving(RatedPool(1, STEP_S), deadline_ms=1.0) as client:
            return (await connect(client))[1]["deadline_ms"]
    assert run(one_frame_deadline) == 1.0


def test_a_late_block_s_message_names_the_frames_it_held():
    """A block whose step starts past the deadline (the 200 ms play time; the step ahead takes 500 ms) is
    dropped with one `late` message naming its frames' ids: those the server kept of a client's (newest wins),
    not a range from its first to its last id."""
    pool = BlockPool(1, 0.5, BLOCK, RATE)

    async def scenario():
        async with serving(pool, deadline_ms=1.0) as client:
            ws, _ = await connect(client)
            await send_block(ws, inputs(0), 0)
            await asyncio.sleep(0.1)  # block 0 in its step
            for frame_id, rgb in zip((4, 6, 9, 11), inputs(1)):
                await ws.send_bytes(message(frame_id, rgb.tobytes()))
            while (late := await text_or_frame(ws)) is None or late["type"] != "late":
                pass
            return late
    late = run(scenario)
    assert late["id"] == 11 and late["message"].startswith("the block of frames 4, 6, 9, 11 waited "), late


async def text_or_frame(ws) -> dict | None:
    """The next message other than stats: a text one, or None for a frame."""
    msg = await ws.receive()
    return None if msg.type == WSMsgType.BINARY or json.loads(msg.data)["type"] == "stats" else json.loads(msg.data)


def test_a_frame_of_another_size_in_a_block_is_refused_and_the_block_completes():
    """The bad frame gets one error naming it; the block is gathered from the good frames around it."""
    pool = BlockPool(1, STEP_S, BLOCK, RATE)

    async def scenario():
        async with serving(pool) as client:
            ws, _ = await connect(client)
            frames = inputs(3)
            await send_block(ws, frames[:2], 0)
            await ws.send_bytes(message(2, b"\0" * (16 * 16 * 3)))
            error = await text(ws)
            assert error["type"] == "error" and "frame 2" in error["message"] and "32x32" in error["message"]
            await send_block(ws, frames[2:], 3)
            got, texts = await replies(ws, BLOCK)
            assert [i for _, i, _, _ in got] == [0, 1, 3, 4] and texts == []
    run(scenario)


def counters(got) -> list[int]:
    """The BlockPool's frame counter of each generated frame received (its row's frames since attach,
    modulo COUNTER)."""
    levels = list(as_uint8(np.arange(BlockPool.COUNTER, dtype=np.float32) / BlockPool.COUNTER))
    return [levels.index(pixels[0, 0, 0]) for *_, pixels in got]


def missed(got) -> int:
    """Frames of the row's video skipped between the first and the last received."""
    return sum((b - a - 1) % BlockPool.COUNTER for a, b in zip(counters(got), counters(got)[1:]))


async def ask_every_10_ms(ws) -> None:
    for n in range(1000):
        await ws.send_bytes(message(n))
        await asyncio.sleep(0.01)


def test_a_generation_block_answers_its_request_and_is_stepped_only_as_its_playout_runs_dry():
    """A generation client asking every 10 ms gets blocks of 4 frames at the video rate, each frame of a
    block carrying its request's id with indices 0..3, every frame of its row's video in order, and the
    pool steps about once per block played, not once per request."""
    pool = BlockPool(1, STEP_S, BLOCK, RATE, video_to_video=False)

    async def scenario():
        async with serving(pool) as client:
            ws, hello = await connect(client)
            assert hello["frames_in"] == 0
            asker = asyncio.create_task(ask_every_10_ms(ws))
            got, _ = await replies(ws, 3 * BLOCK)
            asker.cancel()
            return got
    got = run(scenario)
    order = [(i, k) for _, i, k, _ in got]
    assert order == sorted(order) and len(set(order)) == len(order), order
    for (_, _, k, _), count in zip(got, counters(got)):  # a reply's index is its frame's place in the block
        assert count % BLOCK == k, (k, count)
    assert missed(got) <= 1, counters(got)  # a stalled sender may drop a frame, never a block
    steps = sum(c[0] == "submit" for c in pool.calls)
    assert steps <= 3 + 2, pool.calls  # 3 blocks played (one more may be computing); asked ~60 times
    span = got[-1][0] - got[0][0]
    assert span >= 0.8 * (3 * BLOCK - 1) / RATE  # 11 frame periods: paced, across blocks too


def test_a_generation_request_is_never_dropped_as_late():
    """A generation request carries no input that could go stale: behind steps longer than the deadline it
    is stepped, not dropped as late (which threw its row's block away, a skip in the stream's video)."""
    pool = BlockPool(1, 0.15, BLOCK, RATE, video_to_video=False)

    async def scenario():
        async with serving(pool, deadline_ms=1.0) as client:
            ws, _ = await connect(client)
            asker = asyncio.create_task(ask_every_10_ms(ws))
            got, texts = await replies(ws, 3 * BLOCK)
            asker.cancel()
            return got, texts
    got, texts = run(scenario)
    assert [t for t in texts if t["type"] == "late"] == [], texts
    assert missed(got) <= 1, counters(got)


def test_generation_streams_out_of_phase_lose_no_block():
    """A generation pool advances every attached row each step: a stream waiting for its playout to run
    dry joins its neighbour's step rather than have that block made and lost, so two streams that
    started half a block apart each get every frame of their videos, at the video rate."""
    pool = BlockPool(2, STEP_S, BLOCK, RATE, video_to_video=False)

    async def scenario():
        async with serving(pool, batch_wait_ms=0) as client:
            (a, _), (b, _) = await connect(client), await connect(client)
            askers = [asyncio.create_task(ask_every_10_ms(a))]
            await asyncio.sleep(BLOCK / RATE / 2)
            askers.append(asyncio.create_task(ask_every_10_ms(b)))
            (got_a, _), (got_b, _) = await asyncio.gather(replies(a, 4 * BLOCK), replies(b, 4 * BLOCK))
            for asker in askers:
                asker.cancel()
            return got_a, got_b
    for got in run(scenario):
        assert missed(got) <= 1, counters(got)
        assert got[-1][0] - got[0][0] >= 0.8 * (4 * BLOCK - 1) / RATE


def test_a_control_is_applied_between_steps_to_the_sender_s_stream_only():
    pool = BlockPool(2, STEP_S, BLOCK, RATE)

    async def scenario():
        async with serving(pool, batch_wait_ms=50) as client:
            (a, _), (b, hello) = await connect(client), await connect(client)
            assert hello["controls"] == {"prompt": True, "strength": [0.0, 1.0]}
            await b.send_str(json.dumps({"type": "control", "prompt": "a red fox", "strength": 1.0,
                                         "slot": hello["slot"]}))
            assert await text(b) == {"type": "applied", "prompt": "a red fox", "strength": 1.0}
            sent = {a: inputs(1), b: inputs(2)}
            await asyncio.gather(send_block(a, sent[a], 0), send_block(b, sent[b], 0))
            (got_a, _), (got_b, _) = await asyncio.gather(replies(a, BLOCK), replies(b, BLOCK))
            gray = as_uint8(np.zeros((32, 32, 3), np.float32))
            for (_, _, _, pixels_a), (_, _, _, pixels_b), rgb_a in zip(got_a, got_b, sent[a]):
                np.testing.assert_array_equal(pixels_b, gray)  # strength 1 on b's row
                np.testing.assert_array_equal(pixels_a, model_input(rgb_a))  # a untouched
    run(scenario)
    controls = [c for c in pool.calls if c[0] == "control"]
    assert controls == [("control", 1, "a red fox", 1.0)]
    assert pool.calls.index(controls[0]) < len(pool.calls) - 1  # between steps: a step came after it


def test_controls_are_rate_limited_and_merged_newest_wins():
    """A control, then 19 in a burst: the first applied at once, the burst merged into one applied no
    sooner than the interval after it, with the newest prompt and the newest strength."""
    pool = BlockPool(1, STEP_S, BLOCK, RATE)

    async def scenario():
        async with serving(pool, control_interval_ms=300) as client:
            ws, _ = await connect(client)
            await ws.send_str(json.dumps({"type": "control", "prompt": "prompt 0"}))
            first, applied = await text(ws), time.monotonic()
            for n in range(1, 20):
                change = {"strength": n / 20} if n % 2 else {"prompt": f"prompt {n}"}
                await ws.send_str(json.dumps({"type": "control", **change}))
            second = await text(ws)
            assert time.monotonic() - applied >= 0.25
            await asyncio.sleep(0.4)  # nothing more comes
            await ws.send_str(json.dumps({"type": "control", "strength": 0.0}))
            return first, second, await text(ws)
    first, second, third = run(scenario)
    assert first == {"type": "applied", "prompt": "prompt 0"}
    assert second == {"type": "applied", "prompt": "prompt 18", "strength": 19 / 20}
    assert third == {"type": "applied", "strength": 0.0}
    assert len([c for c in pool.calls if c[0] == "control"]) == 3


def test_a_control_flood_costs_the_pool_one_control_per_interval_and_the_neighbour_nothing():
    """A client sending a new prompt every millisecond for 1.2 s: the pool applies one per 300 ms interval
    (no more than 1.2 / 0.3 + 1), its last the flood's last, while the neighbour's blocks keep their pace."""
    pool = BlockPool(2, STEP_S, BLOCK, RATE)

    async def scenario():
        async with serving(pool, control_interval_ms=300, batch_wait_ms=0) as client:
            (a, _), (b, _) = await connect(client), await connect(client)

            async def flood():
                end, n = time.monotonic() + 1.2, 0
                while time.monotonic() < end:
                    await a.send_str(json.dumps({"type": "control", "prompt": f"prompt {n}"}))
                    n += 1
                    await asyncio.sleep(0.001)
                return n
            flooding = asyncio.create_task(flood())
            times = []
            for n in range(3):
                await send_block(b, inputs(n), 4 * n)
                got, _ = await replies(b, BLOCK)
                times += [t for t, *_ in got]
            sent = await flooding
            applied = []
            while not applied or applied[-1] != f"prompt {sent - 1}":
                applied.append((await text(a))["prompt"])
            return sent, times
    sent, times = run(scenario)
    controls = [c for c in pool.calls if c[0] == "control"]
    assert sent > 100 and 2 <= len(controls) <= 1.2 / 0.3 + 2, (sent, controls)
    gaps = np.diff(times)
    assert (gaps >= 0.6 / RATE).sum() >= 6, gaps  # 9 of its 11 gaps are within a block: paced as ever


BAD_CONTROLS = [  # (text message, what its error must say)
    ("not json", "a text message is a control"),
    ('{"type": "hello"}', "a text message is a control"),
    ('["control"]', "a text message is a control"),
    ('{"type": "control"}', "give a prompt, a strength or both"),
    ('{"type": "control", "strength": 0.5, "colour": 1}', "unknown field 'colour'"),
    ('{"type": "control", "strength": 0.5, "slot": 1}', "slot 1 is not this connection's stream (slot 0)"),
    ('{"type": "control", "prompt": 7}', "prompt must be a string, not int"),
    ('{"type": "control", "prompt": "' + "x" * 101 + '"}', "a prompt of 101 characters; the server takes at most 100"),
    ('{"type": "control", "prompt": "one two three four five six seven eight nine"}',
     "a prompt of 9 tokens; the text encoder takes 8"),
    ('{"type": "control", "strength": 1.5}', "strength 1.5; give a number from 0 to 1"),
    ('{"type": "control", "strength": -0.1}', "strength -0.1; give a number from 0 to 1"),
    ('{"type": "control", "strength": "0.5"}', 'strength "0.5"; give a number'),
    ('{"type": "control", "strength": true}', "strength true; give a number"),
    ('{"type": "control", "strength": NaN}', "strength NaN; give a number"),
    ('{"type": "control", "strength": 0.5, "slot": true}', "slot true is not this connection's stream"),
    ("x" * 900, "a text message of 900 characters; a control takes at most 856"),
]


def test_each_bad_control_gets_one_error_and_the_other_stream_goes_on():
    pool = BlockPool(2, STEP_S, BLOCK, RATE)

    async def scenario():
        async with serving(pool, max_prompt_chars=100, control_interval_ms=0, batch_wait_ms=0) as client:
            (a, hello), (b, _) = await connect(client), await connect(client)
            assert hello["slot"] == 0 and hello["max_prompt_chars"] == 100
            for n, (bad, expected) in enumerate(BAD_CONTROLS):
                await a.send_str(bad)
                await send_block(b, inputs(n), 4 * n)  # b streams on meanwhile
                error = await text(a)
                assert error["type"] == "error" and expected in error["message"], (bad, error)
                got, texts = await replies(b, BLOCK)
                assert [i for _, i, _, _ in got] == list(range(4 * n, 4 * n + 4)) and texts == []
            await a.send_str('{"type": "control", "strength": 0.25}')  # a's stream still takes a good one
            assert await text(a) == {"type": "applied", "strength": 0.25}
    run(scenario)
    assert [c for c in pool.calls if c[0] == "control"] == [("control", 0, None, 0.25)]


def test_a_model_without_controls_refuses_them_and_says_so_in_its_hello():
    pool = SleepPool(1, STEP_S)

    async def scenario():
        async with serving(pool) as client:
            ws, hello = await connect(client)
            assert (hello["controls"], hello["frames_in"], hello["video_rate"]) == ({}, 1, None)
            assert "strength" not in hello  # no strength to show
            await ws.send_str('{"type": "control", "strength": 0.5}')
            assert "this model takes no prompt and no strength" in (await text(ws))["message"]
            await ws.send_bytes(message(5, inputs(1, 1)[0].tobytes()))  # and streams one frame a step, as before
            got, _ = await replies(ws, 1)
            assert (got[0][1], got[0][2]) == (5, 0)
    run(scenario)


def test_video_to_video_streams_out_of_phase_are_aligned_into_one_step_a_block():
    """Every step of a video-to-video block model costs the whole batch, whatever rows have a block: two
    streams half a block apart would each cost a step. The one caught mid-block drops its gathered frames once
    (counted stale) and from then on both step together, one step a block, each answered at the video rate."""
    pool = BlockPool(2, STEP_S, BLOCK, RATE)
    submits = []
    submit = pool.submit
    pool.submit = lambda inputs: (submits.append(sorted(inputs)), submit(inputs))[1]
    blocks = 8

    async def send_at_rate(ws, first_id: int, count: int):
        start = time.monotonic()
        for n, rgb in enumerate(inputs(first_id, count)):
            await asyncio.sleep(max(0.0, start + n / RATE - time.monotonic()))
            await ws.send_bytes(message(first_id + n, rgb.tobytes()))

    async def stats(ws) -> dict:
        while True:
            msg = await ws.receive()
            if msg.type == WSMsgType.TEXT and json.loads(msg.data)["type"] == "stats":
                return json.loads(msg.data)

    async def scenario():
        async with serving(pool, batch_wait_ms=5) as client:
            (a, _), (b, _) = await connect(client), await connect(client)
            senders = [asyncio.create_task(send_at_rate(a, 0, blocks * BLOCK))]
            await asyncio.sleep(BLOCK / RATE / 2)  # b starts half a block after a, and sends a block more
            senders.append(asyncio.create_task(send_at_rate(b, 1000, (blocks + 1) * BLOCK)))
            (got_a, _), (got_b, _) = await asyncio.gather(replies(a, blocks * BLOCK), replies(b, blocks * BLOCK))
            await asyncio.gather(*senders)
            return got_a, got_b, [await stats(ws) for ws in (a, b)]
    got_a, got_b, (stats_a, stats_b) = run(scenario)
    # one step for both (out of phase, nearly none are); one more apart than the first and last allows for a
    # loaded CPU's late sender (1 run in 10 beside a full test run)
    assert len([rows for rows in submits if rows == [0, 1]]) >= blocks - 3, submits
    assert len(submits) <= blocks + 3, submits  # not a step per stream per block
    assert stats_a["stale"] == 0 and 1 <= stats_b["stale"] <= BLOCK // 2, (stats_a, stats_b)  # b's first, once
    for got in (got_a, got_b):
        gaps = np.diff([t for t, *_ in got])
        assert np.median(gaps) == pytest.approx(1 / RATE, rel=0.3), gaps  # at the video rate


def test_a_stream_is_aligned_to_the_batch_s_newest_block_not_to_when_the_step_starts():
    """A step may start after its blocks were complete (it waited for the step in flight): a stream caught
    mid-block keeps the frames that came after the batch's newest block was complete and drops the older
    ones, so its next block completes one block after the batch's, not one block after the step's start. A
    stream whose block's frames have all but one come (decoded or not) loses nothing: it steps next."""
    from mirage.runtime.server import Block, Frame, Server, ServerOptions, Stream

    server = Server(BlockPool(3, STEP_S, BLOCK, RATE), ServerOptions())
    try:
        now = time.monotonic()
        frame = lambda i, at: Frame(i, 1, 0.0, at, None)  # noqa: E731
        a, b, c = Stream(0, None), Stream(1, None), Stream(2, None)
        b.gathering = [frame(10, now - 0.15), frame(11, now - 0.02)]
        c.gathering = [frame(20, now - 0.15), frame(21, now - 0.1)]
        c.raw.append((b"", now - 0.08))  # arrived, not yet decoded: c is one frame from its block
        b.last_frame = c.last_frame = now - 0.02
        server.streams = {0: a, 1: b, 2: c}
        server.align([(a, Block((frame(1, now - 0.2), frame(2, now - 0.05))))])
        assert [f.id for f in b.gathering] == [11] and b.counts["stale"] == 1
        assert [f.id for f in c.gathering] == [20, 21] and c.counts["stale"] == 0
        server.align([(a, Block((frame(3, now),)))])  # a newer batch: b's frame 11 came before it was complete
        assert b.gathering == [] and b.counts["stale"] == 2
    finally:
        server.step_thread.shutdown()
        server.codec.shutdown()


def test_a_video_rate_stream_is_not_held_for_a_step_that_lands_a_little_late():
    """A video-to-video client sending at the video rate completes a block as its previous block's last frames
    play. A step that lands a little later than the plan (step_s) must not hold its next block until that
    playout runs dry: repeated every block, the hold became standing latency. Within a quarter block (align_s)
    it steps; a client sending faster than the video rate, a block or more ahead of its playout, is still held
    (its newer block replaces the pending one instead of growing the playout)."""
    from mirage.runtime.server import Block, Frame, Server, ServerOptions, Stream

    server = Server(BlockPool(1, STEP_S, BLOCK, RATE), ServerOptions())
    try:
        period = 1 / RATE
        assert server.align_s == pytest.approx(period)  # a quarter of a 4-frame block
        server.step_s = 0.1
        now = time.monotonic()
        frames = lambda at: Block(tuple(Frame(i, 1, 0.0, at, None) for i in range(BLOCK)))  # noqa: E731
        pixels = np.zeros((BLOCK, 32, 32, 3), np.uint8)
        on_time, ahead = Stream(0, None), Stream(1, None)
        # the last of its previous block's frames plays 0.03 s after a step started now would end: ready
        on_time.land(frames(now - 0.2), pixels, now + 0.13 - (BLOCK - 1) * period, period)
        on_time.pending = frames(now)
        assert on_time.playout_end() == pytest.approx(now + server.step_s + 0.03)
        assert server.ready_for_step(on_time, now)
        # two blocks still to play: held until a quarter block before a step would end as the playout does
        ahead.land(frames(now - 0.2), pixels, now, period)
        ahead.land(frames(now - 0.1), pixels, now, period)
        ahead.pending = frames(now)
        assert not server.ready_for_step(ahead, now)
        server.streams = {1: ahead}
        assert server.release_at() == pytest.approx(ahead.playout_end() - server.step_s - server.align_s)
    finally:
        server.step_thread.shutdown()
        server.codec.shutdown()


def test_a_playout_delayed_once_catches_up_by_playing_a_little_faster():
    """A client sending at the video rate gets its blocks landing one play time apart: a block that landed late
    once (a slow step) would push every later frame back by as much for good, each block chained after the one
    before. Chained, a block's frames are spaced down to CATCH_UP periods until the delay is gone; a block that
    lands with nothing older left to play keeps the video's own period."""
    from mirage.runtime.server import CATCH_UP, Block, Frame, Stream

    period, n = 1 / RATE, BLOCK
    play = n * period  # a block's play time, and the time between a video-rate client's blocks
    block = Block(tuple(Frame(i, 1, 0.0, 0.0, None) for i in range(n)))
    pixels = np.zeros((n, 32, 32, 3), np.uint8)
    stream = Stream(0, None)
    sent = []

    def play_until(t: float) -> None:  # the sender: each output when due (Server.sender)
        while stream.due() is not None and stream.due() <= t:
            due = stream.due()
            stream.next_send = due + stream.playout.popleft().spacing
            sent.append(due)

    late = 2 * period
    stream.land(block, pixels, 0.0 + late, period, slack=0.0)  # the first block's step ended late
    delays = []
    for k in range(1, 12):
        landed = k * play  # on time from then on
        play_until(landed)
        first = len(sent) + len(stream.playout)  # the index its first frame will have among those sent
        stream.land(block, pixels, landed, period, slack=0.0)
        play_until(landed + 2 * play)
        delays.append(sent[first] - landed)  # when its first frame went, after its landing
    step = n * (1 - CATCH_UP) * period  # what a block catches up: its n spacings, the last to the next block
    assert delays[0] == pytest.approx(late)
    for before, after in zip(delays, delays[1:]):
        assert after == pytest.approx(max(0.0, before - step), abs=1e-9), delays
    assert delays[-1] == pytest.approx(0.0, abs=1e-9)
    assert np.diff(sent[-n:]) == pytest.approx(period)  # caught up: the video's own period again
    # within the slack (the server's: a quarter block), a block behind older frames keeps the video's period,
    # which absorbs a step's jitter; beyond it, only what is beyond it is caught up
    for behind, spacing in ((period, period), (2.2 * period, period - 0.2 * period / n)):
        stream = Stream(0, None)
        stream.land(block, pixels, 0.0, period)
        stream.land(block, pixels, play - behind, period, slack=2 * period)
        assert stream.playout[-1].spacing == pytest.approx(spacing), behind
        stream.land(block, pixels, play - behind, period)  # no slack (generation): chained at the video's period
        assert stream.playout[-1].spacing == pytest.approx(period)
