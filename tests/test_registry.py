"""Model registry: versions carry their CV metrics; the champion/challenger gate moves aliases safely.

Real MLflow (SQLite registry in tmp_path) and real, tiny checkpoints (the prototype model needs no
training). Each test gets its own registry.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from pipeline import registry as R
from pipeline.config import load_params

PROTOTYPE_META = dict(model="prototype", backbone="efficientnet_lite0", freeze_backbone=True, variant="mpr+mpe*",
                      channels=256, image_size=64)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real prototype-model checkpoint (random backbone weights: no training, no download)."""
    from model import build_model
    from pipeline.checkpoint import save_model

    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    save_model(path, build_model("prototype", pretrained=False), dict(PROTOTYPE_META))
    return path


@pytest.fixture
def params(small_params_file, tmp_path):
    """Small params with an SQLite registry in tmp_path, a margin of 0.01 and a 5 MB serving byte limit."""
    return load_params(small_params_file, overrides={"mlflow": {"promotion_margin": 0.01},
                                                     "serve": {"max_request_bytes": 5_000_000}}, env={})


def cells(*mious: float, episodes: str = "e") -> list[R.CvCell]:
    """One paper-protocol K=1 cell per fold with the given mIoU; episode hashes ``<episodes><fold>``."""
    return [R.CvCell(f, "paper", 1, m, min(1.0, m + 0.2), f"{episodes}{f}") for f, m in enumerate(mious)]


def version_tags(params, version: str) -> dict[str, str]:
    return R.client(params).get_model_version(params.mlflow.registered_model, version).tags


def test_register_writes_summary_tags_cells_artifact_and_challenger_alias(params, checkpoint):
    from pipeline import registry_text as T

    v = R.register(params, checkpoint, cells(0.30, 0.50), model_name="prototype")
    tags = version_tags(params, v)
    assert tags["cv.miou.k1"] == "0.4000"  # mean over folds: the CV estimate per K
    assert tags["protocol"] == "paper" and tags["cv.protocol"] == "paper" and tags["cv.folds"] == "0,1"
    assert tags["decision"] == "pending"
    for key in ("data_version", "git_commit", "params_hash"):
        assert tags[key]
    # few readable tags: no per-cell tag; the cells (with their episode hashes) are an artifact of the run
    assert not [k for k in tags if re.match(r"cv\.f\d", k)] and len(tags) <= 16
    mv = R.client(params).get_model_version(params.mlflow.registered_model, v)
    assert tags["cv.cells"] == f"runs:/{mv.run_id}/registry/cv_cells.json"
    doc = T.load_cells_document(params, mv.run_id)
    assert [(c["fold"], c["miou"], c["episodes"]) for c in doc["cells"]] == [(0, 0.30, "e0"), (1, 0.50, "e1")]
    assert T.version_cells(params, mv) == {"cv.f0.paper.k1": (0.30, "e0"), "cv.f1.paper.k1": (0.50, "e1")}
    import mlflow

    md = mlflow.artifacts.load_text(f"runs:/{mv.run_id}/registry/cv_cells.md")
    assert "| 1 | paper | 1 | 0.5000 |" in md and "`e1`" in md
    assert R.alias_version(params, R.CHALLENGER) == v
    assert R.alias_version(params, R.CHAMPION) is None
    # the served byte limit (serve.max_request_bytes) travels as the registered model's model_config
    info = mlflow.models.get_model_info(f"models:/{params.mlflow.registered_model}/{v}")
    assert info.flavors["python_function"]["config"] == {"max_request_bytes": 5_000_000}


def test_descriptions_say_what_the_model_is_its_scores_the_decision_and_how_to_call_it(params, checkpoint):
    """Markdown descriptions of the registered model and of each version, rewritten after the decision;
    the register run's `decision` tag follows the version's."""
    from pipeline.registry_text import false_alarm_rate

    two_k = [R.CvCell(f, "paper", k, m, 0.6, f"e{f}{k}") for f in (0, 1) for k, m in ((1, 0.30), (5, 0.42))]
    v = R.register(params, checkpoint, two_k, model_name="prototype")
    c, name = R.client(params), params.mlflow.registered_model
    mv = c.get_model_version(name, v)
    assert mv.tags["cv.miou.k1"] == "0.3000" and mv.tags["cv.miou.k5"] == "0.4200"
    assert mv.tags["cv.support_gain"] == "+0.1200"
    assert "Decision: pending" in mv.description and c.get_run(mv.run_id).data.tags["decision"] == "pending"
    assert "models:/lerenet-defects@champion" in c.get_registered_model(name).description \
        or f"models:/{name}@champion" in c.get_registered_model(name).description
    R.promote(params, v)
    mv = c.get_model_version(name, v)
    text = mv.description
    assert "Decision: promoted** -- first model: no champion yet" in text
    assert "| mIoU (paper protocol) | 0.3000 | 0.4200 |" in text and "Support gain" in text and "+0.1200" in text
    assert f"Data version `{mv.tags['data_version']}`" in text
    assert f"lerenet predict --model models:/{name}/{v}" in text and "/invocations" in text
    assert f"runs:/{mv.run_id}/registry/cv_cells.json" in text
    assert (f"#/experiments/{c.get_run(mv.run_id).info.experiment_id}/runs/{mv.run_id}/artifacts"
            "?workflowType=machine_learning") in text  # opens on the model-training pages of MLflow 3.17
    assert c.get_run(mv.run_id).data.tags["decision"] == "promoted"
    assert false_alarm_rate(params, "prototype") is None and "not measured" in text


