"""Models on disk after (or outside) a run: restore a run directory's latest model,
export it as a Hugging Face directory, evaluate any model on a config's tasks.

``cljax export RUN_DIR OUT_DIR`` and ``cljax evaluate MODEL CONFIG`` are these functions.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cljax import parallel
from cljax.cl.checkpoint import RunCheckpointer
from cljax.cl.loop import ContinualRun, Position
from cljax.config import Config, config_from_dict
from cljax.errors import CljaxError, UnknownNameError
from cljax.models import lora
from cljax.models.convert import export_hf_checkpoint

# The files of a Hugging Face tokenizer directory that an export carries over.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "tokenizer.model",
)


def copy_tokenizer_files(tokenizer_dir: str | Path, out: Path) -> None:
    """The Hugging Face tokenizer files of ``tokenizer_dir`` into the export ``out``."""
    for name in TOKENIZER_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copy(Path(tokenizer_dir) / name, out / name)


def restore_run(
    run_dir: str | Path, log: Callable[[str], None] = print, task: str | None = None
) -> tuple[ContinualRun, Position]:
    """The run of ``run_dir`` (its saved ``config.json``) with the model of its latest
    checkpoint, or of the end of ``task`` (a task name or its 1-based number in the
    order); returns the run and where that checkpoint is in the sequence."""
    run_dir = Path(run_dir)
    config_file = run_dir / "config.json"
    if not config_file.is_file():
        raise CljaxError(f"{run_dir} is not a cljax run directory (no config.json)")
    cfg = config_from_dict(json.loads(config_file.read_text()))
    cfg.run.out_dir, cfg.run.name = str(run_dir.parent), run_dir.name
    run = ContinualRun(cfg, log=log)
    with RunCheckpointer(run_dir / "checkpoints") as ckpt, parallel.use_mesh(run.mesh, run.rules):
        step = ckpt.latest_step() if task is None else _task_end_step(ckpt, run, task)
        if step is None:
            raise CljaxError(f"no checkpoint in {ckpt.directory}")
        record = ckpt.read_record(step)
        pos = Position.from_record(record)
        method = run.method
        if not pos.phase_done:
            method.restore_record(record.get("method", {}))
        for phase in range(pos.phase + 1):  # the structure the arrays were saved in
            method.prepare(phase, run.model, run.rngs)
        opt_like = None
        if not pos.phase_done or method.carries_optimizer_state:
            # the saved optimizer state is part of the checkpoint: restore it alongside
            if not pos.phase_done:
                method.begin_task(pos.phase, run.model, lambda: [])
            opt_like = run._fresh_optimizer(pos.phase)[1]
        run._restore(ckpt, step, opt_like)
    return run, pos


def _task_end_step(ckpt: RunCheckpointer, run: ContinualRun, task: str) -> int:
    """The checkpoint step saved at the end of ``task`` (a name or a 1-based number)."""
    names = list(run.data.names)
    if run.method.joint:
        raise CljaxError(f"a {run.method.name} run trains one model on all tasks: omit --task")
    if task in names:
        phase = names.index(task)
    elif task.isdigit() and 1 <= int(task) <= len(names):
        phase = int(task) - 1
    else:
        raise UnknownNameError(f"--task {task!r}: not a task of the run; tasks: {names}")
    for step in ckpt.all_steps():
        record = ckpt.read_record(step)
        if record["phase"] == phase and record["phase_done"]:
            return step
    raise CljaxError(
        f"the checkpoint at the end of task {names[phase]!r} is not in {ckpt.directory}"
        " (only the latest two are kept: run with run.keep_task_checkpoints=True)"
    )


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
    task: str | None = None,
) -> Path:
    """The latest model of a run (or the model at the end of ``task``, a name or a
    1-based number) as a Hugging Face directory (``config.json``, safetensors, the
    run's tokenizer files), LoRA pairs merged into their weights, so that
    ``transformers`` ``from_pretrained`` and ``model.checkpoint=`` load it."""
    run, pos = restore_run(run_dir, log, task)
    merged = lora.merge_lora(run.model)
    if merged:
        log(f"merged LoRA pairs into {len(merged)} weights")
    out = export_hf_checkpoint(run.model, run.model_cfg, out_dir)
    copy_tokenizer_files(run.data.tokenizer.path, out)
    where = "end of" if pos.phase_done else f"step {pos.step} of"
    log(f"exported the model at the {where} phase {pos.phase} to {out}")
    return out


def evaluate_model(
    cfg: Config,
    model: str | Path,
    overrides: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Accuracy of ``model`` (a run directory or a Hugging Face directory) on every task
    of ``cfg``: ``{"tasks": [...], "accuracy": [...], "model": str}``. The model's own
    tokenizer encodes the tasks (the run's, or the directory's tokenizer files), unless
    ``overrides`` name one (``data.tokenizer=...``)."""
    model = Path(model)
    if (model / "config.json").is_file() and (model / "checkpoints").is_dir():
        run, _ = restore_run(model, log)
        # the run's model and tokenizer, the config's tasks and evaluation settings
        own = [f"data.tokenizer={run.data.tokenizer.path}", "eval.all_tasks=True"]
        evaluated = ContinualRun(cfg, overrides=[*own, *overrides], log=log)
        evaluated.model = run.model
    else:
        own = [f"model.checkpoint={model}", "eval.all_tasks=True"]
        if any((model / name).is_file() for name in TOKENIZER_FILES):
            own.append(f"data.tokenizer={model}")
        evaluated = ContinualRun(cfg, overrides=[*own, *overrides], log=log)
    with parallel.use_mesh(evaluated.mesh, evaluated.rules):
        row = evaluated.evaluate_row(len(evaluated.data.names))
    return {
        "model": str(model),
        "tasks": list(evaluated.data.names),
        "accuracy": [None if np.isnan(v) else float(v) for v in row],
    }
