"""Training augmentation (albumentations), applied identically to an image and its mask.

Follows the transforms of the authors' code (PFENet-style ``transform.py``): after resizing to
``S x S`` — random scale in [0.9, 1.1], random rotation in [-10°, +10°] (p = 0.5, padded with the
ImageNet mean colour; padded mask pixels are background), Gaussian blur (p = 0.5), horizontal flip
(p = 0.5), then a random ``S x S`` crop (padding first when the scaled image is smaller).

The clean view (:func:`clean_pair`, resize only) and :func:`to_tensor_pair` are those of
:mod:`pipeline.inference.preprocess`, so training, the feature store and inference see the same pixels.

Each call is seeded explicitly (:func:`augment_pair` ``seed=``), so a view is a pure function of
(image, mask, seed): independent of processing order, worker process or resume point.
"""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np

# the clean (un-augmented) view and the tensor conversion are the one preprocessing of inference;
# re-exported here for the training side (feature store view 0, validation episodes)
from pipeline.inference.preprocess import clean_pair, to_tensor_pair  # noqa: F401

#: padding colour for rotated/scaled-down images: ImageNet mean RGB (0..255), as the authors' code.
MEAN_FILL = (124, 116, 104)


def build_augment(image_size: int) -> A.Compose:
    """The augmentation pipeline for square ``image_size`` training crops.

    Input: ``image`` (H, W, 3) uint8 RGB and ``mask`` (H, W) uint8 in {0, 1}, any H, W.
    Output: both at ``(image_size, image_size)``; the mask stays in {0, 1} (nearest-neighbour).
    """
    s = int(image_size)
    return A.Compose(
        [
            A.Resize(s, s, interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST),
            A.RandomScale(scale_limit=(-0.1, 0.1), interpolation=cv2.INTER_LINEAR,
                          mask_interpolation=cv2.INTER_NEAREST, p=1.0),
            A.Rotate(limit=(-10, 10), interpolation=cv2.INTER_LINEAR, mask_interpolation=cv2.INTER_NEAREST,
                     border_mode=cv2.BORDER_CONSTANT, fill=MEAN_FILL, fill_mask=0, p=0.5),
            A.GaussianBlur(blur_limit=(3, 5), p=0.5),
            A.HorizontalFlip(p=0.5),
            A.PadIfNeeded(min_height=s, min_width=s, border_mode=cv2.BORDER_CONSTANT, fill=MEAN_FILL, fill_mask=0),
            A.RandomCrop(height=s, width=s),
        ],
        seed=0,
    )


def augment_pair(pipeline: A.Compose, image: np.ndarray, mask: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Apply ``pipeline`` to an image/mask pair with a fixed seed.

    Args:
        pipeline: from :func:`build_augment`.
        image: (H, W, 3) uint8 RGB.
        mask: (H, W) bool (or {0,1} integers), same H, W as ``image``.
        seed: any int >= 0; the same seed gives the same view.

    Returns:
        ``(image (S, S, 3) uint8, mask (S, S) bool)``.

    Raises:
        ValueError: image and mask sizes differ (names both shapes).
    """
    if image.shape[:2] != mask.shape[:2]:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape[:2]} differ in size; they must match pixel for pixel")
    pipeline.set_random_seed(int(seed) % (2**32))
    out = pipeline(image=np.ascontiguousarray(image), mask=np.ascontiguousarray(mask, dtype=np.uint8))
    return out["image"], out["mask"].astype(bool)
