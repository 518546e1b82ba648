"""``cljax pretrain``: a small base model made from files only.

Two stages, each resumable after a kill:

1. **Language modelling** on the corpus (``cljax.pretrain.corpus``): causal LM for
   LLaMA, span corruption for T5 (``cljax.pretrain.objectives``), with the continual
   loop's machinery (jitted sharded step, orbax checkpoints, ``metrics.jsonl`` and
   TensorBoard cut back on resume, progress, run lock, config fingerprint). The
   objective is measured on held-out documents before and after. Output: ``lm/``, a
   Hugging Face directory.
2. **Instruction stage** (``pretrain.instruction_steps > 0``): the benchmark tasks of the
   corpus trained all at once in the protocol's prompt format (a continual run of the
   ``mtl`` method from ``lm/``), so that the base knows the prompt/answer format; its
   accuracy on held-out items of those tasks is reported.

The run directory ``<run.out_dir>/<run.name>/`` ends with ``model/`` (the base: HF
``config.json``, ``model.safetensors`` and tokenizer files, loadable by ``transformers``,
``model.checkpoint=`` and ``data.tokenizer=``) and ``pretrain.json`` (corpus counts,
objective before/after, instruction accuracy, wall-clock times).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from cljax import distributed, parallel
from cljax.cl.backbone import Family, get_family
from cljax.cl.checkpoint import RunCheckpointer
from cljax.cl.loop import (
    device_batch,
    init_optimizer,
    learning_rate_schedule,
    make_train_step,
    make_transform,
    optimizer_shardings,
    run_experiment,
    shardings_of,
)
from cljax.cl.methods import get_method
from cljax.cl.rundir import Progress, RunLock, StepLog, claim_run_dir, drop_log_after
from cljax.cl.saved import copy_tokenizer_files, export_run
from cljax.config import Config, apply_overrides, resolve
from cljax.data import batching, sources
from cljax.data.batching import Batch, TextTokenizer
from cljax.data.tasks import DATASETS, build_prompt, get_dataset
from cljax.errors import ConfigError, DataError
from cljax.models.convert import export_hf_checkpoint
from cljax.pretrain import corpus as corpus_lib
from cljax.pretrain import objectives

PyTree = Any
#: written last into a stage's output directory: its presence means the stage is done
DONE_FILE = "pretrain_stage.json"
#: how many examples' worth of prompt templates the BPE tokenizer is trained with
TEMPLATE_WEIGHT = 200


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a pretraining run will do, settled (and checked) before any training.

    Attributes:
      corpus: the documents and their sources.
      corpus_tasks: the benchmark datasets of the corpus (the instruction tasks).
      tokenizer: the tokenizer (trained on the corpus or loaded).
      train_windows / heldout_windows: int32 (N, W) token windows of the training and
        held-out documents (W = sequence_length + 1 for LLaMA, the raw span-corruption
        window for T5).
      sentinel_ids: T5's sentinel token ids (``<extra_id_0>``, ...); empty for LLaMA.
      tokens: training tokens in the windows.
    """

    corpus: corpus_lib.Corpus
    corpus_tasks: tuple[str, ...]
    tokenizer: TextTokenizer
    train_windows: np.ndarray
    heldout_windows: np.ndarray
    sentinel_ids: tuple[int, ...]

    @property
    def tokens(self) -> int:
        return int(self.train_windows.size)


def sentinel_tokens(n: int) -> list[str]:
    return [f"<extra_id_{i}>" for i in range(n)]


def _source_config(cfg: Config) -> sources.SourceConfig:
    data = cfg.data
    return sources.SourceConfig(
        source="json",
        data_dir=data.data_dir or None,
        seed=data.seed,
        # a dataset without a training split gives its carved part (dbpedia: test only)
        holdout_fraction=data.holdout_fraction or 0.1,
        invalid_labels=data.invalid_labels,
        empty_sentences="exclude",
    )


