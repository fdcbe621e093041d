"""``lerenet predict``: support set + folder of queries -> masks, overlays and a JSON summary.

1. The model comes from :meth:`pipeline.inference.predictor.Predictor.load` (``models:/<name>@<alias>``,
   ``models:/<name>/<version>``, ``runs:/<run_id>/<path>``, an MLflow model folder or a ``model.pt``),
   with MLflow's artifact download progress bars off (:func:`load_predictor`).
2. :func:`pipeline.request_files.load_supports` reads and checks the K support pairs (mask present, same size as its
   image, not empty); the Predictor encodes them **once** per call.
3. :func:`predict_folder` streams the queries in batches of ``batch_size`` (a folder of any length
   is never held in memory at once) through :meth:`~pipeline.inference.predictor.Predictor.predict_probabilities`
   (the inference the served pyfunc runs too), thresholds the probability and writes
   ``masks/<stem>.png``, ``overlays/<stem>.png`` and ``summary.json``. Everything goes to a
   temporary folder next to ``out_dir`` that is renamed into place at the end
   (:func:`pipeline.atomic.replace_dir`), so a failed request leaves nothing behind.
4. :func:`image_table` turns the summary into the rows the command prints: per image, the defect
   area in %, the number of connected components, the largest one's box and the max score.

Choice for non-image files in a query *folder*: they are skipped with a
:class:`SkippedInputWarning` and listed under ``"skipped"`` in the summary (the same for files
with an image suffix that Pillow cannot decode). A query named explicitly on the command line that
is not a decodable image is an error.

Reference images (``lerenet predict --reference``, :func:`pipeline.request_files.load_references`): defect-free images of the
queries' surface, listed like queries (files and folders) but every one must decode (a reference set
that silently lost an image would move the gate). They go to ``Predictor.encode_support(...,
references=...)``; a model file whose presence gate has no reference threshold ignores them, with a
:class:`ReferencesIgnoredWarning` and a note in the summary.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError

from pipeline.atomic import replace_dir
from pipeline.images import read_image
from pipeline.inference.postprocess import headline, overlay, png_bytes, summarise
from pipeline.inference.predictor import PredictInputError, Predictor
from pipeline.request_files import SkippedInputWarning, list_queries, load_references, load_supports

SUMMARY = "summary.json"
MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"


class ReferencesIgnoredWarning(UserWarning):
    """Reference images were given but the model file's presence gate has no reference threshold."""


# ---------------------------------------------------------------------------
# the model of a request
# ---------------------------------------------------------------------------
def load_predictor(params: Any, spec: str | None, device: Any) -> Predictor:
    """The Predictor of ``spec`` (default: ``models:/<mlflow.registered_model>@champion``) on the
    project's registry (:func:`pipeline.tracking.tracking_uri`).

    Raises:
        pipeline.inference.resolve.ModelNotFoundError / CheckpointError: as :meth:`Predictor.load`.
    """
    from pipeline.inference.resolve import default_model_uri
    from pipeline.tracking import no_artifact_progress_bar, tracking_uri

    with no_artifact_progress_bar():  # MLflow's download bars would mix with the command's own output
        return Predictor.load(spec or default_model_uri(params.mlflow.registered_model),
                              tracking_uri=tracking_uri(params), device=device)


#: the note (summary and warning) when the model file ignores reference images
REFERENCES_IGNORED = ("the model file's presence gate has no reference threshold (it was not trained with "
                      "train.presence_references > 0): the reference images were not used")
#: the note (summary only) when the model file was calibrated with reference images and none are given
REFERENCES_MISSING = ("no reference image given: the queries are gated by the max-logit threshold, whose share of "
                      "flagged good parts is not calibrated for this surface; pass --reference with defect-free "
                      "images of it")


