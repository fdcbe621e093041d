"""The optional local Dask cluster of ``lerenet services``: one ``dask scheduler`` + N ``dask worker`` processes.

The same programs a team runs on several machines (``docs/orchestration.md``), here on ``services.host``
(loopback) with explicit ports, so the distributed setup can be tried on one machine exactly as it
runs on many; the flows reach it through ``LERENET_DASK_ADDRESS`` (``lerenet services env``). Started by
``lerenet services up --dask`` (or ``--only dask``).

Processes (pid records and logs as for the other services, :mod:`pipeline.services.processes`):

* ``dask-scheduler``: ``dask scheduler --host H --port services.dask_scheduler_port
  --dashboard-address H:services.dask_dashboard_port``; healthy when ``GET /health`` on the dashboard
  port answers (the HTTP server runs without Bokeh; the ``/status`` pages need it);
* ``dask-worker-<i>`` (``i < services.dask_workers``): ``dask worker tcp://H:PORT --nworkers 1 --nthreads 1``
  listening on ``services.dask_worker_port + 3 i``, its nanny on the next port and its HTTP diagnostics
  server (``/health``, metrics; every worker runs one) on the port after that, named
  ``lerenet-worker-<i>``, ``--death-timeout 60`` (exits if the scheduler is gone a minute), scratch in
  ``<state_dir>/dask/worker-<i>``; torch threads ``cores // workers`` (``LERENET_TORCH_THREADS``); its
  ``PYTHONPATH`` starts with this checkout, so the workers import the code of the checkout that started
  them. Healthy when the scheduler lists it (``/json/identity.json``).

``up`` starts the scheduler, waits for it, then starts the workers together and waits until the scheduler
lists each; ``down`` stops the workers, then the scheduler (each by pid, whole process tree).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

from pipeline.config import Params
from pipeline.services.processes import (Pending, ServiceError, ServiceStatus, await_healthy, http_ok, launch, log_path,
                                         read_record, registered_names, running_process, state_dir, stop_process,
                                         tree_rss_mb)

SCHEDULER = "dask-scheduler"
WORKER_PREFIX = "dask-worker-"
CODE_ROOT = Path(__file__).resolve().parents[2]


def scheduler_address(params: Params) -> str:
    """``tcp://<host>:<dask_scheduler_port>``: the value for ``LERENET_DASK_ADDRESS`` / ``distributed.address``."""
    return f"tcp://{params.services.host}:{params.services.dask_scheduler_port}"


def dashboard_url(params: Params) -> str:
    """``http://<host>:<dask_dashboard_port>``: the scheduler's HTTP server (``/health``, ``/json/``, ``/status``)."""
    return f"http://{params.services.host}:{params.services.dask_dashboard_port}"


def worker_names(params: Params) -> list[str]:
    """Service names of the configured workers, ``dask-worker-0`` ... (pid files under ``<state_dir>/pids/``)."""
    return [f"{WORKER_PREFIX}{i}" for i in range(params.services.dask_workers)]


def is_dask_name(name: str) -> bool:
    """True for the scheduler's and any worker's service name."""
    return name == SCHEDULER or name.startswith(WORKER_PREFIX)


def known_names(params: Params) -> list[str]:
    """Scheduler + configured workers + workers with a pid file beyond them (``dask_workers`` lowered since)."""
    extra = [n for n in registered_names(params) if n.startswith(WORKER_PREFIX) and n not in worker_names(params)]
    return [SCHEDULER, *worker_names(params), *extra]


def connected_workers(params: Params, timeout: float = 2.0) -> dict[str, str]:
    """``{worker name: address}`` of the workers the scheduler lists now; ``{}`` if it does not answer."""
    try:
        with urllib.request.urlopen(f"{dashboard_url(params)}/json/identity.json", timeout=timeout) as r:  # noqa: S310
            ident = json.loads(r.read())
    except (OSError, ValueError):
        return {}
    return {str(w.get("name")): addr for addr, w in (ident.get("workers") or {}).items()}


def _dask() -> str:
    cand = Path(sys.executable).parent / "dask"
    return str(cand) if cand.is_file() else "dask"


