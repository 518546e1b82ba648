"""LLaMA-1/2/3 in Flax NNX, numerically matching Hugging Face ``LlamaForCausalLM``.

* RMSNorm, SwiGLU MLP, grouped-query attention (``num_key_value_heads``), tied or
  untied ``lm_head``, padding masks (left or right: positions come from the mask).
* Rotary embeddings in the rotate-half layout that HF checkpoints are stored in, so
  q/k kernels load without a permutation; rope scaling types ``default``, ``linear``
  and ``llama3``.
* Blocks are stacked along a leading ``layers`` axis and run with one ``lax/scan``
  (``layers/scan_layers``), so per-layer work (e.g. an SVD of every ``q_proj``) is one
  batched call on a ``(L, d_in, d_out)`` kernel. ``scan_unroll`` sets how many layers
  one loop iteration runs (the layer count: no loop, faster for shallow models).
* Logical axis names on every parameter: ``embed``, ``heads`` (q heads x head_dim),
  ``kv`` (kv heads x head_dim), ``mlp``, ``vocab``, ``layers``.
* dtype policy: params / matmuls in ``policy`` dtypes; norms, rotary and softmax in
  float32; logits returned in float32.

Parameter paths (``nnx.state(model)``): ``embed/embedding`` (V, D);
``layers/attn/{q,k,v,o}_proj/kernel`` and ``layers/mlp/{gate,up,down}_proj/kernel``
(L, d_in, d_out); ``layers/input_norm/scale``, ``layers/post_attn_norm/scale`` (L, D);
``final_norm/scale`` (D,); ``lm_head/kernel`` (D, V) when untied.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
    output_kernel,
    preset_config,
    scan_layers,
    unstacked_layers,
)
from cljax.models.losses import linear_nll, masked_mean_nll
from cljax.parallel import constrain

# Logical names of activations (``cljax.parallel`` maps them onto the mesh).
HEADS_AXES = ("activation_batch", "activation_length", "activation_heads", None)
KV_AXES = ("activation_batch", "activation_length", "activation_kv", None)
MLP_AXES = ("activation_batch", "activation_length", "activation_mlp")
# one layer's cache (B, KV, S, Dh)
CACHE_AXES = ("activation_batch", "activation_kv", "activation_length", None)

ROPE_TYPES = ("default", "linear", "llama3")
_ROPE_KEYS = {
    "default": set(),
    "linear": {"factor"},
    "llama3": {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
}


def _validate_rope_scaling(rope_scaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Normalise HF ``rope_scaling`` to ``{"rope_type": ..., <its parameters>}`` or None."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, Mapping):
        raise ValueError(f"rope_scaling must be a dict or null, got {rope_scaling!r}")
    scaling = dict(rope_scaling)
    rope_type = scaling.pop("rope_type", None)
    legacy_type = scaling.pop("type", None)  # older configs name the key "type"
    rope_type = rope_type if rope_type is not None else legacy_type
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_scaling.rope_type {rope_type!r} is not supported; supported: {list(ROPE_TYPES)}"
        )
    scaling.pop("rope_theta", None)  # transformers 5 keeps theta inside rope_parameters
    needed = _ROPE_KEYS[rope_type]
    missing = sorted(needed - set(scaling))
    if missing:
        raise ValueError(f"rope_scaling ({rope_type}) lacks field(s) {missing}")
    unknown = sorted(set(scaling) - needed)
    if unknown:
        raise ValueError(f"rope_scaling ({rope_type}) has unsupported field(s) {unknown}")
    if rope_type == "default":
        return None
    return {"rope_type": rope_type, **{k: scaling[k] for k in sorted(needed)}}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Model shape and numerics, with Hugging Face ``LlamaConfig`` field names, plus
    two cljax fields that no ``config.json`` holds: ``policy`` (dtypes) and
    ``scan_unroll`` (layers per ``lax.scan`` iteration: 1 compiles one block whatever
    the depth; ``num_hidden_layers`` unrolls the stack, which trains shallow models
    faster on CPU, ``bench/optim.py``, at a longer compile)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: same as num_attention_heads (MHA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    pad_token_id: int | None = None
    # LLaMA-like variants (``mistral.py``, ``qwen2.py``): q/k/v/o biases (LLaMA's
    # ``attention_bias``), q/k/v biases only (Qwen2), and attention to the last
    # ``sliding_window`` positions only (Mistral; None: no window).
    attention_bias: bool = False
    qkv_bias: bool = False
    sliding_window: int | None = None
    policy: DTypePolicy = DTypePolicy()
    scan_unroll: int = 1
    remat: str = "none"

    #: ``config.json``'s ``model_type`` and ``architectures`` of this family
    MODEL_TYPE: ClassVar[str] = "llama"
    ARCHITECTURE: ClassVar[str] = "LlamaForCausalLM"
    #: variant-only ``config.json`` fields this family reads (LLaMA's has no window)
    VARIANT_HF_FIELDS: ClassVar[frozenset[str]] = frozenset()

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")

        check_scan_unroll("LlamaConfig", self.scan_unroll)
        check_remat("LlamaConfig", self.remat)

        if self.num_key_value_heads is None:
            fix("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by "
                    f"num_attention_heads {self.num_attention_heads}; give head_dim"
                )
            fix("head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if isinstance(self.eos_token_id, list):
            fix("eos_token_id", tuple(self.eos_token_id))
        fix("rope_scaling", _validate_rope_scaling(self.rope_scaling))

    def __hash__(self) -> int:
        # The dataclass hash would fail on the rope_scaling dict; configs are jit-static.
        rope = tuple(sorted(self.rope_scaling.items())) if self.rope_scaling else None
        fields = tuple(
            getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "rope_scaling"
        )
        return hash((fields, rope))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """All end-of-sequence ids (LLaMA-3.1 has several)."""
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A named shape: ``tiny`` (tests), ``llama-2-7b``, ``llama-3.1-8b``."""
        return preset_config(PRESETS, name, "LLaMA", **overrides)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], policy: DTypePolicy | None = None) -> LlamaConfig:
        """Parse a HF ``config.json`` dict (transformers 4 or 5 layout); any field that
        would change the computation and is not supported raises, naming the field."""
        d = cls._variant_fields(dict(d))
        if d.get("model_type", cls.MODEL_TYPE) != cls.MODEL_TYPE:
            raise ValueError(f"model_type {d['model_type']!r} is not {cls.MODEL_TYPE!r}")
        for name, allowed in _FIXED_HF_FIELDS.items():
            if name in d and d[name] not in allowed:
                raise ValueError(
                    f"config field {name}={d[name]!r} is not supported (only {allowed})"
                )
        unknown = sorted(set(d) - _KNOWN_HF_FIELDS - cls.VARIANT_HF_FIELDS)
        if unknown:
            raise ValueError(f"unsupported config field(s) {unknown}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers"):
            if not isinstance(d.get(name), int) or d[name] <= 0:
                raise ValueError(f"config field {name} must be a positive int, got {d.get(name)!r}")
        if not isinstance(d.get("num_attention_heads"), int) or d["num_attention_heads"] <= 0:
            raise ValueError(
                f"config field num_attention_heads must be a positive int, "
                f"got {d.get('num_attention_heads')!r}"
            )
        rope_theta = d.get("rope_theta", 10000.0)
        rope_scaling = d.get("rope_scaling")
        if d.get("rope_parameters") is not None:  # transformers >= 5
            params = d["rope_parameters"]
            if "rope_theta" not in params:
                raise ValueError("config field rope_parameters lacks rope_theta")
            rope_theta = params["rope_theta"]
            rope_scaling = params
        fields = {
            name: d[name]
            for name in (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "rms_norm_eps",
                "tie_word_embeddings",
                "max_position_embeddings",
                "bos_token_id",
                "eos_token_id",
                "pad_token_id",
                "attention_bias",
                "qkv_bias",
                "sliding_window",
            )
            if name in d
        }
        policy = DTypePolicy() if policy is None else policy
        return cls(**fields, rope_theta=float(rope_theta), rope_scaling=rope_scaling, policy=policy)

    @classmethod
    def _variant_fields(cls, d: dict[str, Any]) -> dict[str, Any]:
        """A variant's ``config.json`` fields turned into LLaMA's (e.g. Qwen2's implied
        q/k/v biases); LLaMA's own have none to translate."""
        return d

    def _variant_hf_fields(self) -> dict[str, Any]:
        """The fields a variant adds to ``config.json``."""
        return {"attention_bias": self.attention_bias, "mlp_bias": False}

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that ``transformers`` (4.x and 5.x) loads."""
        if self.qkv_bias or self.sliding_window is not None:
            if type(self)._variant_hf_fields is LlamaConfig._variant_hf_fields:
                raise ValueError(
                    f"{type(self).__name__} with qkv_bias / sliding_window has no"
                    " transformers equivalent: use the Qwen2 / Mistral config"
                )
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "model_type": self.MODEL_TYPE,
            "architectures": [self.ARCHITECTURE],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "hidden_act": "silu",
            **self._variant_hf_fields(),
            "torch_dtype": self.policy.param_dtype,
        }


# Fields that transformers writes and that cljax supports with these values only.
_FIXED_HF_FIELDS: dict[str, tuple[Any, ...]] = {
    "hidden_act": ("silu",),
    "mlp_bias": (False,),
    "attention_dropout": (0, 0.0),
}
# Fields that do not change the forward pass: bookkeeping (``HF_BOOKKEEPING_FIELDS``),
# training-time switches and generic PretrainedConfig fields.
_IGNORED_HF_FIELDS = HF_BOOKKEEPING_FIELDS | {
    "initializer_range",
    "pretraining_tp",  # only splits the matmuls; same result
    "tie_encoder_decoder",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
}
_KNOWN_HF_FIELDS = (
    {f.name for f in dataclasses.fields(LlamaConfig)}
    - {"policy", "scan_unroll", "remat", "qkv_bias", "sliding_window"}
    | set(_FIXED_HF_FIELDS)
    | _IGNORED_HF_FIELDS
    | {"rope_parameters"}
)


def variant_of(base: LlamaConfig, cls: type, **changes: Any) -> Any:
    """A LLaMA-like variant's config (``cls``) with ``base``'s shape, ``changes`` applied:
    variants state their presets as differences from LLaMA's."""
    fields = {f.name: getattr(base, f.name) for f in dataclasses.fields(LlamaConfig)}
    return cls(**{**fields, **changes})


