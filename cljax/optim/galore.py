"""GaLore: low-rank gradient projection with Adam in the projected coordinates.

For a targeted matrix gradient ``G`` of shape ``(m, n)`` (the last two axes of the
parameter; leading axes, e.g. a stacked ``layers`` axis, are batched), every ``gap``
steps (steps 0, gap, 2 gap, ...) the projector is refreshed from the float32 SVD
``G = U diag(s) Vt``. Per ``side`` (sides name the array *as stored*, m = axis -2):

========== ===================================== ======================== ==============
side        projection                            low-rank ``R`` shape     back-projection
========== ===================================== ======================== ==============
left        ``R = U_r^T G``                       ``(r, n)``               ``U_r R``
right       ``R = G Vt_r^T``                      ``(m, r)``               ``R Vt_r``
full        ``R = U_r^T G Vt_r^T``                ``(r, r)``               ``U_r R Vt_r``
std         right if m >= n else left             (as chosen)
reverse_std left if m >= n else right             (as chosen)
========== ===================================== ======================== ==============

``std``/``reverse_std`` follow galore-torch, whose weights are PyTorch ``(out, in)``;
a Flax kernel ``(in, out)`` is the transpose, so ``std`` projects the same (smaller)
physical side except for square matrices (ties go to ``right`` here: the output side
of a Flax kernel). ``reverse_std`` is what ``optax.contrib.galore`` does.

A base optimizer (default Adam, as ``optax.contrib.scale_by_galore``'s
``base_optimizer``) runs on ``R``: its moments have ``R``'s shape and are kept when the
projector is refreshed (``moments_on_refresh="keep"``, galore-torch), bias correction
counting every step; ``"reset"`` zeroes them at each refresh and restarts the
bias-correction count with them (zeroed moments are a fresh estimate; correcting them
with the global count would shrink the first post-refresh updates by ``1 - b1``). The
update is ``scale * back(base(R))``; weight decay (in :func:`galore`) acts in the full
space. Untargeted parameters go through the base optimizer on their full gradient.
GORP (:mod:`cljax.optim.gorp`) is this transform with a shared-space filter
(:mod:`cljax.optim.shared_space`) around Adam as the base optimizer.

Targets are chosen by parameter path (``cljax.paths``, e.g. ``layers/attn/q_proj/kernel``):
see :func:`resolve_targets`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cljax.optim.subspace import batched_svd
from cljax.paths import Targets, path_to_str, target_mask

Side = Literal["std", "reverse_std", "left", "right", "full"]
ResolvedSide = Literal["left", "right", "full"]
MomentsOnRefresh = Literal["keep", "reset"]
# Targets: None (every leaf with ndim >= 2) or cljax.paths.Targets.
TargetSpec = None | Targets
RankSpec = int | Callable[[str, tuple[int, ...]], int]

_SIDES = ("std", "reverse_std", "left", "right", "full")
MOMENT_MODES = ("keep", "reset")
_MOMENT_FIELDS = ("count", "mu", "nu")


# ----------------------------------------------------------------------------------
# Target selection by parameter path (shared by galore.py and gorp.py)
# ----------------------------------------------------------------------------------


def resolve_targets(params: Any, targets: TargetSpec, *, what: str = "target") -> Any:
    """A pytree of Python bools (same structure as ``params``) marking targeted leaves.

    ``targets``: ``None`` -> every leaf with ``ndim >= 2``; else regexes, a predicate
    ``(path, leaf) -> bool`` or a mask pytree (``cljax.paths.target_mask``).

    ``None`` suits plain dicts of matrices; on a model with stacked layers pass patterns,
    since a stacked vector (e.g. norm scales ``(L, d)``) also has ``ndim == 2``.

    Raises ``ValueError`` naming the pattern when a pattern matches no leaf, and naming
    the parameter path when a targeted leaf is not a matrix (or stacked matrices).
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [path_to_str(p) for p, _ in flat]
    leaves = [leaf for _, leaf in flat]
    if targets is None:
        mask = [jnp.ndim(leaf) >= 2 for leaf in leaves]
    else:
        mask = target_mask(params, targets, what=what)
    for path, leaf, on in zip(paths, leaves, mask, strict=True):
        if on and jnp.ndim(leaf) < 2:
            raise ValueError(
                f"{what} {path!r} has shape {jnp.shape(leaf)}: not a matrix or a stack of "
                "matrices (need ndim >= 2; the last two axes form the matrix)"
            )
    return jax.tree_util.tree_unflatten(treedef, mask)


