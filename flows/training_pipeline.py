"""Prefect flow ``training_pipeline``: the DVC pipeline's stages as Prefect tasks, then register + promote.

The flow orchestrates only: every task calls the same function from ``pipeline/`` that the DVC
stage of the same name runs through the ``lerenet`` CLI (:data:`STAGES` / :data:`STAGE_COMMANDS`;
``tests/test_flows.py`` fails if this list and ``dvc.yaml`` differ)::

    ingest -> validate -> split -> features -> train (fold x model) -> evaluate (fold) -> report
           -> train_production -> register (new version, alias challenger) -> promote (gate)

The (fold, model) trainings and the per-fold evaluations run on the grid's task runner chosen by
``params.distributed`` (:mod:`flows.runner`: sequential, threads, or a ``prefect-dask``
``DaskTaskRunner`` on a local or remote Dask cluster), in groups of ``fold_workers`` folds (threads:
one per two CPU cores, at least 1; Dask: all folds at once); the same params give the same weights
and metrics on every runner. Transient failures are retried with backoff
(:mod:`flows.common`); any other failure fails the task and the flow with the original exception,
and since register/promote come last, nothing is registered or promoted then.

MLflow: the flow creates the parent run (``pipeline.tracking``) and exports its id as
``$LERENET_PARENT_RUN_ID`` so every step's nested run hangs under it; the parent ends FINISHED or
FAILED with the flow.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import TASK_OPTIONS
from flows.exclusive import exclusive
from flows.runner import environment, grid_runner, task_env
from pipeline.config import PRODUCTION_MODEL, Params, load_params

STAGES: tuple[str, ...] = ("ingest", "validate", "split", "features", "train", "evaluate", "report",
                           "train_production", "register")
"""DVC stage names in pipeline order; the flow runs one task (group) per stage, plus ``promote``
inside the ``register`` stage (the DVC ``register`` stage runs ``lerenet register``, which promotes too)."""

STAGE_COMMANDS: dict[str, str] = {
    "ingest": "lerenet ingest", "validate": "lerenet validate", "split": "lerenet split",
    "features": "lerenet features", "train": "lerenet train", "evaluate": "lerenet evaluate",
    "report": "lerenet report", "train_production": "lerenet train", "register": "lerenet register",
}
"""The CLI command each DVC stage runs (its ``cmd`` starts with it)."""


def default_fold_workers() -> int:
    """Folds trained at once: ``cpu_count // 2`` (>= 1). On 2 cores: 1 (PyTorch uses both cores per fold)."""
    return max(1, (os.cpu_count() or 1) // 2)


def trained_models(params: Params) -> list[str]:
    """Models the ``train`` stage trains per fold: all of ``model.names`` (the prototype model is
    "trained" too: its step writes the checkpoint the evaluation loads)."""
    return list(params.model.names)


# ---------------------------------------------------------------------------
# tasks: thin wrappers around the pipeline step functions
# ---------------------------------------------------------------------------
@task(name="ingest", **TASK_OPTIONS)
def ingest_task(params: Params, classes: dict[str, str] | None = None) -> dict[str, Any]:
    """``pipeline.ingest.ingest`` on a source view (``pipeline.classes.source_view``).

    ``classes`` (``{class: folder}``) defaults to the accepted classes (base source + incoming
    classes named in the fold table), the view ``dvc repro`` ingests too.
    """
    from pipeline.classes import source_view
    from pipeline.ingest import ingest

    view = source_view(params, {c: Path(p) for c, p in classes.items()} if classes else None)
    manifest = ingest(params, source=view, progress=False)
    return {"images": int(len(manifest)), "classes": sorted(manifest["class_name"].unique().tolist())}


@task(name="validate", **TASK_OPTIONS)
def validate_task(params: Params) -> dict[str, Any]:
    """``pipeline.validate.validate`` (raises ``DataValidationError`` on bad data: not retried)."""
    from pipeline.validate import validate

    report = validate(params)
    return {"rows": report.get("rows"), "usable_rows": report.get("usable_rows")}


@task(name="split", **TASK_OPTIONS)
def split_task(params: Params) -> dict[str, Any]:
    """``pipeline.split.split``: per-fold splits and saved test episodes."""
    from pipeline.split import split

    return split(params)


@task(name="features", **TASK_OPTIONS)
def features_task(params: Params) -> str | None:
    """``pipeline.features.build_feature_store`` (skipped for a fine-tuned backbone: nothing to cache)."""
    from pipeline.features import build_feature_store

    if not params.model.freeze_backbone:
        return None
    return str(build_feature_store(params, progress=False))


@task(name="train", task_run_name="train-fold{fold}-{model_name}", **TASK_OPTIONS)
def train_task(params: Params, fold: int | None, model_name: str, env: dict[str, str] | None = None) -> str:
    """``pipeline.train.train`` for one fold (``None``: production model on all classes); returns the checkpoint.

    ``env``: variables of the flow process to set first (a Dask worker does not inherit them; :mod:`flows.runner`).
    """
    from pipeline.train import train

    with environment(env):
        return str(_checkpoint_of(train(params, fold, model_name, progress=False)))


@task(name="evaluate", task_run_name="evaluate-fold{fold}", **TASK_OPTIONS)
def evaluate_task(params: Params, fold: int, env: dict[str, str] | None = None) -> dict[str, Any]:
    """``pipeline.evaluate.evaluate`` for one fold (writes ``metrics/fold<f>.json``); returns its content."""
    from pipeline.evaluate import evaluate

    with environment(env):
        return evaluate(params, fold).to_json()


@task(name="report", **TASK_OPTIONS)
def report_task(params: Params) -> str:
    """``pipeline.report.write_report``: aggregate the folds into the results table; returns its path."""
    from pipeline.report import write_report

    return str(write_report(params))


@task(name="train_production", **TASK_OPTIONS)
def train_production_task(params: Params, model_name: str = PRODUCTION_MODEL) -> str:
    """The deployable model: same recipe, all classes (``fold=None``); returns the checkpoint path."""
    from pipeline.train import train

    return str(_checkpoint_of(train(params, None, model_name, progress=False)))


@task(name="register", **TASK_OPTIONS)
def register_task(params: Params, checkpoint: str, model_name: str = PRODUCTION_MODEL,
                  extra_tags: dict[str, str] | None = None) -> str:
    """``pipeline.usecases.register.register_production`` (CV cells of ``model_name``); returns the new version."""
    from pipeline.usecases.register import register_production

    return register_production(params, model_name, Path(checkpoint), extra_tags)


@task(name="promote", **TASK_OPTIONS)
def promote_task(params: Params, version: str) -> dict[str, Any]:
    """``pipeline.usecases.register.gate``: promotion gate, decision record ``reports/registry.json``, model card."""
    from pipeline.usecases.register import gate

    outcome = gate(params, version)
    return {**outcome.decision.as_dict(), "model_card": outcome.card_uris}


def _checkpoint_of(result: Any) -> Path:
    """The ``model.pt`` path of a ``TrainResult`` (attribute ``checkpoint`` / ``model_path`` / ``path``)."""
    for attr in ("checkpoint", "model_path", "path"):
        value = getattr(result, attr, None)
        if value:
            return Path(value)
    if isinstance(result, (str, os.PathLike)):
        return Path(result)
    raise TypeError(f"cannot find the checkpoint path in train() result {result!r}")


def dvc_commit(root: Path, stages: list[str] | None = None) -> str:
    """``dvc commit --force [stages]`` in ``root`` so ``dvc.lock`` records what the flow produced.

    Returns ``"committed"``, ``"skipped (not a DVC project)"`` or ``"failed: <stderr tail>"``
    (never raises: the flow's results stand either way; the message says what to run by hand).
    """
    if not (root / ".dvc").is_dir() or not (root / "dvc.yaml").is_file():
        return "skipped (not a DVC project)"
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    cmd = ["dvc", "commit", "--force", *(stages or [])]
    dvc = Path(sys.executable).parent / "dvc"
    if dvc.is_file():
        cmd[0] = str(dvc)
    try:
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"failed: {exc}"
    if out.returncode != 0:
        return f"failed: {(out.stderr or out.stdout).strip()[-500:]} (run `{' '.join(cmd)}` in {root})"
    return "committed"


# ---------------------------------------------------------------------------
# the flow
# ---------------------------------------------------------------------------
def run_folds(params: Params, fold_workers: int | None = None) -> dict[int, dict[str, Any]]:
    """Train every (fold, model) and evaluate each fold on the grid's task runner
    (``params.distributed``: sequential, threads or Dask; :mod:`flows.runner`), ``fold_workers`` folds
    at a time (default: :func:`default_fold_workers` for threads, every fold at once on Dask, whose
    workers bound the concurrency).

    Must run inside a flow (the task runs belong to its flow run). Raises the first failing
    task's exception (after the other folds of its group finished).
    """
    folds = sorted(params.folds)
    models = trained_models(params)
    if fold_workers is None:
        fold_workers = len(folds) if params.distributed.runner == "dask" else default_fold_workers()
    env = task_env()
    results: dict[int, dict[str, Any]] = {}
    with grid_runner(params.distributed) as runner:
        for i in range(0, len(folds), fold_workers):
            group = folds[i:i + fold_workers]
            trains = {f: [runner.submit(train_task, {"params": params, "fold": f, "model_name": m, "env": env})
                          for m in models] for f in group}
            evals = {f: runner.submit(evaluate_task, {"params": params, "fold": f, "env": env}, wait_for=trains[f])
                     for f in group}
            for f in group:
                results[f] = evals[f].result()
    return results


@flow(name="training_pipeline", task_runner=ThreadPoolTaskRunner(max_workers=8), log_prints=True)
@exclusive("training_pipeline")  # one training/promoting run per project (flows/exclusive.py)
def training_pipeline(params_path: str | None = None, overrides: dict[str, Any] | None = None,
                      fold_workers: int | None = None, promote: bool = True,
                      commit_dvc: bool = True) -> dict[str, Any]:
    """Run the whole pipeline once and gate the new model into the registry.

    Args:
        params_path: params YAML (default project ``params.yaml`` / ``$LERENET_PARAMS``).
        overrides: nested dict merged over the params (e.g. ``{"train": {"episodes": 10}}``).
        fold_workers: folds processed at once (default: see :func:`run_folds`); where the grid
            runs is ``params.distributed`` (``overrides={"distributed": {"runner": "dask"}}``).
        promote: run the promotion gate after registering (the DVC ``register`` stage always does).
        commit_dvc: record the outputs in ``dvc.lock`` at the end (``dvc commit --force``) when the
            project is a DVC repository, so ``dvc repro`` afterwards is a no-op.

    Returns:
        ``{"version": str, "decision": {...PromotionDecision...}, "cv": {"<protocol>.k<K>": mIoU},
        "seconds": {step: wall s}, "dvc_commit": str}``.

    Raises:
        pipeline.lock.ProjectLocked: another run that trains or promotes holds the project
            (``distributed.lock_timeout``).
        The original exception of the first failing step (after its transient retries).
    """
    from pipeline import tracking
    from pipeline.usecases.register import cv_summary

    logger = get_run_logger()
    params = load_params(params_path, overrides)
    seconds: dict[str, float] = {}

    def timed(name: str, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        seconds[name] = round(time.perf_counter() - t0, 2)
        return out

    # every step reads the data version/params from disk; the parent run is keyed once the data exists
    timed("ingest", ingest_task, params)
    timed("validate", validate_task, params)
    old_parent = os.environ.get(tracking.PARENT_ENV)
    parent = tracking.parent_run_id(params) if not old_parent else old_parent
    os.environ[tracking.PARENT_ENV] = parent
    status = "FAILED"
    try:
        timed("split", split_task, params)
        timed("features", features_task, params)
        timed("train+evaluate", run_folds, params, fold_workers)
        timed("report", report_task, params)
        ckpt = timed("train_production", train_production_task, params)
        version = timed("register", register_task, params, ckpt)
        decision = timed("promote", promote_task, params, version) if promote else None
        status = "FINISHED"
    finally:
        if not old_parent:
            os.environ.pop(tracking.PARENT_ENV, None)
            try:
                tracking.finish_parent(params, parent, status)
            except Exception as exc:  # noqa: BLE001 -- never mask the step's own error
                logging.getLogger(__name__).warning("could not close parent run %s: %s", parent, exc)
    cv = cv_summary(params, PRODUCTION_MODEL)
    commit = dvc_commit(params.root) if commit_dvc else "not requested"
    logger.info("registered v%s; decision: %s; CV mIoU %s; dvc commit: %s", version,
                decision and decision["reason"], cv, commit)
    return {"version": version, "decision": decision, "cv": cv, "seconds": seconds, "dvc_commit": commit}
