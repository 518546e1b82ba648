"""Building blocks shared by the Flax NNX models: parameters with logical axis names,
stacked (scanned) dense layers, RMS norm, embeddings, the dtype policy, the masked
attention softmax, and the config helpers every model family uses (named presets, the
``config.json`` fields that no model computes with).

Every parameter carries *logical* axis names (``embed``, ``heads``, ``kv``, ``mlp``,
``vocab``, ``layers``) in its metadata; ``cljax.parallel`` maps them onto mesh axes.
Transformer blocks are stored stacked along a leading ``layers`` axis: a stacked
``Linear`` holds a kernel of shape ``(num_layers, d_in, d_out)`` and is applied one
slice at a time inside ``scan_layers``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

from cljax.parallel import constrain

LogicalAxes = tuple[str | None, ...]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name: str | Any) -> Any:
    """A jnp dtype from a name ("float32", "bfloat16", "float16") or a dtype."""
    if isinstance(name, str):
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; valid: {sorted(_DTYPES)}")
        return _DTYPES[name]
    return name


@dataclasses.dataclass(frozen=True)
class DTypePolicy:
    """Parameter storage dtype and matmul compute dtype. Norms and softmax always run in
    float32 whatever the policy (bf16 reductions lose too much)."""

    param_dtype: str = "float32"
    compute_dtype: str = "float32"

    @property
    def param(self) -> Any:
        return as_dtype(self.param_dtype)

    @property
    def compute(self) -> Any:
        return as_dtype(self.compute_dtype)


def param(value: jax.Array, axes: Sequence[str | None]) -> nnx.Param:
    """An ``nnx.Param`` annotated with logical axis names, one per dimension.

    Eager sharding is off: the annotation is only metadata until ``cljax.parallel``
    shards the state over a mesh, so models can be built without a mesh.
    """
    axes = tuple(axes)
    if len(axes) != value.ndim:
        raise ValueError(f"{len(axes)} axis names {axes} for a parameter of shape {value.shape}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def logical_axes(variable: nnx.Variable) -> LogicalAxes | None:
    """The logical axis names of a variable, across Flax versions' metadata keys."""
    meta = variable.get_metadata()
    for key in ("out_sharding", "sharding_names", "sharding"):
        if meta.get(key) is not None:
            return tuple(meta[key])
    return None


def normal_init(key: jax.Array, shape: Sequence[int], std: float, dtype: Any) -> jax.Array:
    return (std * jax.random.normal(key, tuple(shape), jnp.float32)).astype(dtype)


def flat_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x (..., d_in) @ kernel (d_in, d_out) -> (..., d_out), as one 2-D matmul.

    Folding the leading axes first matters for training speed on CPU: the weight
    gradient of a 3-D ``x @ kernel`` contracts two axes and XLA inserts transposes
    around it; as a (N, d_in) x (d_in, d_out) product it does not (``bench/optim.py``:
    about 8% of a small LLaMA training step).
    """
    y = jnp.matmul(x.reshape(-1, x.shape[-1]), kernel)
    return y.reshape(*x.shape[:-1], kernel.shape[-1])


class Linear(nnx.Module):
    """A dense layer ``y = x @ kernel`` (kernel ``(d_in, d_out)``, Flax orientation: the
    transpose of PyTorch's ``nn.Linear.weight``), optionally stacked over layers.

    ``stack=(L,)`` stores the kernel as ``(L, d_in, d_out)`` with a leading ``layers``
    axis; inside ``scan_layers`` each step sees one ``(d_in, d_out)`` slice.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        rngs: nnx.Rngs,
        stack: tuple[int, ...] = (),
        use_bias: bool = False,
        init_std: float = 0.02,
        policy: DTypePolicy = DTypePolicy(),
    ):
        self.in_features = in_features
        self.out_features = out_features
        self.policy = policy
        stack_axes = ("layers",) * len(stack)
        shape = (*stack, in_features, out_features)
        self.kernel = param(
            normal_init(rngs.params(), shape, init_std, policy.param), (*stack_axes, *axes)
        )
        self.bias = (
            param(jnp.zeros((*stack, out_features), policy.param), (*stack_axes, axes[1]))
            if use_bias
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., d_in) -> (..., d_out) in the compute dtype."""
        compute = self.policy.compute
        y = flat_matmul(x.astype(compute), self.kernel[...].astype(compute))
        if self.bias is not None:
            y = y + self.bias[...].astype(compute)
        return y


class RMSNorm(nnx.Module):
    """RMS norm without mean subtraction, computed in float32: ``x / rms(x) * scale``."""

    def __init__(
        self,
        dim: int,
        *,
        eps: float,
        stack: tuple[int, ...] = (),
        policy: DTypePolicy = DTypePolicy(),
    ):
        self.eps = eps
        self.scale = param(
            jnp.ones((*stack, dim), policy.param), (*("layers",) * len(stack), "embed")
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., dim) -> float32 (..., dim); callers cast to the compute dtype."""
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        return x32 * jax.lax.rsqrt(variance + self.eps) * self.scale[...].astype(jnp.float32)


