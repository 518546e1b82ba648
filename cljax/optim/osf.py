"""OSF (Orthogonal Subspace Fine-tuning, arXiv 2504.07097) as optax transforms.

Per task, every targeted matrix ``W`` keeps the top-``k`` singular directions of its
current value frozen: updates are projected onto the orthogonal complement,
``P(X) = (I - U_h U_h^T) X (I - V_h^T V_h)`` (``mode="two_sided"``, default) or the
paper's weaker ``X - U_h U_h^T X V_h^T V_h`` (``mode="block"``). See
``docs/methods.md`` section 1 and :mod:`cljax.optim.subspace` for the storage.

Orientation: bases are stored and applied per array axis (``left`` = axis -2,
``right`` = axis -1), and both projections are unchanged by transposing ``W`` and
``X`` together, so the same transform is exact for Flax kernels ``(d_in, d_out)`` and
PyTorch weights ``(d_out, d_in)``. For a Flax kernel the frozen *input* directions
(methods.md's ``V_h``) are ``basis.left`` and the frozen *output* directions
(``U_h``) are ``basis.right``; ask :func:`cljax.optim.subspace.input_side` /
``output_side`` with ``layout="flax"`` or ``"torch"`` instead of choosing by hand.

Typical use at the start of task ``t >= 2``::

    bases = osf_bases(params, ranks=0.5, targets=[r"(q|k|v|o)_proj/kernel", r"mlp/"])
    tx = osf(1e-5, bases, weight_decay=0.01, untargeted="train")
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cljax.optim.subspace import (
    BasisMethod,
    StaticFlags,
    SubspaceBasis,
    build_bases,
    fraction_rank,
    project_complement,
    static_flags,
)
from cljax.paths import Targets, named_leaves, path_to_str, target_mask

Mode = Literal["two_sided", "block"]
RankSpec = float | Mapping[str, Any] | Callable[[str, tuple[int, ...]], Any]

_MODES = ("two_sided", "block")


# --------------------------------------------------------------------------- bases


def select_targets(params: Any, targets: Targets) -> dict[str, jax.Array]:
    """The targeted leaves of ``params`` by parameter path (``cljax.paths``).

    Args:
      params: any pytree of arrays (dict, ``nnx.State``...).
      targets: regexes (each must match a path), a predicate ``(path, leaf) -> bool``, or
        a mask pytree (``cljax.paths.target_mask``).

    Returns:
      ``{path: leaf}``; every leaf must be a matrix or a stack ``(..., m, n)``.
    """
    leaves = named_leaves(params)
    mask = target_mask(params, targets, what="OSF target")
    chosen = {p: x for (p, x), on in zip(leaves.items(), mask, strict=True) if on}
    if not chosen:
        raise ValueError("the OSF targets select no parameter")
    for path, x in chosen.items():
        if np.ndim(x) < 2:
            raise ValueError(
                f"OSF target {path!r} has shape {np.shape(x)}: it must be a matrix (m, n)"
                " or a stack of matrices (..., m, n)"
            )
    return chosen


def resolve_ranks(matrices: Mapping[str, jax.Array], ranks: RankSpec) -> dict[str, np.ndarray]:
    """Frozen rank per target: an int (or an int array over the stack axes) per path.

    ``ranks`` is one of: a float in ``[0, 1]`` (fraction of ``min(m, n)``, PEFT's
    ``effective_rank``: ``floor``); a mapping ``{path: k}``; a function
    ``(path, shape) -> k`` (e.g. ``lambda p, s: schedule_rank(s, 0.25)``). Every ``k``
    must lie in ``[0, min(m, n)]``; errors name the path.
    """
    out = {}
    for path, x in matrices.items():
        shape = tuple(np.shape(x))
        if isinstance(ranks, float):
            k = fraction_rank(shape, ranks)
        elif isinstance(ranks, Mapping):
            if path not in ranks:
                raise ValueError(f"no OSF rank given for target {path!r}")
            k = ranks[path]
        elif callable(ranks):
            k = ranks(path, shape)
        else:
            raise TypeError(f"ranks must be a float, a mapping or a function, got {type(ranks)}")
        k = np.asarray(k)
        r = min(shape[-2:])
        if not np.issubdtype(k.dtype, np.integer):
            raise ValueError(f"OSF rank for {path!r} must be integer, got {k.tolist()}")
        if k.size and (k.min() < 0 or k.max() > r):
            raise ValueError(
                f"OSF rank for {path!r} is {k.tolist()}, outside [0, min(m, n)] = [0, {r}]"
                f" for shape {shape}"
            )
        out[path] = k
    if isinstance(ranks, Mapping):
        extra = sorted(set(ranks) - set(matrices))
        if extra:
            raise ValueError(f"OSF ranks given for paths that are not targets: {extra}")
    return out


def osf_bases(
    params: Any,
    ranks: RankSpec,
    *,
    targets: Targets,
    dtype: Any = jnp.float32,
    method: BasisMethod = "svd",
) -> dict[str, SubspaceBasis]:
    """Build the frozen-subspace bases of every targeted matrix from its current value.

    One jitted call over the whole tree; SVDs in float32, batched over stacked layers.

    Args:
      params: pytree of the current weights (any float dtype).
      ranks: frozen rank per matrix, see :func:`resolve_ranks`.
      targets: which parameters, see :func:`select_targets`.
      dtype: storage dtype of the bases.
      method: ``"svd"`` (float32 SVD) or ``"gram"`` (faster, see
        :func:`cljax.optim.subspace.build_bases`).

    Returns:
      ``{path: SubspaceBasis}``, a pytree of arrays (shards and checkpoints as such).
    """
    matrices = select_targets(params, targets)
    k = resolve_ranks(matrices, ranks)
    return build_bases(matrices, k, dtype=dtype, method=method)


# --------------------------------------------------------------------------- transforms


class OSFState(NamedTuple):
    """State of :func:`osf_projection`.

    Attributes:
      bases: ``{path: SubspaceBasis}`` of the targeted matrices.
      inner_state: state of the wrapped optimizer (``optax.EmptyState()`` if none).
    """

    bases: dict[str, SubspaceBasis]
    # any optax state; optax.OptState is a recursive alias documentation tools cannot resolve
    inner_state: Any


def _check_bases(params: Any, bases: Mapping[str, SubspaceBasis]) -> None:
    leaves = named_leaves(params)
    for path, basis in bases.items():
        if path not in leaves:
            raise ValueError(f"OSF basis for {path!r} but the parameters have no such path")
        shape = tuple(np.shape(leaves[path]))
        ok = (
            len(shape) >= 2
            and tuple(basis.left.shape[:-1]) == shape[:-1]
            and tuple(basis.right.shape[:-2]) == shape[:-2]
            and basis.right.shape[-2] == shape[-1]
        )
        if not ok:
            raise ValueError(
                f"OSF basis for {path!r} (left {basis.left.shape}, right {basis.right.shape})"
                f" does not fit the parameter of shape {shape}"
            )


def _is_deleted(x: Any) -> bool:
    try:
        return bool(x.is_deleted())
    except (AttributeError, jax.errors.ConcretizationTypeError):  # NumPy array, tracer
        return False


def project_tree(
    updates: Any,
    bases: Mapping[str, SubspaceBasis],
    mode: Mode,
    flags: Mapping[str, StaticFlags] | None = None,
) -> Any:
    """Apply :func:`subspace.project_complement` to every leaf with a basis.

    ``flags``: ``{path: subspace.static_flags(basis)}`` computed from concrete bases,
    needed when ``bases`` are traced (inside ``jit``) to skip per-slice selects.
    """
    flags = flags or {}

    def project(path, x):
        name = path_to_str(path)
        basis = bases.get(name)
        if basis is None:
            return x
        return project_complement(x, basis, mode, flags.get(name, (None, None)))

    return jax.tree_util.tree_map_with_path(project, updates)


def osf_projection(
    bases: Mapping[str, SubspaceBasis],
    *,
    mode: Mode = "two_sided",
    inner: optax.GradientTransformation | None = None,
    project_gradients: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """The OSF projection, optionally wrapped around an optimizer.

    Without ``inner``: projects every targeted update onto the complement of its frozen
    subspace (untargeted leaves pass through). With ``inner``: ``project -> inner ->
    project`` with the bases held once in the state: the first projection keeps the
    inner optimizer's moments in the subspace, the second makes the constraint exact
    after Adam's element-wise scaling and weight decay (methods.md placement).

    Args:
      bases: ``{path: SubspaceBasis}`` from :func:`osf_bases`.
      mode: ``"two_sided"`` or ``"block"``.
      inner: e.g. ``optax.adamw(...)``.
      project_gradients: also project before ``inner`` (default True).

    Returns:
      A transform with state :class:`OSFState`. The state holds ``bases`` themselves
      (not a copy); a step that donates the state frees them, so build new bases (not
      ``init`` again) for a second optimizer state.
    """
    if mode not in _MODES:
        raise ValueError(f"OSF mode must be one of {_MODES}, got {mode!r}")
    bases = dict(bases)
    # Which storage each side uses is fixed when the bases are built; reading it here,
    # before tracing, compiles the projection without per-slice selects.
    flags = {path: static_flags(basis) for path, basis in bases.items()}
    inner = None if inner is None else optax.with_extra_args_support(inner)
    project = lambda tree, state: project_tree(tree, state.bases, mode, flags)

    def init_fn(params):
        # The state holds these very arrays (no copy: bases can be as large as the
        # targeted weights). A training step that donates the state frees them.
        donated = [p for p, b in bases.items() if any(_is_deleted(x) for x in b)]
        if donated:
            raise ValueError(
                f"OSF bases of {donated} were freed by a step that donated an earlier"
                " optimizer state; build them again with osf_bases for a new state"
            )
        _check_bases(params, bases)
        inner_state = optax.EmptyState() if inner is None else inner.init(params)
        return OSFState(bases=bases, inner_state=inner_state)

    def update_fn(updates, state, params=None, **extra_args):
        if inner is None:
            return project(updates, state), state
        if project_gradients:
            updates = project(updates, state)
        updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        updates = project(updates, state)
        return updates, OSFState(bases=state.bases, inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def osf(
    learning_rate: optax.ScalarOrSchedule,
    bases: Mapping[str, SubspaceBasis],
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    mode: Mode = "two_sided",
    untargeted: Literal["train", "freeze"] = "train",
    project_gradients: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """OSF optimizer: ``project -> AdamW -> project`` on the targeted matrices.

    ``untargeted="train"`` (the authors' code) trains every other parameter with plain
    AdamW; ``"freeze"`` (PEFT) gives them zero updates and no optimizer state, through
    ``optax.partition``. The AdamW arguments are ``optax.adamw``'s.
    """
    inner = optax.adamw(
        learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=weight_decay_mask
    )
    projected = osf_projection(bases, mode=mode, inner=inner, project_gradients=project_gradients)
    if untargeted == "train":
        return projected
    if untargeted != "freeze":
        raise ValueError(f"untargeted must be 'train' or 'freeze', got {untargeted!r}")
    targeted = frozenset(bases)

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "osf" if path_to_str(path) in targeted else "frozen", params
        )

    return optax.with_extra_args_support(
        optax.partition({"osf": projected, "frozen": optax.set_to_zero()}, labels)
    )
