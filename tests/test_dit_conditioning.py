"""Prompt conditioning for the DiT (a tiny random UMT5 in a local folder, embeddings files) and its latent
decoders (a tiny random diffusers AutoencoderKLWan, a TAEHV file in the published key layout)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mirage.core.config import get_dit_config
from mirage.model.taehv import Taehv, TaehvDecoder
from mirage.model.text_encoder import ConditioningError, PromptEncoder, clean_prompt, encode_prompt
from mirage.model.wan_decode import load_decoder
from mirage.model.weights import CheckpointError

TINY = get_dit_config("dit-tiny")
WORDS = "a cat sits on the mat while dog runs".split()


@pytest.fixture(scope="module")
def umt5_folder(tmp_path_factory) -> Path:
    """A random UMT5 encoder as wide as dit-tiny's text_dim, with a word-level tokenizer, saved as
    transformers saves them (config.json, model.safetensors, tokenizer.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    folder = tmp_path_factory.mktemp("umt5")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])  # T5's EOS
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>") \
        .save_pretrained(folder)
    torch.manual_seed(0)
    UMT5EncoderModel(UMT5Config(vocab_size=16, d_model=TINY.text_dim, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                                relative_attention_num_buckets=8)).save_pretrained(folder)
    return folder


def test_prompt_is_encoded_once_padded_and_zeroed_like_wan(umt5_folder):
    encoder = PromptEncoder(umt5_folder)
    calls = []
    encoder.model.register_forward_hook(lambda *_: calls.append(1))
    embeds = encode_prompt("a  cat sits &amp;amp; ", TINY, encoder)
    assert embeds.shape == (1, TINY.text_len, TINY.text_dim) and len(calls) == 1
    assert clean_prompt("a  cat sits &amp;amp; ") == "a cat sits &"
    assert clean_prompt(" \u201cａ cat\u201d\n") == '"a cat"'  # ftfy: quotes straightened, full-width folded
    assert encode_prompt("a cat\tsits &amp;", TINY, encoder) is embeds and len(calls) == 1  # same prompt: cached
    n = 5  # a cat sits & (unknown) </s>
    with torch.no_grad():
        alone = encoder.model(input_ids=encoder.tokenizer(["a cat sits &"], return_tensors="pt").input_ids)
    torch.testing.assert_close(embeds[0, :n], alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)
    assert embeds[0, n:].abs().max() == 0 and embeds[0, :n].abs().min() > 0
    long = encode_prompt(" ".join(WORDS * 4), TINY, encoder)  # 32 words: truncated to text_len, EOS included
    assert long.shape == embeds.shape and long[0].abs().amin(-1).min() > 0


def test_diffusers_pipeline_folder_and_bad_encoder_folders(umt5_folder, tmp_path):
    (tmp_path / "text_encoder").symlink_to(umt5_folder)
    (tmp_path / "tokenizer").symlink_to(umt5_folder)
    assert PromptEncoder(tmp_path).width == TINY.text_dim
    with pytest.raises(ConditioningError, match="text encoder folder not found"):
        PromptEncoder(tmp_path / "missing")
    (tmp_path / "wan").mkdir()
    (tmp_path / "wan" / "models_t5_umt5-xxl-enc-bf16.pth").write_bytes(b"")
    with pytest.raises(ConditioningError, match="Wan's own T5 checkpoint"):
        PromptEncoder(tmp_path / "wan")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConditioningError, match="empty: not a UMT5 encoder folder"):
        PromptEncoder(tmp_path / "empty")
    with pytest.raises(ConditioningError, match="needs a text encoder folder"):
        encode_prompt("a cat", TINY)
    wide = get_dit_config("wan-1.3b")
    with pytest.raises(ConditioningError, match="text encoder is 64 wide; model 'wan-1.3b' needs 4096"):
        encode_prompt("a cat", wide, PromptEncoder(umt5_folder))


