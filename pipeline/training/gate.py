"""Calibration of the image-level presence gate (:mod:`pipeline.inference.gate`) on selection classes.

A pixel classifier that marks *some* pixels on almost every defect-free image is useless on a
production line, however good its mIoU (issue 11: 84-98 % of the ``Nd`` images got a predicted
defect pixel at K=1). The gate adds the image-level decision that inspection systems make first:
the query's presence score is its **maximum logit on the feature grid** (the classic max-score
image-level anomaly score), and a query whose score is below the threshold ``tau`` gets an empty
mask (:func:`pipeline.inference.gate.apply_gate`, applied by
:meth:`pipeline.inference.predictor.Predictor.head`). One threshold per model file (``meta["presence_threshold"]``, logit units).

Calibration (:func:`calibrate`), at the end of training, on training-side data only: the fixed
K=1 selection episodes of the fold's held-out *training* classes (``train.selection_classes``;
never a test class). Rule: the **largest** ``tau`` whose gated selection mIoU is at most
``train.presence_budget`` points below the ungated one. It needs no defect-free images (several
folds have none among their selection classes) and states its price in the unit users read:
"the gate may cost at most ``budget`` mIoU points on classes the model was not trained on". Every
query's own score is a candidate, so the rule is exact on the selection episodes. ``budget: null``
(the default) keeps the model ungated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline import device as dev
from pipeline.config import Params
from pipeline.episodes import Episode, Pools, validation_episodes
from pipeline.features import FeatureStore
from pipeline.inference.gate import ABSENT_LOGIT, apply_gate
from pipeline.training.batches import ImageEpisodes, gather

@dataclass(frozen=True)
class QueryScore:
    """One selection query: class, presence score (max grid logit) and its IoU counts at ``S x S``
    (``inter``, ``union`` of prediction and truth, ``truth`` = defect pixels)."""

    class_name: str
    score: float
    inter: int
    union: int
    truth: int


@torch.inference_mode()
def query_scores(net: torch.nn.Module, episodes: Sequence[Episode], *, store: FeatureStore | None = None,
                 dataset: ImageEpisodes | None = None, device: torch.device = torch.device("cpu"),
                 batch_size: int = 16) -> list[QueryScore]:
    """:class:`QueryScore` of every episode: logits on the feature grid (as ``Predictor.head``), bilinear
    upsampling to ``S x S``, logit > 0 against the view-0 mask. Cached features when ``store`` is given,
    else ``dataset`` (its images are encoded with ``net.encode``)."""
    net.eval()
    out: list[QueryScore] = []
    k = len(episodes[0].support_ids)
    for first in range(0, len(episodes), batch_size):
        chunk = episodes[first:first + batch_size]
        n = len(chunk)
        if store is not None:
            b = gather(store, [i for e in chunk for i in e.support_ids], [e.query_id for e in chunk], 0, 0, n, k)
            sf, sm, qf = b["support_feats"], b["support_masks"], b["query_feats"]
        else:
            items = [dataset[first + j] for j in range(n)]  # type: ignore[index]
            b = {key: torch.stack([it[key] for it in items]) for key in items[0]}
            sm = b["support_masks"]
            sf = net.encode(dev.to_device(b["support_images"].flatten(0, 1), device)).unflatten(0, (n, k))
            qf = net.encode(dev.to_device(b["query_images"], device))
        with dev.autocast(device):
            grid = net.forward_features(dev.to_device(sf, device), dev.to_device(sm, device),
                                        dev.to_device(qf, device), tuple(qf.shape[-2:])).float()
        full = F.interpolate(grid, size=b["query_masks"].shape[-2:], mode="bilinear", align_corners=False)
        pred = (full > 0).squeeze(1).cpu()
        gt = b["query_masks"].squeeze(1).bool()
        top = grid.amax(dim=(1, 2, 3)).cpu()
        for j, e in enumerate(chunk):
            out.append(QueryScore(e.class_name, float(top[j]), int((pred[j] & gt[j]).sum()),
                                  int((pred[j] | gt[j]).sum()), int(gt[j].sum())))
    return out


def gated_miou(scores: Sequence[QueryScore], threshold: float | None) -> float:
    """Mean over classes of Σ I / Σ U when queries with ``score < threshold`` predict nothing
    (their ``I = 0``, ``U = truth``), in [0, 1]; ``None`` threshold: ungated. Classes whose union
    is 0 are left out (as ``pipeline.metrics.IoUAccumulator``)."""
    inter: dict[str, int] = {}
    union: dict[str, int] = {}
    for s in scores:
        on = threshold is None or s.score >= threshold
        inter[s.class_name] = inter.get(s.class_name, 0) + (s.inter if on else 0)
        union[s.class_name] = union.get(s.class_name, 0) + (s.union if on else s.truth)
    ious = [inter[c] / union[c] for c in inter if union[c] > 0]
    return sum(ious) / len(ious) if ious else 0.0


def calibrate(scores: Sequence[QueryScore], budget: float | None) -> float | None:
    """The presence threshold: the largest ``tau`` with ``gated_miou(tau) >= gated_miou(None) - budget / 100``.

    Args:
        scores: selection queries (:func:`query_scores`), defect images only.
        budget: allowed mIoU loss in points (``>= 0``), or ``None`` for no gate.

    Returns:
        ``tau`` in logit units (one of the queries' scores; at worst the lowest, which gates
        nothing on the selection queries), or ``None`` (no budget or no scores).

    Raises:
        ValueError: ``budget < 0``.
    """
    if budget is None or not scores:
        return None
    if budget < 0:
        raise ValueError(f"presence budget must be >= 0 mIoU points, got {budget}")
    floor = gated_miou(scores, None) - budget / 100.0
    best = None
    for tau in sorted({s.score for s in scores}):
        if gated_miou(scores, tau) >= floor - 1e-12:
            best = tau
    return best


def presence_gate(params: Params, net: torch.nn.Module, pools: tuple[Pools, Pools], rows: dict[str, Any],
                  store: FeatureStore | None, device: torch.device) -> dict[str, float | None]:
    """``{"presence_threshold": tau, "presence_budget": budget}`` for a model file: :func:`calibrate`
    on ``train.val_episodes`` K=1 episodes of the selection classes (:func:`pipeline.episodes.validation_episodes`,
    seed ``train.seed``); ``tau`` is None when ``train.presence_budget`` is null.

    Args:
        pools: ``(train_pools, val_pools)`` of the fold (:func:`pipeline.episodes.training_pools`).
        rows: validated defect rows by id (for the image path when ``store`` is None).
    """
    budget = params.train.presence_budget
    if budget is None:
        return {"presence_threshold": None, "presence_budget": None}
    train_pools, val_pools = pools
    t = params.train
    eps = validation_episodes(val_pools, train_pools, 1, t.val_episodes, t.seed)
    data = None if store is not None else ImageEpisodes(params, val_pools, rows, augment=False, episodes=eps)
    tau = calibrate(query_scores(net, eps, store=store, dataset=data, device=device), budget)
    return {"presence_threshold": tau, "presence_budget": budget}


__all__ = ["ABSENT_LOGIT", "QueryScore", "apply_gate", "calibrate", "gated_miou", "presence_gate", "query_scores"]
