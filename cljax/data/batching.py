"""Tokenized, padded batches for both model families, as numpy arrays.

Pipeline: ``TaskData`` examples -> ``encode_split`` (prompt and answer token ids, truncated)
-> ``train_batches`` / ``eval_batches`` (length-bucketed, padded ``Batch`` es).

Formats (``docs/protocol.md``):

* ``"decoder"`` (LLaMA): training rows are ``bos + prompt + answer + eos``, stored pre-shifted:
  ``input_ids = sequence[:-1]``, ``labels = sequence[1:]`` (``labels[b, t]`` is the token that
  the logits at ``[b, t]`` must predict, the convention of ``cljax.models.llama.causal_lm_loss``)
  and ``loss_mask`` is 1 exactly on answer tokens and the closing eos. Training pads on the
  right; evaluation batches hold ``bos + prompt`` only, padded on the **left** so that
  generation appends to every row at the same position.
* ``"seq2seq"`` (T5): ``input_ids = prompt + eos`` (source, at most ``max_source_tokens``),
  ``labels = answer + eos`` (target, at most ``max_target_tokens``), ``decoder_input_ids =
  decoder_start + labels[:-1]``; padding on the right.

Padded label positions hold ``pad_id`` (a valid index, so gathers never go out of range) and
are ignored through ``loss_mask == 0``; no -100 sentinel is used anywhere.

Truncation keeps the prompt's head (prefixes, instruction, options) and its trailing
``"\\nAnswer:"`` and cuts the sentence (``truncation="keep_answer"``, the default). The
released code truncates the whole prompt from the right, cutting the ``"\\nAnswer:"`` off for
long inputs; ``truncation="release"`` reproduces that.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from cljax.data.sources import Example, TaskData
from cljax.data.tasks import ANSWER_SUFFIX, DatasetSpec, build_prompt, prompt_head
from cljax.errors import ConfigError, DataError

Format = Literal["decoder", "seq2seq"]
CACHE_DIR_ENV = "CLJAX_CACHE_DIR"
_BPE_SPECIALS = ("<pad>", "<s>", "</s>")
_BPE_VERSION = "cljax-bytelevel-bpe-1"  # part of the cache key: bump when training changes


# --------------------------------------------------------------------------- tokenizers


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """A Hugging Face fast tokenizer and the special ids the batches need.

    ``encode`` never adds special tokens: the batch builders add bos / eos themselves.
    ``pad_id`` is the tokenizer's pad token, else eos (GPT-2 and LLaMA have none); padded
    positions are masked, so its value only has to be a valid id.
    """

    backend: tokenizers.Tokenizer
    bos_id: int | None
    eos_id: int
    pad_id: int
    path: str
    #: the ``transformers`` tokenizer, for its chat template (None: trained here, no template)
    hf: Any = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (batched in Rust; no special tokens)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``, special tokens skipped."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def render_chat(self, turns: Sequence[tuple[str, str]]) -> str:
        """``turns`` (``(role, content)``, ending before an assistant answer) through the
        tokenizer's own chat template, with the generation prompt. A leading bos token the
        template writes is dropped: the batches add bos themselves."""
        template = getattr(self.hf, "chat_template", None)
        if not template:
            raise DataError(
                f"tokenizer {self.path}: has no chat_template (data.chat_template=True needs"
                " one in tokenizer_config.json or chat_template.jinja)"
            )
        text = self.hf.apply_chat_template(
            [{"role": role, "content": content} for role, content in turns],
            tokenize=False,
            add_generation_prompt=True,
        )
        bos = self.hf.bos_token
        return text[len(bos) :] if bos and text.startswith(bos) else text


def load_tokenizer(path: str | os.PathLike[str]) -> TextTokenizer:
    """Any Hugging Face tokenizer directory (``tokenizer.json`` etc.), e.g.
    ``../shared/tokenizers/gpt2`` or a directory written by ``train_tokenizer``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} not found")
    from transformers import AutoTokenizer  # slow import: only when a tokenizer is loaded

    hf = AutoTokenizer.from_pretrained(str(path))
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise DataError(f"tokenizer {path}: not a fast (tokenizers-backed) tokenizer")
    if hf.eos_token_id is None:
        raise DataError(f"tokenizer {path}: has no eos token, which ends every target")
    pad = hf.pad_token_id if hf.pad_token_id is not None else hf.eos_token_id
    return TextTokenizer(backend, hf.bos_token_id, hf.eos_token_id, pad, str(path), hf)


