"""Image-level presence gate (issue 11, false alarms): the decision, its calibration rule on the
selection classes, and that train() stores it and every Predictor path applies it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from _train_data import load, shared_project, train_fold0


def test_apply_gate_empties_only_the_queries_below_the_threshold():
    from pipeline.inference.gate import ABSENT_LOGIT, apply_gate

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 5, 5, generator=g)
    logits[0] = logits[0] - logits[0].max() + 0.5   # max 0.5: below tau -> emptied
    logits[1] = logits[1] - logits[1].max() + 3.0   # max 3.0: kept
    logits[2] = logits[2] - logits[2].max() - 1.0   # max -1: nothing to empty
    out = apply_gate(logits, 2.0)
    assert not (out[0] > 0).any() and (out[0] <= ABSENT_LOGIT).all()
    neg = logits[0] < ABSENT_LOGIT
    assert torch.equal(out[0][neg], logits[0][neg])  # negative logits are left as they were
    assert torch.equal(out[1], logits[1]) and torch.equal(out[2], logits[2])
    assert apply_gate(logits, None) is logits


def _scores():
    from pipeline.training.gate import QueryScore

    # class A: ungated 60/80; class B: ungated 40/80, its query b1 is a pure false alarm (I = 0)
    return [QueryScore("A", 1.0, 10, 20, 15), QueryScore("A", 5.0, 50, 60, 55),
            QueryScore("B", 2.0, 0, 30, 10), QueryScore("B", 8.0, 40, 50, 45)]


def test_gated_miou_counts_a_gated_query_as_its_missed_truth():
    from pipeline.training.gate import gated_miou

    s = _scores()
    assert gated_miou(s, None) == pytest.approx((60 / 80 + 40 / 80) / 2)
    assert gated_miou(s, 2.0) == pytest.approx((50 / 75 + 40 / 80) / 2)       # a1 off: its 15 truth pixels missed
    assert gated_miou(s, 5.0) == pytest.approx((50 / 75 + 40 / 60) / 2)       # b1 off too: its false alarm gone
    assert gated_miou(s, 8.0) == pytest.approx((0 / 70 + 40 / 60) / 2)


@pytest.mark.parametrize("budget, tau", [(0.0, 5.0), (1.0, 5.0), (29.0, 5.0), (30.0, 8.0), (None, None)])
def test_calibrate_picks_the_largest_threshold_within_the_budget(budget, tau):
    from pipeline.training.gate import calibrate

    assert calibrate(_scores(), budget) == tau


def test_calibrate_rejects_a_negative_budget_and_needs_scores():
    from pipeline.training.gate import calibrate

    with pytest.raises(ValueError, match="presence budget must be >= 0"):
        calibrate(_scores(), -1.0)
    assert calibrate([], 1.0) is None


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """A tiny real LERENet training on fold 0 with ``train.presence_budget: 1.0``."""
    from pipeline.features import build_feature_store

    params = load(shared_project(tmp_path_factory), train={"presence_budget": 1.0})
    build_feature_store(params, progress=False)
    return params, train_fold0(params, tmp_path_factory, "lerenet", "gated")


def test_training_stores_the_calibrated_threshold_and_predictor_reads_it(gated):
    from pipeline.checkpoint import load_model
    from pipeline.inference.predictor import Predictor

    params, res = gated
    _, meta = load_model(res.model_path)
    assert isinstance(meta["presence_threshold"], float) and meta["presence_budget"] == 1.0
    run = json.loads(res.run_json.read_text())
    assert run["presence_threshold"] == meta["presence_threshold"]
    pred = Predictor.load(res.model_path)
    assert pred.presence_threshold == meta["presence_threshold"]
    assert pred.describe()["presence_threshold"] == meta["presence_threshold"]


def test_no_budget_means_no_gate(tmp_path_factory):
    from pipeline.checkpoint import load_model

    params = load(shared_project(tmp_path_factory))
    assert params.train.presence_budget is None
    res = train_fold0(params, tmp_path_factory, "prototype", "ungated")
    assert load_model(res.model_path)[1]["presence_threshold"] is None


def _two_pairs(params):
    """Images and masks of the first two defect images of the project's first class (support, query)."""
    from pipeline.images import load_validated, read_image, read_mask, resolve

    rows = load_validated(params.data.dir, kind="defect")
    rows = rows[rows["class_name"] == sorted(rows["class_name"])[0]].head(2)
    img = [read_image(resolve(params.data.dir, p)) for p in rows["image_path"]]
    msk = [read_mask(resolve(params.data.dir, p), params.data.mask_threshold) for p in rows["mask_path"]]
    return img, msk


