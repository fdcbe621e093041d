"""Inference on folders (``pipeline/predict.py``, ``pipeline/inference/``, ``lerenet predict``) and serving limits.

Real images copied from /work/shared/datasets/defects12, a real prototype checkpoint (no training
needed) and a real SQLite MLflow registry. CPU only; no timings.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

import pipeline.predict as P
import pipeline.request_files as RF
import pipeline.serving.limits as L
from pipeline.images import read_image, read_mask
from pipeline.inference.postprocess import connected_components, headline, overlay, png_bytes, summarise
from pipeline.inference.predictor import PredictInputError, Predictor
from pipeline.inference.resolve import ModelNotFoundError
from _registry import REAL_DATA, copy_class, prototype_checkpoint, register_champion
from conftest import write_small_params

if not REAL_DATA.is_dir():  # pragma: no cover
    pytest.skip(f"real data folder {REAL_DATA} not available", allow_module_level=True)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """Module folder: a prototype checkpoint and small copies of three real classes."""
    root = tmp_path_factory.mktemp("predict")
    prototype_checkpoint(root / "ckpt" / "model.pt")
    copy_class(root / "src", "Steel_In", 4)        # gray PNG 200x200, 0/255 masks
    copy_class(root / "src", "MT_Uneven", ["exp0_num_461", "exp1_num_109232", "exp3_num_45042"])  # gray JPEG, soft
    copy_class(root / "src", "Leather_Color", 2)   # RGB PNG 256x256
    return root


@pytest.fixture(scope="module")
def model(work):
    return Predictor.load(work / "ckpt" / "model.pt")


@pytest.fixture
def queries(work, tmp_path) -> Path:
    """A query folder mixing sizes and channels: 3 Steel_In (gray), 1 MT_Uneven (gray JPEG, other size),
    1 Leather_Color (RGB)."""
    q = tmp_path / "queries"
    q.mkdir()
    for p in sorted((work / "src" / "Steel_In" / "Images").iterdir())[1:]:
        shutil.copy2(p, q / p.name)
    shutil.copy2(work / "src" / "MT_Uneven" / "Images" / "exp0_num_461.jpg", q)
    shutil.copy2(next((work / "src" / "Leather_Color" / "Images").iterdir()), q)
    return q


def steel_support(work) -> list[tuple[Path, Path]]:
    return RF.supports_from_class_dir(work / "src" / "Steel_In", limit=1)


def leftovers(parent: Path, name: str) -> list[Path]:
    """Output folder or temporary folders of a request named ``name`` under ``parent``."""
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


# ----------------------------------------------------------------------------- postprocess
def test_components_boxes_and_connectivity():
    m = np.zeros((10, 12), bool)
    m[1:4, 1:3] = True           # 3x2 block, area 6
    m[6, 8] = m[7, 9] = True     # diagonal pair: one component under 8-connectivity
    m[9, 0] = True               # single pixel
    comps = connected_components(m)
    assert comps == [{"area": 6, "x": 1, "y": 1, "width": 2, "height": 3},
                     {"area": 2, "x": 8, "y": 6, "width": 2, "height": 2},
                     {"area": 1, "x": 0, "y": 9, "width": 1, "height": 1}]
    assert [c["area"] for c in connected_components(m, min_area=2)] == [6, 2]
    assert connected_components(np.zeros((5, 5), bool)) == []
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        connected_components(np.zeros((2, 5, 5), bool))


def test_components_match_opencv_on_real_mask():
    mask = read_mask(REAL_DATA / "MT_Crack" / "GT" / "exp1_num_249594.png")
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    ref = sorted(((int(s[4]), int(s[0]), int(s[1]), int(s[2]), int(s[3])) for s in stats[1:]), reverse=True)
    ours = sorted(((c["area"], c["x"], c["y"], c["width"], c["height"]) for c in connected_components(mask)),
                  reverse=True)
    assert ours == ref and len(ours) == n - 1 >= 1
    assert sum(c["area"] for c in connected_components(mask)) == int(mask.sum())


def test_headline_area_components_largest_box_and_max_score():
    """The per-image figures `lerenet predict` prints, on a hand-made probability map."""
    prob = np.full((20, 30), 0.1, np.float32)
    prob[2:6, 3:11] = 0.9        # 4 x 8 block: 32 px, the largest
    prob[15, 20] = 0.7           # diagonal pair: one component (8-connectivity), 2 px
    prob[16, 21] = 0.6
    prob[10, 28:30] = 0.95       # 1 x 2 at the right edge: 2 px, holds the max score
    prob[0, 0] = 0.5             # not above the threshold
    mask, info = summarise(prob, 0.5)
    row = headline(info)
    assert row == {"defect_percent": pytest.approx(100 * 36 / 600), "components": 3,
                   "largest_box": (3, 2, 8, 4), "max_score": pytest.approx(0.95)}
    assert int(mask.sum()) == 36
    assert headline(summarise(np.zeros((4, 4), np.float32), 0.5)[1]) == {
        "defect_percent": 0.0, "components": 0, "largest_box": None, "max_score": 0.0}


def test_overlay_tints_defect_and_draws_contour():
    img = np.full((40, 50), 100, np.uint8)  # gray input
    m = np.zeros((40, 50), bool)
    m[10:30, 10:30] = True
    out = overlay(img, m, tint=(255, 0, 0), alpha=0.5, contour=(0, 255, 0), thickness=1)
    assert out.shape == (40, 50, 3) and out.dtype == np.uint8
    assert tuple(out[20, 20]) == (178, 50, 50)          # inside: 0.5*100 + 0.5*tint (rounded)
    assert tuple(out[0, 0]) == (100, 100, 100)          # far outside: untouched
    assert tuple(out[10, 20]) == (0, 255, 0)            # on the boundary: contour colour
    with pytest.raises(ValueError, match="differ"):
        overlay(img, m[:-1])


def test_png_bytes_roundtrip():
    m = np.zeros((7, 9), bool)
    m[2:4, 3:8] = True
    back = np.asarray(Image.open(io.BytesIO(png_bytes(m))))
    assert back.dtype == np.uint8 and set(np.unique(back)) == {0, 255} and ((back > 0) == m).all()
    with pytest.raises(ValueError):
        png_bytes(np.zeros((3, 3), np.float32))


# ----------------------------------------------------------------------------- folder prediction
def test_predict_folder_outputs(model, work, queries, tmp_path):
    (queries / "notes.txt").write_text("not an image")
    (queries / "broken.png").write_bytes(b"\x89PNG definitely not a png")
    out = tmp_path / "out"
    with pytest.warns(RF.SkippedInputWarning) as rec:
        summary = P.predict_folder(model, steel_support(work), [queries], out, batch_size=2, progress=False)
    assert {Path(s["path"]).name for s in summary["skipped"]} == {"notes.txt", "broken.png"}
    assert len(rec) == 2
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["shots"] == 1 and summary["model"]["model"] == "prototype" and summary["model"]["version"] is None
    assert len(summary["images"]) == 5
    for rec_ in summary["images"]:
        q = read_image(rec_["query"])
        mask = np.asarray(Image.open(out / rec_["mask"]))
        ov = np.asarray(Image.open(out / rec_["overlay"]))
        assert mask.shape == q.shape[:2] == (rec_["height"], rec_["width"])      # original size
        assert ov.shape == q.shape and ov.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        assert rec_["defect_fraction"] == pytest.approx((mask > 0).mean())
        assert sum(c["area"] for c in rec_["components"]) == int((mask > 0).sum())
        assert 0.0 <= rec_["max_score"] <= 1.0
        assert (rec_["max_score"] > 0.5) == bool((mask > 0).any())
        assert rec_["model_version"] is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # temp folder renamed away


def test_cached_supports_equal_per_query_inference(model, work, queries):
    """Supports encoded once + batched queries give the same masks as end-to-end per-query inference
    (``Predictor.segment``: one query, supports encoded with it)."""
    s_img, s_msk = RF.load_supports(steel_support(work))
    sup = model.encode_support(s_img, s_msk)
    imgs = [read_image(p) for p in sorted(queries.iterdir())]
    probs = model.predict_probabilities(sup, imgs)
    for im, prob in zip(imgs, probs):
        logits = model.segment(s_img, s_msk, im)
        assert prob.shape == im.shape[:2]
        np.testing.assert_allclose(prob, 1 / (1 + np.exp(-logits)), atol=1e-4)
        assert ((prob > 0.5) != (logits > 0)).mean() <= 1e-4


def test_queries_stream_in_batches(model, work, queries, tmp_path, monkeypatch):
    """Only ``batch_size`` query images are decoded and run at a time."""
    seen: list[int] = []
    real = Predictor.predict_probabilities

    def spy(self, supports, images):
        seen.append(len(images))
        return real(self, supports, images)

    monkeypatch.setattr(Predictor, "predict_probabilities", spy)
    P.predict_folder(model, steel_support(work), [queries], tmp_path / "out", batch_size=2, progress=False)
    assert seen == [2, 2, 1]


def test_threshold_and_overwrite(model, work, queries, tmp_path):
    out = tmp_path / "out"
    lo = P.predict_folder(model, steel_support(work), [queries], out, threshold=0.2, progress=False)
    with pytest.raises(PredictInputError, match="exists; pass --overwrite"):
        P.predict_folder(model, steel_support(work), [queries], out, progress=False)
    hi = P.predict_folder(model, steel_support(work), [queries], out, threshold=0.8, overwrite=True, progress=False)
    assert json.loads((out / "summary.json").read_text())["threshold"] == 0.8
    assert all(h["defect_fraction"] <= lo_["defect_fraction"] for h, lo_ in zip(hi["images"], lo["images"]))
    assert leftovers(tmp_path, "out") == [out]


# ----------------------------------------------------------------------------- bad input: nothing written
def _expect_nothing(tmp_path: Path, fn, match: str, exc=PredictInputError):
    with pytest.raises(exc, match=match):
        fn(tmp_path / "out")
    assert leftovers(tmp_path, "out") == []


def test_missing_mask(model, work, queries, tmp_path):
    img = work / "src" / "Steel_In" / "Images" / "In_1.png"
    _expect_nothing(tmp_path, lambda o: P.predict_folder(model, [(img, tmp_path / "nope.png")], [queries], o,
                                                         progress=False), "support mask .*nope.png does not exist")
    cls = copy_class(tmp_path / "src", "Steel_In", 2)
    (cls / "GT" / "In_10.png").unlink()
    with pytest.raises(PredictInputError, match=r"mask .*In_10.png is missing"):
        RF.supports_from_class_dir(cls)


def test_mask_of_other_size(model, work, queries, tmp_path):
    img = work / "src" / "Steel_In" / "Images" / "In_1.png"
    small = tmp_path / "small.png"
    Image.open(work / "src" / "Steel_In" / "GT" / "In_1.png").resize((100, 80)).save(small)
    _expect_nothing(tmp_path, lambda o: P.predict_folder(model, [(img, small)], [queries], o, progress=False),
                    r"mask is 100x80 \(WxH\) but the image is 200x200")


def test_empty_support_mask(model, work, queries, tmp_path):
    cls = work / "src" / "MT_Uneven"
    pair = (cls / "Images" / "exp3_num_45042.jpg", cls / "GT" / "exp3_num_45042.png")  # empty as published
    _expect_nothing(tmp_path, lambda o: P.predict_folder(model, [pair], [queries], o, progress=False),
                    "the mask is empty")


def test_explicit_non_image_query_and_no_query(model, work, tmp_path):
    txt = tmp_path / "q.txt"
    txt.write_text("x")
    _expect_nothing(tmp_path, lambda o: P.predict_folder(model, steel_support(work), [txt], o, progress=False),
                    "q.txt: not an image file")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect_nothing(tmp_path, lambda o: P.predict_folder(model, steel_support(work), [empty], o, progress=False),
                    "no query image found")


def test_failure_mid_request_leaves_nothing(model, work, queries, tmp_path):
    """An undecodable query named explicitly fails the request after others were already predicted."""
    bad = tmp_path / "zz_bad.png"
    bad.write_bytes(b"not a png")
    _expect_nothing(tmp_path, lambda o: P.predict_folder(model, steel_support(work), [queries, bad], o,
                                                         batch_size=2, progress=False),
                    "zz_bad.png: not a decodable image")


def test_bad_threshold(model, work, queries, tmp_path):
    _expect_nothing(tmp_path, lambda o: P.predict_folder(model, steel_support(work), [queries], o, threshold=1.0,
                                                         progress=False), r"probability in \(0, 1\)")


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no such file"):
        Predictor.load(tmp_path / "missing.pt")
    with pytest.raises(ModelNotFoundError, match="without model.pt or MLmodel"):
        Predictor.load(tmp_path)


def test_support_pair_syntax():
    assert RF.parse_support_pair("a/b.jpg:c/d.png") == (Path("a/b.jpg"), Path("c/d.png"))
    with pytest.raises(PredictInputError, match="IMAGE:MASK"):
        RF.parse_support_pair("a/b.jpg")


# ----------------------------------------------------------------------------- registry + CLI
@pytest.fixture(scope="module")
def registry(work, tmp_path_factory):
    root = tmp_path_factory.mktemp("registry")
    return register_champion(root, work / "ckpt" / "model.pt", name="lerenet-predict-test")


def test_resolve_registry_alias_version_and_errors(registry):
    uri, name = registry["tracking_uri"], registry["name"]
    m = Predictor.load(f"models:/{name}@champion", tracking_uri=uri)
    src = m.source
    assert (src.version, src.alias, src.registered_name, src.run_id) == (registry["version"], "champion", name,
                                                                          registry["run_id"])
    assert m.image_size == 200 and m.meta["model"] == "prototype"
    assert Predictor.load(f"models:/{name}/1", tracking_uri=uri).version == "1"
    assert Predictor.load(f"runs:/{registry['run_id']}/model", tracking_uri=uri).source.run_id == registry["run_id"]
    with pytest.raises(ModelNotFoundError, match=r"no alias 'best'; its aliases: \{'champion': '1'\}"):
        Predictor.load(f"models:/{name}@best", tracking_uri=uri)
    with pytest.raises(ModelNotFoundError, match=rf"no registered model named 'other'.*\['{name}'\]"):
        Predictor.load("models:/other@champion", tracking_uri=uri)
    with pytest.raises(ModelNotFoundError, match=r"no version '7'; versions: \[1\]"):
        Predictor.load(f"models:/{name}/7", tracking_uri=uri)
    with pytest.raises(ModelNotFoundError, match="no run 'deadbeef'"):
        Predictor.load("runs:/deadbeef/model", tracking_uri=uri)


def test_cli_predict_champion_by_default(registry, work, queries, tmp_path, monkeypatch):
    from lerenet.cli import app
    from lerenet.commands.predict import TABLE_COLUMNS

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the params file names the registry

    params = write_small_params(tmp_path / "params.yaml", work / "src", tmp_path / "data",
                                mlflow={"tracking_uri": registry["tracking_uri"], "registered_model": registry["name"]})
    (queries / "readme.md").write_text("skip me")
    out = tmp_path / "out"
    img, msk = steel_support(work)[0]
    res = CliRunner().invoke(app, ["predict", "--params", str(params), "--support", f"{img}:{msk}",
                                   "--query", str(queries), "--out", str(out), "--device", "cpu", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "skipping query" in res.output and "readme.md" in res.output
    assert "Downloading" not in res.output and "it/s]" not in res.output  # no MLflow artifact progress bar
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"]["version"] == "1" and summary["model"]["alias"] == "champion"
    assert {r["model_version"] for r in summary["images"]} == {"1"}
    assert len(list((out / "masks").iterdir())) == len(list((out / "overlays").iterdir())) == 5
    # the per-image table: header, then one row per image in query order with the summary's figures
    lines = res.stdout.splitlines()
    header = next(i for i, ln in enumerate(lines) if ln.startswith("image"))
    assert re.split(r"\s{2,}", lines[header].strip()) == list(TABLE_COLUMNS)
    for line, rec in zip(lines[header + 1:header + 6], summary["images"]):
        big = rec["components"][0] if rec["components"] else None  # listed largest first
        box = [f"{big['x']},", f"{big['y']},", f"{big['width']},", str(big["height"])] if big else ["-"]
        assert line.split() == [Path(rec["query"]).name, f"{100 * rec['defect_fraction']:.2f}",
                                str(len(rec["components"])), *box, f"{rec['max_score']:.3f}"]
    assert lines[header + 6].startswith("5 mask(s) from prototype")

    # --support-dir with --shots-limit, model given as a checkpoint path
    res = CliRunner().invoke(app, ["predict", "--params", str(params), "--support-dir",
                                   str(work / "src" / "Leather_Color"), "--shots-limit", "2", "-q", str(queries),
                                   "-o", str(tmp_path / "out2"), "-m", str(work / "ckpt" / "model.pt"),
                                   "--no-progress"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["shots"] == 2


def test_cli_bad_input_exit_codes(registry, work, queries, tmp_path, monkeypatch):
    from lerenet.cli import app

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    params = write_small_params(tmp_path / "params.yaml", work / "src", tmp_path / "data",
                                mlflow={"tracking_uri": registry["tracking_uri"], "registered_model": registry["name"]})
    img, _ = steel_support(work)[0]
    base = ["predict", "--params", str(params), "-q", str(queries), "-o", str(tmp_path / "out"), "--no-progress"]
    res = CliRunner().invoke(app, base + ["--support", f"{img}:{tmp_path / 'missing.png'}"])
    assert res.exit_code == 2 and "missing.png does not exist" in res.output
    res = CliRunner().invoke(app, base + ["--support", f"{img}:{img}", "-m", f"models:/{registry['name']}@nope"])
    assert res.exit_code == 1 and "has no alias 'nope'" in res.output
    res = CliRunner().invoke(app, base)
    assert res.exit_code == 2 and "no support given" in res.output
    assert leftovers(tmp_path, "out") == []


# ----------------------------------------------------------------------------- serving limits
def _b64_png(array: np.ndarray) -> str:
    return base64.b64encode(png_bytes(array)).decode("ascii")


def test_request_limits():
    img = _b64_png(np.zeros((20, 30), np.uint8))
    ok = pd.DataFrame({"support_images": [[img]], "support_masks": [[img]], "query_image": [img]})
    L.check_request_frame(ok)
    many = pd.concat([ok] * (L.MAX_QUERIES_PER_REQUEST + 1), ignore_index=True)
    with pytest.raises(L.RequestTooLargeError, match=f"{L.MAX_QUERIES_PER_REQUEST + 1} query rows"):
        L.check_request_frame(many)
    shots = pd.DataFrame({"support_images": [[img] * (L.MAX_SUPPORTS_PER_QUERY + 1)],
                          "support_masks": [[img]], "query_image": [img]})
    with pytest.raises(L.RequestTooLargeError, match="row 0, support_images"):
        L.check_request_frame(shots)
    huge = _b64_png(np.zeros((4097, 4096), bool))  # 16.8 MP, a few kB as PNG: refused from its header
    with pytest.raises(L.RequestTooLargeError, match="row 0, query_image: image is 4096x4097"):
        L.check_request_frame(ok.assign(query_image=[huge]))
    with pytest.raises(PredictInputError, match="not valid base64"):
        L.check_request_frame(ok.assign(query_image=["***"]))
    big = _b64_png(np.zeros((4000, 4000), bool))  # 16 MP each: 5 of them pass the per-image limit, not the total
    total = pd.DataFrame({"support_images": [[big, big]], "support_masks": [[big, big]], "query_image": [big]})
    with pytest.raises(L.RequestTooLargeError, match="pixels in all"):
        L.check_request_frame(total)
