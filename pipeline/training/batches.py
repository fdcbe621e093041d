"""Episode batches for training: assembled from cached features, or read and augmented from images.

* :class:`CachedEpisodes` (frozen backbone): a random stored view (clean or augmented) per image per
  episode from the feature store (:mod:`pipeline.features`); the backbone never runs.
* :class:`ImageEpisodes` (fine-tuned backbone, or ``use_cache=False``): a map-style dataset read and
  augmented on the fly (:mod:`pipeline.augment`; clean view from :mod:`pipeline.inference.preprocess`)
  by a ``torch.utils.data.DataLoader`` (:func:`image_loader`; workers ``train.num_workers``, pinned
  memory on CUDA).

Episode ``i`` depends only on ``(train.seed, i)`` (:func:`pipeline.episodes.episode_rng`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from pipeline.augment import augment_pair, build_augment
from pipeline.config import Params
from pipeline.episodes import Episode, Pools, draw_episode, episode_rng
from pipeline.features import FeatureStore, view_seed
from pipeline.images import read_image, read_mask, resolve
from pipeline.inference import native
from pipeline.inference.preprocess import clean_pair, to_tensor_pair


def total_steps(params: Params) -> int:
    """``ceil(train.episodes / train.batch_size)``."""
    return math.ceil(params.train.episodes / params.train.batch_size)


class CachedEpisodes:
    """Episodes assembled from a :class:`FeatureStore` (frozen backbone): no backbone call."""

    def __init__(self, store: FeatureStore, pools: Pools, shots: int, seed: int, augment: bool,
                 negative_share: float = 0.0, normals: Pools | None = None) -> None:
        self.store, self.pools, self.shots, self.seed, self.augment = store, pools, shots, seed, augment
        self.negative_share, self.normals = negative_share, normals or {}

    def batch(self, first: int, n: int) -> dict[str, Any]:
        """Episodes ``first .. first+n-1``: features ``(n,K,Cb,h,w)``, ``(n,Cb,h,w)``; masks ``(n,K,1,S,S)``,
        ``(n,1,S,S)`` (all zero for a negative episode's query, :func:`pipeline.episodes.draw_episode`)."""
        sup, qry, sv, qv, empty = [], [], [], [], []
        for idx in range(first, first + n):
            rng = episode_rng(self.seed, idx)
            ep = draw_episode(self.pools, self.shots, rng, self.negative_share, self.normals)
            ids = [*ep.support_ids, ep.query_id]
            views = [int(rng.integers(self.store.views_of(i))) if self.augment else 0 for i in ids]
            sup.extend(ep.support_ids)
            qry.append(ep.query_id)
            sv.extend(views[:-1])
            qv.append(views[-1])
            empty.append(ep.negative)
        return gather(self.store, sup, qry, sv, qv, n, self.shots, empty)


def gather(store: FeatureStore, sup: Sequence[str], qry: Sequence[str], sv: Sequence[int] | int,
           qv: Sequence[int] | int, n: int, k: int, empty: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
    """A batch of ``n`` K-shot episodes from the store: support ids ``sup`` (n*K) and views ``sv``, query
    ids ``qry`` and views ``qv`` -> ``support_feats (n,K,Cb,h,w)``, ``support_masks (n,K,1,S,S)``,
    ``query_feats (n,Cb,h,w)``, ``query_masks (n,1,S,S)``; ``empty[j]``: query ``j``'s target is all zeros."""
    s = store.image_size
    query_masks = store.masks(qry, qv)
    if empty is not None and any(empty):
        query_masks = query_masks * (~torch.tensor(list(empty), dtype=torch.bool)).view(n, 1, 1, 1).to(query_masks.dtype)
    return {
        "support_feats": store.get(sup, sv).unflatten(0, (n, k)),
        "support_masks": store.masks(sup, sv).reshape(n, k, 1, s, s),
        "query_feats": store.get(qry, qv),
        "query_masks": query_masks,
    }


class ImageEpisodes(torch.utils.data.Dataset):
    """Map-style dataset: item ``i`` = training episode ``i`` as images (read + augmented on the fly).

    Item: ``support_images (K,3,S,S)``, ``support_masks (K,1,S,S)``, ``query_images (3,S,S)``,
    ``query_masks (1,S,S)``; floats in [0, 1] / {0, 1}. Works in DataLoader worker processes.

    ``native_area`` (SOFS non-resizing, :mod:`pipeline.inference.native`): an augmented view of an
    image whose defect covers at most this share (or none: normal and negative queries) is taken from
    a random native-resolution crop around a defect pixel (:func:`~pipeline.inference.native.crop_box`),
    seeded like the augmentation. Clean views (fixed validation episodes) stay whole.
    """

    def __init__(self, params: Params, pools: Pools, rows: dict[str, Any], augment: bool,
                 episodes: Sequence[Episode] | None = None, normals: Pools | None = None,
                 native_area: float | None = None) -> None:
        self.params, self.pools, self.rows, self.augment = params, pools, rows, augment
        self.normals, self.native_area = normals or {}, native_area
        self.fixed = list(episodes) if episodes is not None else None
        self.pipeline = build_augment(params.train.image_size)

    def __len__(self) -> int:
        return len(self.fixed) if self.fixed is not None else total_steps(self.params) * self.params.train.batch_size

    def _pair(self, image_id: str, seed: int | None, empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[image_id]
        data_dir = self.params.data.dir
        image = read_image(resolve(data_dir, row["image_path"]))
        if empty or not row.get("mask_path"):
            mask = np.zeros(image.shape[:2], bool)
        else:
            mask = read_mask(resolve(data_dir, row["mask_path"]), self.params.data.mask_threshold)
        if seed is None:
            return to_tensor_pair(*clean_pair(image, mask, self.params.train.image_size))
        if self.native_area is not None and native.defect_share(mask) <= self.native_area:
            box = native.crop_box(mask, self.params.train.image_size, np.random.default_rng(seed))
            image, mask = native.cut(image, box), native.cut(mask, box)
        return to_tensor_pair(*augment_pair(self.pipeline, image, mask, seed))

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if self.fixed is not None:
            ep, seeds = self.fixed[idx], None
        else:
            t = self.params.train
            ep = draw_episode(self.pools, t.shots, episode_rng(t.seed, idx), t.negative_share, self.normals)
            seeds = self.augment
        ids = [*ep.support_ids, ep.query_id]
        pairs = [self._pair(i, view_seed(self.params.train.seed, f"{idx}:{i}", j) if seeds else None,
                            empty=ep.negative and j == len(ids) - 1)
                 for j, i in enumerate(ids)]
        return {
            "support_images": torch.stack([p[0] for p in pairs[:-1]]),
            "support_masks": torch.stack([p[1] for p in pairs[:-1]]),
            "query_images": pairs[-1][0],
            "query_masks": pairs[-1][1],
        }


def image_loader(params: Params, pools: Pools, rows: dict[str, Any], start_step: int,
                 device: torch.device, normals: Pools | None = None,
                 native_area: float | None = None) -> torch.utils.data.DataLoader:
    """A DataLoader over :class:`ImageEpisodes` yielding the batches of steps ``start_step ..`` (resume)."""
    t = params.train
    ds = ImageEpisodes(params, pools, rows, augment=t.augment, normals=normals, native_area=native_area)
    sampler = range(start_step * t.batch_size, total_steps(params) * t.batch_size)
    return torch.utils.data.DataLoader(
        ds, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=t.num_workers > 0,
        generator=torch.Generator().manual_seed(t.seed))  # worker seeds never touch the global RNG


def check_store(store: FeatureStore, net: torch.nn.Module, params: Params, rows: dict[str, Any]) -> None:
    """Guard against a stale store: re-encode one image and compare with its cached view 0.

    Raises:
        pipeline.features.FeatureStoreError: other backbone/size, or features that differ (names the image).
    """
    from pipeline.features import FeatureStoreError

    if store.image_size != params.train.image_size or store.backbone != params.model.backbone:
        raise FeatureStoreError(f"{store.path} holds {store.backbone} features at {store.image_size}px; params want "
                                f"{params.model.backbone} at {params.train.image_size}px: run `lerenet features`")
    image_id = sorted(i for i in rows if i in store)[0]
    row = rows[image_id]
    img, _ = clean_pair(read_image(resolve(params.data.dir, row["image_path"])), None, params.train.image_size)
    with torch.inference_mode():
        fresh = net.encode(to_tensor_pair(img, np.zeros(img.shape[:2], bool))[0][None].to(next(net.parameters()).device))
    cached = store.get([image_id], 0).to(fresh.device)
    tol = 1e-2 * float(fresh.abs().max()) + 1e-2
    if fresh.shape != cached.shape or float((fresh.float() - cached).abs().max()) > tol:
        raise FeatureStoreError(f"{store.path}: cached features of image {image_id} differ from this backbone's "
                                "encode output (different weights?); rebuild with `lerenet features --force`")
