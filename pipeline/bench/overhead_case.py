"""Benchmark case ``overhead``: one tiny training pipeline run three ways, side by side.

A throw-away git + DVC project (``git init``, ``dvc init``) holds a copy of the project's
``dvc.yaml``, links to the code folders, a small copy of the real data (one class per fold) and a
tiny ``params.yaml`` (:func:`pipeline.bench.workspace.tiny_overrides`: ``lerenet`` only, K = 1,
2 training steps of 2 episodes at 64 px). From a clean state each time (no data, models,
metrics, MLflow store, DVC cache or ``dvc.lock``) it runs, as separate processes:

* ``plain``   -- ``python -m pipeline.bench.plain``: the step functions in order, one process;
* ``dvc``     -- ``dvc repro --no-run-cache``: every stage a ``lerenet ...`` process;
* ``prefect`` -- ``lerenet flow training``: the Prefect flow, no server configured (Prefect starts
  its temporary local API; ``PREFECT_HOME`` inside the project), ``dvc commit`` at its end.

Set-up does each tool's one-time initialisation (``git init``, ``dvc init``, ``prefect server
database upgrade`` in the project's ``PREFECT_HOME``). Warm-up: ``overhead_warmup`` untimed
``plain`` runs, which read every code and data file that the three modes share (page cache,
bytecode). Then ``overhead_repeats`` rounds, each running the three modes, in an order rotated from
round to round. Figures per mode: wall seconds, CPU seconds (user + system of the process and all
its descendants, from ``os.wait4``: much less sensitive than wall time to other load on the
machine), the per-round ratios dvc/plain, prefect/plain and prefect/dvc of both, and the peak RSS of
the largest single process and of all processes of a run together (the process tree sampled with
``psutil`` every 0.1 s; ``ru_maxrss`` cannot be used: Linux copies the parent's value into a forked
child).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from pipeline.bench import workspace
from pipeline.bench.harness import ratio_stats, run_logged, summarize
from pipeline.config import DEFAULT_PARAMS
from pipeline.layout import Layout

MODES = ("plain", "dvc", "prefect")
CODE_DIRS = ("pipeline", "model", "lerenet", "flows")
OUTPUTS = ("data", "models", "metrics", "docs", "reports", "checkpoints", "mlruns.db", "mlartifacts", "dvc.lock",
           ".dvc/cache", ".dvc/tmp")


class OverheadError(RuntimeError):
    """A pipeline run of the overhead case failed; the message names the mode and the log file."""


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run_env(root: Path) -> dict[str, str]:
    """Environment of every run: telemetry off, no external Prefect/MLflow server, venv first on PATH."""
    drop = {"MLFLOW_TRACKING_URI", "PREFECT_API_URL", "LERENET_PARAMS", "LERENET_PARENT_RUN_ID", "LERENET_PROFILE",
            "LERENET_SOURCE", "LERENET_INCOMING"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update({"DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "DO_NOT_TRACK": "1", "MLFLOW_ENABLE_TELEMETRY": "false", "PREFECT_HOME": str(root / ".prefect"),
                # Prefect's default 20 s for its temporary API to start is too short on a loaded 2-core machine
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": env.get(
                    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300"),
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"})
    return env


def commands() -> dict[str, list[str]]:
    """The command line of each mode (run in the project folder)."""
    return {
        "plain": [sys.executable, "-m", "pipeline.bench.plain", "--params", "params.yaml"],
        "dvc": [_bin("dvc"), "repro", "--no-run-cache", "-q"],
        "prefect": [_bin("lerenet"), "flow", "training", "--params", "params.yaml"],
    }


def make_project(root: Path, source: Path, classes: tuple[str, ...], images_per_class: int) -> Path:
    """Create the throw-away git + DVC project in ``root`` (module docstring); returns its params file.

    Raises:
        subprocess.CalledProcessError: ``git init`` or ``dvc init`` failed.
    """
    project = DEFAULT_PARAMS.parent
    root.mkdir(parents=True, exist_ok=True)
    src = workspace.make_small_source(source, root / "source", classes, images_per_class, normals_per_class=2)
    for name in CODE_DIRS:
        if not (root / name).exists():
            os.symlink(project / name, root / name)
    shutil.copy(project / "dvc.yaml", root / "dvc.yaml")
    pf = workspace.write_params(root / "params.yaml", src, workspace.tiny_overrides(classes))
    env = run_env(root)
    if not (root / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=root, env=env, check=True)
    if not (root / ".dvc").is_dir():
        subprocess.run([_bin("dvc"), "init", "-q"], cwd=root, env=env, check=True)
    if not (root / ".prefect").is_dir():
        subprocess.run([_bin("prefect"), "server", "database", "upgrade", "-y"], cwd=root, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return pf


def clean(root: Path) -> None:
    """Remove every output (and the DVC cache) so that the next run starts from nothing."""
    for name in OUTPUTS:
        p = root / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


class TreeMemory:
    """Samples the RSS of a process and all its descendants (``psutil``) every ``interval`` s in a thread.

    ``largest_mib``: peak RSS of any single process; ``total_mib``: peak of the sum over the tree.
    """

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval = pid, interval
        self.largest_mib = self.total_mib = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-tree-rss", daemon=True)

    def _run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            sizes = []
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    sizes.append(p.memory_info().rss / 2**20)
                except psutil.Error:
                    pass
            if sizes:
                self.largest_mib = max(self.largest_mib, max(sizes))
                self.total_mib = max(self.total_mib, sum(sizes))
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_once(cmd: list[str], root: Path, log: Path) -> tuple[float, float, float, float]:
    """Run ``cmd`` in ``root`` (output appended to ``log``).

    Returns ``(wall s, CPU s, largest process peak RSS MiB, process tree peak RSS MiB)``; CPU seconds
    are user + system time of the process and the descendants it waited for (``os.wait4``), the
    memory figures come from :class:`TreeMemory`.

    Raises:
        OverheadError: non-zero exit status or no ``reports/registry.json`` at the end (names the log).
    """
    code, wall, cpu, mem = run_logged(cmd, root, run_env(root), log, TreeMemory)
    if code != 0:
        raise OverheadError(f"`{' '.join(cmd)}` exited with status {code}; see {log}")
    if not Layout(root, root / "data").registry_record.is_file():
        raise OverheadError(f"`{' '.join(cmd)}` ended without writing reports/registry.json; see {log}")
    return wall, cpu, mem.largest_mib, mem.total_mib


def run(ctx: Any) -> dict[str, Any]:
    """Measure the three modes (module docstring) with ``ctx`` (:class:`pipeline.bench.runner.Context`)."""
    s = ctx.settings
    root = ctx.workdir / "overhead"
    make_project(root, ctx.source, tuple(s.overhead_classes), s.overhead_images_per_class)
    log = root / "overhead.log"
    cmds = commands()
    wall: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    rss: dict[str, list[float]] = {m: [] for m in MODES}
    tree: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(s.overhead_warmup):
        clean(root)
        run_once(cmds["plain"], root, log)
    for r in range(s.overhead_repeats):
        for mode in MODES[r % 3:] + MODES[:r % 3]:
            clean(root)
            w, c, m, t = run_once(cmds[mode], root, log)
            wall[mode].append(w)
            cpu[mode].append(c)
            rss[mode].append(m)
            tree[mode].append(t)
    rows: list[dict[str, Any]] = []
    for mode in MODES:
        rows.append({"label": f"{mode}: wall seconds per pipeline run", **summarize(wall[mode], "s").as_dict()})
    for a, b in (("dvc", "plain"), ("prefect", "plain"), ("prefect", "dvc")):
        rows.append({"label": f"{a} / {b} wall time", **ratio_stats(wall[a], wall[b]).as_dict()})
    for mode in MODES:
        rows.append({"label": f"{mode}: CPU seconds per pipeline run", **summarize(cpu[mode], "s").as_dict()})
    for a, b in (("dvc", "plain"), ("prefect", "plain"), ("prefect", "dvc")):
        rows.append({"label": f"{a} / {b} CPU time", **ratio_stats(cpu[a], cpu[b]).as_dict()})
    for mode in MODES:
        rows.append({"label": f"{mode}: peak RSS of largest process", **summarize(rss[mode], "MiB").as_dict()})
        rows.append({"label": f"{mode}: peak RSS of all its processes", **summarize(tree[mode], "MiB").as_dict()})
    info = {"project": str(root), "log": str(log), "commands": {m: " ".join(c) for m, c in cmds.items()},
            "classes": list(s.overhead_classes), "images_per_class": s.overhead_images_per_class,
            "config": "one class per fold (3 folds), lerenet only, K=1, 2 steps x 2 episodes at 64 px, "
                      "10 standard episodes; every run from a clean state (no outputs, MLflow store, DVC cache)",
            "warmup_plain_runs": s.overhead_warmup, "rounds": s.overhead_repeats}
    return {"rows": rows, "info": info}
