"""Inference on new images: support set + folder of queries -> masks, overlays and a JSON summary.

The step behind ``lerenet predict`` (and the request limits of the served pyfunc):

1. :func:`resolve_model` turns ``models:/<name>@<alias>``, ``models:/<name>/<version>``,
   ``runs:/<run_id>/<path>``, an MLflow model folder or a ``model.pt`` checkpoint into a network
   plus provenance (registered name, version, run id). Registry look-ups use
   :class:`mlflow.MlflowClient`; the checkpoint artifact of the logged pyfunc
   (``pipeline/pyfunc.py``) is downloaded and loaded with ``pipeline.checkpoint.load_model``.
2. :func:`load_supports` reads and checks the K support pairs (mask present, same size as its
   image, not empty); :func:`encode_supports` runs the backbone on them **once** per call.
3. :func:`predict_folder` streams the queries in batches of ``batch_size`` (a folder of any length
   is never held in memory at once), runs ``net.encode`` on each batch and
   ``net.forward_features`` with the cached support features, upsamples the logits bilinearly
   to every query's original size (as ``pipeline/pyfunc.py`` does), thresholds the sigmoid
   probability and writes ``masks/<stem>.png``, ``overlays/<stem>.png`` and ``summary.json``.
   Everything goes to a temporary folder next to ``out_dir`` that is renamed into place at the
   end, so a failed request leaves nothing behind.

Preprocessing follows the feature store's view 0 (``docs/architecture.md``): image resized to
``S x S`` (``S`` = the checkpoint's ``image_size``) with bilinear filtering, mask with nearest
neighbour, pixel values divided by 255; gray images are replicated to 3 channels.

Choice for non-image files in a query *folder*: they are skipped with a
:class:`SkippedInputWarning` and listed under ``"skipped"`` in the summary (the same for files
with an image suffix that Pillow cannot decode). A query named explicitly on the command line that
is not a decodable image is an error.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from pipeline.images import IMAGE_SUFFIXES, read_image, read_mask, replace_dir, resize_image, resize_mask
from pipeline.postprocess import connected_components, overlay, png_bytes

DEFAULT_ALIAS = "champion"
SUMMARY = "summary.json"
MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"

#: Serving limits, checked by :func:`check_request_frame` before any image is decoded.
MAX_QUERIES_PER_REQUEST = 32          # rows of the pyfunc input frame
MAX_SUPPORTS_PER_QUERY = 10           # K per row
MAX_IMAGE_PIXELS = 4096 * 4096        # width * height of any one image or mask
MAX_REQUEST_PIXELS = 64 * 1024 * 1024  # sum of width * height over all images of a request


class PredictInputError(ValueError):
    """Bad inference input (support pair, query, threshold, output folder); the message names the
    file or field and what to do."""


class RequestTooLargeError(PredictInputError):
    """A serving request exceeds one of the documented limits (``MAX_*`` in this module)."""


class ModelNotFoundError(LookupError):
    """The model URI, registered name, alias, version, run or checkpoint does not exist; the message
    lists what does exist where that is cheap to find."""


class SkippedInputWarning(UserWarning):
    """A file in a query folder was skipped (not an image, or not decodable)."""


# ---------------------------------------------------------------------------
# model resolution
# ---------------------------------------------------------------------------
@dataclass
class ResolvedModel:
    """A network ready for inference and where it came from.

    Attributes:
        net: the few-shot segmenter (eval mode, on ``device``).
        meta: checkpoint metadata (``model``, ``backbone``, ``image_size``, ``run_id``, ...).
        uri: what the user asked for (URI or path).
        registered_name / version / alias: registry provenance, ``None`` when not from the registry.
        run_id: MLflow run that logged the model (or the checkpoint's ``run_id``), may be ``None``.
        device: where ``net`` lives.
    """

    net: torch.nn.Module
    meta: dict[str, Any]
    uri: str
    registered_name: str | None = None
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def image_size(self) -> int:
        """``S``: the square side the network was trained at (checkpoint ``image_size``)."""
        return int(self.meta["image_size"])

    def describe(self) -> dict[str, Any]:
        """JSON-ready provenance: uri, registered name, version, alias, run id, architecture, image size."""
        return {"uri": self.uri, "registered_name": self.registered_name, "version": self.version,
                "alias": self.alias, "run_id": self.run_id, "model": self.meta.get("model"),
                "backbone": self.meta.get("backbone"), "image_size": self.image_size}


def default_model_uri(registered_name: str, alias: str = DEFAULT_ALIAS) -> str:
    """``models:/<registered_name>@<alias>`` (the registry's champion by default)."""
    return f"models:/{registered_name}@{alias}"


def _registry_version(client: Any, uri: str) -> tuple[str, str, str | None, Any]:
    """Resolve ``models:/name@alias`` or ``models:/name/version`` -> (name, version, alias, ModelVersion).

    Raises ModelNotFoundError listing registered models / aliases / versions.
    """
    from mlflow.exceptions import MlflowException

    body = uri[len("models:/"):].strip("/")
    if "@" in body:
        name, alias = body.split("@", 1)
        version = None
    elif "/" in body:
        name, version = body.rsplit("/", 1)
        alias = None
    else:
        raise ModelNotFoundError(f"{uri}: give an alias or a version, e.g. models:/{body}@{DEFAULT_ALIAS} "
                                 f"or models:/{body}/1")
    try:
        rm = client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in client.search_registered_models(max_results=100))
        raise ModelNotFoundError(
            f"{uri}: no registered model named {name!r} in {client.tracking_uri}; registered models: "
            f"{names or 'none'} (register one with the promote flow, or pass a checkpoint path)") from None
    if alias is not None:
        aliases = dict(rm.aliases or {})
        if alias not in aliases:
            raise ModelNotFoundError(
                f"{uri}: registered model {name!r} has no alias {alias!r}; its aliases: "
                f"{ {a: str(v) for a, v in sorted(aliases.items())} or 'none'} (use models:/{name}/<version> "
                "or set the alias when promoting)")
        mv = client.get_model_version_by_alias(name, alias)
    else:
        try:
            mv = client.get_model_version(name, version)
        except MlflowException:
            versions = sorted((int(v.version) for v in client.search_model_versions(f"name='{name}'")))
            raise ModelNotFoundError(f"{uri}: registered model {name!r} has no version {version!r}; "
                                     f"versions: {versions or 'none'}") from None
    return name, str(mv.version), alias, mv


def _checkpoint_entry(mlmodel: Path) -> str:
    """Relative path of the ``checkpoint`` artifact named in a pyfunc ``MLmodel`` file (or its folder)."""
    from mlflow.models import Model

    try:
        flavor = Model.load(str(mlmodel)).flavors.get("python_function", {})
    except Exception as exc:  # noqa: BLE001 - any unreadable MLmodel is the same user error
        raise ModelNotFoundError(f"{mlmodel}: not an MLflow model ({exc})") from None
    art = (flavor.get("artifacts") or {}).get("checkpoint")
    if not art:
        raise ModelNotFoundError(f"{mlmodel}: the logged pyfunc has no 'checkpoint' artifact; log it with "
                                 "pipeline.pyfunc.log_pyfunc")
    return str(art["path"] if isinstance(art, dict) else art)


def _checkpoint_in_model_dir(model_dir: Path) -> Path:
    """The checkpoint file of a local pyfunc folder (``MLmodel`` -> python_function artifacts)."""
    path = model_dir / _checkpoint_entry(model_dir)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: checkpoint artifact listed in MLmodel is missing")
    return path


def _model_location(client: Any, text: str) -> tuple[str, str | None, str | None, str | None, str]:
    """Artifact location of a ``models:/`` or ``runs:/`` URI -> (location, name, version, alias, run_id).

    Resolved with the given client only (``mlflow.artifacts.download_artifacts`` on a ``models:/`` URI
    ignores an explicit registry URI in MLflow 3.17, and ``runs:/`` falls back to the global store).
    """
    from mlflow.exceptions import MlflowException

    if text.startswith("models:/"):
        name, version, alias, mv = _registry_version(client, text)
        return client.get_model_version_download_uri(name, version), name, version, alias, mv.run_id
    run_id, _, path = text[len("runs:/"):].partition("/")
    path = path.strip("/") or "model"
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ModelNotFoundError(f"{text}: no run {run_id!r} in {client.tracking_uri}") from None
    logged = [m for m in client.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                     filter_string=f"source_run_id = '{run_id}'")
              if m.name == path]
    location = logged[0].artifact_location if logged else f"{run.info.artifact_uri.rstrip('/')}/{path}"
    return location, None, None, None, run_id


