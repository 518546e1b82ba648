"""Sources: the JSON directory (bad input included), subsampling, held-out splits, TFDS, and
the synthetic benchmark."""

import json
import warnings
from collections import Counter
from pathlib import Path

import pytest

from cljax.data import sources
from cljax.data.sources import SourceConfig, load_benchmark, load_task
from cljax.data.synthetic import SyntheticConfig, synthetic_benchmark
from cljax.data.tasks import build_prompt
from cljax.errors import DataError

CB_OPTIONS = ["entailment", "contradiction", "neutral"]


def _write(directory: Path, name: str, payload) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = payload if isinstance(payload, str) else json.dumps(payload)
    (directory / f"{name}.json").write_text(text, encoding="utf-8")


def _items(labels: list[str], prefix: str = "s") -> list[dict]:
    return [
        {"sentence": f"sentence 1: {prefix}{i}.\nsentence 2: x.", "label": label}
        for i, label in enumerate(labels)
    ]


@pytest.fixture()
def fixture_root(tmp_path: Path) -> Path:
    """A tiny benchmark: CB with train + test (one "-" label in test), SST-2 with train only."""
    cb = tmp_path / "NLI" / "CB"
    _write(cb, "labels", CB_OPTIONS)
    _write(cb, "train", _items(CB_OPTIONS * 4))
    _write(cb, "test", _items(["neutral", "-", "entailment", "-", "contradiction"], "t"))
    sst = tmp_path / "SC" / "SST-2"
    _write(sst, "labels", ["Good", "Bad"])
    _write(
        sst,
        "train",
        [{"sentence": f"Text: {i} ", "label": "Good" if i % 4 else "Bad"} for i in range(40)],
    )
    return tmp_path


def _config(root: Path, **kw) -> SourceConfig:
    return SourceConfig(data_dir=str(root), **kw)


def test_json_directory_reads_splits_and_reports_invalid_labels(fixture_root):
    with pytest.warns(UserWarning, match=r"test.json: excluded 2 of 5 items.*\{'-': 2\}") as w:
        task = load_task("CB", _config(fixture_root))
    assert len(w) == 1  # one warning per file, not one per item
    assert [ex.label for ex in task.test] == ["neutral", "entailment", "contradiction"]
    assert [ex.source_index for ex in task.test] == [0, 2, 4]
    assert len(task.train) == 12 and task.train[0].sentence == "sentence 1: s0.\nsentence 2: x."
    report = task.metadata["splits"]["test"]
    assert report["n_read"] == 5 and report["n_kept"] == 3
    assert report["excluded"]["invalid_label"] == {
        "count": 2,
        "first_indices": [1, 3],
        "values": {"-": 2},
    }
    assert task.metadata["n_test"] == 3
    json.dumps(task.metadata)  # serialisable as run metadata


def test_invalid_label_policies(fixture_root):
    with pytest.raises(DataError, match=r"CB/test.json: item 1 has label '-'"):
        load_task("CB", _config(fixture_root, invalid_labels="error"))
    kept = load_task("CB", _config(fixture_root, invalid_labels="keep"))
    assert [ex.label for ex in kept.test] == ["neutral", "-", "entailment", "-", "contradiction"]
    assert kept.metadata["splits"]["test"]["kept_invalid_labels"] == 2


def test_real_mnli_test_has_131_excluded_items(benchmark_dir):
    with pytest.warns(UserWarning, match="excluded 131 of 7600"):
        task = load_task("MNLI", SourceConfig(data_dir=str(benchmark_dir)))
    assert task.metadata["splits"]["test"]["excluded"]["invalid_label"]["count"] == 131
    assert len(task.test) == 7600 - 131
    assert {ex.label for ex in task.test} == {"neutral", "entailment", "contradiction"}


def test_empty_sentences(fixture_root):
    cb = fixture_root / "NLI" / "CB"
    _write(
        cb,
        "test",
        [{"sentence": "ok", "label": "neutral"}, {"sentence": " \n", "label": "neutral"}],
    )
    # the message names the run-config key that skips such items
    with pytest.raises(DataError, match=r"item 1 has an empty sentence \(data.empty_sentences="):
        load_task("CB", _config(fixture_root))
    with pytest.warns(UserWarning, match="1 with empty sentence"):
        task = load_task("CB", _config(fixture_root, empty_sentences="exclude"))
    assert len(task.test) == 1
    assert task.metadata["splits"]["test"]["excluded"]["empty_sentence"]["first_indices"] == [1]


