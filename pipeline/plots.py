"""Evaluation pictures: support / query / ground truth / prediction overlay sheets and the per-class IoU bar chart.

Drawn with matplotlib's object API (``matplotlib.figure.Figure`` renders with the Agg canvas; no
pyplot, no display, no global backend state). Files are written atomically
(:func:`pipeline.atomic.atomic_write`), so a failed plot never leaves half a PNG.

Overlay sheet (:func:`overlay_grid`), laid out in pixels so nothing overlaps and no band is left blank:
a title, a legend and the column headings on top, then one row per episode, each with its own title
band (class, query id, support class when it differs, the episode's IoU) above ``tile_px``-square
tiles. Colours, chosen to stand out on brown leather, gray steel and dark magnetic tiles alike:
annotations (support masks, ground truth) in yellow, the prediction in cyan, each as a
semi-transparent fill plus a solid outline (drawn as vector contours, so a defect a few pixels wide
stays visible at any image size); the prediction tile also carries the ground truth's outline, dashed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from pipeline.atomic import atomic_write

#: RGB in [0, 1]: annotated defect (support masks and ground truth) and predicted defect.
ANNOTATION_COLOUR = (1.0, 0.85, 0.0)
PREDICTION_COLOUR = (0.0, 0.9, 1.0)
FG_COLOURS = {"support": ANNOTATION_COLOUR, "truth": ANNOTATION_COLOUR, "pred": PREDICTION_COLOUR}
#: opacity of the fills; the outlines are opaque
FILL_ALPHA = 0.35

#: sheet geometry in pixels (figure dpi 100): tile gap, row title band, margins, header bands
_DPI = 100
_GAP, _BAND, _MARGIN, _TITLE, _LEGEND, _HEAD = 8, 26, 12, 34, 30, 22


@dataclass
class OverlayEpisode:
    """One scored episode to draw.

    Attributes:
        class_name: the episode's class (the query's).
        support_images: K arrays (h, w, 3) uint8 RGB or (h, w) uint8 gray (any size each).
        support_masks: K arrays (h, w) bool, same sizes as the images.
        query_image: (H, W, 3) uint8 RGB or (H, W) uint8 gray, at the original size.
        truth: (H, W) bool ground-truth mask.
        pred: (H, W) bool predicted mask (logit > 0) at the original size.
        iou: the episode's foreground IoU in [0, 1] (shown in the row title), or None.
        query_id: the query image's name (file stem, shown in the row title), or None.
        support_class: the supports' class when it is not ``class_name`` (the mismatched control), else None.
    """

    class_name: str
    support_images: Sequence[np.ndarray]
    support_masks: Sequence[np.ndarray]
    query_image: np.ndarray
    truth: np.ndarray
    pred: np.ndarray
    iou: float | None = None
    query_id: str | None = None
    support_class: str | None = None

    def row_title(self) -> str:
        """The row's title, e.g. ``"Leather_Color  ·  query 3f2a…  ·  IoU 0.51"``."""
        parts = [self.class_name]
        if self.query_id:
            parts.append(f"query {self.query_id}")
        if self.support_class and self.support_class != self.class_name:
            parts.append(f"supports from {self.support_class}")
        parts.append("IoU –" if self.iou is None else f"IoU {self.iou:.2f}")
        return "  ·  ".join(parts)


