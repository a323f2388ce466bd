"""PipelineOptions(frames="uint8"): the frame's ops turn the frame into bytes (and input bytes into
floats) where the frame is computed, so only bytes cross PCIe on a GPU. On the CPU the bytes are
exactly the host mapping (mirage.core.video_io.to_uint8 / to_float) of the float frames, for pixel
and latent models, generation and video-to-video; a NaN frame still raises."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import CKPT_GEN, CKPT_V2V
from mirage.core.config import ConfigError, PipelineOptions, get_config
from mirage.core.loop import NumpyOps
from mirage.core.synthetic import SyntheticVideo
from mirage.core.video_io import to_float, to_uint8, v2v_input
from mirage.model.torch_ops import TorchOps
from mirage.model.unet import MirageUNet
from mirage.bridge.pipeline import from_model, load_pipeline
from mirage.runtime import Pipeline
from mirage.runtime.execution import NonFiniteError

FRAMES = 3


def _floats() -> np.ndarray:
    """(2, 3, 8, N) float32: every float16 value, the byte boundaries and their neighbours, random values."""
    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    edges = (np.arange(256, dtype=np.float32) - 0.5) / np.float32(127.5) - 1
    near = [np.nextafter(edges, np.float32(side)) for side in (-2, 2)]
    rand = np.random.default_rng(0).uniform(-1.2, 1.2, 1 << 16).astype(np.float32)
    values = np.concatenate([every_half, edges, *near, rand])
    n = len(values) // 48 * 48
    return values[:n].reshape(2, 3, 8, -1)


def _ops(name):
    return NumpyOps() if name == "numpy" else TorchOps("cpu")


def _array(name, a):
    return a if name == "numpy" else torch.from_numpy(a)


@pytest.mark.parametrize("ops_name", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_ops_make_the_host_mapping(ops_name, dtype):
    ops, src = _ops(ops_name), _floats().astype(dtype)
    src[1] = np.clip(src[1], -1, 1)  # row 1 finite, row 0 holds the float16 infinities and NaNs
    dst, finite = np.zeros((2, 8, src.shape[3], 3), np.uint8), np.zeros(2, np.uint8)
    out, flags = _array(ops_name, dst), _array(ops_name, finite)
    ops.to_uint8_(out, flags, _array(ops_name, src))
    with np.errstate(invalid="ignore"):  # row 0's NaNs: compared where finite only
        expected = to_uint8(src.astype(np.float32).transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(out)[1], expected[1])
    ok = np.isfinite(src[0])
    np.testing.assert_array_equal(np.asarray(out)[0][ok.transpose(1, 2, 0)], expected[0][ok.transpose(1, 2, 0)])
    assert list(np.asarray(flags)) == [0, 1]
    u8 = np.random.default_rng(1).integers(0, 256, (2, 8, 9, 3), dtype=np.uint8)
    back = np.zeros((2, 3, 8, 9), dtype)
    ops.to_float_(_array(ops_name, back), _array(ops_name, u8))
    np.testing.assert_array_equal(np.asarray(back), to_float(u8).transpose(0, 3, 1, 2).astype(dtype))


def _latent(task: str) -> MirageUNet:
    torch.manual_seed(0)
    model = MirageUNet(get_config("tiny-64", task)).eval()
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return model


def _pipeline(kind: str, frames: str) -> Pipeline:
    options = PipelineOptions(frames=frames)
    if kind.startswith("pixel"):
        return load_pipeline(CKPT_V2V if kind.endswith("v2v") else CKPT_GEN, device="cpu", options=options)
    return from_model(_latent("v2v" if kind.endswith("v2v") else "generate"), "cpu", options)


@pytest.mark.parametrize("kind", ["pixel-generate", "pixel-v2v", "latent-generate", "latent-v2v"])
def test_uint8_frames_are_the_float_frames_mapped_on_the_host(kind):
    outs = {}
    for frames in ("float32", "uint8"):
        with _pipeline(kind, frames) as pipe:
            size = pipe.frame_shape[0]
            # input bytes in both modes: the float mode maps them on the host, the uint8 mode in the frame
            inputs = [to_uint8(v2v_input(f)) for f in SyntheticVideo(size, seed=4).clip(0, FRAMES)] \
                if pipe.video_to_video else FRAMES
            pipe.reset(2)
            outs[frames] = np.stack(list(pipe.stream(inputs)))
    assert outs["float32"].dtype == np.float32 and outs["uint8"].dtype == np.uint8
    assert outs["uint8"].shape == outs["float32"].shape and outs["uint8"].shape[-1] == 3
    assert outs["uint8"].std() > 1  # frames with content: the comparison means something
    np.testing.assert_array_equal(outs["uint8"], to_uint8(outs["float32"]))


def test_float_input_in_uint8_mode_is_rounded_to_bytes():
    clip = [v2v_input(f) for f in SyntheticVideo(32, seed=4).clip(0, 2)]
    with _pipeline("pixel-v2v", "uint8") as pipe:
        pipe.reset(1)
        floats = [pipe.step(x) for x in clip]
        pipe.reset(1)
        rounded = [pipe.step(to_uint8(x)) for x in clip]
    np.testing.assert_array_equal(np.stack(floats), np.stack(rounded))


def test_a_nan_frame_still_raises_in_uint8_mode(make_random_tiny):
    model = make_random_tiny()
    with torch.no_grad():
        model.out[-1].weight.fill_(float("nan"))
    with from_model(model, "cpu", PipelineOptions(frames="uint8")) as pipe:
        pipe.reset(0)
        with pytest.raises(NonFiniteError, match="denoise graph produced non-finite"):
            pipe.step()


def test_frame_format_option():
    with pytest.raises(ConfigError, match="frames='rgb'"):
        PipelineOptions(frames="rgb")
    assert PipelineOptions.fastest().frames == "uint8" and PipelineOptions().frames == "float32"
    assert dataclasses.replace(PipelineOptions.fastest(), frames="float32").frames == "float32"
