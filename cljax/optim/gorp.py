"""GORP: GaLore-projected full weights plus LoRA, with a shared space kept out of the
gradients of later tasks (arXiv 2507.02503; docs/methods.md section 3).

Three kinds of leaves in one parameter tree:

- ``full_targets``: full weight matrices trained through the GaLore projection
  (:mod:`cljax.optim.galore`: rank, refresh gap, scale, side). The low-rank gradient
  ``R`` has the shared space ``S`` removed, ``R - S (S^T R)``, before Adam.
- ``lora_a_targets``: LoRA ``A`` factors (cljax orientation ``(..., d_in, r)``), trained
  with plain Adam on their gradient with ``S`` removed the same way.
- everything else: plain Adam (e.g. LoRA ``B``).

It is a composition, not a second optimizer: ``scale_by_galore(base_optimizer=
orthogonal_to_shared_space(scale_by_adam(), roles))`` (:mod:`cljax.optim.shared_space`
holds the filter and its growth rule), so there is one Adam and one projection.

Where ``S`` lives. The projector ``P`` touches one side of ``R`` and is refreshed every
``gap`` steps, so coordinates on that side change meaning at each refresh; a basis
stored there (what the release does for a left-projected W: left singular vectors of
the ``(r, n)`` moment live in the refreshed ``r`` coordinates) describes nothing stable
by the next task. ``S`` is therefore kept on the side ``P`` does not touch: the ``m``
rows of a right-projected ``R`` ``(m, r)``, the ``n`` columns of a left-projected ``R``
``(r, n)``, both of which are coordinates of the weight itself; GaLore hands its base
optimizer exactly that side first (:func:`cljax.optim.galore.to_coords`), so full
targets have the role ``"rows"``. ``side="full"`` touches both sides and is rejected.
For LoRA ``A`` the side is an option: ``lora_basis_side="input"`` (the ``d_in`` rows:
the input subspace, refresh-free) or ``"rank"`` (the ``r`` columns: the release's
choice, its ``A`` being ``(r, d_in)``).
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import optax

from cljax.optim.galore import (
    GaLoreState,
    MomentsOnRefresh,
    RankSpec,
    Side,
    TargetSpec,
    resolve_targets,
    scale_by_galore,
    validate_common,
)
from cljax.optim.shared_space import (
    Role,
    contains_shared_space,
    grow_shared_space,
    keep_only_bases,
    orthogonal_to_shared_space,
    validate_threshold,
)
from cljax.paths import path_to_str

LoraBasisSide = Literal["input", "rank"]


def _mask(params: Any, targets: TargetSpec, what: str) -> list[bool]:
    if targets is None:
        return [False] * len(jax.tree.leaves(params))
    return jax.tree.leaves(resolve_targets(params, targets, what=what))


def gorp_roles(
    params: Any,
    *,
    full_targets: TargetSpec,
    lora_a_targets: TargetSpec,
    lora_basis_side: LoraBasisSide,
    use_shared_space: bool,
) -> Any:
    """The shared-space role of every leaf (a pytree with ``params``' structure): full
    targets ``"rows"`` (their GaLore coordinates, basis side first), LoRA ``A``
    ``"rows"`` (input side) or ``"columns"`` (rank side), the rest ``"off"``; all
    ``"off"`` without the shared space. Validates the targets."""
    full = _mask(params, full_targets, "full_targets")
    lora = _mask(params, lora_a_targets, "lora_a_targets")
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    lora_role: Role = "rows" if lora_basis_side == "input" else "columns"
    roles: list[Role] = []
    for (key_path, _), is_full, is_lora in zip(flat, full, lora, strict=True):
        if is_full and is_lora:
            raise ValueError(
                f"{path_to_str(key_path)!r} matches both full_targets and lora_a_targets"
            )
        role: Role = "rows" if is_full else lora_role if is_lora else "off"
        roles.append(role if use_shared_space else "off")
    return jax.tree_util.tree_unflatten(treedef, roles)


def scale_by_gorp(
    rank: RankSpec,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    *,
    full_targets: TargetSpec,
    lora_a_targets: TargetSpec = None,
    side: Side = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    eps_root: float = 0.0,
    moments_on_refresh: MomentsOnRefresh = "keep",
    use_shared_space: bool = True,
    reproject_update: bool = False,
    lora_basis_side: LoraBasisSide = "input",
    max_tasks: int = 16,
) -> optax.GradientTransformation:
    """GORP's Adam direction (no learning rate, no weight decay).

    Args:
      rank: GaLore rank of the full targets (int or ``(path, shape) -> int``), in
        ``[0, min(m, n)]``.
      update_proj_gap, scale, side, moments_on_refresh: GaLore settings of the full
        targets (see :func:`cljax.optim.galore.scale_by_galore`); ``side="full"`` is
        rejected (no refresh-free side for ``S``).
      full_targets: full weights to train through the projection (patterns, predicate
        or mask; see :func:`cljax.optim.galore.resolve_targets`); None: none.
      lora_a_targets: LoRA ``A`` factors ``(..., d_in, r)`` whose gradients exclude ``S``;
        None: none.
      b1, b2, eps, eps_root: Adam (GORP's runs use eps 1e-6).
      use_shared_space: remove ``S`` from the gradients (False: the release as run,
        where ``S`` was never loaded; no basis is allocated).
      reproject_update: also remove ``S`` from Adam's output (exact orthogonality:
        Adam's element-wise division does not preserve it).
      lora_basis_side: input | rank (see the module docstring).
      max_tasks: task ends the fixed-size basis must hold without truncation.

    The state is a :class:`cljax.optim.galore.GaLoreState` whose base-optimizer states
    are :class:`cljax.optim.shared_space.SharedSpaceState` around Adam's.
    """
    validate_common(side, update_proj_gap, moments_on_refresh)
    if side == "full":
        raise ValueError(
            "side='full' projects both sides of W, so no side is free of projector "
            "refreshes to hold the shared space; use std, reverse_std, left or right"
        )
    if lora_basis_side not in ("input", "rank"):
        raise ValueError(f"lora_basis_side={lora_basis_side!r}; valid: ('input', 'rank')")
    if isinstance(max_tasks, bool) or not isinstance(max_tasks, int) or max_tasks < 1:
        raise ValueError(f"max_tasks must be an int >= 1, got {max_tasks!r}")
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root)

    def compose(tree: Any) -> optax.GradientTransformation:
        # The roles come from the real parameters (or their gradients, same shapes);
        # GaLore's base optimizer sees trees of the same structure.
        roles = gorp_roles(
            tree,
            full_targets=full_targets,
            lora_a_targets=lora_a_targets,
            lora_basis_side=lora_basis_side,
            use_shared_space=use_shared_space,
        )
        inner = orthogonal_to_shared_space(
            adam, roles, max_tasks=max_tasks, reproject_update=reproject_update
        )
        return scale_by_galore(
            rank,
            update_proj_gap,
            scale,
            side=side,
            targets=full_targets,
            base_optimizer=inner,
            moments_on_refresh=moments_on_refresh,
        )

    def init_fn(params: Any) -> GaLoreState:
        return compose(params).init(params)

    def update_fn(updates: Any, state: GaLoreState, params: Any = None):
        return compose(updates).update(updates, state, params)

    return optax.GradientTransformation(init_fn, update_fn)


def gorp(
    learning_rate: optax.ScalarOrSchedule,
    rank: RankSpec,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    *,
    full_targets: TargetSpec,
    lora_a_targets: TargetSpec = None,
    full_learning_rate: optax.ScalarOrSchedule | None = None,
    weight_decay: float = 0.0,
    side: Side = "std",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    moments_on_refresh: MomentsOnRefresh = "keep",
    use_shared_space: bool = True,
    reproject_update: bool = False,
    lora_basis_side: LoraBasisSide = "input",
    max_tasks: int = 16,
) -> optax.GradientTransformation:
    """GORP optimizer: :func:`scale_by_gorp`, decoupled weight decay (full space), then
    ``-learning_rate`` (LoRA and other leaves) or ``-full_learning_rate`` (full targets;
    default ``learning_rate``). Published: T5 LoRA lr 1e-3, full lr 1e-5, rank 8,
    scale 1, gap 10; LLaMA-2 LoRA lr 2e-4, full lr 1e-6, rank 8, scale 0.25.
    Call :func:`end_task` on the optimizer state between tasks.
    """
    core = scale_by_gorp(
        rank,
        update_proj_gap,
        scale,
        full_targets=full_targets,
        lora_a_targets=lora_a_targets,
        side=side,
        b1=b1,
        b2=b2,
        eps=eps,
        moments_on_refresh=moments_on_refresh,
        use_shared_space=use_shared_space,
        reproject_update=reproject_update,
        lora_basis_side=lora_basis_side,
        max_tasks=max_tasks,
    )
    if full_learning_rate is None:
        rate = optax.scale_by_learning_rate(learning_rate)
    else:

        def labels(params):
            mask = _mask(params, full_targets, "full_targets")
            return jax.tree.unflatten(
                jax.tree.structure(params), ["full" if m else "rest" for m in mask]
            )

        rate = optax.partition(
            {
                "full": optax.scale_by_learning_rate(full_learning_rate),
                "rest": optax.scale_by_learning_rate(learning_rate),
            },
            labels,
        )
    return optax.chain(core, optax.add_decayed_weights(weight_decay), rate)


# ----------------------------------------------------------------------------------
# Task end: grow the shared space from Adam's first moment
# ----------------------------------------------------------------------------------


def _is_gorp(s: Any) -> bool:
    return isinstance(s, GaLoreState) and contains_shared_space(s)


_restart = jax.jit(keep_only_bases)


def end_task(opt_state: Any, threshold: float = 0.9, *, restart: bool = True) -> Any:
    """Grow GORP's shared space inside ``opt_state`` (an optax state pytree, e.g.
    ``gorp(...).init(params)``) from Adam's first moment
    (:func:`cljax.optim.shared_space.grow_shared_space`); returns the new state.

    With ``restart`` every GORP state's step count, moments and projectors are zeroed
    for the next task (each task starts a fresh optimizer, as the published runs did;
    the next step refreshes the projectors); the bases are kept. For an
    ``nnx.Optimizer`` use :func:`cljax.optim.nnx_optimizer.map_opt_state`.
    """
    validate_threshold(threshold)
    grown = grow_shared_space(opt_state, threshold)
    if not restart:
        return grown
    return jax.tree.map(lambda s: _restart(s) if _is_gorp(s) else s, grown, is_leaf=_is_gorp)
