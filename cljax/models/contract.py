"""What cljax asks of a model, per architecture. Backbone records, generation, evaluation
and the loop call these methods only, so a model class that meets one protocol (and is
registered with ``cljax.models.convert`` and ``cljax.cl.backbone``) runs everywhere;
``tests/models/test_contract.py`` checks the built-in families against them.

Shapes: B batch, T tokens (S cache slots or source tokens), D width, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax


@runtime_checkable
class DecoderOnly(Protocol):
    """A causal LM (LLaMA and its variants). ``cfg`` has ``vocab_size``,
    ``num_hidden_layers``, ``eos_token_ids`` and ``max_position_embeddings``."""

    cfg: Any

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """(B, T) ids and {0,1} mask -> (B, T, V) float32 logits."""

    def loss(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        labels: jax.Array,
        loss_mask: jax.Array,
    ) -> jax.Array:
        """Mean next-token NLL over ``loss_mask`` (float32 scalar)."""

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        key_mask: jax.Array,
        cache: Any = None,
        cache_index: Any = 0,
        layers: Any = None,
    ) -> tuple[jax.Array, Any]:
        """Final-normed (B, T, D) hidden states, reading / writing a cache of S slots;
        with a cache, ``layers`` (from ``decoding_layers``) are the layers to run."""

    def decoding_layers(self) -> Any:
        """The layers as the cached path runs them, made once before a decoding loop
        and passed to every step's ``hidden_states``."""

    def logits(self, hidden: jax.Array) -> jax.Array:
        """(..., D) -> (..., V) float32."""

    def output_kernel(self) -> jax.Array | None:
        """The (D, V) output matrix (None when it is not one matrix)."""

    def init_cache(self, batch: int, length: int) -> Any:
        """An empty cache of ``length`` slots."""


@runtime_checkable
class EncoderDecoder(Protocol):
    """A sequence-to-sequence model (T5). ``cfg`` has ``vocab_size``,
    ``decoder_start_token_id`` and ``eos_token_ids``."""

    cfg: Any

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array,
    ) -> jax.Array:
        """Sources (B, S) and teacher-forced targets (B, T) -> (B, T, V) float32 logits."""

    def loss(self, *args: Any, **kwargs: Any) -> jax.Array:
        """Mean target NLL over the loss mask (float32 scalar)."""

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array, *args: Any) -> jax.Array:
        """(B, S) sources -> (B, S, D) encoder states."""

    def init_cache(self, encoder_out: jax.Array, mask: jax.Array, capacity: int) -> Any:
        """The decoder's cache for ``capacity`` new tokens over these encoder states."""

    def decode_step(self, tokens: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
        """(B, 1) tokens -> (B, 1, V) logits and the advanced cache."""

    def logits(self, hidden: jax.Array) -> jax.Array:
        """(..., D) -> (..., V) float32."""

    def output_kernel(self) -> jax.Array | None:
        """The (D, V) output matrix (None when it is not one matrix)."""
