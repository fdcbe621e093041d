"""``lerenet services up|down|status|env|dvc-remote``: the local team services (``pipeline/services/``)."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from lerenet.app import app
from lerenet.commands._common import ParamsOption, fail, params_or_exit
from lerenet.help import PANEL_SERVICES, App
from pipeline import services as svc

services_app = App(help="Local team services: SeaweedFS (S3), MLflow server, Prefect server on 127.0.0.1 "
                        "(optionally a Dask scheduler + workers: --dask).\n\n"
                        "Example:\n  lerenet services up && eval \"$(lerenet services env)\"",
                   no_args_is_help=True)
app.add_typer(services_app, name="services", rich_help_panel=PANEL_SERVICES)

OnlyOption = typer.Option(None, "--only", help="service to act on (repeatable): seaweedfs | mlflow | prefect | dask")


def _table(rows: list[svc.ServiceStatus]) -> None:
    typer.echo(f"{'service':<16}{'state':<11}{'pid':>8}  {'procs':>5}  {'rss MiB':>8}  {'start s':>7}  url")
    for r in rows:
        typer.echo(f"{r.name:<16}{r.state:<11}{r.pid or '-':>8}  {r.processes or '-':>5}  "
                   f"{r.rss_mb if r.rss_mb is not None else '-':>8}  "
                   f"{r.startup_s if r.startup_s is not None else '-':>7}  {r.url or '-'}"
                   + (f"  ({r.note})" if r.note else ""))


@services_app.command("up")
def up_cmd(only: list[str] = OnlyOption, params: Path = ParamsOption,
           timeout: float = typer.Option(None, help="seconds to wait for each health check (default services.start_timeout)"),
           dask: bool = typer.Option(False, "--dask", help="also start a local Dask scheduler + "
                                     "services.dask_workers workers (ports: services.dask_*)")) -> None:
    """Start the services (bound to services.host, explicit ports) and wait until each is healthy.

    Example:
      lerenet services up --only seaweedfs --only mlflow
      lerenet services up --only dask    # just the Dask scheduler + workers; then eval "$(lerenet services env)"
    """
    p = params_or_exit(params)
    try:
        rows = svc.up(p, only or None, timeout=timeout, dask=dask)
    except svc.ServiceError as exc:
        fail(str(exc))
    for r in rows:
        typer.echo(f"{r.name}: {r.note} (pid {r.pid}) at {r.url}"
                   + (f", healthy after {r.startup_s} s" if r.note == "started" else ""))
    typer.echo(f"logs: {svc.state_dir(p) / 'logs'}; client settings: eval \"$(lerenet services env)\"")


@services_app.command("down")
def down_cmd(only: list[str] = OnlyOption, params: Path = ParamsOption,
             timeout: float = typer.Option(None, help="seconds to wait for each process (default services.stop_timeout)")) -> None:
    """Stop the services by pid (served Prefect processes, Prefect, MLflow, then SeaweedFS) and wait for exit.

    Example:
      lerenet services down --only prefect
    """
    p = params_or_exit(params)
    try:
        results = svc.down(p, only or None, timeout=timeout)
    except svc.ServiceError as exc:
        fail(str(exc))
    for name, result in results:
        typer.echo(f"{name}: {result}")


@services_app.command("status")
def status_cmd(params: Path = ParamsOption) -> None:
    """Show what runs where: state, pid, process count, memory (RSS of the process tree), start-up time, URL.

    Example:
      lerenet services status
    """
    p = params_or_exit(params)
    _table(svc.status(p))


@services_app.command("env")
def env_cmd(params: Path = ParamsOption) -> None:
    """Print `export` lines pointing MLflow, Prefect, boto3 and DVC at the services (use with eval).

    Example:
      eval "$(lerenet services env)"
    """
    p = params_or_exit(params)
    for k, v in svc.client_env(p).items():
        typer.echo(f"export {k}={shlex.quote(v)}")


@services_app.command("dvc-remote")
def dvc_remote_cmd(repo: Path = typer.Option(None, help="DVC repository to configure (default: the params file's folder)"),
                   name: str = typer.Option("s3remote", help="remote name"),
                   default: bool = typer.Option(False, "--default", help="also make it the default remote"),
                   params: Path = ParamsOption) -> None:
    """Add the S3 remote s3://<dvc_bucket>/<dvc_prefix> on the local SeaweedFS to .dvc/config.local.

    Example:
      lerenet services dvc-remote --default && dvc push -r s3remote
    """
    p = params_or_exit(params)
    repo = repo or p.root
    try:
        url = svc.configure_dvc_remote(p, repo, name=name, default=default)
    except svc.ServiceError as exc:
        fail(str(exc))
    typer.echo(f"dvc remote {name} -> {url} (endpoint {svc.s3_endpoint(p)}; in {repo / '.dvc/config.local'})")
    typer.echo(f"push with: dvc push -r {name}")
