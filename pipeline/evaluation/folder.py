"""Scoring any folder in the Surface Defects-4i layout, every class novel (``lerenet evaluate --data``).

No ingest and no DVC: the folder is read directly (:func:`folder_table`), ``episodes`` random K-shot
episodes are drawn with a seed (:func:`folder_episodes`), and the model -- any spec
:meth:`pipeline.inference.predictor.Predictor.load` accepts, or ``prototype`` -- is scored with the
same :mod:`pipeline.evaluation.scoring` as the pipeline's evaluation (features encoded in memory).

Reference images (:func:`folder_references`): a model file whose presence gate was calibrated with R defect-free
reference images (``train.presence_references``) gets R of the folder's own ``Nd`` images per material as
references for the episodes of that material (a plant keeps good parts of each surface), and those images leave
the false-alarm set (a reference scored against itself says nothing).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.evaluation.data import EvaluationError, FeatureSource, ImageTable
from pipeline.evaluation.scoring import false_alarms, score_episodes
from pipeline.images import read_mask
from pipeline.inference.predictor import Predictor


def folder_table(folder: Path, threshold: int = 127) -> tuple[ImageTable, list[str]]:
    """Read a Surface Defects-4i-layout folder directly (no ingest) into an :class:`ImageTable`.

    Defect images without a mask or with an empty mask are left out (as validation does), and so
    are masks Pillow cannot decode; each is named in the returned notes.

    Returns:
        ``(table, notes)``; ids are ``<Class>/<Images|Nd>/<file name>``.

    Raises:
        EvaluationError: the folder is missing, has no class folders, or a class folder lacks
            ``Images/`` (message from :func:`pipeline.ingest.scan_source`).
    """
    from pipeline.ingest import IngestError, scan_source

    try:
        items = scan_source(Path(folder))
    except IngestError as exc:
        raise EvaluationError(str(exc)) from None
    rows, notes = [], []
    for it in items:
        rid = f"{it.class_name}/{'Images' if it.kind == 'defect' else 'Nd'}/{it.src_image.name}"
        if it.kind == "defect":
            if it.src_mask is None:
                notes.append(f"{rid}: no mask GT/{it.src_image.stem}.png, left out")
                continue
            try:
                m = read_mask(it.src_mask, threshold)
                h, w = m.shape
            except Exception as exc:  # noqa: BLE001 - any undecodable mask is left out, named
                notes.append(f"{rid}: mask not readable ({exc}), left out")
                continue
            if not m.any():
                notes.append(f"{rid}: empty mask (no pixel > {threshold}), left out")
                continue
        else:
            h = w = None
        rows.append({"id": rid, "class_name": it.class_name, "kind": it.kind, "image_path": str(it.src_image),
                     "mask_path": str(it.src_mask) if it.src_mask else None, "height": h, "width": w})
    if not rows:
        raise EvaluationError(f"{folder}: no usable defect image with a non-empty mask")
    return ImageTable(pd.DataFrame(rows), Path(folder), threshold), notes


def folder_episodes(table: ImageTable, shots: int, episodes: int, seed: int) -> pd.DataFrame:
    """``episodes`` random K-shot episodes over every class of ``table`` with >= K+1 defect images.

    Episode ``i`` draws a class uniformly, then K+1 distinct images (supports + query) with the RNG
    ``numpy.random.default_rng([seed, i])`` (:func:`pipeline.episodes.training_episode`), so the same
    seed gives the same episodes. Columns as the saved episode files: ``episode``, ``seed``,
    ``class_name``, ``support_ids``, ``query_id``.

    Raises:
        EvaluationError: no class has K+1 usable images.
    """
    from pipeline.episodes import training_episode

    defects = table.rows[table.rows["kind"] == "defect"]
    pools = {c: sorted(g["id"]) for c, g in defects.groupby("class_name")}
    if not any(len(v) > shots for v in pools.values()):
        raise EvaluationError(f"no class has {shots + 1} usable images for {shots}-shot episodes "
                              f"(class sizes: { {c: len(v) for c, v in pools.items()} })")
    out = []
    for i in range(episodes):
        ep = training_episode(pools, shots, seed, i)
        out.append({"episode": i, "seed": seed, "class_name": ep.class_name, "support_ids": list(ep.support_ids),
                    "query_id": ep.query_id})
    return pd.DataFrame(out)


def folder_references(table: ImageTable, count: int, seed: int) -> dict[str, list[str]]:
    """``count`` defect-free reference images per material of the folder (:func:`pipeline.episodes.material`: the
    class name's prefix before ``_``), drawn from its ``Nd`` images with ``seed`` as the pipeline's references are
    (:func:`pipeline.episodes.draw_references`).

    Returns:
        ``{material: [count ids]}`` for each material with more than ``count`` ``Nd`` images (at least one is
        left for the false-alarm set); ``{}`` when ``count`` is 0 or no material has enough.
    """
    from pipeline.episodes import class_pools, draw_references

    if count < 1:
        return {}
    return draw_references(class_pools(table.rows[table.rows["kind"] == "normal"]), count, seed, spare=1)


def folder_predictor(model: str, device: Any, image_size: int | None = None,
                     tracking_uri: str | None = None) -> Predictor:
    """The Predictor of ``model``: ``prototype`` (untrained PANet-style prototype model on ImageNet
    EfficientNet-Lite0, ``S = image_size or 200``) or any spec of :meth:`Predictor.load`."""
    if model != "prototype":
        return Predictor.load(model, tracking_uri=tracking_uri, device=device)
    from model import build_model

    from pipeline.inference.resolve import ModelSource

    net = build_model("prototype", pretrained=True).to(device).eval()
    size = int(image_size or 200)
    return Predictor(net, size, {"model": "prototype", "backbone": "efficientnet_lite0", "image_size": size},
                     ModelSource("prototype"))


def evaluate_folder(folder: Path, model: str, shots: int, episodes: int = 1000, seed: int = 0, *,
                    threshold: int = 127, device: str = "auto", batch_size: int = 64,
                    image_size: int | None = None, tracking_uri: str | None = None,
                    references: int | None = None) -> dict[str, Any]:
    """Score a model on any Surface Defects-4i-layout folder, treating every class as novel.

    Args:
        folder: ``<folder>/<Class>/{Images,GT[,Nd]}``, read directly (no ingest, no DVC).
        model: checkpoint path, MLflow model URI (``models:/NAME@champion``, ``runs:/ID/model``), or
            ``prototype`` (the untrained PANet-style prototype model on ImageNet EfficientNet-Lite0).
        shots: K supports per episode. episodes: number of episodes (classes drawn uniformly).
        seed: episode seed. threshold: mask binarisation (defect where value > threshold).
        device: ``auto`` | ``cpu`` | ``cuda``. image_size: ``S`` for the ``prototype`` model (default 200).
        tracking_uri: MLflow tracking/registry URI for a model URI (default: MLflow's current one).
        references: R defect-free reference images per material (:func:`folder_references`, drawn with ``seed``);
            ``None``: the R the model file's gate was calibrated with (0 without a reference threshold). Used
            only by a model file with a reference threshold (else a note in ``left_out``).

    Returns:
        ``{"data", "model", "shots", "episodes", "seed", "per_class_iou": {class: iou}, "miou",
        "fbiou", "fp": {...} (if the folder has Nd images other than the references), "references": {material:
        ids}, "classes_not_scored", "left_out"}``; ``classes_not_scored`` lists classes with fewer than K+1 usable
        images (or not drawn).

    Raises:
        EvaluationError: unusable folder.
        pipeline.inference.resolve.ModelNotFoundError / CheckpointError: unusable model.
    """
    from pipeline.device import configure_threads, resolve_device

    dev = resolve_device(device)
    configure_threads(dev)
    predictor = folder_predictor(model, dev, image_size, tracking_uri)
    table, notes = folder_table(Path(folder), threshold)
    eps = folder_episodes(table, shots, episodes, seed)
    src = FeatureSource(predictor, table)
    gate = predictor.presence_gate
    refs = folder_references(table, gate.references if references is None else references, seed) \
        if gate.uses_references else {}
    if references and not gate.uses_references:
        notes.append(f"--references {references}: the model file's presence gate has no reference threshold "
                     "(not trained with train.presence_references > 0): no reference image used")
    src.use_references(refs)
    taken = {i for ids in refs.values() for i in ids}
    acc, _ = score_episodes(src, eps, batch_size, desc=f"{Path(folder).name} k{shots}")
    classes = sorted(eps["class_name"].unique())
    all_classes = sorted(table.rows.loc[table.rows["kind"] == "defect", "class_name"].unique())
    normal = table.rows[(table.rows["kind"] == "normal") & ~table.rows["id"].isin(taken)]
    sets = {c: g["support_ids"].tolist() for c, g in eps.groupby("class_name")}
    fa = false_alarms(src, sets, {c: g["id"].tolist() for c, g in normal.groupby("class_name")}, batch_size)
    out: dict[str, Any] = {"data": str(folder), "model": str(model), "shots": shots, "episodes": episodes, "seed": seed,
                           "per_class_iou": acc.class_iou(classes), "miou": acc.miou(classes), "fbiou": acc.fbiou()}
    if fa is not None:
        out["fp"] = fa.to_json()
    out["references"] = refs
    out["classes_not_scored"] = [c for c in all_classes if c not in classes]
    out["left_out"] = notes
    return out
