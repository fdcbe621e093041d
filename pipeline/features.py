"""Backbone feature cache for frozen backbones: encode every image once, reuse everywhere.

With a frozen backbone, ``net.encode`` is a fixed function of the image, so its output for
each image (and for a few augmented views of it) is computed once per data version and reused
across training episodes, shots, epochs, folds, models and the evaluation's standard-protocol episodes.
This is what makes the CPU budget reachable (see docs/results.md for the measured speed-up).

Store layout (a folder, ``<data>/features/<backbone>_<S>/``, DVC stage ``features``):

* ``feats.npy``  -- float16 ``(R, Cb, h, w)`` (NumPy ``.npy``, opened as a read-only memmap);
* ``masks.npy``  -- uint8 ``(R, ceil(S*S/8))``: the view's binary mask at ``S x S``, bit-packed
  with ``np.packbits`` (row-major);
* ``index.json`` -- settings (backbone, weights, image size, views, augmentation seed), the
  content key, ``feat_shape`` and, per image id, the row of each view.

View 0 of every validated image (defect and defect-free ``normal``) is the clean image resized
to ``S x S`` (:func:`pipeline.augment.clean_pair`). Views ``1..V`` (``params.train.feature_views``)
exist for defect images only and are augmented with :mod:`pipeline.augment`, the seed of view
``v`` of image ``id`` being derived from ``(FEATURE_SEED, id, v)``: independent of build order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from pipeline.augment import augment_pair, build_augment, clean_pair, to_tensor_pair
from pipeline.config import Params
from pipeline.device import configure_threads
from pipeline.images import load_validated, read_image, read_mask, replace_dir, resolve
from pipeline.layout import FEATURES_DIR

STORE_VERSION = 1
#: seed of the cached augmented views: fixed, so that runs with other ``train.seed`` values (which
#: draw other episodes and other views per episode) share one store instead of rebuilding it
FEATURE_SEED = 0
FEATS, MASKS, INDEX = "feats.npy", "masks.npy", "index.json"


class FeatureStoreError(RuntimeError):
    """The feature store is missing, stale or does not contain what was asked for."""


def feature_store_path(params: Params, data_dir: Path | None = None) -> Path:
    """``<data_dir or params.data.dir>/features/<backbone>_<image_size>``."""
    base = Path(data_dir) if data_dir is not None else params.data.dir
    return base / FEATURES_DIR / f"{params.model.backbone}_{params.train.image_size}"


def view_seed(seed: int, image_id: str, view: int) -> int:
    """Augmentation seed of ``view`` of ``image_id``: first 8 bytes of sha256(seed:id:view), as int."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{image_id}:{view}".encode()).digest()[:8], "little")


def _settings(params: Params) -> dict[str, Any]:
    return {
        "version": STORE_VERSION,
        "backbone": params.model.backbone,
        "weights": str(params.model.weights) if params.model.weights else None,
        "image_size": params.train.image_size,
        "feature_views": params.train.feature_views if params.train.augment else 0,
        "augment_seed": FEATURE_SEED,
        "mask_threshold": params.data.mask_threshold,
    }


def _content_key(settings: dict[str, Any], rows: pd.DataFrame) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for i, sha, kind in sorted(zip(rows["id"], rows["sha256"], rows["kind"])):
        h.update(f"{i}:{sha}:{kind};".encode())
    return h.hexdigest()


def build_encoder(params: Params) -> torch.nn.Module:
    """A frozen network whose ``encode`` produces the cached features (``params.model.backbone``,
    ImageNet or ``params.model.weights``); the head is irrelevant, the prototype model is used."""
    from pipeline.checkpoint import build_net

    return build_net(params, "prototype").eval()


def _views_of_row(row: Any, params: Params, data_dir: Path, n_aug: int, pipeline: Any
                  ) -> list[tuple[np.ndarray, np.ndarray]]:
    image = read_image(resolve(data_dir, row.image_path))
    mask = None
    if row.kind == "defect":
        mask = read_mask(resolve(data_dir, row.mask_path), params.data.mask_threshold)
        if mask.shape != image.shape[:2]:
            raise FeatureStoreError(f"{row.mask_path}: mask {mask.shape} and image {image.shape[:2]} differ in size "
                                    "(validation should have rejected it: re-run `dvc repro validate`)")
    views = [clean_pair(image, mask, params.train.image_size)]
    if row.kind == "defect":
        for v in range(1, n_aug + 1):
            views.append(augment_pair(pipeline, image, mask, view_seed(FEATURE_SEED, row.id, v)))
    return views


