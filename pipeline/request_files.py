"""The files of a request (``lerenet predict``, ``lerenet classes add``, the inference benchmark): support
pairs, query lists and reference images, read from disk and checked.

Every function raises :class:`pipeline.inference.predictor.PredictInputError` naming the file and what to do;
a non-image file in a query (or reference) *folder* is skipped with a :class:`SkippedInputWarning` and listed,
an explicitly named one is an error. Reference images must all decode (a reference set that silently lost an
image would move the presence gate).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import UnidentifiedImageError

from pipeline.images import IMAGE_SUFFIXES, read_image, read_mask
from pipeline.inference.predictor import PredictInputError


class SkippedInputWarning(UserWarning):
    """A file in a query (or reference) folder was skipped (not an image, or not decodable)."""


def parse_support_pair(text: str) -> tuple[Path, Path]:
    """Split ``IMAGE:MASK`` (the ``--support`` syntax) into two paths.

    The split is at the last ``:`` so Windows-style drive letters in the image path survive.
    Raises :class:`PredictInputError` when there is no ``:`` or a side is empty.
    """
    img, sep, mask = text.rpartition(":")
    if not sep or not img or not mask:
        raise PredictInputError(f"--support {text!r}: expected IMAGE:MASK, e.g. Images/a.jpg:GT/a.png")
    return Path(img), Path(mask)


def supports_from_class_dir(class_dir: str | os.PathLike[str], limit: int | None = None, *,
                            option: str = "--support-dir") -> list[tuple[Path, Path]]:
    """Support pairs from a Surface-Defects-4i class folder: ``Images/<stem>.*`` with ``GT/<stem>.png``.

    Args:
        class_dir: folder holding ``Images/`` and ``GT/``.
        limit: keep the first ``limit`` pairs in file-name order (``None``: all).
        option: the command-line option named in error messages.

    Returns:
        ``[(image_path, mask_path), ...]`` sorted by image file name.

    Raises:
        PredictInputError: no ``Images/`` folder, an image without ``GT/<stem>.png``, no image at all,
            or ``limit < 1``.
    """
    root = Path(class_dir)
    images_dir = root / "Images"
    if not images_dir.is_dir():
        raise PredictInputError(f"{option} {root}: no Images/ subfolder (expected the Surface-Defects-4i "
                                "layout <Class>/Images/<stem>.jpg + <Class>/GT/<stem>.png)")
    if limit is not None and limit < 1:
        raise PredictInputError(f"--shots-limit must be >= 1, got {limit}")
    images = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PredictInputError(f"{option} {root}: Images/ holds no image ({', '.join(IMAGE_SUFFIXES)})")
    pairs = []
    for p in images[: limit or len(images)]:
        mask = root / "GT" / f"{p.stem}.png"
        if not mask.is_file():
            raise PredictInputError(f"support {p}: mask {mask} is missing; every support image needs "
                                    "GT/<stem>.png (or pass --support IMAGE:MASK pairs)")
        pairs.append((p, mask))
    return pairs


def check_support(image: np.ndarray, mask: np.ndarray, where: str) -> None:
    """Check one support pair: mask the same ``(H, W)`` as the image and not empty.

    Args:
        image: ``(H, W, 3)`` uint8. mask: ``(h, w)`` bool. where: names the pair in errors.

    Raises:
        PredictInputError: sizes differ, or the mask has no defect pixel (a support must show the defect).
    """
    if image.shape[:2] != mask.shape:
        raise PredictInputError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is "
                                f"{image.shape[1]}x{image.shape[0]}; a support mask must have its image's size")
    if not mask.any():
        raise PredictInputError(f"{where}: the mask is empty (no pixel above the mask threshold); a support "
                                "must show the defect: pick another image or fix the mask")


def load_supports(pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
                  threshold: int = 127) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Read and check support pairs.

    Args:
        pairs: ``[(image_path, mask_path), ...]``, K >= 1.
        threshold: mask binarisation, defect where 8-bit value > ``threshold``
            (``params.data.mask_threshold``).

    Returns:
        ``(images, masks)``: K ``(H_k, W_k, 3)`` uint8 arrays and K ``(H_k, W_k)`` bool arrays.

    Raises:
        PredictInputError: no pair, a missing/undecodable file, size mismatch, or an empty mask
            (the message names the file).
    """
    if not pairs:
        raise PredictInputError("no support given: pass --support IMAGE:MASK (repeatable) or --support-dir CLASS_DIR")
    images, masks = [], []
    for img_path, mask_path in pairs:
        img_path, mask_path = Path(img_path), Path(mask_path)
        for p, what in ((img_path, "support image"), (mask_path, "support mask")):
            if not p.is_file():
                raise PredictInputError(f"{what} {p} does not exist")
        try:
            image = read_image(img_path)
        except (UnidentifiedImageError, OSError) as exc:
            raise PredictInputError(f"support image {img_path}: not a decodable image ({exc})") from None
        try:
            mask = read_mask(mask_path, threshold)
        except (UnidentifiedImageError, OSError) as exc:
            raise PredictInputError(f"support mask {mask_path}: not a decodable image ({exc})") from None
        check_support(image, mask, f"support {img_path} / mask {mask_path}")
        images.append(image)
        masks.append(mask)
    return images, masks


def list_queries(paths: Sequence[str | os.PathLike[str]],
                 what: str = "query") -> tuple[list[Path], list[dict[str, str]]]:
    """Expand query arguments into image files.

    Args:
        paths: files or folders. Folders are listed non-recursively in file-name order; files whose
            suffix is not an image suffix (``pipeline.images.IMAGE_SUFFIXES``) are skipped with a
            :class:`SkippedInputWarning` (hidden dot-files silently).
        what: what the images are, in messages (``"query"``; ``"reference"`` for :func:`load_references`).

    Returns:
        ``(files, skipped)`` with ``skipped = [{"path", "reason"}, ...]``.

    Raises:
        PredictInputError: a path does not exist, an explicitly named file is not an image file, or
            no image remains.
    """
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if not f.is_file() or f.name.startswith("."):
                    continue
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                else:
                    reason = f"not an image file (suffix {f.suffix or 'none'}; expected {', '.join(IMAGE_SUFFIXES)})"
                    warnings.warn(f"skipping {what} {f}: {reason}", SkippedInputWarning, stacklevel=2)
                    skipped.append({"path": str(f), "reason": reason})
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise PredictInputError(f"{what} {p}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
            files.append(p)
        else:
            raise PredictInputError(f"{what} {p} does not exist")
    if not files:
        raise PredictInputError(f"no {what} image found in {[str(p) for p in paths]}")
    return files, skipped


def load_references(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[np.ndarray]]:
    """Read the defect-free reference images of the queries' surface (``lerenet predict --reference``).

    Args:
        paths: image files and/or folders, listed as :func:`list_queries` lists queries (a folder's
            non-image files are skipped with a :class:`SkippedInputWarning`).

    Returns:
        ``(files, images)``: the R reference files in order and R ``(H_r, W_r, 3)`` uint8 RGB arrays.

    Raises:
        PredictInputError: a path does not exist, a file is not an image file or cannot be decoded
            (every reference must decode, in a folder too: a silently smaller reference set would move
            the presence gate), or no reference image is found; the message names the file.
    """
    files, _ = list_queries(paths, "reference")
    images = []
    for f in files:
        try:
            images.append(read_image(f))
        except (UnidentifiedImageError, OSError) as exc:
            raise PredictInputError(f"reference {f}: not a decodable image ({exc}); give defect-free images of the "
                                    "queries' surface (PNG, JPEG, BMP or TIFF), or remove it") from None
    return files, images
