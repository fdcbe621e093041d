"""Hostile and malformed image payloads for the serving tests (not a test module).

Imported by tests/test_serving_input.py (in-process) and tests/test_serving.py (over HTTP). Every
payload is built from its file format's specification here, so the tests need no fixture files.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
from PIL import Image

#: a valid Encapsulated PostScript file (Pillow's EPS plugin identifies it, and would render it with Ghostscript)
EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n"
       b"newpath 0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n")


def b64(data: bytes) -> str:
    """Base64 text of ``data``, as a request carries it."""
    return base64.b64encode(data).decode("ascii")


def image_file(array: np.ndarray, fmt: str) -> bytes:
    """``array`` (uint8 gray or RGB) saved by Pillow in format ``fmt`` (``"PNG"``, ``"JPEG"``, ``"GIF"``, ...)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def png_8x8() -> bytes:
    """A real 8x8 gray PNG (a diagonal line)."""
    return image_file(np.eye(8, dtype=np.uint8) * 255, "PNG")


def png_with_tail(n_zeros: int) -> bytes:
    """An 8x8 PNG followed by ``n_zeros`` zero bytes: Pillow still decodes it (data after IEND is
    ignored), so only a byte limit refuses it."""
    return png_8x8() + bytes(n_zeros)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A decompression bomb: a ~100-byte PNG whose header declares ``width`` x ``height`` 8-bit gray
    pixels, with one compressed row of zeros as its (truncated) image data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray, deflate, no filter, no interlace
    idat = zlib.compress(bytes(1 + min(width, 1 << 16)), 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def truncated_png() -> bytes:
    """The first half of a 64x64 noise PNG: a valid header, pixel data cut off."""
    data = image_file(np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8), "PNG")
    return data[: len(data) // 2]


def random_bytes(n: int = 4096, seed: int = 0) -> bytes:
    """``n`` pseudo-random bytes (not any image format)."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()
