"""Support sensitivity (issue 11, item 1): the ``mismatched`` episodes written by the split step and
the support gain (paper mIoU - mismatched mIoU) in metrics/fold<f>.json, MLflow and the results table.

Real data: a few images of six real classes (``/work/shared/datasets/defects12``), three folds:
fold 0 has two magnetic-tile classes and one steel class (material preference), fold 1 a leather and
a steel class (no same-material partner), fold 2 a single class (no other novel class at all).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import REAL_DATA, write_small_params
from pipeline.config import load_params
from pipeline.images import episodes_path, load_episodes, load_split, load_validated
from pipeline.layout import Layout

FOLDS = {0: ["MT_Uneven", "MT_Blowhole", "Steel_In"], 1: ["Leather_Color", "Steel_Pa"], 2: ["MT_Crack"]}
IMAGES_PER_CLASS = 8
MODELS = ("prototype", "jaffnet")


def _source(dest: Path) -> Path:
    """The first ``IMAGES_PER_CLASS`` images (by name) of every class of ``FOLDS``, with their masks."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} not available (set LERENET_TEST_DATA)")
    for cls in (c for cs in FOLDS.values() for c in cs):
        for sub in ("Images", "GT"):
            (dest / cls / sub).mkdir(parents=True, exist_ok=True)
        for img in sorted((REAL_DATA / cls / "Images").iterdir())[:IMAGES_PER_CLASS]:
            shutil.copy2(img, dest / cls / "Images" / img.name)
            shutil.copy2(REAL_DATA / cls / "GT" / f"{img.stem}.png", dest / cls / "GT" / f"{img.stem}.png")
    return dest