PRESETS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    # The benchmarks' CPU model: width 256, 4 layers, 4 heads of 64, SwiGLU 688 (8/3 x).
    "small": LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    ),
    "llama-2-7b": LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    ),
    "llama-3.1-8b": LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=(128001, 128008, 128009),
        pad_token_id=None,
    ),
}


# ---------------------------------------------------------------------------------------
# Rotary embeddings
# ---------------------------------------------------------------------------------------


def rope_inverse_frequencies(cfg: LlamaConfig) -> np.ndarray:
    """(head_dim // 2,) float32 inverse frequencies after rope scaling."""
    dim = cfg.head_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
    inv_freq = (1.0 / (cfg.rope_theta**exponents)).astype(np.float32)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return (inv_freq / scaling["factor"]).astype(np.float32)
    # llama3: keep high frequencies, divide low ones by `factor`, blend in between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return np.where(is_medium, blended, scaled).astype(np.float32)


def rope_tables(cfg: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions (B, T) int -> cos, sin (B, T, head_dim) float32 (halves repeated)."""
    inv_freq = jnp.asarray(rope_inverse_frequencies(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (B, T, heads, head_dim) rotated in the rotate-half layout, in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]


# ---------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------


class KVCache(NamedTuple):
    """Keys and values: per layer one (B, kv_heads, S, head_dim) array, compute dtype.

    One buffer per layer, decoded with the layers unrolled: writing a step's entries
    into a stacked (L, ...) buffer and reading a layer back from it in the same loop
    makes XLA copy the whole cache per layer (a CPU micro-benchmark of 4 layers, 16
    rows, 1152 slots: 18.1 ms per step stacked, 4.6 ms per layer). Heads come before
    slots so that attention reads (B, KV) batches of contiguous (S, Dh) matrices."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention.

    q (B, T, H, Dh); k, v (B, S, KV, Dh); mask (B, T, S) bool -> (B, T, H * Dh).
    Scores and softmax in float32.
    """
    return _attend(q, k, v, mask, "bskd")


def attend_prefill(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, chunk: int = 64
) -> jax.Array:
    """:func:`attend` for T new tokens attending causally to themselves (a prefill), in
    query chunks that each read only the keys up to their own end: about half the
    work of the full (T, T) scores, and a (chunk, S) score block small enough to stay
    in cache. q (B, T, H, Dh); k, v (B, T, KV, Dh); mask (B, T, T) -> (B, T, H * Dh).

    Heads are moved before tokens once per layer, so that every chunk's products read
    contiguous (T, Dh) matrices, and the softmax is written out (max, exp, sum,
    divide): on XLA's CPU backend both measured faster than ``_attend`` per chunk and
    ``jax.nn.softmax`` (1024-token prefill of 16 rows, 8 heads of 32: 361 -> 199 ms
    per layer; torch's fused kernel 161 ms)."""
    b, t, h, dh = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, dh).transpose(0, 2, 3, 1, 4)  # (B, KV, G, T, Dh)
    k, v = (jnp.swapaxes(x, 1, 2) for x in (k, v))  # (B, KV, T, Dh)
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None]  # as masked_softmax
    outs = []
    for start in range(0, t, chunk):
        end = min(start + chunk, t)
        scores = jnp.einsum(
            "bkgtd,bksd->bkgts",
            q[:, :, :, start:end],
            k[:, :, :end],
            preferred_element_type=jnp.float32,
        )
        scores = scores * (1.0 / math.sqrt(dh)) + bias[..., start:end, :end]
        probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True))
        probs = (probs / jnp.sum(probs, axis=-1, keepdims=True)).astype(v.dtype)
        outs.append(jnp.einsum("bkgts,bksd->bkgtd", probs, v[:, :, :end]))
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h * dh)


