"""The Wan DiT as a backend of the runtime's block unit (mirage.core.dit_step.BlockUnit): its pure graph
modules (mirage.model.dit_graphs) on torch buffers, the PyTorch twin of a DiT artifact's ONNX Runtime or
TensorRT graphs, with its codec's `encode` / `decode` where the config has one: a per-frame autoencoder's
(mirage.model.latent.BlockCodec) or TAEHV's with their state (mirage.model.taehv.TaehvBlockCodec). mirage.bridge.pipeline hands it, with its torch plumbing, to runtime.Pipeline."""
from __future__ import annotations

import torch

from mirage.core import graphs as G
from mirage.model.dit import WanDiT
from mirage.model.dit_graphs import DiTGraph
from mirage.model.latent import BlockCodec, load_frame_codec
from mirage.model.taehv import TaehvBlockCodec, TaehvDecoder

def block_codec(cfg, taehv: TaehvDecoder | None = None) -> BlockCodec | TaehvBlockCodec | None:
    """The codec of a config's encode / decode graphs, as they lay out a block: its per-frame autoencoder (its hash
    checked), or `taehv` for a config with codec "taehv"; None for neither (or no TAEHV given)."""
    if cfg.autoencoder:
        return BlockCodec(load_frame_codec(cfg), cfg.block_frames)
    if cfg.codec == "taehv" and taehv is not None:
        return TaehvBlockCodec(taehv, cfg.block_frames)
    return None


# inputs that stay float32 and int32 whatever the model's dtype (the graphs' specs: float64 math made on the host)
_FIXED = {G.T_EMB: "float32", G.ROPE_COS: "float32", G.ROPE_SIN: "float32", G.VALID: "float32", G.SLOTS: "int32"}


class DiTTorchBackend:
    def __init__(self, model: WanDiT, specs: dict[str, G.GraphSpec], device: str, dtype: str = "float32",
                 codec: BlockCodec | TaehvBlockCodec | None = None, compile_mode: str | None = None):
        self.device, self.dtype, self.specs = str(device), dtype, specs
        self.model = model.to(device=device, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
        # the held rows as a bias broadcast over the queries, not the exported graphs' boolean mask (dit_graphs)
        self.graphs = {g: DiTGraph(self.model, g, "bias") for g in specs if g in G.DIT_GRAPHS}
        if G.DECODE in specs:
            if codec is None:
                raise ValueError(f"{model.cfg.name}'s graphs include a codec's: pass the codec")
            codec = codec.to(device=device, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
            self.graphs.update({G.ENCODE: codec.encode, G.DECODE: codec.decode})
        if compile_mode:
            # Inductor's kernels (the runtime captures them in the block's CUDA graph, as the U-Net's). Eager, a
            # wan-1.3b block at batch 2 spent 234 of its 605 ms in unfused pointwise and copy kernels
            # (scripts/bench_dit_block.py); its shapes are the specs', so nothing recompiles. Compiling is most
            # of a served wan-1.3b's start (187 s), so: the cache-write pass is the step's pass without its
            # velocity (the same inputs and shapes) and runs the step's compiled graph, not a second compile
            # of its 30 layers; the text graph runs once a prompt, outside the block, and stays eager.
            compiled = {g: torch.compile(f, mode=compile_mode, dynamic=False) for g, f in self.graphs.items()
                        if g not in (G.DIT_TEXT, G.DIT_CACHE_WRITE)}
            if G.DIT_CACHE_WRITE in self.graphs:
                step = compiled[G.DIT_STEP]
                compiled[G.DIT_CACHE_WRITE] = lambda *inputs: step(*inputs)[1:]  # (k, v) of (velocity, k, v)
            self.graphs.update(compiled)

    def buffer_dtype(self, graph: str, name: str) -> str:
        return _FIXED.get(name, self.dtype)

    def use_stream(self, stream) -> None:
        pass  # torch enqueues on its current stream, which the pipeline's GPU plumbing sets

    @torch.no_grad()
    def run(self, graph, inputs, output):
        spec = self.specs[graph]
        outs = self.graphs[graph](*[inputs[x.name] for x in spec.inputs])
        buffers = output if isinstance(output, dict) else {spec.output.name: output}
        for x, out in zip(spec.outputs, (outs,) if torch.is_tensor(outs) else outs):
            buffers[x.name].copy_(out)

    def close(self):
        self.model = self.graphs = None