def test_predictor_segment_applies_the_gate_of_its_model_file(gated):
    """The one inference path (predict, serving, evaluation): a query whose max logit is below tau
    gets an empty mask; at a tau below its max the mask is the ungated one."""
    from pipeline.inference.predictor import Predictor

    params, res = gated
    img, msk = _two_pairs(params)
    pred = Predictor.load(res.model_path)
    pred.meta["presence_threshold"] = None
    support = pred.encode_support(img[:1], msk[:1])
    raw = pred.predict_logits(support, img[1:])[0]
    assert (raw > 0).any(), "the ungated prediction must mark pixels for this check to mean anything"
    top = float(pred.head(support.feats, support.masks, pred.encode_images(img[1:])).max())
    pred.meta["presence_threshold"] = top + 1.0
    assert not (pred.segment(img[:1], msk[:1], img[1]) > 0).any()
    pred.meta["presence_threshold"] = top - 1.0
    assert np.array_equal(pred.predict_logits(support, img[1:])[0], raw)


@pytest.mark.parametrize("target, tau, share", [(0.4, math.nextafter(2.0, math.inf), 0.4), (0.8, -math.inf, 0.8),
                                                (0.0, math.nextafter(4.0, math.inf), 0.0), (0.59, math.nextafter(2.0, math.inf), 0.4)])
def test_fp_threshold_by_hand(target, tau, share):
    """5 defect-free queries, 4 of them flagged ungated (max logit > 0): the smallest tau keeping <= target."""
    from pipeline.training.gate import fp_threshold

    assert fp_threshold([-1.0, 0.5, 2.0, 3.0, 4.0], target) == (tau, pytest.approx(share))


def test_false_alarm_target_gates_the_training_sides_defect_free_images(tmp_path_factory):
    """``train.presence_fp: 0``: no defect-free training-side image (fold 0: MT_Uneven's 3 ``Nd`` images) keeps a
    predicted pixel at the stored threshold; without the target the same model flags some of them."""
    from pipeline.checkpoint import load_model
    from pipeline.episodes import training_pools
    from pipeline.evaluation.data import open_store_for
    from pipeline.inference.predictor import Predictor
    from pipeline.training.gate import normal_episodes, query_scores

    pf = shared_project(tmp_path_factory)
    metas = {}
    for target in (None, 0.0):
        params = load(pf, train={"presence_fp": target})
        res = train_fold0(params, tmp_path_factory, "prototype", "fp")
        metas[target] = load_model(res.model_path)[1]
    eps = normal_episodes(params, training_pools(params, 0))
    assert len(eps) == 3 and {e.class_name for e in eps} == {"MT_Uneven"} and all(e.negative for e in eps)
    pred = Predictor.load(res.model_path)
    scores = [s.score for s in query_scores(pred.net, eps, store=open_store_for(params, pred, params.data.dir))]
    assert max(scores) > 0, "the ungated prototype must flag a defect-free image for this check to mean anything"
    assert metas[None]["presence_threshold"] is None and metas[None]["presence_fp_train"] is None
    tau = metas[0.0]["presence_threshold"]
    assert tau > max(scores) and metas[0.0]["presence_fp_train"] == 0.0 and metas[0.0]["presence_fp"] == 0.0


