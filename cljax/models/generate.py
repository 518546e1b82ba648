"""Jitted greedy decoding with a KV cache.

Shapes are static per *bucket*: the batch size, the prompt length and the number of
new tokens are each rounded up (``bucket_size``), so a new batch of a similar size
reuses the compiled function instead of recompiling. The whole decode loop (prefill,
then one token per ``lax.while_loop`` step until every row has produced an eos or
``max_new_tokens`` is reached) is one compiled call.

Generic pieces, shared by model families: ``bucket_size``, ``left_pad``,
``greedy_loop`` (the loop over a ``step_fn``) and ``GenerationOutput``. Decoder-only
LLaMA generation is ``generate_llama``; encoder-decoder T5 generation is
``generate_t5``. A decoder-only batch whose prompts differ widely in length is
prefilled in length groups (``prefill_groups``, each group its own compiled call) and
then decoded as one batch.

``python -m cljax.models.generate --demo`` greedy-decodes a tiny random LLaMA.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cljax import parallel
from cljax.models.contract import DecoderOnly, EncoderDecoder
from cljax.models.llama import Llama, LlamaConfig, positions_from_mask


def bucket_size(n: int, *, minimum: int = 8) -> int:
    """The compiled size used for ``n`` items: the next power of two >= max(n, minimum)."""
    if n < 1:
        raise ValueError(f"bucket_size needs n >= 1, got {n}")
    return 1 << (max(n, minimum) - 1).bit_length()


def left_pad(
    sequences: Sequence[Sequence[int]], length: int, pad_id: int, rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to ``length``: ids, mask (rows, length) int32.

    ``rows`` (>= len(sequences)) appends all-padding rows, to fill a batch bucket.
    """
    rows = len(sequences) if rows is None else rows
    ids = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for i, seq in enumerate(sequences):
        if not 0 < len(seq) <= length:
            raise ValueError(f"sequence {i} has {len(seq)} tokens; need 1..{length}")
        ids[i, length - len(seq) :] = seq
        mask[i, length - len(seq) :] = 1
    return ids, mask


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """tokens (B, max_new_tokens) int32, ``pad_id`` after a row's eos; lengths (B,) the
    number of generated tokens per row (eos included)."""

    tokens: np.ndarray
    lengths: np.ndarray

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


