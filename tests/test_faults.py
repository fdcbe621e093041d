"""Faults of the tracking server and of the disk, injected for real: a real ``mlflow server`` stopped and
restarted while a real training run flushes its metrics; a real ``ENOSPC`` from the kernel (``/dev/full``)."""

from __future__ import annotations

import errno
import logging
import threading

import pytest

from _mlflow_server import MlflowServer
from _train_data import load, shared_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    from pipeline.features import build_feature_store

    pf = shared_project(tmp_path_factory)
    build_feature_store(load(pf), progress=False)
    return pf


@pytest.fixture
def server(tmp_path):
    srv = MlflowServer(tmp_path / "mlflow").start()
    yield srv
    srv.stop()


def _disk_full() -> OSError:
    """A real ENOSPC: writing to /dev/full."""
    try:
        with open("/dev/full", "wb", buffering=0) as fh:
            fh.write(b"x" * 4096)
    except OSError as exc:
        return exc
    raise AssertionError("/dev/full accepted a write")


def test_outage_of_tracking_server_during_training_flush_is_retried_until_it_restarts(
        project, server, tmp_path, monkeypatch, caplog):
    """The server is stopped after step 2; the flush at the step-4 validation meets the outage, is retried
    with backoff while the server restarts (same port and database), and the run ends with every point."""
    import mlflow

    from pipeline.faults import is_transient
    from pipeline.tracking import log_metrics_batch
    from pipeline.train import train

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own retries off: ours are tested
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv("LERENET_TRACKING_RETRY_DELAYS", "1,2,4,8,15,30,30")
    monkeypatch.delenv("LERENET_PARENT_RUN_ID", raising=False)
    params = load(project, mlflow={"tracking_uri": server.url, "experiment": "outage"})
    caplog.set_level(logging.WARNING, logger="pipeline.faults")
    retried = threading.Event()

    class OnRetry(logging.Handler):
        def emit(self, record):
            if "retry" in record.getMessage():
                retried.set()

    handler = OnRetry()
    logging.getLogger("pipeline.faults").addHandler(handler)
    seen: dict = {}

    def restart_after_first_retry():
        seen["retried"] = retried.wait(120)
        server.start()

    def on_step(step, loss):
        if step == 2:
            server.stop()
            run_id = mlflow.active_run().info.run_id
            with pytest.raises(Exception) as down:  # what MLflow raises while the server is down ...
                log_metrics_batch(params, run_id, [("probe", 1.0, 0)])
            seen["classified_transient"] = is_transient(down.value)  # ... is transient (was not)
            threading.Thread(target=restart_after_first_retry, daemon=True).start()

    try:
        res = train(params, 0, "lerenet", out_dir=tmp_path / "out", checkpoint_file=tmp_path / "state.pt",
                    curve_file=tmp_path / "curve.csv", progress=False, on_step=on_step)
    finally:
        logging.getLogger("pipeline.faults").removeHandler(handler)
    assert seen == {"classified_transient": True, "retried": True}
    assert "transient" in caplog.text and "MlflowException" in caplog.text
    client = mlflow.MlflowClient(server.url)
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(res.run_id, "loss")] == list(range(1, 13))  # nothing lost
    assert [m.step for m in client.get_metric_history(res.run_id, "val_miou")] == [4, 8, 12]
    assert run.data.metrics["best_val_miou"] == pytest.approx(res.best_val_miou)


def test_outage_longer_than_the_retries_fails_with_the_tracking_error(server, small_params, monkeypatch):
    """Bounded: a server that stays down fails the call after the configured retries, with MLflow's error."""
    from mlflow.exceptions import MlflowException

    from pipeline.faults import retry_call
    from pipeline.tracking import client

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    params = load(small_params.root / "params.yaml", mlflow={"tracking_uri": server.url})
    c = client(params)
    server.stop()
    calls = []

    def call():
        calls.append(1)
        return c.search_experiments()

    with pytest.raises(MlflowException, match="API request to .* failed"):
        retry_call(call, "listing experiments", delays=[0, 0, 0])
    assert len(calls) == 4


def test_disk_full_is_never_retried():
    """A real ENOSPC (directly, chained under a tracking error, or SQLite's wording) fails at once."""
    from mlflow.exceptions import MlflowException

    from flows.common import is_transient as flow_is_transient
    from pipeline.faults import describe, is_transient, retry_call

    full = _disk_full()
    assert full.errno == errno.ENOSPC
    assert not is_transient(full) and not flow_is_transient(full)
    try:
        try:
            raise full
        except OSError:
            raise MlflowException("logging the training curve failed")  # chained by __context__
    except MlflowException as wrapped:
        assert not is_transient(wrapped)
    assert not is_transient(MlflowException("sqlite3.OperationalError: database or disk is full"))
    assert "disk full (never retried)" in describe(full)
    calls = []

    def write():
        calls.append(1)
        raise _disk_full()

    with pytest.raises(OSError) as err:
        retry_call(write, "writing", delays=[0, 0, 0])
    assert err.value.errno == errno.ENOSPC and len(calls) == 1
    # a connection error is retried, a permanent error is not
    assert is_transient(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert not is_transient(FileNotFoundError("data/validated.parquet"))


def test_prefect_task_is_not_retried_on_disk_full(prefect_harness):
    from prefect import flow, task

    from flows.common import TASK_OPTIONS

    calls = []

    @task(**{**TASK_OPTIONS, "retry_delay_seconds": 0, "retry_jitter_factor": None})
    def write_checkpoint() -> None:
        calls.append(1)
        raise _disk_full()

    @flow
    def f() -> None:
        write_checkpoint()

    with pytest.raises(OSError, match="No space left on device"):
        f()
    assert len(calls) == 1
