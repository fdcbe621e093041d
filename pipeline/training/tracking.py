"""MLflow logging of one training run (nested run per fold/model/backbone/K, batched metric points).

Tags ``model, backbone, shots, fold, stage=train, variant`` (plus the provenance tags that
:func:`pipeline.tracking.nested_run` adds); metrics ``loss``, ``lr`` (per step), ``val_miou`` (per
validation), ``best_val_miou``, ``train_seconds``, ``train_episodes_per_s``; artifact
``training/<tag>_<model>.csv``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.layout import fold_tag


class Tracker:
    """Buffers metric points of one training run and logs them in batches to its nested MLflow run.

    Run name ``<tag>/<model>/<backbone>/k<train.shots>`` under the pipeline's parent run; a resumed run
    logs into the run of the interrupted attempt if it still exists.
    """

    def __init__(self, params: Params, fold: int | None, model_name: str, run_id: str | None) -> None:
        from pipeline import tracking

        self.params = params
        self.parent_id = tracking.parent_run_id(params)
        name = f"{fold_tag(fold)}/{model_name}/{params.model.backbone}/k{params.train.shots}"
        tags = {"model": model_name, "backbone": params.model.backbone, "shots": params.train.shots,
                "fold": fold_tag(fold), "stage": "train", "variant": params.model.variant}
        if run_id is not None:  # resumed training: log into the run of the interrupted attempt if it still exists
            try:
                tracking.client(params).get_run(run_id)
            except Exception:
                run_id = None
        self._ctx = (tracking.resume_run(params, run_id) if run_id else
                     tracking.nested_run(params, self.parent_id, name, tags))
        self.run = self._ctx.__enter__()
        self.run_id = self.run.info.run_id
        self.rows: list[tuple[str, float, int]] = []

    def add(self, key: str, value: float, step: int) -> None:
        """Buffer one metric point (flushed every 3000 points and at validations)."""
        self.rows.append((key, float(value), int(step)))
        if len(self.rows) >= 3000:
            self.flush()

    def flush(self) -> None:
        """Log the buffered points in one batch."""
        from pipeline.tracking import log_metrics_batch

        log_metrics_batch(self.params, self.run_id, self.rows)
        self.rows = []

    def info(self) -> dict[str, Any]:
        """``parent_run_id``, ``experiment_id``, ``tracking_uri`` for ``run.json``."""
        from pipeline.tracking import tracking_uri

        return {"parent_run_id": self.parent_id, "experiment_id": self.run.info.experiment_id,
                "tracking_uri": tracking_uri(self.params)}

    def finish(self, result: Any, curve_file: Path) -> None:
        """Log the final figures of ``result`` (a :class:`pipeline.train.TrainResult`) and the curve; close the run."""
        import mlflow

        self.flush()
        mlflow.log_metrics({"best_val_miou": result.best_val_miou, "train_seconds": result.seconds,
                            "train_episodes_per_s": result.episodes_per_s})
        mlflow.set_tags({"best_step": result.best_step, "resumed_from": result.resumed_from})
        mlflow.log_artifact(str(curve_file), artifact_path="training")
        self.close(failed=False)

    def close(self, failed: bool) -> None:
        """Flush and end the run (FAILED if ``failed``); idempotent."""
        if self._ctx is None:
            return
        try:
            self.flush()
        finally:
            ctx, self._ctx = self._ctx, None
            if failed:
                ctx.__exit__(RuntimeError, RuntimeError("training failed"), None)
            else:
                ctx.__exit__(None, None, None)
