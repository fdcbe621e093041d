"""Stored support sets ("defect classes by name"): the on-disk format, its reader and the server's cache.

A class store is a folder (``params.yaml`` ``classes.dir``, default ``<project>/classes``) with one
folder per defect class, written only by :mod:`pipeline.classes_store` (``lerenet classes add``)::

    <store>/<NAME>/class.json            the record below
    <store>/<NAME>/images/<k>_<stem>.<ext>   the K support images, bytes as given (PNG/JPEG/BMP/TIFF)
    <store>/<NAME>/masks/<k>_<stem>.png      their masks, bytes as given; defect where value > mask_threshold

``class.json`` (:data:`RECORD_SCHEMA`)::

    {"schema": "lerenet-class/1", "name": "Steel_In", "version": 2, "shots": 1, "mask_threshold": 127,
     "created_by": "alice", "created": "2026-12-06T23:50:00+00:00",
     "supports": [{"image": "images/0_In_1.png", "mask": "masks/0_In_1.png",
                   "image_sha256": "...", "mask_sha256": "...", "width": 200, "height": 200,
                   "defect_fraction": 0.041, "source_image": "...", "source_mask": "..."}]}

A class folder is swapped in whole (``pipeline.atomic.replace_dir``), so a reader sees the old or the
new set, never a mix; :func:`load_class` still checks every file's sha256 against the record (a file
edited by hand, or a folder replaced between reading the record and the files, is refused).

This module ships with the served model (``pipeline/serving``: it imports only
:mod:`pipeline.inference` and itself). The scoring server finds the store from the model config key
:data:`CONFIG_KEY` (``SERVING_MODEL_CONFIG='{"class_store": "/path/classes"}'``) or, when that is not
set, the environment variable :data:`STORE_ENV`; :class:`SupportCache` encodes each class's support
set once and keeps the last ``capacity`` classes (LRU), re-encoding a class when its sha256s change
and dropping everything when the model changes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline.inference.predictor import PredictInputError
from pipeline.inference.preprocess import gray_array, rgb_array

RECORD = "class.json"
RECORD_SCHEMA = "lerenet-class/1"
IMAGES_DIR = "images"
MASKS_DIR = "masks"
#: most support pairs a stored class may hold (the paper's K is 1 or 5)
MAX_SHOTS = 5
#: model_config key of the served model that names the class store folder
CONFIG_KEY = "class_store"
#: model_config key of the cache's capacity (classes whose encoded support set is kept)
CACHE_SIZE_KEY = "class_cache_size"
#: environment variable naming the class store when the model config does not
STORE_ENV = "LERENET_CLASS_STORE"
DEFAULT_CACHE_SIZE = 16
#: image formats a stored support may have (as the REST codec accepts)
_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
#: the same rule as ``pipeline.config.CLASS_NAME_PATTERN`` (tests check they are equal); restated
#: here because serving imports nothing of the project outside inference/ and serving/
CLASS_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,99}$"
_NAME_RE = re.compile(CLASS_NAME_PATTERN)


class ClassSetError(PredictInputError):
    """A stored class cannot be used: bad or unknown name, no store configured, or files that do not
    match their record. The message names the class, the file and what to do."""


def check_name(name: Any, what: str = "class") -> str:
    """Return ``name`` if it is a safe class name (:data:`CLASS_NAME_PATTERN`, no ``..``).

    Raises:
        ClassSetError: not a string, or not a safe folder name (``what`` prefixes the message).
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ClassSetError(f"{what}: {name!r} is not a class name: use ASCII letters, digits, '_', '-', '.', '+' "
                            "(starting with a letter or digit, no '..', at most 100 characters)")
    return name


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def fingerprint(record: dict[str, Any]) -> str:
    """16-hex identity of a stored support set: sha256 over its ordered image and mask sha256s and the
    mask threshold. Equal fingerprints = identical support pixels."""
    parts = [f"{s['image_sha256']}:{s['mask_sha256']}" for s in record.get("supports", [])]
    parts.append(str(record.get("mask_threshold", 127)))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def list_names(store: str | os.PathLike[str]) -> list[str]:
    """Names of the classes in ``store`` (folders holding a ``class.json``), sorted; ``[]`` if no store."""
    root = Path(store)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and (p / RECORD).is_file())


def read_record(store: str | os.PathLike[str], name: str) -> dict[str, Any]:
    """The ``class.json`` of class ``name`` in ``store`` (cheap: one small file).

    Raises:
        ClassSetError: bad name, unknown class (the message lists the known ones), or a record that
            is not valid JSON of :data:`RECORD_SCHEMA`.
    """
    check_name(name)
    path = Path(store) / name / RECORD
    try:
        text = path.read_text()
    except FileNotFoundError:
        known = list_names(store)
        raise ClassSetError(f"class {name!r} is not in the class store {store} (known: {known or 'none'}); "
                            f"add it with `lerenet classes add {name} --support IMAGE:MASK`") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ClassSetError(f"class {name!r}: {path} is not valid JSON ({exc}); add the class again") from None
    if not isinstance(record, dict) or record.get("schema") != RECORD_SCHEMA or not record.get("supports"):
        raise ClassSetError(f"class {name!r}: {path} is not a {RECORD_SCHEMA} record with supports; "
                            "add the class again with `lerenet classes add --replace`")
    return record