def resolve_side(side: Side, shape: tuple[int, ...]) -> ResolvedSide:
    """The concrete side (left | right | full) for a matrix ``(..., m, n)``."""
    m, n = shape[-2:]
    if side == "std":
        return "right" if m >= n else "left"
    if side == "reverse_std":
        return "left" if m >= n else "right"
    return side  # type: ignore[return-value]


def resolve_rank(rank: RankSpec, path: str, shape: tuple[int, ...]) -> int:
    """The projection rank of one matrix; ``ValueError`` naming ``path`` when it is not
    an int in ``[0, min(m, n)]``."""
    value = rank(path, tuple(shape)) if callable(rank) else rank
    m, n = shape[-2:]
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= min(m, n):
        raise ValueError(
            f"rank {value!r} for {path!r} of shape {tuple(shape)} is outside [0, min(m, n)] "
            f"= [0, {min(m, n)}]"
        )
    return value


def validate_common(side: str, gap: int, moments_on_refresh: str) -> None:
    if side not in _SIDES:
        raise ValueError(f"side={side!r}; valid: {_SIDES}")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
        raise ValueError(f"update_proj_gap must be an int >= 1, got {gap!r}")
    if moments_on_refresh not in MOMENT_MODES:
        raise ValueError(f"moments_on_refresh={moments_on_refresh!r}; valid: {MOMENT_MODES}")


# ----------------------------------------------------------------------------------
# Projection arithmetic on one (possibly stacked) matrix
# ----------------------------------------------------------------------------------


def unzip_tree(tree: Any, like: Any, n: int) -> tuple[Any, ...]:
    """A tree (``like``'s structure) of n-tuples -> n trees of ``like``'s structure."""
    return jax.tree.transpose(jax.tree.structure(like), jax.tree.structure((0,) * n), tree)


def _empty() -> jax.Array:
    # Placeholder for a projector a leaf does not use: a real (size-0) array keeps the
    # state a plain pytree of arrays for sharding and checkpointing.
    return jnp.zeros((0,), jnp.float32)


def projector_shapes(
    shape: tuple[int, ...], side: ResolvedSide, rank: int
) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None, tuple[int, ...]]:
    """(left ``U_r`` shape or None, right ``Vt_r`` shape or None, low-rank ``R`` shape)."""
    *lead, m, n = shape
    left = (*lead, m, rank) if side in ("left", "full") else None
    right = (*lead, rank, n) if side in ("right", "full") else None
    low = {"left": (*lead, rank, n), "right": (*lead, m, rank), "full": (*lead, rank, rank)}
    return left, right, low[side]


def svd_projectors(grad: jax.Array, side: ResolvedSide, rank: int) -> tuple[jax.Array, jax.Array]:
    """Fresh ``(U_r, Vt_r)`` from the float32 SVD of ``grad`` (..., m, n); an unused side
    is the size-0 placeholder."""
    u, _, vt = batched_svd(grad)
    left = u[..., :, :rank] if side in ("left", "full") else _empty()
    right = vt[..., :rank, :] if side in ("right", "full") else _empty()
    return left, right


def project(grad: jax.Array, left: jax.Array, right: jax.Array, side: ResolvedSide) -> jax.Array:
    """Full (..., m, n) -> low-rank coordinates, in float32."""
    g = grad.astype(jnp.float32)
    if side in ("left", "full"):
        g = jnp.einsum("...mr,...mn->...rn", left, g)
    if side in ("right", "full"):
        g = jnp.einsum("...mn,...rn->...mr", g, right)
    return g


def project_back(
    low: jax.Array, left: jax.Array, right: jax.Array, side: ResolvedSide
) -> jax.Array:
    """Low-rank coordinates -> full (..., m, n), in float32."""
    x = low
    if side in ("right", "full"):
        x = jnp.einsum("...mr,...rn->...mn", x, right)
    if side in ("left", "full"):
        x = jnp.einsum("...mr,...rn->...mn", left, x)
    return x


