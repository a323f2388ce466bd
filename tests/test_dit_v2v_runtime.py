"""The video DiT's video-to-video in the runtime (core.dit_step.BlockUnit with a strength): a DiT on a per-frame
autoencoder (dit-tiny-taesd at 96x64, non-square as wan-1.3b's 832x480, random DiT weights, the bundled ae-taesd)
run on ONNX Runtime (an artifact with its encode/decode graphs) and on the PyTorch backend, against the torch path
(model.dit_pipeline's restyle) given the runtime's counter-based noise; CPU."""
from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from mirage.bridge.artifact import ArtifactOptions
from mirage.bridge.dit_artifact import build_dit_artifact, dit_model
from mirage.bridge.pipeline import from_dit_model
from mirage.core import graphs as G
from mirage.core.config import DEFAULT_STRENGTH, ConfigError, PipelineOptions, get_config, get_dit_config
from mirage.core.dit_step import VideoToVideoError
from mirage.core.errors import MirageError
from mirage.core.loop import normal
from mirage.model.dit_pipeline import DiTPipeline
from mirage.model.latent import load_frame_codec
from mirage.runtime.pipeline import Pipeline, PipelineError
from mirage.runtime.pool import StreamPool
from test_dit_runtime import _CpuAsGpu

# 6 tokens per latent frame (3 wide, 2 high: non-square, as wan-1.3b's 832x480), blocks of 2 in a window of 8:
# the 5th block rolls the ring
CFG = dataclasses.replace(get_dit_config("dit-tiny-taesd"), width=96, height=64, num_layers=2)
SEED = 0  # the random DiT weights the artifact is exported with (dit_model)
N = CFG.block_frames
TOL = 1e-4  # runtime vs torch path, float32: measured 2e-6 (the same math, other kernels and reduction orders)
RTX = importlib.util.find_spec("tensorrt_rtx") is not None  # CI has it: the engines are built too


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """An fp32 artifact, batch 1, with TensorRT-RTX engines for sm89 where it is installed (about 25 s on 2
    cores); the CPU runs its ONNX graphs."""
    out = tmp_path_factory.mktemp("dit-v2v") / "b1"
    backend = dict(backend="tensorrt-rtx", gpus=("sm89",)) if RTX else dict(backend="onnx")
    build_dit_artifact(CFG, out, ArtifactOptions(precision="fp32", parity_frames=4, **backend), seed=SEED)
    return out


@pytest.fixture(scope="module")
def codec():
    return load_frame_codec(CFG)


