import numpy as np
import pytest

from cljax.cl import metrics

NAN = float("nan")

# After task t (row) on task i (column); the upper triangle holds zero-shot accuracies.
ACC = np.array(
    [
        [90.0, 10.0, 20.0],
        [60.0, 80.0, 30.0],
        [70.0, 50.0, 85.0],
    ]
)
BASE = [5.0, 15.0, 25.0]


def test_metrics_match_hand_computation():
    m = metrics.summarize(ACC, base=BASE, test_sizes=[100, 300, 600])
    assert m.average_accuracy == pytest.approx((70 + 50 + 85) / 3)
    assert m.average_accuracy_micro == pytest.approx((70 * 100 + 50 * 300 + 85 * 600) / 1000)
    # BWT: ((70 - 90) + (50 - 80)) / 2
    assert m.backward_transfer == pytest.approx(-25.0)
    # FWT: ((10 - 15) + (30 - 25)) / 2
    assert m.forward_transfer == pytest.approx(0.0)
    # Forgetting: task 0 best 90 (rows 0..1) -> 70; task 1 best 80 (row 1) -> 50.
    assert m.forgetting == pytest.approx((20 + 30) / 2)


def test_forgetting_ignores_accuracy_before_a_task_is_learned():
    acc = np.array([[50.0, 99.0], [40.0, 60.0]])
    # Task 1's zero-shot 99 after task 0 is not "forgotten"; only task 0 counts.
    assert metrics.forgetting(acc) == pytest.approx(10.0)


def test_seen_only_matrix_and_single_task():
    acc = np.array([[90.0, NAN], [80.0, 70.0]])
    m = metrics.summarize(acc)
    assert m.backward_transfer == pytest.approx(-10.0)
    assert m.forward_transfer is None
    single = metrics.summarize(np.array([[42.0]]))
    assert single.average_accuracy == 42.0
    assert single.backward_transfer is None and single.forgetting is None


def test_bad_matrices_name_the_entry():
    with pytest.raises(ValueError, match="square"):
        metrics.summarize(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"\[1, 0\]"):
        metrics.summarize(np.array([[1.0, NAN], [NAN, 2.0]]))
    with pytest.raises(ValueError, match="evaluated before training"):
        metrics.forward_transfer(np.array([[1.0, NAN], [1.0, 2.0]]), [0.0, 0.0])
    with pytest.raises(ValueError, match="test_sizes"):
        metrics.average_accuracy(ACC, [1, 2])


def test_joint_row_has_only_average_accuracy():
    m = metrics.summarize(np.array([[80.0, 60.0, 70.0]]), base=[0, 0, 0], test_sizes=[1, 1, 2])
    assert m.average_accuracy == pytest.approx(70.0)
    assert m.average_accuracy_micro == pytest.approx(70.0)
    assert m.backward_transfer is None and m.forward_transfer is None and m.forgetting is None
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        metrics.summarize(np.array([[80.0, NAN, 70.0]]))
