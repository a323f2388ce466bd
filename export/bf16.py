"""bf16 graphs: how they are traced, and the only way their numbers can be checked on a CPU.

A bf16 graph holds its weights and computes in bfloat16 (TensorRT-RTX networks are strongly typed: its
engine runs the MatMuls and `Attention` in bf16 because the ONNX says so), behind float32 inputs and
outputs: numpy, hence the graph specs and every runtime buffer, has no bfloat16, so the tensors an fp16
graph takes in half precision come in as float32 and are cast inside (the 8-bit Q/DQ graphs do the same).
The cost is float32 I/O: the KV cache's buffers are twice a bf16 cache's bytes.

ONNX Runtime's CPU provider has no bf16 kernels for MatMul, Gemm, Sigmoid and most other ops, so a bf16
graph does not load there, and its engine needs a GPU. What runs instead is the graph's *widened twin*
(`widened_twin`): every op that touches a bf16 tensor gets its bf16 inputs cast to float32 and its
float32 results rounded back to bf16. Every tensor between ops is stored in bf16 as in the graph;
inside an op the arithmetic is float32 (a GPU's bf16 MatMul also accumulates in float32). It is not
the engine: TensorRT fuses ops (fewer roundings) and its attention kernel may round its probabilities
to bf16 (one more), and ONNX Runtime's own graph optimizations, on for every parity session, move a few
rounding points (dit-tiny's dit_step: rel <= 2e-3 per output between the twin optimized and unoptimized,
each ~7e-3 from PyTorch fp32).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from mirage.core import graphs as G

# what a manifest's parity says was executed for a bf16 artifact
CHECKED = ("the bf16 graphs' widened twins on ONNX Runtime (bf16 tensors between ops, float32 arithmetic inside "
           "each op; mirage.export.bf16); not the bf16 graphs themselves (ONNX Runtime's CPU provider has no bf16 "
           "MatMul) nor their engines (TensorRT needs a GPU)")
# ops whose output type is an attribute, not their inputs' type: they run in bf16 on ONNX Runtime as they are
_TYPED_BY_ATTRIBUTE = ("Cast", "Constant")


class Bf16Io(nn.Module):
    """A graph module whose model is in bf16, traced behind float32 I/O: the inputs an fp16 graph takes in
    half precision (`half`, that graph's spec) are cast to bf16, the rest (timestep embeddings, RoPE angles,
    masks, slots) pass as they are, as in fp16; every output is cast to float32."""

    def __init__(self, module: nn.Module, half: G.GraphSpec):
        super().__init__()
        self.module, self.cast = module, [x.dtype == "float16" for x in half.inputs]

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        inputs = tuple(x.to(torch.bfloat16) if cast else x for x, cast in zip(inputs, self.cast))
        return tuple(y.float() for y in self.module(*inputs))


def widened_twin(src: str | Path) -> Path:
    """Write `src`'s widened twin (see the module docstring) beside it, as a hidden file the caller removes, and
    return its path. Its weights are `src`'s, never loaded: in the twin as they were, or `src`'s external
    data file, which the twin reads from the same folder (ONNX Runtime reads none outside a model's folder)."""
    import onnx
    from onnx import TensorProto, helper

    src = Path(src)
    dst = src.with_name(f".{src.stem}.widened{src.suffix}")
    model = onnx.shape_inference.infer_shapes(onnx.load(str(src), load_external_data=False), strict_mode=True)
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    types.update((t.name, t.data_type) for t in graph.initializer)
    taken = set(types) | {y for n in graph.node for y in n.output}

    def fresh(name: str) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    nodes, widened = [], {}
    for node in graph.node:
        if node.op_type in _TYPED_BY_ATTRIBUTE or not any(types.get(x) == TensorProto.BFLOAT16
                                                          for x in (*node.input, *node.output)):
            nodes.append(node)
            continue
        for i, x in enumerate(node.input):
            if types.get(x) == TensorProto.BFLOAT16:
                if x not in widened:  # one widening per tensor, shared by its readers
                    widened[x] = fresh(f"{x}__f32")
                    nodes.append(helper.make_node("Cast", [x], [widened[x]], to=TensorProto.FLOAT))
                node.input[i] = widened[x]
        rounded = []
        for i, y in enumerate(node.output):
            if types.get(y) == TensorProto.BFLOAT16:
                node.output[i] = fresh(f"{y}__exact")
                rounded.append(helper.make_node("Cast", [node.output[i]], [y], to=TensorProto.BFLOAT16))
        nodes += [node, *rounded]
    del graph.node[:], graph.value_info[:]  # the renamed results' inferred types are stale
    graph.node.extend(nodes)
    onnx.save(model, str(dst))
    return dst


@contextlib.contextmanager
def parity_graphs(files: dict[str, Path], precision: str) -> Iterator[tuple[dict[str, Path], str]]:
    """(graph -> file that ONNX Runtime runs for parity, what that is): the exported graphs themselves, or
    for bf16 their widened twins, beside them until the block ends."""
    if precision != "bf16":
        yield files, "the exported graphs"
        return
    twins: dict[str, Path] = {}
    try:
        for graph, path in files.items():
            twins[graph] = widened_twin(path)
        yield twins, CHECKED
    finally:
        for twin in twins.values():
            twin.unlink(missing_ok=True)
