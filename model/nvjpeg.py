"""Batched JPEG decode / encode on a CUDA GPU with torchvision's nvJPEG ops, for the server
(runtime/codec.py batches the calls; TorchGpu.jpeg makes this for the PyTorch backend's device).

Images are uint8 both ways on the host: (H, W, 3) RGB arrays in, JPEG bytes out, and the reverse; only
bytes cross PCIe (a 512x512 frame is 768 KiB raw, ~40 KiB as a JPEG).
"""
from __future__ import annotations

import numpy as np
import torch


class NvJpeg:
    name = "nvjpeg"

    def __init__(self, device: torch.device):
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

        self.device, self._decode, self._encode, self._rgb = device, decode_jpeg, encode_jpeg, ImageReadMode.RGB
        # its own stream: the codec's copies and kernels never queue behind (or hold up) the frame graph's
        self.stream = torch.cuda.Stream(device)

    def decode_batch(self, images: list[bytes]) -> list[np.ndarray]:
        """JPEG files -> (H, W, 3) uint8 RGB host arrays, decoded on the GPU in one batched call."""
        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in images]  # the input stays on the CPU
        with torch.cuda.stream(self.stream):
            decoded = self._decode(data, mode=self._rgb, device=self.device)
            return [d.permute(1, 2, 0).contiguous().cpu().numpy() for d in decoded]  # .cpu() waits for the stream

    def encode_batch(self, images: list[np.ndarray], quality: int) -> list[bytes]:
        """(H, W, 3) uint8 RGB host arrays -> JPEG files, encoded on the GPU in one batched call.

        torchvision's nvJPEG encoder (0.2x, encode_jpegs_cuda.cpp) orders nothing against the caller's stream:
        it reads the images on a stream of its own without waiting for ours, the event it makes ours wait on is
        recorded before its work, and it copies each bitstream out on the legacy default stream. Under load
        (a served step on the GPU) replies came back as bytes no decoder could read; so the images are complete
        before it starts, and its copies are waited for before ours reads them back."""
        with torch.cuda.stream(self.stream):
            chw = [torch.from_numpy(np.ascontiguousarray(i)).to(self.device).permute(2, 0, 1).contiguous()
                   for i in images]
            self.stream.synchronize()
            encoded = self._encode(chw, quality=quality)
            # the legacy default stream: PyTorch's own streams, the frame graph's among them, are non-blocking,
            # so this waits for the encoder's copies alone, not for a step in flight
            torch.cuda.default_stream(self.device).synchronize()
            return [e.cpu().numpy().tobytes() for e in encoded]
