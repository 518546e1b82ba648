"""Runs on disk: export a run's model as a Hugging Face directory (LoRA merged) that
transformers loads with the same logits; evaluate a run or an HF directory on a config."""

import json

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoModelForCausalLM

from cljax import cli
from cljax.cl import loop, saved
from cljax.cl.checkpoint import RunCheckpointer
from cljax.models.convert import load_hf_checkpoint
from tests.cl.test_loop import tiny_config


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished two-task O-LoRA run (rank evaluation of every task), checkpointed every
    step with the task ends kept."""
    root = tmp_path_factory.mktemp("runs")
    cfg = tiny_config(
        root,
        "llama",
        "olora",
        "eval.all_tasks=True",
        "run.checkpoint_every_steps=1",
        "run.keep_task_checkpoints=True",
    )
    loop.run_experiment(cfg, log=lambda _: None)
    return cfg, root / cfg.run.name


def test_export_merges_lora_and_transformers_loads_it(finished_run, tmp_path):
    cfg, run_dir = finished_run
    out = tmp_path / "hf"
    assert cli.main(["export", str(run_dir), str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    run, _ = saved.restore_run(run_dir, log=lambda _: None)
    run.model.eval()  # no LoRA dropout
    ids = np.array([[1, 5, 9, 3, 7, 2]], np.int32)
    expected = np.asarray(nnx.jit(lambda m, x: m(x))(run.model, ids))  # LoRA pairs applied
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = hf(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=2e-4)
    model, _ = load_hf_checkpoint(out)  # and model.checkpoint= takes it too
    np.testing.assert_allclose(np.asarray(model(ids)), expected, atol=2e-4, rtol=2e-4)


def test_evaluate_a_run_and_its_export_on_the_config(finished_run, tmp_path, capsys):
    cfg, run_dir = finished_run
    final = json.loads((run_dir / "accuracy.json").read_text())["accuracy"][-1]
    result = saved.evaluate_model(cfg, run_dir, log=lambda _: None)
    assert result["tasks"] == ["synth_topic", "synth_sentiment"]
    assert result["accuracy"] == final
    out = tmp_path / "hf"
    saved.export_run(run_dir, out, log=lambda _: None)
    assert cli.main(["evaluate", str(out), str(_config_file(tmp_path, cfg))]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["accuracy"] == final
    # a config on other tasks: its own "bpe" tokenizer would differ; the model's is used
    one_task = saved.evaluate_model(cfg, out, ["data.order=topic"], log=lambda _: None)
    assert one_task["tasks"] == ["synth_topic"] and one_task["accuracy"] == final[:1]


def test_export_the_model_of_a_chosen_task(finished_run, tmp_path, capsys):
    cfg, run_dir = finished_run
    accuracy = json.loads((run_dir / "accuracy.json").read_text())["accuracy"]
    # task 1's end is older than the latest two checkpoints: kept by the option
    assert len(RunCheckpointer(run_dir / "checkpoints").all_steps()) == 3
    out = tmp_path / "after-task-1"
    assert cli.main(["export", str(run_dir), str(out), "--task", "synth_topic"]) == 0
    result = saved.evaluate_model(cfg, out, log=lambda _: None)
    assert result["accuracy"] == accuracy[0]  # the model as it was after task 1
    assert cli.main(["export", str(run_dir), str(tmp_path / "x"), "--task", "3"]) == 2
    assert "'3': not a task of the run; tasks: ['synth_topic', 'synth_sentiment']" in (
        capsys.readouterr().err
    )


def _config_file(tmp_path, cfg):
    path = tmp_path / "exp.py"
    path.write_text(
        "import json\n"
        "from cljax.config import config_from_dict\n"
        f"DATA = json.loads({cfg.to_json()!r})\n"
        "def get_config():\n"
        "    cfg = config_from_dict(DATA)\n"
        "    cfg.data.tokenizer = 'bpe'\n"
        "    return cfg\n"
    )
    return path