def default_cache_dir() -> Path:
    """``$CLJAX_CACHE_DIR`` or ``~/.cache/cljax``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "cljax")


def train_tokenizer(
    texts: Sequence[str],
    vocab_size: int,
    cache_dir: str | os.PathLike[str] | None = None,
    extra_specials: Sequence[str] = (),
) -> TextTokenizer:
    """A byte-level BPE tokenizer trained on ``texts``, cached by content.

    Byte-level (GPT-2 style pre-tokenisation over the 256 byte symbols), so it encodes any
    text without unknown tokens; specials ``<pad>`` (0), ``<s>`` (bos, 1), ``</s>`` (eos, 2),
    then ``extra_specials`` (e.g. T5's sentinels ``<extra_id_0>``, ...), never split.
    Training is deterministic; the result is saved as a Hugging Face tokenizer directory
    ``<cache_dir>/tokenizers/bpe<vocab>-<sha256 of texts>`` and reused when present.
    """
    specials = [*_BPE_SPECIALS, *extra_specials]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size must be >= {256 + len(specials)}, got {vocab_size}")
    key = f"{_BPE_VERSION}\0{vocab_size}" + "".join(f"\0{t}" for t in extra_specials)
    digest = hashlib.sha256(key.encode())
    for text in texts:
        digest.update(b"\0" + text.encode("utf-8"))
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / "tokenizers" / f"bpe{vocab_size}-{digest.hexdigest()[:16]}"
    if not (target / "tokenizer.json").is_file():
        tok = tokenizers.Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(list(texts), trainer)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written aside and renamed, so a concurrent or killed run never sees half a directory.
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        tok.save(str(staging / "tokenizer.json"))
        (staging / "tokenizer_config.json").write_text(
            '{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", '
            '"eos_token": "</s>", "pad_token": "<pad>", "model_max_length": 1000000}\n'
        )
        try:
            staging.rename(target)
        except OSError:  # another process won the race: its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    return load_tokenizer(target)


def task_tokenizer(
    tasks: Sequence[TaskData],
    vocab_size: int = 1024,
    cache_dir: str | os.PathLike[str] | None = None,
) -> TextTokenizer:
    """A small tokenizer for the given tasks (e.g. the synthetic benchmark): byte-level BPE
    trained on their training prompts, option strings and free-text answers
    (``train_tokenizer``)."""
    texts = [build_prompt(t.spec, ex.sentence) for t in tasks for ex in t.train]
    texts += [option for t in tasks for option in t.spec.options]
    texts += [ex.label for t in tasks if t.spec.generative for ex in t.train]
    return train_tokenizer(texts, vocab_size, cache_dir)


# --------------------------------------------------------------------------- encoding


@dataclasses.dataclass(frozen=True)
class EncodedSplit:
    """Token ids of one split, ready for batching in either format.

    Attributes:
      spec: the dataset.
      prompts: per example, int32 (P_i,) prompt tokens (no specials), P_i <= max_source - 1.
      answers: per example, int32 (A_i,) label tokens (no eos), A_i <= max_target - 1.
      labels: per example, the gold label string (what generation is scored against).
      sources: per example, its sentence (a free-text task's whole prompt): the source
        text that SARI scores an output against.
      option_ids: per option of ``spec``, its int32 token ids (for rank classification).
      n_truncated_prompts / n_truncated_answers: how many were cut to fit.
    """

    spec: DatasetSpec
    prompts: tuple[np.ndarray, ...]
    answers: tuple[np.ndarray, ...]
    labels: tuple[str, ...]
    sources: tuple[str, ...]
    option_ids: tuple[np.ndarray, ...]
    n_truncated_prompts: int
    n_truncated_answers: int

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.fromiter((len(p) for p in self.prompts), np.int32, len(self.prompts))

    @property
    def answer_lengths(self) -> np.ndarray:
        return np.fromiter((len(a) for a in self.answers), np.int32, len(self.answers))


def encode_split(
    spec: DatasetSpec,
    examples: Sequence[Example],
    tokenizer: TextTokenizer,
    *,
    max_source_tokens: int = 512,
    max_target_tokens: int = 50,
    truncation: Literal["keep_answer", "release"] = "keep_answer",
    add_task_name: bool = True,
    add_dataset_name: bool = True,
) -> EncodedSplit:
    """Tokenize the prompts and labels of ``examples`` once (batched).

    Budgets leave room for one special token on each side: the prompt gets at most
    ``max_source_tokens - 1`` tokens (plus bos for decoder-only, eos for seq2seq), the answer
    ``max_target_tokens - 1`` (plus eos). A prompt over budget is cut inside its sentence,
    keeping the head and ``"\\nAnswer:"`` (``"keep_answer"``) or cut at the budget like the
    released code (``"release"``). The tail is then re-encoded on its own, so a cut prompt
    ends in exactly the tokens of ``"\\nAnswer:"``. A free-text prompt keeps its last line
    (its own answer cue, e.g. ``"Summary: "``) the same way.
    """
    if truncation not in ("keep_answer", "release"):
        raise ValueError(f"truncation must be 'keep_answer' or 'release', got {truncation!r}")
    if max_source_tokens < 2 or max_target_tokens < 2:
        raise ValueError(
            f"max_source_tokens and max_target_tokens must be >= 2, got "
            f"{max_source_tokens}, {max_target_tokens}"
        )
    for i, ex in enumerate(examples):
        if not ex.sentence.strip():
            raise DataError(f"dataset {spec.name!r}: example {i} has an empty sentence")
    prompt_budget, answer_budget = max_source_tokens - 1, max_target_tokens - 1
    texts = [
        build_prompt(
            spec, ex.sentence, add_task_name=add_task_name, add_dataset_name=add_dataset_name
        )
        for ex in examples
    ]
    encoded = tokenizer.encode(texts)
    over = [i for i, ids in enumerate(encoded) if len(ids) > prompt_budget]
    if truncation == "release":
        tails = dict.fromkeys(over, ())
        keep = dict.fromkeys(over, prompt_budget)
    elif spec.generative:
        tails, keep = _free_text_tails(
            spec, [texts[i] for i in over], over, tokenizer, prompt_budget
        )
    else:
        tails, keep = {}, {}
        if over:
            tail = tokenizer.encode([ANSWER_SUFFIX])[0]
            head = prompt_head(spec, add_task_name=add_task_name, add_dataset_name=add_dataset_name)
            head_len = len(tokenizer.encode([head])[0])
            if prompt_budget - len(tail) < head_len:
                raise ConfigError(
                    f"dataset {spec.name!r}: data.max_source_length={max_source_tokens} leaves no "
                    f"room for the sentence after the {head_len}-token prompt head and the "
                    f"{len(tail)}-token answer suffix"
                )
            tails = dict.fromkeys(over, tail)
            keep = dict.fromkeys(over, prompt_budget - len(tail))
    prompts = []
    for i, ids in enumerate(encoded):
        if i in tails:
            ids = ids[: keep[i]] + list(tails[i])
        prompts.append(np.asarray(ids, np.int32))
    n_cut = len(over)

    label_set = sorted({ex.label for ex in examples} | set(spec.options))
    label_ids = dict(zip(label_set, tokenizer.encode(label_set), strict=True))
    for label, ids in label_ids.items():
        if not ids:
            raise DataError(f"dataset {spec.name!r}: label {label!r} encodes to no tokens")
    answers, n_cut_answers = [], 0
    for ex in examples:
        ids = label_ids[ex.label]
        n_cut_answers += len(ids) > answer_budget
        answers.append(np.asarray(ids[:answer_budget], np.int32))
    return EncodedSplit(
        spec=spec,
        prompts=tuple(prompts),
        answers=tuple(answers),
        labels=tuple(ex.label for ex in examples),
        sources=tuple(ex.sentence for ex in examples),
        option_ids=tuple(np.asarray(label_ids[o], np.int32) for o in spec.options),
        n_truncated_prompts=n_cut,
        n_truncated_answers=n_cut_answers,
    )


def _free_text_tails(
    spec: DatasetSpec,
    texts: Sequence[str],
    rows: Sequence[int],
    tokenizer: TextTokenizer,
    budget: int,
) -> tuple[dict[int, list[int]], dict[int, int]]:
    """For over-long free-text prompts: the answer cue (the prompt's last line, e.g.
    "Summary: ") re-encoded on its own, and how many head tokens fit before it."""
    cues = [text[text.rfind("\n") + 1 :] if "\n" in text else "" for text in texts]
    cue_ids = tokenizer.encode(cues) if cues else []
    tails, keep = {}, {}
    for row, ids in zip(rows, cue_ids, strict=True):
        if len(ids) >= budget:
            raise DataError(
                f"dataset {spec.name!r}: example {row}'s last line (its answer cue) alone takes "
                f"{len(ids)} tokens of the {budget}-token prompt budget (data.max_source_length)"
            )
        tails[row], keep[row] = ids, budget - len(ids)
    return tails, keep


def concatenate_splits(splits: Sequence[EncodedSplit]) -> EncodedSplit:
    """One training stream from several encoded splits (replay buffers, multi-task
    training): rows keep their own prompts (each with its task's prefixes and options), and
    ``example_index`` indexes the concatenation in the given order. ``spec`` and
    ``option_ids`` are the first split's, so evaluate per task on the original splits."""
    if not splits:
        raise ValueError("concatenate_splits needs at least one split")
    return EncodedSplit(
        spec=splits[0].spec,
        prompts=tuple(p for s in splits for p in s.prompts),
        answers=tuple(a for s in splits for a in s.answers),
        labels=tuple(label for s in splits for label in s.labels),
        sources=tuple(text for s in splits for text in s.sources),
        option_ids=splits[0].option_ids,
        n_truncated_prompts=sum(s.n_truncated_prompts for s in splits),
        n_truncated_answers=sum(s.n_truncated_answers for s in splits),
    )


# --------------------------------------------------------------------------- batches


class Batch(NamedTuple):
    """One padded batch (a pytree: fields that are None have no leaves).

    B rows; L source / sequence length and T target length come from the length buckets.

    Attributes:
      input_ids: int32 (B, L). Decoder: ``bos + prompt + answer + eos`` without its last
        token (training) or ``bos + prompt`` (evaluation). Seq2seq: ``prompt + eos``.
      attention_mask: int32 (B, L), 1 on real tokens.
      labels: int32, decoder (B, L): the next token at each position; seq2seq (B, T): the
        target ``answer + eos``. None in evaluation batches.
      loss_mask: float32, same shape as ``labels``: 1 where the loss counts (answer tokens
        and eos), 0 on prompt and padding. None in evaluation batches.
      decoder_input_ids: int32 (B, T), seq2seq only: ``decoder_start + labels[:, :-1]``.
      decoder_attention_mask: int32 (B, T), seq2seq only.
      example_index: int32 (B,): row -> index into the split's examples; -1 marks a padding
        row (it attends to a single token and has an all-zero loss mask).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    labels: np.ndarray | None
    loss_mask: np.ndarray | None
    decoder_input_ids: np.ndarray | None
    decoder_attention_mask: np.ndarray | None
    example_index: np.ndarray


def sequence_lengths(
    enc: EncodedSplit, tokenizer: TextTokenizer, fmt: Format, *, train: bool
) -> np.ndarray:
    """Per example, the source / sequence length its row needs (int32 (N,))."""
    n_bos = int(tokenizer.bos_id is not None)
    if fmt == "seq2seq":
        return enc.prompt_lengths + 1
    if fmt == "decoder":
        return enc.prompt_lengths + n_bos + (enc.answer_lengths if train else 0)
    raise ValueError(f"format must be 'decoder' or 'seq2seq', got {fmt!r}")


def default_buckets(max_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from ``smallest`` below ``max_length``, then ``max_length`` itself: at
    most ~log2(max_length) distinct shapes, each batch padded to < 2x its longest row."""
    buckets, size = [], smallest
    while size < max_length:
        buckets.append(size)
        size *= 2
    return (*buckets, max_length)


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket >= ``length``."""
    for b in buckets:
        if b >= length:
            return int(b)
    raise ValueError(f"length {length} exceeds the largest bucket {max(buckets)}")


def _pad_row(tokenizer: TextTokenizer) -> int:
    return tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id


def decoder_batch(
    enc: EncodedSplit,
    rows: Sequence[int],
    length: int,
    tokenizer: TextTokenizer,
    *,
    train: bool,
    padding_side: Literal["left", "right"] | None = None,
) -> Batch:
    """Decoder-only batch of ``rows`` (indices into ``enc``; -1 = padding row), padded to
    ``length``. ``train=False`` gives prompt-only rows for generation. Padding defaults to
    right for training and left for evaluation."""
    side = padding_side or ("right" if train else "left")
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    b = len(rows)
    ids = np.full((b, length), tokenizer.pad_id, np.int32)
    mask = np.zeros((b, length), np.int32)
    labels = np.full((b, length), tokenizer.pad_id, np.int32) if train else None
    loss = np.zeros((b, length), np.float32) if train else None
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    for r, i in enumerate(rows):
        if i < 0:
            seq, n_prompt = [_pad_row(tokenizer)], 1
        elif train:
            seq = [*bos, *enc.prompts[i], *enc.answers[i], tokenizer.eos_id]
            n_prompt = len(bos) + len(enc.prompts[i])
        else:
            seq, n_prompt = [*bos, *enc.prompts[i]], 0
        inputs = seq[:-1] if train and i >= 0 else seq
        n = len(inputs)
        if n > length:
            raise ValueError(f"row of {n} tokens does not fit length {length}")
        start = 0 if side == "right" else length - n
        ids[r, start : start + n] = inputs
        mask[r, start : start + n] = 1
        if train and i >= 0:
            labels[r, start : start + n] = seq[1:]
            # Position t predicts seq[t + 1]: the answer's first token is predicted at the
            # last prompt position.
            loss[r, start + n_prompt - 1 : start + n] = 1.0
    return Batch(ids, mask, labels, loss, None, None, np.asarray(rows, np.int32))


def seq2seq_batch(
    enc: EncodedSplit,
    rows: Sequence[int],
    source_length: int,
    target_length: int | None,
    tokenizer: TextTokenizer,
    *,
    decoder_start_id: int | None = None,
) -> Batch:
    """Encoder-decoder batch of ``rows`` (-1 = padding row), right-padded. With
    ``target_length=None`` only the source is built (evaluation). ``decoder_start_id``
    defaults to the pad id (T5's convention)."""
    b = len(rows)
    start_id = tokenizer.pad_id if decoder_start_id is None else decoder_start_id
    ids = np.full((b, source_length), tokenizer.pad_id, np.int32)
    mask = np.zeros((b, source_length), np.int32)
    train = target_length is not None
    if train:
        labels = np.full((b, target_length), tokenizer.pad_id, np.int32)
        loss = np.zeros((b, target_length), np.float32)
        dec_ids = np.full((b, target_length), tokenizer.pad_id, np.int32)
        dec_mask = np.zeros((b, target_length), np.int32)
    for r, i in enumerate(rows):
        source = [*enc.prompts[i], tokenizer.eos_id] if i >= 0 else [tokenizer.eos_id]
        if len(source) > source_length:
            raise ValueError(f"source of {len(source)} tokens does not fit {source_length}")
        ids[r, : len(source)] = source
        mask[r, : len(source)] = 1
        if train:
            target = [*enc.answers[i], tokenizer.eos_id] if i >= 0 else [tokenizer.eos_id]
            if len(target) > target_length:
                raise ValueError(f"target of {len(target)} tokens does not fit {target_length}")
            t = len(target)
            labels[r, :t] = target
            loss[r, :t] = float(i >= 0)
            dec_ids[r, :t] = [start_id, *target[:-1]]
            dec_mask[r, :t] = 1
    if not train:
        return Batch(ids, mask, None, None, None, None, np.asarray(rows, np.int32))
    return Batch(ids, mask, labels, loss, dec_ids, dec_mask, np.asarray(rows, np.int32))


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """How to cut a split into batches.

    Attributes:
      format: ``"decoder"`` (LLaMA) or ``"seq2seq"`` (T5).
      batch_size: rows per batch **per host**; the global batch is ``batch_size *
        process_count`` and every host sees the same padded shape at each step.
      buckets: allowed source / sequence lengths (None: ``default_buckets`` of the longest
        possible row); a batch is padded to the smallest bucket that fits its longest row.
      target_buckets: the same for seq2seq targets (None: ``default_buckets(max_target, 8)``).
      sort_window: length bucketing: examples are sorted by length within windows of this
        many global batches of the epoch's shuffled order, then the batches are shuffled
        (1: no sorting, batches keep the shuffled order).
      max_source_tokens / max_target_tokens: the limits ``encode_split`` used.
      decoder_start_id: seq2seq decoder start token (None: pad id).
      process_index / process_count: this host and the number of hosts (jax.process_index()
        and jax.process_count() in a multi-host run).
    """

    format: Format = "decoder"
    batch_size: int = 8
    buckets: tuple[int, ...] | None = None
    target_buckets: tuple[int, ...] | None = None
    sort_window: int = 32
    max_source_tokens: int = 512
    max_target_tokens: int = 50
    decoder_start_id: int | None = None
    process_index: int = 0
    process_count: int = 1

    def __post_init__(self) -> None:
        if self.format not in ("decoder", "seq2seq"):
            raise ValueError(
                f"BatchConfig.format must be 'decoder' or 'seq2seq', got {self.format!r}"
            )
        if self.batch_size < 1 or self.sort_window < 1:
            raise ValueError(
                f"BatchConfig.batch_size and sort_window must be >= 1, got "
                f"{self.batch_size}, {self.sort_window}"
            )
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(
                f"BatchConfig.process_index={self.process_index} not in "
                f"[0, process_count={self.process_count})"
            )

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.process_count

    def source_buckets(self, train: bool) -> tuple[int, ...]:
        if self.buckets is not None:
            return tuple(sorted(self.buckets))
        longest = self.max_source_tokens
        if self.format == "decoder" and train:
            longest += self.max_target_tokens - 1  # bos + prompt + answer (+ eos as label)
        return default_buckets(longest)

    def target_bucket_list(self) -> tuple[int, ...]:
        if self.target_buckets is not None:
            return tuple(sorted(self.target_buckets))
        return default_buckets(self.max_target_tokens, smallest=8)


def num_batches(n_examples: int, config: BatchConfig) -> int:
    """Steps in one pass over ``n_examples`` (the last global batch is padded, not dropped)."""
    return -(-n_examples // config.global_batch_size)


def _global_batches(order: np.ndarray, global_bs: int) -> list[np.ndarray]:
    """Cut ``order`` into global batches, padding the last with -1."""
    pad = (-len(order)) % global_bs
    padded = np.concatenate([order, np.full(pad, -1, order.dtype)])
    return list(padded.reshape(-1, global_bs))


def _materialize(
    enc: EncodedSplit,
    tokenizer: TextTokenizer,
    config: BatchConfig,
    global_rows: np.ndarray,
    lengths: np.ndarray,
    train: bool,
) -> Batch:
    """This host's slice of one global batch, padded to the global batch's bucket so that
    every host builds the same shape."""
    valid = global_rows[global_rows >= 0]
    longest = int(lengths[valid].max()) if len(valid) else 1
    length = bucket_length(longest, config.source_buckets(train))
    lo = config.process_index * config.batch_size
    rows = global_rows[lo : lo + config.batch_size].tolist()
    if config.format == "decoder":
        return decoder_batch(enc, rows, length, tokenizer, train=train)
    target_length = None
    if train:
        answer_longest = int(enc.answer_lengths[valid].max()) + 1 if len(valid) else 1
        target_length = bucket_length(answer_longest, config.target_bucket_list())
    return seq2seq_batch(
        enc, rows, length, target_length, tokenizer, decoder_start_id=config.decoder_start_id
    )


def train_batches(
    enc: EncodedSplit,
    tokenizer: TextTokenizer,
    config: BatchConfig,
    *,
    epoch: int,
    seed: int,
    start_step: int = 0,
) -> Iterator[Batch]:
    """This host's training batches for one epoch, deterministic in ``(seed, epoch)``.

    All hosts compute the same global order (shuffle, length-sort within windows, shuffle
    the batches) and each takes its ``batch_size`` rows of every global batch. The last
    global batch is padded with rows whose ``example_index`` is -1 (no example is dropped).
    ``start_step`` skips the batches already consumed (resuming mid-epoch).
    """
    if len(enc) == 0:
        raise ValueError(f"dataset {enc.spec.name!r}: no examples to batch")
    rng = np.random.default_rng([seed, epoch])
    lengths = sequence_lengths(enc, tokenizer, config.format, train=True)
    order = rng.permutation(len(enc))
    window = config.sort_window * config.global_batch_size
    if config.sort_window > 1:
        order = np.concatenate(
            [
                chunk[np.argsort(lengths[chunk], kind="stable")]
                for chunk in np.split(order, range(window, len(order), window))
            ]
        )
    batches = _global_batches(order, config.global_batch_size)
    if config.sort_window > 1:
        batches = [batches[int(i)] for i in rng.permutation(len(batches))]
    for global_rows in batches[start_step:]:
        yield _materialize(enc, tokenizer, config, global_rows, lengths, train=True)


def eval_batches(
    enc: EncodedSplit, tokenizer: TextTokenizer, config: BatchConfig
) -> Iterator[Batch]:
    """This host's evaluation batches (prompts only): examples sorted by length (longest
    first, so the largest shape compiles first and memory peaks early), the last batch
    padded with -1 rows. Map predictions back with ``Batch.example_index``."""
    if len(enc) == 0:
        raise ValueError(f"dataset {enc.spec.name!r}: no examples to batch")
    lengths = sequence_lengths(enc, tokenizer, config.format, train=False)
    order = np.argsort(-lengths, kind="stable")
    for global_rows in _global_batches(order, config.global_batch_size):
        yield _materialize(enc, tokenizer, config, global_rows, lengths, train=False)
