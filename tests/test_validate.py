"""Validation step: every bad input of issue 2 fails naming file, row and rule, and writes
nothing downstream; empty masks are excluded, not fatal. Runs on a small copy of real data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import EMPTY_MASK_IMAGE, write_small_params
from pipeline.config import load_params
from pipeline.images import DOCS_DIR, REPORT, VALIDATED, DataArtifactError, load_validated
from pipeline.ingest import ingest
from pipeline.split import split
from pipeline.validate import DataValidationError, hamming_pairs, validate

runner = CliRunner()


def _fails(params, *, rule: str, names: list[str]) -> DataValidationError:
    """Ingest + validate must fail with ``rule`` naming every string in ``names``; nothing downstream."""
    ingest(params, progress=False)
    with pytest.raises(DataValidationError) as info:
        validate(params)
    msg = str(info.value)
    assert f"[{rule}]" in msg, msg
    for name in names:
        assert name in msg, msg
    data = params.data.dir
    assert not (data / VALIDATED).exists()
    report = json.loads((data / REPORT).read_text())
    assert report["success"] is False and any(f["rule"] == rule for f in report["failures"])
    with pytest.raises(DataArtifactError, match="lerenet validate"):
        split(params)
    assert not (data / "splits").exists() and not (data / "episodes").exists()
    return info.value


def test_small_real_data_passes_and_empty_mask_is_excluded(small_params):
    ingest(small_params, progress=False)
    report = validate(small_params)
    data = small_params.data.dir
    assert report["success"] and report["failures"] == []
    assert [e["file"] for e in report["excluded"]] == [f"raw/{EMPTY_MASK_IMAGE}"]
    assert "empty mask" in report["excluded"][0]["reason"]
    v = load_validated(data)
    assert len(v) == 25 - 1 and f"raw/{EMPTY_MASK_IMAGE}" not in set(v["image_path"])
    assert (v["kind"] == "normal").sum() == 3  # Nd images kept
    assert report["per_class"]["MT_Uneven"] == {"defect": 8, "usable_defect": 7, "normal": 3}
    assert report["great_expectations"]["success"] is True
    assert len(report["great_expectations"]["expectations"]) >= 10
    # GX Data Docs a person can open
    index = data / DOCS_DIR / "index.html"
    assert index.is_file()
    pages = list((data / DOCS_DIR / "validations").rglob("*.html"))
    assert len(pages) == 1
    html = pages[0].read_text()
    assert "values must be null" in html and "soft_fraction" in html  # rendered expectations
    assert json.loads((data / REPORT).read_text()) == json.loads(json.dumps(report, default=str))


def test_corrupt_jpeg(small_params, small_source):
    jpg = small_source / "MT_Uneven" / "Images" / "exp1_num_124236.jpg"
    jpg.write_bytes(jpg.read_bytes()[:400])  # truncated JPEG
    err = _fails(small_params, rule="decodes", names=["raw/MT_Uneven/Images/exp1_num_124236.jpg", "row "])
    assert any(f.rule == "decodes" and f.row is not None for f in err.failures)


def test_mask_missing(small_params, small_source):
    (small_source / "Steel_In" / "GT" / "In_4.png").unlink()
    _fails(small_params, rule="mask_present", names=["raw/Steel_In/Images/In_4.png", "Steel_In/GT/In_4.png"])


def test_mask_size_differs_from_image(small_params, small_source):
    mpath = small_source / "Leather_Color" / "GT" / "color12.png"
    with Image.open(mpath) as m:
        m.resize((128, 100), Image.NEAREST).save(mpath)
    _fails(small_params, rule="mask_same_size", names=["raw/Leather_Color/Images/color12.png", "128x100"])


def test_mask_not_binarisable(small_params, small_source):
    mpath = small_source / "Steel_In" / "GT" / "In_5.png"
    noise = np.random.default_rng(0).integers(0, 256, size=(200, 200), dtype=np.uint8)
    Image.fromarray(noise).save(mpath)
    _fails(small_params, rule="mask_binarisable", names=["raw/Steel_In/Images/In_5.png", "max_soft_fraction"])


def test_class_folder_with_too_few_images(small_params, small_source):
    for name in ("color0", "color102", "color108"):
        (small_source / "Leather_Color" / "Images" / f"{name}.png").unlink()
    _fails(small_params, rule="class_min_images", names=["raw/Leather_Color/Images", "4 usable", "at least 6"])


def test_duplicate_image_in_two_classes(small_params, small_source):
    shutil.copy2(small_source / "Steel_In" / "Images" / "In_6.png", small_source / "Leather_Color" / "Images" / "x.png")
    shutil.copy2(small_source / "Steel_In" / "GT" / "In_6.png", small_source / "Leather_Color" / "GT" / "x.png")
    _fails(small_params, rule="unique_image", names=["raw/Leather_Color/Images/x.png", "raw/Steel_In/Images/In_6.png"])


def test_near_duplicate_across_classes_fails_unless_allowed(small_params, small_source, tmp_path):
    src = small_source / "Steel_In" / "Images" / "In_7.png"
    arr = np.asarray(Image.open(src)).astype(np.int16)
    Image.fromarray(np.clip(arr + 3, 0, 255).astype(np.uint8)).save(small_source / "Leather_Color" / "Images" / "y.png")
    shutil.copy2(small_source / "Steel_In" / "GT" / "In_7.png", small_source / "Leather_Color" / "GT" / "y.png")
    _fails(small_params, rule="near_duplicate", names=["raw/Leather_Color/Images/y.png", "raw/Steel_In/Images/In_7.png"])

    allowed = write_small_params(tmp_path / "params.yaml", small_source, tmp_path / "data",
                                 data={"near_duplicate_allow": [["Steel_In/Images/In_7.png", "Leather_Color/Images/y.png"]]})
    report = validate(load_params(allowed, env={}))
    assert report["success"] and len(report["near_duplicates"]["allowed"]) == 1


def test_same_image_twice_in_one_class_is_excluded(small_params, small_source):
    for sub in ("Images", "GT"):
        shutil.copy2(small_source / "Steel_In" / sub / "In_1.png", small_source / "Steel_In" / sub / "In_1_copy.png")
    ingest(small_params, progress=False)
    report = validate(small_params)
    dup = [e for e in report["excluded"] if e["file"] == "raw/Steel_In/Images/In_1_copy.png"]
    assert dup and "raw/Steel_In/Images/In_1.png" in dup[0]["reason"]
    assert load_validated(small_params.data.dir)["id"].is_unique


def test_unknown_class_in_fold_table(small_params_file, small_source, tmp_path):
    params = load_params(write_small_params(small_params_file, small_source, tmp_path / "data",
                                            folds={0: ["Steel_In"], 1: ["MT_Uneven", "Steel_Xx"],
                                                   2: ["Leather_Color"]}), env={})
    _fails(params, rule="fold_class_has_data", names=["Steel_Xx", "folds"])


def test_class_in_data_missing_from_fold_table(small_params_file, small_source, tmp_path):
    params = load_params(write_small_params(small_params_file, small_source, tmp_path / "data",
                                            folds={0: ["Steel_In"], 1: ["MT_Uneven"]}), env={})
    _fails(params, rule="class_in_fold_table", names=["Leather_Color", "add the class to a fold"])


def test_failure_removes_stale_validated_and_detects_edits_after_ingest(small_params):
    ingest(small_params, progress=False)
    validate(small_params)
    data = small_params.data.dir
    assert (data / VALIDATED).exists()
    (data / "raw" / "Steel_In" / "Images" / "In_2.png").write_bytes(b"edited")
    with pytest.raises(DataValidationError, match=r"\[file_unchanged\] row \d+ raw/Steel_In/Images/In_2.png"):
        validate(small_params)
    assert not (data / VALIDATED).exists()


def test_cli_validate_exit_codes(small_params_file, small_params, small_source):
    from lerenet.cli import app

    ingest(small_params, progress=False)
    res = runner.invoke(app, ["validate", "--params", str(small_params_file)])
    assert res.exit_code == 0, res.output
    assert "excluded raw/MT_Uneven/Images/exp3_num_45042.jpg: empty mask" in res.output
    (small_source / "Steel_In" / "GT" / "In_4.png").unlink()
    ingest(small_params, progress=False)
    res = runner.invoke(app, ["validate", "--params", str(small_params_file)])
    assert res.exit_code == 1 and "[mask_present]" in res.output and "In_4.png" in res.output


def test_hamming_pairs():
    hashes = ["0000000000000000", "0000000000000003", "ffffffffffffffff", None]
    assert hamming_pairs(hashes, 2) == [(0, 1, 2)]
    assert hamming_pairs(hashes, 1) == []
    assert hamming_pairs(hashes, 64, block=1) == [(0, 1, 2), (0, 2, 64), (1, 2, 62)]


# ---- issue 16: the Data Docs page names the asset and the run and shows every exclusion and warning ----
def _page_text(data) -> tuple[str, str]:
    """(raw HTML, visible text) of the one validation page of the Data Docs site."""
    import re

    pages = list((data / DOCS_DIR / "validations").rglob("*.html"))
    assert len(pages) == 1, pages
    raw = pages[0].read_text()
    text = re.sub(r"<(script|style)\b.*?</\1>", " ", raw, flags=re.S)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))
    return raw, text


def test_data_docs_name_the_asset_and_run_and_list_exclusions(small_params, small_source):
    (small_source / "Steel_In" / "Images" / "<img src=x onerror=alert(1)>.txt").write_text("not an image")
    ingest(small_params, progress=False)
    report = validate(small_params)
    raw, text = _page_text(small_params.data.dir)
    assert "Data asset: source-manifest" in text and "Data asset: None" not in text
    assert report["data_version"].startswith("manifest-sha256-")
    assert f"Run Name {report['data_version']}" in text and "__none__" not in raw
    assert "LERENet validation: PASSED" in text
    # the empty-mask exclusion, with its reason, and the file ingest skipped, with what to do
    assert f"Excluded from validated.parquet (1) row file reason 14 raw/{EMPTY_MASK_IMAGE} empty mask" in text
    assert "Files of the source not used by ingest (1)" in text and "convert it to PNG" in text
    # file names are escaped, never injected as HTML
    assert "<img src=x onerror" not in raw and "&lt;img src=x onerror=alert(1)&gt;.txt" in raw
    # the page's findings are the report's
    assert report["skipped"][0]["path"] == "Steel_In/Images/<img src=x onerror=alert(1)>.txt"


def test_data_docs_show_python_rule_failures_and_near_duplicates(small_params, small_source):
    """A failure found outside GX (class_min_images) makes the page say FAILED and name it; a within-class
    near-duplicate (reported, not fatal) and a repeated copy are listed."""
    for name in ("color0", "color102", "color108"):
        (small_source / "Leather_Color" / "Images" / f"{name}.png").unlink()
        (small_source / "Leather_Color" / "GT" / f"{name}.png").unlink()
    for sub in ("Images", "GT"):
        shutil.copy2(small_source / "Steel_In" / sub / "In_1.png", small_source / "Steel_In" / sub / "In_1_copy.png")
    ingest(small_params, progress=False)
    with pytest.raises(DataValidationError):
        validate(small_params)
    _, text = _page_text(small_params.data.dir)
    assert "LERENet validation: FAILED (1 problems)" in text
    assert "class_min_images" in text and "Leather_Color has 4 usable" in text and "add images to the class" in text
    assert "raw/Steel_In/Images/In_1_copy.png exact duplicate" in text
    assert "within_class raw/Steel_In/Images/In_1.png | raw/Steel_In/Images/In_1_copy.png 0" in text


def test_validation_warns_when_the_ingest_report_is_missing_or_stale(small_params):
    ingest(small_params, progress=False)
    data = small_params.data.dir
    (data / "ingest_report.json").unlink()
    report = validate(small_params)
    assert report["success"] and "ingest_report.json is missing" in report["warnings"][0]
    ingest(small_params, progress=False)
    body = json.loads((data / "ingest_report.json").read_text())
    body["manifest_sha256"] = "0" * 64
    (data / "ingest_report.json").write_text(json.dumps(body))
    report = validate(small_params)
    assert "belongs to another ingest" in report["warnings"][0]
    assert "belongs to another ingest" in _page_text(data)[1]
