"""What a person sees on the console: a successful ``lerenet flow retrain`` prints no ERROR and no traceback.

The command runs for real in a subprocess, as a user runs it: no ``PREFECT_API_URL`` (Prefect starts its
temporary server), no ``MLFLOW_TRACKING_URI`` (the params file's SQLite registry), none of the telemetry
switches the test session sets for itself, this checkout's code first on ``PYTHONPATH``. The tiny real-data
project of tests/test_flows.py; Prefect's home in tmp_path, so no other run's database is shared.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_flows import INCOMING, ROOT, tiny_params_file

#: variables the test session (conftest.py) or a developer's shell may set that a user's shell has not
USER_UNSET = ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_SERVER_ANALYTICS_ENABLED",
              "DO_NOT_TRACK", "GX_ANALYTICS_ENABLED", "DVC_NO_ANALYTICS", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR",
              "LERENET_PARAMS", "LERENET_SOURCE", "LERENET_INCOMING", "PREFECT_HOME")


def _retrain(pfile: Path, home: Path) -> str:
    """Run ``lerenet flow retrain --params pfile``; returns stdout + stderr (interleaved as on a terminal)."""
    env = {k: v for k, v in os.environ.items() if k not in USER_UNSET}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), PREFECT_HOME=str(home),
               LERENET_TORCH_THREADS=env.get("LERENET_TORCH_THREADS", "1"))
    proc = subprocess.run([sys.executable, "-m", "lerenet", "flow", "retrain", "--params", str(pfile)],
                          cwd=pfile.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc.stdout


def _assert_clean(out: str) -> None:
    bad = [line for line in out.splitlines()
           if re.search(r"\bERROR\b|Traceback|Failed to send telemetry|database is locked|Downloading artifacts", line)]
    assert not bad, "\n".join(bad[:20])
    assert "was not provided" not in out  # MLflow's "input example was not provided" (once per logged model)


@pytest.mark.slow
def test_successful_retrain_prints_no_error_or_traceback(tmp_path, small_source):
    """Two real retrains: the first (nothing registered yet) ingests the source's classes, trains, registers v1
    and promotes it; the second finds Leather_Fold in data.incoming, probes the champion, retrains, registers
    v2 and gates it. Both exit 0 and print no ERROR, traceback, telemetry failure or download bar -- and the
    champion's register run carries its pictures."""
    if not (INCOMING / "Leather_Fold").is_dir():
        pytest.skip(f"{INCOMING / 'Leather_Fold'} not available (set LERENET_TEST_INCOMING)")
    pfile = tiny_params_file(tmp_path, small_source)
    raw = yaml.safe_load(pfile.read_text())
    raw["evaluate"]["overlay_episodes_per_class"] = 1  # sheets drawn, copied onto the champion's runs
    pfile.write_text(yaml.safe_dump(raw, sort_keys=False))

    first = _retrain(pfile, tmp_path / "prefect-home")
    _assert_clean(first)
    assert '"status": "retrained"' in first and "Finished in state Completed()" in first

    raw = yaml.safe_load(pfile.read_text())
    raw["data"]["incoming"] = str(INCOMING)
    pfile.write_text(yaml.safe_dump(raw, sort_keys=False))
    second = _retrain(pfile, tmp_path / "prefect-home")
    _assert_clean(second)
    result = json.loads(re.search(r"^\{$.*?^\}$", second, re.M | re.S).group(0))  # the result the command prints
    assert result["status"] == "retrained" and result["new_classes"] == ["Leather_Fold"]
    assert result["champion_probed"] == "1" and result["training"]["version"] == "2"

    # the registered champion's run has its pictures (one sheet per fold, K=1 and K=5, and the chart)
    from pipeline import registry as R
    from pipeline.config import load_params

    params = load_params(pfile, env={})
    client = R.client(params)
    champion = R.alias_version(params, R.CHAMPION)
    run_id = client.get_model_version(params.mlflow.registered_model, champion).run_id
    names = {a.path for a in client.list_artifacts(run_id, "pictures")}
    assert "pictures/per_class_iou.png" in names and {f"pictures/fold{f}" for f in params.folds} <= names
    assert {a.path for a in client.list_artifacts(run_id, "pictures/fold0")} == {
        "pictures/fold0/overlays_k1_paper.png", "pictures/fold0/overlays_k5_paper.png"}
    assert client.get_run(run_id).data.tags["decision"] in ("promoted", "not promoted")
