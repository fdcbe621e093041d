"""Ingest step and image helpers, on a small copy of the real data (tests/conftest.py)."""

from __future__ import annotations

import hashlib
import os
import shutil

import imagehash
import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.images import (MANIFEST, load_manifest, mask_fractions, read_image, read_mask, read_mask_values,
                             resize_image, resize_mask)
from pipeline.ingest import MANIFEST_COLUMNS, IngestError, ingest

runner = CliRunner()


def _cli():
    from lerenet.cli import app

    return app


def test_manifest_describes_every_image(small_params, small_source):
    m = ingest(small_params, progress=False)
    data = small_params.data.dir
    assert list(m.columns) == MANIFEST_COLUMNS
    assert len(m) == 7 + 8 + 3 + 7
    assert (m.groupby(["class_name", "kind"]).size().to_dict()
            == {("Leather_Color", "defect"): 7, ("MT_Uneven", "defect"): 8, ("MT_Uneven", "normal"): 3,
                ("Steel_In", "defect"): 7})
    assert m["id"].is_unique and m["error"].isna().all()
    for row in m.itertuples():
        img = data / row.image_path
        assert img.is_file() and row.image_path.startswith(f"raw/{row.class_name}/")
        digest = hashlib.sha256(img.read_bytes()).hexdigest()
        assert row.sha256 == digest and row.id == digest[:16]
        with Image.open(img) as im:
            assert (row.width, row.height) == im.size
            assert row.phash == str(imagehash.phash(im)) and len(row.phash) == 16
        if row.kind == "normal":
            assert row.mask_path is None and row.fg_fraction == 0.0
        else:
            values = read_mask_values(data / row.mask_path)
            fg, soft = mask_fractions(values, 127, 32)
            assert (row.fg_fraction, row.soft_fraction) == pytest.approx((fg, soft))
            assert (row.mask_width, row.mask_height) == (row.width, row.height)
    # gray stays 1 channel as stored, leather is RGB
    assert set(m.loc[m.class_name == "Leather_Color", "channels"]) == {3}
    assert set(m.loc[m.class_name != "Leather_Color", "channels"]) == {1}
    # magnetic-tile masks have soft edges; steel masks are 0/255
    assert m.loc[m.class_name == "MT_Uneven", "soft_fraction"].max() > 0
    assert m.loc[m.class_name == "Steel_In", "soft_fraction"].max() == 0
    stored = load_manifest(data)
    assert list(stored.columns) == MANIFEST_COLUMNS
    for col in ("id", "image_path", "width", "height", "channels", "phash"):
        assert stored[col].tolist() == m[col].tolist()


def test_reingest_is_byte_identical_and_replaces_raw(small_params):
    data = small_params.data.dir
    ingest(small_params, progress=False)
    first = (data / MANIFEST).read_bytes()
    stray = data / "raw" / "Steel_In" / "Images" / "stray.png"
    stray.write_bytes(b"left over from an old ingest")
    ingest(small_params, progress=False)
    assert (data / MANIFEST).read_bytes() == first
    assert not stray.exists()
    assert sorted(p.name for p in data.iterdir()) == ["ingest_report.json", "manifest.parquet", "raw"]  # no temp folders


def test_missing_mask_and_corrupt_image_are_recorded_not_raised(small_params, small_source):
    (small_source / "Steel_In" / "GT" / "In_3.png").unlink()
    jpg = small_source / "MT_Uneven" / "Images" / "exp1_num_109232.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])
    m = ingest(small_params, progress=False).set_index("image_path")
    assert m.loc["raw/Steel_In/Images/In_3.png", "mask_path"] is None
    err = m.loc["raw/MT_Uneven/Images/exp1_num_109232.jpg", "error"]
    assert err.startswith("image does not decode")


def test_missing_source_folder_is_a_clear_error_and_writes_nothing(small_params, tmp_path):
    with pytest.raises(IngestError, match=r"nowhere.*does not exist.*--source"):
        ingest(small_params, source=tmp_path / "nowhere")
    assert not small_params.data.dir.exists()


def test_class_folder_without_images_subfolder(small_params, small_source):
    (small_source / "Steel_Xx" / "GT").mkdir(parents=True)
    with pytest.raises(IngestError, match=r"Steel_Xx has no Images/"):
        ingest(small_params, progress=False)
    assert not small_params.data.dir.exists()