def build_feature_store(params: Params, data_dir: Path | None = None, *, net: torch.nn.Module | None = None,
                        batch_size: int = 32, progress: bool = True, force: bool = False) -> Path:
    """Encode every validated image (clean view + augmented views) once and store the features.

    Idempotent: if a store with the same content key (settings + every image id/sha256) already
    exists it is returned untouched, without running the backbone. The backbone runs with the
    project's thread policy (:func:`pipeline.device.configure_threads`: ``$LERENET_TORCH_THREADS``
    or every core), as training does: oneDNN's convolution results differ in the last float16 bit
    between thread counts, so a store built in a process that happened to run with another count
    would change the trained weights (issue 14 item 2). The count is recorded as ``torch_threads``.

    Args:
        params: validated params (backbone, ``train.image_size``, ``train.feature_views``, seed).
        data_dir: data folder holding ``validated.parquet`` (default ``params.data.dir``).
        net: a network with a frozen ``encode`` (default :func:`build_encoder`); tests pass one
            to count calls.
        batch_size: images per ``encode`` call.
        progress: show a tqdm bar.
        force: rebuild even if a matching store exists.

    Returns:
        The store folder (see module docstring), ready for :meth:`FeatureStore.open`.

    Raises:
        FeatureStoreError: the backbone is not frozen (``model.freeze_backbone: false``: features
            change during training, nothing can be cached) or an image/mask pair is inconsistent.
        DataArtifactError: ``validated.parquet`` is missing (run ``dvc repro validate``).
    """
    if not params.model.freeze_backbone:
        raise FeatureStoreError("model.freeze_backbone is false: a fine-tuned backbone's features cannot be "
                                "cached; train on images instead (pipeline.train does this automatically)")
    data_dir = Path(data_dir) if data_dir is not None else params.data.dir
    rows = load_validated(data_dir).sort_values("id").reset_index(drop=True)
    settings = _settings(params)
    key = _content_key(settings, rows)
    out = feature_store_path(params, data_dir)
    if not force and (out / INDEX).is_file():
        try:
            if json.loads((out / INDEX).read_text()).get("key") == key:
                return out
        except (OSError, json.JSONDecodeError):
            pass  # unreadable index: rebuild

    n_aug = settings["feature_views"]
    s = params.train.image_size
    counts = [1 + (n_aug if k == "defect" else 0) for k in rows["kind"]]
    total = int(sum(counts))
    threads = configure_threads(torch.device("cpu"))  # the backbone's conv results depend on the thread count
    net = build_encoder(params) if net is None else net
    pipeline = build_augment(s)
    with torch.inference_mode():
        probe = net.encode(torch.zeros(1, 3, s, s))
    feat_shape = tuple(int(x) for x in probe.shape[1:])

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.perf_counter()
    try:
        feats = np.lib.format.open_memmap(tmp / FEATS, mode="w+", dtype=np.float16, shape=(total, *feat_shape))
        masks = np.lib.format.open_memmap(tmp / MASKS, mode="w+", dtype=np.uint8, shape=(total, (s * s + 7) // 8))
        index: dict[str, list[int]] = {}
        pending: list[tuple[np.ndarray, np.ndarray]] = []
        next_row = 0
        written = 0

        def flush() -> None:
            nonlocal written
            if not pending:
                return
            imgs = torch.stack([to_tensor_pair(i, m)[0] for i, m in pending])
            with torch.inference_mode():
                f = net.encode(imgs)
            feats[written:written + len(pending)] = f.float().numpy().astype(np.float16)
            for j, (_, m) in enumerate(pending):
                masks[written + j] = np.packbits(m.reshape(-1))
            written += len(pending)
            pending.clear()

        bar = tqdm(total=total, desc=f"features {out.name}", unit="view", disable=not progress)
        for row in rows.itertuples(index=False):
            views = _views_of_row(row, params, data_dir, n_aug, pipeline)
            index[row.id] = list(range(next_row, next_row + len(views)))
            next_row += len(views)
            pending.extend(views)
            if len(pending) >= batch_size:
                n = len(pending)
                flush()
                bar.update(n)
        n = len(pending)
        flush()
        bar.update(n)
        bar.close()
        feats.flush()
        masks.flush()
        del feats, masks
        meta = {**settings, "key": key, "feat_shape": list(feat_shape), "rows": total, "torch_threads": threads,
                "build_seconds": round(time.perf_counter() - t0, 2), "index": index}
        (tmp / INDEX).write_text(json.dumps(meta))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class FeatureStore:
    """Read access to a store written by :func:`build_feature_store` (memory-mapped, read-only)."""

    def __init__(self, path: Path, meta: dict[str, Any], feats: np.ndarray, masks: np.ndarray) -> None:
        self.path = Path(path)
        self.meta = meta
        self._feats = feats
        self._masks = masks
        self._index: dict[str, list[int]] = meta["index"]

    @classmethod
    def open(cls, path: str | os.PathLike[str], in_memory: bool = False) -> "FeatureStore":
        """Open a store folder; ``in_memory=True`` reads the features into RAM instead of mapping.

        Raises:
            FeatureStoreError: folder or one of its files missing (run ``lerenet features`` /
                ``dvc repro features``).
        """
        path = Path(path)
        for name in (INDEX, FEATS, MASKS):
            if not (path / name).is_file():
                raise FeatureStoreError(f"{path / name} is missing: build the store with `lerenet features` "
                                        "(DVC stage `features`)")
        meta = json.loads((path / INDEX).read_text())
        mode = None if in_memory else "r"
        return cls(path, meta, np.load(path / FEATS, mmap_mode=mode), np.load(path / MASKS, mmap_mode=mode))

    # ---------------------------------------------------------------- properties
    @property
    def ids(self) -> list[str]:
        """Manifest ids of all stored images."""
        return list(self._index)

    @property
    def image_size(self) -> int:
        """``S``: views are ``S x S`` images."""
        return int(self.meta["image_size"])

    @property
    def backbone(self) -> str:
        """Backbone name the features come from."""
        return str(self.meta["backbone"])

    @property
    def feat_shape(self) -> tuple[int, int, int]:
        """``(Cb, h, w)`` of one stored feature map."""
        return tuple(self.meta["feat_shape"])  # type: ignore[return-value]

    @property
    def key(self) -> str:
        """Content key (settings + image hashes): equal keys mean equal stores."""
        return str(self.meta["key"])

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def views_of(self, image_id: str) -> int:
        """Number of views stored for ``image_id`` (1 + augmented views; defect-free images: 1)."""
        return len(self._rows_of(image_id))

    def _rows_of(self, image_id: str) -> list[int]:
        try:
            return self._index[image_id]
        except KeyError:
            raise FeatureStoreError(f"image id {image_id!r} is not in the feature store {self.path}; the store is "
                                    "stale for this data version: re-run `lerenet features`") from None

    def rows(self, ids: Sequence[str], views: int | Sequence[int] = 0) -> np.ndarray:
        """Row numbers of ``(id, view)`` pairs; ``views`` is one view for all ids or one per id.

        Raises:
            FeatureStoreError: unknown id, or a view the id does not have.
            ValueError: ``views`` and ``ids`` lengths differ.
        """
        vs = [int(views)] * len(ids) if isinstance(views, (int, np.integer)) else [int(v) for v in views]
        if len(vs) != len(ids):
            raise ValueError(f"got {len(ids)} ids and {len(vs)} views")
        out = np.empty(len(ids), dtype=np.int64)
        for j, (i, v) in enumerate(zip(ids, vs)):
            r = self._rows_of(i)
            if not 0 <= v < len(r):
                raise FeatureStoreError(f"image {i!r} has views 0..{len(r) - 1} in {self.path}, asked for view {v}")
            out[j] = r[v]
        return out

    def get(self, ids: Sequence[str], views: int | Sequence[int] = 0) -> torch.Tensor:
        """Backbone features of ``ids``: ``(N, Cb, h, w)`` float32 (stored as float16).

        ``views``: 0 = clean image (use for evaluation), 1..V = augmented views.
        """
        r = self.rows(ids, views)
        return torch.from_numpy(np.asarray(self._feats[r], dtype=np.float32))

    def masks(self, ids: Sequence[str], views: int | Sequence[int] = 0) -> torch.Tensor:
        """Binary masks of the same views at ``S x S``: ``(N, 1, S, S)`` float in {0, 1}."""
        r = self.rows(ids, views)
        s = self.image_size
        bits = np.unpackbits(np.asarray(self._masks[r]), axis=1, count=s * s)
        return torch.from_numpy(bits.reshape(len(r), 1, s, s).astype(np.float32))
