"""Regularizers against hand computations (and O-LoRA's torch expression)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cljax.optim import regularizers as R

# Earlier A's (d_in = 3, two rank-1 tasks concatenated) and the current A (r = 1).
PAST = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
CURRENT = jnp.array([[2.0], [1.0], [-3.0]])
# PAST^T CURRENT = [[2 - 3], [1 - 3]] = [[-1], [-2]]


def test_olora_orthogonality_by_hand():
    assert float(R.olora_orthogonality(PAST, CURRENT)) == 3.0  # |-1| + |-2|
    assert float(R.olora_orthogonality(PAST, CURRENT, squared=True)) == 5.0  # 1 + 4
    # d/dA_t sum |P^T A_t| = P sign(P^T A_t) = P [[-1], [-1]]
    grad = jax.grad(lambda a: R.olora_orthogonality(PAST, a))(CURRENT)
    np.testing.assert_array_equal(grad, [[-1.0], [-1.0], [-2.0]])
    # Stacked layers add up; no earlier task gives 0.
    stacked = R.olora_orthogonality(jnp.stack([PAST, 2 * PAST]), jnp.stack([CURRENT] * 2))
    assert float(stacked) == 3.0 + 6.0
    assert float(R.olora_orthogonality(jnp.zeros((3, 0)), CURRENT)) == 0.0


def test_olora_orthogonality_equals_released_torch_expression():
    """O-LoRA's code: ``torch.abs(torch.mm(lora_A, loranew_A.T)).sum()`` with PEFT's
    (r, d_in) weights, the transposes of cljax's A."""
    rng = np.random.default_rng(0)
    past, cur = rng.standard_normal((16, 8)), rng.standard_normal((16, 4))
    want = torch.abs(torch.mm(torch.from_numpy(past.T), torch.from_numpy(cur.T).T)).sum()
    np.testing.assert_allclose(R.olora_orthogonality(past, cur), float(want), rtol=1e-5)


def test_frobenius_norms_unsquared_per_matrix():
    a = jnp.array([[3.0, 4.0]])
    assert float(R.frobenius_norms(a)) == 5.0
    # Two stacked layers are two matrices: 5 + 10, not sqrt(25 + 100).
    assert float(R.frobenius_norms(jnp.stack([a, 2 * a]))) == 15.0
    assert float(R.frobenius_norms(a, jnp.array([[0.0], [2.0]]))) == 7.0
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        R.frobenius_norms(jnp.ones(2))


def test_olora_penalty_combines_terms():
    b = jnp.array([[0.0, 3.0, 4.0]])  # ||B|| = 5; ||A_t|| = sqrt(14)
    got = R.olora_penalty([(PAST, CURRENT, b)], lambda1=0.5, lambda2=0.1)
    np.testing.assert_allclose(got, 0.5 * 3.0 + 0.1 * (np.sqrt(14.0) + 5.0), rtol=1e-6)
    assert float(R.olora_penalty([(PAST, CURRENT, b)], lambda1=1.0, squared=True)) == 5.0


PARAMS = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([[0.5]])}
ANCHOR = {"w": jnp.array([0.0, 0.0]), "b": jnp.array([[1.0]])}


def test_ewc_and_l2_by_hand():
    fisher = {"w": jnp.array([2.0, 1.0]), "b": jnp.array([[4.0]])}
    # 2 * 1^2 + 1 * 2^2 + 4 * 0.5^2 = 7
    assert float(R.ewc_penalty(PARAMS, ANCHOR, fisher)) == 7.0
    grad = jax.grad(R.ewc_penalty)(PARAMS, ANCHOR, fisher)  # 2 F (theta - theta*)
    np.testing.assert_array_equal(grad["w"], [4.0, 4.0])
    np.testing.assert_array_equal(grad["b"], [[-4.0]])
    assert float(R.l2_to_anchor(PARAMS, ANCHOR)) == 1.0 + 4.0 + 0.25
    with pytest.raises(ValueError, match="fisher has structure"):
        R.ewc_penalty(PARAMS, ANCHOR, {"w": jnp.ones(2)})


def test_fisher_diagonal_by_hand():
    """loss = (w . x - y)^2, grad = 2 (w . x - y) x. With w = (1, 2):
    batch 1 x = (1, 0), y = 0 -> g = (2, 0); batch 2 x = (1, 1), y = 1 -> g = (4, 4);
    F = mean of squares = (10, 8)."""

    def loss(params, batch):
        return (jnp.dot(params["w"], batch["x"]) - batch["y"]) ** 2

    batches = R.stack_batches(
        [
            {"x": jnp.array([1.0, 0.0]), "y": jnp.array(0.0)},
            {"x": jnp.array([1.0, 1.0]), "y": jnp.array(1.0)},
        ]
    )
    fisher = jax.jit(R.fisher_diagonal, static_argnums=0)(
        loss, {"w": jnp.array([1.0, 2.0])}, batches
    )
    np.testing.assert_allclose(fisher["w"], [10.0, 8.0])


def test_distillation_kl_by_hand():
    teacher = jnp.array([[[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]]])  # (B=1, T=2, V=3)
    student = jnp.array([[[1.0, 1.0, 0.0], [3.0, -1.0, 0.0]]])
    mask = jnp.array([[1, 0]])  # the second position is padding
    t = 2.0

    def log_softmax(x):
        x = np.asarray(x, np.float64) / t
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(teacher[0, 0]), log_softmax(student[0, 0])
    expected = t * t * np.sum(np.exp(p) * (p - q))
    got = R.distillation_kl(teacher, student, mask, t)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert float(R.distillation_kl(teacher, teacher, mask, t)) == 0.0
    # no gradient reaches the teacher
    grad = jax.grad(lambda a: R.distillation_kl(a, student, mask, t))(teacher)
    assert not np.any(np.asarray(grad))
