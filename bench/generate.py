"""Greedy generation throughput: cljax vs ``transformers.generate`` on the same random
model, on this machine's CPU, measured in one run.

Per model family one function (``bench_llama``, ``bench_t5``) builds a
random transformers model, loads the same weights into cljax through
``cljax.models.convert``, checks that both generate the same tokens, and times both.
Compilation is excluded: each side runs the batch once as a warm-up (cljax compiles
then; transformers warms its allocator), then the two sides alternate for ``--repeats``
timed runs and each side's fastest run counts (the machine may be shared).

``bench_free_text`` is the free-text case of TRACE-like tasks: prompts of mixed lengths up
to 1024 tokens, up to 128 new tokens, rows stopping at eos (an eos id chosen so that rows
finish at different steps; both sides stop when every row has finished). ``bench_evaluate``
times whole evaluations of the TRACE fixture (``tests/fixtures/trace``): cljax's
``evaluate_generate`` against transformers' ``generate`` + decoding + the same metric, in
examples/s. ``bench_prefill_attention`` isolates the attention of a 1024-token prefill
against torch's fused kernel, the largest part of the free-text case's prefill.

    python bench/generate.py [--repeats 3] [--batch 16] [--new-tokens 32] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch


@dataclasses.dataclass(frozen=True)
class Result:
    name: str
    new_tokens: int  # generated tokens per timed run (all rows)
    cljax_seconds: float
    hf_seconds: float
    tokens_equal: bool
    unit: str = "tok"  # what new_tokens counts (items for whole evaluations)

    def report(self) -> str:
        ours, theirs = self.new_tokens / self.cljax_seconds, self.new_tokens / self.hf_seconds
        same = "same scores" if self.unit == "items" else "same tokens"
        return (
            f"{self.name}: cljax {ours:,.1f} {self.unit}/s ({self.cljax_seconds * 1e3:.1f} ms), "
            f"transformers {theirs:,.1f} {self.unit}/s ({self.hf_seconds * 1e3:.1f} ms), "
            f"ratio {ours / theirs:.2f}x, {same}: {self.tokens_equal}"
        )


def best_times(fns: Sequence[Callable[[], object]], repeats: int) -> list[float]:
    """Seconds of the fastest of ``repeats`` calls of each function, after one untimed
    warm-up call each. Calls are interleaved so that both sides see the same load on
    a shared machine."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, seconds in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - start)
    return [min(seconds) for seconds in times]


def varied_prompts(batch: int, vocab: int, seed: int = 0) -> list[list[int]]:
    """``batch`` prompts of 8..64 tokens (bos first)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, 65, batch)
    return [[1, *rng.integers(3, vocab, n - 1).tolist()] for n in lengths]


def convert(hf: torch.nn.Module) -> object:
    """The cljax model of a transformers model, through a saved checkpoint (the path a
    real checkpoint takes)."""
    from cljax.models.convert import load_hf_checkpoint

    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        model, _ = load_hf_checkpoint(directory)
    return model


def hf_greedy(hf: torch.nn.Module, new_tokens: int, **inputs: object) -> torch.Tensor:
    """transformers' greedy ``generate`` of exactly ``new_tokens`` tokens per row (the
    cljax side runs without eos, so both sides do the same work)."""
    with torch.inference_mode():
        return hf.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )


def hf_until_eos(
    hf: torch.nn.Module, prompts: Sequence[Sequence[int]], new_tokens: int, eos: int, pad: int
) -> list[list[int]]:
    """transformers' greedy ``generate`` on left-padded prompts, stopping at ``eos``: each
    row's new tokens up to and including its eos."""
    from cljax.models.generate import left_pad

    length = max(map(len, prompts))
    ids, mask = left_pad(prompts, length, pad)
    with torch.inference_mode():
        out = hf.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
    return _until_eos(out[:, length:].numpy(), eos)


def compare(
    name: str,
    generated_tokens: int,
    run_cljax: Callable[[], np.ndarray],
    run_hf: Callable[[], np.ndarray],
    repeats: int,
) -> Result:
    """Check that both sides generate the same tokens, then time them (``best_times``)."""
    same = bool(np.array_equal(run_cljax(), run_hf()))
    cljax_seconds, hf_seconds = best_times([run_cljax, run_hf], repeats)
    return Result(name, generated_tokens, cljax_seconds, hf_seconds, same)


