"""Bad REST input, in-process: only PNG/JPEG/BMP/TIFF are decoded, decompression bombs, bad base64,
mask counts and the byte limit are refused with the row and field named, before any pixel is decoded.

The same payloads go over HTTP to the real ``mlflow models serve`` in tests/test_serving.py.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModelContext
from PIL import Image

import pipeline.serving.limits as L
from pipeline.serving.codec import ACCEPTED_FORMATS, PyfuncInputError, decode_image, decode_mask, parse_input
from pipeline.serving.pyfunc import SegmenterPyfunc, log_pyfunc
from _payloads import EPS, b64, image_file, png_8x8, png_declaring, png_with_tail, random_bytes, truncated_png

NOT_ACCEPTED = "not a PNG, JPEG, BMP or TIFF file"


def _frame(query: str, supports: int = 1, masks: int | None = None, rows: int = 1) -> pd.DataFrame:
    img = b64(png_8x8())
    return pd.DataFrame({"support_images": [[img] * supports] * rows,
                         "support_masks": [[img] * (supports if masks is None else masks)] * rows,
                         "query_image": [query] * rows})


@pytest.mark.parametrize("fmt", ACCEPTED_FORMATS)
def test_accepted_formats_decode(fmt):
    gray = np.tile(np.arange(0, 240, 15, dtype=np.uint8), (12, 1))  # 12 x 16, smooth (JPEG is lossy)
    got = decode_image(b64(image_file(gray, fmt)), "query_image")
    assert got.shape == (12, 16, 3)
    assert np.abs(got[:, :, 0].astype(int) - gray).max() <= (8 if fmt == "JPEG" else 0)
    assert decode_mask(b64(image_file(gray, fmt))).shape == (12, 16)


@pytest.mark.parametrize("name, data", [
    ("EPS", EPS),
    ("GIF", image_file(np.zeros((8, 8), np.uint8), "GIF")),
    ("WEBP", image_file(np.zeros((8, 8, 3), np.uint8), "WEBP")),
    ("random bytes", random_bytes()),
], ids=["eps", "gif", "webp", "random"])
def test_other_formats_and_random_bytes_are_refused_undecoded(name, data):
    if name != "random bytes":  # Pillow itself would open it: the restriction is what refuses it
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == name
    with pytest.raises(PyfuncInputError, match=rf"row 0, query_image: {NOT_ACCEPTED} \(it starts with") as err:
        L.check_request_frame(_frame(b64(data)))
    assert repr(data[:8]) in str(err.value) and "convert it to PNG" in str(err.value)
    with pytest.raises(PyfuncInputError, match=NOT_ACCEPTED):
        decode_image(b64(data), "query_image")


def test_bad_base64_and_empty_payload():
    for text in ("***", "iVBORw0KGgo", "iVBO\nRw0K"):  # bad alphabet, bad padding, a line break
        with pytest.raises(PyfuncInputError, match=r"row 0, query_image: not valid base64 .*standard alphabet"):
            L.check_request_frame(_frame(text))
    with pytest.raises(PyfuncInputError, match="row 0, query_image: empty payload"):
        L.check_request_frame(_frame(""))
    with pytest.raises(PyfuncInputError, match=r"row 0, support_images\[0\]: expected a base64 string, got int"):
        L.check_request_frame(pd.DataFrame({"support_images": [[7]], "support_masks": [[b64(png_8x8())]],
                                            "query_image": [b64(png_8x8())]}))


def test_decompression_bombs_are_refused_from_the_header():
    bomb = png_declaring(100_000, 100_000)  # 10^10 pixels in ~100 bytes
    assert len(bomb) < 200
    with pytest.raises(PyfuncInputError, match=r"row 0, query_image: refused as a possible decompression bomb"):
        L.check_request_frame(_frame(b64(bomb)))
    with pytest.raises(PyfuncInputError, match="decompression bomb"):
        decode_image(b64(bomb), "query_image")
    # below Pillow's bomb threshold but above the serving limit: refused by our header check
    with pytest.raises(L.RequestTooLargeError, match=r"row 1, query_image: image is 8192x8192 = 67108864 pixels"):
        L.check_request_frame(pd.concat([_frame(b64(png_8x8())), _frame(b64(png_declaring(8192, 8192)))],
                                        ignore_index=True))
    # a header within the limits whose pixel data is missing: refused when decoding, not a crash
    with pytest.raises(PyfuncInputError, match=r"query_image: the PNG pixel data cannot be decoded .*truncated"):
        parse_input(_frame(b64(truncated_png())))


def test_byte_limit_is_checked_before_anything_is_decoded():
    tail = b64(png_with_tail(3000))  # a valid PNG of ~4 kB as base64
    assert parse_input(_frame(tail))[0][2].shape == (8, 8, 3)
    L.check_request_frame(_frame(tail), max_request_bytes=len(tail) + 2 * len(b64(png_8x8())))
    with pytest.raises(L.RequestTooLargeError, match=r"row 0, query_image: the request's base64 image data reaches "
                                                     rf"\d+ bytes here \({len(tail)} in this field\), above the "
                                                     r"limit of 3000 bytes per request"):
        L.check_request_frame(_frame(tail), max_request_bytes=3000)
    # row 0's query is not even base64: the byte limit (reached in row 1) is checked first, decoding nothing
    two = pd.DataFrame({"support_images": [[b64(png_8x8())]] * 2, "support_masks": [[b64(png_8x8())]] * 2,
                        "query_image": ["***", tail]})
    with pytest.raises(L.RequestTooLargeError, match=r"^row 1, query_image: the request's base64"):
        L.check_request_frame(two, max_request_bytes=3000)
    for bad in (0, -1, True, "32MiB", 1.5):
        with pytest.raises(ValueError, match=r"max_request_bytes must be a positive integer"):
            L.check_request_frame(_frame(tail), max_request_bytes=bad)


def test_mask_count_must_match_support_count():
    with pytest.raises(PyfuncInputError, match=r"row 2: 2 support_images but 1 support_masks; send one mask per "
                                               r"support image, in the same order"):
        L.check_request_frame(pd.concat([_frame(b64(png_8x8()), rows=2), _frame(b64(png_8x8()), 2, 1)],
                                        ignore_index=True))
    with pytest.raises(PyfuncInputError, match=r"row 0, support_images: at least one support image"):
        L.check_request_frame(_frame(b64(png_8x8()), 0, 0))


def test_pyfunc_turns_bad_input_into_http_400_with_the_reason():
    """What the scoring server answers comes from the exception: BAD_REQUEST (HTTP 400) and our message."""
    model = SegmenterPyfunc()  # the checks run before the predictor is used: no checkpoint needed
    cases = {"***": "row 0, query_image: not valid base64", b64(EPS): NOT_ACCEPTED,
             b64(png_declaring(100_000, 100_000)): "decompression bomb"}
    for query, reason in cases.items():
        with pytest.raises(MlflowException) as err:
            model.predict(None, _frame(query))
        assert err.value.error_code == "BAD_REQUEST" and err.value.get_http_status_code() == 400
        assert reason in err.value.message and isinstance(err.value.__cause__, PyfuncInputError)
    with pytest.raises(MlflowException, match="row 0: 1 support_images but 2 support_masks"):
        model.predict(None, _frame(b64(png_8x8()), 1, 2))


def test_byte_limit_comes_from_the_model_config(tmp_path):
    model = SegmenterPyfunc()
    assert model.max_request_bytes == L.DEFAULT_MAX_REQUEST_BYTES == 32 * 1024 * 1024
    for bad in ("1MiB", 0, None):
        with pytest.raises(ValueError, match=r"model_config max_request_bytes \(serve.max_request_bytes, or "
                                             r"SERVING_MODEL_CONFIG when serving\) must be a positive integer"):
            model.load_context(PythonModelContext(artifacts={"checkpoint": str(tmp_path / "unused.pt")},
                                                  model_config={"max_request_bytes": bad}))
    with pytest.raises(ValueError, match="max_request_bytes must be a positive integer"):
        log_pyfunc(tmp_path / "model.pt", max_request_bytes=0)  # refused before anything is logged
