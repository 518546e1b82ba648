"""The continual-learning methods as the loop runs them.

A method is a class registered in ``METHODS``. For each task ``t`` of the order the
loop calls, in this order:

- ``prepare(t, model, rngs)``: structural changes only (e.g. a new LoRA pair, PerTaskFT's
  reset to the base weights). Replayed for every earlier task when a run resumes, so
  the restored arrays find the same structure.
- ``begin_task(t, model, calibration)``: per-task computations from the current weights
  (OSF's SVD bases, the anchors of EWC / L2) kept in ``self.arrays`` or in the
  optimizer; ``calibration()`` yields the training batches that ``needs()`` asks for.
- ``optimizer(t, model, learning_rate)``: the optax transform and the NNX filter of the
  trained variables. Clipping and gradient accumulation are the loop's.
- ``penalty(model, arrays, batch)``: an extra loss term (O-LoRA, EWC, L2, LwF), pure,
  inside jit.
- ``end_task(t, model, opt_state, fisher)``: e.g. GORP grows its shared space, EWC
  accumulates its Fisher (``fisher()``, on the batches ``needs()`` asks for); returns
  the optimizer state carried to the next task (only for methods with
  ``carries_optimizer_state``).

What a method needs from the loop beyond the weights it declares in ``needs()``
(:class:`Needs`): the loop never reads a method's option names.
- ``train_split(t, splits)``: the training stream of task t (Replay mixes its buffer in).

Hyperparameter defaults follow docs/methods.md and protocol.md (T5-large runs); every
one can be overridden through ``method.options`` and unknown names are rejected.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cljax.cl.backbone import Family
from cljax.config import build_options, field
from cljax.data.batching import Batch, EncodedSplit, concatenate_splits
from cljax.errors import ConfigError, UnknownNameError
from cljax.models import lora
from cljax.models.layers import record_layers
from cljax.optim import gorp as gorp_lib
from cljax.optim import regularizers
from cljax.optim.galore import MOMENT_MODES, resolve_targets
from cljax.optim.osf import osf, osf_bases, select_targets
from cljax.optim.subspace import (
    grow_basis,
    mean_cosine,
    normalise_importance,
    ranks_from_importance,
    schedule_rank,
)
from cljax.paths import param_filter

Filter = Any
PyTree = Any
Calibration = Callable[[], Iterable[Batch]]


@dataclasses.dataclass(frozen=True)
class Needs:
    """What a method asks the loop for at task boundaries.

    Attributes:
      calibration: training batches handed to ``begin_task`` (0: none).
      calibration_task: whose batches: the ``"previous"`` task's (OSF's layer importance)
        or the ``"current"`` one's (an input subspace of the task about to be trained).
      fisher: training batches of the task just trained on which ``end_task``'s
        ``fisher()`` estimates the diagonal Fisher (0: none).
    """

    calibration: int = 0
    calibration_task: str = "previous"
    fisher: int = 0

    def __post_init__(self) -> None:
        if self.calibration_task not in ("previous", "current"):
            raise ValueError(
                f"Needs.calibration_task={self.calibration_task!r}: previous or current"
            )


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


@contextlib.contextmanager
def _option_error(key: str, method: str) -> Iterator[None]:
    """A method option the model cannot take (target patterns matching nothing) as a
    one-line config error naming ``method.options.<key>``."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise ConfigError(f"method.options.{key} ({method}): {err}") from err


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A method without options."""


class Method:
    """Base class: full fine-tuning with AdamW, no hooks (this is SeqFT)."""

    name: ClassVar[str] = ""
    #: what the method is and where it comes from (printed by ``cljax methods``)
    paper: ClassVar[str] = ""
    #: the frozen dataclass of the method's options: each field has a type, a default,
    #: its accepted values and a one-line doc (``config.field``); set by the user through
    #: ``method.options.NAME=VALUE``, listed by ``cljax config``.
    Options: ClassVar[type] = NoOptions
    #: one training phase on all tasks at once (MTL) instead of a sequence.
    joint: ClassVar[bool] = False
    #: earlier tasks keep their own model (PerTaskFT): their accuracy after task t is
    #: the accuracy they had after their own training.
    keeps_task_models: ClassVar[bool] = False
    #: the optimizer state survives task boundaries (GORP's shared space lives in it).
    carries_optimizer_state: ClassVar[bool] = False
    #: trains LoRA adapters (published settings give these the LoRA learning rate)
    uses_lora: ClassVar[bool] = False

    def __init__(self, options: dict[str, Any], family: Family, *, weight_decay: float, seed: int):
        self.opts = build_options(self.Options, options, "method.options", f"method {self.name!r}")
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
    def needs(self) -> Needs:
        """What this method asks the loop for (:class:`Needs`): nothing by default."""
        return Needs()

    def begin_task(self, t: int, model: nnx.Module, calibration: Calibration) -> None:
        """Per-task computations from the weights at the start of task t;
        ``calibration()`` yields the batches of ``needs().calibration`` (none for the
        previous task when t = 0)."""

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

    def penalty(
        self, model: nnx.Module, arrays: dict[str, PyTree], batch: Batch
    ) -> jax.Array | None:
        """Extra loss term on this batch (None: the method has none)."""
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


def get_method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise UnknownNameError(f"unknown method {name!r}; valid: {sorted(METHODS)}")
    return METHODS[name]


def get_method(
    name: str, options: dict[str, Any], family: Family, *, weight_decay: float, seed: int
) -> Method:
    return get_method_class(name)(options, family, weight_decay=weight_decay, seed=seed)


def _param_arrays(model: nnx.Module) -> PyTree:
    """A copy of the model's parameters as a pure pytree (anchors, base weights)."""
    return jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# --------------------------------------------------------------------------- full FT