def _llama_pair(max_positions: int, vocab: int = 32000) -> tuple[torch.nn.Module, object, object]:
    """A random transformers LLaMA (4 layers, width 256) and its cljax copy."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    hf = LlamaForCausalLM(hf_cfg).eval()
    return hf, convert(hf), hf_cfg


def _until_eos(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """Each row's tokens up to and including its first eos (what both sides agree on;
    after it, each pads in its own way)."""
    rows = []
    for row in np.asarray(tokens):
        hits = np.flatnonzero(row == eos)
        rows.append(row[: hits[0] + 1 if hits.size else len(row)].tolist())
    return rows


def bench_llama(batch: int, new_tokens: int, repeats: int) -> Result:
    """4 layers, width 256 (8 heads, 4 kv heads), MLP 688, vocab 32000."""
    from cljax.models.generate import generate_llama, left_pad

    hf, model, hf_cfg = _llama_pair(512)
    prompts = varied_prompts(batch, hf_cfg.vocab_size)
    length = max(map(len, prompts))
    ids, mask = left_pad(prompts, length, hf_cfg.pad_token_id)
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def run_hf() -> np.ndarray:
        out = hf_greedy(
            hf,
            new_tokens,
            input_ids=ids_t,
            attention_mask=mask_t,
            pad_token_id=hf_cfg.pad_token_id,
        )
        return out[:, length:].numpy()

    def run_cljax() -> np.ndarray:
        return generate_llama(model, prompts, new_tokens, eos_token_ids=()).tokens

    return compare(
        f"llama 4x256 vocab 32000, batch {batch}, prompts 8..64, {new_tokens} new",
        batch * new_tokens,
        run_cljax,
        run_hf,
        repeats,
    )


def bench_t5(batch: int, new_tokens: int, repeats: int) -> Result:
    """T5 4+4 layers, d_model 256 (8 heads of 32), gated-gelu d_ff 704, vocab 32128;
    sources of 64 tokens. The encoder runs once per batch on both sides."""
    from transformers import T5Config, T5ForConditionalGeneration

    from cljax.models.generate import generate_t5

    torch.manual_seed(0)
    hf_cfg = T5Config(
        vocab_size=32128,
        d_model=256,
        d_kv=32,
        d_ff=704,
        num_layers=4,
        num_decoder_layers=4,
        num_heads=8,
        feed_forward_proj="gated-gelu",
        decoder_start_token_id=0,
    )
    hf = T5ForConditionalGeneration(hf_cfg).eval()
    model = convert(hf)
    rng = np.random.default_rng(0)
    sources = [[*rng.integers(2, hf_cfg.vocab_size, 63).tolist(), 1] for _ in range(batch)]
    ids_t = torch.tensor(sources, dtype=torch.long)

    def run_hf() -> np.ndarray:
        out = hf_greedy(hf, new_tokens, input_ids=ids_t, attention_mask=torch.ones_like(ids_t))
        return out[:, 1:].numpy()  # drop the decoder start token

    def run_cljax() -> np.ndarray:
        return generate_t5(model, sources, new_tokens, eos_token_ids=()).tokens

    return compare(
        f"t5 4+4x256 vocab 32128, batch {batch}, sources 64, {new_tokens} new",
        batch * new_tokens,
        run_cljax,
        run_hf,
        repeats,
    )


def bench_free_text(batch: int, new_tokens: int, repeats: int) -> Result:
    """LLaMA 4x256, prompts of 16..1024 tokens, up to ``max(new_tokens, 128)`` new ones,
    stopping at eos per row."""
    from cljax.models.generate import generate_llama

    new_tokens = max(new_tokens, 128)
    hf, model, hf_cfg = _llama_pair(1024 + new_tokens)
    rng = np.random.default_rng(1)
    lengths = rng.integers(16, 1025, batch)
    prompts = [[1, *rng.integers(3, hf_cfg.vocab_size, n - 1).tolist()] for n in lengths]
    # An eos the random model does produce: the most common token among the rows' outputs
    # past the first quarter, so rows stop at different steps and some run to the end.
    free = generate_llama(model, prompts, new_tokens, eos_token_ids=()).tokens
    values, counts = np.unique(free[:, new_tokens // 4 :], return_counts=True)
    eos = int(values[np.argmax(counts)])

    def run_hf() -> list[list[int]]:
        return hf_until_eos(hf, prompts, new_tokens, eos, hf_cfg.pad_token_id)

    def run_cljax() -> list[list[int]]:
        return _until_eos(
            generate_llama(model, prompts, new_tokens, eos_token_ids=(eos,)).tokens, eos
        )

    generated = sum(map(len, run_cljax()))
    same = run_cljax() == run_hf()
    cljax_seconds, hf_seconds = best_times([run_cljax, run_hf], repeats)
    return Result(
        f"free text: llama 4x256, batch {batch}, prompts 16..1024, up to {new_tokens} new,"
        f" eos per row ({generated} tokens generated)",
        generated,
        cljax_seconds,
        hf_seconds,
        same,
    )


def bench_evaluate(batch: int, new_tokens: int, repeats: int) -> Result:
    """Evaluation of the TRACE fixture's test splits end to end (16 items, each task's own
    metric and generation length, at most ``new_tokens``) with a 4x256 LLaMA: cljax's
    ``evaluate_generate`` vs ``transformers.generate`` + decoding + the same metric.
    Throughput is in items/s."""
    from pathlib import Path

    from cljax.cl import scoring
    from cljax.cl.backbone import get_family
    from cljax.cl.evaluate import evaluate_generate
    from cljax.data.batching import encode_split, load_tokenizer
    from cljax.data.files import plain_render
    from cljax.data.sources import SourceConfig
    from cljax.data.trace import TRACE_ORDER, trace_task

    fixture = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "trace"
    tokenizer = load_tokenizer(
        Path(__file__).resolve().parents[2] / "shared" / "tokenizers" / "gpt2"
    )
    source = SourceConfig(data_dir=str(fixture))
    splits = [
        encode_split(t.spec, t.test, tokenizer, max_source_tokens=512, max_target_tokens=64)
        for t in (trace_task(name, source, plain_render) for name in TRACE_ORDER)
    ]
    hf, model, _ = _llama_pair(512 + new_tokens + 1, vocab=tokenizer.vocab_size)
    family = get_family("llama")

    def run_cljax() -> list[float]:
        return [
            evaluate_generate(
                family, model, enc, tokenizer, batch_size=batch, max_new_tokens=new_tokens
            ).score
            for enc in splits
        ]

    def run_hf() -> list[float]:
        scores = []
        for enc in splits:
            limit = min(enc.spec.max_new_tokens or new_tokens, new_tokens)
            bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
            prompts = [[*bos, *p.tolist()] for p in enc.prompts]
            rows = hf_until_eos(hf, prompts, limit, tokenizer.eos_id, tokenizer.pad_id)
            texts = [tokenizer.decode(row) for row in rows]
            spec = enc.spec
            scores.append(
                scoring.score(spec.metric, texts, enc.labels, enc.sources, extract=spec.extract)
            )
        return scores

    items = sum(len(enc) for enc in splits)
    same = np.allclose(run_cljax(), run_hf())
    cljax_seconds, hf_seconds = best_times([run_cljax, run_hf], repeats)
    return Result(
        f"evaluation of the TRACE fixture ({items} items, 8 metrics), llama 4x256",
        items,
        cljax_seconds,
        hf_seconds,
        bool(same),
        unit="items",
    )


def bench_prefill_attention(batch: int, new_tokens: int, repeats: int) -> Result:
    """The attention of a 1024-token prompt prefill, alone: cljax's chunked causal
    ``attend_prefill`` (8 heads over 4 kv heads, head size 32) vs torch's fused
    ``scaled_dot_product_attention`` (causal) on the same arrays. Counted in query
    tokens per layer (the free-text case's prefill runs this once per layer); "same"
    compares the outputs to 1e-4."""
    import jax
    import jax.numpy as jnp

    from cljax.models.llama import attend_prefill

    del new_tokens
    t, heads, kv, dh = 1024, 8, 4, 32
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((batch, t, n, dh), np.float32) for n in (heads, kv, kv))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))
    ours = jax.jit(attend_prefill)
    args = tuple(map(jnp.asarray, (q, k, v)))
    # torch: (B, H, T, Dh) with the kv heads repeated per group, as transformers does
    tq = torch.from_numpy(q).transpose(1, 2)
    tk, tv = (torch.from_numpy(x).transpose(1, 2).repeat_interleave(heads // kv, 1) for x in (k, v))

    def run_cljax() -> np.ndarray:
        return np.asarray(jax.block_until_ready(ours(*args, mask)))

    def run_torch() -> np.ndarray:
        with torch.no_grad():
            out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        return out.transpose(1, 2).reshape(batch, t, heads * dh).numpy()

    same = np.allclose(run_cljax(), run_torch(), atol=1e-4)
    cljax_seconds, hf_seconds = best_times([run_cljax, run_torch], repeats)
    return Result(
        f"prefill attention alone vs torch sdpa: batch {batch}, 1024 tokens, 8/4 heads of 32",
        batch * t,
        cljax_seconds,
        hf_seconds,
        bool(same),
    )


BENCHES: dict[str, Callable[[int, int, int], Result]] = {
    "llama": bench_llama,
    "t5": bench_t5,
    "free_text": bench_free_text,
    "evaluate": bench_evaluate,
    "prefill_attention": bench_prefill_attention,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=sorted(BENCHES), nargs="*", default=sorted(BENCHES))
    parser.add_argument(
        "--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    args = parser.parse_args()
    if args.torch_threads is not None:
        torch.set_num_threads(args.torch_threads)
    print(
        f"greedy generation, compile excluded (one warm-up run each), best of {args.repeats}; "
        f"torch threads {torch.get_num_threads()}"
    )
    for name in args.only:
        print(BENCHES[name](args.batch, args.new_tokens, args.repeats).report(), flush=True)


if __name__ == "__main__":
    main()
