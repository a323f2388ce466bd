"""Bring your own checkpoint: Wan 2.1 generators in each project's published layout, prompt conditioning
(a tiny random UMT5 / embeddings files) and the two latent decoders (Wan VAE, TAEHV), all with random weights.

Layouts written here (see mirage.model.wan_checkpoint for the code they come from):
Self-Forcing {"generator", "critic", "generator_ema"} with "model." keys, float32 (FSDP full state dicts
of float32 weights; the EMA shadow is `.float()`); CausVid <folder>/model.pt {"generator", "critic"};
LongLive {"generator", "critic", "step"} + lora.pt {"generator_lora", "critic_lora", "step"}; Wan's flat
safetensors; diffusers' sharded WanTransformer3DModel folder written by diffusers itself.
"""
from __future__ import annotations

import argparse
import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from mirage.core.config import get_dit_config
from mirage.model import wan_checkpoint
from mirage.model.dit import WanDiT
from mirage.model.wan_checkpoint import load_dit, model_shapes, read_dit_checkpoint
from mirage.model.weights import CheckpointError

TINY = get_dit_config("dit-tiny")
WAN = get_dit_config("wan-1.3b")


def random_state(cfg, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.1 for k, s in model_shapes(cfg).items()}


def reference(state: dict[str, torch.Tensor]) -> WanDiT:
    model = WanDiT(TINY).eval()
    model.load_state_dict(state)
    return model


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h, w = TINY.latent_size
    return (torch.randn(1, TINY.in_dim, 2, h, w, generator=g), torch.tensor([[500.0, 250.0]]),
            torch.randn(1, 5, TINY.text_dim, generator=g))


