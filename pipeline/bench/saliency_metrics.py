"""Saliency metrics of JAFFNet's own setting (:mod:`pipeline.bench.saliency`): MAE, max F-measure, IoU.

Definitions (the usual salient-object-detection protocol; hand-checked in ``tests/test_saliency.py``):

* A **saliency map** ``S`` is an ``(H, W)`` float array in ``[0, 1]`` (``sigmoid`` of the logits,
  at the ground truth's resolution); the **ground truth** ``G`` an ``(H, W)`` bool mask.
* **MAE** of one image: ``mean |S - G|`` over its pixels, in ``[0, 1]``. The MAE of a set of images
  is the unweighted mean of the per-image values (every image counts once, whatever its size).
* **F-measure curve**: ``S`` is quantised to levels ``L = rint(255 S)`` (0..255); at threshold
  ``t = 0..255`` the prediction is ``L >= t``. Per image, precision ``P_t = TP / |pred|`` (0 when
  nothing is predicted) and recall ``R_t = TP / |G|`` (0 when ``G`` is empty). Over a set of images
  ``P_t`` and ``R_t`` are averaged image by image, then
  ``F_t = (1 + b2) P_t R_t / (b2 P_t + R_t)`` (0 where both are 0) with ``b2 = beta^2 = 0.3``.
  **max F** = ``max_t F_t``, reported with the ``t`` that reaches it (the first one on ties).
* **IoU at 0.5**: prediction ``S > 0.5`` (``logit > 0``, the project's threshold), counted with
  :class:`pipeline.metrics.IoUAccumulator`: per class ``sum I / sum U`` over its images, **mIoU** =
  mean of the class IoUs.

These live here, not in :mod:`pipeline.metrics`, because that file is a code dependency of the DVC
``train``/``evaluate`` stages: editing it would invalidate their cached results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.metrics import IoUAccumulator

BETA2 = 0.3
"""``beta^2`` of the F-measure (precision weighted more than recall, as in saliency papers)."""

LEVELS = 256
"""Quantisation levels of a saliency map, and the number of thresholds ``t = 0..255``."""


def _check(saliency: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(saliency, dtype=np.float64)
    g = np.asarray(gt)
    if g.dtype != bool:
        raise TypeError(f"ground truth must be a bool mask, got dtype {g.dtype}")
    if s.shape != g.shape or s.ndim != 2:
        raise ValueError(f"saliency {s.shape} and ground truth {g.shape} must be the same (H, W)")
    if s.size == 0:
        raise ValueError("empty saliency map")
    if not np.isfinite(s).all() or s.min() < 0.0 or s.max() > 1.0:
        raise ValueError(f"saliency must be finite and in [0, 1], got range [{np.nanmin(s):.4g}, {np.nanmax(s):.4g}]")
    return s, g


def mae(saliency: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute error ``mean |S - G|`` of one ``(H, W)`` map in ``[0, 1]`` against a bool mask.

    Returns:
        A float in ``[0, 1]``.

    Raises:
        ValueError: shapes differ, not 2-D, empty, or values outside ``[0, 1]`` / not finite.
        TypeError: ``gt`` is not a bool array.
    """
    s, g = _check(saliency, gt)
    return float(np.abs(s - g).mean())


def precision_recall(saliency: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of ``rint(255 S) >= t`` for every threshold ``t = 0..255``.

    Returns:
        ``(precision, recall)``, each ``(256,)`` float64 in ``[0, 1]``, index ``t``.

    Raises:
        As :func:`mae`.
    """
    s, g = _check(saliency, gt)
    levels = np.rint(s * (LEVELS - 1)).astype(np.int64)
    fg = np.bincount(levels[g], minlength=LEVELS)
    bg = np.bincount(levels[~g], minlength=LEVELS)
    tp = np.cumsum(fg[::-1])[::-1]            # pixels of G with level >= t
    pred = tp + np.cumsum(bg[::-1])[::-1]     # all pixels with level >= t
    precision = np.divide(tp, pred, out=np.zeros(LEVELS), where=pred > 0)
    n_gt = int(g.sum())
    recall = tp / n_gt if n_gt else np.zeros(LEVELS)
    return precision, recall


def f_measure(precision: np.ndarray, recall: np.ndarray, beta2: float = BETA2) -> np.ndarray:
    """``(1 + b2) P R / (b2 P + R)`` element-wise; 0 where ``P = R = 0``.

    Raises:
        ValueError: shapes differ or ``beta2 <= 0``.
    """
    p, r = np.asarray(precision, dtype=np.float64), np.asarray(recall, dtype=np.float64)
    if p.shape != r.shape:
        raise ValueError(f"precision {p.shape} and recall {r.shape} differ in shape")
    if beta2 <= 0:
        raise ValueError(f"beta2 must be > 0, got {beta2}")
    den = beta2 * p + r
    return np.divide((1.0 + beta2) * p * r, den, out=np.zeros_like(p), where=den > 0)


@dataclass
class _Sums:
    images: int = 0
    mae: float = 0.0
    precision: np.ndarray = field(default_factory=lambda: np.zeros(LEVELS))
    recall: np.ndarray = field(default_factory=lambda: np.zeros(LEVELS))

    def add(self, other: "_Sums") -> None:
        self.images += other.images
        self.mae += other.mae
        self.precision = self.precision + other.precision
        self.recall = self.recall + other.recall


@dataclass
class SaliencyAccumulator:
    """Per-class sums of MAE, precision and recall curves, and IoU counts, over test images.

    Example::

        acc = SaliencyAccumulator()
        acc.update(saliency, gt, "Steel_In")    # (H, W) float in [0, 1], (H, W) bool
        acc.summary(["Steel_In"])                # {"images", "mae", "max_f", "max_f_threshold", "miou"}
    """

    sums: dict[str, _Sums] = field(default_factory=dict)
    iou: IoUAccumulator = field(default_factory=IoUAccumulator)

    def update(self, saliency: np.ndarray, gt: np.ndarray, class_name: str) -> None:
        """Add one test image of ``class_name``. Raises as :func:`mae`."""
        p, r = precision_recall(saliency, gt)
        s = self.sums.setdefault(class_name, _Sums())
        s.add(_Sums(1, mae(saliency, gt), p, r))
        self.iou.update(np.asarray(saliency) > 0.5, gt, class_name)

    @property
    def classes(self) -> list[str]:
        """Classes seen so far, in first-seen order."""
        return list(self.sums)

    def summary(self, classes: Sequence[str] | None = None, beta2: float = BETA2) -> dict[str, float | int]:
        """Figures of the images of ``classes`` pooled (default: every class seen).

        Returns:
            ``{"images": n, "mae": mean per-image MAE, "max_f": max F in [0, 1], "max_f_threshold":
            t in 0..255, "miou": mean of the classes' IoU at 0.5}``; with one class ``miou`` is its IoU.

        Raises:
            KeyError: a class with no image (names it). ValueError: no class.
        """
        classes = self.classes if classes is None else list(classes)
        if not classes:
            raise ValueError("no class to summarise: no image was scored")
        missing = [c for c in classes if c not in self.sums]
        if missing:
            raise KeyError(f"no test image was scored for class(es) {missing}; seen: {self.classes}")
        total = _Sums()
        for c in classes:
            total.add(self.sums[c])
        n = total.images
        f = f_measure(total.precision / n, total.recall / n, beta2)
        t = int(np.argmax(f))
        return {"images": n, "mae": total.mae / n, "max_f": float(f[t]), "max_f_threshold": t,
                "miou": self.iou.miou(classes)}
