"""Evaluation on real (small) data: saved episodes, per-class tables, false alarms, MLflow, CLI, report."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from conftest import make_small_source, write_small_params
from pipeline.config import load_params
from pipeline.layout import Layout
from pipeline.metrics import IoUAccumulator

FOLD = 1  # test class MT_Uneven: soft masks, varied image sizes, 3 defect-free Nd images
MODELS = ("prototype", "lerenet")


def _save_checkpoint(path: Path, name: str) -> None:
    from model import build_model
    from pipeline.checkpoint import save_model

    torch.manual_seed(0)
    net = build_model(name, pretrained=True, channels=32)
    save_model(path, net, {"model": name, "backbone": "efficientnet_lite0", "variant": "mpr+mpe*", "channels": 32,
                           "freeze_backbone": True, "image_size": 96, "fold": FOLD})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Small real data ingested/validated/split, two real checkpoints, ``evaluate`` run once."""
    from pipeline import tracking
    from pipeline.evaluate import evaluate
    from pipeline.ingest import ingest
    from pipeline.split import split
    from pipeline.validate import validate

    root = tmp_path_factory.mktemp("evaluate")
    src = make_small_source(root / "source")
    params = load_params(write_small_params(
        root / "params.yaml", src, root / "data",
        model={"names": list(MODELS), "channels": 32},
        train={"image_size": 96, "feature_views": 0},
        evaluate={"latency_queries": 2, "overlay_episodes_per_class": 1},
        serve={"max_request_bytes": 5_000_000}), env={})
    ingest(params, progress=False)
    validate(params)
    split(params)
    layout = Layout.of(params)
    for name in MODELS:
        _save_checkpoint(layout.model_file(FOLD, name), name)
    # lerenet has a run.json as training writes it; the prototype has none (evaluation creates a run)
    tracking.configure(params)
    parent = tracking.parent_run_id(params)
    with tracking.nested_run(params, parent, f"fold{FOLD}/lerenet") as run:
        lerenet_run = run.info.run_id
    layout.run_json(FOLD, "lerenet").write_text(json.dumps({"run_id": lerenet_run}))
    result = evaluate(params, FOLD, track=True, batch_size=4)
    return params, result.to_json(), lerenet_run


def test_metrics_file_structure(evaluated):
    from pipeline.evaluation.results import FoldMetrics

    params, result, _ = evaluated
    layout = Layout.of(params)
    on_disk = json.loads(layout.fold_metrics(FOLD).read_text())
    # the typed reader gives back the file exactly, and the same values as evaluate() returned
    typed = FoldMetrics.read(layout.fold_metrics(FOLD))
    assert json.loads(typed.dumps()) == on_disk
    assert typed.models["lerenet"].score(1, "standard").miou == pytest.approx(result["lerenet"]["k1"]["standard"]["miou_mean"], abs=1e-4)
    assert set(on_disk) == {*MODELS, "device"}
    for name in MODELS:
        m = on_disk[name]
        for k in (1, 5):
            paper, std = m[f"k{k}"]["paper"], m[f"k{k}"]["standard"]
            assert 0.0 <= paper["miou"] <= 1.0 and 0.0 <= paper["fbiou"] <= 1.0
            assert paper["episodes"] == 7  # 7 usable MT_Uneven images (the empty-mask one is excluded)
            assert std["seeds"] == 2 and std["episodes"] == 40
            assert std["miou_std"] >= 0.0
            assert m["latency_ms"][f"k{k}"] > 0
            fp = m["fp"][f"k{k}"]
            assert fp["images"] == 3 and 0.0 <= fp["area_fraction"] <= 1.0 and 0.0 <= fp["image_rate"] <= 1.0
    table = pd.read_csv(layout.per_class(FOLD))
    assert set(table.columns) >= {"fold", "model", "shots", "protocol", "class_name", "iou", "iou_std", "episodes"}
    assert len(table) == len(MODELS) * 2 * 2  # models x K x protocol, one test class
    assert set(table["class_name"]) == {"MT_Uneven"}
    # one test class: the standard protocol's per-seed mIoU is that class's IoU, so the means agree
    for name in MODELS:
        row = table[(table.model == name) & (table.shots == 1) & (table.protocol == "standard")].iloc[0]
        assert row.iou == pytest.approx(result[name]["k1"]["standard"]["miou_mean"], abs=1e-6)
    wide = pd.read_csv(layout.per_class_plot(FOLD))
    assert list(wide["class_name"]) == ["MT_Uneven"] and "lerenet_k5_paper" in wide.columns


