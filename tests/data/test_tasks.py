"""The registry and the prompt format against protocol.md, on one real item per dataset.

The expected prompts are written out by hand from the protocol's format
(``[Task:<type>\\nDataset:<name>\\n] + instruction + "Option: " + ", ".join(options) + " \\n"
+ sentence + "\\nAnswer:"``), not produced by the code under test.
"""

import json
from pathlib import Path

import pytest

from cljax.data import tasks
from cljax.data.tasks import DATASETS, build_prompt, get_dataset, get_order

# (type folder, dataset, split file, item index, gold label, expected prompt)
REAL_ITEMS = [
    (
        "TC",
        "agnews",
        "test",
        106,
        "Science or Technology",
        "Task:TC\nDataset:agnews\n"
        "What is the topic of the following paragraph? Choose one from the option.\n"
        "Option: World, Sports, Business, Science or Technology \n"
        "Title: Creative Sound Blaster Wireless Music\n"
        "Text: &lt;strong&gt;Review&lt;/strong&gt; From PC to hi-fi via Wi-Fi\n"
        "\nAnswer:",
    ),
    (
        "TC",
        "dbpedia",
        "test",
        5957,
        "Artist",
        "Task:TC\nDataset:dbpedia\n"
        "What is the topic of the following paragraph? Choose one from the option.\n"
        "Option: Company, Educational Institution, Artist, Athlete, Office Holder, "
        "Mean of Transportation, Building, Natural Place, Village, Animal, Plant, Album, "
        "Film, Written Work \n"
        "Title: Guy H. Lillian III\nText:  Guy H.\n"
        "\nAnswer:",
    ),
    (
        "SC",
        "amazon",
        "test",
        5441,  # contains "{Shame}": the reference's str.format would lose the sentence
        "neutral",
        "Task:SC\nDataset:amazon\n"
        "What is the sentiment of the following paragraph? Choose one from the option.\n"
        "Option: very negative, negative, neutral, positive, very positive \n"
        "Title: Good DVD\n"
        "Text: I can't wait for the full season DVD's but until then I'll have to settle for "
        "this compliation. It has some good episodes from this series, six to be exact. But my "
        "two favorites from this show weren't on it {Shame}\n"
        "\nAnswer:",
    ),
    (
        "SC",
        "yelp",
        "train",
        1779,
        "very negative",
        "Task:SC\nDataset:yelp\n"
        "What is the sentiment of the following paragraph? Choose one from the option.\n"
        "Option: very negative, negative, neutral, positive, very positive \n"
        "Text: Closed\n"
        "\nAnswer:",
    ),
    (
        "SC",
        "IMDB",
        "train",
        788,
        "Bad",
        "Task:SC\nDataset:IMDB\n"
        "What is the sentiment of the following paragraph? Choose one from the option.\n"
        "Option: Good, Bad \n"
        "Ming The Merciless does a little Bardwork and a movie most foul!"
        "\nAnswer:",
    ),
    (
        "SC",
        "SST-2",
        "test",
        266,
        "Bad",
        "Task:SC\nDataset:SST-2\n"
        "What is the sentiment of the following paragraph? Choose one from the option.\n"
        "Option: Good, Bad \n"
        "Text: bad . "
        "\nAnswer:",
    ),
    (
        "NLI",
        "MNLI",
        "test",
        694,
        "contradiction",
        "Task:NLI\nDataset:MNLI\n"
        'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
        "Choose one from the option.\n"
        "Option: neutral, entailment, contradiction \n"
        "sentence 1: Waterloo.\nsentence 2: D-Day."
        "\nAnswer:",
    ),
    (
        "NLI",
        "CB",
        "test",
        14,
        "contradiction",
        "Task:NLI\nDataset:CB\n"
        'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
        "Choose one from the option.\n"
        "Option: entailment, contradiction, neutral \n"
        "sentence 1: A: Your turn. B: Okay. Uh, I don't think they should abolish it.\n"
        "sentence 2: they should abolish it"
        "\nAnswer:",
    ),
    (
        "NLI",
        "RTE",
        "test",
        5,
        "contradiction",
        "Task:NLI\nDataset:RTE\n"
        'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
        "Choose one from the option.\n"
        "Option: contradiction, entailment \n"
        "sentence 1: The girl was found in Drummondville.\n"
        "sentence 2: Drummondville contains the girl."
        "\nAnswer:",
    ),
    (
        "QQP",
        "QQP",
        "test",
        1172,  # braces and backslashes, verbatim
        "False",
        "Task:QQP\nDataset:QQP\n"
        'Whether the "first sentence" and the "second sentence" have the same meaning? '
        "Choose one from the option.\n"
        "Option: False, True \n"
        "first sentence: What is the derivative of [math]e^{2x}{/math]?\n"
        "second sentence: Why is the derivative of [math]\\tan x=\\sec^2x[/math]?"
        "\nAnswer:",
    ),
    (
        "BoolQA",
        "BoolQA",
        "test",
        2644,
        "True",
        "Task:BoolQA\nDataset:BoolQA\n"
        "According to the following passage, is the question true or false? "
        "Choose one from the option.\n"
        "Option: True, False \n"
        "question: are they going to make a punisher season 2\n"
        "passage: The Punisher (season 2) -- The season is set for release in 2019."
        "\nAnswer:",
    ),
    (
        "MultiRC",
        "MultiRC",
        "train",
        1147,
        "False",
        "Task:MultiRC\nDataset:MultiRC\n"
        "According to the following passage and question, is the candidate answer true or "
        "false? Choose one from the option.\n"
        "Option: False, True \n"
        "paragraph: Mike and Jeff are close friends. Their school is having a guessing game to "
        "guess how many gumballs are in a box. If they get the right amount they win $100. If "
        "they get close they get a $20 gift card. The box looks like it is missing some "
        "gumballs. It turns out some people are eating them when they place their guess. 100 "
        'people guessed and took a piece of candy. The box is 10" by 10" by 10". Each '
        'gumball is 1" each. Mike guessed 500. Jeff guessed 800. They both said they would '
        "split their money they win, if they win. \n"
        "question: Roughly how many gumballs are missing?\n"
        "candidate answer: No missing"
        "\nAnswer:",
    ),
    (
        "WiC",
        "WiC",
        "test",
        239,
        "True",
        "Task:WiC\nDataset:WiC\n"
        "Given a word and two sentences, whether the word is used with the same sense in both "
        "sentence? Choose one from the option.\n"
        "Option: True, False \n"
        "word: curd\nBean curd.\nLemon curd."
        "\nAnswer:",
    ),
    (
        "COPA",
        "COPA",
        "test",
        32,
        "A",
        "Task:COPA\nDataset:COPA\n"
        'Which sentence is the cause of "I coughed."? Choose one between A and B.\n'
        "A: I inhaled smoke.\nB: I lowered my voice."
        "\nAnswer:",
    ),
]

