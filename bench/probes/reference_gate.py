"""Probe (issue 11, eighth session): would a few defect-free *reference* images per episode make a better gate?

Plants have defect-free parts in plenty. If each episode came with R defect-free reference images of the surface,
the presence score could be the query's max logit *minus the highest max logit of the references under the same
support*: the support-dependent level of "how a good part scores" (a defect-free tile scores about -6 under a small
support, +10 under a large low-contrast one; ``bench/probes/shot_gate.py``) would cancel out.

Training side only. For each fold the magnetic-tile (MT) training classes are held out as the selection material
(the only material with defect-free images); their ``Nd`` images are split once (seeded) into a reference pool
(a third) and query images (the rest), so that no reference is ever scored as a query. Calibration episodes
(seed ``train.seed``) and check episodes (seed ``train.seed + 1``) as in ``shot_gate.py``; each episode gets R
references drawn from the pool. Both gates are calibrated by the gate's rule (budget 1.0, then the 20 % target) on
the calibration episodes and read on the check episodes: ``max`` (today's score), ``ref`` (max minus the
references' max) and ``refz`` (the same difference in the probe's log-odds, :func:`log_odds`). Usage::

    python bench/probes/reference_gate.py [--refs 3] [--folds 0,1,2] [--check-offset 1] [-S key=value ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

import math

import pipeline.episodes as episodes_mod
from shot_gate import check, normal_eps, scored  # noqa: E402 -- run as a script: bench/probes is on sys.path
from pipeline.bench.support_ablation import _override
from pipeline.checkpoint import build_net
from pipeline.episodes import Episode, material, normal_pools, training_pools, validation_episodes
from pipeline.evaluation.data import open_store_for
from pipeline.inference.predictor import Predictor
from pipeline.training.batches import gather
from pipeline.inference.gate import PresenceGate
from pipeline.training.gate import QueryScore, calibrate, fp_threshold


@torch.inference_mode()
def reference_max(net, store, episodes, refs, k):
    """Per episode: the highest max grid logit of its reference images under its support."""
    out = []
    for first in range(0, len(episodes), 16):
        chunk, rs = episodes[first:first + 16], refs[first:first + 16]
        n = len(chunk)
        b = gather(store, [i for e in chunk for i in e.support_ids], [e.query_id for e in chunk], 0, 0, n, k)
        sf, sm = b["support_feats"], b["support_masks"]
        best = torch.full((n,), -float("inf"))
        for r in range(len(rs[0])):
            qf = store.get([x[r] for x in rs], 0)
            g = net.forward_features(sf, sm, qf, tuple(qf.shape[-2:])).float()
            best = torch.maximum(best, g.flatten(1).amax(1))
        out += best.tolist()
    return out


def log_odds(y: float, scale: float = 10.0) -> float:
    """The probe's logit ``z`` behind an untrained LERENet logit ``y = scale * (2 sigmoid(z) - 1)`` (skip scale 20 x
    the hypercolumn factor 0.5): differences of saturated ``y`` near ``scale`` say little, differences of ``z`` do."""
    u = min(max(y / scale, -1 + 1e-7), 1 - 1e-7)
    return math.log((1 + u) / (1 - u))


def with_ref(rows, ref_max):
    """Add the ``ref`` score (max minus the references' max) and ``refz`` (the same in the probe's log-odds) to
    :func:`scored` rows."""
    for r, m in zip(rows, ref_max):
        q = r["max"]
        r["ref"] = QueryScore(q.class_name, q.score - m, q.inter, q.union, q.truth, q.share)
        r["refz"] = QueryScore(q.class_name, log_odds(q.score) - log_odds(m), q.inter, q.union, q.truth, q.share)
    return rows


def rule(selection, normals, name, budget, target):
    """The gate's rule on score ``name``: the budget on the selection queries, raised to the false-alarm target on
    the defect-free ones, where a query counts as flagged when its max logit is > 0 and its score >= tau."""
    taus = [calibrate(selection, budget)]
    scores = [r[name].score if r["max"].score > 0 else None for r in normals]
    flagged = [x for x in scores if x is not None]
    if flagged:
        off = min(flagged) - 1.0  # shift: flagged-ungated queries > 0, the others -1, for fp_threshold
        tau, _ = fp_threshold([-1.0 if x is None else x - off for x in scores], target)
        taus.append(tau + off if math.isfinite(tau) else None)
    return max((x for x in taus if x is not None), default=None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refs", type=int, default=3)
    ap.add_argument("--folds", default="0,1,2")
    ap.add_argument("--check-offset", type=int, default=1, help="check episodes drawn with seed train.seed + this")
    ap.add_argument("-S", dest="sets", action="append", default=[])
    a = ap.parse_args()
    torch.set_num_threads(1)
    params = _override(Path("params.yaml"), a.sets)
    t = params.train
    net = build_net(params, "lerenet").eval()
    store = open_store_for(params, Predictor(net, t.image_size, {"model": "lerenet"}), Path(params.data.dir))
    episodes_mod.selection_material = lambda classes, seed, fold: [c for c in sorted(classes) if material(c) == "MT"]
    results = {}
    for f in (int(x) for x in a.folds.split(",")):
        train_pools, val_pools = training_pools(params, f)
        pools = {**train_pools, **val_pools}
        mt = sorted(val_pools)
        nd = sorted(i for ids in normal_pools(params, mt).values() for i in ids)
        rng = np.random.default_rng([t.seed, 31337, f])
        nd = [nd[int(i)] for i in rng.permutation(len(nd))]
        ref_pool, query_nd = nd[: len(nd) // 3], set(nd[len(nd) // 3:])
        for k in (1, 5):
            sets = []
            for seed in (t.seed, t.seed + a.check_offset):
                sel = validation_episodes(val_pools, train_pools, k, t.val_episodes, seed)
                nor = [e for e in normal_eps(params, pools, mt, k, seed) if e.query_id in query_nd]
                r_rng = np.random.default_rng([seed, 4242, f, k])
                pair = []
                for eps in (sel, nor):
                    refs = [tuple(ref_pool[int(i)] for i in r_rng.choice(len(ref_pool), a.refs, replace=False))
                            for _ in eps]
                    pair.append(with_ref(scored(net, store, eps, k), reference_max(net, store, eps, refs, k)))
                sets.append(pair)
            (cal, calnor), (chk, chknor) = sets
            for name in ("max", "ref", "refz"):
                gate = PresenceGate(rule([r[name] for r in cal], calnor, name, t.presence_budget, t.presence_fp))
                results.setdefault((name, k), []).append({"fold": f, "tau": gate.threshold,
                                                           "check": check(gate, chk, chknor, name)})
            results.setdefault(("ungated", k), []).append({"fold": f, "check": check(PresenceGate(None), chk, chknor,
                                                                                      "max")})
    for (name, k), rows in results.items():
        print(json.dumps({"gate": name, "k": k, "refs": a.refs,
                          "miou_mean": round(float(np.mean([r["check"][0] for r in rows])), 2),
                          "fp_mean": round(float(np.mean([r["check"][1] for r in rows])), 1), "folds": rows}),
              flush=True)


if __name__ == "__main__":
    main()
