"""MLflow tracking: one parent run per pipeline run, nested runs per (model, backbone, K, fold).

DVC runs every stage in its own process, so the parent run cannot be held open by one process.
Instead each stage finds it again (:func:`parent_run_id`):

1. ``$LERENET_PARENT_RUN_ID`` if set (the Prefect flow creates the parent and exports it);
2. else the most recent run of the experiment tagged ``lerenet.role = parent`` and
   ``lerenet.pipeline_key = <key>``, with ``key = sha256(git commit, params hash, data version)``
   (:func:`pipeline_key`): the same code, parameters and data give the same parent;
3. else a new parent run is created with that tag (and immediately marked FINISHED: it is a
   container; children carry the work).

Children are ordinary runs tagged ``mlflow.parentRunId`` (how the MLflow UI nests runs), found
again by name under their parent (:func:`nested_run` with ``reuse=True``) so that a resumed
training run, or the evaluation stage, logs into the same child run.

Tracking URI: ``params.mlflow.tracking_uri`` (default ``sqlite:///mlruns.db``; a relative SQLite
or file path is resolved against ``params.root``; ``$MLFLOW_TRACKING_URI`` overrides it in
:mod:`pipeline.config`). Artifacts of a new experiment go to ``<root>/mlartifacts`` with an embedded (SQLite/file) store;
a tracking server chooses its own artifact store.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import Params
from pipeline.layout import Layout

PARENT_ENV = "LERENET_PARENT_RUN_ID"
TAG_ROLE = "lerenet.role"
TAG_KEY = "lerenet.pipeline_key"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # the run's / experiment's markdown description in the MLflow UI
KIND_TAG = "mlflow.experimentKind"
#: Experiment tags: the kind (``custom_model_development`` = "Machine learning", vs ``genai_development``)
#: is what MLflow's API and UIs before the GenAI/Model-training switch read; the note is the
#: experiment's description. MLflow 3.17's UI ignores the kind tag: it chooses the experiment's view
#: from its sidebar switch (``workflowType``, default ``genai`` = the GenAI overview), per browser
#: (localStorage ``mlflow.workflowType``) or from the URL query, hence :func:`ui_route`.
EXPERIMENT_TAGS = {
    KIND_TAG: "custom_model_development",
    NOTE_TAG: ("Few-shot defect segmentation (LERENet and baselines). One parent run `pipeline-<key>` per "
               "pipeline run (code, params and data version) with the CV summary; nested runs "
               "`fold<f>/<model>/<backbone>/k<K>` train and are then evaluated on the fold's novel classes "
               "(tag `lerenet.step`); `register-<model>` registers the production model."),
}
#: The MLflow 3.17 UI's query that selects the "Model training" pages (see :func:`ui_route`).
UI_WORKFLOW_QUERY = "workflowType=machine_learning"
_MAX_PARAM_LEN = 6000


# ----------------------------------------------------------------------------- provenance
def git_commit(root: Path) -> str:
    """``git rev-parse HEAD`` in ``root``; ``"unknown"`` outside a git repository or before the first commit."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


MACHINE_LOCAL_PARAMS = {"data": ("source", "incoming", "dir"), "mlflow": ("tracking_uri",),
                        "train": ("device", "num_workers"), "retrain": ("timezone",)}
"""Settings that say where or how fast this machine runs the work, not what the result is: left out of
:func:`params_hash` (with ``root`` and the whole ``services`` section). ``retrain.timezone`` says when
the scheduled retrain fires; it came after ``retrain.cron`` and is left out so that the hashes recorded
before it existed stay valid."""


def params_hash(params: Params) -> str:
    """16-hex sha256 of the resolved parameters, excluding machine-local settings (root, data
    source/incoming/dir, the tracking URI, ``train.device``, ``train.num_workers``, ``retrain.timezone``,
    ``services``), where the work runs (``distributed``), the serving limits (``serve``) and the class
    store (``classes``): equal on every clone, machine and runner for equal settings."""
    d = params.model_dump(mode="json", exclude={"root", "services", "distributed", "serve", "classes"})
    for section, keys in MACHINE_LOCAL_PARAMS.items():
        for k in keys:
            d.get(section, {}).pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def data_version(params: Params) -> str:
    """The DVC hash of the ingested data.

    Looks for the output ``<data dir>/raw`` (or ``manifest.parquet``) in ``<root>/dvc.lock`` and
    returns its ``md5`` (e.g. ``"3f2a...dir"``); else ``<data dir>/raw.dvc``'s md5; else
    ``"manifest-sha256:<16 hex>"`` of ``manifest.parquet``'s bytes; else ``"unknown"``.
    """
    root = params.root
    layout = Layout.of(params)
    wanted = set()
    for p in (layout.raw, layout.manifest):
        try:
            wanted.add(p.resolve().relative_to(root.resolve()).as_posix())
        except ValueError:
            wanted.add(p.as_posix())
    lock = root / "dvc.lock"
    if lock.is_file():
        try:
            stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {}) or {}
        except yaml.YAMLError:
            stages = {}
        found = {}
        for stage in stages.values():
            for out in (stage or {}).get("outs", []) or []:
                if out.get("path") in wanted and out.get("md5"):
                    found[out["path"]] = out["md5"]
        for key in sorted(found, key=lambda p: not p.endswith("raw")):  # prefer data/raw
            return str(found[key])
    dvc_file = layout.raw.with_name(layout.raw.name + ".dvc")
    if dvc_file.is_file():
        try:
            outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs", [])
            if outs and outs[0].get("md5"):
                return str(outs[0]["md5"])
        except yaml.YAMLError:
            pass
    manifest = layout.manifest
    if manifest.is_file():
        return "manifest-sha256:" + hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    return "unknown"


