"""mirage-serve --dit CONFIG CKPT --decoder TAEHV --strength (issue 29): a Wan-layout DiT served video-to-video with
TAEHV as the runtime's codec. dit-tiny (128x128) with random weights and a random TAEHV, saved as the files the
command takes (a Self-Forcing checkpoint, a taew2_1.pth-layout file); its frames are the runtime's own."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from mirage.bridge.dit_artifact import dit_model
from mirage.bridge.pipeline import open_dit_checkpoint
from mirage.core.config import PipelineOptions, get_dit_config
from mirage.core.prompts import read_embeddings
from mirage.runtime.pool import StreamPool

pytest.importorskip("aiohttp")
from test_serve_dit import restyled, serve  # noqa: E402
from test_taehv_codec import random_taehv  # noqa: E402

CFG = get_dit_config("dit-tiny")
FRAMES = 4 * CFG.block_frames  # a block's input and output frames


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(checkpoint, TAEHV file, prompt embeddings) of random weights."""
    folder = tmp_path_factory.mktemp("dit-taehv")
    model, _ = dit_model(CFG, None, 0)
    torch.save({"generator": {f"model.{k}": v for k, v in model.state_dict().items()}}, folder / "dit.pt")
    torch.save(random_taehv(1, 32, 32).state_dict(), folder / "taehv.pth")
    prompt = np.random.default_rng(2).standard_normal((CFG.text_len, CFG.text_dim)).astype(np.float32)
    save_file({"prompt_embeds": prompt}, str(folder / "prompt.safetensors"))
    return folder / "dit.pt", folder / "taehv.pth", folder / "prompt.safetensors"


def test_mirage_serve_restyles_with_taehv_as_the_runtime_s_codec(monkeypatch, files):
    """A stream sends two blocks of 4N frames and gets 4N frames back for each: the runtime's video-to-video of
    that checkpoint and TAEHV file, byte for byte; the hello says 4N frames a block at 16 fps."""
    ckpt, taehv, prompt = files
    clip = np.random.default_rng(3).integers(0, 256, (2, FRAMES, 16, 16, 3), dtype=np.uint8)
    clip = clip.repeat(8, axis=2).repeat(8, axis=3)  # smooth 128x128 frames

    async def scenario(client):
        ws = await client.ws_connect("/ws", params={"seed": "1"})
        hello = await ws.receive_json()
        assert (hello["frames_in"], hello["video_rate"], hello["strength"]) == (FRAMES, 16.0, 0.5)
        assert (hello["width"], hello["height"]) == (CFG.width, CFG.height)
        return [await restyled(ws, block) for block in clip]

    result, served, _ = serve([str(ckpt), "--dit", "dit-tiny", "--decoder", str(taehv), "--strength", "0.5",
                               "--prompt-embeds", str(prompt), "--slots", "1", "--device", "cpu"], monkeypatch,
                              scenario)
    assert result.exit_code == 0, result.output
    options = PipelineOptions(batch=1, strength=0.5, frames="uint8")
    with StreamPool(open_dit_checkpoint(ckpt, CFG, "cpu", options, decoder=taehv)) as pool:
        pool.pipeline.set_prompt(read_embeddings(prompt))
        slot = pool.attach(seed=1)
        expected = [pool.step({slot: block})[slot] for block in clip]
    for got, want in zip(served, expected):
        np.testing.assert_array_equal(got, want)
    assert np.abs(served[1].astype(int) - served[0]).mean() > 1  # the blocks differ: the check can fail


@pytest.mark.parametrize("args, expected", [
    (["--dit", "dit-tiny", "--decoder", "FOLDER", "--strength", "0.5"], "the Wan VAE is not a runtime codec"),
    (["--dit", "dit-tiny", "--strength", "0.5"], "dit-tiny has no encoder graph"),
])
def test_a_codec_mirage_serve_cannot_run_is_one_line_and_exit_2(monkeypatch, files, tmp_path, args, expected):
    ckpt, _, prompt = files
    result, _, served = serve([str(ckpt), *[str(tmp_path) if a == "FOLDER" else a for a in args], "--prompt-embeds",
                               str(prompt), "--device", "cpu"], monkeypatch)
    assert result.exit_code == 2 and not served, result.output
    assert expected in result.output and result.output.strip().count("\n") == 0, result.output
