"""Support learning (issue 11): frozen-feature priors, the prior skip, the raw-query switch, negative
episodes, held-out selection classes and step-0 validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _train_data import load, shared_project
from model import build_model
from model.layers import resize_mask
from model.priors import frozen_priors, nearest_neighbour_score


def _unit(*vals):
    v = torch.tensor(vals, dtype=torch.float32)
    return v / v.norm()


def _hand_episode():
    """One episode, 2 channels, 1 level, support grid 1x3 (defect, background, half-defect), query 1x2."""
    s = torch.stack([_unit(1, 0), _unit(0, 1), _unit(1, 1)], dim=1).view(1, 1, 2, 1, 3)
    m = torch.tensor([1.0, 0.0, 0.3]).view(1, 1, 1, 1, 3)
    q = torch.stack([_unit(1, 0.1), _unit(0.1, 1)], dim=1).view(1, 2, 1, 2)
    return q, s, m


def test_priors_by_hand():
    q, s, m = _hand_episode()
    got = frozen_priors(q, s, m, (2,), ("fg", "abnormal", "nn"))[0, :, 0]     # (3, 2)
    cos = lambda a, b: float(F.cosine_similarity(a, b, dim=0))  # noqa: E731
    q0, q1 = q[0, :, 0, 0], q[0, :, 0, 1]
    d, b = s[0, 0, :, 0, 0], s[0, 0, :, 0, 1]
    # cell 2 (share 0.3 < 0.5 x peak) is neither defect nor background
    expect = torch.tensor([[cos(q0, d), cos(q1, d)],
                           [1 - cos(q0, b), 1 - cos(q1, b)],
                           [cos(q0, d) - cos(q0, b), cos(q1, d) - cos(q1, b)]])
    assert torch.allclose(got, expect, atol=1e-5)
    assert got[2, 0] > 0 > got[2, 1]   # nearest neighbour: q0 defect, q1 background


def test_priors_per_level_and_errors():
    q, s, m = _hand_episode()
    two = frozen_priors(torch.cat([q, q], 1), torch.cat([s, s], 2), m, (2, 2), ("nn", "fg"))
    assert two.shape == (1, 4, 1, 2) and torch.equal(two[:, :2], two[:, 2:])
    with pytest.raises(ValueError, match="do not sum"):
        frozen_priors(q, s, m, (3,), ("fg",))
    with pytest.raises(ValueError, match="priors must be"):
        frozen_priors(q, s, m, (2,), ("fg", "fg"))
    with pytest.raises(ValueError, match="priors must be"):
        build_model("lerenet", channels=16, pretrained=False, priors=["shape"])


def _probe_episode(seed: int):
    """One 2-shot episode on a 4x4 grid with 6 channels for the probe tests: ``(support, masks, query)``
    tensors, the normalised support and query cells as float64 arrays, and the support's defect /
    background cell flags (one half-defect cell below FG_SHARE x peak is neither)."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(1, 2, 6, 4, 4, generator=g)
    m = torch.zeros(1, 2, 1, 4, 4)
    m[..., 1:3, 1:3] = 1.0
    m[0, 1, 0, 0, 0] = 0.2
    q = torch.randn(1, 6, 4, 4, generator=g)
    x = F.normalize(s[0].permute(0, 2, 3, 1).reshape(-1, 6), dim=1).double().numpy()
    qn = F.normalize(q[0].permute(1, 2, 0).reshape(-1, 6), dim=1).double().numpy()
    cell = m[0].flatten().numpy()
    return s, m, q, x, qn, cell >= 0.5, cell <= 0