def _worker_env(params: Params) -> dict[str, str]:
    threads = str(max(1, (os.cpu_count() or 1) // params.services.dask_workers))
    path = os.pathsep.join([str(CODE_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"LERENET_TORCH_THREADS": threads, "OMP_NUM_THREADS": threads, "PYTHONPATH": path}


def up(params: Params, timeout: float) -> list[ServiceStatus]:
    """Start the scheduler, then the workers; return when the scheduler lists every worker.

    Processes already running are left alone. If one fails, those this call started are stopped.

    Raises:
        ServiceError: a port is taken (names it and its ``services.*`` key), a process exits during start-up
            or is not healthy within ``timeout`` seconds (message has the log tail).
    """
    s, h = params.services, params.services.host
    lo, hi = s.dask_worker_port, s.dask_worker_port + 3 * s.dask_workers - 1
    if clash := [k for k, v in s.model_dump().items() if k.endswith("_port") and lo < v <= hi]:
        raise ServiceError(f"services.{clash[0]} lies in the Dask worker ports {lo}-{hi} "
                           f"(services.dask_worker_port + 3 x dask_workers); move one of them")
    (state_dir(params) / "dask").mkdir(parents=True, exist_ok=True)
    started: list[str] = []
    out: list[ServiceStatus] = []
    try:
        sched = launch(params, SCHEDULER, [_dask(), "scheduler", "--host", h, "--port", str(s.dask_scheduler_port),
                                           "--dashboard-address", f"{h}:{s.dask_dashboard_port}"],
                       env={"PYTHONPATH": _worker_env(params)["PYTHONPATH"]}, url=scheduler_address(params),
                       ports={"dask_scheduler_port": s.dask_scheduler_port,
                              "dask_dashboard_port": s.dask_dashboard_port},
                       health=lambda: http_ok(f"{dashboard_url(params)}/health"), timeout=timeout, cwd=params.root)
        if isinstance(sched, Pending):
            started.append(SCHEDULER)
            sched = await_healthy(params, [sched])[0]
        out.append(sched)
        pending: list[Pending] = []
        for i, name in enumerate(worker_names(params)):
            port = s.dask_worker_port + 3 * i
            label = f"lerenet-worker-{i}"
            argv = [_dask(), "worker", scheduler_address(params), "--host", h, "--worker-port", str(port),
                    "--nanny-port", str(port + 1), "--dashboard-address", f"{h}:{port + 2}", "--no-dashboard",
                    "--nworkers", "1", "--nthreads", "1", "--name", label, "--death-timeout", "60",
                    "--local-directory", str(state_dir(params) / "dask" / f"worker-{i}")]
            launched = launch(params, name, argv, env=_worker_env(params), url=scheduler_address(params),
                              ports={f"dask_worker_port+{3 * i + k}": port + k for k in range(3)},
                              health=lambda label=label: label in connected_workers(params), timeout=timeout,
                              cwd=params.root)
            if isinstance(launched, Pending):
                pending.append(launched)
                started.append(name)
            else:
                out.append(launched)
        out += await_healthy(params, pending)
    except BaseException:
        for name in reversed(started):
            stop_process(params, name)
        raise
    return out


def down(params: Params, timeout: float | None = None) -> list[tuple[str, str]]:
    """Stop every worker (configured or with a pid file), then the scheduler; ``[(name, result)]``
    (:func:`pipeline.services.processes.stop_process`)."""
    names = known_names(params)
    return [(n, stop_process(params, n, timeout)) for n in [*names[1:], names[0]]]


def status(params: Params) -> list[ServiceStatus]:
    """State of the scheduler and of each worker: ``running`` (worker: listed by the scheduler), ``unhealthy``
    or ``stopped``; RSS and process count of each process tree; stale pid files are removed."""
    listed = connected_workers(params)
    out = []
    for name in known_names(params):
        rec = read_record(params, name)
        proc = running_process(params, name)
        if proc is None:
            out.append(ServiceStatus(name, "stopped", url=scheduler_address(params), log=str(log_path(params, name)),
                                     note="stale pid file removed" if rec is not None else ""))
            continue
        if name == SCHEDULER:
            ok, note = http_ok(f"{dashboard_url(params)}/health"), f"dashboard {dashboard_url(params)}/status"
        else:
            label = f"lerenet-worker-{name[len(WORKER_PREFIX):]}"
            ok, note = label in listed, f"{label} at {listed.get(label, 'not connected')}"
        rss, nproc = tree_rss_mb(proc)
        out.append(ServiceStatus(name, "running" if ok else "unhealthy", proc.pid, scheduler_address(params),
                                 round(rss, 1), nproc, (rec or {}).get("startup_s"), str(log_path(params, name)),
                                 note))
    return out
