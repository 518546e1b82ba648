"""Device mesh and the mapping of logical axes (parameters and activations) onto it.

Models annotate every parameter with logical axis names (``cljax.models.layers.param``)
and constrain their hidden states with logical names too (``constrain``); this module
turns those names into ``NamedSharding``s over a mesh with axes
``("data", "fsdp", "tensor")`` through one table of rules, in the spirit of t5x's
``standard_logical_axis_rules``. A dimension whose size the mesh axes do not divide is
replicated rather than padded, so tiny test models shard on any device count.

Arrays that live across steps but are not parameters (optimizer moments, OSF bases,
GORP projectors, EWC anchors) take their shardings from the parameter they belong to
(``derived_shardings``), so every piece of state is born sharded like its parameter.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it may be split over, in order of preference.
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]
DEFAULT_RULES: LogicalRules = (
    # parameters: FSDP over the model width, Megatron-style tensor parallelism over
    # heads / MLP / vocabulary
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
    # activations: the batch over every data-parallel axis (FSDP gathers weights, never
    # tokens), the residual stream whole on each tensor shard, heads / MLP split
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)
LOGICAL_AXES = frozenset(name for name, _ in DEFAULT_RULES)


def validate_rules(rules: LogicalRules) -> LogicalRules:
    """Check a rules table: every logical name known, every mesh axis one of
    ``MESH_AXES``; returns it as a tuple of pairs. Errors name the entry at fault."""
    out = []
    for entry in rules:
        if not (isinstance(entry, Sequence) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"sharding rule {entry!r} is not a (logical axis, mesh axes) pair")
        name, target = entry
        if name not in LOGICAL_AXES:
            raise ValueError(
                f"sharding rule names unknown logical axis {name!r}; valid: {sorted(LOGICAL_AXES)}"
            )
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        bad = [t for t in targets if t not in MESH_AXES]
        if bad:
            raise ValueError(
                f"sharding rule for {name!r} names unknown mesh axis {bad};"
                f" valid: {list(MESH_AXES)}"
            )
        out.append((name, target if isinstance(target, str) or target is None else targets))
    return tuple(out)


def rules_with(overrides: Mapping[str, Any] | None) -> LogicalRules:
    """``DEFAULT_RULES`` with some logical axes mapped elsewhere, e.g.
    ``{"embed": None, "mlp": ["fsdp", "tensor"]}`` (the ``run.rules`` config field)."""
    return validate_rules(tuple({**dict(DEFAULT_RULES), **dict(overrides or {})}.items()))


def make_mesh(
    shape: Mapping[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A mesh over ``devices`` (default: all). ``shape`` gives sizes for some of
    ``data``/``fsdp``/``tensor``; one size may be -1 and ``data`` takes the rest by default
    (pure data parallelism). Fully specified sizes may use fewer devices than there
    are (the first ones), e.g. ``{"data": 1}`` for a single-device run."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": -1, "fsdp": 1, "tensor": 1, **(shape or {})}
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid: {list(MESH_AXES)}")
    free = [a for a in MESH_AXES if sizes[a] == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {sizes}")
    known = int(np.prod([sizes[a] for a in MESH_AXES if sizes[a] != -1]))
    if free:
        if len(devices) % known:
            raise ValueError(f"mesh {sizes} does not divide {len(devices)} devices")
        sizes[free[0]] = len(devices) // known
    elif known > len(devices):
        raise ValueError(f"mesh {sizes} needs {known} devices, have {len(devices)}")
    resolved = tuple(sizes[a] for a in MESH_AXES)
    used = devices[: int(np.prod(resolved))]
    return Mesh(np.array(used).reshape(resolved), MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: LogicalRules = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array of ``shape`` whose dimensions have logical ``axes``.

    Each mesh axis is used at most once per array; a dimension not divisible by the
    mesh axes' total size is replicated.
    """
    table = dict(rules)
    sizes = dict(mesh.shape)
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, size in zip(axes, shape, strict=True):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and sizes.get(a, 1) > 1)
        total = math.prod(sizes[a] for a in mesh_axes)
        if not mesh_axes or size % total:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*spec)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(state: nnx.State, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Any:
    """A tree like ``state`` whose leaves are ``NamedSharding``s from the variables'
    logical axes (variables without axis names are replicated)."""

    from cljax.models.layers import logical_axes  # the models import this module

    def sharding(variable: nnx.Variable) -> nnx.Variable:
        value = variable.get_value()  # also a ShapeDtypeStruct (abstract state)
        axes = logical_axes(variable) or (None,) * np.ndim(value)
        spec = logical_to_spec(axes, np.shape(value), mesh, rules)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding, state, is_leaf=_is_variable)