def test_scores_equal_end_to_end_prediction_from_images(evaluated):
    """Batched, feature-cached scoring == one full forward per episode from decoded images."""
    from pipeline.evaluation.data import ImageTable
    from pipeline.images import load_episodes, load_validated
    from pipeline.inference.predictor import Predictor

    params, result, _ = evaluated
    table = ImageTable(load_validated(params.data.dir), params.data.dir, params.data.mask_threshold)
    for name, k in (("prototype", 1), ("lerenet", 1), ("lerenet", 5)):
        predictor = Predictor.load(Layout.of(params).model_file(FOLD, name))
        acc = IoUAccumulator()
        for ep in load_episodes(params.data.dir, FOLD, "paper", k).itertuples():
            logits = predictor.segment([table.image(s) for s in ep.support_ids],
                                       [table.mask(s) for s in ep.support_ids], table.image(ep.query_id))
            acc.update(logits > 0, table.mask(ep.query_id), ep.class_name)
        assert acc.miou() == pytest.approx(result[name][f"k{k}"]["paper"]["miou"], abs=2e-3)
        assert acc.fbiou() == pytest.approx(result[name][f"k{k}"]["paper"]["fbiou"], abs=2e-3)


def test_false_alarms_equal_direct_prediction_on_defect_free_images(evaluated):
    from pipeline.evaluation.data import ImageTable
    from pipeline.images import load_episodes, load_validated
    from pipeline.inference.predictor import Predictor

    params, result, _ = evaluated
    rows = load_validated(params.data.dir)
    table = ImageTable(rows, params.data.dir, params.data.mask_threshold)
    nd = rows[(rows.kind == "normal") & (rows.class_name == "MT_Uneven")]["id"].tolist()
    predictor = Predictor.load(Layout.of(params).model_file(FOLD, "lerenet"))
    eps = load_episodes(params.data.dir, FOLD, "paper", 1)  # the first protocol seen supplies the support sets
    sets = eps["support_ids"].tolist()
    fracs, anys = [], []
    for j, i in enumerate(nd):
        s = sets[j % len(sets)]
        pred = predictor.segment([table.image(x) for x in s], [table.mask(x) for x in s], table.image(i)) > 0
        fracs.append(pred.mean())
        anys.append(pred.any())
    fp = result["lerenet"]["fp"]["k1"]
    assert fp["area_fraction"] == pytest.approx(float(np.mean(fracs)), abs=2e-3)
    assert fp["image_rate"] == pytest.approx(float(np.mean(anys)))


def test_mlflow_runs_hold_metrics_table_and_pictures(evaluated):
    from pipeline import tracking

    params, result, lerenet_run = evaluated
    client = tracking.client(params)
    run = client.get_run(lerenet_run)  # logged into the training run named by run.json
    assert run.data.metrics["test_k1_paper_miou"] == pytest.approx(result["lerenet"]["k1"]["paper"]["miou"])
    assert "test_k5_standard_miou_std" in run.data.metrics and "latency_ms_k1" in run.data.metrics
    files = {a.path for a in client.list_artifacts(lerenet_run, "evaluation")}
    assert {"evaluation/per_class_iou.png", "evaluation/per_class_iou.csv", "evaluation/per_class_iou.json",
            "evaluation/overlays_k1_paper.png", "evaluation/overlays_k5_paper.png"} <= files
    # the prototype had no run.json: a nested run under the pipeline's parent was created for it
    parent = tracking.parent_run_id(params)
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    proto = [r for r in children if r.data.tags.get("model") == "prototype"]
    assert proto and "test_k1_paper_miou" in proto[0].data.metrics
    # each evaluated model is also logged as a pyfunc in its run and loads back for evaluation
    from pipeline.inference.model_file import load_model
    from pipeline.inference.predictor import Predictor

    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                         filter_string=f"source_run_id = '{lerenet_run}'")
    assert [m.name for m in logged] == [f"fold{FOLD}-lerenet"]  # named, not all "model"
    import mlflow  # the served byte limit (serve.max_request_bytes) travels as the model's model_config

    info = mlflow.models.get_model_info(logged[0].model_uri)
    assert info.flavors["python_function"]["config"] == {"max_request_bytes": 5_000_000}
    run = client.get_run(lerenet_run)
    assert run.data.tags["lerenet.step"] == "train+evaluate" and "**Evaluated**" in run.data.tags["mlflow.note.content"]
    # `runs:/<id>/model` (the default name) still finds the run's one model
    predictor = Predictor.load(f"runs:/{lerenet_run}/model", tracking_uri=tracking.tracking_uri(params))
    assert Predictor.load(f"runs:/{lerenet_run}/fold{FOLD}-lerenet",
                          tracking_uri=tracking.tracking_uri(params)).source.run_id == lerenet_run
    ref, _ = load_model(Layout.of(params).model_file(FOLD, "lerenet"))
    assert predictor.image_size == 96 and predictor.source.run_id == lerenet_run
    assert all(torch.equal(v, predictor.net.state_dict()[k]) for k, v in ref.state_dict().items())


