"""The one model resolver: checkpoint paths, ``models:/...``, ``runs:/...`` and MLflow model folders.

What ``spec`` may be (:func:`open_model`):

* ``models:/<name>@<alias>`` or ``models:/<name>/<version>``: a registered model version (registry of
  ``tracking_uri``); ``models:/m-<id>``: a logged model (what ``log_pyfunc`` returns);
* ``runs:/<run_id>/<path>``: a model logged in a run (``path`` defaults to ``model``, which also names
  the run's only logged model whatever its name, e.g. ``fold0-lerenet``);
* another artifact URI (``file:``, ``s3://``, ``mlflow-artifacts:``, ``http(s)://``) of a logged model;
* a local MLflow model folder (holding ``MLmodel``), a ``model.pt`` file, or a folder holding one.

For a logged model only its ``MLmodel`` file and the ``checkpoint`` artifact it names (written by
:func:`pipeline.serving.pyfunc.log_pyfunc`) are downloaded, with an explicit client and tracking URI
(no global MLflow state), then read by :func:`pipeline.inference.model_file.load_model`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.inference.model_file import load_model

DEFAULT_ALIAS = "champion"
#: prefixes of a URI that MLflow resolves (anything else is a local path)
URI_SCHEMES = ("models:/", "runs:/", "file:", "s3://", "mlflow-artifacts:", "http://", "https://")


class ModelNotFoundError(LookupError):
    """The model URI, registered name, alias, version, run or checkpoint does not exist; the message
    lists what does exist where that is cheap to find."""


@dataclass(frozen=True)
class ModelSource:
    """Where a network came from: what was asked for and, for the registry, which version it was.

    Attributes:
        uri: the spec as given (URI or path).
        registered_name / version / alias: registry provenance, ``None`` when not from the registry.
        run_id: MLflow run that logged the model (or the checkpoint's ``run_id``), may be ``None``.
    """

    uri: str
    registered_name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None


def default_model_uri(registered_name: str, alias: str = DEFAULT_ALIAS) -> str:
    """``models:/<registered_name>@<alias>`` (the registry's champion by default)."""
    return f"models:/{registered_name}@{alias}"


def _registry_version(client: Any, uri: str) -> tuple[str, str, str | None, Any]:
    """Resolve ``models:/name@alias`` or ``models:/name/version`` -> (name, version, alias, ModelVersion).

    Raises ModelNotFoundError listing registered models / aliases / versions.
    """
    from mlflow.exceptions import MlflowException

    body = uri[len("models:/"):].strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        version = None
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        alias = None
    else:
        raise ModelNotFoundError(f"{uri}: give an alias or a version, e.g. models:/{body}@{DEFAULT_ALIAS} "
                                 f"or models:/{body}/1")
    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=100))
        raise ModelNotFoundError(
            f"{uri}: no registered model named {name!r} in {client.tracking_uri}; registered models: "
            f"{names or 'none'} (register one with the promote flow, or pass a checkpoint path)") from None
    if alias is not None:
        aliases = dict(rm.aliases or {})
        if alias not in aliases:
            raise ModelNotFoundError(
                f"{uri}: registered model {name!r} has no alias {alias!r}; its aliases: "
                f"{ {a: str(v) for a, v in sorted(aliases.items())} or 'none'} (use models:/{name}/<version> "
                "or set the alias when promoting)")
        mv = client.get_model_version_by_alias(name, alias)
    else:
        try:
            mv = client.get_model_version(name, version)
        except MlflowException:
            versions = sorted((int(v.version) for v in client.search_model_versions(f"name='{name}'")))
            raise ModelNotFoundError(f"{uri}: registered model {name!r} has no version {version!r}; "
                                     f"versions: {versions or 'none'}") from None
    return name, str(mv.version), alias, mv