def test_linear_probe_is_class_balanced_ridge_regression_on_the_support():
    """The ``linear`` prior equals scikit-learn's weighted ridge regression fitted on the episode's
    support cells (+1 defect, -1 background, each class weighted 1/2, half-defect cells ignored)."""
    from sklearn.linear_model import Ridge

    import model.priors as priors

    s, m, q, x, qn, fg, bg = _probe_episode(3)
    got = frozen_priors(q, s, m, (6,), ("linear",)).flatten()
    wt = np.where(fg, 0.5 / fg.sum(), np.where(bg, 0.5 / bg.sum(), 0.0))
    # our bias is a ridge-penalised column of ones; sklearn leaves its intercept free, so give it the
    # column explicitly and no intercept
    xb = np.hstack([x, np.ones((len(x), 1))])
    ref = Ridge(alpha=priors.RIDGE, fit_intercept=False).fit(xb, np.where(fg, 1.0, -1.0), sample_weight=wt)
    expect = ref.predict(np.hstack([qn, np.ones((len(qn), 1))]))
    assert np.allclose(got.numpy(), expect, atol=1e-4)
    # a support without defect cells finds nothing
    assert torch.all(frozen_priors(q, s, torch.zeros_like(m), (6,), ("linear",)) == -1.0)


def test_logistic_probe_is_class_balanced_logistic_regression_on_the_support(monkeypatch):
    """The ``logistic`` prior equals ``2 sigmoid(z) - 1`` of scikit-learn's weighted, L2-penalised logistic
    regression (free intercept) on the support cells, with the class weights of the linear probe."""
    from sklearn.linear_model import LogisticRegression

    import model.priors as priors

    monkeypatch.setattr(priors, "LOGISTIC_L2", 0.05)
    monkeypatch.setattr(priors, "LOGISTIC_STEPS", 25)
    s, m, q, x, qn, fg, bg = _probe_episode(5)
    got = frozen_priors(q, s, m, (6,), ("logistic",)).flatten()
    keep = fg | bg
    wt = np.where(fg, 0.5 / fg.sum(), 0.5 / bg.sum())
    # sklearn minimises |w|^2 / 2 + C sum_i s_i loss_i; ours sum_i wt_i loss_i + L2 |w|^2 / 2: C = 1 / L2
    ref = LogisticRegression(C=1 / 0.05, tol=1e-12, max_iter=10_000).fit(x[keep], fg[keep], sample_weight=wt[keep])
    expect = 2 * ref.predict_proba(qn)[:, 1] - 1
    assert np.allclose(got.numpy(), expect, atol=1e-4)
    assert torch.all(frozen_priors(q, s, torch.zeros_like(m), (6,), ("logistic",)) == -1.0)


def test_hypercolumn_probe_is_one_logistic_regression_on_all_levels_with_penalty_over_shots(monkeypatch):
    """``hypercolumn``: scikit-learn's logistic regression on each cell's level-normalised descriptors
    concatenated (/ sqrt(levels)), penalty ``HYPERCOLUMN_L2 / K``; the same map at every level."""
    from sklearn.linear_model import LogisticRegression

    import model.priors as priors

    monkeypatch.setattr(priors, "HYPERCOLUMN_L2", 0.1)
    monkeypatch.setattr(priors, "LOGISTIC_STEPS", 25)
    s, m, q, _, _, fg, bg = _probe_episode(7)
    got = frozen_priors(q, s, m, (2, 4), ("hypercolumn",))
    assert got.shape == (1, 2, 4, 4) and torch.equal(got[:, 0], got[:, 1])
    cells = lambda t, c: F.normalize(t, dim=c)  # noqa: E731
    x = torch.cat([cells(s[0, :, :2], 1), cells(s[0, :, 2:], 1)], 1).permute(0, 2, 3, 1).reshape(-1, 6) / 2 ** 0.5
    qh = torch.cat([cells(q[0, :2], 0), cells(q[0, 2:], 0)], 0).permute(1, 2, 0).reshape(-1, 6) / 2 ** 0.5
    keep = fg | bg
    wt = np.where(fg, 0.5 / fg.sum(), 0.5 / bg.sum())
    ref = LogisticRegression(C=2 / 0.1, tol=1e-12, max_iter=10_000).fit(  # K = 2 shots: penalty 0.1 / 2
        x.double().numpy()[keep], fg[keep], sample_weight=wt[keep])
    assert np.allclose(got[0, 0].flatten().numpy(), 2 * ref.predict_proba(qh.double().numpy())[:, 1] - 1, atol=1e-4)
    per_level = frozen_priors(q, s, m, (2, 4), ("logistic",))
    assert not torch.allclose(per_level[:, 0], per_level[:, 1])  # the per-level probes differ; one joint map here