@pytest.mark.parametrize(
    "payload,message",
    [
        (
            '[{"sentence": "a", "label": "neutral"},\n {"sentence": "b" "label"}]',
            r"CB/test.json: malformed JSON at line 2 column",
        ),
        ({"sentence": "a"}, r"CB/test.json: expected a JSON list of items, got dict"),
        (
            [{"sentence": "a", "label": "neutral"}, ["b", "neutral"]],
            r"CB/test.json: item 1 is list, expected an object",
        ),
        (
            [{"sentence": "a", "label": "neutral"}, {"sentence": "b"}],
            r"CB/test.json: item 1 has no 'label' field",
        ),
        ([{"sentence": "a", "label": 2}], r"CB/test.json: item 0 field 'label' is int"),
    ],
)
def test_malformed_files_name_file_and_item(fixture_root, payload, message):
    _write(fixture_root / "NLI" / "CB", "test", payload)
    with pytest.raises(DataError, match=message):
        load_task("CB", _config(fixture_root))


def test_labels_file_must_match_the_registry(fixture_root):
    _write(fixture_root / "NLI" / "CB", "labels", ["entailment", "neutral", "contradiction"])
    with pytest.raises(DataError, match=r"CB/labels.json: options .* differ from the registered"):
        load_task("CB", _config(fixture_root))


