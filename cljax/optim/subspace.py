"""Shared subspace machinery: batched float32 SVD, rank rules, compact bases, projections.

Notation (``docs/methods.md``): a weight matrix ``W`` of shape ``(m, n)`` with
``r = min(m, n)`` and SVD ``W = U S V^T``; the *high* subspace of rank ``k`` is
``U_h = U[:, :k]`` (left) and ``V_h = Vt[:k, :]`` (right).

Bases here are stored per **array axis**, never per "input/output" role:
``SubspaceBasis.left`` acts on axis -2 of the stored array and ``SubspaceBasis.right``
on axis -1. The two-sided projection ``(I - U_h U_h^T) X (I - V_h^T V_h)`` and the
block projection are unchanged by transposing ``W`` and ``X`` together, so applying
the bases to the array as it is stored is correct for both orientations and cannot be
mixed up. The orientation only matters when naming sides: for a Flax kernel
``(d_in, d_out)`` (``layout="flax"``) the *input* side is ``left`` (methods.md's
``V_h^T``) and the *output* side is ``right`` (methods.md's ``U_h``); for a PyTorch
weight ``(d_out, d_in)`` (``layout="torch"``) it is the other way round. Use
:func:`output_side` / :func:`input_side` rather than picking a field by hand.

Memory: a side whose dimension equals ``r`` has a complete singular basis, so when
``k >= r/2`` it stores the ``r - k`` complement vectors instead (flag
``*_complement``; projecting onto the complement is the same operation). The longer
side of a non-square matrix (dimension ``> r``) always stores the ``k`` high vectors:
its complement is larger than ``r - k``. Together this is ``<= m * n`` numbers for
any uniform rank ``k``, and projections are products with these thin bases, never an
``m x m`` or ``n x n`` matrix. Stacked matrices ``(..., m, n)`` with different ranks per
slice are padded to the widest slice with zero columns (which project nothing).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cljax import parallel

Layout = Literal["flax", "torch"]
_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------- SVD


def _thin_svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.linalg.svd(x, full_matrices=False)


@jax.jit
def batched_svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Thin SVD in float32 of a stack of matrices, whatever ``x``'s dtype.

    Inside ``cljax.parallel.use_mesh`` the stack is spread over the mesh's devices
    (``parallel.map_over_devices``): each device decomposes its share of the matrices.

    Args:
      x: ``(..., m, n)``; leading axes (e.g. stacked layers) are batched.

    Returns:
      ``u (..., m, r)``, ``s (..., r)`` (descending), ``vt (..., r, n)`` in float32,
      ``r = min(m, n)``, with ``x ~= u * s[..., None, :] @ vt``.
    """
    if x.ndim < 2:
        raise ValueError(f"batched_svd needs (..., m, n), got shape {x.shape}")
    return parallel.map_over_devices(_thin_svd, x.astype(jnp.float32))


def check_finite(matrices: Mapping[str, jax.Array]) -> None:
    """Raise ``ValueError`` naming every entry of ``matrices`` with a NaN or Inf."""
    flags = _all_finite(dict(matrices))
    bad = [name for name, ok in flags.items() if not bool(ok)]
    if bad:
        raise ValueError(f"non-finite values (NaN/Inf) in weights at SVD time: {bad}")