def test_promotion_both_ways_and_tie_within_margin(params, checkpoint):
    v1 = R.register(params, checkpoint, cells(0.40, 0.40))
    d1 = R.promote(params, v1)
    assert d1.promoted and "first model" in d1.reason
    assert R.alias_version(params, R.CHAMPION) == v1 and R.alias_version(params, R.CHALLENGER) is None

    worse = R.register(params, checkpoint, cells(0.30, 0.35))
    d = R.promote(params, worse)
    assert not d.promoted and d.champion_before == v1
    assert R.alias_version(params, R.CHAMPION) == v1 and R.alias_version(params, R.CHALLENGER) == worse
    assert version_tags(params, worse)["decision"] == "not promoted"

    tie = R.register(params, checkpoint, cells(0.405, 0.405))  # +0.005 < margin 0.01
    d = R.promote(params, tie)
    assert not d.promoted and d.challenger_miou == pytest.approx(0.405) and d.champion_miou == pytest.approx(0.40)
    assert R.alias_version(params, R.CHAMPION) == v1

    better = R.register(params, checkpoint, cells(0.45, 0.44))
    d = R.promote(params, better)
    assert d.promoted and d.compared == ["cv.f0.paper.k1", "cv.f1.paper.k1"]
    assert R.alias_version(params, R.CHAMPION) == better
    tags = version_tags(params, better)
    assert tags["decision"] == "promoted" and tags["decision.champion_before"] == v1
    assert version_tags(params, v1)["superseded_by"] == better
    # exactly one champion: the alias is single-valued and only `better` reports it
    c, name = R.client(params), params.mlflow.registered_model
    holders = [v for v in (v1, worse, tie, better) if "champion" in c.get_model_version(name, v).aliases]
    assert holders == [better]
    # gating the champion again is a no-op
    again = R.promote(params, better)
    assert again == d and again.champion_before == v1


def test_promotion_retry_of_a_decided_version_changes_nothing(params, checkpoint):
    """A retried promote (e.g. the flow's task after the card failed) returns the recorded decision: the
    champion it replaced and the compared cells stay as decided, no tag is rewritten."""
    v1 = R.register(params, checkpoint, cells(0.40, 0.40))
    R.promote(params, v1)
    v2 = R.register(params, checkpoint, cells(0.50, 0.50))
    first = R.promote(params, v2)
    assert first.promoted and first.champion_before == v1 and first.compared
    tags = version_tags(params, v2)
    retry = R.promote(params, v2)
    assert retry == first  # not "already the champion" with champion_before = itself and nothing compared
    assert version_tags(params, v2) == tags and R.alias_version(params, R.CHAMPION) == v2
    # a refusal on record stays a refusal, unless forced
    v3 = R.register(params, checkpoint, cells(0.10, 0.10))
    refused = R.promote(params, v3)
    assert R.promote(params, v3) == refused and not refused.promoted
    assert R.promote(params, v3, force=True).promoted and R.alias_version(params, R.CHAMPION) == v3


def test_interrupted_alias_move_is_finished_by_the_retry(params, checkpoint):
    """The state a crash between the decision tags and the alias move leaves: the retry moves the alias."""
    v1 = R.register(params, checkpoint, cells(0.40, 0.40))
    R.promote(params, v1)
    v2 = R.register(params, checkpoint, cells(0.50, 0.50))
    c, name = R.client(params), params.mlflow.registered_model
    for k, v in {"decision": "promoted", "decision.reason": "CV mIoU 0.5000 >= champion v1 0.4000 + margin 0.01",
                 "decision.compared": "cv.f0.paper.k1,cv.f1.paper.k1", "decision.champion_before": v1,
                 "decision.challenger_miou": "0.500000", "decision.champion_miou": "0.400000",
                 "decision.margin": "0.01"}.items():
        c.set_model_version_tag(name, v2, k, v)
    assert R.alias_version(params, R.CHAMPION) == v1  # decided, not moved
    d = R.promote(params, v2)
    assert d.promoted and d.champion_before == v1 and d.compared == ["cv.f0.paper.k1", "cv.f1.paper.k1"]
    assert R.alias_version(params, R.CHAMPION) == v2 and R.alias_version(params, R.CHALLENGER) is None
    assert version_tags(params, v1)["superseded_by"] == v2


