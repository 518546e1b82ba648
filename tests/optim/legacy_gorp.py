"""GORP as it was written before the composition (cljax 9118122, cljax/optim/gorp.py):
its own per-leaf Adam, projection and shared-space removal in one transform. Kept
verbatim, minus the public ``gorp`` wrapper and the ``nnx`` branch of ``end_task``, as
the oracle that the composed ``cljax.optim.gorp`` must reproduce
(tests/optim/test_gorp.py::test_composition_equals_the_previous_gorp)."""

from __future__ import annotations

from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cljax.optim.galore import (
    RankSpec,
    ResolvedSide,
    Side,
    TargetSpec,
    project,
    project_back,
    projector_shapes,
    refresh_projectors,
    resolve_rank,
    resolve_side,
    unzip_tree,
)
from cljax.optim.gorp import _mask  # target resolution, unchanged
from cljax.optim.shared_space import _grow_leaf  # the vmapped energy rule, unchanged
from cljax.optim.subspace import remove_basis
from cljax.paths import path_to_str


def adam_direction(
    mu: jax.Array,
    nu: jax.Array,
    count: jax.Array,
    b1: float,
    b2: float,
    eps: float,
    eps_root: float,
) -> jax.Array:
    """Bias-corrected Adam direction (formerly cljax.optim.galore.adam_direction)."""
    mu_hat = mu / (1 - b1 ** count.astype(jnp.float32))
    nu_hat = nu / (1 - b2 ** count.astype(jnp.float32))
    return mu_hat / (jnp.sqrt(nu_hat + eps_root) + eps)


LoraBasisSide = Literal["input", "rank"]
Role = Literal["full", "lora_a", "plain"]


class GorpState(NamedTuple):
    """State of :func:`scale_by_gorp`; per-leaf trees have the parameters' structure.

    count: () int32, steps taken this task (refresh schedule, plain/LoRA bias correction).
    moment_count: () int32, updates since the full targets' moments (re)started.
    left, right: GaLore projectors of full targets (``U_r`` (..., m, r), ``Vt_r``
      (..., r, n)); size-0 arrays where unused.
    mu, nu: Adam moments, float32. Full targets: low-rank, basis side first ((..., m, r)
      for a right-projected W, (..., n, r) for a left-projected one); LoRA A: (..., d_in,
      r) (input side) or (..., r, d_in) (rank side); plain leaves: the parameter's shape.
    basis: shared space ``S`` (..., d, capacity), zero beyond ``basis_used`` columns;
      size-0 for plain leaves or when the shared space is off.
    basis_used: (...) int32, columns of ``S`` in use per matrix.
    """

    count: jax.Array
    moment_count: jax.Array
    left: Any
    right: Any
    mu: Any
    nu: Any
    basis: Any
    basis_used: Any


class GorpPlan(NamedTuple):
    """Static per-leaf plan."""

    path: str
    role: Role
    side: ResolvedSide | None  # GaLore side of a full target
    rank: int
    transpose: bool  # basis side is the last axis of R: store R transposed
    capacity: int  # columns of S (0: no shared space on this leaf)


def _is_plan(x: Any) -> bool:
    return isinstance(x, GorpPlan)


def _empty(dtype: Any = jnp.float32) -> jax.Array:
    return jnp.zeros((0,), dtype)


def make_gorp_plans(
    params: Any,
    *,
    full_targets: TargetSpec,
    lora_a_targets: TargetSpec,
    side: Side,
    rank: RankSpec,
    lora_basis_side: LoraBasisSide,
    use_shared_space: bool,
    max_tasks: int,
) -> Any:
    """A pytree (params' structure) of :class:`GorpPlan`; validates targets and ranks."""
    full = _mask(params, full_targets, "full_targets")
    lora = _mask(params, lora_a_targets, "lora_a_targets")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    plans = []
    for (key_path, leaf), is_full, is_lora in zip(flat, full, lora, strict=True):
        path = path_to_str(key_path)
        shape = tuple(jnp.shape(leaf))
        if is_full and is_lora:
            raise ValueError(f"{path!r} matches both full_targets and lora_a_targets")
        if is_full:
            resolved = resolve_side(side, shape)
            r = resolve_rank(rank, path, shape)
            # S goes on the side P leaves alone (rows of a right-projected R, columns
            # of a left-projected one): those are W's own coordinates, unchanged by
            # projector refreshes; the P side would hold refresh-dependent coordinates.
            transpose = resolved == "left"
            low = projector_shapes(shape, resolved, r)[2]
        elif is_lora:
            resolved, r = None, 0
            transpose = lora_basis_side == "rank"
            low = shape
        else:
            plans.append(GorpPlan(path, "plain", None, 0, False, 0))
            continue
        d, c = (low[-1], low[-2]) if transpose else (low[-2], low[-1])
        capacity = min(d, max_tasks * min(d, c)) if use_shared_space else 0
        role: Role = "full" if is_full else "lora_a"
        plans.append(GorpPlan(path, role, resolved, r, transpose, capacity))
    return jax.tree_util.tree_unflatten(treedef, plans)


def _swap(x: jax.Array, transpose: bool) -> jax.Array:
    return jnp.swapaxes(x, -1, -2) if transpose else x


def _init_leaf(plan: GorpPlan, leaf: Any) -> tuple[jax.Array, ...]:
    shape = tuple(jnp.shape(leaf))
    if plan.role == "plain":
        moment = jnp.zeros(shape, jnp.float32)
        return _empty(), _empty(), moment, _empty(), _empty(jnp.int32)
    if plan.role == "full":
        left_s, right_s, low = projector_shapes(shape, plan.side, plan.rank)
        zeros = lambda s: _empty() if s is None else jnp.zeros(s, jnp.float32)
        left, right = zeros(left_s), zeros(right_s)
    else:
        left, right, low = _empty(), _empty(), shape
    low = _swap(jnp.zeros(low, jnp.float32), plan.transpose)
    if plan.capacity:
        *lead, d, _ = low.shape
        basis = jnp.zeros((*lead, d, plan.capacity), jnp.float32)
        used = jnp.zeros(tuple(lead), jnp.int32)
    else:
        basis, used = _empty(), _empty(jnp.int32)
    return left, right, low, basis, used


