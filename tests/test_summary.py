"""What DVC shows: compact metrics per fold and the comparison-plot tables (pipeline/summary.py), read by the
real `dvc metrics show` / `dvc plots show` with this repository's dvc.yaml and templates."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import load_params
from pipeline.layout import Layout
from pipeline.report import ReportError, write_report
from pipeline.summary import compact_fold, curve_table, write_summaries

ROOT = Path(__file__).resolve().parents[1]
DVC = Path(os.environ.get("VIRTUAL_ENV", "/work/main/.venv")) / "bin" / "dvc"


def _model(miou: float, with_gain: bool) -> dict:
    k1 = {"paper": {"miou": miou, "fbiou": 0.5, "episodes": 4},
          "standard": {"miou_mean": 0.2, "miou_std": 0.01, "fbiou_mean": 0.6, "fbiou_std": 0.0, "seeds": 2,
                       "episodes": 8}}
    if with_gain:
        k1 = {**k1, "mismatched": {"miou": miou - 0.05, "fbiou": 0.4, "episodes": 4}, "support_gain": 0.05}
    k5 = {"paper": {"miou": miou + 0.1, "fbiou": 0.55, "episodes": 4}}
    return {"k1": k1, "k5": k5,
            "fp": {"k5": {"area_fraction": 0.2, "image_rate": 0.9, "images": 10},
                   "k1": {"area_fraction": 0.01, "image_rate": 0.25, "images": 10,
                          "per_class": {"A": {"area_fraction": 0.0, "image_rate": 0.0, "images": 5}}}},
            "latency_ms": {"k1": 3.0, "k5": 4.0}}


def _write_inputs(params, gain: bool = False) -> None:
    """Fold metrics (lerenet with a support gain if ``gain``: the mismatched-support keys), per-class
    plot tables and training curves for every fold and model."""
    lay = Layout.of(params)
    names = list(params.model.names)
    for f in sorted(params.folds):
        d = {m: _model(0.1 * (i + 1) + 0.01 * f, with_gain=gain and m == "lerenet") for i, m in enumerate(names)}
        lay.fold_metrics(f).parent.mkdir(parents=True, exist_ok=True)
        lay.fold_metrics(f).write_text(json.dumps({**d, "device": "cpu (2 threads)"}))
        lay.per_class_plot(f).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"class_name": ["A", "B"], **{f"{m}_k{k}_paper": [0.3, 0.4] for m in names for k in (1, 5)}}
                     ).to_csv(lay.per_class_plot(f), index=False)
        for m in names:
            lay.curve(f, m).parent.mkdir(parents=True, exist_ok=True)
            if m == "prototype":  # nothing to train: one validation score at step 0, no loss
                text = "step,episodes,loss,lr,val_miou,episodes_per_s\n0,0,,,0.35,\n"
            else:
                text = ("step,episodes,loss,lr,val_miou,episodes_per_s\n1,8,0.9,0.05,,1.0\n2,16,0.7,0.05,0.2,1.1\n"
                        "3,24,0.6,0.05,,1.2\n4,32,0.5,0.05,0.3,1.2\n")
            lay.curve(f, m).write_text(text)


def test_compact_fold_keeps_headline_scores_false_alarms_and_support_gain():
    got = compact_fold({"lerenet": _model(0.3, with_gain=True), "baseline": _model(0.2, with_gain=False),
                        "device": "cpu"})
    assert got["lerenet"] == {"k1": {"miou": 0.3, "fbiou": 0.5, "support_gain": 0.05},
                              "k5": {"miou": 0.4, "fbiou": 0.55}, "false_alarm_rate": 0.25}  # smallest K
    assert got["baseline"]["k1"] == {"miou": 0.2, "fbiou": 0.5} and "device" not in got
    with pytest.raises(ValueError, match="no 'paper' mIoU"):
        compact_fold({"lerenet": {"k1": {"standard": {"miou_mean": 0.1}}}})


def test_report_writes_compact_metrics_and_curve_tables(small_params):
    params = small_params
    _write_inputs(params)
    write_report(params)
    lay = Layout.of(params)
    for f in sorted(params.folds):
        compact = json.loads(lay.fold_summary(f).read_text())
        assert list(compact) == list(params.model.names)
        flat = [k for m in compact.values() for k, v in m.items() for _ in (v if isinstance(v, dict) else [v])]
        assert len(flat) <= 8 * len(compact)  # a few numbers per model, not the 217 columns of the detailed file
        val = pd.read_csv(lay.curve_plot(f, "val_miou"))
        assert list(val.columns) == ["step", "model", "val_miou"]  # long: a row only where a value exists
        assert not val.isna().any().any()  # no blank cell for Vega to draw as 0
        trained = [m for m in params.model.names if m != "prototype"]
        assert val.groupby("model", sort=False)["step"].apply(list).to_dict() == {
            **{m: [2, 4] for m in trained}, "prototype": [0]}  # validation steps only, per model
        assert val.loc[val.model == "prototype", "val_miou"].tolist() == [pytest.approx(0.35)]
        assert val.loc[val.model == trained[0], "val_miou"].tolist() == [pytest.approx(0.2), pytest.approx(0.3)]
        loss = pd.read_csv(lay.curve_plot(f, "loss"))
        assert list(loss.columns) == ["step", "model", "loss"] and not loss.isna().any().any()
        assert "prototype" not in set(loss.model) and loss.step.tolist() == [1, 2, 3, 4] * len(trained)
    assert curve_table(params, 99, "loss") is None
    lay.fold_metrics(sorted(params.folds)[0]).write_text(json.dumps({"lerenet": {"k1": {}}}))
    with pytest.raises(ReportError, match="re-run `lerenet evaluate"):
        write_report(params)


def test_real_dvc_shows_compact_metrics_and_plots_every_model(tmp_path):
    """This repository's dvc.yaml + templates in a fresh git/DVC project holding the report's outputs:
    `dvc metrics show` lists only the compact files, `dvc plots show` renders every plot without error."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(DVC), "init", "-q"], cwd=tmp_path, check=True, env=env)
    shutil.copytree(ROOT / ".dvc" / "plots", tmp_path / ".dvc" / "plots")
    params = load_params(tmp_path / "params.yaml", env={})
    _write_inputs(params, gain=True)
    write_summaries(params)
    out = subprocess.run([str(DVC), "metrics", "show", "--json"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=True).stdout
    files = json.loads(out)[""]["data"]
    assert sorted(files) == sorted(f"metrics/summary/fold{f}.json" for f in params.folds)
    md = subprocess.run([str(DVC), "metrics", "show", "--md"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, check=True).stdout
    assert max(len(line) for line in md.splitlines()) < 1200 and "lerenet.k1.support_gain" in md
    plots = json.loads(subprocess.run([str(DVC), "plots", "show", "--json"], cwd=tmp_path, env=env,
                                      capture_output=True, text=True, check=True).stdout)
    assert not plots.get("errors")
    val = plots["data"][f"val_miou_fold{sorted(params.folds)[0]}"][0]["content"]
    rows = val["data"]["values"]
    y = val["encoding"]["y"]["field"]
    assert {r["model"] for r in rows} == set(params.model.names)  # every model in one plot
    assert val["encoding"]["color"]["field"] == "model"
    # no point that Vega would draw as a false 0: every row has a number (the old wide table gave "" rows)
    assert rows and all(str(r[y]).strip() not in ("", "nan") and float(r[y]) > 0 for r in rows)
    assert sorted((int(r["step"]), float(r[y])) for r in rows if r["model"] == "prototype") == [(0, 0.35)]
    rule = [layer for layer in val["layer"] if layer["mark"]["type"] == "rule"]
    assert rule and rule[0]["transform"] == [{"filter": "datum.points == 1"}]  # the prototype's dashed line
    loss = plots["data"][f"loss_fold{sorted(params.folds)[0]}"][0]["content"]
    assert {r["model"] for r in loss["data"]["values"]} == set(params.model.names) - {"prototype"}
    bars = plots["data"][f"per_class_fold{sorted(params.folds)[0]}_k1"][0]["content"]
    assert bars["encoding"]["xOffset"]["field"] == "field"  # models side by side per class
    assert {r["field"] for r in bars["data"]["values"]} == {f"{m}_k1_paper" for m in params.model.names}
