"""Use cases: the sequences of steps that the CLI and the Prefect flows both run, written once.

* **register-and-gate** (:mod:`~pipeline.usecases.register`) -- :func:`~pipeline.usecases.register.register_production`
  (CV cells of every fold + the production checkpoint -> new registered version, alias ``challenger``)
  then :func:`~pipeline.usecases.register.gate` (promotion gate -> decision record
  ``reports/registry.json`` -> the champion's model card on S3). ``lerenet register`` runs both
  (:func:`~pipeline.usecases.register.register_and_gate`); the training flow runs them as its
  ``register`` and ``promote`` tasks, ``python -m pipeline.bench.plain`` as plain calls.
* **probe-champion** (:mod:`~pipeline.usecases.probe`) -- the deployed model on a new class, before
  retraining (``retrain_on_new_classes``).
* **bench-inference** (:mod:`~pipeline.usecases.bench`) -- queries/s with the support set encoded
  once vs per query (``lerenet bench-predict``), on a registered/checkpointed model or an untrained
  architecture built from ``params.model`` (weights and dilation included).

Callers only schedule (flows) or parse and print (CLI). One module per use case, so that a DVC
stage depends only on the code its use case imports.
"""
