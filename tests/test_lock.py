"""Issue 14.4: two training/promoting runs at once. Real second processes against one project lock, the
real Prefect global concurrency limit (session harness); the second run waits or exits with a clear message."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import write_small_params

ROOT = Path(__file__).resolve().parent.parent
LERENET = [sys.executable, "-m", "lerenet"]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **extra}
    env.pop("LERENET_LOCK_TIMEOUT", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # an earlier test's (stopped) server must not leak in: params.yaml decides
    env.update(extra)
    return env


def _holder(tmp_path: Path) -> subprocess.Popen:
    """A real process that takes the project lock of ``tmp_path`` and holds it until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from pipeline.lock import project_lock
        with project_lock({str(tmp_path / '.lerenet' / 'project.lock')!r}, "holder-under-test"):
            print("held", flush=True)
            sys.stdin.read()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=_env())
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.fixture
def params_file(tmp_path: Path, small_source: Path) -> Path:
    return write_small_params(tmp_path / "params.yaml", small_source, tmp_path / "data")


def test_concurrent_cli_train_exits_naming_the_holder(tmp_path, params_file):
    holder = _holder(tmp_path)
    try:
        record = json.loads((tmp_path / ".lerenet" / "project.lock.json").read_text())
        assert record["pid"] == holder.pid and record["command"] == "holder-under-test"
        assert record["host"] and record["started"].endswith("+00:00")
        out = subprocess.run([*LERENET, "train", "--fold", "0", "--model", "lerenet", "--params", str(params_file)],
                             capture_output=True, text=True, env=_env(), timeout=300)
        assert out.returncode == 75, out.stderr
        assert "another run holds the project lock" in out.stderr
        assert f"pid {holder.pid}" in out.stderr and "holder-under-test" in out.stderr
        assert "lock_timeout" in out.stderr
        assert not (tmp_path / "models").exists()  # nothing trained
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (tmp_path / ".lerenet" / "project.lock.json").exists()


def test_concurrent_second_run_waits_then_runs(tmp_path, params_file):
    holder = _holder(tmp_path)
    waiter = subprocess.Popen([*LERENET, "promote", "7", "--params", str(params_file)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=_env(LERENET_LOCK_TIMEOUT="120"))
    line = waiter.stderr.readline()
    while line and "waiting up to" not in line:
        line = waiter.stderr.readline()
    assert "waiting up to 120 s" in line and f"pid {holder.pid}" in line
    assert waiter.poll() is None  # still waiting while the lock is held
    holder.stdin.close()
    holder.wait(timeout=60)
    _, err = waiter.communicate(timeout=300)
    # it got the lock and ran the gate: the registry has no version 7 (a RegistryError, not a lock error)
    assert waiter.returncode == 1 and "another run holds" not in err and "v7 does not exist" in err, err


def test_concurrent_lock_of_a_killed_holder_is_free(tmp_path):
    from pipeline.lock import holder_record, project_lock

    holder = _holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    lock = tmp_path / ".lerenet" / "project.lock"
    assert holder_record(lock)["pid"] == holder.pid  # the dead holder's record is still there ...
    with project_lock(lock, "after-kill") as rec:  # ... but the OS released its lock
        assert rec["pid"] == os.getpid() and holder_record(lock)["command"] == "after-kill"
        with project_lock(lock, "re-entered"):  # re-entrant in one process
            pass
        assert holder_record(lock)["command"] == "after-kill"


def test_concurrent_flow_refused_while_a_cli_step_holds_the_lock(prefect_harness, tmp_path, params_file):
    from flows.training_pipeline import training_pipeline
    from pipeline.lock import ProjectLocked

    holder = _holder(tmp_path)
    try:
        with pytest.raises(ProjectLocked, match=f"pid {holder.pid}"):
            training_pipeline(str(params_file), None, None, False, False)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert not (tmp_path / "data" / "manifest.parquet").exists()  # not even ingest ran


def test_concurrent_flow_refused_by_the_prefect_concurrency_limit(prefect_harness, tmp_path, params_file):
    """A flow run on another machine (sharing the Prefect server) holds the global concurrency limit."""
    from prefect.concurrency.sync import concurrency

    from flows.exclusive import GCL_NAME, ensure_limit, prefect_slot
    from pipeline.lock import ProjectLocked

    ensure_limit()
    with concurrency(GCL_NAME, occupy=1, strict=True):  # the other run's slot
        with pytest.raises(ProjectLocked, match=GCL_NAME):
            with prefect_slot(0):
                pass
    with prefect_slot(0):  # free again
        with prefect_slot(0):  # re-entrant (retrain -> training_pipeline subflow)
            pass
