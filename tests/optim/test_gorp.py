"""GORP: equal to GaLore with an empty shared space, gradients orthogonal to S, basis
growth equal to a NumPy implementation of the energy rule, capped at its dimension."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax.optim import galore as GL
from cljax.optim import gorp as GP
from cljax.optim import subspace
from cljax.optim.shared_space import shared_bases

FULL = ("tall", "wide", "stack")


def _grads(params, step):
    return jax.tree.map(
        lambda p: jax.random.normal(jax.random.fold_in(jax.random.key(step), p.size), p.shape),
        params,
    )


@pytest.fixture(scope="module")
def params():
    key = jax.random.key(0)
    return {
        "tall": jax.random.normal(key, (10, 4)),  # std -> right: S on the 10 rows
        "wide": jax.random.normal(key, (4, 9)),  # std -> left: S on the 9 columns
        "stack": jax.random.normal(key, (2, 8, 5)),  # stacked layers, right-projected
        "lora_a": jax.random.normal(key, (2, 6, 2)),  # (L, d_in, r)
        "lora_b": jnp.zeros((2, 2, 6)),
    }


class _Merged(NamedTuple):
    count: jax.Array
    basis: dict
    basis_used: dict
    mu: dict


def _merged(state) -> _Merged:
    """GORP's per-leaf state in one view: the bases and Adam moments live in GaLore's
    low-rank half (full targets) or its other half (LoRA A, plain leaves)."""
    halves = (state.low_state, state.rest_state)

    def pick(get):
        return {k: next((get(h)[k] for h in halves if get(h)[k].size), get(halves[1])[k])
                for k in state.left}  # fmt: skip

    return _Merged(
        state.count,
        pick(lambda h: h.basis),
        pick(lambda h: h.basis_used),
        pick(lambda h: h.inner_state.mu),
    )


def _gorp(**kw):
    return GP.scale_by_gorp(2, 2, 0.5, full_targets=list(FULL), lora_a_targets="lora_a", **kw)


@pytest.fixture(scope="module")
def trained(params):
    """Task 1 (3 steps), end_task (S grows), task 2 (3 steps) with reprojection."""
    tx = _gorp(reproject_update=True)
    update = jax.jit(tx.update)
    state = tx.init(params)
    for step in range(3):
        _, state = update(_grads(params, step), state, params)
    state = GP.end_task(state, 0.95)
    updates = []
    for step in range(3, 6):
        upd, state = update(_grads(params, step), state, params)
        updates.append(upd)
    return state, updates


@pytest.mark.parametrize("moments", ["keep", "reset"])
def test_empty_shared_space_equals_galore(params, moments):
    """Before any task end S is empty: full targets follow GaLore exactly, LoRA A and
    the other leaves plain Adam (GaLore's untargeted path), over steps with refreshes."""
    common = dict(weight_decay=0.01, moments_on_refresh=moments)
    ours = GP.gorp(0.1, 2, 2, 0.5, full_targets=list(FULL), lora_a_targets="lora_a",
                   full_learning_rate=0.01, **common)  # fmt: skip
    kw = dict(targets=list(FULL), eps=1e-6, **common)
    ref_full = GL.galore(0.01, 2, 2, 0.5, **kw)
    ref_rest = GL.galore(0.1, 2, 2, 0.5, **kw)
    states = [tx.init(params) for tx in (ours, ref_full, ref_rest)]
    updates = [jax.jit(tx.update) for tx in (ours, ref_full, ref_rest)]
    for step in range(5):
        g = _grads(params, step)
        outs = []
        for i, upd in enumerate(updates):
            out, states[i] = upd(g, states[i], params)
            outs.append(out)
        for k in params:
            ref = outs[1] if k in FULL else outs[2]
            np.testing.assert_allclose(outs[0][k], ref[k], atol=1e-6, rtol=0, err_msg=k)


def test_gradients_orthogonal_to_shared_space(trained):
    """After a task end every moment (a sum of projected gradients) has no component in
    S, on the side S lives: rows of right-projected W and LoRA A (input side), columns of
    a left-projected W (stored transposed, basis side first)."""
    state, _ = trained
    gs = _merged(state)
    assert int(gs.count) == 3
    for k in (*FULL, "lora_a"):
        basis, used = gs.basis[k], gs.basis_used[k]
        assert int(jnp.min(used)) >= 1, k
        coeff = jnp.einsum("...dk,...dc->...kc", basis, gs.mu[k])
        assert float(jnp.max(jnp.abs(coeff))) <= 1e-6 * float(jnp.max(jnp.abs(gs.mu[k]))), k
    assert gs.basis["tall"].shape[-2] == 10 and gs.basis["wide"].shape[-2] == 9
    assert gs.basis["lora_a"].shape[-2] == 6


def test_reprojected_update_orthogonal_in_full_space(trained):
    """With reproject_update the full-space update of W leaves S exactly:
    S^T dW = 0 (row side), dW S = 0 (column side), S^T dA = 0."""
    state, updates = trained
    state = _merged(state)
    for upd in updates:
        for k, (eq, scale) in {
            "tall": ("dk,dn->kn", 1),
            "wide": ("dk,md->mk", 1),
            "stack": ("ldk,ldn->lkn", 1),
            "lora_a": ("ldk,ldr->lkr", 1),
        }.items():
            coeff = jnp.einsum(eq, state.basis[k], upd[k]) * scale
            assert float(jnp.max(jnp.abs(coeff))) <= 1e-5 * float(jnp.max(jnp.abs(upd[k]))), k


def test_without_reprojection_adam_leaves_the_subspace(params, trained):
    """Adam's element-wise division breaks orthogonality (why reproject_update exists)."""
    state, _ = trained
    tx = _gorp(reproject_update=False)
    upd, _ = tx.update(_grads(params, 9), state)
    coeff = jnp.einsum("dk,dn->kn", _merged(state).basis["tall"], upd["tall"])
    assert float(jnp.max(jnp.abs(coeff))) > 1e-3 * float(jnp.max(jnp.abs(upd["tall"])))


def test_lora_basis_on_rank_side(params):
    """lora_basis_side="rank" (the release): S lives in the r coordinates of A."""
    tx = _gorp(lora_basis_side="rank")
    state = tx.init(params)
    view = _merged(state)
    assert view.basis["lora_a"].shape == (2, 2, 2) and view.mu["lora_a"].shape == (2, 2, 6)
    for task in range(2):
        for step in range(2):
            upd, state = tx.update(_grads(params, 20 + 2 * task + step), state)
        if task == 0:
            state = GP.end_task(state, 0.999)
    view = _merged(state)
    assert int(jnp.min(view.basis_used["lora_a"])) >= 1
    coeff = jnp.einsum("lrk,lri->lki", view.basis["lora_a"], view.mu["lora_a"])
    assert float(jnp.max(jnp.abs(coeff))) <= 1e-6 * float(jnp.max(jnp.abs(view.mu["lora_a"])))
    assert upd["lora_a"].shape == params["lora_a"].shape


def test_shared_space_off_allocates_nothing(params):
    tx = _gorp(use_shared_space=False)
    state = tx.init(params)
    assert all(b.size == 0 for b in jax.tree.leaves(_merged(state).basis))
    upd, state = tx.update(_grads(params, 0), state)
    assert shared_bases(GP.end_task(state)) == []


# --- the energy rule, written independently in NumPy (GPM's loop) ---------------------


def numpy_grow(moment, basis, eps, capacity):
    """basis: (d, k) float64 (k may be 0). Returns the grown (d, k') basis."""
    total = float(np.sum(moment**2))
    if basis.shape[1] == 0:
        u, s, _ = np.linalg.svd(moment, full_matrices=False)
        r = int(np.sum(np.cumsum(s**2) / total < eps))
        new = u[:, :r]
    else:
        residual = moment - basis @ (basis.T @ moment)
        u, s, _ = np.linalg.svd(residual, full_matrices=False)
        accumulated = (total - float(np.sum(s**2))) / total
        r = 0
        for value in s**2 / total:
            if accumulated < eps:
                accumulated += value
                r += 1
            else:
                break
        new = u[:, :r]
    grown = np.concatenate([basis, new], axis=1)
    return grown[:, :capacity]


def _grow(moment, basis, used, eps):
    return jax.jit(subspace.grow_basis)(moment, basis, used, jnp.float32(eps))


def test_basis_growth_matches_numpy_both_branches():
    rng = np.random.default_rng(0)
    d, c, capacity = 12, 5, 12
    basis = jnp.zeros((d, capacity), jnp.float32)
    used = jnp.int32(0)
    ref = np.zeros((d, 0))
    counts = []
    # A dominant shared direction makes the second task's residual smaller: both the
    # first-task and the expansion branch run, each adding a few vectors.
    for eps in (0.8, 0.8, 0.95):
        moment = rng.standard_normal((d, c)) * np.linspace(3.0, 0.5, c)
        basis, used = _grow(jnp.asarray(moment, jnp.float32), basis, used, eps)
        ref = numpy_grow(moment, ref, eps, capacity)
        counts.append(int(used))
        assert int(used) == ref.shape[1], (eps, counts)
        got = np.asarray(basis[:, : int(used)], np.float64)
        np.testing.assert_allclose(got @ got.T, ref @ ref.T, atol=1e-5)
        assert float(jnp.max(jnp.abs(basis[:, int(used) :]))) == 0.0
        np.testing.assert_allclose(got.T @ got, np.eye(int(used)), atol=1e-5)
    assert 0 < counts[0] < counts[1] < counts[2], counts


def test_basis_capped_at_dimension():
    rng = np.random.default_rng(1)
    d, c = 4, 3
    basis, used = jnp.zeros((d, d), jnp.float32), jnp.int32(0)
    ref = np.zeros((d, 0))
    for _ in range(4):
        moment = rng.standard_normal((d, c))
        basis, used = _grow(jnp.asarray(moment, jnp.float32), basis, used, 0.99)
        ref = numpy_grow(moment, ref, 0.99, d)
        assert int(used) == ref.shape[1] <= d
    assert int(used) == d
    np.testing.assert_allclose(basis.T @ basis, np.eye(d), atol=1e-5)
    # A full basis absorbs every moment: nothing more is added.
    basis2, used2 = _grow(jnp.asarray(rng.standard_normal((d, c)), jnp.float32), basis, used, 0.99)
    assert int(used2) == d and np.allclose(basis2, basis)


def test_end_task_restarts_and_capacity(params):
    """end_task grows S per matrix of a stack (batched), zeroes counts and moments, and
    capacity = min(d, max_tasks * min(d, c)) bounds growth."""
    tx = _gorp(max_tasks=1)
    state = _merged(tx.init(params))
    assert state.basis["tall"].shape == (10, 2)  # min(10, 1 * min(10, 2))
    assert state.basis["stack"].shape == (2, 8, 2) and state.basis_used["stack"].shape == (2,)
    assert state.basis["lora_a"].shape == (2, 6, 2)
    chained = optax.chain(tx, optax.scale(-0.1))
    cstate = chained.init(params)
    for task in range(3):
        for step in range(2):
            _, cstate = chained.update(_grads(params, 10 * task + step), cstate)
        cstate = GP.end_task(cstate, 0.99)
        gs = _merged(cstate[0])
        assert int(gs.count) == 0 and float(jnp.max(jnp.abs(gs.mu["tall"]))) == 0.0
        assert int(cstate[0].low_state.inner_state.count) == 0
        assert all(int(jnp.max(u)) <= 2 for _, u in shared_bases(cstate))
    assert int(jnp.min(gs.basis_used["stack"])) == 2


def test_bad_input():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
    with pytest.raises(ValueError, match="side='full'"):
        GP.gorp(0.1, 2, full_targets="w", side="full")
    with pytest.raises(ValueError, match="'w' matches both"):
        GP.gorp(0.1, 2, full_targets="w", lora_a_targets="w").init(params)
    with pytest.raises(ValueError, match="lora_a_targets pattern 'lora_a' matches no"):
        GP.gorp(0.1, 2, full_targets="w", lora_a_targets="lora_a").init(params)
    with pytest.raises(ValueError, match=r"rank 5 for 'w'"):
        GP.gorp(0.1, 5, full_targets="w").init(params)
    with pytest.raises(ValueError, match=r"'b' has shape \(3,\): not a matrix"):
        GP.gorp(0.1, 2, full_targets="b").init(params)
    with pytest.raises(ValueError, match="lora_basis_side"):
        GP.gorp(0.1, 2, full_targets="w", lora_basis_side="output")
    with pytest.raises(ValueError, match="threshold"):
        GP.end_task(None, 1.5)


@pytest.mark.parametrize(
    "options",
    [
        dict(reproject_update=True),
        dict(moments_on_refresh="reset", lora_basis_side="rank", side="reverse_std"),
        dict(use_shared_space=False, side="right"),
    ],
    ids=["reproject", "reset-rank-side", "no-shared-space"],
)
def test_composition_equals_the_previous_gorp(params, options):
    """The composed GORP (GaLore projection around the shared-space filter around optax
    Adam) reproduces the earlier monolithic transform (tests/optim/legacy_gorp.py) over
    50 steps: two tasks joined by end_task, projector refreshes every 4 steps, params
    moving with the updates. Agreement is to float32 round-off (measured <= 5.3e-6 on
    updates of size ~1): optax's Adam computes the bias correction b**t with an integer
    power, the old code with a float one."""
    from tests.optim import legacy_gorp

    kw = dict(full_targets=list(FULL), lora_a_targets="lora_a", **options)
    new, old = GP.scale_by_gorp(2, 4, 0.5, **kw), legacy_gorp.scale_by_gorp(2, 4, 0.5, **kw)
    new_update, old_update = jax.jit(new.update), jax.jit(old.update)
    p_new, p_old = params, params
    s_new, s_old = new.init(params), old.init(params)
    for step in range(50):
        if step == 25:
            s_new, s_old = GP.end_task(s_new, 0.9), legacy_gorp.end_task(s_old, 0.9)
        # a gradient that depends on the params, so any difference would compound
        g_new = jax.tree.map(lambda p, n: p + n, p_new, _grads(params, step))
        g_old = jax.tree.map(lambda p, n: p + n, p_old, _grads(params, step))
        u_new, s_new = new_update(g_new, s_new, p_new)
        u_old, s_old = old_update(g_old, s_old, p_old)
        for k in params:
            np.testing.assert_allclose(u_new[k], u_old[k], rtol=0, atol=2e-5, err_msg=k)
        p_new = optax.apply_updates(p_new, jax.tree.map(lambda u: -0.05 * u, u_new))
        p_old = optax.apply_updates(p_old, jax.tree.map(lambda u: -0.05 * u, u_old))
    for k in params:
        np.testing.assert_allclose(p_new[k], p_old[k], rtol=0, atol=1e-5, err_msg=k)
    view = _merged(s_new)
    new_bases = {k: (view.basis[k], view.basis_used[k]) for k in params if view.basis[k].size}
    old_bases = {k: (s_old.basis[k], s_old.basis_used[k]) for k in params if s_old.basis[k].size}
    assert len(shared_bases(s_new)) == len(new_bases)
    assert sorted(new_bases) == sorted(old_bases)
    assert len(new_bases) == (0 if "use_shared_space" in options else 4)
    for k, (b_new, u_new) in new_bases.items():
        b_old, u_old = old_bases[k]
        np.testing.assert_array_equal(u_new, u_old)
        # the spanned space (singular vectors are defined up to sign)
        proj = lambda b: jnp.einsum("...dk,...ek->...de", b, b)
        np.testing.assert_allclose(proj(b_new), proj(b_old), atol=1e-4)