def overlay(image: np.ndarray, mask: np.ndarray, colour: tuple[float, float, float],
            alpha: float = FILL_ALPHA) -> np.ndarray:
    """Blend ``colour`` into ``image`` where ``mask`` is True (the fill; outlines are drawn by :func:`overlay_grid`).

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


def _save(fig: Figure, path: str | os.PathLike[str], dpi: int = _DPI, tight: bool = True) -> Path:
    fmt = Path(path).suffix.lstrip(".") or "png"
    extra = {"bbox_inches": "tight"} if tight else {}
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=fmt, **extra))


def _outline(ax, mask: np.ndarray, colour: tuple[float, float, float], width: float = 1.6,
             style: str = "solid") -> None:
    """Draw the boundary of ``mask`` as a vector contour, closed along the image border and clipped to the
    image (nothing drawn for an empty mask); the axes keep the image's extent."""
    if not mask.any():
        return
    h, w = mask.shape
    padded = np.pad(mask.astype(np.float32), 1)
    cs = ax.contour(np.arange(-1, w + 1), np.arange(-1, h + 1), padded, levels=[0.5], colors=[colour],
                    linewidths=width, linestyles=style)
    cs.set_clip_path(ax.patch)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)


@dataclass(frozen=True)
class SheetLayout:
    """Pixel geometry of an overlay sheet (dpi 100; y counted from the top).

    Attributes:
        width, height: the PNG's size in pixels.
        tile_px: width of every tile column.
        columns: ``max K + 3`` (supports, query, ground truth, prediction).
        rows: per episode, ``(y of the tiles' top edge, tile height)``; the row's title band is the
            ``ROW_TITLE_PX`` pixels above it.
    """

    width: int
    height: int
    tile_px: int
    columns: int
    rows: tuple[tuple[int, int], ...]

    def column_x(self, c: int) -> int:
        """x of the left edge of tile column ``c`` (0-based)."""
        return _MARGIN + c * (self.tile_px + _GAP)


#: height of each row's title band (pixels)
ROW_TITLE_PX = _BAND


def _aspect(img: np.ndarray) -> float:
    h, w = np.asarray(img).shape[:2]
    return h / w if w else 1.0


def sheet_layout(episodes: Sequence[OverlayEpisode], tile_px: int = 240) -> SheetLayout:
    """Geometry of the sheet :func:`overlay_figure` draws: ``tile_px``-wide columns; each row as tall as its
    tallest image needs at that width (height/width clipped to [0.5, 1.5]), so wide magnetic-tile images
    leave no blank band and tall ones are not shrunk to a sliver.

    Raises:
        ValueError: no episode, or ``tile_px`` < 64.
    """
    if not episodes:
        raise ValueError("overlay_grid needs at least one episode")
    if tile_px < 64:
        raise ValueError(f"tile_px={tile_px}: tiles smaller than 64 px are unreadable")
    cols = max(len(e.support_images) for e in episodes) + 3
    rows, y = [], _MARGIN + _TITLE + _LEGEND + _HEAD
    for ep in episodes:
        aspect = max(_aspect(i) for i in [*ep.support_images, ep.query_image])
        h = int(round(tile_px * min(1.5, max(0.5, aspect))))
        rows.append((y + _BAND, h))
        y += _BAND + h + _GAP
    return SheetLayout(2 * _MARGIN + cols * tile_px + (cols - 1) * _GAP, y - _GAP + _MARGIN, tile_px, cols,
                       tuple(rows))


