"""Task runners of the fold x model grid: sequential, threads, or Dask (``prefect-dask``).

``params.distributed`` (:class:`pipeline.config.DistributedParams`) picks one:

* ``sequential``: a Prefect ``ThreadPoolTaskRunner`` with one worker (one task at a time);
* ``threads``: a ``ThreadPoolTaskRunner`` with ``workers`` threads in the flow's process;
* ``dask``: a :class:`prefect_dask.DaskTaskRunner`, either on a new ``distributed.LocalCluster`` of
  ``workers`` processes with 1 thread each (torch threads per worker ``cores // workers``, through
  ``$LERENET_TORCH_THREADS``; everything on 127.0.0.1, dashboard on a free port or
  ``$LERENET_DASK_DASHBOARD``, e.g. ``127.0.0.1:8787``), or connected to the scheduler at ``distributed.address`` /
  ``$LERENET_DASK_ADDRESS`` (``dask scheduler`` + ``dask worker``, Kubernetes, Coiled, ...).

Whatever the runner, every task calls the same ``pipeline`` step function the DVC stage calls, and
each training draws only from its own generator (``pipeline.training.rng``): same params, same weights
and metrics. The runner of the grid is separate from the flow's own task runner: the other steps
(ingest ... register) run in the flow process. A task submitted to Dask carries the serialised Prefect
context, so its task run belongs to the flow run; :data:`FORWARDED_ENV` variables of the flow process
are passed to each task (``task_env``) because worker processes do not inherit them.

Dask reschedules a task whose worker died on another worker (up to ``distributed.scheduler.allowed-failures``
times); step outputs are written atomically, so a killed attempt leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

from pipeline.config import DistributedParams

FORWARDED_ENV = ("LERENET_PARENT_RUN_ID", "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                 "AWS_SECRET_ACCESS_KEY", "LERENET_TORCH_THREADS")
"""Environment of the flow process that grid tasks need (parent MLflow run, tracking server, S3 store)."""


def torch_threads_per_worker(workers: int, cores: int | None = None) -> int:
    """Torch threads of each of ``workers`` local worker processes: ``cores // workers``, at least 1."""
    return max(1, (cores or os.cpu_count() or 1) // max(1, workers))


def make_task_runner(d: DistributedParams) -> Any:
    """A new (not yet started) Prefect task runner for ``d`` (module docstring).

    Raises:
        ImportError: ``runner: dask`` without ``prefect-dask`` installed (``pip install -c constraints.txt -e .``).
    """
    from prefect.task_runners import ThreadPoolTaskRunner

    if d.runner == "sequential":
        return ThreadPoolTaskRunner(max_workers=1)
    if d.runner == "threads":
        return ThreadPoolTaskRunner(max_workers=d.workers)
    from prefect_dask import DaskTaskRunner

    if d.address:
        return DaskTaskRunner(address=d.address)
    threads = str(torch_threads_per_worker(d.workers))
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs={
        "n_workers": d.workers, "threads_per_worker": 1, "processes": True,
        "host": "127.0.0.1", "dashboard_address": os.environ.get("LERENET_DASK_DASHBOARD", "127.0.0.1:0"),
        "env": {"LERENET_TORCH_THREADS": threads, "OMP_NUM_THREADS": threads}})


@contextlib.contextmanager
def grid_runner(d: DistributedParams) -> Iterator[Any]:
    """The started task runner for ``d`` (a local Dask cluster is shut down on exit).

    Use inside a flow: ``runner.submit(task, parameters={...}, wait_for=[...])`` returns a Prefect future.
    """
    with make_task_runner(d) as runner:
        yield runner


def task_env() -> dict[str, str]:
    """The :data:`FORWARDED_ENV` variables set in this process (passed to each grid task)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


@contextlib.contextmanager
def environment(env: Mapping[str, str] | None) -> Iterator[None]:
    """Set ``env`` in ``os.environ`` for the block (inside a task); variables already equal are left alone.

    Values that were different before are restored on exit; in a thread runner the flow process already
    holds the same values, so nothing changes there.
    """
    saved: dict[str, str | None] = {}
    for k, v in (env or {}).items():
        if os.environ.get(k) != v:
            saved[k] = os.environ.get(k)
            os.environ[k] = v
    try:
        yield
    finally:
        for k, old in saved.items():
            if old is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = old