def refresh_projectors(
    grad: jax.Array,
    left: jax.Array,
    right: jax.Array,
    side: ResolvedSide,
    rank: int,
    refresh: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """New projectors when ``refresh`` (a traced bool), else the old ones. ``lax.cond``
    so the SVD only runs on refresh steps."""
    return jax.lax.cond(
        refresh,
        lambda: svd_projectors(grad, side, rank),
        lambda: (left, right),
    )


def to_coords(low: jax.Array, side: ResolvedSide) -> jax.Array:
    """``R`` as the base optimizer sees it: the side the projector leaves alone first,
    ``(..., d, r)`` (``d`` = the weight's own rows for ``right``, its columns for
    ``left``; ``full`` stays ``(..., r, r)``)."""
    return jnp.swapaxes(low, -1, -2) if side == "left" else low


def restart_moments(state: Any, restart: jax.Array) -> Any:
    """Zero the moment estimates inside an optax state where ``restart`` (traced bool).

    Fields named ``count``, ``mu``, ``nu`` of every NamedTuple state (optax's Adam
    family: zero moments with a zero count restart the bias correction) are zeroed;
    any other state (e.g. GORP's shared space) is kept.
    """
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(
            *(
                jax.tree.map(lambda x: jnp.where(restart, jnp.zeros_like(x), x), value)
                if name in _MOMENT_FIELDS
                else restart_moments(value, restart)
                for name, value in zip(state._fields, state, strict=True)
            )
        )
    if isinstance(state, (tuple, list)):
        return type(state)(restart_moments(x, restart) for x in state)
    if isinstance(state, dict):
        return {k: restart_moments(v, restart) for k, v in state.items()}
    return state


# ----------------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------------


class GaLoreState(NamedTuple):
    """State of :func:`scale_by_galore`. Per-leaf trees have the parameters' structure.

    count: () int32, steps taken (refresh schedule).
    left: per target with side left/full ``U_r`` (..., m, r), else a size-0 array.
    right: per target with side right/full ``Vt_r`` (..., r, n), else a size-0 array.
    low_state: the base optimizer's state over the targets' low-rank coordinates
      (:func:`to_coords`: right ``(..., m, r)``, left ``(..., n, r)``, full
      ``(..., r, r)``; size-0 arrays stand for the other leaves).
    rest_state: the base optimizer's state over the other leaves' gradients (float32;
      size-0 arrays stand for the targets). Kept apart so that
      ``moments_on_refresh="reset"`` restarts the targets' moments only.
    """

    count: jax.Array
    left: Any
    right: Any
    low_state: Any
    rest_state: Any


class LeafPlan(NamedTuple):
    """Static per-leaf projection plan: ``side`` is None for untargeted leaves."""

    path: str
    side: ResolvedSide | None
    rank: int


def make_plans(params: Any, targets: TargetSpec, side: Side, rank: RankSpec) -> Any:
    """A pytree (params' structure) of :class:`LeafPlan`, validating targets and ranks."""
    mask = resolve_targets(params, targets)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    plans = []
    for (key_path, leaf), on in zip(flat, jax.tree.leaves(mask), strict=True):
        path = path_to_str(key_path)
        if on:
            shape = tuple(jnp.shape(leaf))
            plans.append(LeafPlan(path, resolve_side(side, shape), resolve_rank(rank, path, shape)))
        else:
            plans.append(LeafPlan(path, None, 0))
    return jax.tree_util.tree_unflatten(treedef, plans)


def _is_plan(x: Any) -> bool:
    return isinstance(x, LeafPlan)


def _init_projectors(plan: LeafPlan, leaf: Any) -> tuple[jax.Array, jax.Array]:
    if plan.side is None:
        return _empty(), _empty()
    left, right, _ = projector_shapes(tuple(jnp.shape(leaf)), plan.side, plan.rank)
    zeros = lambda s: _empty() if s is None else jnp.zeros(s, jnp.float32)
    return zeros(left), zeros(right)


def _coords_zeros(plan: LeafPlan, leaf: Any) -> jax.Array:
    if plan.side is None:
        return _empty()
    low = projector_shapes(tuple(jnp.shape(leaf)), plan.side, plan.rank)[2]
    return to_coords(jnp.zeros(low, jnp.float32), plan.side)


def _rest_zeros(plan: LeafPlan, leaf: Any) -> jax.Array:
    # zeros of the other leaves' shape, without materialising a float32 copy of them
    return _empty() if plan.side is not None else jnp.zeros(jnp.shape(leaf), jnp.float32)


def _rest(plan: LeafPlan, leaf: Any) -> jax.Array:
    return _empty() if plan.side is not None else jnp.asarray(leaf).astype(jnp.float32)


def scale_by_galore(
    rank: RankSpec,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    *,
    side: Side = "std",
    targets: TargetSpec = None,
    base_optimizer: optax.GradientTransformation | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    moments_on_refresh: MomentsOnRefresh = "keep",
) -> optax.GradientTransformation:
    """GaLore: ``base_optimizer`` run on the targets' low-rank coordinates, its output
    projected back (no learning rate, no weight decay).

    Args:
      rank: projection rank r per targeted matrix (an int, or ``(path, shape) -> int``);
        must lie in ``[0, min(m, n)]`` (0 gives a zero update).
      update_proj_gap: refresh the projectors at steps 0, gap, 2 gap, ...
      scale: multiplies the back-projected update of targeted leaves.
      side: std | reverse_std | left | right | full (see the module docstring).
      targets: which leaves to project (see :func:`resolve_targets`); the others go
        through the base optimizer unprojected.
      base_optimizer: a gradient *scaling* transformation (no learning rate, no weight
        decay: those act in the full space, after the back-projection), as in
        ``optax.contrib.scale_by_galore``; default ``optax.scale_by_adam(b1, b2, eps,
        eps_root)``. It sees the targets' coordinates as ``(..., d, r)``
        (:func:`to_coords`) and every other leaf as its float32 gradient; it runs as
        two instances (targets, the rest) over trees of the parameters' structure in
        which size-0 arrays stand for the other group's leaves.
      b1, b2, eps, eps_root: the default base optimizer's Adam hyperparameters.
      moments_on_refresh: keep | reset the targets' moments at a refresh
        (:func:`restart_moments`).
    """
    validate_common(side, update_proj_gap, moments_on_refresh)
    reset = moments_on_refresh == "reset"
    if base_optimizer is None:
        base_optimizer = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root)

    def init_fn(params: Any) -> GaLoreState:
        plans = make_plans(params, targets, side, rank)
        per_leaf = jax.tree.map(_init_projectors, plans, params, is_leaf=_is_plan)
        left, right = unzip_tree(per_leaf, params, 2)
        low = jax.tree.map(_coords_zeros, plans, params, is_leaf=_is_plan)
        rest = jax.tree.map(_rest_zeros, plans, params, is_leaf=_is_plan)
        return GaLoreState(
            jnp.zeros([], jnp.int32),
            left,
            right,
            base_optimizer.init(low),
            base_optimizer.init(rest),
        )

    def update_fn(updates: Any, state: GaLoreState, params: Any = None):
        del params
        plans = make_plans(updates, targets, side, rank)
        refresh = state.count % update_proj_gap == 0

        def projectors(plan, grad, left, right):
            if plan.side is None:
                return left, right
            return refresh_projectors(grad, left, right, plan.side, plan.rank, refresh)

        per_leaf = jax.tree.map(
            projectors, plans, updates, state.left, state.right, is_leaf=_is_plan
        )
        left, right = unzip_tree(per_leaf, updates, 2)

        def coords(plan, grad, left, right):
            if plan.side is None:
                return _empty()
            return to_coords(project(grad, left, right, plan.side), plan.side)

        low = jax.tree.map(coords, plans, updates, left, right, is_leaf=_is_plan)
        rest = jax.tree.map(_rest, plans, updates, is_leaf=_is_plan)
        low_state = state.low_state
        if reset:
            low_state = restart_moments(low_state, refresh)
        low, low_state = base_optimizer.update(low, low_state, None)
        rest, rest_state = base_optimizer.update(rest, state.rest_state, None)

        def back(plan, grad, left, right, low, rest):
            if plan.side is None:
                return rest.astype(grad.dtype)
            low = to_coords(low, plan.side)  # a transpose: its own inverse
            full = project_back(low, left, right, plan.side)
            return (scale * full).astype(grad.dtype)

        new_updates = jax.tree.map(back, plans, updates, left, right, low, rest, is_leaf=_is_plan)
        count = optax.safe_int32_increment(state.count)
        return new_updates, GaLoreState(count, left, right, low_state, rest_state)

    return optax.GradientTransformation(init_fn, update_fn)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: RankSpec,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    *,
    side: Side = "std",
    targets: TargetSpec = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    moments_on_refresh: MomentsOnRefresh = "keep",
    base_optimizer: optax.GradientTransformation | None = None,
) -> optax.GradientTransformation:
    """GaLore-Adam(W): ``chain(scale_by_galore, add_decayed_weights, -learning_rate)``.

    Weight decay acts on the full parameters (decoupled, as AdamW), after the
    back-projection. See :func:`scale_by_galore` for the other arguments.
    """
    return optax.chain(
        scale_by_galore(
            rank,
            update_proj_gap,
            scale,
            side=side,
            targets=targets,
            b1=b1,
            b2=b2,
            eps=eps,
            eps_root=eps_root,
            moments_on_refresh=moments_on_refresh,
            base_optimizer=base_optimizer,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
