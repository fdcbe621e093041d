"""Evaluation internals, one concern per module (the DVC stage itself is :mod:`pipeline.evaluate`):

* :mod:`~pipeline.evaluation.data` -- image table (original-size ground truth) and feature source;
* :mod:`~pipeline.evaluation.scoring` -- episodes -> IoU counts, false alarms, latency (via the Predictor);
* :mod:`~pipeline.evaluation.fold` -- one model on one fold (every K and protocol);
* :mod:`~pipeline.evaluation.results` -- typed fold metrics, the schema of ``metrics/fold<f>.json``;
* :mod:`~pipeline.evaluation.tracking` -- MLflow logging of an evaluation;
* :mod:`~pipeline.evaluation.folder` -- any Surface Defects-4i folder, every class novel.
"""