# the options and defaults of cljax.optim.gorp.scale_by_gorp (its docstring and argument
# checks are left out here)
_DEFAULTS = dict(
    lora_a_targets=None, side="std", b1=0.9, b2=0.999, eps=1e-6, eps_root=0.0,
    moments_on_refresh="keep", use_shared_space=True, reproject_update=False,
    lora_basis_side="input", max_tasks=16,
)  # fmt: skip


def scale_by_gorp(
    rank: RankSpec, update_proj_gap: int, scale: float, *, full_targets: TargetSpec, **options
) -> optax.GradientTransformation:
    o = {**_DEFAULTS, **options}
    lora_a_targets, side, b1, b2, eps, eps_root = (
        o[k] for k in ("lora_a_targets", "side", "b1", "b2", "eps", "eps_root")
    )
    moments_on_refresh, use_shared_space, reproject_update, lora_basis_side, max_tasks = (
        o[k]
        for k in (
            "moments_on_refresh", "use_shared_space", "reproject_update", "lora_basis_side",
            "max_tasks",
        )
    )  # fmt: skip
    reset = moments_on_refresh == "reset"

    def plans_for(params):
        return make_gorp_plans(
            params,
            full_targets=full_targets,
            lora_a_targets=lora_a_targets,
            side=side,
            rank=rank,
            lora_basis_side=lora_basis_side,
            use_shared_space=use_shared_space,
            max_tasks=max_tasks,
        )

    def init_fn(params: Any) -> GorpState:
        per_leaf = jax.tree.map(_init_leaf, plans_for(params), params, is_leaf=_is_plan)
        left, right, mu, basis, used = unzip_tree(per_leaf, params, 5)
        zero = jnp.zeros([], jnp.int32)
        nu = jax.tree.map(jnp.zeros_like, mu)
        return GorpState(zero, zero, left, right, mu, nu, basis, used)

    def update_fn(updates: Any, state: GorpState, params: Any = None):
        del params
        refresh = state.count % update_proj_gap == 0
        count = optax.safe_int32_increment(state.count)
        restart = refresh & reset
        moment_count = optax.safe_int32_increment(jnp.where(restart, 0, state.moment_count))

        def leaf_update(plan, grad, left, right, mu, nu, basis):
            steps = count
            if plan.role == "full":
                left, right = refresh_projectors(grad, left, right, plan.side, plan.rank, refresh)
                low = project(grad, left, right, plan.side)
                mu = jnp.where(restart, 0.0, mu)
                nu = jnp.where(restart, 0.0, nu)
                steps = moment_count
            else:
                low = grad.astype(jnp.float32)
            low = _swap(low, plan.transpose)
            if plan.capacity:
                low = remove_basis(low, basis)
            mu = b1 * mu + (1 - b1) * low
            nu = b2 * nu + (1 - b2) * jnp.square(low)
            direction = adam_direction(mu, nu, steps, b1, b2, eps, eps_root)
            if plan.capacity and reproject_update:
                direction = remove_basis(direction, basis)
            direction = _swap(direction, plan.transpose)
            if plan.role == "full":
                direction = scale * project_back(direction, left, right, plan.side)
            return direction.astype(grad.dtype), left, right, mu, nu

        out = jax.tree.map(
            leaf_update,
            plans_for(updates),
            updates,
            state.left,
            state.right,
            state.mu,
            state.nu,
            state.basis,
            is_leaf=_is_plan,
        )
        new_updates, left, right, mu, nu = unzip_tree(out, updates, 5)
        new_state = GorpState(
            count, moment_count, left, right, mu, nu, state.basis, state.basis_used
        )
        return new_updates, new_state

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------
# Task end: grow the shared space from Adam's first moment
# ----------------------------------------------------------------------------------


@partial(jax.jit, static_argnames=("restart",))
def _end_task_state(state: GorpState, threshold: jax.Array, restart: bool) -> GorpState:
    grown = jax.tree.map(
        lambda m, b, u: _grow_leaf(m, b, u, threshold), state.mu, state.basis, state.basis_used
    )
    basis, used = unzip_tree(grown, state.mu, 2)
    if not restart:
        return state._replace(basis=basis, basis_used=used)
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)
    zero = jnp.zeros([], jnp.int32)
    return GorpState(
        zero, zero, zeros(state.left), zeros(state.right), zeros(state.mu), zeros(state.nu),
        basis, used,
    )  # fmt: skip


def end_task(opt_state: Any, threshold: float = 0.9, *, restart: bool = True) -> Any:
    """Grow the shared space of every :class:`GorpState` inside ``opt_state`` from
    Adam's first moment (see :func:`grow_basis`).

    ``opt_state``: an optax state pytree (e.g. ``gorp(...).init(params)``; the new state
    is returned) or an ``nnx.Optimizer`` (its state is updated in place; the optimizer
    is returned). With ``restart`` the step counts, moments and projectors are zeroed
    for the next task (each task starts a fresh optimizer, as the published runs did;
    the next step refreshes the projectors); the bases are kept.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    thr = jnp.asarray(threshold, jnp.float32)
    return jax.tree.map(
        lambda s: _end_task_state(s, thr, restart) if isinstance(s, GorpState) else s,
        opt_state,
        is_leaf=lambda s: isinstance(s, GorpState),
    )
