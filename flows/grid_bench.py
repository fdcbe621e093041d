"""``python -m flows.grid_bench``: only the fold x model training grid, on one runner, timed (bench case ``dask``).

The benchmark case :mod:`pipeline.bench.dask_case` runs this module once per runner, each time as a fresh
process on the same prepared project (data, splits and feature store already there; ``models/`` and
``checkpoints/`` removed before, so every training starts from step 0). The flow submits
:func:`flows.training_pipeline.train_task` for every ``(fold, model)`` -- the task the training flow runs --
to the grid runner of :mod:`flows.runner` (``sequential``, ``threads`` or ``dask``) and waits for all of
them; nothing else (no evaluation, no registry), so the figures are the grid's.

Timings written to ``--out`` (JSON, seconds, ``time.perf_counter`` in this process):

* ``runner_start_s``: entering the task runner (Dask: starting the ``LocalCluster`` or connecting);
* ``grid_s``: first submit until every training has finished;
* ``runner_stop_s``: leaving the task runner (Dask: closing the local cluster);
* ``flow_s``: the whole flow call (Prefect's temporary API start included when no server is set).

On Dask it also records the scheduler's task stream (``distributed.Client.get_task_stream``: worker,
thread, start and stop of each task -- what the dashboard's *Task Stream* plot draws) and the Dask key
of every ``(fold, model)`` training, so the case can draw the picture.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from prefect import flow

from flows.runner import grid_runner, task_env
from flows.training_pipeline import train_task, trained_models
from pipeline.config import load_params


def _stream(runner: Any, since: float) -> list[dict[str, Any]]:
    """The task stream of the Dask scheduler since ``since`` (epoch s): worker, thread, key, compute start/stop."""
    rows = []
    for rec in runner.client.get_task_stream(start=since):
        for ss in rec.get("startstops", []):
            if ss.get("action") == "compute":
                rows.append({"key": str(rec["key"]), "worker": rec.get("worker"), "thread": rec.get("thread"),
                             "status": rec.get("status"), "start": ss["start"], "stop": ss["stop"]})
    return rows


@flow(name="training_grid", log_prints=True)
def training_grid(params_path: str, runner: str = "sequential", workers: int = 2,
                  address: str | None = None) -> dict[str, Any]:
    """Train every ``(fold, model)`` of ``params_path`` on ``runner`` and return the timings (module docstring).

    Args:
        params_path: params YAML of a project whose data, splits and feature store exist.
        runner: ``sequential`` | ``threads`` | ``dask`` (``params.distributed.runner`` is overridden).
        workers: thread-pool size or local Dask worker processes.
        address: a running Dask scheduler (``tcp://host:port``) instead of a new local cluster.

    Raises:
        The first failing training's exception.
    """
    params = load_params(params_path, {"distributed": {"runner": runner, "workers": workers, "address": address}})
    env = task_env()
    cells = [(f, m) for f in sorted(params.folds) for m in trained_models(params)]
    t0 = time.perf_counter()
    with grid_runner(params.distributed) as r:
        t1 = time.perf_counter()
        dask = hasattr(r, "client")
        if dask:
            r.client.get_task_stream(start=time.time())  # registers the scheduler's task-stream plugin
        since = time.time()
        futures = {c: r.submit(train_task, {"params": params, "fold": c[0], "model_name": c[1], "env": env})
                   for c in cells}
        for fut in futures.values():
            fut.result()
        t2 = time.perf_counter()
        stream = _stream(r, since) if dask else []
        keys = {str(fut.wrapped_future.key): f"fold{f}/{m}" for (f, m), fut in futures.items()} if dask else {}
        workers_seen = sorted({row["worker"] for row in stream})
    t3 = time.perf_counter()
    return {"runner": runner, "workers": workers if runner != "sequential" else 1, "trainings": len(cells),
            "runner_start_s": round(t1 - t0, 3), "grid_s": round(t2 - t1, 3), "runner_stop_s": round(t3 - t2, 3),
            "task_stream": stream, "keys": keys, "dask_workers": workers_seen}


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--params P --runner R [--workers N] [--address A] --out result.json``; exit 0 on success."""
    from pipeline.atomic import atomic_write_text

    ap = argparse.ArgumentParser(prog="python -m flows.grid_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--params", required=True)
    ap.add_argument("--runner", choices=("sequential", "threads", "dask"), required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--address", default=None)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    result = training_grid(a.params, a.runner, a.workers, a.address)
    result["flow_s"] = round(time.perf_counter() - t0, 3)
    atomic_write_text(Path(a.out), json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