@register
class SeqFT(Method):
    """Plain full fine-tuning through the sequence."""

    name = "seqft"
    paper = "sequential full fine-tuning, the lower bound: a baseline of every paper"


@register
class PerTaskFT(Method):
    """A fresh copy of the base model per task: the no-forgetting reference."""

    name = "pertaskft"
    paper = "one fine-tuned model per task, the no-forgetting reference"
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
    paper = "all tasks at once, the upper bound: Wang et al., EMNLP Findings 2023"
    joint = True

    def train_split(self, t: int, splits: Sequence[EncodedSplit]) -> EncodedSplit:
        return concatenate_splits(splits)


@dataclasses.dataclass(frozen=True)
class OSFOptions:
    rank_rule: str = field(
        "fraction",
        "how many directions are frozen: fraction (of min(m, n)), schedule (max(m, n) *"
        " schedule_step * t, the authors' run) or importance (the paper's adaptive rule)",
        choices=("fraction", "schedule", "importance"),
    )
    rank_fraction: float = field(
        0.5, "fraction of min(m, n) frozen by the fraction rule", minimum=0.0, maximum=1.0
    )
    schedule_step: float = field(
        0.07, "per-task increment of the schedule rule", minimum=0.0, maximum=1.0
    )
    mrr: float = field(
        0.1, "minimum retention ratio of the importance rule", minimum=0.0, maximum=1.0
    )
    trr: float = field(
        0.8, "target retention ratio of the importance rule", minimum=0.0, maximum=1.0
    )
    calibration_batches: int = field(
        8, "previous-task batches that measure layer importance", positive=True
    )
    mode: str = field(
        "two_sided", "projection: two_sided (U and V) or block", choices=("two_sided", "block")
    )
    untargeted: str = field(
        "train",
        "non-target parameters: train (plain AdamW) or freeze (no gradient, no state)",
        choices=("train", "freeze"),
    )
    targets: tuple[str, ...] | None = field(
        None, "parameter-path regexes of the projected matrices; None: the family's set"
    )