class Embed(nnx.Module):
    """Token embedding table ``(vocab, embed)``; ``attend`` gives tied output logits."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        rngs: nnx.Rngs,
        init_std: float = 0.02,
        policy: DTypePolicy = DTypePolicy(),
    ):
        self.policy = policy
        self.embedding = param(
            normal_init(rngs.params(), (vocab_size, dim), init_std, policy.param),
            ("vocab", "embed"),
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids: (...) int -> (..., dim) in the compute dtype."""
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.policy.compute)

    def attend(self, x: jax.Array) -> jax.Array:
        """x: (..., dim) -> logits (..., vocab) with the tied table."""
        compute = self.policy.compute
        return jnp.matmul(x.astype(compute), self.embedding[...].astype(compute).T)


def output_kernel(head: nnx.Module | None, embed: Embed, compute: Any) -> jax.Array | None:
    """The (D, V) ``compute``-dtype matrix of an output layer: ``head``'s kernel, or the
    transposed table of ``embed`` when tied (``head`` None); None when ``head`` is no
    longer one matrix (e.g. wrapped by LoRA), so callers fall back to calling it."""
    if head is None:
        return embed.embedding[...].astype(compute).T
    if type(head) is Linear and head.bias is None:
        return head.kernel[...].astype(compute)
    return None


# (stacked module, layer index, carry before, carry after) of every layer run while
# ``record_layers`` is active; None otherwise.
_LAYER_RECORD: contextvars.ContextVar[list[tuple[nnx.Module, int, Any, Any]] | None] = (
    contextvars.ContextVar("cljax_layer_record", default=None)
)


@contextlib.contextmanager
def record_layers() -> Iterator[list[tuple[nnx.Module, int, Any, Any]]]:
    """Record every layer's input and output carry (e.g. the hidden states ``(B, T, D)``).

    Within the context, ``scan_layers`` runs its layers in a Python loop instead of a
    ``lax.scan`` (so call the model outside ``jit``) and appends ``(stacked module,
    layer index, carry in, carry out)`` to the yielded list. Used to capture
    calibration activations (OSF's importance rule) without changing the models.
    """
    records: list[tuple[nnx.Module, int, Any, Any]] = []
    token = _LAYER_RECORD.set(records)
    try:
        yield records
    finally:
        _LAYER_RECORD.reset(token)


