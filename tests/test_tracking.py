"""MLflow tracking helpers on a real SQLite tracking store: URI resolution, provenance,
parent find-or-create, nested runs and resuming a run."""

from __future__ import annotations

import mlflow
import pytest
import yaml

from conftest import write_small_params


@pytest.fixture(scope="module")
def params_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    (root / "src").mkdir()
    return write_small_params(root / "params.yaml", root / "src", root / "data",
                              mlflow={"tracking_uri": "sqlite:///mlruns.db", "experiment": "t"})


def _params(pf, **over):
    from pipeline.config import load_params

    return load_params(pf, overrides=over or None, env={})


def test_relative_sqlite_uri_resolves_against_project_root(params_file):
    from pipeline.tracking import tracking_uri

    p = _params(params_file)
    assert tracking_uri(p) == f"sqlite:///{params_file.parent / 'mlruns.db'}"
    p2 = _params(params_file, mlflow={"tracking_uri": "sqlite:////abs/x.db"})
    assert tracking_uri(p2) == "sqlite:////abs/x.db"
    p3 = _params(params_file, mlflow={"tracking_uri": "http://127.0.0.1:5000"})
    assert tracking_uri(p3) == "http://127.0.0.1:5000"


def test_data_version_prefers_dvc_lock_then_manifest(params_file):
    from pipeline.tracking import data_version

    root = params_file.parent
    p = _params(params_file)
    assert data_version(p) == "unknown"
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "manifest.parquet").write_bytes(b"not really parquet")
    assert data_version(p).startswith("manifest-sha256:")
    lock = {"schema": "2.0", "stages": {"ingest": {"cmd": "lerenet ingest", "outs": [
        {"path": "data/manifest.parquet", "md5": "aaaa"}, {"path": "data/raw", "md5": "0123abcd.dir"}]}}}
    (root / "dvc.lock").write_text(yaml.safe_dump(lock))
    try:
        assert data_version(p) == "0123abcd.dir"
    finally:
        (root / "dvc.lock").unlink()
        (root / "data" / "manifest.parquet").unlink()


def test_params_hash_ignores_paths_but_not_settings(params_file, tmp_path):
    from pipeline.tracking import flat_params, params_hash

    p = _params(params_file)
    moved = _params(params_file, data={"dir": str(tmp_path / "elsewhere")})
    assert params_hash(p) == params_hash(moved)
    # machine-local settings (where/how fast this machine runs) do not change the hash
    other_machine = _params(params_file, train={"device": "cpu", "num_workers": 3},
                            services={"mlflow_port": 5999, "state_dir": str(tmp_path / "svc")},
                            serve={"max_request_bytes": 1024},  # a serving limit is not a training setting
                            retrain={"timezone": "Europe/Berlin"})
    assert params_hash(p) == params_hash(other_machine)
    assert params_hash(p) != params_hash(_params(params_file, train={"lr": 0.1}))
    flat = flat_params(p)
    assert flat["train.lr"] == "0.005" and flat["split.shots"] == "[1, 5]"


