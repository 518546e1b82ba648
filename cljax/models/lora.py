"""LoRA adapters for the Flax NNX models, with one (A, B) pair per task.

:func:`apply_lora` replaces targeted :class:`~cljax.models.layers.Linear` modules (chosen
by module path, e.g. ``layers/attn/q_proj``) with :class:`LoRALinear`, which computes
``base(x) + scaling * dropout(x) @ A_all @ B_all`` with ``scaling = alpha / r`` and
``A_all = [A_1 .. A_{t-1}, A_t]`` ``(..., d_in, t r)``, ``B_all`` ``(..., t r, d_out)``
(cljax orientation: ``x @ A @ B``, the transpose of PEFT's ``B(A(x))`` weights). Stacked
Linears ``(L, d_in, d_out)`` get stacked pairs ``(L, d_in, r)`` / ``(L, r, d_out)``, so the
adapters are sliced together with the kernel inside ``scan_layers``.

Trainable vs frozen is carried by the variable type: the current pair is
:class:`LoRAParam` (a subclass of ``nnx.Param``), earlier tasks' pairs are
:class:`FrozenLoRA` (not a Param). ``nnx.Optimizer(model, tx, wrt=LoRAParam)`` trains
exactly the current pair; ``wrt=nnx.Param`` trains it and the base weights, never the
frozen pairs; :func:`trainable_filter` builds the GORP-style union.

New pairs (:func:`new_task`): the frozen pairs are concatenated along the rank axis (a
growing ``(..., d_in, (t-1) r)`` array; O-LoRA concatenates them too and never merges)
while the current pair keeps its shape. Chosen over a fixed ``max_tasks`` stack with an
active count because (a) a slot mask cannot make part of one array trainable, so a fixed
stack would carry optimizer moments for every slot, and (b) the forward pass costs
``t r``, not ``max_tasks r``. The price is one re-trace per task (which the fresh
optimizer of each task costs anyway); the optimizer's parameter tree (current pair and
base weights) keeps its shapes, so optimizer states survive task changes. To restore a
checkpoint of task t, build the model, :func:`apply_lora`, call :func:`new_task` t - 1
times, then restore.

Dropout (PEFT: on the adapter input only) needs fresh randomness every step, but state
updated inside ``scan_layers`` is discarded; each adapter therefore holds per-layer key
data (:class:`LoRADropoutKey`) that the training step reseeds with
:func:`reseed_dropout` before the forward pass. ``model.eval()`` / ``model.train()`` set
the ``deterministic`` flag.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from cljax.models.layers import Linear, flat_matmul, logical_axes
from cljax.paths import match_paths, path_to_str


class LoRAParam(nnx.Param):
    """The current task's LoRA factors (trainable)."""


class FrozenLoRA(nnx.Variable):
    """Earlier tasks' LoRA factors: kept in the forward pass, never trained."""


class LoRADropoutKey(nnx.Variable):
    """Per-layer PRNG key data for adapter dropout (reseeded every training step)."""


_INPUT_RECORD: contextvars.ContextVar[dict[str, list[jax.Array]] | None] = contextvars.ContextVar(
    "cljax_lora_inputs", default=None
)


@contextlib.contextmanager
def record_inputs() -> Iterator[dict[str, list[jax.Array]]]:
    """Record what enters every adapter: within the context, each :class:`LoRALinear`
    call appends its input ``(..., d_in)`` to ``records[module path]``. Use it inside
    ``layers.record_layers`` (stacked layers then run one by one, outside jit): for a
    stack of L layers, call k of a path is layer ``k % L``. Input-subspace methods
    (InfLoRA) build their statistics from it."""
    records: dict[str, list[jax.Array]] = {}
    token = _INPUT_RECORD.set(records)
    try:
        yield records
    finally:
        _INPUT_RECORD.reset(token)


def _annotated(cls: type[nnx.Variable], value: jax.Array, axes: Sequence[str | None]):
    return cls(value, out_sharding=tuple(axes), eager_sharding=False)


