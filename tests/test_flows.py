"""Prefect flows: same steps as dvc.yaml, transient-only retries, failures promote nothing, new-class retrain.

Real Prefect (one session-scoped ``prefect_test_harness``), real MLflow on SQLite in tmp_path, the
small real-image source of ``conftest.py`` and the real incoming class
``/work/shared/datasets/incoming/Leather_Fold``.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_small_params
from flows.common import TASK_OPTIONS, is_transient
from pipeline import registry as R
from pipeline.config import load_params

ROOT = Path(__file__).resolve().parent.parent
INCOMING = Path(os.environ.get("LERENET_TEST_INCOMING", "/work/shared/datasets/incoming"))

TINY = {
    "model": {"names": ["lerenet"]},
    "train": {"image_size": 64, "episodes": 4, "batch_size": 2, "feature_views": 1, "val_every": 2,
              "val_episodes": 2, "checkpoint_every": 2, "device": "cpu",
              "untrained_models": []},  # the flows' training, resume and retry paths need a trained LERENet
    "evaluate": {"latency_queries": 1, "overlay_episodes_per_class": 0},
}


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri(monkeypatch):
    """``mlflow.set_tracking_uri`` exports ``$MLFLOW_TRACKING_URI``, which ``load_params`` honours:
    without this, a flow would follow the registry of the previous test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def tiny_params_file(tmp_path: Path, source: Path, incoming: Path | None = None) -> Path:
    """The project's params.yaml (every key, so DVC finds each tracked param) made tiny: the small
    real-image source (3 classes, one per fold), 2 training steps at 64 px, registry in tmp_path."""
    from pipeline.config import _deep_merge

    small = yaml.safe_load(write_small_params(tmp_path / "params.yaml", source, tmp_path / "data").read_text())
    raw = _deep_merge(yaml.safe_load((ROOT / "params.yaml").read_text()), {**small, **TINY})
    raw["folds"] = small["folds"]
    raw["data"]["incoming"] = str(incoming) if incoming else None
    raw["services"] = {**raw.get("services", {}), "state_dir": str(tmp_path / ".lerenet")}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------
# flow <-> dvc.yaml
# ---------------------------------------------------------------------------
def test_flow_and_dvc_yaml_list_the_same_steps():
    from flows import training_pipeline as tp

    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages = spec["stages"]
    assert tuple(stages) == tp.STAGES, "dvc.yaml stages and flows.training_pipeline.STAGES differ (names or order)"
    for name, stage in stages.items():
        cmd = (stage.get("do") or stage)["cmd"]
        assert cmd.startswith(tp.STAGE_COMMANDS[name] + " "), f"stage {name}: cmd {cmd!r}"
    # every stage has a task that the flow body (or its fold helper) actually uses
    used = set()
    for fn in (tp.training_pipeline.fn, tp.run_folds):
        used |= {n.id for n in ast.walk(ast.parse(inspect.getsource(fn).lstrip())) if isinstance(n, ast.Name)}
    for name in tp.STAGES:
        assert f"{name}_task" in used, f"the flow never runs {name}_task"
    # DVC iterates fold_ids: it must be the fold table's keys
    fold_ids = next(v["fold_ids"] for v in spec["vars"] if "fold_ids" in v)
    assert fold_ids == sorted(load_params(ROOT / "params.yaml", env={}).folds)


