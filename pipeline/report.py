"""Results table: aggregate ``metrics/fold<f>.json`` (written by :mod:`pipeline.evaluate`) into markdown.

Tables (values in %, one decimal; the standard protocol as mean ± std over its seeds):

1. mIoU: one row per (model, K, protocol), one column per fold, and the mean over folds;
2. FB-IoU: the same layout;
3. support sensitivity: per (model, K) and fold "mismatched mIoU / support gain" (paper mIoU minus
   the mIoU on the same episodes with the support from another novel class; ~0 for a model that
   ignores its support), and both means over folds;
4. false alarms on defect-free images: per (model, K) and fold, "mean predicted defect area /
   share of images with any predicted defect";
5. latency: median ms per query per (model, K) and fold, with the device each fold ran on.

A fold whose metrics file is missing is shown as "n/a" (the table says which folds were found).
:func:`write_report` also writes the compact DVC metrics and plot tables (:mod:`pipeline.summary`).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from pipeline.atomic import atomic_write_text
from pipeline.config import Params
from pipeline.evaluation.results import FoldMetrics, ProtocolScore
from pipeline.layout import Layout


class ReportError(RuntimeError):
    """No metrics to report (names the files looked for and the command that writes them)."""


def load_fold_metrics(params: Params) -> dict[int, FoldMetrics]:
    """``{fold: metrics/fold<f>.json}`` (typed) for every fold of ``params.folds`` that has one.

    Raises:
        ReportError: none of the files exists, or one is not valid JSON / lacks a key (names it).
    """
    layout = Layout.of(params)
    out = {}
    for f in sorted(params.folds):
        path = layout.fold_metrics(f)
        if path.is_file():
            try:
                out[f] = FoldMetrics.read(path)
            except (ValueError, KeyError) as exc:
                raise ReportError(f"{path}: not valid metrics JSON ({exc}); re-run `lerenet evaluate --fold {f}`") from None
    if not out:
        raise ReportError(f"no metrics/fold<f>.json under {layout.metrics_dir}: run `lerenet evaluate --fold F` "
                          "(or `dvc repro evaluate`) first")
    return out


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _cell(score: ProtocolScore | None, metric: str) -> tuple[str, float | None]:
    """Formatted cell and the value used for the fold mean (paper: value; standard: mean ± std)."""
    if score is None:
        return "n/a", None
    value = score.value(metric)
    if score.seeded:
        return f"{_pct(value)} ± {_pct(score.std(metric))}", float(value)
    return _pct(value), float(value)


def _models(folds: Mapping[int, FoldMetrics]) -> list[str]:
    names: list[str] = []
    for fm in folds.values():
        names += [k for k in fm.models if k not in names]
    return names


def _shots(folds: Mapping[int, FoldMetrics], model: str) -> list[int]:
    ks: set[int] = set()
    for fm in folds.values():
        if model in fm.models:
            ks |= set(fm.models[model].scores)
    return sorted(ks)


def _score(folds: Mapping[int, FoldMetrics], f: int, model: str, k: int, protocol: str) -> ProtocolScore | None:
    fm = folds.get(f)
    m = fm.models.get(model) if fm else None
    return (m.scores.get(k) or {}).get(protocol) if m else None


def _model_of(folds: Mapping[int, FoldMetrics], f: int, model: str):
    fm = folds.get(f)
    return fm.models.get(model) if fm else None


def _signed(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def support_table(folds: Mapping[int, FoldMetrics], fold_ids: list[int]) -> list[str]:
    """Markdown lines of the support-sensitivity table: per (model, K) and fold ``mismatched mIoU /
    support gain`` (%), then the mean mismatched mIoU and the mean support gain over folds ("n/a"
    unless every fold has both). Empty when no fold has a mismatched score."""
    if not any(m.mismatched for fm in folds.values() for m in fm.models.values()):
        return []
    lines = ["### Support sensitivity (paper episodes; % mismatched-support mIoU / support gain = paper - mismatched)",
             "", "| model | K | " + " | ".join(f"fold {f}" for f in fold_ids)
             + " | mean mismatched mIoU | mean support gain |", "|" + " --- |" * (4 + len(fold_ids))]
    for model in _models(folds):
        for k in _shots(folds, model):
            cells, mism, gains = [], [], []
            for f in fold_ids:
                m = _model_of(folds, f, model)
                score, gain = (m.mismatched.get(k), m.support_gain(k)) if m else (None, None)
                cells.append("n/a" if score is None else f"{_pct(score.miou)} / {_signed(gain)}")
                if score is not None and gain is not None:
                    mism.append(score.miou)
                    gains.append(gain)
            full = len(gains) == len(fold_ids)
            lines.append(f"| {model} | {k} | " + " | ".join(cells) + " | "
                         + (f"{_pct(sum(mism) / len(mism))} | {_signed(sum(gains) / len(gains))}" if full else "n/a | n/a")
                         + " |")
    return lines + [""]


#: the support-free reference model (issue 12): a few-shot model that does not beat it ignores its support
REFERENCE_MODEL = "jaffnet"


def reference_table(folds: Mapping[int, FoldMetrics], fold_ids: list[int]) -> list[str]:
    """Markdown lines comparing every other model with the support-free :data:`REFERENCE_MODEL` on the
    paper protocol: per (model, K) the difference of paper mIoU per fold and over the folds' mean, and
    whether the model beats the reference on every fold. Empty when the reference was not evaluated."""
    if not any(REFERENCE_MODEL in fm.models for fm in folds.values()):
        return []
    lines = [f"### Against the support-free reference ({REFERENCE_MODEL}, paper protocol; mIoU difference in points)",
             "", "| model | K | " + " | ".join(f"fold {f}" for f in fold_ids) + " | mean | beats it on every fold |",
             "|" + " --- |" * (4 + len(fold_ids))]
    for model in (m for m in _models(folds) if m != REFERENCE_MODEL):
        for k in _shots(folds, model):
            diffs = []
            for f in fold_ids:
                a, r = _score(folds, f, model, k, "paper"), _score(folds, f, REFERENCE_MODEL, k, "paper")
                diffs.append(None if a is None or r is None else a.miou - r.miou)
            known = [d for d in diffs if d is not None]
            full = len(known) == len(fold_ids)
            verdict = ("yes" if all(d > 0 for d in known) else "**no**") if full else "n/a"
            lines.append(f"| {model} | {k} | " + " | ".join(_signed(d) for d in diffs) + " | "
                         + (_signed(sum(known) / len(known)) if full else "n/a") + f" | {verdict} |")
    return lines + [""]


def results_table(folds: Mapping[int, FoldMetrics], fold_ids: list[int] | None = None) -> str:
    """Render the markdown tables for ``{fold: FoldMetrics}``; ``fold_ids`` = columns (default: the keys)."""
    fold_ids = sorted(folds) if fold_ids is None else fold_ids
    head = "| model | K | protocol | " + " | ".join(f"fold {f}" for f in fold_ids) + " | mean over folds |"
    sep = "|" + " --- |" * (4 + len(fold_ids))
    lines: list[str] = []
    for metric, title in (("miou", "mIoU (%)"), ("fbiou", "FB-IoU (%)")):
        lines += [f"### {title}", "", head, sep]
        for model in _models(folds):
            for k in _shots(folds, model):
                protocols: list[str] = []
                for f in fold_ids:
                    m = _model_of(folds, f, model)
                    protocols += [p for p in (m.scores.get(k, {}) if m else {}) if p not in protocols]
                for p in protocols:
                    cells, vals = [], []
                    for f in fold_ids:
                        c, v = _cell(_score(folds, f, model, k, p), metric)
                        cells.append(c)
                        if v is not None:
                            vals.append(v)
                    mean = _pct(sum(vals) / len(vals)) if len(vals) == len(fold_ids) else "n/a"
                    lines.append(f"| {model} | {k} | {p} | " + " | ".join(cells) + f" | {mean} |")
        lines.append("")
    lines += support_table(folds, fold_ids)
    lines += reference_table(folds, fold_ids)
    lines += ["### False alarms on defect-free images (% mean predicted defect area / % images with any predicted defect)",
              "", "| model | K | " + " | ".join(f"fold {f}" for f in fold_ids) + " |",
              "|" + " --- |" * (2 + len(fold_ids))]
    for model in _models(folds):
        for k in _shots(folds, model):
            cells = []
            for f in fold_ids:
                m = _model_of(folds, f, model)
                d = m.fp.get(k) if m else None
                cells.append(f"{_pct(d.area_fraction)} / {_pct(d.image_rate)} (n={d.images})" if d else "no Nd images")
            lines.append(f"| {model} | {k} | " + " | ".join(cells) + " |")
    lines += ["", "### Latency (median ms per query, full forward pass from decoded images)", "",
              "| model | K | " + " | ".join(f"fold {f}" for f in fold_ids) + " |", "|" + " --- |" * (2 + len(fold_ids))]
    for model in _models(folds):
        for k in _shots(folds, model):
            cells = []
            for f in fold_ids:
                m = _model_of(folds, f, model)
                ms = m.latency_ms.get(k) if m else None
                cells.append("n/a" if ms is None else f"{ms:.1f}")
            lines.append(f"| {model} | {k} | " + " | ".join(cells) + " |")
    devices = {f: folds[f].device for f in fold_ids if f in folds and folds[f].device}
    if devices:
        lines += ["", "Device: " + "; ".join(f"fold {f}: {d}" for f, d in devices.items())]
    return "\n".join(lines) + "\n"


def write_report(params: Params, out: Path | None = None) -> Path:
    """Write the results table for all folds of ``params`` to ``out`` (default ``docs/results_table.md``),
    and what DVC shows: the compact metrics and the comparison-plot tables (:mod:`pipeline.summary`).

    Raises:
        ReportError: no fold has metrics (see :func:`load_fold_metrics`).
    """
    from pipeline.summary import write_summaries

    folds = load_fold_metrics(params)
    try:
        write_summaries(params)
    except ValueError as exc:
        raise ReportError(str(exc)) from None
    fold_ids = sorted(params.folds)
    missing = [f for f in fold_ids if f not in folds]
    text = ["# Results table (generated by `lerenet report` from metrics/fold*.json; do not edit)", ""]
    if missing:
        text += [f"Folds without metrics (shown as n/a): {missing}.", ""]
    text.append(results_table(folds, fold_ids))
    path = out or Layout.of(params).results_table
    atomic_write_text(path, "\n".join(text))
    return path