def test_missing_directory_dataset_and_split(fixture_root, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"config data_dir: .*nowhere.*CLJAX_DATA_DIR"):
        load_task("CB", SourceConfig(data_dir=str(tmp_path / "nowhere")))
    monkeypatch.setenv("CLJAX_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"\$CLJAX_DATA_DIR: .*nowhere"):
        load_task("CB")
    monkeypatch.setenv("CLJAX_DATA_DIR", str(fixture_root))
    with pytest.warns(UserWarning, match="excluded 2 of 5"):
        assert len(load_task("CB").train) == 12  # located through the variable
    with pytest.raises(FileNotFoundError, match=r"dataset 'RTE': directory .*NLI/RTE not found"):
        load_task("RTE")
    with pytest.raises(
        FileNotFoundError, match=r"'SST-2': split 'test' is missing.*holdout_fraction"
    ):
        load_task("SST-2")
    (fixture_root / "TC" / "yahoo").mkdir(parents=True)
    _write(fixture_root / "TC" / "yahoo", "labels", list(sources.get_dataset("yahoo").options))
    with pytest.raises(FileNotFoundError, match=r"'yahoo': no split files"):
        load_task("yahoo")
    with pytest.raises(KeyError, match="unknown dataset 'cb'; valid datasets: .*CB"):
        load_benchmark(["CB", "cb"])


def test_held_out_split_only_when_asked_and_stratified(fixture_root):
    config = _config(fixture_root, holdout_fraction=0.25, seed=3)
    task = load_task("SST-2", config)
    assert Counter(ex.label for ex in task.test) == {"Good": 8, "Bad": 2}  # 25% of 30 / 10
    assert Counter(ex.label for ex in task.train) == {"Good": 22, "Bad": 8}
    train_ids = {ex.source_index for ex in task.train}
    test_ids = {ex.source_index for ex in task.test}
    assert train_ids.isdisjoint(test_ids) and train_ids | test_ids == set(range(40))
    derived = task.metadata["derived_split"]
    assert derived["missing"] == "test" and derived["carved_from"].endswith("SST-2/train.json")
    assert (derived["test_fraction"], derived["seed"], derived["n_test"]) == (0.25, 3, 10)
    assert load_task("SST-2", config).test == task.test  # deterministic
    assert (
        load_task("SST-2", _config(fixture_root, holdout_fraction=0.25, seed=4)).test != task.test
    )
    # A dataset with both splits is left alone even when the config asks.
    with pytest.warns(UserWarning):
        cb = load_task("CB", config)
    assert "derived_split" not in cb.metadata and len(cb.train) == 12


def test_subsample_per_class(fixture_root):
    config = _config(fixture_root, holdout_fraction=0.25, train_per_class=5, test_per_class=1)
    task = load_task("SST-2", config)
    assert Counter(ex.label for ex in task.train) == {"Good": 5, "Bad": 5}
    assert Counter(ex.label for ex in task.test) == {"Good": 1, "Bad": 1}
    indices = [ex.source_index for ex in task.train]
    assert indices == sorted(indices)  # file order kept
    report = task.metadata["subsampled"]["train"]
    assert report["before"] == {"Bad": 8, "Good": 22} and report["after"] == {"Bad": 5, "Good": 5}
    assert load_task("SST-2", config).train == task.train
    other = load_task(
        "SST-2", _config(fixture_root, holdout_fraction=0.25, train_per_class=5, seed=1)
    )
    assert other.train != task.train
    # A class with fewer examples than n keeps all of them.
    kept, rep = sources.subsample_per_class(task.train, 7, 0, "x")
    assert len(kept) == 10 and rep["after"] == {"Bad": 5, "Good": 5}


def test_validation_split_is_carved_from_training_data_and_never_reads_test(fixture_root):
    config = _config(fixture_root, validation_per_class=2, train_per_class=1, seed=3)
    (fixture_root / "NLI" / "CB" / "test.json").write_text("not json")  # never read
    cb = load_task("CB", config)
    assert Counter(ex.label for ex in cb.test) == {label: 2 for label in CB_OPTIONS}
    assert Counter(ex.label for ex in cb.train) == {label: 1 for label in CB_OPTIONS}
    train_ids = {ex.source_index for ex in cb.train}
    assert train_ids.isdisjoint(ex.source_index for ex in cb.test)
    assert cb.metadata["validation"] == {"per_class": 2, "seed": 3, "n": 6}
    assert load_task("CB", config).test == cb.test  # deterministic
    # SST-2 has no test file: its test split is carved first (as a test run carves it) and
    # validation comes from the rest, so it never overlaps what a test run evaluates on.
    held = dict(holdout_fraction=0.25, seed=3)
    test_ids = {ex.source_index for ex in load_task("SST-2", _config(fixture_root, **held)).test}
    sst = load_task("SST-2", _config(fixture_root, validation_per_class=3, **held))
    assert Counter(ex.label for ex in sst.test) == {"Good": 3, "Bad": 3}
    assert test_ids.isdisjoint(ex.source_index for ex in sst.test + sst.train)
    assert len(sst.train) == 30 - 6
    assert sst.metadata["derived_split"]["missing"] == "test"
    # A dataset with a test file only (dbpedia offline): the same, from the test file.
    rte = fixture_root / "NLI" / "RTE"
    _write(rte, "labels", ["contradiction", "entailment"])
    _write(rte, "test", _items(["entailment", "contradiction"] * 10))
    test_ids = {ex.source_index for ex in load_task("RTE", _config(fixture_root, **held)).test}
    rte_val = load_task("RTE", _config(fixture_root, validation_per_class=2, **held))
    assert len(rte_val.test) == 4 and len(rte_val.train) == 20 - len(test_ids) - 4
    assert test_ids.isdisjoint(ex.source_index for ex in rte_val.test + rte_val.train)
    # A class keeps at least one training example.
    rest, validation = sources.carve_validation(cb.train + cb.test, 5, 0, "x")
    assert Counter(ex.label for ex in rest) == {label: 1 for label in CB_OPTIONS}


def test_config_validation():
    with pytest.raises(ValueError, match="SourceConfig.invalid_labels must be one of"):
        SourceConfig(invalid_labels="drop")
    with pytest.raises(ValueError, match="SourceConfig.holdout_fraction must be in"):
        SourceConfig(holdout_fraction=1.5)
    with pytest.raises(ValueError, match="SourceConfig.train_per_class must be a positive int"):
        SourceConfig(train_per_class=0)
    with pytest.raises(ValueError, match="tfds_data_dir is required"):
        SourceConfig(source="tfds")


def test_tfds_builds_and_reads_the_fixture(fixture_root, tmp_path):
    pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed")
    config = _config(fixture_root, source="tfds", tfds_data_dir=str(tmp_path / "tfds"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_tfds = load_task("CB", config)
        from_json = load_task("CB", _config(fixture_root))
    assert from_tfds.train == from_json.train and from_tfds.test == from_json.test
    assert from_tfds.metadata["splits"]["test"]["excluded"]["invalid_label"]["count"] == 2
    shards = list((tmp_path / "tfds" / "cl_benchmark" / "CB" / "1.0.0").glob("*.array_record*"))
    assert len(shards) == 2  # train and test, versioned
    # Once built, the shards are read without the JSON directory (as on a TPU VM).
    without_json = SourceConfig(
        source="tfds", data_dir=str(tmp_path / "gone"), tfds_data_dir=str(tmp_path / "tfds")
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_task("CB", without_json).test == from_json.test
    with pytest.raises(FileNotFoundError, match="config data_dir: .*gone"):
        load_task("RTE", without_json)  # not built yet: needs the JSON directory
    # Held-out split and subsampling select the same examples as from JSON.
    held = dict(holdout_fraction=0.25, train_per_class=3)
    sst_tfds = load_task(
        "SST-2", _config(fixture_root, source="tfds", tfds_data_dir=str(tmp_path / "tfds"), **held)
    )
    assert sst_tfds.train == load_task("SST-2", _config(fixture_root, **held)).train


def test_synthetic_benchmark_is_deterministic_and_balanced():
    config = SyntheticConfig(seed=5, train_per_class=20, test_per_class=5)
    first, again = synthetic_benchmark(config), synthetic_benchmark(config)
    assert [t.train + t.test for t in first] == [t.train + t.test for t in again]
    other = synthetic_benchmark(SyntheticConfig(seed=6, train_per_class=20, test_per_class=5))
    assert first[0].train != other[0].train
    assert [t.spec.name for t in first] == ["synth_topic", "synth_sentiment", "synth_entailment"]
    assert [t.spec.task_type for t in first] == ["TC", "SC", "NLI"]
    option_sets = [set(t.spec.options) for t in first]
    assert all(a.isdisjoint(b) for i, a in enumerate(option_sets) for b in option_sets[i + 1 :])
    for task in first:
        assert Counter(ex.label for ex in task.train) == dict.fromkeys(task.spec.options, 20)
        assert Counter(ex.label for ex in task.test) == dict.fromkeys(task.spec.options, 5)
    prompt = build_prompt(first[2].spec, first[2].train[0].sentence)
    assert prompt.startswith(
        "Task:NLI\nDataset:synth_entailment\nWhat is the logical relationship between the "
        '"sentence 1" and the "sentence 2"? Choose one from the option.\n'
        "Option: entailment, neutral, contradiction \nsentence 1: "
    )
    assert "\nsentence 2: " in prompt and prompt.endswith(".\nAnswer:")


def test_synthetic_label_is_the_majority_class_and_tasks_conflict():
    config = SyntheticConfig(seed=0, train_per_class=30, test_per_class=5)
    tasks = synthetic_benchmark(config)
    word_class = []
    for task in tasks:
        classes = {w: label for label, ws in task.metadata["word_classes"].items() for w in ws}
        word_class.append(classes)
        for ex in task.train + task.test:
            words = ex.sentence.replace("sentence 1:", " ").replace("sentence 2:", " ")
            words = words.replace("Title:", " ").replace("Text:", " ").replace(".", " ").split()
            assert len(words) == config.words_per_example
            counts = Counter(classes[w] for w in words)
            assert counts[ex.label] == config.label_words
            assert max(c for label, c in counts.items() if label != ex.label) < config.label_words
    # Shared words: co-membership differs between tasks (the partitions conflict), which
    # is what makes sequential training forget.
    shared = sorted(set(word_class[0]) & set(word_class[1]) & set(word_class[2]))
    assert len(shared) == config.shared_words
    pairs = [(a, b) for i, a in enumerate(shared) for b in shared[i + 1 :]]
    together = [{(a, b) for a, b in pairs if wc[a] == wc[b]} for wc in word_class]
    assert together[0] != together[1] and together[1] != together[2]
    # Each task also has its own words.
    own = [set(wc) - set(shared) for wc in word_class]
    assert all(
        len(o) == config.own_words_per_class * len(t.spec.options)
        for o, t in zip(own, tasks, strict=True)
    )
    assert own[0].isdisjoint(own[1])


def test_synthetic_config_errors():
    with pytest.raises(ValueError, match=r"unknown synthetic task kind 'poetry' in data.order"):
        SyntheticConfig(kinds=("topic", "poetry"))
    with pytest.raises(ValueError, match="cannot be spread"):
        SyntheticConfig(words_per_example=12, label_words=3)
    names = [
        t.spec.name
        for t in synthetic_benchmark(
            SyntheticConfig(kinds=("topic", "topic"), train_per_class=2, test_per_class=1)
        )
    ]
    assert names == ["synth_topic", "synth_topic2"]
