"""Ingest step: copy a Surface Defects-4i-layout folder into ``data/raw`` and describe it.

Source layout (``docs/architecture.md``, ``../shared/datasets/README.md``)::

    <source>/<Class>/Images/<stem>.(jpg|png|...)   defect image
    <source>/<Class>/GT/<stem>.png                 its mask (same stem), defect where value > threshold
    <source>/<Class>/Nd/<stem>.(jpg|png|...)       optional defect-free ("normal") images

Ingest *measures*, validation *judges*: every image file found is copied and gets
one manifest row, even if it cannot be decoded (``error`` says why) or its mask is
missing (``mask_path`` is ``None``). ``pipeline.validate`` then applies the rules and
fails naming file, row and rule. Every other entry of the source (a non-image file, an
unknown folder, an empty class, a mask without its image, ...) is *skipped and named*
(``pipeline.source``): logged as a warning and listed in ``ingest_report.json``, which validation
copies into its report and Data Docs (a mask without its image fails validation). Ingest itself
fails only when it cannot read the source safely or unambiguously (missing folder, no class
folders, a class folder without ``Images/``, two images with one stem, a broken symbolic link or
one that leads outside the source root).

Outputs under ``out_dir`` (default ``params.data.dir``):

* ``raw/`` -- copy of the source, built in a temporary folder next to it and swapped in;
* ``manifest.parquet`` -- one row per image, sorted by class, kind, image path:
  ``id`` (sha256[:16]), ``class_name``, ``kind`` (defect|normal), ``image_path``,
  ``mask_path`` (relative to ``out_dir``; ``None`` for normal images or a missing mask),
  ``width``, ``height``, ``channels`` (bands as stored: 1 gray, 3 RGB, ...),
  ``fg_fraction`` (share of mask pixels > ``data.mask_threshold``; 0 for normal),
  ``soft_fraction`` (share of mask pixels with ``tol < v < 255 - tol``), ``sha256``,
  ``phash`` (16 hex chars, ``imagehash.phash``, 64 bits), plus the measurements the
  validation rules need: ``mask_width``, ``mask_height`` (nullable) and ``error``
  (``None`` or a decode error message);
* ``ingest_report.json`` -- ``source``, ``images``, ``manifest_sha256`` and ``skipped`` (every entry
  of the source not used: ``path``, ``reason``, ``action``, ``rule``; :func:`write_ingest_report`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import imagehash
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from pipeline.config import Params
from pipeline.images import (INGEST_REPORT, MANIFEST, RAW_DIR, atomic_write_parquet, atomic_write_text, mask_fractions,
                             replace_dir)
from pipeline.source import (ORPHAN_MASK, IngestError, Item, Skipped, SourceScan, check_source, scan_source,
                             survey_source, warn_skipped)

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "id", "class_name", "kind", "image_path", "mask_path", "width", "height", "channels",
    "fg_fraction", "soft_fraction", "sha256", "phash", "mask_width", "mask_height", "error",
]


def _describe(item: Item, stage: Path, threshold: int, soft_tolerance: int) -> dict:
    """Copy one image (and mask) into ``stage`` and measure it; decode errors go to ``error``."""
    data = item.src_image.read_bytes()
    dst = stage / item.rel_image
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    row: dict = {
        "id": digest[:16], "class_name": item.class_name, "kind": item.kind,
        "image_path": item.rel_image, "mask_path": item.rel_mask,
        "width": 0, "height": 0, "channels": 0,
        "fg_fraction": 0.0 if item.kind == "normal" else float("nan"),
        "soft_fraction": 0.0 if item.kind == "normal" else float("nan"),
        "sha256": digest, "phash": None, "mask_width": None, "mask_height": None, "error": None,
    }
    errors = []
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            row["width"], row["height"] = im.size
            row["channels"] = len(im.getbands())
            row["phash"] = str(imagehash.phash(im))
    except Exception as exc:  # noqa: BLE001 -- any decode failure is recorded, validate names it
        errors.append(f"image does not decode: {type(exc).__name__}: {exc}")
    if item.src_mask is not None:
        mdata = item.src_mask.read_bytes()
        mdst = stage / item.rel_mask  # type: ignore[operator]
        mdst.parent.mkdir(parents=True, exist_ok=True)
        mdst.write_bytes(mdata)
        try:
            with Image.open(io.BytesIO(mdata)) as m:
                m.load()
                values = np.asarray(m if m.mode == "L" else m.convert("L"))
            row["mask_height"], row["mask_width"] = values.shape
            row["fg_fraction"], row["soft_fraction"] = mask_fractions(values, threshold, soft_tolerance)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"mask does not decode: {type(exc).__name__}: {exc}")
    row["error"] = "; ".join(errors) or None
    return row


def build_manifest(rows: list[dict]) -> pd.DataFrame:
    """Rows from the scan -> manifest frame with stable column order, dtypes and row order."""
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    for col in ("width", "height", "channels"):
        df[col] = df[col].astype("int64")
    for col in ("mask_width", "mask_height"):
        df[col] = df[col].astype("Int64")
    for col in ("fg_fraction", "soft_fraction"):
        df[col] = df[col].astype("float64")
    for col in ("id", "class_name", "kind", "image_path", "mask_path", "sha256", "phash", "error"):
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    return df.sort_values(["class_name", "kind", "image_path"], kind="stable").reset_index(drop=True)


def ingest(params: Params, source: Path | None = None, out_dir: Path | None = None,
           workers: int | None = None, progress: bool = True, warn: bool = True) -> pd.DataFrame:
    """Copy ``source`` into ``<out_dir>/raw`` and write ``<out_dir>/manifest.parquet``.

    Args:
        params: validated parameters (``data.source``, ``data.dir``, ``data.mask_threshold``,
            ``data.soft_tolerance``).
        source: source folder in Surface Defects-4i layout; default ``params.data.source``.
        out_dir: data folder; default ``params.data.dir``.
        workers: threads for copying/decoding/hashing; default ``os.cpu_count()``.
        progress: show a tqdm progress bar for the scan.
        warn: log a warning naming the entries of the source that are not used (they are always
            in ``<out_dir>/ingest_report.json``; the CLI prints them itself).

    Returns:
        The manifest (schema in the module docstring), one row per image file.

    Raises:
        IngestError: the source cannot be read (see :func:`scan_source`). Nothing is
            written then: ``raw/`` is built in a temporary folder next to it and only
            swapped in, and the manifest replaced, once every file is copied.
    """
    source = Path(source or params.data.source).resolve()
    out_dir = Path(out_dir or params.data.dir).resolve()
    scan = survey_source(source)
    items = scan.items
    if not items:
        raise IngestError(f"source folder {source} holds no images under <Class>/Images or <Class>/Nd"
                          + (f" ({len(scan.skipped)} other entries, e.g. {scan.skipped[0].path})" if scan.skipped else ""))
    if warn:
        warn_skipped(scan.skipped)
    out_dir.mkdir(parents=True, exist_ok=True)
    stage = out_dir / f".ingest.tmp-{uuid.uuid4().hex[:8]}"  # files go to stage/raw/...
    stage.mkdir()
    try:
        thr, tol = params.data.mask_threshold, params.data.soft_tolerance
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            rows = list(tqdm(pool.map(lambda it: _describe(it, stage, thr, tol), items), total=len(items),
                             desc=f"ingest {source.name}", unit="img", disable=not progress))
        manifest = build_manifest(rows)
        raw = out_dir / RAW_DIR
        (stage / RAW_DIR).mkdir(exist_ok=True)
        replace_dir(stage / RAW_DIR, raw)
        atomic_write_parquet(out_dir / MANIFEST, manifest)
        write_ingest_report(out_dir, source, len(manifest), scan.skipped)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    n_err = int(manifest["error"].notna().sum())
    log.info("ingested %d images (%d classes) from %s into %s; %d with decode errors; %d entries skipped",
             len(manifest), manifest["class_name"].nunique(), source, out_dir, n_err, len(scan.skipped))
    return manifest


def write_ingest_report(out_dir: Path, source: Path, images: int, skipped: list[Skipped]) -> Path:
    """Write ``<out_dir>/ingest_report.json`` (atomically), tied to the manifest by its sha256.

    Content: ``source``, ``images`` (manifest rows), ``manifest_sha256`` (of ``manifest.parquet``'s
    bytes, so validation can tell a report left over from another ingest), ``skipped`` (list of
    :class:`Skipped` as dicts: ``path``, ``reason``, ``action``, ``rule``).
    """
    digest = hashlib.sha256((out_dir / MANIFEST).read_bytes()).hexdigest()
    body = {"source": str(source), "images": images, "manifest_sha256": digest,
            "skipped": [asdict(s) for s in skipped]}
    path = out_dir / INGEST_REPORT
    atomic_write_text(path, json.dumps(body, indent=2) + "\n")
    return path


def load_ingest_report(data_dir: Path) -> tuple[dict | None, str | None]:
    """``(report, problem)``: the ingest report of ``data_dir`` if it belongs to its current manifest.

    ``problem`` says why not (missing, unreadable, or written by another ingest); then ``report`` is None.
    """
    path = Path(data_dir) / INGEST_REPORT
    if not path.is_file():
        return None, f"{INGEST_REPORT} is missing (data ingested by an older version): re-run `lerenet ingest`"
    try:
        report = json.loads(path.read_text())
        digest = hashlib.sha256((Path(data_dir) / MANIFEST).read_bytes()).hexdigest()
    except (OSError, ValueError) as exc:
        return None, f"{INGEST_REPORT} is unreadable ({exc}): re-run `lerenet ingest`"
    if report.get("manifest_sha256") != digest:
        return None, f"{INGEST_REPORT} belongs to another ingest than {MANIFEST}: re-run `lerenet ingest`"
    return report, None


__all__ = ["IngestError", "Item", "MANIFEST_COLUMNS", "ORPHAN_MASK", "Skipped", "SourceScan", "build_manifest",
           "check_source", "ingest", "load_ingest_report", "scan_source", "survey_source", "warn_skipped",
           "write_ingest_report"]
