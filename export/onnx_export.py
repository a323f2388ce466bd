"""Export the two graphs of a Mirage model to ONNX: `denoise` and `context_encode`.

Tensor names come from `mirage.core.graphs`, shared with the engine builder and runtime.
Shapes are static (batch B, the model's resolution and memory size) because static shapes
give TensorRT the best engines; `max_batch` makes the batch dimension dynamic instead (one
engine serving 1..max_batch independent streams through an optimization profile). Precisions:

* fp32: the reference. Attention is decomposed into MatMul/Softmax, because TensorRT-RTX
  has no fp32 kernel for the opset-23 `Attention` op.
* fp16: weights and activations in half precision; attention exports as `Attention`.
  GroupNormalization (opset 21+) accumulates its statistics in fp32 (stash_type=1), and
  `activation_range` measures the largest activation on real rollout inputs so the margin
  to fp16's 65504 is a number, not a hope.
* int8, fp8: see `quantize.py` (explicit Q/DQ on top of the fp32-with-`Attention` graph).

Every float input is in the graph's precision, except the timesteps `t` / `t_ctx` (float32:
they become sinusoidal embeddings and need the range) and `ages` (int32).
"""
from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mirage.core import graphs as G
from mirage.core.errors import MirageError
from mirage.model.unet import AttentionImpl, MirageUNet
from mirage.core.schedule import CONTEXT_NOISE, DEFAULT_STEPS
from mirage.train.rollout import rollout
from mirage.train.data import SyntheticVideo, v2v_input

EXTERNAL_DATA_BYTES = 1 << 30  # weights above this go to a side file (ONNX protobufs stop at 2 GB)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class ExportError(MirageError, ValueError):
    """The model could not be exported; the message says which graph and why."""


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"  # fp32 | fp16 (int8/fp8 are built on fp32 by quantize.py)
    batch: int = 1  # batch traced (and TensorRT's optimal batch): independent streams served by one call
    max_batch: int | None = None  # None: static batch; else the batch dim is dynamic in [1, max_batch]
    decompose_attention: bool | None = None  # None: decompose exactly when fp32 (see module docstring)
    opset: int = 23  # 23 has `Attention`; TensorRT >= 10.14 and TensorRT-RTX parse it
    temporal_attention: str = "onnx"  # onnx: stock ops / `Attention`; plugin: one custom node per layer

    def __post_init__(self) -> None:
        if self.max_batch is not None and not 1 <= self.batch <= self.max_batch:
            raise ExportError(f"batch {self.batch} must lie in [1, max_batch={self.max_batch}]")
        if self.temporal_attention not in ("onnx", "plugin"):
            raise ExportError(f"temporal_attention {self.temporal_attention!r}: choose onnx or plugin")


class DenoiseGraph(nn.Module):
    def __init__(self, model: MirageUNet):
        super().__init__()
        self.model, self.names = model, G.model_graphs(model.cfg)[G.DENOISE].input_names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        x = dict(zip(self.names, inputs))
        return self.model.denoise(x[G.X_T], x[G.T], x.get(G.COND), x[G.MEMORY], x[G.AGES])


class ContextGraph(nn.Module):
    def __init__(self, model: MirageUNet):
        super().__init__()
        self.model, self.names = model, G.model_graphs(model.cfg)[G.CONTEXT].input_names

    def forward(self, frame: torch.Tensor, t_ctx: torch.Tensor) -> torch.Tensor:
        return self.model.context_encode(frame, t_ctx)


