"""Probe (issue 11/12, seventh session): do native-resolution windows help a model on the *selection* side?

For each fold, the selection episodes of the held-out training materials (as ``pipeline.bench.support_ablation``
draws them: ``validation_episodes(..., seed + 1)``, ``train.val_episodes`` per K) are scored twice with the same
network, ungated, at the images' original resolution (``pipeline.evaluation.scoring.score_episodes``): resized
whole (the usual path) and with SOFS non-resizing switched on (``native_area`` on the network: small support
defects cropped at native resolution, queries in native windows). No test class and no saved test episode is
touched. Usage::

    python bench/probes/native_selection.py [--model lerenet|prototype] [--area 0.01] [-S key=value ...]

Prints one JSON line per fold and K: selection mIoU resized / native and the per-class IoU of both.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from pipeline.bench.support_ablation import _override
from pipeline.checkpoint import build_net
from pipeline.episodes import training_pools, validation_episodes
from pipeline.evaluation.data import FeatureSource, ImageTable, open_store_for
from pipeline.evaluation.scoring import score_episodes
from pipeline.images import load_validated
from pipeline.inference.predictor import Predictor


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="lerenet")
    ap.add_argument("--area", type=float, default=0.01)
    ap.add_argument("--folds", default="0,1,2")
    ap.add_argument("-S", dest="sets", action="append", default=[])
    a = ap.parse_args()
    torch.set_num_threads(1)
    params = _override(Path("params.yaml"), a.sets)
    data_dir = Path(params.data.dir)
    table = ImageTable(load_validated(data_dir), data_dir, params.data.mask_threshold)
    net = build_net(params, a.model).eval()
    predictor = Predictor(net, params.train.image_size, {"model": a.model})  # ungated: no presence_threshold
    src = FeatureSource(predictor, table, open_store_for(params, predictor, data_dir))
    for f in (int(x) for x in a.folds.split(",")):
        train_pools, val_pools = training_pools(params, f)
        for k in (1, 5):
            eps = validation_episodes(val_pools, train_pools, k, params.train.val_episodes, params.train.seed + 1)
            df = pd.DataFrame({"class_name": [e.class_name for e in eps], "support_ids": [list(e.support_ids) for e in eps],
                               "query_id": [e.query_id for e in eps]})
            out = {"fold": f, "k": k, "model": a.model, "sets": a.sets, "area": a.area}
            for mode, area in (("resized", None), ("native", a.area)):
                net.native_area = area
                acc, _ = score_episodes(src, df)
                out[mode] = round(100 * acc.miou(), 2)
                out[f"{mode}_per_class"] = {c: round(100 * v, 1) for c, v in acc.class_iou().items()}
            net.native_area = None
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
