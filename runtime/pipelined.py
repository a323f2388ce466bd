"""A Pipeline run over a stream of inputs with its host work overlapped: what `mirage-run` drives.

    reader thread   the input: decode a file's next frame (or draw the synthetic one), make the model's
                    uint8 input from it (PREPARE_THREADS helpers, in order) -> bounded queue
    calling thread  the step: submit step n+1 while step n computes (a GPU keeps two in flight,
                    Pipeline.depth), collect step n                       -> bounded queue
    writer thread   write the step's frames in order (the mp4 encoder is an ffmpeg process), then each
                    one's PSNR against its ground truth (off the critical path)

A step is the model's unit of work: one frame (the U-Net), or a block of n frames (the DiT), which
Pipeline.collect returns as (n, H, W, 3) and which arrive together: each is given a step's n-th of its time.

Frames cross to the device as uint8 and come back as uint8 (PipelineOptions(frames="uint8")). Each
thread times its own work per frame, so the report separates the model's time (the frame step; on a GPU
also the frame graph's own time from its events) from the pipeline's (reading, writing, the waits),
and names the stage that bounds the frame rate. Numpy, Pillow, ffmpeg's pipe and the backends release
the GIL in their work, so the threads overlap.

A stop (a signal: `stop()` turns true) ends the run after the frames in flight, which are written; an
input that breaks mid-run does the same, then its error is raised; frames made are kept either way.
"""
from __future__ import annotations

import collections
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from mirage.core.report import psnr
from mirage.core.synthetic import SyntheticVideo
from mirage.core.video_io import as_uint8, iter_frames_u8, to_float, v2v_input_u8

QUEUE_FRAMES = 4  # steps a stage may run ahead of the next: enough to absorb a slow one, few for a live input
POLL_S = 0.05     # how often a wait looks at stop(): Ctrl-C is seen within this even while the input is stalled
SYNTHETIC_SEED = 12345
PREPARE_THREADS = min(4, os.cpu_count() or 1)  # reader helpers: a 512x512 input frame is ~6 ms of one core
STAGES = ("read", "step", "write", "psnr")
# read: the reader's wait per step for its next input (decoded or drawn, and prepared, by its helpers);
# step: the calling thread's submit + collect (on a GPU, collect waits for the frame graph), a step's share
# per frame; write: the writer's encode / write per frame; psnr: the metric per frame


def source_frames(source: str, size: int | tuple[int, int], frames: int,
                  prepare: Callable[[np.ndarray], object] = lambda f: f) -> Iterator:
    """`prepare` of each of `frames` frames of `source` ('synthetic', a file, a folder, a webcam index) at the
    model's `size` (a side, or (height, width): a file's frames scaled to cover it and center-cropped), made a
    few frames ahead in PREPARE_THREADS threads; a frame is uint8 when decoded, float when drawn. A file
    decodes in order (ffmpeg's own process, or Pillow); a synthetic frame is drawn in its thread (4 ms at
    512x512 on one core)."""
    if source == "synthetic":
        video = SyntheticVideo(size, seed=SYNTHETIC_SEED)
        jobs = (lambda n=n: prepare(video.clip(0, 1, start=n)[0]) for n in range(frames))
    else:
        jobs = (lambda f=f: prepare(f) for _, f in zip(range(frames), iter_frames_u8(source, size)))
    return ordered(jobs, PREPARE_THREADS)