def _version_files(params, version: str) -> Path:
    uri = R.client(params).get_model_version_download_uri(params.mlflow.registered_model, version)
    assert uri.startswith("file://")
    return Path(uri[len("file://"):])


def test_version_whose_artifacts_are_gone_is_not_promoted_and_not_loaded(params, checkpoint):
    """Files deleted from the artifact store: promote fails with RegistryError naming version and artifact;
    loading the alias (what `lerenet predict` does) names them too; the champion stays."""
    import shutil

    from pipeline.inference.resolve import ModelNotFoundError, open_model
    from pipeline.tracking import tracking_uri

    v1 = R.register(params, checkpoint, cells(0.40, 0.40))
    R.promote(params, v1)
    v2 = R.register(params, checkpoint, cells(0.50, 0.50))
    ckpt = next(_version_files(params, v2).rglob("model.pt"))
    ckpt.unlink()
    with pytest.raises(R.RegistryError, match=rf"v{v2} cannot be promoted: .*artifact artifacts/model.pt is missing"):
        R.promote(params, v2)
    assert R.alias_version(params, R.CHAMPION) == v1 and version_tags(params, v2)["decision"] == "pending"
    shutil.rmtree(_version_files(params, v2))
    with pytest.raises(R.RegistryError, match=rf"v{v2} cannot be promoted: .*artifact MLmodel is missing"):
        R.promote(params, v2)
    name = params.mlflow.registered_model
    shutil.rmtree(_version_files(params, v1))  # the champion's files gone too: loading it says which
    with pytest.raises(ModelNotFoundError, match=rf"@champion \(registered {name} v{v1}\): artifact MLmodel is missing"):
        open_model(f"models:/{name}@champion", tracking_uri(params))


def test_gate_compares_only_identical_episodes(params, checkpoint):
    v1 = R.register(params, checkpoint, cells(0.40, 0.40))
    R.promote(params, v1)
    # fold 0's episodes changed (e.g. a class joined it): only fold 1 is comparable, and there it is worse
    mixed = [R.CvCell(0, "paper", 1, 0.90, 0.9, "changed"), R.CvCell(1, "paper", 1, 0.30, 0.5, "e1")]
    v2 = R.register(params, checkpoint, mixed)
    d = R.promote(params, v2)
    assert not d.promoted and d.compared == ["cv.f1.paper.k1"]
    # nothing in common: refused, unless forced (recorded as such)
    v3 = R.register(params, checkpoint, cells(0.9, 0.9, episodes="new"))
    d = R.promote(params, v3)
    assert not d.promoted and "no saved episodes in common" in d.reason
    d = R.promote(params, v3, force=True)
    assert d.promoted and d.reason.startswith("forced")
    assert R.alias_version(params, R.CHAMPION) == v3


def test_failed_alias_leaves_no_half_registered_version(params, checkpoint, monkeypatch):
    """Fault injection: the registry fails right after the version exists -> the version is deleted."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    def broken(self, name, alias, version):
        raise MlflowException("simulated registry outage", error_code="TEMPORARILY_UNAVAILABLE")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", broken)
    with pytest.raises(MlflowException, match="simulated"):
        R.register(params, checkpoint, cells(0.4, 0.4))
    monkeypatch.undo()
    versions = R.client(params).search_model_versions(f"name='{params.mlflow.registered_model}'")
    assert versions == []
    assert R.alias_version(params, R.CHALLENGER) is None


def test_refuses_bad_metrics_and_versions_without_metrics(params, checkpoint):
    with pytest.raises(R.RegistryError, match="no cross-validation metrics"):
        R.register(params, checkpoint, [])
    with pytest.raises(R.RegistryError, match=r"outside \[0, 1\]"):
        R.register(params, checkpoint, cells(1.5))
    with pytest.raises(FileNotFoundError, match="production checkpoint not found"):
        R.register(params, checkpoint.parent / "missing.pt", cells(0.4))
    # a version created by hand, without cv.* tags, cannot become champion
    c = R.client(params)
    c.create_registered_model(params.mlflow.registered_model)
    mv = c.create_model_version(params.mlflow.registered_model, source=str(checkpoint.parent))
    with pytest.raises(R.RegistryError, match="no cross-validation cells"):
        R.promote(params, mv.version)
    assert R.alias_version(params, R.CHAMPION) is None


def _write_fold_metrics(params) -> None:
    """metrics/fold<f>.json in pipeline.evaluate's format + saved episode files, for every fold."""
    from pipeline.images import episodes_path
    from pipeline.layout import Layout

    for fold in params.folds:
        m = {"lerenet": {"k1": {"paper": {"miou": 0.1 * (fold + 1), "fbiou": 0.5, "episodes": 3},
                                "standard": {"miou_mean": 0.2, "miou_std": 0.01, "fbiou_mean": 0.6,
                                             "fbiou_std": 0.0, "seeds": 2, "episodes": 4}},
                         "fp": {"k1": {"area_fraction": 0.01, "image_rate": 0.2 + 0.1 * fold, "images": 10}},
                         "latency_ms": {"k1": 3.0}}, "device": "cpu"}
        path = Layout.of(params).fold_metrics(fold)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(m))
        for protocol in ("paper", "standard"):
            ep = episodes_path(params.data.dir, fold, protocol, 1)
            ep.parent.mkdir(parents=True, exist_ok=True)
            pd.DataFrame({"episode": [0], "seed": [fold], "class_name": ["X"], "support_ids": [["a"]],
                          "query_id": ["b"]}).to_parquet(ep)


