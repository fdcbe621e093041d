"""Pictures on the registered model's own runs: what a person opening the champion in the MLflow UI sees.

The production model (``all/<model>``) is trained on every class, so it has no novel class to be pictured
on; its quality estimate is the cross-validation of the same recipe. So the pictures logged onto its runs
are the cross-validation's, on novel classes:

=====================================================  =================================================
artifact (under :data:`PICTURES_DIR`, ``pictures/``)    what
=====================================================  =================================================
``per_class_iou.png``, ``per_class_iou.csv``            per-class IoU of ``<model>`` on every fold's novel
                                                        classes, one bar series per K (paper protocol),
                                                        from ``metrics/per_class/fold<f>.csv``
``fold<f>/overlays_k<K>_<protocol>.png``                the overlay sheets the evaluation logged on the
                                                        fold model's run (``models/fold<f>/<model>/run.json``);
                                                        ``paper`` protocol (``mismatched`` too with ``all``)
=====================================================  =================================================

Logged (:func:`log_champion_pictures`) at registration onto the version's ``register-<model>`` run and onto
the production model's training run (``models/all/<model>/run.json``), with ``MlflowClient.log_artifacts``
(the runs stay finished). A fold whose run or sheets are missing (evaluated with ``--no-track``, or with
``evaluate.overlay_episodes_per_class: 0``) is skipped and named in the returned report.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pipeline.config import PRODUCTION_MODEL, Params
from pipeline.layout import Layout
from pipeline.registry_text import PICTURES_DIR

log = logging.getLogger(__name__)


@dataclass
class PicturesReport:
    """What :func:`log_champion_pictures` logged.

    Attributes:
        runs: run ids the pictures were logged onto (register run first, then the production training run).
        artifacts: artifact paths logged onto each of them, e.g. ``pictures/fold0/overlays_k1_paper.png``.
        skipped: one line per thing not logged and why (no per-class table, fold run missing, ...).
    """

    runs: list[str] = field(default_factory=list)
    artifacts: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def per_class_series(params: Params, model_name: str = PRODUCTION_MODEL,
                     protocol: str = "paper") -> dict[str, dict[str, float]]:
    """``{"K=<k>": {class: IoU in [0, 1]}}`` of ``model_name`` over every fold's novel classes, read from
    ``metrics/per_class/fold<f>.csv`` (folds without the file are left out; ``{}`` when none has it)."""
    layout = Layout.of(params)
    frames = [pd.read_csv(layout.per_class(f)) for f in sorted(params.folds) if layout.per_class(f).is_file()]
    if not frames:
        return {}
    table = pd.concat(frames, ignore_index=True)
    table = table[(table["model"] == model_name) & (table["protocol"] == protocol)]
    return {f"K={int(k)}": dict(zip(g["class_name"], g["iou"].astype(float)))
            for k, g in table.groupby("shots", sort=True)}


def _run_id(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("run_id") or None
    except (OSError, ValueError):
        return None


def collect_pictures(params: Params, out: Path, model_name: str = PRODUCTION_MODEL,
                     protocols: tuple[str, ...] = ("paper",)) -> list[str]:
    """Write the champion's pictures into ``out`` (the layout of the table above); returns the skip notes.

    Raises:
        mlflow.exceptions.MlflowException: the tracking server failed while downloading a sheet.
    """
    from mlflow.exceptions import MlflowException

    from pipeline import tracking
    from pipeline.plots import per_class_bar

    skipped: list[str] = []
    series = per_class_series(params, model_name)
    if series:
        per_class_bar(series, out / "per_class_iou.png",
                      f"{model_name}: per-class IoU on novel classes (cross-validation, paper protocol)")
        pd.DataFrame([{"shots": k, "class_name": c, "iou": v} for k, s in series.items() for c, v in s.items()]
                     ).to_csv(out / "per_class_iou.csv", index=False)
    else:
        skipped.append(f"per-class IoU: no metrics/per_class/fold<f>.csv with {model_name}")
    client = tracking.client(params)
    layout = Layout.of(params)
    for fold in sorted(params.folds):
        run_id = _run_id(layout.run_json(fold, model_name))
        if not run_id:
            skipped.append(f"fold {fold}: no run in {layout.run_json(fold, model_name)}")
            continue
        try:
            names = [Path(a.path).name for a in client.list_artifacts(run_id, "evaluation")]
        except MlflowException as exc:
            skipped.append(f"fold {fold}: run {run_id} not readable ({exc})")
            continue
        sheets = sorted(n for n in names if n.startswith("overlays_") and n.endswith(".png")
                        and n[:-4].rsplit("_", 1)[-1] in protocols)
        if not sheets:
            skipped.append(f"fold {fold}: run {run_id} has no overlay sheets (evaluate.overlay_episodes_per_class = 0?)")
        for name in sheets:
            dest = out / f"fold{fold}"
            dest.mkdir(parents=True, exist_ok=True)
            client.download_artifacts(run_id, f"evaluation/{name}", str(dest))
    return skipped


def log_champion_pictures(params: Params, version: str, model_name: str = PRODUCTION_MODEL,
                          protocols: tuple[str, ...] = ("paper",)) -> PicturesReport:
    """Log the cross-validation pictures (module docstring) onto ``version``'s register run and onto the
    production model's training run (``models/all/<model>/run.json``, when it names a run).

    Args:
        params: validated params (``mlflow.*``, folds, layout).
        version: registered version of ``params.mlflow.registered_model``.
        model_name: the production architecture (whose fold runs hold the sheets).
        protocols: which sheets to copy (``"paper"``; add ``"mismatched"`` for the control).

    Returns:
        :class:`PicturesReport` (runs, artifact paths, what was skipped and why).

    Raises:
        mlflow.exceptions.MlflowException: the registry or tracking server failed.
    """
    from pipeline import registry, tracking

    client = registry.client(params)
    mv = client.get_model_version(params.mlflow.registered_model, str(version))
    report = PicturesReport(runs=[r for r in (mv.run_id, _run_id(Layout.of(params).run_json(None, model_name))) if r])
    with tempfile.TemporaryDirectory(prefix="lerenet-pictures-") as tmp, tracking.no_artifact_progress_bar():
        out = Path(tmp)
        report.skipped = collect_pictures(params, out, model_name, protocols)
        report.artifacts = sorted(f"{PICTURES_DIR}/{p.relative_to(out).as_posix()}" for p in out.rglob("*") if p.is_file())
        if report.artifacts:
            for run_id in dict.fromkeys(report.runs):
                client.log_artifacts(run_id, str(out), PICTURES_DIR)
    for note in report.skipped:
        log.info("champion pictures: %s", note)
    log.info("champion pictures: %d files logged onto runs %s", len(report.artifacts), report.runs)
    return report
