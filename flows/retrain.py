"""Prefect flow ``retrain_on_new_classes``: when a new defect class arrives, version it, probe, retrain, gate.

Steps (orchestration only; the work is done by ``pipeline/`` functions):

1. **Detect** (``pipeline.classes.new_classes``): class folders in ``data.source`` + ``data.incoming``
   that the current data version does not hold. Nothing new: log it and return (no training).
2. **Fold table** (in memory): the new classes join folds by the rule of
   ``pipeline.classes.extend_folds`` (fold with the fewest test images; new classes counted by their
   image files), because validation requires every class to be in the table.
3. **New data version**: ingest the accepted classes plus the new ones (a folder of symlinks), validate
   against the extended table. Bad data fails here and leaves the params file untouched.
4. **Probe the champion**: ``models:/<name>@champion`` is evaluated on each new class as a novel class
   (K in ``split.shots``, e.g. 1 and 5; ``pipeline.usecases.probe.probe_champion``), logged to MLflow as
   run ``probe-<class>``: how well the deployed model already handles the new defect, before any
   retraining. The champion's model files are checked before step 2
   (``pipeline.registry.require_artifacts``): a champion whose files are gone fails the flow naming the
   version and the missing artifact, before anything is written. Then the table is written back to the
   params file (comments kept, ruamel.yaml) and -- in a DVC project -- ``dvc commit --force ingest
   validate``, so ``data/raw`` is re-versioned and the ``params.yaml``/``dvc.lock`` changes are ready to
   commit with git. A failing probe leaves the params file untouched, so the classes are new again on
   the next run.
5. **Retrain**: the ``training_pipeline`` flow as a subflow (CV, production model, register as
   challenger, promotion gate).

Resuming: a class held by the data version but not in the fold table, or the reverse, is new again on
the next run. If a run failed after step 3 (table written, data ingested), the class is no longer new:
re-run ``training_pipeline`` (or ``dvc repro``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task

from flows.common import TASK_OPTIONS
from flows.exclusive import exclusive
from flows.training_pipeline import dvc_commit, ingest_task, training_pipeline, validate_task
from pipeline.config import DEFAULT_PARAMS, Params, load_params

PROBE_MODEL_ALIAS = "champion"


def _merge(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    from pipeline.config import _deep_merge

    return _deep_merge(a or {}, b)


def params_file(params_path: str | os.PathLike[str] | None) -> Path:
    """The params file :func:`pipeline.config.load_params` reads for ``params_path`` (arg, env, default)."""
    return Path(params_path or os.environ.get("LERENET_PARAMS") or DEFAULT_PARAMS).resolve()


@task(name="probe_champion", task_run_name="probe-{class_name}", **TASK_OPTIONS)
def probe_task(params: Params, class_name: str, version: str) -> dict[str, Any]:
    """``pipeline.usecases.probe.probe_champion``: the champion on one new class (all ``split.shots``), logged as
    run ``probe-<class>``; returns ``{"k1": {"miou", "fbiou", "episodes"}, ...}``."""
    from pipeline.usecases.probe import probe_champion

    return probe_champion(params, class_name, version, PROBE_MODEL_ALIAS)


@flow(name="retrain_on_new_classes", log_prints=True)
@exclusive("retrain_on_new_classes")  # holds the project lock over its training_pipeline subflow too
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
    from pipeline.classes import new_classes, place_new_classes, write_folds

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

    # the champion to probe, and its model files, checked before anything is written: a champion whose
    # files are gone fails here, naming version and artifact, and the classes stay new for the next run
    champion = registry.alias_version(params, registry.CHAMPION)
    if champion:
        registry.require_artifacts(params, champion, "probed")

    # 2. fold table with the new classes placed, and the source view to ingest -- in memory
    folds, to_place, view = place_new_classes(params, new)
    staged = load_params(path, _merge(overrides, {"folds": folds}))

    # 3. new data version: accepted classes + the new ones, validated against the extended table
    ingest_task(staged, view)
    validate_task(staged)

    # 4. probe the deployed model on each new class, before retraining -- and before the table is written
    #    back, so a failing probe leaves the params file as it was (the classes are new again next run)
    probe: dict[str, Any] = {}
    for c in new:
        probe[c] = probe_task(staged, c, champion) if champion else None
    if not champion:
        logger.info("no champion registered yet: nothing to probe")

    # only now is the table written back to the params file and the data version committed
    if to_place:
        write_folds(path, folds)
    params = load_params(path, overrides)
    commit = dvc_commit(params.root, ["ingest", "validate"])
    after = tracking.data_version(params)
    logger.info("data version %s -> %s (dvc commit: %s); folds %s", before, after, commit, folds)

    # 5. retrain + gate
    result = training_pipeline(str(path), overrides, fold_workers)
    return {"status": "retrained", "new_classes": new, "data_version": {"before": before, "after": after},
            "probe": probe, "champion_probed": champion, "folds": folds, "dvc_commit": commit, "training": result}
