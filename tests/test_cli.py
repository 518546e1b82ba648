"""The command line: documented config listing, clear one-line errors, compare."""

from pathlib import Path

import numpy as np
import pytest

from cljax import cli
from cljax.cl import report
from cljax.cl.methods import METHODS


def test_config_lists_every_field_with_its_documentation(capsys):
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert "train.learning_rate = 0.001  # peak learning rate (default 0.001; > 0)" in out
    assert "method.per_method = {}" in out
    # and every method's options (a config or --method narrows it to one method)
    for name in METHODS:
        assert f"options of method {name!r} (method.options.NAME=VALUE):" in out
    assert "method.options.lambda1 = 0.5  # weight of the orthogonality term" in out


def test_methods_prints_one_line_per_method_with_its_paper(capsys):
    assert cli.main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:-1]] == sorted(METHODS)
    assert all(cls.paper for cls in METHODS.values())
    assert "Nayak et al., arXiv 2504.07097" in lines[sorted(METHODS).index("osf")]


def test_help_lists_every_command_in_full(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("run", "pretrain", "compare", "export", "evaluate", "config", "methods"):
        assert f"  cljax {command} " in out or f"  cljax {command}\n" in out
    assert "shows a command's options." in out  # the description is not cut off


def test_config_lists_the_method_options_with_docs_defaults_and_limits(capsys):
    assert cli.main(["config", "--method", "osf", "method.options.rank_fraction=0.25"]) == 0
    out = capsys.readouterr().out
    assert (
        "method.options.rank_fraction = 0.25  # fraction of min(m, n) frozen by the fraction rule"
        " (default 0.5; in [0.0, 1.0])" in out
    )
    assert "method.options.rank_rule = 'fraction'" in out and "one of fraction, schedule" in out


def test_bad_override_is_one_clear_error(tmp_path, capsys):
    config = tmp_path / "exp.py"
    config.write_text("from cljax.config import Config\ndef get_config():\n    return Config()\n")
    assert cli.main(["run", str(config), "train.lr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cljax: error: unknown config key 'train.lr'") and "learning_rate" in err
    assert cli.main(["run", str(tmp_path / "missing.py")]) == 2
    assert "missing.py does not exist" in capsys.readouterr().err


def test_compare_prints_one_table(tmp_path, capsys):
    for name, final in (("a", 50.0), ("b", 70.0)):
        (tmp_path / name).mkdir()
        report.write_accuracy(
            tmp_path / name,
            method=name,
            tasks=["x", "y"],
            accuracy=np.array([[80.0, 10.0], [final, 90.0]]),
        )
    assert cli.main(["compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "method" and lines[4] == ""  # the table, then words
    assert lines[5].startswith("a (a): reached 85% on each task right after training on it")
    assert len(lines) == 7
    assert lines[3].split()[:3] == ["b", "(b)", "80.00"]


PER_METHOD_CONFIG = """
from cljax.config import Config


def get_config():
    cfg = Config()
    cfg.train.learning_rate = 1e-3
    cfg.method.per_method = {"seqft": {"train.learning_rate": 0.002}, "osf": {"train.epochs": 3}}
    return cfg
"""


def test_command_line_beats_per_method_settings(tmp_path, capsys):
    """defaults < config file < per_method < command line."""
    import json

    from cljax.config import load_config, resolve

    config = tmp_path / "exp.py"
    config.write_text(PER_METHOD_CONFIG)
    cfg = load_config(config)
    assert resolve(cfg).train.learning_rate == 0.002  # per_method beats the file
    assert resolve(cfg, ["train.learning_rate=5e-4"]).train.learning_rate == 5e-4
    osf = resolve(cfg, ["method.name=osf", "train.epochs=2"])
    assert (osf.method.name, osf.train.epochs, osf.train.learning_rate) == ("osf", 2, 1e-3)
    assert cli.main(["config", str(config), "--method", "osf", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["method"]["name"] == "osf" and shown["train"]["epochs"] == 3


def test_readme_override_example_runs_at_the_given_learning_rate(capsys):
    import json

    assert (
        cli.main(
            [
                "config",
                str(Path(__file__).resolve().parents[1] / "experiments/configs/t5_large_order1.py"),
                "method.name=osf",
                "train.learning_rate=2e-5",
                "--json",
            ]
        )
        == 0
    )
    shown = json.loads(capsys.readouterr().out)
    assert shown["train"]["learning_rate"] == 2e-5
    assert shown["method"]["options"]["rank_rule"] == "schedule"  # osf's own settings stay


def test_every_method_name_is_checked_before_the_first_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run.out_dir is "runs", relative
    config = tmp_path / "exp.py"
    config.write_text(PER_METHOD_CONFIG)
    assert cli.main(["run", str(config), "--methods", "seqft,osff"]) == 2
    err = capsys.readouterr().err
    assert "unknown method(s) ['osff']" in err
    assert not (tmp_path / "runs").exists()


def test_every_method_option_is_checked_before_the_first_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run.out_dir is "runs", relative
    config = tmp_path / "exp.py"
    config.write_text(PER_METHOD_CONFIG)
    bad = "method.per_method={'osf': {'method.options.rank_fraction': 2.0}}"
    assert cli.main(["run", str(config), "--methods", "seqft,osf", bad]) == 2
    err = capsys.readouterr().err
    assert "method.options.rank_fraction=2.0: must be in [0.0, 1.0] (method 'osf')" in err
    assert not (tmp_path / "runs").exists()


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """Only the user's errors become one line; an internal TypeError is re-raised."""
    import pytest

    from cljax.cl import loop

    def broken(*args, **kwargs):
        raise TypeError("internal bug")

    monkeypatch.setattr(loop, "run_experiment", broken)
    config = tmp_path / "exp.py"
    config.write_text(PER_METHOD_CONFIG)
    with pytest.raises(TypeError, match="internal bug"):
        cli.main(["run", str(config)])


def test_debug_shows_the_traceback(tmp_path):
    import pytest

    config = tmp_path / "exp.py"
    config.write_text(PER_METHOD_CONFIG)
    with pytest.raises(ValueError, match="train.epochs=0: must be > 0"):
        cli.main(["run", str(config), "train.epochs=0", "--debug"])
    assert cli.main(["run", str(config), "train.epochs=0"]) == 2


def test_an_unwritable_output_place_is_one_line_naming_it(tmp_path, capsys):
    config = tmp_path / "exp.py"
    config.write_text(PER_METHOD_CONFIG)
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the runs directory should be")
    overrides = [
        f"run.out_dir={blocker / 'runs'}",
        "data.train_per_class=2",
        "data.test_per_class=1",
    ]
    assert cli.main(["run", str(config), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cljax: error: cannot write") and "not_a_dir" in err