def test_dvc_dag_orders_the_stages():
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    dvc = str(Path(sys.executable).parent / "dvc")
    if not (ROOT / ".dvc").is_dir():
        pytest.skip("project is not `dvc init`-ed yet")
    out = subprocess.run([dvc, "dag", "--md"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names = dict(re.findall(r'(node\d+)\["([^"]+)"\]', out.stdout))
    edges = {(names[a], names[b]) for a, b in re.findall(r"(node\d+)-->(node\d+)", out.stdout)}
    for a, b in [("ingest", "validate"), ("validate", "split"), ("split", "train@0-lerenet"),
                 ("features", "train@0-lerenet"), ("train@0-lerenet", "evaluate@0"), ("evaluate@0", "report"),
                 ("validate", "train_production"), ("train_production", "register"), ("report", "register")]:
        assert (a, b) in edges or any((a, m) in edges and (m, b) in edges for m in names.values()), \
            f"dvc dag lacks {a} -> {b}"


# ---------------------------------------------------------------------------
# retries: transient errors only
# ---------------------------------------------------------------------------
def test_transient_classification():
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    from pipeline.validate import DataValidationError

    assert is_transient(ConnectionError("tracking server down"))
    assert is_transient(TimeoutError())
    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(FileNotFoundError("data/validated.parquet"))
    assert not is_transient(ValueError("train.lr"))
    assert not is_transient(DataValidationError.__new__(DataValidationError))
    try:
        try:
            raise ConnectionResetError("peer")
        except ConnectionResetError as exc:
            raise RuntimeError("upload failed") from exc
    except RuntimeError as wrapped:
        assert is_transient(wrapped)


def test_prefect_retries_transient_errors_only(prefect_harness):
    from prefect import flow, task

    calls = {"flaky": 0, "bad": 0}
    opts = {**TASK_OPTIONS, "retry_delay_seconds": 0, "retry_jitter_factor": None}

    @task(**opts)
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("tracking server restarting")
        return "ok"

    @task(**opts)
    def bad() -> None:
        calls["bad"] += 1
        raise ValueError("split.shots must be >= 1")

    @flow
    def f() -> str:
        return flaky()

    @flow
    def g() -> None:
        bad()

    assert f() == "ok" and calls["flaky"] == 2
    with pytest.raises(ValueError, match="split.shots"):
        g()
    assert calls["bad"] == 1


# ---------------------------------------------------------------------------
# a failing step fails the flow, with the original error, and promotes nothing
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def champion_checkpoint(tmp_path_factory) -> Path:
    from model import build_model
    from pipeline.checkpoint import save_model

    path = tmp_path_factory.mktemp("champion") / "model.pt"
    save_model(path, build_model("prototype", pretrained=False),
               dict(model="prototype", backbone="efficientnet_lite0", freeze_backbone=True, variant="mpr+mpe*",
                    channels=256, image_size=64))
    return path


def test_failing_step_fails_flow_and_keeps_champion(prefect_harness, tmp_path, small_source, champion_checkpoint):
    from flows.training_pipeline import training_pipeline
    from pipeline.validate import DataValidationError

    pfile = tiny_params_file(tmp_path, small_source)
    params = load_params(pfile, env={})
    v1 = R.register(params, champion_checkpoint, [R.CvCell(0, "paper", 1, 0.3, 0.5, "e0")], model_name="prototype")
    R.promote(params, v1)
    # a real broken file: one mask no longer decodes -> validation fails (not transient: no retry)
    mask = next((small_source / "Steel_In" / "GT").iterdir())
    mask.write_bytes(b"not a png")
    state = training_pipeline(str(pfile), None, 1, return_state=True)
    assert state.is_failed()
    with pytest.raises(DataValidationError):
        state.result()
    assert R.alias_version(params, R.CHAMPION) == v1
    versions = R.client(params).search_model_versions(f"name='{params.mlflow.registered_model}'")
    assert [str(mv.version) for mv in versions] == [v1]
    assert not (tmp_path / "reports" / "registry.json").exists()


# ---------------------------------------------------------------------------
# end to end: training pipeline, then a new class arrives
# ---------------------------------------------------------------------------
def _dvc_project(tmp_path: Path) -> None:
    """Make tmp_path a DVC project running this repository's dvc.yaml (code folders symlinked)."""
    for name in ("pipeline", "model", "lerenet", "flows"):
        os.symlink(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([str(Path(sys.executable).parent / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, env=env,
                   check=True, timeout=120)


def _raw_md5(tmp_path: Path) -> str | None:
    lock = tmp_path / "dvc.lock"
    if not lock.is_file():
        return None
    for out in yaml.safe_load(lock.read_text())["stages"]["ingest"]["outs"]:
        if out["path"] == "data/raw":
            return out["md5"]
    return None


@pytest.mark.slow
def test_training_then_new_class_retrain_end_to_end(prefect_harness, tmp_path, small_source):
    from flows.retrain import retrain_on_new_classes
    from flows.training_pipeline import STAGES, training_pipeline
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    if not (INCOMING / "Leather_Fold").is_dir():
        pytest.skip(f"{INCOMING / 'Leather_Fold'} not available (set LERENET_TEST_INCOMING)")
    _dvc_project(tmp_path)
    pfile = tiny_params_file(tmp_path, small_source, INCOMING)

    # 1. the pipeline from scratch: first model becomes champion
    state = training_pipeline(str(pfile), None, 1, return_state=True)
    first = state.result()
    params = load_params(pfile, env={})
    assert first["decision"]["promoted"] and R.alias_version(params, R.CHAMPION) == first["version"]
    assert (tmp_path / "reports" / "registry.json").is_file()
    # the flow ran one task (group) per DVC stage, plus promote
    import anyio

    async def task_names():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            return {r.task_key.rsplit("-", 1)[0].split(".")[-1] if False else r.name.split("-")[0] for r in runs}

    ran = anyio.run(task_names)
    assert set(STAGES) | {"promote"} <= ran, ran

    # 2. Leather_Fold arrives in data.incoming
    before_md5 = _raw_md5(tmp_path)
    result = retrain_on_new_classes(str(pfile))
    assert result["status"] == "retrained" and result["new_classes"] == ["Leather_Fold"]
    assert result["data_version"]["before"] != result["data_version"]["after"]
    assert result["champion_probed"] == first["version"]
    probe = result["probe"]["Leather_Fold"]
    assert set(probe) == {"k1", "k5"} and all(0.0 <= p["miou"] <= 1.0 for p in probe.values())
    if before_md5 is not None:  # DVC recorded the new data version
        assert _raw_md5(tmp_path) not in (None, before_md5)
    # the fold table in the params file was extended (comments kept by the round-trip) and re-read
    params = load_params(pfile, env={})
    assert "Leather_Fold" in params.all_classes
    training = result["training"]
    assert int(training["version"]) == int(first["version"]) + 1
    tags = R.client(params).get_model_version(params.mlflow.registered_model, training["version"]).tags
    assert tags["decision"] in ("promoted", "not promoted") and tags["decision.reason"]
    champion = R.alias_version(params, R.CHAMPION)
    assert champion == (training["version"] if training["decision"]["promoted"] else first["version"])

    # 3. nothing new: exits without training
    again = retrain_on_new_classes(str(pfile))
    assert again["status"] == "nothing new"
    versions = R.client(params).search_model_versions(f"name='{params.mlflow.registered_model}'")
    assert len(versions) == 2


def test_deployments_schedule_and_concurrency(tmp_path, small_source):
    from flows.deploy import build_deployments

    pfile = tiny_params_file(tmp_path, small_source)
    retrain, training = build_deployments(pfile)
    params = load_params(pfile, env={})
    assert retrain.name == "retrain-on-new-classes" and training.name == "training-pipeline"
    assert [s.schedule.cron for s in retrain.schedules] == [params.retrain.cron]
    assert [s.schedule.timezone for s in retrain.schedules] == ["UTC"]  # explicit, so the UI shows it
    assert training.schedules in (None, [])
    for d in (retrain, training):
        limit = d.concurrency_limit if isinstance(d.concurrency_limit, int) else d.concurrency_limit.limit
        assert limit == 1
        assert d.parameters == {"params_path": str(pfile)}
    # the UI's run form shows each flow parameter with its type
    types = {d.name: {k: v.get("type") or [t["type"] for t in v["anyOf"]]
                      for k, v in d._parameter_openapi_schema.model_dump()["properties"].items()}
             for d in (retrain, training)}
    assert types["retrain-on-new-classes"] == {"params_path": ["string", "null"], "overrides": ["object", "null"],
                                               "fold_workers": ["integer", "null"]}
    assert types["training-pipeline"] == {**types["retrain-on-new-classes"], "promote": "boolean",
                                          "commit_dvc": "boolean"}


def test_retrain_schedule_uses_the_configured_timezone(tmp_path, small_source):
    from flows.deploy import build_deployments

    pfile = tiny_params_file(tmp_path, small_source)
    raw = yaml.safe_load(pfile.read_text())
    raw["retrain"] = {"cron": "30 2 * * 1-5", "timezone": "Europe/Berlin"}
    pfile.write_text(yaml.safe_dump(raw, sort_keys=False))
    (schedule,) = [s.schedule for s in build_deployments(pfile)[0].schedules]
    assert (schedule.cron, schedule.timezone) == ("30 2 * * 1-5", "Europe/Berlin")


def test_temporary_prefect_server_telemetry_off_unless_the_user_chose():
    """Importing the flows package (what `lerenet flow ...` does before Prefect starts its temporary server,
    which inherits the environment) turns the server's telemetry off, keeping a value the user set."""
    code = "import os, flows; print(os.environ['PREFECT_SERVER_ANALYTICS_ENABLED'])"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_SERVER_ANALYTICS_ENABLED"}
    run = [sys.executable, "-c", code]
    assert subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout == "false\n"
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "true"
    assert subprocess.run(run, env=env, cwd=ROOT, capture_output=True, text=True, check=True).stdout == "true\n"


# ---------------------------------------------------------------------------
# new-class detection and the fold-table rule (pipeline/classes.py)
# ---------------------------------------------------------------------------
def test_extend_folds_rule_fewest_images_then_lowest_fold():
    from pipeline.classes import ClassTableError, extend_folds

    folds = {0: ["A"], 1: ["B"], 2: ["C"]}
    counts = {"A": 50, "B": 10, "C": 10, "N1": 30, "N2": 5}
    # N1 first (alphabetical): folds 1 and 2 tie at 10 -> fold 1 (now 40); N2 -> fold 2 (10 < 40 < 50)
    assert extend_folds(folds, counts, ["N2", "N1"]) == {0: ["A"], 1: ["B", "N1"], 2: ["C", "N2"]}
    assert folds == {0: ["A"], 1: ["B"], 2: ["C"]}  # input untouched
    with pytest.raises(ClassTableError, match="already in fold 0"):
        extend_folds(folds, counts, ["A"])
    with pytest.raises(ClassTableError, match="no image count"):
        extend_folds(folds, counts, ["Z"])


def test_write_folds_keeps_comments_and_validates(tmp_path):
    from pipeline.classes import write_folds

    path = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", path)
    before = load_params(path, env={})
    folds = {f: list(c) for f, c in before.folds.items()}
    folds[2].append("Leather_Fold")
    write_folds(path, folds)
    text = path.read_text()
    assert "# test (novel) classes per fold" in text and "# K values for saved test episodes" in text
    after = load_params(path, env={})
    assert after.folds == folds and after.model_dump(exclude={"folds"}) == before.model_dump(exclude={"folds"})


def test_new_class_detection_and_source_view(tmp_path, small_source):
    from pipeline.classes import accepted_classes, new_classes, source_view

    incoming = tmp_path / "incoming"
    (incoming / "Leather_Fold").mkdir(parents=True)
    os.symlink(INCOMING / "Leather_Fold" / "Images", incoming / "Leather_Fold" / "Images")
    params = load_params(tiny_params_file(tmp_path, small_source, incoming), env={})
    # nothing ingested yet: every class is new
    assert new_classes(params) == ["Leather_Color", "Leather_Fold", "MT_Uneven", "Steel_In"]
    # the data version holds the three base classes -> only the incoming one is new
    params.data.dir.mkdir(parents=True)
    import pandas as pd

    pd.DataFrame({"class_name": ["Leather_Color", "MT_Uneven", "Steel_In"]}).to_parquet(
        params.data.dir / "manifest.parquet")
    assert new_classes(params) == ["Leather_Fold"]
    # the accepted view (what ingest reads) has the base classes only, until the fold table names it
    assert sorted(accepted_classes(params)) == ["Leather_Color", "MT_Uneven", "Steel_In"]
    view = source_view(params)
    assert sorted(p.name for p in view.iterdir()) == [".lerenet-view.json", "Leather_Color", "MT_Uneven", "Steel_In"]
    assert (view / "Steel_In").resolve() == (small_source / "Steel_In").resolve()


def test_retrain_with_a_champion_whose_files_are_gone_names_them_and_writes_nothing(
        prefect_harness, tmp_path, small_source, champion_checkpoint):
    """The champion's registered files were deleted: the retrain flow fails before writing anything, naming
    the version and the missing artifact, and the new class is still new on the next run."""
    from flows.retrain import retrain_on_new_classes
    from pipeline.classes import new_classes
    from pipeline.ingest import ingest
    from pipeline.validate import validate

    if not (INCOMING / "Leather_Fold").is_dir():
        pytest.skip(f"{INCOMING / 'Leather_Fold'} not available (set LERENET_TEST_INCOMING)")
    pfile = tiny_params_file(tmp_path, small_source, INCOMING)
    params = load_params(pfile, env={})
    ingest(params, progress=False)
    assert validate(params)["success"]
    v1 = R.register(params, champion_checkpoint, [R.CvCell(0, "paper", 1, 0.3, 0.5, "e0")], model_name="prototype")
    R.promote(params, v1)
    files = R.client(params).get_model_version_download_uri(params.mlflow.registered_model, v1)
    shutil.rmtree(files[len("file://"):])
    before = pfile.read_bytes()
    manifest = (tmp_path / "data" / "manifest.parquet").read_bytes()
    with pytest.raises(R.RegistryError, match=rf"v{v1} cannot be probed: .*v{v1}\): artifact MLmodel is missing"):
        retrain_on_new_classes(str(pfile))
    assert pfile.read_bytes() == before and (tmp_path / "data" / "manifest.parquet").read_bytes() == manifest
    assert new_classes(load_params(pfile, env={})) == ["Leather_Fold"]  # not "nothing new" next time
