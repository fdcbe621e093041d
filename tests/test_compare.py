"""Issue 12: SOFS and JAFFNet trained and scored by the pipeline's own step functions, beside the others.

Real data: a few images of four real classes (``/work/shared/datasets/defects12``), the magnetic-tile class
with its defect-free ``Nd`` images so that the false alarms are measured. Fold 0 has two test classes, so
the mismatched control (support from the other novel class) exists. ``train`` runs a few steps of each
model (SOFS on the feature store, JAFFNet on images with its deep-supervised hybrid loss), ``evaluate``
writes ``metrics/fold0.json``, ``report`` the results table; the registry gate still reads LERENet only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REAL_DATA, SMALL_SET, write_small_params
from pipeline.config import DEFAULT_PARAMS, load_params
from pipeline.layout import Layout

FOLDS = {0: ["MT_Uneven", "Steel_In"], 1: ["Leather_Color"], 2: ["Steel_Pa"]}
STEEL_PA = [f"Pa_{i}.png" for i in range(1, 8)]
MODELS = ("prototype", "sofs", "jaffnet")
TRAIN = {"image_size": 64, "shots": 1, "episodes": 8, "batch_size": 2, "lr": 0.01, "feature_views": 1,
         "checkpoint_every": 4, "val_every": 2, "val_episodes": 4, "seed": 0, "device": "cpu",
         "validate_at_start": True}


def _source(dest: Path) -> Path:
    """``SMALL_SET`` (MT_Uneven with 3 ``Nd`` images) plus 7 ``Steel_Pa`` images, copied from the real data."""
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} not available (set LERENET_TEST_DATA)")
    files = {**SMALL_SET, "Steel_Pa": (STEEL_PA, [])}
    for cls, (images, normals) in files.items():
        for sub in ("Images", "GT"):
            (dest / cls / sub).mkdir(parents=True, exist_ok=True)
        for name in images:
            shutil.copy2(REAL_DATA / cls / "Images" / name, dest / cls / "Images" / name)
            shutil.copy2(REAL_DATA / cls / "GT" / f"{Path(name).stem}.png", dest / cls / "GT" / f"{Path(name).stem}.png")
        if normals:
            (dest / cls / "Nd").mkdir(exist_ok=True)
            for name in normals:
                shutil.copy2(REAL_DATA / cls / "Nd" / name, dest / cls / "Nd" / name)
    return dest


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Ingest, validate, split, features, then ``train`` of each model on fold 0 (a few steps) and ``evaluate``."""
    from pipeline.evaluate import evaluate
    from pipeline.features import build_feature_store
    from pipeline.ingest import ingest
    from pipeline.split import split
    from pipeline.train import train
    from pipeline.validate import validate

    root = tmp_path_factory.mktemp("compare")
    pf = write_small_params(root / "params.yaml", _source(root / "source"), root / "data", folds=FOLDS,
                            model={"names": list(MODELS), "channels": 32}, train=TRAIN,
                            split={"shots": [1, 5], "standard_seeds": [0, 1], "standard_episodes": 6},
                            evaluate={"latency_queries": 1, "overlay_episodes_per_class": 1, "log_pyfunc": False})
    params = load_params(pf, env={})
    ingest(params, progress=False)
    assert validate(params)["success"]
    split(params)
    build_feature_store(params, progress=False)
    results = {name: train(params, 0, name, track=True, progress=False) for name in MODELS}
    metrics = evaluate(params, 0, track=True, batch_size=4)
    return params, results, metrics


def test_compare_profile_adds_sofs_and_jaffnet_to_the_default_three():
    default = load_params(DEFAULT_PARAMS, env={})
    compare = load_params(DEFAULT_PARAMS, env={"LERENET_PROFILE": "compare"})
    assert default.model.names == ["lerenet", "baseline", "prototype"]  # make run stays the three
    assert compare.model.names == [*default.model.names, "sofs", "jaffnet"]
    # nothing else changes: same training, same episodes
    assert compare.model_dump(exclude={"model", "profile"}) == default.model_dump(exclude={"model", "profile"})
    assert compare.model.model_dump(exclude={"names"}) == default.model.model_dump(exclude={"names"})


def test_sofs_mechanism_switches_and_its_own_train_settings_reach_it():
    """``model.sofs_mask_resize`` / ``model.sofs_priors`` build the ablated SOFS (and are kept in the model
    file's config); ``train.per_model.sofs`` gives SOFS its own lr without touching the other models."""
    from pipeline.checkpoint import build_net

    default = load_params(DEFAULT_PARAMS, env={})
    full = build_net(default, "sofs", pretrained=False)
    assert (full.mask_resize, full.use_priors) == ("area", True) and "priors" not in full.config
    ablated = load_params(DEFAULT_PARAMS, env={}, overrides={"model": {"sofs_mask_resize": "nearest",
                                                                       "sofs_priors": False}})
    net = build_net(ablated, "sofs", pretrained=False)
    assert (net.mask_resize, net.use_priors) == ("nearest", False)
    assert net.config["mask_resize"] == "nearest" and net.config["priors"] is False
    assert sum(p.numel() for p in net.parameters()) < sum(p.numel() for p in full.parameters())  # no prior inputs
    assert build_net(ablated, "lerenet", pretrained=False).config == build_net(default, "lerenet", pretrained=False).config
    sofs, lerenet = default.for_model("sofs").train, default.for_model("lerenet").train
    assert sofs.lr < lerenet.lr == default.train.lr and sofs.negative_share == 0.3