@pytest.mark.timeout(120)
def test_hypercolumn_fit_runs_on_two_threads_at_lite0_width():
    """Lite0's 152-channel hypercolumn (153 unknowns per Newton step) on 2 torch threads, as `make run` uses:
    torch.linalg.solve's batched float64 LU failed there (oneMKL DLASWP errors, then a hang); the Cholesky
    solve gives the single-thread result."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 1, 152, 25, 25, generator=g)
    m = (torch.rand(16, 1, 1, 25, 25, generator=g) > 0.9).float()
    q = torch.randn(16, 152, 25, 25, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = frozen_priors(q, s, m, (40, 112), ("hypercolumn",))
        torch.set_num_threads(1)
        one = frozen_priors(q, s, m, (40, 112), ("hypercolumn",))
    finally:
        torch.set_num_threads(before)
    assert torch.isfinite(two).all() and torch.allclose(one, two, atol=1e-5)


@pytest.mark.parametrize("priors", [[], ["nn", "linear"]])   # computed for the skip alone, or reused
def test_prior_skip_from_the_linear_probe(priors):
    net = build_model("lerenet", channels=16, pretrained=False, priors=priors, prior_skip=True,
                      skip_source="linear").eval()
    sf, sm, qf = _feature_episode()
    m = resize_mask(sm.flatten(0, 1), (10, 10)).unflatten(0, (2, 3))
    linear = frozen_priors(qf, sf, m, (40, 112), ("linear",)).mean(dim=1, keepdim=True)
    assert torch.allclose(nearest_neighbour_score(qf, sf, m, (40, 112), "linear"), 0.5 * linear)
    ref = F.interpolate(10.0 * linear, size=(80, 80), mode="bilinear")   # a = 20 x factor 1/2
    assert torch.allclose(net.forward_features(sf, sm, qf, (80, 80)), ref, atol=1e-4)
    for bad in ("svm", "linear+linear", ""):
        with pytest.raises(ValueError, match="skip_source"):
            build_model("lerenet", channels=16, pretrained=False, prior_skip=True, skip_source=bad)


def test_skip_from_several_sources_averages_their_logits():
    net = build_model("lerenet", channels=16, pretrained=False, prior_skip=True, skip_source="linear+proto").eval()
    sf, sm, qf = _feature_episode()
    m = resize_mask(sm.flatten(0, 1), (10, 10)).unflatten(0, (2, 3))
    maps = frozen_priors(qf, sf, m, (40, 112), ("linear", "proto"))
    logit = 20.0 * (0.5 * maps[:, 0::2].mean(1, keepdim=True) + maps[:, 1::2].mean(1, keepdim=True)) / 2
    ref = F.interpolate(logit, size=(80, 80), mode="bilinear")
    assert torch.allclose(net.forward_features(sf, sm, qf, (80, 80)), ref, atol=1e-4)


def test_proto_prior_is_the_prototype_models_cosine_difference():
    """The ``proto`` map on one level equals PANet's cos(q, p_fg) - cos(q, p_bg) by hand."""
    sf, sm, qf = _feature_episode(b=1, k=2)
    sf, qf = sf[:, :, :40], qf[:, :40]
    m = resize_mask(sm.flatten(0, 1), (10, 10)).unflatten(0, (1, 2))
    got = frozen_priors(qf, sf, m, (40,), ("proto",))[0, 0]
    p_fg = (sf * m).sum(dim=(1, 3, 4)) / m.sum()
    p_bg = (sf * (1 - m)).sum(dim=(1, 3, 4)) / (1 - m).sum()
    expect = (F.cosine_similarity(qf, p_fg[:, :, None, None], dim=1)
              - F.cosine_similarity(qf, p_bg[:, :, None, None], dim=1))[0]
    assert torch.allclose(got, expect, atol=1e-5)


