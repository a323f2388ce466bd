"""The runtime's loop, ring buffer and lifecycle on the CPU (the GPU half runs in scripts/bench_runtime.py)."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CKPT_GEN, CKPT_V2V
from mirage.runtime import Pipeline, PipelineError
from mirage.runtime.backends import BackendError, OrtBackend
from mirage.core.loop import NumpyOps, Schedule
from mirage.model.torch_ops import TorchOps
from mirage.model.unet import AttentionImpl
from mirage.core.schedule import ALPHAS_CUMPROD, ddim_coefficients
from mirage.train.checkpoint import load_checkpoint
from mirage.train.data import SyntheticVideo, v2v_input
from mirage.model.diffusion import ddim_update
from mirage.train.memory import ring_write
from mirage.train.rollout import rollout


def test_runtime_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None; import mirage.runtime, mirage.core.video_io, mirage.runtime.cuda, mirage.runtime.gpu, mirage.runtime.backends; "
            "from mirage.runtime import Pipeline; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


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


@pytest.mark.parametrize("ops_name", ["numpy", "torch"])
def test_ring_write_ops_match_reference(ops_name):
    b, k, n, d = 2, 3, 5, 4
    ref_mem, ref_ages = torch.zeros(b, k, 2, n, d), torch.zeros(b, k, dtype=torch.long)
    if ops_name == "numpy":
        ops, mem, ages, slot = NumpyOps(), np.zeros((b, k, 2, n, d), np.float32), np.zeros((b, k), np.int32), \
            np.zeros(1, np.int64)
    else:
        ops, mem, ages, slot = TorchOps("cpu"), torch.zeros(b, k, 2, n, d), torch.zeros(b, k, dtype=torch.int32), \
            torch.zeros(1, dtype=torch.long)
    for frame in range(2 * k + 1):  # wraps around twice
        kv = torch.randn(b, 2, n, d)
        ring_write(ref_mem, ref_ages, kv, frame)
        ops.ring_write_(mem, ages, slot, kv.numpy() if ops_name == "numpy" else kv)
        assert np.array_equal(np.asarray(ages), ref_ages.numpy())
        assert np.allclose(np.asarray(mem), ref_mem.numpy())
        assert int(slot[0]) == (frame + 1) % k


def test_pipeline_matches_reference_rollout():
    model, _ = load_checkpoint(CKPT_GEN)
    ref = [f[0].permute(1, 2, 0).numpy() for f in rollout(model, 5, seed=3)]
    with Pipeline.load(CKPT_GEN, device="cpu") as pipe:
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
    with Pipeline.load(CKPT_V2V, device="cpu") as pipe:
        pipe.reset(1)
        out = list(pipe.stream(c.permute(1, 2, 0).numpy() for c in cond))
    assert len(out) == 4
    assert max(np.abs(a - b).max() for a, b in zip(ref, out)) < 1e-5


def test_lifecycle_errors(tmp_path):
    pipe = Pipeline.load(CKPT_GEN, device="cpu")
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
        Pipeline.load(tmp_path)
    with pytest.raises(PipelineError, match="backend"):
        Pipeline.load(CKPT_GEN, backend="nope")
    with pytest.raises(PipelineError, match="only the torch backend"):
        Pipeline.load(CKPT_GEN, backend="onnxruntime")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a graph")
    with pytest.raises(BackendError, match="broken.onnx: ONNX Runtime cannot load this graph"):
        OrtBackend({"denoise": broken})


def test_video_to_video_input_errors():
    with Pipeline.load(CKPT_V2V, device="cpu") as pipe:
        pipe.reset(0)
        with pytest.raises(PipelineError, match="needs an input frame"):
            pipe.step()
        with pytest.raises(PipelineError, match=r"shape \(64, 64, 3\).*fit_square"):
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
    assert r.exit_code == 2 and "no such file" in r.output
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

    with pytest.raises(CudaError, match="cudaGetDeviceCount failed"):
        CudaGpu("cuda:0")


def test_fused_kernel_option_errors(tmp_path):
    """The fused-kernel option is CUDA-only and names a missing library; the op route itself
    (stock implementation off CUDA) gives the same frames as the module route."""
    from mirage.plugins_cpp import kernels
    from mirage.runtime.backends import BackendError

    model, _ = load_checkpoint(CKPT_GEN)
    with pytest.raises(BackendError, match="runs on CUDA devices"):
        Pipeline.from_model(model, "cpu", kernel_library=str(tmp_path / "lib.so"))
    with pytest.raises(kernels.KernelError, match="no kernel library"):
        kernels.load(tmp_path / "missing.so")
    outs = []
    for temporal in ("torch", "op"):
        with Pipeline.from_model(model.with_attention(AttentionImpl(temporal=temporal)), "cpu") as pipe:
            pipe.reset(0)
            outs.append(np.stack([pipe.step() for _ in range(3)]))
    np.testing.assert_array_equal(outs[0], outs[1])
