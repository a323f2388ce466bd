"""Batched JPEG decode on a CUDA GPU with torchvision's nvJPEG op, for the server (runtime/codec.py batches
the calls; TorchGpu.jpeg makes this for the PyTorch backend's device): JPEG bytes in, (H, W, 3) uint8 RGB host
arrays out; only bytes cross PCIe (a 512x512 frame is 768 KiB raw, ~40 KiB as a JPEG).

Replies are encoded by Pillow in the server's codec threads, not here. torchvision's nvJPEG encoder (0.2x,
encode_jpegs_cuda.cpp) orders nothing against the caller: it reads the images on a stream of its own without
waiting for the caller's, records the event it makes the caller wait on before its work, and copies each
bitstream out on the legacy default stream. Read back on our own stream, replies under a served load came back
unreadable (the H100 glass-to-glass run's Python client); ordered correctly, the read waits for the copy on the
default stream, which is where the frame graph replays (TorchGpu's compute stream), so every encode waited for
the step in flight: 24 ms a reply for `base` x 16 on an H100, against 3-4 ms before (docs/PERF.md, twelfth
session).
"""
from __future__ import annotations

import numpy as np
import torch


class NvJpeg:
    name = "nvjpeg"

    def __init__(self, device: torch.device):
        from torchvision.io import ImageReadMode, decode_jpeg

        self.device, self._decode, self._rgb = device, decode_jpeg, ImageReadMode.RGB
        # its own stream: the codec's copies and kernels never queue behind (or hold up) the frame graph's
        self.stream = torch.cuda.Stream(device)

    def decode_batch(self, images: list[bytes]) -> list[np.ndarray]:
        """JPEG files -> (H, W, 3) uint8 RGB host arrays, decoded on the GPU in one batched call."""
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]  # the input stays on the CPU
        with torch.cuda.stream(self.stream):
            decoded = self._decode(data, mode=self._rgb, device=self.device)
            return [d.permute(1, 2, 0).contiguous().cpu().numpy() for d in decoded]  # .cpu() waits for the stream
