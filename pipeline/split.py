"""Split step: per fold, the training/validation/test images and the saved test episodes.

For fold ``f`` (``params.folds``):

* test classes = ``folds[f]`` (novel classes); training classes = all other folds;
* validation subset (model selection, never the test classes): ``split.val_fraction`` of each
  training class's usable defect images, at least 1, leaving at least ``max(shots) + 1`` for
  training; drawn with ``numpy.random.default_rng([split.seed, crc32(class name)])`` so a
  class has the same held-out images in every fold where it is a training class and adding
  classes to the fold table does not change existing draws;
* test episodes, saved once so every model is scored on identical episodes (architecture doc):
  - ``paper``: every test image of every test class is the query once, with K distinct
    supports drawn from the same class excluding the query (``default_rng(split.paper_seed)``,
    1334 as in the authors' code);
  - ``standard``: for each seed in ``split.standard_seeds``, ``split.standard_episodes``
    episodes: class uniformly at random, then query and K distinct supports of that class
    (``default_rng(seed)``; ``episode`` counts 0..N-1 within a seed);
  - ``mismatched`` (support-sensitivity control, :func:`mismatched_episodes`): the ``paper`` episodes
    (same ``episode``, ``class_name``, ``query_id``) with the support set replaced by K images of
    *another* test class of the fold -- one of the same material (name prefix up to the first
    ``_``: ``MT_``, ``Steel_``, ``Leather_``) when the fold has one, else any other test class --
    drawn with ``default_rng(split.mismatched_seed)``; column ``support_class`` names it. The
    query's ground truth stays its own mask, so a model that ignores its support scores the same
    as on ``paper`` and ``paper mIoU - mismatched mIoU`` is the support gain. A fold with a single
    test class has no other novel class: its mismatched files are written empty (0 rows).

Only usable defect images (``validated.parquet``, kind ``defect``) enter splits and episodes;
ids are manifest ids (sha256 prefix), so files survive a re-ingest of the same content.
Ids are ordered by class (fold-table order), then id. Identical inputs give byte-identical
files. ``splits/`` and ``episodes/`` are built in a temporary folder and swapped in.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import Params
from pipeline.images import (EPISODES_DIR, SPLITS_DIR, atomic_write_parquet, episodes_path, load_validated,
                             replace_dir)

log = logging.getLogger(__name__)

EPISODE_COLUMNS = ["episode", "seed", "class_name", "support_ids", "query_id"]
#: the ``mismatched`` episode files add the class the supports were drawn from
MISMATCHED_COLUMNS = [*EPISODE_COLUMNS, "support_class"]


class SplitError(ValueError):
    """The validated data cannot be split as configured; the message names the class and the fix."""


def _ids_by_class(validated: pd.DataFrame, classes: list[str]) -> dict[str, list[str]]:
    defect = validated[validated["kind"] == "defect"]
    return {c: sorted(defect.loc[defect["class_name"] == c, "id"].astype(str)) for c in classes}


def class_seed(seed: int, class_name: str) -> list[int]:
    """Seed material for class-level draws: ``[seed, crc32(class_name)]`` (stable across runs)."""
    return [int(seed), zlib.crc32(class_name.encode("utf-8"))]


def holdout(ids: list[str], fraction: float, keep: int, seed: list[int]) -> list[str]:
    """Pick the validation ids of one class.

    Args:
        ids: sorted ids of the class.
        fraction: share to hold out (``split.val_fraction``), rounded, at least 1.
        keep: minimum number that must stay for training (``max(shots) + 1``).
        seed: ``numpy`` seed material.

    Returns:
        Sorted held-out ids (possibly empty if the class is too small to spare one).
    """
    n_val = min(max(1, round(fraction * len(ids))), max(0, len(ids) - keep))
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(np.array(ids, dtype=object), size=n_val, replace=False).tolist()) if n_val else []


def paper_episodes(ids: dict[str, list[str]], shots: int, seed: int) -> pd.DataFrame:
    """Paper protocol: each id of each class (dict order) is the query once, K supports from the
    same class excluding the query. Returns the episode frame (columns ``EPISODE_COLUMNS``)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c, members in ids.items():
        pool_all = np.array(members, dtype=object)
        for q in members:
            pool = pool_all[pool_all != q]
            support = rng.choice(pool, size=shots, replace=False).tolist()
            rows.append((len(rows), seed, c, support, q))
    return pd.DataFrame(rows, columns=EPISODE_COLUMNS)


def standard_episodes(ids: dict[str, list[str]], shots: int, seeds: list[int], n: int) -> pd.DataFrame:
    """Standard protocol: per seed, ``n`` episodes; class uniform over ``ids``' keys, then K+1
    distinct images of it (first = query). Returns the episode frame (``EPISODE_COLUMNS``)."""
    classes = list(ids)
    rows = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        for e in range(n):
            c = classes[int(rng.integers(len(classes)))]
            pick = rng.choice(len(ids[c]), size=shots + 1, replace=False)
            rows.append((e, seed, c, [ids[c][int(i)] for i in pick[1:]], ids[c][int(pick[0])]))
    return pd.DataFrame(rows, columns=EPISODE_COLUMNS)


def material(class_name: str) -> str | None:
    """Material of a class: its name up to and including the first ``_`` (``"MT_Crack"`` -> ``"MT_"``),
    or ``None`` for a name without ``_`` (a material of its own)."""
    head, sep, _ = class_name.partition("_")
    return head + sep if sep and head else None


