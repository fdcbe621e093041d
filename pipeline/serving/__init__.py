"""Serving the champion over REST: the MLflow pyfunc and its request handling.

* :mod:`~pipeline.serving.codec` -- the wire format: base64 image bytes <-> arrays, request frame decoding;
* :mod:`~pipeline.serving.limits` -- request size limits, checked from image headers before decoding;
* :mod:`~pipeline.serving.pyfunc` -- the ``PythonModel`` (a :class:`pipeline.inference.predictor.Predictor`
  per loaded model) and :func:`~pipeline.serving.pyfunc.log_pyfunc`.

Serving imports :mod:`pipeline.inference`, never the reverse; both are shipped with the logged model.
"""
