"""Results table: aggregate ``metrics/fold<f>.json`` (written by :mod:`pipeline.evaluate`) into markdown.

Tables (values in %, one decimal; the standard protocol as mean ± std over its seeds):

1. mIoU: one row per (model, K, protocol), one column per fold, and the mean over folds;
2. FB-IoU: the same layout;
3. false alarms on defect-free images: per (model, K) and fold, "mean predicted defect area /
   share of images with any predicted defect";
4. latency: median ms per query per (model, K) and fold, with the device each fold ran on.

A fold whose metrics file is missing is shown as "n/a" (the table says which folds were found).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.images import atomic_write_text


class ReportError(RuntimeError):
    """No metrics to report (names the files looked for and the command that writes them)."""


def load_fold_metrics(params: Params) -> dict[int, dict[str, Any]]:
    """``{fold: content of metrics/fold<f>.json}`` for every fold of ``params.folds`` that has one.

    Raises:
        ReportError: none of the files exists, or one is not valid JSON (names it).
    """
    from pipeline.evaluate import metrics_paths

    out = {}
    for f in sorted(params.folds):
        path = metrics_paths(params, f)["json"]
        if path.is_file():
            try:
                out[f] = json.loads(path.read_text())
            except ValueError as exc:
                raise ReportError(f"{path}: not valid JSON ({exc}); re-run `lerenet evaluate --fold {f}`") from None
    if not out:
        raise ReportError(f"no metrics/fold<f>.json under {params.root / 'metrics'}: run `lerenet evaluate --fold F` "
                          "(or `dvc repro evaluate`) first")
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _cell(d: Mapping[str, Any] | None, metric: str) -> tuple[str, float | None]:
    """Formatted cell and the value used for the fold mean (paper: value; standard: mean ± std)."""
    if not d:
        return "n/a", None
    if metric in d:
        return _pct(d[metric]), float(d[metric])
    mean, std = d.get(f"{metric}_mean"), d.get(f"{metric}_std")
    if mean is None:
        return "n/a", None
    return f"{_pct(mean)} ± {_pct(std)}", float(mean)


def _models(folds: Mapping[int, Mapping[str, Any]]) -> list[str]:
    names: list[str] = []
    for blob in folds.values():
        names += [k for k, v in blob.items() if isinstance(v, dict) and k not in names]
    return names


def _shots(folds: Mapping[int, Mapping[str, Any]], model: str) -> list[str]:
    ks: set[str] = set()
    for blob in folds.values():
        ks |= {k for k in blob.get(model, {}) if k.startswith("k") and k[1:].isdigit()}
    return sorted(ks, key=lambda k: int(k[1:]))


def results_table(folds: Mapping[int, Mapping[str, Any]], fold_ids: list[int] | None = None) -> str:
    """Render the markdown tables for ``{fold: metrics json}``; ``fold_ids`` = columns (default: the keys)."""
    fold_ids = sorted(folds) if fold_ids is None else fold_ids
    head = "| model | K | protocol | " + " | ".join(f"fold {f}" for f in fold_ids) + " | mean over folds |"
    sep = "|" + " --- |" * (4 + len(fold_ids))
    lines: list[str] = []
    for metric, title in (("miou", "mIoU (%)"), ("fbiou", "FB-IoU (%)")):
        lines += [f"### {title}", "", head, sep]
        for model in _models(folds):
            for kk in _shots(folds, model):
                protocols: list[str] = []
                for f in fold_ids:
                    protocols += [p for p in folds.get(f, {}).get(model, {}).get(kk, {}) if p not in protocols]
                for p in protocols:
                    cells, vals = [], []
                    for f in fold_ids:
                        c, v = _cell(folds.get(f, {}).get(model, {}).get(kk, {}).get(p), metric)
                        cells.append(c)
                        if v is not None:
                            vals.append(v)
                    mean = _pct(sum(vals) / len(vals)) if len(vals) == len(fold_ids) else "n/a"
                    lines.append(f"| {model} | {kk[1:]} | {p} | " + " | ".join(cells) + f" | {mean} |")
        lines.append("")
    lines += ["### False alarms on defect-free images (% mean predicted defect area / % images with any predicted defect)",
              "", "| model | K | " + " | ".join(f"fold {f}" for f in fold_ids) + " |",
              "|" + " --- |" * (2 + len(fold_ids))]
    for model in _models(folds):
        for kk in _shots(folds, model):
            cells = []
            for f in fold_ids:
                d = folds.get(f, {}).get(model, {}).get("fp", {}).get(kk)
                cells.append(f"{_pct(d['area_fraction'])} / {_pct(d['image_rate'])} (n={d['images']})" if d else "no Nd images")
            lines.append(f"| {model} | {kk[1:]} | " + " | ".join(cells) + " |")
    lines += ["", "### Latency (median ms per query, full forward pass from decoded images)", "",
              "| model | K | " + " | ".join(f"fold {f}" for f in fold_ids) + " |", "|" + " --- |" * (2 + len(fold_ids))]
    for model in _models(folds):
        for kk in _shots(folds, model):
            cells = []
            for f in fold_ids:
                ms = folds.get(f, {}).get(model, {}).get("latency_ms", {}).get(kk)
                cells.append("n/a" if ms is None else f"{ms:.1f}")
            lines.append(f"| {model} | {kk[1:]} | " + " | ".join(cells) + " |")
    devices = {f: folds[f].get("device") for f in fold_ids if f in folds and folds[f].get("device")}
    if devices:
        lines += ["", "Device: " + "; ".join(f"fold {f}: {d}" for f, d in devices.items())]
    return "\n".join(lines) + "\n"


def write_report(params: Params, out: Path | None = None) -> Path:
    """Write the results table for all folds of ``params`` to ``out`` (default ``docs/results_table.md``).

    Raises:
        ReportError: no fold has metrics (see :func:`load_fold_metrics`).
    """
    folds = load_fold_metrics(params)
    fold_ids = sorted(params.folds)
    missing = [f for f in fold_ids if f not in folds]
    text = ["# Results table (generated by `lerenet report` from metrics/fold*.json; do not edit)", ""]
    if missing:
        text += [f"Folds without metrics (shown as n/a): {missing}.", ""]
    text.append(results_table(folds, fold_ids))
    path = out or params.root / "docs" / "results_table.md"
    atomic_write_text(path, "\n".join(text))
    return path
