import json

import numpy as np
import pytest

from cljax.cl import report

NAN = float("nan")


def _write(run_dir, method, acc):
    run_dir.mkdir()
    return report.write_accuracy(
        run_dir,
        method=method,
        tasks=["a", "b", "c"],
        accuracy=np.array(acc),
        base=[10.0, 20.0, 30.0],
        test_sizes=[10, 10, 20],
    )


def test_partial_matrix_reports_completed_rows_only(tmp_path):
    acc = [[80.0, 15.0, 25.0], [60.0, 70.0, 35.0], [NAN, NAN, NAN]]
    metrics = _write(tmp_path / "run", "seqft", acc)
    record = json.loads((tmp_path / "run" / "accuracy.json").read_text())
    assert record["tasks_done"] == 2
    assert record["accuracy"][2] == [None, None, None]
    assert metrics.backward_transfer == pytest.approx(-20.0)
    assert metrics.forward_transfer == pytest.approx(15.0 - 20.0)
    rows = (tmp_path / "run" / "accuracy.csv").read_text().splitlines()
    assert rows == ["after_task,a,b,c", "a,80.00,15.00,25.00", "b,60.00,70.00,35.00"]


def test_plots_and_comparison_table(tmp_path):
    _write(tmp_path / "r1", "seqft", [[80, 15, 25], [60, 70, 35], [40, 50, 90]])
    _write(tmp_path / "r2", "osf", [[80, 15, 25], [78, 70, 35], [75, 68, 88]])
    paths = report.plot_run(tmp_path / "r1")
    assert all(p.stat().st_size > 1000 for p in paths)
    table = report.compare_runs([tmp_path / "r1", tmp_path / "r2"], tmp_path / "cmp.png")
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["method", "AA", "AA"]
    seq = next(line for line in lines if line.startswith("seqft"))
    # AA macro of the final row (40 + 50 + 90) / 3, BWT ((40-80) + (50-70)) / 2
    assert "60.00" in seq.split() and "-30.00" in seq.split()
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_compare_names_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="not-a-run"):
        report.compare_runs([tmp_path / "not-a-run"])


def test_joint_run_writes_one_row(tmp_path):
    metrics = _write(tmp_path / "mtl", "mtl", [[70.0, 80.0, 90.0]])
    assert metrics.average_accuracy == pytest.approx(80.0)
    rows = (tmp_path / "mtl" / "accuracy.csv").read_text().splitlines()
    assert rows[1] == "all tasks,70.00,80.00,90.00"
    assert all(p.stat().st_size > 1000 for p in report.plot_run(tmp_path / "mtl"))


def _finished(root, name, tasks, final):
    run = root / name
    run.mkdir(parents=True)
    acc = np.full((len(tasks), len(tasks)), 50.0)
    acc[-1] = final
    report.write_accuracy(run, method=name.split("-")[0], tasks=tasks, accuracy=acc)
    return run


def test_compare_aligns_runs_by_task_name_and_refuses_different_tasks(tmp_path):
    a = _finished(tmp_path, "seqft-a", ["agnews", "amazon"], [10.0, 20.0])
    b = _finished(tmp_path, "seqft-b", ["amazon", "agnews"], [30.0, 40.0])
    records = [(d, report.read_accuracy(d)) for d in (a, b)]
    tasks, final = report.final_accuracies(records)
    assert tasks == ["agnews", "amazon"]
    np.testing.assert_array_equal(final, [[10.0, 20.0], [40.0, 30.0]])
    plot = tmp_path / "compare.png"
    table = report.compare_runs([a, b], plot)
    assert plot.is_file() and "seqft (seqft-a)" in table and "seqft (seqft-b)" in table
    c = _finished(tmp_path, "osf-c", ["topic", "sentiment"], [1.0, 2.0])
    with pytest.raises(ValueError, match="different tasks .*seqft-a: agnews, amazon.*osf-c: topic"):
        report.compare_runs([a, c], plot)