def kaiming_uniform_a(key: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """PEFT/O-LoRA's ``A`` init, ``kaiming_uniform_(a=sqrt(5))``: U(-1/sqrt(d_in),
    1/sqrt(d_in)) for ``A (..., d_in, r)`` (fan-in d_in)."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


class LoRALinear(nnx.Module):
    """``base(x) + (alpha / r) * dropout(x) @ A_all @ B_all`` around a :class:`Linear`."""

    def __init__(
        self,
        base: Linear,
        *,
        rank: int,
        alpha: float,
        rngs: nnx.Rngs,
        dropout: float = 0.0,
        path: str = "",
    ):
        kernel = base.kernel[...]
        *stack, d_in, d_out = kernel.shape
        self.path = path  # the wrapped module's path (names its recorded inputs)
        self.stack = tuple(stack)
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank
        self.dropout = dropout
        self.deterministic = False
        axes = logical_axes(base.kernel) or (None,) * kernel.ndim
        self._a_axes = (*axes[:-1], None)
        self._b_axes = (*axes[:-2], None, axes[-1])
        dtype = kernel.dtype
        self.lora_a = _annotated(
            LoRAParam, kaiming_uniform_a(rngs.params(), (*stack, d_in, rank), dtype), self._a_axes
        )
        self.lora_b = _annotated(LoRAParam, jnp.zeros((*stack, rank, d_out), dtype), self._b_axes)
        self.past_a = _annotated(FrozenLoRA, jnp.zeros((*stack, d_in, 0), dtype), self._a_axes)
        self.past_b = _annotated(FrozenLoRA, jnp.zeros((*stack, 0, d_out), dtype), self._b_axes)
        self.dropout_key = (
            _annotated(LoRADropoutKey, _key_data(rngs.dropout(), self.stack), (*axes[:-2], None))
            if dropout > 0
            else None
        )

    @property
    def num_past_tasks(self) -> int:
        return self.past_a.shape[-1] // self.rank

    def factors(self) -> tuple[jax.Array, jax.Array]:
        """All pairs concatenated: ``A_all (..., d_in, t r)``, ``B_all (..., t r, d_out)``."""
        a = jnp.concatenate([self.past_a[...], self.lora_a[...]], axis=-1)
        b = jnp.concatenate([self.past_b[...], self.lora_b[...]], axis=-2)
        return a, b

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: (..., d_in) -> (..., d_out) in the compute dtype."""
        records = _INPUT_RECORD.get()
        if records is not None:
            records.setdefault(self.path, []).append(x)
        y = self.base(x)
        compute = self.base.policy.compute
        h = x.astype(compute)
        if self.dropout > 0 and not self.deterministic:
            key = jax.random.wrap_key_data(self.dropout_key[...])
            keep = jax.random.bernoulli(key, 1.0 - self.dropout, h.shape)
            h = jnp.where(keep, h / (1.0 - self.dropout), 0).astype(compute)
        a, b = self.factors()
        delta = flat_matmul(flat_matmul(h, a.astype(compute)), b.astype(compute))
        return y + (self.scaling * delta).astype(y.dtype)

    def delta_kernel(self) -> jax.Array:
        """``scaling * A_all @ B_all`` (..., d_in, d_out) in float32."""
        a, b = self.factors()
        return self.scaling * jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32))


def _key_data(key: jax.Array, stack: tuple[int, ...]) -> jax.Array:
    keys = jax.random.split(key, math.prod(stack)) if stack else key
    return jax.random.key_data(keys).reshape(*stack, -1)


# ----------------------------------------------------------------------------------
# Model surgery
# ----------------------------------------------------------------------------------


def _linears(model: nnx.Module) -> list[tuple[tuple[Any, ...], Linear]]:
    """Every :class:`Linear` not already wrapped, with its graph path."""
    found = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear) and not (path and path[-1] == "base"):
            found.append((tuple(path), node))
    return found


