"""MLflow logging of one training run (nested run per fold/model/backbone/K, batched metric points).

Tags ``model, backbone, shots, fold, stage=train, variant, lerenet.step=train``, a markdown
description (``mlflow.note.content``, :func:`run_description`) (plus the provenance tags that
:func:`pipeline.tracking.nested_run` adds); metrics ``loss``, ``lr`` (per step), ``val_miou`` (per
validation), ``best_val_miou``, ``train_seconds``, ``train_episodes_per_s``; artifact
``training/<tag>_<model>.csv``.

Every call to the tracking server (opening the run, each metric flush, the final figures and the
curve) goes through :func:`pipeline.faults.retry_call`: a server that is down or restarting is retried
with bounded backoff, and the buffered points are kept until a flush succeeds, so none is lost; a
full disk (``ENOSPC``) or a permanent MLflow error fails at once.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.layout import fold_tag

log = logging.getLogger(__name__)


def run_description(params: Params, fold: int | None, model_name: str, evaluated: bool = False) -> str:
    """Markdown description of the nested run of ``model_name`` on ``fold`` (``None``: production model)."""
    if fold is None:
        what = (f"Training of the production `{model_name}` on every class (no held-out fold): the model that "
                "is registered. Its quality estimate is the cross-validation score of the same recipe "
                "(parent run).")
    else:
        test = ", ".join(params.folds[fold])
        what = (f"Training of `{model_name}` on fold {fold}'s training classes, model selection on their held-out "
                f"images (`val_miou`); novel test classes: {test}.")
        what += (" **Evaluated**: `test_k<K>_<protocol>_*` metrics, per-class IoU and overlay pictures under "
                 "`evaluation/`." if evaluated else " `lerenet evaluate` adds the test metrics and pictures to this run.")
    return (f"{what}\n\nBackbone `{params.model.backbone}` ({'frozen' if params.model.freeze_backbone else 'fine-tuned'}), "
            f"K={params.train.shots} training episodes, {params.train.episodes} episodes, image size "
            f"{params.train.image_size}.")


class Tracker:
    """Buffers metric points of one training run and logs them in batches to its nested MLflow run.

    Run name ``<tag>/<model>/<backbone>/k<train.shots>`` under the pipeline's parent run; a resumed run
    logs into the run of the interrupted attempt if it still exists.
    """

    def __init__(self, params: Params, fold: int | None, model_name: str, run_id: str | None) -> None:
        from pipeline import tracking
        from pipeline.faults import retry_call

        self.params = params
        self.parent_id = retry_call(lambda: tracking.parent_run_id(params), "finding the MLflow parent run")
        name = f"{fold_tag(fold)}/{model_name}/{params.model.backbone}/k{params.train.shots}"
        tags = {"model": model_name, "backbone": params.model.backbone, "shots": params.train.shots,
                "fold": fold_tag(fold), "stage": "train", "variant": params.model.variant,
                "lerenet.step": "train", tracking.NOTE_TAG: run_description(params, fold, model_name)}
        if run_id is not None:  # resumed training: log into the run of the interrupted attempt if it still exists
            try:
                tracking.client(params).get_run(run_id)
            except Exception:
                run_id = None
        self._ctx = (tracking.resume_run(params, run_id) if run_id else
                     tracking.nested_run(params, self.parent_id, name, tags))
        self.run = retry_call(self._ctx.__enter__, f"opening MLflow run {name}")
        self.run_id = self.run.info.run_id
        self.rows: list[tuple[str, float, int]] = []

    def add(self, key: str, value: float, step: int) -> None:
        """Buffer one metric point (flushed every 3000 points and at validations)."""
        self.rows.append((key, float(value), int(step)))
        if len(self.rows) >= 3000:
            self.flush()

    def flush(self) -> None:
        """Log the buffered points in one batch (retried while the server is unreachable: the points stay
        buffered until it succeeds).

        Raises:
            The tracking error when it is permanent (a full disk included) or outlasts the retries.
        """
        from pipeline.faults import retry_call
        from pipeline.tracking import log_metrics_batch

        if not self.rows:
            return
        rows = list(self.rows)
        retry_call(lambda: log_metrics_batch(self.params, self.run_id, rows),
                   f"logging {len(rows)} metric points to MLflow run {self.run_id}")
        self.rows = self.rows[len(rows):]

    def info(self) -> dict[str, Any]:
        """``parent_run_id``, ``experiment_id``, ``tracking_uri`` for ``run.json``."""
        from pipeline.tracking import tracking_uri

        return {"parent_run_id": self.parent_id, "experiment_id": self.run.info.experiment_id,
                "tracking_uri": tracking_uri(self.params)}

    def finish(self, result: Any, curve_file: Path) -> None:
        """Log the final figures of ``result`` (a :class:`pipeline.train.TrainResult`) and the curve; close the run."""
        import mlflow

        from pipeline.faults import retry_call

        self.flush()
        retry_call(lambda: mlflow.log_metrics({"best_val_miou": result.best_val_miou, "train_seconds": result.seconds,
                                               "train_episodes_per_s": result.episodes_per_s}),
                   "logging the final training metrics")
        retry_call(lambda: mlflow.set_tags({"best_step": result.best_step, "resumed_from": result.resumed_from}),
                   "tagging the training run")
        retry_call(lambda: mlflow.log_artifact(str(curve_file), artifact_path="training"),
                   "logging the training curve")
        self.close(failed=False)

    def close(self, failed: bool) -> None:
        """Flush and end the run (FAILED if ``failed``); idempotent. After a failure the flush is tried once,
        without retries, and a tracking error is logged, not raised: it must not hide the training's own error."""
        if self._ctx is None:
            return
        if not failed:
            try:
                self.flush()
            finally:
                ctx, self._ctx = self._ctx, None
                ctx.__exit__(None, None, None)
            return
        from pipeline.tracking import log_metrics_batch

        ctx, self._ctx = self._ctx, None
        try:
            log_metrics_batch(self.params, self.run_id, self.rows)
            self.rows = []
        except Exception as exc:  # noqa: BLE001 -- keep the training's error; say what was not logged
            log.warning("%d metric points not logged to MLflow run %s: %s", len(self.rows), self.run_id, exc)
        try:
            ctx.__exit__(RuntimeError, RuntimeError("training failed"), None)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow run %s not marked FAILED: %s", self.run_id, exc)
