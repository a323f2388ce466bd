"""GPU check of the torch-free runtime path (cuda-python buffers, NVRTC loop kernels, streams,
events, graphs): everything the TensorRT backend runs on, without TensorRT.

    python scripts/check_cuda_runtime.py --json cuda_runtime.json

1. The loop kernels (CudaOps) against numpy: lincomb/clamp (fp32, fp16), the ring-buffer write
   over K + 3 frames (wrap-around, ages), and the noise (moments, fresh per draw, reproducible
   from the seed).
2. The Pipeline on CudaGpu with a stand-in engine: two NVRTC kernels that read every input the
   real graphs read (x_t, t, cond, memory, ages / frame, t_ctx). Graph replay against eager
   (bit for bit), the copy-stream timeline, the stale-graph refusal, and per-frame latency.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time

import numpy as np

from mirage.core import graphs as G
from mirage.runtime.cuda import CudaError, call, launch
from mirage.runtime.gpu import CudaGpu
from mirage.core.loop import NumpyOps
from mirage.runtime.pipeline import Pipeline, PipelineError

STANDIN = r"""
extern "C" __global__ void denoise(const float* x, const float* t, const float* cond, const float* mem,
                                   const int* ages, float* v, long n, long slot, int k) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  float m = 0.f;
  for (int j = 0; j < k; ++j) if (ages[j] > 0) m += mem[j * slot + i % slot] / ages[j];
  v[i] = 0.3f * x[i] - 1e-4f * t[0] + 0.2f * m + (cond ? 0.1f * cond[i] : 0.f);
}
extern "C" __global__ void encode(const float* frame, const float* t_ctx, float* kv, long n, long m) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) kv[i] = 0.5f * frame[i % m] + 1e-4f * t_ctx[0];
}
"""


class StandInEngine:
    """A backend with the TensorRT backend's contract (array "cuda", device pointers, the
    pipeline's stream), running two small NVRTC kernels instead of engines."""

    array = "cuda"

    def __init__(self, shapes):
        from cuda.bindings import driver, runtime

        from mirage.runtime.cuda import compile_module, compute_capability

        call(runtime.cudaSetDevice, 0)
        call(runtime.cudaFree, 0)  # the primary context, which the module below is loaded into
        self.device, self.stream, self.shapes, self.driver = "cuda:0", None, shapes, driver
        self.module = compile_module(STANDIN, "standin.cu", compute_capability(0))
        self.fn = {g: call(driver.cuModuleGetFunction, self.module, g.encode()) for g in ("denoise", "encode")}

    def buffer_dtype(self, graph, name):
        return {G.AGES: "int32"}.get(name, "float32")

    def run(self, graph, inputs, output):
        p = lambda b: (b.ptr if b is not None else 0, ctypes.c_void_p)  # noqa: E731
        if graph == G.DENOISE:
            mem = inputs[G.MEMORY]
            slot = mem.size // (mem.shape[0] * mem.shape[1])
            launch(self.fn["denoise"], output.size,
                   [p(inputs[G.X_T]), p(inputs[G.T]), p(inputs.get(G.COND)), p(mem), p(inputs[G.AGES]), p(output),
                    (output.size, ctypes.c_long), (slot, ctypes.c_long), (mem.shape[1], ctypes.c_int)], self.stream)
        else:
            frame = inputs[G.FRAME]
            launch(self.fn["encode"], output.size, [p(frame), p(inputs[G.T_CTX]), p(output),
                                                    (output.size, ctypes.c_long), (frame.size, ctypes.c_long)], self.stream)

    def close(self):
        call(self.driver.cuModuleUnload, self.module)


def to_host(gpu, buf) -> np.ndarray:
    host = gpu.pinned(buf)
    gpu.synchronize()
    gpu.dev.download(host, buf, gpu.compute)
    gpu.synchronize()
    return host.copy()


def from_host(gpu, buf, array: np.ndarray) -> None:
    host = gpu.pinned(buf)
    host[...] = array
    gpu.dev.upload(buf, host, gpu.compute)
    gpu.synchronize()