def test_parent_is_found_again_and_nested_runs_hang_under_it(params_file, monkeypatch):
    from pipeline.tracking import PARENT_ENV, PARENT_TAG, TAG_KEY, nested_run, parent_run_id, resume_run, tracking_uri

    monkeypatch.delenv(PARENT_ENV, raising=False)
    p = _params(params_file)
    parent = parent_run_id(p)
    assert parent_run_id(p) == parent  # a second stage process finds the same parent
    other = parent_run_id(_params(params_file, train={"lr": 0.1}))
    assert other != parent  # other params: another pipeline run

    with nested_run(p, parent, "fold0/lerenet/efficientnet_lite0/k1", {"model": "lerenet", "fold": "fold0"}) as run:
        mlflow.log_metric("loss", 0.5, step=1)
        child = run.info.run_id
    with nested_run(p, parent, "fold0/lerenet/efficientnet_lite0/k1") as again:  # e.g. the evaluate stage
        mlflow.log_metric("miou", 0.3)
        assert again.info.run_id == child
    with resume_run(p, child):
        mlflow.log_metric("loss", 0.4, step=2)

    c = mlflow.MlflowClient(tracking_uri(p))
    # the MLflow 3 UI opens the experiment on its training runs, not on the GenAI overview
    exp = c.get_experiment_by_name(p.mlflow.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development" and exp.tags["mlflow.note.content"]
    r = c.get_run(child)
    assert r.data.tags[PARENT_TAG] == parent and r.data.tags["model"] == "lerenet"
    assert r.data.params["train.lr"] == "0.005" and r.info.status == "FINISHED"
    assert [m.value for m in c.get_metric_history(child, "loss")] == [0.5, 0.4]
    assert r.data.metrics["miou"] == pytest.approx(0.3)
    assert c.get_run(parent).data.tags[TAG_KEY]
    children = c.search_runs([r.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'")
    assert [x.info.run_id for x in children] == [child]

    monkeypatch.setenv(PARENT_ENV, other)  # the Prefect flow's parent wins
    assert parent_run_id(p) == other
    monkeypatch.setenv(PARENT_ENV, "0" * 32)
    with pytest.raises(ValueError, match=PARENT_ENV):
        parent_run_id(p)


def test_failed_body_marks_the_nested_run_failed(params_file, monkeypatch):
    from pipeline.tracking import PARENT_ENV, nested_run, parent_run_id, tracking_uri

    monkeypatch.delenv(PARENT_ENV, raising=False)
    p = _params(params_file)
    parent = parent_run_id(p)
    with pytest.raises(RuntimeError):
        with nested_run(p, parent, "boom", reuse=False) as run:
            raise RuntimeError("x")
    assert mlflow.MlflowClient(tracking_uri(p)).get_run(run.info.run_id).info.status == "FAILED"


def test_experiment_kind_is_model_training_on_creation_and_on_an_existing_experiment(tmp_path):
    """A new experiment gets the kind tag; an existing one with the GenAI kind (or none) is corrected, a
    description a person wrote stays, and configuring again changes nothing (real SQLite store)."""
    from pipeline.tracking import EXPERIMENT_TAGS, KIND_TAG, NOTE_TAG, configure, tracking_uri

    pf = write_small_params(tmp_path / "params.yaml", tmp_path / "src", tmp_path / "data",
                            mlflow={"tracking_uri": "sqlite:///mlruns.db", "experiment": "kinds"})
    (tmp_path / "src").mkdir()
    p = _params(pf)
    c = mlflow.MlflowClient(tracking_uri(p))
    eid = configure(p)
    assert c.get_experiment(eid).tags[KIND_TAG] == "custom_model_development"

    c.set_experiment_tag(eid, KIND_TAG, "genai_development")  # e.g. chosen in an older MLflow UI
    c.set_experiment_tag(eid, NOTE_TAG, "our own words")
    assert configure(p) == eid
    tags = c.get_experiment(eid).tags
    assert tags[KIND_TAG] == "custom_model_development" and tags[NOTE_TAG] == "our own words"
    assert configure(p) == eid and c.get_experiment(eid).tags == tags  # idempotent

    old = c.create_experiment("created-before-the-tags")  # no tags at all
    assert KIND_TAG not in c.get_experiment(old).tags
    assert configure(_params(pf, mlflow={"experiment": "created-before-the-tags"})) == old
    assert {k: c.get_experiment(old).tags.get(k) for k in EXPERIMENT_TAGS} == EXPERIMENT_TAGS


def test_ui_links_open_the_model_training_view_of_the_bundled_mlflow_ui():
    """MLflow 3.17's UI ignores the kind tag and opens GenAI pages unless ``?workflowType=machine_learning``
    (or the browser's remembered switch) says otherwise: links carry the query, and the bundled UI still
    reads that query with that value (fails when an MLflow upgrade changes the mechanism)."""
    from pathlib import Path

    from pipeline.tracking import UI_WORKFLOW_QUERY, ui_route

    assert ui_route("7") == "#/experiments/7?workflowType=machine_learning"
    assert ui_route("7", "runs", "abc", "artifacts") == \
        "#/experiments/7/runs/abc/artifacts?workflowType=machine_learning"
    build = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
    main = next(build.glob("main.*.js")).read_text(encoding="utf-8", errors="replace")
    key, value = UI_WORKFLOW_QUERY.split("=")
    assert f'.get("{key}")' in main and f'MACHINE_LEARNING="{value}"' in main
    assert 'key:"mlflow.workflowType"' in main and "initialValue:c" in main  # the per-browser default