def mismatch_candidates(test_classes: list[str]) -> dict[str, list[str]]:
    """For each test class, the test classes its mismatched supports may come from.

    The other test classes of the same :func:`material` when there are any, else all other test
    classes (fold-table order); an empty list when the fold has a single test class.
    """
    out = {}
    for c in test_classes:
        others = [o for o in test_classes if o != c]
        same = [o for o in others if material(c) is not None and material(o) == material(c)]
        out[c] = same or others
    return out


def mismatched_episodes(paper: pd.DataFrame, ids: dict[str, list[str]], shots: int, seed: int) -> pd.DataFrame:
    """The ``paper`` episodes with each support set replaced by K images of another test class.

    Args:
        paper: the fold's ``paper`` episode frame for K = ``shots`` (:func:`paper_episodes`).
        ids: usable ids per test class of the fold (the dict :func:`paper_episodes` was given).
        shots: K (every test class has more than K images: :func:`split` checks it).
        seed: ``split.mismatched_seed``; one ``default_rng(seed)`` draws, episode by episode, the
            support class (uniform over :func:`mismatch_candidates`) and then K distinct images of it.

    Returns:
        Columns :data:`MISMATCHED_COLUMNS`: ``episode``, ``class_name`` (the query's class) and
        ``query_id`` as in ``paper``, ``seed`` = ``seed``, the new ``support_ids`` and their
        ``support_class``. Empty (0 rows) when the fold has a single test class.
    """
    candidates = mismatch_candidates(list(ids))
    if not any(candidates.values()):
        return pd.DataFrame({c: pd.Series(dtype=object if c in ("class_name", "support_ids", "query_id",
                                                                "support_class") else "int64")
                             for c in MISMATCHED_COLUMNS})
    rng = np.random.default_rng(seed)
    rows = []
    for ep in paper.itertuples(index=False):
        pool = candidates[ep.class_name]
        other = pool[int(rng.integers(len(pool)))]
        support = rng.choice(np.array(ids[other], dtype=object), size=shots, replace=False).tolist()
        rows.append((int(ep.episode), seed, ep.class_name, support, ep.query_id, other))
    return pd.DataFrame(rows, columns=MISMATCHED_COLUMNS)


def fold_split(params: Params, fold: int, ids: dict[str, list[str]]) -> dict[str, Any]:
    """The split file content of ``fold`` (see module docstring) from usable ids per class."""
    test_classes, train_classes = params.test_classes(fold), params.train_classes(fold)
    keep = max(params.split.shots) + 1
    train, val = [], []
    for c in train_classes:
        held = holdout(ids[c], params.split.val_fraction, keep, class_seed(params.split.seed, c))
        val += held
        held_set = set(held)
        train += [i for i in ids[c] if i not in held_set]
    return {"fold": fold, "test_classes": test_classes, "train_classes": train_classes,
            "train_ids": train, "val_ids": val, "test_ids": [i for c in test_classes for i in ids[c]]}


def split(params: Params, data_dir: Path | None = None) -> dict[str, Any]:
    """Write ``splits/fold<f>.json`` and ``episodes/fold<f>_<protocol>_k<K>.parquet`` for every fold.

    Args:
        params: validated parameters (``folds``, ``split.*``).
        data_dir: data folder holding ``validated.parquet``; default ``params.data.dir``.

    Returns:
        Summary ``{"folds": {f: {"train": n, "val": n, "test": n, "episodes": {"paper_k1": n, ...,
        "mismatched_k1": n, ...}}}}``.

    Raises:
        pipeline.images.DataArtifactError: ``validated.parquet`` missing (validation not run or failed).
        SplitError: a fold-table class has fewer than ``max(shots) + 1`` usable defect images.
    """
    data_dir = Path(data_dir or params.data.dir).resolve()
    validated = load_validated(data_dir)
    ids = _ids_by_class(validated, params.all_classes)
    need = max(params.split.shots) + 1
    short = [f"{c} ({len(v)})" for c, v in ids.items() if len(v) < need]
    if short:
        raise SplitError(f"classes with fewer than {need} usable defect images (K={need - 1} supports + 1 query): "
                         f"{', '.join(short)} in {data_dir / 'validated.parquet'}; add images or lower split.shots")
    stage = data_dir / f".split.tmp-{uuid.uuid4().hex[:8]}"
    summary: dict[str, Any] = {"folds": {}}
    try:
        for fold in sorted(params.folds):
            content = fold_split(params, fold, ids)
            text = json.dumps(content, indent=1) + "\n"
            (stage / SPLITS_DIR).mkdir(parents=True, exist_ok=True)
            (stage / SPLITS_DIR / f"fold{fold}.json").write_text(text)
            test_ids = {c: ids[c] for c in content["test_classes"]}
            counts = {}
            for k in params.split.shots:
                frames = {"paper": paper_episodes(test_ids, k, params.split.paper_seed),
                          "standard": standard_episodes(test_ids, k, params.split.standard_seeds,
                                                        params.split.standard_episodes)}
                frames["mismatched"] = mismatched_episodes(frames["paper"], test_ids, k,
                                                           params.split.mismatched_seed)
                for protocol, frame in frames.items():
                    atomic_write_parquet(episodes_path(stage, fold, protocol, k), frame)
                    counts[f"{protocol}_k{k}"] = len(frame)
            summary["folds"][fold] = {"train": len(content["train_ids"]), "val": len(content["val_ids"]),
                                      "test": len(content["test_ids"]), "episodes": counts}
        for name in (SPLITS_DIR, EPISODES_DIR):
            replace_dir(stage / name, data_dir / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("split written to %s: %s", data_dir, summary)
    return summary
