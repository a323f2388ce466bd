"""A DiT artifact with TAEHV as its codec (issue 29, item 1): `mirage-export --dit CONFIG --decoder TAEHV_FILE` exports
TAEHV's encode / decode (their state explicit) beside the block graphs, checks them on a recorded rollout's calls
and by the rollout's decoded frames, and the runtime opens the artifact on ONNX Runtime: mirage-run and mirage-serve
restyle with it, as the PyTorch backend does with the same DiT and TAEHV. dit-tiny at 64x32 (non-square, as Wan's
832x480) with a window of 2 blocks (the 3rd rolls it), random DiT weights and a random TAEHV; CPU."""
from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.numpy import save_file

from mirage.bridge.artifact import ArtifactOptions
from mirage.bridge.dit_artifact import build_dit_artifact, dit_model
from mirage.bridge.pipeline import from_dit_model
from mirage.core import graphs as G
from mirage.core.config import PipelineOptions, get_dit_config
from mirage.core.dit_step import VideoToVideoError
from mirage.core.files import sha256_file
from mirage.engine.verify import verify_artifact
from mirage.runtime.pipeline import Pipeline
from mirage.runtime.pool import StreamPool
from conftest import ROOT
from test_taehv_codec import random_taehv

CFG = dataclasses.replace(get_dit_config("dit-tiny"), width=64, height=32, num_layers=2, window_frames=4)
SEED = 0  # the random DiT weights the artifact is exported with (dit_model)
FRAMES = 4 * CFG.block_frames  # video frames a block takes and gives
TOL = 1e-4  # ONNX Runtime vs PyTorch, float32
RTX = importlib.util.find_spec("tensorrt_rtx") is not None  # CI has it: the engines are built too


@pytest.fixture(scope="module")
def taehv():
    return random_taehv(3, CFG.height, CFG.width)


