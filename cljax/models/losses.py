"""Token-level losses shared by every model family.

Labels are already aligned with the logits: ``labels[b, t]`` is the token that
``logits[b, t]`` must predict (each format's batch builder does the shifting), so the
same functions serve decoder-only and encoder-decoder models. ``linear_nll`` is the
training loss of both (``Llama.loss``, ``T5.loss``): the mean NLL computed from the
output layer's input and matrix, chunk by chunk, never holding the (B, T, V) logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """logits (B, T, V), labels (B, T) int -> float32 (B, T) log p(label).

    The softmax runs in float32 whatever the logits' dtype. Computed as
    ``logits[label] - logsumexp(logits)`` rather than by indexing a full
    ``log_softmax``: the (B, T, V) log-probabilities are never materialised, which
    at a 32000-token vocabulary saves about a third of the loss's forward and
    backward time (``bench/optim.py``)."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def masked_mean_nll(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array) -> jax.Array:
    """Mean negative log-likelihood over the positions where ``loss_mask`` is 1.

    logits (B, T, V); labels (B, T) int; loss_mask (B, T) {0,1}. Returns a float32
    scalar in nats per scored token; an all-zero mask gives 0 (the denominator is
    ``max(sum(mask), 1)``), not NaN.
    """
    weights = loss_mask.astype(jnp.float32)
    total = -jnp.sum(token_logprobs(logits, labels) * weights)
    return total / jnp.maximum(jnp.sum(weights), 1.0)


def linear_nll(
    hidden: jax.Array,
    kernel: jax.Array,
    labels: jax.Array,
    loss_mask: jax.Array,
    *,
    chunk_size: int = 256,
) -> jax.Array:
    """``masked_mean_nll(hidden @ kernel, labels, loss_mask)`` without the logits.

    hidden (..., D) and kernel (D, V) in the compute dtype; labels (...) int; loss_mask
    (...) {0,1}. Returns a float32 scalar. The positions are processed ``chunk_size`` at
    a time: each chunk's logits (accumulated in float32) give its loss and, in the same
    pass, its gradients with respect to ``hidden`` and ``kernel``, so no (..., V) array
    is ever stored. That is what makes the output layer cheap at a large vocabulary
    (``bench/optim.py``: the training step at V = 32000 is ~25% faster on CPU, and
    its peak memory no longer grows with tokens x V). When ``kernel`` needs no gradient
    (a frozen output layer), XLA drops that half of the work.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    dim = hidden.shape[-1]
    h = hidden.reshape(-1, dim)
    ids = labels.reshape(-1).astype(jnp.int32)
    weights = loss_mask.reshape(-1).astype(jnp.float32)
    weights = weights / jnp.maximum(jnp.sum(weights), 1.0)
    chunk = min(chunk_size, h.shape[0])
    pad = -h.shape[0] % chunk  # padded positions weigh 0
    if pad:
        h = jnp.pad(h, ((0, pad), (0, 0)))
        ids = jnp.pad(ids, (0, pad))
        weights = jnp.pad(weights, (0, pad))
    chunks = h.shape[0] // chunk
    return _chunked_nll(
        h.reshape(chunks, chunk, dim),
        kernel,
        ids.reshape(chunks, chunk),
        weights.reshape(chunks, chunk),
    )


def _chunk_logits(h: jax.Array, kernel: jax.Array, ids: jax.Array) -> tuple[jax.Array, ...]:
    """(c, D) x (D, V) -> float32 logits (c, V), their logsumexp and the labels' logits."""
    logits = jnp.matmul(h, kernel, preferred_element_type=jnp.float32)
    picked = jnp.take_along_axis(logits, ids[:, None], axis=-1)[:, 0]
    return logits, jax.nn.logsumexp(logits, axis=-1), picked


@jax.custom_vjp
def _chunked_nll(h: jax.Array, kernel: jax.Array, ids: jax.Array, weights: jax.Array):
    """h (n, c, D), ids and weights (n, c) -> sum of weighted NLLs (float32 scalar)."""

    def body(total, xs):
        hc, idc, wc = xs
        _, lse, picked = _chunk_logits(hc, kernel, idc)
        return total + jnp.sum((lse - picked) * wc), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, ids, weights))
    return total


def _chunked_nll_fwd(h, kernel, ids, weights):
    def body(carry, xs):
        total, dkernel = carry
        hc, idc, wc = xs
        logits, lse, picked = _chunk_logits(hc, kernel, idc)
        onehot = idc[:, None] == jnp.arange(logits.shape[-1])
        # d(sum_i w_i nll_i) / d logits = w * (softmax - onehot)
        dlogits = ((jnp.exp(logits - lse[:, None]) - onehot) * wc[:, None]).astype(hc.dtype)
        dkernel = dkernel + jnp.matmul(hc.T, dlogits, preferred_element_type=jnp.float32)
        dh = jnp.matmul(dlogits, kernel.T, preferred_element_type=jnp.float32).astype(hc.dtype)
        return (total + jnp.sum((lse - picked) * wc), dkernel), dh

    init = (jnp.zeros((), jnp.float32), jnp.zeros(kernel.shape, jnp.float32))
    (total, dkernel), dh = jax.lax.scan(body, init, (h, ids, weights))
    return total, (dh, dkernel.astype(kernel.dtype))


def _chunked_nll_bwd(residuals, g):
    dh, dkernel = residuals
    return (g * dh).astype(dh.dtype), (g * dkernel).astype(dkernel.dtype), None, None


_chunked_nll.defvjp(_chunked_nll_fwd, _chunked_nll_bwd)
