"""Cross-validation cells of a registered model: one (fold, protocol, K) score each, with the hash of the saved
episodes it was scored on, so that the champion/challenger gate (:func:`pipeline.registry.promote`) compares only
scores of identical episodes. Read from ``metrics/fold<f>.json`` (:func:`collect_cv_cells`), checked and flattened
into the register run's metrics (:func:`cv_tags`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.config import PRODUCTION_MODEL, Params
from pipeline.layout import Layout


class RegistryError(RuntimeError):
    """The registry is in a state the operation cannot accept; the message says what and what to do."""


@dataclass(frozen=True)
class CvCell:
    """One cross-validation result: a model scored on one fold's saved episodes.

    Attributes:
        fold: fold index (its test classes are novel to the model).
        protocol: ``paper`` or ``standard`` (docs/architecture.md).
        shots: K, support images per episode.
        miou: mean foreground IoU over the fold's test classes, in [0, 1].
        fb_iou: mean of foreground and background IoU, in [0, 1].
        episodes: content hash of the episode file scored (:func:`episodes_hash`).
    """

    fold: int
    protocol: str
    shots: int
    miou: float
    fb_iou: float
    episodes: str

    @property
    def key(self) -> str:
        """Tag prefix of the cell, ``cv.f<fold>.<protocol>.k<K>``."""
        return f"cv.f{self.fold}.{self.protocol}.k{self.shots}"


def episodes_hash(path: Path) -> str:
    """Content hash (sha256[:16]) of a saved episode file, independent of parquet encoding.

    Hashes the JSON of its rows (``episode, seed, class_name, support_ids, query_id``), so two
    files with the same episodes hash equal even if written by different library versions.

    Raises:
        FileNotFoundError: the file does not exist (run ``lerenet split``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: saved episode file not found; run `lerenet split` first")
    df = pd.read_parquet(path)
    cols = [c for c in ("episode", "seed", "class_name", "support_ids", "query_id") if c in df.columns]
    rows = [[_jsonable(v) for v in r] for r in df[cols].itertuples(index=False, name=None)]
    return hashlib.sha256(json.dumps([cols, rows], sort_keys=True).encode()).hexdigest()[:16]


def _jsonable(v: Any) -> Any:
    if hasattr(v, "tolist"):
        return v.tolist()
    if hasattr(v, "item"):
        return v.item()
    return v


def cv_tags(cells: Iterable[CvCell]) -> dict[str, str]:
    """Per-cell values and their per-(protocol, K) means over folds (values formatted ``%.6f``): the register
    run's metrics, and the check that the cells are usable (the version's tags are the few summary tags
    of :func:`pipeline.registry_text.summary_tags`).

    Raises:
        RegistryError: no cells, or a metric outside [0, 1].
    """
    cells = list(cells)
    if not cells:
        raise RegistryError("no cross-validation metrics to register; run `lerenet evaluate` for every fold first")
    tags: dict[str, str] = {}
    groups: dict[tuple[str, int], list[CvCell]] = {}
    for c in cells:
        for name, v in (("miou", c.miou), ("fb_iou", c.fb_iou)):
            if not 0.0 <= float(v) <= 1.0:
                raise RegistryError(f"{c.key}.{name} = {v} is outside [0, 1]")
        tags[f"{c.key}.miou"] = f"{c.miou:.6f}"
        tags[f"{c.key}.fb_iou"] = f"{c.fb_iou:.6f}"
        tags[f"{c.key}.episodes"] = c.episodes
        groups.setdefault((c.protocol, c.shots), []).append(c)
    for (protocol, k), cs in sorted(groups.items()):
        tags[f"cv.{protocol}.k{k}.miou"] = f"{sum(c.miou for c in cs) / len(cs):.6f}"
        tags[f"cv.{protocol}.k{k}.fb_iou"] = f"{sum(c.fb_iou for c in cs) / len(cs):.6f}"
        tags[f"cv.{protocol}.k{k}.folds"] = ",".join(str(c.fold) for c in sorted(cs, key=lambda c: c.fold))
    tags["protocol"] = ",".join(sorted({c.protocol for c in cells}))
    return tags


def collect_cv_cells(params: Params, model_name: str = PRODUCTION_MODEL, data_dir: Path | None = None) -> list[CvCell]:
    """Read the CV results of ``model_name`` from every fold's ``metrics/fold<f>.json`` (``pipeline.evaluate``).

    Each (K, protocol) score gives one cell with its mIoU / FB-IoU (for the standard protocol the mean
    over seeds: :class:`pipeline.evaluation.results.ProtocolScore`) and the hash of the episode file
    it was scored on.

    Raises:
        RegistryError: a fold's metrics file is missing, lacks ``model_name`` or a metric (run ``lerenet evaluate``).
    """
    from pipeline.evaluation.results import FoldMetrics

    layout = Layout.of(params, data_dir)
    cells = []
    for fold in sorted(params.folds):
        path = layout.fold_metrics(fold)
        if not path.is_file():
            raise RegistryError(f"{path} missing: evaluate fold {fold} first (`lerenet evaluate --fold {fold}`)")
        try:
            fm = FoldMetrics.read(path)
        except KeyError as exc:
            raise RegistryError(f"{path}: a score lacks {exc}; re-run `lerenet evaluate --fold {fold}`") from None
        if model_name not in fm.models:
            raise RegistryError(f"{path} has no results for model {model_name!r} (has {sorted(fm.models)}); "
                                f"add it to model.names and re-run `lerenet evaluate --fold {fold}`")
        for k, by_protocol in fm.models[model_name].scores.items():
            for protocol, score in by_protocol.items():
                cells.append(CvCell(fold, protocol, k, score.miou, score.fbiou,
                                    episodes_hash(layout.episodes(fold, protocol, k))))
    return cells


__all__ = ["CvCell", "RegistryError", "collect_cv_cells", "cv_tags", "episodes_hash"]
