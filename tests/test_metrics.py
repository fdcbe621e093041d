"""Metric accumulation against hand-computed IoUs (pipeline/metrics.py)."""

import numpy as np
import pytest
import torch

from pipeline.metrics import IoUAccumulator, intersection_union, mean_std


def _mask(shape, ones):
    m = np.zeros(shape, dtype=bool)
    for r, c in ones:
        m[r, c] = True
    return m


def test_intersection_union_by_hand():
    # 3x3 image; pred = top row (3 px), gt = left column (3 px); overlap = (0,0)
    pred = _mask((3, 3), [(0, 0), (0, 1), (0, 2)])
    gt = _mask((3, 3), [(0, 0), (1, 0), (2, 0)])
    i, u, ib, ub = intersection_union(pred, gt)
    assert (i, u) == (1, 5)
    # background: pixels in neither = 9 - 5 = 4 ; pixels not in both = 9 - 1 = 8
    assert (ib, ub) == (4, 8)


def test_per_class_iou_sums_before_dividing():
    acc = IoUAccumulator()
    # class A, episode 1: I=1, U=5 ; episode 2: I=4, U=4 (perfect, 2x2 square)
    acc.update(_mask((3, 3), [(0, 0), (0, 1), (0, 2)]), _mask((3, 3), [(0, 0), (1, 0), (2, 0)]), "A")
    sq = _mask((4, 4), [(1, 1), (1, 2), (2, 1), (2, 2)])
    acc.update(sq, sq, "A")
    # class B: pred 2 px, gt 2 px, overlap 1 -> I=1, U=3
    acc.update(_mask((2, 2), [(0, 0), (0, 1)]), _mask((2, 2), [(0, 0), (1, 0)]), "B")
    ious = acc.class_iou()
    assert ious["A"] == pytest.approx(5 / 9)  # (1+4)/(5+4), not mean(1/5, 1) = 0.6
    assert ious["B"] == pytest.approx(1 / 3)
    assert acc.miou() == pytest.approx((5 / 9 + 1 / 3) / 2)
    assert acc.miou(["B"]) == pytest.approx(1 / 3)
    # FB-IoU pooled over all episodes: fg = (1+4+1)/(5+4+3) = 6/12
    # bg: ep1 I=4,U=8 ; ep2 (16 px, 4 fg both) I=12,U=12 ; ep3 (4 px) I=1,U=3 -> 17/23
    assert acc.foreground_iou() == pytest.approx(6 / 12)
    assert acc.background_iou() == pytest.approx(17 / 23)
    assert acc.fbiou() == pytest.approx((6 / 12 + 17 / 23) / 2)


def test_empty_prediction_counts_as_miss():
    acc = IoUAccumulator()
    gt = _mask((4, 4), [(0, 0), (0, 1)])
    acc.update(np.zeros((4, 4), bool), gt, "C")  # I=0, U=2
    acc.update(gt, gt, "C")  # I=2, U=2
    assert acc.class_iou()["C"] == pytest.approx(2 / 4)


def test_empty_ground_truth_false_alarm_is_penalised():
    acc = IoUAccumulator()
    acc.update(_mask((4, 4), [(3, 3)]), np.zeros((4, 4), bool), "D")  # I=0, U=1
    acc.update(_mask((4, 4), [(0, 0)]), _mask((4, 4), [(0, 0)]), "D")  # I=1, U=1
    assert acc.class_iou()["D"] == pytest.approx(1 / 2)


def test_both_empty_contributes_nothing_and_all_empty_class_is_one():
    acc = IoUAccumulator()
    empty = np.zeros((5, 5), bool)
    acc.update(empty, empty, "E")
    assert acc.class_iou()["E"] == 1.0  # Σ U = 0 -> defined as 1.0 (documented)
    acc.update(_mask((5, 5), [(1, 1)]), _mask((5, 5), [(1, 1), (2, 2)]), "E")  # I=1, U=2
    assert acc.class_iou()["E"] == pytest.approx(1 / 2)  # the both-empty episode changed nothing
    assert acc.episodes["E"] == 2


def test_missing_class_is_an_error_not_a_default():
    acc = IoUAccumulator()
    acc.update(np.ones((2, 2), bool), np.ones((2, 2), bool), "A")
    with pytest.raises(KeyError, match="Z"):
        acc.miou(["A", "Z"])
    with pytest.raises(ValueError):
        IoUAccumulator().fbiou()


def test_order_and_merge_invariance():
    rng = np.random.default_rng(0)
    items = [(rng.random((7, 9)) > 0.5, rng.random((7, 9)) > 0.6, c) for c in "ABCAB"]
    a, b, c = IoUAccumulator(), IoUAccumulator(), IoUAccumulator()
    for p, t, k in items:
        a.update(p, t, k)
    for p, t, k in reversed(items[2:]):
        b.update(torch.from_numpy(p), torch.from_numpy(t.astype(np.uint8)), k)
    for p, t, k in items[:2]:
        c.update(p, t, k)
    b.merge(c)
    assert a.class_iou() == pytest.approx(b.class_iou())
    assert a.fbiou() == pytest.approx(b.fbiou())


def test_bad_input_is_rejected_with_a_clear_error():
    with pytest.raises(ValueError, match="shape"):
        intersection_union(np.zeros((3, 3), bool), np.zeros((3, 4), bool))
    with pytest.raises(TypeError, match="threshold"):
        intersection_union(np.zeros((3, 3), np.float32), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="0 and 1"):
        intersection_union(np.full((2, 2), 255, np.uint8), np.zeros((2, 2), bool))


def test_mean_std():
    m, s = mean_std([0.5, 0.7])
    assert m == pytest.approx(0.6)
    assert s == pytest.approx(np.std([0.5, 0.7], ddof=1))
    assert mean_std([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError):
        mean_std([])
