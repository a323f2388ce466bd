"""Stream slots on the CPU: isolation between rows, attach/detach without disturbing the others."""
import numpy as np
import pytest

from conftest import CKPT_GEN, CKPT_V2V
from mirage.core.synthetic import SyntheticVideo
from mirage.core.video_io import v2v_input
from mirage.bridge.pipeline import load_pipeline
from mirage.runtime.pipeline import PipelineError
from mirage.runtime.pool import PoolFull, StreamPool


def _inputs(n: int, seed: int) -> list[np.ndarray]:
    return [v2v_input(f) for f in SyntheticVideo(32, seed=seed).clip(0, n)]


def _alone(pool: StreamPool, seed: int, inputs: list[np.ndarray]) -> list[np.ndarray]:
    """A stream's frames with the rest of the pool free; the slot is freed after."""
    slot = pool.attach(seed=seed)
    frames = [pool.step({slot: x})[slot] for x in inputs]
    pool.detach(slot)
    return frames


def test_a_stream_is_the_same_alone_and_beside_others():
    """Same seed and inputs: identical bytes whether the stream's neighbours are free or busy."""
    a_in, b_in = _inputs(4, 1), _inputs(4, 2)
    with StreamPool.open(CKPT_V2V, slots=3, device="cpu", load=load_pipeline) as pool:
        alone = _alone(pool, 5, a_in)
        b = pool.attach(seed=9)  # takes slot 0: the stream under test moves to slot 1
        a = pool.attach(seed=5)
        assert a != b
        beside = []
        for x, y in zip(a_in, b_in):
            out = pool.step({a: x, b: y})
            beside.append(out[a])
            assert set(out) == {a, b}
    for f, g in zip(alone, beside):
        np.testing.assert_array_equal(f, g)


def test_pool_matches_a_single_stream_pipeline():
    frames = _inputs(3, 3)
    with load_pipeline(CKPT_V2V, device="cpu") as pipe:
        pipe.reset(7)
        single = [pipe.step(x) for x in frames]
    with StreamPool.open(CKPT_V2V, slots=2, device="cpu", load=load_pipeline) as pool:
        pool.attach(seed=0)
        s = pool.attach(seed=7)
        pooled = [pool.step({s: x})[s] for x in frames]
    for f, g in zip(single, pooled):
        assert np.abs(f - g).max() < 1e-5  # batch 1 and batch 2 may pick different CPU kernels


def test_submit_then_collect_is_step():
    """The server's split form of step(): the same frames, and only the slots that advanced."""
    frames = _inputs(3, 4)
    with StreamPool.open(CKPT_V2V, slots=2, device="cpu", load=load_pipeline) as pool:
        assert pool.depth == 1  # on the CPU a submit computes the frame
        s = pool.attach(seed=3)
        stepped = [pool.step({s: x})[s] for x in frames]
        pool.detach(s)
        s = pool.attach(seed=3)
        split = []
        for x in frames:
            pool.submit({s: x})
            out = pool.collect()
            assert set(out) == {s}
            split.append(out[s])
    for f, g in zip(stepped, split):
        np.testing.assert_array_equal(f, g)


def test_attach_detach_and_full_pool():
    with StreamPool.open(CKPT_GEN, slots=2, device="cpu", load=load_pipeline) as pool:
        a, b = pool.attach(1), pool.attach(2)
        with pytest.raises(PoolFull, match="2 stream slots are busy"):
            pool.attach(3)
        first = pool.step()
        assert set(first) == {a, b} and first[a].shape == (1, 32, 32, 3)  # one frame per step
        pool.detach(a)
        assert set(pool.step()) == {b}
        c = pool.attach(4)
        assert c == a and set(pool.step()) == {b, c}


