"""What an evaluation reads: the image table (original-size images and ground truth) and the features.

* :class:`ImageTable`: images by id, original-size ground truth (binarised with
  ``params.data.mask_threshold``), original sizes;
* :class:`FeatureSource`: backbone features and ``S x S`` masks of each image's clean view, computed
  once: read from the frozen-backbone feature store (view 0 = :meth:`Predictor.encode_images` of the
  clean view, float16) when it fits the model, else encoded with the model's
  :class:`~pipeline.inference.predictor.Predictor` in batches and kept in memory (any backbone in
  eval mode, frozen or fine-tuned: one cache per network); and, for a model whose gate uses reference
  images (:func:`fold_references`), each episode's reference level.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.config import Params
from pipeline.episodes import material
from pipeline.images import read_image, read_mask, resolve
from pipeline.inference.predictor import Predictor

log = logging.getLogger(__name__)


class EvaluationError(RuntimeError):
    """Evaluation cannot run: a missing model/data artifact or an unusable folder; says what to do."""


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
        """The table row of ``image_id`` (raises :class:`EvaluationError` naming a stale episode file)."""
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
    ``S``), features are read from it; otherwise images are encoded by ``predictor`` in batches of
    ``batch_size`` and kept in memory. ``predictor`` may be swapped for the next model of the same
    backbone when the store is used (the features do not depend on the head).
    """

    def __init__(self, predictor: Predictor, table: ImageTable, store: Any = None, batch_size: int = 16) -> None:
        self.predictor, self.table, self.store, self.batch_size = predictor, table, store, batch_size
        self.device = predictor.device
        self._row: dict[str, int] = {}
        self._feats: torch.Tensor | None = None  # (capacity, Cb, h, w)
        self._masks: torch.Tensor | None = None  # (capacity, 1, S, S)
        self._supports: dict[tuple[str, ...], Any] = {}  # native support sets (is_native episodes)
        self.references: dict[str, list[str]] = {}
        self._levels: dict[tuple[tuple[str, ...], str], float] = {}  # (support ids, material) -> level

    def use_references(self, references: dict[str, list[str]]) -> None:
        """Give the episodes of each material these reference image ids (:func:`fold_references`; ``{}``: none),
        for the current :attr:`predictor` (call again after swapping it: the cached levels are dropped)."""
        self.references = dict(references)
        self._levels.clear()
        self._supports.clear()

    def levels(self, support_ids: Sequence[Sequence[str]], query_ids: Sequence[str]) -> torch.Tensor | None:
        """``(B,)`` reference level of each episode (:meth:`Predictor.reference_levels`) with the references of its
        query's material, ``NaN`` where that material has none; ``None`` when no material has. Cached per
        (support set, material): the false-alarm images reuse their class's support sets."""
        if not self.references:
            return None
        keys = [(tuple(s), material(str(self.table.row(q).class_name))) for s, q in zip(support_ids, query_ids)]
        for m, refs in self.references.items():
            todo = list(dict.fromkeys(key for key in keys if key[1] == m and key not in self._levels))
            for first in range(0, len(todo), 64):
                chunk = todo[first:first + 64]
                flat = [i for sup, _ in chunk for i in sup]
                b, k = len(chunk), len(chunk[0][0])
                got = self.predictor.reference_levels(self.feats(flat).unflatten(0, (b, k)),
                                                      self.masks(flat).unflatten(0, (b, k)), self.feats(refs))
                self._levels.update(zip(chunk, got.tolist()))
        return torch.tensor([self._levels.get(key, float("nan")) for key in keys], dtype=torch.float64)

    def is_native(self, support_ids: Sequence[str]) -> bool:
        """Whether an episode with these supports is segmented in native-resolution windows (SOFS non-resizing:
        the model file has ``native_area`` and a support defect is small; :meth:`Predictor.is_native`)."""
        if self.predictor.native_area is None:
            return False
        return self.predictor.is_native([self.table.gt(i).numpy() for i in support_ids])

    def native_support(self, support_ids: Sequence[str]) -> Any:
        """:meth:`Predictor.encode_support` of the original-size support images (native crops of small
        defects); the last 64 sets are kept (the false-alarm images reuse their class's sets)."""
        key = tuple(support_ids)
        if key not in self._supports:
            if len(self._supports) >= 64:
                self._supports.pop(next(iter(self._supports)))
            self._supports[key] = self.predictor.encode_support([self.table.image(i) for i in key],
                                                                [self.table.gt(i).numpy() for i in key])
        return self._supports[key]

    def native_level(self, support: Any, query_id: str) -> Any:
        """A native support set (:meth:`native_support`) with the reference level of the query's material (a copy;
        unchanged when that material has no references)."""
        refs = self.references.get(material(str(self.table.row(query_id).class_name)))
        if not refs:
            return support
        from dataclasses import replace

        return replace(support, level=self.predictor.support_level(support, [self.table.image(i) for i in refs]))

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
            feats = self.predictor.encode_images([self.table.image(i) for i in chunk])
            self._append(chunk, feats, self.predictor.mask_batch([self.table.mask(i) for i in chunk]))

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


def fold_references(params: Params, fold: int, predictor: Predictor) -> dict[str, list[str]]:
    """The reference image ids by material that go with the episodes of ``fold`` for this model: the fold's
    :func:`pipeline.episodes.reference_images` (training-side ``Nd`` only) when the model file's gate was
    calibrated with references (``presence_references`` in its meta), else ``{}``."""
    gate = predictor.presence_gate
    if not gate.uses_references:
        return {}
    from pipeline.episodes import reference_images, training_pools

    train, val = training_pools(params, fold)
    return reference_images(params, {**train, **val}, gate.references)


def open_store_for(params: Params, predictor: Predictor, data_dir: Path) -> Any:
    """The fold-independent feature store if it fits the model (frozen, same backbone and ``S``, ``encode`` =
    the backbone's features: ``caches_features``), else None."""
    net = predictor.net
    if not getattr(net, "freeze_backbone", False) or not getattr(net, "caches_features", True):
        return None
    from pipeline.features import FeatureStore, feature_store_path

    path = feature_store_path(params, data_dir)
    if not (path / "index.json").is_file():
        log.info("no feature store at %s: encoding images in memory", path)
        return None
    store = FeatureStore.open(path)
    backbone = getattr(net, "config", {}).get("backbone", params.model.backbone)
    if store.backbone != backbone or store.image_size != predictor.image_size:
        log.info("feature store %s is %s@%d, model is %s@%d: encoding in memory", path, store.backbone,
                 store.image_size, backbone, predictor.image_size)
        return None
    return store