def plan(cfg: Config, log: Callable[[str], None] = print) -> Plan:
    """Read the corpus, check it against the evaluated tasks, get the tokenizer and cut
    the windows; every error here comes before any training."""
    pre = cfg.pretrain
    evaluated = corpus_lib.order_tasks(pre.evaluated_order)
    source_cfg = _source_config(cfg)
    if pre.corpus_tasks == "auto":
        tasks = corpus_lib.default_corpus_tasks(evaluated, source_cfg.data_dir)
    else:
        tasks = corpus_lib.order_tasks(pre.corpus_tasks)
    overlap = sorted(set(tasks) & set(evaluated))
    if overlap:
        raise ConfigError(
            f"pretrain.corpus_tasks holds evaluated tasks {overlap} (pretrain.evaluated_order)"
        )
    corpus = corpus_lib.merge(
        [corpus_lib.benchmark_corpus(tasks, source_cfg), corpus_lib.file_corpus(pre.files)]
    )
    if not corpus.documents:
        raise DataError(
            "the pretraining corpus is empty: name benchmark tasks (pretrain.corpus_tasks)"
            " or files (pretrain.files)"
        )
    corpus_lib.check_disjoint(corpus, evaluated, source_cfg)
    sentinels = sentinel_tokens(pre.sentinels) if cfg.model.family == "t5" else []
    if cfg.data.tokenizer == "bpe":
        # Every benchmark task's prompt template and option names (its label words: no
        # sentence of it), weighted as if in TEMPLATE_WEIGHT examples: a fine-tuning
        # prompt repeats them, and a template seen once would get no merges (dbpedia's
        # prompt head took 113 tokens of a 128-token prompt with the corpus-only BPE).
        specs = list(DATASETS.values())
        templates = [build_prompt(s, "") for s in specs] + [o for s in specs for o in s.options]
        texts = [*corpus.documents, *(templates * TEMPLATE_WEIGHT)]
        tokenizer = batching.train_tokenizer(texts, pre.tokenizer_vocab_size, None, sentinels)
    else:
        tokenizer = batching.load_tokenizer(cfg.data.tokenizer)
    sentinel_ids = tuple(_sentinel_ids(tokenizer, sentinels))
    if pre.instruction_steps:
        _check_prompt_room(cfg, tokenizer, tasks)
    rng = np.random.default_rng([cfg.data.seed, 17])
    order = rng.permutation(len(corpus.documents))
    n_heldout = int(round(pre.heldout_fraction * len(order)))
    encoded = tokenizer.encode(corpus.documents)
    width = window_width(cfg)
    train = objectives.pack_windows(
        [encoded[i] for i in order[n_heldout:]], width - 1, tokenizer.eos_id
    )
    heldout = objectives.pack_windows(
        [encoded[i] for i in order[:n_heldout]], width - 1, tokenizer.eos_id
    )
    if len(train) < cfg.train.batch_size:
        raise DataError(
            f"the corpus gives {len(train)} windows of {width} tokens, fewer than one batch"
            f" (train.batch_size={cfg.train.batch_size})"
        )
    counts = ", ".join(f"{k} {v}" for k, v in corpus.counts.items())
    log(
        f"corpus: {len(corpus.documents)} documents ({counts}), {train.size} training tokens"
        f" in {len(train)} windows, {heldout.size} held out"
    )
    return Plan(corpus, tuple(tasks), tokenizer, train, heldout, sentinel_ids)


def _check_prompt_room(cfg: Config, tokenizer: TextTokenizer, tasks: Sequence[str]) -> None:
    """The instruction stage's prompts must leave room for a sentence: checked before
    the language-model stage, not after it."""
    for name in tasks:
        spec = get_dataset(name)
        fixed = len(tokenizer.encode([build_prompt(spec, "")])[0])
        if fixed + 2 > cfg.data.max_source_length:
            raise ConfigError(
                f"data.max_source_length={cfg.data.max_source_length} leaves no room for a"
                f" sentence in the {fixed}-token prompt of instruction task {name!r}"
            )