def test_a_stream_without_input_is_held_not_advanced():
    """Stream a sends every step, b every other step: each gets exactly its own video, as if alone."""
    a_in, b_in = _inputs(4, 1), _inputs(2, 2)
    with StreamPool.open(CKPT_V2V, slots=2, device="cpu", load=load_pipeline) as pool:
        alone_b = _alone(pool, 9, b_in)
        a, b = pool.attach(seed=5), pool.attach(seed=9)
        got_b = []
        for n, x in enumerate(a_in):
            out = pool.step({a: x, b: b_in[n // 2]} if n % 2 == 0 else {a: x})
            assert set(out) == ({a, b} if n % 2 == 0 else {a})
            if b in out:
                got_b.append(out[b])
    for f, g in zip(alone_b, got_b):
        np.testing.assert_array_equal(f, g)


def test_a_group_places_streams_on_the_least_loaded_pool_and_keeps_them_apart():
    """Two pools (two devices on a GPU host; two CPU pools here): streams alternate between them,
    each stream's video is the one it gets alone, and the group is full when both pools are."""
    from mirage.runtime.pool import PoolGroup

    a_in, b_in = _inputs(3, 1), _inputs(3, 2)
    # the same batch as each pool below
    with StreamPool.open(CKPT_V2V, slots=2, device="cpu", load=load_pipeline) as single:
        alone = _alone(single, 5, a_in)
    with PoolGroup.open(CKPT_V2V, slots=2, devices=["cpu", "cpu"], load=load_pipeline) as group:
        a, b, c = group.attach(5), group.attach(7), group.attach(9)
        assert [group._locate(s)[0] for s in (a, b, c)] == [group.pools[0], group.pools[1], group.pools[0]]
        got = [group.step({a: x, b: y, c: y}) for x, y in zip(a_in, b_in)]
        group.attach(11)
        with pytest.raises(PoolFull, match="4 stream slots on 2 devices"):
            group.attach(13)
        group.detach(b)
        assert sorted(group.active) == sorted([a, c, group.offsets[1] + 1])
    for f, out in zip(alone, got):
        np.testing.assert_array_equal(f, out[a])


def test_a_group_stays_in_step_after_one_pool_refuses_a_step():
    """A bad frame for one pool fails the group's step; the other pool's half of it is dropped, so
    the next step's outputs are that step's own (a pool left with an uncollected step would hand
    back the previous frames from then on)."""
    from mirage.runtime.pool import PoolGroup

    a_in, b_in = _inputs(3, 1), _inputs(3, 2)
    with PoolGroup.open(CKPT_V2V, slots=1, devices=["cpu", "cpu"], load=load_pipeline) as group:
        a, b = group.attach(5), group.attach(7)
        first = group.step({a: a_in[0], b: b_in[0]})
        with pytest.raises(PipelineError, match="shape"):
            group.submit({a: a_in[1], b: b_in[1][:8]})  # pool 1 refuses its frame; pool 0 computed one
        assert [p.pipeline.execution.pending for p in group.pools] == [0, 0]  # nothing left in flight
        second = group.step({a: a_in[1], b: b_in[1]})
        assert not np.array_equal(second[a], first[a])  # not the frame the failed step left behind
    # the same steps, no failure
    with PoolGroup.open(CKPT_V2V, slots=1, devices=["cpu", "cpu"], load=load_pipeline) as group:
        a, b = group.attach(5), group.attach(7)
        group.step({a: a_in[0], b: b_in[0]})
        clean = group.step({a: a_in[1], b: b_in[1]})
    np.testing.assert_array_equal(second[b], clean[b])


class _FakePool:
    """A pool without a model that numbers its steps; submit number `fail_on` raises. Two steps in
    flight, as on a GPU."""

    slots, frame_shape, video_to_video, depth = 1, (4, 4, 3), True, 2

    def __init__(self, fail_on: int = 0):
        self.active, self.in_flight, self.submits, self.fail_on = [0], [], 0, fail_on

    def submit(self, inputs: dict) -> None:
        self.submits += 1
        if self.submits == self.fail_on:
            raise PipelineError("refused")
        self.in_flight.append({slot: self.submits for slot in inputs} if inputs else {})

    def collect(self) -> dict:
        return self.in_flight.pop(0)

    def close(self) -> None:
        pass


def test_a_group_refusing_a_step_behind_one_in_flight_keeps_each_step_s_frames():
    """With a step in flight (not collected yet), the next group step fails on pool 1: pool 0's part
    of it is dropped, and the step in flight still collects its own frames, then the next ones theirs."""
    from mirage.runtime.pool import PoolGroup

    group = PoolGroup([_FakePool(), _FakePool(fail_on=2)])
    frame = np.zeros((4, 4, 3), np.float32)
    group.submit({0: frame, 1: frame})                 # step 1 on both
    with pytest.raises(PipelineError, match="refused"):
        group.submit({0: frame, 1: frame})             # step 2: pool 1 refuses, pool 0 computed its part
    assert group.collect() == {0: 1, 1: 1}             # step 1's frames (pool 0's step 2 is dropped)
    group.submit({0: frame, 1: frame})
    assert group.collect() == {0: 3, 1: 3}             # pool 0's third submit, pool 1's third
    assert [p.in_flight for p in group.pools] == [[], []]
    group.close()


def test_a_group_step_without_work_is_an_idle_step_of_every_pool():
    """What the server's calibration times: with no stream anywhere, every pool computes a step."""
    from mirage.runtime.pool import PoolGroup

    group = PoolGroup([_FakePool(), _FakePool()])
    group.submit({})
    assert [p.submits for p in group.pools] == [1, 1]
    assert group.collect() == {}
    group.close()