def _prompt(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((CFG.text_len, CFG.text_dim)).astype(np.float32)


def _clip(blocks: int, seed: int) -> np.ndarray:
    """Smooth frames (blocks, N, 64, 96, 3) in [-1, 1]."""
    coarse = np.random.default_rng(seed).uniform(-0.8, 0.8, (blocks, N, 8, 12, 3)).astype(np.float32)
    return coarse.repeat(8, axis=2).repeat(8, axis=3)


def _restyled(codec, text: np.ndarray, seed: int, clip: np.ndarray, strengths: list[float],
              passes: int = CFG.steps, cache_from: str = "output") -> list[np.ndarray]:
    """One stream by the torch path (DiTPipeline.restyle) at strengths[k] for block k, with the noise the
    runtime draws for a row of `seed` whose block runs `passes` passes (draw k·passes + i of the seed: pass i's
    of block k)."""
    model, _ = dit_model(CFG, None, SEED)
    pipe = DiTPipeline(CFG, model, None, codec, torch.from_numpy(text[None]), torch.device("cpu"))
    pipe.reset(0)
    pipe.set_cache_from(cache_from)
    shape = (CFG.in_dim, N, *CFG.latent_size)
    out = []
    for k, (block, strength) in enumerate(zip(clip, strengths)):
        pipe.set_strength(strength)
        noise = np.stack([normal(seed, k * passes + i, int(np.prod(shape))).reshape(shape)
                          for i in range(passes)])
        out.append(pipe.restyle(block, noise[:, None]))
    return out


def _torch_pipeline(batch: int = 1, strength: float | None = 0.6, **options) -> Pipeline:
    model, _ = dit_model(CFG, None, SEED)
    return from_dit_model(model, "cpu", PipelineOptions(batch=batch, strength=strength, **options))


def test_the_artifact_carries_the_autoencoder_s_graphs(artifact):
    """encode / decode exported from the per-frame autoencoder at a block's shapes, checked like the others;
    a config without one (wan-1.3b: a temporal VAE) keeps three graphs and a latent preview."""
    m = json.loads((artifact / G.MANIFEST).read_text())
    assert list(m["graphs"]) == [*G.DIT_GRAPHS, G.ENCODE, G.DECODE] and m["frames"] == "video frames"
    specs = G.model_graphs(CFG)
    assert specs[G.ENCODE].tensor(G.IMAGE).shape == (N, 3, 64, 96) == specs[G.DECODE].output.shape
    assert specs[G.DECODE].tensor(G.Z).shape == specs[G.DIT_STEP].tensor(G.X_T).shape == (1, 4, N, 8, 12)
    tensors = m["parity"]["tensors"]
    assert tensors["encode.z"]["rel"] < 1e-5 and tensors["decode.image"]["rel"] < 1e-5 and m["parity"]["passed"]
    assert m["parity"]["rollout"]["video_psnr_min_db"] > 100  # fp32: the decoded rollouts agree
    if RTX:  # TensorRT-RTX parses and builds the autoencoder's graphs as well
        assert all(m["graphs"][g]["build"]["engine_bytes"] > 0 and "engine_refused" not in m["graphs"][g]
                   for g in m["graphs"])
    assert set(G.model_graphs(get_dit_config("wan-1.3b"))) == set(G.DIT_GRAPHS)


def test_video_to_video_on_onnx_runtime_and_pytorch_equals_the_torch_path(artifact, codec):
    """Three blocks at strength 0.6 (the cache filling), on ONNX Runtime and on the PyTorch backend, equal
    restyle's for the same input, prompt and noise."""
    text, clip = _prompt(1), _clip(3, seed=2)
    ref = _restyled(codec, text, 4, clip, [0.6] * 3)
    for pipe in (Pipeline.load(artifact, device="cpu", options=PipelineOptions(strength=0.6)), _torch_pipeline()):
        with pipe:
            assert (pipe.frames_in, pipe.frames_are, pipe.controls) == (N, "video frames", {"strength": (0.0, 1.0)})
            pipe.set_prompt(text)
            pipe.reset(4)
            for k, block in enumerate(clip):
                np.testing.assert_allclose(pipe.step(block), ref[k], atol=TOL, rtol=0, err_msg=f"block {k}")


def test_a_cache_from_the_input_is_the_torch_path_s_on_onnx_runtime_and_pytorch(artifact, codec):
    """cache_from="input": the runtime's cache-write pass takes the encoded input block (not the restyle) on
    ONNX Runtime and the PyTorch backend alike, as the torch path's set_cache_from("input") does; from the
    second block on, the frames differ from the output cache's. Generation has no input to cache: refused."""
    text, clip = _prompt(1), _clip(3, seed=2)
    ref = _restyled(codec, text, 4, clip, [0.6] * 3, cache_from="input")
    assert np.abs(ref[2] - _restyled(codec, text, 4, clip, [0.6] * 3)[2]).mean() > 1e-3
    options = PipelineOptions(strength=0.6, cache_from="input")
    for pipe in (Pipeline.load(artifact, device="cpu", options=options), _torch_pipeline(cache_from="input")):
        with pipe:
            pipe.set_prompt(text)
            pipe.reset(4)
            for k, block in enumerate(clip):
                np.testing.assert_allclose(pipe.step(block), ref[k], atol=TOL, rtol=0, err_msg=f"block {k}")
    with pytest.raises(VideoToVideoError, match="cache_from='input' caches a video-to-video block's input"):
        _torch_pipeline(strength=None, cache_from="input")


def test_a_lower_max_strength_runs_fewer_passes_and_restyles_the_same(artifact, codec):
    """max_strength 0.6: the block runs the 3 passes strength 0.6 needs instead of 4 (dit-tiny-taesd's unshifted
    schedule), on ONNX Runtime and the PyTorch backend alike, and its frames are still restyle's; the strength
    range it offers is [0, 0.6] and a row set above it is refused."""
    text, clip = _prompt(1), _clip(3, seed=2)
    ref = _restyled(codec, text, 4, clip, [0.6] * 3, passes=3)
    options = PipelineOptions(strength=0.6, max_strength=0.6)
    for pipe in (Pipeline.load(artifact, device="cpu", options=options), _torch_pipeline(max_strength=0.6)):
        with pipe:
            assert (pipe.unit.passes, pipe.controls["strength"]) == (3, (0.0, 0.6))
            pipe.set_prompt(text)
            pipe.reset(4)
            for k, block in enumerate(clip):
                np.testing.assert_allclose(pipe.step(block), ref[k], atol=TOL, rtol=0, err_msg=f"block {k}")
            with pytest.raises(VideoToVideoError, match="over this pipeline's max_strength 0.6"):
                pipe.control(0, strength=0.7)
    with pytest.raises(ConfigError, match="strength=0.7 is over max_strength=0.6"):
        PipelineOptions(strength=0.7, max_strength=0.6)


def test_rows_are_streams_at_their_own_strengths(codec):
    """Two rows in one batched block at strengths 0.3 and 1.0 are each the torch path's stream; row 0's frames
    are bit-identical whatever row 1 does (another input, seed, prompt and strength)."""
    text, clip, other = _prompt(1), _clip(2, seed=2), _clip(2, seed=9)
    runs = []
    for neighbour in (1.0, 0.0):
        with StreamPool(_torch_pipeline(batch=2, strength=0.3)) as pool:
            pool.pipeline.set_prompt(text)
            a, b = pool.attach(seed=4), pool.attach(seed=5 if neighbour else 8)
            pool.control(b, strength=neighbour)
            if not neighbour:
                pool.pipeline.set_prompt(_prompt(6), rows=[b])
            runs.append([pool.step({a: clip[k], b: (clip if neighbour else other)[k]}) for k in range(2)])
    for k, ref in enumerate(_restyled(codec, text, 4, clip, [0.3, 0.3])):
        np.testing.assert_allclose(runs[0][k][0], ref, atol=TOL, rtol=0)
        np.testing.assert_array_equal(runs[0][k][0], runs[1][k][0])
    for k, ref in enumerate(_restyled(codec, text, 5, clip, [1.0, 1.0])):
        np.testing.assert_allclose(runs[0][k][1], ref, atol=TOL, rtol=0)
    assert np.abs(runs[0][1][1] - runs[1][1][1]).max() > 1e-2  # the neighbours differ: the check can fail


def test_a_strength_change_takes_effect_on_the_next_block(codec):
    """control(slot, strength) between blocks: the next block is noised to the new strength, the stream goes on
    (its cache kept), and a new stream in the slot starts at the pipeline's strength again; `conditioning` says
    the stream's strength throughout (a server's hello tells it to the client)."""
    text, clip = _prompt(1), _clip(3, seed=2)
    with StreamPool(_torch_pipeline(strength=0.6)) as pool:
        pool.pipeline.set_prompt(text)
        slot = pool.attach(seed=4)
        assert pool.conditioning(slot) == {"strength": 0.6}
        got = [pool.step({slot: clip[0]})[slot]]
        pool.control(slot, strength=0.2)
        assert pool.conditioning(slot) == {"strength": 0.2}
        got += [pool.step({slot: block})[slot] for block in clip[1:]]
        pool.detach(slot)
        slot = pool.attach(seed=4)
        assert pool.conditioning(slot) == {"strength": 0.6}
        np.testing.assert_array_equal(pool.step({slot: clip[0]})[slot], got[0])
    for k, ref in enumerate(_restyled(codec, text, 4, clip, [0.6, 0.2, 0.2])):
        np.testing.assert_allclose(got[k], ref, atol=TOL, rtol=0, err_msg=f"block {k}")
    assert np.abs(_restyled(codec, text, 4, clip[:2], [0.6, 0.6])[1] - got[1]).max() > 1e-2


def test_decoded_frames_are_the_frame_codec_s_decode(codec):
    """Generation (no strength) with a per-frame autoencoder: a block's frames are FrameCodec.decode of its
    clean latents, where a config without one shows their preview."""
    with _torch_pipeline(strength=None) as pipe:
        assert (pipe.frames_in, pipe.frames_are, "strength" in pipe.unit.controls) == (0, "video frames", False)
        pipe.set_prompt(_prompt(1))
        pipe.reset(2)
        for _ in range(2):
            frames = pipe.step()
            x0 = pipe.buf.x0.clone()
            np.testing.assert_allclose(frames, codec.decode(x0)[0].permute(0, 2, 3, 1).numpy(), atol=1e-6, rtol=0)


def test_the_gpu_execution_runs_the_cpu_s_video_to_video():
    """GpuExecution (on CPU tensors, test_dit_runtime._CpuAsGpu) with uint8 frames: the input blocks staged per
    parity, a strength change and a prompt switch between blocks; the same bytes as CpuExecution's."""
    from mirage.model.dit_backend import DiTTorchBackend
    from mirage.model.latent import BlockCodec

    options = PipelineOptions(batch=2, strength=0.5, frames="uint8")
    clip = (_clip(3, seed=2) * 127 + 128).astype(np.uint8)

    def rollout(pipe):
        with pipe:
            pipe.set_prompt(_prompt(1))
            pipe.reset(3)
            out = [pipe.step_batch(np.stack([clip[0], clip[1]]))]
            pipe.control(1, strength=0.9, prompt="b")
            return out + [pipe.step_batch(np.stack([clip[k], clip[2]])) for k in (1, 2)]

    model, _ = dit_model(CFG, None, SEED)
    cpu = rollout(from_dit_model(model, "cpu", options, prompt_encoder={"b": _prompt(2)}.get))
    specs = G.model_graphs(CFG, 2)
    backend = DiTTorchBackend(model, specs, "cpu", codec=BlockCodec(load_frame_codec(CFG), N))
    backend.device = "cuda:0"  # a GPU backend to the pipeline: GpuExecution, with the CPU plumbing
    staged = rollout(Pipeline(backend, CFG, specs, options, _CpuAsGpu(), prompt_encoder={"b": _prompt(2)}.get))
    for n, (a, b) in enumerate(zip(cpu, staged)):
        assert a.dtype == np.uint8
        np.testing.assert_array_equal(a, b, err_msg=f"block {n}")


def test_bad_video_to_video_input_is_one_clear_error():
    with pytest.raises(VideoToVideoError, match="dit-tiny has no encoder graph"):
        from_dit_model(dit_model(get_dit_config("dit-tiny"), None, SEED)[0], "cpu", PipelineOptions(strength=0.5))
    with pytest.raises(ConfigError, match=r"strength=1.5: choose a value in \[0, 1\]"):
        PipelineOptions(strength=1.5)
    with pytest.raises(ConfigError, match="tiny takes no strength"):
        get_config("tiny").unit({}, PipelineOptions(strength=0.5))
    with StreamPool(_torch_pipeline(batch=2)) as pool:
        slot = pool.attach(seed=0)
        for bad in (-0.1, 1.01):
            with pytest.raises(MirageError, match=r"choose a value in \[0, 1\]") as e:
                pool.control(slot, strength=bad)
            assert "\n" not in str(e.value)
        with pytest.raises(PipelineError, match=r"input frames have shape \(2, 32, 32, 3\), the model takes"):
            pool.step({slot: np.zeros((N, 32, 32, 3), np.float32)})
        with pytest.raises(PipelineError, match=r"input frames have shape \(64, 64, 3\)"):
            pool.step({slot: np.zeros((64, 64, 3), np.float32)})  # one frame where a block's are taken
        np.testing.assert_array_equal(pool.pipeline.unit.strengths, [0.6, 0.6])  # nothing was changed


def test_mirage_run_restyles_with_a_dit_artifact(artifact, tmp_path):
    """mirage-run ARTIFACT --input --prompt-embeds: the runtime's video-to-video at the strength a DiT checkpoint's
    --input runs at, at the artifact's non-square 96x64 (the synthetic input drawn at it), the torch path's report (strength, PSNR vs. input); --strength without --input (as a DiT
    checkpoint refuses it) or out of range: one line, exit 2."""
    from safetensors.numpy import save_file

    from mirage.cli.run import main

    embeds, report = tmp_path / "prompt.safetensors", tmp_path / "report.json"
    save_file({"prompt_embeds": _prompt(7)}, str(embeds))
    result = CliRunner().invoke(main, [str(artifact), "--input", "synthetic", "--prompt-embeds",
                                       str(embeds), "--frames", "4", "--output", str(tmp_path / "out"), "--json",
                                       str(report), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    r = json.loads(report.read_text())
    assert (r["blocks"], r["written"], r["strength"], r["frames_are"]) == (2, 4, DEFAULT_STRENGTH, "video frames")
    with Image.open(tmp_path / "out" / "00000.png") as frame:
        assert frame.size == (96, 64)
    assert 5 < r["psnr_vs_input_db"] < 60 and "strength / PSNR vs. input" in result.output
    for args, message in ((["--strength", "0.3"], "--strength: video-to-video needs an --input"),
                          (["--input", "synthetic", "--strength", "2"], "not in the range")):
        result = CliRunner().invoke(main, [str(artifact), "--prompt-embeds", str(embeds),
                                           "--output", str(tmp_path / "bad.gif"), *args])
        assert result.exit_code == 2 and message in result.output, result.output
        assert not (tmp_path / "bad.gif").exists()


def test_a_dit_artifact_at_another_batch_names_its_export_at_that_batch_and_mirage_serve_takes_its_own(
        artifact, tmp_path, monkeypatch):
    """A DiT artifact (a static batch, here 1) opened for 4 streams: the hint is its export with --batch 4 (not
    --max-batch, which a DiT's export refuses), or mirage-serve --slots 1; mirage-serve without --slots serves it
    at its batch of 1 (it refused it at the default 4 slots: the newcomer's finding)."""
    import shlex

    from safetensors.numpy import save_file

    from test_serve_dit import serve

    with pytest.raises(MirageError) as refused:
        Pipeline.load(artifact, device="cpu", options=PipelineOptions(batch=4, strength=0.6))
    message = str(refused.value)
    command = shlex.split(message.split("export it for a batch of 4: ")[1].split(" (or")[0])
    assert command[:2] == ["mirage-export", "--dit"] and command[command.index("--batch") + 1] == "4"
    assert "--max-batch" not in command and message.endswith(f"mirage-serve {artifact} --slots 1)")
    embeds = tmp_path / "prompt.safetensors"
    save_file({"prompt_embeds": _prompt(7)}, str(embeds))

    async def slots(client):
        return (await (await client.get("/health")).json())["slots"]

    result, served, _ = serve([str(artifact), "--prompt-embeds", str(embeds), "--strength", "0.5", "--device", "cpu"],
                              monkeypatch, slots)
    assert (result.exit_code, served) == (0, 1), result.output
