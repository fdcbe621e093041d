"""Registry and orchestration commands.

* ``lerenet register [--promote]`` -- register the production model (alias ``challenger``) and gate it
  (DVC stage ``register``; writes the decision record ``registry.json``);
* ``lerenet promote VERSION [--force]`` -- run the promotion gate on a registered version (idempotent:
  a decided version keeps its decision) and publish the champion's model card if not yet published;
* ``lerenet flow training`` / ``lerenet flow retrain`` -- run a Prefect flow in this process;
* ``lerenet serve [--stop]`` -- Prefect server on 127.0.0.1 (``pipeline.services``) + the served
  deployments (scheduled retrain, on-demand training) as service process ``prefect-serve``
  (``flows.deploy.start_serving``).

The sequences themselves live in :mod:`pipeline.usecases` and :mod:`flows.deploy`; these commands
parse and print.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import typer

from lerenet.app import app
from lerenet.commands._common import ParamsOption, fail, params_or_exit
from lerenet.help import PANEL_REGISTRY, PANEL_SERVICES, App
from pipeline.config import PRODUCTION_MODEL

flow_app = App(help="Run a Prefect flow in this process (a temporary Prefect server is started if "
                    "PREFECT_API_URL is unset).\n\nExample:\n  lerenet flow retrain --set train.episodes=10",
               no_args_is_help=True)
app.add_typer(flow_app, name="flow", rich_help_panel=PANEL_SERVICES)


@app.command("register", rich_help_panel=PANEL_REGISTRY)
def register_cmd(
    model: str = typer.Option(PRODUCTION_MODEL, "--model", help="architecture of the production model"),
    checkpoint: Path = typer.Option(None, "--checkpoint", help="model.pt (default models/all/<model>/model.pt)"),
    promote: bool = typer.Option(True, "--promote/--no-promote", help="run the promotion gate after registering"),
    record: Path = typer.Option(None, "--record", help="decision record JSON (default <project>/reports/registry.json)"),
    params_file: Path = ParamsOption,
) -> None:
    """Register the production model with its CV metrics as a new version (alias challenger), then gate it.

    Example:
      lerenet register --no-promote
    """
    from pipeline import registry
    from pipeline.lock import ProjectLocked, params_lock
    from pipeline.usecases.register import ModelCardError, register_and_gate

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    params = params_or_exit(params_file)
    try:
        with params_lock(params, "lerenet register"):
            version, outcome = register_and_gate(params, model, checkpoint, promote=promote, record=record)
    except ProjectLocked as exc:
        fail(str(exc), code=75)
        return
    except (registry.RegistryError, FileNotFoundError, ModelCardError) as exc:
        fail(str(exc))
        return
    if outcome is None:
        typer.echo(f"registered {params.mlflow.registered_model} v{version} as challenger")
        return
    for uri in outcome.card_uris:
        typer.echo(f"model card: {uri}")
    d = outcome.decision
    typer.echo(f"{d.model} v{version}: {'promoted to champion' if d.promoted else 'stays challenger'}"
               f" -- {d.reason} (record: {outcome.record})")


@app.command("promote", rich_help_panel=PANEL_REGISTRY)
def promote_cmd(
    version: str = typer.Argument(..., help="registered model version to gate"),
    force: bool = typer.Option(False, "--force", help="promote whatever the scores (recorded as forced)"),
    params_file: Path = ParamsOption,
) -> None:
    """Gate a registered version: it becomes champion if its CV mIoU >= champion's + margin on identical episodes.
    A decided version keeps its recorded decision; a champion whose model card is not published yet gets it.

    Example:
      lerenet promote 3
    """
    from pipeline import registry
    from pipeline.lock import ProjectLocked, params_lock
    from pipeline.usecases.register import ModelCardError, publish_card

    params = params_or_exit(params_file)
    try:
        with params_lock(params, f"lerenet promote {version}"):
            d = registry.promote(params, version, force=force)
            _, card = publish_card(params, d.version, d.promoted)
    except ProjectLocked as exc:
        fail(str(exc), code=75)
        return
    except (registry.RegistryError, ModelCardError) as exc:
        fail(str(exc))
        return
    typer.echo(json.dumps({**d.as_dict(), "model_card": card}, indent=2))


def _overrides(values: list[str]) -> dict:
    """``["train.episodes=10", ...]`` -> nested dict (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for item in values:
        if "=" not in item:
            fail(f"--set expects key.path=value, got {item!r}", code=2)
        key, raw = item.split("=", 1)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return out


SetOption = typer.Option(None, "--set", help="override a parameter for this run, e.g. --set train.episodes=10")
RunnerOption = typer.Option(None, "--runner", help="where the fold x model grid runs: sequential | threads | dask "
                            "(default params.distributed.runner)")
WorkersOption = typer.Option(None, "--workers", help="threads, or Dask worker processes of a local cluster")
AddressOption = typer.Option(None, "--address", help="Dask scheduler to use, e.g. tcp://10.0.0.5:8786 "
                             "(default params.distributed.address / $LERENET_DASK_ADDRESS; implies --runner dask)")


def _grid_overrides(set_: list[str] | None, runner: str | None, workers: int | None, address: str | None) -> dict | None:
    """``--set`` items plus ``--runner/--workers/--address`` as ``distributed.*`` overrides (``None`` if empty)."""
    out = _overrides(set_ or [])
    grid = {k: v for k, v in {"runner": runner or ("dask" if address else None), "workers": workers,
                               "address": address}.items() if v is not None}
    if grid:
        out.setdefault("distributed", {}).update(grid)
    return out or None


@flow_app.command("training")
def flow_training_cmd(
    fold_workers: int = typer.Option(None, "--fold-workers", help="folds trained at once (default cpu_count // 2)"),
    no_promote: bool = typer.Option(False, "--no-promote", help="register but skip the promotion gate"),
    set_: list[str] = SetOption,
    runner: str = RunnerOption,
    workers: int = WorkersOption,
    address: str = AddressOption,
    params_file: Path = ParamsOption,
) -> None:
    """Run the training_pipeline flow (ingest ... register, promote) and print its result.

    Example:
      lerenet flow training --runner dask --workers 2 --set train.episodes=100
    """
    from flows.training_pipeline import training_pipeline
    from pipeline.lock import ProjectLocked

    overrides = _grid_overrides(set_, runner, workers, address)
    params_or_exit(params_file, overrides)  # validate early, with a clean message
    try:
        result = training_pipeline(str(params_file) if params_file else None, overrides, fold_workers, not no_promote)
    except ProjectLocked as exc:
        fail(str(exc), code=75)
    typer.echo(json.dumps(result, indent=2, default=str))


@flow_app.command("retrain")
def flow_retrain_cmd(
    fold_workers: int = typer.Option(None, "--fold-workers", help="folds trained at once"),
    set_: list[str] = SetOption,
    runner: str = RunnerOption,
    workers: int = WorkersOption,
    address: str = AddressOption,
    params_file: Path = ParamsOption,
) -> None:
    """Run retrain_on_new_classes: new classes -> new data version, champion probe, fold table, retrain, gate.

    Example:
      LERENET_INCOMING=my_incoming/ lerenet flow retrain
    """
    from flows.retrain import retrain_on_new_classes
    from pipeline.lock import ProjectLocked

    overrides = _grid_overrides(set_, runner, workers, address)
    params_or_exit(params_file, overrides)
    try:
        result = retrain_on_new_classes(str(params_file) if params_file else None, overrides, fold_workers)
    except ProjectLocked as exc:
        fail(str(exc), code=75)
    typer.echo(json.dumps(result, indent=2, default=str))


@app.command("serve", rich_help_panel=PANEL_SERVICES)
def serve_cmd(
    stop: bool = typer.Option(False, "--stop", help="stop the served deployments, then the Prefect server"),
    timeout: float = typer.Option(120, help="seconds to wait for the deployments to register"),
    params_file: Path = ParamsOption,
) -> None:
    """Start the Prefect server (127.0.0.1) and serve the deployments; `--stop` stops both (served process first).

    Examples:
      lerenet serve
      lerenet serve --stop
    """
    from flows.deploy import SERVE_NAME, start_serving, stop_serving
    from pipeline import services as svc

    params = params_or_exit(params_file)
    if stop:
        for name, result in stop_serving(params):
            typer.echo(f"{name}: {result}")
        return
    try:
        started = start_serving(params, params_file, timeout=timeout)
    except svc.ServiceError as exc:
        fail(str(exc))
        return
    for st in started.servers:
        typer.echo(f"{st.name}: {st.note} at {st.url}")
    st, api = started.served, started.api_url
    typer.echo(f"{SERVE_NAME}: {st.note} (pid {st.pid}) in {started.seconds:.1f} s; deployments: "
               f"retrain_on_new_classes/retrain-on-new-classes (cron {params.retrain.cron!r} {params.retrain.timezone}), "
               f"training_pipeline/training-pipeline (on demand)")
    typer.echo(f"Prefect UI: {api.removesuffix('/api')}   trigger: PREFECT_API_URL={api} prefect deployment run "
               "training_pipeline/training-pipeline   stop: lerenet serve --stop")
