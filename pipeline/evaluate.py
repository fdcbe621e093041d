"""Evaluation: score models on saved test episodes, false alarms on defect-free images, latency.

What is measured (issue 4, ``docs/architecture.md``):

* **IoU metrics** (:mod:`pipeline.metrics`): per-class IoU = Σ I / Σ U over the class's episodes,
  mIoU over the fold's test classes, FB-IoU pooled over the fold; for each K in
  ``params.split.shots`` and each protocol in ``params.evaluate.protocols``. The standard protocol is
  scored per seed and reported as mean ± std (ddof=1) over ``params.split.standard_seeds``.
* **Resolution**: supports and query are resized to ``S x S`` (the model's training size, bilinear;
  masks nearest), the model's logits are bilinearly upsampled to the query's *original* ``(H, W)``
  and thresholded at logit > 0 (sigmoid > 0.5); ground truth is the original mask binarised with
  ``params.data.mask_threshold``.
* **K-shot**: the K supports of an episode are passed together; the model averages over shots
  (paper Eq. 16).
* **Speed**: with a frozen backbone every image is encoded once (the ``features`` stage's store, view
  0 = clean ``S x S`` image, float16) and reused across episodes, shots and models; otherwise (a
  fine-tuned backbone, a folder outside the pipeline) each image is encoded once per model and kept
  in memory. Episodes run in batches under :func:`torch.inference_mode`.
* **False alarms**: for each test class with defect-free (``normal``/``Nd``) images, its paper-protocol
  support sets (cycled) are run against those images; reported: mean predicted defect area fraction
  and the share of images with any predicted defect pixel.
* **Latency**: median wall time (ms) of ``params.evaluate.latency_queries`` full predictions of one
  query from decoded images (resize, encode supports and query, head, upsample, threshold), after
  two warm-up passes, on the evaluation device.

Outputs of :func:`evaluate` (fold ``f``): ``metrics/fold<f>.json`` (DVC metrics),
``metrics/per_class/fold<f>.csv`` (long table), ``metrics/plots/per_class_fold<f>.csv`` (one row per
class, one column per model/K/protocol, for ``dvc plots``), and in each model's nested MLflow run:
final metrics, the per-class table, overlay grids and the per-class IoU bar chart.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from pipeline.config import Params
from pipeline.images import (atomic_write_text, load_episodes, load_split, load_validated, read_image, read_mask,
                             resize_image, resize_mask, resolve)
from pipeline.metrics import IoUAccumulator, mean_std

log = logging.getLogger(__name__)

URI_SCHEMES = ("models:/", "runs:/", "file:", "s3://", "mlflow-artifacts:", "http://", "https://")


class EvaluationError(RuntimeError):
    """Evaluation cannot run: a missing model/data artifact or an unusable folder; says what to do."""


# ---------------------------------------------------------------------------
# loading a model
# ---------------------------------------------------------------------------
def load_net(model: str | os.PathLike[str], device: torch.device | str = "cpu") -> tuple[torch.nn.Module, int]:
    """Load a network for inference from a checkpoint file or an MLflow model URI.

    Args:
        model: ``model.pt`` written by training; an MLflow model URI of a model logged with
            :func:`pipeline.pyfunc.log_pyfunc` (``models:/NAME@champion``, ``runs:/<id>/model``,
            ``models:/m-...``) or a local folder holding such a logged model (``MLmodel`` inside).
        device: where to put the network.

    Returns:
        ``(net, image_size)``: the network in eval mode and the square input size ``S`` it was
        trained at.

    Raises:
        EvaluationError: the file/folder does not exist, or the URI is not one of our pyfunc models.
        pipeline.checkpoint.CheckpointError: the file is not a LERENet model file.
    """
    from pipeline.checkpoint import load_model

    text = str(model)
    path = Path(text)
    if text.startswith(URI_SCHEMES) or (path.is_dir() and (path / "MLmodel").is_file()):
        import mlflow.pyfunc

        loaded = mlflow.pyfunc.load_model(text)
        inner = loaded.unwrap_python_model()
        if not hasattr(inner, "net") or inner.net is None:
            raise EvaluationError(f"{text}: not a LERENet pyfunc model (log it with pipeline.pyfunc.log_pyfunc)")
        return inner.net.to(device).eval(), int(inner.image_size)
    if not path.is_file():
        raise EvaluationError(f"{text}: no such checkpoint file or MLflow model URI (expected a model.pt from "
                              "`lerenet train`, or models:/NAME@ALIAS, runs:/RUN_ID/model)")
    net, meta = load_model(path, map_location=device)
    return net.eval(), int(meta["image_size"])


def clean_tensors(image: np.ndarray, mask: np.ndarray | None, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The un-augmented ``S x S`` view as tensors, identical to the feature store's view 0.

    Same as ``pipeline.augment.to_tensor_pair(*pipeline.augment.clean_pair(image, mask, S))`` (checked in
    tests/test_evaluate.py) without importing the augmentation stack, so the served pyfunc stays small.

    Args:
        image: ``(H, W, 3)`` uint8 RGB. mask: ``(H, W)`` bool or None (all background).
        image_size: ``S``.

    Returns:
        ``(3, S, S)`` float in [0, 1] (bilinear resize) and ``(1, S, S)`` float {0, 1} (nearest resize).
    """
    img = torch.from_numpy(np.array(resize_image(image, image_size))).permute(2, 0, 1).float().div_(255.0)
    m = (np.zeros((image_size, image_size), bool) if mask is None
         else resize_mask(np.asarray(mask, bool), image_size))
    return img, torch.from_numpy(np.array(m)).float().unsqueeze(0)


