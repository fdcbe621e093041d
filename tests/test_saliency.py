"""JAFFNet's own setting (pipeline/bench/saliency.py, pipeline/bench/saliency_metrics.py): the saliency
metrics against answers computed by hand, the per-class split, and a tiny real run end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import make_small_source
from pipeline.bench.saliency import class_split, load_rows, main, within_class_split
from pipeline.bench.saliency_metrics import SaliencyAccumulator, f_measure, mae, precision_recall

# Image A (2 x 2): levels rint(255 s) = 255, 153 / 51, 0; ground truth = the left column.
SAL_A = np.array([[1.0, 0.6], [0.2, 0.0]])
GT_A = np.array([[True, False], [True, False]])
# Image B (1 x 2): a perfect map.
SAL_B = np.array([[1.0, 0.0]])
GT_B = np.array([[True, False]])


# ----------------------------------------------------------------------------- metrics by hand
def test_mae_by_hand():
    # |1-1| + |0.6-0| + |0.2-1| + |0-0| = 1.4 over 4 pixels
    assert mae(SAL_A, GT_A) == pytest.approx(0.35)
    assert mae(SAL_B, GT_B) == 0.0
    assert mae(np.ones((3, 3)), np.zeros((3, 3), bool)) == 1.0


def test_precision_recall_by_hand():
    p, r = precision_recall(SAL_A, GT_A)
    assert p.shape == r.shape == (256,)
    # t = 0: all 4 pixels predicted, both GT pixels found
    assert (p[0], r[0]) == pytest.approx((0.5, 1.0))
    # t = 1..51: levels 255, 153, 51 predicted: 2 of 3 are GT, recall 1
    assert np.allclose(p[1:52], 2 / 3) and np.allclose(r[1:52], 1.0)
    # t = 52..153: levels 255, 153: 1 of 2, recall 1/2
    assert np.allclose(p[52:154], 0.5) and np.allclose(r[52:154], 0.5)
    # t = 154..255: only level 255: precision 1, recall 1/2
    assert np.allclose(p[154:], 1.0) and np.allclose(r[154:], 0.5)


def test_max_f_one_image_by_hand():
    # F = 1.3 P R / (0.3 P + R): t=0: 0.65/1.15; t<=51: (1.3*2/3)/1.2 = 0.7222; t<=153: 0.325/0.65 = 0.5;
    # t>=154: 0.65/0.8 = 0.8125 -> max F = 0.8125, first reached at t = 154
    acc = SaliencyAccumulator()
    acc.update(SAL_A, GT_A, "A")
    s = acc.summary()
    assert s["images"] == 1
    assert s["max_f"] == pytest.approx(0.8125)
    assert s["max_f_threshold"] == 154
    assert s["mae"] == pytest.approx(0.35)
    # IoU at 0.5: predicted {1.0, 0.6}, GT = left column: I = 1, U = 3
    assert s["miou"] == pytest.approx(1 / 3)


def test_max_f_averages_precision_and_recall_over_images_not_f():
    """Two images: mean P and R per threshold first, then F (the saliency-paper protocol).

    t >= 154: P = (1 + 1) / 2 = 1, R = (0.5 + 1) / 2 = 0.75 -> F = 1.3 * 0.75 / 1.05 = 13/14 = 0.92857;
    t <= 51: P = (2/3 + 1) / 2, R = 1 -> F = 0.86667; t <= 153: P = R = 0.75 -> F = 0.75.
    (Averaging per-image F instead would give (0.8125 + 1) / 2 = 0.90625.)"""
    acc = SaliencyAccumulator()
    acc.update(SAL_A, GT_A, "A")
    acc.update(SAL_B, GT_B, "B")
    both = acc.summary(["A", "B"])
    assert both["max_f"] == pytest.approx(13 / 14)
    assert both["mae"] == pytest.approx((0.35 + 0.0) / 2)
    assert both["miou"] == pytest.approx((1 / 3 + 1.0) / 2)  # mean of the class IoUs
    assert acc.summary(["B"])["max_f"] == pytest.approx(1.0)


def test_f_measure_edges_and_errors():
    assert f_measure(np.array([0.0, 1.0]), np.array([0.0, 1.0])).tolist() == [0.0, 1.0]
    # nothing predicted at any threshold above the map's maximum: precision 0, not NaN
    p, r = precision_recall(np.full((2, 2), 0.1), np.eye(2, dtype=bool))  # level rint(25.5) = 26
    assert (p[26], r[26]) == (0.5, 1.0)
    assert p[27:].max() == 0.0 and r[27:].max() == 0.0 and np.isfinite(p).all()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mae(np.full((2, 2), 1.5), np.eye(2, dtype=bool))
    with pytest.raises(ValueError, match="same"):
        mae(np.zeros((2, 3)), np.eye(2, dtype=bool))
    with pytest.raises(TypeError, match="bool"):
        mae(np.zeros((2, 2)), np.eye(2))
    with pytest.raises(KeyError, match="C"):
        SaliencyAccumulator().summary(["C"])


# ----------------------------------------------------------------------------- split
def _rows(counts: dict[str, int]) -> pd.DataFrame:
    return pd.DataFrame([{"id": f"{c}-{i:03d}", "class_name": c} for c, n in counts.items() for i in range(n)])


def test_split_is_deterministic_disjoint_and_80_20_per_class():
    rows = _rows({"Steel_In": 300, "MT_Fray": 32, "MT_Crack": 2})
    a = within_class_split(rows, ["Steel_In", "MT_Fray", "MT_Crack"], seed=0)
    b = within_class_split(rows.sample(frac=1.0, random_state=3), ["MT_Crack", "MT_Fray", "Steel_In"], seed=0)
    assert a == b  # same split whatever the row order and the class order
    for c, n in {"Steel_In": 300, "MT_Fray": 32, "MT_Crack": 2}.items():
        train, test = set(a[c]["train"]), set(a[c]["test"])
        assert not train & test
        assert train | test == set(rows.loc[rows["class_name"] == c, "id"])
        assert len(test) == max(1, round(0.2 * n))
    assert len(a["Steel_In"]["test"]) == 60 and len(a["MT_Fray"]["test"]) == 6
    assert within_class_split(rows, ["Steel_In"], seed=1)["Steel_In"] != a["Steel_In"]
    # a class's split does not depend on which other classes are split with it
    assert within_class_split(rows, ["MT_Fray"], seed=0)["MT_Fray"] == a["MT_Fray"]


def test_split_errors():
    with pytest.raises(ValueError, match="needs >= 2"):
        class_split(["x"], 0, "C")
    with pytest.raises(ValueError, match="duplicate"):
        class_split(["x", "x", "y"], 0, "C")
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        class_split(["x", "y"], 0, "C", test_fraction=1.0)
    with pytest.raises(ValueError, match="Leather_Cut"):
        within_class_split(_rows({"Steel_In": 5}), ["Leather_Cut"], 0)


# ----------------------------------------------------------------------------- end to end on real images
@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    """Real images: 7 Steel_In, 7 usable MT_Uneven (its empty-mask image is left out), 7 Leather_Color."""
    return make_small_source(tmp_path_factory.mktemp("saliency") / "source")


def test_manifest_rows_and_folder_rows_agree(small, tmp_path):
    """The default input is the validated manifest; ``--source`` reads a folder the same way."""
    rows = load_rows(source=small)
    assert set(rows["class_name"]) == {"Steel_In", "MT_Uneven", "Leather_Color"}
    assert len(rows) == 21 and not rows["id"].str.contains("exp3_num_45042").any()  # empty mask left out
    data = tmp_path / "data"
    data.mkdir()
    manifest = pd.concat([rows.assign(kind="defect"), rows.head(2).assign(kind="normal", id=["n1", "n2"])])
    manifest.to_parquet(data / "validated.parquet", index=False)
    assert sorted(load_rows(data_dir=data)["id"]) == sorted(rows["id"])


def test_tiny_real_run_writes_finite_figures(small, tmp_path):
    out = tmp_path / "bench" / "results.json"
    result = main(["--source", str(small), "--classes", "Steel_In", "MT_Uneven", "--epochs", "1",
                   "--image-size", "64", "--batch-size", "4", "--speed-warmup", "1", "--speed-repeats", "2",
                   "--out", str(out)])
    on_disk = json.loads(out.read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert list(on_disk["per_class"]) == ["Steel_In", "MT_Uneven"]
    for c, row in on_disk["per_class"].items():
        assert row["images"] == 1 and row["train_images"] == 6
        assert 0.0 <= row["mae"] <= 1.0 and 0.0 <= row["max_f"] <= 1.0 and 0.0 <= row["iou"] <= 1.0
        assert on_disk["test_ids"][c][0].startswith(f"{c}/Images/")
    assert set(on_disk["groups"]) == {"SD-saliency-900", "Magnetic-tile"}
    overall = on_disk["overall"]
    assert overall["images"] == 2
    assert all(math.isfinite(overall[k]) for k in ("mae", "max_f", "miou"))
    assert overall["miou"] == pytest.approx(np.mean([r["iou"] for r in on_disk["per_class"].values()]), abs=1e-4)
    speed = on_disk["speed"]
    assert speed["threads"] == 2 and speed["input_size"] == 64 and speed["images_per_s"] > 0
    assert on_disk["training"]["steps"] == 3 and math.isfinite(on_disk["training"]["epoch_loss"][0])
    s = on_disk["settings"]
    assert (s["image_size"], s["epochs"], s["freeze_backbone"], s["split_seed"]) == (64, 1, False, 0)
    assert on_disk["seconds"]["total"] > 0
    assert not list(out.parent.glob(".*.tmp*"))  # written atomically, no temporary left


def test_training_time_budget_stops_after_the_step_that_passes_it(small):
    from pipeline.bench.saliency import clean_views, train
    from pipeline.checkpoint import build_net
    from pipeline.config import load_params

    params = load_params(overrides={"train": {"batch_size": 2, "image_size": 32}, "model": {"freeze_backbone": False}},
                         env={})
    rows = load_rows(source=small)
    views = clean_views(rows, rows["id"][:6].tolist(), small, 32, 127)
    assert views[0][0].shape == (32, 32, 3) and views[0][1].dtype == bool and views[0][1].any()
    net = build_net(params, "jaffnet")
    h = train(net, views, params, epochs=2, max_seconds=0.0, log=lambda msg: None)
    assert (h["steps"], h["planned_steps"], h["stopped_early"]) == (1, 6, True)
    assert len(h["epoch_loss"]) == 1 and math.isfinite(h["epoch_loss"][0]) and not net.training


def test_speed_only_times_the_forward_without_training(small, tmp_path):
    out = tmp_path / "speed.json"
    r = main(["--source", str(small), "--classes", "Steel_In", "--image-size", "48", "--speed-only",
              "--speed-warmup", "1", "--speed-repeats", "3", "--out", str(out)])
    assert "per_class" not in r and r["training"] is None and "speed only" in r["setting"]
    assert (r["speed"]["input_size"], r["speed"]["threads"], r["speed"]["repeats"]) == (48, 2, 3)
    assert r["speed"]["images_per_s"] > 0 and json.loads(out.read_text())["speed"] == r["speed"]
