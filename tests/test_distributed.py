"""The training flow on a real Dask ``LocalCluster`` (prefect-dask) vs sequential vs a standalone ``train()``.

Issue 15 / 14.2: the same params give the same weights and metrics whether the fold x model grid
runs one task at a time in the flow process, on 2 Dask worker processes, or as a plain ``train()``
call; each training draws from its own generator. Real Prefect (session harness), real MLflow
(SQLite), real Dask scheduler and worker processes, the small real-image source of ``conftest.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from test_flows import tiny_params_file

MODELS = ["lerenet", "baseline"]


def _project(root: Path, source: Path, runner: str) -> Path:
    root.mkdir(parents=True)
    src = shutil.copytree(source, root / "source")
    pf = tiny_params_file(root, src)
    raw = yaml.safe_load(pf.read_text())
    raw["model"]["names"] = MODELS
    raw["distributed"] = {"runner": runner, "workers": 2, "address": None, "lock_timeout": 0}
    pf.write_text(yaml.safe_dump(raw, sort_keys=False))
    return pf


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from pipeline.checkpoint import load_model

    return load_model(path)[0].state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(root: Path) -> dict[str, object]:
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if "latency" not in k}
        return [strip(v) for v in x] if isinstance(x, list) else x

    files = sorted((root / "metrics").glob("fold*.json"))
    assert files, f"no metrics/fold*.json under {root}"
    return {f.name: strip(json.loads(f.read_text())) for f in files}


@pytest.fixture
def no_worker_torch_threads(monkeypatch):
    """Each process picks its own torch thread count (the local cluster sets its workers')."""
    monkeypatch.delenv("LERENET_TORCH_THREADS", raising=False)


def test_flow_on_dask_local_cluster_equals_sequential_and_standalone_train(
        prefect_harness, tmp_path, small_source, monkeypatch, no_worker_torch_threads):
    from flows.training_pipeline import training_pipeline
    from pipeline.config import load_params
    from pipeline.train import train

    monkeypatch.setenv("LERENET_TORCH_THREADS", "1")  # same intra-op thread count everywhere
    seq_pf = _project(tmp_path / "seq", small_source, "sequential")
    dask_pf = _project(tmp_path / "dask", small_source, "dask")
    seq = training_pipeline(str(seq_pf), None, None, False, False)
    dsk = training_pipeline(str(dask_pf), None, None, False, False)
    assert seq["cv"] == dsk["cv"]
    assert _metrics(tmp_path / "seq") == _metrics(tmp_path / "dask")
    for fold in (0, 1, 2):
        for m in MODELS:
            rel = Path("models") / f"fold{fold}" / m / "model.pt"
            assert _same(_weights(tmp_path / "seq" / rel), _weights(tmp_path / "dask" / rel)), rel
    # the flow's fold-0 LERENet == a standalone train() of the same params (fresh state, no resume)
    params = load_params(seq_pf, env={})
    alone = train(params, 0, "lerenet", out_dir=tmp_path / "alone", checkpoint_file=tmp_path / "alone.pt",
                  curve_file=tmp_path / "alone.csv", track=False, progress=False)
    assert _same(_weights(alone.model_path), _weights(tmp_path / "dask" / "models/fold0/lerenet/model.pt"))
