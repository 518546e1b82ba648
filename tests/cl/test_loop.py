"""The continual loop end to end on tiny models and the synthetic benchmark."""

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cljax.cl import loop
from cljax.cl.methods import METHODS
from cljax.config import Config, apply_overrides
from cljax.errors import ConfigChangedError, ConfigError, NonFiniteLossError, RunLockedError
from cljax.models.layers import record_layers
from cljax.optim.osf import osf_bases
from cljax.paths import named_leaves

REPO = Path(__file__).resolve().parents[2]


def train_log(run_dir: Path) -> list[dict]:
    """The training-step entries of a run's ``metrics.jsonl`` (not the evaluations)."""
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    return [e for e in entries if "step" in e]


def tiny_config(out_dir: Path, family: str, method: str, *overrides: str) -> Config:
    """Two synthetic tasks, a couple of steps each, rank evaluation of the seen tasks."""
    cfg = Config()
    cfg.model.family = family
    cfg.data.order = "topic,sentiment"
    cfg.data.train_per_class = 4
    cfg.data.test_per_class = 2
    cfg.data.tokenizer_vocab_size = 300
    cfg.data.length_buckets = [192]
    cfg.method.name = method
    cfg.train.batch_size = 8
    cfg.train.max_steps_per_task = 2
    cfg.eval.mode = "rank"
    cfg.eval.batch_size = 8
    cfg.eval.all_tasks = False
    cfg.run.out_dir = str(out_dir)
    cfg.run.name = f"{family}-{method}"
    cfg.run.progress = False
    cfg.run.checkpoint_every_steps = 0
    cfg.run.mesh = {"data": 1}
    return apply_overrides(cfg, overrides)


def _quiet(_: str) -> None:
    pass


