"""Probe (issue 11, eighth session): which presence-gate calibration holds up on held-out training materials?

Training side only (no test class, no saved test episode). For each fold, the default LERENet (``params.yaml``,
untrained) is scored on

* **calibration** episodes: ``train.val_episodes`` K-shot episodes of the held-out selection material (seed
  ``train.seed``, as ``pipeline.training.gate.presence_gate`` draws them) and K-shot episodes of the training
  side's defect-free images (each ``Nd`` image the query once, K seeded defect supports of its class; at K=1 the
  gate's own :func:`pipeline.training.gate.normal_episodes`);
* **check** episodes: the selection episodes of ``pipeline.bench.support_ablation`` (seed ``train.seed +
  check_offset``) and the selection classes' defect-free images with supports drawn with the same seed.

Gates compared (each calibrated by the gate's rule, budget then false-alarm target, on calibration episodes):

* ``one@1``: one threshold calibrated at K=1, used at every K (the gate until the eighth session);
* ``one@K``: one threshold calibrated on episodes of the K it is used at;
* ``split@1`` / ``split@K``: :func:`pipeline.training.gate.split_gate`, small supports (mean defect share in
  ``(0, train.presence_small_area]``, default 0.01) calibrated apart from the others;
* ``lower@1``: ``split@1`` whose small side may only lower the threshold: the others keep ``one@1``'s, the small
  supports ``min(one@1, their own)``;
* ``budget@1``: one threshold by the budget rule alone (no false-alarm target), calibrated at K=1: what the
  episodes without reference images would get if the target, measured on another material's defect-free images,
  did not raise their threshold (tenth session);
* ``prom@K`` / ``rel@K``: one threshold on another presence score: the max logit minus the median of the query's
  grid, or minus the mean logit of the support's own defect cells (the support as its own query).

``--all-materials``: instead of the fold's seeded selection material, every material that qualifies
(:func:`pipeline.episodes.selection_material`'s rule) is held out in turn (the network is untrained, so what is
held out changes only the calibration and check episodes); means are over every (fold, material) pair. Usage::

    python bench/probes/shot_gate.py [--folds 0,1,2] [--check-offset 1] [--area 0.01] [--all-materials] [-S key=value ...]

Prints one JSON line per gate and K: gated mIoU (at ``S x S``) and share of defect-free images flagged on the
check episodes, per fold and mean.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.bench.support_ablation import _override
from pipeline.checkpoint import build_net
import pipeline.episodes as episodes_mod
from pipeline.episodes import Episode, material, normal_pools, selection_classes, training_pools, validation_episodes
from pipeline.evaluation.data import open_store_for
from pipeline.inference.gate import PresenceGate, support_shares
from pipeline.inference.predictor import Predictor
from pipeline.training.batches import gather
from pipeline.training.gate import QueryScore, gated_miou, normal_episodes, split_gate


@torch.inference_mode()
def scored(net, store, episodes, k):
    """Per episode: ``{score name: QueryScore}`` (scores ``max``, ``prom``, ``rel``; IoU counts at ``S x S``)."""
    out = []
    for first in range(0, len(episodes), 16):
        chunk = episodes[first:first + 16]
        n = len(chunk)
        b = gather(store, [i for e in chunk for i in e.support_ids], [e.query_id for e in chunk], 0, 0, n, k)
        sf, sm, qf = b["support_feats"], b["support_masks"], b["query_feats"]
        g = net.forward_features(sf, sm, qf, tuple(qf.shape[-2:])).float()
        gs = net.forward_features(sf, sm, sf[:, 0], tuple(qf.shape[-2:])).float()   # first support as its own query
        ms = F.interpolate(sm[:, 0], size=gs.shape[-2:], mode="area") > 0.5
        full = F.interpolate(g, size=b["query_masks"].shape[-2:], mode="bilinear", align_corners=False)
        pred, gt = (full > 0).squeeze(1), b["query_masks"].squeeze(1).bool()
        flat = g.flatten(1)
        top, med = flat.amax(1), flat.median(1).values
        shares = support_shares(sm)
        for j, e in enumerate(chunk):
            ref = gs[j][ms[j]].mean() if bool(ms[j].any()) else gs[j].amax()
            counts = (int((pred[j] & gt[j]).sum()), int((pred[j] | gt[j]).sum()), int(gt[j].sum()))
            out.append({name: QueryScore(e.class_name, float(v), *counts, float(shares[j]))
                        for name, v in (("max", top[j]), ("prom", top[j] - med[j]), ("rel", top[j] - ref))})
    return out


def normal_eps(params, pools, classes, k, seed):
    """Each defect-free image of ``classes`` the query of one K-shot episode, K seeded supports of its class."""
    rng = np.random.default_rng(seed)
    eps = []
    for c, ids in sorted(normal_pools(params, classes).items()):
        pool = pools.get(c)
        if not pool or len(pool) < k:
            continue
        for q in ids:
            pick = rng.choice(len(pool), size=k, replace=False)
            eps.append(Episode(c, tuple(str(pool[int(i)]) for i in pick), q, negative=True))
    return eps


def check(gate: PresenceGate, sel, normals, name):
    """Gated mIoU (points) of the check queries and share (%) of check defect-free images flagged."""
    def taus(rows):
        return [gate.threshold_for(r[name].share) for r in rows]
    on = [QueryScore(r[name].class_name, 1.0 if tau is None or r[name].score >= tau else 0.0, r[name].inter,
                     r[name].union, r[name].truth) for r, tau in zip(sel, taus(sel))]
    flagged = [r["max"].score > 0 and (tau is None or r[name].score >= tau) for r, tau in zip(normals, taus(normals))]
    return round(100 * gated_miou(on, 0.5), 2), (round(100 * float(np.mean(flagged)), 1) if flagged else None)


def nested(split: PresenceGate, cal, nor, t, area) -> PresenceGate:
    """``lower@1``'s small threshold, then the others' raised from ``one@1``'s until the training side's defect-free
    images flagged *in all* are back within ``train.presence_fp`` (the one-threshold gate's promise)."""
    one = split_gate(cal, nor, t.presence_budget, t.presence_fp, None).threshold
    low = split.small_threshold if one is None or split.small_threshold is None else min(one, split.small_threshold)
    if not nor or t.presence_fp is None:
        return PresenceGate(one, low, area)
    probe = PresenceGate(one, low, area)
    small = [x.score for x in nor if probe.is_small(x.share)]
    large = sorted((x.score for x in nor if not probe.is_small(x.share) and x.score > 0), reverse=True)
    used = sum(x > 0 and (low is None or x >= low) for x in small)
    allowed = math.floor(t.presence_fp * len(nor) + 1e-9) - used
    tl = one
    if len(large) > max(allowed, 0):
        need = math.nextafter(large[max(allowed, 0)], math.inf)
        tl = need if tl is None else max(tl, need)
    return PresenceGate(tl, low, area)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folds", default="0,1,2")
    ap.add_argument("--check-offset", type=int, default=1, help="check episodes drawn with seed train.seed + this")
    ap.add_argument("--area", type=float, default=None, help="small-support bound (default train.presence_small_area)")
    ap.add_argument("--all-materials", action="store_true")
    ap.add_argument("-S", dest="sets", action="append", default=[])
    a = ap.parse_args()
    torch.set_num_threads(1)
    params = _override(Path("params.yaml"), a.sets)
    t = params.train
    area = a.area or t.presence_small_area or 0.01
    net = build_net(params, "lerenet").eval()
    store = open_store_for(params, Predictor(net, t.image_size, {"model": "lerenet"}), Path(params.data.dir))
    rows: dict[str, dict[int, list]] = {}
    chosen = episodes_mod.selection_material
    pairs = []
    for f in (int(x) for x in a.folds.split(",")):
        if not a.all_materials:
            pairs.append((f, None))
            continue
        classes = sorted(params.train_classes(f))
        mats = sorted({material(c) for c in classes})
        pairs += [(f, m) for m in mats if sum(material(c) == m for c in classes) >= 2
                  and sum(material(c) != m for c in classes) >= 2]
    for f, mat in pairs:
        episodes_mod.selection_material = chosen if mat is None else (
            lambda classes, seed, fold, m=mat: [c for c in sorted(classes) if material(c) == m])
        train_pools, val_pools = training_pools(params, f)
        pools = {**train_pools, **val_pools}
        sel_cls = selection_classes(params, f)
        sets = {}
        for k in (1, 5):
            sets[k] = [scored(net, store, eps, k) for eps in (
                validation_episodes(val_pools, train_pools, k, t.val_episodes, t.seed),
                normal_episodes(params, (train_pools, val_pools)) if k == 1 else normal_eps(params, pools, pools, k, t.seed),
                validation_episodes(val_pools, train_pools, k, t.val_episodes, t.seed + a.check_offset),
                normal_eps(params, pools, sel_cls, k, t.seed + a.check_offset))]
        for k in (1, 5):
            sel, snor = sets[k][2], sets[k][3]
            for gname, name, cal_k, split in (("one@1", "max", 1, None), ("one@K", "max", k, None),
                                              ("split@1", "max", 1, area), ("split@K", "max", k, area),
                                              ("lower@1", "max", 1, area), ("nested@1", "max", 1, area),
                                              ("prom@K", "prom", k, None), ("rel@K", "rel", k, None),
                                              ("budget@1", "max", 1, None)):
                cal, nor = sets[cal_k][0], sets[cal_k][1]
                gate = split_gate([r[name] for r in cal], [r[name] for r in nor], t.presence_budget,
                                  None if gname == "budget@1" else t.presence_fp, split)
                if gname == "lower@1":
                    one = split_gate([r[name] for r in cal], [r[name] for r in nor], t.presence_budget, t.presence_fp,
                                     None).threshold
                    low = gate.small_threshold if one is None or gate.small_threshold is None else min(one, gate.small_threshold)
                    gate = PresenceGate(one, low, split)
                if gname == "nested@1":
                    gate = nested(gate, [r[name] for r in cal], [r[name] for r in nor], t, split)
                rows.setdefault(gname, {}).setdefault(k, []).append(
                    {"fold": f, "material": mat, "gate": [gate.threshold, gate.small_threshold], "check": check(gate, sel, snor, name)})
            ungated = check(PresenceGate(None), sel, snor, "max")
            rows.setdefault("ungated", {}).setdefault(k, []).append({"fold": f, "material": mat, "check": ungated})
    for gname, by_k in rows.items():
        for k, per_fold in by_k.items():
            miou = [r["check"][0] for r in per_fold]
            fp = [r["check"][1] for r in per_fold if r["check"][1] is not None]
            print(json.dumps({"gate": gname, "k": k, "check_offset": a.check_offset, "miou_mean": round(float(np.mean(miou)), 2),
                              "fp_mean": round(float(np.mean(fp)), 1) if fp else None, "folds": per_fold}), flush=True)


if __name__ == "__main__":
    main()
