"""Episodic sampling from a fold's training classes (training and model-selection episodes).

An *episode* is one support set of ``K`` images (with masks) and one query image of the same
class. Training episodes are drawn from the fold's ``train_ids``; validation (model selection)
episodes take their query from the fold's ``val_ids`` (held-out images of the *training*
classes, never the test classes). The saved *test* episodes are the split stage's job
(``data/episodes/``), not this module's.

Determinism: episode ``i`` of a run is a pure function of ``(seed, i)`` (NumPy
``default_rng([seed, i])``), so an interrupted run resumed at step ``s`` draws exactly the
episodes an uninterrupted run would have drawn, whatever the data-loader workers do.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import logging

import numpy as np
import pandas as pd

from pipeline.config import Params
from pipeline.images import load_split, load_validated

log = logging.getLogger(__name__)

Pools = dict[str, list[str]]
"""class name -> sorted list of manifest ids."""


@dataclass(frozen=True)
class Episode:
    """One episode: ``K`` support ids of ``class_name`` and one query id.

    ``negative``: the query holds none of the support's defect (an image of another class or a
    defect-free image), so its target is empty; otherwise the query is of ``class_name`` too.
    """

    class_name: str
    support_ids: tuple[str, ...]
    query_id: str
    negative: bool = False


def material(class_name: str) -> str:
    """The material of a Surface Defects-4i class: the prefix before the first ``_`` (``MT_Crack`` -> ``MT``)."""
    return class_name.split("_", 1)[0]


def selection_classes(params: Params, fold: int | None) -> list[str]:
    """Whole training classes held out of training for model selection (``train.selection_classes``).

    Deterministic in ``(split.seed, fold)``: the fold's training classes are shuffled, then taken
    one per material in turn (so the held-out classes differ in material where possible). Never a
    test class of ``fold``. Empty when ``train.selection_classes`` is 0.

    With ``train.selection_material`` (and ``selection_classes > 0``), every training class of one
    *material* is held out instead (:func:`selection_material`): selection then scores what training
    does for a surface the network never trained on, as a plant's new material will be.

    With fewer than ``2 * selection_classes`` training classes (a small project), holding whole
    classes out would leave too little to train on: a warning says so and selection falls back to
    held-out images of the training classes (empty result).
    """
    n = params.train.selection_classes
    classes = sorted(params.train_classes(fold))
    if n == 0:
        return []
    if params.train.selection_material:
        held = selection_material(classes, params.split.seed, fold)
        if held:
            return held
        log.warning("fold %s: no material of the training classes has 2+ classes with 2+ classes of other "
                    "materials left to train on; holding out %d classes instead (train.selection_material)", fold, n)
    if len(classes) < 2 * n:
        log.warning("fold %s has %d training classes: too few to hold out train.selection_classes=%d whole classes "
                    "for model selection; selecting on held-out images of the training classes instead", fold,
                    len(classes), n)
        return []
    rng = np.random.default_rng([int(params.split.seed), 104729, 1000 if fold is None else int(fold)])
    order = [classes[int(i)] for i in rng.permutation(len(classes))]
    picked: list[str] = []
    while len(picked) < n:
        used = {material(c) for c in picked}
        fresh = [c for c in order if c not in picked and material(c) not in used]
        picked.append((fresh or [c for c in order if c not in picked])[0])
    return sorted(picked)


def selection_material(classes: Sequence[str], seed: int, fold: int | None) -> list[str]:
    """Every class of one material (:func:`material`) of ``classes``: leave-one-material-out selection.

    A material qualifies when it has at least 2 classes here (so that selection can also swap supports
    between held-out classes and is not one class's noise) and its removal leaves at least 2 classes of
    other materials to train on. The qualifying materials are shuffled with ``seed`` and fold ``f`` takes
    the ``f``-th (modulo their number), so that over a benchmark's folds the materials take turns;
    ``fold=None`` (the production model) takes one by the seed. Returns the sorted held-out classes, or
    ``[]`` when none qualifies (e.g. a single-material project: nothing to hold out that training has not
    seen).
    """
    by_mat: dict[str, list[str]] = {}
    for c in sorted(classes):
        by_mat.setdefault(material(c), []).append(c)
    mats = [m for m in sorted(by_mat) if len(by_mat[m]) >= 2 and len(classes) - len(by_mat[m]) >= 2]
    if not mats:
        return []
    rng = np.random.default_rng([int(seed), 7919])
    order = [mats[int(i)] for i in rng.permutation(len(mats))]
    pick = order[int(rng.integers(len(order))) if fold is None else int(fold) % len(order)]
    return by_mat[pick]


def class_pools(rows: pd.DataFrame, ids: Iterable[str] | None = None) -> Pools:
    """Group manifest ids by class.

    Args:
        rows: manifest/validated rows with columns ``id`` and ``class_name``.
        ids: keep only these ids (default: all rows).

    Returns:
        ``{class_name: sorted ids}`` with classes in sorted order.

    Raises:
        KeyError: an id in ``ids`` is not in ``rows`` (names up to 5 of them: the split file and
            validated.parquet are out of sync, re-run ``dvc repro split``).
    """
    cls = dict(zip(rows["id"], rows["class_name"]))
    ids = list(rows["id"]) if ids is None else list(ids)
    missing = [i for i in ids if i not in cls]
    if missing:
        raise KeyError(f"{len(missing)} split id(s) not in validated.parquet, e.g. {missing[:5]}; "
                       "the split is stale: re-run `dvc repro split`")
    pools: Pools = {}
    for i in ids:
        pools.setdefault(cls[i], []).append(i)
    return {c: sorted(pools[c]) for c in sorted(pools)}


def holdout_pools(params: Params, pools: Mapping[str, Sequence[str]]) -> tuple[Pools, Pools]:
    """Split each class's ids into (train, val) exactly as the split stage holds out a fold's
    validation images (``pipeline.split.holdout`` with ``split.val_fraction`` and the class seed).

    Used for the production model (``fold=None``, all classes), which has no split file.
    """
    from pipeline.split import class_seed, holdout

    keep = max(params.split.shots) + 1
    train: Pools = {}
    val: Pools = {}
    for c in sorted(pools):
        ids = sorted(pools[c])
        held = holdout(ids, params.split.val_fraction, keep, class_seed(params.split.seed, c))
        held_set = set(held)
        train[c] = [i for i in ids if i not in held_set]
        if held:
            val[c] = sorted(held)
    return train, val


def training_pools(params: Params, fold: int | None) -> tuple[Pools, Pools]:
    """Training and validation pools of a fold (defect images of its training classes only).

    ``fold=None`` (production model): every class; validation ids are a per-class hold-out of
    ``params.split.val_fraction`` drawn with ``params.split.seed``.

    Raises:
        DataArtifactError: validated.parquet or the fold's split file is missing.
        ValueError: the split lists a test class among its training ids (a leak).
    """
    rows = load_validated(params.data.dir, kind="defect")
    if fold is None:
        train, val = holdout_pools(params, class_pools(rows))
    else:
        split = load_split(params.data.dir, fold)
        train, val = class_pools(rows, split["train_ids"]), class_pools(rows, split["val_ids"])
        leak = (set(train) | set(val)) & set(split["test_classes"])
        if leak:
            raise ValueError(f"data/splits/fold{fold}.json: test class(es) {sorted(leak)} appear in train/val ids; "
                             "re-run `dvc repro split`")
    held = selection_classes(params, fold)
    if not held:
        return train, val
    # selection on held-out *classes*: they leave training entirely; the others train on all their images
    pools = {c: sorted([*train.get(c, []), *val.get(c, [])]) for c in sorted(set(train) | set(val))}
    return ({c: v for c, v in pools.items() if c not in held}, {c: v for c, v in pools.items() if c in held})


def normal_pools(params: Params, classes: Iterable[str]) -> Pools:
    """Defect-free (``normal``) image ids of ``classes`` (negative training queries), by class."""
    rows = load_validated(params.data.dir, kind="normal")
    wanted = set(classes)
    return class_pools(rows[rows["class_name"].isin(wanted)]) if len(rows) else {}


#: salt of the reference images' draw (:func:`reference_images`), beside ``split.seed``
REFERENCE_SALT = 4242


def reference_images(params: Params, classes: Iterable[str], count: int) -> dict[str, list[str]]:
    """The fold's defect-free reference images, by material: ``count`` ``Nd`` ids drawn once (seed
    ``split.seed``) from the defect-free images of ``classes`` of that material (the fold's *training-side*
    classes: never a test class's images). The same images calibrate the reference gate at training
    (:func:`pipeline.training.gate.presence_gate`) and go with every episode of that material at evaluation,
    as a plant would keep R good parts of each surface beside the line.

    Args:
        classes: the classes whose ``Nd`` images may serve. count: R, >= 1.

    Returns:
        ``{material: [R ids]}`` for each material with at least ``count`` defect-free images; ``{}`` for none.
    """
    return draw_references(normal_pools(params, classes), count, params.split.seed)


def draw_references(normals: Mapping[str, Iterable[str]], count: int, seed: int,
                    spare: int = 0) -> dict[str, list[str]]:
    """The draw behind every set of reference images (:func:`reference_images`,
    :func:`pipeline.evaluation.folder.folder_references`): the defect-free ids of ``normals`` (by class) pooled by
    material, sorted, and ``count`` of them taken by ``numpy.random.default_rng([seed, REFERENCE_SALT])``.

    Args:
        normals: defect-free image ids by class. count: R, >= 1. seed: the draw's seed.
        spare: ids a material must have beyond ``count`` to get references (1: one is left for other uses).

    Returns:
        ``{material: [count ids]}`` for each material with at least ``count + spare`` ids; ``{}`` for none.
    """
    by_material: dict[str, list[str]] = {}
    for c, ids in sorted(normals.items()):
        by_material.setdefault(material(c), []).extend(ids)
    out = {}
    for m, ids in sorted(by_material.items()):
        ids = sorted(ids)
        if len(ids) >= count + spare:
            rng = np.random.default_rng([seed, REFERENCE_SALT])
            out[m] = [ids[int(i)] for i in rng.permutation(len(ids))[:count]]
    return out


def draw_episode(pools: Mapping[str, Sequence[str]], shots: int, rng: np.random.Generator,
                 negative_share: float = 0.0, normals: Mapping[str, Sequence[str]] | None = None) -> Episode:
    """A training episode (:func:`sample_episode`), turned negative with probability ``negative_share``.

    A negative episode keeps its support and replaces the query: with probability 1/2 a
    defect-free image of the support's material (when ``normals`` has one), else a defect image
    of another class, of the same material when one exists (e.g. an ``MT_Crack`` query for an
    ``MT_Break`` support): the support must say which defect to segment. With
    ``negative_share == 0`` the RNG is consumed exactly as by :func:`sample_episode`.
    """
    ep = sample_episode(pools, shots, rng)
    if negative_share <= 0 or rng.random() >= negative_share:
        return ep
    mat = material(ep.class_name)
    normal_ids = [i for c in sorted(normals or {}) if material(c) == mat for i in (normals or {})[c]]
    if normal_ids and rng.random() < 0.5:
        return Episode(ep.class_name, ep.support_ids, normal_ids[int(rng.integers(len(normal_ids)))], True)
    others = [c for c in sorted(pools) if c != ep.class_name and pools[c]]
    if not others:
        return ep
    same = [c for c in others if material(c) == mat]
    c = (same or others)[int(rng.integers(len(same or others)))]
    return Episode(ep.class_name, ep.support_ids, pools[c][int(rng.integers(len(pools[c])))], True)


def episode_rng(seed: int, index: int) -> np.random.Generator:
    """The RNG of episode ``index`` of a run seeded ``seed`` (both ints >= 0)."""
    return np.random.default_rng([int(seed), int(index)])


def sample_episode(pools: Mapping[str, Sequence[str]], shots: int, rng: np.random.Generator) -> Episode:
    """Draw one training episode: a class uniformly among those with >= ``shots + 1`` images,
    then ``shots + 1`` distinct images of it (the last is the query).

    Raises:
        ValueError: no class has ``shots + 1`` images (names the largest class size).
    """
    eligible = [c for c in sorted(pools) if len(pools[c]) >= shots + 1]
    if not eligible:
        largest = max((len(v) for v in pools.values()), default=0)
        raise ValueError(f"no training class has {shots + 1} images for a {shots}-shot episode "
                         f"(largest class has {largest}); lower train.shots")
    c = eligible[int(rng.integers(len(eligible)))]
    pick = rng.choice(len(pools[c]), size=shots + 1, replace=False)
    ids = [pools[c][int(j)] for j in pick]
    return Episode(c, tuple(ids[:-1]), ids[-1])


def training_episode(pools: Mapping[str, Sequence[str]], shots: int, seed: int, index: int) -> Episode:
    """Episode number ``index`` (0-based, over the whole run) of a training run seeded ``seed``."""
    return sample_episode(pools, shots, episode_rng(seed, index))


def validation_episodes(val_pools: Mapping[str, Sequence[str]], train_pools: Mapping[str, Sequence[str]],
                        shots: int, n: int, seed: int) -> list[Episode]:
    """Fixed model-selection episodes: ``n`` episodes, classes drawn uniformly.

    The query is a held-out (val) image; the ``shots`` supports are other held-out images of the
    class when there are enough, else images of the class's training pool (small classes keep
    only 2-3 val images).

    Raises:
        ValueError: no class has a val image and ``shots`` possible supports.
    """
    eligible = []
    for c in sorted(val_pools):
        others = len(val_pools[c]) - 1
        if val_pools[c] and (others >= shots or len(train_pools.get(c, ())) >= shots):
            eligible.append(c)
    if not eligible:
        raise ValueError(f"no training class has validation images and {shots} supports; check split.val_fraction")
    rng = np.random.default_rng([int(seed), 7919])
    out = []
    for _ in range(n):
        c = eligible[int(rng.integers(len(eligible)))]
        val = list(val_pools[c])
        q = val[int(rng.integers(len(val)))]
        rest = [i for i in val if i != q]
        source = rest if len(rest) >= shots else list(train_pools[c])
        sup = [source[int(j)] for j in rng.choice(len(source), size=shots, replace=False)]
        out.append(Episode(c, tuple(sup), q))
    return out


def mismatched_validation(episodes: Sequence[Episode], val_pools: Mapping[str, Sequence[str]],
                          train_pools: Mapping[str, Sequence[str]], seed: int) -> list[Episode]:
    """The selection episodes with each support set replaced by K images of *another* selection class.

    The support check of the training side (issue 11): the query and its truth stay, the support
    shows a different defect, so a model that uses its support scores lower here. The other class
    is drawn uniformly among the other classes of ``val_pools``; its K images among its validation
    and training-pool images, seeded by ``[seed, 17]``.

    Returns:
        One episode per input episode, in order; ``[]`` when ``val_pools`` has fewer than 2 classes
        (nothing to swap with).
    """
    classes = sorted(val_pools)
    if len(classes) < 2:
        return []
    rng = np.random.default_rng([int(seed), 17])
    out = []
    for e in episodes:
        other = [c for c in classes if c != e.class_name]
        o = other[int(rng.integers(len(other)))]
        pool = sorted(set(val_pools[o]) | set(train_pools.get(o, ())))
        pick = rng.choice(len(pool), size=len(e.support_ids), replace=False)
        out.append(Episode(e.class_name, tuple(pool[int(j)] for j in pick), e.query_id))
    return out