@register
class OSF(Method):
    """Orthogonal subspace fine-tuning: from task 2 on, the top-k singular directions of
    every targeted matrix are frozen (project -> AdamW -> project)."""

    name = "osf"
    paper = "OSF, top singular directions frozen: Nayak et al., arXiv 2504.07097"
    Options = OSFOptions

    def __init__(self, options, family, *, weight_decay, seed):
        super().__init__(options, family, weight_decay=weight_decay, seed=seed)
        #: the current task's frozen-subspace bases (None on the first task: plain AdamW)
        self.bases: dict[str, Any] | None = None
        self._ranks_used: dict[str, list] = {}
        self._resumed_ranks: dict[str, np.ndarray] | None = None
        self.targets = self.opts.targets or tuple(family.osf_targets)

    def _ranks(self, t: int) -> Any:
        if self.opts.rank_rule == "fraction":
            return self.opts.rank_fraction
        step = self.opts.schedule_step
        return lambda path, shape: schedule_rank(shape, step * t)

    def setup(self, model, rngs):
        # Fails here, before any training, when the targets match nothing.
        with _option_error("targets", self.name):
            select_targets(nnx.state(model, nnx.Param), self.targets)

    def needs(self) -> Needs:
        # the importance rule measures the layers on the previous task's batches
        importance = self.opts.rank_rule == "importance"
        return Needs(calibration=self.opts.calibration_batches if importance else 0)

    def begin_task(self, t: int, model: nnx.Module, calibration: Calibration) -> None:
        self.bases = None
        if t > 0:
            params = nnx.state(model, nnx.Param)
            if self._resumed_ranks is not None:
                # Resuming mid-task: the ranks were computed from the task's starting
                # weights, which the checkpoint no longer holds.
                ranks: Any = self._resumed_ranks
                self._resumed_ranks = None
            elif self.opts.rank_rule == "importance":
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
            mrr=self.opts.mrr,
            trr=self.opts.trr,
        )

    def transform_key(self, t):
        return "adamw" if t == 0 else None  # later tasks: per-task bases

    def trainable(self):
        if self.opts.untargeted == "train":
            return nnx.Param
        # Frozen untargeted parameters get no gradient at all (not a zeroed one).
        return param_filter(self.targets, nnx.Param)

    def optimizer(self, t, params, learning_rate):
        if self.bases is None:  # task 1: k = 0, plain AdamW
            return optax.adamw(learning_rate, weight_decay=self.weight_decay)
        return osf(
            learning_rate,
            self.bases,
            weight_decay=self.weight_decay,
            mode=self.opts.mode,
            untargeted=self.opts.untargeted,
        )


# --------------------------------------------------------------------------- regularized


@dataclasses.dataclass(frozen=True)
class L2Options:
    strength: float = field(1.0, "weight of the pull towards the previous weights", minimum=0.0)


@dataclasses.dataclass(frozen=True)
class EWCOptions:
    strength: float = field(100.0, "weight of the Fisher-weighted pull", minimum=0.0)
    fisher_batches: int = field(8, "training batches of each task's Fisher estimate", positive=True)


class _Anchored(Method):
    """Full fine-tuning with a pull towards the previous task's weights (``anchor``)."""

    Options = L2Options
    #: keep ``arrays["active"]``: 0 on the first task (no previous weights), 1 after
    gated: ClassVar[bool] = False

    def begin_task(self, t: int, model: nnx.Module, calibration: Calibration) -> None:
        if t > 0:
            self.arrays["anchor"] = _param_arrays(model)
        elif "anchor" not in self.arrays:
            # Same structure from the start, so a checkpoint restores into it.
            self.arrays["anchor"] = _param_arrays(model)
        if self.gated:
            self.arrays["active"] = jnp.asarray(float(t > 0))

    def _params(self, model: nnx.Module) -> PyTree:
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@register
class L2(_Anchored):
    """``strength * sum (theta - theta_{t-1})^2`` from task 2 on."""

    name = "l2"
    paper = "L2 pull to the previous task's weights: Wang et al., EMNLP Findings 2023"
    gated = True

    def penalty(self, model, arrays, batch):
        active = jnp.asarray(arrays["active"], jnp.float32)
        return (
            active
            * self.opts.strength
            * regularizers.l2_to_anchor(self._params(model), arrays["anchor"])
        )


@register
class EWC(_Anchored):
    """Elastic weight consolidation: ``strength * sum F (theta - theta*)^2`` with the
    diagonal Fisher summed over earlier tasks (squared per-batch gradients at task end)."""

    name = "ewc"
    paper = "elastic weight consolidation: Kirkpatrick et al., PNAS 2017"
    Options = EWCOptions

    def needs(self) -> Needs:
        return Needs(fisher=self.opts.fisher_batches)

    def setup(self, model, rngs):
        self.arrays["fisher"] = jax.tree.map(jnp.zeros_like, _param_arrays(model))

    def penalty(self, model, arrays, batch):
        return self.opts.strength * regularizers.ewc_penalty(
            self._params(model), arrays["anchor"], arrays["fisher"]
        )

    def end_task(self, t, model, opt_state, fisher):
        self.arrays["fisher"] = jax.tree.map(jnp.add, self.arrays["fisher"], fisher())
        return opt_state


# --------------------------------------------------------------------------- LoRA family


@dataclasses.dataclass(frozen=True)
class LwFOptions:
    weight: float = field(1.0, "weight of the distillation term", minimum=0.0)
    temperature: float = field(2.0, "softmax temperature of both distributions", positive=True)


