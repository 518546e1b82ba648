"""The benchmark's task registry, task orders and the prompt format (``docs/protocol.md``).

Text classification as generation: the model reads a prompt (instruction + option list +
sentence) and writes the label string. Everything here is pure Python and character-exact
with the reference O-LoRA format::

    [Task:<type>\\nDataset:<name>\\n] + instruction + "Option: " + ", ".join(options) + " \\n"
        + sentence + "\\nAnswer:"

COPA, whose sentence already states the question and the options, has neither the
instruction nor the option line: ``[prefixes] + sentence + "\\nAnswer:"``.

Free-text tasks (task type ``GEN``: TRACE, a user's own files) have no options; their
prompt is used verbatim (it carries its own instruction and answer cue) and each names the
metric it is scored with (``cljax.cl.scoring``).

Unlike the reference (which fills the sentence in with ``str.format`` and silently produces a
literal ``{0}`` when the sentence contains braces), the sentence is inserted verbatim.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from cljax.errors import UnknownNameError

#: One instruction per task type, each ending in "Choose one from the option.\n".
#: COPA has none: its sentence already states the question and the two options.
INSTRUCTIONS: Mapping[str, str] = {
    "NLI": 'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
    "Choose one from the option.\n",
    "QQP": 'Whether the "first sentence" and the "second sentence" have the same meaning? '
    "Choose one from the option.\n",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "BoolQA": "According to the following passage, is the question true or false? "
    "Choose one from the option.\n",
    "MultiRC": "According to the following passage and question, is the candidate answer true or "
    "false? Choose one from the option.\n",
    "WiC": "Given a word and two sentences, whether the word is used with the same sense in both "
    "sentence? Choose one from the option.\n",
    "COPA": "",
    "GEN": "",  # free text: the prompt is the whole input
}
GENERATION = "GEN"
"""The task type of free-text tasks."""

ANSWER_SUFFIX = "\nAnswer:"
"""Every prompt ends with this; truncation keeps it (see ``cljax.data.batching``)."""


@dataclasses.dataclass(frozen=True)
class SentenceLayout:
    """How a dataset lays its raw fields out in the ``sentence`` string.

    ``parts`` is a sequence of ``(literal, field)`` pairs: the sentence is
    ``literal_0 + fields[field_0] + literal_1 + fields[field_1] + ... + suffix``.
    The benchmark files already hold laid-out sentences; the layout is what a source that
    builds examples from raw fields (the synthetic benchmark, a loader of the original
    datasets) must follow so that its sentences look like the published ones.
    """

    parts: tuple[tuple[str, str], ...]
    suffix: str = ""

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(field for _, field in self.parts)

    def render(self, **values: str) -> str:
        """The sentence for ``values`` (one string per field), inserted verbatim."""
        missing = [f for f in self.fields if f not in values]
        extra = sorted(set(values) - set(self.fields))
        if missing or extra:
            raise ValueError(
                f"layout fields are {list(self.fields)}; missing {missing}, unexpected {extra}"
            )
        return "".join(literal + values[field] for literal, field in self.parts) + self.suffix


TITLE_TEXT = SentenceLayout((("Title: ", "title"), ("\nText: ", "text")), suffix="\n")
TEXT_LINE = SentenceLayout((("Text: ", "text"),), suffix="\n")
# SST-2's sentences keep GLUE's tokenised text, which ends in " " and has no newline after it.
TEXT_ONLY_PREFIXED = SentenceLayout((("Text: ", "text"),))
PLAIN_TEXT = SentenceLayout((("", "text"),))
SENTENCE_PAIR = SentenceLayout((("sentence 1: ", "premise"), ("\nsentence 2: ", "hypothesis")))
QUESTION_PAIR = SentenceLayout(
    (("first sentence: ", "question1"), ("\nsecond sentence: ", "question2"))
)
QUESTION_PASSAGE = SentenceLayout((("question: ", "question"), ("\npassage: ", "passage")))
PARAGRAPH_QUESTION_ANSWER = SentenceLayout(
    (
        ("paragraph: ", "paragraph"),
        ("\nquestion: ", "question"),
        ("\ncandidate answer: ", "answer"),
    )
)
WORD_TWO_SENTENCES = SentenceLayout((("word: ", "word"), ("\n", "sentence1"), ("\n", "sentence2")))
CAUSE_EFFECT_CHOICE = SentenceLayout(
    (
        ("Which sentence is the ", "question"),  # "cause" or "effect"
        (' of "', "premise"),
        ('"? Choose one between A and B.\nA: ', "choice1"),
        ("\nB: ", "choice2"),
    )
)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One task: a classification dataset of the benchmark (or of the synthetic
    benchmark), or a free-text task (``task_type="GEN"``).

    Attributes:
      name: the dataset name as in the file layout and the prompt's ``Dataset:`` line.
      task_type: the type folder and the prompt's ``Task:`` line (``TC``, ``SC``, ``NLI``, ...),
        or ``GEN`` for free text.
      options: the label strings in ``labels.json`` order (the order shown in the prompt);
        empty for free text.
      layout: how the ``sentence`` string is laid out from raw fields.
      metric / extract: how generated answers are scored: a metric and an answer extraction
        of ``cljax.cl.scoring`` (classification: accuracy of the normalised label).
      max_new_tokens: the task's generation length (None: ``eval.max_new_tokens``).
    """

    name: str
    task_type: str
    options: tuple[str, ...]
    layout: SentenceLayout
    metric: str = "accuracy"
    extract: str = "label"
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.task_type not in INSTRUCTIONS:
            raise ValueError(
                f"dataset {self.name!r}: unknown task type {self.task_type!r}; "
                f"valid types: {sorted(INSTRUCTIONS)}"
            )
        if self.generative:
            if self.options:
                raise ValueError(f"dataset {self.name!r}: a free-text task has no options")
            return
        if len(self.options) < 2 or len(set(self.options)) != len(self.options):
            raise ValueError(
                f"dataset {self.name!r}: options must be >= 2 distinct strings, got "
                f"{list(self.options)}"
            )

    @property
    def generative(self) -> bool:
        """A free-text task: no options, verbatim prompts, scored by its own metric."""
        return self.task_type == GENERATION

    @property
    def instruction(self) -> str:
        return INSTRUCTIONS[self.task_type]

    @property
    def relative_dir(self) -> str:
        """``<Type>/<Dataset>``: where the dataset's JSON files live under the data root."""
        return f"{self.task_type}/{self.name}"