def _decode(data: bytes, where: Path) -> Image.Image:
    try:
        im = Image.open(io.BytesIO(data), formats=_FORMATS)
        im.load()
        return im
    except Exception as exc:  # noqa: BLE001 -- Pillow raises several types for bad files
        raise ClassSetError(f"{where}: not a decodable PNG, JPEG, BMP or TIFF file ({exc}); "
                            "add the class again") from None


def load_class(store: str | os.PathLike[str], name: str,
               record: dict[str, Any] | None = None) -> tuple[list[np.ndarray], list[np.ndarray], dict[str, Any]]:
    """Read class ``name``'s support pairs, each file checked against its sha256 in the record.

    Args:
        store: the class store folder. name: the class. record: its ``class.json`` if already read.

    Returns:
        ``(images, masks, record)``: K ``(H_k, W_k, 3)`` uint8 RGB, K ``(H_k, W_k)`` bool (value >
        the record's ``mask_threshold``), and the record.

    Raises:
        ClassSetError: as :func:`read_record`; a missing file, a sha256 that differs from the record
            (edited by hand, or the class was replaced while reading: retry), an undecodable file, or
            a mask whose size differs from its image's.
    """
    record = read_record(store, name) if record is None else record
    folder = Path(store) / name
    threshold = int(record.get("mask_threshold", 127))
    images, masks = [], []
    for k, s in enumerate(record["supports"]):
        arrays = []
        for key in ("image", "mask"):
            path = folder / s[key]
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ClassSetError(f"class {name!r}, support {k}: {path} cannot be read ({exc}); the class changed "
                                    "while it was read (retry) or is damaged (add it again)") from None
            if sha256_bytes(data) != s[f"{key}_sha256"]:
                raise ClassSetError(f"class {name!r}, support {k}: {path} does not match the sha256 in {RECORD}; "
                                    "the file was changed after `lerenet classes add` (add the class again)")
            arrays.append(_decode(data, path))
        image, mask = rgb_array(arrays[0]), gray_array(arrays[1]) > threshold
        if image.shape[:2] != mask.shape:
            raise ClassSetError(f"class {name!r}, support {k}: mask size {mask.shape} != image size {image.shape[:2]}")
        images.append(image)
        masks.append(mask)
    return images, masks, record


def store_from_config(config: dict[str, Any] | None, env: dict[str, str] | None = None) -> Path | None:
    """Where a served model finds the class store: ``config[CONFIG_KEY]``, else ``$LERENET_CLASS_STORE``,
    else ``None`` (by-name requests are then refused). A relative path is taken from the server's
    working directory."""
    env = os.environ if env is None else env
    value = (config or {}).get(CONFIG_KEY) or env.get(STORE_ENV)
    return Path(value).expanduser().resolve() if value else None


@dataclass
class _Entry:
    model_key: str
    fingerprint: str
    support: Any  # pipeline.inference.predictor.SupportSet
    version: Any


class SupportCache:
    """Encoded support sets of stored classes, for one loaded model; bounded LRU, thread-safe.

    :meth:`get` reads the class's ``class.json`` on every call (one small file) and returns the cached
    :class:`~pipeline.inference.predictor.SupportSet` when its fingerprint (the support files'
    sha256s) and the model are unchanged; otherwise it reads the files (checking their sha256s),
    encodes them with the model once and keeps the result, evicting the least recently used class
    beyond ``capacity``. :meth:`set_model` drops every entry of another model.

    Attributes:
        hits, misses, evictions: counters since creation (reported by the benchmark and the tests).
    """

    def __init__(self, store: str | os.PathLike[str] | None, capacity: int = DEFAULT_CACHE_SIZE) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"{CACHE_SIZE_KEY} must be a positive integer number of classes, got {capacity!r}")
        self.store = None if store is None else Path(store)
        self.capacity = capacity
        self.model_key = ""
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = 0

    def set_model(self, model_key: str) -> None:
        """Use the model identified by ``model_key`` from now on; entries of any other model are dropped."""
        with self._lock:
            if model_key != self.model_key:
                self._entries.clear()
                self.model_key = model_key

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str, predictor: Any) -> tuple[Any, dict[str, Any]]:
        """The encoded support set of class ``name`` and its record.

        Args:
            name: a class of the store. predictor: the loaded
                :class:`~pipeline.inference.predictor.Predictor` (encodes on a miss).

        Raises:
            ClassSetError: no store configured, or as :func:`read_record` / :func:`load_class` (a class
                replaced while its files are read is read again once before this is raised).
        """
        if self.store is None:
            raise ClassSetError(f"class {name!r}: this server has no class store; start it with "
                                f"SERVING_MODEL_CONFIG='{{\"{CONFIG_KEY}\": \"/path/to/classes\"}}' or "
                                f"{STORE_ENV}=/path/to/classes, or send support_images and support_masks")
        record = read_record(self.store, name)
        fp = fingerprint(record)
        with self._lock:
            entry = self._entries.get(name)
            if entry is not None and entry.fingerprint == fp and entry.model_key == self.model_key:
                self._entries.move_to_end(name)
                self.hits += 1
                return entry.support, record
            try:
                images, masks, record = load_class(self.store, name, record)
            except ClassSetError:  # replaced between reading the record and its files: read both again, once
                record = read_record(self.store, name)
                fp = fingerprint(record)
                images, masks, record = load_class(self.store, name, record)
            support = predictor.encode_support(images, masks)
            self.misses += 1
            self._entries[name] = _Entry(self.model_key, fp, support, record.get("version"))
            self._entries.move_to_end(name)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
                self.evictions += 1
            return support, record
