"""Process supervision for the team services: start in its own session, pid records, health, stop.

One job: run a long-lived program as a named *service process* and know, later and from another
process, whether it still runs. Layout under ``params.services.state_dir`` (default ``.lerenet/``)::

    pids/<name>.json       pid, process create time, argv, url, ports, log, start-up seconds
    logs/<name>.log        stdout+stderr of each process (appended)

A pid file whose process is gone or was replaced (other create time) is stale and removed. Stopping
is by recorded pid: SIGTERM, wait ``services.stop_timeout``, then SIGKILL the rest of the process
tree. Used by :mod:`pipeline.services.team` (SeaweedFS, MLflow, Prefect) and by ``lerenet serve``
(:func:`flows.deploy.start_serving`) for the served Prefect deployments.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pipeline.atomic import atomic_write_text
from pipeline.config import Params

QUIET_ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
             "GX_ANALYTICS_ENABLED": "false", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class ServiceError(RuntimeError):
    """A service could not be started/stopped; the message names the service, port or log file."""


@dataclass
class ServiceStatus:
    """What runs where. ``state``: running | stopped | unhealthy. ``rss_mb``: whole process tree, MiB."""

    name: str
    state: str
    pid: int | None = None
    url: str | None = None
    rss_mb: float | None = None
    processes: int = 0
    startup_s: float | None = None
    log: str | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


# ---- paths ------------------------------------------------------------------

def state_dir(params: Params) -> Path:
    """``services.state_dir`` (absolute)."""
    return Path(params.services.state_dir)


def pid_path(params: Params, name: str) -> Path:
    """``<state_dir>/pids/<name>.json``: the pid record of service process ``name``."""
    return state_dir(params) / "pids" / f"{name}.json"


def log_path(params: Params, name: str) -> Path:
    """``<state_dir>/logs/<name>.log``."""
    return state_dir(params) / "logs" / f"{name}.log"


def port_free(host: str, port: int) -> bool:
    """True when ``host:port`` can be bound (``SO_REUSEADDR``, as the servers themselves bind)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # like the servers themselves: connections in TIME_WAIT (after a recent `down`) do not block
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def http_ok(url: str, timeout: float = 2.0) -> bool:
    """True when ``GET url`` answers 2xx within ``timeout`` seconds (health checks)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback URL built here)
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


# ---- pid records -------------------------------------------------------------

def read_record(params: Params, name: str) -> dict | None:
    """The pid record of ``name``; ``None`` without one, ``{"pid": None, "corrupt": True}`` if unreadable."""
    p = pid_path(params, name)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError):
        return {"pid": None, "corrupt": True}


def live_process(rec: dict | None) -> psutil.Process | None:
    """The recorded process if it is still the same one (pid + create time), else None."""
    if not rec or not rec.get("pid"):
        return None
    try:
        proc = psutil.Process(int(rec["pid"]))
        if abs(proc.create_time() - float(rec.get("create_time", -1))) > 0.05:
            return None  # pid reused by another process
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def running_process(params: Params, name: str) -> psutil.Process | None:
    """The live process of ``name``; removes the pid file if it is stale."""
    rec = read_record(params, name)
    proc = live_process(rec)
    if rec is not None and proc is None:
        pid_path(params, name).unlink(missing_ok=True)
    return proc


def registered_names(params: Params) -> list[str]:
    """Names with a pid file (known services and extra processes such as ``prefect-serve``)."""
    d = state_dir(params) / "pids"
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def tree_rss_mb(proc: psutil.Process) -> tuple[float, int]:
    """Resident memory (MiB) and process count of ``proc`` and all its descendants."""
    procs = [proc]
    try:
        procs += proc.children(recursive=True)
    except psutil.Error:
        pass
    total = 0
    n = 0
    for p in procs:
        try:
            total += p.memory_info().rss
            n += 1
        except psutil.Error:
            pass
    return total / 2**20, n


def _log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---- generic process start/stop (also used by `lerenet serve`) ----------------

@dataclass
class Pending:
    """A process launched by :func:`_launch`, not yet confirmed healthy."""

    name: str
    popen: subprocess.Popen
    record: dict
    health: Callable[[], bool] | None
    t0: float
    deadline: float


def launch(params: Params, name: str, argv: list[str], *, env: Mapping[str, str] | None, url: str | None,
            ports: Mapping[str, int] | None, health: Callable[[], bool] | None, timeout: float,
            cwd: str | os.PathLike[str] | None) -> ServiceStatus | Pending:
    """Start ``argv`` as service ``name`` (own session, output to its log, pid record written at once) unless
    it already runs; returns its status if it does, else a :class:`Pending` to pass to :func:`await_healthy`.

    Raises:
        ServiceError: a port of ``ports`` is taken (names it and its ``services.*`` key).
    """
    proc = running_process(params, name)
    if proc is not None:
        rec = read_record(params, name) or {}
        return ServiceStatus(name, "running", proc.pid, rec.get("url"), log=str(log_path(params, name)),
                             startup_s=rec.get("startup_s"), note="already running")
    host = params.services.host
    for key, port in (ports or {}).items():
        if not port_free(host, port):
            raise ServiceError(f"{name}: port {host}:{port} (services.{key}) is in use by another process; "
                               f"stop it or choose another port in params.yaml services.{key}")
    log = log_path(params, name)
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **QUIET_ENV, **(env or {})}
    t0 = time.monotonic()
    with log.open("ab") as fh:
        fh.write(f"\n=== {time.strftime('%Y-%m-%dT%H:%M:%S')} start: {' '.join(argv)}\n".encode())
        fh.flush()
        popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=full_env, cwd=str(cwd or state_dir(params)), start_new_session=True)
    record = {"name": name, "pid": popen.pid, "create_time": psutil.Process(popen.pid).create_time(),
              "argv": argv, "url": url, "ports": dict(ports or {}), "log": str(log), "started_at": time.time()}
    atomic_write_text(pid_path(params, name), json.dumps(record, indent=2))
    return Pending(name, popen, record, health, t0, t0 + timeout)


def await_healthy(params: Params, pending: list[Pending]) -> list[ServiceStatus]:
    """Poll the health checks of ``pending`` together; on any failure stop all of them and raise."""
    done: dict[str, ServiceStatus] = {}
    try:
        while len(done) < len(pending):
            for pd in pending:
                if pd.name in done:
                    continue
                log = pd.record["log"]
                if pd.popen.poll() is not None:
                    raise ServiceError(f"{pd.name} exited with status {pd.popen.returncode} during start-up; "
                                       f"log {log}:\n{_log_tail(Path(log))}")
                if pd.health is None or pd.health():
                    pd.record["startup_s"] = round(time.monotonic() - pd.t0, 2)
                    atomic_write_text(pid_path(params, pd.name), json.dumps(pd.record, indent=2))
                    done[pd.name] = ServiceStatus(pd.name, "running", pd.popen.pid, pd.record["url"],
                                                  startup_s=pd.record["startup_s"], log=log, note="started")
                elif time.monotonic() > pd.deadline:
                    raise ServiceError(f"{pd.name} not healthy after {pd.deadline - pd.t0:.0f} s "
                                       f"(url {pd.record['url']}); stopped it; log {log}:\n{_log_tail(Path(log))}")
            if len(done) < len(pending):
                time.sleep(0.2)
    except BaseException:  # unhealthy, exited, or interrupted: leave nothing of this batch running
        for pd in pending:
            stop_process(params, pd.name)
            pd.popen.poll()
        raise
    return [done[pd.name] for pd in pending]


def start_process(params: Params, name: str, argv: list[str], *, env: Mapping[str, str] | None = None,
                  health: Callable[[], bool] | None = None, url: str | None = None,
                  ports: Mapping[str, int] | None = None, timeout: float | None = None,
                  cwd: str | os.PathLike[str] | None = None) -> ServiceStatus:
    """Start ``argv`` in its own session as service ``name``, unless it already runs.

    Output goes to ``<state_dir>/logs/<name>.log``; the pid file is written as soon
    as the process exists. Waits up to ``timeout`` (default ``services.start_timeout``)
    seconds for ``health()`` to return True (if given). ``env`` is added to the
    current environment (plus telemetry opt-outs). ``lerenet serve`` registers its
    long-running process this way, so ``lerenet services down`` stops it first.

    Raises:
        ServiceError: a port in ``ports`` is taken (names it), the process exits
            early or stays unhealthy (the process is stopped; message has the log tail).
    """
    timeout = params.services.start_timeout if timeout is None else timeout
    launched = launch(params, name, argv, env=env, url=url, ports=ports, health=health, timeout=timeout, cwd=cwd)
    if isinstance(launched, ServiceStatus):
        return launched
    return await_healthy(params, [launched])[0]


def stop_process(params: Params, name: str, timeout: float | None = None) -> str:
    """Stop service ``name`` by its recorded pid and wait for its process tree to exit.

    SIGTERM to the recorded process, wait up to ``timeout`` (default
    ``services.stop_timeout``) seconds for it and its children, SIGTERM the
    remaining children, then SIGKILL what is left. Removes the pid file.

    Returns:
        ``"stopped"``, ``"killed"`` (needed SIGKILL), ``"not running"`` or ``"stale pid file removed"``.
    """
    timeout = params.services.stop_timeout if timeout is None else timeout
    rec = read_record(params, name)
    if rec is None:
        return "not running"
    proc = live_process(rec)
    pid_file = pid_path(params, name)
    if proc is None:
        pid_file.unlink(missing_ok=True)
        return "stale pid file removed"
    try:
        children = proc.children(recursive=True)
    except psutil.Error:
        children = []
    result = "stopped"
    try:
        proc.terminate()
    except psutil.NoSuchProcess:
        pass
    _gone, alive = psutil.wait_procs([proc, *children], timeout=timeout)
    if alive:
        for p in alive:
            try:
                p.terminate() if p.pid != proc.pid else p.kill()
            except psutil.NoSuchProcess:
                pass
        _gone, alive = psutil.wait_procs(alive, timeout=5)
        for p in alive:
            result = "killed"
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
    pid_file.unlink(missing_ok=True)
    return result



