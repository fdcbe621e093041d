"""Reading the data artifacts: images, masks, manifest, validated rows, splits, episodes.

One place that knows how pixels are decoded and where the data steps put their
outputs (``docs/architecture.md``, "Data layout"), so that ingest, validation,
training and evaluation all see the same arrays:

* images are decoded with Pillow and returned as RGB ``uint8`` arrays of shape
  ``(H, W, 3)``; gray images are replicated to 3 channels;
* masks are decoded with Pillow as 8-bit gray and binarised with
  ``value > threshold`` (``params.data.mask_threshold``, default 127; never
  ``== 255``: the magnetic-tile masks have soft, anti-aliased edges);
* paths in the manifest are relative to the data folder (``params.data.dir``).

Names and paths come from :mod:`pipeline.layout`; pixel conversion (gray -> RGB, resizing) from
:mod:`pipeline.inference.preprocess`, the one preprocessing of training, evaluation and serving.
Writers (ingest/validate/split) use the atomic helpers of :mod:`pipeline.atomic` (re-exported here)
so a failed step never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.atomic import atomic_write_bytes, atomic_write_parquet, atomic_write_text, replace_dir  # noqa: F401
from pipeline.inference.preprocess import gray_array, resize_image, resize_mask, rgb_array, to_rgb  # noqa: F401
from pipeline.layout import (DOCS_DIR, EPISODES_DIR, INGEST_REPORT, MANIFEST, PROTOCOLS, RAW_DIR, REPORT,  # noqa: F401
                             SPLITS_DIR, VALIDATED, VALIDATION_DIR, VIEW_MARKER, episodes_name,
                             split_name)

#: Image file suffixes the ingest step reads (lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class DataArtifactError(FileNotFoundError):
    """An expected data artifact is missing; the message names it and the step that writes it."""


# ---------------------------------------------------------------------------
# pixels
# ---------------------------------------------------------------------------
def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an image file as RGB.

    Args:
        path: image file (any format Pillow reads; gray, RGB, palette or RGBA).

    Returns:
        ``(H, W, 3)`` ``uint8`` array, values 0..255, RGB order. Gray images are
        replicated to 3 channels; an alpha channel is dropped.

    Raises:
        FileNotFoundError: the file does not exist.
        PIL.UnidentifiedImageError / OSError: the file is not a decodable image
            (e.g. a truncated JPEG).
    """
    with Image.open(path) as im:
        im.load()
        return rgb_array(im)


def read_mask_values(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a mask file as 8-bit gray values.

    Returns:
        ``(H, W)`` ``uint8`` array, 0..255 (colour masks are converted with
        Pillow's ``L`` conversion).

    Raises:
        FileNotFoundError / PIL.UnidentifiedImageError / OSError as :func:`read_image`.
    """
    with Image.open(path) as im:
        im.load()
        return gray_array(im)


def binarise(values: np.ndarray, threshold: int) -> np.ndarray:
    """Defect where ``value > threshold``: ``(H, W)`` uint8 -> ``(H, W)`` bool."""
    return values > threshold


def read_mask(path: str | os.PathLike[str], threshold: int = 127) -> np.ndarray:
    """Decode and binarise a mask: ``(H, W)`` bool, True = defect (value > ``threshold``).

    ``threshold`` is ``params.data.mask_threshold`` (0..254). Raises as :func:`read_image`.
    """
    return binarise(read_mask_values(path), threshold)


def mask_fractions(values: np.ndarray, threshold: int, soft_tolerance: int) -> tuple[float, float]:
    """Foreground and soft-pixel shares of a mask.

    Args:
        values: ``(H, W)`` uint8 mask values.
        threshold: defect where value > threshold.
        soft_tolerance: a pixel is soft if ``tol < value < 255 - tol``.

    Returns:
        ``(fg_fraction, soft_fraction)``, both in [0, 1].
    """
    if values.size == 0:
        return 0.0, 0.0
    fg = float(np.count_nonzero(values > threshold)) / values.size
    soft = float(np.count_nonzero((values > soft_tolerance) & (values < 255 - soft_tolerance))) / values.size
    return fg, soft


# ---------------------------------------------------------------------------
# artifacts
# ---------------------------------------------------------------------------
def _need(path: Path, step: str) -> Path:
    if not path.exists():
        raise DataArtifactError(f"{path} does not exist: run `lerenet {step}` (or `dvc repro {step}`) first")
    return path


def load_manifest(data_dir: str | os.PathLike[str]) -> pd.DataFrame:
    """Read ``<data_dir>/manifest.parquet`` written by ingest (one row per image; schema in docs).

    Raises :class:`DataArtifactError` if ingest has not run.
    """
    return pd.read_parquet(_need(Path(data_dir) / MANIFEST, "ingest"))


def load_validated(data_dir: str | os.PathLike[str], kind: str | None = None) -> pd.DataFrame:
    """Read the usable rows (``validated.parquet``): manifest schema, empty-mask images excluded.

    Args:
        data_dir: ``params.data.dir``.
        kind: ``"defect"`` or ``"normal"`` to keep only that kind; ``None`` = all.

    Returns:
        DataFrame indexed 0..n-1, sorted by class, kind, image path.

    Raises:
        DataArtifactError: validation has not run or failed (the file is only
            written when validation passes).
    """
    df = pd.read_parquet(_need(Path(data_dir) / VALIDATED, "validate"))
    if kind is not None:
        df = df[df["kind"] == kind].reset_index(drop=True)
    return df


def load_split(data_dir: str | os.PathLike[str], fold: int) -> dict[str, Any]:
    """Read ``splits/fold<fold>.json``: ``{"fold", "test_classes", "train_classes", "train_ids",
    "val_ids", "test_ids"}`` (ids are manifest ids). Raises :class:`DataArtifactError` if missing."""
    return json.loads(_need(Path(data_dir) / SPLITS_DIR / split_name(fold), "split").read_text())


def episodes_path(data_dir: str | os.PathLike[str], fold: int, protocol: str, shots: int) -> Path:
    """Path of the saved episodes file ``episodes/fold<f>_<protocol>_k<K>.parquet``."""
    return Path(data_dir) / EPISODES_DIR / episodes_name(fold, protocol, shots)


def load_episodes(data_dir: str | os.PathLike[str], fold: int, protocol: str, shots: int) -> pd.DataFrame:
    """Read saved test episodes: one row per episode with ``episode`` (int), ``seed`` (int),
    ``class_name``, ``support_ids`` (list of K manifest ids), ``query_id``.

    ``support_ids`` are returned as Python lists. Raises :class:`DataArtifactError` if missing
    (e.g. ``shots`` not in ``params.split.shots``) and ``ValueError`` for an unknown protocol.
    """
    df = pd.read_parquet(_need(episodes_path(data_dir, fold, protocol, shots), "split"))
    df["support_ids"] = df["support_ids"].map(list)
    return df


def resolve(data_dir: str | os.PathLike[str], relative: str) -> Path:
    """Absolute path of a manifest ``image_path``/``mask_path`` (relative to the data folder)."""
    return Path(data_dir) / relative