def _device_of(net: torch.nn.Module) -> torch.device:
    for p in net.parameters():
        return p.device
    for b in net.buffers():
        return b.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------
# single-query prediction from decoded images (pyfunc, latency)
# ---------------------------------------------------------------------------
def predict_query(net: torch.nn.Module, support_images: Sequence[np.ndarray], support_masks: Sequence[np.ndarray],
                  query_image: np.ndarray, image_size: int) -> np.ndarray:
    """Segment one query from its K-shot support set, end to end from decoded pixels.

    Args:
        net: a ``model.FewShotSegmenter`` in eval mode.
        support_images: K arrays ``(h_k, w_k, 3)`` uint8 RGB (any sizes).
        support_masks: K arrays ``(h_k, w_k)`` bool, True = defect.
        query_image: ``(H, W, 3)`` uint8 RGB.
        image_size: ``S``; every image is resized to ``S x S`` (bilinear; masks nearest) as in training.

    Returns:
        ``(H, W)`` float32 logits at the query's original size (defect where > 0, i.e. sigmoid > 0.5):
        the model's logits on the feature grid, bilinearly upsampled straight to ``(H, W)``.

    Raises:
        ValueError: no supports, images/masks count mismatch, or a mask/image size mismatch.
    """
    if len(support_images) == 0 or len(support_images) != len(support_masks):
        raise ValueError(f"need K >= 1 support images and as many masks, got {len(support_images)} and {len(support_masks)}")
    device = _device_of(net)
    imgs, msks = [], []
    for k, (im, m) in enumerate(zip(support_images, support_masks)):
        if im.shape[:2] != np.asarray(m).shape:
            raise ValueError(f"support {k}: mask size {np.asarray(m).shape} != image size {im.shape[:2]}")
        t_img, t_msk = clean_tensors(im, np.asarray(m, bool), image_size)
        imgs.append(t_img)
        msks.append(t_msk)
    q, _ = clean_tensors(query_image, None, image_size)
    h, w = query_image.shape[:2]
    with torch.inference_mode():
        sup = torch.stack(imgs).to(device)
        feats = net.encode(torch.cat([sup, q[None].to(device)]))
        sf, qf = feats[:-1][None], feats[-1:]
        logits = net.forward_features(sf, torch.stack(msks)[None].to(device), qf, tuple(qf.shape[-2:]))
        logits = F.interpolate(logits.float(), size=(h, w), mode="bilinear", align_corners=False)
    return logits[0, 0].cpu().numpy()


# ---------------------------------------------------------------------------
# data access for scoring: images, original-size ground truth, features
# ---------------------------------------------------------------------------
@dataclass
class ImageTable:
    """The images an evaluation can touch, indexed by id.

    ``rows`` has columns ``id``, ``class_name``, ``kind`` (defect|normal), ``image_path``,
    ``mask_path`` (None for normal), paths relative to ``base`` (or absolute).
    """

    rows: pd.DataFrame
    base: Path
    threshold: int = 127
    _gt: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _size: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.rows = self.rows.set_index("id", drop=False)
        if not self.rows.index.is_unique:
            dup = self.rows.index[self.rows.index.duplicated()].tolist()[:5]
            raise EvaluationError(f"duplicate image ids {dup}")

    def row(self, image_id: str) -> Any:
        try:
            return self.rows.loc[image_id]
        except KeyError:
            raise EvaluationError(f"image id {image_id!r} (from an episode file) is not in the validated data; "
                                  "episodes are stale: re-run `dvc repro split`") from None

    def image(self, image_id: str) -> np.ndarray:
        """``(H, W, 3)`` uint8 RGB at the original size."""
        return read_image(resolve(self.base, self.row(image_id).image_path))

    def mask(self, image_id: str) -> np.ndarray:
        """``(H, W)`` bool original-size mask (all False for a defect-free image)."""
        r = self.row(image_id)
        if r.mask_path is None or (isinstance(r.mask_path, float) and np.isnan(r.mask_path)):
            h, w = self.size(image_id)
            return np.zeros((h, w), bool)
        return read_mask(resolve(self.base, r.mask_path), self.threshold)

    def gt(self, image_id: str) -> torch.Tensor:
        """Cached original-size ground truth ``(H, W)`` bool tensor."""
        if image_id not in self._gt:
            m = torch.from_numpy(self.mask(image_id))
            self._gt[image_id] = m
            self._size[image_id] = tuple(m.shape)  # type: ignore[assignment]
        return self._gt[image_id]

    def size(self, image_id: str) -> tuple[int, int]:
        """Original ``(H, W)`` of an image (from the table's width/height when present)."""
        if image_id not in self._size:
            r = self.row(image_id)
            if "height" in r and "width" in r and not pd.isna(r.height):
                self._size[image_id] = (int(r.height), int(r.width))
            else:
                self._size[image_id] = tuple(self.image(image_id).shape[:2])  # type: ignore[assignment]
        return self._size[image_id]


