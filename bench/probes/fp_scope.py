"""Probe (issue 11, tenth session): which defect-free images should raise the max-logit threshold once the
magnetic tiles are gated relative to reference images (``train.presence_fp_scope``)?

Training side only. With references (e30) the episodes of a material with defect-free images are gated by the
reference threshold; the max-logit threshold gates the others (steel, leather: no ``Nd`` in ``defects12``). Its
calibration is emulated as ``pipeline.training.gate.presence_gate`` does it for the untrained default LERENet:
the budget rule on the fold's K=1 selection episodes (the fold's own seeded selection material) and, with scope
``all``, the false-alarm target on the training side's defect-free images (magnetic tiles under magnetic-tile
supports, images the reference gate gates at inference); with scope ``gated``, no target (no defect-free image
of a material without references exists to measure one on). Both thresholds are read on check episodes (seed
``train.seed + check_offset``) of every training-side material other than MT, held out in turn (the network is
untrained: what is held out changes only which episodes are drawn).

Usage::

    python bench/probes/fp_scope.py [--folds 0,1,2] [--check-offset 1] -S data.dir=<data>

Prints one JSON line per scope and K: gated mIoU (at ``S x S``) per (fold, material) and the mean.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import pipeline.episodes as episodes_mod
from shot_gate import check, scored  # noqa: E402 -- run as a script: bench/probes is on sys.path
from pipeline.bench.support_ablation import _override
from pipeline.checkpoint import build_net
from pipeline.episodes import material, training_pools, validation_episodes
from pipeline.evaluation.data import open_store_for
from pipeline.inference.gate import PresenceGate
from pipeline.inference.predictor import Predictor
from pipeline.training.gate import normal_episodes, rule_threshold


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds", default="0,1,2")
    ap.add_argument("--check-offset", type=int, default=1)
    ap.add_argument("-S", dest="sets", action="append", default=[])
    a = ap.parse_args()
    torch.set_num_threads(1)
    params = _override(Path("params.yaml"), a.sets)
    t = params.train
    net = build_net(params, "lerenet").eval()
    store = open_store_for(params, Predictor(net, t.image_size, {"model": "lerenet"}), Path(params.data.dir))
    chosen = episodes_mod.selection_material
    rows: dict[tuple[str, int], list] = {}
    for f in (int(x) for x in a.folds.split(",")):
        episodes_mod.selection_material = chosen
        train_pools, val_pools = training_pools(params, f)
        cal = [r["max"] for r in scored(net, store, validation_episodes(val_pools, train_pools, 1, t.val_episodes,
                                                                        t.seed), 1)]
        nor = [r["max"] for r in scored(net, store, normal_episodes(params, (train_pools, val_pools)), 1)]
        taus = {"all": rule_threshold(cal, nor, t.presence_budget, t.presence_fp),
                "gated": rule_threshold(cal, [], t.presence_budget, None)}
        classes = sorted(params.train_classes(f))
        for m in sorted({material(c) for c in classes} - {"MT"}):
            if sum(material(c) == m for c in classes) < 2:
                continue
            episodes_mod.selection_material = lambda cls, seed, fold, m=m: [c for c in sorted(cls) if material(c) == m]
            tp, vp = training_pools(params, f)
            for k in (1, 5):
                sel = scored(net, store, validation_episodes(vp, tp, k, t.val_episodes, t.seed + a.check_offset), k)
                for scope, tau in (*taus.items(), ("ungated", None)):
                    miou, _ = check(PresenceGate(tau), sel, [], "max")
                    rows.setdefault((scope, k), []).append({"fold": f, "material": m, "tau": tau, "miou": miou})
    episodes_mod.selection_material = chosen
    for (scope, k), per in rows.items():
        print(json.dumps({"scope": scope, "k": k, "check_offset": a.check_offset,
                          "miou_mean": round(float(np.mean([r["miou"] for r in per])), 2), "pairs": per}), flush=True)


if __name__ == "__main__":
    main()
