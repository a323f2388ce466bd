"""The runtime's loop, ring buffer, noise and lifecycle on the CPU (the GPU half is tests/gpu)."""
import contextlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CKPT_GEN, CKPT_V2V
from mirage.core.config import PipelineOptions
from mirage.core.errors import BackendError
from mirage.core.loop import NumpyOps, Schedule, normal
from mirage.core.ort import OrtBackend
from mirage.model.unet import AttentionImpl
from mirage.core.schedule import ALPHAS_CUMPROD, ddim_coefficients
from mirage.core.synthetic import SyntheticVideo
from mirage.model.diffusion import ddim_update
from mirage.model.torch_ops import TorchOps, normal_rows
from mirage.bridge.pipeline import from_model, load_pipeline
from mirage.runtime import Pipeline, PipelineError
from mirage.train.checkpoint import load_checkpoint
from mirage.train.data import v2v_input
from mirage.train.rollout import rollout


# Run in a fresh interpreter where `import torch` (and so any torch.*) raises ImportError.
TORCH_BLOCKED = "import sys; sys.modules['torch'] = None\n"


def test_the_deployment_side_imports_without_torch():
    """Every module of mirage.runtime and mirage.engine (found by walking the packages, so a new module
    is covered without editing this test), and the CLI path that runs artifacts, import with torch
    unimportable."""
    code = TORCH_BLOCKED + """
import importlib, pkgutil
import mirage.engine, mirage.runtime
names = sorted(m.name for package in (mirage.runtime, mirage.engine)
               for m in pkgutil.walk_packages(package.__path__, package.__name__ + "."))
for name in names + ["mirage.bridge.pipeline", "mirage.cli.run", "mirage.cli.serve"]:
    importlib.import_module(name)
print(" ".join(names))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    found = set(out.stdout.split())
    assert {"mirage.runtime.pipeline", "mirage.runtime.execution", "mirage.runtime.gpu", "mirage.runtime.server",
            "mirage.runtime.tensorrt", "mirage.engine.engine", "mirage.engine.build", "mirage.engine.verify"} <= found


def test_the_runtime_alone_refuses_a_checkpoint_and_names_the_torch_side():
    """Pipeline.load runs artifacts; a checkpoint needs the opener that mirage.bridge passes."""
    with pytest.raises(PipelineError, match="is a checkpoint: .*load_pipeline"):
        Pipeline.load(CKPT_GEN, device="cpu")


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_folded_ddim_update_matches_reference(steps):
    sched = Schedule.make(ddim_coefficients(steps), ALPHAS_CUMPROD[100], 100)
    g = torch.Generator().manual_seed(steps)
    for i, row in enumerate(torch.tensor(ddim_coefficients(steps), dtype=torch.float64)):
        x, v = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 3, 8, 8, generator=g)
        assert torch.allclose(sched.p[i] * x + sched.q[i] * v, ddim_update(x, v, row), atol=1e-6)


def test_schedule_rejects_stochastic_ddim():
    with pytest.raises(ValueError, match="eta"):
        Schedule.make(ddim_coefficients(4, eta=1.0), 0.9, 100)


def _ring_reference(k: int, frames: int) -> tuple[list[int], list[list[int]]]:
    """Slot written and ages after each frame, by hand: frame n goes to slot n mod K, the slot
    written n' frames ago has age n - n' + 1, a never-written slot age 0."""
    slots, ages = [], []
    for n in range(frames):
        slots.append(n % k)
        last = {s: m for m, s in enumerate(slots)}
        ages.append([n - last[s] + 1 if s in last else 0 for s in range(k)])
    return slots, ages


def _ops(name: str):
    """(ops, zeros(shape, dtype), torch tensor -> that library's array) for numpy or torch."""
    if name == "numpy":
        return NumpyOps(), (lambda shape, dt: np.zeros(shape, dt)), (lambda x: x.numpy())
    return TorchOps("cpu"), (lambda shape, dt: torch.zeros(shape, dtype=getattr(torch, dt))), (lambda x: x)


@pytest.mark.parametrize("ops_name", ["numpy", "torch"])
def test_ring_write_ops_match_reference(ops_name):
    """Rows advance independently: row 1 starts two frames later than row 0."""
    b, k, n, d = 2, 3, 5, 4
    ops, zeros, to = _ops(ops_name)
    mem, ages, slot = zeros((b, k, 2, n, d), "float32"), zeros((b, k), "int32"), zeros((b,), "int64")
    advance = zeros((b,), "int64")
    advance[:] = 1
    slot[1] = k - 1  # row 1's write position differs from row 0's
    kvs = []
    for frame in range(2 * k + 1):  # wraps around twice
        kv = torch.randn(b, 2, n, d)
        kvs.append(kv)
        ops.ring_write_(mem, ages, slot, to(kv), advance)
    ref_slots, ref_ages = _ring_reference(k, 2 * k + 1)
    assert np.array_equal(np.asarray(ages)[0], ref_ages[-1])
    assert int(slot[0]) == (2 * k + 1) % k and int(slot[1]) == (k - 1 + 2 * k + 1) % k
    for s in range(k):  # each slot holds the last kv written to it, per row
        last0 = max(m for m, x in enumerate(ref_slots) if x == s)
        assert np.allclose(np.asarray(mem)[0, s], kvs[last0][0].numpy())
        last1 = max(m for m in range(2 * k + 1) if (k - 1 + m) % k == s)
        assert np.allclose(np.asarray(mem)[1, s], kvs[last1][1].numpy())


@pytest.mark.parametrize("ops_name", ["numpy", "torch"])
def test_a_held_row_commits_nothing(ops_name):
    """advance = 0: the row's memory, ages, slot and noise counter stay as they were."""
    b, k, n, d = 2, 3, 2, 2
    ops, zeros, to = _ops(ops_name)
    mem, ages, slot, rng = zeros((b, k, 2, n, d), "float32"), zeros((b, k), "int32"), zeros((b,), "int64"), \
        zeros((b, 2), "int64")
    advance, noise = zeros((b,), "int64"), zeros((b, 5), "float32")
    advance[0] = 1
    for _ in range(2):
        ops.ring_write_(mem, ages, slot, to(torch.ones(b, 2, n, d)), advance)
        ops.randn_(noise, rng, advance)
    assert np.asarray(ages).tolist() == [[2, 1, 0], [0, 0, 0]]
    assert np.asarray(slot).tolist() == [2, 0] and np.asarray(rng)[:, 1].tolist() == [2, 0]
    assert np.asarray(mem)[1].sum() == 0


def test_noise_is_the_same_on_numpy_and_torch_and_per_row():
    rng = torch.tensor([[7, 0], [7, 3], [8, 0]])
    rows = normal_rows(rng, 4096).numpy()
    for (seed, count), row in zip(rng.tolist(), rows):
        assert np.abs(normal(seed, count, 4096) - row).max() < 1e-5
    assert abs(rows[0].mean()) < 0.05 and abs(rows[0].std() - 1) < 0.05  # standard normal
    assert not np.allclose(rows[0], rows[1]) and not np.allclose(rows[0], rows[2])  # counter and seed both matter


def test_pipeline_matches_reference_rollout():
    model, _ = load_checkpoint(CKPT_GEN)
    ref = [f[0].permute(1, 2, 0).numpy() for f in rollout(model, 5, seed=3)]
    with load_pipeline(CKPT_GEN, device="cpu") as pipe:
        pipe.reset(3)
        out = [pipe.step() for _ in range(5)]
        pipe.reset(3)  # a reset starts the same video again
        again = [pipe.step() for _ in range(5)]
    for a, b, c in zip(ref, out, again):
        assert a.shape == b.shape == (32, 32, 3) and b.dtype == np.float32
        assert np.abs(a - b).max() < 1e-5
        assert np.array_equal(b, c)


def test_pipeline_video_to_video_stream_matches_rollout():
    model, _ = load_checkpoint(CKPT_V2V)
    clip = torch.from_numpy(SyntheticVideo(32, seed=5).clip(0, 4)).permute(0, 3, 1, 2)
    cond = [v2v_input(f) for f in clip]
    ref = [f[0].permute(1, 2, 0).numpy() for f in rollout(model, 4, seed=1, cond=[c[None] for c in cond])]
    with load_pipeline(CKPT_V2V, device="cpu") as pipe:
        pipe.reset(1)
        out = list(pipe.stream(c.permute(1, 2, 0).numpy() for c in cond))
    assert len(out) == 4
    assert max(np.abs(a - b).max() for a, b in zip(ref, out)) < 1e-5


def test_lifecycle_errors(tmp_path):
    pipe = load_pipeline(CKPT_GEN, device="cpu")
    with pytest.raises(PipelineError, match="reset"):
        pipe.step()
    pipe.reset(0)
    with pytest.raises(PipelineError, match="takes no input"):
        pipe.step(np.zeros((32, 32, 3), np.float32))
    pipe.close()
    with pytest.raises(PipelineError, match="closed"):
        pipe.step()
    with pytest.raises(PipelineError, match="closed"):
        pipe.reset(0)
    pipe.close()  # closing twice is harmless
    with pytest.raises(PipelineError, match="neither an artifact"):
        load_pipeline(tmp_path)
    with pytest.raises(PipelineError, match="backend"):
        load_pipeline(CKPT_GEN, backend="nope")
    with pytest.raises(PipelineError, match="only the torch backend"):
        load_pipeline(CKPT_GEN, backend="onnxruntime")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    with pytest.raises(BackendError, match="broken.onnx: ONNX Runtime cannot load this graph"):
        OrtBackend({"denoise": broken})


def test_video_to_video_input_errors():
    with load_pipeline(CKPT_V2V, device="cpu") as pipe:
        pipe.reset(0)
        with pytest.raises(PipelineError, match="needs an input frame"):
            pipe.step()
        with pytest.raises(PipelineError, match=r"shape \(64, 64, 3\).*fit_frame"):
            pipe.step(np.zeros((64, 64, 3), np.float32))


def test_mirage_run_cli(tmp_path):
    import json

    from click.testing import CliRunner

    from mirage.cli.run import main

    runner = CliRunner()
    report = tmp_path / "r.json"
    r = runner.invoke(main, ["--frames", "3", "--output", str(tmp_path / "out.gif"), "--json", str(report)])
    assert r.exit_code == 0, r.output
    data = json.loads(report.read_text())
    assert data["frames"] == 3 and data["written"] == 3 and data["median_ms"] > 0 and data["backend"] == "torch"
    r = runner.invoke(main, [str(CKPT_V2V), "--frames", "4", "--output", str(tmp_path / "frames")])
    assert r.exit_code == 0 and "PSNR vs. ground truth" in r.output
    assert len(list((tmp_path / "frames").glob("*.png"))) == 4
    r = runner.invoke(main, [str(CKPT_V2V), "--input", str(tmp_path / "missing.mp4")])
    assert r.exit_code == 2 and "no such file" in r.output and "frames:" not in r.output  # before any setup
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    r = runner.invoke(main, [str(CKPT_V2V), "--input", str(tmp_path / "broken.mp4"), "--output", str(tmp_path / "b.gif")])
    assert r.exit_code == 2 and "broken.mp4" in r.output
    r = runner.invoke(main, [str(CKPT_GEN), "--input", "synthetic"])
    assert r.exit_code == 2 and "takes no --input" in r.output


def test_cuda_call_names_the_failing_call():
    """Every cuda-python call goes through one status check whose error names the call."""
    rt = pytest.importorskip("cuda.bindings.runtime")
    from mirage.runtime.cuda import CudaError, call

    def cudaFakeAlloc(size):  # noqa: N802 (named like the CUDA call it stands in for)
        return rt.cudaError_t.cudaErrorMemoryAllocation, None

    with pytest.raises(CudaError, match=r"cudaFakeAlloc failed: cudaErrorMemoryAllocation"):
        call(cudaFakeAlloc, 1 << 40)
    assert call(lambda: (rt.cudaError_t.cudaSuccess, 7)) == 7


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_cuda_path_without_gpu_is_a_clear_error():
    pytest.importorskip("cuda.bindings")
    from mirage.runtime.cuda import CudaError
    from mirage.runtime.gpu import CudaGpu

    with pytest.raises(CudaError, match="cudaGetDeviceCount failed|no CUDA device 0"):
        CudaGpu("cuda:0")


def test_cuda_python_events_and_graphs_take_torchs_method_names(monkeypatch):
    """GpuExecution calls events and graphs directly, with torch.cuda.Event's and CUDAGraph's names;
    the cuda-python ones must pass their handles to the right CUDA calls in the right order."""
    from types import SimpleNamespace

    import mirage.runtime.cuda as cuda

    calls = []

    def fake(name, value=None):
        def cuda_call(*args):
            calls.append((name, *args))
            return (0,) if value is None else (0, value)  # status 0: success
        return cuda_call

    rt = SimpleNamespace(cudaEventRecord=fake("record"), cudaStreamWaitEvent=fake("wait"),
                         cudaEventSynchronize=fake("sync"), cudaEventElapsedTime=fake("elapsed", 2.5),
                         cudaGraphLaunch=fake("launch"))
    monkeypatch.setattr(cuda, "_import", lambda: (None, None, rt))
    start, end = cuda.Event("e1"), cuda.Event("e2")
    start.record("copy")
    start.wait("compute")
    end.synchronize()
    assert start.elapsed_time(end) == 2.5
    cuda.Graph("graph", "exec", "compute").replay()  # on the stream it was captured on
    assert calls == [("record", "e1", "copy"), ("wait", "compute", "e1", 0), ("sync", "e2"),
                     ("elapsed", "e1", "e2"), ("launch", "exec", "compute")]


def test_cuda_python_compute_work_makes_the_device_current_in_the_calling_thread():
    """Issue 16: the loop kernels are driver-API launches, which need a current context, and a fresh
    thread has none; the server's step thread may launch (an attach's row reset) before any runtime
    call. on_compute() must set the pipeline's device in the thread that enters it, before its body."""
    import threading
    from types import SimpleNamespace

    from mirage.runtime.cuda import Device
    from mirage.runtime.gpu import CudaGpu

    calls = []  # (thread, device) per cudaSetDevice
    set_device = lambda index: calls.append((threading.get_ident(), index)) or (0,)  # noqa: E731 (status 0: success)
    gpu = object.__new__(CudaGpu)  # no GPU here: only the device object the context manager uses
    gpu.dev = object.__new__(Device)
    gpu.dev.rt, gpu.dev.index = SimpleNamespace(cudaSetDevice=set_device), 1
    seen = {}

    def step_thread():
        with gpu.on_compute():
            seen["calls"], seen["thread"] = list(calls), threading.get_ident()

    thread = threading.Thread(target=step_thread)
    thread.start()
    thread.join()
    assert seen["calls"] == [(seen["thread"], 1)]


def test_fused_kernel_option_errors(tmp_path):
    """The fused-kernel option is CUDA-only and names a missing library; the op route itself
    (stock implementation off CUDA) gives the same frames as the module route."""
    from mirage.plugins_cpp import kernels

    model, _ = load_checkpoint(CKPT_GEN)
    with pytest.raises(BackendError, match="runs on CUDA devices"):
        from_model(model, "cpu", PipelineOptions(kernel_library=str(tmp_path / "lib.so")))
    with pytest.raises(kernels.KernelError, match="no kernel library"):
        kernels.load(tmp_path / "missing.so")
    outs = []
    for temporal in ("torch", "op"):
        with from_model(model.with_attention(AttentionImpl(temporal=temporal)), "cpu") as pipe:
            pipe.reset(0)
            outs.append(np.stack([pipe.step() for _ in range(3)]))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_precomputed_time_shifts_give_the_same_frames():
    """PipelineOptions.precompute_time: the per-step constants computed once, same video."""
    model, _ = load_checkpoint(CKPT_V2V)
    inputs = [v2v_input(f).permute(1, 2, 0).numpy() for f in
              torch.from_numpy(SyntheticVideo(32, seed=2).clip(0, 3)).permute(0, 3, 1, 2)]
    outs = []
    for precompute in (False, True):
        with from_model(model, "cpu", PipelineOptions(precompute_time=precompute)) as pipe:
            pipe.reset(1)
            outs.append(np.stack([pipe.step(x) for x in inputs]))
            if precompute:
                assert len(pipe.backend._shifts) == 4  # one table entry per DDIM step buffer
    assert np.abs(outs[0] - outs[1]).max() < 1e-5


def test_any_int_is_a_seed_on_every_ops():
    """Seeds beyond int64 (or negative) are stored by their 64 bits, the same on numpy and torch."""
    from types import SimpleNamespace

    for seed in (-3, 2 ** 63 + 7, 2 ** 70):
        rows = []
        for ops, zeros in ((NumpyOps(), lambda s, d: np.zeros(s, d)),
                           (TorchOps("cpu"), lambda s, d: torch.zeros(s, dtype=getattr(torch, d)))):
            buf = SimpleNamespace(memory=zeros((1, 2), "float32"), ages=zeros((1, 2), "int32"),
                                  slot=zeros((1,), "int64"), rng=zeros((1, 2), "int64"))
            ops.reset_row_(buf, 0, seed)
            noise = zeros((1, 64), "float32")
            ops.randn_(noise, buf.rng, zeros((1,), "int64"))
            rows.append(np.asarray(noise))
        assert np.abs(rows[0] - rows[1]).max() < 1e-5
        assert np.abs(rows[0][0] - normal(seed, 0, 64)).max() < 1e-5


class _StandInGpu:
    """GpuExecution's GPU as CPU tensors, for what a CPU can check: host waits are refused, and each
    row reset (TorchOps') notes whether it ran inside on_compute() (on a GPU: on the compute stream)."""

    def __init__(self):
        self.compute, self.ops, self.on_stream, self.resets = "compute", self, False, []

    @contextlib.contextmanager
    def on_compute(self):
        self.on_stream = True
        yield
        self.on_stream = False

    def synchronize(self):
        raise AssertionError("a host wait: the steps in flight would drain")

    def reset_row_(self, buf, row, seed):
        self.resets.append((row, self.on_stream))
        TorchOps("cpu").reset_row_(buf, row, seed)

    def zeros(self, shape, dtype):
        return torch.zeros(shape, dtype=getattr(torch, dtype))

    def fill_(self, buf, value):
        buf.fill_(value)

    def pinned(self, like):
        return np.zeros(tuple(like.shape), np.float32)

    def event(self):
        return object()

    def warm_up(self, body, for_capture):
        pass  # nothing runs on the stand-in


def test_a_gpu_row_reset_is_enqueued_on_the_compute_stream_without_a_wait():
    """Issue 16: a synchronize in reset_rows drained both steps in flight on every attach."""
    from types import SimpleNamespace

    from mirage.core import graphs as G
    from mirage.core.loop import FrameUnit
    from mirage.runtime.execution import GpuExecution

    cfg = SimpleNamespace(channels=3, image_size=8, cond_channels=0, context_frames=2, memory_tokens=4,
                          temporal_dim=4, frame_size=0, pixels=8)
    backend = SimpleNamespace(array="torch", device="cuda:0", use_stream=lambda stream: None)
    unit, gpu = FrameUnit(cfg, G.unet_graphs(cfg, 2, None, "fp32"), 2, 100), _StandInGpu()  # a stand-in U-Net config
    ex = GpuExecution(backend, unit, cuda_graph=False, frames="float32", gpu=gpu)
    buf = unit.make_buffers(ex.alloc, ex.ops.fill_, lambda graph, name: "int32" if name == G.AGES else "float32")
    ex.prepare(buf)
    for b in (buf.memory, buf.ages, buf.slot, buf.rng):
        b.fill_(5)
    ex.reset_rows([1], [9])
    assert gpu.resets == [(1, True)]
    assert not buf.memory[1].any() and not buf.ages[1].any() and buf.slot[1] == 0
    assert buf.rng[1].tolist() == [9, 0]
    assert (buf.memory[0] == 5).all() and (buf.ages[0] == 5).all() and buf.slot[0] == 5  # the other row: as it was
    assert buf.rng[0].tolist() == [5, 5]