class FeatureSource:
    """Backbone features and ``S x S`` masks of the clean view of each image, computed once.

    With ``store`` (a :class:`pipeline.features.FeatureStore` built for the same frozen backbone and
    ``S``), features are read from it; otherwise images are encoded with ``net.encode`` in batches and
    kept in memory (valid for any backbone in eval mode, frozen or fine-tuned: one cache per network).
    """

    def __init__(self, net: torch.nn.Module, table: ImageTable, image_size: int, store: Any = None,
                 batch_size: int = 16) -> None:
        self.net, self.table, self.image_size, self.store, self.batch_size = net, table, image_size, store, batch_size
        self.device = _device_of(net)
        self._row: dict[str, int] = {}
        self._feats: torch.Tensor | None = None  # (capacity, Cb, h, w)
        self._masks: torch.Tensor | None = None  # (capacity, 1, S, S)

    def _append(self, ids: Sequence[str], feats: torch.Tensor, masks: torch.Tensor) -> None:
        n0 = len(self._row)
        if self._feats is None:
            cap = max(64, len(ids))
            self._feats = feats.new_empty((cap, *feats.shape[1:]))
            self._masks = masks.new_empty((cap, *masks.shape[1:]))
        elif n0 + len(ids) > self._feats.shape[0]:
            cap = max(2 * self._feats.shape[0], n0 + len(ids))
            grown_f = self._feats.new_empty((cap, *self._feats.shape[1:]))
            grown_m = self._masks.new_empty((cap, *self._masks.shape[1:]))  # type: ignore[union-attr]
            grown_f[:n0] = self._feats[:n0]
            grown_m[:n0] = self._masks[:n0]  # type: ignore[index]
            self._feats, self._masks = grown_f, grown_m
        self._feats[n0:n0 + len(ids)] = feats
        self._masks[n0:n0 + len(ids)] = masks  # type: ignore[index]
        for j, i in enumerate(ids):
            self._row[i] = n0 + j

    def prefetch(self, ids: Sequence[str]) -> None:
        """Compute (or read) and keep the features and masks of every id not yet held."""
        todo = list(dict.fromkeys(i for i in ids if i not in self._row))
        if not todo:
            return
        if self.store is not None:
            for s in range(0, len(todo), 256):
                chunk = todo[s:s + 256]
                self._append(chunk, self.store.get(chunk, 0).to(self.device),
                             self.store.masks(chunk, 0).to(self.device))
            return
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s:s + self.batch_size]
            imgs, msks = [], []
            for i in chunk:
                img, m = clean_tensors(self.table.image(i), self.table.mask(i), self.image_size)
                imgs.append(img)
                msks.append(m)
            with torch.inference_mode():
                f = self.net.encode(torch.stack(imgs).to(self.device))
            self._append(chunk, f, torch.stack(msks).to(self.device))

    def _index(self, ids: Sequence[str]) -> torch.Tensor:
        self.prefetch(ids)
        return torch.tensor([self._row[i] for i in ids], dtype=torch.long, device=self.device)

    def feats(self, ids: Sequence[str]) -> torch.Tensor:
        """``(N, Cb, h, w)`` float features of the clean ``S x S`` views."""
        idx = self._index(ids)
        return self._feats.index_select(0, idx)  # type: ignore[union-attr]

    def masks(self, ids: Sequence[str]) -> torch.Tensor:
        """``(N, 1, S, S)`` float {0, 1} masks of the clean views."""
        idx = self._index(ids)
        return self._masks.index_select(0, idx)  # type: ignore[union-attr]