def example_inputs(model: MirageUNet, graph: str, batch: int = 1, dtype: torch.dtype = torch.float32,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Random inputs at the graph's spec (for tracing and smoke tests): floats in `dtype`,
    timesteps mid-range, ages a full memory."""
    spec, g = G.model_graphs(model.cfg, batch)[graph], torch.Generator().manual_seed(seed)
    values = {}
    for x in spec.inputs:
        if x.name in (G.T, G.T_CTX):
            values[x.name] = torch.full(x.shape, 499.0 if x.name == G.T else 100.0)
        elif x.name == G.AGES:
            values[x.name] = torch.arange(x.shape[1], dtype=torch.int32).repeat(x.shape[0], 1)
        else:
            values[x.name] = torch.randn(x.shape, generator=g).to(dtype)
    return values


class CodecGraph(nn.Module):
    """One half of a latent model's autoencoder (encode or decode) as a graph; a temporal codec's (TAEHV's) takes
    its state as further inputs and gives the new state as further outputs."""

    def __init__(self, codec: nn.Module, graph: str):
        super().__init__()
        self.codec, self.fn = codec, codec.encode if graph == G.ENCODE else codec.decode

    def forward(self, *inputs: torch.Tensor):
        return self.fn(*inputs)


def graph_module(model: MirageUNet, graph: str, codec: nn.Module | None = None) -> nn.Module:
    """The module one exported graph traces; `codec` (model.latent.LatentCodec) for encode/decode."""
    if graph in (G.ENCODE, G.DECODE):
        if codec is None:
            raise ExportError(f"graph {graph} needs the latent model's autoencoder")
        return CodecGraph(codec, graph).eval()
    return (DenoiseGraph if graph == G.DENOISE else ContextGraph)(model).eval()


def export_graph(model: MirageUNet, graph: str, path: str | Path, options: ExportOptions,
                 codec: nn.Module | None = None) -> Path:
    """Export one graph to `path` (`codec`: a latent model's autoencoder, for encode/decode); returns the path."""
    if options.precision not in DTYPES:
        raise ExportError(f"precision {options.precision!r}: export takes fp32 or fp16 (int8/fp8 quantize fp32)")
    dtype = DTYPES[options.precision]
    decompose = options.precision == "fp32" if options.decompose_attention is None else options.decompose_attention
    plugin = options.temporal_attention == "plugin"
    impl = AttentionImpl(spatial="decomposed" if decompose else "sdpa", temporal="op" if plugin else "torch")
    net = model.with_attention(impl).to("cpu", dtype).eval()  # shares model's weights until .to converts them
    module = graph_module(net, graph, None if codec is None else copy.deepcopy(codec).to("cpu", dtype).eval())
    # torch.export specializes a dim it traces at size 1, so a dynamic batch is traced at >= 2
    dynamic = options.max_batch is not None and options.max_batch > 1
    inputs = example_inputs(net, graph, max(options.batch, 2) if dynamic else options.batch, dtype)
    output = G.model_graphs(net.cfg)[graph].output.name
    return export_module(module, graph, inputs, [output], path, options.opset,
                         _plugin_translation() if plugin else None, _batch_dims(graph, inputs, options))


def export_module(module: nn.Module, graph: str, inputs: dict[str, torch.Tensor], outputs: list[str],
                  path: str | Path, opset: int, translation: dict | None = None, dynamic_shapes=None) -> Path:
    """Trace `module` on `inputs` with the dynamo exporter and save it to `path`, weights over
    EXTERNAL_DATA_BYTES in a side file; any exporter failure is an ExportError naming `graph`."""
    big = sum(p.numel() * p.element_size() for p in module.parameters()) > EXTERNAL_DATA_BYTES
    path = Path(path)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation chatter is not the user's business
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(module, tuple(inputs.values()), dynamo=True, opset_version=opset,
                                        input_names=list(inputs), output_names=outputs, verbose=False,
                                        custom_translation_table=translation, dynamic_shapes=dynamic_shapes)
        except Exception as e:  # the exporter raises many types; all mean "this graph did not export"
            raise ExportError(f"{graph}: torch.onnx.export failed ({type(e).__name__}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from e
        program.save(str(path), external_data=big)
    return path


def _batch_dims(graph: str, inputs: dict[str, torch.Tensor], options: ExportOptions) -> tuple | None:
    if options.max_batch is None or options.max_batch == 1:
        return None
    batch = torch.export.Dim("batch", min=1, max=options.max_batch)
    dims = tuple({0: batch} for _ in inputs)
    return (dims,) if graph == G.DENOISE else dims  # DenoiseGraph takes *inputs: one argument


def _plugin_translation() -> dict:
    """mirage::temporal_attention -> one node in domain `mirage`, named and versioned as the
    TensorRT parser's plugin fallback expects (op_type = plugin name, plugin_version and
    plugin_namespace attributes; `heads` is a plugin field)."""
    import onnx
    import onnxscript

    _register_plugin_schema(onnx)
    domain = onnxscript.values.Opset(G.PLUGIN_NAMESPACE, 1)

    def translate(q, k_self, v_self, mem, ages, age_table, heads: int):
        return getattr(domain, G.PLUGIN_NAME)(q, k_self, v_self, mem, ages, age_table, heads=heads,
                                              plugin_version=G.PLUGIN_VERSION, plugin_namespace=G.PLUGIN_NAMESPACE)

    return {torch.ops.mirage.temporal_attention.default: translate}


def _register_plugin_schema(onnx) -> None:
    """onnxscript builds nodes only for ops with a schema; give the plugin node one (once)."""
    if onnx.defs.has(G.PLUGIN_NAME, G.PLUGIN_NAMESPACE):
        return
    S = onnx.defs.OpSchema
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    inputs = [S.FormalParameter(n, t) for n, t in [("q", "T"), ("k_self", "T"), ("v_self", "T"), ("memory", "T"),
                                                   ("ages", "I"), ("age_table", "T")]]
    onnx.defs.register_schema(S(
        G.PLUGIN_NAME, G.PLUGIN_NAMESPACE, 1, inputs=inputs, outputs=[S.FormalParameter("out", "T")],
        type_constraints=[("T", floats, "activations"), ("I", ["tensor(int32)", "tensor(int64)"], "slot ages")],
        attributes=[S.Attribute("heads", S.AttrType.INT, "attention heads"),
                    S.Attribute("plugin_version", S.AttrType.STRING, "TensorRT plugin version"),
                    S.Attribute("plugin_namespace", S.AttrType.STRING, "TensorRT plugin namespace")]))


@torch.no_grad()
def record_rollout_inputs(model: MirageUNet, frames: int = 8, steps: int = DEFAULT_STEPS, seed: int = 0,
                          context_noise: int = CONTEXT_NOISE) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Inputs both graphs see during a real rollout (fp32, CPU): for parity and calibration."""
    calls: dict[str, list] = {g: [] for g in G.model_graphs(model.cfg)}

    def record(event: dict) -> None:  # memory and x change in place later: keep copies
        calls[event["graph"]].append({k: v.clone() for k, v in event["inputs"].items()})

    model = model.to("cpu").float().eval()
    for _ in rollout(model, frames, steps=steps, seed=seed, cond=synthetic_cond(model.cfg, frames, 4242 + seed),
                     context_noise=context_noise, callback=record):
        pass
    return calls


def synthetic_cond(cfg, frames: int, seed: int) -> list[torch.Tensor] | None:
    """Video-to-video inputs of a synthetic clip (1, C, H, W) each; None for generation models."""
    if not cfg.cond_channels:
        return None
    clip = torch.from_numpy(SyntheticVideo(cfg.pixels, seed=seed).clip(0, frames)).permute(0, 3, 1, 2)
    return [v2v_input(f)[None] for f in clip]


@torch.no_grad()
def activation_range(model: MirageUNet, calls: dict[str, list[dict[str, torch.Tensor]]],
                     codec: nn.Module | None = None, module_for=graph_module) -> float:
    """Largest |activation| of any module output over the recorded real inputs (fp32);
    `module_for(model, graph, codec)` is the module a graph runs (another family's: its own)."""
    peak = 0.0

    def hook(_module, _inputs, output):
        nonlocal peak
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            peak = max(peak, float(output.detach().abs().max()))

    modules = list(model.modules()) + (list(codec.modules()) if codec is not None else [])
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        for graph, inputs in calls.items():
            module = module_for(model, graph, codec)
            for x in inputs:
                module(*x.values())
    finally:
        for h in handles:
            h.remove()
    return peak
