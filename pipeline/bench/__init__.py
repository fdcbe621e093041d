"""Benchmarks: training throughput, inference latency, pipeline overhead, ingest throughput, memory.

``lerenet bench`` / ``make bench`` -> :func:`pipeline.bench.runner.run_bench`, which prints a table
and writes ``bench/results.json``. Modules: :mod:`~pipeline.bench.harness` (timing, statistics,
peak memory, machine), :mod:`~pipeline.bench.workspace` (throw-away projects on a small copy of
the real data), one module per case (``train_case``, ``infer_case``, ``data_case``,
``overhead_case``), :mod:`~pipeline.bench.plain` (the pipeline as plain Python),
:mod:`~pipeline.bench.runner`, and :mod:`~pipeline.bench.train_speed` (training with and without the
feature cache, ``python -m pipeline.bench.train_speed``). Every benchmark of the project is here;
``lerenet bench-predict`` times the passes of :mod:`~pipeline.bench.infer_case`. The unit tests make no timing assertion: ``tests/test_bench.py``
checks the statistics, the memory sampling and that tiny real cases write valid JSON.
"""
