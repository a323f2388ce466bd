"""mirage-run's pipelined loop (runtime/pipelined.py): reading, the frame step and writing overlap in their
own threads; frames come out in order and unchanged; a stop, a broken input or a failed write keeps the
frames made; the report names the stage that bounds the rate."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import CKPT_V2V
from mirage.core.report import psnr
from mirage.core.video_io import VideoError, to_float
from mirage.runtime.pipelined import ordered, run_pipelined, v2v_inputs

WAIT_S = 5.0  # what a test waits for the overlap it needs: a serial loop never gets it and fails after this


class FakePipe:
    """A Pipeline's submit / collect / depth / timeline, instantly: frame n is n's input back (its first byte)."""

    def __init__(self, depth: int, on_submit=lambda n: None):
        self.depth, self.on_submit, self.timeline = depth, on_submit, []
        self.flight: list[int] = []
        self.submitted = 0

    def submit(self, cond):
        self.on_submit(self.submitted)
        self.flight.append(int(cond[0, 0, 0]))
        self.submitted += 1

    def collect(self):
        return np.full((2, 2, 3), self.flight.pop(0), np.uint8)


def frames_in(n: int, read=lambda k: None):
    for k in range(n):
        read(k)
        yield np.full((2, 2, 3), k, np.uint8), None


@pytest.mark.parametrize("depth", [1, 2])
def test_frames_come_out_in_order(depth):
    written = []
    run = run_pipelined(FakePipe(depth), frames_in(20), lambda f: written.append(int(f[0, 0, 0])))
    assert written == list(range(20)) and run.frames == 20 and len(run.work["step"]) == 20


def test_the_reader_and_the_writer_run_beside_the_frame_step():
    """The reader runs ahead while frame 0 is submitted, and frame 0 is written while frame 3 is submitted:
    a loop that reads, steps and writes one after the other waits here in vain."""
    read = []
    read_ahead, submitted_3, overlapped = threading.Event(), threading.Event(), []

    def on_submit(n):
        if n == 0:
            overlapped.append(read_ahead.wait(WAIT_S))  # the reader has read frame 2 by itself
        if n == 3:
            submitted_3.set()

    def on_read(k):
        read.append(k)
        if k == 2:
            read_ahead.set()

    def write(frame):
        if frame[0, 0, 0] == 0:
            overlapped.append(submitted_3.wait(WAIT_S))

    run_pipelined(FakePipe(2, on_submit), frames_in(8, on_read), write)
    assert overlapped == [True, True] and read == list(range(8))


@pytest.mark.parametrize("depth", [1, 2])
def test_a_stop_ends_the_run_after_the_frames_in_flight(depth):
    pipe, written = FakePipe(depth), []
    run = run_pipelined(pipe, frames_in(100), written.append, stop=lambda: pipe.submitted >= 3)
    assert len(written) == run.frames == pipe.submitted == 3 and not pipe.flight


@pytest.mark.parametrize("depth", [1, 2])
def test_a_broken_input_keeps_the_frames_made_then_raises(depth):
    def broken(k):
        if k == 3:
            raise VideoError("clip.mp4: unreadable video (truncated)")

    written = []
    with pytest.raises(VideoError, match="truncated"):
        run_pipelined(FakePipe(depth), frames_in(10, broken), written.append)
    assert [int(f[0, 0, 0]) for f in written] == [0, 1, 2]


def test_a_failed_write_stops_the_run_and_is_raised():
    pipe = FakePipe(2)

    def write(frame):
        if frame[0, 0, 0] == 2:
            raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        run_pipelined(pipe, frames_in(10_000), write)
    assert pipe.submitted < 10_000


class BlockPipe(FakePipe):
    """A block model's stand-in: a step makes N frames, (N, H, W, 3), step k's are 3k, 3k+1, 3k+2; its frame
    graph took 3 ms a step (the timeline's events)."""
    N = 3

    def submit(self, cond):
        assert cond is None  # generation: no input
        self.flight.append(self.submitted)
        self.timeline.append({"compute_ms": 3.0})
        self.submitted += 1

    def collect(self):
        k = self.flight.pop(0)
        return np.stack([np.full((2, 2, 3), self.N * k + i, np.uint8) for i in range(self.N)])


@pytest.mark.parametrize("depth", [1, 2])
def test_a_step_of_n_frames_writes_each_in_order_with_its_share_of_the_time(depth):
    """A block of N frames is written frame by frame in order, each given the step's N-th of its time and of
    the frame graph's, and each compared with its own ground truth (frame i of a step is i bytes off)."""
    steps, n = 5, BlockPipe.N
    truths = [np.stack([np.full((2, 2, 3), n * k + 2 * i, np.uint8) for i in range(n)]) for k in range(steps)]
    written, seen = [], []
    run = run_pipelined(BlockPipe(depth), ((None, t) for t in truths), lambda f: written.append(int(f[0, 0, 0])),
                        on_frame=seen.append)
    assert written == list(range(steps * n)) and run.frames == len(seen) == steps * n
    assert len(run.step_seconds) == steps and run.frames_per_step == n
    assert run.frame_seconds == [s / n for s in run.step_seconds for _ in range(n)] == seen
    assert len(run.work["step"]) == len(run.work["write"]) == steps * n and run.gpu_ms == [1.0] * steps
    byte = lambda v: to_float(np.full((2, 2, 3), v, np.uint8))  # noqa: E731
    expected = [float(psnr(byte(v), byte(v + v % n))) for v in range(steps * n)]  # frame v is frame v % n of its step
    assert run.psnrs == pytest.approx(expected)


def test_inputs_are_prepared_ahead_in_threads_and_come_in_order():
    """ordered(): jobs run in parallel (job 0 waits until job 1 has run: in one thread it never would), their
    results come in order, and a source that breaks after job 2 still gives jobs 0-2 first."""
    started = threading.Event()

    def job(k):
        if k == 0:
            assert started.wait(WAIT_S)
        if k == 1:
            started.set()
        return k

    def jobs(n, broken_at=None):
        for k in range(n):
            if k == broken_at:
                raise VideoError("clip.mp4: unreadable video (truncated)")
            yield lambda k=k: job(k)

    assert list(ordered(jobs(8), 2)) == list(range(8))
    got = []
    with pytest.raises(VideoError, match="truncated"):
        for k in ordered(jobs(8, broken_at=3), 2):
            got.append(k)
    assert got == [0, 1, 2]


@pytest.mark.parametrize("slow", ["read", "write"])
def test_the_report_names_the_stage_that_bounds_the_rate(slow):
    pause = lambda *a: time.sleep(0.02)  # noqa: E731
    run = run_pipelined(FakePipe(2), frames_in(8, pause if slow == "read" else lambda k: None),
                        pause if slow == "write" else lambda f: None)
    assert run.bound() == slow and run.report()["bound"] == slow
    assert run.stage_ms()[slow] >= 19 and run.stage_ms()["step"] < 19


def test_mirage_run_writes_the_frames_a_synchronous_loop_makes(tmp_path):
    """The pipelined run changes no frame: mirage-run's PNGs are Pipeline.step's over the same uint8 inputs."""
    from mirage.bridge.pipeline import load_pipeline
    from mirage.cli.run import main
    from mirage.core.config import PipelineOptions

    out = tmp_path / "frames"
    r = CliRunner().invoke(main, [str(CKPT_V2V), "--frames", "5", "--output", str(out), "--json",
                                  str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    assert "bound" in r.output and "model: frame step" in r.output
    written = [np.asarray(Image.open(p))[::4, ::4] for p in sorted(out.glob("*.png"))]  # written 4x enlarged
    with load_pipeline(CKPT_V2V, device="cpu", options=PipelineOptions(frames="uint8")) as pipe:
        pipe.reset(0)
        inputs = [x for x, _ in v2v_inputs("synthetic", 32, 5)]
        assert all(x.dtype == np.uint8 for x in inputs)
        expected = [pipe.step(x) for x in inputs]
    assert len(written) == 5 and all(np.array_equal(a, b) for a, b in zip(written, expected))
