"""Few-shot segmentation metrics: per-class IoU, mIoU and FB-IoU accumulated over episodes.

Definitions (the usual few-shot segmentation protocol, e.g. PANet / HSNet / LERENet §5.1):

* For one episode with binary prediction ``P`` and ground truth ``G`` (at the query's original
  mask resolution) the foreground counts are ``I = |P ∧ G|`` and ``U = |P ∨ G|``; the background
  counts are ``I_bg = |¬P ∧ ¬G|`` and ``U_bg = |¬P ∨ ¬G|`` (pixels).
* **Per-class IoU** of class ``c`` = ``Σ I / Σ U`` over the episodes whose query belongs to ``c``
  (intersections and unions are summed first, then divided: large defects weigh more than small).
* **mIoU** = unweighted mean of the per-class IoUs over the fold's test classes.
* **FB-IoU** = mean of the foreground IoU ``Σ I / Σ U`` and the background IoU
  ``Σ I_bg / Σ U_bg``, both pooled over *all* episodes of the fold (every class together).

Edge cases (decided here, tested in ``tests/test_metrics.py``):

* Empty prediction, non-empty ground truth: ``I = 0``, ``U = |G|``: the episode pulls the class's
  IoU down (a missed defect).
* Non-empty prediction, empty ground truth: ``I = 0``, ``U = |P|``: a false alarm, also penalised.
* Both empty: ``I = U = 0``: the episode adds nothing to the sums (it neither helps nor hurts).
* A class whose ``Σ U = 0`` (every one of its episodes had both prediction and ground truth empty)
  gets IoU **1.0**: the model agreed with the ground truth on every pixel, and a defined value keeps
  mIoU a mean over the same set of test classes for every model. The same rule applies to the
  pooled foreground / background IoU of FB-IoU. A class with *no episodes at all* is an error
  (:class:`KeyError` from :meth:`IoUAccumulator.class_iou`), never a silent 1.0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

EMPTY_UNION_IOU = 1.0
"""IoU reported when the summed union is 0 (prediction and ground truth both empty everywhere)."""


def _as_bool(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if a.dtype == bool:
        return a
    if a.dtype.kind == "f":
        raise TypeError(f"{name} must be a boolean or integer {{0,1}} mask, got dtype {a.dtype}; "
                        "threshold logits first (logit > 0, i.e. sigmoid > 0.5)")
    if a.size and (a.min() < 0 or a.max() > 1):
        raise ValueError(f"{name} must contain only 0 and 1, found values in [{int(a.min())}, {int(a.max())}]")
    return a.astype(bool)


def intersection_union(pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> tuple[int, int, int, int]:
    """Foreground and background intersection/union pixel counts of one binary mask pair.

    Args:
        pred: predicted mask, shape (H, W) (or any shape equal to ``target``'s), bool or {0,1} ints
            (NumPy array or torch tensor).
        target: ground-truth mask, same shape.

    Returns:
        ``(I_fg, U_fg, I_bg, U_bg)`` in pixels (Python ints, >= 0).

    Raises:
        ValueError: shapes differ or values outside {0, 1}.
        TypeError: a float mask is passed (threshold it first).
    """
    p, g = _as_bool(pred, "pred"), _as_bool(target, "target")
    if p.shape != g.shape:
        raise ValueError(f"pred shape {tuple(p.shape)} != target shape {tuple(g.shape)}; "
                         "upsample predictions to the original mask size before scoring")
    n = p.size
    i_fg = int(np.count_nonzero(p & g))
    u_fg = int(np.count_nonzero(p | g))
    # background: not P and not G = n - |P or G| ; not P or not G = n - |P and G|
    return i_fg, u_fg, n - u_fg, n - i_fg


def _ratio(i: int, u: int) -> float:
    return EMPTY_UNION_IOU if u == 0 else i / u


@dataclass
class IoUAccumulator:
    """Accumulates intersections and unions over episodes; reports per-class IoU, mIoU, FB-IoU.

    Use one accumulator per (model, K, protocol, seed) evaluation. Counts are exact integers, so the
    result does not depend on the order or batching of episodes.

    Example::

        acc = IoUAccumulator()
        acc.update(pred_mask, gt_mask, "MT_Crack")   # (H, W) bool each
        acc.miou(["MT_Crack"]), acc.fbiou()
    """

    inter: dict[str, int] = field(default_factory=dict)
    union: dict[str, int] = field(default_factory=dict)
    episodes: dict[str, int] = field(default_factory=dict)
    bg_inter: int = 0
    bg_union: int = 0

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray, class_name: str) -> None:
        """Add one episode: ``pred`` and ``target`` (H, W) binary masks of a query of ``class_name``.

        Raises the errors of :func:`intersection_union`.
        """
        i, u, ib, ub = intersection_union(pred, target)
        self.inter[class_name] = self.inter.get(class_name, 0) + i
        self.union[class_name] = self.union.get(class_name, 0) + u
        self.episodes[class_name] = self.episodes.get(class_name, 0) + 1
        self.bg_inter += ib
        self.bg_union += ub

    def update_many(self, preds: Iterable[torch.Tensor | np.ndarray], targets: Iterable[torch.Tensor | np.ndarray],
                    class_names: Sequence[str]) -> None:
        """Add several episodes (masks may have different sizes); same rules as :meth:`update`."""
        preds, targets = list(preds), list(targets)
        if not (len(preds) == len(targets) == len(class_names)):
            raise ValueError(f"got {len(preds)} predictions, {len(targets)} targets and {len(class_names)} class names")
        for p, t, c in zip(preds, targets, class_names):
            self.update(p, t, c)

    def merge(self, other: "IoUAccumulator") -> None:
        """Add the counts of ``other`` into this accumulator (e.g. from a parallel worker)."""
        for c in other.inter:
            self.inter[c] = self.inter.get(c, 0) + other.inter[c]
            self.union[c] = self.union.get(c, 0) + other.union[c]
            self.episodes[c] = self.episodes.get(c, 0) + other.episodes[c]
        self.bg_inter += other.bg_inter
        self.bg_union += other.bg_union

    @property
    def classes(self) -> list[str]:
        """Classes seen so far, in first-seen order."""
        return list(self.inter)

    def class_iou(self, classes: Sequence[str] | None = None) -> dict[str, float]:
        """Per-class IoU ``Σ I / Σ U`` in [0, 1] (1.0 when ``Σ U = 0``, see module docstring).

        Args:
            classes: classes to report (default: all seen). A class with no episode raises
                :class:`KeyError` naming it: an evaluation that silently skipped a test class must fail.
        """
        classes = self.classes if classes is None else list(classes)
        missing = [c for c in classes if c not in self.inter]
        if missing:
            raise KeyError(f"no episodes were scored for class(es) {missing}; seen: {self.classes}")
        return {c: _ratio(self.inter[c], self.union[c]) for c in classes}

    def miou(self, classes: Sequence[str] | None = None) -> float:
        """Mean of :meth:`class_iou` over ``classes`` (default: all seen), in [0, 1].

        Raises:
            ValueError: no class to average.
        """
        ious = self.class_iou(classes)
        if not ious:
            raise ValueError("mIoU of zero classes is undefined: no episode was scored")
        return float(np.mean(list(ious.values())))

    def foreground_iou(self) -> float:
        """Foreground IoU pooled over all episodes of all classes, in [0, 1]."""
        return _ratio(sum(self.inter.values()), sum(self.union.values()))

    def background_iou(self) -> float:
        """Background IoU pooled over all episodes of all classes, in [0, 1]."""
        return _ratio(self.bg_inter, self.bg_union)

    def fbiou(self) -> float:
        """FB-IoU = (foreground IoU + background IoU) / 2, both pooled over the fold, in [0, 1].

        Raises:
            ValueError: no episode was scored.
        """
        if not self.episodes:
            raise ValueError("FB-IoU is undefined: no episode was scored")
        return (self.foreground_iou() + self.background_iou()) / 2.0


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) of per-seed scores.

    The seeds are a sample of possible episode draws, so the sample std (ddof=1) estimates how much
    a score moves with the draw; with one value the std is 0.0. Raises ValueError on an empty
    sequence.
    """
    if len(values) == 0:
        raise ValueError("mean/std of no values")
    a = np.asarray(values, dtype=float)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else 0.0)
