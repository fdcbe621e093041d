"""Use case probe-champion: how well the deployed model handles a new defect class, before retraining."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.layout import Layout


def probe_champion(params: Params, class_name: str, version: str, alias: str = "champion") -> dict[str, Any]:
    """Evaluate ``models:/<registered_model>@<alias>`` on one new class (all ``split.shots``) and log a
    ``probe-<class>`` run under the pipeline's parent run.

    Episodes: ``split.standard_episodes`` per K, seed ``split.paper_seed``, drawn from the class as
    ingested into the data version (``data/raw/<class>``): :func:`pipeline.evaluation.folder.evaluate_folder`.

    Returns:
        ``{"k1": {"miou", "fbiou", "episodes"}, ...}`` (mIoU/FB-IoU in [0, 1]).
    """
    import mlflow

    from pipeline import tracking
    from pipeline.classes import source_view
    from pipeline.evaluation.folder import evaluate_folder

    tracking.configure(params)
    uri = f"models:/{params.mlflow.registered_model}@{alias}"
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lerenet-probe-") as tmp:
        # the class as ingested into the new data version, alone in a Surface Defects-4i folder
        folder = source_view(params, {class_name: Layout.of(params).raw / class_name}, view=Path(tmp) / "view")
        for k in params.split.shots:
            results[f"k{k}"] = evaluate_folder(folder, uri, k, episodes=params.split.standard_episodes,
                                               seed=params.split.paper_seed, threshold=params.data.mask_threshold,
                                               device=params.train.device, tracking_uri=tracking.tracking_uri(params))
    parent = tracking.parent_run_id(params)
    with tracking.nested_run(params, parent, f"probe-{class_name}", reuse=False,
                             tags={"lerenet.step": "probe", "class_name": class_name, "model_uri": uri,
                                   "champion_version": version}):
        mlflow.log_metrics({f"probe_{kk}_{m}": float(r[m]) for kk, r in results.items() for m in ("miou", "fbiou")})
    return {kk: {"miou": r["miou"], "fbiou": r["fbiou"], "episodes": r["episodes"]} for kk, r in results.items()}