def pipeline_key(params: Params) -> str:
    """Key of a pipeline run: 16-hex sha256 of (git commit, params hash, data version)."""
    raw = f"{git_commit(params.root)}|{params_hash(params)}|{data_version(params)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def flat_params(params: Params) -> dict[str, str]:
    """Resolved params flattened to ``{"train.lr": "0.005", ...}`` (lists as JSON; values cut at 6000 chars)."""
    out: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, Mapping):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
        else:
            s = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[prefix] = s[:_MAX_PARAM_LEN]

    walk("", params.model_dump(mode="json"))
    return out


# ----------------------------------------------------------------------------- MLflow setup
def tracking_uri(params: Params) -> str:
    """The tracking URI with a relative ``sqlite:///`` / ``file:`` / plain path made absolute against ``params.root``."""
    uri = params.mlflow.tracking_uri
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path.startswith("/"):
            return "sqlite:///" + str((params.root / path).resolve())
        return uri
    if uri.startswith("file:") and not uri.startswith("file:/"):
        return (params.root / uri[len("file:"):]).resolve().as_uri()
    if "://" not in uri and not uri.startswith("databricks"):
        return (params.root / uri).resolve().as_uri()
    return uri


ARTIFACTS_PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
"""MLflow's switch for its artifact download/upload progress bars (``mlflow.environment_variables``)."""


@contextlib.contextmanager
def no_artifact_progress_bar() -> Iterator[None]:
    """MLflow's artifact progress bars off for the block (``$MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false``;
    MLflow reads it at each download), the previous value restored afterwards."""
    before = os.environ.get(ARTIFACTS_PROGRESS_BAR_ENV)
    os.environ[ARTIFACTS_PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(ARTIFACTS_PROGRESS_BAR_ENV, None)
        else:
            os.environ[ARTIFACTS_PROGRESS_BAR_ENV] = before


def configure(params: Params) -> str:
    """Point MLflow at the tracking URI and experiment of ``params``; create the experiment if needed.

    Returns:
        The experiment id.
    """
    import mlflow

    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(params.mlflow.experiment)
    if exp is None:
        # embedded store (sqlite/file): artifacts beside the project; a tracking server decides itself
        # (e.g. `lerenet services up` proxies them to S3), so no location is imposed on it
        local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        artifacts = (params.root / "mlartifacts").resolve().as_uri() if local else None
        exp_id = client.create_experiment(params.mlflow.experiment, artifact_location=artifacts,
                                          tags=EXPERIMENT_TAGS)
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp_id)
        for k, v in EXPERIMENT_TAGS.items():  # an experiment created before the tags existed
            # the kind is enforced (this is a model-training experiment); a description a person edited stays
            if exp.tags.get(k) is None or (k == KIND_TAG and exp.tags[k] != v):
                client.set_experiment_tag(exp_id, k, v)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def ui_route(experiment_id: str, *path: str) -> str:
    """The MLflow UI route (the part after the server's address) of an experiment, or of a page under it
    (``ui_route(eid, "runs", run_id, "artifacts")``), that opens on the *Model training* view.

    MLflow 3.17's UI picks GenAI vs model-training pages from ``?workflowType=`` in the URL, else from the
    browser's last choice of its sidebar switch, else GenAI (the tag :data:`KIND_TAG` is not read); links
    inside the UI keep the query.
    """
    tail = "".join(f"/{p}" for p in path)
    return f"#/experiments/{experiment_id}{tail}?{UI_WORKFLOW_QUERY}"


def describe_run(params: Params, run_id: str, text: str, metrics: Mapping[str, float] | None = None) -> None:
    """Set the markdown description of run ``run_id`` (what the MLflow UI shows as *Description*) and log
    ``metrics`` (name -> value, step 0) into it."""
    import time

    from mlflow.entities import Metric

    c = client(params)
    c.set_tag(run_id, NOTE_TAG, text)
    if metrics:
        ts = int(time.time() * 1000)
        c.log_batch(run_id, metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])


def client(params: Params):
    """An ``MlflowClient`` on the configured tracking URI (calls :func:`configure`)."""
    import mlflow

    configure(params)
    return mlflow.MlflowClient(tracking_uri(params))