@pytest.mark.parametrize("name, shape", [("e.safetensors", (7, 64)), ("e.pt", (1, 7, 64))])
def test_embeddings_files_are_padded(tmp_path, name, shape):
    data = torch.randn(shape)
    path = tmp_path / name
    save_file({"prompt_embeds": data}, path) if name.endswith(".safetensors") else \
        torch.save({"prompt_embeds": data}, path)
    embeds = encode_prompt(path, TINY)
    assert embeds.shape == (1, TINY.text_len, 64)
    assert torch.equal(embeds[0, :7], data.reshape(7, 64)) and embeds[0, 7:].abs().max() == 0


@pytest.mark.parametrize("shape, message", [
    ((7, 4096), r"shape \(7, 4096\); the model needs \(L, 64\) or \(1, L, 64\)"),
    ((2, 7, 64), r"shape \(2, 7, 64\)"),
    ((17, 64), "17 prompt tokens; the model takes at most 16"),
])
def test_embeddings_of_the_wrong_shape_give_one_line(tmp_path, shape, message):
    path = tmp_path / "e.safetensors"
    save_file({"prompt_embeds": torch.zeros(shape)}, path)
    with pytest.raises(ConditioningError, match=message) as err:
        encode_prompt(path, TINY)
    assert "\n" not in str(err.value)


# --- decoders ---------------------------------------------------------------------------------------------

# taehv.py's TAEHV.decoder for Wan 2.1 (latent_channels 16, patch 1, time upscale (False, True, True)):
# index -> what holds weights there (Clamp, ReLU, Upsample at the other indices hold none).
TAEHV_LAYERS = {1: ("conv", 16, 256), 3: ("mem", 256), 4: ("mem", 256), 5: ("mem", 256), 7: ("tgrow", 256, 1),
                8: ("conv-nobias", 256, 128), 9: ("mem", 128), 10: ("mem", 128), 11: ("mem", 128),
                13: ("tgrow", 128, 2), 14: ("conv-nobias", 128, 64), 15: ("mem", 64), 16: ("mem", 64),
                17: ("mem", 64), 19: ("tgrow", 64, 2), 20: ("conv-nobias", 64, 64), 22: ("conv", 64, 3)}
# ... and its TAEHV.encoder (image channels 3, time downscale (True, True, False); ReLU at 1 holds none): each
# stage a TPool, a 3x3 stride-2 conv without bias and three MemBlock(64)
TAEHV_ENCODER_LAYERS = {0: ("conv", 3, 64), 17: ("conv", 64, 16)}
for _start, _stride in ((2, 2), (7, 2), (12, 1)):
    TAEHV_ENCODER_LAYERS.update({_start: ("tpool", 64, _stride), _start + 1: ("conv-nobias", 64, 64),
                                 **{_start + k: ("mem", 64) for k in (2, 3, 4)}})


def taehv_layout(part: str = "decoder") -> dict[str, tuple[int, ...]]:
    """The published file's `part.*` keys and shapes (its decoder, or its encoder)."""
    shapes = {}
    for i, (kind, *dims) in (TAEHV_LAYERS if part == "decoder" else TAEHV_ENCODER_LAYERS).items():
        if kind == "mem":  # MemBlock(n, n): conv.0 (2n -> n), conv.2, conv.4 (n -> n), 3x3 with bias; skip = Identity
            n = dims[0]
            for j, n_in in ((0, 2 * n), (2, n), (4, n)):
                shapes[f"{part}.{i}.conv.{j}.weight"], shapes[f"{part}.{i}.conv.{j}.bias"] = (n, n_in, 3, 3), (n,)
        elif kind == "tgrow":
            shapes[f"{part}.{i}.conv.weight"] = (dims[0] * dims[1], dims[0], 1, 1)
        elif kind == "tpool":  # `stride` frames stacked in channels -> one
            shapes[f"{part}.{i}.conv.weight"] = (dims[0], dims[0] * dims[1], 1, 1)
        else:
            shapes[f"{part}.{i}.weight"] = (dims[1], dims[0], 3, 3)
            if kind == "conv":
                shapes[f"{part}.{i}.bias"] = (dims[1],)
    return shapes


def taehv_file(path: Path, encoder: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """A TAEHV file in the published layout with small random values (its encoder too, unless `encoder` is
    False); returns what it holds."""
    g = torch.Generator().manual_seed(seed)
    layout = {**(taehv_layout("encoder") if encoder else {}), **taehv_layout()}
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in layout.items()}
    torch.save(state, path) if path.suffix == ".pth" else save_file(state, path)
    return state


