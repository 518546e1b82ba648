"""GaLore transform: equal to optax.contrib.galore, projections equal to galore-torch's
GaLoreProjector for every side, stacked kernels batched, moment reset, bad input."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from cljax.optim import galore as G

STEPS = 5  # with gap 2: refreshes at steps 0, 2, 4


def _grads(params, step):
    return jax.tree.map(
        lambda p: jax.random.normal(jax.random.fold_in(jax.random.key(step), p.size), p.shape),
        params,
    )


def _run(tx, params, steps=STEPS):
    """Updates of every step (params advanced with them) and the final state."""
    update = jax.jit(tx.update)
    state = tx.init(params)
    out = []
    for step in range(steps):
        upd, state = update(_grads(params, step), state, params)
        out.append(upd)
        params = optax.apply_updates(params, upd)
    return out, state


@pytest.fixture(scope="module")
def params():
    key = jax.random.key(0)
    return {
        "tall": jax.random.normal(key, (12, 5)),
        "wide": jax.random.normal(key, (4, 10)),
        "square": jax.random.normal(key, (6, 6)),
        "bias": jnp.ones((5,)),
    }


def test_equals_optax_galore(params):
    """reverse_std is optax's choice of side; Adam, scale, decoupled weight decay and
    the refresh schedule must match to 1e-6 over steps including refreshes."""
    matrices = ("tall", "wide", "square")
    ours = G.galore(0.1, 3, 2, 0.5, side="reverse_std", targets=list(matrices), weight_decay=0.01)
    dims = {k: optax.contrib.GaLoreDimensionNumbers() if k in matrices else None for k in params}
    ref = optax.contrib.galore(0.1, 3, 2, 0.5, weight_decay=0.01, weight_dimension_numbers=dims)
    ours_upd, ours_state = _run(ours, params)
    ref_upd, ref_state = _run(ref, params)
    for a, b in zip(ours_upd, ref_upd, strict=True):
        for k in params:
            np.testing.assert_allclose(a[k], b[k], atol=1e-6, rtol=0, err_msg=k)
    gs, rs = ours_state[0], ref_state[0]
    assert int(gs.count) == STEPS
    # Documented state shapes: U_r (m, r) / Vt_r (r, n); the base optimizer's moments
    # in the coordinates' shape, the side the projector leaves alone first (to_coords).
    low, rest = gs.low_state, gs.rest_state
    for k in params:
        assert low.mu[k].size + rest.mu[k].size == rs.base_optimizer_state.mu[k].size, k
        assert low.nu[k].shape == low.mu[k].shape
    assert gs.left["tall"].shape == (12, 3) and gs.right["tall"].shape == (0,)
    assert low.mu["tall"].shape == (5, 3) and rest.mu["tall"].shape == (0,)  # R (3, 5)
    assert gs.right["wide"].shape == (3, 10) and low.mu["wide"].shape == (4, 3)
    assert gs.left["square"].shape == (6, 3)
    assert rest.mu["bias"].shape == (5,) and gs.left["bias"].shape == (0,)


def _galore_torch_projector():
    # galore_torch/__init__ imports bitsandbytes (8-bit optimizer); the projector module
    # itself only needs torch, so load it on its own.
    spec = importlib.util.find_spec("galore_torch")
    assert spec is not None, "galore-torch (test extra) is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "galore_projector.py"
    module_spec = importlib.util.spec_from_file_location("_galore_projector", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.GaLoreProjector


@pytest.mark.parametrize("side", ["std", "reverse_std", "left", "right", "full"])
def test_projection_equals_galore_torch(side):
    """Same side choice (low-rank shape) and the same projection ``back(project(G))``
    as galore-torch (sign conventions of the SVD cancel in the round trip)."""
    projector_cls = _galore_torch_projector()
    rng = np.random.default_rng(1)
    for shape in [(9, 4), (4, 9), (5, 5)]:
        g = rng.standard_normal(shape).astype(np.float32)
        ref = projector_cls(rank=2, update_proj_gap=1, scale=1.0, proj_type=side)
        ref_low = ref.project(torch.from_numpy(g), 0)
        ref_full = ref.project_back(ref_low).numpy()
        resolved = G.resolve_side(side, shape)
        left, right = G.svd_projectors(jnp.asarray(g), resolved, 2)
        low = G.project(jnp.asarray(g), left, right, resolved)
        assert low.shape == tuple(ref_low.shape), (side, shape)
        np.testing.assert_allclose(
            G.project_back(low, left, right, resolved), ref_full, atol=1e-5, err_msg=str(shape)
        )


def test_stacked_kernels_equal_per_layer():
    """A stacked (L, m, n) target is L independent GaLore matrices (batched SVD)."""
    stacked = {"k": jax.random.normal(jax.random.key(3), (3, 8, 5))}
    split = {f"k{i}": stacked["k"][i] for i in range(3)}
    tx = G.galore(0.1, 2, 2, side="std", targets=None)
    up_stacked, state = _run(tx, stacked, steps=3)
    assert state[0].right["k"].shape == (3, 2, 5) and state[0].low_state.mu["k"].shape == (3, 8, 2)
    # Same per-step gradients for the split tree: slice the stacked ones.
    update = jax.jit(tx.update)
    s = tx.init(split)
    p = split
    for step in range(3):
        g = _grads(stacked, step)["k"]
        upd, s = update({f"k{i}": g[i] for i in range(3)}, s, p)
        p = optax.apply_updates(p, upd)
        for i in range(3):
            np.testing.assert_allclose(upd[f"k{i}"], up_stacked[step]["k"][i], atol=1e-6)


def test_moments_reset_restarts_adam_at_refresh():
    """With reset, the update at a refresh step equals a fresh optimizer's first update
    on that gradient; with keep it does not (old moments carry over)."""
    params = {"w": jax.random.normal(jax.random.key(4), (7, 4))}
    gap = 2
    g = [_grads(params, step) for step in range(gap + 1)]
    fresh = G.scale_by_galore(2, gap, side="std")
    fresh_update, _ = fresh.update(g[gap], fresh.init(params))
    for mode in ("reset", "keep"):
        tx = G.scale_by_galore(2, gap, side="std", moments_on_refresh=mode)
        state = tx.init(params)
        for step in range(gap + 1):
            upd, state = tx.update(g[step], state)
        if mode == "reset":
            # Adam's own count restarted with its moments; the refresh schedule's did not
            assert int(state.low_state.count) == 1 and int(state.count) == gap + 1
            np.testing.assert_allclose(upd["w"], fresh_update["w"], atol=1e-6)
        else:
            assert int(state.low_state.count) == gap + 1
            assert float(jnp.max(jnp.abs(upd["w"] - fresh_update["w"]))) > 1e-3


def test_rank_zero_gives_zero_update():
    params = {"w": jnp.ones((4, 3)), "b": jnp.ones((3,))}
    tx = G.scale_by_galore(0, 1, targets="w")
    upd, _ = tx.update(_grads(params, 0), tx.init(params))
    assert float(jnp.max(jnp.abs(upd["w"]))) == 0.0
    assert float(jnp.min(jnp.abs(upd["b"]))) > 0.0


def test_bad_input_names_the_parameter():
    params = {"layers": {"q": jnp.ones((2, 4, 3)), "norm": jnp.ones((4,))}}
    with pytest.raises(ValueError, match=r"'mlp' matches no parameter.*layers/q"):
        G.galore(0.1, 2, targets=["q", "mlp"]).init(params)
    with pytest.raises(ValueError, match=r"rank 4 for 'layers/q'.*\[0, 3\]"):
        G.galore(0.1, 4, targets="q").init(params)
    with pytest.raises(ValueError, match=r"rank -1 for 'layers/q'"):
        G.galore(0.1, -1, targets="q").init(params)
    with pytest.raises(ValueError, match=r"'layers/norm' has shape \(4,\): not a matrix"):
        G.galore(0.1, 2, targets="layers").init(params)
    with pytest.raises(ValueError, match="side='diag'"):
        G.galore(0.1, 2, side="diag")
    with pytest.raises(ValueError, match="update_proj_gap"):
        G.galore(0.1, 2, 0)