def _checkpoint_entry(mlmodel: Path) -> str:
    """Relative path of the ``checkpoint`` artifact named in a pyfunc ``MLmodel`` file (or its folder)."""
    from mlflow.models import Model

    try:
        flavor = Model.load(str(mlmodel)).flavors.get("python_function", {})
    except Exception as exc:  # noqa: BLE001 - any unreadable MLmodel is the same user error
        raise ModelNotFoundError(f"{mlmodel}: not an MLflow model ({exc})") from None
    art = (flavor.get("artifacts") or {}).get("checkpoint")
    if not art:
        raise ModelNotFoundError(f"{mlmodel}: the logged pyfunc has no 'checkpoint' artifact; log it with "
                                 "pipeline.serving.pyfunc.log_pyfunc")
    return str(art["path"] if isinstance(art, dict) else art)


def _model_location(client: Any, text: str) -> tuple[str, ModelSource]:
    """Artifact location of a model URI and its provenance.

    Resolved with the given client only (``mlflow.artifacts.download_artifacts`` on a ``models:/`` URI
    ignores an explicit registry URI in MLflow 3.17, and ``runs:/`` falls back to the global store).
    """
    from mlflow.exceptions import MlflowException

    if text.startswith("models:/m-") and "@" not in text and text.count("/") == 1:
        model_id = text[len("models:/"):]
        try:
            logged = client.get_logged_model(model_id)
        except MlflowException:
            raise ModelNotFoundError(f"{text}: no logged model {model_id!r} in {client.tracking_uri}") from None
        return logged.artifact_location, ModelSource(text, run_id=logged.source_run_id)
    if text.startswith("models:/"):
        name, version, alias, mv = _registry_version(client, text)
        return (client.get_model_version_download_uri(name, version),
                ModelSource(text, registered_name=name, version=version, alias=alias, run_id=mv.run_id))
    if not text.startswith("runs:/"):
        return text.rstrip("/"), ModelSource(text)
    run_id, _, path = text[len("runs:/"):].partition("/")
    path = path.strip("/") or "model"
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ModelNotFoundError(f"{text}: no run {run_id!r} in {client.tracking_uri}") from None
    in_run = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    logged = [m for m in in_run if m.name == path]
    if not logged and path == "model" and len(in_run) == 1:  # the default name: the run's one model,
        logged = in_run                                       # whatever its name (e.g. fold0-lerenet)
    location = logged[0].artifact_location if logged else f"{run.info.artifact_uri.rstrip('/')}/{path}"
    return location, ModelSource(text, run_id=run_id)


def _local_checkpoint(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / "MLmodel").is_file():
        ckpt = path / _checkpoint_entry(path)
        if not ckpt.is_file():
            raise ModelNotFoundError(f"{ckpt}: checkpoint artifact listed in MLmodel is missing")
        return ckpt
    if (path / "model.pt").is_file():
        return path / "model.pt"
    raise ModelNotFoundError(f"{path}: a folder without model.pt or MLmodel; pass a checkpoint written by "
                             "`lerenet train` or an MLflow model folder")


def _label(text: str, source: ModelSource) -> str:
    """``models:/x@champion (registered x v3)`` -- the URI and, from the registry, which version it is."""
    if source.registered_name and source.version:
        return f"{text} (registered {source.registered_name} v{source.version})"
    return text


def _client(text: str, tracking_uri: str | None) -> tuple[Any, str]:
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    if text.startswith(("models:/", "runs:/")) and uri.startswith("sqlite:///") \
            and not Path(uri[len("sqlite:///"):]).is_file():
        raise ModelNotFoundError(f"{text}: the MLflow database {uri[len('sqlite:///'):]} does not exist, so "
                                 "nothing is registered; train and register a model first (or set "
                                 "MLFLOW_TRACKING_URI, or pass a checkpoint path)")
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _missing(what: str, label: str, location: str, detail: str) -> ModelNotFoundError:
    detail = next((ln.strip() for ln in reversed(str(detail).splitlines()) if ln.strip()), "")[:300]
    return ModelNotFoundError(f"{label}: artifact {what} is missing from {location} ({detail}); the version's "
                              "files were deleted or moved: register the model again, or point the alias at a "
                              "version whose files exist")