@pytest.mark.parametrize("family", ["llama", "t5"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_two_tasks(tmp_path, family, method):
    cfg = tiny_config(tmp_path, family, method)
    metrics = loop.run_experiment(cfg, log=_quiet)
    record = json.loads((tmp_path / cfg.run.name / "accuracy.json").read_text())
    rows = 1 if method == "mtl" else 2
    assert record["tasks_done"] == rows
    acc = np.array([[np.nan if v is None else v for v in r] for r in record["accuracy"]])
    assert acc.shape == (rows, 2)
    assert np.all(np.isfinite(acc[-1]))  # every task evaluated after the last phase
    assert 0.0 <= metrics.average_accuracy <= 100.0
    steps = train_log(tmp_path / cfg.run.name)
    assert [s["step"] for s in steps] == [1, 2] * rows
    assert all(np.isfinite(s["loss"]) for s in steps)
    if method == "pertaskft":  # earlier tasks keep their own model's accuracy
        assert acc[1, 0] == acc[0, 0]


def test_seqft_forgets_on_the_synthetic_benchmark(tmp_path):
    cfg = tiny_config(
        tmp_path,
        "llama",
        "seqft",
        "data.train_per_class=48",
        "data.test_per_class=16",
        "data.tokenizer_vocab_size=512",
        "train.max_steps_per_task=0",
        "train.epochs=8",
        "train.batch_size=16",
        "train.learning_rate=3e-3",
        "eval.all_tasks=True",
        "eval.batch_size=32",
    )
    metrics = loop.run_experiment(cfg, log=_quiet)
    record = json.loads((tmp_path / cfg.run.name / "accuracy.json").read_text())
    acc = np.array(record["accuracy"])
    assert acc[0, 0] >= 75.0  # the first task was learned ...
    assert metrics.backward_transfer <= -20.0  # ... and largely forgotten
    assert metrics.forgetting >= 20.0


def test_osf_keeps_the_frozen_directions_of_earlier_tasks(tmp_path, monkeypatch):
    cfg = tiny_config(tmp_path, "llama", "osf", "train.max_steps_per_task=5")
    run = loop.ContinualRun(cfg, log=_quiet)
    starts = {}
    begin = run.method.begin_task

    def recording_begin(t, model, calibration):
        starts[t] = {k: np.asarray(v) for k, v in named_leaves(nnx.state(model, nnx.Param)).items()}
        begin(t, model, calibration)

    monkeypatch.setattr(run.method, "begin_task", recording_begin)
    run.run()
    final = {k: np.asarray(v) for k, v in named_leaves(nnx.state(run.model, nnx.Param)).items()}
    bases = osf_bases(starts[1], 0.5, targets=run.method.targets)
    checked = 0
    for path in bases:
        delta = final[path] - starts[1][path]  # (L, d_in, d_out): Flax layout
        for layer in range(delta.shape[0]):
            w = starts[1][path][layer]
            u, s, vt = np.linalg.svd(w, full_matrices=False)
            k = min(w.shape) // 2
            d = delta[layer]
            assert np.linalg.norm(d) > 0  # it trained
            # Frozen input directions (left singular vectors of the (in, out) kernel)
            # and frozen output directions (right singular vectors) are untouched.
            assert np.linalg.norm(u[:, :k].T @ d) <= 1e-4 * np.linalg.norm(d)
            assert np.linalg.norm(d @ vt[:k].T) <= 1e-4 * np.linalg.norm(d)
            checked += 1
    assert checked >= 14  # q, k, v, o, gate, up, down x 2 layers


def test_one_and_eight_devices_give_the_same_accuracy_matrix(tmp_path):
    import jax

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    common = ("train.max_steps_per_task=3", "eval.all_tasks=True")
    one = tiny_config(tmp_path / "one", "llama", "seqft", *common)
    eight = tiny_config(tmp_path / "eight", "llama", "seqft", *common, "run.mesh={'data': 8}")
    loop.run_experiment(one, log=_quiet)
    loop.run_experiment(eight, log=_quiet)
    a = json.loads((tmp_path / "one" / one.run.name / "accuracy.json").read_text())
    b = json.loads((tmp_path / "eight" / eight.run.name / "accuracy.json").read_text())
    assert a["accuracy"] == b["accuracy"] and a["base"] == b["base"]
    la = [e["loss"] for e in train_log(tmp_path / "one" / one.run.name)]
    lb = [e["loss"] for e in train_log(tmp_path / "eight" / eight.run.name)]
    np.testing.assert_allclose(la, lb, rtol=1e-4)


def _write_config(path: Path, out_dir: Path, method: str) -> None:
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests' / 'cl')!r})\n"
        "from test_loop import tiny_config\n"
        "def get_config():\n"
        f"    return tiny_config({str(out_dir)!r}, 'llama', {method!r},\n"
        "        'train.epochs=6', 'train.max_steps_per_task=12',\n"
        "        'run.checkpoint_every_steps=2',\n"
        "        'run.name=resume')\n"
    )


@pytest.mark.parametrize("method", ["inclora"])
def test_resume_after_sigkill_gives_the_same_accuracy_matrix(tmp_path, method):
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "cljax.cli", "run"]
    reference = tmp_path / "reference.py"
    _write_config(reference, tmp_path / "ref", method)
    subprocess.run([*command, str(reference)], env=env, check=True, capture_output=True)

    interrupted = tmp_path / "interrupted.py"
    _write_config(interrupted, tmp_path / "int", method)
    ckpt_dir = tmp_path / "int" / "resume" / "checkpoints"
    proc = subprocess.Popen(
        [*command, str(interrupted)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    # Kill it once a checkpoint of the second task exists (mid-sequence, mid-task).
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()]
        if any(s > 12 for s in steps):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (
        not (tmp_path / "int" / "resume" / "accuracy.json").exists()
        or json.loads((tmp_path / "int" / "resume" / "accuracy.json").read_text())["tasks_done"] < 2
    )
    result = subprocess.run(
        [*command, str(interrupted)], env=env, check=True, capture_output=True, text=True
    )
    assert "resuming" in result.stdout
    ref = json.loads((tmp_path / "ref" / "resume" / "accuracy.json").read_text())
    got = json.loads((tmp_path / "int" / "resume" / "accuracy.json").read_text())
    assert got["accuracy"] == ref["accuracy"]
    assert got["tasks_done"] == 2
    # the log after the kill and resume: every step once, in order, with the same losses

    def log(root):
        return [json.loads(line) for line in (root / "resume" / "metrics.jsonl").open()]

    ref_log, got_log = log(tmp_path / "ref"), log(tmp_path / "int")
    assert [e["global_step"] for e in got_log] == [e["global_step"] for e in ref_log]
    assert [e.get("eval") for e in got_log] == [e.get("eval") for e in ref_log]
    np.testing.assert_allclose(
        [e["loss"] for e in got_log if "step" in e], [e["loss"] for e in ref_log if "step" in e]
    )
    # TensorBoard shows the same: every step once (the resumed writer purges the
    # killed run's events after the checkpoint), the same values
    ref_tb, got_tb = _tensorboard_scalars(tmp_path / "ref"), _tensorboard_scalars(tmp_path / "int")
    assert sorted(got_tb) == sorted(ref_tb) and "loss/synth_sentiment" in got_tb
    for tag, points in ref_tb.items():
        assert [step for step, _ in got_tb[tag]] == [step for step, _ in points], tag
        if tag != "train/tokens_per_s":  # a speed: differs between runs
            got = [v for _, v in got_tb[tag]]
            np.testing.assert_allclose(got, [v for _, v in points], rtol=1e-5, err_msg=tag)


def _tensorboard_scalars(root: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars TensorBoard would show, per tag in step order: event files read in
    the order written, a writer's SessionLog START at step s hiding the earlier events
    at steps >= s (TensorBoard's purge)."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    shown: dict[str, list[tuple[int, float]]] = {}
    for path in sorted((root / "resume" / "tensorboard").glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):  # TFRecord: length (8), its crc (4), data, crc (4)
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 16 + length
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                for tag, points in shown.items():
                    shown[tag] = [(s, v) for s, v in points if s < event.step]
            for value in event.summary.value:
                shown.setdefault(value.tag, []).append((event.step, value.simple_value))
    return {tag: sorted(points, key=lambda p: p[0]) for tag, points in shown.items()}


def test_bad_input_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        loop.ContinualRun(tiny_config(tmp_path, "llama", "sgd"), log=_quiet)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['rank_fractoin'\]"):
        loop.ContinualRun(
            tiny_config(tmp_path, "llama", "osf", "method.options.rank_fractoin=0.3"), log=_quiet
        )
    with pytest.raises(
        ConfigError, match=r"method.options.targets \(osf\): OSF target pattern .nonexistent_proj."
    ):
        loop.ContinualRun(
            tiny_config(tmp_path, "llama", "osf", "method.options.targets=['nonexistent_proj']"),
            log=_quiet,
        )
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        loop.ContinualRun(
            tiny_config(
                tmp_path, "llama", "seqft", f"data.tokenizer={tmp_path / 'no_such_tokenizer'}"
            ),
            log=_quiet,
        )
    with pytest.raises((FileNotFoundError, ValueError), match="no_such_dir"):
        loop.ContinualRun(
            tiny_config(
                tmp_path,
                "llama",
                "seqft",
                "data.source=json",
                "data.order=agnews",
                f"data.data_dir={tmp_path / 'no_such_dir'}",
            ),
            log=_quiet,
        )


def test_non_finite_training_stops_with_task_and_step(tmp_path):
    cfg = tiny_config(
        tmp_path,
        "llama",
        "seqft",
        "train.learning_rate=1e300",
        "train.clip_norm=0.0",
        "run.checkpoint_every_steps=1",
    )
    with pytest.raises(NonFiniteLossError) as err:
        loop.run_experiment(cfg, log=_quiet)
    assert "task 'synth_topic' (phase 0) at step 1 (global step 1); no checkpoint was saved" in (
        str(err.value)
    )
    # No checkpoint was written from the broken weights.
    assert not list((tmp_path / cfg.run.name / "checkpoints").glob("[0-9]*"))


def test_runs_from_a_hugging_face_checkpoint_directory(tmp_path):
    from cljax.cl.backbone import get_family
    from cljax.models.convert import export_hf_checkpoint

    cfg = tiny_config(tmp_path, "llama", "seqft")
    run = loop.ContinualRun(cfg, log=_quiet)  # a random tiny model sized for the tokenizer
    export_hf_checkpoint(run.model, run.model_cfg, tmp_path / "hf")
    from_dir = apply_overrides(
        cfg, [f"model.checkpoint={tmp_path / 'hf'}", "run.name=from_checkpoint"]
    )
    loaded = loop.ContinualRun(from_dir, log=_quiet)
    for path, value in named_leaves(nnx.state(run.model, nnx.Param)).items():
        np.testing.assert_array_equal(
            np.asarray(value), np.asarray(named_leaves(nnx.state(loaded.model, nnx.Param))[path])
        )
    assert loaded.run().average_accuracy >= 0.0
    wrong = apply_overrides(from_dir, ["model.family=t5"])
    with pytest.raises(ValueError, match="model.family is 't5'"):
        get_family("t5").build(wrong.model, run.data.tokenizer, nnx.Rngs(0))


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_osf_importance_rule_from_calibration_batches(tmp_path, family):
    from cljax.cl.methods import layer_importance

    cfg = tiny_config(
        tmp_path,
        family,
        "osf",
        "method.options.rank_rule=importance",
        "method.options.calibration_batches=2",
        "method.options.mrr=0.5",
        "method.options.trr=1.0",
    )
    run = loop.ContinualRun(cfg, log=_quiet)
    batches = run._calibration(1)
    assert len(batches) == 2
    per_stack = layer_importance(run.family, run.model, batches)
    stacks = ["layers"] if family == "llama" else ["encoder/layers", "decoder/layers"]
    assert sorted(per_stack) == sorted(stacks)
    # By hand for the first stack, layer 0, over both batches' real tokens.
    with record_layers() as records:
        run.family.logits(run.model, jax.tree.map(jnp.asarray, batches[0]))
    stacked, index, x, y = records[0]
    x, y = np.asarray(jax.tree.leaves(x)[0]), np.asarray(jax.tree.leaves(y)[0])
    mask = np.asarray(run.family.layer_masks(batches[0])[stacks[0]], bool)
    cos = (x * y).sum(-1) / (np.linalg.norm(x, axis=-1) * np.linalg.norm(y, axis=-1))
    first = cos[mask].mean()
    with record_layers() as records:
        run.family.logits(run.model, jax.tree.map(jnp.asarray, batches[1]))
    x2, y2 = (np.asarray(jax.tree.leaves(v)[0]) for v in records[0][2:])
    mask2 = np.asarray(run.family.layer_masks(batches[1])[stacks[0]], bool)
    cos2 = (x2 * y2).sum(-1) / (np.linalg.norm(x2, axis=-1) * np.linalg.norm(y2, axis=-1))
    expected = np.concatenate([cos[mask], cos2[mask2]]).mean()
    assert first != 0
    np.testing.assert_allclose(per_stack[stacks[0]][0], expected, rtol=1e-5)
    # The ranks by hand: I = layer score / mean over every layer of every stack (each
    # layer holds the same number of targets), k = rint((mrr + I (trr - mrr)) d).
    params = nnx.state(run.model, nnx.Param)
    ranks = run.method._importance_ranks(run.model, params, lambda: batches)
    mean = np.mean(np.concatenate([per_stack[s] for s in stacks]))
    shapes = {p: v.shape for p, v in named_leaves(params).items()}
    assert len(ranks) == (7 if family == "llama" else 14)
    for path, k in ranks.items():
        stack = next(s for s in stacks if path.startswith(s + "/"))
        d = min(shapes[path][-2:])
        expected = np.clip(np.rint((0.5 + 0.5 * per_stack[stack] / mean) * d), 0, d)
        np.testing.assert_array_equal(k, expected, err_msg=path)
    run.run()  # and a whole run with the rule


def test_osf_importance_run_resumes_mid_task_with_the_same_result(tmp_path, monkeypatch):
    from cljax.cl.checkpoint import RunCheckpointer

    common = (
        "method.options.rank_rule=importance",
        "method.options.calibration_batches=2",
        "train.epochs=3",
        "train.max_steps_per_task=6",
        "run.checkpoint_every_steps=2",
    )
    reference = tiny_config(tmp_path / "ref", "llama", "osf", *common)
    loop.run_experiment(reference, log=_quiet)
    interrupted = tiny_config(tmp_path / "int", "llama", "osf", *common)
    save = RunCheckpointer.save

    def save_then_die(self, step, state, record, **kwargs):
        save(self, step, state, record, **kwargs)
        if step == 8:  # mid second task, after its importance ranks were computed
            raise KeyboardInterrupt

    monkeypatch.setattr(RunCheckpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        loop.run_experiment(interrupted, log=_quiet)
    monkeypatch.setattr(RunCheckpointer, "save", save)
    loop.run_experiment(interrupted, log=_quiet)
    ref = json.loads((tmp_path / "ref" / reference.run.name / "accuracy.json").read_text())
    got = json.loads((tmp_path / "int" / interrupted.run.name / "accuracy.json").read_text())
    assert got["accuracy"] == ref["accuracy"]


def test_osf_freeze_trains_only_the_targets(tmp_path):
    cfg = tiny_config(tmp_path, "llama", "osf", "method.options.untargeted=freeze")
    run = loop.ContinualRun(cfg, log=_quiet)
    before = {k: np.asarray(v) for k, v in named_leaves(nnx.state(run.model, nnx.Param)).items()}
    run.run()
    after = named_leaves(nnx.state(run.model, nnx.Param))
    changed = {k for k, v in after.items() if not np.array_equal(np.asarray(v), before[k])}
    assert changed == {k for k in before if k.endswith("_proj/kernel")}
    with pytest.raises(ValueError, match="untargeted='frz'"):
        loop.ContinualRun(
            tiny_config(tmp_path, "llama", "osf", "method.options.untargeted=frz"), log=_quiet
        )


def test_resume_refuses_a_changed_config_and_restart_starts_over(tmp_path):
    # an effective batch of 8: 4 rows x 2 accumulated on 1 device, 4 x 1 on 2 devices
    cfg = tiny_config(
        tmp_path, "llama", "seqft", "train.effective_batch_size=8", "train.per_device_batch_size=4"
    )
    first = loop.run_experiment(cfg, log=_quiet)
    saved = (tmp_path / cfg.run.name / "config.json").read_text()
    for overrides, shown in (
        (["train.seed=7", "data.seed=7"], "train.seed: 42 -> 7"),
        (["data.order=sentiment,topic"], "data.order: 'topic,sentiment' -> 'sentiment,topic'"),
        (["method.name=osf"], "method.name: 'seqft' -> 'osf'"),
    ):
        with pytest.raises(ConfigChangedError, match=re.escape(shown)):
            loop.run_experiment(cfg, overrides=overrides, log=_quiet)
        # the saved config is untouched by a refused attempt
        assert (tmp_path / cfg.run.name / "config.json").read_text() == saved
    # layout and progress keys may change (the batch layout they derive too): the
    # finished run is simply reported again
    layout = ["run.progress=True", "run.checkpoint_every_steps=5", "run.mesh={'data': 2}"]
    again = loop.run_experiment(cfg, overrides=layout, log=_quiet)
    assert again.average_accuracy == first.average_accuracy
    # a config.json written before a key existed: the key counts as its default
    path = tmp_path / cfg.run.name / "config.json"
    older = json.loads(path.read_text())
    del older["pretrain"], older["run"]["keep_task_checkpoints"]
    path.write_text(json.dumps(older))
    assert loop.run_experiment(cfg, log=_quiet).average_accuracy == first.average_accuracy
    loop.run_experiment(cfg, overrides=["train.seed=7"], restart=True, log=_quiet)
    assert json.loads((tmp_path / cfg.run.name / "config.json").read_text())["train"]["seed"] == 7
    steps = train_log(tmp_path / cfg.run.name)
    assert [s["step"] for s in steps] == [1, 2, 1]  # only the restarted run's log


def test_a_live_lock_refuses_a_second_writer_and_a_stale_one_is_taken_over(tmp_path):
    import socket

    cfg = tiny_config(tmp_path, "llama", "seqft")
    run_dir = tmp_path / cfg.run.name
    run_dir.mkdir(parents=True)
    lock = run_dir / ".lock"
    holder = {"host": socket.gethostname(), "pid": os.getpid()}  # a live process
    lock.write_text(json.dumps(holder))
    with pytest.raises(RunLockedError, match=f"process {os.getpid()} on {holder['host']}"):
        loop.run_experiment(cfg, log=_quiet)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({**holder, "pid": dead.pid}))
    messages = []
    loop.run_experiment(cfg, log=messages.append)
    assert any("taking over the stale lock" in m for m in messages)
    assert not lock.exists()  # released at the end


def _truncate_arrays(step_dir: Path) -> None:
    """Cut every array data file of a checkpoint step in half (a crash mid-write)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for path in files:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = tiny_config(tmp_path, "llama", "seqft", "run.checkpoint_every_steps=1")
    reference = loop.run_experiment(cfg, log=_quiet)
    ckpt_dir = tmp_path / cfg.run.name / "checkpoints"
    latest = max(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
    _truncate_arrays(ckpt_dir / str(latest))
    messages = []
    again = loop.run_experiment(cfg, log=messages.append)
    assert any(f"{latest} is unreadable" in m and "previous" in m for m in messages)
    assert (ckpt_dir / f"corrupt-{latest}").is_dir()
    assert again.average_accuracy == reference.average_accuracy
    # none readable: one error naming the directory, nothing deleted
    for p in ckpt_dir.iterdir():
        if p.name.isdigit():
            _truncate_arrays(p)
    with pytest.raises(loop.CljaxError, match=f"no readable checkpoint in {ckpt_dir}"):
        loop.run_experiment(cfg, log=_quiet)


def test_missing_datasets_are_an_error_or_skipped_and_recorded(benchmark_dir, gpt2_tokenizer_dir):
    from cljax.config import Config

    cfg = Config()
    cfg.data.source = "json"
    cfg.data.data_dir = str(benchmark_dir)
    cfg.data.order = "yahoo,agnews"  # yahoo ships no split files here
    cfg.data.tokenizer = str(gpt2_tokenizer_dir)
    cfg.data.train_per_class = 2
    cfg.data.test_per_class = 2
    with pytest.raises(FileNotFoundError, match="'yahoo'.*data.missing=skip"):
        loop.load_benchmark_data(cfg)
    cfg.data.missing = "skip"
    data = loop.load_benchmark_data(cfg)
    assert data.names == ("agnews",)
    assert [s["dataset"] for s in data.skipped] == ["yahoo"]
    # a missing benchmark root is an error even with skip (not "no dataset left")
    cfg.data.data_dir = str(benchmark_dir / "nowhere")
    with pytest.raises(FileNotFoundError, match="benchmark data directory not found"):
        loop.load_benchmark_data(cfg)


def test_piped_output_has_progress_lines_and_the_log_has_evaluations(tmp_path):
    config = tmp_path / "tiny.py"
    _write_config(config, tmp_path / "out", "seqft")
    env = {**os.environ, "JAX_NUM_CPU_DEVICES": "1", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [
            *(sys.executable, "-m", "cljax.cli", "run", str(config)),
            *("run.progress=True", "train.max_steps_per_task=4", "run.checkpoint_every_steps=0"),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    # not a terminal: plain progress lines, no bar redrawn with carriage returns
    assert "\r" not in done.stdout + done.stderr
    assert re.search(r"step \d+/\d+ \(100%\), loss", done.stdout)
    entries = [json.loads(line) for line in (tmp_path / "out" / "resume" / "metrics.jsonl").open()]
    steps = [e for e in entries if "step" in e]
    assert all(e["grad_norm"] > 0 and e["learning_rate"] > 0 for e in steps)
    assert all(e["tokens_per_s"] > 0 for e in steps)
    evaluations = [e for e in entries if "eval" in e]
    assert len(evaluations) == 2 and "average_accuracy" in evaluations[-1]
    assert set(evaluations[-1]["eval"]) == {"synth_topic", "synth_sentiment"}


@pytest.mark.parametrize(
    "method,option,message",
    [
        (
            "osf",
            "rank_fraction=2.0",
            r"rank_fraction=2.0: must be in \[0.0, 1.0\] \(method 'osf'\)",
        ),
        ("osf", "calibration_batches=2.0", "calibration_batches=2.0: expects an integer"),
        ("osf", "rank_rule=adaptive", "rank_rule='adaptive': must be one of fraction, schedule"),
        ("olora", "lora_rank='abc'", "lora_rank='abc': expects an integer"),
        ("gorp", "use_shared_space='false'", "use_shared_space='false': expects True or False"),
        ("gorp", "threshold=1.5", r"threshold=1.5: must be > 0 and <= 1.0 \(method 'gorp'\)"),
        ("gorp", "threshold=0.0", r"threshold=0.0: must be > 0 and <= 1.0"),
        ("seqlora", "lora_dropout=1.0", r"lora_dropout=1.0: must be in \[0.0, 1.0\)"),
        ("gorp", "full_targets='q'", "full_targets='q': expects a list of strings"),
        ("replay", "buffer_per_task=-1", "buffer_per_task=-1: must be >= 0"),
    ],
)
def test_method_options_are_typed_and_checked_at_start_up(tmp_path, method, option, message):
    cfg = tiny_config(tmp_path, "llama", method, f"method.options.{option}")
    with pytest.raises(ValueError, match=f"method.options.{message}"):
        loop.ContinualRun(cfg, log=_quiet)
    assert not (tmp_path / cfg.run.name).exists()  # before any work


def test_the_loop_serves_what_a_method_declares_it_needs(tmp_path, monkeypatch):
    """Calibration batches of the previous or the current task, and Fisher batches,
    come from ``Method.needs()``: the loop reads no option name."""
    from cljax.cl.methods import Needs, SeqFT

    seen = []

    def needs(self):
        return Needs(calibration=2, calibration_task="current", fisher=3)

    def begin_task(self, t, model, calibration):
        seen.append(("calibration", t, len(list(calibration()))))

    def end_task(self, t, model, opt_state, fisher):
        leaves = jax.tree.leaves(fisher())
        seen.append(("fisher", t, all(bool(jnp.all(x >= 0)) for x in leaves)))
        return opt_state

    monkeypatch.setattr(SeqFT, "needs", needs)
    monkeypatch.setattr(SeqFT, "begin_task", begin_task)
    monkeypatch.setattr(SeqFT, "end_task", end_task)
    loop.run_experiment(tiny_config(tmp_path, "llama", "seqft"), log=_quiet)
    # the current task's batches from the first task on; the Fisher after each task
    assert seen == [
        ("calibration", 0, 2),
        ("fisher", 0, True),
        ("calibration", 1, 2),
        ("fisher", 1, True),
    ]


@pytest.mark.parametrize("method", ["osf", "gorp"])
def test_gradient_accumulation_runs_through_every_hook(tmp_path, method):
    """optax.MultiSteps around a transform whose state the method reads between tasks
    (GORP's shared space) or that it rebuilds per task (OSF's bases)."""
    cfg = tiny_config(tmp_path, "llama", method, "train.grad_accum_steps=2", "train.batch_size=4")
    loop.run_experiment(cfg, log=_quiet)
    run_dir = tmp_path / f"llama-{method}"
    steps = train_log(run_dir)
    # optimizer steps of 2 micro-batches of 4: the first task's 12 examples give 2 (the
    # step cap), the second's 8 give 1
    assert [(e["phase"], e["step"]) for e in steps] == [(0, 1), (0, 2), (1, 1)]
    assert all(np.isfinite(e["loss"]) for e in steps)
    assert json.loads((run_dir / "accuracy.json").read_text())["tasks_done"] == 2