def test_feature_store_gives_the_same_scores(evaluated, tmp_path):
    """With the frozen-backbone feature cache (float16) the scores match in-memory encoding."""
    from pipeline.evaluate import evaluate
    from pipeline.features import build_feature_store

    params, result, _ = evaluated
    build_feature_store(params, progress=False)
    cached = evaluate(params, FOLD, ["lerenet"], track=False, batch_size=4)
    for k in (1, 5):
        assert cached.models["lerenet"].score(k, "paper").miou == pytest.approx(
            result["lerenet"][f"k{k}"]["paper"]["miou"], abs=0.02)


def test_missing_checkpoint_is_a_clear_error(evaluated):
    from pipeline.evaluate import evaluate
    from pipeline.evaluation.data import EvaluationError

    params, _, _ = evaluated
    with pytest.raises(EvaluationError, match=r"fold2/lerenet/model.pt.*lerenet train"):
        evaluate(params, 2, ["lerenet"], track=False)


def test_report_table(evaluated):
    from pipeline.report import write_report

    params, result, _ = evaluated
    text = write_report(params).read_text()
    miou = result["lerenet"]["k1"]["paper"]["miou"]
    assert f"| lerenet | 1 | paper | n/a | {100 * round(miou, 4):.1f} | n/a | n/a |" in text
    assert "Folds without metrics (shown as n/a): [0, 2]" in text
    assert "± " in text and "Latency" in text and "False alarms" in text


