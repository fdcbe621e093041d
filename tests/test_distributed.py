"""The training flow on a real Dask ``LocalCluster`` (prefect-dask) vs sequential vs a standalone ``train()``.

Issue 15 / 14.2: the same params give the same weights and metrics whether the fold x model grid
runs one task at a time in the flow process, on 2 Dask worker processes, or as a plain ``train()``
call; each training draws from its own generator. Real Prefect (session harness), real MLflow
(SQLite), real Dask scheduler and worker processes, the small real-image source of ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from test_flows import tiny_params_file

MODELS = ["lerenet", "baseline"]


def _project(root: Path, source: Path, runner: str, address: str | None = None, train: dict | None = None) -> Path:
    root.mkdir(parents=True)
    src = shutil.copytree(source, root / "source")
    pf = tiny_params_file(root, src)
    raw = yaml.safe_load(pf.read_text())
    raw["model"]["names"] = MODELS
    raw["train"].update(train or {})
    raw["distributed"] = {"runner": runner, "workers": 2, "address": address, "lock_timeout": 0}
    pf.write_text(yaml.safe_dump(raw, sort_keys=False))
    return pf


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from pipeline.checkpoint import load_model

    return load_model(path)[0].state_dict()


def _assert_same_grid(root: Path, seq: dict, dsk: dict) -> None:
    """The sequential (``root/seq``) and Dask (``root/dask``) flow runs gave the same CV summary, metrics
    files and weights of every (fold, model)."""
    assert seq["cv"] == dsk["cv"]
    assert _metrics(root / "seq") == _metrics(root / "dask")
    for fold in (0, 1, 2):
        for m in MODELS:
            rel = Path("models") / f"fold{fold}" / m / "model.pt"
            assert _same(_weights(root / "seq" / rel), _weights(root / "dask" / rel)), rel


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(root: Path) -> dict[str, object]:
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if "latency" not in k}
        return [strip(v) for v in x] if isinstance(x, list) else x

    files = sorted((root / "metrics").glob("fold*.json"))
    assert files, f"no metrics/fold*.json under {root}"
    return {f.name: strip(json.loads(f.read_text())) for f in files}


@pytest.fixture
def no_worker_torch_threads(monkeypatch):
    """Each process picks its own torch thread count (the local cluster sets its workers')."""
    monkeypatch.delenv("LERENET_TORCH_THREADS", raising=False)


def test_flow_on_dask_local_cluster_equals_sequential_and_standalone_train(
        prefect_harness, tmp_path, small_source, monkeypatch, no_worker_torch_threads):
    from flows.training_pipeline import training_pipeline
    from pipeline.config import load_params
    from pipeline.train import train

    monkeypatch.setenv("LERENET_TORCH_THREADS", "1")  # same intra-op thread count everywhere
    seq_pf = _project(tmp_path / "seq", small_source, "sequential")
    dask_pf = _project(tmp_path / "dask", small_source, "dask")
    seq = training_pipeline(str(seq_pf), None, None, False, False)
    dsk = training_pipeline(str(dask_pf), None, None, False, False)
    _assert_same_grid(tmp_path, seq, dsk)
    # the flow's fold-0 LERENet == a standalone train() of the same params (fresh state, no resume)
    params = load_params(seq_pf, env={})
    alone = train(params, 0, "lerenet", out_dir=tmp_path / "alone", checkpoint_file=tmp_path / "alone.pt",
                  curve_file=tmp_path / "alone.csv", track=False, progress=False)
    assert _same(_weights(alone.model_path), _weights(tmp_path / "dask" / "models/fold0/lerenet/model.pt"))


# ---------------------------------------------------------------------------
# a worker process killed (SIGKILL) in the middle of a training
# ---------------------------------------------------------------------------
LONGER = {"episodes": 80, "batch_size": 2, "checkpoint_every": 2, "val_every": 20}
"""40 optimiser steps per training, a checkpoint every 2: long enough to be caught mid-way (tens of seconds)."""
VICTIM = (0, "lerenet")


def running_trainings(dask_worker=None) -> dict:
    """On a Dask worker (``client.run``): its pid and the ``(fold, model)`` of every ``pipeline.train.train``
    call on the stack of any of its threads."""
    import sys

    found = []
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "train" and frame.f_globals.get("__name__") == "pipeline.train":
                found.append((frame.f_locals.get("fold"), frame.f_locals.get("model_name")))
                break
            frame = frame.f_back
    return {"pid": os.getpid(), "trainings": found}


class WorkerKiller(threading.Thread):
    """Waits until training ``VICTIM`` has checkpointed (mid-training) and SIGKILLs the worker process running it.

    Before the kill it leaves an orphan temporary file next to each of that training's outputs, as a
    kill in the middle of an atomic write would: the rescheduled attempt must clean them up.
    """

    def __init__(self, client, root: Path, timeout: float = 600) -> None:
        super().__init__(daemon=True)
        self.client, self.root, self.timeout = client, root, timeout
        self.killed: dict | None = None
        self.error: str | None = None
        self.planted: list[Path] = []

    def run(self) -> None:
        fold, model = VICTIM
        state = self.root / "checkpoints" / f"fold{fold}" / model / "state.pt"
        final = self.root / "models" / f"fold{fold}" / model / "model.pt"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if final.exists():
                self.error = f"{final} was written before the worker could be killed (training too short)"
                return
            if state.exists():
                for addr, info in self.client.run(running_trainings).items():
                    if list(VICTIM) in [list(t) for t in info["trainings"]]:
                        for target in (state, final, final.with_name("run.json")):
                            tmp = target.parent / f".{target.name}.k1ll3d00.tmp{target.suffix}"
                            tmp.parent.mkdir(parents=True, exist_ok=True)
                            tmp.write_bytes(b"half-written")
                            self.planted.append(tmp)
                        os.kill(info["pid"], signal.SIGKILL)
                        self.killed = {"address": addr, "pid": info["pid"], "at": time.time()}
                        return
            time.sleep(0.05)
        self.error = "training fold0/lerenet never ran"


def _transitions(dask_scheduler=None) -> list[tuple[str, str, str, str]]:
    """On the scheduler (``client.run_on_scheduler``): ``(key, start, finish, stimulus_id)`` of every transition."""
    return [(str(t.key), t.start, t.finish, t.stimulus_id) for t in dask_scheduler.transition_log]


def test_killed_worker_mid_training_is_rescheduled_and_the_result_is_unchanged(
        prefect_harness, tmp_path, small_source, monkeypatch, no_worker_torch_threads):
    """Issue 15: a Dask worker process SIGKILLed in the middle of a training task. Dask's scheduler sees the
    worker's connection drop, and reschedules the tasks it was running on another worker (the nanny also
    restarts the dead process); the training resumes from its last atomic checkpoint; the flow completes
    with the same weights and metrics as a sequential run, and no half-written file remains."""
    from distributed import Client, LocalCluster

    from flows.training_pipeline import training_pipeline
    from pipeline.checkpoint import load_model

    monkeypatch.setenv("LERENET_TORCH_THREADS", "1")
    seq_pf = _project(tmp_path / "seq", small_source, "sequential", train=LONGER)
    t0 = time.monotonic()
    seq = training_pipeline(str(seq_pf), None, None, False, False)
    seq_s = time.monotonic() - t0
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None,
                      env={"LERENET_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}) as cluster, \
            Client(cluster) as client:
        pids_before = {info["pid"] for info in client.run(running_trainings).values()}
        dask_pf = _project(tmp_path / "dask", small_source, "dask", address=cluster.scheduler_address, train=LONGER)
        killer = WorkerKiller(client, tmp_path / "dask", timeout=max(120.0, 3 * seq_s))
        killer.start()
        dsk = training_pipeline(str(dask_pf), None, None, False, False)
        killer.join(timeout=5)
        assert killer.error is None, killer.error
        assert killer.killed is not None and killer.killed["pid"] in pids_before
        with pytest.raises(ProcessLookupError):
            os.kill(killer.killed["pid"], 0)  # really gone
        log = client.run_on_scheduler(_transitions)
    # the scheduler moved the killed worker's task back and ran it again: some key was processing twice,
    # the second time after a worker-removal stimulus
    processing: dict[str, list[str]] = {}
    for key, _start, finish, stimulus in log:
        if finish == "processing":
            processing.setdefault(key, []).append(stimulus)
    rerun = {k: v for k, v in processing.items() if len(v) > 1}
    print(f"killed {killer.killed}; rescheduled {rerun}; sequential flow {seq_s:.0f} s")
    assert rerun, "no task was rescheduled after the worker was killed"
    assert all("train" in k for k in rerun), rerun
    # complete and correct: same metrics and weights as the sequential run
    _assert_same_grid(tmp_path, seq, dsk)
    for fold in (0, 1, 2):
        for m in MODELS:
            load_model(tmp_path / "dask" / "models" / f"fold{fold}" / m / "model.pt")  # complete model files
    # nothing half-written: no temporary file of an atomic write anywhere in the outputs
    for p in killer.planted:
        assert not p.exists(), f"orphan {p} of the killed attempt was not removed"
    leftovers = [p for sub in ("models", "checkpoints", "metrics") for p in (tmp_path / "dask" / sub).rglob(".*.tmp*")]
    assert leftovers == []
    for f in (tmp_path / "dask" / "metrics").glob("fold*.json"):
        json.loads(f.read_text())


def test_remove_stale_temps_removes_only_the_orphans_of_the_named_targets(tmp_path):
    """The temporaries of an atomic write whose process was SIGKILLed; other files are left alone."""
    import tempfile

    from pipeline.atomic import atomic_write_text, remove_stale_temps

    target = atomic_write_text(tmp_path / "model.pt", "complete")
    orphan = Path(tempfile.mkstemp(prefix=".model.pt.", suffix=".tmp.pt", dir=tmp_path)[1])
    other = Path(tempfile.mkstemp(prefix=".run.json.", suffix=".tmp.json", dir=tmp_path)[1])
    lookalike = tmp_path / ".model.pt.a.b.tmp.pt"
    lookalike.write_text("not ours")
    assert remove_stale_temps(target, tmp_path / "missing" / "x.csv") == [orphan]
    assert not orphan.exists() and other.exists() and lookalike.exists() and target.read_text() == "complete"