def test_presence_gate_gives_small_supports_their_own_threshold():
    """``PresenceGate``: an episode whose mean support defect share is in ``(0, small_area]`` is judged by the
    small threshold, any other (an empty support too) by the main one; a side without a threshold is not gated."""
    from pipeline.inference.gate import ABSENT_LOGIT, PresenceGate, apply_gate

    gate = PresenceGate(9.0, 5.0, 0.01)
    taus = gate.thresholds(torch.tensor([0.005, 0.5, 0.0, 0.01], dtype=torch.float64))
    assert taus.tolist() == [5.0, 9.0, 9.0, 5.0]
    assert PresenceGate(None, 5.0, 0.01).thresholds(torch.tensor([0.5, 0.001])).tolist() == [-math.inf, 5.0]
    old = PresenceGate.from_meta({"presence_threshold": 2.0})      # a model file written before the split
    assert old == PresenceGate(2.0) and not old.split and old.thresholds(torch.tensor([0.001])) == 2.0
    assert PresenceGate.from_meta({}) == PresenceGate(None)
    logits = torch.full((3, 1, 4, 4), -2.0)
    logits[:, 0, 1, 1] = 6.0                                        # every query's max logit is 6
    out = apply_gate(logits, gate.thresholds(torch.tensor([0.005, 0.5, 0.0])))
    assert torch.equal(out[0], logits[0])                           # small support: 6 >= 5, kept
    assert (out[1:] <= ABSENT_LOGIT).all()                          # large / empty support: 6 < 9, emptied


def test_gate_compares_in_float64_so_a_tau_one_ulp_above_a_score_gates_it():
    """fp_threshold returns ``nextafter(score)`` in float64; a float32 comparison would round it back and keep the
    query it was meant to gate off."""
    from pipeline.inference.gate import apply_gate

    logits = torch.full((1, 1, 2, 2), 9.5)
    tau = math.nextafter(9.5, math.inf)
    assert not (apply_gate(logits, tau) > 0).any()
    assert not (apply_gate(logits, torch.tensor([tau], dtype=torch.float64)) > 0).any()


def test_split_gate_calibrates_each_support_size_on_its_own_episodes():
    """By hand, target 20 % and no budget: defect-free queries with a small support score low, with a large one
    high. One threshold must gate 3 of the 10 images; apart, the small side meets the target ungated and the large
    side gates its own top images only."""
    from pipeline.inference.gate import PresenceGate
    from pipeline.training.gate import QueryScore, split_gate

    def normal(score, share):
        return QueryScore("MT", score, 0, 0, 0, share)

    small = [normal(x, 0.004) for x in (-5.0, -4.0, -3.0, 6.0, -2.0)]
    large = [normal(x, 0.3) for x in (9.9, 9.8, 9.7, 2.0, -1.0)]
    one = split_gate([], small + large, None, 0.2, None)
    assert one == PresenceGate(math.nextafter(9.7, math.inf))
    assert split_gate([], small + large, None, 0.2, 0.01) == PresenceGate(math.nextafter(9.8, math.inf), None, 0.01)
    # no small episode at all: the small side keeps the threshold of the rule on every episode
    only_large = split_gate([], large, None, 0.2, 0.01)
    assert only_large.small_threshold == only_large.threshold == math.nextafter(9.8, math.inf)


def test_predictor_gates_an_episode_by_the_size_of_its_support(gated):
    """The one inference path reads the split gate of its model file: the same query is kept when its support
    counts as small (its own, lower threshold) and emptied when it does not."""
    from pipeline.inference.predictor import Predictor

    params, res = gated
    img, msk = _two_pairs(params)
    pred = Predictor.load(res.model_path)
    pred.meta.update(presence_threshold=None, presence_threshold_small=None, presence_small_area=None)
    support = pred.encode_support(img[:1], msk[:1])
    assert 0.0 < support.share < 1.0
    raw = pred.predict_logits(support, img[1:])[0]
    assert (raw > 0).any(), "the ungated prediction must mark pixels for this check to mean anything"
    top = float(pred.head(support.feats, support.masks, pred.encode_images(img[1:]), gate=False).max())
    pred.meta.update(presence_threshold=top + 1.0, presence_threshold_small=top - 1.0)
    pred.meta["presence_small_area"] = 1.0                        # every non-empty support is small
    assert np.array_equal(pred.predict_logits(support, img[1:])[0], raw)
    assert pred.describe()["presence_threshold_small"] == top - 1.0
    pred.meta["presence_small_area"] = support.share / 2          # this support is not small
    assert not (pred.segment(img[:1], msk[:1], img[1]) > 0).any()
