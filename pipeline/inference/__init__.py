"""Inference: the one path from support images + masks + query images to defect masks.

``preprocess`` (pixels -> tensors, the clean ``S x S`` view) -> :class:`~pipeline.inference.predictor.Predictor`
(model resolved once by :mod:`~pipeline.inference.resolve` / :mod:`~pipeline.inference.model_file`;
support set encoded once; batches of queries; logits upsampled to each query's size) ->
``postprocess`` (threshold, components, overlays, PNG). Evaluation, ``lerenet predict``, the served
pyfunc (:mod:`pipeline.serving`) and the benchmarks all call the Predictor.

Self-contained: this package imports only ``model/``, itself and third-party libraries, so the MLflow
pyfunc ships it (with ``model/`` and :mod:`pipeline.serving`) as its code. Import the submodules
directly (``from pipeline.inference.predictor import Predictor``); this ``__init__`` loads nothing.
"""
