"""Support-learning ablation (issue 11): one configuration of a model (LERENet unless ``--model``), trained
per fold, scored side by side.

For each fold the configuration (``params.yaml`` + ``-S key=value`` overrides, as ``dvc exp run -S``)
is trained without MLflow into ``bench/support/<name>/fold<f>/`` and scored on

* **selection** (what a default may be chosen on): K=1 and K=5 episodes whose support and query are
  images of the fold's held-out *training* classes (``train.selection_classes``), never a test class;
* **test** (reported only, never selected on): the saved paper-protocol episodes, the same episodes
  with a *mismatched* support (K images of another novel class of the fold, same material first,
  seeded), and the false alarms on the test classes' defect-free images at K=1.

One JSON line per configuration is appended to ``bench/support/runs.jsonl``; ``docs/experiments.md``
is written from it. Usage::

    python -m pipeline.bench.support_ablation NAME [--folds 0,1,2] [-S model.prior_skip=true ...]
    python -m pipeline.bench.support_ablation proto --untrained prototype   # a parameter-free model
    python -m pipeline.bench.support_ablation sofs --model sofs             # another trained model (issue 12)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from pipeline.config import Params, load_params
from pipeline.episodes import (
    material,
    mismatched_validation,
    normal_pools,
    selection_classes,
    training_pools,
    validation_episodes,
)
from pipeline.evaluation.data import FeatureSource, ImageTable, fold_references, open_store_for
from pipeline.evaluation.scoring import false_alarms, score_episodes
from pipeline.images import load_episodes, load_validated
from pipeline.inference.predictor import Predictor

OUT = Path("bench/support")


def _override(params_file: Path, sets: list[str]) -> Params:
    raw = yaml.safe_load(params_file.read_text())
    for item in sets:
        key, _, value = item.partition("=")
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(value)
    tmp = params_file.parent / f".params-{abs(hash(tuple(sets))) % 10**8}.yaml"
    tmp.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        return load_params(tmp)
    finally:
        tmp.unlink()


def mismatched(paper: pd.DataFrame, ids: dict[str, list[str]], seed: int = 2718) -> pd.DataFrame:
    """The paper episodes with each support set replaced by K images of another novel class (same material first)."""
    rng = np.random.default_rng(seed)
    out = paper.copy()
    sups = []
    for c, sup in zip(paper["class_name"], paper["support_ids"]):
        others = [o for o in sorted(ids) if o != c]
        same = [o for o in others if material(o) == material(c)]
        pool = same or others
        o = pool[int(rng.integers(len(pool)))]
        pick = rng.choice(len(ids[o]), size=len(sup), replace=False)
        sups.append([ids[o][int(j)] for j in pick])
    out["support_ids"] = sups
    return out


def _selection_scores(params: Params, fold: int, net: torch.nn.Module, store: Any,
                      src: FeatureSource) -> dict[str, float | None]:
    """mIoU on selection-class episodes (K=1, K=5) and, at K=1, the false alarms on the selection
    classes' defect-free images (supports of the K=1 selection episodes; unseen in training)."""
    from pipeline.training.batches import ImageEpisodes
    from pipeline.training.loop import validate

    train_pools, val_pools = training_pools(params, fold)
    rows = {r["id"]: r for r in load_validated(params.data.dir, kind="defect").to_dict("records")} \
        if store is None else {}

    def score(eps: list[Any]) -> float:  # cached features, or the images (a model the store does not fit)
        data = None if store is not None else ImageEpisodes(params, val_pools, rows, augment=False, episodes=eps)
        return round(100 * validate(net, eps, store=store, dataset=data), 2)

    out: dict[str, float | None] = {}
    for k in (1, 5):
        eps = validation_episodes(val_pools, train_pools, k, params.train.val_episodes, params.train.seed + 1)
        out[f"k{k}"] = score(eps)
        swapped = mismatched_validation(eps, val_pools, train_pools, params.split.mismatched_seed)
        if swapped:
            out[f"mis_k{k}"] = score(swapped)
        if k == 1:
            sets: dict[str, list[list[str]]] = {}
            for e in eps:
                sets.setdefault(e.class_name, []).append(list(e.support_ids))
            normals = normal_pools(params, sets)
            fa = false_alarms(src, sets, {c: list(v) for c, v in normals.items()}) if normals else None
            out["fp_k1"] = None if fa is None else round(100 * fa.image_rate, 1)
    return out


def _gate(params: Params, fold: int, predictor: Predictor) -> dict[str, Any]:
    """The presence gate ``train()`` would store for this network (``train.presence_budget``)."""
    from pipeline.training.gate import presence_gate

    store = open_store_for(params, predictor, Path(params.data.dir))
    return presence_gate(params, predictor.net, training_pools(params, fold), {}, store, torch.device("cpu"))


def score_fold(params: Params, fold: int, predictor: Predictor) -> dict[str, Any]:
    """Selection and test scores of one trained (or parameter-free) network on ``fold``."""
    data_dir = Path(params.data.dir)
    rows = load_validated(data_dir)
    table = ImageTable(rows, data_dir, params.data.mask_threshold)
    test = params.test_classes(fold)
    store = open_store_for(params, predictor, data_dir)
    src = FeatureSource(predictor, table, store)
    res: dict[str, Any] = {"selection": _selection_scores(params, fold, predictor.net, store, src)}
    src.use_references(fold_references(params, fold, predictor))  # test episodes only (selection Nd: no references)
    defect = rows[(rows["kind"] == "defect") & rows["class_name"].isin(test)]
    ids = {c: sorted(p["id"]) for c, p in defect.groupby("class_name")}
    normal = rows[(rows["kind"] == "normal") & rows["class_name"].isin(test)]
    normal_ids = {c: p["id"].tolist() for c, p in normal.groupby("class_name")}
    for k in params.split.shots:
        paper = load_episodes(data_dir, fold, "paper", k).reset_index(drop=True)
        acc, _ = score_episodes(src, paper)
        mis, _ = score_episodes(src, mismatched(paper, ids))
        res[f"k{k}"] = {"paper": round(100 * acc.miou(test), 2), "mismatched": round(100 * mis.miou(test), 2),
                        "per_class": {c: round(100 * v, 1) for c, v in acc.class_iou(test).items()}}
        sets = {c: part["support_ids"].tolist() for c, part in paper.groupby("class_name")}
        fa = false_alarms(src, sets, normal_ids)
        res[f"fp_k{k}"] = None if fa is None else round(100 * fa.image_rate, 1)
    return res


