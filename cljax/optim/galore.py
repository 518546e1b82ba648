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

Adam runs on ``R``: its moments have ``R``'s shape and are kept when the projector is
refreshed (``moments_on_refresh="keep"``, galore-torch), bias correction counting every
step; ``"reset"`` zeroes them at each refresh and restarts the bias-correction count
with them (zeroed moments are a fresh estimate; correcting them with the global count
would shrink the first post-refresh updates by ``1 - b1``). The update is
``scale * back(adam(R))``; weight decay (in :func:`galore`) acts in the full space.
Untargeted parameters get plain Adam on their full gradient.

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


def adam_direction(
    mu: jax.Array,
    nu: jax.Array,
    count: jax.Array,
    b1: float,
    b2: float,
    eps: float,
    eps_root: float,
) -> jax.Array:
    """Bias-corrected Adam direction ``mu_hat / (sqrt(nu_hat + eps_root) + eps)``;
    ``count`` (>= 1) is the number of moment updates so far."""
    mu_hat = mu / (1 - b1 ** count.astype(jnp.float32))
    nu_hat = nu / (1 - b2 ** count.astype(jnp.float32))
    return mu_hat / (jnp.sqrt(nu_hat + eps_root) + eps)


# ----------------------------------------------------------------------------------
# The transform
# ----------------------------------------------------------------------------------


class GaLoreState(NamedTuple):
    """State of :func:`scale_by_galore`. Per-leaf trees have the parameters' structure.

    count: () int32, steps taken (refresh schedule).
    moment_count: () int32, moment updates since the targets' low-rank moments
      (re)started (their bias correction); equals ``count`` with
      ``moments_on_refresh="keep"``. Untargeted leaves always use ``count``.
    left: per target with side left/full ``U_r`` (..., m, r), else a size-0 array.
    right: per target with side right/full ``Vt_r`` (..., r, n), else a size-0 array.
    mu, nu: Adam moments, float32, in ``R``'s shape for targets (left: (..., r, n),
      right: (..., m, r), full: (..., r, r)), the parameter's shape otherwise.
    """

    count: jax.Array
    moment_count: jax.Array
    left: Any
    right: Any
    mu: Any
    nu: Any


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


def init_leaf(plan: LeafPlan, leaf: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(left, right, zero moment) for one leaf."""
    shape = tuple(jnp.shape(leaf))
    if plan.side is None:
        return _empty(), _empty(), jnp.zeros(shape, jnp.float32)
    left, right, low = projector_shapes(shape, plan.side, plan.rank)
    zeros = lambda s: _empty() if s is None else jnp.zeros(s, jnp.float32)
    return zeros(left), zeros(right), jnp.zeros(low, jnp.float32)


def scale_by_galore(
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
    moments_on_refresh: MomentsOnRefresh = "keep",
) -> optax.GradientTransformation:
    """GaLore-projected Adam direction (no learning rate, no weight decay).

    Args:
      rank: projection rank r per targeted matrix (an int, or ``(path, shape) -> int``);
        must lie in ``[0, min(m, n)]`` (0 gives a zero update).
      update_proj_gap: refresh the projectors at steps 0, gap, 2 gap, ...
      scale: multiplies the back-projected update of targeted leaves.
      side: std | reverse_std | left | right | full (see the module docstring).
      targets: which leaves to project (see :func:`resolve_targets`); the others get
        plain Adam.
      b1, b2, eps, eps_root: Adam hyperparameters (as ``optax.scale_by_adam``).
      moments_on_refresh: keep | reset the low-rank moments at a refresh.
    """
    validate_common(side, update_proj_gap, moments_on_refresh)
    reset = moments_on_refresh == "reset"

    def init_fn(params: Any) -> GaLoreState:
        plans = make_plans(params, targets, side, rank)
        per_leaf = jax.tree.map(init_leaf, plans, params, is_leaf=_is_plan)
        left, right, mu = unzip_tree(per_leaf, params, 3)
        zero = jnp.zeros([], jnp.int32)
        return GaLoreState(zero, zero, left, right, mu, jax.tree.map(jnp.zeros_like, mu))

    def update_fn(updates: Any, state: GaLoreState, params: Any = None):
        del params
        plans = make_plans(updates, targets, side, rank)
        refresh = state.count % update_proj_gap == 0
        count = optax.safe_int32_increment(state.count)
        restart = refresh & reset
        moment_count = optax.safe_int32_increment(jnp.where(restart, 0, state.moment_count))

        def leaf_update(plan, grad, left, right, mu, nu):
            if plan.side is None:
                low, steps = grad.astype(jnp.float32), count
            else:
                steps = moment_count
                left, right = refresh_projectors(grad, left, right, plan.side, plan.rank, refresh)
                low = project(grad, left, right, plan.side)
                mu = jnp.where(restart, 0.0, mu)
                nu = jnp.where(restart, 0.0, nu)
            mu = b1 * mu + (1 - b1) * low
            nu = b2 * nu + (1 - b2) * jnp.square(low)
            direction = adam_direction(mu, nu, steps, b1, b2, eps, eps_root)
            if plan.side is not None:
                direction = scale * project_back(direction, left, right, plan.side)
            return direction.astype(grad.dtype), left, right, mu, nu

        out = jax.tree.map(
            leaf_update,
            plans,
            updates,
            state.left,
            state.right,
            state.mu,
            state.nu,
            is_leaf=_is_plan,
        )
        new_updates, left, right, mu, nu = unzip_tree(out, updates, 5)
        return new_updates, GaLoreState(count, moment_count, left, right, mu, nu)

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
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