def test_collect_cv_cells_reads_evaluation_output_and_hashes_episodes(params):
    """metrics/fold<f>.json in pipeline.evaluate's format + saved episode files -> cells."""
    from pipeline.images import episodes_path

    _write_fold_metrics(params)
    got = R.collect_cv_cells(params, "lerenet")
    assert len(got) == 2 * len(params.folds)
    paper0 = next(c for c in got if c.fold == 0 and c.protocol == "paper")
    assert paper0.miou == pytest.approx(0.1) and paper0.fb_iou == pytest.approx(0.5)
    std1 = next(c for c in got if c.fold == 1 and c.protocol == "standard")
    assert std1.miou == pytest.approx(0.2) and std1.fb_iou == pytest.approx(0.6)
    # the hash is of the content: equal rows -> equal hash; different seed -> different hash
    assert paper0.episodes == R.episodes_hash(episodes_path(params.data.dir, 0, "paper", 1))
    assert paper0.episodes != next(c for c in got if c.fold == 1 and c.protocol == "paper").episodes
    with pytest.raises(R.RegistryError, match="no results for model 'baseline'"):
        R.collect_cv_cells(params, "baseline")


def test_register_and_gate_use_case_registers_promotes_and_records(params, checkpoint):
    """The sequence `lerenet register` and the flow's register/promote tasks share: CV cells from the
    metrics files -> new version -> gate -> decision record at the layout's path (no S3: no card)."""
    from pipeline.layout import Layout
    from pipeline.usecases.register import cv_summary, register_and_gate

    _write_fold_metrics(params)
    version, outcome = register_and_gate(params, "lerenet", checkpoint)
    assert outcome.decision.promoted and "first model" in outcome.decision.reason
    assert outcome.record == Layout.of(params).registry_record and outcome.card_uris == []
    record = json.loads(outcome.record.read_text())
    assert record["version"] == version and record["promoted"] is True
    assert R.alias_version(params, R.CHAMPION) == version
    folds = sorted(params.folds)  # paper mIoU 0.1 * (f + 1), false-alarm image rate 0.2 + 0.1 * f per fold
    assert version_tags(params, version)["cv.miou.k1"] == f"{sum(0.1 * (f + 1) for f in folds) / len(folds):.4f}"
    assert version_tags(params, version)["cv.false_alarm_rate"] == f"{sum(0.2 + 0.1 * f for f in folds) / len(folds):.4f}"
    assert "False-alarm rate" in R.client(params).get_model_version(params.mlflow.registered_model, version).description
    assert cv_summary(params, "lerenet") == {"paper.k1": 0.2, "standard.k1": 0.2}
    # the pipeline's parent run carries the CV summary and says which version was registered
    from pipeline import tracking

    parent = R.client(params).get_run(tracking.parent_run_id(params))
    assert parent.data.metrics["cv_lerenet_k1_miou"] == pytest.approx(0.2)
    assert parent.data.metrics["cv_lerenet_false_alarm_rate"] == pytest.approx(0.3)
    note = parent.data.tags["mlflow.note.content"]
    assert f"{params.mlflow.registered_model} v{version}" in note and "| **lerenet** | 0.2000 | 0.5000 | 30.0% |" in note
    mv = R.client(params).get_model_version(params.mlflow.registered_model, version)
    assert R.client(params).get_run(mv.run_id).info.run_name == "register-lerenet"
    v2, none = register_and_gate(params, "lerenet", checkpoint, promote=False)
    assert none is None and R.alias_version(params, R.CHALLENGER) == v2 and R.alias_version(params, R.CHAMPION) == version
