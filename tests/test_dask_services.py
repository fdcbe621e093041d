"""``lerenet services up --only dask``: a real ``dask scheduler`` + 2 ``dask worker`` processes on free loopback ports.

Started through the CLI, used by a real ``distributed.Client`` (a task runs on a worker and imports this
checkout's code with the configured torch threads), shown by ``status`` and ``env``, stopped by ``down``:
afterwards no process of the cluster is left and every port is free again.
"""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import psutil
import pytest
import yaml
from typer.testing import CliRunner

from _s3_server import PORT_KEYS, assert_no_process, free_ports
from pipeline import services as svc
from pipeline.config import DEFAULT_PARAMS, load_params
from pipeline.services import dask_cluster

ROOT = Path(__file__).resolve().parent.parent


def _free_run(n: int) -> int:
    """First of ``n`` consecutive TCP ports free on 127.0.0.1 (worker + nanny ports)."""
    for _ in range(200):
        base = random.randint(30000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def _params_file(tmp: Path) -> Path:
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["data"]["source"] = str(DEFAULT_PARAMS.parent / raw["data"]["source"])
    raw["data"].pop("incoming", None)
    ports = free_ports(len(PORT_KEYS) + 2)
    raw["services"].update(dict(zip(PORT_KEYS, ports)))
    raw["services"].update(state_dir=str(tmp / "state"), dask_scheduler_port=ports[-2], dask_dashboard_port=ports[-1],
                           dask_workers=2, dask_worker_port=_free_run(6), start_timeout=120, stop_timeout=20)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _tree(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def test_services_up_dask_runs_tasks_and_down_leaves_nothing(tmp_path, monkeypatch):
    from distributed import Client

    from lerenet.cli import app

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    pf = _params_file(tmp_path)
    params = load_params(pf, env={})
    cli = CliRunner()
    res = cli.invoke(app, ["services", "up", "--only", "dask", "--params", str(pf)])
    assert res.exit_code == 0, res.output
    pids = {r.name: r.pid for r in svc.status(params) if r.pid}
    trees = [q for pid in pids.values() for q in _tree(pid)]
    try:
        assert set(pids) == {"dask-scheduler", "dask-worker-0", "dask-worker-1"}, res.output
        address = dask_cluster.scheduler_address(params)
        assert address == f"tcp://127.0.0.1:{params.services.dask_scheduler_port}"
        # every process of the cluster listens on 127.0.0.1 and on its configured port only
        s = params.services
        allowed = {s.dask_scheduler_port, s.dask_dashboard_port, *range(s.dask_worker_port, s.dask_worker_port + 6)}
        for pid in trees:
            for c in psutil.Process(pid).net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    assert c.laddr.ip == "127.0.0.1" and c.laddr.port in allowed, (pid, c.laddr)
        # status and env (the CLI)
        out = cli.invoke(app, ["services", "status", "--params", str(pf)]).output
        for name in pids:
            assert any(line.startswith(name) and " running " in line for line in out.splitlines()), out
        assert "lerenet-worker-0 at tcp://127.0.0.1:" in out
        env = cli.invoke(app, ["services", "env", "--params", str(pf)]).output
        assert f"export LERENET_DASK_ADDRESS={address}" in env.splitlines(), env
        # a second up starts nothing new
        again = svc.up(params, only=["dask"])
        assert {r.name: r.pid for r in again} == pids and all(r.note == "already running" for r in again)

        # real work: tasks run in the worker processes, import this checkout's code, 1 torch thread each
        def probe() -> dict:
            import os as _os

            import torch

            import pipeline
            from pipeline import device

            device.configure_threads(torch.device("cpu"))
            return {"pid": _os.getpid(), "code": pipeline.__file__, "threads": torch.get_num_threads()}

        with Client(address, timeout=60) as client:
            assert len(client.scheduler_info()["workers"]) == 2
            results = client.gather([client.submit(probe, pure=False) for _ in range(4)])
        worker_pids = {q for name, pid in pids.items() if name != "dask-scheduler" for q in _tree(pid)}
        assert {r["pid"] for r in results} <= worker_pids
        assert all(Path(r["code"]).resolve().is_relative_to(ROOT) for r in results), results
        assert {r["threads"] for r in results} == {max(1, (os.cpu_count() or 1) // 2)}
    finally:
        res = cli.invoke(app, ["services", "down", "--only", "dask", "--params", str(pf)])
    assert res.exit_code == 0, res.output
    assert [ln.split(":")[0] for ln in res.output.splitlines()] == ["dask-worker-0", "dask-worker-1", "dask-scheduler"]
    assert_no_process(trees)
    assert not any(dask_cluster.is_dask_name(n) for n in svc.registered_names(params))
    assert "LERENET_DASK_ADDRESS" not in cli.invoke(app, ["services", "env", "--params", str(pf)]).output
    ports = [s.dask_scheduler_port, s.dask_dashboard_port, *range(s.dask_worker_port, s.dask_worker_port + 6)]
    assert all(svc.processes.port_free("127.0.0.1", p) for p in ports)


def test_dask_worker_ports_must_not_overlap_other_services(tmp_path):
    pf = _params_file(tmp_path)
    raw = yaml.safe_load(pf.read_text())
    raw["services"]["dask_dashboard_port"] = raw["services"]["dask_worker_port"] + 3
    pf.write_text(yaml.safe_dump(raw))
    with pytest.raises(svc.ServiceError, match=r"services.dask_dashboard_port lies in the Dask worker ports"):
        dask_cluster.up(load_params(pf, env={}), timeout=5)
    assert svc.registered_names(load_params(pf, env={})) == []
