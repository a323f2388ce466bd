"""Device timing for kernel benchmarks (scripts/bench_*.py): CUDA-graph replays timed with
events, so host launch cost (ctypes, Python) stays out of the number, and the copy bandwidth
measured on the same device as the yardstick for memory-bound kernels."""
from __future__ import annotations

from typing import Callable


def device_ms(fn: Callable[[], object], calls: int = 50, repeats: int = 7) -> float:
    """Median device time per call in ms: `calls` calls captured in one CUDA graph (after a
    warm-up on a side stream, PyTorch's capture rule), each replay timed with events."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes read + written per second by a 1 GiB device-to-device copy, measured here."""
    import torch

    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / (device_ms(lambda: y.copy_(x), calls=5) * 1e-3)
