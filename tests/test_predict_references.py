"""Reference images (defect-free images of the queries' surface) through ``lerenet predict --reference``
(``pipeline.predict.predict_folder(references=...)``) and the served pyfunc's ``references`` column, in-process.

Real images from /work/shared/datasets/defects12, a real prototype checkpoint (no training needed); the model
file with a reference threshold is that checkpoint with ``presence_threshold_ref`` / ``presence_references`` set
in its metadata (how tests/test_reference_gate.py and tests/test_gate.py exercise the gate). The real CLI
(Typer's runner) and the real pyfunc (``SegmenterPyfunc.load_context`` with MLflow's ``PythonModelContext``).
"""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModelContext
from PIL import Image
from typer.testing import CliRunner

import pipeline.predict as P
import pipeline.request_files as RF
import pipeline.serving.limits as L
from pipeline.images import read_image
from pipeline.inference.predictor import PredictInputError, Predictor
from pipeline.serving.codec import PyfuncInputError
from pipeline.serving.pyfunc import SegmenterPyfunc
from _payloads import png_declaring
from _registry import REAL_DATA, copy_class, prototype_checkpoint
from conftest import write_small_params

if not REAL_DATA.is_dir():  # pragma: no cover
    pytest.skip(f"real data folder {REAL_DATA} not available", allow_module_level=True)

ENV = {"LERENET_USER": "tester"}  # no S3 endpoint: nothing is uploaded


