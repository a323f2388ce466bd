"""CUDA through cuda-python (`cuda.bindings`), no torch: the GPU path of engines that are not
PyTorch (TensorRT). Every call goes through `call`, which checks its status and names the call
in the error.

    dev = Device(0)                                 # sets the device, compiles the loop kernels (NVRTC)
    x = dev.empty((1, 3, 64, 64), "float16")        # DeviceBuffer: cudaMalloc'd once, freed by close()
    h = dev.pinned((1, 3, 64, 64), "float32")       # numpy array over cudaMallocHost memory
    s = dev.stream(); e = dev.event()               # e.record(s), e.wait(s), e.synchronize(), e.elapsed_time(e2)
    graph = dev.capture(s, lambda: ...)             # stream capture -> instantiated graph; graph.replay() on s

Events and graphs take torch.cuda.Event's and torch.cuda.CUDAGraph's method names, so the
execution (runtime.execution.GpuExecution) drives them and torch's alike, with no adapter between.

The element-wise work of the frame loop (noise, the DDIM update, clamp, the ring-buffer write)
is a handful of kernels compiled once with NVRTC (`CudaOps`), so a whole frame is captured.
"""
from __future__ import annotations

import ctypes
import math

import numpy as np

from mirage.core.device import compute_capability
from mirage.core.loop import int64_bits


class CudaError(RuntimeError):
    """A CUDA call failed; the message names the call and CUDA's error."""


def _import():
    try:
        from cuda.bindings import driver, nvrtc, runtime
    except ImportError as e:
        raise CudaError("the cuda-python GPU path needs `pip install cuda-python` (cuda.bindings)") from e
    return driver, nvrtc, runtime


def call(fn, *args):
    """Run one cuda-python call and check its status: returns the call's values (None, one, or a tuple)."""
    result = fn(*args)
    err, values = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    code = int(err)
    if code != 0:
        raise CudaError(f"{getattr(fn, '__name__', fn)} failed: {_error_text(err)}")
    return None if not values else values[0] if len(values) == 1 else values


def use_device(index: int) -> None:
    """Make GPU `index` and its primary context current for the calling thread (cudaSetDevice does
    both since CUDA 12). What a later call allocates or enqueues without naming a device goes there:
    TensorRT deserializes engines, creates contexts and loads its runtime cache (which needs a
    current context) on the current device. Set only when another device or no context is current,
    as PyTorch does, so a call inside a stream capture changes nothing."""
    driver, _, rt = _import()
    if call(rt.cudaGetDevice) != index or not int(call(driver.cuCtxGetCurrent)):
        call(rt.cudaSetDevice, index)


def _error_text(err) -> str:
    driver, nvrtc, runtime = _import()
    if isinstance(err, runtime.cudaError_t):
        return f"{err.name} ({runtime.cudaGetErrorString(err)[1].decode()})"
    if isinstance(err, driver.CUresult):
        desc = driver.cuGetErrorString(err)[1]
        return f"{err.name} ({desc.decode() if desc else ''})"
    if isinstance(err, nvrtc.nvrtcResult):
        return err.name
    return str(err)


_NP = {"float32": np.float32, "float16": np.float16, "int32": np.int32, "int64": np.int64, "uint8": np.uint8}


class DeviceBuffer:
    """One device allocation with a shape and dtype; exposes __cuda_array_interface__ so that
    other libraries (CuPy, PyTorch) can view it without a copy."""

    def __init__(self, shape: tuple[int, ...], dtype: str):
        _, _, rt = _import()
        self.shape, self.dtype = tuple(shape), dtype
        self.nbytes = int(math.prod(self.shape)) * np.dtype(_NP[dtype]).itemsize
        self.ptr = int(call(rt.cudaMalloc, max(self.nbytes, 1)))

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": self.shape, "typestr": np.dtype(_NP[self.dtype]).str, "data": (self.ptr, False),
                "version": 3}

    def data_ptr(self) -> int:  # the name TensorRT binding code shares with torch tensors
        return self.ptr

    def free(self) -> None:
        if self.ptr:
            call(_import()[2].cudaFree, self.ptr)
            self.ptr = 0


class Graph:
    """An instantiated CUDA graph, replayed on the stream it was captured on."""

    def __init__(self, graph, exec_, stream):
        self.graph, self.exec, self.stream = graph, exec_, stream

    def replay(self) -> None:
        call(_import()[2].cudaGraphLaunch, self.exec, self.stream)

    def destroy(self) -> None:
        rt = _import()[2]
        call(rt.cudaGraphExecDestroy, self.exec)
        call(rt.cudaGraphDestroy, self.graph)


