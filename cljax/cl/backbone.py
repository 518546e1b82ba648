"""What the continual loop needs of a model family, in one table per family: how to
build the model for a tokenizer, its batch format, its loss, per-row answer
log-likelihoods (rank classification), greedy generation, and the parameter targets of
the methods (OSF matrices, LoRA modules, GORP full weights) as path regexes.

Paths are ``/``-joined state paths (``cljax.paths``); LoRA targets
are module paths (``layers/attn/q_proj``); a weight wrapped by LoRA lives under
``.../base/kernel``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from cljax import parallel
from cljax.config import ModelConfig
from cljax.data.batching import Batch, TextTokenizer
from cljax.errors import CheckpointError, ConfigError, UnknownNameError
from cljax.models.layers import DTypePolicy
from cljax.models.llama import Llama, LlamaConfig
from cljax.models.losses import token_logprobs
from cljax.models.t5 import T5, T5Config


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family as the loop sees it.

    Attributes:
      name: ``llama`` or ``t5``.
      format: batch format of ``cljax.data.batching`` (``decoder`` / ``seq2seq``).
      config_class / model_class: the family's config dataclass (with ``preset``) and
        NNX module.
      token_fields: the config fields a tokenizer fixes (vocabulary, special ids).
      logits: ``(model, batch) -> (B, T, V)`` float32 logits at the loss positions.
      train_loss: ``(model, batch) ->`` mean token NLL of the answers, the model's own
        ``loss`` (the same value as from ``logits``, without materialising them).
      layer_masks: ``batch -> {layer stack path: (B, T) mask of its real tokens}``.
      generate: ``(model, prompts, max_new_tokens, tokenizer) -> list of token lists``;
        prompts are the batch builders' prompt ids (no specials).
      osf_targets: parameter-path regexes of the matrices OSF constrains (authors' set).
      lora_targets: module-path regexes LoRA wraps (q and v of attention).
      gorp_full_targets: parameter-path regexes of GORP's full-rank weights.
    """

    name: str
    format: Literal["decoder", "seq2seq"]
    config_class: Any
    model_class: Any
    token_fields: Callable[[TextTokenizer], dict[str, Any]]
    logits: Callable[[nnx.Module, Batch], jax.Array]
    train_loss: Callable[[nnx.Module, Batch], jax.Array]
    layer_masks: Callable[[Batch], dict[str, Any]]
    generate: Callable[[nnx.Module, Sequence[np.ndarray], int, TextTokenizer], list[list[int]]]
    osf_targets: tuple[str, ...]
    lora_targets: tuple[str, ...]
    gorp_full_targets: tuple[str, ...]

    def build(
        self,
        cfg: ModelConfig,
        tokenizer: TextTokenizer,
        rngs: nnx.Rngs,
        mesh: Mesh | None = None,
        rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
    ) -> tuple[nnx.Module, Any]:
        """The model of ``cfg``: loaded from ``cfg.checkpoint``, or a preset (with
        ``cfg.overrides``) sized for ``tokenizer`` and randomly initialised. With a
        ``mesh`` every parameter is born in its sharding (loaded or initialised)."""
        if cfg.checkpoint:
            model, model_cfg = _from_checkpoint(cfg, tokenizer, mesh, rules)
            if not isinstance(model_cfg, self.config_class):
                raise CheckpointError(
                    f"model.checkpoint {cfg.checkpoint} holds a {type(model_cfg).__name__} "
                    f"model, but model.family is {self.name!r}"
                )
            return model, model_cfg
        fields = {**self.token_fields(tokenizer), "remat": cfg.remat, **cfg.overrides}
        try:
            model_cfg = self.config_class.preset(cfg.preset, policy=_policy(cfg), **fields)
        except (ValueError, TypeError) as err:  # a shape the model refuses, an unknown field
            raise ConfigError(
                f"model.preset={cfg.preset!r} with model.overrides={cfg.overrides}: {err}"
            ) from err
        if model_cfg.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"model vocab_size {model_cfg.vocab_size} (model.overrides) is smaller than the"
                f" {tokenizer.vocab_size} tokens of tokenizer {tokenizer.path} (data.tokenizer)"
            )
        if mesh is None or mesh.size == 1:
            return self.model_class(model_cfg, rngs=rngs), model_cfg
        factory = lambda r: self.model_class(model_cfg, rngs=r)
        return parallel.create_sharded(factory, rngs, mesh, rules), model_cfg

    def loss(self, model: nnx.Module, batch: Batch) -> jax.Array:
        """Mean token NLL of the answers (float32 scalar)."""
        return self.train_loss(model, batch)

    def answer_logprob(self, model: nnx.Module, batch: Batch) -> jax.Array:
        """(B,) summed log-likelihood of each row's answer tokens (and eos)."""
        logp = token_logprobs(self.logits(model, batch), batch.labels)
        return jnp.sum(logp * batch.loss_mask.astype(jnp.float32), axis=-1)


def _policy(cfg: ModelConfig) -> DTypePolicy:
    return DTypePolicy(param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)


