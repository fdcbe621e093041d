"""Validate step: judge the manifest written by ingest, with a Great Expectations suite plus
cross-row checks, and write the usable rows.

Rules (each failure names the rule, the manifest row and the file):

=========================  ===================================================================  =====
rule                       meaning                                                               by
=========================  ===================================================================  =====
``file_unchanged``         the file under ``raw/`` still has the manifest's sha256               python
``decodes``                image and mask decode with Pillow (ingest's ``error`` is null)        GX
``unique_image``           no exact duplicate image (sha256) in two classes                      GX
``id_format``              ``id`` is 16 hex chars                                                GX
``class_in_fold_table``    every class folder is named in ``params.yaml`` ``folds``              GX
``fold_class_has_data``    every class of the fold table has images                              GX
``kind``                   kind is ``defect`` or ``normal``                                      GX
``image_size``             width, height >= 1                                                    GX
``channels``               1 (gray) or 3 (RGB) channels as stored                                GX
``mask_present``           every defect image has ``GT/<stem>.png``                              GX
``mask_same_size``         mask width/height equal the image's                                   GX
``mask_binarisable``       soft_fraction <= ``data.max_soft_fraction``                           GX
``class_min_images``       each class has >= K+1 usable defect images, K = max(split.shots)      python
``near_duplicate``         no two defect images of different classes (so also none across the   python
                           train/test side of any fold) have pHash distance <=
                           ``data.near_duplicate_distance``, unless listed in
                           ``data.near_duplicate_allow``
``mask_has_image``         every mask in ``GT/`` belongs to an image in ``Images/`` (ingest's     python
                           skipped list): a mask without its image is an annotation lost
=========================  ===================================================================  =====

Not fatal, reported in ``report.json`` and on the Data Docs page: defect images with an empty
mask and repeated copies of an image within one class (both excluded from ``validated.parquet``),
near-duplicates within one class, near-duplicates that involve a normal (``Nd``) image (normal
images are not used in episodes), allowed pairs, and the files of the source that ingest did not
use (``ingest_report.json``: non-image files, unknown folders, empty classes, ...).

The Data Docs page (``pipeline.data_docs``) names the data asset (``<source>-manifest``) and the run
(the data version ``manifest-sha256-<16 hex>``) and shows all of the above next to GX's results.

Outputs under ``params.data.dir``: ``validation/report.json`` and ``validation/docs/``
(GX Data Docs: open ``validation/docs/index.html``) are written on success *and* on
failure so a person can inspect what failed; ``validated.parquet`` is written only on
success, and a stale one is removed on failure so no later step can use it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.config import CLASS_NAME_PATTERN, Params
from pipeline.images import (DOCS_DIR, MANIFEST, REPORT, VALIDATED, atomic_write_parquet, atomic_write_text,
                             load_manifest)

log = logging.getLogger(__name__)


#: what to do, per rule (appended to each failure line)
HINTS = {
    "file_unchanged": "the data folder was modified after ingest: re-run `lerenet ingest`",
    "decodes": "replace or remove the file in the source folder, then re-run ingest",
    "unique_image": "the same image is stored twice: keep it in one class only",
    "id_format": "manifest corrupted: re-run `lerenet ingest`",
    "class_in_fold_table": "add the class to a fold under `folds:` in params.yaml, or remove its folder",
    "fold_class_has_data": "add <Class>/Images and <Class>/GT to the source, or remove the class from `folds:`",
    "kind": "manifest corrupted: re-run `lerenet ingest`",
    "image_size": "replace the empty image in the source folder",
    "channels": "convert the image to gray or RGB",
    "mask_present": "add GT/<stem>.png for this image (same stem as the image), or remove the image",
    "mask_same_size": "the mask must have the image's width and height: fix or re-export the mask",
    "mask_binarisable": "the mask is not a 0/255 mask (too many mid-gray pixels): fix the mask, or raise "
                        "data.max_soft_fraction in params.yaml if soft edges are intended",
    "class_min_images": "add images to the class, or lower split.shots in params.yaml",
    "near_duplicate": "remove one of the two images, or after review list the pair under "
                      "data.near_duplicate_allow in params.yaml",
    "mask_has_image": "add the image to <Class>/Images with the mask's stem, or delete the mask; then re-run ingest",
}


class DataValidationError(RuntimeError):
    """Validation failed. ``str(err)`` lists every problem as ``[rule] row N file: detail -> hint``.

    Attributes:
        failures: list of :class:`Failure`.
        report_path: the JSON report written for inspection.
    """

    def __init__(self, message: str, failures: list["Failure"], report_path: Path):
        super().__init__(message)
        self.failures = failures
        self.report_path = report_path


@dataclass(frozen=True)
class Failure:
    """One violated rule: ``row`` is the manifest row (0-based) or None for a class-level rule;
    ``file`` is relative to the data folder (or a class folder)."""

    rule: str
    row: int | None
    file: str | None
    detail: str

    def line(self) -> str:
        where = f"row {self.row} {self.file}" if self.row is not None else (self.file or "dataset")
        return f"[{self.rule}] {where}: {self.detail} -> {HINTS.get(self.rule, '')}"


def _gx_failures(vr: Any, manifest: pd.DataFrame, params: Params) -> list[Failure]:
    out: list[Failure] = []
    for r in vr.results:
        if r.success:
            continue
        cfg = r.expectation_config
        rule = cfg.meta.get("rule", cfg.type)
        if rule == "fold_class_has_data":
            missing = sorted(set(params.all_classes) - set(manifest["class_name"]))
            for c in missing:
                out.append(Failure(rule, None, f"{c}/", f"class {c!r} is in params.yaml folds but the source has "
                                                          "no images for it"))
            continue
        col = cfg.kwargs.get("column")
        for idx in r.result.get("unexpected_index_list") or []:
            row = int(idx if not isinstance(idx, dict) else next(iter(idx.values())))
            rec = manifest.loc[row]
            if rule == "decodes":
                detail = str(rec["error"])
            elif rule == "mask_same_size":
                detail = (f"image is {rec['width']}x{rec['height']} but mask {rec['mask_path']} is "
                          f"{rec['mask_width']}x{rec['mask_height']} (width x height)")
            elif rule == "mask_binarisable":
                detail = (f"{rec['soft_fraction']:.1%} of mask {rec['mask_path']} pixels are neither near 0 nor "
                          f"near 255 (max {params.data.max_soft_fraction:.1%})")
            elif rule == "mask_present":
                stem = Path(str(rec["image_path"])).stem
                detail = f"defect image has no mask: expected {rec['class_name']}/GT/{stem}.png in the source folder"
            elif rule == "class_in_fold_table":
                detail = f"class {rec['class_name']!r} is not in params.yaml folds {params.all_classes}"
                if not re.fullmatch(CLASS_NAME_PATTERN, str(rec["class_name"])):
                    detail += (" and its folder name is not a safe class name (ASCII letters, digits, _ - . +): "
                               "rename the folder first")
            elif rule == "unique_image":
                same = manifest.index[(manifest["sha256"] == rec["sha256"]) & (manifest.index != row)]
                detail = "identical (sha256) to " + ", ".join(f"row {i} {manifest.loc[i, 'image_path']}" for i in same)
            else:
                detail = f"{col}={rec[col]} violates {cfg.type}"
            out.append(Failure(rule, row, str(rec["image_path"]), detail))
    return out


# ---------------------------------------------------------------------------
# python checks
# ---------------------------------------------------------------------------
def _file_failures(manifest: pd.DataFrame, data_dir: Path) -> list[Failure]:
    out = []
    for row, rel in enumerate(manifest["image_path"]):
        path = data_dir / rel
        if not path.is_file():
            out.append(Failure("file_unchanged", row, rel, "file is missing"))
        elif hashlib.sha256(path.read_bytes()).hexdigest() != manifest.at[row, "sha256"]:
            out.append(Failure("file_unchanged", row, rel, "file content differs from the manifest's sha256"))
    return out


def _same_class_duplicates(manifest: pd.DataFrame) -> dict[int, str]:
    """Rows that repeat an earlier row's exact image (sha256) *in the same class* -> reason.

    They are excluded (the first row by path order is kept) because manifest ids must be
    unique; the same image in two *different* classes stays in and fails ``unique_image``.
    """
    out: dict[int, str] = {}
    for (_, _), rows in manifest.groupby(["class_name", "sha256"], sort=True).groups.items():
        rows = sorted(int(r) for r in rows)
        for r in rows[1:]:
            out[r] = (f"exact duplicate (same sha256) of row {rows[0]} {manifest.at[rows[0], 'image_path']} "
                      "in the same class; that one is kept")
    return out


def hamming_pairs(phashes: list[str | None], max_distance: int, block: int = 1024) -> list[tuple[int, int, int]]:
    """All pairs ``(i, j, d)`` with ``i < j`` and 64-bit pHash Hamming distance ``d <= max_distance``.

    ``phashes`` are 16-hex-char strings (``None`` entries are skipped). Memory is bounded by
    ``block x n`` bytes.
    """
    ok = np.array([h is not None and isinstance(h, str) for h in phashes])
    idx = np.flatnonzero(ok)
    h = np.array([int(phashes[i], 16) for i in idx], dtype=np.uint64)
    pairs = []
    for start in range(0, len(h), block):
        d = np.bitwise_count(h[start:start + block, None] ^ h[None, :])
        ii, jj = np.nonzero(d <= max_distance)
        for a, b in zip(ii + start, jj):
            if a < b:
                pairs.append((int(idx[a]), int(idx[b]), int(d[a - start, b])))
    return pairs


def _near_duplicates(manifest: pd.DataFrame, params: Params, excluded: set[int]) -> tuple[list[Failure], dict]:
    allow = {frozenset(f"raw/{p}" if not p.startswith("raw/") else p for p in pair)
             for pair in params.data.near_duplicate_allow}
    pairs = hamming_pairs(list(manifest["phash"]), params.data.near_duplicate_distance)
    fails, within, normal, allowed = [], [], [], []
    cls, kind, path = manifest["class_name"].tolist(), manifest["kind"].tolist(), manifest["image_path"].tolist()
    for i, j, d in pairs:
        entry = {"rows": [i, j], "files": [path[i], path[j]], "distance": d}
        if cls[i] == cls[j]:
            within.append(entry)
        elif kind[i] != "defect" or kind[j] != "defect" or i in excluded or j in excluded:
            normal.append(entry)
        elif frozenset((path[i], path[j])) in allow:
            allowed.append(entry)
        else:
            fails.append(Failure("near_duplicate", i, path[i],
                                 f"pHash distance {d} <= {params.data.near_duplicate_distance} to row {j} {path[j]} "
                                 f"(classes {cls[i]} / {cls[j]})"))
    return fails, {"within_class": within, "involving_normal_or_excluded": normal, "allowed": allowed}


def _class_counts(manifest: pd.DataFrame, usable: pd.Series, params: Params) -> tuple[list[Failure], dict]:
    need = max(params.split.shots) + 1
    fails, per_class = [], {}
    for c in params.all_classes:
        in_c = manifest["class_name"] == c
        n_def = int((in_c & (manifest["kind"] == "defect")).sum())
        n_use = int((in_c & usable & (manifest["kind"] == "defect")).sum())
        per_class[c] = {"defect": n_def, "usable_defect": n_use,
                        "normal": int((in_c & (manifest["kind"] == "normal")).sum())}
        if (n_def > 0 or in_c.any()) and n_use < need:  # also a class of only Nd (defect-free) images
            fails.append(Failure("class_min_images", None, f"raw/{c}/Images",
                                 f"class {c} has {n_use} usable defect images; K={need - 1} shots need at least "
                                 f"{need} (K supports + 1 query)"))
    return fails, per_class


def _for_message(failures: list[Failure]) -> list[Failure]:
    """Failures worth printing: one per (rule, row, detail); for a row whose file does not decode
    (or changed after ingest) only that, since its other measurements are meaningless.
    The report keeps them all."""
    root_cause = {f.row for f in failures if f.rule in ("decodes", "file_unchanged") and f.row is not None}
    seen, out = set(), []
    for f in failures:
        key = (f.rule, f.row, f.detail)
        if key in seen or (f.row in root_cause and f.rule not in ("decodes", "file_unchanged")):
            continue
        seen.add(key)
        out.append(f)
    return out


# ---------------------------------------------------------------------------
# step
# ---------------------------------------------------------------------------
def _skipped_by_ingest(data_dir: Path) -> tuple[list[dict], list[Failure], list[str]]:
    """Files ingest did not use (``ingest_report.json``): all of them, the failures among them, warnings."""
    from pipeline.ingest import load_ingest_report

    report, problem = load_ingest_report(data_dir)
    if report is None:
        return [], [], [f"files skipped by ingest are not known: {problem}"]
    skipped = list(report.get("skipped", []))
    fails = [Failure(s["rule"], None, s["path"], s["reason"]) for s in skipped if s.get("rule")]
    return skipped, fails, []


def _data_version(data_dir: Path) -> str:
    """The data version validated: ``manifest-sha256-<16 hex>`` of ``manifest.parquet``'s bytes."""
    return "manifest-sha256-" + hashlib.sha256((data_dir / MANIFEST).read_bytes()).hexdigest()[:16]


