"""T5 encoder-decoder (v1.0, v1.1 and Flan-T5) in Flax NNX, layers stacked over a
leading ``layers`` axis like LLaMA's, so each stack runs as one ``lax/scan``.

T5 specifics, all as Hugging Face ``T5ForConditionalGeneration`` computes them:
- RMS norm without mean subtraction (eps 1e-6, float32), applied before each sub-layer;
- no ``1/sqrt(d_kv)`` scaling of attention scores (it is folded into the init);
- a learned relative position bias (``relative_attention_num_buckets`` buckets up to
  ``relative_attention_max_distance``): bidirectional in the encoder, causal in the
  decoder; one ``(buckets, heads)`` table per stack, added in every layer of that stack;
- cross-attention without position bias;
- feed-forward ``relu`` (``wi``, ``wo``; v1.0) or ``gated-gelu``
  (``gelu_new(wi_0 x) * wi_1 x`` then ``wo``; v1.1 / Flan-T5);
- output layer: the shared embedding with the ``d_model ** -0.5`` rescaling (v1.0,
  ``tie_word_embeddings``) or a separate ``lm_head`` without it (v1.1 / Flan-T5).

State paths (what LoRA, optimizers and the converter address)::

    shared/embedding                                  (vocab, embed)
    {encoder,decoder}/relative_bias                   (buckets, heads)
    {encoder,decoder}/layers/self_attn/{q,k,v,o}_proj/kernel   (L, d_in, d_out)
    decoder/layers/cross_attn/{q,k,v,o}_proj/kernel            (L, d_in, d_out)
    {encoder,decoder}/layers/mlp/{wi,wo | wi_0,wi_1,wo}/kernel (L, d_in, d_out)
    {encoder,decoder}/layers/{self_attn,cross_attn,mlp}_norm/scale  (L, embed)
    {encoder,decoder}/final_norm/scale                (embed,)
    lm_head/kernel                                    (embed, vocab), untied models only

Dropout (``dropout_rate``) is applied where HF applies it in train mode (embeddings,
attention weights, every sub-layer output, the feed-forward hidden layer, the final
norm) only when a ``dropout_key`` is passed; without one the model is deterministic.
Any JAX key works; an ``impl="rbg"`` key (as t5x uses) compiles much faster than the
threefry default (tiny model on CPU: ~2.5 s instead of ~11 s).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cljax.errors import CheckpointError
from cljax.models.hf_names import LAYER, TensorRule
from cljax.models.layers import (
    HF_BOOKKEEPING_FIELDS,
    DTypePolicy,
    Embed,
    Linear,
    RMSNorm,
    check_remat,
    check_scan_unroll,
    constrain_hidden,
    masked_softmax,
    normal_init,
    output_kernel,
    param,
    preset_config,
    scan_layers,
)
from cljax.models.losses import linear_nll, masked_mean_nll
from cljax.parallel import constrain

# (L, B, H, T, Dk) decoder caches, split over the batch (and heads over ``tensor``).
CACHE_AXES = ("layers", "activation_batch", "activation_heads", "activation_length", None)

# feed_forward_proj -> (activation, gated). HF maps "gated-gelu" to gelu_new, the tanh
# approximation (configuration_t5.py), and "relu" to ReLU.
_FEED_FORWARD = {"relu": ("relu", False), "gated-gelu": ("gelu_new", True)}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Shapes and options of a T5 model; field names follow Hugging Face's ``T5Config``.

    ``tie_word_embeddings``: logits from the shared embedding (no ``lm_head``).
    ``scale_decoder_outputs``: multiply the decoder output by ``d_model ** -0.5`` before
    the output layer (T5 v1.0). v1.0 has both True, v1.1 / Flan-T5 both False.
    ``policy`` (dtypes) and ``scan_unroll`` (layers per ``lax.scan`` iteration, see
    ``LlamaConfig``) are cljax fields that no ``config.json`` holds.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    dropout_rate: float = 0.1
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0
    policy: DTypePolicy = DTypePolicy()
    scan_unroll: int = 1
    remat: str = "none"

    def __post_init__(self):
        check_scan_unroll("T5Config", self.scan_unroll)
        check_remat("T5Config", self.remat)
        for name in (
            "vocab_size",
            "d_model",
            "d_kv",
            "d_ff",
            "num_layers",
            "num_decoder_layers",
            "num_heads",
            "relative_attention_num_buckets",
            "relative_attention_max_distance",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"T5Config.{name} must be a positive int, got {value!r}")
        if self.feed_forward_proj not in _FEED_FORWARD:
            raise ValueError(
                f"T5Config.feed_forward_proj={self.feed_forward_proj!r} is not supported; "
                f"valid: {sorted(_FEED_FORWARD)}"
            )
        if self.relative_attention_num_buckets % 4:
            # bidirectional buckets are halved, then halved again into exact/log ranges
            raise ValueError(
                "T5Config.relative_attention_num_buckets must be a multiple of 4, got "
                f"{self.relative_attention_num_buckets}"
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"T5Config.dropout_rate must be in [0, 1), got {self.dropout_rate!r}")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(
                f"T5Config.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}"
            )
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value:
                raise ValueError(f"T5Config.{name} must be a token id >= 0, got {value!r}")

    @property
    def activation(self) -> str:
        return _FEED_FORWARD[self.feed_forward_proj][0]

    @property
    def is_gated(self) -> bool:
        return _FEED_FORWARD[self.feed_forward_proj][1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> T5Config:
        """Shapes of a known model (``tiny`` for tests); ``overrides`` replace fields."""
        return preset_config(_PRESETS, name, "T5", **overrides)

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any], policy: DTypePolicy | None = None) -> T5Config:
        """Build from a Hugging Face ``config.json`` dict, validating every field used.

        Missing optional fields take Hugging Face's documented defaults (that is what
        ``transformers`` itself does with the same file); the shape fields are required.
        """
        if hf.get("model_type", "t5") != "t5":
            raise ValueError(f"config.json model_type={hf.get('model_type')!r}, expected 't5'")
        unknown = sorted(set(hf) - _KNOWN_HF_FIELDS)
        if unknown:
            raise ValueError(f"config.json has unsupported T5 field(s) {unknown}")
        for name, allowed in _FIXED_HF_FIELDS.items():
            if name in hf and hf[name] not in allowed:
                raise ValueError(
                    f"config.json field {name!r}={hf[name]!r} is not supported (only {allowed})"
                )
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if name not in hf:
                raise ValueError(f"config.json has no field {name!r} (required for T5)")
        proj = hf.get("feed_forward_proj", "relu")
        if proj not in _FEED_FORWARD:
            raise ValueError(
                f"config.json field 'feed_forward_proj'={proj!r} is not supported; "
                f"valid: {sorted(_FEED_FORWARD)}"
            )
        act, gated = _FEED_FORWARD[proj]
        # transformers writes these derived fields; a file where they disagree is corrupt.
        if "dense_act_fn" in hf and hf["dense_act_fn"] != act:
            raise ValueError(
                f"config.json field 'dense_act_fn'={hf['dense_act_fn']!r} contradicts "
                f"feed_forward_proj={proj!r} (expects {act!r})"
            )
        if "is_gated_act" in hf and bool(hf["is_gated_act"]) != gated:
            raise ValueError(
                f"config.json field 'is_gated_act'={hf['is_gated_act']!r} contradicts "
                f"feed_forward_proj={proj!r}"
            )
        eos = hf.get("eos_token_id", 1)
        if isinstance(eos, list):
            if len(eos) != 1:
                raise ValueError(f"config.json field 'eos_token_id'={eos!r}: one id expected")
            eos = eos[0]
        tie = hf.get("tie_word_embeddings", True)
        if not isinstance(tie, bool):
            raise ValueError(f"config.json field 'tie_word_embeddings'={tie!r} is not a bool")
        # transformers >= 5 writes scale_decoder_outputs explicitly; older files imply it
        # from tie_word_embeddings (v1.0 ties and rescales, v1.1 / Flan do neither).
        scale = hf.get("scale_decoder_outputs", tie)
        if not isinstance(scale, bool):
            raise ValueError(f"config.json field 'scale_decoder_outputs'={scale!r} is not a bool")
        pad = hf.get("pad_token_id", 0)
        num_layers = hf["num_layers"]
        return cls(
            vocab_size=hf["vocab_size"],
            d_model=hf["d_model"],
            d_kv=hf["d_kv"],
            d_ff=hf["d_ff"],
            num_layers=num_layers,
            num_decoder_layers=(
                num_layers if hf.get("num_decoder_layers") is None else hf["num_decoder_layers"]
            ),
            num_heads=hf["num_heads"],
            relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
            relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
            feed_forward_proj=proj,
            tie_word_embeddings=tie,
            scale_decoder_outputs=scale,
            dropout_rate=float(hf.get("dropout_rate", 0.1)),
            pad_token_id=pad,
            eos_token_id=eos,
            decoder_start_token_id=hf.get("decoder_start_token_id", pad),
            policy=DTypePolicy() if policy is None else policy,
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict for ``T5ForConditionalGeneration``."""
        act, gated = _FEED_FORWARD[self.feed_forward_proj]
        return {
            "architectures": ["T5ForConditionalGeneration"],
            "model_type": "t5",
            "vocab_size": self.vocab_size,
            "d_model": self.d_model,
            "d_kv": self.d_kv,
            "d_ff": self.d_ff,
            "num_layers": self.num_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_heads,
            "relative_attention_num_buckets": self.relative_attention_num_buckets,
            "relative_attention_max_distance": self.relative_attention_max_distance,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "feed_forward_proj": self.feed_forward_proj,
            "dense_act_fn": act,
            "is_gated_act": gated,
            "tie_word_embeddings": self.tie_word_embeddings,
            "scale_decoder_outputs": self.scale_decoder_outputs,
            "dropout_rate": self.dropout_rate,
            "pad_token_id": self.pad_token_id,
            "eos_token_id": self.eos_token_id,
            "decoder_start_token_id": self.decoder_start_token_id,
            "is_encoder_decoder": True,
            "torch_dtype": self.policy.param_dtype,
        }