class Event:
    """A CUDA event (a cudaEvent_t handle)."""

    def __init__(self, handle):
        self.handle = handle

    def record(self, stream) -> None:
        call(_import()[2].cudaEventRecord, self.handle, stream)

    def wait(self, stream) -> None:
        """Work enqueued on `stream` after this call waits for the event."""
        call(_import()[2].cudaStreamWaitEvent, stream, self.handle, 0)

    def synchronize(self) -> None:
        call(_import()[2].cudaEventSynchronize, self.handle)

    def elapsed_time(self, end: "Event") -> float:
        """Milliseconds from this event to `end`."""
        return float(call(_import()[2].cudaEventElapsedTime, self.handle, end.handle))


class Device:
    """One GPU: allocations, streams, events and graphs, all freed by close()."""

    def __init__(self, index: int = 0):
        driver, _, rt = _import()
        self.rt, self.driver, self.index = rt, driver, index
        count = call(rt.cudaGetDeviceCount)
        if index >= count:
            raise CudaError(f"cuda:{index} requested but {count} CUDA device(s) are visible")
        self.make_current()
        call(rt.cudaFree, 0)  # creates the primary context, which the driver API (kernels) then uses
        self.capability = compute_capability(index)
        if self.capability is None:
            raise CudaError(f"no CUDA device {index}")
        self._buffers: list[DeviceBuffer] = []
        self._pinned: list[int] = []
        self._streams, self._events, self._graphs = [], [], []

    def make_current(self) -> None:
        """Make this device's primary context current for the calling thread (cudaSetDevice does
        so at once since CUDA 12). A runtime call binds a context implicitly, a kernel launch
        (cuLaunchKernel, driver API) does not: in a thread whose first CUDA work is a launch it
        fails with CUDA_ERROR_INVALID_CONTEXT. Cheap (a per-thread setting), so call it before
        launching from any thread."""
        call(self.rt.cudaSetDevice, self.index)

    def empty(self, shape, dtype: str) -> DeviceBuffer:
        buf = DeviceBuffer(shape, dtype)
        self._buffers.append(buf)
        return buf

    def pinned(self, shape, dtype: str) -> np.ndarray:
        """A numpy array over page-locked host memory (what async copies need to be async)."""
        nbytes = int(math.prod(shape)) * np.dtype(_NP[dtype]).itemsize
        ptr = int(call(self.rt.cudaMallocHost, nbytes))
        self._pinned.append(ptr)
        raw = (ctypes.c_byte * nbytes).from_address(ptr)
        return np.frombuffer(raw, dtype=_NP[dtype]).reshape(shape)

    def stream(self):
        s = call(self.rt.cudaStreamCreateWithFlags, self.rt.cudaStreamNonBlocking)
        self._streams.append(s)
        return s

    def event(self, timing: bool = True) -> Event:
        flags = self.rt.cudaEventDefault if timing else self.rt.cudaEventDisableTiming
        e = Event(call(self.rt.cudaEventCreateWithFlags, flags))
        self._events.append(e)
        return e

    def synchronize(self) -> None:
        call(self.rt.cudaDeviceSynchronize)

    def upload(self, dst: DeviceBuffer, src: np.ndarray, stream) -> None:
        """Async host -> device copy (src should be pinned, see `pinned`)."""
        self._check_copy(dst, src)
        call(self.rt.cudaMemcpyAsync, dst.ptr, src.ctypes.data, dst.nbytes,
             self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream)

    def download(self, dst: np.ndarray, src: DeviceBuffer, stream) -> None:
        self._check_copy(src, dst)
        call(self.rt.cudaMemcpyAsync, dst.ctypes.data, src.ptr, src.nbytes,
             self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream)

    def copy(self, dst: DeviceBuffer, src: DeviceBuffer, stream) -> None:
        if dst.nbytes != src.nbytes:
            raise CudaError(f"copy of {src.nbytes} bytes into a buffer of {dst.nbytes}")
        call(self.rt.cudaMemcpyAsync, dst.ptr, src.ptr, src.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
             stream)

    @staticmethod
    def _check_copy(dev: DeviceBuffer, host: np.ndarray) -> None:
        if host.nbytes != dev.nbytes or not host.flags.c_contiguous:
            raise CudaError(f"host array {host.shape} {host.dtype} does not match device buffer {dev.shape} "
                            f"{dev.dtype} (or is not contiguous)")

    def capture(self, stream, body) -> Graph:
        """Record everything `body()` enqueues on `stream` into a graph (nothing runs yet). The
        capture is always ended, so a failing body leaves the stream usable."""
        call(self.rt.cudaStreamBeginCapture, stream, self.rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal)
        try:
            body()
        finally:
            graph = call(self.rt.cudaStreamEndCapture, stream)
        exec_ = call(self.rt.cudaGraphInstantiate, graph, 0)
        g = Graph(graph, exec_, stream)
        self._graphs.append(g)
        return g

    def close(self) -> None:
        """Free everything this device object allocated (after a synchronize)."""
        self.synchronize()
        for g in self._graphs:
            g.destroy()
        for e in self._events:
            call(self.rt.cudaEventDestroy, e.handle)
        for s in self._streams:
            call(self.rt.cudaStreamDestroy, s)
        for b in self._buffers:
            b.free()
        for p in self._pinned:
            call(self.rt.cudaFreeHost, p)
        self._graphs, self._events, self._streams, self._buffers, self._pinned = [], [], [], [], []