# ``remat`` names -> what the backward pass keeps of a layer (None: everything, no remat).
# "full" keeps only the layer's input (recomputes the whole layer); "dots" keeps matmul
# outputs (recomputes norms, activations, softmax); "dots_no_batch" keeps the matmuls
# with the weights but not attention's batched ones (scores grow with T^2).
REMAT_POLICIES: dict[str, Callable[..., Any] | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def check_remat(owner: str, value: Any) -> None:
    """``remat`` of a model config must name a ``REMAT_POLICIES`` entry."""
    if value not in REMAT_POLICIES:
        raise ValueError(f"{owner}.remat={value!r}; valid: {sorted(REMAT_POLICIES)}")


# Logical names of the residual stream (B, T, D) between layers.
HIDDEN_AXES = ("activation_batch", "activation_length", "activation_embed")


def constrain_hidden(x: jax.Array) -> jax.Array:
    """Keep hidden states (B, T, D) split over the batch axes (``cljax.parallel``)."""
    return constrain(x, HIDDEN_AXES)


def scan_layers(
    stacked: nnx.Module,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    unroll: int = 1,
    remat: str = "none",
) -> tuple[Any, Any]:
    """Run ``body(layer, carry, x) -> (carry, y)`` over the leading ``layers`` axis of
    every array in ``stacked`` (and of ``xs``), as one ``jax.lax.scan``.

    ``layer`` is the module rebuilt from one slice of the stacked state, so the body
    is written as if for a single transformer block. ``unroll`` layers run per loop
    iteration (``jax.lax.scan``'s ``unroll``; >= the layer count: no loop at all).
    ``remat`` (a ``REMAT_POLICIES`` name) recomputes each layer's activations in the
    backward pass instead of storing them: memory per layer falls from every
    intermediate to the layer's input. Returns ``(carry, stacked ys)``.
    """
    check_remat("scan_layers", remat)
    graphdef, state = nnx.split(stacked)

    def step(c, slices):
        layer_state, x = slices
        return body(nnx.merge(graphdef, layer_state), c, x)

    if remat != "none":
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)

    records = _LAYER_RECORD.get()
    if records is None:
        return jax.lax.scan(step, carry, (state, xs), unroll=unroll)
    ys = []
    for i, layer in enumerate(unstacked_layers(stacked)):
        new_carry, y = body(layer, carry, jax.tree.map(lambda a, i=i: a[i], xs))
        records.append((stacked, i, carry, new_carry))
        carry = new_carry
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys) if ys[0] is not None else None


def unstacked_layers(stacked: nnx.Module) -> list[nnx.Module]:
    """One module per slice of the leading ``layers`` axis of ``stacked`` (static
    indices), for code that runs the layers unrolled; they share no state with
    ``stacked``, so they suit forward passes only."""
    graphdef, state = nnx.split(stacked)
    count = jax.tree.leaves(state)[0].shape[0]
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state)) for i in range(count)]


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Attention weights: softmax over the last axis of float32 ``scores`` where ``mask``
    (bool, broadcastable to ``scores``) is True, 0 elsewhere.

    Masked scores are set to the most negative finite float32 (as Hugging Face does)
    rather than -inf, so a fully masked row (a padding query) averages its values
    instead of producing NaN; that row's output is never used.
    """
    # An additive bias built on the mask's own (broadcast) shape: XLA's CPU backend fuses
    # it into the softmax, where a select over the scores' shape measured ~2x slower per
    # decoding step. Identical values: a score |s| < 1e31 added to the most negative
    # float rounds back to it.
    bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores + bias, axis=-1)


# ---------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------

# config.json fields that transformers writes for any model and that never change the
# forward pass: bookkeeping, output switches, classification-head labels. Each model's
# ``from_hf_dict`` accepts these plus its own.
HF_BOOKKEEPING_FIELDS = frozenset(
    {
        "model_type",
        "architectures",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "_name_or_path",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "id2label",
        "label2id",
        "problem_type",
    }
)

ConfigT = TypeVar("ConfigT")


def check_scan_unroll(owner: str, value: Any) -> None:
    """``scan_unroll`` of a model config must be a positive int."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.scan_unroll must be a positive int, got {value!r}")


def preset_config(
    presets: Mapping[str, ConfigT], name: str, family: str, **overrides: Any
) -> ConfigT:
    """``presets[name]`` (a frozen dataclass) with ``overrides`` replacing fields; an
    unknown ``name`` raises, naming the ``family`` and the valid names."""
    if name not in presets:
        raise ValueError(f"unknown {family} preset {name!r}; valid: {sorted(presets)}")
    return dataclasses.replace(presets[name], **overrides)