def _params(root: Path, **sections):
    src = root / "source"
    if not src.is_dir():
        _source(src)
    base = {"folds": FOLDS, "model": {"names": list(MODELS), "channels": 32},
            "train": {"image_size": 96, "feature_views": 0, "device": "cpu"},
            "evaluate": {"latency_queries": 1, "overlay_episodes_per_class": 1, "log_pyfunc": False}}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    name = "params.yaml" if not sections else f"params-{hashlib.sha1(repr(sections).encode()).hexdigest()[:8]}.yaml"
    return load_params(write_small_params(root / name, src, root / "data", **base), env={})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Real images ingested, validated and split once (read-only for the tests of this module)."""
    from pipeline.ingest import ingest
    from pipeline.split import split
    from pipeline.validate import validate

    params = _params(tmp_path_factory.mktemp("support_gain"))
    ingest(params, progress=False)
    report = validate(params)
    assert report["success"], report["failures"]
    summary = split(params)
    return params, summary


def _class_of(params) -> dict[str, str]:
    v = load_validated(params.data.dir, kind="defect")
    return dict(zip(v["id"], v["class_name"]))


def _digests(data: Path, protocol: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((data / "episodes").glob(f"fold*_{protocol}_k*.parquet"))}


def test_material_and_candidates():
    from pipeline.split import material, mismatch_candidates

    assert material("MT_Crack") == "MT_" and material("Steel_Pa") == "Steel_" and material("Leather_Glue") == "Leather_"
    assert material("Scratch") is None and material("_x") is None
    c = mismatch_candidates(["MT_Uneven", "MT_Blowhole", "Steel_In", "Scratch"])
    assert c == {"MT_Uneven": ["MT_Blowhole"], "MT_Blowhole": ["MT_Uneven"],
                 "Steel_In": ["MT_Uneven", "MT_Blowhole", "Scratch"], "Scratch": ["MT_Uneven", "MT_Blowhole", "Steel_In"]}
    assert mismatch_candidates(["MT_Crack"]) == {"MT_Crack": []}


@pytest.mark.parametrize("k", [1, 5])
def test_mismatched_episodes_are_the_paper_episodes_with_another_novel_class_as_support(project, k):
    params, summary = project
    cls = _class_of(params)
    for fold in (0, 1):
        paper = load_episodes(params.data.dir, fold, "paper", k)
        mism = load_episodes(params.data.dir, fold, "mismatched", k)
        assert list(mism.columns) == ["episode", "seed", "class_name", "support_ids", "query_id", "support_class"]
        assert summary["folds"][fold]["episodes"][f"mismatched_k{k}"] == len(paper) == len(mism)
        # same episodes, same queries (so the same ground truth: the query's own mask)
        pd.testing.assert_frame_equal(mism[["episode", "class_name", "query_id"]], paper[["episode", "class_name", "query_id"]])
        assert set(mism["seed"]) == {2718}
        split = load_split(params.data.dir, fold)
        train = set(split["train_ids"]) | set(split["val_ids"])
        for row in mism.itertuples():
            assert len(row.support_ids) == k == len(set(row.support_ids))
            assert {cls[i] for i in row.support_ids} == {row.support_class}  # all K from one class
            assert row.support_class != row.class_name and row.support_class in FOLDS[fold]  # another novel class
            assert not set(row.support_ids) & train  # never a training image
        pairs = set(zip(mism["class_name"], mism["support_class"]))
        if fold == 0:  # same material preferred; Steel_In has no steel partner in its fold
            assert {p for p in pairs if p[0].startswith("MT_")} == {("MT_Uneven", "MT_Blowhole"), ("MT_Blowhole", "MT_Uneven")}
            assert {s for c, s in pairs if c == "Steel_In"} <= {"MT_Uneven", "MT_Blowhole"}
        else:
            assert pairs == {("Leather_Color", "Steel_Pa"), ("Steel_Pa", "Leather_Color")}
    # a fold with a single test class has no other novel class: an empty (but readable) file
    empty = load_episodes(params.data.dir, 2, "mismatched", k)
    assert empty.empty and "support_class" in empty.columns


def test_mismatched_episodes_are_deterministic_and_leave_saved_episodes_alone(project, tmp_path):
    from pipeline.split import split

    params, _ = project
    before = {p: _digests(params.data.dir, p) for p in ("paper", "standard", "mismatched")}
    assert len(before["mismatched"]) == 3 * 2
    split(params)
    assert {p: _digests(params.data.dir, p) for p in before} == before
    # another seed: other supports, but the paper and standard files stay byte-identical
    other = _params(params.root, split={"mismatched_seed": 7})
    split(other)
    after = {p: _digests(other.data.dir, p) for p in before}
    assert after["paper"] == before["paper"] and after["standard"] == before["standard"]
    assert after["mismatched"] != before["mismatched"]
    split(params)  # leave the module's data as it was
    assert _digests(params.data.dir, "mismatched") == before["mismatched"]


def test_mismatched_seed_is_validated(tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="split.mismatched_seed"):
        load_params(write_small_params(tmp_path / "p.yaml", tmp_path, tmp_path / "data", split={"mismatched_seed": -1}),
                    env={})
    with pytest.raises(ConfigError, match="split.mismatched_seed"):
        load_params(write_small_params(tmp_path / "p.yaml", tmp_path, tmp_path / "data", split={"mismatched_seed": "x"}),
                    env={})


def _save_checkpoint(path: Path, name: str, fold: int) -> None:
    from model import build_model
    from pipeline.checkpoint import save_model

    torch.manual_seed(0)
    net = build_model(name, pretrained=True, channels=32)
    save_model(path, net, {"model": name, "backbone": "efficientnet_lite0", "variant": "mpr+mpe*", "channels": 32,
                           "freeze_backbone": bool(getattr(net, "freeze_backbone", True)), "image_size": 96,
                           "fold": fold, "config": net.config})


@pytest.fixture(scope="module")
def evaluated(project):
    """Fold 0 evaluated with the prototype model (uses its support) and JAFFNet (ignores it)."""
    from pipeline.evaluate import evaluate

    params, _ = project
    layout = Layout.of(params)
    for name in MODELS:
        _save_checkpoint(layout.model_file(0, name), name, 0)
    result = evaluate(params, 0, track=True, batch_size=8)
    return params, result


def test_fold_metrics_hold_mismatched_scores_and_support_gain(evaluated):
    from pipeline.evaluation.results import FoldMetrics

    params, result = evaluated
    path = Layout.of(params).fold_metrics(0)
    on_disk = json.loads(path.read_text())
    typed = FoldMetrics.read(path)
    assert json.loads(typed.dumps()) == on_disk  # exact round trip, the gain included
    n_paper = len(load_episodes(params.data.dir, 0, "paper", 1))
    for name in MODELS:
        for k in (1, 5):
            slot = on_disk[name][f"k{k}"]
            assert set(slot) == {"paper", "standard", "mismatched", "support_gain"}
            assert set(slot["mismatched"]) == {"miou", "fbiou", "episodes"} and slot["mismatched"]["episodes"] == n_paper
            assert slot["support_gain"] == pytest.approx(slot["paper"]["miou"] - slot["mismatched"]["miou"], abs=1e-9)
            m = typed.models[name]
            assert "mismatched" not in m.scores[k]  # never ranked with the quality protocols
            assert m.support_gain(k) == pytest.approx(slot["support_gain"], abs=1e-4)
    # per-class rows of the control, one per test class
    table = pd.read_csv(Layout.of(params).per_class(0))
    mism = table[table.protocol == "mismatched"]
    assert len(mism) == len(MODELS) * 2 * len(FOLDS[0]) and set(mism.class_name) == set(FOLDS[0])


def test_support_ignoring_model_has_no_gain_and_prototype_a_clear_one(evaluated):
    params, result = evaluated
    table = pd.read_csv(Layout.of(params).per_class(0))
    for k in (1, 5):
        # JAFFNet never reads the support: same queries, same truth -> the very same IoUs
        j = result.models["jaffnet"]
        assert j.score(k, "mismatched").miou == j.score(k, "paper").miou and j.support_gain(k) == 0.0
        jt = table[(table.model == "jaffnet") & (table.shots == k)].set_index(["protocol", "class_name"])["iou"]
        assert jt["mismatched"].to_dict() == jt["paper"].to_dict()
        # the prototype model matches the query against its support: the wrong class costs it
        gain = result.models["prototype"].support_gain(k)
        assert gain > 0.05, f"prototype K={k}: support gain {gain:.3f}"


def test_mlflow_and_report_show_the_support_gain(evaluated):
    from pipeline import tracking
    from pipeline.report import write_report

    params, result = evaluated
    client = tracking.client(params)
    exp = client.get_experiment_by_name(params.mlflow.experiment)
    runs = client.search_runs([exp.experiment_id], "tags.evaluated = 'true'")
    by_model = {r.data.tags.get("model"): r for r in runs}
    for name in MODELS:
        metrics = by_model[name].data.metrics
        m = result.models[name]
        assert metrics["test_k1_mismatched_miou"] == pytest.approx(m.score(1, "mismatched").miou)
        assert metrics["test_k5_mismatched_fbiou"] == pytest.approx(m.score(5, "mismatched").fbiou)
        assert metrics["test_k1_support_gain"] == pytest.approx(m.support_gain(1))
    text = write_report(params).read_text()
    assert "### Support sensitivity" in text
    p = result.models["prototype"]
    on_disk = json.loads(Layout.of(params).fold_metrics(0).read_text())["prototype"]["k1"]
    cell = f"{100 * on_disk['mismatched']['miou']:.1f} / {100 * on_disk['support_gain']:+.1f}"
    assert f"| prototype | 1 | {cell} | n/a | n/a | n/a | n/a |" in text  # folds 1, 2 not evaluated: no mean
    assert p.support_gain(1) is not None
    # the mIoU table is unchanged: no mismatched row
    assert "| prototype | 1 | mismatched |" not in text


def test_report_means_over_folds():
    from pipeline.evaluation.results import FoldMetrics, ModelMetrics, ProtocolScore
    from pipeline.report import results_table

    def fold(paper: float, mism: float) -> FoldMetrics:
        return FoldMetrics({"m": ModelMetrics({1: {"paper": ProtocolScore("paper", paper, 0.5, 10)}},
                                              mismatched={1: ProtocolScore("mismatched", mism, 0.5, 10)})})

    text = results_table({0: fold(0.40, 0.10), 1: fold(0.30, 0.30)})
    assert "| m | 1 | 10.0 / +30.0 | 30.0 / +0.0 | 20.0 | +15.0 |" in text
    # a fold with a single test class has no mismatched score: no mean, and no table at all without any
    single = FoldMetrics({"m": ModelMetrics({1: {"paper": ProtocolScore("paper", 0.4, 0.5, 10)}})})
    assert "| m | 1 | 10.0 / +30.0 | n/a | n/a | n/a |" in results_table({0: fold(0.40, 0.10), 1: single})
    assert "Support sensitivity" not in results_table({0: single})


def test_missing_mismatched_file_is_a_clear_error(evaluated, tmp_path):
    """An episodes folder from before this feature: evaluation names the file and the step to re-run."""
    from pipeline.evaluate import evaluate
    from pipeline.images import DataArtifactError

    params, _ = evaluated
    data = tmp_path / "data"
    shutil.copytree(params.data.dir, data, ignore=shutil.ignore_patterns("features"))
    episodes_path(data, 0, "mismatched", 5).unlink()
    with pytest.raises(DataArtifactError, match=r"fold0_mismatched_k5.parquet does not exist: run `lerenet split`"):
        evaluate(params, 0, ["prototype"], data_dir=data, track=False)
