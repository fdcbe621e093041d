"""The presence gate relative to defect-free reference images (``train.presence_references``, issue 11): the
log-odds it compares, the decision, the reference images a fold may use, and that train() calibrates it,
stores it, and the Predictor and the evaluation apply it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from _train_data import load, shared_project, train_fold0

#: the default LERENet's training-free head (params.yaml): the hypercolumn probe as the output
PROBE_MODEL = {"priors": ["hypercolumn"], "prior_skip": True, "skip_source": "hypercolumn"}


def test_lerenet_presence_log_odds_inverts_the_saturating_output():
    """The default LERENet outputs ``y = 10 (2 sigmoid(z) - 1)`` (skip scale 20 x factor 0.5, bias 0): the
    log-odds recovers ``z`` where ``y`` saturates; a model whose output is a plain logit keeps it."""
    from model import build_model

    net = build_model("lerenet", "efficientnet_lite0", channels=8, pretrained=False, **PROBE_MODEL).eval()
    z = torch.tensor([-6.0, -1.0, 0.0, 2.0, 9.0], dtype=torch.float64)
    y = (10 * (2 * torch.sigmoid(z) - 1)).float()
    assert torch.allclose(net.presence_log_odds(y), z, atol=2e-3)
    assert float(y[-1]) > 9.99 and float(y[-2]) < 7.7, "9 and 2 differ by 7 in z but by < 2.3 in y"
    proto = build_model("prototype", "efficientnet_lite0", pretrained=False)
    assert torch.equal(proto.presence_log_odds(y), y.double())
    plain = build_model("lerenet", "efficientnet_lite0", channels=8, pretrained=False).eval()  # nn skip: no probe
    assert torch.equal(plain.presence_log_odds(y), y.double())


def test_gate_uses_the_reference_score_only_where_an_episode_has_references():
    from pipeline.inference.gate import PresenceGate

    logits = torch.zeros(3, 1, 2, 2)
    logits[:, 0, 0, 0] = torch.tensor([5.0, 5.0, 5.0])            # every query: max logit 5
    shares = torch.full((3,), 0.1)
    gate = PresenceGate(threshold=6.0, reference_threshold=2.0, references=3)
    levels = torch.tensor([2.5, 3.5, float("nan")], dtype=torch.float64)
    out = gate.gate(logits, shares, levels, lambda t: t.double())
    assert (out[0] > 0).any()          # 5 - 2.5 = 2.5 >= 2: kept although 5 < 6
    assert not (out[1] > 0).any()      # 5 - 3.5 = 1.5 < 2: emptied
    assert not (out[2] > 0).any()      # no references: the max-logit threshold 6
    assert torch.equal(gate.gate(logits, shares, None, None), gate.gate(logits, shares))
    assert not (gate.gate(logits, shares) > 0).any()
    with pytest.raises(ValueError, match="presence_log_odds"):
        gate.gate(logits, shares, levels)
    stored = {"presence_threshold": 6.0, "presence_threshold_ref": 2.0, "presence_references": 3}
    assert PresenceGate.from_meta(stored) == gate and gate.uses_references
    assert not PresenceGate.from_meta({"presence_threshold": 6.0}).uses_references


def test_presence_peak_asks_a_large_support_for_a_region_of_its_size():
    from pipeline.inference.gate import PresenceGate, presence_peak

    logits = torch.full((2, 1, 10, 10), -4.0)
    logits[:, 0, 0, 0] = 6.0                                      # one bright cell (a speck on a good tile)
    logits[1, 0, 5:, :] = 3.0                                     # query 1: half of the image clearly defect-like
    small, large = torch.tensor([0.01, 0.01]), torch.tensor([0.3, 0.3])
    assert torch.equal(presence_peak(logits, large, 0.0), torch.tensor([6.0, 6.0]))       # c = 0: the max
    assert torch.equal(presence_peak(logits, small, 1.0), torch.tensor([6.0, 6.0]))       # k = 1 cell
    assert torch.equal(presence_peak(logits, large, 1.0), torch.tensor([-4.0, 3.0]))      # k = 30 cells
    assert torch.equal(presence_peak(logits, torch.tensor([0.3, 0.01]), 1.0), torch.tensor([-4.0, 6.0]))
    assert torch.equal(presence_peak(logits, torch.tensor([1.0, 0.0]), 1.0), torch.tensor([-4.0, 6.0]))
    with pytest.raises(ValueError, match=">= 0"):
        presence_peak(logits, large, -0.5)
    # the gate scores the same statistic: the speck alone passes at c = 0 and not at c = 1
    levels = torch.zeros(2, dtype=torch.float64)
    by_max = PresenceGate(None, reference_threshold=1.0, references=1).gate(logits, large, levels, lambda t: t.double())
    by_area = PresenceGate(None, reference_threshold=1.0, references=1, reference_area=1.0).gate(
        logits, large, levels, lambda t: t.double())
    assert (by_max[0] > 0).any() and (by_max[1] > 0).any()
    assert not (by_area[0] > 0).any() and (by_area[1] > 0).any()
    stored = {"presence_threshold_ref": 1.0, "presence_references": 1, "presence_reference_area": 1.0}
    assert PresenceGate.from_meta(stored).reference_area == 1.0


def test_fp_threshold_counts_only_the_queries_flagged_ungated():
    """The reference score of a query with no pixel > 0 may be high; it is no false alarm at any tau."""
    from pipeline.training.gate import fp_threshold

    scores = [9.0, 3.0, 2.0, 1.0]
    assert fp_threshold(scores, 0.25) == (math.nextafter(3.0, math.inf), 0.25)
    tau, share = fp_threshold(scores, 0.25, [False, True, True, True])
    assert (tau, share) == (math.nextafter(2.0, math.inf), 0.25)


def test_reference_images_come_from_the_given_classes_only_and_are_reproducible(tmp_path_factory):
    from pipeline.episodes import normal_pools, reference_images, training_pools

    params = load(shared_project(tmp_path_factory))
    train, val = training_pools(params, 0)
    side = {**train, **val}
    refs = reference_images(params, side, 2)
    pool = {i for ids in normal_pools(params, side).values() for i in ids}
    assert set(refs) == {"MT"} and len(refs["MT"]) == 2 and set(refs["MT"]) <= pool
    assert reference_images(params, side, 2) == refs
    test_nd = {i for ids in normal_pools(params, params.test_classes(0)).values() for i in ids}
    assert not set(refs["MT"]) & test_nd
    assert reference_images(params, side, len(pool) + 1) == {}
    assert reference_images(params, params.test_classes(0)[:0], 1) == {}


@pytest.fixture(scope="module")
def referenced(tmp_path_factory):
    """The untrained default LERENet on the small project's fold 0, gated with one reference image."""
    from pipeline.features import build_feature_store

    params = load(shared_project(tmp_path_factory), train={"presence_budget": 1.0, "presence_fp": 0.5,
                  "presence_references": 1, "untrained_models": ["lerenet"]}, model=PROBE_MODEL)
    build_feature_store(params, progress=False)
    return params, train_fold0(params, tmp_path_factory, "lerenet", "referenced")