def overlay_figure(episodes: Sequence[OverlayEpisode], title: str = "", tile_px: int = 240) -> Figure:
    """The overlay sheet of :func:`overlay_grid` as a matplotlib ``Figure`` (geometry :func:`sheet_layout`).

    Raises:
        ValueError: no episode to draw, or ``tile_px`` < 64.
    """
    lay = sheet_layout(episodes, tile_px)
    width, height, k_max = lay.width, lay.height, lay.columns - 3
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")

    def box(x: float, y_top: float, w: float, h: float) -> list[float]:  # pixels from the top-left -> fractions
        return [x / width, 1 - (y_top + h) / height, w / width, h / height]

    fig.text(0.5, 1 - (_MARGIN + _TITLE / 2) / height, title or "few-shot segmentation episodes",
             ha="center", va="center", fontsize=13, weight="bold")
    handles = [Patch(facecolor=(*ANNOTATION_COLOUR, FILL_ALPHA), edgecolor=ANNOTATION_COLOUR, linewidth=2),
               Patch(facecolor=(*PREDICTION_COLOUR, FILL_ALPHA), edgecolor=PREDICTION_COLOUR, linewidth=2),
               Line2D([], [], color=ANNOTATION_COLOUR, linestyle="--", linewidth=1.6)]
    labels = ["annotated defect (support mask, ground truth)", "predicted defect",
              "ground-truth outline on the prediction"]
    fig.legend(handles, labels, loc="center", ncol=3, frameon=False, fontsize=9,
               bbox_to_anchor=(0.5, 1 - (_MARGIN + _TITLE + _LEGEND / 2) / height))
    heads = [f"support {k + 1}" for k in range(k_max)] + ["query", "ground truth", "prediction"]
    y_head = _MARGIN + _TITLE + _LEGEND + _HEAD / 2
    for c, head in enumerate(heads):
        fig.text((lay.column_x(c) + tile_px / 2) / width, 1 - y_head / height, head, ha="center", va="center",
                 fontsize=10, color="0.25")
    for ep, (y, row_h) in zip(episodes, lay.rows):
        fig.text(_MARGIN / width, 1 - (y - _BAND / 2) / height, ep.row_title(), ha="left", va="center",
                 fontsize=10, weight="bold")
        tiles: list[tuple[int, np.ndarray, list[tuple[np.ndarray, tuple[float, float, float], str]]]] = []
        for k, (img, msk) in enumerate(zip(ep.support_images, ep.support_masks)):
            m = np.asarray(msk, bool)
            tiles.append((k, overlay(img, m, ANNOTATION_COLOUR), [(m, ANNOTATION_COLOUR, "solid")]))
        truth, pred = np.asarray(ep.truth, bool), np.asarray(ep.pred, bool)
        tiles.append((k_max, overlay(ep.query_image, np.zeros_like(truth), ANNOTATION_COLOUR, 0.0), []))
        tiles.append((k_max + 1, overlay(ep.query_image, truth, ANNOTATION_COLOUR), [(truth, ANNOTATION_COLOUR, "solid")]))
        tiles.append((k_max + 2, overlay(ep.query_image, pred, PREDICTION_COLOUR),
                      [(truth, ANNOTATION_COLOUR, "dashed"), (pred, PREDICTION_COLOUR, "solid")]))
        for c, pixels, lines in tiles:
            ax = fig.add_axes(box(lay.column_x(c), y, tile_px, row_h))
            ax.imshow(pixels, interpolation="antialiased")
            for m, colour, style in lines:
                _outline(ax, m, colour, style=style)
            ax.set_axis_off()
        if not pred.any():
            ax.text(0.03, 0.03, "nothing predicted", transform=ax.transAxes, fontsize=8, color="white",
                    bbox={"facecolor": "black", "alpha": 0.6, "pad": 2, "linewidth": 0})
    return fig


def overlay_grid(episodes: Sequence[OverlayEpisode], path: str | os.PathLike[str], title: str = "",
                 tile_px: int = 240) -> Path:
    """Save an overlay sheet: one row per episode with K supports (annotation in yellow), the query, the
    ground truth (yellow) and the prediction (cyan, with the truth's outline dashed); each row titled with
    its class, query id and IoU; a legend on top.

    Args:
        episodes: at least one :class:`OverlayEpisode`; rows may have different K (missing supports stay blank).
        path: output PNG path (parent folders are created).
        title: sheet title (e.g. ``"lerenet, fold 0: K=1, paper episodes"``).
        tile_px: edge of each square tile in pixels (images keep their aspect ratio inside it).

    Returns:
        ``path`` as a :class:`Path`; the PNG's size is :func:`sheet_layout`'s ``width`` x ``height``.

    Raises:
        ValueError: no episode to draw, or ``tile_px`` < 64.
    """
    return _save(overlay_figure(episodes, title, tile_px), path, tight=False)


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