def test_cli_ingest_overrides_and_errors(small_params_file, small_source, tmp_path):
    out = tmp_path / "elsewhere"
    res = runner.invoke(_cli(), ["ingest", "--source", str(small_source), "--out", str(out),
                                 "--params", str(small_params_file)])
    assert res.exit_code == 0, res.output
    assert "ingested 25 images of 3 classes" in res.output
    assert (out / MANIFEST).is_file() and not (tmp_path / "data").exists()

    res = runner.invoke(_cli(), ["ingest", "--source", str(tmp_path / "missing"), "--out", str(tmp_path / "o2"),
                                 "--params", str(small_params_file)])
    assert res.exit_code == 1 and "missing does not exist" in res.output
    assert not (tmp_path / "o2").exists()


def test_cli_params_value_of_wrong_type_names_the_key(small_params_file, tmp_path):
    raw = yaml.safe_load(small_params_file.read_text())
    raw["data"]["mask_threshold"] = "half"
    small_params_file.write_text(yaml.safe_dump(raw))
    res = runner.invoke(_cli(), ["ingest", "--params", str(small_params_file)])
    assert res.exit_code == 2
    assert "data.mask_threshold" in res.output
    assert not (tmp_path / "data").exists()


def test_image_helpers(small_source):
    gray = read_image(small_source / "Steel_In" / "Images" / "In_1.png")
    assert gray.shape == (200, 200, 3) and gray.dtype == np.uint8
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    rgb = read_image(small_source / "Leather_Color" / "Images" / "color0.png")
    assert rgb.shape == (256, 256, 3) and not (rgb[..., 0] == rgb[..., 2]).all()

    mpath = small_source / "MT_Uneven" / "GT" / "exp1_num_109232.png"
    values = read_mask_values(mpath)
    soft = values[(values > 0) & (values < 255)]
    assert soft.size > 0  # soft edges: `== 255` would drop these pixels
    mask = read_mask(mpath, 127)
    assert mask.dtype == bool and mask.shape == values.shape
    assert mask.sum() == (values > 127).sum() > (values == 255).sum()

    small = resize_image(rgb, (50, 60))
    assert small.shape == (50, 60, 3) and small.dtype == np.uint8
    m = resize_mask(mask, 64)
    assert m.shape == (64, 64) and m.dtype == bool and m.any()


def test_cli_ingest_default_is_the_accepted_class_view(small_params_file, small_source, tmp_path):
    """Without --source: every class of data.source + incoming classes named in the fold table."""
    incoming = tmp_path / "incoming"
    fold_src = small_source / "Leather_Color"
    shutil.copytree(fold_src, incoming / "Leather_New")
    raw = yaml.safe_load(small_params_file.read_text())
    raw["data"]["incoming"] = str(incoming)
    small_params_file.write_text(yaml.safe_dump(raw))
    res = runner.invoke(_cli(), ["ingest", "--params", str(small_params_file)])
    assert res.exit_code == 0, res.output
    assert set(load_manifest(tmp_path / "data")["class_name"]) == {"Steel_In", "MT_Uneven", "Leather_Color"}

    raw["folds"][2].append("Leather_New")
    small_params_file.write_text(yaml.safe_dump(raw))
    res = runner.invoke(_cli(), ["ingest", "--params", str(small_params_file)])
    assert res.exit_code == 0, res.output
    assert "Leather_New" in res.output
    m = load_manifest(tmp_path / "data")
    assert (m["class_name"] == "Leather_New").sum() == 7
    assert (tmp_path / "data" / "raw" / "Leather_New" / "GT" / "color0.png").is_file()


# ---- issue 14 item 3: every file of the source that ingest does not use is named -----------------
def _skipped(params) -> dict[str, dict]:
    from pipeline.ingest import load_ingest_report

    report, problem = load_ingest_report(params.data.dir)
    assert problem is None, problem
    return {s["path"]: s for s in report["skipped"]}


def test_ingest_reports_non_image_files_in_images(small_params, small_source, caplog):
    (small_source / "Steel_In" / "Images" / "notes.txt").write_text("shot on line 3")
    (small_source / "Steel_In" / "Images" / "Thumbs.db").write_bytes(b"\0" * 16)
    gif = small_source / "MT_Uneven" / "Images" / "exp9_num_1.gif"
    Image.open(small_source / "MT_Uneven" / "Images" / "exp0_num_461.jpg").save(gif)  # a real image, unread format
    with caplog.at_level("WARNING"):
        m = ingest(small_params, progress=False)
    assert len(m) == 25  # nothing else changed
    skipped = _skipped(small_params)
    assert set(skipped) == {"Steel_In/Images/notes.txt", "Steel_In/Images/Thumbs.db", "MT_Uneven/Images/exp9_num_1.gif"}
    for s in skipped.values():
        assert "not an image file" in s["reason"] and "convert it to PNG" in s["action"] and s["rule"] is None
    for name in skipped:  # named on the console
        assert name in caplog.text
    # and in the validation report (warnings only: validation passes)
    from pipeline.validate import validate

    report = validate(small_params)
    assert report["success"] and {s["path"] for s in report["skipped"]} == set(skipped)


