"""Comparing pytrees of arrays (gradients, parameters) in tests."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def assert_trees_close(actual: Any, expected: Any, rel: float = 1e-6) -> None:
    """Same structure, and every leaf within ``rel * max|expected leaf|`` elementwise."""
    pairs = zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    for a, b in pairs:
        b = np.asarray(b)
        np.testing.assert_allclose(np.asarray(a), b, atol=rel * np.abs(b).max(initial=0.0))
