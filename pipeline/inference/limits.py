"""Bounds on inference parameters, one definition for ``params.yaml`` validation, ``lerenet predict``, the
Predictor and the served pyfunc. No imports: the CLI reads them without loading torch."""

MAX_TRANSDUCTIVE_STEPS = 1000
"""Largest accepted ``transductive_steps`` (test-time refinement steps of the hypercolumn probe per query;
20 cost 1.05x-1.13x a plain prediction, docs/performance.md): a guard against a typo's minutes per query."""
