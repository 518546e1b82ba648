"""The vocabulary of Hugging Face name maps: how one HF tensor (or one per layer) maps to
one cljax parameter. Each model module writes its own map (``llama.hf_name_map``,
``t5.hf_name_map``); ``cljax.models.convert`` applies them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

LAYER = "{layer}"


@dataclasses.dataclass(frozen=True)
class Transform:
    """An invertible per-tensor transform between the HF layout and the cljax layout.

    Both functions act on one (per-layer) tensor; they must also work on zero-stride
    views (``np.broadcast_to``), which is how expected shapes are computed.
    """

    to_cljax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


# PyTorch nn.Linear stores weight (out, in); cljax kernels are (in, out).
TRANSFORMS: dict[str, Transform] = {
    "identity": Transform(to_cljax=lambda a: a, to_hf=lambda a: a),
    "transpose": Transform(
        to_cljax=lambda a: np.swapaxes(a, -1, -2), to_hf=lambda a: np.swapaxes(a, -1, -2)
    ),
}


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor (or one per layer) <-> one cljax parameter.

    hf_name: HF tensor name; contains ``{layer}`` iff ``num_layers`` is set.
    path: cljax state path (``cljax.paths``), e.g. ``"layers/attn/q_proj/kernel"``.
    transform: a key of ``TRANSFORMS``, applied per layer.
    num_layers: L for a parameter stacked over layers: HF tensors for layers 0..L-1
        become the slices ``param[0] .. param[L-1]``.
    """

    hf_name: str
    path: str
    transform: str = "identity"
    num_layers: int | None = None

    def __post_init__(self) -> None:
        if self.transform not in TRANSFORMS:
            raise ValueError(
                f"rule for {self.hf_name!r}: unknown transform {self.transform!r}; "
                f"valid: {sorted(TRANSFORMS)}"
            )
        if (LAYER in self.hf_name) != (self.num_layers is not None):
            raise ValueError(
                f"rule for {self.hf_name!r}: a {LAYER} placeholder goes with num_layers "
                f"(got {self.num_layers})"
            )

    def hf_names(self) -> list[str]:
        """The concrete HF tensor names, one per layer for a stacked rule."""
        if self.num_layers is None:
            return [self.hf_name]
        return [self.hf_name.format(layer=i) for i in range(self.num_layers)]
