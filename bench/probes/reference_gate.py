"""Probe (issue 11): does the reference gate (``train.presence_references``) beat the max-logit gate on held-out
training classes?

Training side only (no test class, no saved test episode). For each fold the magnetic-tile (MT) training classes
are held out as the selection material (the only material with defect-free ``Nd`` images) and the default
LERENet (``params.yaml``, untrained) is scored through the library's own functions:

* references: the fold's R reference images (:func:`pipeline.episodes.reference_images`, as ``train()`` and the
  evaluation draw them: training-side ``Nd``, seed ``split.seed``);
* the held-out classes' other ``Nd`` images split once (seeded) into a calibration half and a check half;
* **calibration** (as :func:`pipeline.training.gate.presence_gate`, at K=1): the K=1 selection episodes (seed
  ``train.seed``) and the calibration half as K=1 queries; the max-logit threshold by
  :func:`pipeline.training.gate.rule_threshold`, the reference threshold by the same rule on the reference score;
* **check**: selection episodes of seed ``train.seed + check_offset`` and the check half as queries (supports
  drawn with that seed), at K=1 and K=5, each gate used with its K=1 threshold (as the model file does).

Variants of the reference level (not in the library; for the next choice): ``--ref-steps N`` scores the
references with N test-time refinement steps instead of the model's (0: the support fit alone, cheaper);
``--aggregate mean``: the mean of the references' max log-odds instead of the highest (both stand-ins ignore
``train.presence_reference_area``, which the library's own path measures: ``-S train.presence_reference_area=c``).
``--ref-negatives`` (tenth session): every forward pass, queries' and references' alike, gets the material's
reference images appended to its support as shots with an empty mask, i.e. as extra background cells of the
per-episode probe (a stand-in wrapped around ``net.forward_features``; every probe episode is magnetic tile).

Usage (``--refs`` R, default ``train.presence_references`` or 3)::

    python bench/probes/reference_gate.py [--refs 3] [--folds 0,1,2] [--check-offset 1] [--ref-steps N]
        [--aggregate max|mean] [-S key=value ...]

Prints one JSON line per gate and K: gated mIoU (at ``S x S``) and the share of check defect-free images flagged.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

import pipeline.episodes as episodes_mod
import pipeline.training.gate as gate_mod
from shot_gate import normal_eps  # noqa: E402 -- run as a script: bench/probes is on sys.path
from pipeline.bench.support_ablation import _override
from pipeline.checkpoint import build_net
from pipeline.episodes import Episode, material, reference_images, training_pools, validation_episodes
from pipeline.evaluation.data import open_store_for
from pipeline.inference.predictor import Predictor
from pipeline.training.gate import QueryScore, gated_miou, query_scores, rule_threshold


def check(scores: list[QueryScore], normals: list[QueryScore], tau: float | None, by_reference: bool):
    """Gated mIoU (points) of the check queries and share (%) of the check defect-free images flagged."""
    def kept(s: QueryScore) -> bool:
        x = s.log_odds - s.level if by_reference else s.score
        return tau is None or x >= tau
    on = [QueryScore(s.class_name, 1.0 if kept(s) else 0.0, s.inter, s.union, s.truth) for s in scores]
    flagged = [s.score > 0 and kept(s) for s in normals]
    return round(100 * gated_miou(on, 0.5), 2), round(100 * float(np.mean(flagged)), 1)


def variant_levels(steps, aggregate):
    """A stand-in for :func:`pipeline.inference.gate.reference_levels`: the references scored with ``steps``
    refinement steps (None: the model's), aggregated by ``max`` or ``mean`` of their max log-odds."""
    @torch.inference_mode()
    def levels(net, support_feats, support_masks, reference_feats, area=0.0):
        before = net.transductive_steps
        net.transductive_steps = before if steps is None else steps
        try:
            per = []
            for r in range(reference_feats.shape[0]):
                ref = reference_feats[r:r + 1].expand(support_feats.shape[0], *reference_feats.shape[1:])
                g = net.forward_features(support_feats, support_masks, ref, tuple(ref.shape[-2:])).float()
                per.append(net.presence_log_odds(g.amax(dim=(1, 2, 3))).cpu())
        finally:
            net.transductive_steps = before
        stack = torch.stack(per)
        return stack.amax(0) if aggregate == "max" else stack.mean(0)
    return levels


def negatives_forward(forward, ref_feats):
    """``net.forward_features`` with ``ref_feats (R, Cb, h, w)`` appended to every support as empty-mask shots."""
    def run(support_feats, support_masks, query_feats, out_size):
        b = support_feats.shape[0]
        extra = ref_feats[None].expand(b, *ref_feats.shape).to(support_feats)
        empty = support_masks.new_zeros(b, ref_feats.shape[0], *support_masks.shape[2:])
        return forward(torch.cat([support_feats, extra], 1), torch.cat([support_masks, empty], 1), query_feats,
                       out_size)
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refs", type=int, default=None)
    ap.add_argument("--folds", default="0,1,2")
    ap.add_argument("--check-offset", type=int, default=1, help="check episodes drawn with seed train.seed + this")
    ap.add_argument("--ref-steps", type=int, default=None)
    ap.add_argument("--aggregate", choices=("max", "mean"), default="max")
    ap.add_argument("--ref-negatives", action="store_true")
    ap.add_argument("-S", dest="sets", action="append", default=[])
    a = ap.parse_args()
    torch.set_num_threads(1)
    params = _override(Path("params.yaml"), a.sets)
    t = params.train
    r_count = a.refs or t.presence_references or 3
    net = build_net(params, "lerenet").eval()
    if a.ref_steps is not None or a.aggregate != "max":
        gate_mod.reference_levels = variant_levels(a.ref_steps, a.aggregate)
    store = open_store_for(params, Predictor(net, t.image_size, {"model": "lerenet"}), Path(params.data.dir))
    episodes_mod.selection_material = lambda classes, seed, fold: [c for c in sorted(classes) if material(c) == "MT"]
    results: dict[tuple[str, int], list] = {}
    plain_forward = net.forward_features
    for f in (int(x) for x in a.folds.split(",")):
        train_pools, val_pools = training_pools(params, f)
        pools = {**train_pools, **val_pools}
        refs = reference_images(params, pools, r_count)
        feats = {m: store.get(ids, 0) for m, ids in refs.items()}
        if a.ref_negatives:
            net.forward_features = negatives_forward(plain_forward, feats["MT"])
        taken = {i for ids in refs.values() for i in ids}
        nd = [e for e in normal_eps(params, pools, sorted(val_pools), 1, 0) if e.query_id not in taken]
        order = np.random.default_rng([t.seed, 31337, f]).permutation(len(nd))
        cal_ids = {nd[int(i)].query_id for i in order[: len(nd) // 2]}
        chk_ids = {e.query_id for e in nd} - cal_ids

        def score(eps: list[Episode]) -> list[QueryScore]:
            return query_scores(net, eps, store=store, references=feats, reference_area=t.presence_reference_area)

        cal_sel = score(validation_episodes(val_pools, train_pools, 1, t.val_episodes, t.seed))
        cal_nor = score([e for e in normal_eps(params, pools, sorted(val_pools), 1, t.seed) if e.query_id in cal_ids])
        tau_max = rule_threshold(cal_sel, cal_nor, t.presence_budget, t.presence_fp)
        tau_ref = rule_threshold([s.by_reference() for s in cal_sel], [s.by_reference() for s in cal_nor],
                                 t.presence_budget, t.presence_fp, [s.score > 0 for s in cal_nor])
        seed = t.seed + a.check_offset
        for k in (1, 5):
            sel = score(validation_episodes(val_pools, train_pools, k, t.val_episodes, seed))
            nor = score([e for e in normal_eps(params, pools, sorted(val_pools), k, seed) if e.query_id in chk_ids])
            for name, tau, by_ref in (("ungated", None, False), ("max", tau_max, False), ("ref", tau_ref, True)):
                results.setdefault((name, k), []).append({"fold": f, "tau": tau, "check": check(sel, nor, tau, by_ref),
                                                          "references": refs, "normals": len(nor)})
    for (name, k), rows in results.items():
        print(json.dumps({"gate": name, "k": k, "refs": r_count, "check_offset": a.check_offset,
                          "reference_area": t.presence_reference_area, "ref_negatives": a.ref_negatives,
                          "ref_steps": a.ref_steps, "aggregate": a.aggregate,
                          "miou_mean": round(float(np.mean([r["check"][0] for r in rows])), 2),
                          "fp_mean": round(float(np.mean([r["check"][1] for r in rows])), 1),
                          "folds": [{k2: v for k2, v in r.items() if k2 != "references"} for r in rows]}), flush=True)


if __name__ == "__main__":
    main()
