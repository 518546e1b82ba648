"""Run configuration: nested dataclasses whose every field is documented, loaded from
a Python file (``get_config() -> Config``, big_vision style) and overridden from the
command line with dotted ``key=value`` pairs.

Unknown keys are rejected with the list of valid ones, and values are checked against
the field's type, so a typo fails at start-up rather than after an hour of training.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cljax.errors import ConfigError, UnknownNameError


def field(
    default: Any,
    doc: str,
    *,
    choices: Sequence[Any] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    below: float | None = None,
    positive: bool = False,
) -> Any:
    """A dataclass field with a documentation string (shown by ``describe``) and the
    values it accepts (``choices``, ``minimum`` / ``maximum`` inclusive, ``below``
    exclusive, ``positive``),
    checked by ``check_value`` (``validate`` for run configs, method options when a
    method is built) before any work."""
    metadata = {
        "doc": doc,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "below": below,
        "positive": positive,
    }
    if isinstance(default, dict | list):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


DTYPES = ("float32", "bfloat16", "float16")


class _Section:
    """A config section: setting a field it does not have (``c.train.batchsize = 4`` in
    a config file) is an error naming the key, not a silently ignored attribute."""

    def __setattr__(self, name: str, value: Any) -> None:
        names = [f.name for f in dataclasses.fields(self)]
        if name not in names:
            section = type(self).__name__.removesuffix("Config").lower()
            key = f"{section}.{name}" if section else name
            raise UnknownNameError(f"unknown config key '{key}'; valid: {names}")
        super().__setattr__(name, value)


@dataclasses.dataclass
class ModelConfig(_Section):
    family: str = field(
        "llama",
        "model family: llama, mistral, qwen2 (decoder-only) or t5 (encoder-decoder);"
        " cljax.cl.backbone.FAMILIES holds every registered one",
    )
    preset: str = field("tiny", "shape preset of the family (e.g. tiny, llama-2-7b, t5-large)")
    checkpoint: str = field("", "Hugging Face checkpoint directory; empty = random init")
    overrides: dict = field({}, "preset fields replaced, e.g. {'hidden_size': 128}")
    param_dtype: str = field(
        "float32",
        "parameter storage dtype: float32 | bfloat16 (keep float32 to train: bf16"
        " weights swallow updates smaller than 1/256 of their value)",
        choices=DTYPES,
    )
    compute_dtype: str = field("float32", "matmul dtype: float32 | bfloat16", choices=DTYPES)
    remat: str = field(
        "none",
        "recompute layer activations in the backward pass: none | full | dots (keep matmul"
        " outputs) | dots_no_batch (keep only weight matmuls)",
        choices=("none", "full", "dots", "dots_no_batch"),
    )


@dataclasses.dataclass
class DataConfig(_Section):
    source: str = field(
        "synthetic",
        "'synthetic' (built in), 'json' (benchmark dir), 'tfds' or 'trace' (TRACE's layout)",
        choices=("synthetic", "json", "tfds", "trace"),
    )
    data_dir: str = field(
        "", "benchmark root for json/tfds (empty = $CLJAX_DATA_DIR); the TRACE root for trace"
    )
    tfds_data_dir: str = field("", "where TFDS shards are built and read (source='tfds')")
    order: str = field(
        "topic,sentiment,entailment",
        "json/tfds: an order (order1..order6) or comma-separated datasets; "
        "synthetic: comma-separated task kinds; trace: 'trace' (TRACE's order) or its tasks;"
        " any source: names of data.files tasks too",
    )
    files: dict = field(
        {},
        "your own free-text tasks: {name: {'train': FILE, 'test': FILE, 'metric': 'accuracy',"
        " 'extract': 'text', 'max_new_tokens': 0}} (JSON/JSONL of prompt/answer,"
        " input/output or chat messages); name them in data.order",
    )
    chat_template: bool = field(
        False, "render free-text prompts through the tokenizer directory's chat template"
    )
    tokenizer: str = field("bpe", "'bpe' (trained on the tasks, cached) or an HF tokenizer dir")
    tokenizer_vocab_size: int = field(512, "vocabulary of the 'bpe' tokenizer", positive=True)
    train_per_class: int = field(0, "training examples kept per class (0 = all), seeded", minimum=0)
    test_per_class: int = field(0, "test examples kept per class (0 = all), seeded", minimum=0)
    holdout_fraction: float = field(
        0.0,
        "carve a stratified test split of this fraction where one is missing (0 = error)",
        minimum=0,
    )
    validation_per_class: int = field(
        0,
        "carve this many training examples per class as a validation split and evaluate on it"
        " instead of the test split, which is then never read: for choosing settings"
        " (0 = evaluate on test; json/tfds only)",
        minimum=0,
    )
    empty_sentences: str = field(
        "error",
        "an item with an empty sentence: error | exclude (counted and reported)",
        choices=("error", "exclude"),
    )
    missing: str = field(
        "error",
        "a dataset of the order without its files: error | skip (left out of the order,"
        " listed in data.json and printed)",
        choices=("error", "skip"),
    )
    invalid_labels: str = field(
        "exclude",
        "items whose label is no option: exclude|error|keep",
        choices=("exclude", "error", "keep"),
    )
    max_source_length: int = field(
        512, "prompt tokens kept (the trailing 'Answer:' always kept)", minimum=2
    )
    max_target_length: int = field(50, "label tokens kept", minimum=2)
    length_buckets: list = field(
        [], "padded sequence lengths allowed (fewer = fewer compiles); [] = powers of two"
    )
    truncation: str = field(
        "keep_answer",
        "'keep_answer' or 'release' (cuts 'Answer:' off)",
        choices=("keep_answer", "release"),
    )
    task_prefix: bool = field(True, "prefix prompts with 'Task:' and 'Dataset:' lines")
    seed: int = field(42, "seed of subsampling, held-out splits, synthetic tasks, shuffling")


@dataclasses.dataclass
class MethodConfig(_Section):
    name: str = field("seqft", "continual method (see cljax.cl.methods.METHODS)")
    options: dict = field({}, "method hyperparameters overriding its defaults")
    per_method: dict = field(
        {},
        "{method: {dotted key: value}} applied when that method runs, e.g. "
        "{'osf': {'train.learning_rate': 1e-5}} (published per-method settings)",
    )


@dataclasses.dataclass
class TrainConfig(_Section):
    epochs: int = field(1, "epochs per task", positive=True)
    max_steps_per_task: int = field(
        0, "stop a task after this many optimizer steps (0 = no cap)", minimum=0
    )
    batch_size: int = field(8, "examples per micro-batch (global, over all devices)", positive=True)
    grad_accum_steps: int = field(1, "micro-batches per optimizer step", positive=True)
    effective_batch_size: int = field(
        0,
        "examples per optimizer step; when set, batch_size = per_device_batch_size x the"
        " data-parallel devices and grad_accum_steps = the rest (0 = use those two as given)",
        minimum=0,
    )
    per_device_batch_size: int = field(
        1, "rows per device in a micro-batch (with effective_batch_size)", positive=True
    )
    learning_rate: float = field(1e-3, "peak learning rate", positive=True)
    schedule: str = field(
        "constant",
        "learning-rate schedule: constant | linear | cosine",
        choices=("constant", "linear", "cosine"),
    )
    warmup_steps: int = field(0, "linear warm-up steps at the start of each task", minimum=0)
    weight_decay: float = field(0.0, "decoupled weight decay (AdamW)", minimum=0)
    clip_norm: float = field(1.0, "global gradient-norm clip (0 = off)", minimum=0)
    seed: int = field(42, "seed of initialisation and dropout")


@dataclasses.dataclass
class EvalConfig(_Section):
    mode: str = field(
        "generate",
        "'generate' (greedy + exact match) or 'rank' (option scoring)",
        choices=("generate", "rank"),
    )
    batch_size: int = field(32, "evaluation batch size", positive=True)
    max_new_tokens: int = field(
        50, "greedy decoding budget (a free-text task's own length, at most this)", positive=True
    )
    all_tasks: bool = field(True, "evaluate unseen tasks too (gives forward transfer)")
    general: list = field(
        [],
        "general-ability sets scored on the base model and after every task: JSON/JSONL"
        " files of multiple-choice or numeric-answer records, or benchmark dataset names"
        " (their test items, multiple choice over the options); see cljax.cl.general",
    )


@dataclasses.dataclass
class RunConfig(_Section):
    name: str = field("run", "run name (used in the output directory)")
    out_dir: str = field("runs", "parent of the run directory")
    checkpoint_every_steps: int = field(
        100, "save a mid-task checkpoint every N steps (0 = off)", minimum=0
    )
    keep_task_checkpoints: bool = field(
        False,
        "keep the checkpoint at the end of every task (else only the latest two), so that"
        " `cljax export --task` can export any task's model",
    )
    mesh: dict = field({}, "mesh axis sizes, e.g. {'data': -1} (default: data parallel)")
    rules: dict = field(
        {},
        "logical axis -> mesh axes overrides of cljax.parallel.DEFAULT_RULES, e.g."
        " {'embed': None, 'activation_batch': ['data']}",
    )
    progress: bool = field(True, "show a progress bar")
    distributed: str = field(
        "auto",
        "multi-host start-up (jax.distributed.initialize): auto (when a TPU pod / SLURM /"
        " Open MPI job or $CLJAX_COORDINATOR_ADDRESS shows several hosts) | on | off",
        choices=("auto", "on", "off"),
    )


@dataclasses.dataclass
class PretrainConfig(_Section):
    """``cljax pretrain``: the corpus, the objective and the instruction stage."""

    evaluated_order: str = field(
        "",
        "the order (order1..order6) or comma-separated tasks the base will be evaluated"
        " on: left out of the corpus, and no sentence of their test splits may be in it",
    )
    corpus_tasks: str = field(
        "auto",
        "benchmark datasets whose training sentences form the corpus (comma-separated);"
        " auto: every dataset here not in pretrain.evaluated_order; empty: none",
    )
    files: list = field([], "text (.txt paragraphs), JSON Lines or JSON files of the corpus")
    heldout_fraction: float = field(
        0.02, "corpus documents held out to measure the objective", minimum=0.0, maximum=0.5
    )
    sequence_length: int = field(
        128, "tokens per window (LLaMA) / corrupted input length (T5)", minimum=8
    )
    noise_density: float = field(
        0.15, "T5 span corruption: fraction of the tokens corrupted", minimum=0.01, maximum=0.9
    )
    mean_noise_span: float = field(3.0, "T5 span corruption: mean span length", minimum=1.0)
    sentinels: int = field(100, "T5 sentinel tokens <extra_id_N> of a trained tokenizer", minimum=1)
    steps: int = field(1000, "optimizer steps of the language-model stage", positive=True)
    eval_batches: int = field(8, "held-out batches of the objective's before/after", positive=True)
    tokenizer_vocab_size: int = field(
        4096,
        "vocabulary of the tokenizer trained on the corpus (data.tokenizer='bpe')",
        minimum=259,
    )
    instruction_steps: int = field(
        0,
        "optimizer steps of the instruction stage: all corpus tasks at once in the"
        " benchmark's prompt format (0 = no instruction stage)",
        minimum=0,
    )
    instruction_learning_rate: float = field(
        0.0, "learning rate of the instruction stage (0 = train.learning_rate)", minimum=0.0
    )
    instruction_train_per_class: int = field(
        200, "training examples per class of each instruction task", positive=True
    )
    instruction_test_per_class: int = field(
        25, "held-out examples per class of each instruction task (its accuracy)", positive=True
    )


@dataclasses.dataclass
class Config(_Section):
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    method: MethodConfig = dataclasses.field(default_factory=MethodConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def describe(cfg: Any = None, prefix: str = "") -> list[str]:
    """``key = value  # doc (default d; accepted values)`` for every field, dotted."""
    cfg = Config() if cfg is None else cfg
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe(value, f"{prefix}{f.name}.")
        else:
            lines.append(_field_line(f, value, prefix))
    return lines


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _field_line(f: dataclasses.Field, value: Any, prefix: str) -> str:
    default = _default(f)
    accepts = limits_text(f)
    extra = f"default {default!r}" + (f"; {accepts}" if accepts else "")
    return f"{prefix}{f.name} = {value!r}  # {f.metadata.get('doc', '')} ({extra})"