def _asset_name(params: Params) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(params.data.source).name or "source") + "-manifest"


def validate(params: Params, data_dir: Path | None = None) -> dict[str, Any]:
    """Validate ``<data_dir>/manifest.parquet`` and write ``validated.parquet`` if it passes.

    Args:
        params: validated parameters (``data.*``, ``folds``, ``split.shots``).
        data_dir: data folder written by ingest; default ``params.data.dir``.

    Returns:
        The report (also written to ``validation/report.json``): ``success``, ``data_version``,
        counts per class, ``excluded`` rows (empty masks, repeated copies of an image within a
        class) with the reason, ``skipped`` (files of the source ingest did not use, from
        ``ingest_report.json``: path, reason, action, rule), near-duplicate listings, ``failures``,
        ``warnings`` and the GX summary; ``docs`` is the Data Docs index path relative to ``data_dir``.

    Raises:
        pipeline.images.DataArtifactError: no manifest (ingest has not run).
        DataValidationError: one or more rules failed; the message lists each as
            ``[rule] row N file: detail -> what to do``. ``validated.parquet`` is then
            absent (a stale one is removed); report and Data Docs are written.
    """
    from pipeline.data_docs import GxValidation  # lazy: ~3 s import of great_expectations

    data_dir = Path(data_dir or params.data.dir).resolve()
    manifest = load_manifest(data_dir)
    manifest = manifest.reset_index(drop=True)
    version = _data_version(data_dir)

    failures = _file_failures(manifest, data_dir)
    skipped, skip_fails, warnings = _skipped_by_ingest(data_dir)
    failures += skip_fails
    excluded = _same_class_duplicates(manifest)
    gx_run = GxValidation(params, HINTS, _asset_name(params), version)
    vr = gx_run.run(manifest.drop(index=sorted(excluded)))
    failures += _gx_failures(vr, manifest, params)

    broken = {f.row for f in failures if f.row is not None}
    empty = (manifest["kind"] == "defect") & (manifest["fg_fraction"] == 0) & manifest["error"].isna()
    for r in np.flatnonzero(empty.to_numpy()).tolist():
        excluded.setdefault(int(r), "empty mask (no pixel > data.mask_threshold)")
    excluded_rows = set(excluded)
    usable = ~manifest.index.isin(sorted(broken | excluded_rows))
    count_fails, per_class = _class_counts(manifest, pd.Series(usable, index=manifest.index), params)
    dup_fails, dups = _near_duplicates(manifest, params, excluded_rows)
    failures += count_fails + dup_fails
    failures.sort(key=lambda f: (f.row if f.row is not None else -1, f.rule, f.file or ""))

    report = {
        "success": not failures,
        "data_version": version,
        "manifest": MANIFEST,
        "rows": len(manifest),
        "usable_rows": int(usable.sum()) if not failures else None,
        "per_class": per_class,
        "excluded": [{"row": r, "id": manifest.at[r, "id"], "file": manifest.at[r, "image_path"],
                      "reason": excluded[r]} for r in sorted(excluded_rows)],
        "skipped": skipped,
        "failures": [asdict(f) for f in failures],
        "warnings": warnings,
        "near_duplicates": {"max_distance": params.data.near_duplicate_distance, **dups},
        "great_expectations": gx_run.summary(),
        "docs": f"{DOCS_DIR}/index.html",
    }
    report_path = data_dir / REPORT
    findings = {**{k: report[k] for k in ("success", "data_version", "excluded", "skipped", "warnings",
                                            "near_duplicates")},
                "failures": [{**asdict(f), "hint": HINTS.get(f.rule, "")} for f in failures],
                "data_dir": str(data_dir), "report": str(report_path), "source": str(params.data.source)}
    try:
        gx_run.build_docs(data_dir / DOCS_DIR, json.loads(json.dumps(findings, default=str)))
    except Exception as exc:  # noqa: BLE001 -- a rendering fault must not hide the validation result
        shutil.rmtree(data_dir / DOCS_DIR, ignore_errors=True)  # never leave another data version's page
        report["warnings"].append(f"Data Docs could not be built ({type(exc).__name__}: {exc}); report.json "
                                  "holds every finding")
        log.error("Data Docs could not be built: %s", exc)
    atomic_write_text(report_path, json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    if failures:
        (data_dir / VALIDATED).unlink(missing_ok=True)
        shown = _for_message(failures)
        lines = "\n".join("  " + f.line() for f in shown)
        raise DataValidationError(
            f"data validation failed ({len(shown)} problems) for {data_dir / MANIFEST}:\n{lines}\n"
            f"report: {report_path}; Data Docs: {data_dir / DOCS_DIR / 'index.html'}", failures, report_path)
    validated = manifest[~manifest.index.isin(sorted(excluded_rows))].reset_index(drop=True)
    atomic_write_parquet(data_dir / VALIDATED, validated)
    log.info("validation passed: %d rows, %d usable, %d excluded, %d files of the source not used (see report)",
             len(manifest), len(validated), len(excluded_rows), len(skipped))
    return report
