"""``lerenet bench``: the performance benchmark (``make bench``); table on stdout, JSON in bench/results.json."""

from __future__ import annotations

from pathlib import Path

import typer

from lerenet.app import app
from lerenet.commands._common import ParamsOption, fail, params_or_exit
from lerenet.help import PANEL_BENCH


@app.command("bench", rich_help_panel=PANEL_BENCH)
def bench_cmd(
    quick: bool = typer.Option(False, "--quick", help="smoke run: 1 repeat, small workloads"),
    only: list[str] = typer.Option(None, "--only", help="run only this case (repeatable): train, inference, "
                                   "ingest, overhead, serving, dask"),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    repeats: int = typer.Option(None, "--repeats", min=1, help="timed repeats of train/inference/serving "
                                 "(default: preset)"),
    warmup: int = typer.Option(None, "--warmup", min=0, help="warm-up runs of train/inference/serving "
                                "(default: preset)"),
    workers: int = typer.Option(None, "--workers", min=0, help="DataLoader workers of the image-based training case "
                                "(default: params train.num_workers)"),
    threads: int = typer.Option(None, "--threads", min=1, help="torch CPU threads of the in-process cases "
                                "(default: all cores)"),
    grid_episodes: int = typer.Option(None, "--grid-episodes", min=1, help="training episodes per cell of the "
                                      "dask case's CPU grid (default: params train.episodes)"),
    out: Path = typer.Option(None, "--out", help="results JSON (default <project>/bench/results.json)"),
    workdir: Path = typer.Option(None, "--workdir", help="scratch folder (default: a temporary one, removed)"),
    keep: bool = typer.Option(False, "--keep", help="keep the scratch folder (logs of the pipeline runs)"),
    params_file: Path = ParamsOption,
) -> None:
    """Measure training/inference speed, pipeline overhead, ingest throughput, served queries/s (a stored class
    vs supports in every request), the Dask grid and peak memory.

    Each figure is the median over repeats after a warm-up, with min and max; ratios come from runs
    made side by side. Exit status 1 if a case failed (the others still run and are written).

    Example:
      lerenet bench --quick --only inference --only ingest
      lerenet bench --only serving
    """
    from pipeline.bench.runner import CASES, PRESETS, run_bench, with_overrides
    from pipeline.layout import Layout

    params = params_or_exit(params_file)
    bad = [c for c in (only or []) if c not in CASES]
    if bad:
        fail(f"--only {bad[0]!r}: unknown case; choose from {', '.join(CASES)}", code=2)
    preset = "quick" if quick else "full"
    settings = with_overrides(PRESETS[preset], repeats=repeats, warmup=warmup, workers=workers,
                              dask_episodes=grid_episodes)
    try:
        results = run_bench(params, cases=only or None, preset=preset, settings=settings, device=device, out=out,
                            workdir=workdir, keep=keep, threads=threads, echo=lambda m: typer.echo(m, err=True))
    except ValueError as exc:
        fail(str(exc), code=2)
        return
    m = results["machine"]
    typer.echo(f"\n{m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads), device {results['device']}"
               f"{', GPU ' + m['gpu'] if m['gpu'] else ''}; load average {results['load_average_start']} -> "
               f"{results['load_average_end']}; {results['total_seconds']:.0f} s in all\n")
    typer.echo(results["table"])
    written = out or Layout.of(params).bench_results
    typer.echo(f"\nwrote {written}")
    failed = [n for n, c in results["cases"].items() if c["error"]]
    if failed:
        fail(f"case(s) failed: {', '.join(failed)} (tracebacks in the JSON under cases.<name>.info.traceback)")
