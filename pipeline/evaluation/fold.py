"""One model on one fold: every (K, protocol) of the saved episodes, false alarms and latency.

* **K-shot**: the K supports of an episode are passed together; the model averages over shots
  (paper Eq. 16).
* **Standard protocol**: scored per seed, reported as mean +- std (ddof=1) over seeds.
* **Mismatched** (support-sensitivity control): the paper episodes with the support from another
  novel class, scored like ``paper`` (same batches, same Predictor) into ``ModelMetrics.mismatched``;
  an empty episode set (a fold with one test class) is skipped.
* **False alarms**: for each test class with defect-free (``normal``/``Nd``) images, the support sets
  of the first protocol seen for each K (cycled) are run against those images.
* **Latency**: median wall time of ``latency_queries`` full predictions of one query from decoded
  images (:meth:`pipeline.inference.predictor.Predictor.segment`), after two warm-up passes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pipeline.evaluation.data import FeatureSource
from pipeline.evaluation.results import MISMATCHED, SEEDED_PROTOCOLS, ModelMetrics, ProtocolScore
from pipeline.evaluation.scoring import false_alarms, latency_ms, overlay_indices, overlay_items, score_episodes
from pipeline.metrics import mean_std


@dataclass
class ModelResult:
    """Everything measured for one model on one fold (see :func:`evaluate_model`)."""

    metrics: ModelMetrics
    per_class: pd.DataFrame
    overlays: dict[str, list[Any]] = field(default_factory=dict)


def _per_class_row(fold: int, model_name: str, k: int, protocol: str, c: str, iou: float, std: float,
                   episodes: int) -> dict[str, Any]:
    return {"fold": fold, "model": model_name, "shots": k, "protocol": protocol, "class_name": c,
            "iou": iou, "iou_std": std, "episodes": episodes}


def _score_seeded(src: FeatureSource, eps: pd.DataFrame, protocol: str, k: int, fold: int, model_name: str,
                  test_classes: Sequence[str], batch_size: int, rows: list[dict[str, Any]]) -> ProtocolScore:
    """Score each seed apart; mean +- std over seeds; per-class rows appended to ``rows``."""
    mious, fbious, per_seed = [], [], []
    for seed, part in eps.groupby("seed", sort=True):
        acc, _ = score_episodes(src, part.reset_index(drop=True), batch_size,
                                desc=f"{model_name} k{k} {protocol} seed {seed}")
        mious.append(acc.miou(test_classes))
        fbious.append(acc.fbiou())
        per_seed.append(acc.class_iou(test_classes))
    m, ms = mean_std(mious)
    f_, fs = mean_std(fbious)
    for c in test_classes:
        cm, cs = mean_std([d[c] for d in per_seed])
        rows.append(_per_class_row(fold, model_name, k, protocol, c, cm, cs, int((eps["class_name"] == c).sum())))
    return ProtocolScore(protocol, m, f_, int(len(eps)), ms, fs, len(mious))


def evaluate_model(src: FeatureSource, fold: int, model_name: str, test_classes: Sequence[str],
                   episodes: dict[tuple[str, int], pd.DataFrame], normal_ids: dict[str, list[str]],
                   latency_queries: int, overlay_per_class: int, batch_size: int = 64) -> ModelResult:
    """Score one model (``src.predictor``) on one fold's saved episodes; compute false alarms and latency.

    Args:
        src: the model's Predictor and the images' features (:class:`~pipeline.evaluation.data.FeatureSource`).
        episodes: ``{(protocol, K): episode rows}``; the ``standard`` rows carry several seeds; a
            ``("mismatched", K)`` entry is scored into ``metrics.mismatched`` (skipped when empty).
        normal_ids: defect-free image ids per test class.
        latency_queries: timed predictions per K. overlay_per_class: overlay episodes kept per class.

    Returns:
        :class:`ModelResult`: typed metrics (:class:`~pipeline.evaluation.results.ModelMetrics`), the
        per-class long table (``fold, model, shots, protocol, class_name, iou, iou_std, episodes``)
        and overlay items per ``k<K>_<protocol>``.
    """
    metrics = ModelMetrics()
    rows: list[dict[str, Any]] = []
    overlays: dict[str, list[Any]] = {}
    # per K: the protocols in name order, the mismatched control last (it never supplies the support
    # sets of the false alarms)
    for (protocol, k), eps in sorted(episodes.items(), key=lambda x: (x[0][1], x[0][0] == MISMATCHED, x[0][0])):
        if protocol == MISMATCHED and eps.empty:
            continue
        if protocol in SEEDED_PROTOCOLS:
            score = _score_seeded(src, eps, protocol, k, fold, model_name, test_classes, batch_size, rows)
        else:
            keep = overlay_indices(eps, overlay_per_class)
            acc, kept = score_episodes(src, eps.reset_index(drop=True), batch_size, keep,
                                       desc=f"{model_name} k{k} {protocol}")
            score = ProtocolScore(protocol, acc.miou(test_classes), acc.fbiou(), int(len(eps)))
            for c, v in acc.class_iou(test_classes).items():
                rows.append(_per_class_row(fold, model_name, k, protocol, c, v, np.nan, acc.episodes[c]))
            if kept:
                overlays[f"k{k}_{protocol}"] = overlay_items(src.table, eps.reset_index(drop=True), kept)
        if protocol == MISMATCHED:
            metrics.mismatched[k] = score
        else:
            metrics.scores.setdefault(k, {})[protocol] = score
        # false alarms and latency once per K, from the support sets of the first protocol seen
        if k not in metrics.latency_ms and protocol != MISMATCHED:
            sets = {c: part["support_ids"].tolist() for c, part in eps.groupby("class_name")}
            fa = false_alarms(src, sets, normal_ids, batch_size)
            if fa is not None:
                metrics.fp[k] = fa
            first = eps.iloc[0]
            table = src.table
            metrics.latency_ms[k] = latency_ms(src.predictor, [table.image(s) for s in first.support_ids],
                                               [table.mask(s) for s in first.support_ids],
                                               table.image(first.query_id), latency_queries)
    return ModelResult(metrics, pd.DataFrame(rows), overlays)
