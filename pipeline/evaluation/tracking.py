"""MLflow logging of an evaluation: metrics, per-class table, pictures (and the pyfunc) in the model's run.

Metric names (:func:`flat_metrics`): ``test_k<K>_<protocol>_<name>`` for every key of the protocol's
score in ``metrics/fold<f>.json`` (``miou``, ``fbiou``, ``episodes``; ``miou_mean``, ``miou_std``, ...),
the support-sensitivity control as ``test_k<K>_mismatched_{miou,fbiou,episodes}`` and
``test_k<K>_support_gain`` (paper - mismatched mIoU), ``fp_k<K>_area_fraction``, ``fp_k<K>_image_rate``,
``latency_ms_k<K>``. Artifacts under ``evaluation/``: ``per_class_iou.{json,csv,png}``,
``overlays_k<K>_<protocol>.png``; the pyfunc is logged as ``fold<f>-<model>`` (:func:`logged_model_name`);
tags ``evaluated=true``, ``lerenet.step=train+evaluate``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from pipeline.config import Params
from pipeline.evaluation.fold import ModelResult
from pipeline.evaluation.results import MISMATCHED, SUPPORT_GAIN, ModelMetrics
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def logged_model_name(fold: int, model: str) -> str:
    """Name of the pyfunc logged in an evaluated run: ``fold<f>-<model>`` (``runs:/<id>/fold<f>-<model>``)."""
    return f"fold{fold}-{model}"


def sheet_title(model: str, fold: int, tag: str) -> str:
    """Title of an overlay sheet, e.g. ``sheet_title("lerenet", 0, "k1_paper")`` ->
    ``"lerenet, fold 0 (novel classes): K=1, paper episodes"``."""
    k, _, protocol = tag.partition("_")
    shots = k[1:] if k.startswith("k") and k[1:].isdigit() else k
    what = "mismatched-support control episodes" if protocol == MISMATCHED else f"{protocol} episodes"
    return f"{model}, fold {fold} (novel classes): K={shots}, {what}"


def flat_metrics(metrics: ModelMetrics) -> dict[str, float]:
    """Flatten a model's metrics to MLflow metric names, e.g. ``test_k1_paper_miou``,
    ``test_k5_standard_miou_mean``, ``test_k1_mismatched_miou``, ``test_k1_support_gain``,
    ``fp_k1_image_rate``, ``latency_ms_k1`` (per-class FP omitted)."""
    flat: dict[str, float] = {}
    for k, by_protocol in metrics.scores.items():
        for protocol, score in by_protocol.items():
            for name, val in score.to_json().items():
                flat[f"test_k{k}_{protocol}_{name}"] = float(val)
    for k, score in metrics.mismatched.items():
        for name, val in score.to_json().items():
            flat[f"test_k{k}_{MISMATCHED}_{name}"] = float(val)
        gain = metrics.support_gain(k)
        if gain is not None:
            flat[f"test_k{k}_{SUPPORT_GAIN}"] = float(gain)
    for k, fa in metrics.fp.items():
        flat[f"fp_k{k}_area_fraction"] = float(fa.area_fraction)
        flat[f"fp_k{k}_image_rate"] = float(fa.image_rate)
    for k, ms in metrics.latency_ms.items():
        flat[f"latency_ms_k{k}"] = float(ms)
    return flat


def log_evaluation(params: Params, fold: int, name: str, res: ModelResult) -> None:
    """Log final metrics, per-class table, pictures (and the pyfunc model) into the model's nested run.

    The run is the one named by ``run.json`` next to the checkpoint (written by training); without
    it (or if that run no longer exists) the nested run training would have used is found or created
    under the pipeline's parent run (name ``fold<f>/<model>/<backbone>/k<train shots>``).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking
    from pipeline.plots import overlay_grid, per_class_bar

    layout = Layout.of(params)
    tracking.configure(params)
    run_json = layout.run_json(fold, name)
    run_id = None
    if run_json.is_file():
        try:
            run_id = json.loads(run_json.read_text()).get("run_id")
            if run_id:
                tracking.client(params).get_run(run_id)
        except (OSError, ValueError, MlflowException) as exc:
            log.warning("%s: run not usable (%s): logging evaluation into the nested run by name", run_json, exc)
            run_id = None
    if run_id:
        ctx = tracking.resume_run(params, run_id)
    else:
        run_name = f"fold{fold}/{name}/{params.model.backbone}/k{params.train.shots}"
        ctx = tracking.nested_run(params, tracking.parent_run_id(params), run_name,
                                  tags={"model": name, "backbone": params.model.backbone, "shots": params.train.shots,
                                        "fold": f"fold{fold}", "variant": params.model.variant})
    flat = flat_metrics(res.metrics)
    from pipeline.training.tracking import run_description

    with ctx:
        mlflow.set_tags({"evaluated": "true", "lerenet.step": "train+evaluate",
                         tracking.NOTE_TAG: run_description(params, fold, name, evaluated=True)})
        mlflow.log_metrics(flat)
        mlflow.log_table(res.per_class, artifact_file="evaluation/per_class_iou.json")
        with tempfile.TemporaryDirectory() as tmp:
            tmpd = Path(tmp)
            res.per_class.to_csv(tmpd / "per_class_iou.csv", index=False)
            series = {f"k{k}_{p}": dict(zip(g["class_name"], g["iou"]))
                      for (k, p), g in res.per_class.groupby(["shots", "protocol"])}
            if series:
                per_class_bar(series, tmpd / "per_class_iou.png", f"{name} fold {fold}: per-class IoU")
            for tag, items in res.overlays.items():
                overlay_grid(items, tmpd / f"overlays_{tag}.png", sheet_title(name, fold, tag))
            mlflow.log_artifacts(str(tmpd), artifact_path="evaluation")
        if params.evaluate.log_pyfunc:
            from pipeline.serving.pyfunc import log_pyfunc

            log_pyfunc(layout.model_file(fold, name), name=logged_model_name(fold, name),
                       metadata_={"model_name": name, "fold": fold, **{k: v for k, v in flat.items() if k.endswith("miou")}},
                       max_request_bytes=params.serve.max_request_bytes)