def _local_checkpoint(path: Path) -> Path:
    if path.is_file():
        return path
    if (path / "MLmodel").is_file():
        return _checkpoint_in_model_dir(path)
    if (path / "model.pt").is_file():
        return path / "model.pt"
    raise ModelNotFoundError(f"{path}: a folder without model.pt or MLmodel; pass a checkpoint written by "
                             "`lerenet train` or an MLflow model folder")


def resolve_model(spec: str | os.PathLike[str], tracking_uri: str | None = None,
                  device: torch.device | str = "cpu") -> ResolvedModel:
    """Load the network named by ``spec``.

    Args:
        spec: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run_id>/<path>``,
            a local MLflow model folder, or a ``model.pt`` checkpoint (file, or folder holding one).
        tracking_uri: MLflow tracking/registry URI for ``models:/`` and ``runs:/`` (e.g.
            ``params.mlflow.tracking_uri``); ``None`` keeps MLflow's current one.
        device: torch device (or its name) to move the network to.

    Returns:
        :class:`ResolvedModel` (net in eval mode; registry version resolved behind an alias).

    Raises:
        ModelNotFoundError: unknown registered model, alias, version or run, or a path that does not
            exist / is not a checkpoint; lists what exists where cheap.
    """
    from pipeline.checkpoint import load_model

    device = torch.device(device)
    text = str(spec)
    name = version = alias = run_id = None
    if text.startswith(("models:/", "runs:/")):
        import mlflow
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        uri = tracking_uri or mlflow.get_tracking_uri()
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            raise ModelNotFoundError(f"{text}: the MLflow database {uri[len('sqlite:///'):]} does not exist, so "
                                     "nothing is registered; train and register a model first (or set "
                                     "MLFLOW_TRACKING_URI, or pass a checkpoint path)")
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        location, name, version, alias, run_id = _model_location(client, text)
        tmp = Path(tempfile.mkdtemp(prefix="lerenet-model-"))
        try:  # only MLmodel and the checkpoint are fetched, with explicit URIs (no global MLflow state)
            try:
                mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/MLmodel", dst_path=str(tmp),
                                                              tracking_uri=uri)
                entry = _checkpoint_entry(Path(mlmodel))
                ckpt = mlflow.artifacts.download_artifacts(artifact_uri=f"{location}/{entry}",
                                                           dst_path=str(tmp / "ckpt"), tracking_uri=uri)
            except MlflowException as exc:
                raise ModelNotFoundError(f"{text}: could not download the model from {location} "
                                         f"({exc.message})") from None
            net, meta = load_model(ckpt)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        path = Path(text).expanduser()
        if not path.exists():
            raise ModelNotFoundError(
                f"{text}: not a models:/ or runs:/ URI and no such file; expected models:/<name>@<alias>, "
                "models:/<name>/<version>, runs:/<run_id>/<path> or a model.pt checkpoint")
        net, meta = load_model(_local_checkpoint(path))
        run_id = meta.get("run_id")
    net = net.to(device).eval()
    return ResolvedModel(net=net, meta=dict(meta), uri=text, registered_name=name, version=version, alias=alias,
                         run_id=run_id, device=device)