def check_ops() -> dict:
    gpu, rng, res = CudaGpu("cuda:0"), np.random.default_rng(0), {}
    for dtype in ("float32", "float16"):
        x, y, out = (gpu.zeros((2, 3, 17, 19), dtype) for _ in range(3))
        xs, ys = (rng.standard_normal((2, 3, 17, 19)).astype(dtype) * 2 for _ in range(2))
        from_host(gpu, x, xs)
        from_host(gpu, y, ys)
        gpu.ops.lincomb_(out, 0.7, x, -1.3, y)
        ref = (0.7 * xs.astype(np.float32) - 1.3 * ys.astype(np.float32)).astype(dtype)
        res[f"lincomb_{dtype}_max_diff"] = float(np.abs(to_host(gpu, out).astype(np.float32) - ref).max())
        gpu.ops.clamp_(out, x)
        res[f"clamp_{dtype}_max_diff"] = float(np.abs(to_host(gpu, out) - np.clip(xs, -1, 1)).max())
        noise = gpu.zeros((1 << 20,), dtype)
        gpu.ops.seed(5)
        gpu.ops.randn_(noise)
        a = to_host(gpu, noise).astype(np.float64)
        gpu.ops.randn_(noise)
        b = to_host(gpu, noise).astype(np.float64)
        gpu.ops.seed(5)
        gpu.ops.randn_(noise)
        c = to_host(gpu, noise).astype(np.float64)
        res[f"randn_{dtype}"] = {"mean": a.mean(), "std": a.std(), "kurtosis": float(((a - a.mean()) ** 4).mean() / a.var() ** 2),
                                 "fresh_per_draw": bool(np.abs(a - b).max() > 0), "corr_consecutive": float(np.corrcoef(a, b)[0, 1]),
                                 "reproducible": bool(np.array_equal(a, c))}
    # ring buffer over K + 3 frames against NumpyOps
    k, shape = 4, (2, 4, 2, 5, 8)
    memory, ages, slot, kv = gpu.zeros(shape, "float32"), gpu.zeros((2, k), "int32"), gpu.zeros((1,), "int64"), \
        gpu.zeros((2, 2, 5, 8), "float32")
    ref_mem, ref_ages, ref_slot = np.zeros(shape, np.float32), np.zeros((2, k), np.int32), np.zeros(1, np.int64)
    ok = True
    for frame in range(k + 3):
        kvs = rng.standard_normal((2, 2, 5, 8)).astype(np.float32)
        from_host(gpu, kv, kvs)
        gpu.ops.ring_write_(memory, ages, slot, kv)
        NumpyOps().ring_write_(ref_mem, ref_ages, ref_slot, kvs)
        ok &= np.array_equal(to_host(gpu, memory), ref_mem) and np.array_equal(to_host(gpu, ages), ref_ages) \
            and np.array_equal(to_host(gpu, slot), ref_slot)
    res["ring_write_matches_numpy"] = bool(ok)
    gpu.close()
    return res


def pipeline_frames(graph: bool, v2v: bool, frames: int, inputs) -> tuple[np.ndarray, list[float], Pipeline]:
    shapes = {G.X_T: (1, 3, 64, 64), G.COND: (1, 3, 64, 64), G.V: (1, 3, 64, 64), G.FRAME: (1, 3, 64, 64),
              G.T: (1,), G.T_CTX: (1,), G.MEMORY: (1, 8, 2, 64, 32), G.AGES: (1, 8), G.KV: (1, 2, 64, 32)}
    pipe = Pipeline(StandInEngine(shapes), shapes, video_to_video=v2v, steps=4, cuda_graph=graph)
    pipe.reset(3)
    outs, times = [], []
    for n in range(frames):
        t = time.perf_counter()
        outs.append(pipe.step(inputs[n] if v2v else None))
        times.append((time.perf_counter() - t) * 1e3)
    return np.stack(outs), times, pipe


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="cuda_runtime.json")
    args = p.parse_args()
    report = {"ops": check_ops()}
    print("ops:", json.dumps(report["ops"], indent=1), flush=True)
    frames = 60
    inputs = [np.random.default_rng(i).uniform(-1, 1, (64, 64, 3)).astype(np.float32) for i in range(frames)]
    for v2v in (False, True):
        eager, t_eager, pe = pipeline_frames(False, v2v, frames, inputs)
        graph, t_graph, pg = pipeline_frames(True, v2v, frames, inputs)
        key = "v2v" if v2v else "generation"
        stream_t = time.perf_counter()
        pg.reset(3)
        streamed = np.stack(list(pg.stream(inputs if v2v else frames)))
        stream_ms = (time.perf_counter() - stream_t) * 1e3 / frames
        tl = pg.timeline[5:]
        report[key] = {"graph_captured": bool(pg.graphs), "graph_vs_eager_max_abs_diff": float(np.abs(eager - graph).max()),
                       "stream_vs_step_max_abs_diff": float(np.abs(streamed - graph).max()),
                       "frames_differ": bool(np.abs(graph[0] - graph[1]).max() > 0),
                       "eager_median_ms": statistics.median(t_eager[5:]), "graph_median_ms": statistics.median(t_graph[5:]),
                       "stream_ms_per_frame": stream_ms,
                       "timeline_median_ms": {k: statistics.median(r[k] for r in tl) for k in tl[0] if k != "frame"}}
        print(key, json.dumps(report[key], indent=1), flush=True)
        pe.close()
        # a moved buffer must be refused, never replayed
        pg.buf.x = pg.gpu.zeros(pg.buf.x.shape, "float32")
        try:
            pg.step(inputs[0] if v2v else None)
            report[key]["refuses_stale_graph"] = False
        except PipelineError:
            report[key]["refuses_stale_graph"] = True
        pg.close()
    try:
        CudaGpu("cuda:99")
        report["bad_device_error"] = None
    except CudaError as e:
        report["bad_device_error"] = str(e)
    print("bad device:", report["bad_device_error"])
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2, default=float)
    ops = report["ops"]
    ok = (ops["ring_write_matches_numpy"] and ops["lincomb_float32_max_diff"] < 1e-5 and ops["clamp_float32_max_diff"] == 0
          and all(report[k]["graph_vs_eager_max_abs_diff"] == 0 and report[k]["refuses_stale_graph"]
                  for k in ("generation", "v2v")))
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
