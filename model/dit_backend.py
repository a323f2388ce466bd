"""The Wan DiT as a backend of the runtime's block unit (mirage.core.dit_step.BlockUnit): its pure graph
modules (mirage.model.dit_graphs) on torch buffers, the PyTorch twin of a DiT artifact's ONNX Runtime or
TensorRT graphs. mirage.bridge.pipeline hands it, with its torch plumbing, to runtime.Pipeline."""
from __future__ import annotations

import torch

from mirage.core import graphs as G
from mirage.model.dit import WanDiT
from mirage.model.dit_graphs import DiTGraph

# inputs that stay float32 and int32 whatever the model's dtype (the graphs' specs: float64 math made on the host)
_FIXED = {G.T_EMB: "float32", G.ROPE_COS: "float32", G.ROPE_SIN: "float32", G.VALID: "float32", G.SLOTS: "int32"}


class DiTTorchBackend:
    def __init__(self, model: WanDiT, specs: dict[str, G.GraphSpec], device: str, dtype: str = "float32"):
        self.device, self.dtype, self.specs = str(device), dtype, specs
        self.model = model.to(device=device, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
        self.graphs = {g: DiTGraph(self.model, g) for g in specs}

    def buffer_dtype(self, graph: str, name: str) -> str:
        return _FIXED.get(name, self.dtype)

    def use_stream(self, stream) -> None:
        pass  # torch enqueues on its current stream, which the pipeline's GPU plumbing sets

    @torch.no_grad()
    def run(self, graph, inputs, output):
        spec = self.specs[graph]
        for x, out in zip(spec.outputs, self.graphs[graph](*[inputs[x.name] for x in spec.inputs])):
            output[x.name].copy_(out)

    def close(self):
        self.model = self.graphs = None
