"""Loss-side continual-learning regularizers as pure, differentiable functions.

- O-LoRA (docs/methods.md section 4): orthogonality between the current LoRA ``A`` and
  every earlier task's ``A`` (element-wise L1 as the released code, or squared as the
  paper), and the ``lambda2`` term: unsquared Frobenius norms of the current factors.
- EWC: a diagonal Fisher from squared per-batch gradients at the end of a task, and the
  quadratic penalty ``sum F (theta - theta*)^2``.
- L2 to the previous task's weights: ``sum (theta - theta*)^2``.

LoRA factors use cljax's orientation (:mod:`cljax.models.lora`): ``A (..., d_in, r)``,
``B (..., r, d_out)``, the transposes of PEFT's ``lora_A.weight (r, d_in)`` /
``lora_B.weight (d_out, r)``. Leading axes (stacked layers) are separate matrices: they
are summed over, as the reference sums over its per-layer modules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def olora_orthogonality(
    past_a: jax.Array, current_a: jax.Array, *, squared: bool = False
) -> jax.Array:
    """``sum_i |A_i A_t^T|`` over earlier pairs (PEFT orientation), element-wise.

    past_a: (..., d_in, k) the earlier tasks' A concatenated on the rank axis (k may
      be 0: no penalty); current_a: (..., d_in, r). Computes ``past_a^T current_a``
      (..., k, r) per matrix and sums its absolute values (released code) or, with
      ``squared``, its squares (the paper's ``||A_i^T A_t||_F^2``). Returns a float32
      scalar; multiply by lambda1 (0.5 in O-LoRA's runs).
    """
    if past_a.shape[:-1] != current_a.shape[:-1]:
        raise ValueError(
            f"past A {past_a.shape} and current A {current_a.shape} differ outside the rank axis"
        )
    overlap = jnp.einsum(
        "...ik,...ir->...kr",
        past_a.astype(jnp.float32),
        current_a.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return jnp.sum(jnp.square(overlap)) if squared else jnp.sum(jnp.abs(overlap))


def frobenius_norms(*factors: jax.Array) -> jax.Array:
    """O-LoRA's ``lambda2`` term before the factor: ``sum ||X||_F`` (unsquared) over the
    given factors, each matrix of a stack ``(..., m, n)`` separately."""
    total = jnp.zeros((), jnp.float32)
    for x in factors:
        if x.ndim < 2:
            raise ValueError(f"frobenius_norms needs matrices (..., m, n), got shape {x.shape}")
        total += jnp.sum(jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1))))
    return total


def olora_penalty(
    pairs: Iterable[tuple[jax.Array, jax.Array, jax.Array]],
    *,
    lambda1: float = 0.5,
    lambda2: float = 0.0,
    squared: bool = False,
) -> jax.Array:
    """O-LoRA's extra loss over adapters given as ``(past_a, current_a, current_b)``
    triples (e.g. from ``cljax.models.lora.lora_modules``):
    ``lambda1 * sum orthogonality + lambda2 * sum (||A_t||_F + ||B_t||_F)``."""
    total = jnp.zeros((), jnp.float32)
    for past_a, a, b in pairs:
        total += lambda1 * olora_orthogonality(past_a, a, squared=squared)
        if lambda2:
            total += lambda2 * frobenius_norms(a, b)
    return total


def _check_same_structure(name: str, tree: Any, like: Any) -> None:
    if jax.tree.structure(tree) != jax.tree.structure(like):
        raise ValueError(
            f"{name} has structure {jax.tree.structure(tree)}, the parameters "
            f"{jax.tree.structure(like)}"
        )


def ewc_penalty(params: Any, anchor: Any, fisher: Any) -> jax.Array:
    """``sum F (theta - theta*)^2`` over every leaf (float32 scalar; multiply by the EWC
    strength). ``anchor`` (theta*) and ``fisher`` have ``params``' structure."""
    _check_same_structure("anchor", anchor, params)
    _check_same_structure("fisher", fisher, params)
    terms = jax.tree.map(
        lambda p, a, f: jnp.sum(
            f.astype(jnp.float32) * jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))
        ),
        params,
        anchor,
        fisher,
    )
    return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def l2_to_anchor(params: Any, anchor: Any) -> jax.Array:
    """``sum (theta - theta*)^2`` to the previous task's weights (float32 scalar)."""
    _check_same_structure("anchor", anchor, params)
    terms = jax.tree.map(
        lambda p, a: jnp.sum(jnp.square(p.astype(jnp.float32) - a.astype(jnp.float32))),
        params,
        anchor,
    )
    return sum(jax.tree.leaves(terms), jnp.zeros((), jnp.float32))


def distillation_kl(
    teacher_logits: jax.Array, student_logits: jax.Array, mask: jax.Array, temperature: float
) -> jax.Array:
    """Learning without Forgetting's term: ``T^2 * KL(p_teacher || p_student)`` of the
    next-token distributions at temperature ``T``, averaged over the positions where
    ``mask`` (B, T) is 1 (float32 scalar). Logits are (B, T, V); the teacher's carry no
    gradient."""
    t = jnp.float32(temperature)
    teacher = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t)
    student = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t)
    per_position = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
    weights = mask.astype(jnp.float32)
    return t * t * jnp.sum(per_position * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def stack_batches(batches: Sequence[Any]) -> Any:
    """A list of equally shaped batch pytrees -> one pytree with a leading batch axis."""
    if not batches:
        raise ValueError("no batches given")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *batches)


def fisher_diagonal(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batches: Any) -> Any:
    """Diagonal empirical Fisher ``F = mean_b (d loss(params, batch_b) / d params)^2``.

    loss_fn: ``(params, batch) -> scalar`` (the task loss, mean over the batch).
    batches: a pytree whose leaves have a leading axis over B batches (see
      :func:`stack_batches`); the B gradients are taken in one ``lax.scan``.
    Returns float32 arrays with ``params``' structure. Jit the caller (or this) to
    compile once.
    """
    grad_fn = jax.grad(loss_fn)

    def accumulate(total, batch):
        g = grad_fn(params, batch)
        return jax.tree.map(lambda t, x: t + jnp.square(x.astype(jnp.float32)), total, g), None

    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)
    total, _ = jax.lax.scan(accumulate, zeros, batches)
    count = jax.tree.leaves(batches)[0].shape[0]
    return jax.tree.map(lambda t: t / count, total)