def test_cli_folder_mode_is_seeded_and_prints_json(evaluated, tmp_path):
    from lerenet.cli import app

    params, _, _ = evaluated
    source = make_small_source(tmp_path / "folder")
    runner = CliRunner()
    args = ["evaluate", "--data", str(source), "--model", str(Layout.of(params).model_file(FOLD, "lerenet")),
            "--shots", "1", "--episodes", "12", "--seed", "3", "--device", "cpu"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    out = json.loads(first.stdout)
    assert set(out["per_class_iou"]) <= {"Steel_In", "MT_Uneven", "Leather_Color"} and len(out["per_class_iou"]) >= 2
    assert 0.0 <= out["miou"] <= 1.0 and out["episodes"] == 12
    assert out["fp"]["images"] == 3  # MT_Uneven/Nd
    assert any("empty mask" in n for n in out["left_out"])
    again = runner.invoke(app, args)
    assert json.loads(again.stdout) == out
    from pipeline.evaluation.folder import folder_episodes, folder_table

    table, _ = folder_table(source)
    e3, e4 = folder_episodes(table, 1, 12, 3), folder_episodes(table, 1, 12, 4)
    assert e3.equals(folder_episodes(table, 1, 12, 3)) and not e3.equals(e4)


def test_folder_mode_gives_references_to_a_model_calibrated_with_them(evaluated, tmp_path):
    """A model file with a reference threshold gets R of the folder's own Nd images per material; they leave the
    false-alarm set and gate that material's episodes; other materials keep their gate (here: none)."""
    from model import build_model
    from pipeline.checkpoint import save_model
    from pipeline.evaluation.folder import evaluate_folder

    params, _, _ = evaluated
    source = make_small_source(tmp_path / "folder")
    torch.manual_seed(0)
    net = build_model("lerenet", pretrained=True, channels=32)
    meta = {"model": "lerenet", "backbone": "efficientnet_lite0", "variant": "mpr+mpe*", "channels": 32,
            "freeze_backbone": True, "image_size": 96, "fold": FOLD}
    shut = tmp_path / "shut.pt"     # every episode with a reference is gated off: no query beats it by 1e9
    save_model(shut, net, {**meta, "presence_threshold_ref": 1e9, "presence_references": 1})
    plain = Layout.of(params).model_file(FOLD, "lerenet")
    kw = dict(shots=1, episodes=12, seed=3, device="cpu")
    ref = evaluate_folder(source, str(shut), **kw)
    assert list(ref["references"]) == ["MT"] and len(ref["references"]["MT"]) == 1
    assert ref["references"]["MT"][0].startswith("MT_Uneven/Nd/")
    assert ref["fp"]["images"] == 2 and ref["fp"]["image_rate"] == 0.0     # the reference left the set; all gated
    assert ref["per_class_iou"].get("MT_Uneven", 0.0) == 0.0
    off = evaluate_folder(source, str(shut), references=0, **kw)             # --references 0: none
    assert off["references"] == {} and off["fp"]["images"] == 3
    base = evaluate_folder(source, str(plain), **kw)                         # no reference threshold
    assert base["references"] == {} and base["fp"]["images"] == 3
    steel = [c for c in ref["per_class_iou"] if not c.startswith("MT")]
    assert steel and all(ref["per_class_iou"][c] == base["per_class_iou"][c] for c in steel)
    noted = evaluate_folder(source, str(plain), references=2, **kw)
    assert noted["references"] == {} and any("no reference threshold" in n for n in noted["left_out"])


def test_cli_errors(tmp_path):
    from lerenet.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["evaluate", "--data", str(tmp_path / "nope"), "--model", "prototype"])
    assert r.exit_code == 1 and "does not exist" in r.output
    r = runner.invoke(app, ["evaluate"])
    assert r.exit_code == 2 and "exactly one of --fold" in r.output
    r = runner.invoke(app, ["evaluate", "--data", str(tmp_path), "--model", str(tmp_path / "missing.pt")])
    assert r.exit_code == 1


def test_plots_write_pngs_and_reject_bad_input(tmp_path):
    from pipeline.plots import OverlayEpisode, overlay, overlay_grid, per_class_bar

    img = np.zeros((6, 8, 3), np.uint8)
    m = np.zeros((6, 8), bool)
    m[2:4, 3:5] = True
    assert overlay(img, m, (1.0, 0.0, 0.0), alpha=0.5)[3, 4, 0] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="size"):
        overlay(img, np.zeros((5, 8), bool), (1.0, 0.0, 0.0))
    p = overlay_grid([OverlayEpisode("A", [img], [m], img, m, m, 1.0)], tmp_path / "g.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert per_class_bar({"A": 0.5, "B": 0.25}, tmp_path / "b.png").stat().st_size > 0
    with pytest.raises(ValueError):
        overlay_grid([], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_inference_batches_equal_the_feature_store_view():
    """What the Predictor feeds the backbone (batched resize) == the feature store's view 0 (clean view)."""
    from conftest import REAL_DATA
    from pipeline.augment import clean_pair, to_tensor_pair
    from pipeline.images import read_image, read_mask
    from pipeline.inference.preprocess import image_batch, mask_batch

    names = ["exp1_num_109232", "exp1_num_124236"]  # gray JPEG, soft masks, different sizes
    imgs = [read_image(REAL_DATA / "MT_Uneven" / "Images" / f"{n}.jpg") for n in names]
    msks = [read_mask(REAL_DATA / "MT_Uneven" / "GT" / f"{n}.png") for n in names]
    batch_i, batch_m = image_batch(imgs, 96), mask_batch(msks, 96)
    assert batch_i.shape == (2, 3, 96, 96) and batch_m.shape == (2, 1, 96, 96)
    for j, (img, msk) in enumerate(zip(imgs, msks)):
        v_img, v_msk = to_tensor_pair(*clean_pair(img, msk, 96))
        assert torch.equal(batch_i[j], v_img) and torch.equal(batch_m[j], v_msk)
    _, empty = to_tensor_pair(*clean_pair(imgs[0], None, 96))  # defect-free image: all background
    assert not empty.any()
