"""Evaluation pictures: support / query / ground truth / prediction overlays and the per-class IoU bar chart.

Drawn with matplotlib's object API (``matplotlib.figure.Figure`` renders with the Agg canvas; no
pyplot, no display, no global backend state). Files are written atomically
(:func:`pipeline.atomic.atomic_write`), so a failed plot never leaves half a PNG.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline.atomic import atomic_write

FG_COLOURS = {"support": (1.0, 0.85, 0.0), "truth": (0.0, 0.9, 0.2), "pred": (1.0, 0.1, 0.1)}


@dataclass
class OverlayEpisode:
    """One scored episode to draw.

    Attributes:
        class_name: the episode's class.
        support_images: K arrays (h, w, 3) uint8 RGB (any size each).
        support_masks: K arrays (h, w) bool, same sizes as the images.
        query_image: (H, W, 3) uint8 RGB at the original size.
        truth: (H, W) bool ground-truth mask.
        pred: (H, W) bool predicted mask (logit > 0) at the original size.
        iou: the episode's foreground IoU in [0, 1] (shown in the title), or None.
    """

    class_name: str
    support_images: Sequence[np.ndarray]
    support_masks: Sequence[np.ndarray]
    query_image: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    iou: float | None = None


def overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[float, float, float], alpha: float = 0.5) -> np.ndarray:
    """Blend ``colour`` into ``image`` where ``mask`` is True.

    Args:
        image: (H, W, 3) uint8 RGB or (H, W) uint8 gray.
        mask: (H, W) bool.
        colour: RGB in [0, 1].
        alpha: opacity of the colour in [0, 1].

    Returns:
        (H, W, 3) float array in [0, 1].

    Raises:
        ValueError: image and mask sizes differ.
    """
    img = np.asarray(image, dtype=np.float32) / 255.0
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[:2] != mask.shape:
        raise ValueError(f"image size {img.shape[:2]} != mask size {mask.shape}")
    out = img.copy()
    out[mask] = (1 - alpha) * img[mask] + alpha * np.asarray(colour, dtype=np.float32)
    return out


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight",
                                                      format=Path(path).suffix.lstrip(".") or "png"))


def overlay_grid(episodes: Sequence[OverlayEpisode], path: str | os.PathLike[str], title: str = "") -> Path:
    """Save a grid with one row per episode: K supports (yellow mask), query, ground truth (green),
    prediction (red, with the episode IoU).

    Args:
        episodes: at least one :class:`OverlayEpisode`; rows may have different K (empty cells stay blank).
        path: output PNG path (parent folders are created).
        title: figure title (e.g. ``"lerenet fold 0 K=1 paper"``).

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        ValueError: no episode to draw.
    """
    if not episodes:
        raise ValueError("overlay_grid needs at least one episode")
    k_max = max(len(e.support_images) for e in episodes)
    ncols = k_max + 3
    fig = Figure(figsize=(2.2 * ncols, 2.3 * len(episodes)))
    axes = fig.subplots(len(episodes), ncols, squeeze=False)
    for r, ep in enumerate(episodes):
        row = axes[r]
        for k in range(k_max):
            if k < len(ep.support_images):
                row[k].imshow(overlay(ep.support_images[k], np.asarray(ep.support_masks[k], bool), FG_COLOURS["support"]))
                row[k].set_title(f"{ep.class_name}\nsupport {k + 1}" if k == 0 else f"support {k + 1}", fontsize=8)
        row[k_max].imshow(np.asarray(ep.query_image))
        row[k_max].set_title("query", fontsize=8)
        row[k_max + 1].imshow(overlay(ep.query_image, np.asarray(ep.truth, bool), FG_COLOURS["truth"]))
        row[k_max + 1].set_title("ground truth", fontsize=8)
        row[k_max + 2].imshow(overlay(ep.query_image, np.asarray(ep.pred, bool), FG_COLOURS["pred"]))
        row[k_max + 2].set_title("prediction" + ("" if ep.iou is None else f" IoU {ep.iou:.2f}"), fontsize=8)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def per_class_bar(ious: Mapping[str, Mapping[str, float]] | Mapping[str, float], path: str | os.PathLike[str],
                  title: str = "per-class IoU") -> Path:
    """Save a bar chart of per-class IoU.

    Args:
        ious: ``{class: iou}`` (one series) or ``{series_label: {class: iou}}`` (grouped bars, e.g.
            one series per K / protocol). IoU in [0, 1].
        path: output PNG path.
        title: chart title.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        ValueError: nothing to plot.
    """
    if not ious:
        raise ValueError("per_class_bar needs at least one IoU")
    first = next(iter(ious.values()))
    series: Mapping[str, Mapping[str, float]] = ious if isinstance(first, Mapping) else {"": ious}  # type: ignore[assignment]
    classes: list[str] = []
    for s in series.values():
        classes += [c for c in s if c not in classes]
    x = np.arange(len(classes))
    width = 0.8 / len(series)
    fig = Figure(figsize=(max(4.0, 1.1 * len(classes) + 1.5), 3.4))
    ax = fig.subplots()
    for i, (label, vals) in enumerate(series.items()):
        heights = [vals.get(c, np.nan) for c in classes]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=label or None)
        ax.bar_label(bars, fmt="%.2f", fontsize=6)
    ax.set_xticks(x, classes, rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("IoU")
    ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=7)
    return _save(fig, path)