def test_ingest_reports_mask_without_image_and_validation_refuses_it(small_params, small_source, caplog):
    from pipeline.validate import DataValidationError, validate

    (small_source / "Steel_In" / "Images" / "In_6.png").unlink()  # its mask GT/In_6.png stays: an annotation lost
    with caplog.at_level("WARNING"):
        m = ingest(small_params, progress=False)
    assert "raw/Steel_In/GT/In_6.png" not in set(m["mask_path"].dropna())
    s = _skipped(small_params)["Steel_In/GT/In_6.png"]
    assert s["rule"] == "mask_has_image" and "mask without an image" in s["reason"]
    assert "Steel_In/GT/In_6.png" in caplog.text and "validation will fail" in caplog.text
    with pytest.raises(DataValidationError, match=r"\[mask_has_image\] Steel_In/GT/In_6.png: mask without an image"):
        validate(small_params)
    assert not (small_params.data.dir / "validated.parquet").exists()


def test_ingest_reports_mask_of_a_defect_free_image(small_params, small_source):
    from pipeline.validate import DataValidationError, validate

    shutil.copy2(small_source / "MT_Uneven" / "GT" / "exp0_num_461.png", small_source / "MT_Uneven" / "GT" / "exp1_num_118871.png")
    ingest(small_params, progress=False)
    s = _skipped(small_params)["MT_Uneven/GT/exp1_num_118871.png"]
    assert s["rule"] == "mask_has_image" and "Nd" in s["reason"] and "move the image to Images/" in s["action"]
    with pytest.raises(DataValidationError, match=r"\[mask_has_image\] MT_Uneven/GT/exp1_num_118871.png"):
        validate(small_params)


def test_ingest_reports_image_without_mask_as_validation_failure(small_params, small_source):
    """The image is ingested (mask_path null) and validation fails naming the missing GT file."""
    from pipeline.validate import DataValidationError, validate

    (small_source / "Leather_Color" / "GT" / "color18.png").unlink()
    m = ingest(small_params, progress=False).set_index("image_path")
    assert m.loc["raw/Leather_Color/Images/color18.png", "mask_path"] is None
    with pytest.raises(DataValidationError, match=r"\[mask_present\].*Leather_Color/GT/color18.png"):
        validate(small_params)


def test_ingest_reports_mask_in_wrong_format(small_params, small_source):
    """GT/<stem>.jpg instead of GT/<stem>.png: the mask is named (with the expected name), the image fails mask_present."""
    gt = small_source / "Steel_In" / "GT"
    Image.open(gt / "In_7.png").save(gt / "In_7.jpg")
    (gt / "In_7.png").unlink()
    ingest(small_params, progress=False)
    s = _skipped(small_params)["Steel_In/GT/In_7.jpg"]
    assert "must be GT/In_7.png" in s["reason"] and s["rule"] is None


def test_ingest_reports_empty_class_folder(small_params, small_source, caplog):
    (small_source / "Steel_Empty" / "Images").mkdir(parents=True)
    (small_source / "Steel_Empty" / "GT").mkdir()
    with caplog.at_level("WARNING"):
        m = ingest(small_params, progress=False)
    assert "Steel_Empty" not in set(m["class_name"])
    s = _skipped(small_params)["Steel_Empty/Images/"]
    assert "no image" in s["reason"] and "remove the class folder" in s["action"]
    assert "Steel_Empty/Images/" in caplog.text


def test_ingest_reports_empty_fold_class_and_validation_refuses_it(small_params_file, small_source, tmp_path):
    """An empty class that the fold table names fails validation (fold_class_has_data)."""
    from conftest import write_small_params
    from pipeline.config import load_params
    from pipeline.validate import DataValidationError, validate

    for f in (small_source / "Leather_Color" / "Images").iterdir():
        f.unlink()
    for f in (small_source / "Leather_Color" / "GT").iterdir():
        f.unlink()
    params = load_params(small_params_file, env={})
    ingest(params, progress=False)
    assert "Leather_Color/Images/" in _skipped(params)
    with pytest.raises(DataValidationError, match=r"\[fold_class_has_data\] Leather_Color/"):
        validate(params)
    # a class with only defect-free (Nd) images is refused too
    nd = small_source / "Leather_Color" / "Nd"
    nd.mkdir()
    shutil.copy2(small_source / "MT_Uneven" / "Nd" / "exp1_num_118871.jpg", nd / "n1.jpg")
    params = load_params(write_small_params(small_params_file, small_source, tmp_path / "data"), env={})
    ingest(params, progress=False)
    with pytest.raises(DataValidationError, match=r"\[class_min_images\].*Leather_Color has 0 usable"):
        validate(params)


