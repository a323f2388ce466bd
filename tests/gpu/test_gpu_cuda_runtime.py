"""The torch-free GPU path (cuda-python buffers, NVRTC loop kernels, streams, events, graphs):
everything the TensorRT backend runs on, without TensorRT.

1. The loop kernels (CudaOps) against numpy: lincomb / lincomb_rows / clamp (fp32, fp16), the noise (moments,
   fresh per draw, reproducible from the seed), the ring-buffer write over K + 3 frames.
2. The Pipeline on CudaGpu with a stand-in engine: two NVRTC kernels that read every input the
   real graphs read (x_t, t, cond, memory, ages / frame, t_ctx), each row its own. Graph replay
   equals eager bit for bit, stream() equals step(), a moved buffer is refused, a bad device is a
   clear error. (tests/gpu/test_gpu_serve.py runs a batch-2 stand-in through a StreamPool.)
3. Frames as bytes (PipelineOptions(frames="uint8")): the to_uint8_ / to_float_ kernels against
   numpy's mapping (every float16 value, NaN flags), and the byte frames of the captured graph
   against the float frames mapped on the host.
"""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from mirage.core import graphs as G
from mirage.core.loop import NumpyOps

pytestmark = pytest.mark.gpu

STANDIN = r"""
// row b = i / per_row reads only row b's timestep, memory, ages and frame: rows are independent streams
extern "C" __global__ void denoise(const float* x, const float* t, const float* cond, const float* mem,
                                   const int* ages, float* v, long n, long per_row, long slot, int k) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  long b = i / per_row, e = i % per_row;
  float m = 0.f;
  for (int j = 0; j < k; ++j) if (ages[b * k + j] > 0) m += mem[(b * k + j) * slot + e % slot] / ages[b * k + j];
  v[i] = 0.3f * x[i] - 1e-4f * t[b] + 0.2f * m + (cond ? 0.1f * cond[i] : 0.f);
}
extern "C" __global__ void encode(const float* frame, const float* t_ctx, float* kv, long n, long per_row, long m) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  long b = i / per_row;
  kv[i] = 0.5f * frame[b * m + i % per_row % m] + 1e-4f * t_ctx[b];
}
"""


def _specs(v2v: bool, batch: int = 1) -> dict:
    """The stand-in's graphs: `batch` rows of 64x64 frames, 8 memory slots of 2 x 64 x 32."""
    t, f, img = G.TensorSpec, "float32", (batch, 3, 64, 64)
    inputs = [t(G.X_T, img, f), t(G.T, (batch,), f)] + ([t(G.COND, img, f)] if v2v else []) + \
        [t(G.MEMORY, (batch, 8, 2, 64, 32), f), t(G.AGES, (batch, 8), "int32")]
    return {G.DENOISE: G.GraphSpec(G.DENOISE, tuple(inputs), (t(G.V, img, f),)),
            G.CONTEXT: G.GraphSpec(G.CONTEXT, (t(G.FRAME, img, f), t(G.T_CTX, (batch,), f)),
                                   (t(G.KV, (batch, 2, 64, 32), f),))}
FRAMES = 12


@pytest.fixture(scope="module")
def cuda():
    """mirage.runtime.cuda, when cuda-python is installed."""
    pytest.importorskip("cuda.bindings", reason="the torch-free GPU path needs cuda-python (pip install -e .[cuda])")
    from mirage.runtime import cuda

    return cuda