# The loop's element-wise kernels. Half precision goes through PTX conversions so the source needs
# no headers (NVRTC ships none for cuda_fp16.h on every install).
_KERNELS = r"""
typedef unsigned short half_t;
__device__ __forceinline__ float h2f(half_t h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ half_t f2h(float f) { half_t h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }
__device__ __forceinline__ float ld(const float* p, long i) { return p[i]; }
__device__ __forceinline__ float ld(const half_t* p, long i) { return h2f(p[i]); }
__device__ __forceinline__ void st(float* p, long i, float v) { p[i] = v; }
__device__ __forceinline__ void st(half_t* p, long i, float v) { p[i] = f2h(v); }

// splitmix64: a counter-based generator, so a replayed graph draws fresh noise from the counter
__device__ __forceinline__ unsigned long long mix(unsigned long long z) {
  z += 0x9E3779B97F4A7C15ull; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull; return z ^ (z >> 31);
}
// mirage.core.loop.normal: row b of `out` (rows x per_row) from its (seed, counter) = state[2b], state[2b+1]
template <typename T> __device__ void randn(T* out, long per_row, long n, const long long* state) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i >= n) return;
  long b = i / per_row, j = i % per_row;
  unsigned long long seed = (unsigned long long)state[2 * b], counter = (unsigned long long)state[2 * b + 1];
  unsigned long long r = mix(seed ^ mix(counter * 0x100000000ull + j));
  float u1 = ((r >> 40) + 1.0f) * (1.0f / 16777217.0f), u2 = ((r & 0xFFFFFFull) + 0.5f) * (1.0f / 16777216.0f);
  st(out, i, sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));  // Box-Muller
}
template <typename T, typename S> __device__ void lincomb(T* dst, float a, const S* x, float b, const T* y, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) st(dst, i, a * ld(x, i) + b * ld(y, i));
}
// per-row coefficients a[r], b[r] (float32) of rows of `per_row` elements
template <typename T> __device__ void lincomb_rows(T* dst, const float* a, const T* x, const float* b, const T* y,
                                                   long per_row, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) { long r = i / per_row; st(dst, i, a[r] * ld(x, i) + b[r] * ld(y, i)); }
}
template <typename T> __device__ void clamp1(T* dst, const T* src, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) st(dst, i, fminf(fmaxf(ld(src, i), -1.0f), 1.0f));
}
// memory (B, K, S) with S = 2*N*D elements per slot; kv (B, S); slot[b] is row b's slot to write
// rows with advance[b] = 0 are held: nothing of theirs is written
template <typename T> __device__ void ring_copy(T* memory, const T* kv, const long long* slot, const long long* advance,
                                               int k, long s, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) { long b = i / s, e = i % s; if (advance[b]) memory[(b * k + slot[b]) * s + e] = kv[i]; }
}
// mirage.core.video_io.to_uint8 of (B, C, HW) into (B, HW, C) bytes, one rounding per op as numpy
// does it (the _rn intrinsics: --use_fast_math would fuse a multiply-add); finite[b], set to 1
// before, drops to 0 where row b holds a NaN or Inf (all exponent bits set: a bit test, which no
// floating-point assumption of fast math can fold away)
template <typename T> __device__ void to_u8(unsigned char* dst, unsigned char* finite, const T* src, int c, long hw,
                                            long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;  // dst index ((b * hw) + p) * c + ch
  if (i >= n) return;
  long ch = i % c, p = (i / c) % hw, b = i / (c * hw);
  float x = ld(src, (b * c + ch) * hw + p);
  if ((__float_as_uint(x) & 0x7F800000u) == 0x7F800000u) finite[b] = 0;
  float y = __fadd_rn(__fmul_rn(__fadd_rn(x, 1.0f), 127.5f), 0.5f);
  dst[i] = (unsigned char)fminf(fmaxf(y, 0.0f), 255.0f);  // truncates, as numpy's astype
}
// video_io.to_float of (B, HW, C) bytes into (B, C, HW): lut[v] = to_float(v), exact
template <typename T> __device__ void from_u8(T* dst, const unsigned char* src, const float* lut, int c, long hw,
                                              long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;  // dst index (b * c + ch) * hw + p
  if (i >= n) return;
  long p = i % hw, ch = (i / hw) % c, b = i / (c * hw);
  st(dst, i, lut[src[(b * hw + p) * c + ch]]);
}
// the DiT's cache write: src (B, P, M, D) into rows rows[b, j] of dst (B, P, R, D), for rows b with advance[b] = 1;
// with `gather` the other way: dst (B, P, M, D) from rows rows[b, j] of src (B, P, R, D), every row
template <typename T> __device__ void move_rows(T* dst, const T* src, const int* rows, const long long* advance,
                                                long p, int r, int m, long d, long n, bool gather) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;  // index of the (B, P, M, D) side: ((b * p + q) * m + j) * d + e
  if (i >= n) return;
  long e = i % d, j = (i / d) % m, q = (i / (d * m)) % p, b = i / (d * m * p);
  long far = ((b * p + q) * r + rows[b * m + j]) * d + e;
  if (gather) dst[i] = src[far];
  else if (advance[b]) dst[far] = src[i];
}
// latent frames as pictures: dst (B·N, 3, h·sy, w·sx) float32 = clamp(channels 0..2 of src (B, C, N, h, w), -1, 1),
// nearest; a non-finite value passes through (a bit test, as in to_u8: fast math may fold a NaN compare)
template <typename T> __device__ void preview(float* dst, const T* src, int c, int nf, long h, long w, int sy, int sx,
                                              long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;  // dst index (((b * nf + f) * 3 + ch) * H + y) * W + x
  if (i >= n) return;
  long wd = w * sx, ht = h * sy;
  long x = i % wd, y = (i / wd) % ht, ch = (i / (wd * ht)) % 3, bf = i / (wd * ht * 3);
  float v = ld(src, ((((bf / nf) * c + ch) * nf + bf % nf) * h + y / sy) * w + x / sx);
  dst[i] = (__float_as_uint(v) & 0x7F800000u) == 0x7F800000u ? v : fminf(fmaxf(v, -1.0f), 1.0f);
}
extern "C" {
__global__ void move_rows_f32(float* d, const float* s, const int* r, const long long* a, long p, int rr, int m, long dd, long n, int g) { move_rows(d, s, r, a, p, rr, m, dd, n, g); }
__global__ void move_rows_f16(half_t* d, const half_t* s, const int* r, const long long* a, long p, int rr, int m, long dd, long n, int g) { move_rows(d, s, r, a, p, rr, m, dd, n, g); }
__global__ void preview_f32(float* d, const float* s, int c, int nf, long h, long w, int sy, int sx, long n) { preview(d, s, c, nf, h, w, sy, sx, n); }
__global__ void preview_f16(float* d, const half_t* s, int c, int nf, long h, long w, int sy, int sx, long n) { preview(d, s, c, nf, h, w, sy, sx, n); }
__global__ void to_u8_f32(unsigned char* d, unsigned char* f, const float* s, int c, long hw, long n) { to_u8(d, f, s, c, hw, n); }
__global__ void to_u8_f16(unsigned char* d, unsigned char* f, const half_t* s, int c, long hw, long n) { to_u8(d, f, s, c, hw, n); }
__global__ void from_u8_f32(float* d, const unsigned char* s, const float* lut, int c, long hw, long n) { from_u8(d, s, lut, c, hw, n); }
__global__ void from_u8_f16(half_t* d, const unsigned char* s, const float* lut, int c, long hw, long n) { from_u8(d, s, lut, c, hw, n); }
__global__ void randn_f32(float* o, long per_row, long n, const long long* s) { randn(o, per_row, n, s); }
__global__ void randn_f16(half_t* o, long per_row, long n, const long long* s) { randn(o, per_row, n, s); }
// one draw per randn launch: the counter of every row that advances
__global__ void advance(long long* s, const long long* adv, int rows) {
  int b = blockIdx.x * blockDim.x + threadIdx.x; if (b < rows) s[2 * b + 1] += adv[b];
}
__global__ void lincomb_f32(float* d, float a, const float* x, float b, const float* y, long n) { lincomb(d, a, x, b, y, n); }
__global__ void lincomb_f16(half_t* d, float a, const half_t* x, float b, const half_t* y, long n) { lincomb(d, a, x, b, y, n); }
__global__ void lincomb_rows_f32(float* d, const float* a, const float* x, const float* b, const float* y, long p, long n) { lincomb_rows(d, a, x, b, y, p, n); }
__global__ void lincomb_rows_f16(half_t* d, const float* a, const half_t* x, const float* b, const half_t* y, long p, long n) { lincomb_rows(d, a, x, b, y, p, n); }
__global__ void clamp_f32(float* d, const float* s, long n) { clamp1(d, s, n); }
__global__ void clamp_f16(half_t* d, const half_t* s, long n) { clamp1(d, s, n); }
__global__ void ring_copy_f32(float* m, const float* kv, const long long* slot, const long long* a, int k, long s, long n) { ring_copy(m, kv, slot, a, k, s, n); }
__global__ void ring_copy_f16(half_t* m, const half_t* kv, const long long* slot, const long long* a, int k, long s, long n) { ring_copy(m, kv, slot, a, k, s, n); }
// after the copy, per row: every filled slot ages by one, the written slot becomes age 1, the slot advances
__global__ void ring_advance(int* ages, long long* slot, const long long* advance, int batch, int k) {
  int b = blockIdx.x * blockDim.x + threadIdx.x;
  if (b >= batch || !advance[b]) return;
  for (int i = 0; i < k; ++i) ages[b * k + i] += ages[b * k + i] > 0;
  ages[b * k + slot[b]] = 1;
  slot[b] = (slot[b] + 1) % k;
}
__global__ void fill_i64(long long* d, long long v, long n) { long i = blockIdx.x * (long)blockDim.x + threadIdx.x; if (i < n) d[i] = v; }
__global__ void fill_f32(float* d, float v, long n) { long i = blockIdx.x * (long)blockDim.x + threadIdx.x; if (i < n) d[i] = v; }
__global__ void fill_u8(unsigned char* d, int v, long n) { long i = blockIdx.x * (long)blockDim.x + threadIdx.x; if (i < n) d[i] = v; }
}
"""