def load_config(path: str | Path) -> Config:
    """Run ``get_config()`` of a Python config file; ``file.py:arg`` calls
    ``get_config("arg")`` (e.g. the model family of a two-family config)."""
    text = str(path)
    arg = None
    if ":" in Path(text).name:
        text, arg = text.rsplit(":", 1)
    path = Path(text)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"cljax_config_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} defines no get_config()")
    cfg = module.get_config() if arg is None else module.get_config(arg)
    if not isinstance(cfg, Config):
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not Config")
    return cfg


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word such as seqft or float32


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    hint = annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is str and not isinstance(value, str):
        return str(value)
    if hint in (int, float, bool, dict, str) and not isinstance(value, hint):
        raise ConfigError(f"config key {key!r} expects {hint.__name__}, got {value!r}")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"config key {key!r} expects int, got {value!r}")
    return value


def set_value(cfg: Config, key: str, value: Any) -> None:
    """Set the dotted ``key`` (``section.field`` or ``section.dictfield.key...``) of
    ``cfg`` in place, checking the key and the value's type."""
    parts = key.strip().split(".")
    node: Any = cfg
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            continue
        names = {f.name for f in dataclasses.fields(node)}
        if part not in names:
            where = ".".join(parts[:depth]) or "the config"
            raise UnknownNameError(f"unknown config key {key!r}: {where} has {sorted(names)}")
        if last:
            if dataclasses.is_dataclass(getattr(node, part)):
                raise UnknownNameError(f"config key {key!r} is a section; set one of its fields")
            hints = typing.get_type_hints(type(node))
            setattr(node, part, _coerce(value, hints[part], key))
        else:
            node = getattr(node, part)


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """Apply ``section.key=value`` (or ``section.dictfield.key=value``) overrides.

    Values are Python literals (``1e-4``, ``True``, ``{'data': 8}``) or bare strings.
    Returns a new Config; ``cfg`` is not changed.
    """
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        set_value(cfg, key, _parse_value(text))
    return cfg