def _fetch_mlmodel(text: str, location: str, source: ModelSource, uri: str, dst: Path) -> str:
    """Download ``MLmodel`` into ``dst``; the checkpoint entry it names. Raises ModelNotFoundError naming
    the version and the missing artifact."""
    import mlflow
    from mlflow.exceptions import MlflowException

    label = _label(text, source)
    try:
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/MLmodel", dst_path=str(dst),
                                                      tracking_uri=uri)
    except (MlflowException, OSError) as exc:
        raise _missing("MLmodel", label, location, getattr(exc, "message", str(exc))) from None
    return _checkpoint_entry(Path(mlmodel))


def check_artifacts(spec: str, tracking_uri: str | None = None) -> ModelSource:
    """Check that the logged model named by the URI ``spec`` still has its ``MLmodel`` and the checkpoint it
    names, without downloading the checkpoint.

    Returns:
        The model's :class:`ModelSource` (registry name and version where ``spec`` is a ``models:/`` URI).

    Raises:
        ModelNotFoundError: unknown model/alias/version/run, or an artifact is missing; the message names
            the URI, the registered version and the missing artifact.
    """
    import mlflow

    text = str(spec)
    client, uri = _client(text, tracking_uri)
    location, source = _model_location(client, text)
    tmp = Path(tempfile.mkdtemp(prefix="lerenet-check-"))
    try:
        entry = _fetch_mlmodel(text, location, source, uri, tmp)
        folder, _, name = entry.rpartition("/")
        try:
            listed = mlflow.artifacts.list_artifacts(artifact_uri=f"{location}/{folder}".rstrip("/"),
                                                     tracking_uri=uri)
        except Exception as exc:  # noqa: BLE001 -- any failure to list is "cannot be found" to the user
            raise _missing(entry, _label(text, source), location, str(exc)) from None
        if not any(Path(a.path).name == name and not a.is_dir for a in listed or []):
            raise _missing(entry, _label(text, source), location, "not listed by the artifact store")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return source


def _open_logged(text: str, tracking_uri: str | None, map_location: torch.device
                 ) -> tuple[torch.nn.Module, dict[str, Any], ModelSource]:
    import mlflow
    from mlflow.exceptions import MlflowException

    client, uri = _client(text, tracking_uri)
    location, source = _model_location(client, text)
    tmp = Path(tempfile.mkdtemp(prefix="lerenet-model-"))
    try:  # only MLmodel and the checkpoint are fetched, with explicit URIs (no global MLflow state)
        entry = _fetch_mlmodel(text, location, source, uri, tmp)
        try:
            ckpt = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{entry}",
                                                       dst_path=str(tmp / "ckpt"), tracking_uri=uri)
        except (MlflowException, OSError) as exc:
            raise _missing(entry, _label(text, source), location, getattr(exc, "message", str(exc))) from None
        net, meta = load_model(ckpt, map_location=map_location)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return net, meta, source


def open_model(spec: str | os.PathLike[str], tracking_uri: str | None = None,
               map_location: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any], ModelSource]:
    """Load the network named by ``spec`` (module docstring) in eval mode.

    Args:
        spec: model URI or local path (module docstring).
        tracking_uri: MLflow tracking/registry URI for URIs (e.g. ``pipeline.tracking.tracking_uri(params)``);
            ``None`` keeps MLflow's current one.
        map_location: torch device (or its name) for the network.

    Returns:
        ``(net, meta, source)``: the network on ``map_location``, its checkpoint metadata
        (``model``, ``backbone``, ``image_size``, ...; see :func:`load_model`) and its provenance.

    Raises:
        ModelNotFoundError: unknown registered model, alias, version or run, or a path that does not
            exist / is not a checkpoint; lists what exists where cheap.
        CheckpointError: the file is not a LERENet model file.
    """
    device = torch.device(map_location)
    text = str(spec)
    if text.startswith(URI_SCHEMES):
        return _open_logged(text, tracking_uri, device)
    path = Path(text).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"{text}: not a models:/ or runs:/ URI and no such file; expected models:/<name>@<alias>, "
            "models:/<name>/<version>, runs:/<run_id>/<path> or a model.pt checkpoint")
    net, meta = load_model(_local_checkpoint(path), map_location=device)
    return net, meta, ModelSource(text, run_id=meta.get("run_id"))