def compile_module(source: str, name: str, capability: tuple[int, int]):
    """NVRTC-compile CUDA C++ `source` for one compute capability and load it (the current
    context's module); a compile error carries NVRTC's log."""
    driver, nvrtc, _ = _import()
    prog = call(nvrtc.nvrtcCreateProgram, source.encode(), name.encode(), 0, [], [])
    opts = [f"--gpu-architecture=sm_{capability[0]}{capability[1]}".encode(), b"-std=c++17", b"--use_fast_math"]
    try:
        call(nvrtc.nvrtcCompileProgram, prog, len(opts), opts)
    except CudaError as e:
        log = b" " * call(nvrtc.nvrtcGetProgramLogSize, prog)
        call(nvrtc.nvrtcGetProgramLog, prog, log)
        raise CudaError(f"{e}\n{log.decode(errors='replace')}") from e
    cubin = b" " * call(nvrtc.nvrtcGetCUBINSize, prog)
    call(nvrtc.nvrtcGetCUBIN, prog, cubin)
    call(nvrtc.nvrtcDestroyProgram, prog)
    return call(driver.cuModuleLoadData, cubin)


def launch(fn, n: int, args, stream, threads: int = 256) -> None:
    """Launch `fn` over n elements (1-D grid) on `stream`; args are (value, ctypes type) pairs."""
    values, types = zip(*args)
    call(_import()[0].cuLaunchKernel, fn, max(1, (n + threads - 1) // threads), 1, 1, threads, 1, 1, 0, stream,
         (values, types), 0)


_SUFFIX = {"float32": "f32", "float16": "f16"}


class CudaOps:
    """The frame loop's `Ops` on DeviceBuffers: kernels launched on one stream (the compute
    stream), so they are captured with the engine calls into the frame graph."""

    def __init__(self, device: Device, stream):
        self.dev, self.stream = device, stream
        self.driver = _import()[0]
        self.module = compile_module(_KERNELS, "mirage_loop.cu", device.capability)
        self.fn = {}
        # video_io.to_float of every byte, for from_u8 (a table is exact; a fast-math division is not)
        from mirage.core.video_io import to_float

        table = to_float(np.arange(256, dtype=np.uint8))
        self.to_float_table = device.empty(table.shape, "float32")
        call(device.rt.cudaMemcpy, self.to_float_table.ptr, table.ctypes.data, table.nbytes,
             device.rt.cudaMemcpyKind.cudaMemcpyHostToDevice)

    def _launch(self, name: str, n: int, *args) -> None:
        fn = self.fn.get(name)
        if fn is None:
            fn = self.fn[name] = call(self.driver.cuModuleGetFunction, self.module, name.encode())
        launch(fn, n, args, self.stream)

    @staticmethod
    def _p(buf: DeviceBuffer, offset: int = 0):
        return buf.ptr + offset, ctypes.c_void_p

    @staticmethod
    def _n(n: int):
        return n, ctypes.c_long

    def randn_(self, buf, rng, advance):
        rows = buf.shape[0]
        self._launch(f"randn_{_SUFFIX[buf.dtype]}", buf.size, self._p(buf), self._n(buf.size // rows),
                     self._n(buf.size), self._p(rng))
        self._launch("advance", rows, self._p(rng), self._p(advance), (rows, ctypes.c_int))

    def lincomb_(self, dst, a, x, b, y):
        if not (dst.dtype == x.dtype == y.dtype and dst.size == x.size == y.size):
            raise CudaError(f"lincomb of {x.dtype}{x.shape} and {y.dtype}{y.shape} into {dst.dtype}{dst.shape}")
        self._launch(f"lincomb_{_SUFFIX[dst.dtype]}", dst.size, self._p(dst), (a, ctypes.c_float), self._p(x),
                     (b, ctypes.c_float), self._p(y), self._n(dst.size))

    def lincomb_rows_(self, dst, a, x, b, y):
        rows = dst.shape[0]
        if not (dst.dtype == x.dtype == y.dtype and dst.size == x.size == y.size and a.dtype == b.dtype == "float32"
                and a.size == b.size == rows):
            raise CudaError(f"lincomb_rows of {x.dtype}{x.shape} and {y.dtype}{y.shape} by {a.dtype}{a.shape} into "
                            f"{dst.dtype}{dst.shape}")
        self._launch(f"lincomb_rows_{_SUFFIX[dst.dtype]}", dst.size, self._p(dst), self._p(a), self._p(x), self._p(b),
                     self._p(y), self._n(dst.size // rows), self._n(dst.size))

    def clamp_(self, dst, src):
        self._launch(f"clamp_{_SUFFIX[dst.dtype]}", dst.size, self._p(dst), self._p(src), self._n(dst.size))

    def ring_write_(self, memory, ages, slot, kv, advance):
        batch, k = memory.shape[0], memory.shape[1]
        per_slot = kv.size // batch
        self._launch(f"ring_copy_{_SUFFIX[memory.dtype]}", kv.size, self._p(memory), self._p(kv), self._p(slot),
                     self._p(advance), (k, ctypes.c_int), self._n(per_slot), self._n(kv.size))
        self._launch("ring_advance", batch, self._p(ages), self._p(slot), self._p(advance), (batch, ctypes.c_int),
                     (k, ctypes.c_int))

    def scatter_rows_(self, dst, src, rows, advance, axis):
        self._move_rows(src, dst, rows, axis, advance)

    def gather_rows_(self, dst, src, rows, axis):
        self._move_rows(dst, src, rows, axis, None)

    def _move_rows(self, near, far, rows, axis: int, advance) -> None:
        """near (B, ..., M, ...) <-> rows `rows` (B, M) of far (B, ..., R, ...) along `axis`: a scatter into far
        (rows that advance) when `advance` is given, else a gather into near."""
        b, m, r = near.shape[0], near.shape[axis], far.shape[axis]
        p, d = math.prod(near.shape[1:axis]), math.prod(near.shape[axis + 1:])
        if (near.dtype != far.dtype or far.shape[:axis] + far.shape[axis + 1:] != near.shape[:axis] + near.shape[axis + 1:]
                or rows.dtype != "int32" or rows.shape != (b, m)):
            raise CudaError(f"moving rows {rows.dtype}{rows.shape} between {near.dtype}{near.shape} and "
                            f"{far.dtype}{far.shape}")
        dst, src = (far, near) if advance is not None else (near, far)
        self._launch(f"move_rows_{_SUFFIX[near.dtype]}", near.size, self._p(dst), self._p(src), self._p(rows),
                     self._p(advance if advance is not None else rows), self._n(p), (r, ctypes.c_int),
                     (m, ctypes.c_int), self._n(d), self._n(near.size), (int(advance is None), ctypes.c_int))

    def preview_(self, dst, src):
        b, c, nf, h, w = src.shape
        if dst.dtype != "float32" or dst.shape[:2] != (b * nf, 3) or dst.shape[2] % h or dst.shape[3] % w:
            raise CudaError(f"preview_ of {src.dtype}{src.shape} into {dst.dtype}{dst.shape}")
        self._launch(f"preview_{_SUFFIX[src.dtype]}", dst.size, self._p(dst), self._p(src), (c, ctypes.c_int),
                     (nf, ctypes.c_int), self._n(h), self._n(w), (dst.shape[2] // h, ctypes.c_int),
                     (dst.shape[3] // w, ctypes.c_int), self._n(dst.size))

    def zero_(self, buf, offset: int = 0, nbytes: int | None = None):
        n = buf.nbytes - offset if nbytes is None else nbytes
        self._launch("fill_u8", n, self._p(buf, offset), (0, ctypes.c_int), self._n(n))

    def to_uint8_(self, dst, finite, src):
        b, c, h, w = src.shape
        if dst.dtype != "uint8" or dst.shape != (b, h, w, c) or finite.dtype != "uint8" or finite.shape != (b,):
            raise CudaError(f"to_uint8_ of {src.dtype}{src.shape} into {dst.dtype}{dst.shape}, {finite.dtype}{finite.shape}")
        self._launch("fill_u8", b, self._p(finite), (1, ctypes.c_int), self._n(b))
        self._launch(f"to_u8_{_SUFFIX[src.dtype]}", src.size, self._p(dst), self._p(finite), self._p(src),
                     (c, ctypes.c_int), self._n(h * w), self._n(src.size))

    def to_float_(self, dst, src):
        b, c, h, w = dst.shape
        if src.dtype != "uint8" or src.shape != (b, h, w, c):
            raise CudaError(f"to_float_ of {src.dtype}{src.shape} into {dst.dtype}{dst.shape}")
        self._launch(f"from_u8_{_SUFFIX[dst.dtype]}", dst.size, self._p(dst), self._p(src), self._p(self.to_float_table),
                     (c, ctypes.c_int), self._n(h * w), self._n(dst.size))

    def reset_row_(self, buf, row: int, seed: int):
        """Kernels on the compute stream, nothing more: the seed is a kernel argument (cuLaunchKernel
        copies it at the launch), where a copy from host memory would need that memory kept alive
        until the copy ran, and a wait to know when."""
        for b in (buf.memory, buf.ages, buf.slot):
            per_row = b.nbytes // b.shape[0]
            self.zero_(b, row * per_row, per_row)
        self.seed_row_(buf.rng, row, seed)

    def seed_row_(self, rng, row: int, seed: int):
        per_row = rng.nbytes // rng.shape[0]  # rng (B, 2) int64: (seed, counter)
        self.zero_(rng, row * per_row, per_row)
        self._launch("fill_i64", 1, self._p(rng, row * per_row), (int64_bits(seed), ctypes.c_longlong), self._n(1))

    def fill_(self, buf, value: float):
        if buf.dtype == "int64":
            self._launch("fill_i64", buf.size, self._p(buf), (int(value), ctypes.c_longlong), self._n(buf.size))
            return
        if buf.dtype != "float32":
            raise CudaError(f"fill_ writes float32 and int64 buffers, not {buf.dtype}")
        self._launch("fill_f32", buf.size, self._p(buf), (value, ctypes.c_float), self._n(buf.size))

    def close(self) -> None:
        if getattr(self, "module", None) is not None:
            call(self.driver.cuModuleUnload, self.module)
            self.module = None
