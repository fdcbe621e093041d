"""Benchmark: wall time of the same pipeline run by ``dvc repro`` and by the Prefect flow, side by side.

``python -m flows.overhead [--workdir DIR] [--repeats N]`` builds a throw-away DVC project in DIR
(this repository's ``dvc.yaml`` and code folders linked in, ``dvc init --no-scm``) with a tiny
config on real images (3 leather classes of ``data.source``, one test class per fold, 2 training
steps at 64 px, ``model.names: [lerenet]``), then alternates, from a clean state each time
(no data, models, metrics, MLflow store):

* ``dvc repro`` -- every stage is a ``lerenet ...`` process;
* ``lerenet flow training`` -- one process, Prefect's temporary local API (no ``PREFECT_API_URL``),
  ``dvc commit`` at the end.

Prints one JSON object: seconds per run, medians and the ratio flow / dvc.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
CLASSES = {0: ["Leather_Color"], 1: ["Leather_Cut"], 2: ["Leather_Glue"]}
OUTPUTS = ("data", "models", "metrics", "docs", "reports", "checkpoints", "mlruns.db", "mlartifacts", "dvc.lock")


def make_project(work: Path, source: Path) -> Path:
    """Create the benchmark project in ``work``; returns its params file."""
    work.mkdir(parents=True, exist_ok=True)
    src = work / "source"
    src.mkdir(exist_ok=True)
    for classes in CLASSES.values():
        for c in classes:
            if not (src / c).exists():
                os.symlink(source / c, src / c)
    for name in ("pipeline", "model", "lerenet", "flows"):
        if not (work / name).exists():
            os.symlink(ROOT / name, work / name)
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update({"source": str(src), "incoming": str(work / "incoming"), "dir": "data"})
    (work / "incoming").mkdir(exist_ok=True)
    raw["folds"] = CLASSES
    raw["model"]["names"] = ["lerenet"]
    raw["split"].update({"standard_episodes": 20, "standard_seeds": [0, 1]})
    raw["train"].update({"image_size": 64, "episodes": 4, "batch_size": 2, "feature_views": 1, "val_every": 2,
                         "val_episodes": 2, "checkpoint_every": 2, "device": "cpu"})
    raw["evaluate"].update({"latency_queries": 1, "overlay_episodes_per_class": 0})
    raw["mlflow"]["tracking_uri"] = "sqlite:///mlruns.db"
    raw.setdefault("services", {})["state_dir"] = ".lerenet"
    params = work / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False))
    if not (work / ".dvc").is_dir():
        subprocess.run([_bin("dvc"), "init", "--no-scm", "-q"], cwd=work, check=True, env=_env())
    return params


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "LERENET_PARAMS")}
    env.update({"DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_TELEMETRY": "false",
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    return env


def clean(work: Path) -> None:
    """Remove every output so the next run starts from nothing."""
    for name in OUTPUTS:
        p = work / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def timed(cmd: list[str], work: Path, log: Path) -> float:
    """Run ``cmd`` in ``work`` (output appended to ``log``); returns wall seconds; raises on failure."""
    t0 = time.perf_counter()
    with log.open("a") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n")
        fh.flush()
        r = subprocess.run(cmd, cwd=work, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with status {r.returncode}; see {log}")
    return dt


def main(argv: list[str] | None = None) -> dict:
    """Run the benchmark (module docstring) and print/return the JSON result."""
    from pipeline.config import load_params

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lerenet-overhead-"))
    source = load_params(ROOT / "params.yaml", env={}).data.source
    make_project(work, source)
    log = work / "overhead.log"
    runs: dict[str, list[float]] = {"dvc_repro": [], "prefect_flow": []}
    for _ in range(args.repeats):
        clean(work)
        runs["dvc_repro"].append(round(timed([_bin("dvc"), "repro", "-q"], work, log), 2))
        clean(work)
        runs["prefect_flow"].append(round(timed([_bin("lerenet"), "flow", "training", "--params", "params.yaml"],
                                                 work, log), 2))
    med = {k: statistics.median(v) for k, v in runs.items()}
    result = {"runs_s": runs, "median_s": med, "ratio_flow_over_dvc": round(med["prefect_flow"] / med["dvc_repro"], 3),
              "cpu_count": os.cpu_count(), "workdir": str(work), "config": "3 leather classes, 1 per fold; "
              "lerenet only; 2 steps x 2 episodes at 64 px; standard 2x20 episodes; K in {1,5}"}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":  # pragma: no cover
    main()
