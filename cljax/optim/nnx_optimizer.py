"""The optax state of an ``nnx.Optimizer`` for cljax's pure state functions.

The optimizers in :mod:`cljax.optim` are plain optax transformations: their task-end
functions (:func:`cljax.optim.gorp.end_task`) and inspectors
(:func:`cljax.optim.shared_space.shared_bases`) take and return optax state pytrees.
These two helpers bridge them to a Flax NNX optimizer, which holds that state in
variables::

    map_opt_state(optimizer, lambda s: end_task(s, 0.9))   # in place
    shared_bases(opt_state_of(optimizer))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx


def opt_state_of(optimizer: nnx.Optimizer) -> Any:
    """The optimizer's optax state as a plain pytree of arrays."""
    return nnx.as_pure(optimizer.opt_state)


def map_opt_state(optimizer: nnx.Optimizer, fn: Callable[[Any], Any]) -> nnx.Optimizer:
    """Replace the optimizer's optax state by ``fn(state)`` (same structure), in place;
    returns the optimizer."""
    new = fn(opt_state_of(optimizer))
    nnx.update(optimizer.opt_state, nnx.state(new, graph=optimizer.graph))
    return optimizer
