"""Prefect flow ``retrain_on_new_classes``: when a new defect class arrives, version it, probe, retrain, gate.

Steps (orchestration only; the work is done by ``pipeline/`` functions):

1. **Detect** (``pipeline.classes.new_classes``): class folders in ``data.source`` + ``data.incoming``
   that the current data version does not hold. Nothing new: log it and return (no training).
2. **New data version**: ingest the accepted classes plus the new ones (a folder of symlinks), validate,
   and -- in a DVC project -- ``dvc commit --force ingest validate`` so ``data/raw`` is re-versioned and
   the ``dvc.lock`` change is ready to commit with git.
3. **Probe the champion**: ``models:/<name>@champion`` is evaluated on each new class as a novel class
   (K in ``split.shots``, e.g. 1 and 5; ``pipeline.evaluate`` folder evaluation), logged to MLflow as
   run ``probe-<class>`` (tags: champion version, data version): how well the deployed model already
   handles the new defect, before any retraining.
4. **Fold table**: the new classes join folds by the rule of ``pipeline.classes.extend_folds`` (fold
   with the fewest test images), written back to the params file with comments kept (ruamel.yaml).
5. **Retrain**: the ``training_pipeline`` flow as a subflow (CV, production model, register as
   challenger, promotion gate).

Resuming: a class that was ingested but never placed in a fold is new again on the next run. If a run
failed after step 4 (fold table written), the class is no longer new: re-run ``training_pipeline``
(or ``dvc repro``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.common import TASK_OPTIONS
from flows.training_pipeline import dvc_commit, ingest_task, training_pipeline, validate_task
from pipeline.config import DEFAULT_PARAMS, Params, load_params

PROBE_MODEL_ALIAS = "champion"


def params_file(params_path: str | os.PathLike[str] | None) -> Path:
    """The params file :func:`pipeline.config.load_params` reads for ``params_path`` (arg, env, default)."""
    return Path(params_path or os.environ.get("LERENET_PARAMS") or DEFAULT_PARAMS).resolve()


@task(name="probe_champion", task_run_name="probe-{class_name}", **TASK_OPTIONS)
def probe_task(params: Params, class_name: str, version: str) -> dict[str, Any]:
    """Evaluate the champion on one new class (all ``split.shots``) and log a ``probe-<class>`` run.

    Returns ``{"k1": {"miou": ..., "fbiou": ..., "episodes": n}, ...}`` as the evaluation returns it.
    """
    import mlflow

    from pipeline import tracking
    from pipeline.evaluate import evaluate_folder

    uri = f"models:/{params.mlflow.registered_model}@{PROBE_MODEL_ALIAS}"
    results = evaluate_folder(params, params.data.dir, uri, shots=list(params.split.shots), classes=[class_name])
    parent = tracking.parent_run_id(params)
    with tracking.nested_run(params, parent, f"probe-{class_name}", reuse=False,
                             tags={"lerenet.step": "probe", "class_name": class_name, "model_uri": uri,
                                   "champion_version": version}):
        flat = {}
        for kk, m in results.items():
            for name, value in (m.items() if isinstance(m, dict) else []):
                if isinstance(value, (int, float)):
                    flat[f"probe_{kk}_{name}"] = float(value)
        mlflow.log_metrics(flat)
    return results


@flow(name="retrain_on_new_classes", log_prints=True)
def retrain_on_new_classes(params_path: str | None = None, overrides: dict[str, Any] | None = None,
                           fold_workers: int | None = None) -> dict[str, Any]:
    """Detect new classes; if any: new data version, champion probe, fold table, retrain, gate.

    Args:
        params_path: params YAML; its ``folds:`` is rewritten when classes are added.
        overrides: nested dict merged over the params for every step (not written back).
        fold_workers: passed to ``training_pipeline``.

    Returns:
        ``{"status": "nothing new"}`` or ``{"status": "retrained", "new_classes": [...],
        "data_version": {"before", "after"}, "probe": {class: metrics | None}, "folds": {...},
        "dvc_commit": str, "training": <training_pipeline result>}``.

    Raises:
        The original exception of a failing step (ingest, validation, probe, training, registry).
    """
    from pipeline import registry, tracking
    from pipeline.classes import accepted_classes, available_classes, extend_folds, new_classes, write_folds
    from pipeline.images import load_validated

    logger = get_run_logger()
    path = params_file(params_path)
    params = load_params(path, overrides)
    new = new_classes(params)
    if not new:
        logger.info("no new classes in %s or %s: the data version already holds every class; nothing to do",
                    params.data.source, params.data.incoming)
        return {"status": "nothing new", "new_classes": []}
    logger.info("new classes: %s", new)
    before = tracking.data_version(params)

    # 2. new data version: accepted classes + the new ones
    available = available_classes(params)
    view = {**{c: str(p) for c, p in accepted_classes(params).items()}, **{c: str(available[c]) for c in new}}
    ingest_task(params, view)
    validate_task(params)
    commit = dvc_commit(params.root, ["ingest", "validate"])
    after = tracking.data_version(params)
    logger.info("data version %s -> %s (dvc commit: %s)", before, after, commit)

    # 3. probe the deployed model on each new class, before retraining
    champion = registry.alias_version(params, registry.CHAMPION)
    probe: dict[str, Any] = {}
    for c in new:
        probe[c] = probe_task(params, c, champion) if champion else None
    if not champion:
        logger.info("no champion registered yet: nothing to probe")

    # 4. fold table
    usable = load_validated(params.data.dir, kind="defect")
    counts = usable.groupby("class_name").size().to_dict()
    to_place = [c for c in new if c not in params.all_classes]
    missing = [c for c in to_place if c not in counts]
    if missing:
        raise ValueError(f"new class(es) {missing} have no usable defect image after validation "
                         f"({params.data.dir / 'validation/report.json'}); fix the images or remove the folder")
    folds = extend_folds(params.folds, counts, to_place) if to_place else {f: list(c) for f, c in params.folds.items()}
    if to_place:
        write_folds(path, folds)

    # 5. retrain + gate
    result = training_pipeline(str(path), overrides, fold_workers)
    return {"status": "retrained", "new_classes": new, "data_version": {"before": before, "after": after},
            "probe": probe, "champion_probed": champion, "folds": folds, "dvc_commit": commit, "training": result}
