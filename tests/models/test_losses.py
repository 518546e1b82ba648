"""Token log-probabilities and the masked mean NLL against a float64 NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.models.losses import linear_nll, masked_mean_nll, token_logprobs
from tests.models.trees import assert_trees_close


def reference_logprobs(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log softmax(logits)[label] in float64."""
    x = logits.astype(np.float64)
    shifted = x - x.max(axis=-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return np.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("scale", [1.0, 1e4])  # 1e4: exp overflows without the max shift
def test_token_logprobs_match_log_softmax(scale):
    rng = np.random.default_rng(0)
    logits = (scale * rng.standard_normal((3, 5, 37))).astype(np.float32)
    labels = rng.integers(0, 37, (3, 5))
    ours = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(labels)))
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    np.testing.assert_allclose(ours, reference_logprobs(logits, labels), rtol=1e-6, atol=1e-5)


def test_bfloat16_logits_are_scored_in_float32():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.standard_normal((2, 4, 11)), jnp.bfloat16)
    labels = rng.integers(0, 11, (2, 4))
    ours = token_logprobs(logits, jnp.asarray(labels))
    assert ours.dtype == jnp.float32
    exact = reference_logprobs(np.asarray(logits.astype(jnp.float32)), labels)
    np.testing.assert_allclose(np.asarray(ours), exact, rtol=1e-6, atol=1e-6)


def test_masked_mean_nll_value_and_gradient():
    """The gradient of the mean NLL is ``(softmax - onehot) * mask / sum(mask)``; an
    all-zero mask gives 0 and a zero gradient, not NaN."""
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((2, 6, 13)).astype(np.float32)
    labels = rng.integers(0, 13, (2, 6))
    mask = (rng.random((2, 6)) < 0.5).astype(np.int32)
    mask[0, 0] = 1
    loss, grad = jax.value_and_grad(masked_mean_nll)(
        jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask)
    )
    nll = -reference_logprobs(logits, labels)
    np.testing.assert_allclose(float(loss), (nll * mask).sum() / mask.sum(), rtol=1e-6)
    x = logits.astype(np.float64)
    softmax = np.exp(x - x.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    onehot = np.eye(13)[labels]
    expected = (softmax - onehot) * mask[..., None] / mask.sum()
    np.testing.assert_allclose(np.asarray(grad), expected, atol=1e-7)

    zero_loss, zero_grad = jax.value_and_grad(masked_mean_nll)(
        jnp.asarray(logits), jnp.asarray(labels), jnp.zeros((2, 6), jnp.int32)
    )
    assert float(zero_loss) == 0.0 and not np.asarray(zero_grad).any()


@pytest.mark.parametrize("chunk_size", [1, 5, 7, 64])  # 7 divides 3 x 7 positions, 5 does not
def test_linear_nll_equals_the_loss_of_the_logits(chunk_size):
    """Value and gradients (hidden and kernel) of the chunked loss equal those of
    ``masked_mean_nll(hidden @ kernel)``, padding of the last chunk included."""
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.standard_normal((3, 7, 16)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((16, 29)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 29, (3, 7)))
    mask = jnp.asarray(rng.random((3, 7)) < 0.6, jnp.int32)
    chunked = lambda h, k: linear_nll(h, k, labels, mask, chunk_size=chunk_size)
    full = lambda h, k: masked_mean_nll(h @ k, labels, mask)
    loss, grads = jax.value_and_grad(chunked, argnums=(0, 1))(hidden, kernel)
    expected, expected_grads = jax.value_and_grad(full, argnums=(0, 1))(hidden, kernel)
    np.testing.assert_allclose(float(loss), float(expected), rtol=1e-6)
    np.testing.assert_allclose(float(chunked(hidden, kernel)), float(expected), rtol=1e-6)
    assert_trees_close(grads, expected_grads, rel=1e-5)
    # A frozen kernel (no gradient asked for it) gives the same hidden gradient.
    hidden_only = jax.grad(lambda h: chunked(h, kernel))(hidden)
    assert_trees_close(hidden_only, expected_grads[0], rel=1e-5)


def test_linear_nll_keeps_input_dtypes_and_rejects_bad_chunks():
    rng = np.random.default_rng(4)
    hidden = jnp.asarray(rng.standard_normal((2, 4, 8)), jnp.bfloat16)
    kernel = jnp.asarray(rng.standard_normal((8, 11)), jnp.bfloat16)
    labels, mask = jnp.asarray(rng.integers(0, 11, (2, 4))), jnp.ones((2, 4), jnp.int32)
    loss, (dh, dk) = jax.value_and_grad(
        lambda h, k: linear_nll(h, k, labels, mask, chunk_size=3), argnums=(0, 1)
    )(hidden, kernel)
    assert loss.dtype == jnp.float32 and dh.dtype == dk.dtype == jnp.bfloat16
    logits = jnp.matmul(hidden, kernel, preferred_element_type=jnp.float32)
    np.testing.assert_allclose(float(loss), float(masked_mean_nll(logits, labels, mask)), rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
        linear_nll(hidden, kernel, labels, mask, chunk_size=0)