def test_taehv_module_has_the_published_names():
    layout = taehv_layout()
    assert len(layout) == 64 and {k: tuple(v.shape) for k, v in TaehvDecoder().state_dict().items()} == layout
    encoder = taehv_layout("encoder")
    assert len(encoder) == 64 and {k: tuple(v.shape) for k, v in Taehv().state_dict().items()} == {**encoder, **layout}


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_taehv_file_loads_and_decodes_blocks(tmp_path, suffix):
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(s, generator=g) * 0.05 for k, s in taehv_layout().items()}  # no encoder: decodes only
    state["decoder.7.conv.weight"] = torch.randn(512, 256, 1, 1, generator=g)  # saved for 2x time upscale
    path = tmp_path / f"taew2_1{suffix}"
    torch.save(state, path) if suffix == ".pth" else save_file(state, path)
    decoder = load_decoder(path)
    assert not hasattr(decoder, "encode")
    assert torch.equal(decoder.decoder[7].conv.weight, state["decoder.7.conv.weight"][-256:])  # the last step
    assert torch.equal(decoder.decoder[3].conv[2].weight, state["decoder.3.conv.2.weight"])

    latents = torch.randn(1, 16, 5, 3, 4, generator=g)
    whole = decoder.decode(latents)
    assert whole.shape == (1, 1 + 4 * (5 - 1), 3, 24, 32) and whole.abs().max() <= 1 and whole.std() > 0
    decoder.reset()
    blocks = [decoder.decode(latents[:, :, :3]), decoder.decode(latents[:, :, 3:])]
    assert [b.shape[1] for b in blocks] == [9, 8] and torch.equal(torch.cat(blocks, 1), whole)
    assert load_decoder(path, dtype=torch.bfloat16).decode(latents).dtype == torch.bfloat16


def test_taehv_file_with_wrong_keys_names_them(tmp_path):
    state = {k: torch.zeros(s) for k, s in taehv_layout().items()}
    del state["decoder.22.bias"]
    state["decoder.1.weight"] = torch.zeros(256, 48, 3, 3)  # a Wan 2.2 (48-channel) TAEHV
    path = tmp_path / "taew2_2.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"1 missing: decoder.22.bias; 1 mis-shaped: decoder.1.weight "
                                              r"\(256, 48, 3, 3\) \(model \(256, 16, 3, 3\)\)"):
        load_decoder(path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_taehv_file_with_its_encoder_encodes_blocks_as_one_video(tmp_path, suffix):
    """The published file's encoder.* entries load (every one, by name and shape); a video's first block of
    4N - 3 frames gives N latent frames (its first frame stands alone, as Wan's first latent frame does) and
    then 4N frames give N; blocks equal the clip at once; a round trip gives back each frame in its place."""
    state = taehv_file(tmp_path / f"taew2_1{suffix}")
    taehv = load_decoder(tmp_path / f"taew2_1{suffix}")
    assert all(torch.equal(v, state[k]) for k, v in taehv.state_dict().items())
    g = torch.Generator().manual_seed(1)
    video = torch.rand(1, 13, 3, 24, 32, generator=g) * 2 - 1
    whole = taehv.encode(video)
    assert whole.shape == (1, 16, 4, 3, 4) and whole.std() > 0
    taehv.reset()
    blocks = [taehv.encode(video[:, :5]), taehv.encode(video[:, 5:])]
    assert [b.shape[2] for b in blocks] == [2, 2] and torch.equal(torch.cat(blocks, 2), whole)
    taehv.reset()
    later = video.clone()
    later[:, 1:] = 0  # the first latent frame is the first frame's alone; the second is frames 1-4's
    changed = (taehv.encode(later) - whole).abs().amax((0, 1, 3, 4))
    assert changed[0] == 0 and changed[1] > 0
    taehv.reset()
    assert taehv.decode(taehv.encode(video[:, :5])).shape == (1, 5, 3, 24, 32)  # as many frames out as in
    with pytest.raises(ValueError, match="a block of 6 frames"):
        taehv.encode(video[:, :6])  # not whole groups of 4 frames


def test_taehv_file_with_part_of_an_encoder_names_what_is_missing(tmp_path):
    state = taehv_file(tmp_path / "taew2_1.pth")
    del state["encoder.12.conv.weight"]
    torch.save(state, tmp_path / "taew2_1.pth")
    with pytest.raises(CheckpointError, match=r"\(TAEHV\): keys do not fit the model; "
                                              r"1 missing: encoder.12.conv.weight$"):
        load_decoder(tmp_path / "taew2_1.pth")


def test_wan_vae_folder_decodes_blocks_as_one_video(tmp_path):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1)
    vae.save_pretrained(tmp_path / "vae")
    decoder = load_decoder(tmp_path)  # a pipeline folder: its vae/ is read
    latents = torch.randn(1, 16, 5, 2, 3)
    blocks = [decoder.decode(latents[:, :, :3]), decoder.decode(latents[:, :, 3:])]
    assert [b.shape for b in blocks] == [(1, 9, 3, 16, 24), (1, 8, 3, 16, 24)]
    with torch.no_grad():  # diffusers' own decode of the whole clip, on un-normalised latents
        raw = latents * torch.tensor(vae.config.latents_std).view(1, 16, 1, 1, 1) \
            + torch.tensor(vae.config.latents_mean).view(1, 16, 1, 1, 1)
        whole = vae.decode(raw).sample.transpose(1, 2)
    torch.testing.assert_close(torch.cat(blocks, 1), whole, rtol=1e-5, atol=1e-5)
    half = load_decoder(tmp_path / "vae", dtype=torch.bfloat16)  # bfloat16 on the CPU; float16 on a GPU
    assert half.decode(latents[:, :, :1]).shape == (1, 1, 3, 16, 24)

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"_class_name": "AutoencoderTiny"}')
    with pytest.raises(CheckpointError, match="is a 'AutoencoderTiny', not an AutoencoderKLWan"):
        load_decoder(tmp_path / "other")
    torch.save({"decoder.middle.0.residual.0.gamma": torch.zeros(1)}, tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError, match="Wan VAE in Wan's own layout"):
        load_decoder(tmp_path / "Wan2.1_VAE.pth")
    with pytest.raises(CheckpointError, match="decoder not found"):
        load_decoder(tmp_path / "taew2_1.pth")


