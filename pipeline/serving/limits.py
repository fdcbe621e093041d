"""Serving request limits, checked by :func:`check_request_frame` before any image is decoded.

Sizes come from the image headers only (Pillow opens lazily), so an oversized request is refused
without decoding its pixels. Documented in ``docs/inference.md``.
"""

from __future__ import annotations

from typing import Any

from pipeline.inference.predictor import PredictInputError
from pipeline.serving.codec import open_b64

MAX_QUERIES_PER_REQUEST = 32          # rows of the pyfunc input frame
MAX_SUPPORTS_PER_QUERY = 10           # K per row
MAX_IMAGE_PIXELS = 4096 * 4096        # width * height of any one image or mask
MAX_REQUEST_PIXELS = 64 * 1024 * 1024  # sum of width * height over all images of a request


class RequestTooLargeError(PredictInputError):
    """A serving request exceeds one of the documented limits (``MAX_*`` in this module)."""


def _payload_size(text: Any, what: str) -> int:
    """Pixels (width * height) of a base64 image payload, read from its header only."""
    with open_b64(text, what, load=False) as im:  # lazy: reads the header, not the pixels
        w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise RequestTooLargeError(f"{what}: image is {w}x{h} = {w * h} pixels, above the limit of "
                                   f"{MAX_IMAGE_PIXELS} pixels per image; downscale it")
    return w * h


def check_request_frame(frame: Any) -> None:
    """Refuse a serving request above the documented limits, before any image is decoded.

    Limits: at most :data:`MAX_QUERIES_PER_REQUEST` rows, :data:`MAX_SUPPORTS_PER_QUERY` support
    images per row, :data:`MAX_IMAGE_PIXELS` pixels per image and :data:`MAX_REQUEST_PIXELS` pixels
    over all images (supports and queries) of the request.

    Args:
        frame: the pyfunc input (``pandas.DataFrame`` with ``support_images``, ``support_masks``,
            ``query_image``; see :mod:`pipeline.serving.codec`).

    Raises:
        RequestTooLargeError: a limit is exceeded (names row, column and limit).
        PredictInputError: a payload is not base64 or has no readable image header.
    """
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if len(frame) > MAX_QUERIES_PER_REQUEST:
        raise RequestTooLargeError(f"request has {len(frame)} query rows; the limit is {MAX_QUERIES_PER_REQUEST} "
                                   "per request: split it into several requests")
    total = 0
    for r, row in enumerate(frame.to_dict("records")):
        for col in ("support_images", "support_masks"):
            vals = row.get(col)
            vals = [vals] if isinstance(vals, (str, bytes)) else list(vals if vals is not None else [])
            if len(vals) > MAX_SUPPORTS_PER_QUERY:
                raise RequestTooLargeError(f"row {r}, {col}: {len(vals)} items; the limit is "
                                           f"{MAX_SUPPORTS_PER_QUERY} support pairs per query")
            total += sum(_payload_size(v, f"row {r}, {col}[{k}]") for k, v in enumerate(vals))
        if "query_image" in row:
            total += _payload_size(row["query_image"], f"row {r}, query_image")
        if total > MAX_REQUEST_PIXELS:
            raise RequestTooLargeError(f"request holds more than {MAX_REQUEST_PIXELS} pixels in all (reached at "
                                       f"row {r}); send fewer or smaller images per request")