# config.json fields that must have one value (anything else changes the computation).
_FIXED_HF_FIELDS: dict[str, tuple[Any, ...]] = {
    "is_decoder": (False,),  # a decoder-only T5 is another model
    "is_encoder_decoder": (True,),
    "tie_encoder_decoder": (False,),
}
# Fields that do not change the forward pass: bookkeeping (``HF_BOOKKEEPING_FIELDS``),
# training or generation switches, classification heads this model does not have.
_IGNORED_HF_FIELDS = HF_BOOKKEEPING_FIELDS | {
    "initializer_factor",
    "n_positions",  # T5 has no absolute positions; older configs carry it anyway
    "output_past",
    "task_specific_params",
    "classifier_dropout",
    "gradient_checkpointing",
}
_KNOWN_HF_FIELDS = (
    {f.name for f in dataclasses.fields(T5Config)} - {"policy", "scan_unroll", "remat"}
    | {"dense_act_fn", "is_gated_act"}
    | set(_FIXED_HF_FIELDS)
    | _IGNORED_HF_FIELDS
)

_V1_0 = dict(feed_forward_proj="relu", tie_word_embeddings=True, scale_decoder_outputs=True)
_V1_1 = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False)
_PRESETS: dict[str, T5Config] = {
    "tiny": T5Config(
        vocab_size=256,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        **_V1_1,
    ),
    "t5-small": T5Config(
        d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, **_V1_0
    ),
    "t5-base": T5Config(
        d_model=768,
        d_kv=64,
        d_ff=3072,
        num_layers=12,
        num_decoder_layers=12,
        num_heads=12,
        **_V1_0,
    ),
    "t5-large": T5Config(
        d_model=1024,
        d_kv=64,
        d_ff=4096,
        num_layers=24,
        num_decoder_layers=24,
        num_heads=16,
        **_V1_0,
    ),
    "flan-t5-large": T5Config(
        d_model=1024,
        d_kv=64,
        d_ff=2816,
        num_layers=24,
        num_decoder_layers=24,
        num_heads=16,
        **_V1_1,
    ),
}