@register
class LwF(_Anchored):
    """Learning without Forgetting for language models: from task 2 on, the model as it
    ended the previous task (its weights kept as the anchor, no optimizer state) scores
    each training batch, and ``weight * T^2 * KL(old || new)`` of the next-token
    distributions over the prompt and answer positions joins the loss."""

    name = "lwf"
    paper = "learning without forgetting: Li and Hoiem, ECCV 2016 / TPAMI 2017"
    Options = LwFOptions
    gated = True

    def penalty(self, model, arrays, batch):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        teacher_params = jax.tree.map(lambda x: x, params)  # a new State to fill in place
        nnx.replace_by_pure_dict(teacher_params, arrays["anchor"])
        teacher = nnx.merge(graphdef, teacher_params, rest)
        mask = (
            batch.attention_mask
            if batch.decoder_attention_mask is None
            else batch.decoder_attention_mask
        )
        kl = regularizers.distillation_kl(
            self.family.logits(teacher, batch),
            self.family.logits(model, batch),
            mask,
            self.opts.temperature,
        )
        return jnp.asarray(arrays["active"], jnp.float32) * self.opts.weight * kl


@dataclasses.dataclass(frozen=True)
class LoRAOptions:
    lora_rank: int = field(8, "rank r of each LoRA pair", positive=True)
    lora_alpha: float = field(32.0, "LoRA scaling numerator (scaling alpha / r)", minimum=0.0)
    lora_dropout: float = field(0.1, "dropout on the adapter input", minimum=0.0, below=1.0)
    lora_targets: tuple[str, ...] | None = field(
        None, "module-path regexes of the adapted layers; None: attention q and v"
    )


@dataclasses.dataclass(frozen=True)
class OLoRAOptions(LoRAOptions):
    lambda1: float = field(0.5, "weight of the orthogonality term |A_past^T A_t|", minimum=0.0)
    lambda2: float = field(0.0, "weight of the norm term |A_t| + |B_t|", minimum=0.0)
    squared: bool = field(
        False, "squared overlaps (the paper) instead of absolute values (the released code)"
    )


@dataclasses.dataclass(frozen=True)
class GORPOptions(LoRAOptions):
    rank: int = field(8, "GaLore rank of the projected full-weight gradients", positive=True)
    update_proj_gap: int = field(10, "steps between projector refreshes", positive=True)
    scale: float = field(1.0, "factor on the back-projected update", minimum=0.0)
    full_learning_rate: float = field(
        1e-5, "learning rate of the full-weight targets", minimum=0.0, maximum=1.0
    )
    threshold: float = field(
        0.9, "energy threshold for growing the shared space", positive=True, maximum=1.0
    )
    use_shared_space: bool = field(
        True, "remove the shared space from gradients (False: no shared space at all)"
    )
    reproject_update: bool = field(False, "also remove the shared space from Adam's output")
    lora_basis_side: str = field(
        "input",
        "where the shared space of LoRA A lives: input (d_in) or rank (the release)",
        choices=("input", "rank"),
    )
    moments_on_refresh: str = field(
        "keep", "low-rank Adam moments on a projector refresh", choices=MOMENT_MODES
    )
    max_tasks: int = field(
        16, "task ends the fixed-size shared space holds without truncation", positive=True
    )
    full_targets: tuple[str, ...] | None = field(
        None, "parameter-path regexes of the full-weight targets; None: the family's"
    )


