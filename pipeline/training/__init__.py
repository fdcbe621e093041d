"""Training internals, one concern per module (the DVC stage itself is :mod:`pipeline.train`):

* :mod:`~pipeline.training.batches` -- episode batches: cached features or images read + augmented;
* :mod:`~pipeline.training.loop` -- optimiser, poly schedule, validation (model selection), the step loop;
* :mod:`~pipeline.training.state` -- progress and the resumable training state (``checkpoints/``);
* :mod:`~pipeline.training.tracking` -- MLflow logging of one training run.
"""