# --------------------------------------------------------------------------- positions


def relative_position_buckets(
    relative_position: np.ndarray, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """Bucket of each ``key_pos - query_pos`` (int array, any shape) -> int32, same shape.

    Computed on the host in float32 exactly as Hugging Face / Mesh TensorFlow do: half of
    the buckets (per direction) are exact small distances, the rest logarithmic up to
    ``max_distance``. Positions are static, so the model indexes precomputed tables and
    the rounding at bucket edges matches the PyTorch reference bit for bit.
    """
    rel = np.asarray(relative_position, np.int64)
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(np.int64) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    safe = np.maximum(rel, 1).astype(np.float32)
    scaled = (
        np.log(safe / np.float32(max_exact))
        / np.float32(math.log(max_distance / max_exact))
        * np.float32(num_buckets - max_exact)
    )
    large = np.minimum(max_exact + scaled.astype(np.int64), num_buckets - 1)
    return (buckets + np.where(is_small, rel, large)).astype(np.int32)


# --------------------------------------------------------------------------- layers


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout (kept values scaled by ``1 / (1 - rate)``); the identity when
    ``key`` is None (evaluation, generation) or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def _split_keys(key: jax.Array | None, num: int) -> list[jax.Array | None]:
    """``num`` independent keys, or ``num`` Nones without a key (no dropout)."""
    return [None] * num if key is None else list(jax.random.split(key, num))


def _attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    mask: jax.Array,
    dropout_rate: float = 0.0,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Unscaled dot-product attention (T5 has no 1/sqrt(d_kv)).

    q: (B, T, H, Dk); k, v: (B, H, S, Dk) (heads first: the layout of the decoding cache,
    so that no step transposes it); bias: float32 broadcastable to (B, H, T, S)
    or None; mask: bool broadcastable to (B, H, T, S), True = may attend; dropout on the
    attention weights, as HF, when ``dropout_key`` is given.
    Returns (B, T, H, Dk) in v's dtype. Scores and softmax in float32.
    """
    scores = jnp.einsum("bthd,bhsd->bhts", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        scores = scores + bias
    probs = masked_softmax(scores, mask).astype(v.dtype)
    probs = dropout(probs, dropout_rate, dropout_key)
    return jnp.einsum("bhts,bhsd->bthd", probs, v)


def _dense(
    config: T5Config,
    num_layers: int,
    rngs: nnx.Rngs,
    d_in: int,
    d_out: int,
    axes: tuple[str, str],
    init_std: float,
) -> Linear:
    """A bias-free ``Linear`` stacked over ``num_layers`` (kernel (L, d_in, d_out)),
    initialised normal(0, ``init_std``)."""
    return Linear(
        d_in,
        d_out,
        axes=axes,
        rngs=rngs,
        stack=(num_layers,),
        policy=config.policy,
        init_std=init_std,
    )


class T5Attention(nnx.Module):
    """Multi-head attention with stacked ``q_proj``/``k_proj``/``v_proj``/``o_proj``
    (kernels ``(L, d_model, H*Dk)`` and ``(L, H*Dk, d_model)``), no biases."""

    def __init__(self, config: T5Config, num_layers: int, *, rngs: nnx.Rngs):
        d, inner, kv = config.d_model, config.inner_dim, config.d_kv
        stacked = (config, num_layers, rngs)
        # HF's initialisation: it keeps activations O(1) without the 1/sqrt(d_kv) scaling.
        self.q_proj = _dense(*stacked, d, inner, ("embed", "heads"), (d * kv) ** -0.5)
        self.k_proj = _dense(*stacked, d, inner, ("embed", "heads"), d**-0.5)
        self.v_proj = _dense(*stacked, d, inner, ("embed", "heads"), d**-0.5)
        self.o_proj = _dense(*stacked, inner, d, ("heads", "embed"), inner**-0.5)
        self.num_heads = config.num_heads
        self.d_kv = config.d_kv
        self.dropout_rate = config.dropout_rate

    def _split(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.d_kv)

    def query(self, x: jax.Array) -> jax.Array:
        """x: (B, T, D) -> queries (B, T, H, Dk)."""
        return self._split(self.q_proj(x))

    def key_value(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: (B, S, D) -> keys, values, each (B, H, S, Dk)."""
        k, v = self._split(self.k_proj(x)), self._split(self.v_proj(x))
        return jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)

    def output(self, q, k, v, bias, mask, dropout_key: jax.Array | None = None) -> jax.Array:
        """Attend (see ``_attend``) and project back: -> (B, T, D)."""
        ctx = _attend(q, k, v, bias, mask, self.dropout_rate, dropout_key)
        return self.o_proj(ctx.reshape(*ctx.shape[:-2], self.num_heads * self.d_kv))

    def __call__(
        self, x: jax.Array, kv_input: jax.Array, bias, mask, dropout_key: jax.Array | None = None
    ) -> jax.Array:
        """x: (B, T, D) queries' input, kv_input: (B, S, D) -> (B, T, D)."""
        k, v = self.key_value(kv_input)
        return self.output(self.query(x), k, v, bias, mask, dropout_key)


