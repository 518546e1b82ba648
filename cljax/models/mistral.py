"""Mistral: LLaMA with sliding-window attention (each position attends to the last
``sliding_window`` positions; transformers' ``MistralForCausalLM``), as a config-level
variant of :mod:`cljax.models.llama`. Registering it makes ``model.family=mistral`` and
Mistral checkpoint directories work everywhere LLaMA does."""

from __future__ import annotations

import dataclasses
from typing import Any

from cljax.models.convert import llama_like_family, register_family
from cljax.models.layers import preset_config
from cljax.models.llama import LlamaConfig


@dataclasses.dataclass(frozen=True)
class MistralConfig(LlamaConfig):
    MODEL_TYPE = "mistral"
    ARCHITECTURE = "MistralForCausalLM"
    VARIANT_HF_FIELDS = frozenset({"sliding_window"})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> MistralConfig:
        """``tiny`` (tests) or ``mistral-7b`` (v0.1)."""
        return preset_config(PRESETS, name, "Mistral", **overrides)

    def _variant_hf_fields(self) -> dict[str, Any]:
        return {"sliding_window": self.sliding_window}


PRESETS = {
    "tiny": MistralConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        sliding_window=8,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "mistral-7b": MistralConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        sliding_window=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    ),
}


register_family(llama_like_family(MistralConfig))
