"""Import a labelling tool's COCO instance-segmentation export into the Surface Defects-4i layout.

CVAT ("COCO 1.0") and Label Studio ("COCO") both export one JSON file with ``images`` (``id``,
``file_name``, ``width``, ``height``), ``categories`` (``id``, ``name``) and ``annotations``
(``id``, ``image_id``, ``category_id``, ``segmentation``; COCO data format, cocodataset.org
"Data format", object segmentation). A segmentation is either a list of polygons
``[[x1, y1, x2, y2, ...], ...]`` in pixel coordinates or a run-length encoding ``{"size": [h, w],
"counts": ...}``, uncompressed (a list of run lengths, column-major, starting with background)
or compressed (COCO's string form). All three are decoded with ``pycocotools.mask``
(``frPyObjects``, ``merge``, ``decode``), the reference implementation of the format.

Output, for each imported category (category name = class name)::

    <out>/<Class>/Images/<stem>.png|jpg   the image (bytes copied, .jpeg named .jpg; other formats
                                          converted to PNG)
    <out>/<Class>/GT/<stem>.png           8-bit mask, 255 = defect: union of the category's instances

Rules (each violation raises :class:`CocoError` naming the JSON entry, its id and field, or the
file, and what to do; nothing is written then):

* the JSON is a COCO object with ``images``, ``annotations`` and ``categories`` lists; ids are unique;
* every annotation names a known image and category; ``--categories`` names existing categories;
* a category name is a safe class name (``pipeline.config.check_class_name``);
* each image file exists under ``images_dir`` (``file_name`` may not leave it), decodes, and has the
  ``width`` x ``height`` the JSON says; an RLE's ``size`` is ``[height, width]`` of its image;
* a polygon has >= 3 finite points, inside the image up to :data:`EDGE_TOLERANCE` pixels; an
  uncompressed RLE's runs are non-negative integers adding up to ``height * width``; a compressed
  RLE decodes to a 0/1 mask and re-encodes to itself (a truncated string does not);
* an annotation without a segmentation (bounding box only) is an error: it has no mask;
* the union of a category's instances on an image is not empty;
* one class holds no two images with the same stem; an image annotated with two imported
  categories is an error (validation refuses one image in two classes: pass ``categories``);
* a class folder that already exists under ``out`` is never overwritten.

Not errors, named in :attr:`CocoImport.notes`: images without any annotation of the imported
categories are not copied (an unannotated image is not evidence of a defect-free surface, so it is
not put into ``Nd/`` either); an instance that rasterises to no pixel inside a non-empty union;
``iscrowd`` instances, which are defect pixels like any other.

Atomic: everything is written into a temporary folder on the same file system and moved into
place with ``os.replace`` (a new ``out`` as a whole; into an existing ``out`` class by class, the
moved ones taken back if a later move fails).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.config import check_class_name

#: polygon points may lie this many pixels outside the image (tools round to pixel edges)
EDGE_TOLERANCE = 1.0
#: image suffixes copied as they are; any other format is converted to PNG (lossless)
KEEP_SUFFIXES = (".png", ".jpg", ".jpeg")


class CocoError(ValueError):
    """The COCO export cannot be imported; the message names the entry (id, field) or file and the fix."""


@dataclass
class CocoImport:
    """What :func:`import_coco` wrote: ``classes`` = ``{class: {"images": n, "instances": m}}``."""

    out: Path
    classes: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _where(kind: str, index: int, entry: Any) -> str:
    ident = entry.get("id") if isinstance(entry, dict) else None
    return f"{kind}[{index}]" + (f" (id {ident})" if ident is not None else "")


def _int(entry: dict, key: str, where: str, minimum: int | None = None) -> int:
    v = entry.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or (minimum is not None and v < minimum):
        raise CocoError(f"{where}: field {key!r} must be an integer{f' >= {minimum}' if minimum is not None else ''}, "
                        f"got {v!r}")
    return v


def load_coco(path: Path) -> dict[str, Any]:
    """Read and check the structure of a COCO JSON file: ``{"images", "annotations", "categories"}``.

    Raises:
        CocoError: unreadable file, invalid JSON, a missing list, a duplicate id, a missing field.
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CocoError(f"{path}: annotation file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CocoError(f"{path}: not a readable JSON file ({exc}); export COCO JSON from the labelling tool") from None
    if not isinstance(doc, dict):
        raise CocoError(f"{path}: top level must be a JSON object with images, annotations, categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key), list):
            raise CocoError(f"{path}: {key!r} must be a list (is this a COCO instance-segmentation export?)")
    for kind in ("images", "annotations", "categories"):
        seen: dict[int, int] = {}
        for i, entry in enumerate(doc[kind]):
            where = f"{path}: {_where(kind, i, entry)}"
            if not isinstance(entry, dict):
                raise CocoError(f"{where}: must be an object")
            ident = _int(entry, "id", where)
            if ident in seen:
                raise CocoError(f"{where}: id {ident} repeats {kind}[{seen[ident]}]; ids must be unique")
            seen[ident] = i
    return doc


def instance_mask(segmentation: Any, height: int, width: int, where: str) -> np.ndarray:
    """Decode one COCO ``segmentation`` into an ``(height, width)`` bool mask (True = the instance).

    Polygons (list of ``[x1, y1, ...]``, pixel coordinates), uncompressed RLE (``counts`` a list of
    ints) and compressed RLE (``counts`` a string) are decoded with ``pycocotools.mask``.

    Raises:
        CocoError: naming ``where`` and the field, for any malformed segmentation (rules in the module
            docstring), e.g. an odd number of coordinates or an RLE of the wrong size.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            raise CocoError(f"{where}: 'segmentation' is an empty list (no polygon); draw a polygon or mask")
        polys = []
        for j, poly in enumerate(segmentation):
            if (not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                               for v in poly)):
                raise CocoError(f"{where}: segmentation[{j}] must be a polygon [x1, y1, x2, y2, ...] of at least 3 "
                                f"points with finite numbers, got {str(poly)[:80]}")
            xs, ys = np.asarray(poly[0::2], float), np.asarray(poly[1::2], float)
            t = EDGE_TOLERANCE
            if xs.min() < -t or ys.min() < -t or xs.max() > width + t or ys.max() > height + t:
                raise CocoError(f"{where}: segmentation[{j}] has points outside the {width}x{height} image "
                                f"(x {xs.min():g}..{xs.max():g}, y {ys.min():g}..{ys.max():g}); was it drawn on "
                                "another image size?")
            polys.append([float(v) for v in poly])
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segmentation, dict):
        size, counts = segmentation.get("size"), segmentation.get("counts")
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
            raise CocoError(f"{where}: RLE 'size' must be [height, width], got {size!r}")
        if size != [height, width]:
            raise CocoError(f"{where}: RLE size {size} (height, width) does not match its image "
                            f"{[height, width]}; re-export the annotations for this image")
        if isinstance(counts, list):
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
                raise CocoError(f"{where}: uncompressed RLE 'counts' must be non-negative integers")
            if sum(counts) != height * width:
                raise CocoError(f"{where}: uncompressed RLE runs add up to {sum(counts)} pixels, the image has "
                                f"{height * width} ({height}x{width}); the RLE is truncated or for another image")
            rle = mask_utils.frPyObjects({"size": size, "counts": counts}, height, width)
        elif isinstance(counts, str) and counts:
            rle = {"size": size, "counts": counts.encode("ascii", "replace")}
            try:
                decoded = _decode(rle)
            except ValueError as exc:
                raise CocoError(f"{where}: compressed RLE 'counts' does not decode ({exc})") from None
            if decoded.max(initial=0) > 1 or mask_utils.encode(np.asfortranarray(decoded))["counts"] != rle["counts"]:
                raise CocoError(f"{where}: compressed RLE 'counts' is not a valid RLE of {height}x{width} pixels "
                                "(truncated or corrupted); re-export the annotations")
        else:
            raise CocoError(f"{where}: RLE 'counts' must be a list of run lengths or a non-empty string")
    else:
        raise CocoError(f"{where}: no 'segmentation' (a bounding box only?): a mask needs a polygon or an RLE")
    return _decode(rle).astype(bool)


def _decode(rle: dict) -> np.ndarray:
    """``pycocotools.mask.decode`` -> ``(H, W)`` uint8, without its NumPy 2 ``__array__`` deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def _image_file(images_dir: Path, entry: dict, where: str) -> tuple[Path, int, int]:
    name = entry.get("file_name")
    if not isinstance(name, str) or not name:
        raise CocoError(f"{where}: field 'file_name' must be a non-empty string")
    width, height = _int(entry, "width", where, 1), _int(entry, "height", where, 1)
    path = images_dir / name
    if Path(name).is_absolute() or not path.resolve().is_relative_to(images_dir.resolve()):
        raise CocoError(f"{where}: file_name {name!r} leads outside --images {images_dir}; use a relative name")
    if Path(name).name.startswith("."):
        raise CocoError(f"{where}: file_name {name!r} is a hidden file (ingest never reads those); rename it")
    if not path.is_file():
        raise CocoError(f"{where}: image file {path} does not exist (file_name {name!r} under --images {images_dir}); "
                        "pass the folder the tool exported the images to")
    try:
        with Image.open(path) as im:
            im.load()
            size = im.size
    except Exception as exc:  # noqa: BLE001 -- any decode failure is named
        raise CocoError(f"{where}: image file {path} does not decode ({type(exc).__name__}: {exc})") from None
    if size != (width, height):
        raise CocoError(f"{where}: image file {path} is {size[0]}x{size[1]} but the JSON says {width}x{height} "
                        "(width x height); the annotations belong to another version of the image")
    return path, width, height


def _write_class(stage: Path, name: str, images: list[tuple[Path, np.ndarray]]) -> None:
    for sub in ("Images", "GT"):
        (stage / name / sub).mkdir(parents=True)
    for src, mask in images:
        suffix = src.suffix.lower()
        if suffix in KEEP_SUFFIXES:
            shutil.copyfile(src, stage / name / "Images" / f"{src.stem}{'.jpg' if suffix == '.jpeg' else suffix}")
        else:
            with Image.open(src) as im:
                im.save(stage / name / "Images" / f"{src.stem}.png")
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(stage / name / "GT" / f"{src.stem}.png")


def _move_into(stage: Path, out: Path, names: list[str]) -> None:
    if not out.exists():
        os.replace(stage, out)
        return
    moved = []
    try:
        for name in names:
            os.replace(stage / name, out / name)
            moved.append(name)
    except OSError:
        for name in moved:  # take back what was moved: out is left as it was
            os.replace(out / name, stage / name)
        raise


def import_coco(annotations: Path, images_dir: Path, out: Path, categories: list[str] | None = None) -> CocoImport:
    """Import a COCO instance-segmentation export into ``<out>/<Class>/{Images,GT}`` (module docstring).

    Args:
        annotations: the COCO JSON file.
        images_dir: folder the ``file_name`` entries are relative to.
        out: root to write class folders into (created if missing; existing classes are never touched).
        categories: category names to import; default all categories that have annotations.

    Returns:
        :class:`CocoImport` with the classes written (images and instances each) and notes.

    Raises:
        CocoError: any rule of the module docstring is violated; ``out`` is then unchanged.
    """
    annotations, images_dir, out = Path(annotations), Path(images_dir), Path(out)
    doc = load_coco(annotations)
    if not images_dir.is_dir():
        raise CocoError(f"--images {images_dir} is not a folder")
    if out.exists() and not out.is_dir():
        raise CocoError(f"--out {out} exists and is not a folder")
    cats: dict[int, str] = {}
    for i, c in enumerate(doc["categories"]):
        where = f"{annotations}: {_where('categories', i, c)}"
        if not isinstance(c.get("name"), str):
            raise CocoError(f"{where}: field 'name' must be a string")
        cats[c["id"]] = c["name"]
    names = sorted(set(cats.values()))
    if len(names) != len(cats):
        raise CocoError(f"{annotations}: two categories share a name; names become class folders and must be unique")
    wanted = set(categories) if categories else None
    if wanted and wanted - set(names):
        raise CocoError(f"--categories {sorted(wanted - set(names))} not in {annotations} (categories: {names})")
    images = {e["id"]: (i, e) for i, e in enumerate(doc["images"])}
    per: dict[tuple[int, str], list[tuple[int, dict]]] = {}  # (image id, class) -> annotations
    for i, a in enumerate(doc["annotations"]):
        where = f"{annotations}: {_where('annotations', i, a)}"
        image_id, cat_id = _int(a, "image_id", where), _int(a, "category_id", where)
        if image_id not in images:
            raise CocoError(f"{where}: image_id {image_id} is not in 'images'")
        if cat_id not in cats:
            raise CocoError(f"{where}: category_id {cat_id} is not in 'categories' (ids {sorted(cats)})")
        if wanted is None or cats[cat_id] in wanted:
            per.setdefault((image_id, cats[cat_id]), []).append((i, a))
    classes = sorted({c for _, c in per}) if wanted is None else sorted(wanted)
    for c in classes:
        try:
            check_class_name(c)
        except ValueError as exc:
            raise CocoError(f"{annotations}: category {c!r}: {exc}; rename the label in the tool, or leave it out "
                            "with --categories") from None
        if out.exists() and (out / c).exists():
            raise CocoError(f"class folder {out / c} already exists; import into another --out or remove it first")
    by_image: dict[int, list[str]] = {}
    for image_id, c in per:
        by_image.setdefault(image_id, []).append(c)
    shared = {i: cs for i, cs in by_image.items() if len(cs) > 1}
    if shared:
        listed = "; ".join(f"{images[i][1].get('file_name')}: {sorted(cs)}" for i, cs in sorted(shared.items())[:10])
        raise CocoError(f"{len(shared)} image(s) are annotated with more than one imported category ({listed}); one "
                        "image may be in one class only (validation rule unique_image): import one category at a time "
                        "with --categories, each into its own --out")
    result = CocoImport(out=out)
    written: dict[str, list[tuple[Path, np.ndarray]]] = {c: [] for c in classes}
    stems: dict[tuple[str, str], str] = {}
    for image_id, (i, entry) in sorted(images.items()):
        mine = by_image.get(image_id)
        if not mine:
            result.notes.append(f"{entry.get('file_name')}: no annotation of {'/'.join(classes) or 'any category'}; "
                                "not imported (an unannotated image is not put into Nd/)")
            continue
        c = mine[0]
        path, width, height = _image_file(images_dir, entry, f"{annotations}: {_where('images', i, entry)}")
        if (c, path.stem) in stems:
            raise CocoError(f"name collision in class {c}: {entry['file_name']!r} and {stems[(c, path.stem)]!r} both "
                            f"become {c}/Images/{path.stem}.*; rename one of them")
        stems[(c, path.stem)] = entry["file_name"]
        union = np.zeros((height, width), bool)
        for j, a in per[(image_id, c)]:
            where = f"{annotations}: {_where('annotations', j, a)} on {entry['file_name']!r}"
            m = instance_mask(a.get("segmentation"), height, width, where)
            if not m.any():
                result.notes.append(f"{where}: the instance covers no pixel")
            union |= m
        if not union.any():
            raise CocoError(f"{annotations}: image {entry['file_name']!r} (id {image_id}): the {c} annotations cover "
                            "no pixel; fix or delete them in the tool")
        written[c].append((path, union))
        result.classes.setdefault(c, {"images": 0, "instances": 0})
        result.classes[c]["images"] += 1
        result.classes[c]["instances"] += len(per[(image_id, c)])
    empty = [c for c in classes if not written[c]]
    if empty:
        raise CocoError(f"categories {empty} have no annotated image in {annotations}; leave them out of --categories")
    if not classes:
        raise CocoError(f"{annotations}: no annotations to import")
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.parent / f".{out.name}.coco-tmp-{uuid.uuid4().hex[:8]}"
    try:
        for c in classes:
            _write_class(stage, c, written[c])
        _move_into(stage, out, classes)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return result