# ----------------------------------------------------------------------------- fixtures
def _with_reference_gate(src: Path, dest: Path, tau_ref: float) -> Path:
    """A copy of model file ``src`` whose presence gate has a reference threshold ``tau_ref`` (R = 1)."""
    from pipeline.checkpoint import load_model, save_model

    net, meta = load_model(src)
    save_model(dest, net, {**meta, "presence_threshold_ref": tau_ref, "presence_references": 1})
    return dest


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A prototype checkpoint (no reference threshold), the same with one that gates every query given
    references (``presence_threshold_ref`` 1e9), Steel_In pairs, and a folder of two defect-free MT images
    with a stray text file."""
    root = tmp_path_factory.mktemp("references")
    plain = prototype_checkpoint(root / "ckpt" / "model.pt")
    _with_reference_gate(plain, root / "ckpt" / "gated.pt", 1e9)
    copy_class(root / "src", "Steel_In", 3)
    refs = root / "refs"
    refs.mkdir()
    for p in sorted((REAL_DATA / "MT_Blowhole" / "Nd").iterdir())[:2]:
        shutil.copy2(p, refs / p.name)
    (refs / "notes.txt").write_text("not an image")
    return root


def support(work) -> list[tuple[Path, Path]]:
    return RF.supports_from_class_dir(work / "src" / "Steel_In", limit=1)


def query(work) -> Path:
    """The support image itself: the prototype marks its defect, so an empty mask means the gate emptied it."""
    return support(work)[0][0]


def masks_of(out: Path, summary: dict) -> list[np.ndarray]:
    return [np.asarray(Image.open(out / r["mask"])) for r in summary["images"]]


def leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def mask_of(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


# ----------------------------------------------------------------------------- predict_folder
def test_predict_folder_gates_relative_to_the_references_and_records_them(work, tmp_path):
    gated = Predictor.load(work / "ckpt" / "gated.pt")
    assert gated.presence_gate.uses_references and gated.presence_threshold is None  # no max-logit gate
    q = [str(query(work))]
    plain = P.predict_folder(gated, support(work), q, tmp_path / "plain", progress=False)
    assert masks_of(tmp_path / "plain", plain)[0].any(), "without references nothing gates the query"
    assert (plain["references"], plain["references_used"], plain["reference_level"]) == ([], False, None)
    assert plain["references_note"] == P.REFERENCES_MISSING    # calibrated with references, none given: said

    one = work / "refs" / sorted(p.name for p in (work / "refs").glob("*.jpg"))[0]
    with pytest.warns(RF.SkippedInputWarning, match="skipping reference .*notes.txt"):
        refd = P.predict_folder(gated, support(work), q, tmp_path / "refd", progress=False,
                                references=[one, work / "refs"])
    listed = [str(one)] + [str(p) for p in sorted((work / "refs").glob("*.jpg"))]  # a folder lists its images
    assert refd["references"] == listed and refd["references_used"] is True
    assert not masks_of(tmp_path / "refd", refd)[0].any(), "presence_threshold_ref 1e9 gates every referenced query"
    assert refd["images"][0]["max_score"] < 0.5
    s_img, s_msk = RF.load_supports(support(work))
    want = gated.support_level(gated.encode_support(s_img, s_msk), [read_image(p) for p in listed])
    assert refd["reference_level"] == pytest.approx(want)
    assert json.loads((tmp_path / "refd" / "summary.json").read_text()) == refd

    # a threshold far below every reference score keeps the query: the same mask as without references
    low = Predictor.load(_with_reference_gate(work / "ckpt" / "model.pt", tmp_path / "low.pt", -1e9))
    kept = P.predict_folder(low, support(work), q, tmp_path / "kept", progress=False, references=[one])
    assert np.array_equal(masks_of(tmp_path / "kept", kept)[0], masks_of(tmp_path / "plain", plain)[0])


@pytest.mark.filterwarnings("ignore::pipeline.request_files.SkippedInputWarning")  # the folder's notes.txt
def test_a_model_without_reference_threshold_ignores_them_with_a_note(work, tmp_path):
    model = Predictor.load(work / "ckpt" / "model.pt")
    assert not model.presence_gate.uses_references
    q = [str(query(work))]
    base = P.predict_folder(model, support(work), q, tmp_path / "base", progress=False)
    with pytest.warns(P.ReferencesIgnoredWarning, match="no reference threshold"):
        got = P.predict_folder(model, support(work), q, tmp_path / "out", progress=False, references=[work / "refs"])
    assert got["references_used"] is False and got["reference_level"] is None and len(got["references"]) == 2
    assert "train.presence_references" in got["references_note"]
    assert np.array_equal(masks_of(tmp_path / "out", got)[0], masks_of(tmp_path / "base", base)[0])


def test_bad_reference_files_are_named_and_nothing_is_written(work, tmp_path):
    model = Predictor.load(work / "ckpt" / "gated.pt")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG definitely not a png")
    bad_dir = tmp_path / "bad_refs"
    bad_dir.mkdir()
    shutil.copy2(broken, bad_dir / "zz.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    txt = tmp_path / "refs.txt"
    txt.write_text("x")
    cases = [(tmp_path / "missing.png", "reference .*missing.png does not exist"),
             (broken, "reference .*broken.png: not a decodable image .*defect-free images"),
             (bad_dir, r"reference .*zz.png: not a decodable image"),  # in a folder too: never skipped
             (txt, "reference .*refs.txt: not an image file"),
             (empty, "no reference image found")]
    for ref, match in cases:
        with pytest.raises(PredictInputError, match=match):
            P.predict_folder(model, support(work), [str(query(work))], tmp_path / "out", progress=False,
                             references=[ref])
        assert leftovers(tmp_path, "out") == [], ref


# ----------------------------------------------------------------------------- CLI
def test_cli_reference_option(work, tmp_path):
    from lerenet.cli import app

    params = write_small_params(tmp_path / "params.yaml", work / "src", tmp_path / "data")
    img, msk = support(work)[0]
    base = ["predict", "--params", str(params), "--support", f"{img}:{msk}", "-q", str(img), "--device", "cpu",
            "--no-progress"]
    res = CliRunner().invoke(app, base + ["-m", str(work / "ckpt" / "gated.pt"), "-o", str(tmp_path / "a"),
                                          "--reference", str(work / "refs")])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert len(summary["references"]) == 2 and summary["references_used"] is True
    assert not masks_of(tmp_path / "a", summary)[0].any()
    assert "2 reference(s) used" in res.stdout

    res = CliRunner().invoke(app, base + ["-m", str(work / "ckpt" / "model.pt"), "-o", str(tmp_path / "b"),
                                          "-r", str(work / "refs")])
    assert res.exit_code == 0, res.output
    assert "warning: 2 reference image(s) given, but the model file's presence gate has no reference threshold" \
        in res.output and "2 reference(s) ignored" in res.stdout
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["references_used"] is False

    res = CliRunner().invoke(app, base + ["-m", str(work / "ckpt" / "gated.pt"), "-o", str(tmp_path / "c"),
                                          "--reference", str(tmp_path / "nope.png")])
    assert res.exit_code == 2 and "reference" in res.output and "nope.png does not exist" in res.output
    assert leftovers(tmp_path, "c") == []


# ----------------------------------------------------------------------------- served pyfunc
def served(checkpoint: Path, store: Path | None = None) -> SegmenterPyfunc:
    model = SegmenterPyfunc()
    model.load_context(PythonModelContext(artifacts={"checkpoint": str(checkpoint)},
                                          model_config={"class_store": str(store)} if store else {}))
    return model


def test_pyfunc_rows_with_references_are_gated_relative_to_them(work):
    model = served(work / "ckpt" / "gated.pt")
    (img, msk), = support(work)
    ref = b64(next((work / "refs").glob("*.jpg")))
    row = {"support_images": [b64(img)], "support_masks": [b64(msk)], "query_image": b64(img)}
    out = model.predict(None, pd.DataFrame([{**row, "references": [ref]}, {**row, "references": []}]))
    assert not mask_of(out["mask"][0]).any() and mask_of(out["mask"][1]).any()
    old = model.predict(None, pd.DataFrame([row]))  # requests without the column still work
    assert old["mask"][0] == out["mask"][1]
    ignoring = served(work / "ckpt" / "model.pt").predict(None, pd.DataFrame([{**row, "references": [ref]}]))
    assert ignoring["mask"][0] == out["mask"][1]  # a model file without a reference threshold ignores them


def test_pyfunc_by_class_rows_use_their_own_references(work, tmp_path):
    """Rows of one stored class with different references (or none) in one request: each row is gated with its own
    references' level (the cached support set is encoded once and never carries a row's references)."""
    from pipeline.classes_store import add_class
    from pipeline.config import load_params

    params = load_params(write_small_params(tmp_path / "params.yaml", work / "src", tmp_path / "data",
                                            classes={"dir": "store"}), env={})
    add_class(params, "Steel_In", support(work), env=ENV)
    (img, msk), = support(work)
    nd = next((work / "refs").glob("*.jpg"))
    # the level of each reference set under the class's support, and the query's own max log-odds
    pred = Predictor.load(work / "ckpt" / "model.pt")
    s_img, s_msk = RF.load_supports(support(work))
    sup = pred.encode_support(s_img, s_msk)
    q = read_image(img)
    top = float(pred.net.presence_log_odds(pred.head(sup.feats, sup.masks, pred.encode_images([q]), gate=False).amax()))
    low, high = pred.support_level(sup, [read_image(nd)]), pred.support_level(sup, [q])  # the query as its reference
    assert low < high == pytest.approx(top, abs=1e-4), "a defect-free image must score below the defect itself"
    tau = (top - low) / 2  # kept relative to the defect-free image (top - low >= tau), gated relative to itself (0)
    model = served(_with_reference_gate(work / "ckpt" / "model.pt", tmp_path / "mid.pt", tau), params.root / "store")
    rows = [{"class": "Steel_In", "support_images": [], "support_masks": [], "query_image": b64(img),
             "references": refs} for refs in ([b64(nd)], [b64(img)], [], [b64(nd)])]
    out = model.predict(None, pd.DataFrame(rows))
    assert [bool(mask_of(m).any()) for m in out["mask"]] == [True, False, True, True]
    assert model.classes.misses == 1 and model.classes.hits == 0  # one encoding for the four rows
    cached = model.classes.get("Steel_In", model.predictor)[0]
    assert cached.level is None  # the cache holds the class's support set without any row's references
    with_supports = model.predict(None, pd.DataFrame([{"support_images": [b64(img)], "support_masks": [b64(msk)],
                                                       "query_image": b64(img), "references": [b64(img)]}]))
    assert with_supports["mask"][0] == out["mask"][1]  # by name and by supports agree with references too


def test_bad_references_are_http_400_naming_row_and_field(work):
    model = served(work / "ckpt" / "gated.pt")
    (img, msk), = support(work)
    row = {"support_images": [b64(img)], "support_masks": [b64(msk)], "query_image": b64(img)}
    junk = base64.b64encode(b"\x89PNG definitely not a png").decode()
    cases = [(["***"], r"row 1, references\[0\]: not valid base64"),
             ([b64(img), junk], r"row 1, references\[1\]: (the image header cannot be read|not a PNG)"),
             ([7], r"row 1, references\[0\]: expected a base64 string, got int"),
             ({"x": 1}, "row 1, references: expected a list of base64 strings, got dict"),
             ([b64(img)] * (L.MAX_REFERENCES_PER_QUERY + 1),
              f"row 1, references: {L.MAX_REFERENCES_PER_QUERY + 1} items; the limit is "
              f"{L.MAX_REFERENCES_PER_QUERY} reference images per query")]
    for refs, match in cases:
        with pytest.raises(MlflowException, match=match) as err:
            model.predict(None, pd.DataFrame([row, {**row, "references": refs}]))
        assert err.value.get_http_status_code() == 400 and isinstance(err.value.__cause__, PredictInputError)
    # a by-class row's references are checked too, before the class store is asked (none configured here)
    with pytest.raises(MlflowException, match=r"row 0, references\[0\]: not valid base64"):
        model.predict(None, pd.DataFrame([{"class": "Steel_In", "query_image": b64(img), "references": ["***"]}]))


def test_references_count_in_the_byte_and_pixel_limits():
    from pipeline.serving.codec import encode_png

    img = encode_png(np.zeros((20, 30), np.uint8))
    frame = pd.DataFrame({"support_images": [[img]], "support_masks": [[img]], "query_image": [img],
                          "references": [[img, img]]})
    L.check_request_frame(frame, max_request_bytes=5 * len(img))
    with pytest.raises(L.RequestTooLargeError, match=r"^row 0, references\[1\]: the request's base64 image data "
                                                     rf"reaches {5 * len(img)} bytes"):
        L.check_request_frame(frame, max_request_bytes=5 * len(img) - 1)
    huge = base64.b64encode(png_declaring(4096, 4097)).decode()
    with pytest.raises(L.RequestTooLargeError, match=r"row 0, references\[0\]: image is 4096x4097"):
        L.check_request_frame(frame.assign(references=[[huge]]))
    big = encode_png(np.zeros((4000, 4000), bool))  # 16 MP each: a class row's query and 4 references pass one by one
    by_class = pd.DataFrame({"class": ["Steel_In"], "query_image": [big], "references": [[big] * 4]})
    with pytest.raises(L.RequestTooLargeError, match="pixels in all"):
        L.check_request_frame(by_class)
    with pytest.raises(PyfuncInputError, match=r"row 0, references\[0\]: not a PNG"):
        L.check_request_frame(frame.assign(references=[[base64.b64encode(b"GIF89a" + bytes(20)).decode()]]))
