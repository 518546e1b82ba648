"""Mistral: LLaMA with sliding-window attention (each position attends to the last
``sliding_window`` positions; transformers' ``MistralForCausalLM``), as a config-level
variant of :mod:`cljax.models.llama`. Registering it makes ``model.family=mistral`` and
Mistral checkpoint directories work everywhere LLaMA does."""

from __future__ import annotations

from typing import Any

from cljax.models.convert import llama_like_family, register_family
from cljax.models.layers import preset_config
from cljax.models.llama import PRESETS as LLAMA_PRESETS
from cljax.models.llama import LlamaConfig, variant_of


# no new fields: the frozen dataclass's __init__, __eq__ and __hash__ are inherited
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
    "tiny": variant_of(LLAMA_PRESETS["tiny"], MistralConfig, sliding_window=8),
    # Mistral-7B v0.1: LLaMA-2-7B's width and depth, GQA (8 kv heads), a wider MLP
    "mistral-7b": variant_of(
        LLAMA_PRESETS["llama-2-7b"],
        MistralConfig,
        intermediate_size=14336,
        num_key_value_heads=8,
        max_position_embeddings=32768,
        sliding_window=4096,
    ),
}


register_family(llama_like_family(MistralConfig))