def test_training_calibrates_and_stores_the_reference_threshold(referenced):
    from pipeline.checkpoint import load_model
    from pipeline.inference.predictor import Predictor

    params, res = referenced
    _, meta = load_model(res.model_path)
    assert meta["presence_references"] == 1 and isinstance(meta["presence_threshold_ref"], float)
    assert meta["presence_fp_train_ref"] is not None and 0.0 <= meta["presence_fp_train_ref"] <= 0.5
    pred = Predictor.load(res.model_path)
    assert pred.presence_gate.uses_references and pred.describe()["presence_references"] == 1


def test_fp_scope_gated_leaves_the_max_logit_threshold_to_the_budget_rule(referenced):
    """With references for MT (the only material with Nd here), ``presence_fp_scope: gated`` calibrates the
    max-logit threshold without the false-alarm target (it gates no defect-free query); ``all`` raises it."""
    from pipeline.episodes import training_pools
    from pipeline.evaluation.data import open_store_for
    from pipeline.inference.predictor import Predictor
    from pipeline.training.gate import presence_gate

    params, res = referenced
    pred = Predictor.load(res.model_path)
    store = open_store_for(params, pred, params.data.dir)
    pools = training_pools(params, 0)

    def gate(**train):
        p = params.model_copy(update={"train": params.train.model_copy(update=train)})
        return presence_gate(p, pred.net, pools, {}, store, torch.device("cpu"))

    budget_only = gate(presence_fp=None, presence_fp_scope="all")
    strict_all, strict_gated = gate(presence_fp=0.0, presence_fp_scope="all"), gate(presence_fp=0.0,
                                                                                    presence_fp_scope="gated")
    assert strict_gated["presence_threshold"] == budget_only["presence_threshold"]
    assert strict_gated["presence_fp_train"] is None and strict_all["presence_fp_train"] == 0.0
    assert (strict_gated["presence_fp_scope"], strict_all["presence_fp_scope"]) == ("gated", "all")
    assert strict_all["presence_threshold"] > budget_only["presence_threshold"]
    assert strict_gated["presence_threshold_ref"] == strict_all["presence_threshold_ref"] is not None


