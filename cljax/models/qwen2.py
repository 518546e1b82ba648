"""Qwen2 / Qwen2.5: LLaMA with biases on the q, k and v projections and its own rope
theta (transformers' ``Qwen2ForCausalLM``), as a config-level variant of
:mod:`cljax.models.llama`. Qwen2's optional sliding window (``use_sliding_window``) is
off in every released checkpoint and is refused."""

from __future__ import annotations

import dataclasses
from typing import Any

from cljax.models.convert import llama_like_family, register_family

# DTypePolicy: the generated __init__ resolves its inherited annotations in this module
from cljax.models.layers import DTypePolicy, preset_config  # noqa: F401
from cljax.models.llama import PRESETS as LLAMA_PRESETS
from cljax.models.llama import LlamaConfig, variant_of


@dataclasses.dataclass(frozen=True)
class Qwen2Config(LlamaConfig):
    qkv_bias: bool = True
    MODEL_TYPE = "qwen2"
    ARCHITECTURE = "Qwen2ForCausalLM"

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> Qwen2Config:
        """``tiny`` (tests), ``qwen2.5-0.5b``, ``qwen2.5-1.5b`` or ``qwen2.5-7b``."""
        return preset_config(PRESETS, name, "Qwen2", **overrides)

    @classmethod
    def _variant_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
        if d.pop("use_sliding_window", False):
            raise ValueError("config field use_sliding_window=True is not supported")
        # Without the window these only say which layers would use it.
        for name in ("sliding_window", "max_window_layers", "layer_types"):
            d.pop(name, None)
        return d

    def _variant_hf_fields(self) -> dict[str, Any]:
        return {"use_sliding_window": False}


def _qwen(
    hidden: int, mlp: int, layers: int, heads: int, kv: int, *, vocab: int, tied: bool
) -> Qwen2Config:
    return Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        tie_word_embeddings=tied,
        bos_token_id=151643,
        eos_token_id=151643,
        pad_token_id=None,
    )


PRESETS = {
    "tiny": variant_of(
        LLAMA_PRESETS["tiny"], Qwen2Config, rms_norm_eps=1e-6, rope_theta=1000000.0, qkv_bias=True
    ),
    "qwen2.5-0.5b": _qwen(896, 4864, 24, 14, 2, vocab=151936, tied=True),
    "qwen2.5-1.5b": _qwen(1536, 8960, 28, 12, 2, vocab=151936, tied=True),
    "qwen2.5-7b": _qwen(3584, 18944, 28, 28, 4, vocab=152064, tied=False),
}


register_family(llama_like_family(Qwen2Config))