def window_width(cfg: Config) -> int:
    """Raw tokens per window: ``sequence_length + 1`` (input and shifted labels) for
    LLaMA; for T5 the longest window whose corrupted input fits ``sequence_length``."""
    pre = cfg.pretrain
    if cfg.model.family == "t5":
        return objectives.raw_length_for(
            pre.sequence_length, pre.noise_density, pre.mean_noise_span
        )
    return pre.sequence_length + 1


def _sentinel_ids(tokenizer: TextTokenizer, sentinels: Sequence[str]) -> list[int]:
    ids = []
    for token in sentinels:
        token_id = tokenizer.backend.token_to_id(token)
        if token_id is None:
            raise DataError(
                f"tokenizer {tokenizer.path} has no sentinel {token!r} for T5 span"
                " corruption: use data.tokenizer=bpe (trained with them) or a T5 tokenizer"
            )
        ids.append(token_id)
    return ids


def objective_batch(cfg: Config, the_plan: Plan, windows: np.ndarray, seed: Sequence[int]) -> Batch:
    """The family's objective on ``windows``; ``seed`` fixes T5's spans."""
    tokenizer = the_plan.tokenizer
    if cfg.model.family == "t5":
        pre = cfg.pretrain
        return objectives.span_batch(
            windows,
            np.random.default_rng(list(seed)),
            noise_density=pre.noise_density,
            mean_noise_span=pre.mean_noise_span,
            sentinel_ids=the_plan.sentinel_ids,
            eos_id=tokenizer.eos_id,
            pad_id=tokenizer.pad_id,
        )
    return objectives.lm_batch(windows)


