"""The continual loop: for each task of the order, ``prepare`` / ``begin_task``, train
(one jitted step with donated state, over a device mesh), ``end_task``, evaluate every
task (one row of the accuracy matrix), checkpoint.

Everything that can fail on bad input (data directory, tokenizer, method name, options
and targets, batch sizes vs devices) is checked before the first step. A run killed at
any moment and started again with the same command resumes from its last checkpoint and
ends with the same accuracy matrix: the data order is a function of (seed, task, epoch),
dropout keys of (seed, task, step), and the structure (LoRA pairs, ...) is rebuilt by
replaying ``prepare`` before the checkpointed arrays are restored into it.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cljax import distributed, parallel
from cljax.cl import report
from cljax.cl.backbone import Family, get_family
from cljax.cl.checkpoint import CorruptCheckpointError, RunCheckpointer
from cljax.cl.evaluate import TaskScore, evaluate_choices, evaluate_generate, evaluate_rank
from cljax.cl.general import GeneralSet, benchmark_general_set, load_general_set
from cljax.cl.methods import Method, get_method
from cljax.cl.rundir import (
    Progress,
    RunLock,
    StepLog,
    claim_run_dir,
    drop_log_after,
    sync,
)
from cljax.config import Config, check_file_task, resolve
from cljax.data import batching, sources
from cljax.data.batching import Batch, BatchConfig, EncodedSplit, TextTokenizer
from cljax.data.files import TextExample, file_task, plain_render
from cljax.data.synthetic import SyntheticConfig, synthetic_benchmark
from cljax.data.tasks import DATASETS, get_dataset, get_order
from cljax.data.trace import TRACE_ORDER, get_trace_task, trace_task
from cljax.errors import (
    CljaxError,
    ConfigError,
)
from cljax.models import lora
from cljax.optim.regularizers import fisher_diagonal, stack_batches

PyTree = Any


# --------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Benchmark:
    """The tasks of a run, tokenized once."""

    names: tuple[str, ...]
    train: tuple[EncodedSplit, ...]
    test: tuple[EncodedSplit, ...]
    tokenizer: TextTokenizer
    metadata: tuple[dict[str, Any], ...]
    skipped: tuple[dict[str, str], ...] = ()  # datasets left out (data.missing=skip)


def load_benchmark_data(cfg: Config) -> Benchmark:
    """Read (or generate) the tasks, load or train the tokenizer, tokenize every split."""
    data = cfg.data
    names = tuple(n.strip() for n in data.order.split(",") if n.strip())
    files = {name: check_file_task(name, entry) for name, entry in data.files.items()}
    skipped: list[dict[str, str]] = []
    # A tokenizer directory is loaded first: free-text prompts may render through its chat
    # template. The 'bpe' tokenizer is trained on the tasks, so after them.
    tokenizer = None if data.tokenizer == "bpe" else batching.load_tokenizer(data.tokenizer)

    def render(example: TextExample) -> str:
        if data.chat_template:
            return tokenizer.render_chat(example.context)
        return plain_render(example)

    if data.source == "synthetic":
        if files:
            raise ConfigError("data.files needs data.source=json, tfds or trace")
        defaults = SyntheticConfig()
        tasks = synthetic_benchmark(
            SyntheticConfig(
                seed=data.seed,
                kinds=names,
                train_per_class=data.train_per_class or defaults.train_per_class,
                test_per_class=data.test_per_class or defaults.test_per_class,
            )
        )
    elif data.source in ("json", "tfds", "trace"):
        source_cfg = sources.SourceConfig(
            source="json" if data.source == "trace" else data.source,
            data_dir=data.data_dir or None,
            tfds_data_dir=data.tfds_data_dir or None,
            train_per_class=data.train_per_class or None,
            test_per_class=data.test_per_class or None,
            seed=data.seed,
            holdout_fraction=data.holdout_fraction or None,
            validation_per_class=data.validation_per_class or None,
            invalid_labels=data.invalid_labels,
            empty_sentences=data.empty_sentences,
        )
        names = _expand_order(names, data.source)
        for name in names:  # every name checked before any file is read
            if name not in files:
                get_trace_task(name) if data.source == "trace" else get_dataset(name)
        if data.source == "json" and set(names) - set(files):
            sources.resolve_data_dir(source_cfg.data_dir)  # a missing root is no dataset to skip
        tasks = []
        for name in names:
            try:
                if name in files:
                    tasks.append(file_task(name, files[name], source_cfg, render))
                elif data.source == "trace":
                    tasks.append(trace_task(name, source_cfg, render))
                else:
                    tasks.append(sources.load_task(name, source_cfg))
            except FileNotFoundError as err:
                if data.missing != "skip":
                    raise
                skipped.append({"dataset": name, "reason": str(err)})
        if not tasks:
            raise FileNotFoundError(f"data.missing=skip left no dataset of {data.order!r}")
    else:
        raise ConfigError(f"data.source={data.source!r}; valid: synthetic, json, tfds, trace")
    if tokenizer is None:
        tokenizer = batching.task_tokenizer(tasks, vocab_size=data.tokenizer_vocab_size)

    def encode(task: sources.TaskData, examples: Sequence[sources.Example]) -> EncodedSplit:
        return batching.encode_split(
            task.spec,
            examples,
            tokenizer,
            max_source_tokens=data.max_source_length,
            max_target_tokens=data.max_target_length,
            truncation=data.truncation,
            add_task_name=data.task_prefix,
            add_dataset_name=data.task_prefix,
        )

    return Benchmark(
        names=tuple(t.spec.name for t in tasks),
        train=tuple(encode(t, t.train) for t in tasks),
        test=tuple(encode(t, t.test) for t in tasks),
        tokenizer=tokenizer,
        metadata=tuple(t.metadata for t in tasks),
        skipped=tuple(skipped),
    )


def load_general_sets(
    cfg: Config, tokenizer: TextTokenizer, order: Sequence[str]
) -> tuple[GeneralSet, ...]:
    """The ``eval.general`` sets: files, or benchmark datasets named by their name (none
    of ``order``, the run's tasks: a general set is held out from training)."""
    data = cfg.data
    limits = {
        "max_source_tokens": data.max_source_length,
        "max_target_tokens": data.max_target_length,
    }
    sets = []
    for entry in cfg.eval.general:
        if Path(entry).is_file():
            sets.append(load_general_set(entry, tokenizer, **limits))
            continue
        if entry not in DATASETS:
            raise ConfigError(
                f"eval.general: {entry!r} is neither a file nor a benchmark dataset"
                f" ({', '.join(DATASETS)})"
            )
        if entry in order:
            raise ConfigError(
                f"eval.general: {entry!r} is a task of data.order, trained on: not a held-out"
                " general ability"
            )
        source = sources.SourceConfig(
            source="tfds" if data.source == "tfds" else "json",
            data_dir=None if data.source == "trace" else data.data_dir or None,
            tfds_data_dir=data.tfds_data_dir or None,
            test_per_class=data.test_per_class or None,
            seed=data.seed,
            holdout_fraction=data.holdout_fraction or None,
        )
        task = sources.load_task(entry, source)
        sets.append(benchmark_general_set(task, tokenizer, **limits))
    return tuple(sets)


def _expand_order(names: tuple[str, ...], source: str) -> tuple[str, ...]:
    """A lone published order name (``order3``; ``trace`` for TRACE) as its task names."""
    if len(names) != 1:
        return names
    if source == "trace":
        return TRACE_ORDER if names[0] == "trace" else names
    return get_order(names[0]) if names[0].startswith("order") else names


# --------------------------------------------------------------------------- optimizer


def learning_rate_schedule(cfg: Config, total_steps: int) -> optax.Schedule:
    """The schedule of one task over ``total_steps`` optimizer steps (restarts per task)."""
    train = cfg.train
    peak = train.learning_rate
    warmup = min(train.warmup_steps, max(total_steps - 1, 0))
    decay_steps = max(total_steps - warmup, 1)
    if train.schedule == "constant":
        after = optax.constant_schedule(peak)
    elif train.schedule == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    elif train.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        raise ConfigError(f"train.schedule={train.schedule!r}; valid: constant, linear, cosine")
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_transform(
    cfg: Config, method: Method, t: int, params: PyTree, steps: int
) -> optax.GradientTransformation:
    """Gradient clipping, then the method's transform; accumulation wraps both."""
    tx = method.optimizer(t, params, learning_rate_schedule(cfg, steps))
    if cfg.train.clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.train.clip_norm), tx)
    if cfg.train.grad_accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.train.grad_accum_steps)
    return tx


