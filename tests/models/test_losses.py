"""Token log-probabilities and the masked mean NLL against a float64 NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cljax.models.losses import masked_mean_nll, token_logprobs


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