@pytest.mark.slow
def test_sofs_and_jaffnet_train_through_the_pipeline(trained):
    from pipeline.inference.model_file import load_model

    params, results, _ = trained
    steps = TRAIN["episodes"] // TRAIN["batch_size"]
    for name in ("sofs", "jaffnet"):
        r = results[name]
        assert r.steps == steps and r.model_path.is_file()
        curve = r.curve_path.read_text().splitlines()
        assert len(curve) == 1 + 1 + steps  # header, step 0 (validate_at_start), every step
        losses = [float(line.split(",")[2]) for line in curve[2:]]
        assert all(torch.isfinite(torch.tensor(losses))) and min(losses) > 0
        net, meta = load_model(r.model_path)
        assert meta["model"] == name and type(net).__name__ == {"sofs": "SOFS", "jaffnet": "JAFFNet"}[name]
        run = json.loads(r.run_json.read_text())
        assert run["model"] == name and run["run_id"]


@pytest.mark.slow
def test_jaffnet_trains_on_images_with_its_deep_supervised_loss(trained):
    """JAFFNet's encode is its own encoder pass (pixels, not the store's features): the loop encodes the
    images and sums the hybrid loss over every side output; the step-1 loss recorded is that sum."""
    from model.losses import deep_supervision_loss, hybrid_loss
    from pipeline.checkpoint import build_net
    from pipeline.training.batches import ImageEpisodes
    from pipeline.training.loop import Session

    params, _, _ = trained
    net = build_net(params, "jaffnet").train()
    assert not net.caches_features and build_net(params, "sofs").caches_features
    from pipeline.episodes import training_pools
    from pipeline.images import load_validated

    rows = {r["id"]: r for r in load_validated(params.data.dir, kind="defect").to_dict("records")}
    pools, _ = training_pools(params, 0)
    ds = ImageEpisodes(params, pools, rows, augment=True)
    items = [ds[i] for i in range(2)]
    b = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    s = Session(params, net, torch.device("cpu"), None, None, None, [], None, None, None, ())
    torch.manual_seed(0)
    loss = s.loss(b).detach()
    torch.manual_seed(0)
    sides = net.side_logits(net.encode(b["support_images"].flatten(0, 1)).unflatten(0, (2, 1)), b["support_masks"],
                            net.encode(b["query_images"]), (64, 64))
    assert len(sides) == 4
    assert float(loss) == pytest.approx(float(deep_supervision_loss(sides, b["query_masks"])), rel=1e-5)
    assert float(loss) > float(hybrid_loss(sides[0], b["query_masks"]))  # more than the finest side alone


@pytest.mark.slow
def test_fold_metrics_have_sofs_and_jaffnet_in_the_lerenet_schema(trained):
    from pipeline.evaluation.results import FoldMetrics

    params, _, result = trained
    on_disk = json.loads(Layout.of(params).fold_metrics(0).read_text())
    reference = on_disk["prototype"]  # same ModelMetrics as lerenet: the schema every model shares
    for name in ("sofs", "jaffnet"):
        entry = on_disk[name]
        assert set(entry) == set(reference) and {"k1", "k5", "fp", "latency_ms"} <= set(entry)
        for k in ("k1", "k5"):
            assert set(entry[k]) == {"paper", "standard", "mismatched", "support_gain"} == set(reference[k])
            assert set(entry[k]["paper"]) == {"miou", "fbiou", "episodes"}
            assert entry[k]["paper"]["episodes"] == reference[k]["paper"]["episodes"] > 0
            assert 0.0 <= entry[k]["paper"]["miou"] <= 1.0
            assert entry[k]["mismatched"]["episodes"] == entry[k]["paper"]["episodes"]
        assert set(entry["fp"]) == {"k1", "k5"} and entry["fp"]["k1"]["images"] == 3  # MT_Uneven's Nd images
    # JAFFNet never reads its support: the mismatched control scores exactly the same
    j = result.models["jaffnet"]
    assert j.support_gain(1) == 0.0 and j.support_gain(5) == 0.0
    assert json.loads(FoldMetrics.read(Layout.of(params).fold_metrics(0)).dumps()) == on_disk


@pytest.mark.slow
def test_report_lists_them_and_the_registry_gate_reads_lerenet_only(trained):
    from pipeline.config import PRODUCTION_MODEL
    from pipeline.registry import RegistryError, collect_cv_cells
    from pipeline.report import write_report

    params, _, _ = trained
    text = write_report(params).read_text()
    for name in ("sofs", "jaffnet"):
        assert f"| {name} | 1 | paper |" in text and f"| {name} | 5 | paper |" in text
    # the champion/challenger gate compares the production model's CV cells; LERENet was not trained
    # here, so it finds nothing to compare rather than ranking SOFS or JAFFNet
    assert PRODUCTION_MODEL == "lerenet"
    with pytest.raises(RegistryError, match="lerenet"):
        collect_cv_cells(params)


def test_results_table_says_which_models_beat_the_support_free_reference():
    from pipeline.evaluation.results import FoldMetrics, ModelMetrics, ProtocolScore
    from pipeline.report import results_table

    def m(paper: float) -> ModelMetrics:
        return ModelMetrics({1: {"paper": ProtocolScore("paper", paper, 0.5, 10)}})

    folds = {0: FoldMetrics({"lerenet": m(0.40), "prototype": m(0.25), "jaffnet": m(0.30)}),
             1: FoldMetrics({"lerenet": m(0.35), "prototype": m(0.35), "jaffnet": m(0.20)})}
    text = results_table(folds)
    assert "### Against the support-free reference (jaffnet" in text
    assert "| lerenet | 1 | +10.0 | +15.0 | +12.5 | yes |" in text
    assert "| prototype | 1 | -5.0 | +15.0 | +5.0 | **no** |" in text  # better on average, not on every fold
    assert "| jaffnet | 1 | +" not in text
    assert "support-free reference" not in results_table({0: FoldMetrics({"lerenet": m(0.4)})})