def make_train_step(
    family: Family,
    method: Method,
    tx: optax.GradientTransformation,
    graphdef: Any,
    shardings: tuple[PyTree, PyTree, PyTree] | None = None,
) -> Callable:
    """``step(params, opt_state, rest, batch, key, arrays) -> (params, opt_state, stats)``
    jitted, with the parameters and the optimizer state donated.

    ``shardings``: ``(params, opt_state, rest)`` shardings (``NamedSharding`` trees);
    the step then takes and returns its state exactly so placed, and a steady step
    never compiles again for new input shardings."""

    def loss_of(params, rest, batch, key, arrays):
        model = nnx.merge(graphdef, params, rest, copy=True)
        if lora.lora_modules(model):
            lora.reseed_dropout(model, key)
        loss = family.loss(model, batch)
        extra = method.penalty(model, arrays, batch)
        return (loss if extra is None else loss + extra), loss

    def step(params, opt_state, rest, batch, key, arrays):
        (total, loss), grads = jax.value_and_grad(loss_of, has_aux=True)(
            params, rest, batch, key, arrays
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        # A finite loss can still come with an update that breaks the weights; checked
        # here so that no checkpoint is ever written from non-finite parameters.
        finite = jnp.isfinite(optax.tree.norm(params))
        stats = {
            "loss": loss,
            "total": total,
            "finite": finite,
            "grad_norm": optax.tree.norm(grads),
        }
        return params, opt_state, stats

    if shardings is None:
        return jax.jit(step, donate_argnums=(0, 1))
    param_sh, opt_sh, rest_sh = shardings
    return jax.jit(
        step,
        in_shardings=(param_sh, opt_sh, rest_sh, None, None, None),
        out_shardings=(param_sh, opt_sh, None),
        donate_argnums=(0, 1),
    )


def shardings_of(tree: PyTree) -> PyTree:
    """The ``sharding`` of every array of ``tree`` (a tree of the same structure)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def optimizer_shardings(
    tx: optax.GradientTransformation, params: PyTree, mesh: jax.sharding.Mesh
) -> PyTree:
    """Shardings of ``tx.init(params)``: every array that belongs to a parameter (Adam
    moments, OSF bases, GORP projectors and moments) split like it
    (``parallel.derived_shardings``), counters replicated."""
    return parallel.derived_shardings(jax.eval_shape(tx.init, params), params, mesh)


def init_optimizer(tx: optax.GradientTransformation, params: PyTree, shardings: PyTree) -> PyTree:
    """``tx.init(params)`` born with ``shardings`` (``optimizer_shardings``), so no
    device ever holds a whole moment or basis and the first step sees the shardings
    every later step returns.

    A transform that holds arrays itself (OSF's bases, built already sharded) is
    initialised eagerly: a jitted init would copy them (``jit`` never returns a
    closed-over array as is), doubling their memory for the whole task; its other
    arrays (``zeros_like`` of the parameters) keep the parameters' shardings."""
    consts = jax.make_jaxpr(tx.init)(params).consts
    if any(np.size(c) > 1 for c in consts):
        return jax.device_put(tx.init(params), shardings)
    return jax.jit(tx.init, out_shardings=shardings)(params)


def device_batch(
    batch: Batch,
    mesh: jax.sharding.Mesh,
    rules: parallel.LogicalRules = parallel.DEFAULT_RULES,
    *,
    per_process: bool = False,
) -> Batch:
    """Put a host batch on the mesh, rows split over the data-parallel axes.

    ``per_process``: the batch holds only this process's rows (``BatchConfig``'s
    ``process_index``), assembled into the global batch
    (``jax.make_array_from_process_local_data``); otherwise every process holds the
    whole batch and places its own devices' rows."""

    def place(x: np.ndarray) -> jax.Array:
        sharding = parallel.batch_sharding(mesh, np.ndim(x), rules)
        if per_process and jax.process_count() > 1:
            shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
            return jax.make_array_from_process_local_data(sharding, x, shape)
        return parallel.host_to_global(x, sharding)

    return jax.tree.map(place, batch)


def resolve_batch_layout(cfg: Config, data_parallel: int) -> Config:
    """The batch layout for ``data_parallel`` devices splitting each batch.

    With ``train.effective_batch_size`` set: ``batch_size = per_device_batch_size x
    data_parallel`` and ``grad_accum_steps = effective / batch_size`` (the published
    runs' 64 is 8 x 8 on 8 devices and 16 x 4 on 16). Otherwise ``batch_size`` and
    ``grad_accum_steps`` are used as given. Every size must divide; the error names the
    numbers that do not. Returns a new Config."""
    train = cfg.train
    out = copy.deepcopy(cfg)
    if train.effective_batch_size:
        micro = train.per_device_batch_size * data_parallel
        if train.effective_batch_size % micro:
            raise ConfigError(
                f"train.effective_batch_size={train.effective_batch_size} is not a multiple of"
                f" train.per_device_batch_size={train.per_device_batch_size} x {data_parallel}"
                f" data-parallel devices = {micro}; choose an effective batch that is, or fewer"
                " devices (run.mesh)"
            )
        out.train.batch_size = micro
        out.train.grad_accum_steps = train.effective_batch_size // micro
    for key, size in (
        ("train.batch_size", out.train.batch_size),
        ("eval.batch_size", cfg.eval.batch_size),
    ):
        if size % data_parallel:
            raise ConfigError(
                f"{key}={size} is not divisible by the {data_parallel} data-parallel devices"
            )
    return out


# --------------------------------------------------------------------------- run state


@dataclasses.dataclass
class Position:
    """Where a run is, saved with every checkpoint."""

    accuracy: np.ndarray  # (phases, T) percent; NaN where not evaluated yet
    base: list[float] | None  # the untrained model's accuracy per task (for FWT)
    phase: int = 0  # the training phase in progress (a task; MTL has a single one)
    step: int = 0  # optimizer steps done in this phase
    phase_done: bool = False  # trained, end_task run, evaluated
    global_step: int = 0
    # eval.general scores: row 0 the base model, row t + 1 after phase t (None: no sets)
    general: list[list[float]] | None = None

    def record(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["accuracy"] = [[None if math.isnan(v) else float(v) for v in r] for r in self.accuracy]
        return out

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Position:
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in record.items() if k in names}  # not "method", "kept"
        fields["accuracy"] = np.array(
            [[np.nan if v is None else v for v in r] for r in record["accuracy"]], np.float64
        )
        return cls(**fields)


# --------------------------------------------------------------------------- the run


class _PhaseMeter:
    """A phase's logging: the step log (JSONL, TensorBoard, the finiteness check), the
    progress display, tokens per second and the learning rate of each step."""

    def __init__(self, run: ContinualRun, ckpt: RunCheckpointer, pos: Position, total: int):
        self.run, self.ckpt, self.pos = run, ckpt, pos
        self.name = run._phase_name(pos.phase)
        self.steplog = StepLog(run.run_dir, run.main_process, run._purge_step)
        run._purge_step = None
        self.progress = Progress(total, pos.step, self.name, run.cfg.run.progress, run.log)
        self.schedule = learning_rate_schedule(run.cfg, total)
        self.tokens = 0
        self.started = time.perf_counter()

    def step(self, stats: Any) -> None:
        """Log one optimizer step (``pos`` already counts it); stops the run with the
        task and step named when the loss is not finite."""
        pos, seconds = self.pos, time.perf_counter() - self.started
        loss = self.steplog.step(
            stats,
            where=f"task {self.name!r} (phase {pos.phase})",
            checkpoints=self.ckpt.directory,
            last_checkpoint=self.ckpt.latest_step(),
            step=pos.step,
            global_step=pos.global_step,
            learning_rate=float(self.schedule(pos.step - 1)),
            tokens_per_s=self.tokens / max(seconds, 1e-9),
            seconds=seconds,
            loss_tag=f"loss/{self.name}",
            phase=pos.phase,
            task=self.name,
        )
        self.progress.update(loss)

    def close(self) -> None:
        self.progress.close()
        self.steplog.close()


class ContinualRun:
    """One experiment: the data, model, method, mesh, checkpoints and outputs of a config.

    Construction does every start-up check (and the slow data loading), so a bad config
    fails before training; ``run()`` trains, evaluates and writes the run directory.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        overrides: Sequence[str] = (),
        method: str | None = None,
        restart: bool = False,
        log: Callable[[str], None] = print,
    ):
        cfg = resolve(cfg, overrides, method)
        self.cfg = cfg
        self.restart = restart
        distributed.initialize(cfg.run.distributed)
        # Several hosts: every process trains, only the first writes logs and files
        # (orbax checkpoints are written by all of them together).
        self.main_process = jax.process_index() == 0
        self.log = log if self.main_process else _silent
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        self.family = get_family(cfg.model.family)
        self.method = self._new_method()  # checks the method's name and options now
        self.rules = parallel.rules_with(cfg.run.rules)
        self.mesh = parallel.make_mesh(dict(cfg.run.mesh) or None)
        # the config as asked for: saved and compared on resume (the batch layout below
        # follows from the devices, and run.mesh may change between attempts)
        self.requested = cfg
        cfg = self.cfg = resolve_batch_layout(
            cfg, parallel.data_parallel_size(self.mesh, self.rules)
        )
        self.data = load_benchmark_data(cfg)
        self.general = load_general_sets(cfg, self.data.tokenizer, self.data.names)
        for entry in self.data.skipped:
            self.log(f"data.missing=skip: left out {entry['dataset']} ({entry['reason']})")
        self._build_state()
        self.phases = 1 if self.method.joint else len(self.data.names)
        self.batch_config = BatchConfig(
            format=self.family.format,
            batch_size=cfg.train.batch_size,
            max_source_tokens=cfg.data.max_source_length,
            max_target_tokens=cfg.data.max_target_length,
            decoder_start_id=self.data.tokenizer.pad_id,
            buckets=tuple(cfg.data.length_buckets) or None,
        )
        # Training batches: each process builds only its own rows of every global batch
        # (evaluation, Fisher and calibration batches are whole on every process).
        processes = jax.process_count()
        if cfg.train.batch_size % processes:
            raise ConfigError(
                f"train.batch_size={cfg.train.batch_size} is not divisible by the"
                f" {processes} processes"
            )
        self.train_batch_config = dataclasses.replace(
            self.batch_config,
            batch_size=cfg.train.batch_size // processes,
            process_index=jax.process_index(),
            process_count=processes,
        )
        self._check_buckets()
        self._purge_step: int | None = None  # set when resuming (``drop_log_after``)

    def _new_method(self) -> Method:
        cfg = self.cfg
        return get_method(
            cfg.method.name,
            dict(cfg.method.options),
            self.family,
            weight_decay=cfg.train.weight_decay,
            seed=cfg.train.seed,
        )

    def _build_state(self) -> None:
        """The model (initialised or loaded, sharded) and the method's structure, as
        before any training: built again when a resume falls back to an older
        checkpoint, since a failed restore may have changed them."""
        cfg = self.cfg
        self.rngs = nnx.Rngs(params=cfg.train.seed, dropout=cfg.train.seed + 1)
        self.model, self.model_cfg = self.family.build(
            cfg.model, self.data.tokenizer, self.rngs, self.mesh, self.rules
        )
        self.method.setup(self.model, self.rngs)
        parallel.shard_module(self.model, self.mesh, self.rules)
        self._rank_fns: dict[Any, Callable] = {}
        self._steps_cache: dict[Any, tuple[optax.GradientTransformation, Callable, Any]] = {}

    def _check_buckets(self) -> None:
        """With explicit ``data.length_buckets``, every row must fit the largest one:
        checked now rather than when the first long batch comes up. Rows are training
        rows, and the prompt + option rows that rank scoring and multiple-choice
        general sets score."""
        if not self.cfg.data.length_buckets:
            return
        largest = max(self.cfg.data.length_buckets)
        scored = list(zip(self.data.names, self.data.train, strict=True))
        if self.cfg.eval.mode == "rank":  # each test prompt with its longest option
            for name, split in zip(self.data.names, self.data.test, strict=True):
                option = max(split.option_ids, key=len)
                scored.append((name, dataclasses.replace(split, answers=(option,) * len(split))))
        scored += [(g.name, g.choice_rows()[0]) for g in self.general if g.kind == "choice"]
        for name, split in scored:
            fmt = self.family.format
            longest = int(
                batching.sequence_lengths(split, self.data.tokenizer, fmt, train=True).max()
            )
            if longest > largest:
                raise ConfigError(
                    f"data.length_buckets={list(self.cfg.data.length_buckets)}: task {name!r} has "
                    f"rows of {longest} tokens; add a bucket >= {longest}"
                )

    # -- evaluation ------------------------------------------------------------------
    def _score_fn(self) -> Callable[[Batch], np.ndarray]:
        """The model's summed answer log-likelihood per row of a host batch (jitted once
        per model structure)."""
        graphdef, state = nnx.split(self.model)
        if graphdef not in self._rank_fns:
            family = self.family
            self._rank_fns[graphdef] = jax.jit(
                lambda s, b: family.answer_logprob(nnx.merge(graphdef, s), b)
            )
        score = self._rank_fns[graphdef]
        return lambda b: parallel.to_host(score(state, device_batch(b, self.mesh, self.rules)))

    def evaluate_task(self, i: int) -> TaskScore:
        ev = self.cfg.eval
        self.model.eval()
        try:
            if ev.mode == "generate":
                return evaluate_generate(
                    self.family,
                    self.model,
                    self.data.test[i],
                    self.data.tokenizer,
                    batch_size=ev.batch_size,
                    max_new_tokens=ev.max_new_tokens,
                )
            return evaluate_rank(
                self._score_fn(),
                self.data.test[i],
                self.data.tokenizer,
                dataclasses.replace(self.batch_config, batch_size=ev.batch_size),
            )
        finally:
            self.model.train()

    def evaluate_general(self) -> list[float]:
        """The score of every ``eval.general`` set (see ``cljax.cl.general``)."""
        ev = self.cfg.eval
        scores = []
        self.model.eval()
        try:
            for general in self.general:
                if general.kind == "number":
                    result = evaluate_generate(
                        self.family,
                        self.model,
                        general.split,
                        self.data.tokenizer,
                        batch_size=ev.batch_size,
                        max_new_tokens=ev.max_new_tokens,
                    )
                else:
                    result = evaluate_choices(
                        self._score_fn(),
                        general,
                        self.data.tokenizer,
                        dataclasses.replace(self.batch_config, batch_size=ev.batch_size),
                    )
                self.log(f"  general {general.name}: {result}")
                scores.append(result.score)
        finally:
            self.model.train()
        return scores

    def evaluate_row(self, seen: int) -> np.ndarray:
        """Accuracy on every task (``eval.all_tasks``) or on the first ``seen``."""
        upto = len(self.data.names) if self.cfg.eval.all_tasks else seen
        row = np.full(len(self.data.names), np.nan)
        for i in range(upto):
            score = self.evaluate_task(i)
            row[i] = score.score
            self.log(f"  {self.data.names[i]}: {score}")
        return row

    # -- checkpoints -------------------------------------------------------------------
    def _state(self, opt_state: PyTree | None) -> dict[str, Any]:
        state = {"model": nnx.state(self.model), "method": self.method.arrays}
        if opt_state is not None:
            state["opt"] = opt_state
        return state

    def _record(self, pos: Position) -> dict[str, Any]:
        return {**pos.record(), "method": self.method.record()}

    def _restore(self, ckpt: RunCheckpointer, step: int, opt_like: PyTree | None) -> PyTree:
        restored, _ = ckpt.restore(self._state(opt_like), step)
        nnx.update(self.model, restored["model"])
        self.method.arrays = restored["method"]
        return restored.get("opt")

    # -- main ------------------------------------------------------------------------
    def run(self) -> report.ContinualMetrics | None:
        """Train through the order (resuming if the run directory has a checkpoint) and
        write the outputs; returns the final metrics."""
        lock = RunLock(self.run_dir, self.log)
        if self.main_process:
            lock.acquire()
        try:
            while True:
                try:
                    return self._locked_run()
                except CorruptCheckpointError as err:
                    self._fall_back(err)
        finally:
            lock.release()

    def _fall_back(self, err: CorruptCheckpointError) -> None:
        """Set an unreadable checkpoint aside and start again from the previous one;
        with none left, a one-line error naming the directory (nothing is deleted)."""
        with RunCheckpointer(self.run_dir / "checkpoints") as ckpt:
            if self.main_process:
                kept = ckpt.set_aside(err.step)
                self.log(f"warning: {err}; kept as {kept}, resuming from the previous one")
            sync("cljax_fall_back")
            if ckpt.latest_step() is None:
                raise CljaxError(
                    f"no readable checkpoint in {ckpt.directory} (unreadable ones are kept as"
                    " corrupt-<step>); start over with --restart"
                ) from err
        self.restart = False
        self.method = self._new_method()
        self._build_state()

    def _locked_run(self) -> report.ContinualMetrics | None:
        claim_run_dir(
            self.run_dir,
            self.requested,
            restart=self.restart,
            main_process=self.main_process,
            log=self.log,
        )
        if self.main_process:
            (self.run_dir / "config.json").write_text(self.requested.to_json())
            data_info = {
                "tasks": list(self.data.names),
                "metadata": list(self.data.metadata),
                "tokenizer": self.data.tokenizer.path,
                "vocab_size": self.data.tokenizer.vocab_size,
                "skipped": list(self.data.skipped),
                "processes": jax.process_count(),
                # the batch layout on these devices (train.effective_batch_size)
                "batch_size": self.cfg.train.batch_size,
                "grad_accum_steps": self.cfg.train.grad_accum_steps,
                "devices": jax.device_count(),
            }
            (self.run_dir / "data.json").write_text(json.dumps(data_info, indent=2, default=str))
        with (
            RunCheckpointer(self.run_dir / "checkpoints") as ckpt,
            parallel.use_mesh(self.mesh, self.rules),
        ):
            metrics = self._run(ckpt)
        if metrics is not None:
            self.log(report.metrics_table([(self.cfg.method.name, metrics)]))
        return metrics

    def _run(self, ckpt: RunCheckpointer) -> report.ContinualMetrics | None:
        names, method = self.data.names, self.method
        latest = ckpt.latest_step()
        carried: PyTree | None = None
        resume_mid: int | None = None
        if latest is None:
            pos = Position(np.full((self.phases, len(names)), np.nan), None)
            if self.cfg.eval.all_tasks and not method.joint:
                self.log("untrained model (for forward transfer):")
                pos.base = [float(v) for v in self.evaluate_row(len(names))]
            if self.general:
                self.log("untrained model, general ability:")
                pos.general = [self.evaluate_general()]
            start = 0
        else:
            record = ckpt.read_record(latest)
            pos = Position.from_record(record)
            if not pos.phase_done:
                method.restore_record(record.get("method", {}))
            self.log(f"resuming {self.run_dir} at phase {pos.phase}, step {pos.step}")
            self._purge_step = pos.global_step + 1
            if self.main_process:
                drop_log_after(self.run_dir, pos.global_step)
            for p in range(pos.phase + 1):  # rebuild the structure the arrays were saved in
                method.prepare(p, self.model, self.rngs)
            if pos.phase_done:
                opt_like = None
                if method.carries_optimizer_state:
                    opt_like = self._fresh_optimizer(pos.phase)[1]
                carried = self._restore(ckpt, latest, opt_like)
                start = pos.phase + 1
            else:
                resume_mid, start = latest, pos.phase
        for phase in range(start, self.phases):
            if resume_mid is None:
                method.prepare(phase, self.model, self.rngs)
                pos.phase, pos.step, pos.phase_done = phase, 0, False
            carried = self._train_phase(ckpt, pos, carried, resume_mid)
            if not method.carries_optimizer_state:
                carried = None
            resume_mid = None
            row = self.evaluate_row(len(names) if method.joint else phase + 1)
            if method.keeps_task_models:  # each earlier task keeps its own model
                row[:phase] = np.diag(pos.accuracy)[:phase]
            pos.accuracy[phase] = row
            if self.general:
                pos.general = [*pos.general[: phase + 1], self.evaluate_general()]
            pos.phase_done = True
            # The evaluation is logged before the checkpoint that holds it: a kill in
            # between resumes from the previous checkpoint, which drops it and logs it anew.
            metrics = self._write_outputs(pos)
            if metrics is not None:
                self.log(f"after {self._phase_name(phase)}: AA {metrics.average_accuracy:.2f}")
                self._log_evaluation(pos, row, metrics)
            ckpt.save(
                pos.global_step,
                self._state(carried),
                self._record(pos),
                keep=self.cfg.run.keep_task_checkpoints,
            )
        return self._write_outputs(pos)

    def _log_evaluation(
        self, pos: Position, row: np.ndarray, metrics: report.ContinualMetrics
    ) -> None:
        """The accuracy row and the metrics so far, in ``metrics.jsonl`` and TensorBoard."""
        accuracy = {n: float(v) for n, v in zip(self.data.names, row, strict=True) if v == v}
        entry = {
            "phase": pos.phase,
            "global_step": pos.global_step,
            "eval": accuracy,
            "average_accuracy": metrics.average_accuracy,
            "bwt": metrics.backward_transfer,
        }
        scalars = {f"accuracy/{task}": value for task, value in accuracy.items()}
        scalars["metrics/average_accuracy"] = metrics.average_accuracy
        if metrics.backward_transfer is not None:
            scalars["metrics/bwt"] = metrics.backward_transfer
        steplog = StepLog(self.run_dir, enabled=True)
        steplog.write(entry, scalars, pos.global_step)
        steplog.close()

    def _phase_name(self, phase: int) -> str:
        return "all tasks" if self.method.joint else self.data.names[phase]

    def _steps(self, split: EncodedSplit) -> int:
        per_epoch = batching.num_batches(len(split), self.batch_config)
        steps = per_epoch * self.cfg.train.epochs // self.cfg.train.grad_accum_steps
        if self.cfg.train.max_steps_per_task:
            steps = min(steps, self.cfg.train.max_steps_per_task)
        return max(steps, 1)

    def _transform_and_step(
        self, phase: int, graphdef: Any, params: PyTree, rest: PyTree, total: int
    ):
        """The phase's transform and its compiled step, reused across phases when the
        method's transform does not change (same key, same model structure), so that a
        sequence of tasks compiles its step once per batch shape. Returns ``(tx, step,
        (params, opt_state, rest) shardings)``."""
        method_key = self.method.transform_key(phase)
        schedule_key = None if self.cfg.train.schedule == "constant" else total
        key = None if method_key is None else (method_key, schedule_key, graphdef)
        if key is not None and key in self._steps_cache:
            return self._steps_cache[key]
        tx = make_transform(self.cfg, self.method, phase, params, total)
        shardings = (
            shardings_of(params),
            optimizer_shardings(tx, params, self.mesh),
            shardings_of(rest),
        )
        pair = (tx, make_train_step(self.family, self.method, tx, graphdef, shardings), shardings)
        if key is not None:
            self._steps_cache[key] = pair
        return pair

    def _fresh_optimizer(self, phase: int):
        split = self.method.train_split(phase, self.data.train)
        _, params, _ = nnx.split(self.model, self.method.trainable(), ...)
        tx = make_transform(self.cfg, self.method, phase, params, self._steps(split))
        return tx, init_optimizer(tx, params, optimizer_shardings(tx, params, self.mesh))

    def _write_outputs(self, pos: Position) -> report.ContinualMetrics | None:
        if not self.main_process:
            return None
        metrics = report.write_accuracy(
            self.run_dir,
            method=self.cfg.method.name,
            tasks=self.data.names,
            accuracy=pos.accuracy,
            base=pos.base,
            test_sizes=[len(s) for s in self.data.test],
            task_metrics=[s.spec.metric for s in self.data.test],
            general=None
            if pos.general is None
            else {"sets": [g.name for g in self.general], "scores": pos.general},
        )
        if report.completed_rows(pos.accuracy):
            report.plot_run(self.run_dir)
        return metrics

    def _train_phase(
        self,
        ckpt: RunCheckpointer,
        pos: Position,
        carried: PyTree | None,
        resume_step: int | None,
    ) -> PyTree:
        """Train one phase from ``pos.step`` on; returns the optimizer state that
        ``end_task`` hands to the next phase."""
        method, phase, accum = self.method, pos.phase, self.cfg.train.grad_accum_steps
        split, total, step_fn, params, rest, opt_state = self._begin_phase(
            ckpt, pos, carried, resume_step
        )
        key = jax.random.fold_in(jax.random.key(self.cfg.train.seed), phase)
        meter = _PhaseMeter(self, ckpt, pos, total)
        try:
            for micro, batch in self._micro_batches(split, phase, pos.step * accum, total * accum):
                params, opt_state, stats = step_fn(
                    params,
                    opt_state,
                    rest,
                    device_batch(batch, self.mesh, self.rules, per_process=True),
                    jax.random.fold_in(key, micro),
                    method.arrays,
                )
                meter.tokens += int(np.sum(batch.attention_mask)) * jax.process_count()
                if (micro + 1) % accum:
                    continue  # accumulating: no optimizer step yet
                pos.step += 1
                pos.global_step += 1
                meter.step(stats)
                every = self.cfg.run.checkpoint_every_steps
                if every and pos.step % every == 0 and pos.step < total:
                    nnx.update(self.model, params, rest)
                    # the log holds every step up to the checkpoint, and no more on
                    # resume (``drop_log_after``)
                    meter.steplog.checkpointed()
                    ckpt.save(pos.global_step, self._state(opt_state), self._record(pos))
        finally:
            meter.close()
        nnx.update(self.model, params, rest)
        return method.end_task(phase, self.model, opt_state, lambda: self._fisher(split, phase))

    def _begin_phase(
        self,
        ckpt: RunCheckpointer,
        pos: Position,
        carried: PyTree | None,
        resume_step: int | None,
    ) -> tuple[EncodedSplit, int, Callable, PyTree, PyTree, PyTree]:
        """The method's per-task work, then the phase's training split, its optimizer
        steps, the compiled step, the trained and other state, and the optimizer state
        (carried from the previous phase, fresh, or restored mid-phase)."""
        method, phase = self.method, pos.phase
        # New structure (a LoRA pair of this task) is placed on the mesh like the rest.
        parallel.shard_module(self.model, self.mesh, self.rules)
        method.begin_task(phase, self.model, lambda: self._calibration(phase))
        self._place_method_arrays()
        split = method.train_split(phase, self.data.train)
        total = self._steps(split)
        self.model.train()
        graphdef, params, rest = nnx.split(self.model, method.trainable(), ...)
        tx, step_fn, (_, opt_sh, _) = self._transform_and_step(phase, graphdef, params, rest, total)
        if carried is not None:
            opt_state = jax.device_put(carried, opt_sh)
        else:
            opt_state = init_optimizer(tx, params, opt_sh)
        if resume_step is not None:
            opt_state = self._restore(ckpt, resume_step, opt_state)
            self._place_method_arrays()
        _, params, rest = nnx.split(self.model, method.trainable(), ...)
        return split, total, step_fn, params, rest, opt_state

    def _micro_batches(
        self, split: EncodedSplit, phase: int, start: int, stop: int
    ) -> Iterator[tuple[int, Batch]]:
        """``(index, batch)`` for micro-batches ``start`` to ``stop - 1`` of the phase,
        through as many epochs as it takes (deterministic, so a resumed run continues
        the same stream)."""
        per_epoch = batching.num_batches(len(split), self.batch_config)
        micro = start
        while micro < stop:
            epoch, offset = divmod(micro, per_epoch)
            for batch in batching.train_batches(
                split,
                self.data.tokenizer,
                self.train_batch_config,
                epoch=epoch,
                seed=self.cfg.data.seed + 1000 * phase,
                start_step=offset,
            ):
                if micro >= stop:
                    return
                yield micro, batch
                micro += 1

    def _place_method_arrays(self) -> None:
        """The method's arrays (anchors, Fisher) split like the parameters they belong to."""
        params = nnx.state(self.model, nnx.Param)
        shardings = parallel.derived_shardings(self.method.arrays, params, self.mesh)
        self.method.arrays = jax.device_put(self.method.arrays, shardings)

    def _calibration(self, phase: int) -> list[Batch]:
        """The training batches the method's ``needs()`` asks for at the start of a phase:
        of the previous task (none before the first) or of the current one."""
        needs = self.method.needs()
        task = phase - 1 if needs.calibration_task == "previous" else phase
        if needs.calibration == 0 or task < 0 or self.method.joint:
            return []
        return self._first_batches(
            self.data.train[task],
            self.batch_config,
            self.cfg.data.seed + 11 * phase,
            needs.calibration,
        )

    def _first_batches(
        self, split: EncodedSplit, config: BatchConfig, seed: int, n: int
    ) -> list[Batch]:
        """The first ``n`` batches of a seeded shuffle of ``split``."""
        batches = batching.train_batches(split, self.data.tokenizer, config, epoch=0, seed=seed)
        return [b for _, b in zip(range(n), batches, strict=False)]

    def _fisher(self, split: EncodedSplit, phase: int) -> PyTree:
        """Diagonal Fisher of the parameters on the ``needs().fisher`` batches of the task,
        all padded to one shape so that the squared gradients are taken in one scan."""
        n = self.method.needs().fisher
        if n == 0:
            raise ValueError(f"method {self.method.name!r} asked for a Fisher without batches")
        lengths = batching.sequence_lengths(
            split, self.data.tokenizer, self.family.format, train=True
        )
        config = dataclasses.replace(
            self.batch_config,
            buckets=(int(lengths.max()),),
            target_buckets=(self.cfg.data.max_target_length,),
        )
        batches = self._first_batches(split, config, self.cfg.data.seed + 7 * phase, n)
        stacked = stack_batches(batches)
        graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        family = self.family

        def compute(params, rest, stacked):
            loss = lambda p, b: family.loss(nnx.merge(graphdef, p, rest), b)
            return nnx.to_pure_dict(fisher_diagonal(loss, params, stacked))

        # born split like the parameters, as the anchors are
        shape = jax.eval_shape(compute, params, rest, stacked)
        shardings = parallel.derived_shardings(shape, params, self.mesh)
        return jax.jit(compute, out_shardings=shardings)(params, rest, stacked)


def _silent(_: str) -> None:
    pass


def run_experiment(
    cfg: Config,
    *,
    overrides: Sequence[str] = (),
    method: str | None = None,
    restart: bool = False,
    log: Callable[[str], None] = print,
):
    """Run (or resume) the experiment of ``cfg`` (see ``config.resolve`` for how
    ``overrides`` and ``method`` combine with it); ``restart`` clears the run directory
    first. Returns the final metrics."""
    return ContinualRun(cfg, overrides=overrides, method=method, restart=restart, log=log).run()
