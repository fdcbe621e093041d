"""Ingest step and image helpers, on a small copy of the real data (tests/conftest.py)."""

from __future__ import annotations

import hashlib
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
