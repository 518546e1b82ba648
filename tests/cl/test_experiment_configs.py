"""Every experiment config loads, and every method's settings in it are valid."""

from pathlib import Path

import pytest

from cljax.cl.backbone import get_family
from cljax.cl.loop import ContinualRun
from cljax.cl.methods import METHODS, get_method
from cljax.config import for_method, load_config
from cljax.errors import DataError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "experiments" / "configs").glob("*.py"))
VARIANTS = {  # configs taking an argument: every variant
    "cpu_pretrained": ("llama", "llama-long", "llama-general", "t5", "t5-long", "t5-general"),
    "pretrain_small": ("llama", "t5"),
}
CASES = [f"{p}:{v}" for p in CONFIGS for v in VARIANTS.get(p.stem, ())]
CASES += [str(p) for p in CONFIGS if p.stem not in VARIANTS]


@pytest.mark.parametrize("path", CASES, ids=lambda p: Path(p).name)
def test_config_resolves_for_every_method(path):
    base = load_config(path)
    assert set(base.method.per_method) <= set(METHODS)
    for name in METHODS:
        cfg = for_method(base, name)
        method = get_method(
            name,
            dict(cfg.method.options),
            get_family(cfg.model.family),
            weight_decay=cfg.train.weight_decay,
            seed=cfg.train.seed,
        )
        assert method.name == name


def test_published_config_without_checkpoint_fails_at_start_up(tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_T5_LARGE", str(tmp_path / "no-t5-large-here"))
    cfg = load_config(CONFIGS[[p.stem for p in CONFIGS].index("t5_large_order1")])
    cfg.data.order = "agnews"  # a task whose files exist offline
    with pytest.raises(FileNotFoundError, match="no-t5-large-here"):
        ContinualRun(for_method(cfg, "osf"), log=lambda _: None)


def test_trace_config_without_its_data_fails_at_start_up_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CLJAX_TRACE_DIR", str(tmp_path / "no-trace-here"))
    cfg = load_config(CONFIGS[[p.stem for p in CONFIGS].index("trace_llama2_7b_chat")])
    cfg.data.tokenizer = "bpe"  # no checkpoint needed to reach the data
    cfg.data.chat_template = False
    with pytest.raises(DataError, match="no-trace-here/C-STANCE: no TRACE task directory"):
        ContinualRun(for_method(cfg, "osf"), log=lambda _: None)