def for_method(cfg: Config, name: str | None = None) -> Config:
    """The config of one method's run: ``method.name`` set (if ``name`` is given) and
    that method's ``method.per_method`` entries applied on top (dotted keys, e.g.
    ``{"osf": {"train.learning_rate": 1e-5, "method.options.rank_fraction": 0.5}}``).

    The applied entry is removed from the returned ``method.per_method``, so that
    resolving the result again (``ContinualRun`` does) cannot overwrite a value set on
    it after this call."""
    cfg = copy.deepcopy(cfg)
    if name is not None:
        cfg.method.name = name
    for key, value in cfg.method.per_method.get(cfg.method.name, {}).items():
        if key.split(".")[0] == "method" and key.split(".")[1:2] == ["per_method"]:
            raise UnknownNameError(f"method.per_method[{cfg.method.name!r}] cannot set {key!r}")
        set_value(cfg, key, value)
    cfg.method.per_method = {k: v for k, v in cfg.method.per_method.items() if k != cfg.method.name}
    return cfg


def limits_text(f: dataclasses.Field) -> str:
    """The values a ``field`` accepts, in words (``one of a, b``, ``>= 0``, ``in [0, 1]``);
    empty when any value of its type is accepted."""
    meta = f.metadata
    if meta.get("choices") is not None:
        return "one of " + ", ".join(map(str, meta["choices"]))
    low, high, below = meta.get("minimum"), meta.get("maximum"), meta.get("below")
    if low is not None and below is not None:
        return f"in [{low}, {below})"
    if low is not None and high is not None:
        return f"in [{low}, {high}]"
    if meta.get("positive"):
        return "> 0" + (f" and <= {high}" if high is not None else "")
    if low is not None:
        return f">= {low}"
    return f"<= {high}" if high is not None else ""