def shard_module(module: nnx.Module, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> None:
    """Place every variable of ``module`` on ``mesh`` according to its logical axes."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))


def create_sharded(
    factory: Any, rngs: nnx.Rngs, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
) -> nnx.Module:
    """``factory(rngs)`` (a module built from ``rngs``) with every variable born in its
    sharding: the initialisers run in one jitted call whose outputs are the variables'
    shardings, so no device ever holds the whole model (a random 7B init on device 0
    alone would not fit a 16 GiB chip). ``rngs`` advance exactly as in an eager build."""
    rng_graphdef, rng_state = nnx.split(rngs)
    abstract = nnx.eval_shape(lambda: factory(nnx.merge(rng_graphdef, rng_state, copy=True)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)

    def init(rng_state):
        fresh = nnx.merge(rng_graphdef, rng_state, copy=True)
        return nnx.split(factory(fresh))[1], nnx.state(fresh)

    state, new_rng_state = jax.jit(init, out_shardings=(shardings, None))(rng_state)
    nnx.update(rngs, new_rng_state)
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh, ndim: int = 2, rules: LogicalRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a (batch, ...) input array: the batch split like ``activation_batch``
    (by default over ``data`` x ``fsdp``), so inputs and hidden states agree."""
    target = dict(rules).get("activation_batch")
    axes = tuple(a for a in _axes_of(target) if mesh.shape[a] > 1) or None
    return NamedSharding(mesh, PartitionSpec(axes, *(None,) * (ndim - 1)))


def host_to_global(x: Any, sharding: NamedSharding) -> jax.Array:
    """A host array that every process holds whole, as a global array: each process
    places only its own devices' pieces (``device_put`` needs every device addressable)."""
    x = np.asarray(x)
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a (possibly multi-host) array on this host."""
    if getattr(x, "is_fully_addressable", True) or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def data_parallel_size(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> int:
    """How many ways a batch is split (the mesh axes of ``activation_batch``)."""
    spec = batch_sharding(mesh, 1, rules).spec[0]
    return math.prod(mesh.shape[a] for a in _axes_of(spec))


# --------------------------------------------------------------------------- activations

_RULES: contextvars.ContextVar[LogicalRules | None] = contextvars.ContextVar(
    "cljax_sharding_rules", default=None
)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[Mesh]:
    """Make ``mesh`` and ``rules`` current: functions traced inside constrain their
    activations (``constrain``) and spread their SVDs (``cljax.optim.subspace``) over
    it. Trace (first call of a jitted function) inside the context."""
    token = _RULES.set(validate_rules(rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _RULES.reset(token)


def current_mesh() -> Any:
    """The mesh of the enclosing ``use_mesh`` (or ``jax.set_mesh``; abstract inside
    ``jit``), or None when there is none or it has a single device. Read from JAX's own
    context, which is part of every jitted function's cache key, so a function traced
    with and without a mesh never reuses the other's compilation."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or math.prod(dict(mesh.shape).values()) == 1:
        return None
    return mesh


def current_rules() -> LogicalRules:
    """The rules of the enclosing ``use_mesh`` (``DEFAULT_RULES`` under a plain
    ``jax.set_mesh``)."""
    return _RULES.get() or DEFAULT_RULES


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` of an activation ``x`` by logical ``axes`` (one per
    dimension) through the current rules; identity outside ``use_mesh``. Without these
    constraints XLA is free to keep the whole global batch on every device."""
    mesh = current_mesh()
    if mesh is None:
        return x
    spec = logical_to_spec(tuple(axes), x.shape, mesh, current_rules())
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


# --------------------------------------------------------------------------- derived state


def _path_str(path: Sequence[Any]) -> str:
    from cljax.paths import path_to_str

    return path_to_str(path)


def _spec_entries(spec: PartitionSpec, ndim: int) -> list[Any]:
    entries = list(spec) + [None] * (ndim - len(spec))
    return entries[:ndim]


def _axes_of(entry: Any) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def fill_spec(entries: list[Any], shape: Sequence[int], mesh: Any) -> PartitionSpec:
    """Split the largest still-unsplit dimension of ``shape`` over every mesh axis that
    ``entries`` leave unused (fsdp first), where the size divides: state that is not a
    parameter (bases, projectors) is then spread over all devices instead of
    replicated along them."""
    sizes = dict(mesh.shape)
    entries = list(entries)
    used = {a for e in entries for a in _axes_of(e)}
    for axis in ("fsdp", "tensor", "data"):
        n = sizes.get(axis, 1)
        if n == 1 or axis in used:
            continue
        free = [i for i, e in enumerate(entries) if e is None and shape[i] % n == 0]
        if not free:
            continue
        i = max(free, key=lambda j: shape[j])
        entries[i] = axis
        used.add(axis)
    return PartitionSpec(*entries)


def derived_spec(
    shape: Sequence[int], param_shape: Sequence[int], param_spec: PartitionSpec, mesh: Any
) -> PartitionSpec:
    """Spec of an array that belongs to a parameter: the parameter's own spec when the
    shapes agree (Adam moments); otherwise leading stack dimensions keep the
    parameter's, and a later dimension equal to one of the matrix dimensions takes that
    dimension's mesh axes (an OSF basis ``(L, m, w)`` of a ``(L, m, n)`` kernel is split
    like ``m``); then ``fill_spec`` spreads the rest."""
    shape, param_shape = tuple(shape), tuple(param_shape)
    entries = _spec_entries(param_spec, len(param_shape))
    if shape == param_shape:
        return PartitionSpec(*entries)
    out: list[Any] = [None] * len(shape)
    used: set[str] = set()

    def take(i: int, entry: Any) -> None:
        axes = _axes_of(entry)
        if axes and not used & set(axes):
            out[i] = entry
            used.update(axes)

    stack = len(param_shape) - 2
    for i in range(min(stack, len(shape))):
        if shape[i] == param_shape[i]:
            take(i, entries[i])
    matrix = list(zip(param_shape[stack:], entries[stack:], strict=True)) if stack >= 0 else []
    for i in range(max(stack, 0), len(shape)):
        for size, entry in matrix:
            if shape[i] == size and out[i] is None:
                take(i, entry)
                break
    if len(shape) < 2:
        return PartitionSpec(*out)
    return fill_spec(out, shape, mesh)


def derived_shardings(tree: Any, params: Any, mesh: Mesh) -> Any:
    """``NamedSharding``s for every leaf of ``tree`` (arrays or ``ShapeDtypeStruct``s):
    a leaf whose path contains a parameter's path (``mu/layers/mlp/up_proj/kernel``,
    ``bases/layers/attn/q_proj/kernel/left``) follows that parameter's sharding
    (``derived_spec``); any other matrix is spread by ``fill_spec``; scalars and
    vectors are replicated.

    ``params``: a pytree of arrays / ``ShapeDtypeStruct``s carrying ``NamedSharding``s
    (e.g. the sharded model's parameter state).
    """
    known: dict[str, tuple[tuple[int, ...], PartitionSpec]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        sharding = getattr(leaf, "sharding", None)
        spec = sharding.spec if isinstance(sharding, NamedSharding) else PartitionSpec()
        known[_path_str(path)] = (tuple(np.shape(leaf)), spec)
    # longest first, so "layers/attn/q_proj/base/kernel" wins over a shorter suffix
    names = sorted(known, key=len, reverse=True)

    def sharding(path: Sequence[Any], leaf: Any) -> NamedSharding:
        shape = tuple(np.shape(leaf))
        name = "/" + _path_str(path) + "/"
        owner = next((p for p in names if "/" + p + "/" in name), None)
        if owner is not None:
            param_shape, spec = known[owner]
            return NamedSharding(mesh, derived_spec(shape, param_shape, spec, mesh))
        if len(shape) < 2:
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, fill_spec([None] * len(shape), shape, mesh))

    return jax.tree_util.tree_map_with_path(sharding, tree)


# --------------------------------------------------------------------------- batched work


def map_over_devices(fn: Any, x: jax.Array) -> Any:
    """``fn`` of a stack of matrices ``x (..., m, n)`` with the stack spread over every
    device of the current mesh (``use_mesh``): the stack is flattened, padded with zero
    matrices to a multiple of the device count and split along it, so each device runs
    ``fn`` on its own slice (an SVD of a 7B model's 224 matrices then costs each of N
    devices 224 / N of them, instead of every device running all 224). ``fn`` maps
    ``(b, m, n)`` to arrays (or a tuple) with leading axis ``b``. Outside a mesh, or on
    a single device, ``fn(x)`` as is."""
    mesh = current_mesh()
    if mesh is None or x.ndim < 3:
        return fn(x)
    stack, matrix = x.shape[:-2], x.shape[-2:]
    count = math.prod(stack)
    axes = tuple(name for name, size in dict(mesh.shape).items() if size > 1)
    devices = math.prod(dict(mesh.shape)[a] for a in axes)
    flat = x.reshape(count, *matrix)
    pad = -count % devices
    if pad:
        flat = jax.numpy.concatenate([flat, jax.numpy.zeros((pad, *matrix), flat.dtype)])
    spec = PartitionSpec(axes)
    flat = jax.lax.with_sharding_constraint(flat, NamedSharding(mesh, spec))
    out = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec)(flat)
    return jax.tree.map(lambda y: y[:count].reshape(*stack, *y.shape[1:]), out)


def array_mesh(tree: Any) -> Mesh | None:
    """The multi-device mesh the arrays of ``tree`` are sharded over (the first found),
    or None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None