@jax.jit
def _all_finite(matrices: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {name: jnp.all(jnp.isfinite(x)) for name, x in matrices.items()}


# --------------------------------------------------------------------------- rank rules


def _matrix_dims(shape: Sequence[int]) -> tuple[int, int]:
    if len(shape) < 2:
        raise ValueError(f"a rank rule needs a matrix shape (..., m, n), got {tuple(shape)}")
    return int(shape[-2]), int(shape[-1])


def fraction_rank(shape: Sequence[int], fraction: float = 0.5) -> int:
    """Frozen rank ``k = floor(fraction * min(m, n))``, PEFT's float ``effective_rank``.

    ``shape`` is ``(..., m, n)``; only the last two dimensions count.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"rank fraction must be in [0, 1], got {fraction}")
    m, n = _matrix_dims(shape)
    r = min(m, n)
    return max(0, min(r, int(r * fraction)))


def schedule_rank(shape: Sequence[int], s: float) -> int:
    """The authors' executed schedule: ``k = floor(max(m, n) * s)`` capped at ``min(m, n)``.

    (T5 15-task run: ``s_t = 0.07 * (t - 1)``; LLaMA 4-task run: ``s = 0.25, 0.5, 0.75``.)
    Because of ``max``, tall or wide matrices are frozen fully early.
    """
    if s < 0.0:
        raise ValueError(f"schedule fraction s must be >= 0, got {s}")
    m, n = _matrix_dims(shape)
    return min(min(m, n), math.floor(max(m, n) * s))


def mean_cosine(x: Any, y: Any, name: str = "activations", weights: Any = None) -> np.ndarray:
    """Mean over tokens of ``cos(x, y)``: ``x`` and ``y`` ``(..., N, d)`` a layer's input
    and output on N calibration tokens (leading axes: stacked layers, kept separate).
    ``weights`` ``(..., N)`` (e.g. 0 on padding) weight the mean. Returns ``(...)``."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(
            f"{name}: inputs {x.shape} and outputs {y.shape} must have the same shape"
            " (..., N, d); for a layer whose widths differ pass the enclosing block's"
            " input and output"
        )
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError(f"{name} contain NaN or Inf")
    dot = np.sum(x * y, axis=-1)
    norms = np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1)
    cos = dot / np.maximum(norms, 1e-12)
    w = np.ones_like(cos) if weights is None else np.broadcast_to(np.asarray(weights), cos.shape)
    return (cos * w).sum(axis=-1) / np.maximum(w.sum(axis=-1), 1e-12)


