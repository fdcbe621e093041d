"""The serving wire format: base64 image-file bytes <-> arrays, and decoding of a request frame.

Input (a pandas DataFrame, one row per query; ``mlflow.pyfunc.load_model(uri).predict(df)``):

====================  ==========================================================================
column                content
====================  ==========================================================================
``support_images``    list of K base64 strings, each the bytes of an image file (PNG, JPEG, BMP
                      or TIFF -- :data:`ACCEPTED_FORMATS`, nothing else is decoded; gray or RGB)
``support_masks``     list of K base64 strings, each the bytes of a mask image the size of its
                      support image; defect where the 8-bit gray value > 127
``query_image``       one base64 string, the bytes of the query image (any size)
``class``             optional: the name of a stored class (``lerenet classes add``) whose support
                      set the server holds; a row with a class leaves ``support_images`` and
                      ``support_masks`` out (or empty lists, when other rows of a
                      ``dataframe_records`` request carry supports)
``references``        optional: list of R base64 strings, each the bytes of a *defect-free* image of
                      the query's surface (as ``support_images``); the presence gate of a model
                      file calibrated with references (``train.presence_references``) scores the
                      query relative to them, other model files ignore them. Missing, null or an
                      empty list: none. Applies to in-row supports and to a stored class alike.
====================  ==========================================================================

Output (DataFrame, one row per input row, same order):

* ``mask``: base64 PNG, 8-bit gray, at the query's original size, 255 = defect, 0 = background
  (logits bilinearly upsampled to the original size, sigmoid > 0.5);
* ``defect_fraction``: share of predicted defect pixels in [0, 1];
* ``max_score``: largest sigmoid probability in [0, 1] (a crude confidence that any defect is present).

Decoding (:func:`open_b64`) never hands bytes to any other Pillow plugin (no EPS/PostScript, which
Pillow renders with Ghostscript, no GIF, WebP, ...); Pillow's decompression-bomb check
(``Image.MAX_IMAGE_PIXELS``) stays on, and the serving limits (:mod:`pipeline.serving.limits`) are
checked on the headers before any pixel is decoded. Every failure is a :class:`PyfuncInputError`
naming the row and field.

This module is the one place that defines the format; pixels are converted with
:mod:`pipeline.inference.preprocess` (gray replicated to RGB) and PNGs written with
:func:`pipeline.inference.postprocess.png_bytes`.
"""

from __future__ import annotations

import base64
import hashlib
import io
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from pipeline.inference.postprocess import png_bytes
from pipeline.inference.predictor import PredictInputError
from pipeline.inference.preprocess import gray_array, rgb_array

INPUT_COLUMNS = ("support_images", "support_masks", "query_image")
#: the optional column naming a stored class instead of support images (:mod:`pipeline.serving.class_sets`)
CLASS_COLUMN = "class"
#: the optional column of defect-free reference images of the query's surface (the reference presence gate)
REFERENCES_COLUMN = "references"
OUTPUT_COLUMNS = ("mask", "defect_fraction", "max_score")
MASK_THRESHOLD = 127
#: the image formats a request may carry (Pillow format ids); everything else is refused undecoded
ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")


class PyfuncInputError(PredictInputError):
    """The pyfunc input frame is malformed; the message names row and column."""


def encode_png(array: np.ndarray) -> str:
    """Encode an image or mask as base64 PNG text.

    Args:
        array: ``(H, W)`` bool mask (True -> 255), ``(H, W)`` uint8 gray or ``(H, W, 3)`` uint8 RGB.

    Returns:
        ASCII base64 string of a lossless PNG.

    Raises:
        ValueError: other shapes or dtypes.
    """
    return base64.b64encode(png_bytes(array)).decode("ascii")