_STARS = ("very negative", "negative", "neutral", "positive", "very positive")
_GOOD_BAD = ("Good", "Bad")

#: The 15 datasets of the benchmark, options in ``labels.json`` order. Yahoo's files were never
#: published in a fetchable form; its layout is assumed to be the Title/Text one of the other
#: Zhang et al. (2015) topic datasets.
DATASETS: Mapping[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "dbpedia",
            "TC",
            (
                "Company",
                "Educational Institution",
                "Artist",
                "Athlete",
                "Office Holder",
                "Mean of Transportation",
                "Building",
                "Natural Place",
                "Village",
                "Animal",
                "Plant",
                "Album",
                "Film",
                "Written Work",
            ),
            TITLE_TEXT,
        ),
        DatasetSpec("amazon", "SC", _STARS, TITLE_TEXT),
        DatasetSpec("yelp", "SC", _STARS, TEXT_LINE),
        DatasetSpec(
            "yahoo",
            "TC",
            (
                "Society & Culture",
                "Science & Mathematics",
                "Health",
                "Education & Reference",
                "Computers & Internet",
                "Sports",
                "Business & Finance",
                "Entertainment & Music",
                "Family & Relationships",
                "Politics & Government",
            ),
            TITLE_TEXT,
        ),
        DatasetSpec(
            "agnews", "TC", ("World", "Sports", "Business", "Science or Technology"), TITLE_TEXT
        ),
        DatasetSpec("MNLI", "NLI", ("neutral", "entailment", "contradiction"), SENTENCE_PAIR),
        DatasetSpec("CB", "NLI", ("entailment", "contradiction", "neutral"), SENTENCE_PAIR),
        DatasetSpec("RTE", "NLI", ("contradiction", "entailment"), SENTENCE_PAIR),
        DatasetSpec("QQP", "QQP", ("False", "True"), QUESTION_PAIR),
        DatasetSpec("MultiRC", "MultiRC", ("False", "True"), PARAGRAPH_QUESTION_ANSWER),
        DatasetSpec("BoolQA", "BoolQA", ("True", "False"), QUESTION_PASSAGE),
        DatasetSpec("WiC", "WiC", ("True", "False"), WORD_TWO_SENTENCES),
        DatasetSpec("IMDB", "SC", _GOOD_BAD, PLAIN_TEXT),
        DatasetSpec("SST-2", "SC", _GOOD_BAD, TEXT_ONLY_PREFIXED),
        DatasetSpec("COPA", "COPA", ("A", "B"), CAUSE_EFFECT_CHOICE),
    )
}