def normalise_importance(raw: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Divide every target's per-layer mean cosine by the mean over every layer of every
    target (the authors' normalisation): the scores then average to 1."""
    if not raw:
        raise ValueError("importance needs activations for at least one target")
    mean = np.mean(np.concatenate([np.reshape(v, -1) for v in raw.values()]))
    if not abs(mean) > 1e-12:
        raise ValueError(f"mean importance over all layers is {mean}; cannot normalise")
    return {name: np.asarray(v) / mean for name, v in raw.items()}


def importance_scores(
    activations: Mapping[str, tuple[jax.Array, jax.Array]],
) -> dict[str, np.ndarray]:
    """Normalised layer importance ``I_l`` from calibration activations (paper's rule).

    Args:
      activations: ``{target: (inputs, outputs)}``; ``inputs`` and ``outputs`` are a
        layer's input and output on a few calibration batches, shape ``(..., N, d)``
        with the same feature width ``d`` (leading ``...`` = stacked layers, kept
        separate; ``N`` = all calibration tokens of that layer). For a matrix whose
        input and output widths differ (e.g. LLaMA ``k_proj`` under GQA, ``gate_proj``)
        pass the enclosing block's input and output instead.

    Returns:
      ``{target: I}`` with ``I`` of shape ``(...)`` (a 0-d array for a single layer):
      the mean over tokens of ``cos(x, y)``, divided by the mean over every layer of
      every target (the authors' normalisation), so the scores average to 1.
    """
    raw = {}
    for name, pair in activations.items():
        if len(pair) != 2:
            raise ValueError(f"activations[{name!r}] must be an (inputs, outputs) pair")
        raw[name] = mean_cosine(pair[0], pair[1], f"activations[{name!r}]")
    return normalise_importance(raw)


def ranks_from_importance(
    scores: Mapping[str, np.ndarray],
    shapes: Mapping[str, Sequence[int]],
    *,
    mrr: float = 0.1,
    trr: float = 0.8,
) -> dict[str, np.ndarray]:
    """The paper's adaptive rank from normalised importance scores ``{target: I (...)}``:
    ``r_l = mrr + I_l * (trr - mrr)``, ``k = round(r_l * d)`` with ``d = min(m, n)``,
    clipped to ``[0, d]`` (NumPy's round-half-to-even). Paper: ``mrr = 0.1, trr = 0.8``;
    the authors' code: ``mrr = 0.5, trr = 1.0``. ``shapes``: ``{target: (..., m, n)}``
    whose stack axes ``...`` equal the scores' shape. Returns ``{target: k}``."""
    missing = sorted(set(scores) - set(shapes))
    if missing:
        raise ValueError(f"importance ranks: no weight shape given for targets {missing}")
    ranks = {}
    for name, score in scores.items():
        shape = tuple(shapes[name])
        m, n = _matrix_dims(shape)
        if np.shape(score) != shape[:-2]:
            raise ValueError(
                f"importance_ranks[{name!r}]: activations give {np.shape(score)} layers but"
                f" the weight {shape} stacks {shape[:-2]}"
            )
        d = min(m, n)
        retention = mrr + np.asarray(score) * (trr - mrr)
        ranks[name] = np.clip(np.rint(retention * d), 0, d).astype(np.int64)
    return ranks


def importance_ranks(
    activations: Mapping[str, tuple[jax.Array, jax.Array]],
    shapes: Mapping[str, Sequence[int]],
    *,
    mrr: float = 0.1,
    trr: float = 0.8,
) -> dict[str, np.ndarray]:
    """:func:`ranks_from_importance` of :func:`importance_scores` of ``activations``."""
    missing = sorted(set(activations) - set(shapes))
    if missing:
        raise ValueError(f"importance_ranks: no weight shape given for targets {missing}")
    return ranks_from_importance(importance_scores(activations), shapes, mrr=mrr, trr=trr)


# --------------------------------------------------------------------------- bases


class SubspaceBasis(NamedTuple):
    """Orthonormal bases of one matrix (or a stack of them) of shape ``(..., R, C)``.

    Attributes:
      left: ``(..., R, w_left)`` columns acting on axis -2 (rows) of the array.
      left_complement: ``(...)`` bool; True where ``left`` spans the complement of the
        high subspace (stored because it is smaller), False where it spans the high
        subspace itself.
      right: ``(..., C, w_right)`` columns acting on axis -1 (columns) of the array
        (methods.md's ``V_h^T`` for ``W = array``).
      right_complement: ``(...)`` bool, as ``left_complement``.
    """

    left: jax.Array
    left_complement: jax.Array
    right: jax.Array
    right_complement: jax.Array


class Side(NamedTuple):
    """One side's stored basis: ``basis (..., D, w)`` and ``complement (...)``."""

    basis: jax.Array
    complement: jax.Array


def output_side(basis: SubspaceBasis, layout: Layout) -> Side:
    """The output side (methods.md's ``U_h`` of ``W (d_out, d_in)``) for a storage layout.

    ``layout="flax"``: kernel ``(d_in, d_out)``, output side = ``right``.
    ``layout="torch"``: weight ``(d_out, d_in)``, output side = ``left``.
    """
    _check_layout(layout)
    if layout == "flax":
        return Side(basis.right, basis.right_complement)
    return Side(basis.left, basis.left_complement)


def input_side(basis: SubspaceBasis, layout: Layout) -> Side:
    """The input side (methods.md's ``V_h``): frozen *input* directions of the layer.

    ``layout="flax"``: ``left``; ``layout="torch"``: ``right``. An input ``x`` in the
    span of the high input directions gives the same output before and after any
    update projected by :func:`project_complement` (two-sided mode).
    """
    _check_layout(layout)
    if layout == "flax":
        return Side(basis.left, basis.left_complement)
    return Side(basis.right, basis.right_complement)


def _check_layout(layout: str) -> None:
    if layout not in ("flax", "torch"):
        raise ValueError(
            f"layout must be 'flax' (d_in, d_out) or 'torch' (d_out, d_in), got {layout!r}"
        )


class _SidePlan(NamedTuple):
    complement: np.ndarray  # (...) bool
    width: int


def _plan_side(dim: int, r: int, ranks: np.ndarray) -> _SidePlan:
    if dim == r:
        # at k = r/2 both widths tie; the complement is cheaper to apply
        complement = 2 * ranks >= r
        stored = np.where(complement, r - ranks, ranks)
    else:
        complement = np.zeros(ranks.shape, bool)
        stored = ranks
    width = int(stored.max()) if stored.size else 0
    return _SidePlan(complement, width)


def plan_widths(shape: Sequence[int], ranks: np.ndarray) -> tuple[_SidePlan, _SidePlan]:
    """Storage plan (complement flags, widths) of ``(left, right)`` for ranks ``(...)``."""
    rows, cols = _matrix_dims(shape)
    r = min(rows, cols)
    ranks = np.broadcast_to(np.asarray(ranks, np.int64), tuple(shape[:-2]))
    return _plan_side(rows, r, ranks), _plan_side(cols, r, ranks)


def _select_columns(q: jax.Array, ranks: jax.Array, complement: jax.Array, width: int) -> jax.Array:
    """From full singular vectors ``q (..., D, r)`` take ``q[:, :k]`` or ``q[:, k:]``,
    padded with zero columns to ``width``; ``ranks``/``complement`` are ``(...)``."""
    r = q.shape[-1]
    j = jnp.arange(width)
    start = jnp.where(complement, ranks, 0)[..., None]
    count = jnp.where(complement, r - ranks, ranks)[..., None]
    idx = jnp.minimum(start + j, r - 1)
    idx = jnp.broadcast_to(idx[..., None, :], (*q.shape[:-1], width))
    cols = jnp.take_along_axis(q, idx, axis=-1)
    return cols * (j < count)[..., None, :].astype(q.dtype)


BasisMethod = Literal["svd", "gram"]


def _gram_eigenvectors(x: jax.Array) -> jax.Array:
    """Eigenvectors of ``x x^T`` (``(..., R, R)``), by descending eigenvalue: the left
    singular vectors of ``x``."""
    gram = jnp.matmul(x, jnp.swapaxes(x, -1, -2), precision=_HIGHEST)
    vectors = parallel.map_over_devices(lambda g: jnp.linalg.eigh(g)[1], gram)
    return vectors[..., ::-1]


def _orthonormal(y: jax.Array) -> jax.Array:
    """Orthonormal columns spanning the leading columns of ``y (..., D, w)``: Householder
    QR keeps every prefix ``y[..., :j]``'s span, so masking columns later stays exact."""
    if y.shape[-1] == 0:
        return y
    return jnp.linalg.qr(y, mode="reduced")[0]


def _singular_vectors(
    x: jax.Array, method: BasisMethod, w_left: int, w_right: int
) -> tuple[jax.Array, jax.Array]:
    """Left ``(..., R, *)`` and right ``(..., C, *)`` singular vectors of ``x`` in float32,
    by descending singular value. ``svd``: one thin SVD (all ``r`` pairs). ``gram``: the
    ``r``-sided one(s) from ``eigh`` of the ``r x r`` Gram matrix; the longer side, which
    only ever stores its top ``w`` vectors, as the orthonormalised ``x v[:, :w]``."""
    x = x.astype(jnp.float32)
    if method == "svd":
        u, _, vt = batched_svd(x)
        return u, jnp.swapaxes(vt, -1, -2)
    rows, cols = x.shape[-2:]
    xt = jnp.swapaxes(x, -1, -2)
    if rows == cols:
        return _gram_eigenvectors(x), _gram_eigenvectors(xt)
    if rows < cols:
        left = _gram_eigenvectors(x)
        return left, _orthonormal(jnp.matmul(xt, left[..., :w_right], precision=_HIGHEST))
    right = _gram_eigenvectors(xt)
    return _orthonormal(jnp.matmul(x, right[..., :w_left], precision=_HIGHEST)), right


def _build_basis(
    x: jax.Array,
    ranks: jax.Array,
    left_complement: jax.Array,
    right_complement: jax.Array,
    w_left: int,
    w_right: int,
    dtype: Any,
    method: BasisMethod,
) -> SubspaceBasis:
    """The basis of one matrix stack ``x (..., R, C)`` (see ``_basis_arguments``)."""
    u, v = _singular_vectors(x, method, w_left, w_right)
    left = _select_columns(u, ranks, left_complement, w_left)
    right = _select_columns(v, ranks, right_complement, w_right)
    return SubspaceBasis(left.astype(dtype), left_complement, right.astype(dtype), right_complement)


def build_bases(
    matrices: Mapping[str, jax.Array],
    ranks: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    method: BasisMethod = "svd",
) -> dict[str, SubspaceBasis]:
    """Compact high-subspace bases of many matrices in one jitted call.

    Args:
      matrices: ``{name: (..., R, C)}`` arrays of any float dtype; SVDs run in float32,
        batched over the leading axes. Must be finite (checked; error names the entry).
      ranks: ``{name: k}`` with ``k`` an int or an int array of shape ``(...)`` (one
        frozen rank per stacked matrix), each in ``[0, min(R, C)]``.
      dtype: storage dtype of the bases (float32 keeps projections exact to ~1e-6).
      method: ``"svd"`` (default; LAPACK thin SVD in float32) or ``"gram"`` (float32
        ``eigh`` of the ``r x r`` Gram matrix; on the 2-core test CPU 1.1-2.2x faster
        for LLaMA-7B shapes and ~50x for 1024 x 2752, see ``bench/optim.py``). The Gram
        squares the condition number, so the subspace split is accurate to about
        ``eps * s_1^2 / (s_k^2 - s_{k+1}^2)`` instead of ``eps * s_1 / (s_k - s_{k+1})``;
        the projection stays exact for the basis it stores.

    Returns:
      ``{name: SubspaceBasis}``; see the module docstring for what each side stores.
    """
    check_finite(matrices)
    mesh = parallel.array_mesh(matrices)
    out = {}
    with contextlib.ExitStack() as stack:
        if mesh is not None and parallel.current_mesh() is None:
            stack.enter_context(parallel.use_mesh(mesh))
        for name, args in _stack_arguments(matrices, ranks, dtype, method):
            build = _build_basis_jit if mesh is None else _sharded_builder(args, mesh)
            out[name] = build(*args)
    return out


def lower_build_bases(
    matrices: Mapping[str, Any],
    ranks: Mapping[str, Any],
    mesh: Any,
    *,
    dtype: Any = jnp.float32,
    method: BasisMethod = "svd",
) -> Any:
    """The basis build of :func:`build_bases` for abstract ``matrices``
    (``ShapeDtypeStruct``s carrying shardings on ``mesh``), as the ``jax.stages.Lowered``
    call of each matrix stack: memory planning without the weights
    (``.compile().memory_analysis()``). Returns ``{name: Lowered}``; each call's
    output is that stack's ``SubspaceBasis``."""
    with parallel.use_mesh(mesh):
        return {
            name: _sharded_builder(args, mesh).lower(*args)
            for name, args in _stack_arguments(matrices, ranks, dtype, method)
        }


def _stack_arguments(
    matrices: Mapping[str, Any], ranks: Mapping[str, Any], dtype: Any, method: BasisMethod
) -> list[tuple[str, tuple[Any, ...]]]:
    """``(name, _basis_arguments)`` of each matrix stack. Bases are built one
    stack per call: XLA runs independent decompositions of one call side by side, so a
    single call holds every stack's work space at once (LLaMA-2-7B, fsdp=8: 11.3 GiB
    per device instead of about 7, ``bench/scale.py``), and on the CPU several LAPACK
    decompositions side by side can deadlock (seen with ``gram`` on three non-square
    stacks)."""
    missing = sorted(set(matrices) - set(ranks))
    if missing:
        raise ValueError(f"build_bases: no rank given for {missing[0]!r}")
    return [
        (name, _basis_arguments(name, x, ranks[name], dtype, method))
        for name, x in matrices.items()
    ]


def _basis_arguments(
    name: str, x: Any, rank: Any, dtype: Any, method: BasisMethod
) -> tuple[Any, ...]:
    """Check one stack's ranks (errors name it) and plan its storage: the arguments of
    ``_build_basis``. Stacks of the same shape and ranks (q, k, v, o) share one
    compilation."""
    if method not in ("svd", "gram"):
        raise ValueError(f"basis method must be 'svd' or 'gram', got {method!r}")
    stack = tuple(x.shape[:-2])
    k = np.asarray(rank)
    if k.shape not in ((), stack):
        raise ValueError(f"rank for {name!r} has shape {k.shape}; expected () or {stack}")
    r = min(x.shape[-2], x.shape[-1])
    if not np.issubdtype(k.dtype, np.integer) or k.min() < 0 or k.max() > r:
        raise ValueError(
            f"rank for {name!r} must be integers in [0, min(m, n)] = [0, {r}], got {k.tolist()}"
        )
    k = np.broadcast_to(k.astype(np.int32), stack)
    plan_left, plan_right = plan_widths(x.shape, k)
    return (
        x,
        jnp.asarray(k),
        jnp.asarray(plan_left.complement),
        jnp.asarray(plan_right.complement),
        plan_left.width,
        plan_right.width,
        jnp.dtype(dtype),
        method,
    )


def _sharded_builder(args: tuple[Any, ...], mesh: Any) -> Any:
    """The basis build jitted for sharded weights: every basis is born split like its
    matrix (``parallel.derived_shardings``) and the SVDs are spread over the devices
    (inside ``use_mesh``), so no device holds every basis or runs every decomposition."""
    abstract = jax.eval_shape(_build_basis_jit, *args)
    # the matrix under one name, so that the basis' paths contain it (derived_shardings)
    shardings = parallel.derived_shardings({"m": abstract}, {"m": args[0]}, mesh)["m"]
    return jax.jit(_build_basis, static_argnums=(4, 5, 6, 7), out_shardings=shardings)


_build_basis_jit = jax.jit(_build_basis, static_argnums=(4, 5, 6, 7))


# --------------------------------------------------------------------------- projections


def _project_rows(x: jax.Array, q: jax.Array) -> jax.Array:
    """``q q^T x`` for ``x (..., R, C)``, ``q (..., R, w)``."""
    coeff = jnp.matmul(jnp.swapaxes(q, -1, -2), x, precision=_HIGHEST)
    return jnp.matmul(q, coeff, precision=_HIGHEST)


def _project_cols(x: jax.Array, q: jax.Array) -> jax.Array:
    """``x q q^T`` for ``x (..., R, C)``, ``q (..., C, w)``."""
    coeff = jnp.matmul(x, q, precision=_HIGHEST)
    return jnp.matmul(coeff, jnp.swapaxes(q, -1, -2), precision=_HIGHEST)


StaticFlags = tuple[bool | None, bool | None]


def static_flags(basis: SubspaceBasis) -> StaticFlags:
    """``(left, right)`` complement flags known before tracing: True/False where every
    stacked matrix stores the same kind of basis on that side, None where they differ or
    the basis is traced. Lets :func:`project_complement` drop the per-slice select, so
    ``k = 0`` compiles to exactly the unprojected computation."""

    def uniform(flags: jax.Array) -> bool | None:
        try:
            values = np.asarray(flags)
        except jax.errors.TracerArrayConversionError:
            return None
        if values.size and values.all():
            return True
        return False if not values.any() else None

    return uniform(basis.left_complement), uniform(basis.right_complement)


def _select(complement: jax.Array, static: bool | None, if_complement, if_high):
    if static is True:
        return if_complement()
    if static is False:
        return if_high()
    return jnp.where(complement[..., None, None], if_complement(), if_high())


def _high_part(x: jax.Array, side: Side, axis: int, static: bool | None) -> jax.Array:
    """The part of ``x`` in the high subspace of one side (``axis`` -2 rows, -1 cols)."""
    if side.basis.shape[-1] == 0:
        return _select(side.complement, static, lambda: x, lambda: jnp.zeros_like(x))
    y = _project_rows(x, side.basis) if axis == -2 else _project_cols(x, side.basis)
    return _select(side.complement, static, lambda: x - y, lambda: y)


def _low_part(x: jax.Array, side: Side, axis: int, static: bool | None) -> jax.Array:
    """``x`` minus its high part on one side: ``(I - U_h U_h^T) x`` or ``x (I - V_h^T V_h)``."""
    if side.basis.shape[-1] == 0:
        return _select(side.complement, static, lambda: jnp.zeros_like(x), lambda: x)
    y = _project_rows(x, side.basis) if axis == -2 else _project_cols(x, side.basis)
    return _select(side.complement, static, lambda: y, lambda: x - y)


def _two_sided_compressed(
    x: jax.Array, basis: SubspaceBasis, flags: tuple[bool, bool]
) -> jax.Array:
    """Two-sided projection with storage known per side: a side that stores the
    complement ``Q`` compresses ``x`` to ``Q^T x`` (or ``x Q``) first, the high-basis
    sides are removed from the smaller matrix (the two sides commute), and the result
    is expanded last. E.g. a square matrix at ``k = r/2`` costs ``2.5 r^3`` flops
    instead of ``4 r^3`` for two sequential ``(I - Q Q^T)`` products."""
    left_c, right_c = flags
    left, right = basis.left, basis.right
    y = x
    if left_c:
        y = jnp.matmul(jnp.swapaxes(left, -1, -2), y, precision=_HIGHEST)
    if right_c:
        y = jnp.matmul(y, right, precision=_HIGHEST)
    if not left_c and left.shape[-1]:
        y = y - _project_rows(y, left)
    if not right_c and right.shape[-1]:
        y = y - _project_cols(y, right)
    if right_c:
        y = jnp.matmul(y, jnp.swapaxes(right, -1, -2), precision=_HIGHEST)
    if left_c:
        y = jnp.matmul(left, y, precision=_HIGHEST)
    return y


def project_complement(
    x: jax.Array,
    basis: SubspaceBasis,
    mode: Literal["two_sided", "block"] = "two_sided",
    flags: StaticFlags = (None, None),
) -> jax.Array:
    """Remove the high subspace from ``x (..., R, C)`` (same shape as the basis' matrix).

    ``two_sided``: ``(I - U_h U_h^T) x (I - V_h^T V_h)``, so ``U_h^T P(x) = 0`` and
    ``P(x) V_h^T = 0``. ``block``: ``x - U_h U_h^T x V_h^T V_h`` (only the high x high
    block removed; the paper's formula). Computed in float32 (or the wider of ``x`` and
    the bases), returned in ``x.dtype``. ``flags``: :func:`static_flags` of ``basis``
    (computed here when the basis is concrete; pass it when calling under ``jit``).
    """
    if mode not in ("two_sided", "block"):
        raise ValueError(f"mode must be 'two_sided' or 'block', got {mode!r}")
    if flags == (None, None):
        flags = static_flags(basis)
    if basis.left.shape[-1] == basis.right.shape[-1] == 0 and flags == (False, False):
        return x  # k = 0: nothing frozen, and the compiled step is the unprojected one
    left = Side(basis.left, basis.left_complement)
    right = Side(basis.right, basis.right_complement)
    compute = jnp.promote_types(x.dtype, basis.left.dtype)
    x32 = x.astype(compute)
    if mode == "two_sided" and None not in flags:
        out = _two_sided_compressed(x32, basis, flags)
    elif mode == "two_sided":
        out = _low_part(_low_part(x32, left, -2, flags[0]), right, -1, flags[1])
    else:
        high = _high_part(_high_part(x32, left, -2, flags[0]), right, -1, flags[1])
        out = x32 - high
    return out.astype(x.dtype)


def high_columns(side: Side) -> list[np.ndarray]:
    """Dense high-subspace columns of one side, one ``(D, k)`` array per stacked matrix.

    For inspection and tests (host NumPy, small matrices): a complement side is turned
    back into the high basis through a full SVD of the ``D x D`` complement projector.
    """
    basis = np.asarray(side.basis, np.float64)
    flags = np.asarray(side.complement)
    stack = basis.shape[:-2]
    out = []
    for idx in np.ndindex(*stack):
        q = basis[idx]
        q = q[:, np.linalg.norm(q, axis=0) > 0.5]
        if flags[idx]:
            d = q.shape[0]
            u, s, _ = np.linalg.svd(np.eye(d) - q @ q.T)
            q = u[:, s > 0.5]
        out.append(q)
    return out


# --------------------------------------------------------------------------- shared spaces
# A space of earlier tasks' directions grown by GPM's energy rule (Saha et al. 2021),
# kept as a zero-padded basis of fixed capacity so that its shape never changes: GORP's
# shared gradient space; the same rule serves input-subspace methods.


def remove_basis(x: jax.Array, basis: jax.Array) -> jax.Array:
    """``x - S (S^T x)`` for x (..., d, c) and S (..., d, k), without forming S S^T."""
    # Full float32 precision: accelerators' default matmul precision would leave an
    # O(1e-3) component in S, defeating the exact orthogonality this exists for.
    coeff = jnp.einsum("...dk,...dc->...kc", basis, x, precision=jax.lax.Precision.HIGHEST)
    return x - jnp.einsum("...dk,...kc->...dc", basis, coeff, precision=jax.lax.Precision.HIGHEST)


def grow_basis(
    moment: jax.Array, basis: jax.Array, used: jax.Array, threshold: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Grow one matrix's shared space from its first moment (GPM's energy rule).

    moment: (d, c) float32; basis: (d, capacity), columns ``[used, capacity)`` zero;
    used: () int32; threshold: eps in (0, 1].

    First task (``used == 0``): add the first k left singular vectors of ``M``, k the
    number of i whose cumulative energy ``sum_{j<=i} s_j^2 / |M|^2`` is below eps.
    Later tasks: ``M' = M - S S^T M``, ``acc = (|M|^2 - |M'|^2) / |M|^2``; add left
    singular vectors of ``M'`` one by one while ``acc < eps``, each adding
    ``s_i^2 / |M|^2``. The total is capped at ``capacity``. Returns (basis, used).
    """
    capacity = basis.shape[-1]
    total = jnp.sum(jnp.square(moment))
    residual = remove_basis(moment, basis)
    u, s, _ = jnp.linalg.svd(residual, full_matrices=False)
    safe_total = jnp.where(total > 0, total, 1.0)
    ratio = jnp.square(s) / safe_total
    first_k = jnp.sum(jnp.cumsum(ratio) < threshold)
    accumulated = (total - jnp.sum(jnp.square(residual))) / safe_total
    before_each = accumulated + jnp.cumsum(ratio) - ratio  # acc before adding vector i
    expand_k = jnp.sum(before_each < threshold)
    k = jnp.where(used == 0, first_k, expand_k)
    k = jnp.where(total > 0, k, 0)
    k = jnp.minimum(k, capacity - used).astype(jnp.int32)
    source = jnp.arange(capacity) - used  # column j of S takes vector j - used of M'
    take = (source >= 0) & (source < k)
    picked = jnp.take(u, jnp.clip(source, 0, u.shape[-1] - 1), axis=-1)
    return jnp.where(take[None, :], picked, basis), used + k
