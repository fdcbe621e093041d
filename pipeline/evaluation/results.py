"""Typed fold metrics: what ``metrics/fold<f>.json`` holds, read and written in one place.

Schema of the file (unchanged; ``docs/architecture.md``)::

    {model: {"k<K>": {"paper": {"miou", "fbiou", "episodes"},
                      "standard": {"miou_mean", "miou_std", "fbiou_mean", "fbiou_std", "seeds", "episodes"},
                      "mismatched": {"miou", "fbiou", "episodes"},
                      "support_gain": paper miou - mismatched miou},
             "fp": {"k<K>": {"area_fraction", "image_rate", "images", "per_class": {class: {...}}}},
             "latency_ms": {"k<K>": ms}},
     "device": "..."}

The key convention (``miou`` for the paper protocol, ``miou_mean`` for the standard protocol's mean
over seeds) lives only in :class:`ProtocolScore`; readers use ``score.miou`` / ``score.fbiou``
whatever the protocol. IoU values are in [0, 1]; floats are rounded to 4 decimals on writing.

``mismatched`` (the paper episodes with the support from another novel class of the fold,
pipeline/split.py) is a control, not a quality protocol: it is kept in
:attr:`ModelMetrics.mismatched`, apart from :attr:`ModelMetrics.scores`, so that whatever ranks
models on ``scores`` (the registry's promotion gate, the mIoU tables) never averages it in.
``support_gain`` is derived (:meth:`ModelMetrics.support_gain`), never read back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: protocols scored over several seeds (reported as mean +- sample std over seeds)
SEEDED_PROTOCOLS = ("standard",)
#: the support-sensitivity control: scored on ``episodes/fold<f>_mismatched_k<K>.parquet`` whenever
#: ``paper`` is, held in :attr:`ModelMetrics.mismatched`
MISMATCHED = "mismatched"
#: the key of ``paper miou - mismatched miou`` inside ``"k<K>"``
SUPPORT_GAIN = "support_gain"


def _rounded(obj: Any, nd: int = 4) -> Any:
    if isinstance(obj, float):
        return round(obj, nd)
    if isinstance(obj, dict):
        return {k: _rounded(v, nd) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_rounded(v, nd) for v in obj]
    return obj


@dataclass(frozen=True)
class ProtocolScore:
    """mIoU and FB-IoU of one model, K and protocol on one fold (values in [0, 1]).

    For a seeded protocol (``standard``) ``miou``/``fbiou`` are means over ``seeds`` seeds and
    ``miou_std``/``fbiou_std`` the sample std (ddof=1); for ``paper`` the stds and seeds are ``None``.
    """

    protocol: str
    miou: float
    fbiou: float
    episodes: int
    miou_std: float | None = None
    fbiou_std: float | None = None
    seeds: int | None = None

    @property
    def seeded(self) -> bool:
        """True for a protocol reported as mean +- std over seeds."""
        return self.protocol in SEEDED_PROTOCOLS

    def std(self, metric: str) -> float | None:
        """Sample std over seeds of ``metric`` (``"miou"`` | ``"fbiou"``); ``None`` for ``paper``."""
        return {"miou": self.miou_std, "fbiou": self.fbiou_std}[metric]

    def value(self, metric: str) -> float:
        """``miou`` or ``fbiou`` by name."""
        return {"miou": self.miou, "fbiou": self.fbiou}[metric]

    def to_json(self) -> dict[str, Any]:
        """The file's keys: ``{miou, fbiou, episodes}`` or ``{miou_mean, miou_std, fbiou_mean, fbiou_std,
        seeds, episodes}``."""
        if self.seeded:
            return {"miou_mean": self.miou, "miou_std": self.miou_std, "fbiou_mean": self.fbiou,
                    "fbiou_std": self.fbiou_std, "seeds": self.seeds, "episodes": self.episodes}
        return {"miou": self.miou, "fbiou": self.fbiou, "episodes": self.episodes}

    @classmethod
    def from_json(cls, protocol: str, d: dict[str, Any]) -> ProtocolScore:
        """Inverse of :meth:`to_json`.

        Raises:
            KeyError: a key of the protocol's schema is missing (names it).
        """
        if protocol in SEEDED_PROTOCOLS:
            return cls(protocol, float(d["miou_mean"]), float(d["fbiou_mean"]), int(d["episodes"]),
                       float(d["miou_std"]), float(d["fbiou_std"]), int(d["seeds"]))
        return cls(protocol, float(d["miou"]), float(d["fbiou"]), int(d["episodes"]))


@dataclass(frozen=True)
class FalseAlarms:
    """Predicted defects on defect-free images: mean defect-area fraction in [0, 1], share of images
    with any defect pixel in [0, 1], image count, and the same per class (``{class: FalseAlarms}``)."""

    area_fraction: float
    image_rate: float
    images: int
    per_class: dict[str, FalseAlarms] | None = None

    def to_json(self) -> dict[str, Any]:
        """``{area_fraction, image_rate, images[, per_class]}``."""
        d: dict[str, Any] = {"area_fraction": self.area_fraction, "image_rate": self.image_rate,
                             "images": self.images}
        if self.per_class is not None:
            d["per_class"] = {c: v.to_json() for c, v in self.per_class.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FalseAlarms:
        """Inverse of :meth:`to_json`."""
        per = d.get("per_class")
        return cls(float(d["area_fraction"]), float(d["image_rate"]), int(d["images"]),
                   None if per is None else {c: cls.from_json(v) for c, v in per.items()})


@dataclass
class ModelMetrics:
    """Everything measured for one model on one fold.

    Attributes:
        scores: ``{K: {protocol: ProtocolScore}}`` for the protocols of ``evaluate.protocols``
            (insertion order = the file's order).
        mismatched: ``{K: ProtocolScore}`` (protocol ``"mismatched"``) for the K whose fold has a
            mismatched episode set (none when the fold has a single test class or ``paper`` is not evaluated).
        fp: ``{K: FalseAlarms}`` for the K with defect-free test images (may be empty).
        latency_ms: ``{K: median ms per query}``.
    """

    scores: dict[int, dict[str, ProtocolScore]] = field(default_factory=dict)
    fp: dict[int, FalseAlarms] = field(default_factory=dict)
    latency_ms: dict[int, float] = field(default_factory=dict)
    mismatched: dict[int, ProtocolScore] = field(default_factory=dict)

    def score(self, shots: int, protocol: str) -> ProtocolScore:
        """The score of K = ``shots`` under ``protocol`` (``KeyError`` if it was not evaluated);
        ``protocol="mismatched"`` reads :attr:`mismatched`."""
        if protocol == MISMATCHED:
            return self.mismatched[shots]
        return self.scores[shots][protocol]

    def support_gain(self, shots: int) -> float | None:
        """Support gain at K = ``shots``: paper mIoU - mismatched mIoU (in [-1, 1]; ~0 for a model that
        ignores its support), or ``None`` when either was not evaluated."""
        paper = (self.scores.get(shots) or {}).get("paper")
        other = self.mismatched.get(shots)
        return None if paper is None or other is None else paper.miou - other.miou

    def to_json(self) -> dict[str, Any]:
        """``{"k<K>": {protocol: ..., ["mismatched": ..., "support_gain": x]}, ..., ["fp": {...},]
        "latency_ms": {...}}``.

        ``support_gain`` is written as the difference of the two mIoUs rounded to 4 decimals (the
        file's precision), so the file's numbers add up and a read-write round trip is exact.
        """
        d: dict[str, Any] = {f"k{k}": {p: s.to_json() for p, s in by.items()} for k, by in self.scores.items()}
        for k, s in self.mismatched.items():
            slot = d.setdefault(f"k{k}", {})
            slot[MISMATCHED] = s.to_json()
            gain = self.support_gain(k)
            if gain is not None:
                slot[SUPPORT_GAIN] = round(round(self.score(k, "paper").miou, 4) - round(s.miou, 4), 4)
        if self.fp:
            d["fp"] = {f"k{k}": v.to_json() for k, v in self.fp.items()}
        d["latency_ms"] = {f"k{k}": ms for k, ms in self.latency_ms.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelMetrics:
        """Inverse of :meth:`to_json`."""
        per_k = {int(kk[1:]): by for kk, by in d.items() if kk.startswith("k") and kk[1:].isdigit()}
        scores = {k: {p: ProtocolScore.from_json(p, v) for p, v in by.items() if p not in (MISMATCHED, SUPPORT_GAIN)}
                  for k, by in per_k.items()}
        scores = {k: by for k, by in scores.items() if by}
        mismatched = {k: ProtocolScore.from_json(MISMATCHED, by[MISMATCHED]) for k, by in per_k.items()
                      if MISMATCHED in by}
        fp = {int(kk[1:]): FalseAlarms.from_json(v) for kk, v in (d.get("fp") or {}).items()}
        lat = {int(kk[1:]): float(v) for kk, v in (d.get("latency_ms") or {}).items()}
        return cls(scores, fp, lat, mismatched)


@dataclass
class FoldMetrics:
    """The content of ``metrics/fold<f>.json``: per model :class:`ModelMetrics`, and the device."""

    models: dict[str, ModelMetrics] = field(default_factory=dict)
    device: str | None = None

    def to_json(self) -> dict[str, Any]:
        """``{model: ModelMetrics.to_json(), ..., "device": str}`` (unrounded)."""
        d: dict[str, Any] = {name: m.to_json() for name, m in self.models.items()}
        if self.device is not None:
            d["device"] = self.device
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FoldMetrics:
        """Inverse of :meth:`to_json` (every dict-valued key is a model)."""
        return cls({k: ModelMetrics.from_json(v) for k, v in d.items() if isinstance(v, dict)}, d.get("device"))

    def dumps(self) -> str:
        """The file's text: JSON, indent 2, floats rounded to 4 decimals, trailing newline."""
        return json.dumps(_rounded(self.to_json()), indent=2, sort_keys=False) + "\n"

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write :meth:`dumps` to ``path`` atomically; returns the path."""
        from pipeline.atomic import atomic_write_text

        return atomic_write_text(path, self.dumps())

    @classmethod
    def read(cls, path: str | os.PathLike[str]) -> FoldMetrics:
        """Read a ``metrics/fold<f>.json``.

        Raises:
            FileNotFoundError: no such file. ValueError: not valid JSON. KeyError: a key of the schema is missing.
        """
        return cls.from_json(json.loads(Path(path).read_text()))