def _from_checkpoint(
    cfg: ModelConfig, tokenizer: TextTokenizer, mesh: Mesh | None, rules: parallel.LogicalRules
) -> tuple[nnx.Module, Any]:
    from cljax.models.convert import load_hf_checkpoint

    overrides = {"remat": cfg.remat, **cfg.overrides}
    model, model_cfg = load_hf_checkpoint(
        cfg.checkpoint, mesh=mesh, rules=rules, policy=_policy(cfg), **overrides
    )
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise CheckpointError(
            f"model.checkpoint {cfg.checkpoint} has vocab_size {model_cfg.vocab_size} but"
            f" tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens"
        )
    return model, model_cfg


# --------------------------------------------------------------------------- LLaMA


def _llama_logits(model: nnx.Module, batch: Batch) -> jax.Array:
    return model(batch.input_ids, attention_mask=batch.attention_mask)


def _llama_loss(model: nnx.Module, batch: Batch) -> jax.Array:
    return model.loss(batch.input_ids, batch.attention_mask, batch.labels, batch.loss_mask)


def _llama_generate(model, prompts, max_new_tokens, tokenizer):
    from cljax.models.generate import generate_llama

    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    out = generate_llama(
        model,
        [[*bos, *p.tolist()] for p in prompts],
        max_new_tokens,
        eos_token_ids=(tokenizer.eos_id,),
        pad_token_id=tokenizer.pad_id,
    )
    return out.as_lists()


LLAMA = Family(
    name="llama",
    format="decoder",
    config_class=LlamaConfig,
    model_class=Llama,
    token_fields=lambda tok: {
        "vocab_size": tok.vocab_size,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
    },
    logits=_llama_logits,
    train_loss=_llama_loss,
    layer_masks=lambda batch: {"layers": batch.attention_mask},
    generate=_llama_generate,
    osf_targets=(r"layers/(attn/[qkvo]_proj|mlp/(gate|up|down)_proj)/(base/)?kernel$",),
    lora_targets=(r"attn/q_proj$", r"attn/v_proj$"),
    gorp_full_targets=(r"mlp/gate_proj/(base/)?kernel$",),
)


# --------------------------------------------------------------------------- T5


def _t5_logits(model: nnx.Module, batch: Batch) -> jax.Array:
    return model(
        batch.input_ids,
        batch.attention_mask,
        batch.decoder_input_ids,
        batch.decoder_attention_mask,
    )


def _t5_loss(model: nnx.Module, batch: Batch) -> jax.Array:
    return model.loss(
        batch.input_ids,
        batch.attention_mask,
        batch.decoder_input_ids,
        batch.decoder_attention_mask,
        batch.labels,
        batch.loss_mask,
    )


def _t5_generate(model, prompts, max_new_tokens, tokenizer):
    from cljax.models.generate import generate_t5

    out = generate_t5(
        model,
        [[*p.tolist(), tokenizer.eos_id] for p in prompts],
        max_new_tokens,
        eos_token_ids=(tokenizer.eos_id,),
        pad_token_id=tokenizer.pad_id,
    )
    return out.as_lists()


T5_FAMILY = Family(
    name="t5",
    format="seq2seq",
    config_class=T5Config,
    model_class=T5,
    token_fields=lambda tok: {
        "vocab_size": tok.vocab_size,
        "eos_token_id": tok.eos_id,
        "pad_token_id": tok.pad_id,
        "decoder_start_token_id": tok.pad_id,
    },
    logits=_t5_logits,
    train_loss=_t5_loss,
    layer_masks=lambda batch: {
        "encoder/layers": batch.attention_mask,
        "decoder/layers": batch.decoder_attention_mask,
    },
    generate=_t5_generate,
    # Authors' targets: self-attention q, k, v, o and the feed-forward of both stacks.
    osf_targets=(
        r"(encoder|decoder)/layers/(self_attn/[qkvo]_proj|mlp/(wi|wi_0|wi_1|wo))/(base/)?kernel$",
    ),
    # O-LoRA's target_modules ["q", "v"] match self- and cross-attention q and v.
    lora_targets=(r"attn/q_proj$", r"attn/v_proj$"),
    gorp_full_targets=(r"decoder/layers/cross_attn/(q|v)_proj/(base/)?kernel$",),
)

FAMILIES: dict[str, Family] = {f.name: f for f in (LLAMA, T5_FAMILY)}


def llama_like(name: str, config_class: type) -> Family:
    """The loop's record of a LLaMA-like family: LLaMA's, with its own config class."""
    return dataclasses.replace(LLAMA, name=name, config_class=config_class)


def get_family(name: str) -> Family:
    """The family ``name``: LLaMA, T5, or any LLaMA-like variant registered with the
    converter (``cljax.models.mistral``, ``cljax.models.qwen2``) under its model type."""
    if name not in FAMILIES:
        from cljax.models.convert import FAMILIES as CONVERTERS

        variants = {
            model_type: family.config_class
            for model_type, family in CONVERTERS.items()
            if issubclass(family.config_class, LlamaConfig)
        }
        if name not in variants:
            valid = sorted({*FAMILIES, *variants})
            raise UnknownNameError(f"unknown model family {name!r}; valid: {valid}")
        FAMILIES[name] = llama_like(name, variants[name])
    return FAMILIES[name]
