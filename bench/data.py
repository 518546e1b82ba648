"""Data benchmark (issue 5, Performance): is the input pipeline ever the bottleneck?

(a) Examples per second of the whole pipeline on agnews train + test (4000 + 7600 = 11,600
    examples) with the GPT-2 tokenizer: read the JSON files, build the prompts, tokenize,
    and cut every example into padded batches (train split: shuffled, length-bucketed
    training batches; test split: evaluation batches), for the decoder-only and the
    seq2seq format. Loading the tokenizer (once per run) is not counted.
(b) Examples per second a training step of the CPU test-bed model consumes: a jitted,
    donated AdamW step of a small LLaMA (width 256, 4 layers, batch 8 x 128 tokens) on
    real batches from (a), with the GPT-2 vocabulary (50257) and with a small 4096-token
    vocabulary (a faster step: the conservative comparison).
Printed: both rates and their ratio (goal: data >= 10x the step). Medians over rounds; the
machine is shared, so absolute numbers move between runs, the ratio much less.

Usage: ``python bench/data.py [--rounds 3] [--steps 10]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from cljax.data.batching import (
    BatchConfig,
    encode_split,
    eval_batches,
    load_tokenizer,
    train_batches,
)
from cljax.data.sources import SourceConfig, load_task
from cljax.models.llama import Llama, LlamaConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
BATCH, SEQ = 8, 128


def pipeline_seconds(tokenizer, fmt: str, data_dir: Path) -> tuple[float, int, dict]:
    """Seconds for JSON -> prompts -> tokens -> all batches of agnews train + test."""
    start = time.perf_counter()
    task = load_task("agnews", SourceConfig(data_dir=str(data_dir)))
    t_read = time.perf_counter()
    train = encode_split(task.spec, task.train, tokenizer)
    test = encode_split(task.spec, task.test, tokenizer)
    t_tok = time.perf_counter()
    config = BatchConfig(format=fmt, batch_size=BATCH)
    n_rows = sum(
        int((b.example_index >= 0).sum())
        for b in train_batches(train, tokenizer, config, epoch=0, seed=0)
    )
    n_rows += sum(int((b.example_index >= 0).sum()) for b in eval_batches(test, tokenizer, config))
    end = time.perf_counter()
    parts = {"read": t_read - start, "tokenize": t_tok - t_read, "batch": end - t_tok}
    return end - start, n_rows, parts


def model_config(vocab: int) -> LlamaConfig:
    """The benchmarks' CPU model (``small`` preset: width 256, 4 layers)."""
    return LlamaConfig.preset("small", vocab_size=vocab)


def step_batches(tokenizer, data_dir: Path, vocab: int, count: int) -> list:
    """``count`` real decoder-only training batches of exactly 8 x 128 tokens."""
    task = load_task("agnews", SourceConfig(data_dir=str(data_dir)))
    enc = encode_split(
        task.spec,
        task.train[: count * BATCH * 2],
        tokenizer,
        max_source_tokens=SEQ - 8,
        max_target_tokens=9,
    )
    config = BatchConfig(
        batch_size=BATCH, buckets=(SEQ,), max_source_tokens=SEQ - 8, max_target_tokens=9
    )
    out = []
    for b in train_batches(enc, tokenizer, config, epoch=0, seed=0):
        # Ids beyond a small vocabulary are folded in: the step's cost does not depend on them.
        out.append(
            {
                k: jnp.asarray(
                    getattr(b, k) % vocab if k in ("input_ids", "labels") else getattr(b, k)
                )
                for k in ("input_ids", "attention_mask", "labels", "loss_mask")
            }
        )
        if len(out) == count:
            return out
    raise RuntimeError("not enough batches")


def step_seconds(vocab: int, batches: list, steps: int, rounds: int) -> float:
    """Median seconds of one jitted AdamW step (after compile and warm-up)."""
    cfg = model_config(vocab)
    graphdef, params = nnx.split(Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, weight_decay=0.0))

    def loss_fn(p, b):  # the loop's training loss
        model = nnx.merge(graphdef, p)
        return model.loss(b["input_ids"], b["attention_mask"], b["labels"], b["loss_mask"])

    def step(p, s, b):
        loss, grads = jax.value_and_grad(loss_fn)(p, b)
        updates, s = tx.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss

    step = jax.jit(step, donate_argnums=(0, 1))
    state = [params, tx.init(params)]
    for b in batches[:2]:  # compile + warm-up
        state[0], state[1], loss = step(state[0], state[1], b)
    jax.block_until_ready(loss)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(steps):
            state[0], state[1], loss = step(state[0], state[1], batches[i % len(batches)])
        jax.block_until_ready(loss)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--data-dir", type=Path, default=SHARED / "cl_benchmark")
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "gpt2")
    args = parser.parse_args()
    import warnings

    warnings.simplefilter("ignore")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.tokenizer)
    print(
        f"tokenizer {args.tokenizer.name} loaded in {time.perf_counter() - t0:.2f}s (not counted)"
    )
    print(f"devices: {jax.devices()}")

    data_rate = {}
    for fmt in ("decoder", "seq2seq"):
        runs = [pipeline_seconds(tokenizer, fmt, args.data_dir) for _ in range(args.rounds)]
        seconds = statistics.median(r[0] for r in runs)
        n = runs[0][1]
        parts = {k: statistics.median(r[2][k] for r in runs) for k in runs[0][2]}
        data_rate[fmt] = n / seconds
        split = ", ".join(f"{k} {v:.2f}s" for k, v in parts.items())
        print(
            f"data [{fmt:8s}] {n} examples in {seconds:.2f}s = {n / seconds:8.0f} examples/s "
            f"({split})"
        )

    for vocab in (tokenizer.vocab_size, 4096):
        batches = step_batches(tokenizer, args.data_dir, vocab, count=8)
        sec = step_seconds(vocab, batches, args.steps, args.rounds)
        consumed = BATCH / sec
        print(
            f"train step (LLaMA w256 L4, vocab {vocab}, batch {BATCH}x{SEQ}): {sec * 1e3:.1f} ms"
            f" = {consumed:.1f} examples/s"
        )
        for fmt, rate in data_rate.items():
            print(f"  ratio data[{fmt}] / step consumption = {rate / consumed:.1f}x (goal >= 10x)")


if __name__ == "__main__":
    main()
