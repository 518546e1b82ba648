"""Multi-host start-up: ``jax.distributed.initialize`` when a run asks for it.

A run on several hosts (a TPU pod slice, several GPU machines) is one JAX program per
host; the hosts find each other through a coordinator. ``initialize`` connects them:

- ``mode="on"`` (``cljax run --distributed``): always. The coordinator comes from
  ``coordinator`` / ``num_processes`` / ``process_id`` (``--coordinator HOST:PORT
  --num-processes N --process-id I``) or ``$CLJAX_COORDINATOR_ADDRESS``,
  ``$CLJAX_NUM_PROCESSES``, ``$CLJAX_PROCESS_ID``; without any, JAX detects the cluster
  itself (TPU pods, SLURM, Open MPI).
- ``mode="auto"`` (the default): only where a cluster is evident: an explicit
  coordinator, a TPU VM of a multi-host slice, SLURM or Open MPI with more than one
  task.
- ``mode="off"``: never (one host).

A coordinator that cannot be reached fails after ``timeout`` seconds with its address in
the message, before any work starts.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Mapping

import jax

from cljax.errors import ConfigError, StartupError

MODES = ("auto", "on", "off")


def cluster_detected(env: Mapping[str, str] | None = None) -> bool:
    """Whether the environment shows a multi-host job JAX can detect on its own."""
    env = os.environ if env is None else env
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    counts = (env.get("SLURM_NTASKS", "1"), env.get("OMPI_COMM_WORLD_SIZE", "1"))
    return "," in hosts or any(c.isdigit() and int(c) > 1 for c in counts)


def _int_setting(value: int | None, variable: str, flag: str) -> int | None:
    if value is not None:
        return value
    text = os.environ.get(variable)
    if text is None:
        return None
    if not text.isdigit():
        raise ConfigError(f"${variable}={text!r} must be a non-negative integer ({flag})")
    return int(text)


def wait_for_coordinator(
    address: str, timeout: float, process_id: int | None = None, num_processes: int | None = None
) -> None:
    """Wait until something listens at ``address`` (HOST:PORT); ``StartupError`` naming
    it after ``timeout`` seconds."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise StartupError(
                    f"multi-host start-up failed: could not reach the coordinator {address}"
                    f" within {timeout:g} s (process {process_id} of {num_processes}): {err}"
                ) from err
            time.sleep(0.25)


def initialize(
    mode: str = "auto",
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout: int = 300,
) -> bool:
    """Connect this process to the others of a multi-host run (see the module doc).
    Returns True when this call initialised ``jax.distributed``, False when it was
    not needed or had already been done. Call before anything touches JAX's devices."""
    if mode not in MODES:
        raise ConfigError(f"run.distributed={mode!r}; valid: {list(MODES)}")
    if mode == "off" or jax.distributed.is_initialized():
        return False
    coordinator = coordinator or os.environ.get("CLJAX_COORDINATOR_ADDRESS") or None
    num_processes = _int_setting(num_processes, "CLJAX_NUM_PROCESSES", "--num-processes")
    process_id = _int_setting(process_id, "CLJAX_PROCESS_ID", "--process-id")
    if mode == "auto" and coordinator is None and not cluster_detected():
        return False
    if coordinator is not None:
        if not re.fullmatch(r"[^\s:]+:\d+", coordinator):
            raise ConfigError(f"coordinator address {coordinator!r} must be HOST:PORT")
        if num_processes is None or process_id is None:
            raise ConfigError(
                f"coordinator {coordinator} given without --num-processes and --process-id"
                " (or $CLJAX_NUM_PROCESSES / $CLJAX_PROCESS_ID)"
            )
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id} not in [0, {num_processes})")
    where = coordinator or "the coordinator JAX detects (TPU pod / SLURM / Open MPI)"
    if coordinator is not None and process_id != 0:
        # JAX aborts the whole process when its client cannot connect; finding out first
        # gives an error that can be read (and caught).
        wait_for_coordinator(coordinator, timeout, process_id, num_processes)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=timeout,
        )
    except Exception as err:  # JAX raises several kinds (XlaRuntimeError, ValueError...)
        raise StartupError(
            f"multi-host start-up failed: could not join {where} within {timeout} s"
            f" (process {process_id} of {num_processes}): {err}"
        ) from err
    return True
