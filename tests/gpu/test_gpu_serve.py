"""mirage-serve on the GPU. The server opens the StreamPool (allocating and capturing its graphs) in
the main thread but steps, attaches and detaches it from its step thread, a worker thread whose
current CUDA device and stream are the defaults: stepping from there must give the frames that
stepping from the main thread gives, on cuda:0 and (two GPUs) on cuda:1; so must two steps in flight
driven from one worker thread (collecting from a second thread gave wrong frames on an H100,
2026-11-25). A stream attached while two steps are in flight (issue 16: the reset is stream-ordered,
not a synchronize): the steps in flight keep the old stream, the new one starts fresh, the other
is untouched, on the torch and the cuda-python backends. Then four clients through the real server
on 127.0.0.1."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from mirage.bridge.pipeline import load_pipeline
from mirage.runtime.pool import StreamPool

pytestmark = pytest.mark.gpu

CKPT_V2V = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-v2v"
FRAMES = 5


def _inputs(seed: int) -> list[np.ndarray]:
    return [np.random.default_rng(seed * 100 + n).uniform(-1, 1, (32, 32, 3)).astype(np.float32)
            for n in range(FRAMES)]


def _run(pool: StreamPool, call) -> np.ndarray:
    """Two streams (seeds 1, 2) for FRAMES frames; `call(fn, *args)` runs each pool call somewhere."""
    a, b = call(pool.attach, 1), call(pool.attach, 2)
    ins_a, ins_b = _inputs(1), _inputs(2)
    out = [call(pool.step, {a: ins_a[n], b: ins_b[n]}) for n in range(FRAMES)]
    call(pool.detach, a)
    call(pool.detach, b)
    return np.stack([[o[a], o[b]] for o in out])  # (FRAMES, 2, 1, 32, 32, 3): one frame a step


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_stepping_from_a_worker_thread_gives_the_main_threads_frames(device):
    if int(device[-1]) >= torch.cuda.device_count():
        pytest.skip(f"{device}: this machine has {torch.cuda.device_count()} GPU(s)")
    with StreamPool.open(CKPT_V2V, slots=2, device=device, load=load_pipeline) as pool:
        main = _run(pool, lambda fn, *args: fn(*args))
    with StreamPool.open(CKPT_V2V, slots=2, device=device, load=load_pipeline) as pool, ThreadPoolExecutor(1) as thread:
        worker = _run(pool, lambda fn, *args: thread.submit(fn, *args).result())
    assert np.abs(main[:, 0] - main[:, 1]).max() > 1e-2  # two streams that differ: the check can fail
    np.testing.assert_array_equal(worker, main)


def _run_pipelined(pool: StreamPool) -> np.ndarray:
    """_run's frames with two steps in flight: step n+1 submitted before step n is collected."""
    a, b = pool.attach(1), pool.attach(2)
    ins_a, ins_b = _inputs(1), _inputs(2)
    assert pool.depth == 2
    out, pending = [], 0
    for n in range(FRAMES):
        pool.submit({a: ins_a[n], b: ins_b[n]})
        pending += 1
        if pending == pool.depth:
            out.append(pool.collect())
            pending -= 1
    out += [pool.collect() for _ in range(pending)]
    return np.stack([[o[a], o[b]] for o in out])  # (FRAMES, 2, 1, 32, 32, 3): one frame a step


@pytest.mark.parametrize("device", ["cuda:0", "cuda:1"])
def test_two_steps_in_flight_in_a_worker_thread_give_the_same_frames(device):
    """Every pool call in one worker thread, as the server makes them (a collect from a second
    thread gave wrong frames on an H100, 2026-11-25)."""
    if int(device[-1]) >= torch.cuda.device_count():
        pytest.skip(f"{device}: this machine has {torch.cuda.device_count()} GPU(s)")
    with StreamPool.open(CKPT_V2V, slots=2, device=device, load=load_pipeline) as pool:
        main = _run(pool, lambda fn, *args: fn(*args))
    with StreamPool.open(CKPT_V2V, slots=2, device=device, load=load_pipeline) as pool, ThreadPoolExecutor(1) as worker:
        pipelined = worker.submit(_run_pipelined, pool).result()
    np.testing.assert_array_equal(pipelined, main)


# -- a stream attached while two steps are in flight (issue 16) ----------------------------------

STEPS, CHURN, NEW_SEED = 8, 3, 9  # steps in all; the stream in slot b is replaced after submitting CHURN, CHURN + 1


def _stream_input(seed: int, m: int, shape) -> np.ndarray:
    """Frame m of a stream's input, counted from when it attached."""
    return np.random.default_rng(seed * 100 + m).uniform(-1, 1, shape).astype(np.float32)


def _torch_stream(gpu) -> torch.cuda.Stream:
    """The pipeline's compute stream as a torch stream (CudaGpu's is a cuda-python handle)."""
    return gpu.compute if isinstance(gpu.compute, torch.cuda.Stream) else torch.cuda.ExternalStream(int(gpu.compute))


