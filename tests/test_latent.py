"""Latent models on the CPU (tiny-64: 8x8x4 latents of the bundled autoencoder, 64x64 frames):
configs, the frame loop with encode/decode, training on latents, the autoencoder's hash, export
of all four graphs and engines built for them."""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from mirage.core import graphs as G
from mirage.core.config import ConfigError, ModelConfig, TrainConfig, get_config
from mirage.core.synthetic import SyntheticVideo
from mirage.core.video_io import v2v_input
from mirage.bridge.artifact import ArtifactOptions, build_artifact
from mirage.model.unet import MirageUNet
from mirage.bridge.pipeline import from_model, load_pipeline
from mirage.train.checkpoint import CheckpointError, save_checkpoint
from mirage.train.codec import load_codec
from mirage.train.rollout import rollout


def _model(task: str, **changes) -> MirageUNet:
    torch.manual_seed(0)
    model = MirageUNet(dataclasses.replace(get_config("tiny-64", task), **changes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return model


def _inputs(n: int) -> list[np.ndarray]:
    return [v2v_input(f) for f in SyntheticVideo(64, seed=3).clip(0, n)]


def test_latent_configs():
    for name, pixels, latents in [("small-256", 256, 32), ("base-512", 512, 64), ("seed880m-512", 512, 64)]:
        cfg = get_config(name, "v2v")
        assert (cfg.pixels, cfg.image_size, cfg.channels, cfg.cond_channels) == (pixels, latents, 4, 4)
        specs = G.model_graphs(cfg)
        assert specs[G.DECODE].output.shape == (1, 3, pixels, pixels) and specs[G.ENCODE].output.shape[1:] == (4, latents, latents)
    assert G.ENCODE not in G.model_graphs(get_config("base-512"))  # generation decodes only
    with pytest.raises(ConfigError, match="both autoencoder and frame_size"):
        ModelConfig(autoencoder="checkpoints/ae-tiny")
    with pytest.raises(ConfigError, match="multiple > 1 of image_size"):
        dataclasses.replace(get_config("tiny-64"), frame_size=60)
    with pytest.raises(ConfigError, match="image_size=0 must be > 0"):
        ModelConfig(image_size=0)


@pytest.mark.parametrize("task", ["generate", "v2v"])
def test_pipeline_runs_the_latent_frame_and_matches_the_reference(task):
    model = _model(task)
    inputs = _inputs(3) if task == "v2v" else [None] * 3
    with from_model(model, "cpu") as pipe:
        assert pipe.frame_shape == (64, 64, 3)
        pipe.reset(2)
        out = np.stack([pipe.step(x) for x in inputs])
    cond = [torch.from_numpy(x).permute(2, 0, 1)[None] for x in inputs] if task == "v2v" else None
    ref = np.stack([f[0].permute(1, 2, 0).numpy() for f in rollout(model, 3, seed=2, cond=cond)])
    np.testing.assert_array_equal(out, ref)
    assert out.min() >= -1 and out.max() <= 1 and out.std() > 0.01


def test_the_decoder_makes_the_frame():
    """The frame is decode(x_0): swapping in another decoder changes it."""
    model = _model("generate")
    codec = load_codec(model.cfg)
    calls = []
    list(rollout(model, 1, seed=0, callback=lambda e: calls.append(e["graph"])))
    assert calls == [G.DENOISE] * 4 + [G.CONTEXT, G.DECODE]
    with torch.no_grad():
        assert codec.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 64, 64)


def test_a_changed_autoencoder_is_refused(tmp_path):
    ae = tmp_path / "ae"
    shutil.copytree(_bundled_ae(), ae)
    model = _model("generate", autoencoder=str(ae), autoencoder_sha256="0" * 64)
    with pytest.raises(CheckpointError, match="not the one this model was trained with"):
        load_codec(model.cfg)


def _bundled_ae():
    from mirage.train.codec import resolve_autoencoder

    return resolve_autoencoder(get_config("tiny-64").autoencoder)


def test_training_on_latents_records_the_autoencoder(tmp_path):
    from mirage.train.trainer import train

    summary = train(get_config("tiny-64", "v2v"), TrainConfig(steps=2, batch_size=2, log_every=1, save_every=2),
                    tmp_path / "run", device="cpu", progress=False)
    assert np.isfinite(summary["loss"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
    assert len(saved["autoencoder_sha256"]) == 64
    with load_pipeline(tmp_path / "run", device="cpu") as pipe:
        pipe.reset(0)
        assert pipe.step(_inputs(1)[0]).shape == (64, 64, 3)


def test_export_writes_and_checks_all_four_graphs(tmp_path):
    model = _model("v2v")
    save_checkpoint(tmp_path / "ckpt", model, model, TrainConfig(), step=1)
    m = build_artifact(tmp_path / "ckpt", tmp_path / "art",
                       ArtifactOptions(precision="fp32", calibration_frames=2, parity_frames=3))
    assert set(m["graphs"]) == {G.DENOISE, G.CONTEXT, G.ENCODE, G.DECODE}
    assert all(t["rel"] < 1e-4 for t in m["parity"]["tensors"].values()), m["parity"]["tensors"]
    outs = []
    for path in (tmp_path / "art", tmp_path / "ckpt"):  # ONNX Runtime (no torch needed) vs PyTorch
        with load_pipeline(path, device="cpu") as pipe:
            pipe.reset(1)
            outs.append(np.stack([pipe.step(x) for x in _inputs(3)]))
    assert np.abs(outs[0] - outs[1]).max() < 1e-4


TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT32": "int32", "INT64": "int64"}


def _network_io(trt, onnx_path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) of the network TensorRT-RTX's parser makes of an ONNX file (what the engine
    is built from; deserializing the engine itself needs a GPU TensorRT-RTX runs on)."""
    logger = trt.Logger(trt.Logger.ERROR)
    network = trt.Builder(logger).create_network(0)
    parser = trt.OnnxParser(network, logger)
    assert parser.parse_from_file(str(onnx_path)), [str(parser.get_error(i)) for i in range(parser.num_errors)]

    def desc(tensors):
        return [{"name": x.name, "dtype": TRT_DTYPES[x.dtype.name], "shape": list(x.shape)} for x in tensors]

    return (desc(network.get_input(i) for i in range(network.num_inputs)),
            desc(network.get_output(i) for i in range(network.num_outputs)))


def test_tensorrt_rtx_builds_the_autoencoder_engines(tmp_path):
    """Engines for all four graphs, recorded so the runtime's verification accepts them, each built
    from a network whose I/O is the graph's spec, from ONNX graphs that match PyTorch in fp16."""
    trt = pytest.importorskip("tensorrt_rtx")
    from mirage.engine.verify import verify_artifact

    model = _model("v2v")
    save_checkpoint(tmp_path / "ckpt", model, model, TrainConfig(), step=1)
    art = tmp_path / "art"
    m = build_artifact(tmp_path / "ckpt", art, ArtifactOptions(
        precision="fp16", backend="tensorrt-rtx", gpus=("sm89",), calibration_frames=2, parity_frames=3))
    _, specs = verify_artifact(art, m, engines=True)  # every engine present, with its recorded hash
    assert set(specs) == {G.DENOISE, G.CONTEXT, G.ENCODE, G.DECODE}
    for graph, spec in specs.items():
        meta = m["graphs"][graph]
        assert meta["engine"] == G.engine_file(graph) and meta["build"]["compute_capabilities"] == ["sm89"]
        assert _network_io(trt, art / meta["onnx"]) == spec.io()
        assert {x.dtype for x in spec.tensors if x.name not in (G.T, G.T_CTX, G.AGES)} == {"float16"}
    assert {G.V, G.KV, G.Z, G.IMAGE} <= set(m["parity"]["tensors"]) and m["parity"]["passed"], m["parity"]
    assert m["parity"]["rollout"]["psnr_mean_db"] > 30, m["parity"]


def test_the_bundled_latent_model_restores_colour_at_64x64():
    """checkpoints/tiny-64-v2v (8x8x4 latents of ae-tiny, trained on this CPU): 64x64 frames, and
    the colour it restores is bounded by its autoencoder (about 20 dB), far above the input's."""
    from conftest import ROOT
    from mirage.core.report import psnr

    truth = SyntheticVideo(64, seed=12345).clip(0, 6)
    with load_pipeline(ROOT / "checkpoints" / "tiny-64-v2v", device="cpu") as pipe:
        pipe.reset(0)
        out = np.stack([pipe.step(v2v_input(f)) for f in truth])
    assert out.shape == (6, 64, 64, 3)
    assert psnr(out, truth).mean() > 18  # measured 21.9 dB over 48 frames


def _frame_clips(n: int, length: int = 5) -> torch.Tensor:
    """(n, length, 3, 64, 64) synthetic clips in [-1, 1]."""
    clips = [SyntheticVideo(64, seed=20 + i).clip(0, length) for i in range(n)]
    return torch.from_numpy(np.stack(clips)).permute(0, 1, 4, 2, 3).contiguous()


def test_the_latent_cache_holds_the_encoded_clips_and_gives_the_same_loss():
    from mirage.train.latent_cache import LatentCache, encode_batch
    from mirage.train.trainer import TrainStep

    cfg = get_config("tiny-64", "v2v")
    codec = load_codec(cfg)
    frames = _frame_clips(5)
    cache = LatentCache.build(iter(frames.split(2)), codec, 5, v2v=True, device=torch.device("cpu"), progress=False)
    latents, cond = encode_batch(codec, frames, v2v=True)
    assert cache.latents.shape == (5, 5, 4, 8, 8) and cache.cond.shape == (5, 4, 8, 8)
    torch.testing.assert_close(cache.latents, latents)
    torch.testing.assert_close(cache.cond, codec.encode(torch.from_numpy(np.stack(
        [v2v_input(f) for f in frames[:, -1].permute(0, 2, 3, 1).numpy()])).permute(0, 3, 1, 2)), atol=1e-5, rtol=0)
    drawn, drawn_cond = next(cache.batches(3, seed=0))
    rows = [int(torch.nonzero((cache.latents == d).flatten(1).all(1))[0]) for d in drawn]  # each drawn clip is one of the cache's
    torch.testing.assert_close(drawn_cond, cache.cond[rows])
    # one step's loss is the same whether the step encodes the frames or takes the cached latents
    model, tcfg = _model("v2v"), TrainConfig(steps=1, batch_size=5)
    torch.manual_seed(7)
    encoding = TrainStep(model, tcfg, codec=codec)(frames)
    torch.manual_seed(7)
    cached = TrainStep(model, tcfg)(cache.latents, cond=cache.cond)
    torch.testing.assert_close(cached, encoding)


def test_training_with_a_latent_cache_encodes_only_once(tmp_path, monkeypatch):
    from mirage.model.latent import LatentCodec
    from mirage.train.trainer import train

    calls = []
    encode = LatentCodec.encode
    monkeypatch.setattr(LatentCodec, "encode", lambda self, x: calls.append(len(x)) or encode(self, x))
    tcfg = TrainConfig(steps=6, batch_size=2, latent_cache=3, log_every=1, save_every=6)
    summary = train(get_config("tiny-64", "v2v"), tcfg, tmp_path / "run", device="cpu", progress=False)
    assert summary["step"] == 6 and np.isfinite(summary["loss"])
    # the cache's 3 clips in batches of 2 (the last cut to 1): frames (5 a clip) and the input frame
    assert calls == [2, 10, 1, 5]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["latent_cache"] == 3


def test_a_latent_cache_or_self_forcing_that_cannot_work_is_refused(tmp_path):
    from mirage.train.trainer import train

    with pytest.raises(ConfigError, match="works on pixels"):
        train(get_config("tiny", "v2v"), TrainConfig(steps=1, batch_size=1, latent_cache=2), tmp_path / "a",
              device="cpu", progress=False)
    with pytest.raises(ConfigError, match="self-forcing a latent video-to-video"):
        train(get_config("tiny-64", "v2v"), TrainConfig(steps=1, batch_size=1, self_forcing_prob=0.5), tmp_path / "b",
              device="cpu", progress=False)


def test_ctrl_c_while_making_the_cache_is_one_line():
    from mirage.train.latent_cache import CacheInterrupted, LatentCache

    def frames():
        yield _frame_clips(1)
        raise KeyboardInterrupt

    with pytest.raises(CacheInterrupted, match=r"\(1 of 3 clips\): nothing was trained or saved"):
        LatentCache.build(frames(), load_codec(get_config("tiny-64", "v2v")), 3, v2v=True, device=torch.device("cpu"),
                          progress=False)


def test_the_bundled_128px_model_restores_colour():
    """checkpoints/tiny-128-v2v (16x16x4 latents of ae-taesd, trained on a 2-core CPU with a latent
    cache): 128x128 frames, bounded by its autoencoder (31 dB on these frames), far above tiny-64-v2v."""
    from conftest import ROOT
    from mirage.core.report import psnr

    truth = SyntheticVideo(128, seed=12345).clip(0, 4)
    with load_pipeline(ROOT / "checkpoints" / "tiny-128-v2v", device="cpu") as pipe:
        pipe.reset(0)
        out = np.stack([pipe.step(v2v_input(f)) for f in truth])
    assert out.shape == (4, 128, 128, 3)
    assert psnr(out, truth).mean() > 26  # measured 30.1 dB over 48 frames (mirage-run)


def test_the_default_demo_model_makes_256px_frames():
    """checkpoints/tiny-256-v2v, mirage-run's default (32x32x4 latents of ae-taesd, trained on a 2-core
    CPU with a latent cache): 256x256 frames near its autoencoder's bound (35.9 dB on held-out frames)."""
    from conftest import ROOT
    from mirage.cli.run import DEFAULT_MODEL
    from mirage.core.report import psnr

    assert DEFAULT_MODEL == ROOT / "checkpoints" / "tiny-256-v2v"
    truth = SyntheticVideo(256, seed=12345).clip(0, 2)
    with load_pipeline(DEFAULT_MODEL, device="cpu") as pipe:
        pipe.reset(0)
        out = np.stack([pipe.step(v2v_input(f)) for f in truth])
    assert out.shape == (2, 256, 256, 3)
    assert psnr(out, truth).mean() > 30  # measured 34.2 dB over 48 frames (mirage-run)