class LanguageModelStage:
    """Stage 1: the objective over the corpus windows, checkpointed and resumable."""

    def __init__(self, cfg: Config, plan: Plan, run_dir: Path, log: Callable[[str], None]):
        self.cfg, self.plan, self.log = cfg, plan, log
        self.run_dir = run_dir
        self.main_process = jax.process_index() == 0
        self.family: Family = get_family(cfg.model.family)
        self.rules = parallel.rules_with(cfg.run.rules)
        self.mesh = parallel.make_mesh(dict(cfg.run.mesh) or None)
        rngs = nnx.Rngs(params=cfg.train.seed, dropout=cfg.train.seed + 1)
        self.model, self.model_cfg = self.family.build(
            cfg.model, plan.tokenizer, rngs, self.mesh, self.rules
        )
        parallel.shard_module(self.model, self.mesh, self.rules)
        # plain AdamW with the run's clipping, schedule and accumulation (SeqFT's)
        self.method = get_method(
            "seqft", {}, self.family, weight_decay=cfg.train.weight_decay, seed=cfg.train.seed
        )

    def heldout_loss(self) -> float:
        """Mean token NLL of the held-out windows (the first ``eval_batches`` batches;
        T5's spans fixed by the seed, so before and after see the same targets)."""
        cfg, windows = self.cfg, self.plan.heldout_windows
        size = cfg.train.batch_size
        n = min(cfg.pretrain.eval_batches, len(windows) // size)
        if n == 0:
            return math.nan
        graphdef, state = nnx.split(self.model)
        family = self.family

        @jax.jit
        def loss(state, batch):
            model = nnx.merge(graphdef, state)
            return family.loss(model, batch)

        self.model.eval()
        total = 0.0
        for b in range(n):
            batch = objective_batch(
                cfg, self.plan, windows[b * size : (b + 1) * size], (cfg.data.seed, b, 5)
            )
            total += float(loss(state, device_batch(batch, self.mesh, self.rules)))
        self.model.train()
        return total / n

    def train(self, ckpt: RunCheckpointer) -> dict[str, Any]:
        """Train ``pretrain.steps`` steps from the latest checkpoint (if any); returns
        the stage's record (held-out loss before and after, wall time)."""
        cfg = self.cfg
        total = cfg.pretrain.steps
        accum = cfg.train.grad_accum_steps
        graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        tx = make_transform(cfg, self.method, 0, params, total)
        shardings = (
            shardings_of(params),
            optimizer_shardings(tx, params, self.mesh),
            shardings_of(rest),
        )
        step_fn = make_train_step(self.family, self.method, tx, graphdef, shardings)
        opt_state = init_optimizer(tx, params, shardings[1])
        latest = ckpt.latest_step()
        purge = None
        if latest is None:
            record = {"step": 0, "heldout_before": self.heldout_loss(), "seconds": 0.0}
        else:
            state, record = ckpt.restore({"params": params, "opt_state": opt_state}, latest)
            params, opt_state = state["params"], state["opt_state"]
            purge = record["step"] + 1
            if self.main_process:
                drop_log_after(self.run_dir, record["step"])
            self.log(f"resuming the language-model stage at step {record['step']}/{total}")
        schedule = learning_rate_schedule(cfg, total)
        key = jax.random.key(cfg.train.seed)
        steplog = StepLog(self.run_dir, self.main_process, purge)
        progress = Progress(total, record["step"], "language model", cfg.run.progress, self.log)
        started, seconds_before, tokens = time.perf_counter(), record["seconds"], 0
        micro_size = cfg.train.batch_size
        batches = objectives.window_batches(
            len(self.plan.train_windows), micro_size, cfg.data.seed, record["step"] * accum
        )
        try:
            for micro, rows in batches:
                if micro >= total * accum:
                    break
                batch = objective_batch(
                    cfg, self.plan, self.plan.train_windows[rows], (cfg.data.seed, micro)
                )
                params, opt_state, stats = step_fn(
                    params,
                    opt_state,
                    rest,
                    device_batch(batch, self.mesh, self.rules),
                    jax.random.fold_in(key, micro),
                    self.method.arrays,
                )
                tokens += int(np.sum(batch.attention_mask))
                if (micro + 1) % accum:
                    continue
                record["step"] = step = (micro + 1) // accum
                seconds = time.perf_counter() - started
                loss = steplog.step(
                    stats,
                    where="the language-model stage",
                    checkpoints=ckpt.directory,
                    last_checkpoint=ckpt.latest_step(),
                    step=step,
                    global_step=step,
                    learning_rate=float(schedule(step - 1)),
                    tokens_per_s=tokens / max(seconds, 1e-9),
                    seconds=seconds,
                    loss_tag="loss/language_model",
                    stage="language_model",
                )
                progress.update(loss)
                every = cfg.run.checkpoint_every_steps
                if every and step % every == 0 and step < total:
                    record["seconds"] = seconds_before + seconds
                    steplog.checkpointed()
                    ckpt.save(step, {"params": params, "opt_state": opt_state}, dict(record))
        finally:
            progress.close()
            steplog.close()
        nnx.update(self.model, params, rest)
        record["seconds"] = seconds_before + time.perf_counter() - started
        record["heldout_after"] = self.heldout_loss()
        return record

    def export(self, out: Path, record: dict[str, Any]) -> None:
        """The trained model as a Hugging Face directory with the tokenizer's files."""
        export_hf_checkpoint(self.model, self.model_cfg, out)
        copy_tokenizer_files(self.plan.tokenizer.path, out)
        (out / DONE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def instruction_config(cfg: Config, lm_dir: Path, tasks: Sequence[str], run_dir: Path) -> Config:
    """The instruction stage as a continual run: the ``mtl`` method on the corpus's
    benchmark tasks, from the language model, in the protocol's prompt format."""
    pre = cfg.pretrain
    return apply_overrides(
        cfg,
        [
            f"data.order={','.join(tasks)}",
            "data.source=json",
            f"data.tokenizer={lm_dir}",
            f"data.train_per_class={pre.instruction_train_per_class}",
            f"data.test_per_class={pre.instruction_test_per_class}",
            f"data.holdout_fraction={cfg.data.holdout_fraction or 0.1}",
            "data.empty_sentences=exclude",
            f"model.checkpoint={lm_dir}",
            "model.overrides={}",
            "method.name=mtl",
            "method.options={}",
            "method.per_method={}",
            # many epochs: the step count decides
            "train.epochs=1000",
            f"train.max_steps_per_task={pre.instruction_steps}",
            f"train.learning_rate={pre.instruction_learning_rate or cfg.train.learning_rate}",
            "eval.all_tasks=True",
            f"run.out_dir={run_dir}",
            "run.name=instruction",
        ],
    )


def run_pretrain(
    cfg: Config,
    *,
    overrides: Sequence[str] = (),
    restart: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pretrain (or resume pretraining) the base of ``cfg``; returns the summary that
    is also written to ``<run dir>/pretrain.json``."""
    cfg = resolve(cfg, overrides)
    distributed.initialize(cfg.run.distributed)
    main_process = jax.process_index() == 0
    log = log if main_process else (lambda _: None)
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    the_plan = plan(cfg, log)
    lock = RunLock(run_dir, log)
    if main_process:
        lock.acquire()
    try:
        claim_run_dir(run_dir, cfg, restart=restart, main_process=main_process, log=log)
        if main_process:
            (run_dir / "config.json").write_text(cfg.to_json())
        lm_dir, model_dir = run_dir / "lm", run_dir / "model"
        if (lm_dir / DONE_FILE).is_file():
            record = json.loads((lm_dir / DONE_FILE).read_text())
            log(f"language-model stage done ({lm_dir})")
        else:
            stage = LanguageModelStage(cfg, the_plan, run_dir, log)
            with (
                RunCheckpointer(run_dir / "checkpoints") as ckpt,
                parallel.use_mesh(stage.mesh, stage.rules),
            ):
                record = stage.train(ckpt)
            if main_process:
                stage.export(lm_dir, record)
        summary = _summary(cfg, the_plan, record)
        if cfg.pretrain.instruction_steps and the_plan.corpus_tasks:
            inst_cfg = instruction_config(cfg, lm_dir, the_plan.corpus_tasks, run_dir)
            started = time.perf_counter()
            metrics = run_experiment(inst_cfg, log=log)
            accuracy = json.loads((run_dir / "instruction" / "accuracy.json").read_text())
            summary["instruction"] = {
                "tasks": accuracy["tasks"],
                "before": accuracy.get("base"),
                "after": accuracy["accuracy"][-1],
                "average_accuracy": None if metrics is None else metrics.average_accuracy,
                "steps": cfg.pretrain.instruction_steps,
                "seconds": round(time.perf_counter() - started, 1),
            }
            if main_process and not (model_dir / "config.json").is_file():
                export_run(run_dir / "instruction", model_dir, log=log)
        elif main_process and not (model_dir / "config.json").is_file():
            shutil.copytree(lm_dir, model_dir)
        if main_process:
            (run_dir / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
            log(f"base model: {model_dir}")
        return summary
    finally:
        lock.release()


def _summary(cfg: Config, the_plan: Plan, record: dict[str, Any]) -> dict[str, Any]:
    objective = "span_corruption" if cfg.model.family == "t5" else "causal_lm"
    out: dict[str, Any] = {
        "family": cfg.model.family,
        "objective": objective,
        "corpus": {
            "documents": len(the_plan.corpus.documents),
            "sources": the_plan.corpus.counts,
            "training_tokens": the_plan.tokens,
            "heldout_tokens": int(the_plan.heldout_windows.size),
            "evaluated_order": cfg.pretrain.evaluated_order,
        },
        "language_model": {
            "steps": cfg.pretrain.steps,
            "heldout_loss_before": record["heldout_before"],
            "heldout_loss_after": record["heldout_after"],
            "seconds": round(record["seconds"], 1),
        },
    }
    if objective == "causal_lm":
        lm = out["language_model"]
        lm["heldout_perplexity_before"] = math.exp(min(record["heldout_before"], 50.0))
        lm["heldout_perplexity_after"] = math.exp(min(record["heldout_after"], 50.0))
    return out