def _drive(pool: StreamPool, seeds: tuple[int, int], churn: bool = False) -> np.ndarray:
    """STEPS steps of two streams (slots a, b) with two in flight, as the server's step thread makes
    them. With `churn`, a sleep kernel is queued on the compute stream ahead of step CHURN, and right
    after submitting step CHURN + 1 slot b's stream is detached and one of NEW_SEED attached in its
    slot: the two steps are then still queued on the GPU, and the reset must not wait for them.
    Returns (STEPS, 2, 1, H, W, 3): per step, the outputs of slots a and b."""
    a, b = pool.attach(seeds[0]), pool.attach(seeds[1])
    streams = {a: (seeds[0], 0), b: (seeds[1], 0)}  # slot -> (seed, step it attached at)
    compute = _torch_stream(pool.pipeline.execution.gpu)
    out, pending = [], 0
    for n in range(STEPS):
        if churn and n == CHURN:
            with torch.cuda.stream(compute):
                torch.cuda._sleep(1 << 31)  # ~1 s at 2 GHz: the next two steps wait behind it
        pool.submit({s: _stream_input(seed, n - start, pool.frame_shape) for s, (seed, start) in streams.items()})
        pending += 1
        if churn and n == CHURN + 1:
            pool.detach(b)
            assert pool.attach(NEW_SEED) == b
            assert not compute.query(), "attaching waited for the steps in flight"
            streams[b] = (NEW_SEED, n + 1)
        if pending == pool.depth:
            out.append(pool.collect())
            pending -= 1
    out += [pool.collect() for _ in range(pending)]
    pool.detach(a)
    pool.detach(b)
    return np.stack([[o[a], o[b]] for o in out])  # (STEPS, 2, 1, H, W, 3): one frame a step


def _check_attach_in_flight(pool: StreamPool, worker: ThreadPoolExecutor) -> None:
    run = lambda *args: worker.submit(_drive, pool, *args).result()  # noqa: E731
    plain, churned, fresh = run((1, 2)), run((1, 2), True), run((1, NEW_SEED))
    after = CHURN + 2  # the first step submitted after the attach
    # the steps in flight were launched before the reset: the old stream's frames, in both slots
    np.testing.assert_array_equal(churned[:after], plain[:after])
    # the new stream's frames are a fresh stream's of its seed and inputs (which differ from the old one's)
    assert np.abs(fresh[:STEPS - after, 1] - plain[after:, 1]).max() > 1e-2
    np.testing.assert_array_equal(churned[after:, 1], fresh[:STEPS - after, 1])
    np.testing.assert_array_equal(churned[:, 0], plain[:, 0])  # the other stream never noticed


@pytest.mark.parametrize("built_on", ["default stream", "side stream"])
def test_attaching_while_two_steps_are_in_flight_torch(built_on):
    """The torch backend, its pool built with the main thread's default stream current or a side
    stream (then the step thread's current stream is not the compute stream: the reset and the
    replays must go on the compute stream all the same)."""
    stream = torch.cuda.Stream() if built_on == "side stream" else torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        pool = StreamPool.open(CKPT_V2V, slots=2, device="cuda", load=load_pipeline)
    with pool, ThreadPoolExecutor(1) as worker:
        assert pool.pipeline.graphs, "the frame graphs were not captured"
        _check_attach_in_flight(pool, worker)


def test_attaching_while_two_steps_are_in_flight_cuda_python():
    """The cuda-python backend (what TensorRT engines run on), with test_gpu_cuda_runtime's stand-in
    engine at batch 2."""
    pytest.importorskip("cuda.bindings", reason="the torch-free GPU path needs cuda-python (pip install -e .[cuda])")
    from cuda.bindings import driver

    from mirage.runtime import cuda

    from .test_gpu_cuda_runtime import _pipeline

    # The worker's first CUDA work is _drive's attach, whose row reset launches kernels (driver API):
    # they need a current context, which a fresh thread lacks and CudaGpu.on_compute() must set.
    with StreamPool(_pipeline(cuda, graph=True, v2v=True, batch=2)) as pool, ThreadPoolExecutor(1) as worker:
        assert pool.pipeline.graphs, "the frame graphs were not captured"
        assert not int(worker.submit(cuda.call, driver.cuCtxGetCurrent).result()), "the worker has a context"
        _check_attach_in_flight(pool, worker)


def test_four_clients_through_the_server():
    pytest.importorskip("aiohttp")
    from aiohttp.test_utils import TestClient, TestServer

    from mirage.runtime.server import HEADER, RAW, ServerOptions, make_app

    async def lockstep(ws, frames):
        out = []
        for n, rgb in enumerate(frames):
            await ws.send_bytes(HEADER.pack(n, RAW, float(n)) + rgb.tobytes())
            while True:
                msg = await ws.receive()
                if isinstance(msg.data, bytes):
                    break
                assert '"error"' not in msg.data, msg.data
            assert HEADER.unpack_from(msg.data)[0] == n
            out.append(np.frombuffer(msg.data[HEADER.size:], np.uint8).reshape(32, 32, 3))
        return np.stack(out)

    async def scenario(pool):
        app = make_app(pool, ServerOptions(batch_wait_ms=3000, deadline_ms=5000))
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            sockets = [await client.ws_connect("/ws", params={"seed": str(s)}) for s in (7, 7, 8, 9)]
            for ws in sockets:
                assert (await ws.receive_json())["type"] == "hello"
            frames = [np.random.default_rng(s).integers(0, 256, (FRAMES, 32, 32, 3), dtype=np.uint8)
                      for s in (3, 3, 4, 5)]
            outs = await asyncio.gather(*(lockstep(ws, f) for ws, f in zip(sockets, frames)))
            for ws in sockets:
                await ws.close()
            return outs

    with StreamPool.open(CKPT_V2V, slots=4, device="cuda", load=load_pipeline) as pool:
        twin_a, twin_b, other, _ = asyncio.run(asyncio.wait_for(scenario(pool), 60))
    # same seed and inputs in two rows of one batch: equal up to fp16 rounding (a level or two of uint8)
    assert np.abs(twin_a.astype(int) - twin_b).max() <= 2
    assert np.abs(twin_a.astype(int) - other).max() > 10
