"""The continual-learning methods as the loop runs them.

A method is a class registered in ``METHODS``. For each task ``t`` of the order the
loop calls, in this order:

- ``prepare(t, model, rngs)``: structural changes only (e.g. a new LoRA pair, PerTaskFT's
  reset to the base weights). Replayed for every earlier task when a run resumes, so
  the restored arrays find the same structure.
- ``begin_task(t, model, calibration)``: per-task computations from the current weights
  (OSF's SVD bases, the anchors of EWC / L2) kept in ``self.arrays`` or in the
  optimizer; ``calibration()`` yields a few training batches of the previous task.
- ``optimizer(t, model, learning_rate)``: the optax transform and the NNX filter of the
  trained variables. Clipping and gradient accumulation are the loop's.
- ``penalty(model, arrays)``: an extra loss term (O-LoRA, EWC, L2), pure, inside jit.
- ``end_task(t, model, opt_state, fisher_batches)``: e.g. GORP grows its shared space,
  EWC accumulates its Fisher; returns the optimizer state carried to the next task
  (only for methods with ``carries_optimizer_state``).
- ``train_split(t, splits)``: the training stream of task t (Replay mixes its buffer in).

Hyperparameter defaults follow docs/methods.md and protocol.md (T5-large runs); every
one can be overridden through ``method.options`` and unknown names are rejected.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cljax.cl.backbone import Family
from cljax.data.batching import Batch, EncodedSplit, concatenate_splits
from cljax.models import lora
from cljax.models.layers import record_layers
from cljax.optim import gorp as gorp_lib
from cljax.optim import regularizers
from cljax.optim.galore import MOMENT_MODES, resolve_targets
from cljax.optim.osf import osf, osf_bases, select_targets
from cljax.optim.subspace import (
    mean_cosine,
    normalise_importance,
    ranks_from_importance,
    schedule_rank,
)

Filter = Any
PyTree = Any
Calibration = Callable[[], Iterable[Batch]]


def layer_importance(
    family: Family, model: nnx.Module, batches: Iterable[Batch]
) -> dict[str, np.ndarray]:
    """Per layer stack (its module path, e.g. ``layers`` or ``encoder/layers``), the
    mean over the batches' real tokens of ``cos(h_in, h_out)`` of each layer's input and
    output hidden states, shape (L,). Runs the model eagerly (layer by layer)."""
    names = {id(node): "/".join(map(str, path)) for path, node in nnx.iter_graph(model)}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    model.eval()
    try:
        for batch in batches:
            masks = family.layer_masks(batch)
            with record_layers() as records:
                family.logits(model, jax.tree.map(jnp.asarray, batch))
            for stacked, i, before, after in records:
                x, y = jax.tree.leaves(before), jax.tree.leaves(after)
                if not x or np.ndim(x[0]) != 3:
                    continue  # not a hidden-state carry (e.g. building a decode cache)
                name = names[id(stacked)]
                weights = np.asarray(masks[name], np.float64)  # (B, T): real tokens
                row_means = mean_cosine(x[0], y[0], f"layer {i} of {name}", weights)  # (B,)
                length = len(jax.tree.leaves(nnx.state(stacked))[0])
                sums.setdefault(name, np.zeros(length))[i] += float(
                    (row_means * weights.sum(-1)).sum()
                )
                counts.setdefault(name, np.zeros(length))[i] += float(weights.sum())
    finally:
        model.train()
    if not sums:
        raise ValueError("no calibration batch reached a layer stack")
    return {name: sums[name] / np.maximum(counts[name], 1.0) for name in sums}


def check_option(method: str, key: str, value: Any, default: Any, limit: Any) -> None:
    """A method option's value against the type of its default and its limit; the error
    names ``method.options.<key>`` (so ``2.0`` for an int, ``"false"`` for a bool or
    ``"abc"`` for a number fail at start-up, not after a task)."""
    where = f"method.options.{key}={value!r} ({method})"
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expects True or False")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: expects an integer")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{where}: expects a number")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"{where}: expects a string")
    elif default is None and value is not None:  # path-regex lists (targets)
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{where}: expects a list of regex strings")
    if limit is None:
        return
    if isinstance(limit, tuple) and len(limit) == 2 and not isinstance(limit[0], str):
        low, high = limit
        if not low <= value <= high:
            raise ValueError(f"{where}: must be in [{low}, {high}]")
    elif value not in limit:
        raise ValueError(f"{where}: valid: {', '.join(map(str, limit))}")


class Method:
    """Base class: full fine-tuning with AdamW, no hooks (this is SeqFT)."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    #: option -> (low, high) inclusive range of a number, or a tuple of allowed values
    limits: ClassVar[dict[str, Any]] = {}
    #: one training phase on all tasks at once (MTL) instead of a sequence.
    joint: ClassVar[bool] = False
    #: earlier tasks keep their own model (PerTaskFT): their accuracy after task t is
    #: the accuracy they had after their own training.
    keeps_task_models: ClassVar[bool] = False
    #: the optimizer state survives task boundaries (GORP's shared space lives in it).
    carries_optimizer_state: ClassVar[bool] = False

    def __init__(self, options: dict[str, Any], family: Family, *, weight_decay: float, seed: int):
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for method {self.name!r}; "
                f"valid: {sorted(self.defaults) or 'none'}"
            )
        for key, value in options.items():
            check_option(self.name, key, value, self.defaults[key], self.limits.get(key))
        self.hp = {**self.defaults, **options}
        self.family = family
        self.weight_decay = weight_decay
        self.seed = seed
        self.arrays: dict[str, PyTree] = {}

    # -- structure ---------------------------------------------------------------
    def setup(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
        """Once, before the first task (e.g. insert LoRA adapters)."""

    def prepare(self, t: int, model: nnx.Module, rngs: nnx.Rngs) -> None:
        """Structural changes at the start of task t."""

    # -- resumption ----------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """JSON facts that a resumed run cannot recompute (saved with checkpoints)."""
        return {}

    def restore_record(self, record: dict[str, Any]) -> None:
        """Take back what ``record`` saved, before the interrupted task's ``begin_task``."""

    # -- per task ----------------------------------------------------------------
    def begin_task(self, t: int, model: nnx.Module, calibration: Calibration) -> None:
        """Per-task computations from the weights at the start of task t;
        ``calibration()`` yields a few training batches of task t - 1 (t > 0)."""

    def trainable(self) -> Filter:
        return nnx.Param

    def optimizer(
        self, t: int, params: PyTree, learning_rate: optax.ScalarOrSchedule
    ) -> optax.GradientTransformation:
        """The transform for task t over ``params`` (the trainable state)."""
        return optax.adamw(learning_rate, weight_decay=self.weight_decay)

    def transform_key(self, t: int) -> Any:
        """A hashable that is equal for two tasks exactly when ``optimizer`` builds the
        same transform for both (the loop then reuses the compiled step); None: never
        reuse (the transform holds per-task data)."""
        return self.name

    def penalty(self, model: nnx.Module, arrays: dict[str, PyTree]) -> jax.Array | None:
        """Extra loss term (None: the method has none)."""
        return None

    def end_task(
        self, t: int, model: nnx.Module, opt_state: PyTree, fisher: Callable[[], PyTree]
    ) -> PyTree:
        """After training task t. ``fisher()`` computes the task's diagonal Fisher of the
        parameters (a pure dict like ``nnx.to_pure_dict``) on demand. Returns the
        optimizer state to carry (used when ``carries_optimizer_state``)."""
        return opt_state

    def train_split(self, t: int, splits: Sequence[EncodedSplit]) -> EncodedSplit:
        return splits[t]


METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    METHODS[cls.name] = cls
    return cls


def get_method(
    name: str, options: dict[str, Any], family: Family, *, weight_decay: float, seed: int
) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {sorted(METHODS)}")
    return METHODS[name](options, family, weight_decay=weight_decay, seed=seed)


def _param_arrays(model: nnx.Module) -> PyTree:
    """A copy of the model's parameters as a pure pytree (anchors, base weights)."""
    return jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# --------------------------------------------------------------------------- full FT


@register
class SeqFT(Method):
    """Plain full fine-tuning through the sequence."""

    name = "seqft"


@register
class PerTaskFT(Method):
    """A fresh copy of the base model per task: the no-forgetting reference."""

    name = "pertaskft"
    keeps_task_models = True

    def setup(self, model: nnx.Module, rngs: nnx.Rngs) -> None:
        self.arrays["base"] = _param_arrays(model)

    def prepare(self, t: int, model: nnx.Module, rngs: nnx.Rngs) -> None:
        if t > 0:
            nnx.update(model, jax.tree.map(jnp.copy, self.arrays["base"]))


@register
class MTL(Method):
    """All tasks trained jointly in one phase: the upper bound."""

    name = "mtl"
    joint = True

    def train_split(self, t: int, splits: Sequence[EncodedSplit]) -> EncodedSplit:
        return concatenate_splits(splits)


@register
class OSF(Method):
    """Orthogonal subspace fine-tuning: from task 2 on, the top-k singular directions of
    every targeted matrix are frozen (project -> AdamW -> project)."""

    name = "osf"
    defaults = {
        # "fraction": k = floor(rank_fraction * min(m, n)) (PEFT's effective_rank);
        # "schedule": k = floor(max(m, n) * schedule_step * t) (the authors' executed run);
        # "importance": the paper's adaptive rule, r = mrr + I * (trr - mrr) of min(m, n)
        # with I from calibration_batches batches of the previous task.
        "rank_rule": "fraction",
        "rank_fraction": 0.5,
        "schedule_step": 0.07,
        "mrr": 0.1,
        "trr": 0.8,
        "calibration_batches": 8,
        "mode": "two_sided",
        "untargeted": "train",
        "targets": None,  # parameter-path regexes; None: the family's (authors' set)
    }
    limits = {
        "rank_rule": ("fraction", "schedule", "importance"),
        "rank_fraction": (0.0, 1.0),
        "schedule_step": (0.0, 1.0),
        "mrr": (0.0, 1.0),
        "trr": (0.0, 1.0),
        "calibration_batches": (1, 1 << 20),
        "mode": ("two_sided", "block"),
        "untargeted": ("train", "freeze"),
    }

    def __init__(self, options, family, *, weight_decay, seed):
        super().__init__(options, family, weight_decay=weight_decay, seed=seed)
        if self.hp["untargeted"] not in ("train", "freeze"):
            raise ValueError(
                f"osf option untargeted={self.hp['untargeted']!r}; valid: train, freeze"
            )
        if self.hp["rank_rule"] not in ("fraction", "schedule", "importance"):
            raise ValueError(
                f"osf option rank_rule={self.hp['rank_rule']!r}; valid: fraction, schedule,"
                " importance"
            )
        #: the current task's frozen-subspace bases (None on the first task: plain AdamW)
        self.bases: dict[str, Any] | None = None
        self._ranks_used: dict[str, list] = {}
        self._resumed_ranks: dict[str, np.ndarray] | None = None
        self.targets = tuple(self.hp["targets"] or family.osf_targets)

    def _ranks(self, t: int) -> Any:
        if self.hp["rank_rule"] == "fraction":
            return float(self.hp["rank_fraction"])
        step = float(self.hp["schedule_step"])
        return lambda path, shape: schedule_rank(shape, step * t)

    def setup(self, model, rngs):
        # Fails here, before any training, when the targets match nothing.
        select_targets(nnx.state(model, nnx.Param), self.targets)

    def begin_task(self, t: int, model: nnx.Module, calibration: Calibration) -> None:
        self.bases = None
        if t > 0:
            params = nnx.state(model, nnx.Param)
            if self._resumed_ranks is not None:
                # Resuming mid-task: the ranks were computed from the task's starting
                # weights, which the checkpoint no longer holds.
                ranks: Any = self._resumed_ranks
                self._resumed_ranks = None
            elif self.hp["rank_rule"] == "importance":
                ranks = self._importance_ranks(model, params, calibration)
                self._ranks_used = {p: np.asarray(k).tolist() for p, k in ranks.items()}
            else:
                ranks = self._ranks(t)
            self.bases = osf_bases(params, ranks, targets=self.targets)

    def record(self) -> dict[str, Any]:
        return {"importance_ranks": self._ranks_used} if self._ranks_used else {}

    def restore_record(self, record: dict[str, Any]) -> None:
        saved = record.get("importance_ranks")
        if saved:
            self._resumed_ranks = {p: np.asarray(k, np.int64) for p, k in saved.items()}

    def _importance_ranks(
        self, model: nnx.Module, params: PyTree, calibration: Calibration
    ) -> dict[str, np.ndarray]:
        """The paper's adaptive rule: every targeted matrix of a transformer layer gets
        that layer's importance (mean cos of its input and output hidden states on the
        calibration batches, normalised by the mean over all layers)."""
        per_stack = layer_importance(self.family, model, calibration())
        matrices = select_targets(params, self.targets)
        raw = {}
        for path in matrices:
            stacks = [s for s in per_stack if path.startswith(s + "/")]
            if not stacks:
                raise ValueError(f"OSF importance: target {path!r} is not in a layer stack")
            raw[path] = per_stack[max(stacks, key=len)]
        return ranks_from_importance(
            normalise_importance(raw),
            {path: np.shape(x) for path, x in matrices.items()},
            mrr=float(self.hp["mrr"]),
            trr=float(self.hp["trr"]),
        )

    def transform_key(self, t):
        return "adamw" if t == 0 else None  # later tasks: per-task bases

    def trainable(self):
        if self.hp["untargeted"] == "train":
            return nnx.Param
        # Frozen untargeted parameters get no gradient at all (not a zeroed one).
        patterns = self.targets
        return lambda path, value: (
            isinstance(value, nnx.Param)
            and any(re.search(p, "/".join(map(str, path))) for p in patterns)
        )

    def optimizer(self, t, params, learning_rate):
        if self.bases is None:  # task 1: k = 0, plain AdamW
            return optax.adamw(learning_rate, weight_decay=self.weight_decay)
        return osf(
            learning_rate,
            self.bases,
            weight_decay=self.weight_decay,
            mode=self.hp["mode"],
            untargeted=self.hp["untargeted"],
        )


# --------------------------------------------------------------------------- regularized


class _Anchored(Method):
    """Full fine-tuning with a quadratic pull towards the previous task's weights."""

    defaults = {"strength": 1.0}
    limits = {"strength": (0.0, 1e12)}

    def begin_task(self, t: int, model: nnx.Module, calibration: Calibration) -> None:
        if t > 0:
            self.arrays["anchor"] = _param_arrays(model)
        elif "anchor" not in self.arrays:
            # Same structure from the start, so a checkpoint restores into it.
            self.arrays["anchor"] = _param_arrays(model)

    def _params(self, model: nnx.Module) -> PyTree:
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@register
class L2(_Anchored):
    """``strength * sum (theta - theta_{t-1})^2`` from task 2 on."""

    name = "l2"

    def penalty(self, model, arrays):
        active = jnp.asarray(arrays["active"], jnp.float32)
        return (
            active
            * self.hp["strength"]
            * regularizers.l2_to_anchor(self._params(model), arrays["anchor"])
        )

    def begin_task(self, t, model, calibration):
        super().begin_task(t, model, calibration)
        self.arrays["active"] = jnp.asarray(float(t > 0))


@register
class EWC(_Anchored):
    """Elastic weight consolidation: ``strength * sum F (theta - theta*)^2`` with the
    diagonal Fisher summed over earlier tasks (squared per-batch gradients at task end)."""

    name = "ewc"
    defaults = {"strength": 100.0, "fisher_batches": 8}
    limits = {"strength": (0.0, 1e12), "fisher_batches": (1, 1 << 20)}

    def setup(self, model, rngs):
        self.arrays["fisher"] = jax.tree.map(jnp.zeros_like, _param_arrays(model))

    def penalty(self, model, arrays):
        return self.hp["strength"] * regularizers.ewc_penalty(
            self._params(model), arrays["anchor"], arrays["fisher"]
        )

    def end_task(self, t, model, opt_state, fisher):
        self.arrays["fisher"] = jax.tree.map(jnp.add, self.arrays["fisher"], fisher())
        return opt_state


# --------------------------------------------------------------------------- LoRA family


class _LoRAMethod(Method):
    defaults = {
        "lora_rank": 8,
        "lora_alpha": 32.0,
        "lora_dropout": 0.1,
        "lora_targets": None,  # module-path regexes; None: the family's (q and v)
    }
    limits = {"lora_rank": (1, 1 << 16), "lora_alpha": (0.0, 1e9), "lora_dropout": (0.0, 1.0)}
    new_pair_per_task: ClassVar[bool] = True

    def setup(self, model, rngs):
        lora.apply_lora(
            model,
            tuple(self.hp["lora_targets"] or self.family.lora_targets),
            rank=int(self.hp["lora_rank"]),
            alpha=float(self.hp["lora_alpha"]),
            dropout=float(self.hp["lora_dropout"]),
            rngs=rngs,
        )

    def prepare(self, t, model, rngs):
        if t > 0 and self.new_pair_per_task:
            lora.new_task(model, rngs)

    def trainable(self):
        return lora.LoRAParam

    def optimizer(self, t, params, learning_rate):
        return optax.adamw(learning_rate, weight_decay=self.weight_decay)


@register
class SeqLoRA(_LoRAMethod):
    """One LoRA pair trained through all tasks."""

    name = "seqlora"
    new_pair_per_task = False


@register
class IncLoRA(_LoRAMethod):
    """A fresh LoRA pair per task; earlier pairs frozen, all summed in the forward."""

    name = "inclora"


@register
class OLoRA(_LoRAMethod):
    """IncLoRA + ``lambda1 * sum_i |A_i A_t^T|`` (+ ``lambda2 * (|A_t| + |B_t|)``)."""

    name = "olora"
    defaults = {**_LoRAMethod.defaults, "lambda1": 0.5, "lambda2": 0.0, "squared": False}
    limits = {**_LoRAMethod.limits, "lambda1": (0.0, 1e12), "lambda2": (0.0, 1e12)}

    def penalty(self, model, arrays):
        pairs = [(m.past_a[...], m.lora_a[...], m.lora_b[...]) for _, m in lora.lora_modules(model)]
        return regularizers.olora_penalty(
            pairs,
            lambda1=float(self.hp["lambda1"]),
            lambda2=float(self.hp["lambda2"]),
            squared=bool(self.hp["squared"]),
        )


@register
class GORP(_LoRAMethod):
    """LoRA pairs (one per task) and low-rank-projected full weights, both kept
    orthogonal to a shared space of earlier tasks' gradient directions."""

    name = "gorp"
    carries_optimizer_state = True
    defaults = {
        **_LoRAMethod.defaults,
        "rank": 8,
        "update_proj_gap": 10,
        "scale": 1.0,
        "full_learning_rate": 1e-5,
        "threshold": 0.9,
        "use_shared_space": True,
        "reproject_update": False,
        "lora_basis_side": "input",
        "moments_on_refresh": "keep",
        "max_tasks": 16,
        "full_targets": None,  # parameter-path regexes; None: the family's
    }
    limits = {
        **_LoRAMethod.limits,
        "rank": (1, 1 << 16),
        "update_proj_gap": (1, 1 << 30),
        "full_learning_rate": (0.0, 1.0),
        "threshold": (0.0, 1.0),
        "max_tasks": (1, 1 << 10),
        "lora_basis_side": ("input", "rank"),
        "moments_on_refresh": MOMENT_MODES,
    }

    @property
    def full_targets(self) -> list[str]:
        return list(self.hp["full_targets"] or self.family.gorp_full_targets)

    def setup(self, model, rngs):
        super().setup(model, rngs)
        # Fails here, before any training, when the full-weight targets match nothing.
        resolve_targets(nnx.state(model, nnx.Param), self.full_targets, what="GORP full target")

    def trainable(self):
        patterns = self.full_targets

        def is_full(path, value):
            name = "/".join(str(p) for p in path)
            return isinstance(value, nnx.Param) and any(re.search(p, name) for p in patterns)

        return lora.trainable_filter(is_full)

    def optimizer(self, t, params, learning_rate):
        return gorp_lib.gorp(
            learning_rate,
            int(self.hp["rank"]),
            int(self.hp["update_proj_gap"]),
            float(self.hp["scale"]),
            full_targets=self.full_targets,
            lora_a_targets=[r"lora_a$"],
            full_learning_rate=float(self.hp["full_learning_rate"]),
            weight_decay=self.weight_decay,
            eps=1e-6,
            moments_on_refresh=self.hp["moments_on_refresh"],
            use_shared_space=bool(self.hp["use_shared_space"]),
            reproject_update=bool(self.hp["reproject_update"]),
            lora_basis_side=self.hp["lora_basis_side"],
            max_tasks=int(self.hp["max_tasks"]),
        )

    def end_task(self, t, model, opt_state, fisher):
        return gorp_lib.end_task(opt_state, float(self.hp["threshold"]))


# --------------------------------------------------------------------------- replay


@register
class Replay(Method):
    """Full fine-tuning with a seeded per-task sample buffer mixed into later tasks.

    After each task, ``buffer_per_task`` of its training examples are kept (uniformly
    at random, seeded: a reservoir over the task's stream). Task t trains on its own
    examples plus ``mix_ratio * len(task t)`` examples drawn from the buffer."""

    name = "replay"
    defaults = {"buffer_per_task": 64, "mix_ratio": 0.2}
    limits = {"buffer_per_task": (0, 1 << 30), "mix_ratio": (0.0, 1e6)}

    def train_split(self, t, splits):
        if t == 0:
            return splits[0]
        rng = np.random.default_rng([self.seed, t, 7])
        buffers = []
        for i in range(t):
            keep = np.random.default_rng([self.seed, i, 11]).permutation(len(splits[i]))
            buffers.append(_subset(splits[i], keep[: int(self.hp["buffer_per_task"])]))
        pool = concatenate_splits(buffers)
        n_mix = min(len(pool), int(round(float(self.hp["mix_ratio"]) * len(splits[t]))))
        mixed = _subset(pool, rng.permutation(len(pool))[:n_mix])
        return concatenate_splits([splits[t], mixed])


def _subset(enc: EncodedSplit, rows: Sequence[int] | np.ndarray) -> EncodedSplit:
    rows = [int(r) for r in rows]
    return dataclasses.replace(
        enc,
        prompts=tuple(enc.prompts[r] for r in rows),
        answers=tuple(enc.answers[r] for r in rows),
        labels=tuple(enc.labels[r] for r in rows),
    )
