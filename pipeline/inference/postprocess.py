"""Post-processing of predicted masks: threshold, connected components, bounding boxes, overlays, PNG bytes.

* Connected components: :func:`scipy.ndimage.label` with 8-connectivity (a diagonal step joins two
  pixels), boxes from :func:`scipy.ndimage.find_objects`, areas from :func:`numpy.bincount`.
* Overlays: the defect is tinted by alpha blending and its outline drawn with OpenCV's
  :func:`cv2.findContours` / :func:`cv2.drawContours` (``opencv-python-headless``, installed with
  albumentations).
* PNG encoding: Pillow, into memory (the caller writes the bytes atomically).
* Per-image headline (:func:`headline`): defect area %, component count, largest component's box and
  max score, what ``lerenet predict`` prints in its table.

SciPy and OpenCV are imported by the functions that need them, so the served model's request path
(PNG encoding only) does not load them.

All arrays follow the image convention ``(H, W)`` / ``(H, W, 3)``, row ``y`` first, column ``x``
second; boxes are ``x, y, width, height`` in pixels of the array they were computed on.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

from pipeline.inference.preprocess import to_rgb

#: 8-connectivity structuring element for :func:`scipy.ndimage.label`.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

#: Default tint (RGB 0..255) and outline colour of the defect in overlays.
TINT = (255, 40, 40)
CONTOUR = (255, 255, 0)


def connected_components(mask: np.ndarray, min_area: int = 1) -> list[dict[str, int]]:
    """Connected defect regions of a binary mask, largest first.

    Args:
        mask: ``(H, W)`` bool (True = defect).
        min_area: components with fewer pixels are dropped (``>= 1``).

    Returns:
        One dict per component, sorted by decreasing area, then top-left position:
        ``{"area": pixels, "x": left column, "y": top row, "width": columns, "height": rows}``
        (the box is the tight axis-aligned box of the component, ``x + width`` exclusive).

    Raises:
        ValueError: ``mask`` is not 2-D or ``min_area < 1``.
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if min_area < 1:
        raise ValueError(f"min_area must be >= 1, got {min_area}")
    labels, n = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if n == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    out = []
    for idx, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None or areas[idx] < min_area:
            continue
        ys, xs = sl
        out.append({"area": int(areas[idx]), "x": int(xs.start), "y": int(ys.start),
                    "width": int(xs.stop - xs.start), "height": int(ys.stop - ys.start)})
    out.sort(key=lambda c: (-c["area"], c["y"], c["x"]))
    return out


def overlay(image: np.ndarray, mask: np.ndarray, tint: tuple[int, int, int] = TINT, alpha: float = 0.45,
            contour: tuple[int, int, int] | None = CONTOUR, thickness: int | None = None) -> np.ndarray:
    """Tint the defect on the image and outline it.

    Args:
        image: ``(H, W, 3)`` uint8 RGB or ``(H, W)`` uint8 gray (replicated to RGB).
        mask: ``(H, W)`` bool, True = defect; same size as ``image``.
        tint: RGB 0..255 blended into defect pixels.
        alpha: opacity of the tint in ``[0, 1]``.
        contour: RGB 0..255 of the outline (``None``: no outline). Outlines follow every
            component's outer and hole boundaries (``cv2.RETR_LIST``).
        thickness: outline width in pixels; default ``max(1, round(min(H, W) / 200))``.

    Returns:
        ``(H, W, 3)`` uint8 RGB (a new array).

    Raises:
        ValueError: sizes differ, or ``alpha`` outside ``[0, 1]``.
    """
    import cv2

    img = to_rgb(np.asarray(image))
    mask = np.asarray(mask, dtype=bool)
    if img.shape[:2] != mask.shape:
        raise ValueError(f"image size {img.shape[:2]} and mask size {mask.shape} differ")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = img.astype(np.float32)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * np.asarray(tint, dtype=np.float32)
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if contour is not None and mask.any():
        th = thickness if thickness is not None else max(1, round(min(mask.shape) / 200))
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        out = np.ascontiguousarray(out)
        cv2.drawContours(out, contours, -1, tuple(int(c) for c in contour), th)
    return out


def png_bytes(array: np.ndarray) -> bytes:
    """Encode an image as PNG in memory.

    Args:
        array: ``(H, W)`` bool (written as 0/255 8-bit gray), ``(H, W)`` uint8 gray or
            ``(H, W, 3)`` uint8 RGB.

    Returns:
        The PNG file's bytes (lossless).

    Raises:
        ValueError: any other shape or dtype.
    """
    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"png_bytes expects (H, W) bool/uint8 or (H, W, 3) uint8, got {a.shape} {a.dtype}")
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def summarise(prob: np.ndarray, threshold: float, min_area: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """Binary mask and per-image figures from a probability map.

    Args:
        prob: ``(H, W)`` float in [0, 1]. threshold: defect where ``prob > threshold``.
        min_area: smallest component (pixels) listed.

    Returns:
        ``(mask, info)``: ``(H, W)`` bool and ``{"width", "height", "defect_fraction" in [0, 1],
        "max_score" in [0, 1], "components": [{"area", "x", "y", "width", "height"}, ...]}``.
    """
    mask = prob > threshold
    info = {"width": int(mask.shape[1]), "height": int(mask.shape[0]),
            "defect_fraction": float(mask.mean()), "max_score": float(prob.max()),
            "components": connected_components(mask, min_area=min_area)}
    return mask, info


def headline(info: dict[str, Any]) -> dict[str, Any]:
    """The figures ``lerenet predict`` prints for one image, from :func:`summarise`'s ``info``.

    Returns:
        ``{"defect_percent": 100 * defect fraction, "components": number of connected components,
        "largest_box": (x, y, width, height) of the largest component or ``None`` without defect,
        "max_score": highest defect probability}``.
    """
    components = info["components"]
    largest = components[0] if components else None  # sorted largest first
    return {"defect_percent": 100.0 * float(info["defect_fraction"]), "components": len(components),
            "largest_box": (largest["x"], largest["y"], largest["width"], largest["height"]) if largest else None,
            "max_score": float(info["max_score"])}