#: The six published task orders (1-3: the four large topic/sentiment tasks; 4-6: all 15).
ORDERS: Mapping[int, tuple[str, ...]] = {
    1: ("dbpedia", "amazon", "yahoo", "agnews"),
    2: ("dbpedia", "amazon", "agnews", "yahoo"),
    3: ("yahoo", "amazon", "agnews", "dbpedia"),
    4: (
        "MNLI",
        "CB",
        "WiC",
        "COPA",
        "QQP",
        "BoolQA",
        "RTE",
        "IMDB",
        "yelp",
        "amazon",
        "SST-2",
        "dbpedia",
        "agnews",
        "MultiRC",
        "yahoo",
    ),
    5: (
        "MultiRC",
        "BoolQA",
        "WiC",
        "MNLI",
        "CB",
        "COPA",
        "QQP",
        "RTE",
        "IMDB",
        "SST-2",
        "dbpedia",
        "agnews",
        "yelp",
        "amazon",
        "yahoo",
    ),
    6: (
        "yelp",
        "amazon",
        "MNLI",
        "CB",
        "COPA",
        "QQP",
        "RTE",
        "IMDB",
        "SST-2",
        "dbpedia",
        "agnews",
        "yahoo",
        "MultiRC",
        "BoolQA",
        "WiC",
    ),
}


def get_dataset(name: str) -> DatasetSpec:
    """The registered benchmark dataset ``name`` (case-sensitive, as in the file layout)."""
    try:
        return DATASETS[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}"
        ) from None


def get_order(order: int | str) -> tuple[str, ...]:
    """The dataset names of a published order: ``1`` .. ``6``, ``"3"`` or ``"order3"``."""
    key: int | None = None
    if isinstance(order, int) and not isinstance(order, bool):
        key = order
    elif isinstance(order, str):
        digits = order.removeprefix("order").removeprefix("_")
        key = int(digits) if digits.isdigit() else None
    if key not in ORDERS:
        raise UnknownNameError(
            f"unknown order {order!r}; valid orders: "
            + ", ".join(f"{k} (order{k})" for k in ORDERS)
        )
    return ORDERS[key]


def build_prompt(
    spec: DatasetSpec,
    sentence: str,
    *,
    add_task_name: bool = True,
    add_dataset_name: bool = True,
) -> str:
    """The model input for one example, character-identical to the protocol.

    Both prefixes are on in all published runs. The sentence is concatenated verbatim, so
    braces and any other characters survive unchanged. A free-text task's prompt is the
    sentence alone.
    """
    if not isinstance(sentence, str):
        raise TypeError(f"dataset {spec.name!r}: sentence must be str, got {type(sentence)}")
    if spec.generative:
        return sentence
    head = prompt_head(spec, add_task_name=add_task_name, add_dataset_name=add_dataset_name)
    return head + sentence + ANSWER_SUFFIX


def prompt_head(
    spec: DatasetSpec, *, add_task_name: bool = True, add_dataset_name: bool = True
) -> str:
    """The part of every prompt of ``spec`` before the sentence: prefixes, instruction and
    option line (a task without an instruction, COPA, has no option line either: its
    sentence states the options, as in the released benchmark). Free text has none."""
    if spec.generative:
        return ""
    head = ""
    if add_task_name:
        head += "Task:" + spec.task_type + "\n"
    if add_dataset_name:
        head += "Dataset:" + spec.name + "\n"
    if not spec.instruction:
        return head
    return head + spec.instruction + "Option: " + ", ".join(spec.options) + " \n"
