"""Serving request limits, checked by :func:`check_request_frame` before any image is decoded.

Two passes over the request frame, cheapest first:

1. without decoding anything: the number of rows, of support pairs and reference images per row (and
   that each row has as many masks as images), and the request's **bytes** -- the length of all base64 payloads
   together, against ``max_request_bytes`` (``serve.max_request_bytes`` in ``params.yaml``, stored
   in the logged model's ``model_config``; :data:`DEFAULT_MAX_REQUEST_BYTES` otherwise);
2. from the image headers only (Pillow opens lazily): the pixels of each image and of the request.

So an oversized request is refused without a second copy of its bytes and without decoding its
pixels. Documented in ``docs/inference.md``.
"""

from __future__ import annotations

from typing import Any

from pipeline.inference.predictor import PredictInputError
from pipeline.serving.codec import REFERENCES_COLUMN, PyfuncInputError, input_rows, open_b64, payload_list, row_class

MAX_QUERIES_PER_REQUEST = 32          # rows of the pyfunc input frame
MAX_SUPPORTS_PER_QUERY = 10           # K per row
MAX_REFERENCES_PER_QUERY = 10         # R defect-free reference images per row
MAX_IMAGE_PIXELS = 4096 * 4096        # width * height of any one image or mask
MAX_REQUEST_PIXELS = 64 * 1024 * 1024  # sum of width * height over all images of a request
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024  # base64 text over all images of a request (= params.yaml default)


class RequestTooLargeError(PredictInputError):
    """A serving request exceeds one of the documented limits (``MAX_*`` in this module, ``max_request_bytes``)."""


def check_max_request_bytes(value: Any, where: str = "max_request_bytes") -> int:
    """Return ``value`` if it is a usable byte limit (an integer > 0), else raise naming ``where``.

    Raises:
        ValueError: ``value`` is not a positive integer (``True``, ``"32MiB"``, ``0``, ``1.5``).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{where} must be a positive integer number of bytes (e.g. 33554432 for 32 MiB), "
                         f"got {value!r}")
    return value


def _payloads(frame: Any) -> list[tuple[int, list[tuple[str, Any]]]]:
    """``[(row, [(field name, base64 payload), ...]), ...]``; checks counts and types, decodes nothing."""
    records = input_rows(frame)
    if len(records) > MAX_QUERIES_PER_REQUEST:
        raise RequestTooLargeError(f"request has {len(records)} query rows; the limit is {MAX_QUERIES_PER_REQUEST} "
                                   "per request: split it into several requests")
    rows = []
    for r, row in enumerate(records):
        refs = payload_list(row.get(REFERENCES_COLUMN), f"row {r}, {REFERENCES_COLUMN}")
        if len(refs) > MAX_REFERENCES_PER_QUERY:
            raise RequestTooLargeError(f"row {r}, {REFERENCES_COLUMN}: {len(refs)} items; the limit is "
                                       f"{MAX_REFERENCES_PER_QUERY} reference images per query")
        ref_fields = [(f"row {r}, {REFERENCES_COLUMN}[{k}]", v) for k, v in enumerate(refs)]
        if row_class(row, r) is not None:  # a stored class: only the query (and its references) travel
            fields = [(f"row {r}, query_image", row["query_image"]), *ref_fields]
            _check_strings(fields)
            rows.append((r, fields))
            continue
        imgs = payload_list(row.get("support_images"), f"row {r}, support_images")
        masks = payload_list(row.get("support_masks"), f"row {r}, support_masks")
        for col, vals in (("support_images", imgs), ("support_masks", masks)):
            if len(vals) > MAX_SUPPORTS_PER_QUERY:
                raise RequestTooLargeError(f"row {r}, {col}: {len(vals)} items; the limit is "
                                           f"{MAX_SUPPORTS_PER_QUERY} support pairs per query")
        if not imgs:
            raise PyfuncInputError(f"row {r}, support_images: at least one support image is required "
                                   "(or name a stored class in column 'class')")
        if len(imgs) != len(masks):
            raise PyfuncInputError(f"row {r}: {len(imgs)} support_images but {len(masks)} support_masks; "
                                   "send one mask per support image, in the same order")
        fields = [(f"row {r}, support_images[{k}]", v) for k, v in enumerate(imgs)]
        fields += [(f"row {r}, support_masks[{k}]", v) for k, v in enumerate(masks)]
        fields.append((f"row {r}, query_image", row["query_image"]))
        fields += ref_fields
        _check_strings(fields)
        rows.append((r, fields))
    return rows


def _check_strings(fields: list[tuple[str, Any]]) -> None:
    """Every payload of ``[(field name, payload), ...]`` is a base64 string (``str`` or ``bytes``)."""
    for what, v in fields:
        if not isinstance(v, (str, bytes)):
            raise PyfuncInputError(f"{what}: expected a base64 string, got {type(v).__name__}")


def _pixels(text: Any, what: str) -> int:
    """Pixels (width * height) of a base64 image payload, read from its header only."""
    with open_b64(text, what, load=False) as im:  # lazy: reads the header, not the pixels
        w, h = im.size
    if w * h > MAX_IMAGE_PIXELS:
        raise RequestTooLargeError(f"{what}: image is {w}x{h} = {w * h} pixels, above the limit of "
                                   f"{MAX_IMAGE_PIXELS} pixels per image; downscale it")
    return w * h


def check_request_frame(frame: Any, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
    """Refuse a serving request above the documented limits, before any image is decoded.

    Limits: at most :data:`MAX_QUERIES_PER_REQUEST` rows, :data:`MAX_SUPPORTS_PER_QUERY` support
    pairs and :data:`MAX_REFERENCES_PER_QUERY` reference images per row, ``max_request_bytes`` bytes of
    base64 text over all payloads, then (from the image headers) :data:`MAX_IMAGE_PIXELS` pixels per image
    and :data:`MAX_REQUEST_PIXELS` pixels over all images (supports, masks, queries and references) of the
    request.

    Args:
        frame: the pyfunc input (``pandas.DataFrame`` with ``support_images``, ``support_masks``,
            ``query_image``, and optionally ``class`` -- a row naming a stored class carries only its
            query -- and ``references``; see :mod:`pipeline.serving.codec`).
        max_request_bytes: the byte limit (the served model's ``model_config``).

    Raises:
        RequestTooLargeError: a limit is exceeded (names row, field and limit).
        PyfuncInputError: a missing column, a row without supports or with more or fewer masks than
            images, a payload that is not a base64 string, not a PNG/JPEG/BMP/TIFF file or a
            decompression bomb (names row and field).
    """
    check_max_request_bytes(max_request_bytes)
    rows = _payloads(frame)
    total = 0
    for _, fields in rows:  # pass 1: bytes, nothing decoded
        for what, v in fields:
            total += len(v)
            if total > max_request_bytes:
                raise RequestTooLargeError(
                    f"{what}: the request's base64 image data reaches {total} bytes here ({len(v)} in this "
                    f"field), above the limit of {max_request_bytes} bytes per request; send fewer or smaller images "
                    "per request (PNG rather than BMP/TIFF), or have the server's serve.max_request_bytes raised")
    pixels = 0
    for r, fields in rows:  # pass 2: image headers
        for what, v in fields:
            pixels += _pixels(v, what)
        if pixels > MAX_REQUEST_PIXELS:
            raise RequestTooLargeError(f"request holds more than {MAX_REQUEST_PIXELS} pixels in all (reached at "
                                       f"row {r}); send fewer or smaller images per request")
