"""Parameter paths and targets: one format and one matcher for all of cljax.

A parameter's (or module's) path is its pytree key path joined by ``/``, e.g.
``layers/attn/q_proj/kernel``; the trailing ``.value`` of an ``nnx.Variable`` is dropped,
so a plain dict of arrays and an ``nnx.State`` of the same model give the same paths.

Targets choose parameters (OSF's frozen matrices, GaLore / GORP's projected ones, the
trainable set of a method) or modules (LoRA's wrapped layers) in the ways optax masks do:

- a regex or a sequence of regexes, each ``re.search``-ed against every path and required
  to match at least one (a typo fails instead of silently selecting nothing);
- a callable ``(path, leaf) -> bool``;
- a pytree of bools with the parameters' structure.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

#: regexes, a predicate ``(path, leaf) -> bool`` or a pytree of bools (module docstring)
Targets = str | Sequence[str] | Callable[[str, Any], bool] | Any


def path_to_str(path: Sequence[Any]) -> str:
    """The ``/``-joined name of a pytree key path (or of a tuple of plain keys, such as
    an ``nnx`` filter's path), e.g. ``layers/attn/q_proj/kernel``."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    if len(path) > 1 and parts[-1] in ("value", "raw_value"):
        parts.pop()
    return "/".join(parts)


def named_leaves(tree: Any) -> dict[str, Any]:
    """``{path: leaf}`` for every leaf of ``tree`` (see :func:`path_to_str`)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_to_str(path): leaf for path, leaf in flat}


def is_patterns(targets: Any) -> bool:
    """A regex or a sequence of regexes (rather than a predicate or a mask)."""
    return isinstance(targets, str) or (
        isinstance(targets, Sequence) and all(isinstance(t, str) for t in targets)
    )


def match_paths(
    paths: Sequence[str],
    patterns: str | Sequence[str],
    *,
    what: str = "target",
    kind: str = "parameter",
) -> list[bool]:
    """Which ``paths`` one of ``patterns`` matches; a pattern matching none is an error
    naming it and listing the paths (``what``: the kind of target; ``kind``: of path)."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    if not patterns:
        raise ValueError(f"empty {what} pattern list")
    hits = [[re.search(pattern, path) is not None for path in paths] for pattern in patterns]
    for pattern, hit in zip(patterns, hits, strict=True):
        if not any(hit):
            shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
            raise ValueError(f"{what} pattern {pattern!r} matches no {kind}; {kind} paths: {shown}")
    return [any(column) for column in zip(*hits, strict=True)]


def target_mask(tree: Any, targets: Targets, *, what: str = "target") -> list[bool]:
    """One bool per leaf of ``tree`` (flattening order): is it targeted by ``targets``?"""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_to_str(p) for p, _ in flat]
    if is_patterns(targets):
        return match_paths(paths, targets, what=what)
    if callable(targets):
        return [bool(targets(path, leaf)) for path, (_, leaf) in zip(paths, flat, strict=True)]
    mask, mask_def = jax.tree_util.tree_flatten(targets)
    if mask_def != treedef:
        raise ValueError(f"{what} mask structure {mask_def} differs from the tree's {treedef}")
    return [bool(m) for m in mask]


def param_filter(targets: str | Sequence[str], kind: type) -> Callable[[Any, Any], bool]:
    """An ``nnx`` filter: values of type ``kind`` whose path one of ``targets`` matches."""
    patterns = [targets] if isinstance(targets, str) else list(targets)
    return lambda path, value: (
        isinstance(value, kind)
        and any(re.search(pattern, path_to_str(path)) for pattern in patterns)
    )