def open_store_for(params: Params, net: torch.nn.Module, image_size: int, data_dir: Path) -> Any:
    """The fold-independent feature store if it fits ``net`` (frozen, same backbone and ``S``), else None."""
    if not getattr(net, "freeze_backbone", False):
        return None
    try:
        from pipeline.features import FeatureStore, feature_store_path
    except ImportError:  # pragma: no cover - the training helper's module is part of the project
        return None
    path = feature_store_path(params, data_dir)
    if not (path / "index.json").is_file():
        log.info("no feature store at %s: encoding images in memory", path)
        return None
    store = FeatureStore.open(path)
    backbone = getattr(net, "config", {}).get("backbone", params.model.backbone)
    if store.backbone != backbone or store.image_size != image_size:
        log.info("feature store %s is %s@%d, model is %s@%d: encoding in memory", path, store.backbone,
                 store.image_size, backbone, image_size)
        return None
    return store


# ---------------------------------------------------------------------------
# scoring episodes
# ---------------------------------------------------------------------------
def _episode_logits(net: torch.nn.Module, src: FeatureSource, support_ids: Sequence[Sequence[str]],
                    query_ids: Sequence[str]) -> torch.Tensor:
    """Logits on the feature grid for a batch of episodes: ``(B, 1, h, w)``.

    ``forward_features`` is asked for its output at the feature grid size; every model in ``model/``
    ends with a bilinear upsampling to ``out_size``, so upsampling these logits to the original size
    equals asking the model for the original size directly (checked in tests/test_evaluate.py).
    """
    b, k = len(query_ids), len(support_ids[0])
    flat = [i for s in support_ids for i in s]
    sf = src.feats(flat).unflatten(0, (b, k))
    sm = src.masks(flat).unflatten(0, (b, k))
    qf = src.feats(query_ids)
    return net.forward_features(sf, sm, qf, tuple(qf.shape[-2:])).float()