class StandInEngine:
    """A backend with the TensorRT backend's contract (device pointers, the pipeline's stream),
    running two small NVRTC kernels instead of engines."""

    def __init__(self, cuda):
        from cuda.bindings import driver, runtime

        cuda.call(runtime.cudaSetDevice, 0)
        cuda.call(runtime.cudaFree, 0)  # the primary context, which the module below is loaded into
        self.cuda, self.driver, self.device, self.stream = cuda, driver, "cuda:0", None
        self.module = cuda.compile_module(STANDIN, "standin.cu", cuda.compute_capability(0))
        self.fn = {g: cuda.call(driver.cuModuleGetFunction, self.module, g.encode()) for g in ("denoise", "encode")}

    def buffer_dtype(self, graph, name):
        return {G.AGES: "int32"}.get(name, "float32")

    def use_stream(self, stream):
        self.stream = stream

    def run(self, graph, inputs, output):
        p = lambda b: (b.ptr if b is not None else 0, ctypes.c_void_p)  # noqa: E731
        per_row = output.size // output.shape[0]
        if graph == G.DENOISE:
            mem = inputs[G.MEMORY]
            slot = mem.size // (mem.shape[0] * mem.shape[1])
            self.cuda.launch(self.fn["denoise"], output.size,
                             [p(inputs[G.X_T]), p(inputs[G.T]), p(inputs.get(G.COND)), p(mem), p(inputs[G.AGES]),
                              p(output), (output.size, ctypes.c_long), (per_row, ctypes.c_long),
                              (slot, ctypes.c_long), (mem.shape[1], ctypes.c_int)], self.stream)
        else:
            frame = inputs[G.FRAME]
            self.cuda.launch(self.fn["encode"], output.size,
                             [p(frame), p(inputs[G.T_CTX]), p(output), (output.size, ctypes.c_long),
                              (per_row, ctypes.c_long), (frame.size // frame.shape[0], ctypes.c_long)], self.stream)

    def close(self):
        self.cuda.call(self.driver.cuModuleUnload, self.module)


def _to_host(gpu, buf) -> np.ndarray:
    host = gpu.pinned(buf)
    gpu.synchronize()
    gpu.dev.download(host, buf, gpu.compute)
    gpu.synchronize()
    return host.copy()


def _from_host(gpu, buf, array: np.ndarray) -> None:
    host = gpu.pinned(buf)
    host[...] = array
    gpu.dev.upload(buf, host, gpu.compute)
    gpu.synchronize()


@pytest.fixture
def gpu(cuda):
    from mirage.runtime.gpu import CudaGpu

    gpu = CudaGpu("cuda:0")
    yield gpu
    gpu.close()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_lincomb_and_clamp(gpu, dtype):
    rng = np.random.default_rng(0)
    x, y, out = (gpu.zeros((2, 3, 17, 19), dtype) for _ in range(3))
    xs, ys = (rng.standard_normal((2, 3, 17, 19)).astype(dtype) * 2 for _ in range(2))
    _from_host(gpu, x, xs)
    _from_host(gpu, y, ys)
    gpu.ops.lincomb_(out, 0.7, x, -1.3, y)
    ref = (0.7 * xs.astype(np.float32) - 1.3 * ys.astype(np.float32)).astype(dtype)
    tol = dict(rtol=1e-6, atol=1e-5) if dtype == "float32" else dict(rtol=2e-3, atol=2e-3)  # fp16: 1 ulp
    np.testing.assert_allclose(_to_host(gpu, out).astype(np.float32), ref.astype(np.float32), **tol)
    gpu.ops.clamp_(out, x)
    np.testing.assert_array_equal(_to_host(gpu, out), np.clip(xs, -1, 1))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_lincomb_rows_matches_numpy(gpu, dtype):
    """The DiT's per-row coefficients (video-to-video strengths): row r of out = a[r] x[r] + b[r] y[r]."""
    from mirage.core.loop import NumpyOps

    rng = np.random.default_rng(1)
    x, y, out = (gpu.zeros((3, 4, 2, 5, 7), dtype) for _ in range(3))
    a, b = gpu.zeros((3,), "float32"), gpu.zeros((3,), "float32")
    xs, ys = (rng.standard_normal((3, 4, 2, 5, 7)).astype(dtype) for _ in range(2))
    a_s, b_s = np.array([1.0, 0.4, 0.0], np.float32), np.array([-0.25, 0.6, 1.0], np.float32)
    for buf, array in ((x, xs), (y, ys), (a, a_s), (b, b_s)):
        _from_host(gpu, buf, array)
    gpu.ops.lincomb_rows_(out, a, x, b, y)
    ref = np.zeros((3, 4, 2, 5, 7), np.float32)
    NumpyOps().lincomb_rows_(ref, a_s, xs.astype(np.float32), b_s, ys.astype(np.float32))
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == "float32" else dict(rtol=2e-3, atol=2e-3)  # fp16: 1 ulp
    np.testing.assert_allclose(_to_host(gpu, out).astype(np.float32), ref.astype(dtype).astype(np.float32), **tol)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_noise_moments_fresh_and_reproducible(gpu, dtype):
    from mirage.core.loop import normal

    noise, rng, advance = gpu.zeros((1, 1 << 20), dtype), gpu.zeros((1, 2), "int64"), gpu.zeros((1,), "int64")
    gpu.ops.fill_(advance, 1)
    draws = []
    for reseed in (True, False, True):
        if reseed:
            _from_host(gpu, rng, np.array([[5, 0]], np.int64))
        gpu.ops.randn_(noise, rng, advance)
        draws.append(_to_host(gpu, noise)[0].astype(np.float64))
    a, b, c = draws
    # the loop's generator: the same numbers as numpy's implementation (fast-math rounding aside)
    np.testing.assert_allclose(a, normal(5, 0, 1 << 20), atol=2e-3 if dtype == "float16" else 1e-4)
    assert abs(a.mean()) < 5e-3 and abs(a.std() - 1) < 5e-3
    assert abs(((a - a.mean()) ** 4).mean() / a.var() ** 2 - 3) < 0.05  # Gaussian tails, not uniform
    assert abs(np.corrcoef(a, b)[0, 1]) < 5e-3  # a fresh draw each call
    np.testing.assert_array_equal(a, c)  # the same seed, the same noise


def test_ring_write_matches_numpy(gpu):
    rng, k, shape = np.random.default_rng(1), 4, (2, 4, 2, 5, 8)
    memory, ages, slot = gpu.zeros(shape, "float32"), gpu.zeros((2, k), "int32"), gpu.zeros((2,), "int64")
    kv = gpu.zeros((2, 2, 5, 8), "float32")
    ref_mem, ref_ages, ref_slot = np.zeros(shape, np.float32), np.zeros((2, k), np.int32), np.array([0, 2], np.int64)
    _from_host(gpu, slot, ref_slot)  # rows write at different positions
    advance, ref_advance = gpu.zeros((2,), "int64"), np.array([1, 1], np.int64)
    gpu.ops.fill_(advance, 1)
    for frame in range(k + 3):  # wraps around
        kvs = rng.standard_normal((2, 2, 5, 8)).astype(np.float32)
        _from_host(gpu, kv, kvs)
        if frame == k:  # hold row 1 for one frame
            ref_advance[1] = 0
        _from_host(gpu, advance, ref_advance)
        gpu.ops.ring_write_(memory, ages, slot, kv, advance)
        NumpyOps().ring_write_(ref_mem, ref_ages, ref_slot, kvs, ref_advance)
        ref_advance[1] = 1
        np.testing.assert_array_equal(_to_host(gpu, memory), ref_mem, err_msg=f"frame {frame}")
        np.testing.assert_array_equal(_to_host(gpu, ages), ref_ages, err_msg=f"frame {frame}")
        np.testing.assert_array_equal(_to_host(gpu, slot), ref_slot, err_msg=f"frame {frame}")


def test_dit_cache_write_and_preview_match_numpy(gpu):
    """The DiT's block ops (core.dit_step.BlockUnit): the block's keys/values scattered into each advancing
    row's cache rows (a held row keeps its own) and gathered back, and the latents' preview, against numpy."""
    rng = np.random.default_rng(2)
    for dtype in ("float32", "float16"):
        cache, new = gpu.zeros((2, 3, 2, 12, 8), dtype), gpu.zeros((2, 3, 2, 4, 8), dtype)
        rows, advance = gpu.zeros((2, 4), "int32"), gpu.zeros((2,), "int64")
        ref = rng.standard_normal((2, 3, 2, 12, 8)).astype(dtype)
        news = rng.standard_normal((2, 3, 2, 4, 8)).astype(dtype)
        idx, go = np.array([[4, 5, 6, 7], [8, 9, 0, 1]], np.int32), np.array([1, 0], np.int64)
        for buf, host in ((cache, ref), (new, news), (rows, idx), (advance, go)):
            _from_host(gpu, buf, host)
        gpu.ops.scatter_rows_(cache, new, rows, advance, 3)
        NumpyOps().scatter_rows_(ref, news, idx, go, 3)
        np.testing.assert_array_equal(_to_host(gpu, cache), ref)
        gpu.ops.gather_rows_(new, cache, rows, 3)  # back: each row's rows of the cache, held ones too
        np.testing.assert_array_equal(_to_host(gpu, new), np.take_along_axis(ref, idx[:, None, None, :, None], 3))
        latents, frames = gpu.zeros((2, 16, 3, 4, 5), dtype), gpu.zeros((6, 3, 32, 40), "float32")
        lat = (rng.standard_normal((2, 16, 3, 4, 5)) * 2).astype(dtype)
        _from_host(gpu, latents, lat)
        gpu.ops.preview_(frames, latents)
        want = np.zeros((6, 3, 32, 40), np.float32)
        NumpyOps().preview_(want, lat)
        np.testing.assert_array_equal(_to_host(gpu, frames), want)


def _pipeline(cuda, graph: bool, v2v: bool, frames: str = "float32", batch: int = 1):
    from types import SimpleNamespace

    from mirage.core.config import PipelineOptions
    from mirage.runtime.pipeline import Pipeline

    from mirage.core.loop import FrameUnit

    cfg = SimpleNamespace(image_size=64, pixels=64, channels=3, cond_channels=3 if v2v else 0, name="stand-in")
    cfg.unit = lambda specs, options: FrameUnit(cfg, specs, options.steps, options.context_noise)  # a U-Net's frame
    options = PipelineOptions(steps=4, cuda_graph=graph, frames=frames, batch=batch)
    pipe = Pipeline(StandInEngine(cuda), cfg, _specs(v2v, batch), options)
    pipe.reset(3)
    return pipe


@pytest.mark.parametrize("v2v", [False, True], ids=["generation", "v2v"])
def test_pipeline_graph_replay_equals_eager(cuda, v2v):
    inputs = [np.random.default_rng(i).uniform(-1, 1, (64, 64, 3)).astype(np.float32) for i in range(FRAMES)]
    feed = lambda n: inputs[n] if v2v else None  # noqa: E731
    eager_pipe = _pipeline(cuda, graph=False, v2v=v2v)
    eager = np.stack([eager_pipe.step(feed(n)) for n in range(FRAMES)])
    eager_pipe.close()
    pipe = _pipeline(cuda, graph=True, v2v=v2v)
    try:
        assert pipe.graphs, "the frame graph was not captured"
        graph = np.stack([pipe.step(feed(n)) for n in range(FRAMES)])
        np.testing.assert_array_equal(graph, eager)
        assert np.abs(graph[0] - graph[1]).max() > 0  # fresh noise and a growing memory: frames differ
        pipe.reset(3)
        streamed = np.stack(list(pipe.stream(inputs if v2v else FRAMES)))
        np.testing.assert_array_equal(streamed, graph)
        pipe.buf.x = pipe.execution.gpu.zeros(pipe.buf.x.shape, "float32")  # a moved buffer: never replay a stale graph
        with pytest.raises(RuntimeError, match="stale"):
            pipe.step(feed(0))
    finally:
        pipe.close()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_byte_kernels_make_the_host_mapping(gpu, dtype):
    from mirage.core.video_io import to_float, to_uint8

    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)  # infinities and NaNs too
    edges = (np.arange(256, dtype=np.float32) - 0.5) / np.float32(127.5) - 1  # where a byte changes
    near = [np.nextafter(edges, np.float32(side)) for side in (-2, 2)]
    values = np.concatenate([every_half, edges, *near])
    values = values[:len(values) // 24 * 24].reshape(1, 3, 8, -1)
    src_host = np.concatenate([values, np.clip(np.nan_to_num(values), -1, 1)]).astype(dtype)  # row 0 non-finite, row 1 finite
    b, c, h, w = src_host.shape
    src, dst, finite = gpu.zeros(src_host.shape, dtype), gpu.zeros((b, h, w, c), "uint8"), gpu.zeros((b,), "uint8")
    _from_host(gpu, src, src_host)
    gpu.ops.to_uint8_(dst, finite, src)
    with np.errstate(invalid="ignore"):
        expected = to_uint8(src_host.astype(np.float32).transpose(0, 2, 3, 1))
    got, ok = _to_host(gpu, dst), np.isfinite(src_host.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(got[ok], expected[ok])
    np.testing.assert_array_equal(_to_host(gpu, finite), [0, 1])
    u8 = np.random.default_rng(1).integers(0, 256, (2, 17, 19, 3), dtype=np.uint8)
    u8_dev, back = gpu.zeros(u8.shape, "uint8"), gpu.zeros((2, 3, 17, 19), dtype)
    _from_host(gpu, u8_dev, u8)
    gpu.ops.to_float_(back, u8_dev)
    np.testing.assert_array_equal(_to_host(gpu, back), to_float(u8).transpose(0, 3, 1, 2).astype(dtype))


@pytest.mark.parametrize("v2v", [False, True], ids=["generation", "v2v"])
def test_byte_frames_of_the_graph_are_the_float_frames_mapped(cuda, v2v):
    from mirage.core.video_io import to_uint8

    inputs = [np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8) for i in range(FRAMES)]
    outs = {}
    for frames in ("float32", "uint8"):
        pipe = _pipeline(cuda, graph=True, v2v=v2v, frames=frames)
        try:
            assert pipe.graphs, "the frame graph was not captured"
            outs[frames] = np.stack(list(pipe.stream(inputs if v2v else FRAMES)))
        finally:
            pipe.close()
    assert outs["uint8"].dtype == np.uint8 and outs["uint8"].std() > 1
    np.testing.assert_array_equal(outs["uint8"], to_uint8(outs["float32"]))


def test_bad_device_is_a_clear_error(cuda):
    from mirage.runtime.gpu import CudaGpu

    with pytest.raises(cuda.CudaError, match="cuda:99"):
        CudaGpu("cuda:99")


def test_use_device_makes_the_gpu_and_its_context_current_in_a_new_thread(cuda):
    """What the TensorRT backend calls before TensorRT deserializes, loads its runtime cache or
    enqueues (runtime.tensorrt): a thread that made no CUDA call before gets the device and a
    current context (the runtime cache needs one); a second call inside a capture changes nothing."""
    import threading

    from cuda.bindings import driver, runtime

    count = cuda.call(runtime.cudaGetDeviceCount)
    seen = []

    def body():
        for index in sorted({count - 1, 0}):
            cuda.use_device(index)
            seen.append((index, cuda.call(runtime.cudaGetDevice), int(cuda.call(driver.cuCtxGetCurrent)) != 0))

    thread = threading.Thread(target=body)
    thread.start()
    thread.join()
    assert seen and all(index == current and has_context for index, current, has_context in seen), seen
    from mirage.runtime.gpu import CudaGpu

    gpu = CudaGpu("cuda:0")
    try:
        gpu.capture(lambda: cuda.use_device(0))  # no error from the capture
    finally:
        gpu.close()