def assert_same_outputs(model: WanDiT, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        assert torch.equal(model(*inputs()), reference(state)(*inputs()))


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wrapped(state: dict, prefix: str = "model.") -> dict:
    return {prefix + k: v for k, v in state.items()}


def test_self_forcing_checkpoint_loads_its_ema_or_raw_generator(tmp_path):
    raw, ema = random_state(TINY, 0), random_state(TINY, 1)
    # The EMA shadow as an FSDP-wrapped module names it; Self-Forcing's own loader strips the wrapper names.
    ema_fsdp = {k.replace("model.blocks.", "model._fsdp_wrapped_module.blocks."): v for k, v in wrapped(ema).items()}
    critic = {"model.patch_embedding.weight": torch.zeros(3)}  # the fake score: never read
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": wrapped(raw), "critic": critic, "generator_ema": ema_fsdp}, path)

    model, info = load_dit(path, TINY)
    assert (info.layout, info.entry, info.files) == ("self-forcing/causvid/longlive", "generator_ema",
                                                     {path.name: sha256(path)})
    assert_same_outputs(model, ema)
    model, info = load_dit(path, TINY, ema=False)
    assert info.entry == "generator"
    assert_same_outputs(model, raw)


def test_causvid_folder_in_bfloat16(tmp_path):
    state = random_state(TINY, 2)
    (tmp_path / "autoregressive_checkpoint").mkdir()
    torch.save({"generator": wrapped(state), "critic": wrapped(random_state(TINY, 3))},
               tmp_path / "autoregressive_checkpoint" / "model.pt")
    model, info = load_dit(tmp_path / "autoregressive_checkpoint", TINY, dtype=torch.bfloat16)
    assert info.entry == "generator" and list(info.files) == ["model.pt"]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(torch.equal(p, state[k].bfloat16()) for k, p in model.state_dict().items())


def lora_pairs(seed: int, rank: int) -> dict[str, torch.Tensor]:
    """LongLive's generator_lora: every nn.Linear of each attention block, peft names, adapter name removed."""
    g = torch.Generator().manual_seed(seed)
    shapes = model_shapes(TINY)
    out = {}
    for name in shapes:
        if name.startswith("blocks.") and name.endswith(".weight") and len(shapes[name]) == 2:
            base = "base_model.model." + name.removesuffix(".weight")
            out[f"{base}.lora_A.weight"] = torch.randn(rank, shapes[name][1], generator=g) * 0.1
            out[f"{base}.lora_B.weight"] = torch.randn(shapes[name][0], rank, generator=g) * 0.1
    return out


def test_longlive_base_plus_lora_is_merged(tmp_path):
    state, rank = random_state(TINY, 4), 8
    base, lora = tmp_path / "longlive_base.pt", tmp_path / "lora.pt"
    torch.save({"generator": wrapped(state), "critic": wrapped(random_state(TINY, 5)), "step": 1000}, base)
    pairs = {k: v.bfloat16() for k, v in lora_pairs(6, rank).items()}  # its adapter config: dtype bfloat16
    torch.save({"generator_lora": pairs, "critic_lora": lora_pairs(7, rank), "step": 3000}, lora)
    assert len(pairs) == 2 * 10 * TINY.num_layers  # q, k, v, o of both attentions + ffn.0, ffn.2 per block

    model, info = load_dit(base, TINY, lora=lora, lora_alpha=4.0)
    merged = dict(state)
    for name in model_shapes(TINY):
        a = pairs.get(f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight")
        if a is not None and name.endswith(".weight"):
            b = pairs[f"base_model.model.{name.removesuffix('.weight')}.lora_B.weight"]
            merged[name] = state[name] + (4.0 / rank) * b.float() @ a.float()
    assert info.lora == {"path": str(lora), "sha256": sha256(lora), "rank": rank, "alpha": 4.0, "layers": 40}
    for k, p in model.state_dict().items():
        torch.testing.assert_close(p, merged[k], rtol=1e-6, atol=1e-6)

    with pytest.raises(CheckpointError, match="LoRA adapter .*without base weights"):
        load_dit(lora, TINY)
    pairs["base_model.model.blocks.9.self_attn.q.lora_A.weight"] = pairs.pop(
        "base_model.model.blocks.3.self_attn.q.lora_A.weight")  # a layer dit-tiny does not have
    torch.save({"generator_lora": pairs}, lora)
    with pytest.raises(CheckpointError, match=r"2 LoRA weights do not fit the model \(rank 8\): "
                                              r"blocks.3.self_attn.q.weight, blocks.9.self_attn.q.weight"):
        load_dit(base, TINY, lora=lora)


def test_wan_safetensors_file(tmp_path):
    state = random_state(TINY, 8)
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file(state, path)
    model, info = load_dit(path, TINY)
    assert (info.layout, info.entry) == ("wan", None)
    assert_same_outputs(model, state)


def test_wan_ai_folder_reads_its_transformer_file(tmp_path):
    """Wan-AI/Wan2.1-T2V-1.3B's folder: config.json (WanModel) and the transformer beside the VAE and T5 files."""
    state = random_state(TINY, 11)
    save_file(state, tmp_path / "diffusion_pytorch_model.safetensors")
    torch.save({"decoder.conv1.weight": torch.zeros(1)}, tmp_path / "Wan2.1_VAE.pth")
    torch.save({"token_embedding.weight": torch.zeros(1)}, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    config = {"_class_name": "WanModel", "model_type": "t2v", "dim": TINY.dim, "num_heads": TINY.num_heads}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, info = load_dit(tmp_path, TINY)
    assert info.layout == "wan" and list(info.files) == ["diffusion_pytorch_model.safetensors"]
    assert_same_outputs(model, state)


def tiny_diffusers(**change):
    from diffusers import WanTransformer3DModel

    kwargs = dict(num_attention_heads=TINY.num_heads, attention_head_dim=TINY.head_dim, in_channels=TINY.in_dim,
                  out_channels=TINY.out_dim, text_dim=TINY.text_dim, freq_dim=TINY.freq_dim, ffn_dim=TINY.ffn_dim,
                  num_layers=TINY.num_layers)
    return WanTransformer3DModel(**{**kwargs, **change})


def test_diffusers_sharded_folder_written_by_diffusers(tmp_path):
    torch.manual_seed(9)
    source = tiny_diffusers()
    source.save_pretrained(tmp_path / "transformer", max_shard_size="2MB")
    shards = sorted(p.name for p in (tmp_path / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()

    model, info = load_dit(tmp_path, TINY)  # a pipeline folder: its transformer/ is read
    assert info.layout == "diffusers" and sorted(info.files) == shards
    from mirage.model.wan_keys import wan_to_diffusers
    theirs = source.state_dict()
    assert all(torch.equal(p, theirs[wan_to_diffusers(k)]) for k, p in model.state_dict().items())

    heads = tmp_path / "heads"
    tiny_diffusers(num_attention_heads=TINY.num_heads * 2, attention_head_dim=TINY.head_dim // 2).save_pretrained(heads)
    with pytest.raises(CheckpointError, match=f"{TINY.num_heads * 2} attention heads; config 'dit-tiny' has"):
        load_dit(heads, TINY)  # same shapes, other heads: only config.json can tell


def test_wrong_keys_are_all_named_before_the_model_is_built(tmp_path, monkeypatch):
    state = random_state(TINY, 10)
    del state["blocks.1.ffn.0.bias"], state["head.modulation"]
    state["blocks.0.self_attn.q.weight"] = torch.zeros(3, 3)
    state["blocks.0.img_emb.proj.weight"] = torch.zeros(2)
    state["_cls_pred_branch.0.weight"] = torch.zeros(2)  # a GAN critic's head on the wrapper, outside its model
    path = tmp_path / "bad.pt"
    torch.save({"generator": {k if k.startswith("_") else "model." + k: v for k, v in state.items()}}, path)
    real = wan_checkpoint.WanDiT

    def only_on_meta(cfg):  # the checks may build the model on the meta device, never for real
        assert torch.empty(0).device.type == "meta", "the model was allocated before the keys were checked"
        return real(cfg)

    monkeypatch.setattr(wan_checkpoint, "WanDiT", only_on_meta)
    with pytest.raises(CheckpointError) as err:
        load_dit(path, TINY)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{path} (self-forcing/causvid/longlive layout): keys do not")
    assert "2 missing: blocks.1.ffn.0.bias, head.modulation" in message
    assert "2 unexpected: _cls_pred_branch.0.weight, blocks.0.img_emb.proj.weight" in message
    assert f"1 mis-shaped: blocks.0.self_attn.q.weight (3, 3) (model ({TINY.dim}, {TINY.dim}))" in message


@pytest.mark.parametrize("content, message", [
    ({"state_dict": {"down.0.conv.weight": torch.zeros(1)}}, "not a Wan generator checkpoint"),
    ({"generator": {"model.down.0.conv.weight": torch.zeros(1)}}, "not a Wan 2.1 transformer checkpoint"),
    ({"generator": {"x": torch.zeros(1)}, "args": argparse.Namespace(lr=1e-4)}, "only tensor checkpoints"),
])
def test_other_layouts_give_one_line(tmp_path, content, message):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_dit(path, TINY)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_a_mirage_unet_checkpoint_is_refused_in_one_line():
    from conftest import CKPT_GEN

    with pytest.raises(CheckpointError, match=r"not a Wan 2.1 transformer checkpoint \(no patch_embedding.weight"):
        load_dit(CKPT_GEN, TINY)


# --- wan-1.3b: the published key set and shapes, without a byte of weights -------------------------------

WAN_SHAPES = {  # Wan2.1-T2V-1.3B (dim 1536, ffn 8960, 30 layers, text 4096, freq 256, patch 1x2x2)
    "patch_embedding.weight": (1536, 16, 1, 2, 2), "text_embedding.0.weight": (1536, 4096),
    "time_embedding.0.weight": (1536, 256), "time_projection.1.weight": (9216, 1536),
    "blocks.0.self_attn.q.weight": (1536, 1536), "blocks.0.self_attn.norm_q.weight": (1536,),
    "blocks.29.cross_attn.o.bias": (1536,), "blocks.0.norm3.weight": (1536,), "blocks.0.ffn.0.weight": (8960, 1536),
    "blocks.0.modulation": (1, 6, 1536), "head.head.weight": (64, 1536), "head.modulation": (1, 2, 1536),
}


def test_wan_1_3b_key_set():
    shapes = model_shapes(WAN)
    # 27 per block (q, k, v, o weight + bias and norm_q, norm_k of 2 attentions, norm3, ffn.0/.2, modulation) + 15
    assert len(shapes) == 30 * 27 + 15 == 825
    assert {k: shapes[k] for k in WAN_SHAPES} == WAN_SHAPES
    # counted by hand from the layout; x 4 bytes = 5.68 GB, the size of Wan's float32 diffusion_pytorch_model
    assert sum(torch.Size(s).numel() for s in shapes.values()) == 1_418_996_800


def test_wan_1_3b_project_layouts_check_without_weights(tmp_path):
    meta = {k: torch.empty(s, device="meta") for k, s in model_shapes(WAN).items()}
    path = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator": wrapped(meta), "generator_ema": wrapped(meta), "critic": wrapped(meta)}, path)
    entries, info = read_dit_checkpoint(path, WAN)
    assert len(entries) == 825 and info.entry == "generator_ema"
    assert entries["blocks.0.self_attn.q.weight"].shape == (1536, 1536)
    # LongLive's lora.pt at its published rank (256): every Linear of the 30 attention blocks, 10 per block
    lora = {}
    for name, (out, inp) in ((k, s) for k, s in model_shapes(WAN).items() if k.startswith("blocks.") and len(s) == 2):
        base = "base_model.model." + name.removesuffix(".weight")
        lora[f"{base}.lora_A.weight"] = torch.empty(256, inp, device="meta", dtype=torch.bfloat16)
        lora[f"{base}.lora_B.weight"] = torch.empty(out, 256, device="meta", dtype=torch.bfloat16)
    torch.save({"generator_lora": lora, "critic_lora": lora, "step": 0}, tmp_path / "lora.pt")
    pairs, record = wan_checkpoint.read_lora(tmp_path / "lora.pt", WAN)
    assert len(lora) == 600 and (record["rank"], record["alpha"], record["layers"]) == (256, 256.0, 300)
    assert pairs["blocks.0.ffn.0.weight"][1].shape == (8960, 256)

    del meta["blocks.7.ffn.2.weight"]
    torch.save({"generator": wrapped(meta)}, path)
    with pytest.raises(CheckpointError, match="1 missing: blocks.7.ffn.2.weight"):
        read_dit_checkpoint(path, WAN)


def test_wan_1_3b_diffusers_layout_maps_onto_mirage_names():
    with torch.device("meta"):
        theirs = tiny_diffusers(num_attention_heads=12, attention_head_dim=128, text_dim=4096, freq_dim=256,
                                ffn_dim=8960, num_layers=30).state_dict()
    entries, layout = wan_checkpoint._to_wan_names(
        {k: wan_checkpoint.Entry(tuple(v.shape), None) for k, v in theirs.items()}, "diffusers")
    assert layout == "diffusers" and {k: e.shape for k, e in entries.items()} == model_shapes(WAN)
    assert theirs["blocks.0.attn1.to_q.weight"].shape == (1536, 1536)
    assert theirs["condition_embedder.text_embedder.linear_1.weight"].shape == (1536, 4096)