# ---------------------------------------------------------------------------
# supports and queries on disk
# ---------------------------------------------------------------------------
def parse_support_pair(text: str) -> tuple[Path, Path]:
    """Split ``IMAGE:MASK`` (the ``--support`` syntax) into two paths.

    The split is at the last ``:`` so Windows-style drive letters in the image path survive.
    Raises :class:`PredictInputError` when there is no ``:`` or a side is empty.
    """
    img, sep, mask = text.rpartition(":")
    if not sep or not img or not mask:
        raise PredictInputError(f"--support {text!r}: expected IMAGE:MASK, e.g. Images/a.jpg:GT/a.png")
    return Path(img), Path(mask)


def supports_from_class_dir(class_dir: str | os.PathLike[str], limit: int | None = None) -> list[tuple[Path, Path]]:
    """Support pairs from a Surface-Defects-4i class folder: ``Images/<stem>.*`` with ``GT/<stem>.png``.

    Args:
        class_dir: folder holding ``Images/`` and ``GT/``.
        limit: keep the first ``limit`` pairs in file-name order (``None``: all).

    Returns:
        ``[(image_path, mask_path), ...]`` sorted by image file name.

    Raises:
        PredictInputError: no ``Images/`` folder, an image without ``GT/<stem>.png``, no image at all,
            or ``limit < 1``.
    """
    root = Path(class_dir)
    images_dir = root / "Images"
    if not images_dir.is_dir():
        raise PredictInputError(f"--support-dir {root}: no Images/ subfolder (expected the Surface-Defects-4i "
                                "layout <Class>/Images/<stem>.jpg + <Class>/GT/<stem>.png)")
    if limit is not None and limit < 1:
        raise PredictInputError(f"--shots-limit must be >= 1, got {limit}")
    images = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PredictInputError(f"--support-dir {root}: Images/ holds no image ({', '.join(IMAGE_SUFFIXES)})")
    pairs = []
    for p in images[: limit or len(images)]:
        mask = root / "GT" / f"{p.stem}.png"
        if not mask.is_file():
            raise PredictInputError(f"support {p}: mask {mask} is missing; every support image needs "
                                    "GT/<stem>.png (or pass --support IMAGE:MASK pairs)")
        pairs.append((p, mask))
    return pairs


