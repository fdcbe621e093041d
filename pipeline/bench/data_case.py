"""Benchmark case ``ingest``: throughput of the real ingest and validate steps in images/s.

Runs :func:`pipeline.ingest.ingest` (copy, decode, sha256, pHash, mask fractions; threads =
CPU cores) and :func:`pipeline.validate.validate` (Great Expectations suite, near-duplicate search,
class counts) on ``data.source`` (``defects12``: 1,567 images) into a fresh temporary data folder
per repeat, with the project's fold table. Figures: images/s of ingest, of validate and of both
(images = manifest rows, defect + defect-free).
"""

from __future__ import annotations

import shutil
import time
from typing import Any

from pipeline.bench import workspace
from pipeline.bench.harness import summarize


def run(ctx: Any) -> dict[str, Any]:
    """Measure ingest and validate (module docstring) with ``ctx`` (:class:`pipeline.bench.runner.Context`)."""
    from pipeline.ingest import ingest
    from pipeline.validate import validate

    s = ctx.settings
    root = ctx.workdir / "ingest"
    over = {"folds": {int(k): list(v) for k, v in ctx.params.folds.items()}}
    pf = workspace.write_params(root / "params.yaml", ctx.source, over)
    params = workspace.load(pf)
    t_ing, t_val, n_img = [], [], 0
    for i in range(s.data_warmup + s.data_repeats):
        data_dir = root / f"data{i}"
        t0 = time.perf_counter()
        manifest = ingest(params, out_dir=data_dir, progress=False)
        t1 = time.perf_counter()
        report = validate(params, data_dir)
        t2 = time.perf_counter()
        shutil.rmtree(data_dir, ignore_errors=True)
        n_img = len(manifest)
        if i >= s.data_warmup:
            t_ing.append(t1 - t0)
            t_val.append(t2 - t1)
    rows = [
        {"label": "ingest: images/s", **summarize([n_img / t for t in t_ing], "images/s").as_dict()},
        {"label": "validate: images/s", **summarize([n_img / t for t in t_val], "images/s").as_dict()},
        {"label": "ingest + validate: images/s",
         **summarize([n_img / (a + b) for a, b in zip(t_ing, t_val)], "images/s").as_dict()},
        {"label": "ingest + validate: seconds", **summarize([a + b for a, b in zip(t_ing, t_val)], "s").as_dict()},
    ]
    info = {"source": str(ctx.source), "images": n_img, "usable_rows": report.get("usable_rows"),
            "warmup_runs": s.data_warmup, "repeats": s.data_repeats}
    return {"rows": rows, "info": info}
