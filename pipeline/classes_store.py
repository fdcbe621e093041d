"""Defect classes by name: store a support set once, use it for every query (``lerenet classes``).

An engineer annotates 1-5 images of a new defect once (:func:`add_class`); ``lerenet predict --class
NAME`` and the served model (a request row with ``class: NAME``) then use that support set. The store
is the folder ``params.yaml`` ``classes.dir`` (default ``<project>/classes``), one folder per class;
its format (``class.json`` with who, when, the sha256 of every file, the shots) and its reader are
:mod:`pipeline.serving.class_sets`, which ships with the served model.

Writes are all-or-nothing: every support pair is read and checked first (file present and decodable,
mask the size of its image, mask not empty, at most :data:`~pipeline.serving.class_sets.MAX_SHOTS`
pairs, no image twice, a safe class name), the folder is assembled in a temporary folder inside the
store and swapped in with :func:`pipeline.atomic.replace_dir`; any error leaves the store as it was.
Re-adding a class needs ``replace=True`` and bumps its ``version``.

When an S3 endpoint is configured (:func:`pipeline.model_card.s3_configured`, as for the champion's
model card), :func:`add_class` also uploads the class to ``s3://<services.models_bucket>/classes/
<NAME>/v<version>/...`` (every file, then ``class.json``) *before* swapping the local folder in, and
then points ``classes/<NAME>/latest.json`` at it (:mod:`pipeline.storage`: size-checked atomic
uploads). Versioned objects are never overwritten or deleted; :func:`remove_class` deletes only the
``latest.json`` pointer. Locally, the store folder can be versioned with ``dvc add classes``.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.atomic import replace_dir
from pipeline.config import Params, check_class_name
from pipeline.inference.predictor import PredictInputError
from pipeline.request_files import load_supports, supports_from_class_dir
from pipeline.serving.class_sets import (IMAGES_DIR, MASKS_DIR, MAX_SHOTS, RECORD, RECORD_SCHEMA, ClassSetError,
                                         fingerprint, list_names, load_class, read_record, sha256_bytes)

log = logging.getLogger(__name__)

#: environment variable naming who adds a class (default: the login name, :func:`getpass.getuser`)
USER_ENV = "LERENET_USER"
#: prefix of the class objects in ``services.models_bucket``
S3_PREFIX = "classes"


class ClassStoreError(ValueError):
    """A class cannot be added, shown or removed; the message names the class or file and what to do.

    Attributes:
        missing: ``True`` when the class does not exist (the CLI exits 1 rather than 2).
    """

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


@dataclass
class ClassInfo:
    """A stored class as ``lerenet classes list|show`` reports it.

    Attributes:
        name, version, shots, created_by, created: from ``class.json``.
        folder: the class folder. fingerprint: 16 hex over the support files' sha256s.
        record: the whole ``class.json``. problem: ``None``, or why the files do not match the record
            (only :func:`show_class` checks the files).
        uploaded: ``s3://`` URIs written by :func:`add_class` (empty without S3).
    """

    name: str
    version: int
    shots: int
    created_by: str
    created: str
    folder: Path
    fingerprint: str
    record: dict[str, Any]
    problem: str | None = None
    uploaded: list[str] = field(default_factory=list)


def store_dir(params: Params) -> Path:
    """The class store folder: ``params.classes.dir`` (absolute)."""
    return Path(params.classes.dir)


def _who(env: Mapping[str, str]) -> str:
    if env.get(USER_ENV):
        return env[USER_ENV]
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 -- no login name (some containers): say so rather than fail
        return "unknown"


def _info(store: Path, record: dict[str, Any], problem: str | None = None) -> ClassInfo:
    return ClassInfo(name=record["name"], version=int(record.get("version", 1)), shots=int(record["shots"]),
                     created_by=str(record.get("created_by", "")), created=str(record.get("created", "")),
                     folder=store / record["name"], fingerprint=fingerprint(record), record=record, problem=problem)


def _check_name(name: str) -> str:
    try:
        return check_class_name(name)
    except ValueError as exc:
        raise ClassStoreError(f"{exc}; e.g. `lerenet classes add Steel_Scratch ...`") from None


def support_pairs(supports: Sequence[str] = (), from_dir: str | os.PathLike[str] | None = None,
                  limit: int = MAX_SHOTS) -> list[tuple[Path, Path]]:
    """The support pairs of ``lerenet classes add``: ``IMAGE:MASK`` texts, then up to ``limit`` pairs of a
    Surface-Defects-4i class folder (``<dir>/Images/*.png|jpg`` with ``<dir>/GT/<stem>.png``, file-name order).

    Raises:
        ClassStoreError: a text without ``:``, a folder without ``Images/``, an image without its mask.
    """
    from pipeline.request_files import parse_support_pair

    try:
        pairs = [parse_support_pair(s) for s in supports]
        if from_dir is not None:
            pairs += supports_from_class_dir(from_dir, limit, option="--from-dir")
    except PredictInputError as exc:
        raise ClassStoreError(str(exc)) from None
    return pairs


def add_class(params: Params, name: str, pairs: Sequence[tuple[str | os.PathLike[str], str | os.PathLike[str]]], *,
              replace: bool = False, env: Mapping[str, str] | None = None, upload: bool | None = None) -> ClassInfo:
    """Store the support set of class ``name`` (atomically; see the module docstring).

    Args:
        params: validated params (``classes.dir``, ``data.mask_threshold``, ``services.models_bucket``).
        name: the class name (:data:`pipeline.config.CLASS_NAME_PATTERN`).
        pairs: 1 to :data:`~pipeline.serving.class_sets.MAX_SHOTS` ``(image, mask)`` paths; masks are
            binarised at ``data.mask_threshold`` (value > threshold = defect).
        replace: replace an existing class (its ``version`` + 1).
        env: environment (``LERENET_USER``, S3 endpoint variables); default ``os.environ``.
        upload: upload to S3; ``None`` = when an S3 endpoint is configured.

    Returns:
        The stored class (:class:`ClassInfo`, ``uploaded`` = the ``s3://`` URIs written).

    Raises:
        ClassStoreError: bad name, no pair or more than 5, a missing or undecodable file, a mask whose
            size differs from its image's, an empty mask, the same image twice, or an existing class
            without ``replace``. Nothing is written.
        pipeline.storage.StorageError: S3 configured but unreachable / credentials rejected / bucket
            missing; nothing is written locally.
    """
    env = os.environ if env is None else env
    _check_name(name)
    if not pairs:
        raise ClassStoreError(f"class {name}: no support given; pass --support IMAGE:MASK (repeatable, 1 to "
                              f"{MAX_SHOTS}) or --from-dir CLASS_DIR")
    if len(pairs) > MAX_SHOTS:
        raise ClassStoreError(f"class {name}: {len(pairs)} support pairs given; a class holds 1 to {MAX_SHOTS} "
                              f"(pass at most {MAX_SHOTS}; --from-dir takes the first {MAX_SHOTS} by file name)")
    store = store_dir(params)
    previous = _existing(store, name)
    if previous is not None and not replace:
        raise ClassStoreError(f"class {name} exists (version {previous.get('version', 1)}, {previous.get('shots')} "
                              f"shot(s), by {previous.get('created_by')}); pass --replace to store a new version, "
                              "or pick another name")
    threshold = params.data.mask_threshold
    try:
        images, masks = load_supports(pairs, threshold)  # missing / undecodable / size / empty mask
    except PredictInputError as exc:
        raise ClassStoreError(f"class {name}: {exc}; nothing was written") from None
    record = _record(name, pairs, images, masks, threshold, env,
                     1 if previous is None else int(previous.get("version", 1)) + 1)
    store.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=store))
    try:
        _assemble(tmp, pairs, record)
        do_upload = upload if upload is not None else _s3_configured(env)
        uris = _upload(params, tmp, record, env) if do_upload else []
        replace_dir(tmp, store / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if uris:
        uris.append(_point_latest(params, record, env))
    info = _info(store, record)
    info.uploaded = uris
    return info


def _existing(store: Path, name: str) -> dict[str, Any] | None:
    if not (store / name).exists():
        return None
    try:
        return read_record(store, name)
    except ClassSetError:  # a damaged folder: replacing it is allowed, adding over it is not
        return {"version": 0, "shots": "?", "created_by": "?"}


def _record(name: str, pairs: Sequence[tuple[Any, Any]], images: list, masks: list, threshold: int,
            env: Mapping[str, str], version: int) -> dict[str, Any]:
    supports, seen = [], {}
    for k, ((img_path, mask_path), image, mask) in enumerate(zip(pairs, images, masks)):
        img_path, mask_path = Path(img_path), Path(mask_path)
        img_sha, mask_sha = sha256_bytes(img_path.read_bytes()), sha256_bytes(mask_path.read_bytes())
        if img_sha in seen:
            raise ClassStoreError(f"class {name}: support image {img_path} is the same file as {seen[img_sha]}; "
                                  "give each support image once; nothing was written")
        seen[img_sha] = img_path
        supports.append({"image": f"{IMAGES_DIR}/{k}_{img_path.stem}{img_path.suffix.lower()}",
                         "mask": f"{MASKS_DIR}/{k}_{img_path.stem}.png",
                         "image_sha256": img_sha, "mask_sha256": mask_sha,
                         "width": int(image.shape[1]), "height": int(image.shape[0]),
                         "defect_fraction": round(float(mask.mean()), 6),
                         "source_image": str(img_path.resolve()), "source_mask": str(mask_path.resolve())})
    return {"schema": RECORD_SCHEMA, "name": name, "version": version, "shots": len(supports),
            "mask_threshold": threshold, "created_by": _who(env),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "supports": supports}


def _assemble(folder: Path, pairs: Sequence[tuple[Any, Any]], record: dict[str, Any]) -> None:
    """Copy the files into ``folder`` under their record names; check the copies' sha256 (a source
    file changed while it was added fails here, before anything is visible)."""
    (folder / IMAGES_DIR).mkdir()
    (folder / MASKS_DIR).mkdir()
    for (img_path, mask_path), s in zip(pairs, record["supports"]):
        for src, key in ((img_path, "image"), (mask_path, "mask")):
            data = Path(src).read_bytes()
            if sha256_bytes(data) != s[f"{key}_sha256"]:
                raise ClassStoreError(f"{src} changed while the class was being added; add it again")
            (folder / s[key]).write_bytes(data)
    (folder / RECORD).write_text(json.dumps(record, indent=2) + "\n")
    os.chmod(folder, 0o755)  # mkdtemp makes it 0700; the served model may run as another user


# ---------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------
def _s3_configured(env: Mapping[str, str]) -> bool:
    from pipeline.model_card import s3_configured

    return s3_configured(env)


def s3_prefix(name: str, version: int) -> str:
    """Key prefix of version ``version`` of class ``name``: ``classes/<name>/v<version>/``."""
    return f"{S3_PREFIX}/{name}/v{version}/"


def _upload(params: Params, folder: Path, record: dict[str, Any], env: Mapping[str, str]) -> list[str]:
    from pipeline.storage import S3Store

    store, bucket = S3Store.from_params(params, env), params.services.models_bucket
    prefix = s3_prefix(record["name"], record["version"])
    uris = [store.put_file(bucket, prefix + s[key], folder / s[key])
            for s in record["supports"] for key in ("image", "mask")]
    uris.append(store.put_json(bucket, prefix + RECORD, record))
    return uris


def _point_latest(params: Params, record: dict[str, Any], env: Mapping[str, str]) -> str:
    from pipeline.storage import S3Store

    pointer = {"name": record["name"], "version": record["version"],
               "prefix": s3_prefix(record["name"], record["version"]),
               "fingerprint": fingerprint(record), "created": record["created"], "created_by": record["created_by"]}
    return S3Store.from_params(params, env).put_json(params.services.models_bucket,
                                                      f"{S3_PREFIX}/{record['name']}/latest.json", pointer)


# ---------------------------------------------------------------------------
# list, show, remove
# ---------------------------------------------------------------------------
def list_classes(params: Params) -> list[ClassInfo]:
    """Every stored class (by name), from the records only (files are checked by :func:`show_class`).
    A folder whose record cannot be read is listed with ``problem`` set and version 0."""
    store = store_dir(params)
    out = []
    for name in list_names(store):
        try:
            out.append(_info(store, read_record(store, name)))
        except ClassSetError as exc:
            out.append(ClassInfo(name, 0, 0, "", "", store / name, "", {}, problem=str(exc)))
    return out


def show_class(params: Params, name: str) -> ClassInfo:
    """Class ``name`` with every file checked against its sha256 (``problem`` says what does not match).

    Raises:
        ClassStoreError: bad name, or no such class (``missing``; the message lists the known ones).
    """
    _check_name(name)
    store = store_dir(params)
    try:
        record = read_record(store, name)
    except ClassSetError as exc:
        raise ClassStoreError(str(exc), missing=not (store / name).exists()) from None
    try:
        load_class(store, name, record)
        problem = None
    except ClassSetError as exc:
        problem = str(exc)
    return _info(store, record, problem)


def remove_class(params: Params, name: str, env: Mapping[str, str] | None = None) -> ClassInfo:
    """Remove class ``name`` from the store (renamed aside, then deleted: readers never see half a
    class); with S3 configured, delete its ``latest.json`` pointer (the versioned objects stay).

    Raises:
        ClassStoreError: bad name, or no such class (``missing``).
        pipeline.storage.StorageError: the S3 pointer could not be deleted (the local class is gone).
    """
    env = os.environ if env is None else env
    _check_name(name)
    store = store_dir(params)
    folder = store / name
    if not folder.is_dir():
        known = list_names(store)
        raise ClassStoreError(f"class {name!r} is not in the class store {store} (known: {known or 'none'})",
                              missing=True)
    try:
        info = _info(store, read_record(store, name))
    except ClassSetError:
        info = ClassInfo(name, 0, 0, "", "", folder, "", {}, problem="unreadable class.json")
    aside = store / f".{name}.removed-{uuid.uuid4().hex[:8]}"
    os.replace(folder, aside)
    shutil.rmtree(aside, ignore_errors=True)
    if _s3_configured(env):
        from pipeline.storage import S3Store

        S3Store.from_params(params, env).delete(params.services.models_bucket, f"{S3_PREFIX}/{name}/latest.json")
    return info


def class_pairs(params: Params, name: str) -> tuple[list[tuple[Path, Path]], ClassInfo]:
    """The stored support pairs of class ``name`` as files, checked against their sha256s, for
    :func:`pipeline.predict.predict_folder` (``lerenet predict --class``).

    Raises:
        ClassStoreError: bad name, unknown class (``missing``), or files that do not match the record.
    """
    info = show_class(params, name)
    if info.problem:
        raise ClassStoreError(info.problem)
    return [(info.folder / s["image"], info.folder / s["mask"]) for s in info.record["supports"]], info