def test_self_support_refits_the_probe_with_the_querys_confident_cells():
    """``self`` = the ``linear`` probe fitted on the support cells plus the query cells whose
    level-averaged linear+proto score is beyond +-SELF_MARGIN (pseudo defect / background)."""
    import model.priors as priors

    sf, sm, qf = _feature_episode(b=1, k=1, seed=4)
    sf, qf = sf[:, :, :40], qf[:, :40]
    m = resize_mask(sm.flatten(0, 1), (10, 10)).unflatten(0, (1, 1))
    base = frozen_priors(qf, sf, m, (40,), ("linear", "proto"))
    score = (0.5 * base[:, 0] + base[:, 1]) / 2                                   # (1, 10, 10)
    q_fg, q_bg = score > priors.SELF_MARGIN, score < -priors.SELF_MARGIN
    assert q_fg.any() and q_bg.any()
    # by hand: the query's cells appended to the support as an extra shot with a pseudo mask that is
    # 1 on q_fg, 0 on q_bg and 0.25 (< FG_SHARE of the peak, > 0: neither class) elsewhere
    pseudo = torch.full_like(score, 0.25).masked_fill(q_fg, 1.0).masked_fill(q_bg, 0.0)
    s2 = torch.cat([sf, qf[:, None]], dim=1)
    m2 = torch.cat([m, pseudo[:, None, None]], dim=1)
    expect = frozen_priors(qf, s2, m2, (40,), ("linear",))
    got = frozen_priors(qf, sf, m, (40,), ("self",))
    assert torch.allclose(got, expect, atol=1e-4)
    assert not torch.allclose(got, base[:, :1], atol=1e-2)     # the refit changes the map
    with pytest.raises(ValueError, match="skip_source"):
        build_model("lerenet", channels=16, pretrained=False, prior_skip=True, skip_source="self+self")
    net = build_model("lerenet", channels=16, pretrained=False, prior_skip=True, skip_source="self+proto").eval()
    sf, sm, qf = _feature_episode(b=2, k=2, seed=5)
    assert net.forward_features(sf, sm, qf, (80, 80)).shape == (2, 1, 80, 80)