def open_b64(text: Any, what: str, *, load: bool = True) -> Image.Image:
    """Open base64 image-file bytes with Pillow; ``load=False`` reads the header only (sizes).

    Only :data:`ACCEPTED_FORMATS` are tried, so no other Pillow plugin (EPS, GIF, ...) ever sees the
    bytes; Pillow's decompression-bomb check applies (an image declaring more than
    ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels is refused from its header).

    Raises:
        PyfuncInputError: not a base64 string, not a PNG/JPEG/BMP/TIFF file, a decompression bomb, or
            pixel data that cannot be decoded (``what`` names the row and field).
    """
    if not isinstance(text, (str, bytes)):
        raise PyfuncInputError(f"{what}: expected a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
        raise PyfuncInputError(f"{what}: not valid base64 ({exc}); send the file's bytes base64-encoded "
                               "(standard alphabet, no line breaks)") from None
    if not raw:
        raise PyfuncInputError(f"{what}: empty payload; send a PNG, JPEG, BMP or TIFF file base64-encoded")
    try:
        im = Image.open(io.BytesIO(raw), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise PyfuncInputError(f"{what}: refused as a possible decompression bomb ({exc}); "
                               "send a smaller image (serving limits: docs/inference.md)") from None
    except UnidentifiedImageError:
        raise PyfuncInputError(f"{what}: not a PNG, JPEG, BMP or TIFF file (it starts with {raw[:8]!r}); other "
                               "formats (EPS/PostScript, GIF, WebP, ...) are not decoded: convert it to PNG") from None
    except Exception as exc:  # a recognised header that is damaged (Pillow raises several types)
        raise PyfuncInputError(f"{what}: the image header cannot be read ({exc}); send a complete PNG, JPEG, "
                               "BMP or TIFF file") from None
    if load:
        try:
            im.load()
        except Exception as exc:  # truncated or corrupt pixel data
            im.close()
            raise PyfuncInputError(f"{what}: the {im.format} pixel data cannot be decoded ({exc}); the file is "
                                   "truncated or corrupt: send it again") from None
    return im


def decode_image(text: str, what: str = "image") -> np.ndarray:
    """Decode base64 image-file bytes to ``(H, W, 3)`` uint8 RGB (gray replicated to 3 channels).

    Raises:
        PyfuncInputError: not base64, or not an image Pillow can decode (``what`` names the field).
    """
    return rgb_array(open_b64(text, what))


def decode_mask(text: str, what: str = "mask", threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """Decode base64 mask-file bytes to ``(H, W)`` bool: defect where 8-bit gray value > ``threshold``.

    Raises:
        PyfuncInputError: as :func:`decode_image`.
    """
    return gray_array(open_b64(text, what)) > threshold


def payload_list(value: Any, what: str) -> list:
    """The base64 strings of a list column cell (a lone string counts as a list of one; a missing
    cell -- ``None`` or NaN, as pandas fills a column absent from some records -- as an empty list).

    Raises:
        PyfuncInputError: the cell is neither a string nor a list (``what`` names row and column).
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, np.ndarray, pd.Series)):
        return list(value)
    raise PyfuncInputError(f"{what}: expected a list of base64 strings, got {type(value).__name__}")


def row_class(row: dict[str, Any], r: int) -> str | None:
    """The class name a row asks for, or ``None`` when it carries its own supports (no ``class`` column,
    or a null / NaN / empty cell).

    Raises:
        PyfuncInputError: a class cell that is not a string, or a row with both a class and supports.
    """
    value = row.get(CLASS_COLUMN)
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)) or \
            (isinstance(value, str) and not value):
        return None
    if not isinstance(value, str):
        raise PyfuncInputError(f"row {r}, {CLASS_COLUMN}: expected a class name (string), got {type(value).__name__}")
    for col in ("support_images", "support_masks"):
        if payload_list(row.get(col), f"row {r}, {col}"):
            raise PyfuncInputError(f"row {r}: both {CLASS_COLUMN} {value!r} and {col}; send either a class name "
                                   "or support images and masks")
    return value


def input_rows(frame: Any) -> list[dict[str, Any]]:
    """The rows of a request frame as dicts (``class`` is a Python keyword, so no ``itertuples``).

    Raises:
        PyfuncInputError: no ``query_image`` column, or neither the support columns nor ``class``.
    """
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    cols = set(frame.columns)
    missing = [c for c in INPUT_COLUMNS if c not in cols]
    if "query_image" in missing or (missing and CLASS_COLUMN not in cols):
        raise PyfuncInputError(f"input is missing column(s) {missing}; expected {list(INPUT_COLUMNS)}, or "
                               f"{[CLASS_COLUMN, 'query_image']} for a stored class")
    return frame.to_dict("records")


class ParsedRow(NamedTuple):
    """One decoded request row (:func:`parse_rows`).

    Attributes:
        name: the stored class it names, or ``None``.
        supports: ``(images, masks)``: K ``(h, w, 3)`` uint8 and K ``(h, w)`` bool, or ``None`` with a class.
        query: ``(H, W, 3)`` uint8.
        references: R ``(H_r, W_r, 3)`` uint8 defect-free images, or ``None`` (none sent).
        references_key: identity of the row's reference payloads (sha256 of the base64 strings; rows with equal
            keys sent the same references), ``None`` without references.
    """

    name: str | None
    supports: tuple[list[np.ndarray], list[np.ndarray]] | None
    query: np.ndarray
    references: list[np.ndarray] | None = None
    references_key: str | None = None


def parse_rows(frame: pd.DataFrame) -> list[ParsedRow]:
    """Decode a request frame whose rows name a stored class or carry supports, each with optional references.

    A row with a class has ``None`` supports (the server looks them up); otherwise as :func:`parse_input`.

    Raises:
        PyfuncInputError: as :func:`parse_input`, :func:`row_class` and :func:`row_references`.
    """
    out = []
    for r, row in enumerate(input_rows(frame)):
        name = row_class(row, r)
        query = decode_image(row["query_image"], f"row {r}, query_image")
        supports = None if name else _supports(row, r)
        out.append(ParsedRow(name, supports, query, *row_references(row, r)))
    return out


def row_references(row: dict[str, Any], r: int) -> tuple[list[np.ndarray] | None, str | None]:
    """The decoded reference images of row ``r`` and their key (:class:`ParsedRow`); ``(None, None)`` when the
    row has no ``references`` column, a null cell or an empty list.

    Raises:
        PyfuncInputError: a cell that is not a list of base64 strings, or a payload that is not a decodable
            PNG/JPEG/BMP/TIFF file (names ``row r, references[k]``).
    """
    texts = payload_list(row.get(REFERENCES_COLUMN), f"row {r}, {REFERENCES_COLUMN}")
    if not texts:
        return None, None
    images = [decode_image(t, f"row {r}, {REFERENCES_COLUMN}[{k}]") for k, t in enumerate(texts)]
    digest = hashlib.sha256()
    for t in texts:
        digest.update(t.encode("ascii", "replace") if isinstance(t, str) else t)
        digest.update(b"\n")
    return images, digest.hexdigest()


def _supports(row: dict[str, Any], r: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    imgs = payload_list(row.get("support_images"), f"row {r}, support_images")
    masks = payload_list(row.get("support_masks"), f"row {r}, support_masks")
    if not imgs:
        raise PyfuncInputError(f"row {r}, support_images: at least one support image is required "
                               f"(or name a stored class in column {CLASS_COLUMN!r})")
    if len(imgs) != len(masks):
        raise PyfuncInputError(f"row {r}: {len(imgs)} support_images but {len(masks)} support_masks; "
                               "send one mask per support image, in the same order")
    s_img = [decode_image(t, f"row {r}, support_images[{k}]") for k, t in enumerate(imgs)]
    s_msk = [decode_mask(t, f"row {r}, support_masks[{k}]") for k, t in enumerate(masks)]
    for k, (i, m) in enumerate(zip(s_img, s_msk)):
        if i.shape[:2] != m.shape:
            raise PyfuncInputError(f"row {r}, support_masks[{k}]: mask size {m.shape} != image size {i.shape[:2]}")
    return s_img, s_msk


def parse_input(frame: pd.DataFrame) -> list[tuple[list[np.ndarray], list[np.ndarray], np.ndarray]]:
    """Decode a pyfunc input frame into ``[(support_images, support_masks, query_image), ...]``.

    Each support image is ``(h, w, 3)`` uint8, each support mask ``(h, w)`` bool, the query
    ``(H, W, 3)`` uint8.

    Raises:
        PyfuncInputError: missing column, empty support set, K images vs masks mismatch, a mask whose
            size differs from its image, or an undecodable payload; the message names row and column.
    """
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
    if missing:
        raise PyfuncInputError(f"input is missing column(s) {missing}; expected {list(INPUT_COLUMNS)}")
    return [(*_supports(row, r), decode_image(row["query_image"], f"row {r}, query_image"))
            for r, row in enumerate(frame.to_dict("records"))]


def example_frame(size: int = 32) -> pd.DataFrame:
    """The smallest valid request: one query, one support pair and one reference image, synthetic ``size`` x
    ``size`` gray images (a bright horizontal scratch on a dark surface; the support mask marks it; the
    reference is the bare surface).

    Logged with the pyfunc as its input example (the MLflow UI shows it; ``mlflow models serve``
    callers can copy it) and checked by MLflow at log time by running the model on it.
    """
    surface = np.full((size, size), 60, np.uint8)
    support, query = surface.copy(), surface.copy()
    support[size // 2 - 1:size // 2 + 1, 4:-4] = 220
    query[size // 3:size // 3 + 2, 6:-2] = 220
    mask = support > 127
    return pd.DataFrame({"support_images": [[encode_png(support)]], "support_masks": [[encode_png(mask)]],
                         "query_image": [encode_png(query)], REFERENCES_COLUMN: [[encode_png(surface)]]})
