"""COCO import (pipeline/coco.py, `lerenet import-coco`) on real images and their real masks.

The test turns a few defects12 images' masks into a COCO export the way a labelling tool writes one
(one instance per connected component; polygons from the component outlines, compressed RLE with
pycocotools' encode, uncompressed RLE as column-major run lengths), imports it back and compares.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from typer.testing import CliRunner

from conftest import REAL_DATA, write_small_params
from pipeline.coco import CocoError, import_coco
from pipeline.images import read_mask

runner = CliRunner()

#: class -> (image files, how their instances are encoded)
EXPORT = {
    "Steel_In": (["In_1.png", "In_2.png", "In_3.png"], "rle"),
    "MT_Crack": (["exp1_num_249594.jpg", "exp1_num_265613.jpg"], "rle_uncompressed"),  # soft masks, > 127
    "Leather_Color": (["color0.png", "color12.png"], "polygon"),
}


def _real(cls: str, name: str) -> tuple[Path, np.ndarray]:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} not available")
    return REAL_DATA / cls / "Images" / name, read_mask(REAL_DATA / cls / "GT" / f"{Path(name).stem}.png", 127)


def _uncompressed(mask: np.ndarray) -> list[int]:
    """COCO uncompressed RLE: run lengths over the column-major pixels, starting with a background run."""
    flat = mask.flatten(order="F").astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return ([0] + runs) if flat[0] else runs


def _segmentation(component: np.ndarray, how: str):
    if how == "rle":
        rle = mask_utils.encode(np.asfortranarray(component.astype(np.uint8)))
        return {"size": list(component.shape), "counts": rle["counts"].decode()}
    if how == "rle_uncompressed":
        return {"size": list(component.shape), "counts": _uncompressed(component)}
    contours, _ = cv2.findContours(component.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def make_export(root: Path, export: dict = EXPORT) -> tuple[Path, Path, dict]:
    """Write ``root/images/*`` and ``root/annotations.json``; returns (json, images dir, expected masks)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    doc = {"images": [], "annotations": [], "categories": []}
    expected = {}
    for cat_id, (cls, (names, how)) in enumerate(export.items(), start=1):
        doc["categories"].append({"id": cat_id, "name": cls, "supercategory": ""})
        for name in names:
            src, mask = _real(cls, name)
            shutil.copy2(src, images_dir / name)
            h, w = mask.shape
            image_id = len(doc["images"]) + 1
            doc["images"].append({"id": image_id, "file_name": name, "width": w, "height": h})
            n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
            for k in range(1, n):
                seg = _segmentation(labels == k, how)
                doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": image_id,
                                           "category_id": cat_id, "segmentation": seg, "iscrowd": int(how != "polygon"),
                                           "area": int((labels == k).sum()), "bbox": [0, 0, 1, 1]})
            expected[(cls, name)] = (mask, [a["segmentation"] for a in doc["annotations"] if a["image_id"] == image_id])
    path = root / "annotations.json"
    path.write_text(json.dumps(doc))
    return path, images_dir, expected


def _gt(out: Path, cls: str, name: str) -> np.ndarray:
    values = np.asarray(Image.open(out / cls / "GT" / f"{Path(name).stem}.png"))
    assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 255}
    return values == 255


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools under NumPy 2
def test_import_coco_round_trips_rle_exactly_and_polygons_to_their_rasterisation(tmp_path):
    ann, images_dir, expected = make_export(tmp_path / "export")
    out = tmp_path / "imported"
    result = import_coco(ann, images_dir, out)
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT)
    assert result.classes["Steel_In"]["images"] == 3 and result.notes == []
    for (cls, name), (mask, segs) in expected.items():
        img = out / cls / "Images" / name
        assert img.read_bytes() == (images_dir / name).read_bytes()  # the image is copied byte for byte
        got = _gt(out, cls, name)
        assert got.shape == mask.shape
        if EXPORT[cls][1] != "polygon":
            assert np.array_equal(got, mask), (cls, name)  # RLE: exact
        else:
            h, w = mask.shape
            raster = np.zeros_like(mask)
            for seg in segs:
                raster |= mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w))).astype(bool)
            assert np.array_equal(got, raster), (cls, name)  # polygon: exactly its rasterisation
            iou = (got & mask).sum() / (got | mask).sum()
            assert iou > 0.85, (cls, name, iou)  # and that is the real mask up to the outline pixels
    assert sum(r["instances"] for r in result.classes.values()) == sum(len(s) for _, s in expected.values())


def test_import_coco_output_passes_ingest_and_validation(tmp_path):
    from pipeline.config import load_params
    from pipeline.ingest import ingest
    from pipeline.validate import validate

    ann, images_dir, _ = make_export(tmp_path / "export")
    out = tmp_path / "imported"
    import_coco(ann, images_dir, out)
    params = load_params(write_small_params(tmp_path / "params.yaml", out, tmp_path / "data",
                                            folds={0: ["Steel_In"], 1: ["MT_Crack"], 2: ["Leather_Color"]},
                                            split={"shots": [1]}), env={})
    manifest = ingest(params, progress=False)
    assert len(manifest) == 7 and manifest["mask_path"].notna().all()
    report = validate(params)
    assert report["success"] and report["skipped"] == [] and report["excluded"] == []


def test_import_coco_into_an_existing_root_adds_classes_and_notes_unannotated_images(tmp_path):
    ann, images_dir, _ = make_export(tmp_path / "export")
    doc = json.loads(ann.read_text())
    shutil.copy2(REAL_DATA / "MT_Crack" / "Nd" / sorted((REAL_DATA / "MT_Crack" / "Nd").iterdir())[0].name,
                 images_dir / "free.jpg")
    with Image.open(images_dir / "free.jpg") as im:
        doc["images"].append({"id": 99, "file_name": "free.jpg", "width": im.width, "height": im.height})
    ann.write_text(json.dumps(doc))
    out = tmp_path / "root"
    (out / "Old_Class" / "Images").mkdir(parents=True)
    (out / "Old_Class" / "Images" / "keep.txt").write_text("untouched")
    result = import_coco(ann, images_dir, out, categories=["Steel_In"])
    assert sorted(p.name for p in out.iterdir()) == ["Old_Class", "Steel_In"]
    assert (out / "Old_Class" / "Images" / "keep.txt").read_text() == "untouched"
    assert any("free.jpg: no annotation of Steel_In; not imported" in n for n in result.notes)
    assert any("color0.png: no annotation" in n for n in result.notes)  # other categories' images: noted
    assert not [p for p in tmp_path.iterdir() if ".coco-tmp" in p.name]  # no temporary folder left
    with pytest.raises(CocoError, match=r"class folder .*Steel_In already exists"):
        import_coco(ann, images_dir, out, categories=["Steel_In"])


def _edit(ann: Path, fn) -> None:
    doc = json.loads(ann.read_text())
    fn(doc)
    ann.write_text(json.dumps(doc))


def _first(doc, cls="Steel_In"):
    cat = next(c["id"] for c in doc["categories"] if c["name"] == cls)
    return next(a for a in doc["annotations"] if a["category_id"] == cat)


def _poly(doc):
    return _first(doc, "Leather_Color")


BAD = {
    "missing image file": (lambda d, i: (i / "In_2.png").unlink(), r"images\[1\] \(id 2\): image file .*In_2.png does not exist"),
    "unknown category id": (lambda d, i: _first(d).update(category_id=77),
                            r"annotations\[0\] \(id 1\): category_id 77 is not in 'categories'"),
    "unknown image id": (lambda d, i: _first(d).update(image_id=500), r"image_id 500 is not in 'images'"),
    "polygon odd coordinates": (lambda d, i: _poly(d)["segmentation"][0].pop(),
                                r"segmentation\[0\] must be a polygon \[x1, y1, x2, y2, \.\.\.\] of at least 3 points"),
    "polygon two points": (lambda d, i: _poly(d).update(segmentation=[[1, 1, 5, 5]]), r"at least 3 points"),
    "polygon nan": (lambda d, i: _poly(d)["segmentation"][0].__setitem__(0, float("nan")), r"finite numbers"),
    "polygon outside image": (lambda d, i: _poly(d)["segmentation"][0].__setitem__(0, 900.0),
                              r"points outside the 256x256 image"),
    "bbox only": (lambda d, i: _first(d).pop("segmentation"), r"no 'segmentation' \(a bounding box only\?\)"),
    "rle size mismatch": (lambda d, i: _first(d)["segmentation"].update(size=[100, 200]),
                          r"RLE size \[100, 200\] \(height, width\) does not match its image \[200, 200\]"),
    "rle truncated": (lambda d, i: _first(d)["segmentation"].update(counts=_first(d)["segmentation"]["counts"][:-3]),
                      r"compressed RLE 'counts' (does not decode|is not a valid RLE of 200x200 pixels)"),
    "rle runs too short": (lambda d, i: _first(d)["segmentation"].update(counts=mask_utils.frPyObjects(
        {"size": [200, 200], "counts": [100, 50]}, 200, 200)["counts"].decode()),  # decodable, 150 of 40000 pixels
        r"compressed RLE 'counts' is not a valid RLE of 200x200 pixels \(truncated or corrupted\)"),
    "rle garbage": (lambda d, i: _first(d)["segmentation"].update(counts=_first(d)["segmentation"]["counts"] + "zz"),
                    r"compressed RLE 'counts' (does not decode|is not a valid RLE)"),
    "uncompressed rle short": (lambda d, i: _first(d, "MT_Crack")["segmentation"]["counts"].pop(),
                               r"uncompressed RLE runs add up to \d+ pixels, the image has"),
    "image size mismatch": (lambda d, i: d["images"][0].update(width=201),
                            r"images\[0\] \(id 1\): image file .*In_1.png is 200x200 but the JSON says 201x200"),
    "name collision": (lambda d, i: (shutil.copy2(i / "In_2.png", i / "In_1.jpg"), d["images"][1].update(
        file_name="In_1.jpg")), r"name collision in class Steel_In: 'In_1.jpg' and 'In_1.png'"),
    "file outside images dir": (lambda d, i: d["images"][0].update(file_name="../annotations.json"),
                                r"file_name '../annotations.json' leads outside --images"),
    "unsafe category name": (lambda d, i: d["categories"][0].update(name="../../x"),
                             r"category '../../x': class name '../../x' is not a safe folder name"),
    "duplicate image id": (lambda d, i: d["images"][1].update(id=1), r"images\[1\] \(id 1\): id 1 repeats images\[0\]"),
    "image in two categories": (lambda d, i: d["annotations"].append({**_poly(d), "id": 999, "image_id": 1}),
                                r"1 image\(s\) are annotated with more than one imported category \(In_1.png: "
                                r"\['Leather_Color', 'Steel_In'\]\)"),
    "not coco": (lambda d, i: d.pop("annotations"), r"'annotations' must be a list"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_import_coco_rejects_bad_input_and_writes_nothing(tmp_path, case):
    ann, images_dir, _ = make_export(tmp_path / "export")
    edit, message = BAD[case]
    _edit(ann, lambda d: edit(d, images_dir))
    out = tmp_path / "imported"
    with pytest.raises(CocoError, match=message):
        import_coco(ann, images_dir, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left


def test_import_coco_rejects_unknown_category_filter_and_keeps_the_root(tmp_path):
    ann, images_dir, _ = make_export(tmp_path / "export")
    out = tmp_path / "root"
    out.mkdir()
    with pytest.raises(CocoError, match=r"--categories \['Steel_Xx'\] not in .*categories: \['Leather_Color', "):
        import_coco(ann, images_dir, out, categories=["Steel_Xx"])
    assert list(out.iterdir()) == []


def test_cli_import_coco(tmp_path):
    from lerenet.cli import app

    ann, images_dir, _ = make_export(tmp_path / "export")
    out = tmp_path / "imported"
    res = runner.invoke(app, ["import-coco", str(ann), "--images", str(images_dir), "--out", str(out),
                              "--categories", "Steel_In,MT_Crack"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out / 'Steel_In'}: 3 images" in res.output and f"wrote {out / 'MT_Crack'}: 2 images" in res.output
    assert "note: color0.png: no annotation of MT_Crack/Steel_In" in res.output
    assert sorted(p.name for p in out.iterdir()) == ["MT_Crack", "Steel_In"]
    (images_dir / "In_3.png").unlink()
    res = runner.invoke(app, ["import-coco", str(ann), "--images", str(images_dir), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 1 and "error:" in res.output and "In_3.png does not exist" in res.output
    assert not (tmp_path / "o2").exists()
