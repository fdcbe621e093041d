"""Helpers for tests that need the real local services on free loopback ports.

Not a test module: imported by tests/test_storage.py and tests/test_services.py.
"""

from __future__ import annotations

import socket
from contextlib import ExitStack
from pathlib import Path

import psutil

from pipeline.config import Params, load_params

PORT_KEYS = ("s3_port", "s3_grpc_port", "master_port", "master_grpc_port", "volume_port", "volume_grpc_port",
             "filer_port", "filer_grpc_port", "admin_port", "admin_grpc_port", "mlflow_port", "prefect_port")


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (held open together while picked)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    return ports


def services_params(state_dir: Path, **extra) -> Params:
    """Project params with every service port free and ``state_dir`` under the test's tmp folder."""
    services = dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS))))
    services.update(state_dir=str(state_dir), start_timeout=120, stop_timeout=30, **extra)
    return load_params(overrides={"services": services}, env={})


def assert_no_process(pids: list[int]) -> None:
    """Every pid in ``pids`` has exited (zombies of our own children count as exited)."""
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    assert not alive, f"processes still running: {alive}"