def check_value(key: str, value: Any, f: dataclasses.Field) -> None:
    """``value`` of the config key ``key`` against the choices and range declared by its
    ``field``; the error names the key and what it accepts."""
    meta = f.metadata
    ok = True
    if meta.get("choices") is not None:
        ok = value in meta["choices"]
    elif isinstance(value, int | float) and not isinstance(value, bool):
        ok = (
            (not meta.get("positive") or value > 0)
            and (meta.get("minimum") is None or value >= meta["minimum"])
            and (meta.get("maximum") is None or value <= meta["maximum"])
            and (meta.get("below") is None or value < meta["below"])
        )
    if not ok:
        raise ConfigError(f"{key}={value!r}: must be {limits_text(f)}")


_TYPE_WORDS = {
    bool: "True or False",
    int: "an integer",
    float: "a number",
    str: "a string",
    dict: "a dict",
    list: "a list",
}


def _strict_value(value: Any, annotation: Any, key: str) -> Any:
    """``value`` checked against ``annotation`` without conversions that hide mistakes:
    an int field refuses ``2.0`` and ``True``, a bool field refuses ``"false"``; a float
    field takes an int; ``tuple[str, ...]`` takes a list or tuple of strings. Optional
    annotations also take None."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise ConfigError(f"{key}={value!r}: expects a list of strings")
    wanted = (int, float) if annotation is float else annotation
    if isinstance(value, bool) and annotation is not bool or not isinstance(value, wanted):
        raise ConfigError(f"{key}={value!r}: expects {_TYPE_WORDS[annotation]}")
    return float(value) if annotation is float else value


def build_options(options_type: type, values: dict[str, Any], prefix: str, owner: str) -> Any:
    """The frozen options dataclass ``options_type`` built from ``values`` (e.g. a
    method's ``method.options``). Unknown names are refused with the valid ones; each
    value is checked against its field's type and declared range. Errors name
    ``<prefix>.<key>`` and the ``owner`` (e.g. the method)."""
    fields = {f.name: f for f in dataclasses.fields(options_type)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UnknownNameError(
            f"unknown option(s) {unknown} for {owner}; valid: {sorted(fields) or 'none'}"
            f" (set as {prefix}.NAME=VALUE)"
        )
    hints = typing.get_type_hints(options_type)
    checked = {}
    for name, value in values.items():
        key = f"{prefix}.{name}"
        try:
            checked[name] = _strict_value(value, hints[name], key)
            check_value(key, checked[name], fields[name])
        except ConfigError as err:
            raise ConfigError(f"{err} ({owner})") from None
    return options_type(**checked)


def describe_options(options_type: type, values: dict[str, Any], prefix: str) -> list[str]:
    """``describe`` for an options dataclass, current values from ``values`` (e.g. a
    config's ``method.options``) over the defaults."""
    lines = []
    for f in dataclasses.fields(options_type):
        lines.append(_field_line(f, values.get(f.name, _default(f)), prefix))
    return lines


def validate(cfg: Config) -> Config:
    """Check every field's value against its declared choices and range, and the run's
    cross-field facts; the error names the config key. Returns ``cfg``."""
    for section in dataclasses.fields(cfg):
        node = getattr(cfg, section.name)
        hints = typing.get_type_hints(type(node))
        for f in dataclasses.fields(node):
            key = f"{section.name}.{f.name}"
            # a config file's assignments are not checked when made: check them here
            value = _strict_value(getattr(node, f.name), hints[f.name], key)
            setattr(node, f.name, value)
            check_value(key, value, f)
    if not [n for n in cfg.data.order.split(",") if n.strip()]:
        raise ConfigError("data.order is empty: name an order (order1..order6) or tasks")
    # The method's options (the methods module imports JAX: only loaded here).
    from cljax.cl.backbone import get_family
    from cljax.cl.methods import get_method_class

    try:
        get_family(cfg.model.family)
    except UnknownNameError as err:
        raise UnknownNameError(f"model.family={cfg.model.family!r}: {err}") from None
    options_type = get_method_class(cfg.method.name).Options
    build_options(options_type, cfg.method.options, "method.options", f"method {cfg.method.name!r}")
    if cfg.data.source == "tfds" and not cfg.data.tfds_data_dir:
        raise ConfigError("data.tfds_data_dir is required when data.source='tfds'")
    if cfg.data.validation_per_class and cfg.data.source == "synthetic":
        raise ConfigError(
            "data.validation_per_class applies to benchmark files (data.source=json|tfds); "
            "the synthetic tasks draw a fresh sample with another data.seed"
        )
    if not 0 <= cfg.data.holdout_fraction < 1:
        raise ConfigError(f"data.holdout_fraction={cfg.data.holdout_fraction!r} must be in [0, 1)")
    for name, entry in cfg.data.files.items():
        check_file_task(name, entry)
    stems = [Path(p).stem for p in cfg.eval.general]
    if not all(isinstance(p, str) and p for p in cfg.eval.general) or len(set(stems)) < len(stems):
        raise ConfigError(
            f"eval.general={cfg.eval.general!r}: a list of file paths with distinct names"
        )
    free_text = cfg.data.source == "trace" or bool(cfg.data.files)
    if free_text and cfg.eval.mode == "rank":
        raise ConfigError(
            "eval.mode='rank' scores a task's options; free-text tasks (data.source=trace,"
            " data.files) have none: use eval.mode=generate"
        )
    if cfg.data.chat_template and cfg.data.tokenizer == "bpe":
        raise ConfigError(
            "data.chat_template=True needs data.tokenizer to be a tokenizer directory with a"
            " chat template (the 'bpe' tokenizer trained here has none)"
        )
    return cfg


#: a ``data.files`` entry's keys and their defaults
FILE_TASK_KEYS: dict[str, Any] = {
    "train": "",
    "test": "",
    "metric": "accuracy",
    "extract": "text",
    "max_new_tokens": 0,
}


def check_file_task(name: str, entry: Any) -> dict[str, Any]:
    """A ``data.files`` entry with its defaults filled in; unknown keys, a missing file
    name, an unknown metric or answer extraction are errors naming the key."""
    from cljax.cl import scoring  # the metrics' packages: loaded only when tasks use them

    key = f"data.files.{name}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{key} must be a dict of {sorted(FILE_TASK_KEYS)}")
    unknown = sorted(set(entry) - set(FILE_TASK_KEYS))
    if unknown:
        raise UnknownNameError(f"{key}: unknown key(s) {unknown}; valid: {sorted(FILE_TASK_KEYS)}")
    task = {**FILE_TASK_KEYS, **entry}
    for split in ("train", "test"):
        if not isinstance(task[split], str) or not task[split]:
            raise ConfigError(f"{key}.{split}: the path of the task's {split} file is required")
    if task["metric"] not in scoring.METRICS:
        raise UnknownNameError(
            f"{key}.metric={task['metric']!r}: unknown metric; valid: {', '.join(scoring.METRICS)}"
        )
    if task["extract"] not in scoring.EXTRACTORS:
        raise UnknownNameError(
            f"{key}.extract={task['extract']!r}: unknown answer extraction; valid:"
            f" {', '.join(scoring.EXTRACTORS)}"
        )
    if not isinstance(task["max_new_tokens"], int) or task["max_new_tokens"] < 0:
        raise ConfigError(f"{key}.max_new_tokens must be an int >= 0 (0 = eval.max_new_tokens)")
    return task


def resolve(cfg: Config, overrides: Sequence[str] = (), method: str | None = None) -> Config:
    """The config a method actually runs with. Precedence, lowest first: the defaults,
    the config file (``cfg``), that method's ``method.per_method`` entries, the
    command-line ``overrides`` (``section.key=value``), and ``method`` (e.g. one name of
    ``--methods``). ``method.name`` is taken from ``method``, else from the overrides,
    else from ``cfg``; the overrides may also edit ``method.per_method`` itself."""
    staged = apply_overrides(cfg, overrides)
    name = method or staged.method.name
    resolved = apply_overrides(for_method(staged, name), overrides)
    resolved.method.name = name
    return validate(resolved)


# Keys that only lay a run out (devices, recomputation, output place) or show its
# progress: a run may be resumed with them changed. Any other changed key refuses to
# resume (``resume_diff``).
RESUME_EXEMPT = (
    "run.progress",
    "run.checkpoint_every_steps",
    "run.keep_task_checkpoints",
    "run.out_dir",
    "run.mesh",
    "run.rules",
    "run.distributed",
    "model.remat",
)


def flat_items(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (dict-valued fields are flattened too)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_items(value, name + "."))
        else:
            out[name] = value
    return out


def resume_diff(saved: dict[str, Any], current: Config) -> list[str]:
    """``key: saved -> current`` for every key that differs between a run's saved
    config (``config.json``) and ``current``, except ``RESUME_EXEMPT`` ones."""

    # method.per_method is not compared: the run's own entry is already applied to the
    # keys it sets (compared one by one), and the other methods' entries are not its.
    ignored = (*RESUME_EXEMPT, "method.per_method")

    def comparable(data: dict[str, Any]) -> dict[str, Any]:
        flat = flat_items(json.loads(json.dumps(data, sort_keys=True)))
        return {
            k: v
            for k, v in flat.items()
            if not any(k == e or k.startswith(e + ".") for e in ignored)
        }

    try:  # a key newer than the saved config counts as its default there
        before = comparable(config_from_dict(saved).to_dict())
    except (UnknownNameError, TypeError):  # a key cljax no longer has: shown as changed
        before = comparable(saved)
    after = comparable(current.to_dict())
    missing = object()
    return [
        f"{key}: {before.get(key, '(unset)')!r} -> {after.get(key, '(unset)')!r}"
        for key in sorted(set(before) | set(after))
        if before.get(key, missing) != after.get(key, missing)
    ]


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from ``to_dict()`` output (e.g. a run's saved config.json),
    rejecting unknown sections or keys."""
    sections = {}
    for f in dataclasses.fields(Config):
        section_cls = type(getattr(Config(), f.name))
        values = dict(data.get(f.name, {}))
        valid = {g.name for g in dataclasses.fields(section_cls)}
        unknown = set(values) - valid
        if unknown:
            raise UnknownNameError(
                f"unknown keys {sorted(unknown)} in section {f.name!r}; valid: {sorted(valid)}"
            )
        sections[f.name] = section_cls(**values)
    unknown_sections = set(data) - {f.name for f in dataclasses.fields(Config)}
    if unknown_sections:
        raise UnknownNameError(f"unknown config sections {sorted(unknown_sections)}")
    return Config(**sections)
