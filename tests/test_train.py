"""Episodic training on a few real images: outputs, resume == uninterrupted, determinism,
feature-cache reuse, MLflow parent/nested runs, the fine-tuned (image) path and the CLI."""

from __future__ import annotations

import csv
import json

import mlflow
import pytest
import torch

from _train_data import load, shared_project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Small real project (3 classes x 7 images, fold 0 tests Steel_In) with its feature store built."""
    from pipeline.features import build_feature_store

    pf = shared_project(tmp_path_factory)
    build_feature_store(load(pf), progress=False)
    return pf


@pytest.fixture(scope="module")
def reference(project):
    """One uninterrupted, tracked LERENet run on fold 0 (12 steps, checkpoint every 4)."""
    from pipeline.train import train

    params = load(project)
    return params, train(params, 0, "lerenet", progress=False)


def _state(path):
    from pipeline.checkpoint import load_model

    net, meta = load_model(path)
    return net.state_dict(), meta


def _curve(path):
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k != "episodes_per_s"} for r in csv.DictReader(fh)]


def test_training_writes_model_curve_and_run_json(reference):
    from pipeline.checkpoint import load_model
    from pipeline.layout import Layout

    params, res = reference
    assert res.steps == 12 and res.resumed_from == 0
    assert res.model_path == params.root / "models" / "fold0" / "lerenet" / "model.pt"
    net, meta = load_model(res.model_path)
    assert meta["model"] == "lerenet" and meta["backbone"] == "efficientnet_lite0"
    assert meta["fold"] == 0 and meta["image_size"] == 64 and meta["train_shots"] == 1
    assert meta["best_step"] in (4, 8, 12) and meta["best_val_miou"] == pytest.approx(res.best_val_miou)
    assert 0.0 <= res.best_val_miou <= 1.0
    rows = list(csv.DictReader(open(res.curve_path)))
    assert [int(r["step"]) for r in rows] == list(range(1, 13))
    assert [int(r["step"]) for r in rows if r["val_miou"]] == [4, 8, 12]
    assert all(float(r["loss"]) > 0 for r in rows)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(0.01) and all(a > b for a, b in zip(lrs, lrs[1:]))  # poly decay
    run = json.loads(res.run_json.read_text())
    assert run["run_id"] == res.run_id and run["fold"] == 0 and run["model"] == "lerenet"
    assert Layout.of(params).train_state(0, "lerenet").is_file()
    # the loaded model runs on a 1-shot episode
    x = torch.rand(1, 1, 3, 64, 64)
    out = net(x, (x[:, :, :1] > 0.5).float(), torch.rand(1, 3, 64, 64))
    assert out.shape == (1, 1, 64, 64)


def test_mlflow_parent_and_nested_run(reference):
    from pipeline.tracking import PARENT_TAG, TAG_ROLE, tracking_uri

    params, res = reference
    client = mlflow.MlflowClient(tracking_uri(params))
    run = client.get_run(res.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "fold0/lerenet/efficientnet_lite0/k1"
    parent = client.get_run(run.data.tags[PARENT_TAG])
    assert parent.data.tags[TAG_ROLE] == "parent"
    assert run.data.tags["model"] == "lerenet" and run.data.tags["fold"] == "fold0" and run.data.tags["shots"] == "1"
    assert run.data.params["train.lr"] == "0.01"
    assert run.data.tags["data_version"].startswith("manifest-sha256:")  # no dvc.lock in the test project
    assert len(client.get_metric_history(res.run_id, "loss")) == 12
    assert [m.step for m in client.get_metric_history(res.run_id, "val_miou")] == [4, 8, 12]
    assert run.data.metrics["best_val_miou"] == pytest.approx(res.best_val_miou)
    assert "training" in [a.path for a in client.list_artifacts(res.run_id)]


def test_resume_after_kill_equals_uninterrupted_run(reference, tmp_path):
    from pipeline.train import TrainingStopped, train

    params, ref = reference
    kw = dict(out_dir=tmp_path / "out", checkpoint_file=tmp_path / "state.pt", curve_file=tmp_path / "curve.csv",
              track=False, progress=False)
    with pytest.raises(TrainingStopped):
        train(params, 0, "lerenet", stop_after=6, **kw)  # "killed" after step 6; last checkpoint at step 4
    assert not (tmp_path / "out" / "model.pt").exists()
    res = train(params, 0, "lerenet", **kw)
    assert res.resumed_from == 4
    a, meta_a = _state(ref.model_path)
    b, meta_b = _state(res.model_path)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert meta_b["best_val_miou"] == meta_a["best_val_miou"] and meta_b["best_step"] == meta_a["best_step"]
    assert _curve(res.curve_path) == _curve(ref.curve_path)


def test_stale_finished_state_is_not_reused_after_params_or_data_change(reference, tmp_path, caplog):
    """A real finished ``state.pt`` is resumed only for the params, data version and code it was written for."""
    import logging
    import shutil

    import yaml

    from pipeline.checkpoint import load_state
    from pipeline.layout import Layout
    from pipeline.train import train

    params, ref = reference
    finished = Layout.of(params).train_state(0, "lerenet")
    assert load_state(finished)["step"] == 12  # the reference run's final state
    state = tmp_path / "state.pt"
    kw = dict(out_dir=tmp_path / "out", checkpoint_file=state, curve_file=tmp_path / "curve.csv", track=False,
              progress=False)
    caplog.set_level(logging.WARNING, logger="pipeline.training.state")

    shutil.copy(finished, state)  # same params, data and code: resumed (nothing left to train)
    assert train(params, 0, "lerenet", **kw).resumed_from == 12
    assert "stale" not in caplog.text

    shutil.copy(finished, state)  # params changed: stale, trains from step 0, says why
    changed = train(load(params.root / "params.yaml", train={"lr": 0.02}), 0, "lerenet", **kw)
    assert changed.resumed_from == 0 and changed.steps == 12
    assert "stale training state" in caplog.text and "params_hash" in caplog.text
    a, _ = _state(ref.model_path)
    b, meta = _state(changed.model_path)
    assert not all(torch.equal(a[k], b[k]) for k in a)  # not the old weights under new provenance
    assert load_state(state)["params_hash"] == meta["params_hash"] != load_state(finished)["params_hash"]

    # data changed (a new DVC data version of data/raw; same params file): stale again
    caplog.clear()
    other = tmp_path / "project"
    other.mkdir()
    shutil.copy(params.root / "params.yaml", other / "params.yaml")
    raw = Layout.of(params).raw.as_posix()
    (other / "dvc.lock").write_text(yaml.safe_dump(
        {"schema": "2.0", "stages": {"ingest": {"cmd": "lerenet ingest", "outs": [{"path": raw, "md5": "0f" * 16 + ".dir"}]}}}))
    new_data = load(other / "params.yaml")
    shutil.copy(finished, state)
    res = train(new_data, 0, "lerenet", **kw)
    assert res.resumed_from == 0
    assert "data_version" in caplog.text and "params_hash" not in caplog.text
    assert _state(res.model_path)[1]["data_version"] == "0f" * 16 + ".dir"


def test_code_version_follows_the_training_code_not_the_commit(tmp_path):
    from pipeline.training.state import CODE_PATHS, code_version

    for rel in ("model/lerenet.py", "pipeline/training/loop.py", "pipeline/report.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x = 1\n")
    v0 = code_version(tmp_path)
    assert v0 == code_version(tmp_path) and len(v0) == 16
    (tmp_path / "pipeline/report.py").write_text("x = 2\n")  # not training code
    assert code_version(tmp_path) == v0
    (tmp_path / "pipeline/training/loop.py").write_text("x = 2\n")
    assert code_version(tmp_path) != v0
    assert "model" in CODE_PATHS and code_version() != code_version(tmp_path)  # the running code


def test_training_state_loads_weights_only_and_pickled_state_is_refused(reference, tmp_path):
    import numpy as np

    from pipeline.checkpoint import CheckpointError, load_state
    from pipeline.layout import Layout

    params, _ = reference
    path = Layout.of(params).train_state(0, "lerenet")
    raw = torch.load(path, map_location="cpu", weights_only=True)  # no pickled objects in our state
    assert raw["step"] == 12 and {"params_hash", "data_version", "code_version"} <= set(raw)
    rng = load_state(path)["rng"]
    assert isinstance(rng["numpy"][1], np.ndarray) and rng["numpy"][1].dtype == np.uint32
    pickled = tmp_path / "old_state.pt"
    torch.save({**raw, "rng": {"numpy": np.random.get_state()}}, pickled)  # an older version's pickled state
    with pytest.raises(CheckpointError, match=r"old_state.pt: refusing to load.*numpy.*Delete the file"):
        load_state(pickled)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="cannot read training state"):
        load_state(garbage)


def test_same_seed_same_result_other_seed_differs(reference, tmp_path):
    from pipeline.train import train

    params, ref = reference
    same = train(params, 0, "lerenet", out_dir=tmp_path / "a", checkpoint_file=tmp_path / "a.pt",
                 curve_file=tmp_path / "a.csv", track=False, progress=False)
    a, _ = _state(ref.model_path)
    b, _ = _state(same.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert same.best_val_miou == ref.best_val_miou
    other = train(load(params.root / "params.yaml", train={"seed": 1}), 0, "lerenet", out_dir=tmp_path / "b",
                  checkpoint_file=tmp_path / "b.pt", curve_file=tmp_path / "b.csv", track=False, progress=False)
    c, _ = _state(other.model_path)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_concurrent_trainings_in_threads_equal_standalone_training(reference, tmp_path):
    """Issue 14.2: trainings in threads of one process (the flow's thread runner) while another thread
    keeps drawing from torch's global RNG give the standalone run's weights exactly; a training's
    seed depends on (train.seed, fold, model), so the two models of the fold differ in their draws."""
    import threading

    from pipeline.train import train
    from pipeline.training.rng import training_seed

    params, ref = reference
    stop = threading.Event()

    def noise():  # what dropout in a neighbouring training (or any user code) does to the global RNG
        while not stop.is_set():
            torch.rand(64)
            torch.nn.init.normal_(torch.empty(8, 8))

    results: dict[str, object] = {}

    def job(model_name):
        results[model_name] = train(params, 0, model_name, out_dir=tmp_path / model_name,
                                    checkpoint_file=tmp_path / f"{model_name}.pt",
                                    curve_file=tmp_path / f"{model_name}.csv", track=False, progress=False)

    threads = [threading.Thread(target=noise)] + [threading.Thread(target=job, args=(m,)) for m in ("lerenet", "baseline")]
    for th in threads:
        th.start()
    for th in threads[1:]:
        th.join()
    stop.set()
    threads[0].join()
    a, _ = _state(ref.model_path)
    b, _ = _state(results["lerenet"].model_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _curve(results["lerenet"].curve_path) == _curve(ref.curve_path)
    assert len({training_seed(0, 0, "lerenet"), training_seed(0, 0, "baseline"), training_seed(0, 1, "lerenet"),
                training_seed(0, None, "lerenet"), training_seed(1, 0, "lerenet")}) == 5


def test_training_reuses_cached_features(project, tmp_path, monkeypatch):
    """Two models trained on the store: the backbone runs once per run (the staleness check), not per episode."""
    from model.base import FewShotSegmenter
    from pipeline.train import train

    calls = []
    real = FewShotSegmenter.encode

    def counting(self, images):
        calls.append(images.shape[0])
        return real(self, images)

    monkeypatch.setattr(FewShotSegmenter, "encode", counting)
    params = load(project)
    for name in ("baseline", "lerenet"):
        train(params, 1, name, out_dir=tmp_path / name, checkpoint_file=tmp_path / f"{name}.pt",
              curve_file=tmp_path / f"{name}.csv", track=False, progress=False)
    assert calls == [1, 1]  # 2 runs x (12 steps x 2 episodes x 2 images) would be 96 without the cache


def test_prototype_writes_its_model_at_once(project, tmp_path):
    from pipeline.checkpoint import load_model
    from pipeline.train import train

    res = train(load(project), 2, "prototype", out_dir=tmp_path / "p", curve_file=tmp_path / "p.csv",
                checkpoint_file=tmp_path / "p.pt", track=False, progress=False)
    assert res.steps == 0 and not (tmp_path / "p.pt").exists()
    _, meta = load_model(res.model_path)
    assert meta["model"] == "prototype" and meta["step"] == 0
    rows = list(csv.DictReader(open(res.curve_path)))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["val_miou"]) <= 1.0


def test_fine_tuned_backbone_trains_on_images(project, tmp_path):
    """Paper-profile path (no cache): images augmented on the fly in a DataLoader, backbone updated."""
    from pipeline.checkpoint import build_net
    from pipeline.train import train

    params = load(project, model={"freeze_backbone": False},
                  train={"episodes": 4, "checkpoint_every": 2, "val_every": 2, "val_episodes": 2})
    before = build_net(params, "baseline").backbone.state_dict()
    res = train(params, None, "baseline", out_dir=tmp_path / "ft", checkpoint_file=tmp_path / "ft.pt",
                curve_file=tmp_path / "ft.csv", track=False, progress=False)
    assert res.model_path.parent.name == "ft" and res.steps == 2
    net, meta = _state(res.model_path)
    assert meta["freeze_backbone"] is False and meta["fold"] is None
    changed = [k for k, v in before.items() if v.is_floating_point() and not torch.equal(v, net[f"backbone.{k}"])]
    assert changed  # the backbone was fine-tuned


def test_per_model_settings_reach_only_that_model(project, tmp_path):
    """``train.per_model.baseline.lr`` trains the Baseline at its own lr; LERENet keeps the shared one."""
    from pipeline.train import train

    params = load(project, train={"episodes": 4, "per_model": {"baseline": {"lr": 0.002}}})
    lrs = {}
    for name in ("baseline", "lerenet"):
        res = train(params, 0, name, out_dir=tmp_path / name, checkpoint_file=tmp_path / f"{name}.pt",
                    curve_file=tmp_path / f"{name}.csv", track=False, progress=False)
        lrs[name] = float(next(csv.DictReader(open(res.curve_path)))["lr"])
    assert lrs == {"baseline": pytest.approx(0.002), "lerenet": pytest.approx(0.01)}
    assert params.for_model("lerenet").train.per_model == {}  # one model's entry is not in another's params hash


def test_diverging_training_stops_with_a_clear_error_and_no_model_file(project, tmp_path):
    from pipeline.train import TrainingDiverged, train

    params = load(project, train={"lr": 1e30, "episodes": 8, "val_every": 100, "checkpoint_every": 100})
    with pytest.raises(TrainingDiverged, match=r"loss is (nan|inf) at step \d+ .*train.per_model.<model>.lr"):
        train(params, 0, "baseline", out_dir=tmp_path / "b", checkpoint_file=tmp_path / "b.pt",
              curve_file=tmp_path / "b.csv", track=False, progress=False)
    assert not (tmp_path / "b" / "model.pt").exists() and not (tmp_path / "b.pt").exists()


def test_bad_inputs_fail_clearly(project):
    from pipeline.train import train

    params = load(project)
    with pytest.raises(ValueError, match="unknown model"):
        train(params, 0, "unet", track=False)
    with pytest.raises(ValueError, match="fold 7 is not in params.yaml"):
        train(params, 7, "lerenet", track=False)


def test_cli_train_and_errors(project):
    from typer.testing import CliRunner

    from lerenet.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["train", "--fold", "all", "--model", "prototype", "--params", str(project), "--no-track"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert out["model_path"].endswith("models/all/prototype/model.pt")
    res = runner.invoke(app, ["train", "--fold", "x", "--model", "lerenet", "--params", str(project)])
    assert res.exit_code == 2 and "--fold" in res.output