def test_comparison_plot_has_a_title_labels_and_distinct_colours(tmp_path):
    runs = [_finished(tmp_path / f"p{k}", "run", ["x", "y"], [k, k + 1.0]) for k in range(2)]
    records = [(d, report.read_accuracy(d)) for d in runs]
    labels = report.run_labels(records)
    assert labels == ["run (p0/run)", "run (p1/run)"]  # same name: told apart by the parent
    tasks, final = report.final_accuracies(records)
    fig = report.comparison_figure(labels, tasks, final)
    ax = fig.axes[0]
    assert ax.get_title() == "Final accuracy per task, 2 runs"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == labels
    assert [t.get_text() for t in ax.get_xticklabels()] == ["x", "y"]
    assert len(set(report.run_colours(16))) == 16


def test_runs_are_described_in_words_from_their_numbers(tmp_path):
    tasks = ["a", "b", "c"]
    seqft = tmp_path / "seqft"
    osf = tmp_path / "osf"
    for run, matrix in (
        (seqft, [[80.0, 10.0, 10.0], [20.0, 90.0, 10.0], [10.0, 30.0, 70.0]]),
        (osf, [[80.0, 10.0, 10.0], [70.0, 85.0, 10.0], [60.0, 80.0, 30.0]]),
    ):
        run.mkdir()
        report.write_accuracy(
            run, method=run.name, tasks=tasks, accuracy=np.array(matrix), base=[25.0, 30.0, 28.0]
        )
    rec_seqft, rec_osf = report.read_accuracy(seqft), report.read_accuracy(osf)
    assert report.in_words(rec_seqft) == (
        "learned every task (+52 points over the untrained model); kept 12% of a, 33% of b at"
        " the end"
    )
    assert report.in_words(rec_osf) == (
        "did not learn c (30% vs 28% untrained); kept 75% of a, 94% of b at the end"
    )
    assert report.versus(rec_osf, rec_seqft) == (
        "task 1 at 100% of seqft's accuracy; forgot less than seqft (BWT -12.5 vs -65.0)"
    )
    assert report.versus(rec_seqft, rec_osf).endswith(
        "did NOT forget less than osf on this run (BWT -65.0 vs -12.5)"
    )
    table = report.compare_runs([seqft, osf])
    assert "osf (osf): did not learn c" in table and "Against seqft: task 1 at 100%" in table


def test_mean_over_seeds_groups_runs_by_method(tmp_path):
    _write(tmp_path / "s1-seqft", "seqft", [[80, 15, 25], [60, 70, 35], [40, 50, 90]])
    _write(tmp_path / "s2-seqft", "seqft", [[80, 15, 25], [40, 70, 35], [20, 30, 70]])
    _write(tmp_path / "s1-osf", "osf", [[80, 15, 25], [78, 70, 35], [75, 68, 88]])
    table = report.mean_over_seeds(
        [tmp_path / "s1-seqft", tmp_path / "s1-osf", tmp_path / "s2-seqft"]
    ).splitlines()
    assert table[0] == "| method | runs | AA | AA micro | BWT | FWT | Forgetting | a | b | c |"
    cells = [c.strip() for c in table[2].strip("|").split("|")]
    # seqft AA 60 and 40 -> 50 +- 10; BWT -30 and -50 -> -40 +- 10; final a: 40, 20
    assert cells[:3] == ["seqft", "2", "50.0 +- 10.0"] and cells[4] == "-40.0 +- 10.0"
    assert cells[7] == "30.0 +- 10.0"
    assert table[3].startswith("| osf | 1 | 77.0 |")
    _write(tmp_path / "empty", "seqft", [[NAN] * 3] * 3)
    with pytest.raises(report.DataError, match="without a finished task.*empty"):
        report.mean_over_seeds([tmp_path / "s1-seqft", tmp_path / "empty"])