def test_ingest_reports_unknown_subfolders_and_stray_files(small_params, small_source, caplog):
    cls = small_source / "MT_Uneven"
    (cls / "Masks_old").mkdir()
    shutil.copy2(cls / "GT" / "exp0_num_461.png", cls / "Masks_old" / "exp0_num_461.png")
    (cls / "Images" / "rejected").mkdir()
    shutil.copy2(cls / "Images" / "exp1_num_109232.jpg", cls / "Images" / "rejected" / "exp1_num_109232.jpg")
    (cls / "empty_dir").mkdir()
    (cls / "labels.csv").write_text("file,label\n")
    (small_source / "README.md").write_text("# my data\n")
    (small_source / "Steel_In" / "Images" / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level("WARNING"):
        m = ingest(small_params, progress=False)
    assert len(m) == 25
    skipped = _skipped(small_params)
    assert set(skipped) == {"MT_Uneven/Masks_old/exp0_num_461.png", "MT_Uneven/Images/rejected/exp1_num_109232.jpg",
                            "MT_Uneven/empty_dir/", "MT_Uneven/labels.csv", "README.md", "Steel_In/Images/.DS_Store"}
    assert "not part of the class layout" in skipped["MT_Uneven/Masks_old/exp0_num_461.png"]["reason"]
    assert "sub-folder of MT_Uneven/Images/" in skipped["MT_Uneven/Images/rejected/exp1_num_109232.jpg"]["reason"]
    assert "empty folder" in skipped["MT_Uneven/empty_dir/"]["reason"]
    assert "hidden" in skipped["Steel_In/Images/.DS_Store"]["reason"]
    assert all(s["rule"] is None for s in skipped.values())
    for name in skipped:
        assert name in caplog.text


def test_ingest_rejects_two_images_with_one_stem(small_params, small_source):
    img = small_source / "Steel_In" / "Images"
    Image.open(img / "In_2.png").convert("L").save(img / "In_2.jpg")
    with pytest.raises(IngestError, match=r"Steel_In/Images: In_2.jpg, In_2.png share the stem 'In_2'"):
        ingest(small_params, progress=False)
    assert not small_params.data.dir.exists()


def test_cli_ingest_prints_skipped_files(small_params_file, small_source):
    (small_source / "Steel_In" / "Images" / "notes.txt").write_text("x")
    (small_source / "Steel_In" / "Images" / "In_5.png").unlink()
    res = runner.invoke(_cli(), ["ingest", "--params", str(small_params_file)])
    assert res.exit_code == 0, res.output
    assert "2 entries of the source are not used by ingest (1 will fail validation)" in res.output
    assert "Steel_In/Images/notes.txt" in res.output and "Steel_In/GT/In_5.png" in res.output
    res = runner.invoke(_cli(), ["validate", "--params", str(small_params_file)])
    assert res.exit_code == 1 and "[mask_has_image] Steel_In/GT/In_5.png" in res.output


def test_ingest_view_names_what_it_leaves_out_of_the_configured_roots(small_params_file, small_source, tmp_path):
    """`lerenet ingest` reads a view of the accepted classes; files at the source root and incoming classes not
    in the fold table are named, not silently left out."""
    incoming = tmp_path / "incoming"
    shutil.copytree(small_source / "Leather_Color", incoming / "Leather_New")
    (small_source / "LICENSE.txt").write_text("CC BY-NC-SA 4.0")
    raw = yaml.safe_load(small_params_file.read_text())
    raw["data"]["incoming"] = str(incoming)
    small_params_file.write_text(yaml.safe_dump(raw))
    res = runner.invoke(_cli(), ["ingest", "--params", str(small_params_file)])
    assert res.exit_code == 0, res.output
    from pipeline.config import load_params

    skipped = _skipped(load_params(small_params_file, env={}))
    assert set(skipped) == {f"{small_source}/LICENSE.txt", f"{incoming}/Leather_New/"}
    assert "not in the fold table" in skipped[f"{incoming}/Leather_New/"]["reason"]


# ---- issue 14 item 9: symbolic links are not followed out of the source root ---------------------
def test_ingest_follows_symlinks_inside_the_source_root(small_params, small_source):
    img = small_source / "Steel_In" / "Images"
    os.symlink(img / "In_1.png", img / "In_8.png")  # a link to a file inside the root
    os.symlink(small_source / "Steel_In" / "GT" / "In_1.png", small_source / "Steel_In" / "GT" / "In_8.png")
    shutil.move(small_source / "Leather_Color", small_source / ".store_Leather_Color")  # hidden real folder
    os.symlink(small_source / ".store_Leather_Color", small_source / "Leather_Color", target_is_directory=True)
    m = ingest(small_params, progress=False)
    assert (m["class_name"] == "Leather_Color").sum() == 7
    row = m.set_index("image_path").loc["raw/Steel_In/Images/In_8.png"]
    copied = small_params.data.dir / "raw" / "Steel_In" / "Images" / "In_8.png"
    assert not copied.is_symlink() and copied.read_bytes() == (img / "In_1.png").read_bytes()
    assert row["sha256"] == hashlib.sha256((img / "In_1.png").read_bytes()).hexdigest()


@pytest.mark.parametrize("what", ["image", "mask", "images_folder", "class_folder"])
def test_ingest_rejects_symlink_leading_outside_the_source_root(small_params, small_source, tmp_path, what):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy2(small_source / "Steel_In" / "Images" / "In_1.png", outside / "secret.png")
    steel = small_source / "Steel_In"
    if what == "image":
        link, target = steel / "Images" / "In_9.png", outside / "secret.png"
    elif what == "mask":
        (steel / "GT" / "In_1.png").unlink()
        link, target = steel / "GT" / "In_1.png", outside / "secret.png"
    elif what == "images_folder":
        shutil.move(steel / "Images", outside / "Images")
        link, target = steel / "Images", outside / "Images"
    else:
        shutil.move(steel, outside / "Steel_In")
        link, target = steel, outside / "Steel_In"
    os.symlink(target, link, target_is_directory=target.is_dir())
    rel = link.relative_to(small_source).as_posix()
    with pytest.raises(IngestError, match=rf"{rel} -> {target}: symbolic link leads outside the source root"):
        ingest(small_params, progress=False)
    assert not small_params.data.dir.exists()  # nothing copied, nothing written


def test_ingest_rejects_broken_symlink_and_names_unread_links(small_params, small_source, tmp_path):
    img = small_source / "Steel_In" / "Images"
    os.symlink(tmp_path / "gone.png", img / "In_9.png")
    with pytest.raises(IngestError, match=r"Steel_In/Images/In_9.png -> .*gone.png: broken symbolic link"):
        ingest(small_params, progress=False)
    (img / "In_9.png").unlink()
    # a link that ingest would not read anyway (not an image) is named, never followed
    (tmp_path / "passwd.txt").write_text("root:x:0:0")
    os.symlink(tmp_path / "passwd.txt", img / "notes.txt")
    ingest(small_params, progress=False)
    s = _skipped(small_params)["Steel_In/Images/notes.txt"]
    assert "symbolic link, not followed" in s["reason"]
    assert not any(p.name == "notes.txt" for p in (small_params.data.dir / "raw").rglob("*"))


def test_ingest_view_links_may_lead_only_into_their_recorded_root(small_params, small_source, tmp_path):
    """A source view (pipeline.classes.source_view) links each class into its source root; a link inside a
    class that leads out of that root is still refused."""
    from pipeline.classes import source_view

    view = source_view(small_params)
    m = ingest(small_params, source=view, progress=False)
    assert set(m["class_name"]) == {"Steel_In", "MT_Uneven", "Leather_Color"}
    outside = tmp_path / "outside.png"
    shutil.copy2(small_source / "Steel_In" / "Images" / "In_1.png", outside)
    os.symlink(outside, small_source / "Steel_In" / "Images" / "In_9.png")
    with pytest.raises(IngestError, match=r"Steel_In/Images/In_9.png -> .*outside.png: symbolic link leads outside"):
        ingest(small_params, source=source_view(small_params), progress=False)
    # a hand-made link in a view folder (not recorded in its marker) is refused like any other
    (small_source / "Steel_In" / "Images" / "In_9.png").unlink()
    view = source_view(small_params)
    os.symlink(tmp_path, view / "Extra", target_is_directory=True)
    with pytest.raises(IngestError, match=r"Extra -> .*: symbolic link leads outside"):
        ingest(small_params, source=view, progress=False)
