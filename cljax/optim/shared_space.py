"""A shared space kept out of the gradients, as an optax wrapper (GORP's and GPM's
orthogonality; docs/methods.md section 3).

:func:`orthogonal_to_shared_space` wraps a gradient transformation ``inner`` (e.g.
``optax.scale_by_adam()``): every leaf with a basis ``S`` has its gradient replaced by
``X - S (S^T X)`` before ``inner`` sees it (and, with ``reproject_update``, ``inner``'s
output filtered again: Adam's element-wise division does not preserve orthogonality).
The space grows between tasks from ``inner``'s first moment with GPM's energy rule
(:func:`grow_shared_space`, :func:`cljax.optim.subspace.grow_basis`).

Which side of a leaf ``(..., a, b)`` the basis spans is its *role*: ``"rows"`` (``S`` is
``(..., a, k)``), ``"columns"`` (``(..., b, k)``) or ``"off"`` (no basis). Leaves are
handed to ``inner`` basis side first, ``(..., d, c)`` (a ``"columns"`` leaf transposed;
element-wise optimizers are unaffected), so its first moment is already in the
orientation the growth rule needs and :func:`grow_shared_space` works on the state
alone.

``S`` is stored per leaf as a fixed-capacity array ``(..., d, capacity)`` whose first
``basis_used`` columns are the basis and the rest zeros (so ``S (S^T X)`` needs no
mask), with ``capacity = min(d, max_tasks * min(d, c))``: a task end adds at most
``min(d, c)`` directions (the rank of the moment), so ``max_tasks`` task ends never
truncate, the basis is capped at its dimension, and shapes stay static for ``jit`` and
checkpoints. Projections use ``S (S^T X)``, never the dense ``d x d`` ``S S^T``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cljax.optim.subspace import grow_basis, remove_basis
from cljax.paths import path_to_str

Role = Literal["rows", "columns", "off"]
ROLES = ("rows", "columns", "off")
# a pytree of roles with the parameters' structure, or a function params -> that pytree
Roles = Any | Callable[[Any], Any]


class SharedSpaceState(NamedTuple):
    """State of :func:`orthogonal_to_shared_space`; per-leaf trees have the parameters'
    structure.

    basis: ``S`` (..., d, capacity) float32, zero beyond ``basis_used`` columns; a size-0
      array where the role is ``"off"``.
    basis_used: (...) int32, columns of ``S`` in use per matrix (size-0 where off).
    inner_state: the wrapped transformation's state, over the leaves basis side first.
    """

    basis: Any
    basis_used: Any
    inner_state: Any


def _empty(dtype: Any = jnp.float32) -> jax.Array:
    return jnp.zeros((0,), dtype)


def _roles_for(roles: Roles, tree: Any) -> list[Role]:
    """The role of every leaf of ``tree`` (flattening order), validated."""
    resolved = roles(tree) if callable(roles) else roles
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = jax.tree.leaves(resolved)
    if len(values) != len(flat):
        raise ValueError(
            f"roles has {len(values)} leaves but the parameters have {len(flat)}: give a "
            "role ('rows', 'columns' or 'off') per parameter leaf"
        )
    out: list[Role] = []
    for (path, leaf), role in zip(flat, values, strict=True):
        if role not in ROLES:
            raise ValueError(f"role {role!r} of {path_to_str(path)!r}; valid: {ROLES}")
        size, ndim = jnp.size(leaf), jnp.ndim(leaf)
        if role != "off" and size and ndim < 2:
            raise ValueError(
                f"{path_to_str(path)!r} has shape {jnp.shape(leaf)} and role {role!r}: a "
                "shared space needs a matrix or a stack of matrices"
            )
        # size-0 leaves are placeholders (e.g. scale_by_galore's for the other group)
        out.append(role if size else "off")
    return out


def _orient(x: Any, role: Role) -> Any:
    return jnp.swapaxes(x, -1, -2) if role == "columns" else x


def _map(fn: Callable, roles: list[Role], tree: Any, *rest: Any) -> Any:
    """``fn(role, leaf, *rest_leaves)`` over the leaves of ``tree``."""
    leaves, treedef = jax.tree.flatten(tree)
    others = [treedef.flatten_up_to(r) for r in rest]
    outs = [fn(role, *args) for role, *args in zip(roles, leaves, *others, strict=True)]
    return jax.tree.unflatten(treedef, outs)


def orthogonal_to_shared_space(
    inner: optax.GradientTransformation,
    roles: Roles,
    *,
    max_tasks: int = 16,
    reproject_update: bool = False,
) -> optax.GradientTransformation:
    """Run ``inner`` on gradients with each leaf's shared space removed.

    Args:
      inner: a gradient transformation (GORP: ``optax.scale_by_adam``); its state must
        hold a first moment named ``mu`` with the parameters' structure for
        :func:`grow_shared_space`.
      roles: per parameter leaf ``"rows"``, ``"columns"`` or ``"off"`` (see the module
        docstring), as a pytree with the parameters' structure or a function of the
        parameters returning one (as optax masks). Size-0 leaves are skipped.
      max_tasks: task ends the fixed-size basis must hold without truncation.
      reproject_update: also remove ``S`` from ``inner``'s output (exact
        orthogonality).

    The space starts empty (the identity filter) and grows by :func:`grow_shared_space`.
    """
    if isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks < 1:
        raise ValueError(f"max_tasks must be an int >= 1, got {max_tasks!r}")

    def leaf_basis(role: Role, leaf: Any) -> tuple[jax.Array, jax.Array]:
        if role == "off":
            return _empty(), _empty(jnp.int32)
        *lead, d, c = _orient(jnp.zeros(jnp.shape(leaf)), role).shape
        capacity = min(d, max_tasks * min(d, c))
        return jnp.zeros((*lead, d, capacity), jnp.float32), jnp.zeros(tuple(lead), jnp.int32)

    def init_fn(params: Any) -> SharedSpaceState:
        per_leaf = _roles_for(roles, params)
        pairs = _map(leaf_basis, per_leaf, params)
        basis = _map(lambda _, __, pair: pair[0], per_leaf, params, pairs)
        used = _map(lambda _, __, pair: pair[1], per_leaf, params, pairs)
        oriented = _map(lambda role, p: _orient(jnp.zeros_like(p), role), per_leaf, params)
        return SharedSpaceState(basis, used, inner.init(oriented))

    def update_fn(updates: Any, state: SharedSpaceState, params: Any = None):
        del params
        per_leaf = _roles_for(roles, updates)

        def filtered(role: Role, x: Any, basis: Any) -> Any:
            x = _orient(x, role)
            return x if role == "off" else remove_basis(x, basis)

        oriented = _map(filtered, per_leaf, updates, state.basis)
        out, inner_state = inner.update(oriented, state.inner_state, None)
        if reproject_update:
            out = _map(filtered, per_leaf, out, state.basis)
        out = _map(lambda role, x: _orient(x, role), per_leaf, out)
        return out, state._replace(inner_state=inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------------
# Task end: grow the space from the inner transformation's first moment
# ----------------------------------------------------------------------------------


def _is_state(x: Any) -> bool:
    return isinstance(x, SharedSpaceState)


def _first_moment(inner_state: Any) -> Any:
    """The ``mu`` field of the first NamedTuple state inside ``inner_state``."""
    found = [
        s
        for s in jax.tree.leaves(
            inner_state, is_leaf=lambda s: isinstance(s, tuple) and hasattr(s, "mu")
        )
        if hasattr(s, "mu")
    ]
    if not found:
        raise ValueError(
            "the shared space grows from the inner optimizer's first moment, but its state "
            "has no field 'mu' (wrap optax.scale_by_adam or another optimizer keeping one)"
        )
    return found[0].mu


def _grow_leaf(moment: jax.Array, basis: jax.Array, used: jax.Array, threshold: jax.Array):
    if basis.size == 0:
        return basis, used
    *_, d, c = moment.shape
    flat = jax.vmap(grow_basis, in_axes=(0, 0, 0, None))(
        moment.reshape(-1, d, c),
        basis.reshape(-1, d, basis.shape[-1]),
        used.reshape(-1),
        threshold,
    )
    return flat[0].reshape(basis.shape), flat[1].reshape(used.shape)


def _grow_state(state: SharedSpaceState, threshold: jax.Array) -> SharedSpaceState:
    moment = _first_moment(state.inner_state)
    grown = jax.tree.map(
        lambda m, b, u: _grow_leaf(m, b, u, threshold), moment, state.basis, state.basis_used
    )
    basis = jax.tree.map(lambda _, pair: pair[0], moment, grown)
    used = jax.tree.map(lambda _, pair: pair[1], moment, grown)
    return state._replace(basis=basis, basis_used=used)


@jax.jit
def _grow_all(opt_state: Any, threshold: jax.Array) -> Any:
    return jax.tree.map(
        lambda s: _grow_state(s, threshold) if _is_state(s) else s, opt_state, is_leaf=_is_state
    )


def validate_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")


def grow_shared_space(opt_state: Any, threshold: float = 0.9) -> Any:
    """Grow every :class:`SharedSpaceState` inside ``opt_state`` (any optax state pytree)
    from its inner optimizer's first moment (GPM's energy rule, ``threshold`` in
    (0, 1]; :func:`cljax.optim.subspace.grow_basis`); returns the new state."""
    validate_threshold(threshold)
    return _grow_all(opt_state, jnp.asarray(threshold, jnp.float32))


def keep_only_bases(state: Any) -> Any:
    """``state`` with every array zeroed except the shared-space bases (a fresh optimizer
    for the next task that keeps what earlier tasks built)."""
    return jax.tree.map(
        lambda s: (
            s._replace(inner_state=jax.tree.map(jnp.zeros_like, s.inner_state))
            if _is_state(s)
            else jnp.zeros_like(s)
        ),
        state,
        is_leaf=_is_state,
    )


def contains_shared_space(state: Any) -> bool:
    return any(_is_state(s) for s in jax.tree.leaves(state, is_leaf=_is_state))


def shared_bases(opt_state: Any) -> list[tuple[jax.Array, jax.Array]]:
    """``[(basis, basis_used), ...]`` of every leaf with a shared space inside
    ``opt_state``, in flattening order (for inspection and tests)."""
    out: list[tuple[jax.Array, jax.Array]] = []
    for s in jax.tree.leaves(opt_state, is_leaf=_is_state):
        if _is_state(s):
            for b, u in zip(jax.tree.leaves(s.basis), jax.tree.leaves(s.basis_used), strict=True):
                if b.size:
                    out.append((b, u))
    return out