_FILES: dict[Path, list] = {}


def _item(benchmark_dir: Path, folder: str, name: str, split: str, index: int) -> dict:
    path = benchmark_dir / folder / name / f"{split}.json"
    if path not in _FILES:
        _FILES[path] = json.loads(path.read_text(encoding="utf-8"))
    return _FILES[path][index]


@pytest.mark.parametrize(
    "folder,name,split,index,label,expected", REAL_ITEMS, ids=[r[1] for r in REAL_ITEMS]
)
def test_prompt_of_a_real_item_matches_the_protocol(
    benchmark_dir, folder, name, split, index, label, expected
):
    item = _item(benchmark_dir, folder, name, split, index)
    assert item["label"] == label
    spec = get_dataset(name)
    assert spec.task_type == folder
    assert build_prompt(spec, item["sentence"]) == expected


def test_prompt_of_a_hand_made_yahoo_item():
    # Yahoo's files were never published in a fetchable form: a hand-made item.
    sentence = "Title: Why is the sky blue?\nText: Rayleigh scattering {of} sunlight.\n"
    expected = (
        "Task:TC\nDataset:yahoo\n"
        "What is the topic of the following paragraph? Choose one from the option.\n"
        "Option: Society & Culture, Science & Mathematics, Health, Education & Reference, "
        "Computers & Internet, Sports, Business & Finance, Entertainment & Music, "
        "Family & Relationships, Politics & Government \n"
        "Title: Why is the sky blue?\nText: Rayleigh scattering {of} sunlight.\n"
        "\nAnswer:"
    )
    assert build_prompt(get_dataset("yahoo"), sentence) == expected


def test_every_dataset_is_covered_by_a_checked_item():
    assert {r[1] for r in REAL_ITEMS} | {"yahoo"} == set(DATASETS)
    assert len(DATASETS) == 15


