"""The PyTorch model as a backend of the frame loop: torch buffers, eager or compiled.

The knobs are mirage.core.config.PipelineOptions fields, so the fastest configuration measured
in docs/PERF.md (Inductor kernels over channels-last weights, frozen, captured in the frame's
CUDA graph) is a Pipeline option and a `mirage-run --fast` flag, not benchmark-only code.
"""
from __future__ import annotations

import dataclasses

import torch

from mirage.core import graphs as G
from mirage.core.errors import BackendError
from mirage.model.unet import MirageUNet


class TorchBackend:
    def __init__(self, model: MirageUNet, device: str, dtype: str = "float32", compile_mode: str | None = None,
                 channels_last: bool = False, freeze: bool = False, kernel_library: str | None = None,
                 precompute_time: bool = False, codec=None):
        self.device, self.dtype = str(device), dtype
        self.model = model.to(device=device, dtype=getattr(torch, dtype)).eval()
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if kernel_library:  # temporal attention through the fused plugins_cpp kernel
            if not self.device.startswith("cuda"):
                raise BackendError(f"the fused kernel library runs on CUDA devices, not {device!r}")
            from mirage.plugins_cpp import kernels

            try:
                kernels.use_in_torch(kernel_library)
            except (OSError, kernels.KernelError) as e:
                raise BackendError(f"{kernel_library}: {e}") from e
            self.model = self.model.with_attention(dataclasses.replace(self.model.attention, temporal="op"))
        # With fixed DDIM timesteps everything of the denoiser that depends on t alone (the time
        # MLP, every ResBlock's projection) is a constant per step: computed once per timestep
        # buffer (the loop allocates one per step and never refills it) on its first, eager, call.
        self.precompute_time = precompute_time
        self._shifts: dict[int, tuple] = {}
        self.denoise = self.model.denoise_shifted if precompute_time else self.model.denoise
        self.context = self.model.context_encode
        # a latent model's frozen autoencoder (model.latent.LatentCodec): compiled with the rest
        self.codec = None if codec is None else codec.to(device=device, dtype=getattr(torch, dtype)).eval()
        if self.codec is not None:
            self.encode, self.decode = self.codec.encode, self.codec.decode
        if compile_mode:
            # Inductor's freezing (weights become constants it can fold and re-layout) is an
            # options-dict setting, and torch.compile takes either a mode or options.
            kwargs = {"options": {"freezing": True}} if freeze else {"mode": compile_mode}
            self.denoise = torch.compile(self.denoise, **kwargs)
            self.context = torch.compile(self.context, **kwargs)
            if self.codec is not None:
                self.encode, self.decode = (torch.compile(f, **kwargs) for f in (self.encode, self.decode))
        self.no_grad = torch.no_grad()

    def buffer_dtype(self, graph: str, name: str) -> str:
        return {G.T: "float32", G.T_CTX: "float32", G.AGES: "int32"}.get(name, self.dtype)

    def use_stream(self, stream) -> None:
        pass  # torch enqueues on its current stream, which the pipeline's GPU plumbing sets

    def run(self, graph, inputs, output):
        with self.no_grad:
            if graph == G.DENOISE:
                t = self._time(inputs[G.T]) if self.precompute_time else inputs[G.T]
                out = self.denoise(inputs[G.X_T], t, inputs.get(G.COND), inputs[G.MEMORY], inputs[G.AGES])
            elif graph == G.CONTEXT:
                out = self.context(inputs[G.FRAME], inputs[G.T_CTX])
            elif graph == G.ENCODE:
                out = self.encode(inputs[G.IMAGE])
            else:
                out = self.decode(inputs[G.Z])
            output.copy_(out)

    def _time(self, t: torch.Tensor) -> tuple:
        key = t.data_ptr()
        if key not in self._shifts:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise BackendError("a timestep buffer first seen during CUDA-graph capture; warm up first")
            self._shifts[key] = self.model.time_shifts(t, getattr(torch, self.dtype))
        return self._shifts[key]

    def close(self):
        self.model = self.denoise = self.context = self.codec = None