def _upsample_threshold(logits: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Per query: bilinear upsample ``(1, h, w)`` logits to its ``(H, W)`` and threshold at 0 -> bool (H, W).

    Queries of equal size are upsampled together.
    """
    out: list[torch.Tensor | None] = [None] * len(sizes)
    groups: dict[tuple[int, int], list[int]] = {}
    for j, s in enumerate(sizes):
        groups.setdefault(tuple(s), []).append(j)
    for s, idx in groups.items():
        up = F.interpolate(logits[idx], size=s, mode="bilinear", align_corners=False)[:, 0] > 0
        for n, j in enumerate(idx):
            out[j] = up[n].cpu()
    return out  # type: ignore[return-value]


def score_episodes(net: torch.nn.Module, src: FeatureSource, episodes: pd.DataFrame, batch_size: int = 64,
                   keep: set[int] | None = None, desc: str | None = None
                   ) -> tuple[IoUAccumulator, dict[int, torch.Tensor]]:
    """Score episodes (rows with ``class_name``, ``support_ids``, ``query_id``) at the original resolution.

    Args:
        net: the model (eval mode).
        src: features/masks of the images (clean ``S x S`` view).
        episodes: the saved episode rows of one (fold, protocol, K[, seed]).
        batch_size: episodes per forward pass.
        keep: positional episode indices whose predicted mask to return (for overlay pictures).
        desc: label of a progress bar (episodes/s; shown on a terminal only), or None for none.

    Returns:
        ``(accumulator, {index: (H, W) bool prediction})``.
    """
    from tqdm.auto import tqdm

    acc = IoUAccumulator()
    kept: dict[int, torch.Tensor] = {}
    sup = episodes["support_ids"].tolist()
    qry = episodes["query_id"].tolist()
    cls = episodes["class_name"].tolist()
    bar = tqdm(total=len(qry), desc=desc, unit="ep", disable=None if desc else True, leave=False)
    with torch.inference_mode(), bar:
        for s in range(0, len(qry), batch_size):
            q = qry[s:s + batch_size]
            bar.update(len(q))
            logits = _episode_logits(net, src, sup[s:s + batch_size], q)
            gts = [src.table.gt(i) for i in q]
            preds = _upsample_threshold(logits, [tuple(g.shape) for g in gts])
            for j, (p, g) in enumerate(zip(preds, gts)):
                acc.update(p, g, cls[s + j])
                if keep is not None and s + j in keep:
                    kept[s + j] = p
    return acc, kept


def false_alarms(net: torch.nn.Module, src: FeatureSource, support_sets: dict[str, list[list[str]]],
                 normal_ids: dict[str, list[str]], batch_size: int = 64) -> dict[str, Any]:
    """Predicted defects on defect-free images.

    Args:
        support_sets: ``{class: [support ids of each saved episode]}`` (K ids each).
        normal_ids: ``{class: defect-free image ids}``; classes without support sets are skipped.

    Returns:
        ``{"area_fraction": mean predicted defect share over all images in [0, 1],
        "image_rate": share of images with >= 1 predicted defect pixel, "images": n,
        "per_class": {class: {"area_fraction", "image_rate", "images"}}}``; empty dict if there is no
        defect-free image. Image j of a class uses the class's support set ``j mod n_sets``.
    """
    per_class, fracs, anys = {}, [], []
    with torch.inference_mode():
        for c, ids in normal_ids.items():
            sets = support_sets.get(c) or []
            if not ids or not sets:
                continue
            cf, ca = [], []
            for s in range(0, len(ids), batch_size):
                q = ids[s:s + batch_size]
                sup = [sets[(s + j) % len(sets)] for j in range(len(q))]
                logits = _episode_logits(net, src, sup, q)
                for p in _upsample_threshold(logits, [src.table.size(i) for i in q]):
                    cf.append(float(p.float().mean()))
                    ca.append(bool(p.any()))
            per_class[c] = {"area_fraction": float(np.mean(cf)), "image_rate": float(np.mean(ca)), "images": len(cf)}
            fracs += cf
            anys += ca
    if not fracs:
        return {}
    return {"area_fraction": float(np.mean(fracs)), "image_rate": float(np.mean(anys)), "images": len(fracs),
            "per_class": per_class}


def latency_ms(net: torch.nn.Module, image_size: int, support_images: Sequence[np.ndarray],
               support_masks: Sequence[np.ndarray], query_image: np.ndarray, repeats: int, warmup: int = 2) -> float:
    """Median wall time in milliseconds of :func:`predict_query` plus thresholding, over ``repeats`` runs.

    Decoding files is excluded (images are passed decoded); resizing, encoding, the head, upsampling
    and the copy back to the CPU are included. ``warmup`` untimed runs come first.
    """
    times = []
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        _ = predict_query(net, support_images, support_masks, query_image, image_size) > 0
        if r >= warmup:
            times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


# ---------------------------------------------------------------------------
# one model on one fold
# ---------------------------------------------------------------------------
@dataclass
class ModelResult:
    """Everything measured for one model on one fold (see :func:`evaluate_model`)."""

    metrics: dict[str, Any]
    per_class: pd.DataFrame
    overlays: dict[str, list[Any]] = field(default_factory=dict)


def _overlay_indices(episodes: pd.DataFrame, n: int) -> set[int]:
    if n <= 0:
        return set()
    pos = pd.Series(range(len(episodes)), index=episodes.index)
    return set(pos.groupby(episodes["class_name"].values).head(n).tolist())


def _overlay_items(table: ImageTable, episodes: pd.DataFrame, kept: dict[int, torch.Tensor]) -> list[Any]:
    from pipeline.metrics import intersection_union
    from pipeline.plots import OverlayEpisode

    items = []
    for j in sorted(kept):
        row = episodes.iloc[j]
        gt = table.gt(row.query_id)
        i, u, _, _ = intersection_union(kept[j], gt)
        items.append(OverlayEpisode(
            class_name=row.class_name,
            support_images=[table.image(s) for s in row.support_ids],
            support_masks=[table.mask(s) for s in row.support_ids],
            query_image=table.image(row.query_id), truth=gt.numpy(), pred=kept[j].numpy(),
            iou=(i / u) if u else 1.0))
    return items


def evaluate_model(net: torch.nn.Module, image_size: int, src: FeatureSource, fold: int, model_name: str,
                   test_classes: Sequence[str], episodes: dict[tuple[str, int], pd.DataFrame],
                   normal_ids: dict[str, list[str]], latency_queries: int, overlay_per_class: int,
                   batch_size: int = 64) -> ModelResult:
    """Score one model on one fold's saved episodes; compute false alarms and latency.

    Args:
        episodes: ``{(protocol, K): episode rows}``; the ``standard`` rows carry several seeds.
        normal_ids: defect-free image ids per test class.

    Returns:
        :class:`ModelResult` with ``metrics`` shaped ``{"k<K>": {"paper": {"miou", "fbiou", "episodes"},
        "standard": {"miou_mean", "miou_std", "fbiou_mean", "fbiou_std", "seeds", "episodes"}},
        "fp": {"k<K>": {...}}, "latency_ms": {"k<K>": ms}}`` and the per-class long table.
    """
    metrics: dict[str, Any] = {}
    rows, overlays = [], {}
    fp: dict[str, Any] = {}
    lat: dict[str, float] = {}
    for (protocol, k), eps in sorted(episodes.items(), key=lambda x: (x[0][1], x[0][0])):
        kk = f"k{k}"
        slot = metrics.setdefault(kk, {})
        if protocol == "standard":
            mious, fbious, per_seed = [], [], []
            for seed, part in eps.groupby("seed", sort=True):
                acc, _ = score_episodes(net, src, part.reset_index(drop=True), batch_size,
                                        desc=f"{model_name} {kk} standard seed {seed}")
                mious.append(acc.miou(test_classes))
                fbious.append(acc.fbiou())
                per_seed.append(acc.class_iou(test_classes))
            m, ms = mean_std(mious)
            f_, fs = mean_std(fbious)
            slot["standard"] = {"miou_mean": m, "miou_std": ms, "fbiou_mean": f_, "fbiou_std": fs,
                                "seeds": len(mious), "episodes": int(len(eps))}
            for c in test_classes:
                vals = [d[c] for d in per_seed]
                cm, cs = mean_std(vals)
                rows.append({"fold": fold, "model": model_name, "shots": k, "protocol": protocol, "class_name": c,
                             "iou": cm, "iou_std": cs, "episodes": int((eps["class_name"] == c).sum())})
        else:
            keep = _overlay_indices(eps, overlay_per_class)
            acc, kept = score_episodes(net, src, eps.reset_index(drop=True), batch_size, keep,
                                       desc=f"{model_name} {kk} {protocol}")
            slot[protocol] = {"miou": acc.miou(test_classes), "fbiou": acc.fbiou(), "episodes": int(len(eps))}
            for c, v in acc.class_iou(test_classes).items():
                rows.append({"fold": fold, "model": model_name, "shots": k, "protocol": protocol, "class_name": c,
                             "iou": v, "iou_std": np.nan, "episodes": acc.episodes[c]})
            if kept:
                overlays[f"{kk}_{protocol}"] = _overlay_items(src.table, eps.reset_index(drop=True), kept)
        # false alarms and latency once per K, from the support sets of the first protocol seen
        if kk not in fp:
            sets: dict[str, list[list[str]]] = {}
            for c, part in eps.groupby("class_name"):
                sets[c] = part["support_ids"].tolist()
            fa = false_alarms(net, src, sets, normal_ids, batch_size)
            if fa:
                fp[kk] = fa
            first = eps.iloc[0]
            lat[kk] = latency_ms(net, image_size, [src.table.image(s) for s in first.support_ids],
                                 [src.table.mask(s) for s in first.support_ids], src.table.image(first.query_id),
                                 latency_queries)
    if fp:
        metrics["fp"] = fp
    metrics["latency_ms"] = lat
    return ModelResult(metrics, pd.DataFrame(rows), overlays)


# ---------------------------------------------------------------------------
# the pipeline stage
# ---------------------------------------------------------------------------
def model_path(params: Params, fold: int, model_name: str) -> Path:
    """``<root>/models/fold<f>/<model>/model.pt`` (written by ``pipeline.train``)."""
    return params.root / "models" / f"fold{fold}" / model_name / "model.pt"


def metrics_paths(params: Params, fold: int) -> dict[str, Path]:
    """Output files of :func:`evaluate` for ``fold``: ``json``, ``per_class``, ``plot``."""
    m = params.root / "metrics"
    return {"json": m / f"fold{fold}.json", "per_class": m / "per_class" / f"fold{fold}.csv",
            "plot": m / "plots" / f"per_class_fold{fold}.csv"}


def _plot_table(per_class: pd.DataFrame) -> pd.DataFrame:
    """Wide per-class table: one row per class, one IoU column per ``<model>_k<K>_<protocol>``."""
    t = per_class.assign(series=per_class["model"] + "_k" + per_class["shots"].astype(str) + "_" + per_class["protocol"])
    wide = t.pivot_table(index="class_name", columns="series", values="iou", sort=False).reset_index()
    wide.columns.name = None
    return wide


def _atomic_csv(df: pd.DataFrame, path: Path) -> None:
    atomic_write_text(path, df.to_csv(index=False, float_format="%.6f"))


def _device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def evaluate(params: Params, fold: int, model_names: Sequence[str] | None = None, data_dir: Path | None = None,
             *, track: bool = True, batch_size: int | None = None) -> dict[str, Any]:
    """Evaluate the trained models of ``fold`` on its saved test episodes (the DVC stage ``evaluate``).

    Args:
        params: validated parameters (shots from ``split.shots``, protocols from ``evaluate.protocols``).
        fold: fold number in ``params.folds``.
        model_names: models to score (default ``params.model.names``); each needs
            ``models/fold<f>/<model>/model.pt``.
        data_dir: data folder (default ``params.data.dir``).
        track: log metrics, per-class table and pictures (and, with ``evaluate.log_pyfunc``, the model
            as a pyfunc) into each model's nested MLflow run.
        batch_size: episodes per forward pass (default ``params.evaluate.batch_size``).

    Returns:
        The content written to ``metrics/fold<f>.json``:
        ``{model: {"k1": {"paper": {...}, "standard": {...}}, ..., "fp": {...}, "latency_ms": {...}},
        "device": "..."}``.

    Raises:
        EvaluationError: a model file is missing (run ``lerenet train``) or no episodes exist.
        pipeline.images.DataArtifactError: split/validate outputs are missing.
    """
    from pipeline.device import configure_threads, resolve_device

    data_dir = Path(data_dir) if data_dir is not None else params.data.dir
    names = list(model_names or params.model.names)
    test_classes = params.test_classes(fold)
    split = load_split(data_dir, fold)
    if sorted(split["test_classes"]) != sorted(test_classes):
        raise EvaluationError(f"data/splits/fold{fold}.json test classes {split['test_classes']} differ from "
                              f"params.yaml folds[{fold}] {test_classes}: re-run `dvc repro split`")
    rows = load_validated(data_dir)
    table = ImageTable(rows, data_dir, params.data.mask_threshold)
    normal = rows[(rows["kind"] == "normal") & rows["class_name"].isin(test_classes)]
    normal_ids = {c: part["id"].tolist() for c, part in normal.groupby("class_name")}
    episodes = {(p, k): load_episodes(data_dir, fold, p, k) for p in params.evaluate.protocols for k in params.split.shots}
    missing = [p for p in (model_path(params, fold, n) for n in names) if not p.is_file()]
    if missing:
        raise EvaluationError(f"model file(s) missing: {[str(p) for p in missing]}; train them first "
                              f"(`lerenet train --fold {fold} --model NAME` or `dvc repro train`)")
    batch_size = batch_size or params.evaluate.batch_size
    device = resolve_device(params.train.device)
    configure_threads(device)
    out: dict[str, Any] = {}
    frames = []
    store_cache: dict[tuple[str, int], Any] = {}
    shared_src: dict[tuple[str, int], FeatureSource] = {}
    for name in names:
        ckpt = model_path(params, fold, name)
        net, size = load_net(ckpt, device)
        backbone = getattr(net, "config", {}).get("backbone", params.model.backbone)
        key = (backbone, size)
        if key not in store_cache:
            store_cache[key] = open_store_for(params, net, size, data_dir)
        store = store_cache[key] if getattr(net, "freeze_backbone", False) else None
        if store is not None and key in shared_src:
            src = shared_src[key]
            src.net = net
        else:
            src = FeatureSource(net, table, size, store)
            if store is not None:
                shared_src[key] = src
        t0 = time.perf_counter()
        res = evaluate_model(net, size, src, fold, name, test_classes, episodes, normal_ids,
                             params.evaluate.latency_queries, params.evaluate.overlay_episodes_per_class, batch_size)
        n_eps = sum(len(e) for e in episodes.values())
        dt = time.perf_counter() - t0
        log.info("fold %d %s: %d episodes evaluated in %.1f s (%.1f episodes/s incl. false alarms and latency)",
                 fold, name, n_eps, dt, n_eps / dt)
        out[name] = res.metrics
        frames.append(res.per_class)
        if track:
            _log_to_mlflow(params, fold, name, ckpt, res)
    out["device"] = _device_label(device)
    per_class = pd.concat(frames, ignore_index=True)
    paths = metrics_paths(params, fold)
    _atomic_csv(per_class, paths["per_class"])
    _atomic_csv(_plot_table(per_class), paths["plot"])
    atomic_write_text(paths["json"], json.dumps(_rounded(out), indent=2, sort_keys=False) + "\n")
    return out


def _rounded(obj: Any, nd: int = 4) -> Any:
    if isinstance(obj, float):
        return round(obj, nd)
    if isinstance(obj, dict):
        return {k: _rounded(v, nd) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, nd) for v in obj]
    return obj


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """Flatten a model's metrics dict to MLflow metric names, e.g. ``test_k1_paper_miou``,
    ``test_k5_standard_miou_mean``, ``fp_k1_image_rate``, ``latency_ms_k1`` (per-class FP omitted)."""
    flat: dict[str, float] = {}
    for kk, v in metrics.items():
        if kk.startswith("k") and isinstance(v, dict):
            for protocol, d in v.items():
                for name, val in d.items():
                    flat[f"test_{kk}_{protocol}_{name}"] = float(val)
    for kk, d in metrics.get("fp", {}).items():
        for name in ("area_fraction", "image_rate"):
            flat[f"fp_{kk}_{name}"] = float(d[name])
    for kk, ms in metrics.get("latency_ms", {}).items():
        flat[f"latency_ms_{kk}"] = float(ms)
    return flat


def _log_to_mlflow(params: Params, fold: int, name: str, ckpt: Path, res: ModelResult) -> None:
    """Log final metrics, per-class table, pictures (and the pyfunc model) into the model's nested run.

    The run is the one named by ``run.json`` next to the checkpoint (written by training); without
    it (or if that run no longer exists) the nested run training would have used is found or created
    under the pipeline's parent run (name ``fold<f>/<model>/<backbone>/k<train shots>``).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking
    from pipeline.plots import overlay_grid, per_class_bar

    tracking.configure(params)
    run_json = ckpt.parent / "run.json"
    run_id = None
    if run_json.is_file():
        try:
            run_id = json.loads(run_json.read_text()).get("run_id")
            if run_id:
                tracking.client(params).get_run(run_id)
        except (OSError, ValueError, MlflowException) as exc:
            log.warning("%s: run not usable (%s): logging evaluation into the nested run by name", run_json, exc)
            run_id = None
    if run_id:
        ctx = tracking.resume_run(params, run_id)
    else:
        run_name = f"fold{fold}/{name}/{params.model.backbone}/k{params.train.shots}"
        ctx = tracking.nested_run(params, tracking.parent_run_id(params), run_name,
                                  tags={"model": name, "backbone": params.model.backbone, "shots": params.train.shots,
                                        "fold": f"fold{fold}", "variant": params.model.variant})
    flat = flat_metrics(res.metrics)
    with ctx:
        mlflow.set_tag("evaluated", "true")
        mlflow.log_metrics(flat)
        mlflow.log_table(res.per_class, artifact_file="evaluation/per_class_iou.json")
        with tempfile.TemporaryDirectory() as tmp:
            tmpd = Path(tmp)
            res.per_class.to_csv(tmpd / "per_class_iou.csv", index=False)
            series = {f"k{k}_{p}": dict(zip(g["class_name"], g["iou"]))
                      for (k, p), g in res.per_class.groupby(["shots", "protocol"])}
            if series:
                per_class_bar(series, tmpd / "per_class_iou.png", f"{name} fold {fold}: per-class IoU")
            for tag, items in res.overlays.items():
                overlay_grid(items, tmpd / f"overlays_{tag}.png", f"{name} fold {fold} {tag}")
            mlflow.log_artifacts(str(tmpd), artifact_path="evaluation")
        if params.evaluate.log_pyfunc:
            from pipeline.pyfunc import log_pyfunc

            log_pyfunc(ckpt, name="model", metadata_={"model_name": name, "fold": fold,
                                                      **{k: v for k, v in flat.items() if k.endswith("miou")}})


# ---------------------------------------------------------------------------
# any folder in the Surface Defects-4i layout, all classes novel
# ---------------------------------------------------------------------------
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


def evaluate_folder(folder: Path, model: str, shots: int, episodes: int = 1000, seed: int = 0, *,
                    threshold: int = 127, device: str = "auto", batch_size: int = 64,
                    image_size: int | None = None) -> dict[str, Any]:
    """Score a model on any Surface Defects-4i-layout folder, treating every class as novel.

    Args:
        folder: ``<folder>/<Class>/{Images,GT[,Nd]}``, read directly (no ingest, no DVC).
        model: checkpoint path, MLflow model URI (``models:/NAME@champion``, ``runs:/ID/model``), or
            ``prototype`` (the untrained PANet-style prototype model on ImageNet EfficientNet-Lite0).
        shots: K supports per episode. episodes: number of episodes (classes drawn uniformly).
        seed: episode seed. threshold: mask binarisation (defect where value > threshold).
        device: ``auto`` | ``cpu`` | ``cuda``. image_size: ``S`` for the ``prototype`` model (default 200).

    Returns:
        ``{"data", "model", "shots", "episodes", "seed", "per_class_iou": {class: iou}, "miou",
        "fbiou", "fp": {...} (if the folder has Nd images), "classes_not_scored", "left_out"}``;
        ``classes_not_scored`` lists classes with fewer than K+1 usable images (or not drawn).

    Raises:
        EvaluationError: unusable folder or model.
    """
    from pipeline.device import configure_threads, resolve_device

    dev = resolve_device(device)
    configure_threads(dev)
    if model == "prototype":
        from model import build_model

        net, size = build_model("prototype", pretrained=True).to(dev).eval(), int(image_size or 200)
    else:
        net, size = load_net(model, dev)
    table, notes = folder_table(Path(folder), threshold)
    eps = folder_episodes(table, shots, episodes, seed)
    src = FeatureSource(net, table, size)
    acc, _ = score_episodes(net, src, eps, batch_size, desc=f"{Path(folder).name} k{shots}")
    classes = sorted(eps["class_name"].unique())
    all_classes = sorted(table.rows.loc[table.rows["kind"] == "defect", "class_name"].unique())
    normal = table.rows[table.rows["kind"] == "normal"]
    sets = {c: g["support_ids"].tolist() for c, g in eps.groupby("class_name")}
    fa = false_alarms(net, src, sets, {c: g["id"].tolist() for c, g in normal.groupby("class_name")}, batch_size)
    out: dict[str, Any] = {"data": str(folder), "model": str(model), "shots": shots, "episodes": episodes, "seed": seed,
                           "per_class_iou": acc.class_iou(classes), "miou": acc.miou(classes), "fbiou": acc.fbiou()}
    if fa:
        out["fp"] = fa
    out["classes_not_scored"] = [c for c in all_classes if c not in classes]
    out["left_out"] = notes
    return out
