"""The operations sections of ``params.yaml`` (retraining schedule, distributed runner, local services) and
the strict base of every section; :mod:`pipeline.config` assembles them into :class:`~pipeline.config.Params`."""

from __future__ import annotations

import contextlib, functools, ipaddress, re  # noqa: E401
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    # allow_inf_nan=False: every float parameter must be finite (`lr: .inf` or `.nan` are rejected)
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


_IANA = functools.cache(lambda: frozenset(__import__("zoneinfo").available_timezones()))


def check_timezone(name: object) -> str:
    """Return ``name`` if it is an IANA time zone name Prefect accepts for a schedule, else raise.

    The set is :func:`zoneinfo.available_timezones` (what Prefect's ``CronSchedule`` checks, read
    once), plus ``UTC`` always.

    Raises:
        ValueError: naming the bad value, e.g. ``'CET+1'`` or ``'Berlin'``.
    """
    if name == "UTC" or (isinstance(name, str) and name in _IANA()):
        return name
    raise ValueError(f"{name!r} is not an IANA time zone name: expected e.g. UTC, Europe/Berlin, America/New_York")


class RetrainParams(_Section):
    """Schedule of the ``retrain_on_new_classes`` deployment: ``cron`` read in ``timezone``.

    ``timezone`` is an IANA name (``UTC``, ``Europe/Berlin``, ...); the Prefect UI shows it with the
    schedule, and a daylight-saving zone keeps the wall-clock time across DST changes.
    """

    cron: str = "0 3 * * *"
    timezone: Annotated[str, AfterValidator(check_timezone)] = "UTC"


class DistributedParams(_Section):
    """Where the flows run the fold x model grid, and how runs exclude each other (``docs/orchestration.md``).

    Not a training setting: the same weights and metrics come out whichever runner is chosen, so this
    section is excluded from ``params_hash``.

    * ``runner``: ``sequential`` (one task at a time), ``threads`` (Prefect thread pool in the flow
      process, ``workers`` tasks at once) or ``dask`` (``prefect-dask``'s ``DaskTaskRunner``: a
      ``LocalCluster`` of ``workers`` processes with 1 thread each, or the scheduler at ``address``).
    * ``address``: ``tcp://host:port`` of a running Dask scheduler (env ``LERENET_DASK_ADDRESS``
      overrides); ``null`` starts a local cluster.
    * ``lock_timeout``: seconds a second training/promoting run waits for the project lock
      (``pipeline/lock.py``) before it exits with the holder's pid, host, start and command;
      0 = do not wait (env ``LERENET_LOCK_TIMEOUT`` overrides).
    """

    runner: Literal["sequential", "threads", "dask"] = "threads"
    workers: int = Field(2, ge=1, le=1024)
    address: str | None = None
    lock_timeout: float = Field(0.0, ge=0)

    @field_validator("address")
    @classmethod
    def _scheduler_address(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        if not re.fullmatch(r"(tcp|tls|inproc|ws|wss)://[^\s/]+(:\d+)?/?", v):
            raise ValueError(f"{v!r} is not a Dask scheduler address: expected e.g. tcp://10.0.0.5:8786")
        return v


class ServicesParams(_Section):
    """Local team services started by ``lerenet services up`` (see ``pipeline/services/``).

    SeaweedFS (S3 API on ``s3_port``), an MLflow tracking server (``mlflow_port``, artifacts proxied to
    ``s3://<mlflow_bucket>/<mlflow_prefix>``), a Prefect server (``prefect_port``) and, with ``up --dask``, a Dask
    scheduler + workers (``dask_*``). Every process binds to ``host``, a loopback address; every port is explicit (a
    taken port fails fast). ``state_dir``: pid files, logs, data, generated credentials (git-ignored). Timeouts: s.
    """

    host: str = "127.0.0.1"
    state_dir: Path = Path(".lerenet")
    s3_port: int = Field(8333, ge=1, le=65535)
    s3_grpc_port: int = Field(18333, ge=1, le=65535)
    master_port: int = Field(9333, ge=1, le=65535)
    master_grpc_port: int = Field(19333, ge=1, le=65535)
    volume_port: int = Field(9340, ge=1, le=65535)
    volume_grpc_port: int = Field(19340, ge=1, le=65535)
    filer_port: int = Field(8888, ge=1, le=65535)
    filer_grpc_port: int = Field(18888, ge=1, le=65535)
    admin_port: int = Field(23646, ge=1, le=65535)
    admin_grpc_port: int = Field(33646, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    prefect_port: int = Field(4200, ge=1, le=65535)
    dvc_bucket: str = "lerenet-dvc"
    dvc_prefix: str = "store"
    mlflow_bucket: str = "lerenet-mlflow"
    mlflow_prefix: str = "artifacts"
    models_bucket: str = "lerenet-models"
    start_timeout: float = Field(90.0, gt=0)
    stop_timeout: float = Field(30.0, gt=0)
    dask_scheduler_port: int = Field(8786, ge=1, le=65535)
    dask_dashboard_port: int = Field(8787, ge=1, le=65535)
    dask_workers: int = Field(2, ge=1, le=64)
    dask_worker_port: int = Field(8790, ge=1, le=65535 - 128)

    @field_validator("host")
    @classmethod
    def _loopback_only(cls, v: str) -> str:
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(v).is_loopback:
                return v
        raise ValueError(f"services bind to a loopback IP only (e.g. 127.0.0.1), got {v!r}")

    @model_validator(mode="after")
    def _distinct_ports(self) -> "ServicesParams":
        ports = {k: v for k, v in self.model_dump().items() if k.endswith("_port")}
        seen: dict[int, str] = {}
        for k, v in ports.items():
            if v in seen:
                raise ValueError(f"services.{k} and services.{seen[v]} are both {v}; every port must differ")
            seen[v] = k
        return self


__all__ = ["DistributedParams", "RetrainParams", "ServicesParams", "check_timezone"]