class T5MLP(nnx.Module):
    """``wo(act(wi x))`` (relu) or ``wo(gelu_new(wi_0 x) * wi_1 x)`` (gated-gelu)."""

    def __init__(self, config: T5Config, num_layers: int, *, rngs: nnx.Rngs):
        d, f, stacked = config.d_model, config.d_ff, (config, num_layers, rngs)
        self.gated = config.is_gated
        self.activation = config.activation
        self.dropout_rate = config.dropout_rate
        # Fan-in init (HF's): std d_in ** -0.5.
        if self.gated:
            self.wi_0 = _dense(*stacked, d, f, ("embed", "mlp"), d**-0.5)
            self.wi_1 = _dense(*stacked, d, f, ("embed", "mlp"), d**-0.5)
        else:
            self.wi = _dense(*stacked, d, f, ("embed", "mlp"), d**-0.5)
        self.wo = _dense(*stacked, f, d, ("mlp", "embed"), f**-0.5)

    def _act(self, x: jax.Array) -> jax.Array:
        if self.activation == "relu":
            return jax.nn.relu(x)
        return jax.nn.gelu(x, approximate=True)  # gelu_new

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """x: (..., D) -> (..., D); dropout on the hidden layer (as HF) given a key."""
        if self.gated:
            hidden = self._act(self.wi_0(x)) * self.wi_1(x)
        else:
            hidden = self._act(self.wi(x))
        hidden = constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return self.wo(dropout(hidden, self.dropout_rate, dropout_key))


