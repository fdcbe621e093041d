"""SOFS non-resizing: crops and sliding windows at the images' native resolution for small defects.

Zhang et al., arXiv 2407.21351, Sec. 3.4, and the authors' code (``datasets/base_dataset_fsss_ND.py``);
facts only, our own code. A defect that covers at most ``area`` of its image (SOFS
``area_resize_ratio = 0.01``) is *small*: resizing the whole image to the network's ``S x S`` would
shrink it below a feature cell, so

* **support**: a small defect's image is cropped to an ``S x S`` window (clipped to the image)
  around the defect, at native resolution (:func:`crop_box`); a large one is resized whole;
* **query**, when any support defect is small: the image is cut into ``S x S`` windows at native
  resolution (:func:`windows`, SOFS's tiling: a grid whose last row and column are aligned with the
  image's edges), each window is segmented with the support, and the window logits are put back at
  their place, overlaps averaged (:func:`stitch`); otherwise the query is resized whole as usual;
* **training**: an image whose defect is small (or absent: defect-free and negative queries) is
  replaced by a random crop of ``S x S x U(0.7, 1.2)`` native pixels (clipped to the image) that
  holds a random defect pixel (any pixel when there is none), then augmented and resized to
  ``S x S`` as every training view (:func:`crop_box` with ``rng``).

The functions work on ``numpy`` pixel arrays and boxes; :class:`~pipeline.inference.predictor.Predictor`
and :class:`~pipeline.training.batches.ImageEpisodes` call them, so evaluation, ``lerenet predict``,
the served model and training cut the same windows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: SOFS ``DATASET.crop_ratio``: a training crop's side is ``S`` times a factor drawn from this range.
CROP_RATIO = (0.7, 1.2)

Box = tuple[int, int, int, int]
"""``(top, left, height, width)`` in pixels of the original image."""


def defect_share(mask: np.ndarray) -> float:
    """Share of defect pixels of an ``(H, W)`` bool mask, in ``[0, 1]`` (0 for an empty mask)."""
    m = np.asarray(mask, bool)
    return float(m.mean()) if m.size else 0.0


def is_small(mask: np.ndarray, area: float | None) -> bool:
    """Whether a support mask's defect is small: ``0 < defect_share(mask) <= area``.

    ``area`` ``None`` (non-resizing off) or an empty mask (no defect to crop around: anomaly-detection
    mode) give ``False``.
    """
    if area is None:
        return False
    share = defect_share(mask)
    return 0.0 < share <= float(area)


def crop_box(mask: np.ndarray, size: int, rng: np.random.Generator | None = None) -> Box:
    """An ``S x S`` window (clipped to the image) around the defect of ``mask``.

    Args:
        mask: ``(H, W)`` bool, True = defect.
        size: ``S`` in native pixels (``>= 1``); with ``rng`` the side is ``round(S * U(0.7, 1.2))``.
        rng: ``None``: the deterministic support crop, centred on the defect pixels' centroid (the
            image centre for an empty mask), shifted to lie inside the image. A generator: the SOFS
            training crop, holding a random defect pixel (any pixel for an empty mask) at a random
            place of the window.

    Returns:
        ``(top, left, height, width)`` with ``height = min(side, H)``, ``width = min(side, W)``.

    Raises:
        ValueError: ``mask`` not 2-D or empty, or ``size < 1``.
    """
    m = np.asarray(mask, bool)
    if m.ndim != 2 or m.size == 0:
        raise ValueError(f"crop_box expects an (H, W) mask, got shape {m.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    big_h, big_w = m.shape
    side = int(round(size * rng.uniform(*CROP_RATIO))) if rng is not None else int(size)
    th, tw = min(max(side, 1), big_h), min(max(side, 1), big_w)
    ys, xs = np.nonzero(m)
    if rng is None:
        cy, cx = (ys.mean(), xs.mean()) if ys.size else ((big_h - 1) / 2, (big_w - 1) / 2)
        top, left = int(round(cy - (th - 1) / 2)), int(round(cx - (tw - 1) / 2))
    else:
        if ys.size:
            j = int(rng.integers(ys.size))
            py, px = int(ys[j]), int(xs[j])
        else:
            py, px = int(rng.integers(big_h)), int(rng.integers(big_w))
        top, left = py - int(rng.integers(th)), px - int(rng.integers(tw))
    top = min(max(top, 0), big_h - th)
    left = min(max(left, 0), big_w - tw)
    return top, left, th, tw


def _starts(n: int, t: int) -> list[int]:
    """Window starts along one axis: ``0, t, 2t, ...`` and a last window ending at ``n`` (SOFS tiling)."""
    starts = list(range(0, max(n - t, 0) + 1, t))
    if starts[-1] + t < n:
        starts.append(n - t)
    return starts


def windows(height: int, width: int, size: int) -> list[Box]:
    """SOFS's sliding windows over an ``height x width`` image: ``S x S`` (clipped to the image) tiles.

    A grid of ``ceil(H / S) x ceil(W / S)`` windows, adjacent, except that the last row and the last
    column are aligned with the image's bottom and right edges (they overlap their neighbours when
    ``S`` does not divide the side). Every pixel is covered; an image no larger than ``S`` is one window.

    Returns:
        Boxes ``(top, left, height, width)`` row by row.

    Raises:
        ValueError: a non-positive size.
    """
    if height < 1 or width < 1 or size < 1:
        raise ValueError(f"windows need positive sizes, got image {height}x{width}, window {size}")
    th, tw = min(size, height), min(size, width)
    return [(t, l, th, tw) for t in _starts(height, th) for l in _starts(width, tw)]


def cut(image: np.ndarray, box: Box) -> np.ndarray:
    """The pixels of ``box`` of an ``(H, W[, C])`` array (a view)."""
    t, l, h, w = box
    return image[t:t + h, l:l + w]


def stitch(tiles: Sequence[np.ndarray], boxes: Sequence[Box], size: tuple[int, int]) -> np.ndarray:
    """Window logits back in the image: the mean over the windows covering each pixel.

    Args:
        tiles: one ``(h_i, w_i)`` float array per window, the box's size. boxes: their boxes.
        size: ``(H, W)`` of the image.

    Returns:
        ``(H, W)`` float32.

    Raises:
        ValueError: counts or tile sizes that do not match the boxes, or a pixel no window covers.
    """
    if len(tiles) != len(boxes):
        raise ValueError(f"{len(tiles)} tiles for {len(boxes)} boxes")
    total = np.zeros(size, np.float64)
    count = np.zeros(size, np.int32)
    for tile, (t, l, h, w) in zip(tiles, boxes):
        if tuple(tile.shape) != (h, w):
            raise ValueError(f"tile of shape {tuple(tile.shape)} for a {h}x{w} window")
        total[t:t + h, l:l + w] += tile
        count[t:t + h, l:l + w] += 1
    if (count == 0).any():
        raise ValueError("the windows do not cover the image")
    return (total / count).astype(np.float32)