class _LoRAMethod(Method):
    Options: ClassVar[type] = LoRAOptions
    uses_lora = True
    new_pair_per_task: ClassVar[bool] = True

    def setup(self, model, rngs):
        with _option_error("lora_targets", self.name):
            self._apply_lora(model, rngs)

    def _apply_lora(self, model, rngs):
        lora.apply_lora(
            model,
            self.opts.lora_targets or tuple(self.family.lora_targets),
            rank=self.opts.lora_rank,
            alpha=self.opts.lora_alpha,
            dropout=self.opts.lora_dropout,
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
    paper = "one LoRA pair through the sequence: Hu et al., ICLR 2022"
    new_pair_per_task = False


@register
class IncLoRA(_LoRAMethod):
    """A fresh LoRA pair per task; earlier pairs frozen, all summed in the forward."""

    name = "inclora"
    paper = "a new LoRA pair per task: Wang et al., EMNLP Findings 2023"


@register
class OLoRA(_LoRAMethod):
    """IncLoRA + ``lambda1 * sum_i |A_i A_t^T|`` (+ ``lambda2 * (|A_t| + |B_t|)``)."""

    name = "olora"
    paper = "O-LoRA, orthogonal LoRA pairs: Wang et al., EMNLP Findings 2023"
    Options = OLoRAOptions

    def penalty(self, model, arrays, batch):
        pairs = [(m.past_a[...], m.lora_a[...], m.lora_b[...]) for _, m in lora.lora_modules(model)]
        return regularizers.olora_penalty(
            pairs,
            lambda1=self.opts.lambda1,
            lambda2=self.opts.lambda2,
            squared=self.opts.squared,
        )


@dataclasses.dataclass(frozen=True)
class InfLoRAOptions(LoRAOptions):
    threshold: float = field(
        0.97,
        "energy of each task's adapter inputs that the stored input subspace keeps (GPM's rule)",
        minimum=0.0,
        maximum=1.0,
    )
    calibration_batches: int = field(
        8, "batches of the current task whose adapter inputs design A_t", positive=True
    )


def _stack_mask(path: str, masks: dict[str, Any], batch: Batch, shape: tuple) -> jax.Array:
    """The real-token mask (B, T) of an adapter input of ``shape`` (B, T, d): its layer
    stack's, else the batch's mask of that length (T5's cross-attention keys and values
    read the encoder's tokens)."""
    own = [m for stack, m in masks.items() if path.startswith(stack + "/")]
    others = [batch.attention_mask, batch.decoder_attention_mask]
    for mask in [*own, *others]:
        if mask is not None and tuple(mask.shape) == tuple(shape[:-1]):
            return jnp.asarray(mask, jnp.float32)
    raise ValueError(f"no token mask of shape {shape[:-1]} for the inputs of {path!r}")


@register
class InfLoRA(_LoRAMethod):
    """Interference-free LoRA: each task's ``A_t`` is fixed, not trained, to the top
    directions of that task's adapter inputs outside the subspace of earlier tasks'
    inputs, so inputs of earlier tasks never reach the new pair; only ``B_t`` trains.
    After each task its inputs grow the stored subspace by GPM's energy rule."""

    name = "inflora"
    paper = "InfLoRA, interference-free LoRA: Liang and Li, CVPR 2024"
    Options = InfLoRAOptions

    def needs(self) -> Needs:
        return Needs(calibration=self.opts.calibration_batches, calibration_task="current")

    def setup(self, model, rngs):
        super().setup(model, rngs)
        # per adapter: the stored input subspace (..., d_in, d_in), zero-padded, and the
        # number of its columns in use (...,)
        self.arrays["space"], self.arrays["used"] = {}, {}
        for path, m in lora.lora_modules(model):
            *stack, d_in, _ = m.lora_a.shape
            self.arrays["space"][path] = jnp.zeros((*stack, d_in, d_in), jnp.float32)
            self.arrays["used"][path] = jnp.zeros(tuple(stack), jnp.int32)
        self._covariances: dict[str, jax.Array] = {}

    def trainable(self):
        return param_filter(r"lora_b$", lora.LoRAParam)

    def _input_covariances(self, model: nnx.Module, batches: Iterable[Batch]) -> dict:
        """``{adapter path: sum of x x^T over the real tokens (calls, d_in, d_in)}``, one
        entry per call of a forward pass (the layers of a stack)."""
        sums: dict[str, jax.Array] = {}
        for batch in batches:
            with record_layers(), lora.record_inputs() as records:
                self.family.logits(model, batch)
            masks = self.family.layer_masks(batch)
            for path, calls in records.items():
                per_call = []
                for x in calls:
                    weight = _stack_mask(path, masks, batch, x.shape)[..., None]
                    xf = x.astype(jnp.float32) * weight
                    per_call.append(jnp.einsum("...td,...te->de", xf, xf))
                # one call per layer of the stack, in order: (layers, d_in, d_in)
                sums[path] = sums.get(path, 0) + jnp.stack(per_call)
        if not sums:
            raise ValueError("inflora: no calibration batch reached an adapter")
        return sums

    def begin_task(self, t, model, calibration):
        was_training = not any(m.deterministic for _, m in lora.lora_modules(model))
        model.eval()
        try:
            self._covariances = self._input_covariances(model, calibration())
        finally:
            if was_training:
                model.train()
        for path, m in lora.lora_modules(model):
            cov = self._covariances[path].reshape(m.lora_a.shape[:-2] + (m.lora_a.shape[-2],) * 2)
            space = self.arrays["space"][path]
            outside = jnp.eye(cov.shape[-1]) - space @ jnp.swapaxes(space, -1, -2)
            projected = outside @ cov @ outside
            _, vectors = jnp.linalg.eigh(projected)  # ascending eigenvalues
            top = vectors[..., ::-1][..., : m.rank]
            # exactly outside the stored subspace, whatever eigh did with zero eigenvalues
            a = outside @ top
            m.lora_a = lora.LoRAParam(
                a.astype(m.lora_a.dtype), out_sharding=m._a_axes, eager_sharding=False
            )

    def end_task(self, t, model, opt_state, fisher):
        for path, cov in self._covariances.items():
            space = self.arrays["space"][path]
            cov = cov.reshape(space.shape)
            values, vectors = jnp.linalg.eigh(cov)
            # a (d, d) matrix with cov's left singular vectors and singular values sqrt(eig)
            moment = vectors * jnp.sqrt(jnp.maximum(values, 0.0))[..., None, :]
            grow = jax.vmap(grow_basis, in_axes=(0, 0, 0, None))
            flat = grow(
                moment.reshape(-1, *moment.shape[-2:]),
                space.reshape(-1, *space.shape[-2:]),
                self.arrays["used"][path].reshape(-1),
                jnp.float32(self.opts.threshold),
            )
            self.arrays["space"][path] = flat[0].reshape(space.shape)
            self.arrays["used"][path] = flat[1].reshape(self.arrays["used"][path].shape)
        return opt_state


@register
class GORP(_LoRAMethod):
    """LoRA pairs (one per task) and low-rank-projected full weights, both kept
    orthogonal to a shared space of earlier tasks' gradient directions."""

    name = "gorp"
    paper = "GORP, gradient low-rank projection: ACL 2025, arXiv 2507.02503"
    carries_optimizer_state = True
    Options = GORPOptions

    @property
    def full_targets(self) -> list[str]:
        return list(self.opts.full_targets or self.family.gorp_full_targets)

    def setup(self, model, rngs):
        super().setup(model, rngs)
        # Fails here, before any training, when the full-weight targets match nothing.
        with _option_error("full_targets", self.name):
            params = nnx.state(model, nnx.Param)
            resolve_targets(params, self.full_targets, what="GORP full target")

    def trainable(self):
        return lora.trainable_filter(param_filter(self.full_targets, nnx.Param))

    def optimizer(self, t, params, learning_rate):
        return gorp_lib.gorp(
            learning_rate,
            self.opts.rank,
            self.opts.update_proj_gap,
            self.opts.scale,
            full_targets=self.full_targets,
            lora_a_targets=[r"lora_a$"],
            full_learning_rate=self.opts.full_learning_rate,
            weight_decay=self.weight_decay,
            eps=1e-6,
            moments_on_refresh=self.opts.moments_on_refresh,
            use_shared_space=self.opts.use_shared_space,
            reproject_update=self.opts.reproject_update,
            lora_basis_side=self.opts.lora_basis_side,
            max_tasks=self.opts.max_tasks,
        )

    def end_task(self, t, model, opt_state, fisher):
        return gorp_lib.end_task(opt_state, self.opts.threshold)


# --------------------------------------------------------------------------- replay


@dataclasses.dataclass(frozen=True)
class ReplayOptions:
    buffer_per_task: int = field(64, "examples kept from each finished task", minimum=0)
    mix_ratio: float = field(0.2, "replayed examples per example of the current task", minimum=0.0)


@register
class Replay(Method):
    """Full fine-tuning with a seeded per-task sample buffer mixed into later tasks.

    After each task, ``buffer_per_task`` of its training examples are kept (uniformly
    at random, seeded: a reservoir over the task's stream). Task t trains on its own
    examples plus ``mix_ratio * len(task t)`` examples drawn from the buffer."""

    name = "replay"
    paper = "replay of a per-task sample buffer: de Masson d'Autume et al., NeurIPS 2019"
    Options = ReplayOptions

    def train_split(self, t, splits):
        if t == 0:
            return splits[0]
        rng = np.random.default_rng([self.seed, t, 7])
        buffers = []
        for i in range(t):
            keep = np.random.default_rng([self.seed, i, 11]).permutation(len(splits[i]))
            buffers.append(_subset(splits[i], keep[: self.opts.buffer_per_task]))
        pool = concatenate_splits(buffers)
        n_mix = min(len(pool), int(round(self.opts.mix_ratio * len(splits[t]))))
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