@pytest.fixture(scope="module")
def taehv_files(taehv, tmp_path_factory):
    """A TAEHV file with its encoder (taew2_1.pth's layout), and one of its decoder alone."""
    folder = tmp_path_factory.mktemp("taehv")
    state = taehv.state_dict()
    torch.save(state, folder / "taew-test.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("decoder.")}, folder / "decoder-only.pth")
    return folder / "taew-test.pth", folder / "decoder-only.pth"


@pytest.fixture(scope="module")
def artifact(taehv_files, tmp_path_factory):
    """fp32, batch 1, parity over 3 blocks, with TensorRT-RTX engines for sm89 where it is installed (TAEHV's two
    graphs add about 0.5 s of engine builds at 64x32); the CPU runs its ONNX graphs."""
    out = tmp_path_factory.mktemp("dit-taehv") / "fp32"
    backend = dict(backend="tensorrt-rtx", gpus=("sm89",)) if RTX else dict(backend="onnx")
    build_dit_artifact(CFG, out, ArtifactOptions(precision="fp32", parity_frames=6, **backend), seed=SEED,
                       decoder=taehv_files[0])
    return out


def _prompt(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((CFG.text_len, CFG.text_dim)).astype(np.float32)


def _clip(blocks: int, seed: int) -> np.ndarray:
    """Smooth frames (blocks, 4N, 32, 64, 3) in [-1, 1]: a block's input."""
    coarse = np.random.default_rng(seed).uniform(-0.9, 0.9, (blocks, FRAMES, 4, 8, 3)).astype(np.float32)
    return coarse.repeat(8, axis=2).repeat(8, axis=3)


def test_the_artifact_carries_taehv_s_graphs_checked_on_a_recorded_rollout(artifact, taehv_files):
    """encode / decode with every state output checked on the 3 calls of a recorded rollout (a fresh row, then its
    state carried), the rollout's decoded video frames at fp32's agreement; the manifest names the TAEHV file."""
    m = json.loads((artifact / G.MANIFEST).read_text())
    assert list(m["graphs"]) == [*G.DIT_GRAPHS, G.ENCODE, G.DECODE] and m["model"]["codec"] == "taehv"
    assert m["taehv"] == {"file": "taew-test.pth", "sha256": sha256_file(taehv_files[0]), "encoder": True}
    assert f"--decoder {taehv_files[0].resolve()}" in m["rebuild_command"]
    assert m["frames"].startswith("video frames (a stream's first 3 are TAEHV's warm-up frames")
    specs = G.model_graphs(dataclasses.replace(CFG, codec="taehv"))
    tensors = m["parity"]["tensors"]
    for graph in (G.ENCODE, G.DECODE):
        assert len(specs[graph].outputs) > 9  # the output and every MemBlock's state (encode's carry too)
        for x in specs[graph].outputs:
            assert tensors[f"{graph}.{x.name}"]["rel"] < 1e-5 and tensors[f"{graph}.{x.name}"]["calls"] == 3, x.name
    rollout = m["parity"]["rollout"]
    assert rollout["blocks"] == 3 and rollout["video_psnr_min_db"] > 100 and m["parity"]["passed"]
    if RTX:  # TensorRT-RTX parses and builds TAEHV's graphs as well
        assert all(m["graphs"][g]["build"]["engine_bytes"] > 0 and "engine_refused" not in m["graphs"][g]
                   for g in m["graphs"])
    cfg, loaded = verify_artifact(artifact, m, engines=RTX)
    assert cfg.codec == "taehv" and set(loaded) == set(m["graphs"])


def test_the_codec_s_calls_are_recorded_in_the_runtime_s_rollout_with_their_state(taehv):
    """The calls parity checks TAEHV's graphs on: a video-to-video rollout's, its first block fresh, each later call
    given the state the call before it left (its memory, and encode's carried frames)."""
    from mirage.export.dit_export import record_dit_calls, torch_run

    model = dit_model(CFG, None, SEED)[0]
    model.cfg = dataclasses.replace(CFG, codec="taehv")
    calls = record_dit_calls(model, blocks=3, taehv=taehv)
    specs = G.model_graphs(model.cfg)
    run = torch_run(model, {g: specs[g] for g in (G.ENCODE, G.DECODE)}, taehv)
    for graph in (G.ENCODE, G.DECODE):
        assert [c[G.FRESH][0] for c in calls[graph]] == [1, 0, 0] and len(calls[G.DIT_CACHE_WRITE]) == 3
        for before, after in zip(calls[graph], calls[graph][1:]):
            new = run(graph, before)
            for name in G.state_inputs(specs[graph]):
                np.testing.assert_allclose(after[name], new[G.next_state(name)], atol=1e-6, rtol=0, err_msg=name)
                assert np.abs(after[name]).max() > 0.1, name  # state that was there to carry


def test_onnx_runtime_runs_the_artifact_as_the_pytorch_backend_runs_the_model_and_taehv(artifact, taehv):
    """Three blocks (the cache filling, then rolling) video-to-video at strength 0.6 and generated: the artifact on
    ONNX Runtime gives the PyTorch backend's frames of the same DiT and TAEHV (warm-up frames included)."""
    text, clip = _prompt(1), _clip(3, seed=2)
    for strength, inputs in ((0.6, clip), (None, [None] * 3)):
        runs = []
        for pipe in (Pipeline.load(artifact, device="cpu", options=PipelineOptions(strength=strength)),
                     from_dit_model(dit_model(CFG, None, SEED)[0], "cpu", PipelineOptions(strength=strength),
                                    decoder=taehv)):
            with pipe:
                assert (pipe.frames_in, pipe.unit.frames) == (FRAMES if strength else 0, FRAMES)
                pipe.set_prompt(text)
                pipe.reset(4)
                runs.append([pipe.step(block) for block in inputs])
        for k, (got, ref) in enumerate(zip(*runs)):
            np.testing.assert_allclose(got, ref, atol=TOL, rtol=0, err_msg=f"strength {strength}, block {k}")
        assert np.abs(runs[0][2] - runs[0][1]).mean() > 30 * TOL  # the blocks differ: the check can fail


def test_an_fp16_artifact_of_a_decoder_only_taehv_has_no_encode_and_generates(taehv_files, tmp_path):
    """--precision fp16 with a TAEHV file without encoder.* weights: decode alone (the manifest says the file has
    no encoder, and the loader expects no encode graph), within fp16's tolerance; it generates, and
    video-to-video is one clear error."""
    m = build_dit_artifact(CFG, tmp_path / "a", ArtifactOptions(precision="fp16", parity_frames=4), seed=SEED,
                           decoder=taehv_files[1])
    assert list(m["graphs"]) == [*G.DIT_GRAPHS, G.DECODE] and m["taehv"]["encoder"] is False
    assert m["graphs"][G.DECODE]["holds"] == "fp16" and m["parity"]["passed"]
    assert all(t["rel"] < 1e-2 for t in m["parity"]["tensors"].values())
    assert m["parity"]["rollout"]["video_psnr_min_db"] > 40
    with Pipeline.load(tmp_path / "a", device="cpu") as pipe:
        pipe.set_prompt(_prompt(1))
        pipe.reset(0)
        assert pipe.step().shape == (FRAMES, 32, 64, 3)
    with pytest.raises(VideoToVideoError, match="has no encoder graph"):
        Pipeline.load(tmp_path / "a", device="cpu", options=PipelineOptions(strength=0.5))


def test_mirage_run_restyles_with_a_taehv_artifact(artifact, tmp_path):
    from mirage.cli.run import main

    embeds, report = tmp_path / "prompt.safetensors", tmp_path / "report.json"
    save_file({"prompt_embeds": _prompt(7)}, str(embeds))
    result = CliRunner().invoke(main, [str(artifact), "--input", "synthetic", "--prompt-embeds", str(embeds),
                                       "--strength", "0.5", "--frames", str(2 * FRAMES), "--output",
                                       str(tmp_path / "out"), "--json", str(report), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    r = json.loads(report.read_text())
    assert (r["blocks"], r["written"], r["strength"]) == (2, 2 * FRAMES, 0.5)
    assert r["frames_are"].startswith("video frames") and "strength / PSNR vs. input" in result.output
    with Image.open(tmp_path / "out" / "00000.png") as frame:
        assert frame.size == (128, 64)  # 64x32, upscaled x2 to at least 128 pixels wide (VideoWriter)


def test_mirage_serve_restyles_with_a_taehv_artifact(artifact, tmp_path, monkeypatch):
    """mirage-serve ARTIFACT --strength: a stream's block of 4N frames comes back as the runtime's 4N frames of
    that artifact, byte for byte."""
    pytest.importorskip("aiohttp")
    from aiohttp import WSMsgType

    from mirage.core.prompts import read_embeddings
    from mirage.runtime.server import RAW, REPLY
    from test_serve import message
    from test_serve_dit import serve

    embeds = tmp_path / "prompt.safetensors"
    save_file({"prompt_embeds": _prompt(7)}, str(embeds))
    block = ((_clip(1, seed=5)[0] + 1) * 127.5).astype(np.uint8)

    async def scenario(client):
        ws = await client.ws_connect("/ws", params={"seed": "1"})
        hello = await ws.receive_json()
        assert (hello["frames_in"], hello["strength"], hello["width"], hello["height"]) == (FRAMES, 0.5, 64, 32)
        for n, rgb in enumerate(block):
            await ws.send_bytes(message(n, rgb.tobytes(), RAW))
        out = []
        while len(out) < FRAMES:
            msg = await ws.receive()
            if msg.type == WSMsgType.BINARY:
                out.append(np.frombuffer(msg.data[REPLY.size:], np.uint8).reshape(32, 64, 3))
        return np.stack(out)

    result, served, _ = serve([str(artifact), "--prompt-embeds", str(embeds), "--strength", "0.5", "--slots", "1",
                               "--device", "cpu"], monkeypatch, scenario)
    assert result.exit_code == 0, result.output
    options = PipelineOptions(batch=1, strength=0.5, frames="uint8")
    with StreamPool(Pipeline.load(artifact, device="cpu", options=options)) as pool:
        pool.pipeline.set_prompt(read_embeddings(embeds))
        slot = pool.attach(seed=1)
        np.testing.assert_array_equal(served, pool.step({slot: block})[slot])


@pytest.mark.parametrize("args, message", [
    (["--dit", "dit-tiny", "--random-weights", "--decoder", "FOLDER"], "the Wan VAE is not a runtime codec"),
    (["--dit", "dit-tiny-taesd", "--random-weights", "--decoder", "FILE"], "codec='taehv'"),
    (["--decoder", "FILE"], "--decoder belong to a DiT's export: add --dit NAME"),
])
def test_export_refuses_a_codec_it_cannot_export_in_one_line(args, message, taehv_files, tmp_path):
    from mirage.cli.export import main

    args = [{"FOLDER": str(tmp_path), "FILE": str(taehv_files[0])}.get(a, a) for a in args]
    result = CliRunner().invoke(main, args + ["--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.strip().count("\n") == 0 and not (tmp_path / "x").exists()


def test_export_wan_script_exports_taehv_s_graphs_too(taehv_files, taehv, tmp_path):
    """scripts/export_wan.py --decoder (wan-1.3b's export traced on uninitialized feeds), on dit-tiny: TAEHV's
    graphs beside the block graphs, and ONNX Runtime's decode is TaehvBlockCodec's (its state included)."""
    import onnxruntime

    from mirage.model.taehv import TaehvBlockCodec

    spec = importlib.util.spec_from_file_location("export_wan", ROOT / "scripts" / "export_wan.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--config", "dit-tiny", "--precision", "fp32", "--decoder", str(taehv_files[0]),
                        "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "export_report.json").read_text())
    assert list(report["graphs"]) == [*G.DIT_GRAPHS, G.ENCODE, G.DECODE]
    decode = G.model_graphs(dataclasses.replace(get_dit_config("dit-tiny"), codec="taehv"))[G.DECODE]
    torch.manual_seed(0)
    feeds = {x.name: torch.randn(x.shape) for x in decode.inputs} | {G.FRESH: torch.zeros(1)}
    session = onnxruntime.InferenceSession(str(tmp_path / G.onnx_file(G.DECODE)), providers=["CPUExecutionProvider"])
    got = session.run([x.name for x in decode.outputs], {k: v.numpy() for k, v in feeds.items()})
    for x, out, ref in zip(decode.outputs, got, TaehvBlockCodec(taehv, CFG.block_frames).decode(*feeds.values())):
        np.testing.assert_allclose(out, ref.numpy(), atol=1e-4, rtol=0, err_msg=x.name)


def test_a_batch_2_artifact_s_rows_are_streams_as_on_the_pytorch_backend(taehv_files, taehv, tmp_path):
    """ONNX Runtime at batch 2 (the server's two streams in one block), the rows at strengths 0.6 and 0.3, row 1
    attached a block later (fresh while row 0 carries TAEHV's state), with max_strength 0.6 (the passes 0.6
    needs): each row's frames are the PyTorch backend's of the same DiT and TAEHV."""
    build_dit_artifact(CFG, tmp_path / "b2", ArtifactOptions(precision="fp32", parity_frames=4, batch=2), seed=SEED,
                       decoder=taehv_files[0])
    text, clip, other = _prompt(1), _clip(3, seed=2), _clip(3, seed=8)
    options = PipelineOptions(batch=2, strength=0.6, max_strength=0.6)
    runs = []
    for pipe in (Pipeline.load(tmp_path / "b2", device="cpu", options=options),
                 from_dit_model(dit_model(CFG, None, SEED)[0], "cpu", options, decoder=taehv)):
        with StreamPool(pipe) as pool:
            pool.pipeline.set_prompt(text)
            a = pool.attach(seed=4)
            out = [pool.step({a: clip[0]})]
            b = pool.attach(seed=5)
            pool.control(b, strength=0.3)
            out += [pool.step({a: clip[k], b: other[k - 1]}) for k in (1, 2)]
            runs.append(out)
    for k, (got, ref) in enumerate(zip(*runs)):
        assert got.keys() == ref.keys()
        for slot in got:
            np.testing.assert_allclose(got[slot], ref[slot], atol=TOL, rtol=0, err_msg=f"block {k}, slot {slot}")
    assert np.abs(runs[0][2][1] - runs[0][2][0]).mean() > 30 * TOL  # the rows differ: the check can fail
