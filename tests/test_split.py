"""Split step: fold splits and saved episodes (paper and standard protocols), determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import EMPTY_MASK_IMAGE, SMALL_FOLDS, make_small_source, write_small_params
from pipeline.config import load_params
from pipeline.images import DataArtifactError, episodes_path, load_episodes, load_split, load_validated
from pipeline.ingest import ingest
from pipeline.split import SplitError, holdout, split
from pipeline.validate import validate


def _prepare(root: Path):
    src = make_small_source(root / "source")
    params = load_params(write_small_params(root / "params.yaml", src, root / "data"), env={})
    ingest(params, progress=False)
    validate(params)
    return params


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Small real data ingested, validated and split once for the read-only tests of this module."""
    params = _prepare(tmp_path_factory.mktemp("split"))
    summary = split(params)
    return params, summary


def _digests(data: Path) -> dict[str, str]:
    return {str(p.relative_to(data)): hashlib.sha256(p.read_bytes()).hexdigest()
            for d in ("splits", "episodes") for p in sorted((data / d).iterdir())}


def test_fold_splits_are_disjoint_and_follow_the_fold_table(prepared):
    params, summary = prepared
    data = params.data.dir
    v = load_validated(data, kind="defect")
    cls = dict(zip(v["id"], v["class_name"]))
    assert set(summary["folds"]) == set(SMALL_FOLDS)
    for fold, test_classes in SMALL_FOLDS.items():
        s = load_split(data, fold)
        assert s["fold"] == fold and s["test_classes"] == test_classes
        assert set(s["train_classes"]) == set(params.all_classes) - set(test_classes)
        train, val, test = set(s["train_ids"]), set(s["val_ids"]), set(s["test_ids"])
        assert not (train & val) and not (train & test) and not (val & test)
        assert {cls[i] for i in val} <= set(s["train_classes"])  # never the test classes
        assert {cls[i] for i in train} == set(s["train_classes"])
        assert test == {i for i, c in cls.items() if c in test_classes}  # all usable test images
        assert train | val | test == set(cls)  # every usable defect image, no normal/empty-mask ones
        for c in s["train_classes"]:
            n = sum(1 for i in cls.values() if i == c)
            n_val = sum(1 for i in val if cls[i] == c)
            assert n_val == min(max(1, round(0.15 * n)), n - 6)


def test_empty_mask_and_normal_images_never_in_episodes(prepared):
    params, _ = prepared
    data = params.data.dir
    allv = load_validated(data)
    defect_ids = set(allv.loc[allv["kind"] == "defect", "id"])
    assert f"raw/{EMPTY_MASK_IMAGE}" not in set(allv["image_path"])
    for fold in SMALL_FOLDS:
        for protocol in ("paper", "standard"):
            for k in (1, 5):
                e = load_episodes(data, fold, protocol, k)
                used = set(e["query_id"]) | {i for s in e["support_ids"] for i in s}
                assert used <= defect_ids


@pytest.mark.parametrize("k", [1, 5])
def test_paper_protocol(prepared, k):
    params, _ = prepared
    data = params.data.dir
    v = load_validated(data, kind="defect")
    cls = dict(zip(v["id"], v["class_name"]))
    for fold in SMALL_FOLDS:
        e = load_episodes(data, fold, "paper", k)
        assert list(e.columns) == ["episode", "seed", "class_name", "support_ids", "query_id"]
        s = load_split(data, fold)
        assert sorted(e["query_id"]) == sorted(s["test_ids"])  # every test image is the query once
        assert list(e["episode"]) == list(range(len(e))) and set(e["seed"]) == {1334}
        for row in e.itertuples():
            assert len(row.support_ids) == k == len(set(row.support_ids))
            assert row.query_id not in row.support_ids
            assert {cls[i] for i in row.support_ids} == {cls[row.query_id]} == {row.class_name}


def test_standard_protocol(prepared):
    params, _ = prepared
    data = params.data.dir
    v = load_validated(data, kind="defect")
    cls = dict(zip(v["id"], v["class_name"]))
    for fold in SMALL_FOLDS:
        e = load_episodes(data, fold, "standard", 5)
        assert len(e) == 2 * 20
        for seed in (0, 1):
            assert list(e.loc[e["seed"] == seed, "episode"]) == list(range(20))
        for row in e.itertuples():
            assert len(set(row.support_ids)) == 5 and row.query_id not in row.support_ids
            assert {cls[i] for i in [*row.support_ids, row.query_id]} == {row.class_name}
        # the two seeds give different episodes
        a, b = (e[e["seed"] == s][["query_id"]].to_numpy().ravel().tolist() for s in (0, 1))
        assert a != b


def test_byte_identical_on_rerun_and_on_reingest(prepared, tmp_path):
    params, _ = prepared
    before = _digests(params.data.dir)
    assert len(before) == 3 + 3 * 3 * 2  # split files + (paper, standard, mismatched) x K per fold
    split(params)
    assert _digests(params.data.dir) == before
    fresh = _prepare(tmp_path)  # a second, independent ingest of the same content
    split(fresh)
    assert _digests(fresh.data.dir) == before


def test_holdout_is_seeded_and_bounded():
    ids = [f"{i:016x}" for i in range(20)]
    a = holdout(ids, 0.15, keep=6, seed=[0, 1])
    assert a == holdout(ids, 0.15, keep=6, seed=[0, 1]) and len(a) == 3 and a == sorted(a)
    assert holdout(ids, 0.15, keep=6, seed=[1, 1]) != a
    assert holdout(ids[:6], 0.5, keep=6, seed=[0, 1]) == []  # too small to spare one


def test_split_needs_validation_and_enough_images(tmp_path):
    src = make_small_source(tmp_path / "source")
    params = load_params(write_small_params(tmp_path / "params.yaml", src, tmp_path / "data"), env={})
    ingest(params, progress=False)
    with pytest.raises(DataArtifactError, match=r"validated.parquet does not exist: run `lerenet validate`"):
        split(params)
    validate(params)
    too_many = load_params(write_small_params(tmp_path / "p2.yaml", src, tmp_path / "data",
                                              split={"shots": [1, 7]}), env={})
    with pytest.raises(SplitError, match=r"fewer than 8 usable.*MT_Uneven \(7\)"):
        split(too_many)
    assert not (tmp_path / "data" / "splits").exists()


def test_cli_split_and_episode_paths(prepared):
    from lerenet.cli import app

    params, _ = prepared
    res = CliRunner().invoke(app, ["split", "--data", str(params.data.dir), "--params",
                                   str(params.root / "params.yaml")])
    assert res.exit_code == 0, res.output
    assert "fold 0: train 12, val 2, test 7 images" in res.output
    assert episodes_path(params.data.dir, 2, "standard", 1).name == "fold2_standard_k1.parquet"
    with pytest.raises(ValueError, match="protocol"):
        episodes_path(params.data.dir, 0, "random", 1)
