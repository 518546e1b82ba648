"""Shared subspace machinery: batched float32 SVD, rank rules, compact basis storage."""

import jax.numpy as jnp
import numpy as np
import pytest

from cljax.optim import subspace as ss

RNG = np.random.default_rng(0)


def dense_two_sided(w: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """(I - U_h U_h^T) x (I - V_h^T V_h) with NumPy float64 SVD of w, dense projectors."""
    u, _, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    uh, vh = u[:, :k], vt[:k]
    return (np.eye(w.shape[0]) - uh @ uh.T) @ x @ (np.eye(w.shape[1]) - vh.T @ vh)


def test_batched_svd_float32_over_stacks_of_any_dtype():
    w = RNG.normal(size=(2, 3, 7, 5)).astype(np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
        x = jnp.asarray(w, dtype)
        u, s, vt = ss.batched_svd(x)
        assert u.shape == (2, 3, 7, 5) and s.shape == (2, 3, 5) and vt.shape == (2, 3, 5, 5)
        assert u.dtype == s.dtype == vt.dtype == jnp.float32
        x64 = np.asarray(x.astype(jnp.float32), np.float64)
        recon = np.einsum("...ik,...k,...kj->...ij", u, s, vt)
        np.testing.assert_allclose(recon, x64, atol=2e-5)
        for idx in np.ndindex(2, 3):
            np.testing.assert_allclose(s[idx], np.linalg.svd(x64[idx], compute_uv=False), rtol=1e-5)


def test_fraction_and_schedule_ranks_match_hand_numbers():
    # PEFT effective_rank: floor(fraction * min(m, n)).
    assert ss.fraction_rank((4096, 11008), 0.5) == 2048
    assert ss.fraction_rank((3, 768, 3072), 0.3) == 230  # floor(230.4); stack axes ignored
    assert ss.fraction_rank((7, 5), 0.5) == 2
    assert ss.fraction_rank((7, 5), 1.0) == 5
    assert ss.fraction_rank((7, 5), 0.0) == 0
    # Authors' schedule: floor(max(m, n) * s) capped at min(m, n).
    assert ss.schedule_rank((1024, 1024), 0.07 * 2) == 143  # floor(143.36)
    assert ss.schedule_rank((4096, 11008), 0.25) == 2752
    assert ss.schedule_rank((4096, 11008), 0.5) == 4096  # 5504 capped: tall matrices freeze early
    assert ss.schedule_rank((10, 3), 0.25) == 2
    with pytest.raises(ValueError, match="fraction"):
        ss.fraction_rank((4, 4), 1.5)
    with pytest.raises(ValueError, match="matrix shape"):
        ss.schedule_rank((4,), 0.5)


def test_importance_ranks_match_hand_computation():
    # Layer a: x = y on both tokens -> cos 1. Layer b: token 1 orthogonal (cos 0), token 2
    # opposite (cos -1)... use cos 0 and 1 -> mean 0.5. Stacked layer c: (2, N, d) -> cos 1, 0.
    e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    acts = {
        "a": (np.stack([e1, 3 * e2]), np.stack([2 * e1, e2])),
        "b": (np.stack([e1, e2]), np.stack([e2, 5 * e2])),
        "c": (
            np.stack([np.stack([e1, e1]), np.stack([e1, e2])]),
            np.stack([np.stack([e1, e1]), np.stack([e2, e1])]),
        ),
    }
    scores = ss.importance_scores(acts)
    raw = {"a": 1.0, "b": 0.5, "c": np.array([1.0, 0.0])}
    mean = (1.0 + 0.5 + 1.0 + 0.0) / 4
    np.testing.assert_allclose(scores["a"], raw["a"] / mean)
    np.testing.assert_allclose(scores["b"], raw["b"] / mean)
    np.testing.assert_allclose(scores["c"], raw["c"] / mean)
    shapes = {"a": (8, 10), "b": (20, 10), "c": (2, 6, 6)}
    ranks = ss.importance_ranks(acts, shapes, mrr=0.1, trr=0.8)
    # r_l = 0.1 + I * 0.7 with I = 1/0.625 = 1.6 -> 1.22 -> round(9.76) = 10 clipped at d=8;
    # I = 0.8 -> 0.66 -> round(6.6) = 7 (d = 10);
    # stacked c: 1.22 * 6 -> 7 clipped to 6, 0.1 * 6 -> 1.
    assert int(ranks["a"]) == 8
    assert int(ranks["b"]) == 7
    np.testing.assert_array_equal(ranks["c"], [6, 1])
    # Authors' code constants mrr = 0.5, trr = 1.0: b -> 0.5 + 0.8 * 0.5 = 0.9 -> 9.
    assert int(ss.importance_ranks(acts, shapes, mrr=0.5, trr=1.0)["b"]) == 9
    with pytest.raises(ValueError, match="'k_proj'.*same shape"):
        ss.importance_scores({"k_proj": (np.ones((4, 8)), np.ones((4, 2)))})
    with pytest.raises(ValueError, match="'c'.*stacks"):
        ss.importance_ranks(acts, {**shapes, "c": (6, 6)})


@pytest.fixture(scope="module")
def stacked_case():
    """Tall (12, 8) and wide (8, 12) stacks with a different rank per slice (both
    storage modes on the complete side) and a square one with k >= r/2."""
    mats = {
        "tall": RNG.normal(size=(4, 12, 8)).astype(np.float32),
        "wide": RNG.normal(size=(4, 8, 12)).astype(np.float32),
        "square": RNG.normal(size=(8, 8)).astype(np.float32),
    }
    ranks = {"tall": np.array([0, 2, 6, 8]), "wide": np.array([1, 5, 4, 8]), "square": 6}
    return mats, ranks, ss.build_bases(mats, ranks)


def test_complement_storage_gives_the_dense_projection(stacked_case):
    mats, ranks, bases = stacked_case
    for name, w in mats.items():
        x = RNG.normal(size=w.shape).astype(np.float32)
        got = np.asarray(ss.project_complement(jnp.asarray(x), bases[name]))
        ks = np.broadcast_to(ranks[name], w.shape[:-2])
        for idx in np.ndindex(*w.shape[:-2]):
            want = dense_two_sided(w[idx], x[idx], int(ks[idx]))
            np.testing.assert_allclose(got[idx], want, atol=2e-5, err_msg=f"{name}{idx}")


def test_gram_method_gives_the_same_subspaces(stacked_case):
    mats, ranks, _ = stacked_case
    bases = ss.build_bases(mats, ranks, method="gram")
    for name, w in mats.items():
        x = RNG.normal(size=w.shape).astype(np.float32)
        got = np.asarray(ss.project_complement(jnp.asarray(x), bases[name]))
        ks = np.broadcast_to(ranks[name], w.shape[:-2])
        for idx in np.ndindex(*w.shape[:-2]):
            want = dense_two_sided(w[idx], x[idx], int(ks[idx]))
            np.testing.assert_allclose(got[idx], want, atol=1e-4, err_msg=f"{name}{idx}")
    with pytest.raises(ValueError, match="method"):
        ss.build_bases(mats, ranks, method="qr")


def test_storage_flags_widths_and_memory_bound(stacked_case):
    mats, ranks, bases = stacked_case
    b = bases["tall"]  # (12, 8): rows side longer than r = 8 -> always high basis
    assert b.left.shape == (4, 12, 8) and not np.asarray(b.left_complement).any()
    # right side complete: complement where k >= 4 -> widths 0, 2, 2, 0 -> padded to 2
    np.testing.assert_array_equal(b.right_complement, [False, False, True, True])
    assert b.right.shape == (4, 8, 2)
    sq = bases["square"]
    assert bool(sq.left_complement) and bool(sq.right_complement)
    assert sq.left.shape == (8, 2) and sq.right.shape == (8, 2)
    # uniform rank: bases never exceed one matrix, whatever k
    for k in range(0, 9):
        w = mats["tall"][0]
        bk = ss.build_bases({"w": w}, {"w": k})["w"]
        assert bk.left.size + bk.right.size <= w.size, k
    # the stored columns are orthonormal and the padded ones are zero
    cols = np.asarray(b.right[1])
    np.testing.assert_allclose(cols.T @ cols, np.diag([1.0, 1.0]), atol=1e-5)
    assert np.all(np.asarray(b.right[0]) == 0)


def test_two_sided_and_block_modes_on_high_directions(stacked_case):
    mats, _, bases = stacked_case
    w = mats["square"]
    u, _, vt = np.linalg.svd(w.astype(np.float64))
    high = np.outer(u[:, 0], vt[0])  # high x high: removed by both modes
    mixed = np.outer(u[:, 0], vt[7])  # high x low: removed by two_sided only
    for x, two_sided, block in ((high, 0.0, 0.0), (mixed, 0.0, 1.0)):
        x = jnp.asarray(x, jnp.float32)
        assert np.linalg.norm(ss.project_complement(x, bases["square"])) == pytest.approx(
            two_sided, abs=1e-5
        )
        out = ss.project_complement(x, bases["square"], "block")
        assert np.linalg.norm(out) == pytest.approx(block, abs=1e-5)


def test_side_names_follow_the_layout(stacked_case):
    _, _, bases = stacked_case
    b = bases["tall"]  # as a Flax kernel: (d_in=12, d_out=8)
    assert ss.input_side(b, "flax").basis is b.left
    assert ss.output_side(b, "flax").basis is b.right
    assert ss.input_side(b, "torch").basis is b.right
    assert ss.output_side(b, "torch").basis is b.left
    with pytest.raises(ValueError, match="layout"):
        ss.input_side(b, "tf")
    # high_columns undoes complement storage: k = 6 on the complete (8-dim) side
    cols = ss.high_columns(ss.Side(b.right, b.right_complement))
    assert [c.shape[1] for c in cols] == [0, 2, 6, 8]


def test_build_bases_rejects_bad_ranks_and_non_finite_weights():
    w = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"'layers/q'.*\[0, 3\]"):
        ss.build_bases({"layers/q": w}, {"layers/q": 4})
    with pytest.raises(ValueError, match=r"'layers/q'.*\[0, 3\]"):
        ss.build_bases({"layers/q": w}, {"layers/q": -1})
    bad = w.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite.*'layers/q'"):
        ss.build_bases({"layers/q": bad, "ok": w}, {"layers/q": 1, "ok": 1})
