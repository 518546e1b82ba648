"""Multi-host on this machine: 2 processes x 4 CPU devices (localhost coordinator, CPU
collectives) give the run of 1 process x 8 devices; start-up errors name the address."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from cljax import distributed
from cljax.cl import loop
from cljax.config import load_config

REPO = Path(__file__).resolve().parents[1]

CONFIG = """
from cljax.config import Config


def get_config():
    cfg = Config()
    cfg.model.family = "llama"
    cfg.data.order = "topic,sentiment"
    cfg.data.train_per_class = 4
    cfg.data.test_per_class = 2
    cfg.data.tokenizer_vocab_size = 300
    cfg.data.length_buckets = [192]
    cfg.method.name = "osf"
    cfg.train.batch_size = 8
    cfg.train.max_steps_per_task = 2
    cfg.eval.mode = "rank"
    cfg.eval.batch_size = 8
    cfg.run.progress = False
    cfg.run.checkpoint_every_steps = 0
    cfg.run.mesh = {"fsdp": 8, "data": 1}
    return cfg
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(JAX_NUM_CPU_DEVICES=str(devices), JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cljax.cli", "run", *args]


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")
def test_two_processes_give_the_single_process_run(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG)
    port = free_port()
    procs = [
        subprocess.Popen(
            cli(
                str(config),
                "--distributed",
                f"--coordinator=127.0.0.1:{port}",
                "--num-processes=2",
                f"--process-id={i}",
                f"run.out_dir={tmp_path / 'multi'}",
                "run.name=run",
            ),
            env=process_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]

    cfg = load_config(config)
    cfg.run.out_dir, cfg.run.name = str(tmp_path / "single"), "run"
    loop.run_experiment(cfg, log=lambda _: None)

    def results(root: Path):
        acc = json.loads((root / "run" / "accuracy.json").read_text())["accuracy"]
        steps = [json.loads(line) for line in (root / "run" / "metrics.jsonl").open()]
        steps = [s for s in steps if "step" in s]
        return np.array(acc, dtype=float), np.array([s["loss"] for s in steps])

    multi_acc, multi_loss = results(tmp_path / "multi")
    single_acc, single_loss = results(tmp_path / "single")
    np.testing.assert_array_equal(multi_acc, single_acc)
    np.testing.assert_allclose(multi_loss, single_loss, rtol=1e-4)
    data = json.loads((tmp_path / "multi" / "run" / "data.json").read_text())
    assert (data["processes"], data["devices"]) == (2, 8)


def test_unreachable_coordinator_fails_with_its_address(tmp_path):
    config = tmp_path / "tiny.py"
    config.write_text(CONFIG)
    address = f"127.0.0.1:{free_port()}"
    done = subprocess.run(
        cli(
            str(config),
            "--distributed",
            f"--coordinator={address}",
            "--num-processes=2",
            "--process-id=1",
            "--init-timeout=3",
        ),
        env=process_env(4),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert address in done.stderr and "multi-host start-up failed" in done.stderr


def test_bad_distributed_settings_are_named():
    with pytest.raises(ValueError, match="run.distributed='yes'"):
        distributed.initialize("yes")
    with pytest.raises(ValueError, match="must be HOST:PORT"):
        distributed.initialize("on", coordinator="localhost", num_processes=2, process_id=0)
    with pytest.raises(ValueError, match="without --num-processes"):
        distributed.initialize("on", coordinator="localhost:1234")
    assert distributed.cluster_detected({"SLURM_NTASKS": "4"})
    assert not distributed.cluster_detected({"TPU_WORKER_HOSTNAMES": "localhost"})
    # one host, nothing detected: auto is a no-op
    assert distributed.initialize("auto") is False
