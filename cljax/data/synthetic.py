"""The built-in synthetic benchmark: the embedded default that needs no files.

Several procedurally generated text-classification tasks in the benchmark's format (same
prompt, same sentence layouts, each with its own option list), deterministic from a seed,
small enough that a tiny model learns each task in about a minute on a laptop CPU, and built
so that training on them in sequence causes measurable forgetting.

The generator
-------------
* Words are pronounceable pseudo-words (two or three consonant-vowel syllables, e.g.
  ``"kavo"``), drawn without repetition from a generator seeded by ``seed``.
* A **shared pool** of ``shared_words`` words is common to all tasks. Each task also has
  ``own_words_per_class`` words of its own per class (its private vocabulary).
* Each task partitions the shared pool into its classes with its own random permutation, so
  the same word points to different labels in different tasks: a model fine-tuned on task 2
  rewrites the word-to-label associations task 1 relied on (interference), on top of the
  drift of its output towards task 2's option strings. That is the forgetting a continual
  method must prevent.
* An example of class ``c`` has ``words_per_example`` words: ``label_words`` of them from
  class ``c`` (shared or own words) and the rest from the other classes, resampled until no
  other class has as many words as ``c``. The label is therefore the class with the most
  words: a bag-of-words rule, learnable without noise (accuracy 100% is reachable).
* Kinds (task flavours) fix the type, option list and sentence layout of the real benchmark:

  - ``topic``: type ``TC``, layout ``Title: ...\\nText: ...\\n`` (the first two words are the
    title), 4 topic options;
  - ``sentiment``: type ``SC``, layout ``Text: ...\\n``, 3 sentiment options;
  - ``entailment``: type ``NLI``, layout ``sentence 1: ...\\nsentence 2: ...`` (the words
    split in two halves), 3 relation options. Entailment-like in form (two sentences, NLI
    instruction and options), not in reasoning: its label follows the same majority rule.

  The default option lists of the three kinds share no string, so an answer drifting to
  another task's options is plainly wrong. A kind listed twice gets the next option list
  of its kind (see ``KINDS``), its own partition and name (``synth_topic``,
  ``synth_topic2``, ...).
* Classes are balanced: exactly ``train_per_class`` / ``test_per_class`` examples per class,
  shuffled. Train and test are drawn from independent streams of the same distribution.

Everything comes from ``numpy.random.default_rng`` seeded with ``(seed, task position,
purpose)``: the same config gives the same tasks on every machine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cljax.data.sources import Example, TaskData
from cljax.data.tasks import SENTENCE_PAIR, TEXT_LINE, TITLE_TEXT, DatasetSpec, SentenceLayout
from cljax.errors import UnknownNameError


@dataclasses.dataclass(frozen=True)
class Kind:
    """A task flavour: the benchmark type and layout it imitates, and its option lists."""

    task_type: str
    layout: SentenceLayout
    option_lists: tuple[tuple[str, ...], ...]


KINDS: dict[str, Kind] = {
    "topic": Kind(
        "TC",
        TITLE_TEXT,
        (
            ("Sports", "Music", "Science", "Travel"),
            ("Cooking", "Finance", "Health", "Movies"),
            ("History", "Games", "Weather", "Fashion"),
        ),
    ),
    "sentiment": Kind(
        "SC",
        TEXT_LINE,
        (
            ("negative", "mixed", "positive"),
            ("bad", "okay", "good"),
            ("sad", "calm", "happy"),
        ),
    ),
    "entailment": Kind(
        "NLI",
        SENTENCE_PAIR,
        (
            ("entailment", "neutral", "contradiction"),
            ("yes", "maybe", "no"),
            ("follows", "unrelated", "conflicts"),
        ),
    ),
}

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the synthetic benchmark (defaults: 3 tasks, 8 words per example, 5 of the label).

    Attributes:
      seed: everything is a function of it.
      kinds: the task flavours in order (keys of ``KINDS``; repeats allowed).
      train_per_class / test_per_class: examples per class and split.
      shared_words: size of the pool every task uses (with task-specific class meanings).
      own_words_per_class: words private to each task, per class.
      words_per_example: words in one sentence.
      label_words: how many of them come from the label's class (the rest are distractors,
        with no other class reaching this count).
    """

    seed: int = 0
    kinds: tuple[str, ...] = ("topic", "sentiment", "entailment")
    train_per_class: int = 200
    test_per_class: int = 50
    shared_words: int = 24
    own_words_per_class: int = 2
    words_per_example: int = 8
    label_words: int = 5

    def __post_init__(self) -> None:
        for kind in self.kinds:
            if kind not in KINDS:
                raise UnknownNameError(
                    f"unknown synthetic task kind {kind!r} in data.order;"
                    f" valid kinds: {list(KINDS)}"
                )
        if not self.kinds:
            raise ValueError("SyntheticConfig.kinds must name at least one task kind")
        for name in ("train_per_class", "test_per_class", "words_per_example", "label_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"SyntheticConfig.{name} must be >= 1, got {getattr(self, name)}")
        most_classes = max(len(KINDS[k].option_lists[0]) for k in self.kinds)
        if self.shared_words < most_classes:
            raise ValueError(
                f"SyntheticConfig.shared_words={self.shared_words} is fewer than the "
                f"{most_classes} classes of a task"
            )
        distractors = self.words_per_example - self.label_words
        if distractors < 0 or self.label_words < 2:
            raise ValueError(
                "SyntheticConfig needs 2 <= label_words <= words_per_example, got "
                f"label_words={self.label_words}, words_per_example={self.words_per_example}"
            )
        # The other classes must be able to absorb the distractors without any reaching
        # label_words, or the majority rule could not hold.
        fewest_classes = min(len(KINDS[k].option_lists[0]) for k in self.kinds)
        if distractors > (fewest_classes - 1) * (self.label_words - 1):
            raise ValueError(
                f"SyntheticConfig: {distractors} distractor words cannot be spread over "
                f"{fewest_classes - 1} other classes with fewer than label_words="
                f"{self.label_words} each; raise label_words or lower words_per_example"
            )


def _pseudo_words(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    """``count`` new pronounceable words (2-3 CV syllables) not in ``taken`` (updated)."""
    words: list[str] = []
    while len(words) < count:
        syllables = int(rng.integers(2, 4))
        word = "".join(
            _CONSONANTS[int(rng.integers(len(_CONSONANTS)))] + _VOWELS[int(rng.integers(5))]
            for _ in range(syllables)
        )
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


def _sample_words(
    rng: np.random.Generator, class_words: list[list[str]], label: int, cfg: SyntheticConfig
) -> list[str]:
    """The words of one example of class ``label``, in random order."""
    n_classes = len(class_words)
    others = [c for c in range(n_classes) if c != label]
    while True:
        counts = np.bincount(
            rng.choice(others, size=cfg.words_per_example - cfg.label_words), minlength=n_classes
        )
        if counts.max() < cfg.label_words:
            break
    counts[label] = cfg.label_words
    words = [
        class_words[c][int(i)]
        for c in range(n_classes)
        for i in rng.integers(len(class_words[c]), size=int(counts[c]))
    ]
    return [words[int(i)] for i in rng.permutation(len(words))]


def _render(kind: Kind, words: list[str]) -> str:
    if kind.layout is TITLE_TEXT:
        return kind.layout.render(title=" ".join(words[:2]), text=" ".join(words[2:]) + ".")
    if kind.layout is SENTENCE_PAIR:
        half = len(words) // 2
        return kind.layout.render(
            premise=" ".join(words[:half]) + ".", hypothesis=" ".join(words[half:]) + "."
        )
    return kind.layout.render(text=" ".join(words) + ".")


def synthetic_benchmark(config: SyntheticConfig | None = None) -> tuple[TaskData, ...]:
    """The synthetic tasks, in ``config.kinds`` order, as ``TaskData`` like the real ones.

    ``metadata`` records the generator config and, per task, the class of every word (so a
    test or a notebook can check the rule and the conflicts between tasks).
    """
    cfg = config or SyntheticConfig()
    taken: set[str] = set()
    shared = _pseudo_words(np.random.default_rng([cfg.seed, 0]), cfg.shared_words, taken)
    tasks = []
    seen: dict[str, int] = {}
    for position, kind_name in enumerate(cfg.kinds):
        kind = KINDS[kind_name]
        repeat = seen.get(kind_name, 0)
        seen[kind_name] = repeat + 1
        options = kind.option_lists[repeat % len(kind.option_lists)]
        name = f"synth_{kind_name}" + (str(repeat + 1) if repeat else "")
        spec = DatasetSpec(name, kind.task_type, options, kind.layout)

        rng = np.random.default_rng([cfg.seed, 1, position])
        n_classes = len(options)
        order = rng.permutation(len(shared))
        class_words = [[shared[int(i)] for i in order[c::n_classes]] for c in range(n_classes)]
        own = _pseudo_words(rng, cfg.own_words_per_class * n_classes, taken)
        for c in range(n_classes):
            class_words[c] += own[c * cfg.own_words_per_class : (c + 1) * cfg.own_words_per_class]

        splits = {}
        for split_id, (split, per_class) in enumerate(
            (("train", cfg.train_per_class), ("test", cfg.test_per_class))
        ):
            split_rng = np.random.default_rng([cfg.seed, 2, position, split_id])
            labels = np.repeat(np.arange(n_classes), per_class)[
                split_rng.permutation(n_classes * per_class)
            ]
            splits[split] = tuple(
                Example(
                    _render(kind, _sample_words(split_rng, class_words, int(c), cfg)),
                    options[int(c)],
                    i,
                )
                for i, c in enumerate(labels)
            )
        metadata: dict[str, Any] = {
            "dataset": name,
            "task_type": kind.task_type,
            "source": "synthetic",
            "generator": dataclasses.asdict(cfg),
            "word_classes": {options[c]: class_words[c] for c in range(n_classes)},
            "n_train": len(splits["train"]),
            "n_test": len(splits["test"]),
        }
        tasks.append(TaskData(spec, splits["train"], splits["test"], metadata))
    return tuple(tasks)