def v2v_inputs(source: str, size: int | tuple[int, int], frames: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(model input, ground truth) of each of `frames` frames of `source` (source_frames): the input is uint8
    (video_io.v2v_input_u8: the frame's luma plus coarse chroma, so a clip's own colors are its ground truth),
    the truth the source's frame."""
    return source_frames(source, size, frames, lambda truth: (v2v_input_u8(truth), truth))


def restyle_inputs(source: str, size: int | tuple[int, int], frames: int,
                   n: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(model input, ground truth) of each step of restyling (a DiT's video-to-video): n frames of `source`
    (source_frames) as they are, uint8 (n, height, width, 3), both; a last block the input cannot fill is not made."""
    block = []
    for frame in source_frames(source, size, -(-frames // n) * n, as_uint8):
        block.append(frame)
        if len(block) == n:
            frames_u8 = np.stack(block)
            yield frames_u8, frames_u8
            block = []


def ordered(jobs: Iterator[Callable[[], object]], workers: int) -> Iterator:
    """Each job's result in the jobs' order, computed in `workers` threads, up to 2 x workers ahead. A job's
    error is raised at its turn; an error in drawing the next job (a video that breaks mid-file) after the
    results of the jobs drawn before it."""
    with ThreadPoolExecutor(workers, thread_name_prefix="mirage-prepare") as pool:
        ahead: collections.deque = collections.deque()
        try:
            for job in jobs:
                ahead.append(pool.submit(job))
                if len(ahead) >= 2 * workers:
                    yield ahead.popleft().result()
        except Exception:
            while ahead:
                yield ahead.popleft().result()
            raise
        while ahead:
            yield ahead.popleft().result()


@dataclass
class PipelinedRun:
    """What a run did: per step and per frame, the interval between finished ones (the rate a viewer sees),
    and each stage's work per frame; the waits of the calling thread for its input and for the writer."""
    step_seconds: list[float] = field(default_factory=list)  # step n's end - step n-1's (the first: from start)
    frame_seconds: list[float] = field(default_factory=list)  # per frame, its step's interval / the step's frames
    work: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in STAGES})
    wait_input: float = 0.0   # seconds the step waited for the reader (input-bound)
    wait_output: float = 0.0  # seconds it waited for room in the writer's queue (output-bound)
    psnrs: list[float] = field(default_factory=list)
    gpu_ms: list[float] = field(default_factory=list)  # per frame, the frame graph's own time (GPU events), on a GPU
    write_error: BaseException | None = field(default=None, repr=False)  # the writer's failure, raised at the end

    @property
    def frames(self) -> int:
        return len(self.frame_seconds)

    @property
    def frames_per_step(self) -> int:
        return self.frames // len(self.step_seconds) if self.step_seconds else 1

    def stage_ms(self) -> dict[str, float | None]:
        """Each stage's mean work per frame in ms (None: the stage did not run); a step's input is read
        once for its frames, so the read's share of each is its n-th."""
        share = {"read": self.frames_per_step}
        return {name: 1e3 * float(np.mean(v)) / share.get(name, 1) if v else None for name, v in self.work.items()}

    def bound(self) -> str:
        """The stage that limits the frame rate: the one with the most work per frame (the stages overlap,
        so the slowest sets the pace)."""
        means = {name: ms for name, ms in self.stage_ms().items() if ms is not None}
        return max(means, key=means.get)

    def report(self) -> dict:
        steady = self.step_seconds[1:] or self.step_seconds  # the first step's frames wait for it: setup, not rate
        wall = float(np.mean(steady)) * 1e3 / self.frames_per_step if steady else None
        return {"stage_ms": self.stage_ms(), "bound": self.bound() if self.frames else None, "wall_ms": wall,
                "wait_input_ms": 1e3 * self.wait_input / max(self.frames, 1),
                "wait_output_ms": 1e3 * self.wait_output / max(self.frames, 1),
                "gpu_frame_ms": float(np.median(self.gpu_ms)) if self.gpu_ms else None}

    def rows(self) -> list[tuple[str, str]]:
        r = self.report()
        ms = {name: "-" if v is None else f"{v:.2f}" for name, v in r["stage_ms"].items()}
        rows = [("model: frame step", f"{ms['step']} ms/frame (submit + collect, host view)")]
        if r["gpu_frame_ms"] is not None:
            rows.append(("model: frame graph on GPU", f"{r['gpu_frame_ms']:.2f} ms/frame (median, CUDA events)"))
        rows += [("pipeline: read / write / PSNR", f"{ms['read']} / {ms['write']} / {ms['psnr']} ms/frame "
                                                   f"(overlapped, own threads)"),
                 ("pipeline: step waited for", f"input {r['wait_input_ms']:.2f}, writer {r['wait_output_ms']:.2f} "
                                               f"ms/frame"),
                 ("bound", f"{r['bound']} (the stage with the most work per frame)")]
        return rows


class _End:
    """The end of a queue's frames; `error`, if set, is why they ended (raised by the consumer)."""

    def __init__(self, error: BaseException | None = None):
        self.error = error


def run_pipelined(pipe, inputs: Iterable[tuple[np.ndarray | None, np.ndarray | None]],
                  write: Callable[[np.ndarray], None], stop: Callable[[], bool] = lambda: False,
                  on_frame: Callable[[float], None] = lambda s: None) -> PipelinedRun:
    """Run `pipe` (reset, ready) over `inputs`, a step's (model input or None, ground truth or None) pairs,
    the truth (H, W, 3), or (n, H, W, 3) for a step of n frames; writes each frame with `write` in a writer
    thread, in order; returns the run's timings once every frame made is written. `on_frame(seconds per
    frame)` is called in this thread for each frame of a step as the step is collected."""
    run = PipelinedRun()
    halt = threading.Event()  # the calling thread is done: the reader stops reading
    ready: queue.Queue = queue.Queue(QUEUE_FRAMES)
    done: queue.Queue = queue.Queue(QUEUE_FRAMES)
    reader = threading.Thread(target=_read, args=(iter(inputs), ready, halt, run.work["read"]),
                              name="mirage-read", daemon=True)
    writer = threading.Thread(target=_write, args=(done, write, run), name="mirage-write", daemon=True)
    reader.start()
    writer.start()
    flight: list[tuple[object, float]] = []  # per step in flight, oldest first: its ground truth, its submit's time
    last = time.perf_counter()

    def finish_one() -> None:
        nonlocal last
        start = time.perf_counter()
        frames = _frames(pipe.collect())
        now = time.perf_counter()
        truth, submit_s = flight.pop(0)
        n = len(frames)
        run.work["step"] += [(submit_s + now - start) / n] * n
        run.step_seconds.append(now - last)
        run.frame_seconds += [(now - last) / n] * n
        last = now
        run.wait_output += _put(done, (frames, None if truth is None else _frames(truth)), lambda: False)
        for _ in range(n):
            on_frame(run.frame_seconds[-1])

    error = None
    try:
        while not stop() and run.write_error is None:
            item, waited = _get(ready, stop)
            run.wait_input += waited
            if item is None or isinstance(item, _End):
                error = getattr(item, "error", None)
                break
            cond, truth = item
            start = time.perf_counter()
            pipe.submit(cond)
            flight.append((truth, time.perf_counter() - start))
            if len(flight) == pipe.depth:
                finish_one()
        while flight:  # the frames in flight are made and kept, after a stop or the input's end
            finish_one()
    finally:
        halt.set()
        done.put(_End())
        writer.join()
        reader.join()
    steps = len(run.step_seconds)
    run.gpu_ms = [t["compute_ms"] / run.frames_per_step for t in pipe.timeline[-steps:]] if steps else []
    for failure in (run.write_error, error):
        if failure is not None:
            raise failure
    return run


def _read(items: Iterator, ready: queue.Queue, halt: threading.Event, seconds: list[float]) -> None:
    try:
        _read_until(items, ready, halt, seconds)
    finally:
        close = getattr(items, "close", None)  # a generator's threads and files end with the run
        if close is not None:
            close()


def _read_until(items: Iterator, ready: queue.Queue, halt: threading.Event, seconds: list[float]) -> None:
    while not halt.is_set():
        start = time.perf_counter()
        try:
            item = next(items, None)
        except Exception as e:  # noqa: BLE001 (a broken input: the calling thread raises it after the frames made)
            _put(ready, _End(e), halt.is_set)
            return
        if item is None:
            _put(ready, _End(), halt.is_set)
            return
        seconds.append(time.perf_counter() - start)
        _put(ready, item, halt.is_set)


def _write(done: queue.Queue, write: Callable[[np.ndarray], None], run: PipelinedRun) -> None:
    while True:
        item = done.get()
        if isinstance(item, _End):
            return
        if run.write_error is not None:
            continue  # drain: the calling thread must never block on a full queue
        frames, truths = item
        try:
            for k, frame in enumerate(frames):
                start = time.perf_counter()
                write(frame)
                written = time.perf_counter()
                run.work["write"].append(written - start)
                if truths is not None:
                    truth = to_float(truths[k]) if truths.dtype == np.uint8 else truths[k]
                    run.psnrs.append(float(psnr(to_float(frame), truth)))
                    run.work["psnr"].append(time.perf_counter() - written)
        except Exception as e:  # noqa: BLE001 (a full disk, a dead encoder: raised in the calling thread)
            run.write_error = e


def _frames(step: np.ndarray) -> np.ndarray:
    """A step's frames, (n, H, W, 3): collect gives one frame as (H, W, 3), a block of n > 1 as (n, H, W, 3)."""
    return step.reshape(-1, *step.shape[-3:])


def _get(q: queue.Queue, stop: Callable[[], bool]) -> tuple[object, float]:
    """The next item (None if stop() turned true first) and the seconds waited for it."""
    start = time.perf_counter()
    while True:
        try:
            return q.get(timeout=POLL_S), time.perf_counter() - start
        except queue.Empty:
            if stop():
                return None, time.perf_counter() - start


def _put(q: queue.Queue, item, give_up: Callable[[], bool]) -> float:
    """Put `item` (dropped if give_up() turns true first); the seconds waited for room."""
    start = time.perf_counter()
    while True:
        try:
            q.put(item, timeout=POLL_S)
            return time.perf_counter() - start
        except queue.Full:
            if give_up():
                return time.perf_counter() - start
