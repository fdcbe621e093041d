"""Selection-side probe of LERENet's training-free start (issue 11): no training, no test classes.

Scores the *untrained* LERENet (``model.prior_skip: true``: the network is the training-free classifier
``model.skip_source`` names) on the K=1 and K=5 selection episodes of each fold's held-out training
classes, and on the same queries with another selection class's supports (support gain). Used to pick
``model/priors.py`` constants (``SELF_MARGIN``, ``RIDGE``) and skip sources before any training run;
the full harness (:mod:`pipeline.bench.support_ablation`) then measures the chosen configurations.

Usage (one JSON spec per configuration; ``S`` = ``-S``-style params overrides, ``C`` = module
constants of ``model.priors`` set before building the network)::

    python -m pipeline.bench.selection_probe '{"S": ["model.skip_source=self+proto"], "C": {"SELF_MARGIN": 0.1}}'

Prints one JSON line per spec: ``sel_k1``, ``sel_k5``, ``mis_k1`` (mean over folds, mIoU %) and the
per-fold values. Reads ``data/`` as left by ``dvc repro split features``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

import model.priors as priors
from pipeline.bench.support_ablation import _override
from pipeline.checkpoint import build_net
from pipeline.episodes import mismatched_validation, training_pools, validation_episodes
from pipeline.evaluation.data import open_store_for
from pipeline.inference.predictor import Predictor
from pipeline.training.loop import validate


def probe(sets: list[str], constants: dict[str, Any], folds: tuple[int, ...] = (0, 1, 2),
          params_file: Path = Path("params.yaml")) -> dict[str, Any]:
    """Selection mIoU (%) of the untrained LERENet under ``sets`` and ``constants`` (see module doc).

    Raises:
        AttributeError: a constant that ``model.priors`` does not define.
    """
    for name, value in constants.items():
        if not hasattr(priors, name):
            raise AttributeError(f"model.priors has no constant {name!r}")
        setattr(priors, name, value)
    params = _override(params_file, ["train.selection_classes=2", "model.prior_skip=true", *sets])
    res: dict[tuple, float] = {}
    for f in folds:
        net = build_net(params, "lerenet").eval()
        store = open_store_for(params, Predictor(net, params.train.image_size, {"model": "lerenet"}),
                               Path(params.data.dir))
        train_pools, val_pools = training_pools(params, f)
        for k in (1, 5):
            eps = validation_episodes(val_pools, train_pools, k, params.train.val_episodes, params.train.seed + 1)
            res[(f, k)] = 100 * validate(net, eps, store=store)
            swapped = mismatched_validation(eps, val_pools, train_pools, params.split.mismatched_seed)
            res[(f, "mis", k)] = 100 * validate(net, swapped, store=store) if swapped else float("nan")
    mean = lambda *key: round(sum(res[(f, *key)] for f in folds) / len(folds), 2)  # noqa: E731
    return {"sel_k1": mean(1), "sel_k5": mean(5), "mis_k1": mean("mis", 1),
            "per_fold_k1": [round(res[(f, 1)], 1) for f in folds],
            "per_fold_k5": [round(res[(f, 5)], 1) for f in folds]}


def main() -> None:
    """CLI entry (see module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+", help='JSON: {"S": [key=value, ...], "C": {CONSTANT: value}}')
    ap.add_argument("--folds", default="0,1,2")
    a = ap.parse_args()
    torch.set_num_threads(1)  # several probes share the machine; one thread is the fast setting under load
    folds = tuple(int(f) for f in a.folds.split(","))
    defaults = {k: getattr(priors, k) for k in ("SELF_MARGIN", "RIDGE")}
    for spec in a.specs:
        d = json.loads(spec)
        t0 = time.perf_counter()
        row = probe(d.get("S", []), {**defaults, **d.get("C", {})}, folds)
        print(json.dumps({**d, **row, "seconds": round(time.perf_counter() - t0)}), flush=True)


if __name__ == "__main__":
    main()
