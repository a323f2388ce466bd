"""TAEHV as the runtime's temporal codec (issue 29): its specs (mirage.core.graphs.taehv_graphs, the layout in
mirage.core.taehv_layout) against the module, and its pure graph modules (model.taehv.TaehvBlockCodec) against
Taehv's own streaming encode / decode, block by block, each row its own video; CPU, a random TAEHV at 32x32."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from mirage.core import graphs as G
from mirage.core.config import ConfigError, DiTConfig, from_json, get_dit_config, to_json
from mirage.core.taehv_layout import LATENT_CHANNELS
from mirage.model.taehv import Taehv, TaehvBlockCodec

CFG = dataclasses.replace(get_dit_config("dit-tiny"), width=32, height=32, codec="taehv")
N = CFG.block_frames
FRAMES = 4 * N  # video frames per block in and out
WARM_UP = 3


def random_taehv(seed: int, height: int, width: int) -> Taehv:
    """A random TAEHV whose frames depend on its input: each conv rescaled once to unit output std on random
    frames and latents (LSUV), its last conv to frames about 0.5 ± 0.15 (PyTorch's default init loses the signal
    in depth: its frames sit at the clamp, where no mistake of the runtime's would show)."""
    torch.manual_seed(seed)
    taehv = Taehv().eval().requires_grad_(False)

    def unit_std(conv, inputs, out):
        s = out.std()
        conv.weight.div_(s)
        if conv.bias is not None:
            conv.bias.div_(s)
        hooks.pop(conv).remove()
        return out / s

    hooks = {m: m.register_forward_hook(unit_std) for m in taehv.modules() if isinstance(m, nn.Conv2d)}
    taehv.encode(torch.rand(1, 5, 3, height, width) * 2 - 1)
    taehv.decode(torch.randn(1, LATENT_CHANNELS, 2, height // 8, width // 8))
    taehv.decoder[-1].weight.mul_(0.15)
    taehv.decoder[-1].bias.fill_(0.5)
    taehv.reset()
    return taehv


@pytest.fixture(scope="module")
def taehv() -> Taehv:
    return random_taehv(0, 32, 32)


def _threaded(graph, specs: G.GraphSpec):
    """graph (TaehvBlockCodec.encode / decode) with its state kept here between calls: call(x, fresh) -> output."""
    state = {name: torch.zeros(specs.tensor(name).shape) for name in G.state_inputs(specs)}

    def call(x: torch.Tensor, fresh: list[float]) -> torch.Tensor:
        out, *new = graph(x, torch.tensor(fresh), *state.values())
        state.update(zip(state, new))
        return out
    return call


def test_the_specs_follow_the_module_s_layout(taehv):
    """Every MemBlock's memory is a state input of its direction's graph, at the shape the module gives it (a
    mismatch between core's layout and the module fails here), and each comes back as <name>_next."""
    specs = G.model_graphs(CFG, 2)
    codec = TaehvBlockCodec(taehv, N)
    assert specs[G.ENCODE].tensor(G.IMAGE).shape == specs[G.DECODE].output.shape == (2 * FRAMES, 3, 32, 32)
    for graph, run in ((G.DECODE, codec.decode), (G.ENCODE, codec.encode)):
        spec = specs[graph]
        inputs = [torch.zeros(x.shape) for x in spec.inputs]
        outs = run(*inputs)
        assert [tuple(o.shape) for o in outs] == [x.shape for x in spec.outputs]
        assert [x.name for x in spec.outputs[1:]] == [G.next_state(n) for n in G.state_inputs(spec)]
    assert len(G.state_inputs(specs[G.DECODE])) == sum(type(m).__name__ == "MemBlock" for m in taehv.decoder) == 9
    assert G.state_inputs(specs[G.ENCODE])[0] == G.CARRY


def test_the_config_says_its_codec_and_old_files_still_load():
    assert from_json(DiTConfig, to_json(CFG)) == CFG
    saved = to_json(get_dit_config("wan-1.3b"))
    del saved["codec"]  # a checkpoint or manifest written before the field
    assert from_json(DiTConfig, saved).codec == ""
    assert set(G.model_graphs(get_dit_config("dit-tiny"))) == set(G.DIT_GRAPHS)  # no codec: no codec graphs
    for bad, message in ((dict(codec="vae"), "codec='vae': choose one of"),
                         (dict(codec="taehv", in_dim=4), "codec='taehv' codes Wan's latents")):
        with pytest.raises(ConfigError, match=message):
            dataclasses.replace(CFG, **bad)
    with pytest.raises(ConfigError, match="codec='taehv'"):
        dataclasses.replace(get_dit_config("dit-tiny-taesd"), codec="taehv")


def test_decode_streams_as_taehv_each_row_its_own_video(taehv):
    """Three blocks of two rows: row 0 a video from block 0, row 1 other latents in block 0 and a new video
    (fresh) from block 1. Each row's frames are Taehv.decode's of its video, the first block's 3 warm-up frames
    in front; and a fresh row ignores what its memory held."""
    torch.manual_seed(1)
    z = torch.randn(3, 2, 16, N, 4, 4)  # (block, row, ...)
    decode = _threaded(TaehvBlockCodec(taehv, N).decode, G.model_graphs(CFG, 2)[G.DECODE])
    got = [decode(z[k], fresh).unflatten(0, (2, FRAMES)) for k, fresh in enumerate(([1, 1], [0, 1], [0, 0]))]
    for row, start in ((0, 0), (1, 1)):
        taehv.reset()
        for k in range(start, 3):
            ref = taehv.decode(z[k, row:row + 1])[0]
            out = got[k][row, WARM_UP:] if k == start else got[k][row]
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    taehv.reset()
    taehv.decode(z[0, 1:2])
    assert (taehv.decode(z[1, 1:2])[0] - got[1][1]).abs().max() > 1e-3  # the memory matters: the check can fail


def test_encode_streams_as_taehv_with_the_first_frame_padded_in_front(taehv):
    """The same for encode: every block takes 4N new frames; the codec sees the carried 3 frames and the first
    4N - 3 new ones, so row r's latents are Taehv.encode's of its video split 4N - 3, 4N, 4N (the last 3 frames
    wait for the next block)."""
    torch.manual_seed(2)
    video = torch.rand(2, 3 * FRAMES, 3, 32, 32) * 2 - 1  # (row, frames, ...)
    encode = _threaded(TaehvBlockCodec(taehv, N).encode, G.model_graphs(CFG, 2)[G.ENCODE])
    blocks = video.unflatten(1, (3, FRAMES)).transpose(0, 1)  # (block, row, 4N, ...)
    got = [encode(blocks[k].flatten(0, 1), fresh) for k, fresh in enumerate(([1, 1], [0, 1], [0, 0]))]
    for row, start in ((0, 0), (1, 1)):
        taehv.reset()
        frames = video[row:row + 1, start * FRAMES:]
        cuts = [0, FRAMES - WARM_UP] + [FRAMES - WARM_UP + FRAMES * i for i in range(1, 3 - start)]
        for k, (a, b) in zip(range(start, 3), zip(cuts, cuts[1:])):
            torch.testing.assert_close(got[k][row], taehv.encode(frames[:, a:b])[0], atol=1e-5, rtol=0)


class _Graph(nn.Module):
    """One of TaehvBlockCodec's graphs as a module to trace: its inputs (state included) are the arguments."""

    def __init__(self, codec: TaehvBlockCodec, graph: str):
        super().__init__()
        self.codec, self.graph = codec, graph

    def forward(self, *inputs):
        return (self.codec.encode if self.graph == G.ENCODE else self.codec.decode)(*inputs)


def test_the_graphs_export_to_onnx_and_onnx_runtime_runs_them_as_pytorch(taehv, tmp_path):
    """The artifacts' path (not wired yet): each graph traces with the dynamo exporter under its spec's names, and
    ONNX Runtime gives PyTorch's outputs, a fresh row and one with state in one batch."""
    import onnxruntime

    from mirage.export.onnx_export import export_module

    specs = G.model_graphs(CFG, 2)
    torch.manual_seed(4)
    for graph in (G.DECODE, G.ENCODE):
        spec, module = specs[graph], _Graph(TaehvBlockCodec(taehv, N), graph)
        feeds = {x.name: torch.randn(x.shape) for x in spec.inputs} | {G.FRESH: torch.tensor([1.0, 0.0])}
        path = export_module(module, graph, feeds, [x.name for x in spec.outputs], tmp_path / f"{graph}.onnx", 23)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [x.name for x in session.get_inputs()] == list(spec.input_names)
        got = session.run([x.name for x in spec.outputs], {k: v.numpy() for k, v in feeds.items()})
        for x, out, ref in zip(spec.outputs, got, module(*feeds.values())):
            np.testing.assert_allclose(out, ref.numpy(), atol=5e-5, rtol=0, err_msg=f"{graph}.{x.name}")
