"""Parameter names: Wan 2.1's `WanModel` (Mirage's WanDiT, Self-Forcing / CausVid / LongLive after their
`model.` prefix) <-> diffusers' `WanTransformer3DModel` (a diffusers-layout transformer folder).

Pure functions on names; the tensors themselves are identical in both layouts (same shapes). The
correspondence is the one diffusers' own converter applies (loaders/single_file_utils.py,
convert_wan_transformer_to_diffusers), including its swap of the block norms: Wan's `norm3` (the affine
norm before cross-attention) is diffusers' `norm2`; Wan's parameter-free norm2 has no key.
"""
from __future__ import annotations

import re

from mirage.core.errors import MirageError


class WanKeyError(MirageError, ValueError):
    """A parameter name that belongs to neither layout of the Wan 2.1 text-to-video transformer."""


_TOP = {  # whole module paths outside the blocks: Wan -> diffusers
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_TOP_PARAMS = {"head.modulation": "scale_shift_table"}  # whole parameter names
_ATTN = {"self_attn": "attn1", "cross_attn": "attn2"}
_PROJ = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out.0", "norm_q": "norm_q", "norm_k": "norm_k"}
_BLOCK = {"norm3": "norm2", "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2"}
_BLOCK_PARAMS = {"modulation": "scale_shift_table"}


# module paths inside a block, Wan -> diffusers
_BLOCK_MODULES = dict(_BLOCK, **{f"{wa}.{p}": f"{ha}.{q}" for wa, ha in _ATTN.items() for p, q in _PROJ.items()})
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _convert(name: str, top: dict, top_params: dict, block_modules: dict, block_params: dict, layout: str) -> str:
    match = _BLOCK_KEY.match(name)
    prefix, rest, modules, params = ("", name, top, top_params) if not match else \
        (f"blocks.{match.group(1)}.", match.group(2), block_modules, block_params)
    if rest in params:
        return prefix + params[rest]
    module, _, leaf = rest.rpartition(".")
    if module in modules and leaf in ("weight", "bias"):
        return f"{prefix}{modules[module]}.{leaf}"
    raise WanKeyError(f"{name!r} is not a parameter of the {layout} layout of the Wan 2.1 transformer")


def _inverse(d: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in d.items()}


def wan_to_diffusers(name: str) -> str:
    """'blocks.3.self_attn.o.weight' -> 'blocks.3.attn1.to_out.0.weight'."""
    return _convert(name, _TOP, _TOP_PARAMS, _BLOCK_MODULES, _BLOCK_PARAMS, "WanModel")


def diffusers_to_wan(name: str) -> str:
    """'blocks.3.attn1.to_out.0.weight' -> 'blocks.3.self_attn.o.weight'."""
    return _convert(name, _inverse(_TOP), _inverse(_TOP_PARAMS), _inverse(_BLOCK_MODULES), _inverse(_BLOCK_PARAMS),
                    "diffusers WanTransformer3DModel")
