"""The registered model's own runs carry pictures: per-class IoU chart and the folds' overlay sheets.

Real MLflow (SQLite in tmp_path), a real prototype checkpoint, real overlay sheets drawn from defects12
images, and the real registration use case (``register_and_gate``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import registry as R
from pipeline.config import load_params
from pipeline.layout import Layout

SHEET = "overlays_k1_paper.png"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real prototype-model checkpoint (random backbone weights: no training, no download)."""
    from model import build_model
    from pipeline.checkpoint import save_model

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_model(path, build_model("prototype", pretrained=False),
               dict(model="prototype", backbone="efficientnet_lite0", freeze_backbone=True, variant="mpr+mpe*",
                    channels=256, image_size=64))
    return path


@pytest.fixture
def params(small_params_file):
    return load_params(small_params_file, env={})


def _evaluated_folds(params, tmp_path: Path, sheets_for=None) -> dict[int, bytes]:
    """What the evaluation leaves behind, for every fold: metrics files, ``metrics/per_class/fold<f>.csv``, a
    fold run (named by ``models/fold<f>/lerenet/run.json``) holding a real overlay sheet; plus the production
    training run (``models/all/lerenet/run.json``). Returns the sheet bytes per fold."""
    from test_plots import _episodes
    from test_registry import _write_fold_metrics

    from pipeline import tracking
    from pipeline.plots import overlay_grid

    _write_fold_metrics(params)
    layout, client = Layout.of(params), tracking.client(params)
    exp = tracking.configure(params)
    sheets = {}
    for fold, cls in params.folds.items():
        layout.per_class(fold).parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame({"fold": fold, "model": ["lerenet", "lerenet", "baseline"], "shots": [1, 5, 1],
                      "protocol": "paper", "class_name": cls[0], "iou": [0.3 + 0.1 * fold, 0.5, 0.9],
                      "iou_std": 0.0, "episodes": 3}).to_csv(layout.per_class(fold), index=False)
        run = client.create_run(exp, run_name=f"fold{fold}/lerenet/efficientnet_lite0/k1")
        if sheets_for is None or fold in sheets_for:
            sheet = overlay_grid(_episodes()[:1], tmp_path / f"sheet{fold}" / SHEET, f"fold {fold}")
            client.log_artifact(run.info.run_id, str(sheet), "evaluation")
            sheets[fold] = sheet.read_bytes()
        client.set_terminated(run.info.run_id)
        layout.run_json(fold, "lerenet").parent.mkdir(parents=True, exist_ok=True)
        layout.run_json(fold, "lerenet").write_text(json.dumps({"run_id": run.info.run_id}))
    prod = client.create_run(exp, run_name="all/lerenet/efficientnet_lite0/k1")
    client.set_terminated(prod.info.run_id)
    layout.run_json(None, "lerenet").parent.mkdir(parents=True, exist_ok=True)
    layout.run_json(None, "lerenet").write_text(json.dumps({"run_id": prod.info.run_id}))
    return sheets


def _files(client, run_id: str, path: str = "pictures") -> set[str]:
    out = set()
    for a in client.list_artifacts(run_id, path):
        out |= _files(client, run_id, a.path) if a.is_dir else {a.path}
    return out


def test_champion_register_and_production_runs_carry_the_cv_pictures(params, checkpoint, tmp_path):
    from pipeline.usecases.register import register_and_gate

    sheets = _evaluated_folds(params, tmp_path)
    version, outcome = register_and_gate(params, "lerenet", checkpoint)
    assert outcome.decision.promoted and R.alias_version(params, R.CHAMPION) == version
    client = R.client(params)
    mv = client.get_model_version(params.mlflow.registered_model, version)
    prod_run = json.loads(Layout.of(params).run_json(None, "lerenet").read_text())["run_id"]
    expected = {"pictures/per_class_iou.png", "pictures/per_class_iou.csv",
                *(f"pictures/fold{f}/{SHEET}" for f in params.folds)}
    for run_id in (mv.run_id, prod_run):
        assert _files(client, run_id) == expected
        for fold, data in sheets.items():  # the very sheet the fold's evaluation logged
            assert Path(client.download_artifacts(run_id, f"pictures/fold{fold}/{SHEET}", str(tmp_path / run_id))
                        ).read_bytes() == data
    chart = Image.open(client.download_artifacts(mv.run_id, "pictures/per_class_iou.png", str(tmp_path / "c")))
    assert chart.format == "PNG" and chart.size[0] >= 400
    table = pd.read_csv(client.download_artifacts(mv.run_id, "pictures/per_class_iou.csv", str(tmp_path / "t")))
    assert set(table["shots"]) == {"K=1", "K=5"}  # lerenet only (no baseline row), every fold's novel class
    assert sorted(table[table["shots"] == "K=1"]["iou"]) == pytest.approx([0.3, 0.4, 0.5])
    assert set(table["class_name"]) == {c for cls in params.folds.values() for c in cls}
    # the register run's decision tag follows the decision; the description points at the pictures
    assert client.get_run(mv.run_id).data.tags["decision"] == "promoted"
    assert "pictures/fold<f>/overlays_k<K>_paper.png" in mv.description


def test_missing_sheets_are_skipped_and_named_and_never_fail_registration(params, checkpoint, tmp_path, monkeypatch):
    from pipeline.champion_pictures import log_champion_pictures
    from pipeline.usecases import register as U

    _evaluated_folds(params, tmp_path, sheets_for={0})
    Layout.of(params).run_json(2, "lerenet").unlink()
    version = U.register_production(params, "lerenet", checkpoint)
    report = log_champion_pictures(params, version, "lerenet")  # again, to read what was skipped
    assert f"pictures/fold0/{SHEET}" in report.artifacts and not any("fold1" in a for a in report.artifacts)
    assert any(s.startswith("fold 1:") and "no overlay sheets" in s for s in report.skipped)
    assert any(s.startswith("fold 2: no run") for s in report.skipped)

    def broken(*a, **k):
        raise OSError("artifact store full")

    monkeypatch.setattr("pipeline.champion_pictures.log_champion_pictures", broken)
    v2 = U.register_production(params, "lerenet", checkpoint)  # a warning, and the version stands
    assert int(v2) == int(version) + 1 and R.alias_version(params, R.CHALLENGER) == v2
    assert np.isfinite(float(R.client(params).get_model_version(params.mlflow.registered_model, v2).tags["cv.miou.k1"]))
