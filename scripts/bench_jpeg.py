"""Where a served 512² frame's decode time goes (GPU): nvJPEG's batched decode with the GPU idle and while a
frame-graph-sized load runs on another stream, Pillow's decode, and the U-Net's restore-input conversion.

    python scripts/bench_jpeg.py                  # 8 JPEGs of 512x512 (base-512 x 8 streams), a 24 ms load
    python scripts/bench_jpeg.py --size 256 --batch 16 --load-ms 20

The server's "decode" stage (runtime/server.py: decode_frame) is the JPEG decode plus, for a model that
restores its input (the U-Net's video-to-video), core/video_io.py: v2v_input_u8. Served base-512 x 8 measured
11.6 ms per decode on an H100 beside a 23.8 ms batch step; this splits it: if nvJPEG's decode waits for work
on other streams (a device-wide sync inside the library), its time under load approaches the load's.
Medians of --rounds, host wall clock (the server's stages are host wall clock too). Prints a table and writes
the JSON (default docs/bench/<date>_<gpu>_jpeg_<size>.json).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import io
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from mirage.core.report import device_tag, write_json
from mirage.core.synthetic import SyntheticVideo
from mirage.core.video_io import to_uint8, v2v_input_u8
from mirage.model.nvjpeg import NvJpeg


def jpegs(size: int, count: int) -> list[bytes]:
    video = SyntheticVideo(size, seed=3)
    out = []
    for n in range(count):
        buf = io.BytesIO()
        Image.fromarray(to_uint8(video.clip(0, 1, start=n)[0])).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def median_ms(fn, rounds: int) -> float:
    fn()  # warm: first-call costs (nvJPEG handles, allocations) stay out
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def load_kernel(load_ms: float):
    """A matmul loop on its own stream that keeps the GPU busy about load_ms (a batch step's stand-in)."""
    stream = torch.cuda.Stream()
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    with torch.cuda.stream(stream):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            a @ a
        end.record()
    end.synchronize()
    per = start.elapsed_time(end) / 10
    reps = max(1, round(load_ms / per))

    def launch():
        with torch.cuda.stream(stream):
            for _ in range(reps):
                a @ a
        return stream
    return launch, reps * per


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=8, help="JPEGs per batch (the served streams)")
    p.add_argument("--load-ms", type=float, default=24.0, help="the other stream's work while decoding")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: bench_jpeg times nvJPEG on a CUDA GPU; this machine has none")
    if importlib.util.find_spec("torchvision") is None:
        sys.exit("error: bench_jpeg needs torchvision (its nvJPEG decode): pip install torchvision")

    data = jpegs(args.size, args.batch)
    codec = NvJpeg(torch.device("cuda"))
    launch, load_ms = load_kernel(args.load_ms)
    threads = ThreadPoolExecutor(args.batch)
    rgb = np.asarray(Image.open(io.BytesIO(data[0])).convert("RGB"))

    def under_load(fn):
        def run():
            stream = launch()
            fn()
            stream.synchronize()
        return run

    def pillow(b):
        return np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))

    rows = {
        "nvjpeg batch, GPU idle": median_ms(lambda: codec.decode_batch(data), args.rounds),
        "nvjpeg batch, under load": median_ms(under_load(lambda: codec.decode_batch(data)), args.rounds),
        "load alone": median_ms(under_load(lambda: None), args.rounds),
        "nvjpeg one image, GPU idle": median_ms(lambda: codec.decode_batch(data[:1]), args.rounds),
        "pillow one image": median_ms(lambda: pillow(data[0]), args.rounds),
        f"pillow batch in {args.batch} threads": median_ms(lambda: list(threads.map(pillow, data)), args.rounds),
        f"pillow batch in {args.batch} threads, under load":
            median_ms(under_load(lambda: list(threads.map(pillow, data))), args.rounds),
        "restore input (v2v_input_u8), one frame": median_ms(lambda: v2v_input_u8(rgb), args.rounds),
    }
    device = torch.cuda.get_device_name()
    print(f"{device}: {args.batch} JPEGs of {args.size}x{args.size} ({sum(map(len, data)) / len(data) / 1024:.0f} KiB "
          f"each), load {load_ms:.1f} ms on another stream; host wall ms, median of {args.rounds}")
    for name, ms in rows.items():
        print(f"  {name:48s} {ms:8.2f} ms")
    today = datetime.date.today().isoformat()
    path = args.json or f"docs/bench/{today}_{device_tag(device)}_jpeg_{args.size}.json"
    write_json(path, {"date": today, "device": device, "torch": torch.__version__, "size": args.size,
                      "batch": args.batch, "load_ms": load_ms, "rounds": args.rounds, "median_ms": rows,
                      "command": "python scripts/bench_jpeg.py " + " ".join(
                          f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