# ---------------------------------------------------------------------------
# folder request
# ---------------------------------------------------------------------------
def _batches(files: Sequence[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(files), size):
        yield list(files[i:i + size])


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, n = path.stem, 1
    while stem in used:
        n += 1
        stem = f"{path.stem}_{n}"
    used.add(stem)
    return stem


def _finalise(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished temporary folder to ``out_dir`` (replacing an old one only with ``overwrite``)."""
    if out_dir.exists():
        if not overwrite:
            raise PredictInputError(f"{out_dir} exists; pass --overwrite or another --out")
    replace_dir(tmp, out_dir)


def predict_folder(model: Predictor, support_pairs: Sequence[tuple[Path, Path]],
                   queries: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
                   threshold: float = 0.5, mask_threshold: int = 127, batch_size: int = 8,
                   overwrite: bool = False, progress: bool = True, min_area: int = 1,
                   support_class: dict[str, Any] | None = None,
                   references: Sequence[str | os.PathLike[str]] | None = None) -> dict[str, Any]:
    """Segment every query with one support set and write masks, overlays and a summary.

    Args:
        model: from :meth:`Predictor.load <pipeline.inference.predictor.Predictor.load>`.
        support_pairs: K ``(image, mask)`` paths.
        queries: image files and/or folders (see :func:`pipeline.request_files.list_queries`).
        out_dir: output folder, created atomically: ``masks/<stem>.png`` (8-bit, 255 = defect, the
            query's original size), ``overlays/<stem>.png`` (RGB: defect tinted red, outlined yellow),
            ``summary.json``. Must not exist unless ``overwrite``.
        threshold: probability threshold in (0, 1); defect where ``sigmoid(logit) > threshold``.
        mask_threshold: support-mask binarisation (8-bit value > it = defect).
        batch_size: queries decoded and run together (memory bound: only one batch is in memory).
        overwrite: replace an existing ``out_dir`` (only after the new one is complete).
        progress: show a tqdm bar over the queries.
        min_area: smallest component (pixels) listed in the summary.
        support_class: the stored class the supports come from (``lerenet predict --class``:
            ``{"name", "version", "fingerprint"}``), recorded as ``class`` in the summary.
        references: defect-free images of the queries' surface, files and/or folders (:func:`pipeline.request_files.load_references`);
            the presence gate of a model file calibrated with them (``train.presence_references``) scores each
            query relative to them. A model file without a reference threshold ignores them
            (:class:`ReferencesIgnoredWarning`). ``None`` or empty: none.

    Returns:
        The summary dict written to ``summary.json``: ``model`` (provenance), ``threshold``, ``shots``,
        ``supports``, ``images`` (per query: ``query``, ``mask``, ``overlay``, ``width``, ``height``,
        ``defect_fraction``, ``max_score``, ``components``, ``model_version``), ``skipped``,
        ``references`` (the reference files), ``references_used`` (the model file's gate used them),
        ``reference_level`` (:attr:`SupportSet.level <pipeline.inference.predictor.SupportSet.level>`, or
        ``None``), ``references_note`` (when given but ignored, or when the model file was calibrated with
        references and none are given), ``created``, and ``class`` when
        ``support_class`` is given.

    Raises:
        PredictInputError: bad threshold / batch size, existing ``out_dir`` without ``overwrite``,
            bad supports, a missing or undecodable reference, no query, or an explicitly named query
            that cannot be decoded. Nothing is written in that case.
    """
    from tqdm import tqdm

    if not 0.0 < threshold < 1.0:
        raise PredictInputError(f"--threshold must be a probability in (0, 1), got {threshold}")
    if batch_size < 1:
        raise PredictInputError(f"batch size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise PredictInputError(f"{out_dir} exists; pass --overwrite or another --out")
    s_images, s_masks = load_supports(support_pairs, mask_threshold)
    ref_files, ref_images = load_references(references) if references else ([], None)
    files, skipped = list_queries(queries)
    explicit = {Path(q) for q in queries if Path(q).is_file()}

    supports = model.encode_support(s_images, s_masks, ref_images)
    used = bool(ref_files) and model.presence_gate.uses_references
    refs: dict[str, Any] = {"references": [str(f) for f in ref_files], "references_used": used,
                            "reference_level": supports.level}
    if not ref_files and model.presence_gate.uses_references:
        refs["references_note"] = REFERENCES_MISSING
    if ref_files and not used:
        refs["references_note"] = REFERENCES_IGNORED
        warnings.warn(f"{len(ref_files)} reference image(s) given, but {REFERENCES_IGNORED}",
                      ReferencesIgnoredWarning, stacklevel=2)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        (tmp / MASKS_DIR).mkdir()
        (tmp / OVERLAYS_DIR).mkdir()
        used: set[str] = set()
        records: list[dict[str, Any]] = []
        with tqdm(total=len(files), unit="img", desc="predict", disable=not progress) as bar:
            for batch in _batches(files, batch_size):
                images, names = [], []
                for f in batch:
                    try:
                        images.append(read_image(f))
                        names.append(f)
                    except (UnidentifiedImageError, OSError) as exc:
                        if f in explicit:
                            raise PredictInputError(f"query {f}: not a decodable image ({exc})") from None
                        reason = f"not a decodable image ({exc})"
                        warnings.warn(f"skipping query {f}: {reason}", SkippedInputWarning, stacklevel=2)
                        skipped.append({"path": str(f), "reason": reason})
                for f, image, prob in zip(names, images, model.predict_probabilities(supports, images)):
                    mask, info = summarise(prob, threshold, min_area)
                    stem = _unique_stem(f, used)
                    (tmp / MASKS_DIR / f"{stem}.png").write_bytes(png_bytes(mask))
                    (tmp / OVERLAYS_DIR / f"{stem}.png").write_bytes(png_bytes(overlay(image, mask)))
                    records.append({"query": str(f), "mask": f"{MASKS_DIR}/{stem}.png",
                                    "overlay": f"{OVERLAYS_DIR}/{stem}.png", **info,
                                    "model_version": model.version})
                bar.update(len(batch))
        if not records:
            raise PredictInputError(f"no decodable query image among {len(files)} file(s); see the warnings")
        summary = {
            "model": model.describe(),
            "threshold": threshold,
            "shots": len(s_images),
            "supports": [{"image": str(i), "mask": str(m), "defect_fraction": float(mk.mean())}
                         for (i, m), mk in zip(support_pairs, s_masks)],
            "device": str(model.device),
            "images": records,
            "skipped": skipped,
            **refs,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        if support_class is not None:
            summary["class"] = dict(support_class)
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        _finalise(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def image_table(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per predicted image of a :func:`predict_folder` summary, in query order:
    ``{"image": query file name, "mask": path under the output folder,
    **``pipeline.inference.postprocess.headline``}`` (defect %, components, largest box, max score)."""
    return [{"image": Path(r["query"]).name, "mask": r["mask"], **headline(r)} for r in summary["images"]]
