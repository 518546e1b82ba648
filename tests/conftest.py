"""Shared test set-up: 8 fake CPU devices (before JAX initialises) and paths to ../shared."""

import os
from pathlib import Path

# Sharding tests need several devices; JAX reads this once, at initialisation.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Compiles dominate the suite's time; LLVM's optimisations halve them and do not change
# what is computed (tests compare against references with tolerances, not timings).
os.environ.setdefault("XLA_FLAGS", "--xla_backend_optimization_level=0")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("CLJAX_SHARED_DIR", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The `../shared` folder beside the checkout (benchmark data, tokenizers, docs)."""
    if not SHARED_DIR.is_dir():
        pytest.fail(f"shared folder not found at {SHARED_DIR} (set CLJAX_SHARED_DIR)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def benchmark_dir(shared_dir: Path) -> Path:
    return shared_dir / "cl_benchmark"


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir(shared_dir: Path) -> Path:
    return shared_dir / "tokenizers" / "gpt2"