def check_support(image: np.ndarray, mask: np.ndarray, where: str) -> None:
    """Check one support pair: mask the same ``(H, W)`` as the image and not empty.

    Args:
        image: ``(H, W, 3)`` uint8. mask: ``(h, w)`` bool. where: names the pair in errors.

    Raises:
        PredictInputError: sizes differ, or the mask has no defect pixel (a support must show the defect).
    """
    if image.shape[:2] != mask.shape:
        raise PredictInputError(f"{where}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH) but the image is "
                                f"{image.shape[1]}x{image.shape[0]}; a support mask must have its image's size")
    if not mask.any():
        raise PredictInputError(f"{where}: the mask is empty (no pixel above the mask threshold); a support "
                                "must show the defect: pick another image or fix the mask")


def load_supports(pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
                  threshold: int = 127) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Read and check support pairs.

    Args:
        pairs: ``[(image_path, mask_path), ...]``, K >= 1.
        threshold: mask binarisation, defect where 8-bit value > ``threshold``
            (``params.data.mask_threshold``).

    Returns:
        ``(images, masks)``: K ``(H_k, W_k, 3)`` uint8 arrays and K ``(H_k, W_k)`` bool arrays.

    Raises:
        PredictInputError: no pair, a missing/undecodable file, size mismatch, or an empty mask
            (the message names the file).
    """
    if not pairs:
        raise PredictInputError("no support given: pass --support IMAGE:MASK (repeatable) or --support-dir CLASS_DIR")
    images, masks = [], []
    for img_path, mask_path in pairs:
        img_path, mask_path = Path(img_path), Path(mask_path)
        for p, what in ((img_path, "support image"), (mask_path, "support mask")):
            if not p.is_file():
                raise PredictInputError(f"{what} {p} does not exist")
        try:
            image = read_image(img_path)
        except (UnidentifiedImageError, OSError) as exc:
            raise PredictInputError(f"support image {img_path}: not a decodable image ({exc})") from None
        try:
            mask = read_mask(mask_path, threshold)
        except (UnidentifiedImageError, OSError) as exc:
            raise PredictInputError(f"support mask {mask_path}: not a decodable image ({exc})") from None
        check_support(image, mask, f"support {img_path} / mask {mask_path}")
        images.append(image)
        masks.append(mask)
    return images, masks


def list_queries(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[dict[str, str]]]:
    """Expand query arguments into image files.

    Args:
        paths: files or folders. Folders are listed non-recursively in file-name order; files whose
            suffix is not an image suffix (``pipeline.images.IMAGE_SUFFIXES``) are skipped with a
            :class:`SkippedInputWarning` (hidden dot-files silently).

    Returns:
        ``(files, skipped)`` with ``skipped = [{"path", "reason"}, ...]``.

    Raises:
        PredictInputError: a path does not exist, an explicitly named file is not an image file, or
            no query image remains.
    """
    files: list[Path] = []
    skipped: list[dict[str, str]] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in sorted(p.iterdir()):
                if not f.is_file() or f.name.startswith("."):
                    continue
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(f)
                else:
                    reason = f"not an image file (suffix {f.suffix or 'none'}; expected {', '.join(IMAGE_SUFFIXES)})"
                    warnings.warn(f"skipping query {f}: {reason}", SkippedInputWarning, stacklevel=2)
                    skipped.append({"path": str(f), "reason": reason})
        elif p.is_file():
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                raise PredictInputError(f"query {p}: not an image file (expected {', '.join(IMAGE_SUFFIXES)})")
            files.append(p)
        else:
            raise PredictInputError(f"query {p} does not exist")
    if not files:
        raise PredictInputError(f"no query image found in {[str(p) for p in paths]}")
    return files, skipped


# ---------------------------------------------------------------------------
# inference core
# ---------------------------------------------------------------------------
def to_batch(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Stack images resized to ``size x size`` (bilinear): K/N ``(H, W, 3)`` uint8 -> ``(N, 3, S, S)`` float in [0, 1]."""
    arr = np.stack([resize_image(im, size) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


@dataclass
class EncodedSupports:
    """Support set encoded once and reused for every query batch.

    Attributes:
        feats: ``(1, K, Cb, h, w)`` backbone features (``net.encode``).
        masks: ``(1, K, 1, S, S)`` float in {0, 1} (nearest-resized support masks).
        image_size: ``S``.
    """

    feats: torch.Tensor
    masks: torch.Tensor
    image_size: int

    @property
    def shots(self) -> int:
        """K, the number of support pairs."""
        return int(self.feats.shape[1])


@torch.inference_mode()
def encode_supports(net: torch.nn.Module, images: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                    image_size: int, device: torch.device | str = "cpu") -> EncodedSupports:
    """Run the backbone on the K support images once.

    Args:
        net: a ``model.FewShotSegmenter`` in eval mode.
        images: K ``(H_k, W_k, 3)`` uint8. masks: K ``(H_k, W_k)`` bool (checked by :func:`check_support`).
        image_size: ``S``. device: where to compute.

    Returns:
        :class:`EncodedSupports` on ``device``.
    """
    device = torch.device(device)
    x = to_batch(images, image_size).to(device)
    m = torch.from_numpy(np.stack([resize_mask(mk, image_size) for mk in masks])).float()[:, None].to(device)
    feats = net.encode(x)
    return EncodedSupports(feats=feats[None], masks=m[None], image_size=image_size)


@torch.inference_mode()
def predict_probabilities(net: torch.nn.Module, supports: EncodedSupports, queries: Sequence[np.ndarray],
                          device: torch.device | str = "cpu") -> list[np.ndarray]:
    """Defect probabilities of a batch of queries at their original sizes.

    Args:
        net: the segmenter. supports: from :func:`encode_supports` (reused, not re-encoded).
        queries: N ``(H_i, W_i, 3)`` uint8 images of any sizes.
        device: where to compute.

    Returns:
        N ``(H_i, W_i)`` float32 arrays in [0, 1]: ``sigmoid`` of the logits on the feature grid
        (``h x w``), upsampled bilinearly (``align_corners=False``) straight to each query's size, as
        ``pipeline.evaluate.predict_query`` (hence the served pyfunc) does.
    """
    if not queries:
        return []
    device = torch.device(device)
    s = supports.image_size
    q = to_batch(queries, s).to(device)
    b = q.shape[0]
    feats = net.encode(q)
    logits = net.forward_features(supports.feats.expand(b, *supports.feats.shape[1:]),
                                  supports.masks.expand(b, *supports.masks.shape[1:]), feats,
                                  tuple(feats.shape[-2:]))
    out = []
    for i, im in enumerate(queries):
        up = F.interpolate(logits[i:i + 1].float(), size=im.shape[:2], mode="bilinear", align_corners=False)
        out.append(torch.sigmoid(up)[0, 0].cpu().numpy())
    return out


def summarise(prob: np.ndarray, threshold: float, min_area: int = 1) -> tuple[np.ndarray, dict[str, Any]]:
    """Binary mask and per-image figures from a probability map.

    Args:
        prob: ``(H, W)`` float in [0, 1]. threshold: defect where ``prob > threshold``.
        min_area: smallest component (pixels) listed.

    Returns:
        ``(mask, info)``: ``(H, W)`` bool and ``{"width", "height", "defect_fraction" in [0, 1],
        "max_score" in [0, 1], "components": [{"area", "x", "y", "width", "height"}, ...]}``.
    """
    mask = prob > threshold
    info = {"width": int(mask.shape[1]), "height": int(mask.shape[0]),
            "defect_fraction": float(mask.mean()), "max_score": float(prob.max()),
            "components": connected_components(mask, min_area=min_area)}
    return mask, info


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


def predict_folder(model: ResolvedModel, support_pairs: Sequence[tuple[Path, Path]],
                   queries: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str], *,
                   threshold: float = 0.5, mask_threshold: int = 127, batch_size: int = 8,
                   overwrite: bool = False, progress: bool = True, min_area: int = 1) -> dict[str, Any]:
    """Segment every query with one support set and write masks, overlays and a summary.

    Args:
        model: from :func:`resolve_model`.
        support_pairs: K ``(image, mask)`` paths.
        queries: image files and/or folders (see :func:`list_queries`).
        out_dir: output folder, created atomically: ``masks/<stem>.png`` (8-bit, 255 = defect, the
            query's original size), ``overlays/<stem>.png`` (RGB: defect tinted red, outlined yellow),
            ``summary.json``. Must not exist unless ``overwrite``.
        threshold: probability threshold in (0, 1); defect where ``sigmoid(logit) > threshold``.
        mask_threshold: support-mask binarisation (8-bit value > it = defect).
        batch_size: queries decoded and run together (memory bound: only one batch is in memory).
        overwrite: replace an existing ``out_dir`` (only after the new one is complete).
        progress: show a tqdm bar over the queries.
        min_area: smallest component (pixels) listed in the summary.

    Returns:
        The summary dict written to ``summary.json``: ``model`` (provenance), ``threshold``, ``shots``,
        ``supports``, ``images`` (per query: ``query``, ``mask``, ``overlay``, ``width``, ``height``,
        ``defect_fraction``, ``max_score``, ``components``, ``model_version``), ``skipped``,
        ``created``.

    Raises:
        PredictInputError: bad threshold / batch size, existing ``out_dir`` without ``overwrite``,
            bad supports, no query, or an explicitly named query that cannot be decoded. Nothing is
            written in that case.
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
    files, skipped = list_queries(queries)
    explicit = {Path(q) for q in queries if Path(q).is_file()}

    net, device = model.net, model.device
    supports = encode_supports(net, s_images, s_masks, model.image_size, device)
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
                for f, image, prob in zip(names, images, predict_probabilities(net, supports, images, device)):
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
            "device": str(device),
            "images": records,
            "skipped": skipped,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        (tmp / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
        _finalise(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


# ---------------------------------------------------------------------------
# serving request limits (enforced by pipeline/pyfunc.py before decoding)
# ---------------------------------------------------------------------------
def _payload_size(text: Any, what: str) -> int:
    """Pixels (width * height) of a base64 image payload, read from its header only."""
    if not isinstance(text, (str, bytes)):
        raise PredictInputError(f"{what}: expected a base64 string, got {type(text).__name__}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PredictInputError(f"{what}: not valid base64 ({exc})") from None
    try:
        with Image.open(io.BytesIO(raw)) as im:  # lazy: reads the header, not the pixels
            w, h = im.size
    except Exception as exc:  # noqa: BLE001 - Pillow raises several types for undecodable bytes
        raise PredictInputError(f"{what}: base64 payload is not a decodable image ({exc})") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise RequestTooLargeError(f"{what}: image is {w}x{h} = {w * h} pixels, above the limit of "
                                   f"{MAX_IMAGE_PIXELS} pixels per image; downscale it")
    return w * h


def check_request_frame(frame: Any) -> None:
    """Refuse a serving request above the documented limits, before any image is decoded.

    Limits: at most :data:`MAX_QUERIES_PER_REQUEST` rows, :data:`MAX_SUPPORTS_PER_QUERY` support
    images per row, :data:`MAX_IMAGE_PIXELS` pixels per image and :data:`MAX_REQUEST_PIXELS` pixels
    over all images (supports and queries) of the request. Sizes come from the image headers.

    Args:
        frame: the pyfunc input (``pandas.DataFrame`` with ``support_images``, ``support_masks``,
            ``query_image``; see ``pipeline/pyfunc.py``).

    Raises:
        RequestTooLargeError: a limit is exceeded (names row, column and limit).
        PredictInputError: a payload is not base64 or has no readable image header.
    """
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    if len(frame) > MAX_QUERIES_PER_REQUEST:
        raise RequestTooLargeError(f"request has {len(frame)} query rows; the limit is {MAX_QUERIES_PER_REQUEST} "
                                   "per request: split it into several requests")
    total = 0
    for r, row in enumerate(frame.to_dict("records")):
        for col in ("support_images", "support_masks"):
            vals = row.get(col)
            vals = [vals] if isinstance(vals, (str, bytes)) else list(vals if vals is not None else [])
            if len(vals) > MAX_SUPPORTS_PER_QUERY:
                raise RequestTooLargeError(f"row {r}, {col}: {len(vals)} items; the limit is "
                                           f"{MAX_SUPPORTS_PER_QUERY} support pairs per query")
            total += sum(_payload_size(v, f"row {r}, {col}[{k}]") for k, v in enumerate(vals))
        if "query_image" in row:
            total += _payload_size(row["query_image"], f"row {r}, query_image")
        if total > MAX_REQUEST_PIXELS:
            raise RequestTooLargeError(f"request holds more than {MAX_REQUEST_PIXELS} pixels in all (reached at "
                                       f"row {r}); send fewer or smaller images per request")


# ---------------------------------------------------------------------------
# benchmark
# ---------------------------------------------------------------------------
@torch.inference_mode()
def bench_predict(net: torch.nn.Module, image_size: int, support_images: Sequence[np.ndarray],
                  support_masks: Sequence[np.ndarray], queries: Sequence[np.ndarray], *,
                  device: torch.device | str = "cpu", batch_size: int = 8, repeats: int = 3) -> dict[str, Any]:
    """Queries per second with the support set encoded once (cached) vs re-encoded for every query.

    "Cached" is what :func:`predict_folder` does: ``encode_supports`` once, then per batch
    ``encode(queries)`` + ``forward_features``. "Not cached" encodes the supports again for every
    query (K extra backbone passes per query, as ``model.forward`` on a batch of episodes or a
    per-row service that does not reuse supports). Both include resizing and the
    upsampling to original size; image decoding is excluded (images are given as arrays). One
    warm-up pass precedes timing; the best of ``repeats`` wall-clock passes is reported.

    Args:
        net: segmenter in eval mode. image_size: ``S``. support_images / support_masks: K pairs.
        queries: N ``(H, W, 3)`` uint8 images. device / batch_size / repeats: as named.

    Returns:
        ``{"queries", "shots", "image_size", "batch_size", "device", "threads", "cached_qps",
        "uncached_qps", "speedup", "cached_s", "uncached_s"}`` (seconds per full pass over the queries).
    """
    device = torch.device(device)
    s_img = to_batch(support_images, image_size).to(device)
    s_msk = torch.from_numpy(np.stack([resize_mask(m, image_size) for m in support_masks])).float()[:, None].to(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def cached() -> None:
        sup = encode_supports(net, support_images, support_masks, image_size, device)
        for i in range(0, len(queries), batch_size):
            predict_probabilities(net, sup, queries[i:i + batch_size], device)
        sync()

    def uncached() -> None:
        for i in range(0, len(queries), batch_size):
            chunk = queries[i:i + batch_size]
            q = to_batch(chunk, image_size).to(device)
            b = q.shape[0]
            sf = net.encode(s_img[None].expand(b, *s_img.shape).flatten(0, 1)).unflatten(0, (b, len(s_img)))
            qf = net.encode(q)
            logits = net.forward_features(sf, s_msk[None].expand(b, *s_msk.shape), qf, tuple(qf.shape[-2:]))
            for j, im in enumerate(chunk):
                torch.sigmoid(F.interpolate(logits[j:j + 1], size=im.shape[:2], mode="bilinear",
                                            align_corners=False)).cpu()
        sync()

    def best(fn) -> float:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_c, t_u = best(cached), best(uncached)
    n = len(queries)
    return {"queries": n, "shots": len(support_images), "image_size": image_size, "batch_size": batch_size,
            "device": str(device), "threads": torch.get_num_threads(), "cached_qps": n / t_c,
            "uncached_qps": n / t_u, "speedup": t_u / t_c, "cached_s": t_c, "uncached_s": t_u}

