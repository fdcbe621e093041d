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

Writers (ingest/validate/split) use :func:`atomic_write_parquet` /
:func:`atomic_write_text` so a failed step never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

#: File and folder names under the data folder (``params.data.dir``).
RAW_DIR = "raw"
MANIFEST = "manifest.parquet"
INGEST_REPORT = "ingest_report.json"  # files of the source that ingest did not use (pipeline.ingest)
#: Marker written by ``pipeline.classes.source_view`` into a view folder: which class links it holds
#: and the source root each may point into (``pipeline.ingest`` follows those links and no others).
VIEW_MARKER = ".lerenet-view.json"
VALIDATION_DIR = "validation"
REPORT = "validation/report.json"
DOCS_DIR = "validation/docs"
VALIDATED = "validated.parquet"
SPLITS_DIR = "splits"
EPISODES_DIR = "episodes"
PROTOCOLS = ("paper", "standard")

_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK  # mkstemp creates 0600; give written artifacts the usual mode

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
        return to_rgb(np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im))


def to_rgb(array: np.ndarray) -> np.ndarray:
    """Return a ``(H, W, 3)`` view/copy of a ``(H, W)`` or ``(H, W, 1|3)`` image array.

    Gray is replicated to 3 channels; a 3-channel array is returned unchanged.
    Raises ``ValueError`` for any other shape.
    """
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim == 3 and array.shape[2] == 3:
        return array
    if array.ndim == 3 and array.shape[2] == 1:
        return np.repeat(array, 3, axis=2)
    raise ValueError(f"expected an image array of shape (H,W) or (H,W,1|3), got {array.shape}")


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
        return np.asarray(im if im.mode == "L" else im.convert("L"))


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


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an ``(H, W, 3)`` or ``(H, W)`` uint8 image with bilinear filtering.

    ``size`` is ``S`` (square ``S x S``) or ``(height, width)`` in pixels. Returns
    the same dtype and channel layout at the new size.
    """
    h, w = (size, size) if isinstance(size, int) else size
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize an ``(H, W)`` bool mask with nearest-neighbour sampling (stays binary).

    ``size`` is ``S`` or ``(height, width)``. Returns ``(h, w)`` bool.
    """
    h, w = (size, size) if isinstance(size, int) else size
    im = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(im.resize((w, h), Image.NEAREST)) > 127


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
    return json.loads(_need(Path(data_dir) / SPLITS_DIR / f"fold{fold}.json", "split").read_text())


def episodes_path(data_dir: str | os.PathLike[str], fold: int, protocol: str, shots: int) -> Path:
    """Path of the saved episodes file ``episodes/fold<f>_<protocol>_k<K>.parquet``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return Path(data_dir) / EPISODES_DIR / f"fold{fold}_{protocol}_k{shots}.parquet"


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


# ---------------------------------------------------------------------------
# atomic writers
# ---------------------------------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(src: Path, dest: Path) -> None:
    """Swap the finished folder ``src`` in as ``dest`` (same file system).

    The old ``dest`` is first renamed aside, then ``src`` is renamed into place, then the old copy is
    deleted: readers see either the complete old folder or the complete new one, never a mix.
    """
    src, dest = Path(src), Path(dest)
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Atomically write UTF-8 text (see :func:`atomic_write_bytes`)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_parquet(path: Path, df: pd.DataFrame) -> None:
    """Atomically write ``df`` as Parquet without the index (byte-identical for identical frames)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
