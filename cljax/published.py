"""The published experimental settings (docs/protocol.md, docs/methods.md) as configs:
T5-large on orders 1-6, LLaMA-2-7B on orders 1-3 and LLaMA-2-7B-chat on TRACE, with
each method's published hyperparameters in ``method.per_method``.

The checkpoints are read from local Hugging Face directories named by environment
variables (``CLJAX_T5_LARGE``, ``CLJAX_LLAMA2_7B``, ``CLJAX_LLAMA2_7B_CHAT``; default
``checkpoints/<name>``), which also hold the tokenizers; the benchmark from
``$CLJAX_DATA_DIR``, TRACE from ``$CLJAX_TRACE_DIR``. A missing directory fails at
start-up with its path.
"""

from __future__ import annotations

import os
from typing import Any

from cljax.config import Config
from cljax.errors import ConfigError


def method_settings(
    full: dict[str, Any], lora: dict[str, Any], osf_schedule_step: float, gorp: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """The per-method settings of every registered method: full fine-tuning methods get
    ``full``, LoRA-based ones ``lora``; OSF adds the authors' executed rank schedule
    ``k = floor(max(m, n) * osf_schedule_step * (t - 1))``; GORP adds ``gorp``."""
    from cljax.cl.methods import METHODS  # JAX-heavy: only when a config is built

    settings = {name: dict(lora if cls.uses_lora else full) for name, cls in METHODS.items()}
    settings["osf"].update(
        {"method.options.rank_rule": "schedule", "method.options.schedule_step": osf_schedule_step}
    )
    settings["gorp"].update(gorp)
    return settings


def _shared(checkpoint: str) -> Config:
    """What every published setting shares: the checkpoint (with its tokenizer), an
    effective batch of 64, a constant learning rate, AdamW, clipping 1.0, seed 42, and
    greedy generation on tasks 1..t after task t."""
    cfg = Config()
    cfg.model.checkpoint = checkpoint
    cfg.data.tokenizer = checkpoint
    # (micro-batch and accumulation follow from the device count, resolve_batch_layout)
    cfg.train.effective_batch_size = 64
    cfg.train.schedule = "constant"
    cfg.train.clip_norm = 1.0
    cfg.train.seed = 42
    cfg.data.seed = 42
    cfg.eval.mode = "generate"
    cfg.eval.all_tasks = False
    cfg.run.checkpoint_every_steps = 200
    return cfg


def _common(order: int, checkpoint: str) -> Config:
    """The classification benchmark: one epoch per task, prompts of 512 tokens, labels
    and generation of 50."""
    cfg = _shared(checkpoint)
    cfg.data.source = "json"
    cfg.data.order = f"order{order}"
    cfg.data.max_source_length = 512
    cfg.data.max_target_length = 50
    cfg.train.epochs = 1
    cfg.eval.max_new_tokens = 50
    cfg.eval.batch_size = 64
    return cfg


def _llama2_7b_layout(cfg: Config) -> None:
    """LLaMA-2-7B with bfloat16 matmuls over float32 master weights (bf16 weights
    swallow 1e-5-relative updates), remat of every layer, one sequence per device on a
    fully sharded mesh."""
    cfg.model.family = "llama"
    cfg.model.preset = "llama-2-7b"
    cfg.model.param_dtype = "float32"
    cfg.model.compute_dtype = "bfloat16"
    cfg.model.remat = "full"
    cfg.train.per_device_batch_size = 1
    cfg.run.mesh = {"fsdp": -1, "data": 1}


def t5_large(order: int) -> Config:
    """T5-large, order 1..6 (orders 4-6 are the 15-task sequences)."""
    if order not in range(1, 7):
        raise ConfigError(f"T5-large orders are 1..6, got {order}")
    cfg = _common(order, os.environ.get("CLJAX_T5_LARGE", "checkpoints/t5-large"))
    cfg.model.family = "t5"
    cfg.model.preset = "t5-large"
    cfg.train.per_device_batch_size = 8  # the published 8 x 8 on one device
    cfg.run.name = f"t5_large_order{order}"
    long_sequence = order >= 4
    lora = {
        "train.learning_rate": 1e-3,
        "method.options.lora_rank": 8,
        "method.options.lora_alpha": 32.0,
        "method.options.lora_dropout": 0.1,
    }
    full = {"train.learning_rate": 1e-5, "train.weight_decay": 0.01}
    cfg.method.per_method = method_settings(
        full,
        lora,
        osf_schedule_step=0.07,
        gorp={
            "method.options.full_learning_rate": 1e-5,
            "method.options.rank": 32 if long_sequence else 8,
            "method.options.scale": 0.25 if long_sequence else 1.0,
            "method.options.update_proj_gap": 20 if long_sequence else 10,
        },
    )
    cfg.method.per_method["olora"].update(
        {"method.options.lambda1": 0.5, "method.options.lambda2": 0.0}
    )
    return cfg


def _llama2_7b_methods(osf_schedule_step: float) -> dict[str, dict[str, Any]]:
    """LLaMA-2's per-method settings: full fine-tuning at 1e-5, LoRA (r 8, alpha 32,
    dropout 0.1) at 2e-4, GORP's full weights at 1e-6 with rank 8 and scale 0.25."""
    lora = {
        "train.learning_rate": 2e-4,
        "method.options.lora_rank": 8,
        "method.options.lora_alpha": 32.0,
        "method.options.lora_dropout": 0.1,
    }
    return method_settings(
        {"train.learning_rate": 1e-5},
        lora,
        osf_schedule_step=osf_schedule_step,
        gorp={
            "method.options.full_learning_rate": 1e-6,
            "method.options.rank": 8,
            "method.options.scale": 0.25,
        },
    )


def llama2_7b(order: int) -> Config:
    """LLaMA-2-7B (``_llama2_7b_layout``), order 1..3, answer-only loss."""
    if order not in range(1, 4):
        raise ConfigError(f"LLaMA-2-7B orders are 1..3, got {order}")
    cfg = _common(order, os.environ.get("CLJAX_LLAMA2_7B", "checkpoints/llama-2-7b"))
    _llama2_7b_layout(cfg)
    cfg.data.max_source_length = 1024  # one 1073-token sequence per device
    cfg.run.name = f"llama2_7b_order{order}"
    # The authors' LLaMA 4-task run froze s = 0.25, 0.5, 0.75 of max(m, n).
    cfg.method.per_method = _llama2_7b_methods(osf_schedule_step=0.25)
    return cfg


def trace_llama2_7b_chat() -> Config:
    """The OSF paper's TRACE setting: LLaMA-2-7B-chat on TRACE's eight tasks in TRACE's
    order, prompts through the checkpoint's chat template, each task scored with its own
    metric (``cljax.data.trace``).

    From the papers: the model, the tasks and order, the metrics, full fine-tuning at
    1e-5 (OSF) and LoRA at 2e-4 (the LLaMA-2 setting above), bfloat16 compute over
    float32 master weights. cljax's choices, where neither paper states a value cljax can
    take over: 5 epochs for every task (TRACE's scripts give each task its own count,
    3 to 7), an effective batch of 64, prompts cut at 1024 tokens and answers at 512
    (TRACE's limits), each task's generation length (``trace.TRACE_TASKS``), and OSF's
    schedule step 0.1 (0, 10, ..., 70% of max(m, n) frozen over the eight tasks)."""
    cfg = _shared(os.environ.get("CLJAX_LLAMA2_7B_CHAT", "checkpoints/llama-2-7b-chat"))
    _llama2_7b_layout(cfg)
    cfg.data.source = "trace"
    cfg.data.data_dir = os.environ.get("CLJAX_TRACE_DIR", "data/TRACE")
    cfg.data.order = "trace"
    cfg.data.chat_template = True
    cfg.data.max_source_length = 1024
    cfg.data.max_target_length = 512
    cfg.train.epochs = 5
    cfg.eval.max_new_tokens = 512  # each task generates its own length, at most this
    cfg.eval.batch_size = 16
    cfg.run.name = "trace_llama2_7b_chat"
    cfg.method.per_method = _llama2_7b_methods(osf_schedule_step=0.1)
    return cfg
