"""Benchmark: training episodes/s with and without the feature cache (frozen backbone).

Usage (after ingest/validate/split, and `lerenet features` for the cached case):

    python -m pipeline.bench.train_speed --params params.yaml --fold 0 --model lerenet --steps 20

Runs ``pipeline.train.train`` for ``--steps`` optimiser steps (batch ``train.batch_size``) twice:
on cached features (``use_cache=True``) and on images with the backbone in the loop
(``use_cache=False``), without MLflow, into a temporary folder. Prints wall-clock and process
CPU time per episode; the first ``--warmup`` steps are excluded. Not a unit test: timings depend
on the machine and its load (report the CPU model and `uptime` load with the figures).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config import load_params
from pipeline.train import train


def run(params_file: Path, fold: int, model: str, steps: int, warmup: int, use_cache: bool, threads: int) -> dict:
    """Train ``steps`` (+ ``warmup``) steps of ``model`` on ``fold`` with or without the cache; returns
    episodes/s and wall/CPU ms per episode (warm-up excluded)."""
    params = load_params(params_file, overrides={"train": {"episodes": (steps + warmup) * 8, "batch_size": 8,
                                                             "val_every": 10**6, "checkpoint_every": 10**6,
                                                             "val_episodes": 1}})
    marks: list[tuple[float, float]] = []

    def on_step(step: int, loss: float) -> None:
        marks.append((time.perf_counter(), time.process_time()))

    with tempfile.TemporaryDirectory() as tmp:
        if threads:
            import pipeline.device as dev

            dev.configure_threads = lambda device: torch.set_num_threads(threads) or threads  # type: ignore[assignment]
        train(params, fold, model, Path(tmp), checkpoint_file=Path(tmp) / "s.pt", curve_file=Path(tmp) / "c.csv",
              use_cache=use_cache, track=False, progress=False, on_step=on_step)
    (w0, c0), (w1, c1) = marks[warmup - 1], marks[-1]
    n = (len(marks) - warmup) * params.train.batch_size
    return {"cache": use_cache, "model": model, "episodes": n, "episodes_per_s": round(n / (w1 - w0), 2),
            "wall_ms_per_episode": round(1000 * (w1 - w0) / n, 1), "cpu_ms_per_episode": round(1000 * (c1 - c0) / n, 1),
            "threads": torch.get_num_threads()}


def main() -> None:
    """Command-line entry (module docstring): one JSON line per configuration."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=None)
    ap.add_argument("--fold", type=int, default=0)
    ap.add_argument("--model", default="lerenet")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores, as training does)")
    ap.add_argument("--only", choices=["cache", "nocache"], default=None)
    a = ap.parse_args()
    for use_cache in (True, False):
        if a.only and (a.only == "cache") != use_cache:
            continue
        print(json.dumps(run(a.params, a.fold, a.model, a.steps, a.warmup, use_cache, a.threads)), flush=True)


if __name__ == "__main__":
    main()
