"""pipeline/services/: real SeaweedFS, MLflow and Prefect servers on free loopback ports.

The module fixture starts all three once (~25 s on 2 cores) and stops them at
the end, checking that no process is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml
from typer.testing import CliRunner

from _s3_server import PORT_KEYS, assert_no_process, free_ports, services_params
from pipeline import services as svc
from pipeline.config import DEFAULT_PARAMS, load_params

DATA = Path("/work/shared/datasets/defects12")
ENV = {"AWS_ACCESS_KEY_ID": "lerenet-svc-key", "AWS_SECRET_ACCESS_KEY": "lerenet-svc-secret-0123456789"}


def _tree_pids(pid: int) -> list[int]:
    try:
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _write_params(tmp: Path) -> Path:
    """A params file = the project's, with free ports and a tmp state dir (so the CLI can use it)."""
    raw = yaml.safe_load(DEFAULT_PARAMS.read_text())
    raw["data"]["source"] = str(DEFAULT_PARAMS.parent / raw["data"]["source"])
    raw["data"].pop("incoming", None)
    raw["services"].update(dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS)))))
    raw["services"]["state_dir"] = str(tmp / "state")
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """(params, params_file, {name: pid}) with all three services up; all stopped at module end."""
    tmp = tmp_path_factory.mktemp("services")
    pfile = _write_params(tmp)
    params = load_params(pfile, env={})
    rows = svc.up(params, env=ENV)
    pids = {r.name: r.pid for r in rows}
    trees = [q for pid in pids.values() for q in _tree_pids(pid)]
    try:
        yield params, pfile, pids
    finally:
        svc.down(params)
        assert_no_process(trees)


def test_up_all_healthy_on_loopback_only(running):
    params, _, pids = running
    assert list(pids) == ["seaweedfs", "mlflow", "prefect"]
    rows = {r.name: r for r in svc.status(params)}
    assert all(rows[n].state == "running" and rows[n].pid == pids[n] for n in pids)
    assert rows["mlflow"].url == f"http://127.0.0.1:{params.services.mlflow_port}"
    assert rows["prefect"].url == f"http://127.0.0.1:{params.services.prefect_port}/api"
    assert all(rows[n].rss_mb > 10 for n in pids)
    configured = {getattr(params.services, k) for k in PORT_KEYS}
    for name, pid in pids.items():
        for q in _tree_pids(pid):
            for c in psutil.Process(q).net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    assert c.laddr.ip == "127.0.0.1", f"{name} listens on {c.laddr}"
                    assert c.laddr.port in configured, f"{name} listens on unconfigured port {c.laddr.port}"
    for b in svc.buckets(params):
        assert svc.local_store(params, svc.ensure_credentials(params, ENV)).bucket_exists(b)
    assert (Path(params.services.state_dir) / "logs" / "mlflow.log").stat().st_size > 0


def test_second_up_starts_no_duplicates(running):
    params, _, pids = running
    rows = svc.up(params, env=ENV)
    assert {r.name: r.pid for r in rows} == pids
    assert all(r.note == "already running" for r in rows)
    state = str(params.services.state_dir)
    weeds = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] and "mini" in p.info["cmdline"]
             and any(state in a for a in p.info["cmdline"])]
    assert len(weeds) == 1


def test_cli_status_and_env(running):
    from lerenet.cli import app

    params, pfile, pids = running
    res = CliRunner().invoke(app, ["services", "status", "--params", str(pfile)])
    assert res.exit_code == 0, res.output
    for name, pid in pids.items():
        assert any(line.startswith(name) and "running" in line and str(pid) in line for line in res.output.splitlines())
    res = CliRunner().invoke(app, ["services", "env", "--params", str(pfile)])
    assert f"export MLFLOW_TRACKING_URI=http://127.0.0.1:{params.services.mlflow_port}" in res.output


def test_mlflow_artifacts_go_to_s3(running, tmp_path):
    from mlflow import MlflowClient

    params, _, _ = running
    client = MlflowClient(tracking_uri=svc.mlflow_tracking_uri(params))
    exp = client.create_experiment("services-test")
    run = client.create_run(exp)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"mIoU": 0.5}))
    client.log_artifact(run.info.run_id, str(card), artifact_path="cards")
    client.set_terminated(run.info.run_id)
    store = svc.local_store(params, svc.ensure_credentials(params, ENV))
    keys = store.list_keys(params.services.mlflow_bucket, params.services.mlflow_prefix + "/")
    wanted = [k for k in keys if run.info.run_id in k and k.endswith("cards/card.json")]
    assert wanted, keys
    assert json.loads(store.get_bytes(params.services.mlflow_bucket, wanted[0])) == {"mIoU": 0.5}


def _run(cmd: list[str], cwd: Path) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k, None)  # credentials must come from .dvc/config.local
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r.stdout


