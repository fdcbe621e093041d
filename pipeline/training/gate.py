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

False-alarm target (``train.presence_fp``, optional): the threshold is raised, if needed, until at most that
share of the training side's **defect-free** images would get a predicted defect pixel (:func:`fp_threshold`
on :func:`normal_episodes`: every ``Nd`` image of the fold's training classes, selection classes included, as
the query of a K=1 episode whose support is a seeded defect image of the same class). It states the price
in the unit a line operator reads, "at most this share of good parts flagged", measured on training-side
images only; the budget rule alone does not see defect-free images, and its threshold, calibrated on one
material, does not carry over to another (docs/experiments.md, fourth session).

Small supports (``train.presence_small_area``, SOFS's 0.01): the rule above runs twice, once on the episodes whose
support defects are small (mean defect share of the support masks in ``(0, small_area]``) and once on the others,
each on its own selection and defect-free episodes; a side with no episode at all keeps the threshold of the rule
on every episode. Each side then keeps its own promise (budget and false-alarm target). Why: a defect-free image's
max logit is set by the support (about -5 with a small support, +10 with a large low-contrast one), so one
threshold raised for the large supports gated off most small defects (docs/experiments.md, eighth session).

Reference images (``train.presence_references`` = R > 0): the fold's R defect-free reference images of each
material (:func:`pipeline.episodes.reference_images`, training-side ``Nd`` only) give the episodes of that
material a second score, the query's max log-odds minus the references' highest under the same support
(:class:`pipeline.inference.gate.PresenceGate`). Its threshold ``presence_threshold_ref`` follows the same rule on
the same episodes, restricted to those with references and with the reference images themselves left out of the
defect-free queries: the budget on the selection queries, raised to the false-alarm target on the defect-free
ones, where a defect-free query counts as flagged when its max logit is > 0 and its reference score >= tau.

Which defect-free images raise the max-logit threshold (``train.presence_fp_scope``): ``all`` (e30) raises it on
every training-side defect-free query; ``gated`` (the default since e32) only on those it gates at inference, i.e.
those without references. With references for every material that has ``Nd`` images, the max-logit threshold
then gates only materials no defect-free image exists for (steel and leather in ``defects12``): it keeps the
budget rule's value, and their false-alarm share is not calibrated (it cannot be measured); a target measured
on magnetic tiles had raised it to the saturation of the steel and leather scores (docs/experiments.md, e32).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline import device as dev
from pipeline.config import Params
from pipeline.episodes import Episode, Pools, material, normal_pools, reference_images, validation_episodes
from pipeline.images import load_validated, read_image, resolve
from pipeline.features import FeatureStore
from pipeline.inference.gate import (ABSENT_LOGIT, PresenceGate, apply_gate, presence_peak, reference_levels,
                                    support_shares)
from pipeline.training.batches import ImageEpisodes, gather

@dataclass(frozen=True)
class QueryScore:
    """One selection query: class, presence score (max grid logit) and its IoU counts at ``S x S``
    (``inter``, ``union`` of prediction and truth, ``truth`` = defect pixels); ``share``: the mean defect share
    of its support masks at ``S x S``, in ``[0, 1]`` (the gate's support size); ``log_odds``: the network's
    ``presence_log_odds`` of ``score`` (of :func:`pipeline.inference.gate.presence_peak` with
    ``train.presence_reference_area`` > 0); ``level``: the episode's reference level
    (:func:`pipeline.inference.gate.reference_levels`), ``NaN`` without reference images."""

    class_name: str
    score: float
    inter: int
    union: int
    truth: int
    share: float = 1.0
    log_odds: float = math.nan
    level: float = math.nan

    def by_reference(self) -> QueryScore:
        """The same query scored by its reference score ``log_odds - level`` (for the rule's functions)."""
        return replace(self, score=self.log_odds - self.level)


@torch.inference_mode()
def query_scores(net: torch.nn.Module, episodes: Sequence[Episode], *, store: FeatureStore | None = None,
                 dataset: ImageEpisodes | None = None, device: torch.device = torch.device("cpu"),
                 batch_size: int = 16, references: dict[str, torch.Tensor] | None = None,
                 reference_area: float = 0.0) -> list[QueryScore]:
    """:class:`QueryScore` of every episode: logits on the feature grid (as ``Predictor.head``), bilinear
    upsampling to ``S x S``, logit > 0 against the view-0 mask. Cached features when ``store`` is given,
    else ``dataset`` (its images are encoded with ``net.encode``). ``references``: ``{material: (R, Cb, h, w)
    features}``; the episodes of a material there get their reference ``level``; ``reference_area``: c of
    :func:`pipeline.inference.gate.presence_peak` for ``log_odds`` and ``level`` (0: the max logit)."""
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
        shares = support_shares(sm).cpu()
        odds = net.presence_log_odds(presence_peak(grid, shares, reference_area).cpu())
        levels = torch.full((n,), math.nan, dtype=torch.float64)
        for mat, feats in (references or {}).items():
            idx = [j for j, e in enumerate(chunk) if material(e.class_name) == mat]
            if idx:
                with dev.autocast(device):
                    levels[idx] = reference_levels(net, dev.to_device(sf[idx], device), dev.to_device(sm[idx], device),
                                                   dev.to_device(feats, device), reference_area)
        for j, e in enumerate(chunk):
            out.append(QueryScore(e.class_name, float(top[j]), int((pred[j] & gt[j]).sum()),
                                  int((pred[j] | gt[j]).sum()), int(gt[j].sum()), float(shares[j]),
                                  float(odds[j]), float(levels[j])))
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


def normal_episodes(params: Params, pools: tuple[Pools, Pools]) -> list[Episode]:
    """K=1 episodes of the training side's defect-free images: each ``Nd`` image of a training class (selection
    classes included) is the query once, with a defect image of its class as support (drawn with seed
    ``train.seed``); ``[]`` when the training classes have no defect-free image."""
    classes = {**pools[0], **pools[1]}
    rng = np.random.default_rng(params.train.seed)
    return [Episode(c, (str(classes[c][rng.integers(len(classes[c]))]),), q, negative=True)
            for c, ids in sorted(normal_pools(params, classes).items()) if classes.get(c) for q in ids]


def fp_threshold(scores: Sequence[float], target: float,
                 flagged: Sequence[bool] | None = None) -> tuple[float, float]:
    """``(tau, share)``: the smallest ``tau`` at which at most ``target`` of the defect-free queries would keep a
    predicted defect (``score >= tau`` and flagged ungated), and the share kept at it. ``-inf`` when the target is
    met ungated.

    Args:
        scores: presence scores of defect-free queries, non-empty.
        target: allowed share in ``[0, 1]``.
        flagged: whether each query has a predicted defect pixel ungated; ``None``: ``score > 0`` (the max-logit
            score: a query with max logit > 0 has defect pixels).
    """
    flags = [x > 0 for x in scores] if flagged is None else list(flagged)
    pos = sorted((x for x, f in zip(scores, flags) if f), reverse=True)
    allowed = math.floor(target * len(scores) + 1e-9)
    if len(pos) <= allowed:
        return -math.inf, len(pos) / len(scores)
    tau = math.nextafter(pos[allowed], math.inf)            # the (allowed + 1)-th highest is gated off, and all below
    return tau, sum(x >= tau for x in pos) / len(scores)


def rule_threshold(selection: Sequence[QueryScore], normals: Sequence[QueryScore], budget: float | None,
                   target: float | None, flagged: Sequence[bool] | None = None) -> float | None:
    """The gate's rule on one set of episodes: :func:`calibrate` (``budget``) on the selection queries, raised to
    :func:`fp_threshold` (``target``, ``flagged``) on the defect-free queries; ``None`` when neither applies (no
    setting, no episode, or the target met ungated and no budget)."""
    taus = [calibrate(selection, budget)] if selection else []
    if normals and target is not None:
        tau_fp, _ = fp_threshold([s.score for s in normals], target, flagged)
        taus.append(tau_fp if math.isfinite(tau_fp) else None)
    return max((x for x in taus if x is not None), default=None)


def presence_gate(params: Params, net: torch.nn.Module, pools: tuple[Pools, Pools], rows: dict[str, Any],
                  store: FeatureStore | None, device: torch.device) -> dict[str, Any]:
    """The gate of a model file: ``{"presence_threshold": tau, "presence_threshold_small": tau_small,
    "presence_small_area": area, "presence_budget": budget, "presence_fp": target, "presence_fp_train": share,
    "presence_threshold_ref": tau_ref, "presence_references": R, "presence_reference_area": c,
    "presence_fp_scope": scope, "presence_fp_train_ref": share_ref}``.

    ``tau`` = :func:`rule_threshold` on ``train.val_episodes`` K=1 episodes of the selection classes
    (:func:`pipeline.episodes.validation_episodes`, seed ``train.seed``) and on :func:`normal_episodes` when
    ``train.presence_fp`` is set. With ``train.presence_small_area`` the rule runs separately on the episodes whose
    support is small (``tau_small``) and on the others (``tau``), a side without any episode keeping the rule's
    threshold on all of them (:class:`pipeline.inference.gate.PresenceGate`). ``share`` = the training side's
    defect-free images still flagged by the gate (None without a target or without such images; with
    ``train.presence_fp_scope: gated`` and references, only the images without references count, for ``tau`` and
    ``share``). Both
    thresholds are None when the budget and the target are null. With ``train.presence_references`` = R > 0,
    ``tau_ref`` is the rule on the episodes that have reference images (module docstring; None when no material
    of the training side has R defect-free images) and ``share_ref`` the share of their defect-free queries
    still flagged when each episode is gated as at inference.

    Args:
        pools: ``(train_pools, val_pools)`` of the fold (:func:`pipeline.episodes.training_pools`).
        rows: validated defect rows by id (for the image path when ``store`` is None).
    """
    t = params.train
    out: dict[str, Any] = {"presence_threshold": None, "presence_threshold_small": None,
                                    "presence_small_area": None, "presence_budget": t.presence_budget,
                                    "presence_fp": t.presence_fp, "presence_fp_train": None,
                                    "presence_threshold_ref": None, "presence_references": 0,
                                    "presence_reference_area": t.presence_reference_area,
                                    "presence_fp_scope": t.presence_fp_scope,
                                    "presence_fp_train_ref": None}
    if t.presence_budget is None and t.presence_fp is None:
        return out
    train_pools, val_pools = pools
    refs = reference_images(params, {**train_pools, **val_pools}, t.presence_references) \
        if t.presence_references else {}
    ref_feats = {m: _reference_feats(params, net, store, ids, device) for m, ids in refs.items()}
    selection: list[QueryScore] = []
    if t.presence_budget is not None:
        eps = validation_episodes(val_pools, train_pools, 1, t.val_episodes, t.seed)
        data = None if store is not None else ImageEpisodes(params, val_pools, rows, augment=False, episodes=eps)
        selection = query_scores(net, eps, store=store, dataset=data, device=device, references=ref_feats,
                                 reference_area=t.presence_reference_area)
    normals: list[QueryScore] = []
    episodes = normal_episodes(params, pools) if t.presence_fp is not None else []
    if episodes:
        if store is None:
            rows = {**rows, **{r["id"]: r for r in load_validated(params.data.dir, kind="normal").to_dict("records")}}
        data = None if store is not None else ImageEpisodes(params, {}, rows, augment=False, episodes=episodes)
        normals = query_scores(net, episodes, store=store, dataset=data, device=device, references=ref_feats,
                               reference_area=t.presence_reference_area)
    by_max = normals if t.presence_fp_scope == "all" or not refs else [s for s in normals if math.isnan(s.level)]
    gate = split_gate(selection, by_max, t.presence_budget, t.presence_fp, t.presence_small_area)
    out["presence_threshold"] = gate.threshold
    if gate.split:
        out["presence_threshold_small"], out["presence_small_area"] = gate.small_threshold, gate.small_area
    if by_max:
        taus = [gate.threshold_for(s.share) for s in by_max]
        kept = [s.score > 0 and (tau is None or s.score >= tau) for s, tau in zip(by_max, taus)]
        out["presence_fp_train"] = round(sum(kept) / len(kept), 4)
    if refs:
        out.update(_reference_gate(selection, normals, episodes, {i for ids in refs.values() for i in ids},
                                   t.presence_budget, t.presence_fp))
        out["presence_references"] = t.presence_references if out["presence_threshold_ref"] is not None else 0
    return out


def _reference_gate(selection: Sequence[QueryScore], normals: Sequence[QueryScore], episodes: Sequence[Episode],
                    reference_ids: set[str], budget: float | None,
                    target: float | None) -> dict[str, float | None]:
    """``presence_threshold_ref`` and ``presence_fp_train_ref``: the rule on the reference scores of the episodes
    with references (the reference images themselves are not defect-free queries), a defect-free query counting
    as flagged when its max logit is > 0; the share is that of those defect-free queries still flagged at ``tau``."""
    sel = [s.by_reference() for s in selection if not math.isnan(s.level)]
    nor = [s for s, e in zip(normals, episodes) if not math.isnan(s.level) and e.query_id not in reference_ids]
    flagged = [s.score > 0 for s in nor]
    ref_scores = [s.by_reference() for s in nor]
    tau = rule_threshold(sel, ref_scores, budget, target, flagged)
    share = None
    if nor and tau is not None:
        kept = [f and r.score >= tau for f, r in zip(flagged, ref_scores)]
        share = round(sum(kept) / len(kept), 4)
    return {"presence_threshold_ref": tau, "presence_fp_train_ref": share}


def _reference_feats(params: Params, net: torch.nn.Module, store: FeatureStore | None, ids: Sequence[str],
                     device: torch.device) -> torch.Tensor:
    """``(R, Cb, h, w)`` backbone features of the reference images: from the store, else ``net.encode``."""
    if store is not None:
        return store.get(list(ids), 0)
    from pipeline.inference.preprocess import image_batch

    rows = load_validated(params.data.dir, kind="normal").set_index("id")
    images = [read_image(resolve(params.data.dir, rows.loc[i, "image_path"])) for i in ids]
    with torch.inference_mode():
        return net.encode(dev.to_device(image_batch(images, params.train.image_size), device))


def split_gate(selection: Sequence[QueryScore], normals: Sequence[QueryScore], budget: float | None,
               target: float | None, small_area: float | None) -> PresenceGate:
    """The gate from scored episodes: :func:`rule_threshold` on all of them (``small_area`` None), or run apart on
    the episodes whose support is small (``0 < share <= small_area``) and on the others; a side without any
    episode keeps the threshold of the rule on all of them.

    Args:
        selection: defect queries of the selection classes (budget rule). normals: defect-free queries (target).
        budget: mIoU points, or None. target: share in ``[0, 1]``, or None. small_area: ``(0, 1]`` or None.
    """
    tau = rule_threshold(selection, normals, budget, target)
    if small_area is None:
        return PresenceGate(tau)
    probe = PresenceGate(tau, tau, small_area)
    sides = {}
    for small in (True, False):
        sel = [s for s in selection if probe.is_small(s.share) == small]
        nor = [s for s in normals if probe.is_small(s.share) == small]
        sides[small] = rule_threshold(sel, nor, budget, target) if sel or nor else tau
    return PresenceGate(sides[False], sides[True], small_area)


__all__ = ["ABSENT_LOGIT", "QueryScore", "apply_gate", "calibrate", "fp_threshold", "gated_miou", "normal_episodes",
           "presence_gate", "query_scores", "rule_threshold", "split_gate"]
