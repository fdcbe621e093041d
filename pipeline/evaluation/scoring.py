"""Scoring: episodes -> IoU counts, defect-free images -> false alarms, one query -> latency.

Every prediction goes through the model's :class:`~pipeline.inference.predictor.Predictor`:
:meth:`~pipeline.inference.predictor.Predictor.head` on the features of a
:class:`~pipeline.evaluation.data.FeatureSource` (logits on the feature grid), then
:meth:`~pipeline.inference.predictor.Predictor.upsample` to each query's original ``(H, W)``
(bilinear) and logit > 0 (sigmoid > 0.5). Metrics: :mod:`pipeline.metrics` (per episode ``I``, ``U``
at the original mask resolution; per-class IoU = Σ I / Σ U; mIoU; FB-IoU pooled over the fold).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.evaluation.data import FeatureSource
from pipeline.evaluation.results import FalseAlarms
from pipeline.inference.predictor import Predictor
from pipeline.metrics import IoUAccumulator


def episode_logits(src: FeatureSource, support_ids: Sequence[Sequence[str]], query_ids: Sequence[str]) -> torch.Tensor:
    """Logits on the feature grid for a batch of episodes: ``(B, 1, h, w)`` (``Predictor.head``).

    ``forward_features`` is asked for its output at the feature grid size; every model in ``model/``
    ends with a bilinear upsampling to ``out_size``, so upsampling these logits to the original size
    equals asking the model for the original size directly (checked in tests/test_evaluate.py). Episodes whose
    query's material has reference images (:meth:`FeatureSource.levels`) are gated on the reference score.
    """
    b, k = len(query_ids), len(support_ids[0])
    flat = [i for s in support_ids for i in s]
    sf = src.feats(flat).unflatten(0, (b, k))
    sm = src.masks(flat).unflatten(0, (b, k))
    return src.predictor.head(sf, sm, src.feats(query_ids), levels=src.levels(support_ids, query_ids))


def predicted_masks(logits: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """``(B, 1, h, w)`` logits -> B ``(H, W)`` bool masks on the CPU at the given original sizes (logit > 0)."""
    return [(u > 0).cpu() for u in Predictor.upsample(logits, sizes)]


def episode_masks(src: FeatureSource, support_ids: Sequence[Sequence[str]], query_ids: Sequence[str],
                  sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """B ``(H, W)`` bool predicted masks of a batch of episodes at the queries' original sizes.

    Episodes go through :func:`episode_logits` (cached features) and :func:`predicted_masks`, except those
    a SOFS non-resizing model segments in native-resolution windows (:meth:`FeatureSource.is_native`):
    these run :meth:`Predictor.predict_logits` on the original images, one episode at a time.
    """
    native = [src.is_native(s) for s in support_ids]
    out: list[torch.Tensor | None] = [None] * len(query_ids)
    resized = [j for j, n in enumerate(native) if not n]
    if resized:
        logits = episode_logits(src, [support_ids[j] for j in resized], [query_ids[j] for j in resized])
        for j, m in zip(resized, predicted_masks(logits, [sizes[j] for j in resized])):
            out[j] = m
    for j in [j for j, n in enumerate(native) if n]:
        support = src.native_level(src.native_support(support_ids[j]), query_ids[j])
        lg = src.predictor.predict_logits(support, [src.table.image(query_ids[j])])[0]
        out[j] = torch.from_numpy(lg > 0)
    return out  # type: ignore[return-value]


def score_episodes(src: FeatureSource, episodes: pd.DataFrame, batch_size: int = 64,
                   keep: set[int] | None = None, desc: str | None = None
                   ) -> tuple[IoUAccumulator, dict[int, torch.Tensor]]:
    """Score episodes (rows with ``class_name``, ``support_ids``, ``query_id``) at the original resolution.

    Args:
        src: features/masks of the images (clean ``S x S`` view) and the model's Predictor.
        episodes: the saved episode rows of one (fold, protocol, K[, seed]).
        batch_size: episodes per forward pass.
        keep: positional episode indices whose predicted mask to return (for overlay pictures).
        desc: label of a progress bar (episodes/s; shown on a terminal only), or None for none.

    Returns:
        ``(accumulator, {index: (H, W) bool prediction})``.
    """
    from tqdm.auto import tqdm

    acc = IoUAccumulator()
    kept: dict[int, torch.Tensor] = {}
    sup = episodes["support_ids"].tolist()
    qry = episodes["query_id"].tolist()
    cls = episodes["class_name"].tolist()
    bar = tqdm(total=len(qry), desc=desc, unit="ep", disable=None if desc else True, leave=False)
    with torch.inference_mode(), bar:
        for s in range(0, len(qry), batch_size):
            q = qry[s:s + batch_size]
            bar.update(len(q))
            gts = [src.table.gt(i) for i in q]
            preds = episode_masks(src, sup[s:s + batch_size], q, [tuple(g.shape) for g in gts])
            for j, (p, g) in enumerate(zip(preds, gts)):
                acc.update(p, g, cls[s + j])
                if keep is not None and s + j in keep:
                    kept[s + j] = p
    return acc, kept


def false_alarms(src: FeatureSource, support_sets: dict[str, list[list[str]]], normal_ids: dict[str, list[str]],
                 batch_size: int = 64) -> FalseAlarms | None:
    """Predicted defects on defect-free images.

    Args:
        support_sets: ``{class: [support ids of each saved episode]}`` (K ids each).
        normal_ids: ``{class: defect-free image ids}``; classes without support sets are skipped.

    Returns:
        :class:`~pipeline.evaluation.results.FalseAlarms` (mean predicted defect share in [0, 1],
        share of images with >= 1 predicted defect pixel, image count, the same per class), or
        ``None`` if there is no defect-free image. Image j of a class uses the class's support set
        ``j mod n_sets``.
    """
    per_class, fracs, anys = {}, [], []
    with torch.inference_mode():
        for c, ids in normal_ids.items():
            sets = support_sets.get(c) or []
            if not ids or not sets:
                continue
            cf, ca = [], []
            for s in range(0, len(ids), batch_size):
                q = ids[s:s + batch_size]
                sup = [sets[(s + j) % len(sets)] for j in range(len(q))]
                for p in episode_masks(src, sup, q, [src.table.size(i) for i in q]):
                    cf.append(float(p.float().mean()))
                    ca.append(bool(p.any()))
            per_class[c] = FalseAlarms(float(np.mean(cf)), float(np.mean(ca)), len(cf))
            fracs += cf
            anys += ca
    if not fracs:
        return None
    return FalseAlarms(float(np.mean(fracs)), float(np.mean(anys)), len(fracs), per_class)


def latency_ms(predictor: Predictor, support_images: Sequence[np.ndarray], support_masks: Sequence[np.ndarray],
               query_image: np.ndarray, repeats: int, warmup: int = 2) -> float:
    """Median wall time in milliseconds of :meth:`Predictor.segment` plus thresholding, over ``repeats`` runs.

    Decoding files is excluded (images are passed decoded); resizing, encoding supports and query,
    the head, upsampling and the copy back to the CPU are included. ``warmup`` untimed runs come first.
    """
    times = []
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        _ = predictor.segment(support_images, support_masks, query_image) > 0
        if r >= warmup:
            times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


def overlay_indices(episodes: pd.DataFrame, n: int) -> set[int]:
    """Positional indices of the first ``n`` episodes of each class (the overlay pictures)."""
    if n <= 0:
        return set()
    pos = pd.Series(range(len(episodes)), index=episodes.index)
    return set(pos.groupby(episodes["class_name"].values).head(n).tolist())


def overlay_items(table: Any, episodes: pd.DataFrame, kept: dict[int, torch.Tensor]) -> list[Any]:
    """:class:`pipeline.plots.OverlayEpisode` rows (supports, query, truth, prediction, IoU) of the kept episodes."""
    from pipeline.metrics import intersection_union
    from pipeline.plots import OverlayEpisode

    items = []
    for j in sorted(kept):
        row = episodes.iloc[j]
        gt = table.gt(row.query_id)
        i, u, _, _ = intersection_union(kept[j], gt)
        items.append(OverlayEpisode(
            class_name=row.class_name,
            support_images=[table.image(s) for s in row.support_ids],
            support_masks=[table.mask(s) for s in row.support_ids],
            query_image=table.image(row.query_id), truth=gt.numpy(), pred=kept[j].numpy(),
            iou=(i / u) if u else 1.0, query_id=Path(str(table.row(row.query_id).image_path)).stem,
            support_class=getattr(row, "support_class", None)))
    return items