class T5Block(nnx.Module):
    """``num_layers`` stacked blocks: self-attention, [cross-attention], feed-forward,
    each pre-normed with a residual connection."""

    def __init__(self, config: T5Config, num_layers: int, *, is_decoder: bool, rngs: nnx.Rngs):
        def norm():
            return RMSNorm(
                config.d_model,
                eps=config.layer_norm_epsilon,
                stack=(num_layers,),
                policy=config.policy,
            )

        self.self_attn_norm = norm()
        self.self_attn = T5Attention(config, num_layers, rngs=rngs)
        if is_decoder:
            self.cross_attn_norm = norm()
            self.cross_attn = T5Attention(config, num_layers, rngs=rngs)
        self.mlp_norm = norm()
        self.mlp = T5MLP(config, num_layers, rngs=rngs)
        self.compute_dtype = config.policy.compute
        self.dropout_rate = config.dropout_rate

    def normed(self, norm: RMSNorm, x: jax.Array) -> jax.Array:
        return norm(x).astype(self.compute_dtype)

    def residual(self, x: jax.Array, update: jax.Array, key: jax.Array | None) -> jax.Array:
        """``x + dropout(update)``: every sub-layer's output joins the residual stream."""
        return constrain_hidden(x + dropout(update, self.dropout_rate, key).astype(x.dtype))

    def self_attention(self, x, bias, mask, key: jax.Array | None = None) -> jax.Array:
        """Pre-norm self-attention sub-layer (B, T, D) -> (B, T, D), no cache."""
        attn_key, out_key = _split_keys(key, 2)
        h = self.normed(self.self_attn_norm, x)
        return self.residual(x, self.self_attn(h, h, bias, mask, attn_key), out_key)

    def cross_attention(self, x, encoder_out, mask, key: jax.Array | None = None) -> jax.Array:
        """Pre-norm cross-attention sub-layer (no position bias) -> (B, T, D)."""
        attn_key, out_key = _split_keys(key, 2)
        h = self.normed(self.cross_attn_norm, x)
        return self.residual(x, self.cross_attn(h, encoder_out, None, mask, attn_key), out_key)

    def feed_forward(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Pre-norm feed-forward sub-layer -> (B, T, D)."""
        hidden_key, out_key = _split_keys(key, 2)
        return self.residual(x, self.mlp(self.normed(self.mlp_norm, x), hidden_key), out_key)


class T5Stack(nnx.Module):
    """An encoder or decoder stack: relative position table, stacked blocks, final norm."""

    def __init__(self, config: T5Config, *, is_decoder: bool, rngs: nnx.Rngs):
        num_layers = config.num_decoder_layers if is_decoder else config.num_layers
        self.is_decoder = is_decoder
        self.num_layers = num_layers
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.relative_bias = param(
            normal_init(
                rngs.params(),
                (config.relative_attention_num_buckets, config.num_heads),
                config.d_model**-0.5,
                config.policy.param,
            ),
            (None, "heads"),
        )
        self.layers = T5Block(config, num_layers, is_decoder=is_decoder, rngs=rngs)
        self.final_norm = RMSNorm(
            config.d_model, eps=config.layer_norm_epsilon, policy=config.policy
        )

    def buckets(self, relative_position: np.ndarray) -> np.ndarray:
        """Host-side buckets for this stack (bidirectional in the encoder only)."""
        return relative_position_buckets(
            relative_position,
            bidirectional=not self.is_decoder,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )

    def position_bias(self, buckets: jax.Array) -> jax.Array:
        """buckets: int (..., T, S) -> float32 bias (..., H, T, S)."""
        values = jnp.take(self.relative_bias[...].astype(jnp.float32), buckets, axis=0)
        return jnp.moveaxis(values, -1, -3)


# --------------------------------------------------------------------------- model


class T5DecodeCache(NamedTuple):
    """Decoder state for incremental decoding (a pytree; L = decoder layers).

    self_k, self_v: (L, B, H, T_max, Dk) keys/values of the tokens decoded so far;
    cross_k, cross_v: (L, B, H, S, Dk) projections of the encoder output, computed once;
    encoder_mask: (B, S) bool; index: int32 scalar, the position of the next token.
    """

    self_k: jax.Array
    self_v: jax.Array
    cross_k: jax.Array
    cross_v: jax.Array
    encoder_mask: jax.Array
    index: jax.Array


class T5(nnx.Module):
    """T5 for conditional generation (``T5ForConditionalGeneration``'s computation)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs):
        self.cfg = config
        policy = config.policy
        self.shared = Embed(
            config.vocab_size, config.d_model, rngs=rngs, init_std=1.0, policy=policy
        )
        self.encoder = T5Stack(config, is_decoder=False, rngs=rngs)
        self.decoder = T5Stack(config, is_decoder=True, rngs=rngs)
        # An untied head starts at std d_model**-0.5 (t5x's fan-in init), so logits start
        # O(1); HF's std 1.0 gives an initial loss of ~25 nats on the tiny preset.
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(
                config.d_model,
                config.vocab_size,
                axes=("embed", "vocab"),
                rngs=rngs,
                init_std=config.d_model**-0.5,
                policy=policy,
            )
        )

    # ------------------------------------------------------------------ encoder

    def encode(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """input_ids: (B, S) int; attention_mask: (B, S), 1 = token, 0 = padding (None: all
        tokens). Returns the encoder output (B, S, D) in the compute dtype.
        ``dropout_key`` (training) turns on dropout where HF applies it in train mode."""
        seq = input_ids.shape[1]
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        positions = np.arange(seq)
        bias = self.encoder.position_bias(
            jnp.asarray(self.encoder.buckets(positions[None, :] - positions[:, None]))
        )[None]  # (1, H, S, S)
        mask = attention_mask.astype(bool)[:, None, None, :]  # (B, 1, 1, S)

        def body(layer: T5Block, x, key):
            attn_key, ff_key = _split_keys(key, 2)
            x = layer.self_attention(x, bias, mask, attn_key)
            return layer.feed_forward(x, ff_key), None

        x, _ = self._run_stack(self.encoder, body, input_ids, dropout_key)
        return x

    def _run_stack(self, stack: T5Stack, body, input_ids, dropout_key):
        """Embed (with dropout), scan ``body(layer, x, layer_key)`` over the stack's layers
        and apply its final norm (with dropout). Returns ((B, T, D) compute dtype, ys)."""
        embed_key, layers_key, final_key = _split_keys(dropout_key, 3)
        layer_keys = None if layers_key is None else jax.random.split(layers_key, stack.num_layers)
        x = constrain_hidden(dropout(self.shared(input_ids), self.cfg.dropout_rate, embed_key))
        x, ys = scan_layers(
            stack.layers, body, x, layer_keys, unroll=self.cfg.scan_unroll, remat=self.cfg.remat
        )
        x = stack.final_norm(x).astype(self.cfg.policy.compute)
        return dropout(x, self.cfg.dropout_rate, final_key), ys

    # ------------------------------------------------------------------ decoder

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output layer on the final-normed decoder output: (..., D) -> float32 (..., V)."""
        x = self._head_input(hidden)
        if self.lm_head is None:
            return self.shared.attend(x).astype(jnp.float32)
        return self.lm_head(x).astype(jnp.float32)

    def output_kernel(self) -> jax.Array | None:
        """The (D, V) compute-dtype matrix with ``logits = _head_input(hidden) @ it``;
        None when the output layer is no longer one matrix (e.g. wrapped by LoRA)."""
        return output_kernel(self.lm_head, self.shared, self.cfg.policy.compute)

    def _head_input(self, hidden: jax.Array) -> jax.Array:
        """The decoder output as the output layer takes it: rescaled (v1.0), compute dtype."""
        if self.cfg.scale_decoder_outputs:
            hidden = hidden * self.cfg.d_model**-0.5
        return hidden.astype(self.cfg.policy.compute)

    def decode(
        self,
        decoder_input_ids: jax.Array,
        encoder_out: jax.Array,
        encoder_mask: jax.Array | None = None,
        decoder_attention_mask: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """Teacher-forced decoder pass.

        decoder_input_ids: (B, T) int; encoder_out: (B, S, D); encoder_mask: (B, S) 1/0
        (None: no padding); decoder_attention_mask: (B, T) 1/0 (None: no padding);
        dropout_key: training dropout (None: none). Returns float32 logits (B, T, V).
        """
        args = (decoder_input_ids, encoder_out, encoder_mask, decoder_attention_mask)
        return self.logits(self._decoder_stack(*args, dropout_key))

    def _decoder_stack(
        self,
        decoder_input_ids: jax.Array,
        encoder_out: jax.Array,
        encoder_mask: jax.Array | None,
        decoder_mask: jax.Array | None,
        dropout_key: jax.Array | None,
    ) -> jax.Array:
        """:meth:`decode` (same arguments, positional) up to the output layer: the
        final-normed decoder output (B, T, D) in the compute dtype."""
        batch, length = decoder_input_ids.shape
        if encoder_mask is None:
            encoder_mask = jnp.ones(encoder_out.shape[:2], bool)
        positions = np.arange(length)
        bias = self.decoder.position_bias(
            jnp.asarray(self.decoder.buckets(positions[None, :] - positions[:, None]))
        )[None]  # (1, H, T, T)
        self_mask = jnp.asarray(positions[None, :] <= positions[:, None])[None, None]
        if decoder_mask is not None:
            self_mask = self_mask & decoder_mask.astype(bool)[:, None, None, :]
        cross_mask = encoder_mask.astype(bool)[:, None, None, :]

        def body(layer: T5Block, x, key):
            self_key, cross_key, ff_key = _split_keys(key, 3)
            x = layer.self_attention(x, bias, self_mask, self_key)
            x = layer.cross_attention(x, encoder_out, cross_mask, cross_key)
            return layer.feed_forward(x, ff_key), None

        x, _ = self._run_stack(self.decoder, body, decoder_input_ids, dropout_key)
        return x

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array | None = None,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """(B, S) source, (B, T) decoder inputs -> float32 logits (B, T, V); dropout as HF
        in train mode when ``dropout_key`` is given (training), none otherwise."""
        encoder_key, decoder_key = _split_keys(dropout_key, 2)
        encoder_out = self.encode(input_ids, attention_mask, dropout_key=encoder_key)
        return self.decode(
            decoder_input_ids,
            encoder_out,
            attention_mask,
            decoder_attention_mask,
            dropout_key=decoder_key,
        )

    def loss(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        decoder_input_ids: jax.Array,
        decoder_attention_mask: jax.Array | None,
        labels: jax.Array,
        loss_mask: jax.Array,
        *,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """The training loss, ``seq2seq_loss(self(...), labels, loss_mask)`` with the
        arguments of ``__call__`` (shapes there), computed by ``losses.linear_nll``
        without the (B, T, V) logits when the output layer is one matrix."""
        encoder_key, decoder_key = _split_keys(dropout_key, 2)
        encoder_out = self.encode(input_ids, attention_mask, dropout_key=encoder_key)
        hidden = self._decoder_stack(
            decoder_input_ids, encoder_out, attention_mask, decoder_attention_mask, decoder_key
        )
        kernel = self.output_kernel()
        if kernel is None:
            return seq2seq_loss(self.logits(hidden), labels, loss_mask)
        return linear_nll(self._head_input(hidden), kernel, labels, loss_mask)

    # ------------------------------------------------------------------ incremental decoding

    def init_cache(
        self, encoder_out: jax.Array, encoder_mask: jax.Array | None, max_length: int
    ) -> T5DecodeCache:
        """Project the encoder output to every decoder layer's cross-attention keys and
        values once, and allocate an empty self-attention cache of ``max_length`` steps.

        encoder_out: (B, S, D); encoder_mask: (B, S) 1/0 or None.
        """
        batch, seq = encoder_out.shape[:2]
        if encoder_mask is None:
            encoder_mask = jnp.ones((batch, seq), bool)

        def body(layer: T5Block, carry, _):
            return carry, layer.cross_attn.key_value(encoder_out)

        _, (cross_k, cross_v) = scan_layers(
            self.decoder.layers, body, None, unroll=self.cfg.scan_unroll
        )
        cfg = self.cfg
        shape = (cfg.num_decoder_layers, batch, cfg.num_heads, max_length, cfg.d_kv)
        zeros = constrain(jnp.zeros(shape, cross_k.dtype), CACHE_AXES)
        return T5DecodeCache(
            self_k=zeros,
            self_v=zeros,
            cross_k=constrain(cross_k, CACHE_AXES),
            cross_v=constrain(cross_v, CACHE_AXES),
            encoder_mask=encoder_mask.astype(bool),
            index=jnp.zeros((), jnp.int32),
        )

    def decode_step(
        self, token_ids: jax.Array, cache: T5DecodeCache
    ) -> tuple[jax.Array, T5DecodeCache]:
        """Decode ``T`` new tokens at positions ``cache.index ..`` (usually T = 1).

        token_ids: (B, T) int. Returns float32 logits (B, T, V) and the updated cache.
        The same positions for every row: all decoder sequences start together at the
        decoder start token, so no per-row offsets are needed.
        """
        length = token_ids.shape[1]
        max_length = cache.self_k.shape[3]
        index = cache.index
        # Host table over every relative position a query in [0, max_length) can see.
        rel_range = np.arange(-(max_length + length), max_length + length + 1)
        table = jnp.asarray(self.decoder.buckets(rel_range))
        query_pos = index + jnp.arange(length)
        key_pos = jnp.arange(max_length)
        rel = key_pos[None, :] - query_pos[:, None]  # (T, T_max)
        bias = self.decoder.position_bias(table[rel + max_length + length])[None]
        self_mask = (key_pos[None, :] <= query_pos[:, None])[None, None]
        cross_mask = cache.encoder_mask[:, None, None, :]

        def body(layer: T5Block, x, xs):
            self_k, self_v, cross_k, cross_v = xs
            h = layer.normed(layer.self_attn_norm, x)
            k, v = layer.self_attn.key_value(h)
            self_k = jax.lax.dynamic_update_slice_in_dim(self_k, k.astype(self_k.dtype), index, 2)
            self_v = jax.lax.dynamic_update_slice_in_dim(self_v, v.astype(self_v.dtype), index, 2)
            q = layer.self_attn.query(h)
            x = x + layer.self_attn.output(q, self_k, self_v, bias, self_mask).astype(x.dtype)
            h = layer.normed(layer.cross_attn_norm, x)
            q = layer.cross_attn.query(h)
            x = x + layer.cross_attn.output(q, cross_k, cross_v, None, cross_mask).astype(x.dtype)
            return layer.feed_forward(x), (self_k, self_v)

        x, (self_k, self_v) = scan_layers(
            self.decoder.layers,
            body,
            self.shared(token_ids),
            (cache.self_k, cache.self_v, cache.cross_k, cache.cross_v),
            unroll=self.cfg.scan_unroll,
        )
        new_cache = cache._replace(self_k=self_k, self_v=self_v, index=index + length)
        hidden = self.decoder.final_norm(x).astype(self.cfg.policy.compute)
        return self.logits(hidden), new_cache


# --------------------------------------------------------------------------- loss


def seq2seq_loss(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean cross-entropy of the target tokens.

    logits (B, T, V) from ``model(input_ids, attention_mask, decoder_input_ids)``;
    labels (B, T) int, the target token at each decoder position; loss_mask (B, T) {0,1},
    0 on padding. Returns a float32 scalar (nats per target token); equals HF's
    ``T5ForConditionalGeneration`` loss with the padded labels set to -100.
    """
    return masked_mean_nll(logits, labels, loss_mask)


# ---------------------------------------------------------------------------------------
# Hugging Face tensor names
# ---------------------------------------------------------------------------------------

# Copies of the shared embedding that some T5 checkpoints also store; transformers ties
# them to ``shared.weight``. ``resolve_hf_config`` checks that they are equal to it.
EMBED_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")


def hf_name_map(cfg: T5Config) -> list[TensorRule]:
    """Hugging Face tensor names <-> cljax paths (``hf_names.TensorRule``)."""
    rules = [TensorRule("shared.weight", "shared/embedding")]
    for stack, n in (("encoder", cfg.num_layers), ("decoder", cfg.num_decoder_layers)):
        block = f"{stack}.block.{LAYER}.layer"
        # One relative-position table per stack, stored in block 0 and shared by all blocks.
        rules.append(
            TensorRule(
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                f"{stack}/relative_bias",
            )
        )
        # HF sub-layer index -> (HF attention module, cljax attention module)
        attention = [(0, "SelfAttention", "self_attn")]
        if stack == "decoder":
            attention.append((1, "EncDecAttention", "cross_attn"))
        for index, hf_attn, attn in attention:
            rules += [
                TensorRule(
                    f"{block}.{index}.{hf_attn}.{p}.weight",
                    f"{stack}/layers/{attn}/{p}_proj/kernel",
                    "transpose",
                    n,
                )
                for p in "qkvo"
            ]
            rules.append(
                TensorRule(
                    f"{block}.{index}.layer_norm.weight",
                    f"{stack}/layers/{attn}_norm/scale",
                    num_layers=n,
                )
            )
        ff = len(attention)  # the feed-forward sub-layer comes last
        dense = ("wi_0", "wi_1", "wo") if cfg.is_gated else ("wi", "wo")
        rules += [
            TensorRule(
                f"{block}.{ff}.DenseReluDense.{name}.weight",
                f"{stack}/layers/mlp/{name}/kernel",
                "transpose",
                n,
            )
            for name in dense
        ]
        rules.append(
            TensorRule(
                f"{block}.{ff}.layer_norm.weight", f"{stack}/layers/mlp_norm/scale", num_layers=n
            )
        )
        rules.append(TensorRule(f"{stack}.final_layer_norm.weight", f"{stack}/final_norm/scale"))
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("lm_head.weight", "lm_head/kernel", "transpose"))
    return rules


def resolve_hf_config(cfg: T5Config, tensors: Any) -> T5Config:
    """Tied or untied output layer, decided as transformers decides it.

    An ``lm_head.weight`` that differs from ``shared.weight`` is a separate output layer
    even when config.json says ``tie_word_embeddings: true`` (transformers 5 writes that
    for every T5 and then keeps the two apart); one equal to it is a tied copy. Stored
    copies of the input embeddings must equal ``shared.weight``.
    """
    shared = tensors.read("shared.weight") if "shared.weight" in tensors.located else None
    for name in EMBED_COPIES:
        if name in tensors.located and shared is not None:
            copy = tensors.read(name)
            if copy.shape != shared.shape or not np.array_equal(copy, shared):
                raise CheckpointError(
                    f"{tensors.located[name]}: tensor {name!r} differs from 'shared.weight'; "
                    "T5 ties the input embeddings of both stacks to it"
                )
    if cfg.tie_word_embeddings and "lm_head.weight" in tensors.located and shared is not None:
        head = tensors.read("lm_head.weight")
        if head.shape != shared.shape or not np.array_equal(head, shared):
            cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    return cfg
