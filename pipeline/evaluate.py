"""The DVC stage ``evaluate``: score the fold's trained models on its saved test episodes.

What is measured (issue 4, ``docs/architecture.md``):

* **IoU metrics** (:mod:`pipeline.metrics`): per-class IoU = Σ I / Σ U over the class's episodes,
  mIoU over the fold's test classes, FB-IoU pooled over the fold; for each K in
  ``params.split.shots`` and each protocol in ``params.evaluate.protocols``. The standard protocol is
  scored per seed and reported as mean ± std (ddof=1) over ``params.split.standard_seeds``.
* **Support sensitivity**: whenever ``paper`` is evaluated, the ``mismatched`` episodes too (the
  paper episodes with the support from another novel class of the fold, pipeline/split.py), through
  the same Predictor and features; ``support gain = paper mIoU - mismatched mIoU`` (~0 for a model
  that ignores its support). Not a switch of its own: the file costs one more paper-sized pass.
* **Resolution**: supports and query are resized to ``S x S`` (the model's training size, bilinear;
  masks nearest), the model's logits are bilinearly upsampled to the query's *original* ``(H, W)``
  and thresholded at logit > 0 (sigmoid > 0.5); ground truth is the original mask binarised with
  ``params.data.mask_threshold`` -- all through the model's
  :class:`~pipeline.inference.predictor.Predictor` (:mod:`pipeline.evaluation.scoring`).
* **Speed**: with a frozen backbone every image is encoded once (the ``features`` stage's store, view
  0 = clean ``S x S`` image, float16) and reused across episodes, shots and models; otherwise each
  image is encoded once per model and kept in memory (:class:`~pipeline.evaluation.data.FeatureSource`).
* **False alarms** and **latency**: :mod:`pipeline.evaluation.fold`.

Outputs (fold ``f``, paths from :class:`pipeline.layout.Layout`): ``metrics/fold<f>.json`` (DVC
metrics, :class:`~pipeline.evaluation.results.FoldMetrics`), ``metrics/per_class/fold<f>.csv`` (long
table), ``metrics/plots/per_class_fold<f>.csv`` (one row per class, one column per model/K/protocol,
for ``dvc plots``), and in each model's nested MLflow run (:mod:`pipeline.evaluation.tracking`):
final metrics, the per-class table, overlay grids and the per-class IoU bar chart.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pipeline.atomic import atomic_write_text, remove_stale_temps
from pipeline.config import Params
from pipeline.evaluation.data import EvaluationError, FeatureSource, ImageTable, fold_references, open_store_for
from pipeline.evaluation.fold import evaluate_model
from pipeline.evaluation.results import MISMATCHED, FoldMetrics
from pipeline.images import load_episodes, load_split, load_validated
from pipeline.inference.predictor import Predictor
from pipeline.layout import Layout

log = logging.getLogger(__name__)


def _plot_table(per_class: pd.DataFrame) -> pd.DataFrame:
    """Wide per-class table: one row per class, one IoU column per ``<model>_k<K>_<protocol>``."""
    t = per_class.assign(series=per_class["model"] + "_k" + per_class["shots"].astype(str) + "_" + per_class["protocol"])
    wide = t.pivot_table(index="class_name", columns="series", values="iou", sort=False).reset_index()
    wide.columns.name = None
    return wide


def _atomic_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, df.to_csv(index=False, float_format="%.6f"))


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def _fold_inputs(params: Params, fold: int, names: Sequence[str], data_dir: Path
                 ) -> tuple[list[str], ImageTable, dict[str, list[str]], dict[tuple[str, int], pd.DataFrame]]:
    """Test classes, image table, defect-free ids per test class and saved episodes of ``fold``; checks
    the split against the fold table and that every model file exists."""
    layout = Layout.of(params, data_dir)
    test_classes = params.test_classes(fold)
    split = load_split(data_dir, fold)
    if sorted(split["test_classes"]) != sorted(test_classes):
        raise EvaluationError(f"data/splits/fold{fold}.json test classes {split['test_classes']} differ from "
                              f"params.yaml folds[{fold}] {test_classes}: re-run `dvc repro split`")
    rows = load_validated(data_dir)
    table = ImageTable(rows, data_dir, params.data.mask_threshold)
    normal = rows[(rows["kind"] == "normal") & rows["class_name"].isin(test_classes)]
    normal_ids = {c: part["id"].tolist() for c, part in normal.groupby("class_name")}
    protocols = list(params.evaluate.protocols) + ([MISMATCHED] if "paper" in params.evaluate.protocols else [])
    episodes = {(p, k): load_episodes(data_dir, fold, p, k) for p in protocols for k in params.split.shots}
    missing = [p for p in (layout.model_file(fold, n) for n in names) if not p.is_file()]
    if missing:
        raise EvaluationError(f"model file(s) missing: {[str(p) for p in missing]}; train them first "
                              f"(`lerenet train --fold {fold} --model NAME` or `dvc repro train`; under DVC the "
                              "train matrix reads the top-level model.names, not a profile's: "
                              "`dvc exp run -S 'model.names=[...]'`)")
    return test_classes, table, normal_ids, episodes


def evaluate(params: Params, fold: int, model_names: Sequence[str] | None = None, data_dir: Path | None = None,
             *, track: bool = True, batch_size: int | None = None) -> FoldMetrics:
    """Evaluate the trained models of ``fold`` on its saved test episodes (the DVC stage ``evaluate``).

    Args:
        params: validated parameters (shots from ``split.shots``, protocols from ``evaluate.protocols``).
        fold: fold number in ``params.folds``.
        model_names: models to score (default ``params.model.names``); each needs
            ``models/fold<f>/<model>/model.pt``.
        data_dir: data folder (default ``params.data.dir``).
        track: log metrics, per-class table and pictures (and, with ``evaluate.log_pyfunc``, the model
            as a pyfunc) into each model's nested MLflow run.
        batch_size: episodes per forward pass (default ``params.evaluate.batch_size``).

    Returns:
        The typed content written to ``metrics/fold<f>.json``
        (:class:`~pipeline.evaluation.results.FoldMetrics`; ``.to_json()`` is the file's dict, unrounded).

    Raises:
        EvaluationError: a model file is missing (run ``lerenet train``) or no episodes exist.
        pipeline.images.DataArtifactError: split/validate outputs are missing.
    """
    from pipeline.device import configure_threads, resolve_device

    data_dir = Path(data_dir) if data_dir is not None else params.data.dir
    layout = Layout.of(params, data_dir)
    names = list(model_names or params.model.names)
    # orphan temporaries of an attempt killed mid-write (a lost Dask worker): only this fold's evaluation writes these
    remove_stale_temps(layout.per_class(fold), layout.per_class_plot(fold), layout.fold_metrics(fold))
    test_classes, table, normal_ids, episodes = _fold_inputs(params, fold, names, data_dir)
    batch_size = batch_size or params.evaluate.batch_size
    device = resolve_device(params.train.device)
    configure_threads(device)
    out = FoldMetrics()
    frames = []
    store_cache: dict[tuple[str, int], Any] = {}
    shared_src: dict[tuple[str, int], FeatureSource] = {}
    for name in names:
        predictor = Predictor.load(layout.model_file(fold, name), device=device)
        backbone = getattr(predictor.net, "config", {}).get("backbone", params.model.backbone)
        key = (backbone, predictor.image_size)
        # the store fits a frozen backbone whose encode output is the backbone's features (not JAFFNet's pixels)
        fits = getattr(predictor.net, "freeze_backbone", False) and getattr(predictor.net, "caches_features", True)
        if fits and key not in store_cache:
            store_cache[key] = open_store_for(params, predictor, data_dir)
        store = store_cache.get(key) if fits else None
        if store is not None and key in shared_src:
            src = shared_src[key]
            src.predictor = predictor
        else:
            src = FeatureSource(predictor, table, store)
            if store is not None:
                shared_src[key] = src
        src.use_references(fold_references(params, fold, predictor))
        t0 = time.perf_counter()
        res = evaluate_model(src, fold, name, test_classes, episodes, normal_ids, params.evaluate.latency_queries,
                             params.evaluate.overlay_episodes_per_class, batch_size)
        n_eps = sum(len(e) for e in episodes.values())
        dt = time.perf_counter() - t0
        log.info("fold %d %s: %d episodes evaluated in %.1f s (%.1f episodes/s incl. false alarms and latency)",
                 fold, name, n_eps, dt, n_eps / dt)
        out.models[name] = res.metrics
        frames.append(res.per_class)
        if track:
            from pipeline.evaluation.tracking import log_evaluation

            log_evaluation(params, fold, name, res)
    out.device = _device_label(device)
    per_class = pd.concat(frames, ignore_index=True)
    _atomic_csv(per_class, layout.per_class(fold))
    _atomic_csv(_plot_table(per_class), layout.per_class_plot(fold))
    out.write(layout.fold_metrics(fold))
    return out
