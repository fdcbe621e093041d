"""Run the benchmark cases, print a table and write ``bench/results.json``.

Cases (one module each; see their docstrings for exactly what is timed):

| case | module | figures |
| --- | --- | --- |
| ``train`` | :mod:`pipeline.bench.train_case` | episodes/s, data-wait share (and AMP speed-up on CUDA) |
| ``inference`` | :mod:`pipeline.bench.infer_case` | ms/query, queries/s; supports cached vs not; batch 1, 16 |
| ``ingest`` | :mod:`pipeline.bench.data_case` | ingest / validate images/s on ``data.source`` |
| ``overhead`` | :mod:`pipeline.bench.overhead_case` | plain Python vs ``dvc repro`` vs Prefect flow, ratios |
| ``serving`` | :mod:`pipeline.bench.serve_case` | served queries/s: class by name (cached) vs supports per row |
| ``dask`` | :mod:`pipeline.bench.dask_case` | training grid sequential vs Dask workers, runner overhead, task stream |

Every case also reports its peak memory (:class:`pipeline.bench.harness.PeakMemory`). A case
that fails is recorded with its error and the others still run; :func:`run_bench` returns the
results and the caller decides the exit status.

Presets (:data:`PRESETS`): ``full`` (what ``make bench`` runs; sized for <= 10 minutes on a quiet
2-core CPU) and ``quick`` (smoke run: one repeat, smaller workloads).
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pipeline.bench import dask_case, data_case, harness, infer_case, loss_case, overhead_case, serve_case, train_case
from pipeline.config import Params
from pipeline.layout import Layout

SCHEMA = "lerenet-bench/1"


@dataclass(frozen=True)
class Settings:
    """Workload sizes and repetitions of one benchmark run (see the case modules).

    ``train_warmup``/``train_repeats`` count blocks of ``train_steps`` optimiser steps;
    ``infer_warmup``/``infer_repeats`` passes over ``infer_queries`` queries (``infer_transductive``: test-time
    refinement steps of the extra timed pass when the network has the hypercolumn probe); ``data_*`` whole ingest +
    validate runs over the source; ``overhead_warmup`` untimed plain-Python pipeline runs and
    ``overhead_repeats`` rounds of the three pipeline runs. ``workers``: DataLoader workers
    of the image-based training configuration (``None`` = ``params.train.num_workers``).
    ``serve_*``: the ``serving`` case (requests of ``serve_queries`` rows; ``serve_http`` also over
    ``mlflow models serve``).
    ``dask_*`` (case ``dask``): local Dask worker processes, training episodes of the CPU grid (``None`` =
    ``params.train.episodes``), rounds of the CPU grid and of the tiny grid.
    """

    train_warmup: int = 1
    train_repeats: int = 3
    infer_warmup: int = 1
    infer_repeats: int = 4
    image_size: int = 200
    shots: int = 1
    train_steps: int = 2
    train_classes: tuple[str, ...] = ("Steel_In", "MT_Blowhole", "Leather_Color")
    train_images_per_class: int = 8
    infer_class: str = "MT_Break"
    infer_queries: int = 16
    infer_batches: tuple[int, ...] = (1, 16)
    infer_transductive: int = 20
    data_warmup: int = 1
    data_repeats: int = 3
    overhead_warmup: int = 1
    overhead_repeats: int = 2
    overhead_classes: tuple[str, ...] = ("Steel_In", "MT_Blowhole", "Leather_Color")
    overhead_images_per_class: int = 6
    workers: int | None = None
    serve_class: str = "Steel_In"
    serve_queries: int = 16
    serve_warmup: int = 1
    serve_repeats: int = 4
    serve_http: bool = True
    dask_workers: int = 2
    dask_episodes: int | None = None
    dask_grid_repeats: int = 1
    dask_tiny_repeats: int = 2


PRESETS: dict[str, Settings] = {
    "full": Settings(),
    "quick": Settings(train_warmup=1, train_repeats=1, train_steps=2, infer_warmup=1, infer_repeats=1, infer_queries=4,
                      infer_batches=(1, 4), data_warmup=0, data_repeats=1, overhead_warmup=0, overhead_repeats=1,
                      serve_queries=4, serve_repeats=1, dask_episodes=80, dask_tiny_repeats=1),
}

CASES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "train": train_case.run,
    "inference": infer_case.run,
    "ingest": data_case.run,
    "overhead": overhead_case.run,
    "serving": serve_case.run,
    "dask": dask_case.run,
    "loss": loss_case.run,
}


DEFAULT_CASES: tuple[str, ...] = ("train", "inference", "ingest", "overhead", "loss")
"""What a run without ``cases`` measures (``make bench``, about 10 minutes). ``dask`` trains the whole CPU
grid twice (about 10 minutes on a quiet 2-core machine, over an hour under heavy load):
``lerenet bench --only dask`` / ``make bench BENCH_ARGS="--only dask"``."""


@dataclass
class Context:
    """What a case gets: settings, validated project params, device, data source, a scratch folder."""

    settings: Settings
    params: Params
    device: torch.device
    source: Path
    workdir: Path
    extra: dict[str, Any] = field(default_factory=dict)


def _row_line(case: str, row: dict[str, Any]) -> str:
    def num(x: float) -> str:
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"

    return (f"| {case} | {row['label']} | {num(row['median'])} | {num(row['min'])} | {num(row['max'])} | "
            f"{row['unit']} | {row['n']} |")


def format_table(results: dict[str, Any]) -> str:
    """Markdown table of every figure: case, figure, median, min, max, unit, n (plus failed cases)."""
    lines = ["| case | figure | median | min | max | unit | n |", "| --- | --- | ---: | ---: | ---: | --- | ---: |"]
    for name, case in results["cases"].items():
        for row in case.get("rows", []):
            lines.append(_row_line(name, row))
        if case.get("error"):
            lines.append(f"| {name} | FAILED: {case['error'].splitlines()[0][:150]} | | | | | |")
    return "\n".join(lines)


def run_case(name: str, ctx: Context) -> dict[str, Any]:
    """Run one case under :class:`~pipeline.bench.harness.PeakMemory`; never raises for the case's own errors.

    Returns ``{"rows", "info", "memory", "seconds", "cpu_seconds", "error"}`` (wall and CPU seconds of
    this process and its children; ``error`` is ``None`` on success,
    else the exception text; the traceback goes to ``info["traceback"]``). The peak RSS is
    appended to ``rows`` as ``peak RSS (whole case)`` (and CUDA max allocated on CUDA).
    """
    t0, c0 = time.perf_counter(), harness.cpu_seconds()
    out: dict[str, Any] = {"rows": [], "info": {}, "memory": {}, "seconds": 0.0, "cpu_seconds": 0.0, "error": None}
    with harness.PeakMemory(ctx.device) as mem:
        try:
            res = CASES[name](ctx)
            out["rows"], out["info"] = res["rows"], res.get("info", {})
        except Exception as exc:  # noqa: BLE001 -- recorded; the other cases still run
            out["error"] = f"{type(exc).__name__}: {exc}"
            out["info"]["traceback"] = traceback.format_exc()
    out["memory"] = mem.result()
    if out["error"] is None:
        out["rows"].append({"label": "peak RSS of this process (whole case)",
                            **harness.summarize([out["memory"]["rss_peak_mib"]], "MiB").as_dict()})
        if out["memory"]["cuda_max_allocated_mib"] is not None:
            out["rows"].append({"label": "CUDA max allocated (whole case)",
                                **harness.summarize([out["memory"]["cuda_max_allocated_mib"]], "MiB").as_dict()})
    out["seconds"] = round(time.perf_counter() - t0, 2)
    out["cpu_seconds"] = round(harness.cpu_seconds() - c0, 2)
    return out


def run_bench(params: Params, *, cases: Sequence[str] | None = None, preset: str = "full",
              settings: Settings | None = None, device: str = "auto", out: Path | None = None,
              workdir: Path | None = None, keep: bool = False, threads: int | None = None,
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the benchmark and write its JSON results.

    Args:
        params: validated project params (``data.source`` is the benchmark data; ``folds`` the fold table).
        cases: names from :data:`CASES` (default: :data:`DEFAULT_CASES`, in table order).
        preset: ``"full"`` or ``"quick"`` (:data:`PRESETS`); ignored when ``settings`` is given.
        settings: explicit sizes (tests pass tiny ones).
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` (:func:`pipeline.device.resolve_device`).
        out: results file (default ``<params.root>/bench/results.json``); written atomically.
        workdir: scratch folder (default a new temporary folder, removed at the end unless ``keep``).
        threads: torch CPU threads of this process (default: every core, as training uses); the
            pipeline runs of ``overhead`` are separate processes and keep their own default.
        echo: progress lines go here.

    Returns:
        The results dict (also written to ``out``): ``schema``, ``created`` (UTC ISO), ``preset``,
        ``settings``, ``device``, ``machine``, ``load_average_start``/``_end``, ``cases`` (per case
        ``rows`` [{label, median, min, max, n, unit}], ``info``, ``memory``, ``seconds``, ``error``),
        ``total_seconds``, ``total_cpu_seconds`` (this process + children: on a loaded machine a
        better guide than wall time to how long a quiet one needs), ``table`` (markdown).

    Raises:
        ValueError: unknown case or preset name; device ``cuda`` without CUDA.
    """
    from pipeline import device as dev
    from pipeline.images import atomic_write_text

    names = list(cases) if cases else list(DEFAULT_CASES)
    unknown = [c for c in names if c not in CASES]
    if unknown:
        raise ValueError(f"unknown benchmark case(s) {unknown}; choose from {list(CASES)}")
    if settings is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {list(PRESETS)}")
        settings = PRESETS[preset]
    dev_ = dev.resolve_device(device)
    dev.configure_threads(dev_)
    if threads:
        torch.set_num_threads(threads)
    out = Path(out) if out is not None else Layout.of(params).bench_results
    own_tmp = workdir is None
    work = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="lerenet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    ctx = Context(settings=settings, params=params, device=dev_, source=Path(params.data.source), workdir=work)
    results: dict[str, Any] = {
        "schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "preset": preset if settings is PRESETS.get(preset) else "custom",
        "settings": asdict(settings), "device": str(dev_), "machine": harness.machine_info(dev_),
        "load_average_start": harness.load_average(), "cases": {},
    }
    t0, c0 = time.perf_counter(), harness.cpu_seconds()
    try:
        for name in names:
            echo(f"bench: {name} ...")
            res = run_case(name, ctx)
            results["cases"][name] = res
            echo(f"bench: {name} {'FAILED: ' + res['error'] if res['error'] else 'done'} in {res['seconds']:.1f} s")
    finally:
        if own_tmp and not keep:
            shutil.rmtree(work, ignore_errors=True)
    results["load_average_end"] = harness.load_average()
    results["total_seconds"] = round(time.perf_counter() - t0, 1)
    results["total_cpu_seconds"] = round(harness.cpu_seconds() - c0, 1)
    results["table"] = format_table(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(results, indent=2, default=str) + "\n")
    return results


def with_overrides(settings: Settings, *, repeats: int | None = None, warmup: int | None = None,
                   **changes: Any) -> Settings:
    """``settings`` with the non-``None`` ``changes`` applied (CLI flags). ``repeats``/``warmup`` set
    the train, inference and serving counts."""
    if repeats is not None:
        changes.update(train_repeats=repeats, infer_repeats=repeats, serve_repeats=repeats)
    if warmup is not None:
        changes.update(train_warmup=warmup, infer_warmup=warmup, serve_warmup=warmup)
    changes = {k: v for k, v in changes.items() if v is not None}
    return replace(settings, **changes) if changes else settings
