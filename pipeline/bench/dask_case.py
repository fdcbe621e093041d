"""Benchmark case ``dask``: the fold x model training grid sequential vs on Dask workers, side by side.

Two throw-away projects, prepared once (ingest, validate, split, frozen-feature store; not timed):

* **grid**: the CPU profile's training grid -- every fold of the project's fold table x every model of
  ``model.names`` (3 x 3 = 9 trainings with the shipped ``params.yaml``) on the whole ``data.source``,
  with the profile's training settings (``train.episodes`` unless ``dask_episodes`` reduces it);
* **tiny**: the same grid shape on 3 classes x 6 real images, 2 steps x 2 episodes at 64 px, so the
  runner's own cost (cluster start, task shipping, stop) dominates: the Dask runner's overhead.

Each timed run is a fresh process, ``python -m flows.grid_bench`` (:mod:`flows.grid_bench`: the Prefect
flow submits :func:`flows.training_pipeline.train_task` per cell to :mod:`flows.runner`'s runner), with
``models/`` and ``checkpoints/`` removed before, so every training starts from step 0. Modes:
``sequential`` (one task at a time in the flow process, torch on every core) and ``dask``
(``LocalCluster`` of ``dask_workers`` processes x 1 thread, torch threads ``cores // workers`` each). One
untimed warm-up (tiny, sequential: Prefect database, page cache); then ``dask_tiny_repeats`` rounds
of tiny and ``dask_grid_repeats`` rounds of grid, the two modes in an order rotated per round.

Figures: per mode the grid's wall seconds (first submit -> last training done), the runner's start and
stop seconds, the whole process's wall and CPU seconds (``os.wait4``: the process and its children,
i.e. the Dask workers); ratios sequential / dask per round. The Dask task stream of the last grid run is
drawn to ``<bench folder>/dask-task-stream.png`` (:mod:`pipeline.bench.task_stream`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.bench import workspace
from pipeline.bench.harness import ratio_stats, run_logged, summarize
from pipeline.bench.overhead_case import run_env
from pipeline.config import DEFAULT_PARAMS
from pipeline.layout import Layout

MODES = ("sequential", "dask")
CODE_ROOT = DEFAULT_PARAMS.parent


class GridRunError(RuntimeError):
    """A grid run failed; the message names the mode and the log file."""


def prepare(root: Path, source: Path, overrides: dict[str, Any]) -> Path:
    """Write the project's params (``overrides`` merged) under ``root`` and run ingest, validate, split and
    the feature store there. Returns the params file.

    Raises:
        pipeline.validate.DataValidationError: the data does not validate.
    """
    from pipeline.features import build_feature_store
    from pipeline.split import split

    pf = workspace.write_params(root / "params.yaml", source, overrides)
    params = workspace.load(pf)
    workspace.ingest_and_validate(params)
    split(params)
    build_feature_store(params, progress=False)
    return pf


def clean(root: Path) -> None:
    """Remove trained models, resumable states and curves, so that every training starts from step 0."""
    for name in ("models", "checkpoints", "metrics"):
        shutil.rmtree(root / name, ignore_errors=True)


def run_grid(pf: Path, mode: str, workers: int, log: Path) -> dict[str, Any]:
    """Run ``python -m flows.grid_bench`` for ``mode`` on the project of ``pf`` (a fresh process).

    Returns the flow's JSON (:mod:`flows.grid_bench`) plus ``process_s`` (wall) and ``cpu_s`` (user + system
    of the process and its descendants).

    Raises:
        GridRunError: non-zero exit status (names the log).
    """
    root = pf.parent
    out = root / f"grid-{mode}.json"
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "flows.grid_bench", "--params", str(pf), "--runner", mode,
           "--workers", str(workers), "--out", str(out)]
    env = run_env(root)
    env["PYTHONPATH"] = os.pathsep.join([str(CODE_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("LERENET_TORCH_THREADS", None)  # each process picks its own (sequential: every core)
    env.pop("LERENET_DASK_ADDRESS", None)
    code, wall, cpu, _ = run_logged(cmd, CODE_ROOT, env, log)
    if code != 0 or not out.is_file():
        raise GridRunError(f"grid run `{' '.join(cmd)}` exited with status {code}; see {log}")
    res = json.loads(out.read_text())
    res.update(process_s=round(wall, 3), cpu_s=round(cpu, 3))
    return res


def _rounds(pf: Path, repeats: int, workers: int, log: Path) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
    for r in range(repeats):
        for mode in MODES[r % 2:] + MODES[:r % 2]:
            clean(pf.parent)
            runs[mode].append(run_grid(pf, mode, workers, log))
    return runs


def _row(label: str, values: list[float], unit: str = "s") -> dict[str, Any]:
    return {"label": label, **summarize(values, unit).as_dict()}


def _rows(tag: str, runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    def whole(r: dict[str, Any]) -> float:
        return r["runner_start_s"] + r["grid_s"] + r["runner_stop_s"]

    rows = []
    for mode in MODES:
        rs = runs[mode]
        rows.append(_row(f"{tag}, {mode}: grid wall seconds", [r["grid_s"] for r in rs]))
        rows.append(_row(f"{tag}, {mode}: runner start + grid + stop", [whole(r) for r in rs]))
        rows.append(_row(f"{tag}, {mode}: process wall seconds", [r["process_s"] for r in rs]))
        rows.append(_row(f"{tag}, {mode}: process CPU seconds", [r["cpu_s"] for r in rs]))
    rows.append(_row(f"{tag}: dask runner start (LocalCluster)", [r["runner_start_s"] for r in runs["dask"]]))
    rows.append(_row(f"{tag}: dask runner stop", [r["runner_stop_s"] for r in runs["dask"]]))
    seq = [r["grid_s"] for r in runs["sequential"]]
    dsk = [r["grid_s"] for r in runs["dask"]]
    rows.append({"label": f"{tag}: sequential / dask grid wall time (speed-up)", **ratio_stats(seq, dsk).as_dict()})
    rows.append(_row(f"{tag}: dask - sequential, runner start + grid + stop",
                     [whole(d) - whole(q) for d, q in zip(runs["dask"], runs["sequential"])]))
    return rows


def run(ctx: Any) -> dict[str, Any]:
    """Measure both grids (module docstring) with ``ctx`` (:class:`pipeline.bench.runner.Context`)."""
    from pipeline.bench.task_stream import draw_task_stream

    s = ctx.settings
    base = ctx.workdir / "dask"
    log = base / "grid.log"
    base.mkdir(parents=True, exist_ok=True)
    classes = tuple(s.overhead_classes)
    tiny_src = workspace.make_small_source(ctx.source, base / "tiny-source", classes, s.overhead_images_per_class)
    tiny_over = workspace.tiny_overrides(classes)
    tiny_over["model"] = {"names": list(ctx.params.model.names), "channels": 32}
    tiny_pf = prepare(base / "tiny", tiny_src, tiny_over)
    grid_over: dict[str, Any] = {"train": {"device": "cpu"},
                                 "folds": {k: list(v) for k, v in ctx.params.folds.items()}}
    if s.dask_episodes:
        grid_over["train"].update(episodes=s.dask_episodes)
    t0 = time.perf_counter()
    grid_pf = prepare(base / "grid", ctx.source, grid_over)
    prep_s = time.perf_counter() - t0
    clean(tiny_pf.parent)
    run_grid(tiny_pf, "sequential", s.dask_workers, log)  # warm-up, not timed
    tiny = _rounds(tiny_pf, s.dask_tiny_repeats, s.dask_workers, log)
    grid = _rounds(grid_pf, s.dask_grid_repeats, s.dask_workers, log)
    rows = _rows("tiny grid", tiny) + _rows("cpu grid", grid)
    last = grid["dask"][-1]
    picture = Layout.of(ctx.params).bench_results.parent / "dask-task-stream.png"
    params = workspace.load(grid_pf)
    title = (f"Dask task stream: CPU-profile training grid, {len(params.folds)} folds x {len(params.model.names)} "
             f"models, {params.train.episodes} episodes each; {s.dask_workers} workers x 1 thread, {os.cpu_count()} cores")
    draw_task_stream(last["task_stream"], last["keys"], picture, title)
    stream = {k: last[k] for k in ("task_stream", "keys")}
    (picture.with_suffix(".json")).write_text(json.dumps(stream, indent=1))
    info = {"projects": {"tiny": str(tiny_pf.parent), "grid": str(grid_pf.parent)}, "log": str(log),
            "command": f"{sys.executable} -m flows.grid_bench --params P --runner sequential|dask --workers "
                       f"{s.dask_workers} --out R.json",
            "grid": {"folds": {str(k): v for k, v in params.folds.items()}, "models": list(params.model.names),
                     "episodes": params.train.episodes, "batch_size": params.train.batch_size,
                     "source": str(ctx.source), "prepare_s": round(prep_s, 1)},
            "rounds": {"tiny": s.dask_tiny_repeats, "grid": s.dask_grid_repeats},
            "runs": {"tiny": _strip(tiny), "grid": _strip(grid)}, "task_stream_png": str(picture)}
    return {"rows": rows, "info": info}


def _strip(runs: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    return {m: [{k: v for k, v in r.items() if k not in ("task_stream", "keys")} for r in rs] for m, rs in runs.items()}