def attend_cached(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """:func:`attend` over a cache layer: q (B, T, H, Dh); k, v (B, KV, S, Dh)."""
    b, t, h, dh = q.shape
    if t != 1:
        return _attend(q, k, v, mask, "bksd")
    # One new token: without the T axis every product is a plain batched matrix-vector
    # product over the cache (measured 21.7 -> 7.5 ms per decoding step of the free-text
    # bench, 1152 slots, against the general form).
    kv = k.shape[1]
    q = q.reshape(b, kv, h // kv, dh)
    scores = jnp.einsum("bkgd,bksd->bkgs", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(dh))
    probs = masked_softmax(scores, mask[:, None]).astype(v.dtype)
    return jnp.einsum("bkgs,bksd->bkgd", probs, v).reshape(b, 1, h * dh)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, kv_dims: str):
    b, t, h, dh = q.shape
    kv = k.shape[kv_dims.index("k")]
    q = q.reshape(b, t, kv, h // kv, dh)
    scores = jnp.einsum(f"btkgd,{kv_dims}->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(dh))
    probs = masked_softmax(scores, mask[:, None, None]).astype(v.dtype)
    out = jnp.einsum(f"bkgts,{kv_dims}->btkgd", probs, v)
    return out.reshape(b, t, h * dh)


class Attention(nnx.Module):
    """The q/k/v/o projections (q: embed -> heads, k/v: embed -> kv, o: heads -> embed).
    ``Block`` calls them as modules, so a LoRA wrapper can replace any of them."""

    def __init__(self, cfg: LlamaConfig, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        d, q_dim = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim
        kv_dim = cfg.num_key_value_heads * cfg.head_dim
        kw = dict(rngs=rngs, stack=stack, policy=cfg.policy)
        qkv = dict(kw, use_bias=cfg.attention_bias or cfg.qkv_bias)
        self.q_proj = Linear(d, q_dim, axes=("embed", "heads"), **qkv)
        self.k_proj = Linear(d, kv_dim, axes=("embed", "kv"), **qkv)
        self.v_proj = Linear(d, kv_dim, axes=("embed", "kv"), **qkv)
        self.o_proj = Linear(q_dim, d, axes=("heads", "embed"), use_bias=cfg.attention_bias, **kw)


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        d, m = cfg.hidden_size, cfg.intermediate_size
        kw = dict(rngs=rngs, stack=stack, policy=cfg.policy)
        self.gate_proj = Linear(d, m, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(d, m, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(m, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(hidden, MLP_AXES))


class Block(nnx.Module):
    """One pre-norm transformer block; built stacked (``stack=(L,)``) and applied one
    layer slice at a time inside ``scan_layers``."""

    def __init__(self, cfg: LlamaConfig, *, stack: tuple[int, ...], rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn = Attention(cfg, stack=stack, rngs=rngs)
        self.mlp = MLP(cfg, stack=stack, rngs=rngs)
        self.input_norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, stack=stack, policy=cfg.policy
        )
        self.post_attn_norm = RMSNorm(
            cfg.hidden_size, eps=cfg.rms_norm_eps, stack=stack, policy=cfg.policy
        )

    def __call__(
        self,
        x: jax.Array,
        rope: tuple[jax.Array, jax.Array],
        mask: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | int = 0,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x (B, T, D) compute dtype; rope cos/sin (B, T, Dh); mask (B, T, S) bool;
        cache: this layer's (B, KV, S, Dh) keys and values or None (then S = T); the T
        new entries are written at slots ``cache_index ..``.
        Returns the new x and the updated (keys, values) (or None)."""
        cfg, compute = self.cfg, self.cfg.policy.compute
        b, t, _ = x.shape
        x = constrain_hidden(x)
        h = self.input_norm(x).astype(compute)
        q = self.attn.q_proj(h).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.attn.k_proj(h).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.attn.v_proj(h).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        cos, sin = rope
        q = constrain(apply_rope(q, cos, sin).astype(compute), HEADS_AXES)
        k = constrain(apply_rope(k, cos, sin).astype(compute), KV_AXES)
        v = constrain(v, KV_AXES)
        if cache is None:
            attended = attend(q, k, v, mask)
        else:
            start = (0, 0, cache_index, 0)
            cache = tuple(
                jax.lax.dynamic_update_slice(c, jnp.swapaxes(new, 1, 2).astype(c.dtype), start)
                for c, new in zip(cache, (k, v), strict=True)
            )
            if isinstance(cache_index, int) and cache_index == 0:
                # a prefill: nothing before these T slots, nothing after them to see
                attended = attend_prefill(q, k, v, mask[:, :, :t])
            else:
                attended = attend_cached(q, *cache, mask)
        x = constrain_hidden(x + self.attn.o_proj(attended))
        x = x + self.mlp(self.post_attn_norm(x).astype(compute))
        return constrain_hidden(x), cache


class Llama(nnx.Module):
    """Decoder-only LLaMA: ``logits = model(input_ids, attention_mask=mask)``."""

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, policy=cfg.policy)
        self.layers = Block(cfg, stack=(cfg.num_hidden_layers,), rngs=rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, policy=cfg.policy)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                axes=("embed", "vocab"),
                rngs=rngs,
                policy=cfg.policy,
            )
        )

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids (B, T) int; attention_mask (B, T) {0,1} (None: all ones) ->
        logits (B, T, V) float32. Positions count the unmasked tokens, so left and
        right padding both give the unpadded result at the unmasked positions."""
        return self.logits(self._final_hidden(input_ids, attention_mask))

    def loss(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        labels: jax.Array,
        loss_mask: jax.Array,
    ) -> jax.Array:
        """The training loss, ``causal_lm_loss(self(input_ids, attention_mask), labels,
        loss_mask)`` (shapes there), computed by ``losses.linear_nll`` without the
        (B, T, V) logits when the output layer is one matrix."""
        hidden = self._final_hidden(input_ids, attention_mask)
        kernel = self.output_kernel()
        if kernel is None:
            return causal_lm_loss(self.logits(hidden), labels, loss_mask)
        return linear_nll(hidden.astype(kernel.dtype), kernel, labels, loss_mask)

    def output_kernel(self) -> jax.Array | None:
        """The (D, V) compute-dtype matrix with ``logits = hidden @ it``; None when the
        output layer is no longer one matrix (e.g. wrapped by LoRA)."""
        return output_kernel(self.lm_head, self.embed, self.cfg.policy.compute)

    def _final_hidden(self, input_ids: jax.Array, attention_mask: jax.Array | None) -> jax.Array:
        """(B, T) ids and {0,1} mask (None: all ones) -> final-normed (B, T, D) float32."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        positions = positions_from_mask(attention_mask)
        hidden, _ = self.hidden_states(input_ids, positions, attention_mask.astype(bool))
        return hidden

    def hidden_states(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        key_mask: jax.Array,
        cache: KVCache | None = None,
        cache_index: jax.Array | int = 0,
        layers: Sequence[Block] | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """The final-normed hidden states, optionally reading/writing a KV cache.

        input_ids, positions (B, T); key_mask (B, S) bool marks valid key slots, with
        S = T without a cache and S = cache length with one; the T new tokens occupy
        slots ``cache_index .. cache_index + T - 1`` and attend causally in slot order.
        ``layers``: with a cache, :meth:`decoding_layers` made before a decoding loop
        (default: made here). Returns hidden (B, T, D) float32 and the updated cache.
        """
        t = input_ids.shape[1]
        s = key_mask.shape[1]
        query_slots = cache_index + jnp.arange(t)
        causal = jnp.arange(s)[None, :] <= query_slots[:, None]
        if self.cfg.sliding_window is not None:
            # the last ``sliding_window`` slots (transformers': kv > q - window); with
            # left padding, slot distances between real tokens are position distances
            causal &= jnp.arange(s)[None, :] > query_slots[:, None] - self.cfg.sliding_window
        mask = causal[None] & key_mask[:, None, :]
        rope = rope_tables(self.cfg, positions)
        x = constrain_hidden(self.embed(input_ids))

        if cache is not None:
            # decoding: the layers unrolled over per-layer cache buffers (see KVCache)
            new_cache: list[tuple[jax.Array, jax.Array]] = []
            for i, layer in enumerate(layers or self.decoding_layers()):
                x, layer_cache = layer(x, rope, mask, (cache.k[i], cache.v[i]), cache_index)
                new_cache.append(layer_cache)
            keys, values = zip(*new_cache, strict=True)
            return self.final_norm(x), KVCache(tuple(keys), tuple(values))

        def body(layer: Block, x: jax.Array, _: Any) -> tuple[jax.Array, None]:
            return layer(x, rope, mask)[0], None

        x, _ = scan_layers(self.layers, body, x, unroll=self.cfg.scan_unroll, remat=self.cfg.remat)
        return self.final_norm(x), None

    def decoding_layers(self) -> list[Block]:
        """One module per layer (forward only), for the cached path. A decoding loop
        makes them before the loop: made in its body, every step copies each layer's
        weights out of the stacked arrays (XLA does not hoist the slices out of the
        while loop; 11.6 MB per step of the free-text bench's 4x256 model)."""
        return unstacked_layers(self.layers)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden (..., D) -> logits (..., V) float32."""
        if self.lm_head is None:
            return self.embed.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def init_cache(self, batch: int, length: int) -> KVCache:
        """An empty cache for ``batch`` sequences of ``length`` slots."""
        cfg = self.cfg
        shape = (batch, cfg.num_key_value_heads, length, cfg.head_dim)
        zeros = tuple(
            constrain(jnp.zeros(shape, cfg.policy.compute), CACHE_AXES)
            for _ in range(2 * cfg.num_hidden_layers)
        )
        return KVCache(zeros[::2], zeros[1::2])


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """(B, T) {0,1} -> (B, T) int32 rotary positions: the index of each token among the
    unmasked ones (padding gets a clipped, unused value)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# ---------------------------------------------------------------------------------------
# Decoder-only loss: bos + prompt + label + eos, loss on the answer only
# ---------------------------------------------------------------------------------------


def causal_lm_loss(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over the masked positions.

    logits (B, T, V) float; labels (B, T) int: ``labels[b, t]`` is the token that
    ``logits[b, t]`` must predict (already shifted, see ``cljax.data.batching.decoder_batch``);
    loss_mask (B, T) {0,1}. Returns a float32 scalar (nats per answer token).
    """
    return masked_mean_nll(logits, labels, loss_mask)


# ---------------------------------------------------------------------------------------
# Hugging Face tensor names
# ---------------------------------------------------------------------------------------


def hf_name_map(cfg: LlamaConfig) -> list[TensorRule]:
    """Hugging Face tensor names <-> cljax paths (``hf_names.TensorRule``), biases when
    the config has them."""
    n = cfg.num_hidden_layers
    rules = [TensorRule("model.embed_tokens.weight", "embed/embedding")]
    for group, hf_group, names in (
        ("attn", "self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
        ("mlp", "mlp", ("gate_proj", "up_proj", "down_proj")),
    ):
        rules += [
            TensorRule(
                f"model.layers.{LAYER}.{hf_group}.{name}.weight",
                f"layers/{group}/{name}/kernel",
                "transpose",
                n,
            )
            for name in names
        ]
    biased = ("q_proj", "k_proj", "v_proj") if cfg.attention_bias or cfg.qkv_bias else ()
    biased += ("o_proj",) if cfg.attention_bias else ()
    rules += [
        TensorRule(
            f"model.layers.{LAYER}.self_attn.{name}.bias", f"layers/attn/{name}/bias", num_layers=n
        )
        for name in biased
    ]
    rules += [
        TensorRule(
            f"model.layers.{LAYER}.input_layernorm.weight", "layers/input_norm/scale", num_layers=n
        ),
        TensorRule(
            f"model.layers.{LAYER}.post_attention_layernorm.weight",
            "layers/post_attn_norm/scale",
            num_layers=n,
        ),
        TensorRule("model.norm.weight", "final_norm/scale"),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("lm_head.weight", "lm_head/kernel", "transpose"))
    return rules