def test_prompt_checkpoint_and_decoder_compose(umt5_folder, tmp_path):
    """The pieces mirage-run joins: a prompt's embeddings, a Self-Forcing checkpoint, a TAEHV file."""
    from mirage.model.wan_checkpoint import load_dit, model_shapes

    g = torch.Generator().manual_seed(3)
    torch.save({"generator_ema": {"model." + k: torch.randn(s, generator=g) * 0.1
                                  for k, s in model_shapes(TINY).items()}}, tmp_path / "sf.pt")
    save_file({k: torch.randn(s, generator=g) * 0.05 for k, s in taehv_layout().items()},
              tmp_path / "taew2_1.safetensors")
    text = encode_prompt("a cat runs", TINY, PromptEncoder(umt5_folder))
    model, _ = load_dit(tmp_path / "sf.pt", TINY)
    decoder = load_decoder(tmp_path / "taew2_1.safetensors")
    h, w = TINY.latent_size
    block = torch.randn(1, TINY.in_dim, TINY.block_frames, h, w, generator=g)
    with torch.no_grad():
        velocity = model(block, torch.full((1, TINY.block_frames), 750.0), text)
    frames = decoder.decode(block - 0.75 * velocity)  # x0 = x_t - sigma v (sigma here is illustrative only)
    assert frames.shape == (1, 1 + 4 * (TINY.block_frames - 1), 3, TINY.height, TINY.width)


def test_non_finite_prompt_embeddings_are_refused(tmp_path):
    """NaN embeddings gave an all-black video and exit 0."""
    from safetensors.torch import save_file

    from mirage.core.config import get_dit_config

    cfg = get_dit_config("dit-tiny")
    path = tmp_path / "nan.safetensors"
    save_file({"prompt_embeds": torch.full((4, cfg.text_dim), float("nan"))}, str(path))
    with pytest.raises(ConditioningError, match="NaN or infinite"):
        encode_prompt(path, cfg)