def _feature_episode(b=2, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    sf = torch.rand(b, k, 152, 10, 10, generator=g)
    sm = torch.zeros(b, k, 1, 80, 80)
    sm[..., 16:40, 24:56] = 1.0
    qf = torch.rand(b, 152, 10, 10, generator=g)
    return sf, sm, qf


def test_prior_skip_starts_as_the_nearest_neighbour_classifier_and_trains():
    torch.manual_seed(0)
    net = build_model("lerenet", channels=16, pretrained=False, priors=["fg", "abnormal", "nn"], prior_skip=True)
    net.eval()
    sf, sm, qf = _feature_episode()
    out = net.forward_features(sf, sm, qf, (80, 80))
    m = resize_mask(sm.flatten(0, 1), (10, 10)).unflatten(0, (2, 3))
    ref = F.interpolate(20.0 * nearest_neighbour_score(qf, sf, m, (40, 112)), size=(80, 80), mode="bilinear")
    assert torch.allclose(out, ref, atol=1e-4)
    # the learned correction is not dead: one SGD step changes the output
    net.train()
    opt = torch.optim.SGD(net.head_parameters(), lr=0.1)
    loss = F.binary_cross_entropy_with_logits(net.forward_features(sf, sm, qf, (80, 80)), torch.zeros(2, 1, 80, 80))
    loss.backward()
    assert net.ifm.cls[-1].weight.grad.abs().sum() > 0
    opt.step()
    net.eval()
    assert not torch.allclose(net.forward_features(sf, sm, qf, (80, 80)), out)


def test_prediction_depends_on_support_with_prior_skip():
    net = build_model("lerenet", channels=16, pretrained=False, prior_skip=True).eval()
    sf, sm, qf = _feature_episode()
    moved = torch.zeros_like(sm)
    moved[..., 50:70, 5:30] = 1.0
    assert not torch.allclose(net.forward_features(sf, sm, qf, (80, 80)), net.forward_features(sf, moved, qf, (80, 80)))


@pytest.mark.parametrize("path", ["off", "dropout"])
def test_query_path_switch(path):
    torch.manual_seed(0)
    on = build_model("lerenet", channels=16, pretrained=False).eval()
    torch.manual_seed(0)
    other = build_model("lerenet", channels=16, pretrained=False, query_path=path).eval()
    sf, sm, qf = _feature_episode()
    same = torch.allclose(on.forward_features(sf, sm, qf, (80, 80)), other.forward_features(sf, sm, qf, (80, 80)))
    assert same == (path == "dropout")   # dropout acts in training only; off removes the residual
    with pytest.raises(ValueError, match="query_path"):
        build_model("lerenet", channels=16, pretrained=False, query_path="sometimes")


# ----------------------------------------------------------------------------- training side
@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from pipeline.features import build_feature_store

    pf = shared_project(tmp_path_factory)
    build_feature_store(load(pf), progress=False)
    return pf


def test_draw_episode_negatives():
    from pipeline.episodes import draw_episode, episode_rng, sample_episode

    pools = {"MT_Break": [f"b{i}" for i in range(6)], "MT_Crack": [f"c{i}" for i in range(6)],
             "Steel_In": [f"s{i}" for i in range(6)]}
    normals = {"MT_Fray": ["n0", "n1"]}
    for i in range(20):  # share 0: exactly the old sampler
        assert draw_episode(pools, 1, episode_rng(0, i)) == sample_episode(pools, 1, episode_rng(0, i))
    eps = [draw_episode(pools, 1, episode_rng(0, i), 0.5, normals) for i in range(400)]
    neg = [e for e in eps if e.negative]
    assert 0.4 < len(neg) / len(eps) < 0.6
    for e in neg:
        q = e.query_id
        if e.class_name.startswith("MT_"):   # same material: the other MT class or an MT normal image
            assert q[0] in "cbn" and not q.startswith(e.class_name[3].lower())
        else:                                 # no other Steel class: any other class
            assert q[0] in "bc"
    assert any(e.query_id.startswith("n") for e in neg)


def test_selection_classes_are_training_classes_and_deterministic(project):
    from pipeline.episodes import material, selection_classes, training_pools

    params = load(project, train={"selection_classes": 1})
    held = selection_classes(params, None)          # 3 classes in the small project
    assert held == selection_classes(params, None) and len(held) == 1
    train, val = training_pools(params, None)
    assert set(val) == set(held) and not set(train) & set(held) and len(train) == 2
    assert not set(selection_classes(params, 0)) & set(params.test_classes(0))
    assert selection_classes(load(project, train={"selection_classes": 0}), 0) == []
    # too few classes to hold out 2 whole ones: falls back to image hold-out, with a warning
    assert selection_classes(load(project, train={"selection_classes": 2}), 0) == []
    assert material("MT_Crack") == "MT"


def test_leave_one_material_out_selection_takes_turns_over_folds():
    from pipeline.episodes import selection_material

    fold_train = {0: ["Leather_Cut", "Leather_Glue", "Leather_Poke", "MT_Break", "MT_Crack", "MT_Fray",
                      "Steel_Pa", "Steel_Sc"],
                  1: ["Leather_Color", "Leather_Glue", "Leather_Poke", "MT_Blowhole", "MT_Break", "MT_Fray",
                      "MT_Uneven", "Steel_In"]}
    held = {f: selection_material(c, 0, f) for f, c in fold_train.items()}
    for f, h in held.items():
        mats = {c.split("_")[0] for c in h}
        assert len(mats) == 1 and len(h) >= 2                      # one whole material, 2+ classes
        mat = mats.pop()
        assert h == sorted(c for c in fold_train[f] if c.startswith(mat + "_"))
        assert selection_material(fold_train[f], 0, f) == h          # deterministic
    # Steel_In alone is never a selection set (one class: no support swap, one class's noise)
    assert held[1] != ["Steel_In"]
    # consecutive folds over the same qualifying materials take different ones
    three = ["A_1", "A_2", "B_1", "B_2", "C_1", "C_2"]
    assert len({tuple(selection_material(three, 0, f)) for f in range(3)}) == 3
    # nothing qualifies: one material, or a material whose removal leaves < 2 classes to train on
    assert selection_material(["MT_A", "MT_B", "MT_C"], 0, 0) == []
    assert selection_material(["MT_A", "MT_B", "Steel_A"], 0, 0) == []


def test_selection_material_switch_holds_out_a_material_or_falls_back(project):
    from pipeline.episodes import selection_classes, training_pools

    # the small project has 3 classes of 3 materials: no material qualifies -> class hold-out, warned
    params = load(project, train={"selection_classes": 1, "selection_material": True})
    assert selection_classes(params, None) == selection_classes(load(project, train={"selection_classes": 1}), None)
    train, val = training_pools(params, None)
    assert len(val) == 1 and len(train) == 2


def test_negative_batches_have_empty_targets(project):
    from pipeline.episodes import normal_pools, training_pools
    from pipeline.features import FeatureStore, feature_store_path
    from pipeline.training.batches import CachedEpisodes

    params = load(project, train={"negative_share": 0.5})
    pools, _ = training_pools(params, None)
    store = FeatureStore.open(feature_store_path(params, params.data.dir))
    src = CachedEpisodes(store, pools, 1, 0, True, 0.5, normal_pools(params, pools))
    b = src.batch(0, 32)
    empty = b["query_masks"].flatten(1).sum(1) == 0
    assert 0 < int(empty.sum()) < 32                   # some negatives, not all
    assert (b["support_masks"].flatten(1).sum(1) > 0).all()


def test_training_with_support_switches_selects_step_zero_when_it_is_best(project, tmp_path):
    from pipeline.train import train

    params = load(project, model={"priors": ["fg", "nn"], "prior_skip": True, "query_path": "off"},
                  train={"loss": "dice", "bce_weight": 0.01, "negative_share": 0.3, "validate_at_start": True,
                         "lr": 10.0})  # absurd but finite (at 50 the loss goes NaN: TrainingDiverged, test_train)
    r = train(params, 0, "lerenet", tmp_path / "m", checkpoint_file=tmp_path / "s.pt", curve_file=tmp_path / "c.csv",
              track=False, progress=False)
    rows = (tmp_path / "c.csv").read_text().splitlines()
    assert rows[1].startswith("0,0,")                   # step 0 scored
    if r.best_step == 0:
        from pipeline.inference.model_file import load_model

        net, meta = load_model(r.model_path)
        assert meta["config"]["prior_skip"] is True
        assert float(net.skip[0]) == pytest.approx(20.0)
    scored = {int(c[0]): float(c[4]) for c in (row.split(",") for row in rows[1:]) if c[4]}
    assert r.best_val_miou == pytest.approx(max(scored.values()))  # selection keeps the best scored step,
    assert scored[r.best_step] == pytest.approx(r.best_val_miou)   # the untrained one included


def test_untrained_lerenet_is_scored_and_saved_at_its_training_free_start(project, tmp_path):
    from pipeline.inference.model_file import load_model
    from pipeline.train import train

    params = load(project, model={"priors": ["logistic"], "prior_skip": True, "skip_source": "logistic", "transductive_steps": 0,
                                  "query_path": "off"}, train={"untrained_models": ["lerenet"]})
    r = train(params, 0, "lerenet", tmp_path / "m", checkpoint_file=tmp_path / "s.pt", curve_file=tmp_path / "c.csv",
              track=False, progress=False)
    assert r.steps == 0 and r.best_step == 0 and 0 <= r.best_val_miou <= 1
    assert (tmp_path / "c.csv").read_text().splitlines()[1].startswith("0,0,")   # the one selection score
    net, _ = load_model(r.model_path)
    # untouched: the saved network is exactly the training-free logistic probe (20 x 1/2 x its level mean)
    sf, sm, qf = _feature_episode()
    m = resize_mask(sm.flatten(0, 1), (10, 10)).unflatten(0, (2, 3))
    probe = frozen_priors(qf, sf, m, (40, 112), ("logistic",)).mean(dim=1, keepdim=True)
    ref = F.interpolate(10.0 * probe, size=(80, 80), mode="bilinear")
    with torch.no_grad():
        assert torch.allclose(net.eval().forward_features(sf, sm, qf, (80, 80)), ref, atol=1e-4)
    with pytest.raises(Exception, match="prior_skip"):
        load(project, model={"prior_skip": False}, train={"untrained_models": ["lerenet"]})


def test_mismatched_validation_swaps_the_support_for_another_class():
    from pipeline.episodes import Episode, mismatched_validation

    val = {"A": ["a0", "a1", "a2"], "B": ["b0", "b1"], "C": ["c0"]}
    train_pools = {"A": ["a9"], "B": ["b9"], "C": ["c8", "c9"]}
    eps = [Episode("A", ("a1",), "a0"), Episode("B", ("b1", "b9"), "b0"), Episode("C", ("c8", "c9"), "c0")]
    mis = mismatched_validation(eps, val, train_pools, 2718)
    assert mis == mismatched_validation(eps, val, train_pools, 2718)            # seeded
    for e, m in zip(eps, mis):
        assert (m.class_name, m.query_id, m.negative) == (e.class_name, e.query_id, False)  # query and truth kept
        assert len(m.support_ids) == len(e.support_ids) and len(set(m.support_ids)) == len(m.support_ids)
        assert not any(i[0] == e.class_name.lower() for i in m.support_ids)      # another class's images
    assert mismatched_validation(eps, {"A": val["A"]}, train_pools, 0) == []     # one class: nothing to swap


def test_support_penalty_selects_on_miou_minus_mismatched_miou(project, tmp_path):
    import csv

    from pipeline.train import train

    params = load(project, model={"priors": ["linear"], "prior_skip": True, "skip_source": "linear", "transductive_steps": 0},
                  train={"support_penalty": 1.0, "validate_at_start": True, "val_every": 2})
    r = train(params, 0, "lerenet", tmp_path / "m", checkpoint_file=tmp_path / "s.pt", curve_file=tmp_path / "c.csv",
              track=False, progress=False)
    rows = [x for x in csv.DictReader((tmp_path / "c.csv").open()) if x["val_miou"]]
    assert rows and all(x["val_mismatched_miou"] for x in rows)
    scores = {int(x["step"]): float(x["val_miou"]) - float(x["val_mismatched_miou"]) for x in rows}
    assert r.best_step == max(scores, key=scores.get)
    assert r.best_val_miou == pytest.approx(scores[r.best_step], abs=1e-5)
    with pytest.raises(Exception, match="support_penalty"):
        load(project, train={"support_penalty": 2.0})


def test_config_rejects_bad_support_switches(project):
    from model.priors import SKIP_FACTORS
    from pipeline.config import SKIP_SOURCES, ConfigError

    assert SKIP_SOURCES == tuple(SKIP_FACTORS)          # params validation and the model agree
    for bad in ("svm", "linear+linear", "nn+"):
        with pytest.raises(ConfigError, match="skip_source"):
            load(project, model={"skip_source": bad})
    assert load(project, model={"skip_source": "linear+proto"}).model.skip_source == "linear+proto"
    with pytest.raises(ConfigError, match="priors"):
        load(project, model={"priors": ["fg", "fg"]})
    with pytest.raises(ConfigError, match="negative_share"):
        load(project, train={"negative_share": 1.0})
    with pytest.raises(ConfigError, match="query_path"):
        load(project, model={"query_path": "sideways"})
    assert np.isclose(load(project).train.bce_weight, 0.01)
    assert load(project, model={"query_path": False}).model.query_path == "off"   # YAML 1.1 `off`