def lora_modules(model: nnx.Module) -> list[tuple[str, LoRALinear]]:
    """``[(module path, LoRALinear), ...]`` of a model after :func:`apply_lora`."""
    return [
        (path_to_str(path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, LoRALinear)
    ]


def _replace(model: nnx.Module, path: tuple[Any, ...], new: nnx.Module) -> None:
    parent: Any = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def apply_lora(
    model: nnx.Module,
    targets: str | Sequence[str],
    *,
    rank: int,
    alpha: float,
    rngs: nnx.Rngs,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap every :class:`Linear` whose module path (``layers/attn/q_proj``) matches a
    target regex (``cljax.paths.match_paths``) in a :class:`LoRALinear`, in place.

    Published settings (O-LoRA / GORP): ``targets=(r"attn/q_proj$", r"attn/v_proj$")``,
    rank 8, alpha 32, dropout 0.1. Returns the wrapped paths.

    Raises ``ValueError`` naming the pattern when one matches no Linear (listing the
    Linear paths), or when the rank is outside ``[1, min(d_in, d_out)]`` (naming the
    module path).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    linears = _linears(model)
    names = [path_to_str(p) for p, _ in linears]
    try:
        hits = match_paths(names, targets, what="LoRA target", kind="Linear module")
    except ValueError as err:
        wrapped = [p for p, _ in lora_modules(model)]
        raise ValueError(f"{err}" + (f"; already wrapped: {wrapped}" if wrapped else "")) from None
    chosen = {name: linear for name, linear, hit in zip(names, linears, hits, strict=True) if hit}
    for name, (path, linear) in chosen.items():
        d_in, d_out = linear.kernel.shape[-2:]
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(d_in, d_out):
            raise ValueError(
                f"LoRA rank {rank!r} for {name!r} (kernel {tuple(linear.kernel.shape)}) is "
                f"outside [1, {min(d_in, d_out)}]"
            )
        _replace(
            model,
            path,
            LoRALinear(linear, rank=rank, alpha=alpha, rngs=rngs, dropout=dropout, path=name),
        )
    return list(chosen)


def new_task(model: nnx.Module, rngs: nnx.Rngs) -> None:
    """Freeze every adapter's current pair (append it to the frozen pairs) and start a
    fresh one (A Kaiming-uniform, B = 0, so the model's function is unchanged)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("new_task: the model has no LoRA adapters (call apply_lora first)")
    for _, m in modules:
        a, b = m.factors()
        m.past_a = _annotated(FrozenLoRA, a, m._a_axes)
        m.past_b = _annotated(FrozenLoRA, b, m._b_axes)
        m.lora_a = _annotated(
            LoRAParam, kaiming_uniform_a(rngs.params(), m.lora_a.shape, m.lora_a.dtype), m._a_axes
        )
        m.lora_b = _annotated(LoRAParam, jnp.zeros_like(m.lora_b[...]), m._b_axes)


def merge_lora(model: nnx.Module) -> list[str]:
    """Fold every adapter into its base kernel (``W += scaling * A_all @ B_all``, in
    float32) and put the plain :class:`Linear` back, in place. Returns the merged paths."""
    merged = []
    for path, node in list(nnx.iter_graph(model)):
        if isinstance(node, LoRALinear):
            kernel = node.base.kernel
            kernel[...] = (kernel[...].astype(jnp.float32) + node.delta_kernel()).astype(
                kernel.dtype
            )
            _replace(model, tuple(path), node.base)
            merged.append(path_to_str(path))
    return merged


def reseed_dropout(model: nnx.Module, key: jax.Array) -> None:
    """Give every adapter fresh dropout keys (one per stacked layer) derived from
    ``key``; call once per training step, inside the jitted step, before the forward."""
    modules = [m for _, m in lora_modules(model) if m.dropout_key is not None]
    for i, m in enumerate(modules):
        m.dropout_key[...] = _key_data(jax.random.fold_in(key, i), m.stack)


def trainable_filter(*extra: Any) -> Any:
    """An NNX filter for the current LoRA pair plus ``extra`` filters, e.g.
    ``trainable_filter(nnx.PathContains("gate_proj"))`` for GORP (LoRA + full gate_proj)."""
    return nnx.Any(LoRAParam, *extra) if extra else LoRAParam
