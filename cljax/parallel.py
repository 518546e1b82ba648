"""Device mesh and the mapping of logical parameter axes onto it.

Models annotate every parameter with logical axis names (``cljax.models.layers.param``);
this module turns those names into ``NamedSharding``s over a mesh with axes
``("data", "fsdp", "tensor")`` through a table of rules, in the spirit of t5x's
``standard_logical_axis_rules``. A dimension whose size the mesh axes do not divide is
replicated rather than padded, so tiny test models shard on any device count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cljax.models.layers import logical_axes

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes it may be split over, in order of preference.
LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]
DEFAULT_RULES: LogicalRules = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("mlp", "tensor"),
)


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
    used: set[str] = set()
    spec: list[str | tuple[str, ...] | None] = []
    for name, size in zip(axes, shape, strict=True):
        target = table.get(name) if name is not None else None
        mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
        mesh_axes = tuple(a for a in mesh_axes if a not in used and mesh.shape[a] > 1)
        total = int(np.prod([mesh.shape[a] for a in mesh_axes])) if mesh_axes else 1
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

    def sharding(variable: nnx.Variable) -> nnx.Variable:
        value = variable[...]
        axes = logical_axes(variable) or (None,) * np.ndim(value)
        spec = logical_to_spec(axes, np.shape(value), mesh, rules)
        return variable.replace(NamedSharding(mesh, spec))

    return jax.tree.map(sharding, state, is_leaf=_is_variable)


def shard_module(module: nnx.Module, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> None:
    """Place every variable of ``module`` on ``mesh`` according to its logical axes."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, state_shardings(state, mesh, rules)))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Sharding of a (batch, ...) input array: batch split over ``data`` x ``fsdp``."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *(None,) * (ndim - 1)))
