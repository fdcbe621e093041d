"""Shared setup for the training/feature/tracking tests: a small real dataset, ingested,
validated and split by the real data steps, with tiny training parameters."""

from __future__ import annotations

from pathlib import Path

from conftest import make_small_source, write_small_params

#: tiny but real training settings: 64x64 images, 12 steps of 2 episodes, checkpoint every 4
TINY_TRAIN = {"image_size": 64, "shots": 1, "episodes": 24, "batch_size": 2, "lr": 0.01,
              "feature_views": 2, "checkpoint_every": 4, "val_every": 4, "val_episodes": 4, "seed": 0,
              "device": "cpu"}
TINY_MODEL = {"channels": 32}


def make_project(root: Path, train: dict | None = None, model: dict | None = None) -> Path:
    """Write ``<root>/params.yaml`` over a small copy of the real data and run ingest, validate and
    split; returns the params file. MLflow goes to ``<root>/mlruns.db``."""
    from pipeline.config import load_params
    from pipeline.ingest import ingest
    from pipeline.split import split
    from pipeline.validate import validate

    root.mkdir(parents=True, exist_ok=True)
    source = make_small_source(root / "source")
    pf = write_small_params(root / "params.yaml", source, root / "data",
                            train={**TINY_TRAIN, **(train or {})}, model={**TINY_MODEL, **(model or {})})
    params = load_params(pf, env={})
    ingest(params, progress=False)
    report = validate(params)
    assert report["success"], report["failures"]
    split(params)
    return pf


def load(pf: Path, **overrides):
    """Params of ``pf`` with nested ``overrides`` (environment ignored)."""
    from pipeline.config import load_params

    return load_params(pf, overrides=overrides or None, env={})


_SHARED: dict[str, Path] = {}


def shared_project(tmp_path_factory) -> Path:
    """One small project per test session, shared by test_features and test_train (ingest + validate
    + split take tens of seconds); tests must leave its data and feature store as they found them."""
    if "pf" not in _SHARED:
        _SHARED["pf"] = make_project(tmp_path_factory.mktemp("shared_project"))
    return _SHARED["pf"]


def train_fold0(params, tmp_path_factory, model: str, tag: str):
    """Train ``model`` on fold 0 of ``params`` (untracked, no progress bar) into a fresh temporary folder named
    after ``tag``; returns the :class:`pipeline.train.TrainResult`."""
    from pipeline.train import train

    out = tmp_path_factory.mktemp(tag)
    return train(params, 0, model, out_dir=out / "m", checkpoint_file=out / "s.pt", curve_file=out / "c.csv",
                 track=False, progress=False)
