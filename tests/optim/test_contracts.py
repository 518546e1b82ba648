"""The optax contract of every cljax transform (OSF, GaLore, GORP): jitted init gives the
eager state, the state keeps its structure, shapes and dtypes over steps, accumulation
under ``optax.MultiSteps`` equals one step on the mean gradient, ``inject_hyperparams``
scales the update, and bfloat16 parameters get bfloat16 updates."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cljax.optim.galore import galore
from cljax.optim.gorp import gorp
from cljax.optim.osf import osf, osf_bases

TARGETS = ["w$", "stack$"]


def make_params(dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(0), 3)
    return {
        "w": jax.random.normal(keys[0], (6, 8), dtype),
        "stack": jax.random.normal(keys[1], (2, 6, 4), dtype),
        "b": jax.random.normal(keys[2], (8,), dtype),
    }


def grads(params, seed):
    keys = jax.random.split(jax.random.key(seed), len(params))
    return {
        k: jax.random.normal(key, v.shape, v.dtype)
        for key, (k, v) in zip(keys, sorted(params.items()), strict=True)
    }


def make_osf(learning_rate, params):
    return osf(learning_rate, osf_bases(params, ranks=0.5, targets=TARGETS))


def make_galore(learning_rate, params):
    return galore(learning_rate, rank=2, update_proj_gap=2, targets=TARGETS)


def make_gorp(learning_rate, params):
    return gorp(learning_rate, rank=2, update_proj_gap=2, full_targets=TARGETS)


FACTORIES = {"osf": make_osf, "galore": make_galore, "gorp": make_gorp}


def shapes(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.asarray(x).dtype), tree)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_jitted_init_and_steps_keep_the_state_layout(name):
    params = make_params()
    tx = FACTORIES[name](1e-2, params)
    eager = tx.init(params)
    state = jax.jit(tx.init)(params)
    assert jax.tree.structure(state) == jax.tree.structure(eager)
    assert shapes(state) == shapes(eager)
    step = jax.jit(tx.update)
    for seed in range(5):  # crosses two projector refreshes (gap 2)
        updates, state = step(grads(params, seed), state, params)
        params = optax.apply_updates(params, updates)
        assert shapes(state) == shapes(eager)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_multisteps_accumulation_equals_one_step_on_the_mean_gradient(name):
    params = make_params()
    g1, g2 = grads(params, 1), grads(params, 2)
    tx = FACTORIES[name](1e-2, params)
    reference, _ = tx.update(
        jax.tree.map(lambda a, b: (a + b) / 2, g1, g2), tx.init(params), params
    )
    multi = optax.MultiSteps(tx, every_k_schedule=2)
    state = multi.init(params)
    first, state = multi.update(g1, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(first))  # accumulating
    second, _ = multi.update(g2, state, params)
    for key in params:
        np.testing.assert_allclose(second[key], reference[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_inject_hyperparams_scales_the_update(name):
    params = make_params()
    g = grads(params, 3)
    factory = FACTORIES[name]
    tx = optax.inject_hyperparams(lambda learning_rate: factory(learning_rate, params))(
        learning_rate=1e-2
    )
    state = tx.init(params)
    base, _ = tx.update(g, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(2e-2)
    doubled, _ = tx.update(g, state, params)
    for key in params:
        np.testing.assert_allclose(doubled[key], 2 * base[key], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_bfloat16_parameters_get_bfloat16_updates(name):
    params = make_params(jnp.bfloat16)
    tx = FACTORIES[name](1e-2, params)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads(params, 4), state, params)
    for key, update in updates.items():
        assert update.dtype == jnp.bfloat16, key
        assert bool(jnp.all(jnp.isfinite(update.astype(jnp.float32)))), key