def run(name: str, params: Params, folds: list[int], untrained: str | None, sets: list[str],
        rescore: dict[str, Any] | None = None, model: str = "lerenet") -> dict[str, Any]:
    """Train ``model`` (unless ``untrained``, or ``rescore``: the row of an earlier run whose models are still
    in ``bench/support/<name>/``) and score ``name`` on ``folds``; append the row to ``runs.jsonl``."""
    from pipeline.checkpoint import build_net
    from pipeline.train import train

    row: dict[str, Any] = {"name": name, "model": untrained or model, "sets": sets, "untrained": untrained,
                           "folds": {}}
    if rescore:
        row["rescored"] = True
        row["models_of"] = rescore["models_of"]
    t0 = time.perf_counter()
    for f in folds:
        fold_dir = OUT / (rescore or {}).get("models_of", name) / f"fold{f}"
        if rescore:
            predictor = Predictor.load(fold_dir / "model.pt")
            info = {k: v for k, v in rescore["folds"][str(f)].items()
                    if k in ("best_step", "steps", "best_val", "train_s")}
        elif untrained:
            net = build_net(params, untrained).eval()
            predictor = Predictor(net, params.train.image_size, {"model": untrained})
            info: dict[str, Any] = {}
        else:
            r = train(params, f, model, fold_dir, checkpoint_file=fold_dir / "state.pt",
                      curve_file=fold_dir / "curve.csv", track=False, progress=False)
            predictor = Predictor.load(r.model_path)
            info = {"best_step": r.best_step, "steps": r.steps, "best_val": round(100 * r.best_val_miou, 2),
                    "train_s": r.seconds}
        if "presence_threshold" not in predictor.meta or rescore:  # rescored/untrained: calibrate as train() does
            predictor.meta.update(_gate(params, f, predictor))
        info["presence_threshold"] = predictor.presence_threshold
        row["folds"][f] = {**info, **score_fold(params, f, predictor),
                           "selection_classes": selection_classes(params, f)}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    row["episodes"] = params.train.episodes
    folds_v = list(row["folds"].values())
    def mean(get: Any) -> float | None:  # over the folds that have the figure (no Nd images: None)
        vals = [x for x in (get(v) for v in folds_v) if x is not None]
        return round(float(np.mean(vals)), 2) if vals else None

    row["mean"] = {
        "sel_k1": mean(lambda v: v["selection"]["k1"]), "sel_k5": mean(lambda v: v["selection"]["k5"]),
        "k1": mean(lambda v: v["k1"]["paper"]), "k5": mean(lambda v: v["k5"]["paper"]),
        "mis_k1": mean(lambda v: v["k1"]["mismatched"]), "mis_k5": mean(lambda v: v["k5"]["mismatched"]),
        "fp_k1": mean(lambda v: v["fp_k1"]),
        "sel_fp_k1": mean(lambda v: v["selection"].get("fp_k1")),
        "fp_k5": mean(lambda v: v.get("fp_k5")),
    }
    if all("mis_k1" in v["selection"] for v in folds_v):
        for k in (1, 5):
            row["mean"][f"sel_gain_k{k}"] = round(mean(lambda v: v["selection"][f"k{k}"] - v["selection"][f"mis_k{k}"]), 2)
    row["mean"]["gain_k1"] = round(row["mean"]["k1"] - row["mean"]["mis_k1"], 2)
    OUT.mkdir(parents=True, exist_ok=True)
    with (OUT / "runs.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    return row


def main() -> None:
    """CLI entry (see module docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--folds", default="0,1,2")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--untrained", default=None, help="score a parameter-free model (prototype) or lerenet at init")
    ap.add_argument("--model", default="lerenet", help="the model to train: lerenet | baseline | sofs | jaffnet")
    ap.add_argument("-S", dest="sets", action="append", default=[])
    ap.add_argument("--rescore", action="store_true",
                    help="score the models an earlier run of NAME left in bench/support/NAME/ again (same -S keys)")
    ap.add_argument("--models-of", default=None, metavar="EARLIER",
                    help="with --rescore: the models and -S keys of run EARLIER, plus this call's -S keys, "
                         "scored as a new row NAME (e.g. a post-hoc presence gate)")
    a = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    earlier = None
    if a.rescore:
        rows = [json.loads(line) for line in (OUT / "runs.jsonl").read_text().splitlines() if line.strip()]
        source = a.models_of or a.name
        earlier = {**next(r for r in reversed(rows) if r["name"] == source), "models_of": source}
        a.sets = earlier["sets"] + (a.sets if a.models_of else [])
    params = _override(Path(a.params), a.sets)
    row = run(a.name, params, [int(f) for f in a.folds.split(",")], a.untrained, a.sets, earlier,
              earlier.get("model", "lerenet") if earlier else a.model)
    print(json.dumps(row["mean"]), json.dumps({f: {k: v for k, v in d.items() if k != "per_class"}
                                                 for f, d in row["folds"].items()}))


if __name__ == "__main__":
    main()