def test_prefixes_are_switchable():
    spec = get_dataset("RTE")
    body = (
        'What is the logical relationship between the "sentence 1" and the "sentence 2"? '
        "Choose one from the option.\nOption: contradiction, entailment \nS\nAnswer:"
    )
    assert build_prompt(spec, "S", add_task_name=False, add_dataset_name=False) == body
    assert build_prompt(spec, "S", add_dataset_name=False) == "Task:NLI\n" + body
    assert build_prompt(spec, "S", add_task_name=False) == "Dataset:RTE\n" + body


@pytest.mark.parametrize("sentence", ["{0}", "a {} b", "{x} }{ {{", "%s %(x)s \\n"])
def test_sentence_is_inserted_verbatim(sentence):
    prompt = build_prompt(get_dataset("SST-2"), sentence)
    assert prompt.endswith(" \n" + sentence + "\nAnswer:")


def test_registry_options_equal_the_labels_files(benchmark_dir):
    for spec in DATASETS.values():
        labels = benchmark_dir / spec.relative_dir / "labels.json"
        assert json.loads(labels.read_text()) == list(spec.options), spec.name


def test_layouts_rebuild_real_sentences(benchmark_dir):
    cases = [
        (
            "agnews",
            "TC",
            "test",
            106,
            dict(
                title="Creative Sound Blaster Wireless Music",
                text="&lt;strong&gt;Review&lt;/strong&gt; From PC to hi-fi via Wi-Fi",
            ),
        ),
        ("MNLI", "NLI", "test", 694, dict(premise="Waterloo.", hypothesis="D-Day.")),
        (
            "WiC",
            "WiC",
            "test",
            239,
            dict(word="curd", sentence1="Bean curd.", sentence2="Lemon curd."),
        ),
        (
            "COPA",
            "COPA",
            "test",
            32,
            dict(
                question="cause",
                premise="I coughed.",
                choice1="I inhaled smoke.",
                choice2="I lowered my voice.",
            ),
        ),
        ("yelp", "SC", "train", 1779, dict(text="Closed")),
    ]
    for name, folder, split, index, fields in cases:
        sentence = _item(benchmark_dir, folder, name, split, index)["sentence"]
        assert get_dataset(name).layout.render(**fields) == sentence, name
    with pytest.raises(ValueError, match="missing \\['hypothesis'\\]"):
        tasks.SENTENCE_PAIR.render(premise="x")


def test_orders():
    assert get_order(1) == ("dbpedia", "amazon", "yahoo", "agnews")
    assert get_order("order3") == get_order("3") == get_order(3)
    assert get_order(3)[0] == "yahoo"
    for k in (1, 2, 3):
        assert sorted(get_order(k)) == sorted(["dbpedia", "amazon", "yahoo", "agnews"])
    for k in (4, 5, 6):
        assert sorted(get_order(k)) == sorted(DATASETS)  # each of the 15 exactly once
    assert get_order(4)[:4] == ("MNLI", "CB", "WiC", "COPA")
    assert get_order(5)[-1] == get_order(4)[-1] == "yahoo"
    assert get_order(6)[-3:] == ("MultiRC", "BoolQA", "WiC")


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(KeyError, match="unknown dataset 'agnew'.*agnews.*SST-2"):
        get_dataset("agnew")
    with pytest.raises(KeyError, match="unknown order 7.*1 \\(order1\\).*6 \\(order6\\)"):
        get_order(7)
    with pytest.raises(KeyError, match="unknown order 'first'"):
        get_order("first")


def test_spec_validation():
    with pytest.raises(ValueError, match="unknown task type 'XX'.*valid types"):
        tasks.DatasetSpec("x", "XX", ("a", "b"), tasks.PLAIN_TEXT)
    with pytest.raises(ValueError, match="distinct"):
        tasks.DatasetSpec("x", "SC", ("a", "a"), tasks.PLAIN_TEXT)


def test_copa_prompt_head_has_no_option_line():
    """The released benchmark's COPA prompt: prefixes + sentence + "\\nAnswer:"; the
    truncation path keeps exactly this head (``prompt_head``)."""
    spec = get_dataset("COPA")
    assert tasks.prompt_head(spec) == "Task:COPA\nDataset:COPA\n"
    assert tasks.prompt_head(spec, add_task_name=False, add_dataset_name=False) == ""
    assert "Option:" in tasks.prompt_head(get_dataset("CB"))