@pytest.mark.skipif(not DATA.is_dir(), reason="real data set not present")
def test_dvc_push_pull_roundtrip_real_images(running, tmp_path):
    params, _, _ = running
    repo = tmp_path / "repo"
    (repo / "data" / "Images").mkdir(parents=True)
    (repo / "data" / "GT").mkdir()
    originals = {}
    for img in sorted((DATA / "MT_Crack" / "Images").glob("*.jpg"))[:3]:
        for src, dst in ((img, repo / "data" / "Images" / img.name),
                         (DATA / "MT_Crack" / "GT" / f"{img.stem}.png", repo / "data" / "GT" / f"{img.stem}.png")):
            shutil.copyfile(src, dst)
            originals[dst.relative_to(repo)] = src.read_bytes()
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo)
    _run([*dvc, "init", "-q"], repo)
    _run([*dvc, "add", "-q", "data"], repo)
    url = svc.configure_dvc_remote(params, repo, default=True, env=ENV)
    assert url == f"s3://{params.services.dvc_bucket}/{params.services.dvc_prefix}"
    assert ENV["AWS_SECRET_ACCESS_KEY"] in (repo / ".dvc" / "config.local").read_text()
    assert ENV["AWS_SECRET_ACCESS_KEY"] not in (repo / ".dvc" / "config").read_text()
    assert ".dvc/config.local" not in _run(["git", "status", "--porcelain", "--untracked-files=all"], repo)
    _run([*dvc, "push", "-q"], repo)
    store = svc.local_store(params, svc.ensure_credentials(params, ENV))
    keys = store.list_keys(params.services.dvc_bucket, params.services.dvc_prefix + "/")
    assert len(keys) == len(originals) + 1, keys  # one object per file + the directory listing (.dir)
    shutil.rmtree(repo / "data")
    shutil.rmtree(repo / ".dvc" / "cache")
    _run([*dvc, "pull", "-q"], repo)
    assert {p: (repo / p).read_bytes() for p in originals} == originals


def test_down_stops_everything_in_order(running):
    params, _, pids = running
    extra = svc.start_process(params, "prefect-serve", [sys.executable, "-c", "import time; time.sleep(600)"])
    trees = [q for pid in [*pids.values(), extra.pid] for q in _tree_pids(pid)]
    results = svc.down(params)
    assert [n for n, _ in results] == ["prefect-serve", "prefect", "mlflow", "seaweedfs"]
    assert all(r == "stopped" for _, r in results), results
    assert_no_process(trees)
    assert all(r.state == "stopped" for r in svc.status(params))
    assert svc.registered_names(params) == []
    s = params.services
    assert not Path(f"/tmp/seaweedfs-s3-grpc-{s.s3_grpc_port}.sock").exists()
    assert not Path(f"/tmp/seaweedfs-admin-grpc-{s.admin_grpc_port}.sock").exists()
    assert svc.down(params) == [("prefect", "not running"), ("mlflow", "not running"), ("seaweedfs", "not running")]


def test_stale_pid_files_are_handled(tmp_path):
    params = services_params(tmp_path / "state")
    pid_dir = tmp_path / "state" / "pids"
    pid_dir.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # a dead pid, and a live pid that belongs to another process (this one: pid reused)
    (pid_dir / "seaweedfs.json").write_text(json.dumps({"pid": dead.pid, "create_time": 1.0}))
    (pid_dir / "mlflow.json").write_text(json.dumps({"pid": os.getpid(), "create_time": 1.0}))
    assert svc.down(params, ["mlflow"]) == [("mlflow", "stale pid file removed")]
    assert psutil.pid_exists(os.getpid())  # the unrelated process was not signalled
    rows = {r.name: r for r in svc.status(params)}
    assert rows["seaweedfs"].state == "stopped" and rows["seaweedfs"].note == "stale pid file removed"
    (pid_dir / "seaweedfs.json").write_text(json.dumps({"pid": dead.pid, "create_time": 1.0}))
    rows = svc.up(params, ["seaweedfs"], env=ENV)
    try:
        assert rows[0].note == "started" and rows[0].pid != dead.pid
    finally:
        tree = _tree_pids(rows[0].pid)
        assert svc.down(params) [-1] == ("seaweedfs", "stopped")
        assert_no_process(tree)


def test_port_in_use_fails_fast_naming_the_port(tmp_path):
    params = services_params(tmp_path / "state")
    with socket.socket() as s:
        s.bind(("127.0.0.1", params.services.s3_port))
        s.listen()
        with pytest.raises(svc.ServiceError, match=rf"127.0.0.1:{params.services.s3_port} \(services.s3_port\) is in use"):
            svc.up(params, ["mlflow"], env=ENV)  # mlflow requires seaweedfs, which cannot bind
    assert svc.registered_names(params) == []


def test_unknown_service_and_bad_host_are_clear_errors(tmp_path):
    params = services_params(tmp_path / "state")
    with pytest.raises(svc.ServiceError, match=r"unknown service\(s\) \['minio'\]"):
        svc.up(params, ["minio"], env=ENV)
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="services.host.*loopback"):
        load_params(overrides={"services": {"host": "0.0.0.0"}}, env={})


def test_start_failure_and_health_timeout_leave_nothing_running(tmp_path):
    params = services_params(tmp_path / "state")
    # children started earlier in this pytest process (e.g. the session's Prefect test server) are not ours
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    crash = [sys.executable, "-c", "import sys; print('boom: bad flag'); sys.exit(3)"]
    with pytest.raises(svc.ServiceError, match=r"(?s)crasher exited with status 3 during start-up.*boom: bad flag"):
        svc.start_process(params, "crasher", crash, health=lambda: False)
    hang = [sys.executable, "-c", "import time; time.sleep(600)"]
    with pytest.raises(svc.ServiceError, match=r"hanger not healthy after 1 s"):
        svc.start_process(params, "hanger", hang, health=lambda: False, timeout=1.0)
    assert svc.registered_names(params) == []
    leftovers = [p for p in psutil.Process().children(recursive=True)
                 if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
    assert not leftovers, leftovers
