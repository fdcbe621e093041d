"""Preprocessing, one place for training, the feature store, evaluation, ``lerenet predict`` and serving.

Conventions (``docs/architecture.md``, "Model contract"):

* images are ``(H, W, 3)`` ``uint8`` RGB; gray (``(H, W)``, ``(H, W, 1)``, Pillow mode ``L``) is
  replicated to 3 channels (:func:`to_rgb`, :func:`rgb_array`);
* masks are ``(H, W)`` ``bool`` (True = defect), decoded as 8-bit gray (:func:`gray_array`) and
  binarised by the caller with ``value > threshold``;
* the network input is the *clean view*: image resized to ``S x S`` with bilinear filtering, mask
  with nearest neighbour (:func:`clean_pair`), as tensors ``(3, S, S)`` float in [0, 1] and
  ``(1, S, S)`` float in {0, 1} (:func:`to_tensor_pair`, :func:`clean_tensors`); batches
  ``(N, 3, S, S)`` / ``(N, 1, S, S)`` (:func:`image_batch`, :func:`mask_batch`).

The feature store's view 0, training's validation episodes and every inference path call these
functions, so a cached feature and a freshly encoded image see identical pixels. NumPy and Pillow
only at import time (torch is imported inside the tensor functions): the data steps use the pixel
functions without loading torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    import torch


def to_rgb(array: np.ndarray) -> np.ndarray:
    """Return a ``(H, W, 3)`` view/copy of a ``(H, W)`` or ``(H, W, 1|3)`` image array.

    Gray is replicated to 3 channels; a 3-channel array is returned unchanged.

    Raises:
        ValueError: any other shape.
    """
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 3:
        return array
    if array.ndim == 3 and array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    raise ValueError(f"expected an image array of shape (H,W) or (H,W,1|3), got {array.shape}")


def rgb_array(im: Image.Image) -> np.ndarray:
    """A decoded Pillow image as ``(H, W, 3)`` uint8 RGB (gray replicated; palette/alpha converted)."""
    return to_rgb(np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im))


def gray_array(im: Image.Image) -> np.ndarray:
    """A decoded Pillow mask image as ``(H, W)`` uint8 gray values 0..255 (Pillow ``L`` conversion)."""
    return np.asarray(im if im.mode == "L" else im.convert("L"))


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an ``(H, W, 3)`` or ``(H, W)`` uint8 image with bilinear filtering (Pillow).

    ``size`` is ``S`` (square ``S x S``) or ``(height, width)`` in pixels. Returns the same dtype
    and channel layout at the new size.
    """
    h, w = (size, size) if isinstance(size, int) else size
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an ``(H, W)`` bool mask with nearest-neighbour sampling (stays binary).

    ``size`` is ``S`` or ``(height, width)``. Returns ``(h, w)`` bool.
    """
    h, w = (size, size) if isinstance(size, int) else size
    im = Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255)
    return np.asarray(im.resize((w, h), Image.NEAREST)) > 127


def clean_pair(image: np.ndarray, mask: np.ndarray | None, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The un-augmented view: image resized bilinearly, mask with nearest neighbour, to ``S x S``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB.
        mask: ``(H, W)`` bool, or ``None`` for a defect-free image (all background).
        image_size: ``S``.

    Returns:
        ``(image (S, S, 3) uint8, mask (S, S) bool)``.
    """
    img = resize_image(image, image_size)
    m = np.zeros((image_size, image_size), bool) if mask is None else resize_mask(mask, image_size)
    return img, m


def to_tensor_pair(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S, 3)`` uint8 + ``(S, S)`` bool -> ``(3, S, S)`` float in [0, 1] and ``(1, S, S)`` float {0, 1}."""
    import torch

    image = np.ascontiguousarray(image)
    mask = np.ascontiguousarray(mask)
    if not image.flags.writeable:  # Pillow arrays are read-only; torch wants writable memory
        image = image.copy()
    if not mask.flags.writeable:
        mask = mask.copy()
    img = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
    m = torch.from_numpy(mask).float().unsqueeze(0)
    return img, m


def clean_tensors(image: np.ndarray, mask: np.ndarray | None, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean view as tensors: ``to_tensor_pair(*clean_pair(image, mask, S))``.

    Returns:
        ``(3, S, S)`` float in [0, 1] and ``(1, S, S)`` float in {0, 1}.
    """
    return to_tensor_pair(*clean_pair(image, mask, image_size))


def image_batch(images: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
    """N ``(H_i, W_i, 3)`` uint8 images (any sizes) -> ``(N, 3, S, S)`` float in [0, 1] (bilinear resize)."""
    import torch

    arr = np.stack([resize_image(im, image_size) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


def mask_batch(masks: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
    """N ``(H_i, W_i)`` bool masks -> ``(N, 1, S, S)`` float in {0, 1} (nearest-neighbour resize)."""
    import torch

    return torch.from_numpy(np.stack([resize_mask(m, image_size) for m in masks])).float()[:, None]
