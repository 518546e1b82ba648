"""The command line: documented config listing, clear one-line errors, compare."""

import numpy as np

from cljax import cli
from cljax.cl import report


def test_config_lists_every_field_with_its_documentation(capsys):
    assert cli.main(["config"]) == 0
    out = capsys.readouterr().out
    assert "train.learning_rate = 0.001: peak learning rate" in out
    assert "method.per_method = {}" in out


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
    assert lines[0].split()[0] == "method" and len(lines) == 4
    assert lines[3].split()[:3] == ["b", "(b)", "80.00"]