def parent_run_id(params: Params, key: str | None = None) -> str:
    """Find or create the parent run of this pipeline run (see module docstring).

    Args:
        key: pipeline key (default :func:`pipeline_key`).

    Raises:
        ValueError: ``$LERENET_PARENT_RUN_ID`` names a run that does not exist in this tracking store.
    """
    from mlflow.exceptions import MlflowException

    c = client(params)
    exp_id = configure(params)
    env_id = os.environ.get(PARENT_ENV)
    if env_id:
        try:
            c.get_run(env_id)
        except MlflowException as exc:
            raise ValueError(f"${PARENT_ENV}={env_id} is not a run in {tracking_uri(params)}: {exc}") from None
        return env_id
    key = key or pipeline_key(params)
    found = c.search_runs([exp_id], filter_string=f"tags.`{TAG_ROLE}` = 'parent' and tags.`{TAG_KEY}` = '{key}'",
                          max_results=1, order_by=["attributes.start_time DESC"])
    if found:
        return found[0].info.run_id
    run = c.create_run(exp_id, run_name=f"pipeline-{key[:8]}",
                       tags={TAG_ROLE: "parent", TAG_KEY: key, "git_commit": git_commit(params.root),
                             "data_version": data_version(params), "params_hash": params_hash(params),
                             "profile": params.profile})
    _log_params(c, run.info.run_id, params)
    c.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _log_params(c: Any, run_id: str, params: Params) -> None:
    from mlflow.entities import Param
    from mlflow.exceptions import MlflowException

    items = [Param(k, v) for k, v in sorted(flat_params(params).items())]
    for i in range(0, len(items), 100):
        try:
            c.log_batch(run_id, params=items[i:i + 100])
        except MlflowException:
            pass  # already logged with another value (a resumed run): keep the first


def find_child(params: Params, parent_id: str, name: str) -> str | None:
    """Run id of the most recent child of ``parent_id`` named ``name``, or ``None``."""
    c = client(params)
    exp_id = configure(params)
    safe = name.replace("'", "\\'")
    found = c.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and "
                          f"attributes.run_name = '{safe}'", max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


@contextlib.contextmanager
def nested_run(params: Params, parent_id: str, name: str, tags: Mapping[str, Any] | None = None,
               reuse: bool = True) -> Iterator[Any]:
    """Active MLflow child run of ``parent_id`` (fluent API: ``mlflow.log_metric`` etc. log into it).

    Args:
        name: run name, e.g. ``"fold0/lerenet/efficientnet_lite0/k1"``.
        tags: extra tags (model, backbone, shots, fold, ...); always added: ``git_commit``,
            ``data_version``, ``params_hash`` and the resolved params.
        reuse: re-open the latest child of that name under the parent instead of creating one.

    Yields:
        ``mlflow.ActiveRun``; on an exception the run ends FAILED, else FINISHED.
    """
    import mlflow

    configure(params)
    c = client(params)
    run_id = find_child(params, parent_id, name) if reuse else None
    all_tags = {PARENT_TAG: parent_id, "git_commit": git_commit(params.root), "data_version": data_version(params),
                "params_hash": params_hash(params), **{k: str(v) for k, v in (tags or {}).items()}}
    nested = mlflow.active_run() is not None
    if run_id is None:
        ctx = mlflow.start_run(run_name=name, tags=all_tags, nested=nested)
    else:
        ctx = mlflow.start_run(run_id=run_id, nested=nested)
    with ctx as run:
        if nested:  # start_run(nested=True) points mlflow.parentRunId at the active run: restore ours
            mlflow.set_tag(PARENT_TAG, parent_id)
        if run_id is not None:
            mlflow.set_tags({k: v for k, v in all_tags.items() if k != PARENT_TAG})
        _log_params(c, run.info.run_id, params)
        yield run


@contextlib.contextmanager
def resume_run(params: Params, run_id: str) -> Iterator[Any]:
    """Re-open an existing run (e.g. ``run.json``'s ``run_id``) as the active run to log more into it."""
    import mlflow

    configure(params)
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None) as run:
        yield run


def log_metrics_batch(params: Params, run_id: str, rows: list[tuple[str, float, int]]) -> None:
    """Log many ``(key, value, step)`` metric points in few calls (``log_batch``, 1000 per call)."""
    if not rows:
        return
    import time

    from mlflow.entities import Metric

    c = client(params)
    ts = int(time.time() * 1000)
    metrics = [Metric(k, float(v), ts, int(s)) for k, v, s in rows]
    for i in range(0, len(metrics), 1000):
        c.log_batch(run_id, metrics=metrics[i:i + 1000])


def finish_parent(params: Params, run_id: str, status: str = "FINISHED") -> None:
    """Mark a parent run terminated (``FINISHED`` / ``FAILED`` / ``KILLED``); for the flow at its end."""
    client(params).set_terminated(run_id, status)
