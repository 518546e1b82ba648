"""cljax: continual fine-tuning of language models (OSF, GORP and their baselines).

  cljax run CONFIG [key=value ...]       run (or resume) a continual experiment
  cljax run CONFIG --methods a,b,c       one run per method, then the comparison table
  cljax pretrain CONFIG [key=value ...]  pretrain a small base as a Hugging Face directory
  cljax compare RUN_DIR ... [--mean]     one table (and plot) over runs; --mean over seeds
  cljax export RUN_DIR OUT_DIR           a run's model as a Hugging Face directory
  cljax evaluate MODEL CONFIG            accuracy of a model on a config's tasks
  cljax config [CONFIG] [--method M]     every config field, documented, or a resolved config
  cljax methods                          the continual methods, one line each, with the paper

A CONFIG is a Python file whose get_config() returns a cljax.config.Config
(``file.py:arg`` passes an argument); ``cljax <command> --help`` shows a command's options.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence
from pathlib import Path

from cljax import config as config_lib
from cljax.errors import CljaxError, UnknownNameError

# Output places the user must fix (read-only, full, not a directory): one line each.
_UNWRITABLE = {
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENOTDIR,
}


def _load(path: str, overrides: Sequence[str]) -> config_lib.Config:
    """The config file, with the overrides checked (unknown keys, types) right away."""
    cfg = config_lib.load_config(path)
    config_lib.apply_overrides(cfg, overrides)
    return cfg


def _method_names(text: str | None) -> list[str | None]:
    """``--methods a,b,c``: every name checked before the first method starts."""
    if not text:
        return [None]
    from cljax.cl.methods import METHODS

    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise UnknownNameError(f"--methods: unknown method(s) {unknown}; valid: {sorted(METHODS)}")
    return names


def cmd_run(args: argparse.Namespace) -> int:
    from cljax import distributed
    from cljax.cl import report
    from cljax.cl.loop import run_experiment

    cfg = _load(args.config, args.overrides)
    methods = _method_names(args.methods)
    base = config_lib.resolve(cfg, args.overrides)
    # Before anything touches JAX's devices; a run's later initialize is then a no-op.
    distributed.initialize(
        "on" if args.distributed else base.run.distributed,
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        timeout=args.init_timeout,
    )
    runs = []  # every method's config resolved (and its options checked) before any run
    for method in methods:
        overrides = list(args.overrides)
        if method is not None:
            overrides.append(f"run.name={base.run.name}-{method}")
        runs.append((method, overrides, config_lib.resolve(cfg, overrides, method)))
    run_dirs = []
    for method, overrides, one in runs:
        model = one.model.checkpoint or f"{one.model.family}/{one.model.preset}"
        print(f"== {one.run.name}: {one.method.name} on {model}")
        run_experiment(cfg, overrides=overrides, method=method, restart=args.restart)
        run_dirs.append(Path(one.run.out_dir) / one.run.name)
    if len(run_dirs) > 1:
        plot = Path(base.run.out_dir) / f"{base.run.name}-compare.png"
        print(report.compare_runs(run_dirs, plot))
        print(f"plot: {plot}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cljax.cl import report

    run_dirs = [Path(d) for d in args.run_dirs]
    if args.mean:
        print(report.mean_over_seeds(run_dirs))
        return 0
    print(report.compare_runs(run_dirs, args.plot))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cljax.cl.saved import export_run

    export_run(args.run_dir, args.out_dir, task=args.task)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from cljax.pretrain.run import run_pretrain

    cfg = _load(args.config, args.overrides)
    run_pretrain(cfg, overrides=args.overrides, restart=args.restart)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from cljax.cl.saved import evaluate_model

    cfg = _load(args.config, args.overrides)
    result = evaluate_model(cfg, args.model, args.overrides)
    print(json.dumps(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.config and "=" in args.config and not Path(args.config).exists():
        # `cljax config --method osf key=value`: no config file, only overrides
        args.overrides, args.config = [args.config, *args.overrides], None
    base = config_lib.load_config(args.config) if args.config else config_lib.Config()
    # what the run will use: per-method settings applied, the command line on top
    cfg = config_lib.resolve(base, args.overrides, args.method)
    if args.json:
        print(cfg.to_json())
        return 0
    print("\n".join(config_lib.describe(cfg)))
    from cljax.cl.methods import METHODS

    # Bare `cljax config` documents every method; with a config or --method, the one it runs.
    names = [cfg.method.name] if args.config or args.method else sorted(METHODS)
    for name in names:
        options = cfg.method.options if name == cfg.method.name else {}
        print(f"options of method {name!r} (method.options.NAME=VALUE):")
        print("\n".join(_method_options(name, options)))
    return 0


def _method_options(name: str, options: dict) -> list[str]:
    """One line per option of method ``name`` (value, doc, default, accepted values);
    docs/methods.md explains them."""
    from cljax.cl.methods import get_method_class

    cls = get_method_class(name)
    lines = config_lib.describe_options(cls.Options, options, "  method.options.")
    return lines or ["  (none)"]


def cmd_methods(args: argparse.Namespace) -> int:
    from cljax.cl.methods import METHODS

    width = max(map(len, METHODS))
    for name, cls in sorted(METHODS.items()):
        print(f"{name:<{width}}  {cls.paper}")
    print("options: cljax config --method NAME; the math: docs/methods.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cljax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a continual experiment")
    run.add_argument("config", help="a Python config file defining get_config()")
    run.add_argument("overrides", nargs="*", help="section.key=value overrides")
    run.add_argument("--methods", help="comma-separated methods: one run each, then compare")
    run.add_argument(
        "--restart",
        action="store_true",
        help="clear the run directory and start over (instead of resuming it)",
    )
    run.add_argument(
        "--distributed",
        action="store_true",
        help="multi-host: join the other processes (jax.distributed.initialize)",
    )
    run.add_argument("--coordinator", help="HOST:PORT of process 0 (default: detected)")
    run.add_argument("--num-processes", type=int, help="processes in the run")
    run.add_argument("--process-id", type=int, help="this process's index")
    run.add_argument(
        "--init-timeout", type=int, default=300, help="seconds to wait for the coordinator"
    )
    run.set_defaults(func=cmd_run)
    pretrain = sub.add_parser(
        "pretrain",
        help="pretrain a small base (language model, then optional instruction stage) as a"
        " Hugging Face directory",
    )
    pretrain.add_argument("config", help="a Python config file defining get_config()")
    pretrain.add_argument("overrides", nargs="*", help="section.key=value overrides")
    pretrain.add_argument(
        "--restart", action="store_true", help="clear the run directory and start over"
    )
    pretrain.set_defaults(func=cmd_pretrain)
    compare = sub.add_parser("compare", help="one table (and plot) over several run dirs")
    compare.add_argument("run_dirs", nargs="+")
    compare.add_argument("--plot", type=Path, default=None, help="write a bar plot here")
    compare.add_argument(
        "--mean",
        action="store_true",
        help="one Markdown row per method: mean +- std over its runs (seeds)",
    )
    compare.set_defaults(func=cmd_compare)
    export = sub.add_parser(
        "export", help="a run's latest model as a Hugging Face directory (LoRA merged)"
    )
    export.add_argument("run_dir")
    export.add_argument("out_dir")
    export.add_argument(
        "--task",
        help="export the model at the end of this task (its name or 1-based number; the"
        " run needs run.keep_task_checkpoints=True unless it is one of the last two)",
    )
    export.set_defaults(func=cmd_export)
    evaluate = sub.add_parser(
        "evaluate", help="accuracy of a model (run dir or HF dir) on a config's tasks, as JSON"
    )
    evaluate.add_argument("model", help="a cljax run directory or a Hugging Face directory")
    evaluate.add_argument("config", help="the config whose tasks and evaluation to use")
    evaluate.add_argument("overrides", nargs="*")
    evaluate.add_argument("--output", help="also write the JSON here")
    evaluate.set_defaults(func=cmd_evaluate)
    show = sub.add_parser(
        "config",
        help="print every config field with its documentation, or the resolved config of"
        " CONFIG (per-method settings and overrides applied)",
    )
    show.add_argument("config", nargs="?", help="a config file (default: the defaults)")
    show.add_argument("overrides", nargs="*", help="section.key=value overrides")
    show.add_argument("--method", help="resolve for this method (its per_method settings)")
    show.add_argument("--json", action="store_true", help="the resolved config as JSON")
    show.set_defaults(func=cmd_config)
    methods = sub.add_parser("methods", help="the continual methods, one line each, with the paper")
    methods.set_defaults(func=cmd_methods)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # Line by line into a file or pipe too: a killed run's log then holds everything
    # up to the kill, not a buffer's worth less.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug anywhere on the line (`cljax run CFG --debug`), not only before the command
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    # Overrides may come after options (`run CFG --methods a,b key=value`).
    args, extra = parser.parse_known_args(argv)
    args.debug = debug
    stray = [
        a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")
    ]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (CljaxError, OSError) as err:
        # Errors of the user's input (config, data, checkpoint, a missing file or an
        # unwritable place): one clear line. Anything else is a bug: its traceback stays.
        if args.debug:
            raise
        if isinstance(err, OSError) and not isinstance(err, FileNotFoundError):
            if err.errno not in _UNWRITABLE:
                raise  # not a place the user can fix: keep the traceback
            # a write to an open file (a full disk) carries no file name
            where = err.filename or "the run's output (run.out_dir)"
            print(f"cljax: error: cannot write {where}: {err.strerror}", file=sys.stderr)
            return 2
        print(f"cljax: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
