"""What ``dvc metrics show`` and ``dvc plots show`` display: a compact metrics file per fold and the
tables of the comparison plots (written by the ``report`` stage, after every fold is evaluated).

``metrics/summary/fold<f>.json`` (DVC ``metrics:``; values in [0, 1] rounded to 4 decimals, except
``support_gain`` which may be negative)::

    {"<model>": {"k<K>": {"miou": .., "fbiou": .., ["support_gain": ..]}, ["false_alarm_rate": ..]}}

``miou`` / ``fbiou`` are the paper protocol's (every test image the query once); ``support_gain``
is copied from the detailed file when it has one (``metrics/fold<f>.json``, ``<model>.k<K>.support_gain``);
``false_alarm_rate`` is the share of defect-free test images with any predicted defect pixel at the
smallest K. The detailed file stays an ordinary output. ``dvc metrics show --md`` prints one
row per fold with ``3 models x 2 K x 2-3`` columns.

``metrics/curves/val_miou_fold<f>.csv`` (columns ``step,model,val_miou``) and
``metrics/curves/loss_fold<f>.csv`` (``step,model,loss``) come from the training curves
``metrics/train/fold<f>_<model>.csv``, in long form: one row per model and step *where that model has a
value*, no blank cells. (A wide table, one column per model, has blanks wherever the models' steps
differ, e.g. the parameter-free prototype validated once at step 0, and Vega draws a blank as 0.)
``dvc.yaml``'s top-level ``plots:`` draws them with all models in one plot (template
``.dvc/plots/curves.json``: colour = ``model``; a model with a single value, the prototype, is also drawn
as a dashed horizontal line at that value: it has nothing to train, so its score holds at every step),
and the per-class IoU of every model side by side (``metrics/plots/per_class_fold<f>.csv``; template
``.dvc/plots/grouped_bars.json``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.atomic import atomic_write_text
from pipeline.config import Params
from pipeline.layout import Layout

log = logging.getLogger(__name__)

HEADLINE_PROTOCOL = "paper"
CURVE_KINDS = ("val_miou", "loss")


def _num(v: Any) -> float | None:
    return round(float(v), 4) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def compact_fold(detailed: dict[str, Any]) -> dict[str, Any]:
    """The compact view (module docstring) of one ``metrics/fold<f>.json`` dict, read generically: every
    dict-valued top-level key is a model, every ``k<K>`` key under it a K; unknown keys are ignored.

    Raises:
        ValueError: a model has no K with a ``paper`` (or ``miou``) score: not a fold metrics file.
    """
    out: dict[str, Any] = {}
    for model, m in detailed.items():
        if not isinstance(m, dict):
            continue
        entry: dict[str, Any] = {}
        shots = sorted(int(kk[1:]) for kk, by in m.items() if kk[:1] == "k" and kk[1:].isdigit() and isinstance(by, dict))
        for kk, by in ((f"k{k}", m[f"k{k}"]) for k in shots):
            score = by.get(HEADLINE_PROTOCOL) or {}
            cell = {"miou": _num(score.get("miou")), "fbiou": _num(score.get("fbiou"))}
            gain = by.get("support_gain")
            if gain is None and isinstance(by.get("mismatched"), dict):
                gain = by["mismatched"].get("support_gain")
            if _num(gain) is not None:
                cell["support_gain"] = _num(gain)
            entry[kk] = {k: v for k, v in cell.items() if v is not None}
        if not any("miou" in c for c in entry.values()):
            raise ValueError(f"model {model!r} has no {HEADLINE_PROTOCOL!r} mIoU under any k<K>")
        fp = m.get("fp") or {}
        ks = sorted((int(k[1:]), v) for k, v in fp.items() if k[1:].isdigit() and isinstance(v, dict))
        if ks and _num(ks[0][1].get("image_rate")) is not None:
            entry["false_alarm_rate"] = _num(ks[0][1]["image_rate"])
        out[model] = entry
    return out


def curve_table(params: Params, fold: int, kind: str) -> pd.DataFrame | None:
    """Long table ``step, model, <kind>``: one row per model of ``params.model.names`` (in that order) and
    step at which its training curve has a ``kind`` value (the last one if a step repeats, e.g. after a
    resume), sorted by step within a model; no row, hence no blank cell, where a model has no value.
    ``None`` when no model has one.

    Raises:
        ValueError: ``kind`` is not one of :data:`CURVE_KINDS`.
    """
    if kind not in CURVE_KINDS:
        raise ValueError(f"kind must be one of {CURVE_KINDS}, got {kind!r}")
    layout = Layout.of(params)
    parts: list[pd.DataFrame] = []
    for model in params.model.names:
        path = layout.curve(fold, model)
        if not path.is_file():
            continue
        df = pd.read_csv(path)
        if kind not in df.columns:
            continue
        part = df.loc[df[kind].notna(), ["step", kind]].drop_duplicates("step", keep="last")
        if part.empty:
            continue
        parts.append(part.sort_values("step").assign(model=model)[["step", "model", kind]])
    return pd.concat(parts, ignore_index=True) if parts else None


def write_summaries(params: Params) -> list[Path]:
    """Write the compact metrics of every evaluated fold and the curve tables of every trained fold
    (atomically; stale files of folds that no longer exist are removed); returns the paths written.

    Raises:
        ValueError: a ``metrics/fold<f>.json`` is not a fold metrics file (names it).
    """
    layout = Layout.of(params)
    written: list[Path] = []
    keep: set[Path] = set()
    for fold in sorted(params.folds):
        src = layout.fold_metrics(fold)
        if src.is_file():
            try:
                compact = compact_fold(json.loads(src.read_text()))
            except ValueError as exc:
                raise ValueError(f"{src}: {exc}; re-run `lerenet evaluate --fold {fold}`") from None
            dest = layout.fold_summary(fold)
            atomic_write_text(dest, json.dumps(compact, indent=2) + "\n")
            written.append(dest)
        for kind in CURVE_KINDS:
            table = curve_table(params, fold, kind)
            if table is not None:
                dest = layout.curve_plot(fold, kind)
                atomic_write_text(dest, table.to_csv(index=False, float_format="%.6f"))
                written.append(dest)
    keep.update(written)
    for folder in (layout.summary_dir, layout.curves_dir):
        for stale in folder.glob("*") if folder.is_dir() else []:
            if stale.is_file() and stale not in keep:
                stale.unlink()
    log.info("DVC summaries: %d file(s) under %s and %s", len(written), layout.summary_dir, layout.curves_dir)
    return written