StepFn = Callable[[Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


def greedy_token(logits: jax.Array) -> jax.Array:
    """(B, V) -> (B,) int32: ``argmax`` over the vocabulary, lowest index on ties.

    Written as max + masked min because XLA's CPU argmax (a variadic reduction) is ~5x
    slower over a 32k vocabulary (measured 5.4 ms vs 1.1 ms for 16 rows), a large
    share of a decoding step for small models.
    """
    vocab = logits.shape[-1]
    best = jnp.max(logits, axis=-1, keepdims=True)
    index = jnp.arange(vocab, dtype=jnp.int32)
    return jnp.min(jnp.where(logits == best, index, vocab), axis=-1)


def greedy_loop(
    step_fn: StepFn,
    first_logits: jax.Array,
    decoder_state: Any,
    *,
    max_new_tokens: jax.Array | int,
    capacity: int,
    eos_ids: jax.Array,
    pad_id: int,
) -> tuple[jax.Array, jax.Array]:
    """Greedy decoding loop, to be called inside ``jax.jit``.

    first_logits (B, V): logits for the first new token (from the prefill).
    step_fn(decoder_state, token (B,), index ()) -> (logits (B, V), decoder_state)
    feeds the ``index``-th generated token and returns the next token's logits.
    Runs until ``max_new_tokens`` (traced, <= capacity) or every row emitted one of
    ``eos_ids`` (K,). Returns tokens (B, capacity) int32 and lengths (B,) int32.
    """
    batch = first_logits.shape[0]

    def emit(token, done, tokens, lengths, index):
        token = jnp.where(done, pad_id, token).astype(jnp.int32)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, index))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | jnp.any(token[:, None] == eos_ids[None, :], axis=-1)
        return token, done, tokens, lengths

    tokens = jnp.full((batch, capacity), pad_id, jnp.int32)
    first = greedy_token(first_logits)
    token, done, tokens, lengths = emit(
        first, jnp.zeros((batch,), bool), tokens, jnp.zeros((batch,), jnp.int32), 0
    )

    def cond(carry):
        index, _, done, _, _, _ = carry
        return (index < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        index, token, done, tokens, lengths, state = carry
        logits, state = step_fn(state, token, index - 1)
        token, done, tokens, lengths = emit(greedy_token(logits), done, tokens, lengths, index)
        return index + 1, token, done, tokens, lengths, state

    carry = (jnp.int32(1), token, done, tokens, lengths, decoder_state)
    _, _, _, tokens, lengths, _ = jax.lax.while_loop(cond, body, carry)
    return tokens, lengths


def _check_request(sequences: Sequence[Sequence[int]], max_new_tokens: int, what: str) -> None:
    """The argument checks every ``generate_*`` entry point makes; ``what`` names the
    inputs in the error (``prompts``, ``sources``)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not sequences:
        raise ValueError(f"no {what} to generate from")


def _run_greedy(
    greedy_fn: Callable[..., tuple[jax.Array, jax.Array]],
    model: nnx.Module,
    sequences: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos: Sequence[int],
    pad_token_id: int,
) -> GenerationOutput:
    """Bucket and left-pad ``sequences``, call the jitted ``greedy_fn(graphdef, state,
    ids, mask, max_new_tokens, eos_ids, *, capacity, pad_id)`` and cut the bucket
    padding (rows and steps) off its output."""
    rows = bucket_size(len(sequences), minimum=1)
    length = bucket_size(max(len(s) for s in sequences))
    ids, mask = left_pad(sequences, length, pad_token_id, rows)
    graphdef, state = nnx.split(model)
    ids, mask = _place_rows(ids, state), _place_rows(mask, state)
    tokens, lengths = greedy_fn(
        graphdef,
        state,
        ids,
        mask,
        jnp.int32(max_new_tokens),
        jnp.asarray(_eos_array(eos)),
        capacity=bucket_size(max_new_tokens),
        pad_id=int(pad_token_id),
    )
    n = len(sequences)
    tokens = parallel.to_host(tokens)[:n, :max_new_tokens]
    return GenerationOutput(tokens=tokens, lengths=parallel.to_host(lengths)[:n])


def _eos_array(eos: Sequence[int]) -> np.ndarray:
    """The stop ids as a constant-size array (padded with -1, never a token), so that a
    different number of stop ids does not recompile."""
    eos_array = np.full((max(len(eos), 1),), -1, np.int32)
    eos_array[: len(eos)] = eos
    return eos_array


def _place_rows(x: np.ndarray, state: nnx.State) -> jax.Array:
    """A (B, ...) host array on the mesh of a sharded model, rows split like the
    activations' batch (``cljax.parallel``), so prompts, KV cache and outputs are
    sharded over the batch axes; as is for an unsharded model or rows that do not
    divide."""
    mesh = parallel.array_mesh(state)
    rules = parallel.current_rules()
    if mesh is None or x.shape[0] % parallel.data_parallel_size(mesh, rules):
        return jnp.asarray(x)
    return parallel.host_to_global(x, parallel.batch_sharding(mesh, x.ndim, rules))


# ---------------------------------------------------------------------------------------
# LLaMA (decoder-only)
# ---------------------------------------------------------------------------------------


def _prefill(
    model: DecoderOnly, ids: jax.Array, mask: jax.Array, extra_slots: int
) -> tuple[Any, jax.Array]:
    """ids, mask (B, P) left-padded -> a cache of P + ``extra_slots`` slots holding the
    prompts' keys and values, and the first new token's logits (B, V)."""
    batch, prompt_len = ids.shape
    cache = model.init_cache(batch, prompt_len + extra_slots)
    key_mask = jnp.concatenate([mask.astype(bool), jnp.zeros((batch, extra_slots), bool)], axis=1)
    hidden, cache = model.hidden_states(ids, positions_from_mask(mask), key_mask, cache, 0)
    # Left padding puts every prompt's last token in the last prompt slot.
    return cache, model.logits(hidden[:, -1])


def _decode(
    model: DecoderOnly,
    cache: Any,
    mask: jax.Array,
    first_logits: jax.Array,
    max_new_tokens: jax.Array,
    eos_ids: jax.Array,
    capacity: int,
    pad_id: int,
) -> tuple[jax.Array, jax.Array]:
    """The greedy loop after a prefill: ``cache`` (P + capacity slots) holds the prompts
    of mask (B, P); first_logits (B, V). -> tokens (B, capacity), lengths (B,)."""
    batch, prompt_len = mask.shape
    key_mask = jnp.concatenate([mask.astype(bool), jnp.zeros((batch, capacity), bool)], axis=1)
    next_position = jnp.sum(mask, axis=-1).astype(jnp.int32)
    layers = model.decoding_layers()  # outside the loop: sliced once, not at every step

    def step(decoder_state, token, index):
        cache, key_mask = decoder_state
        slot = prompt_len + index
        key_mask = jax.lax.dynamic_update_slice(key_mask, jnp.ones((batch, 1), bool), (0, slot))
        positions = (next_position + index)[:, None]
        hidden, cache = model.hidden_states(
            token[:, None], positions, key_mask, cache, slot, layers=layers
        )
        return model.logits(hidden[:, 0]), (cache, key_mask)

    return greedy_loop(
        step,
        first_logits,
        (cache, key_mask),
        max_new_tokens=max_new_tokens,
        capacity=capacity,
        eos_ids=eos_ids,
        pad_id=pad_id,
    )


@jax.jit(static_argnames=("graphdef", "capacity", "pad_id"))
def _llama_greedy(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    ids: jax.Array,
    mask: jax.Array,
    max_new_tokens: jax.Array,
    eos_ids: jax.Array,
    *,
    capacity: int,
    pad_id: int,
) -> tuple[jax.Array, jax.Array]:
    """ids, mask (B, P) left-padded -> tokens (B, capacity), lengths (B,)."""
    model: DecoderOnly = nnx.merge(graphdef, state)
    cache, first_logits = _prefill(model, ids, mask, capacity)
    return _decode(model, cache, mask, first_logits, max_new_tokens, eos_ids, capacity, pad_id)


@jax.jit(static_argnames=("graphdef",))
def _llama_prefill(
    graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, mask: jax.Array
) -> tuple[Any, jax.Array]:
    """One length group's prefill (:func:`_prefill`, no extra slots)."""
    return _prefill(nnx.merge(graphdef, state), ids, mask, 0)


@jax.jit(static_argnames=("length", "capacity"))
def _join_groups(caches: list[Any], *, length: int, capacity: int) -> Any:
    """The groups' caches (each leaf (rows_g, KV, L_g, Dh)), in row order, as one batch
    cache of ``length`` + ``capacity`` slots, each group's slots ending at ``length``."""

    def join(*leaves: jax.Array) -> jax.Array:
        slots = [(length - c.shape[2], capacity) for c in leaves]
        return jnp.concatenate(
            [jnp.pad(c, ((0, 0), (0, 0), s, (0, 0))) for c, s in zip(leaves, slots, strict=True)],
            axis=0,
        )

    return jax.tree.map(join, *caches)


@jax.jit(static_argnames=("graphdef", "capacity", "pad_id"))
def _llama_decode(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    cache: Any,
    mask: jax.Array,
    first_logits: jax.Array,
    max_new_tokens: jax.Array,
    eos_ids: jax.Array,
    *,
    capacity: int,
    pad_id: int,
) -> tuple[jax.Array, jax.Array]:
    """:func:`_decode` after grouped prefills."""
    model: DecoderOnly = nnx.merge(graphdef, state)
    return _decode(model, cache, mask, first_logits, max_new_tokens, eos_ids, capacity, pad_id)


# A batch whose prompt lengths differ widely is prefilled in up to PREFILL_GROUPS groups
# of its rows sorted by length, each padded to its own length (``group_length``), when
# that cuts the padded prompt tokens by at least PREFILL_MIN_SAVING. Free-text bench (16
# prompts of 51..975 tokens, ``bench/generate.py --only free_text``): one prefill of the
# whole batch 1944 ms, 4 groups 1233 ms; with 128-token group steps, 4 groups 2077 ms and
# 8 groups 1863 ms for the whole generation (transformers: about 3900 ms).
PREFILL_GROUPS = 8
PREFILL_MIN_SAVING = 0.25


def group_length(n: int) -> int:
    """The padded length of a prefill group whose longest prompt has ``n`` tokens:
    ``bucket_size`` up to 128, then the next multiple of 128 (a group's prefill costs up
    to the square of its length; finer steps would compile more shapes)."""
    return bucket_size(n) if n <= 128 else -(-n // 128) * 128


def prefill_groups(lengths: Sequence[int], rows: int) -> list[tuple[int, int]] | None:
    """The length groups of a batch bucket of ``rows`` rows: ``lengths`` (ascending,
    at most ``rows``) are its prompts, after ``rows - len(lengths)`` all-padding rows.
    Returns [(first row, padded length)] of min(PREFILL_GROUPS, rows) equal groups, or
    None when they would save less than PREFILL_MIN_SAVING of one prefill of the whole
    bucket."""
    count = min(PREFILL_GROUPS, rows)
    if count < 2:
        return None
    size = rows // count
    full = [1] * (rows - len(lengths)) + list(lengths)
    groups = [(first, group_length(full[first + size - 1])) for first in range(0, rows, size)]
    whole = rows * bucket_size(full[-1])
    if sum(size * length for _, length in groups) > (1 - PREFILL_MIN_SAVING) * whole:
        return None
    return groups


def _grouped_llama_greedy(
    model: DecoderOnly,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos: Sequence[int],
    pad_token_id: int,
) -> GenerationOutput | None:
    """:func:`generate_llama` with the prompts prefilled in length groups
    (:func:`prefill_groups`) and decoded as one batch; None when grouping does not pay
    or the model is sharded over a mesh (its batch stays whole)."""
    rows = bucket_size(len(prompts), minimum=1)
    order = np.argsort([len(p) for p in prompts], kind="stable")
    ordered = [prompts[i] for i in order]
    groups = prefill_groups([len(p) for p in ordered], rows)
    if groups is None:
        return None
    graphdef, state = nnx.split(model)
    if parallel.array_mesh(state) is not None:
        return None
    length = bucket_size(len(ordered[-1]))
    ids, mask = left_pad(ordered, length, pad_token_id, rows)
    # the bucket's all-padding rows first, so each group holds prompts of similar length
    padding = rows - len(prompts)
    rows_in_order = np.r_[len(prompts) : rows, 0 : len(prompts)]
    ids, mask = ids[rows_in_order], mask[rows_in_order]
    size = rows // len(groups)
    caches, logits = [], []
    for first, group_length in groups:
        part = slice(first, first + size), slice(length - group_length, length)
        cache, first_logits = _llama_prefill(
            graphdef, state, jnp.asarray(ids[part]), jnp.asarray(mask[part])
        )
        caches.append(cache)
        logits.append(first_logits)
    capacity = bucket_size(max_new_tokens)
    tokens, lengths = _llama_decode(
        graphdef,
        state,
        _join_groups(caches, length=length, capacity=capacity),
        jnp.asarray(mask),
        jnp.concatenate(logits, axis=0),
        jnp.int32(max_new_tokens),
        jnp.asarray(_eos_array(eos)),
        capacity=capacity,
        pad_id=int(pad_token_id),
    )
    out_tokens = np.empty((len(prompts), max_new_tokens), np.int32)
    out_lengths = np.empty((len(prompts),), np.int32)
    out_tokens[order] = parallel.to_host(tokens)[padding:, :max_new_tokens]
    out_lengths[order] = parallel.to_host(lengths)[padding:]
    return GenerationOutput(tokens=out_tokens, lengths=out_lengths)


def generate_llama(
    model: DecoderOnly,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> GenerationOutput:
    """Greedy-decode a batch of token-id prompts of different lengths.

    prompts: B lists of token ids (each non-empty; include bos yourself if wanted).
    eos_token_ids: stop tokens (default: the config's; ``()`` never stops early).
    pad_token_id: filler after eos (default: config pad, else first eos, else 0).
    Batch, prompt length and ``max_new_tokens`` are bucketed (``bucket_size``); prompts
    of widely different lengths are prefilled in length groups (``prefill_groups``).
    """
    _check_request(prompts, max_new_tokens, "prompts")
    cfg = model.cfg
    eos = tuple(cfg.eos_token_ids if eos_token_ids is None else eos_token_ids)
    if pad_token_id is None:
        pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else (eos or (0,))[0]
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > cfg.max_position_embeddings:
        # Buckets only pad the cache; the rotary positions are the real ones.
        raise ValueError(
            f"longest prompt + max_new_tokens = {longest} tokens exceeds "
            f"max_position_embeddings {cfg.max_position_embeddings}"
        )
    grouped = _grouped_llama_greedy(model, prompts, max_new_tokens, eos, pad_token_id)
    if grouped is not None:
        return grouped
    return _run_greedy(_llama_greedy, model, prompts, max_new_tokens, eos, pad_token_id)


# ---------------------------------------------------------------------------------------
# T5 (encoder-decoder)
# ---------------------------------------------------------------------------------------


@jax.jit(static_argnames=("graphdef", "capacity", "pad_id"))
def _t5_greedy(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    ids: jax.Array,
    mask: jax.Array,
    max_new_tokens: jax.Array,
    eos_ids: jax.Array,
    *,
    capacity: int,
    pad_id: int,
) -> tuple[jax.Array, jax.Array]:
    """ids, mask (B, S) padded sources -> tokens (B, capacity), lengths (B,).

    The encoder runs once; each decoder layer's cross-attention keys and values are
    projected once (``T5.init_cache``); the decoder then feeds one token per step
    against its self-attention cache of ``capacity`` slots.
    """
    model: EncoderDecoder = nnx.merge(graphdef, state)
    batch = ids.shape[0]
    encoder_out = model.encode(ids, mask)
    cache = model.init_cache(encoder_out, mask, capacity)
    start = jnp.full((batch, 1), model.cfg.decoder_start_token_id, jnp.int32)
    first_logits, cache = model.decode_step(start, cache)

    def step(cache, token, index):
        # The cache tracks its own position (cache.index), so ``index`` is not needed.
        logits, cache = model.decode_step(token[:, None], cache)
        return logits[:, 0], cache

    return greedy_loop(
        step,
        first_logits[:, 0],
        cache,
        max_new_tokens=max_new_tokens,
        capacity=capacity,
        eos_ids=eos_ids,
        pad_id=pad_id,
    )


def generate_t5(
    model: EncoderDecoder,
    sources: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> GenerationOutput:
    """Greedy-decode targets for a batch of token-id sources of different lengths.

    sources: B non-empty lists of token ids (as the tokenizer gives them, eos included).
    The decoder starts from the config's ``decoder_start_token_id``; eos_token_ids: stop
    tokens (default: the config's eos; ``()`` never stops early); pad_token_id: filler
    after eos (default: the config's pad). Batch, source length and ``max_new_tokens``
    are bucketed (``bucket_size``). Source padding does not change the result: T5 only
    sees relative positions, and padded keys are masked.
    """
    _check_request(sources, max_new_tokens, "sources")
    cfg = model.cfg
    eos = (cfg.eos_token_id,) if eos_token_ids is None else tuple(eos_token_ids)
    pad_token_id = cfg.pad_token_id if pad_token_id is None else pad_token_id
    return _run_greedy(_t5_greedy, model, sources, max_new_tokens, eos, pad_token_id)


# ---------------------------------------------------------------------------------------
# Demo
# ---------------------------------------------------------------------------------------


def demo(seed: int = 0, max_new_tokens: int = 12) -> None:
    """Greedy-decode a tiny random LLaMA for prompts of different lengths, twice: the
    second batch has other lengths in the same buckets, so it does not recompile."""
    cfg = LlamaConfig.preset("tiny")
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    print(
        f"tiny random LLaMA: {cfg.num_hidden_layers} layers, width {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}; greedy, {max_new_tokens} new tokens, eos={cfg.eos_token_id}"
    )
    for batch_lengths in ((3, 7, 12), (5, 9, 14, 2)):
        prompts = [
            [cfg.bos_token_id, *rng.integers(3, cfg.vocab_size, n - 1).tolist()]
            for n in batch_lengths
        ]
        start = time.perf_counter()
        out = generate_llama(model, prompts, max_new_tokens)
        seconds = time.perf_counter() - start
        print(f"batch of {len(prompts)} prompts, {seconds:.2f}s (compile included if new shape)")
        for prompt, generated in zip(prompts, out.as_lists(), strict=True):
            print(f"  prompt {prompt} -> {generated}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", action="store_true", help="decode a tiny random LLaMA")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.demo:
        parser.error("nothing to do: pass --demo")
    demo(seed=args.seed)


if __name__ == "__main__":
    main()