def test_predictor_gates_relative_to_the_references_it_is_given(referenced):
    """``encode_support(..., references)`` sets the support's reference level; a query is then kept or emptied by
    its log-odds minus that level against ``presence_threshold_ref``, whatever the max-logit threshold says."""
    from pipeline.images import load_validated, read_image, resolve
    from pipeline.inference.predictor import PredictInputError, Predictor
    from test_gate import _two_pairs

    params, res = referenced
    img, msk = _two_pairs(params)
    query = img[:1]                         # the support image as its own query: the probe marks its defect
    normal = load_validated(params.data.dir, kind="normal")
    ref = [read_image(resolve(params.data.dir, normal["image_path"].iloc[0]))]
    pred = Predictor.load(res.model_path)
    support = pred.encode_support(img[:1], msk[:1], references=ref)
    assert support.level is not None and math.isfinite(support.level)
    top = pred.head(support.feats, support.masks, pred.encode_images(query), gate=False).amax()
    assert float(top) > 0, "the ungated prediction must mark pixels for this check to mean anything"
    score = float(pred.net.presence_log_odds(top)) - support.level
    pred.meta.update(presence_threshold=1e9, presence_threshold_ref=score - 0.5)
    kept = pred.predict_logits(support, query)[0]
    assert (kept > 0).any(), "kept by the reference score although the max-logit threshold gates everything"
    pred.meta.update(presence_threshold=-1e9, presence_threshold_ref=score + 0.5)
    assert not (pred.predict_logits(support, query)[0] > 0).any()
    plain = pred.encode_support(img[:1], msk[:1])
    assert plain.level is None and (pred.predict_logits(plain, query)[0] > 0).any()
    with pytest.raises(PredictInputError, match="references"):
        pred.encode_support(img[:1], msk[:1], references=[])


def test_evaluation_gives_the_fold_references_to_the_episodes_of_their_material(referenced):
    """``fold_references`` draws the fold's training-side reference images; the feature source gives each
    episode whose query is of that material its level (NaN for other materials) and the head uses it."""
    from pipeline.evaluation.data import FeatureSource, ImageTable, fold_references, open_store_for
    from pipeline.images import load_validated
    from pipeline.inference.predictor import Predictor

    params, res = referenced
    pred = Predictor.load(res.model_path)
    refs = fold_references(params, 0, pred)
    assert list(refs) == ["MT"] and len(refs["MT"]) == 1
    rows = load_validated(params.data.dir)
    src = FeatureSource(pred, ImageTable(rows, params.data.dir), open_store_for(params, pred, params.data.dir))
    defect = rows[rows["kind"] == "defect"]
    mt = defect[defect["class_name"].str.startswith("MT")]["id"].tolist()
    other = defect[~defect["class_name"].str.startswith("MT")]["id"].tolist()
    assert src.levels([[mt[0]], [mt[0]]], [mt[1], other[0]]) is None      # no references given yet
    src.use_references(refs)
    levels = src.levels([[mt[0]], [mt[0]]], [mt[1], other[0]])
    assert math.isfinite(float(levels[0])) and math.isnan(float(levels[1]))
    want = pred.reference_levels(src.feats([mt[0]])[None], src.masks([mt[0]])[None], src.feats(refs["MT"]))
    assert float(levels[0]) == pytest.approx(float(want[0]))
    pred.meta["presence_references"] = 0
    assert fold_references(params, 0, pred) == {}
    assert np.isfinite(float(levels[0]))
