"""Defect classes by name: ``lerenet classes add|list|show|remove`` (``pipeline/classes_store.py``), the stored
format and its reader (``pipeline/serving/class_sets.py``), ``lerenet predict --class`` and the served
pyfunc's cache of encoded support sets, in-process.

Real images from /work/shared/datasets/defects12, a real prototype checkpoint (no training needed), the real
CLI (Typer's runner) and the real pyfunc (``SegmenterPyfunc.load_context`` with MLflow's own
``PythonModelContext``). The same by-name request over HTTP against ``mlflow models serve``: tests/test_serving.py.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
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
from lerenet.cli import app
from pipeline.classes_store import ClassStoreError, add_class, class_pairs, list_classes, remove_class, show_class
from pipeline.config import CLASS_NAME_PATTERN, load_params
from pipeline.inference.predictor import Predictor
from pipeline.serving import class_sets as C
from pipeline.serving.pyfunc import SegmenterPyfunc
from _registry import REAL_DATA, copy_class, prototype_checkpoint
from conftest import write_small_params

if not REAL_DATA.is_dir():  # pragma: no cover
    pytest.skip(f"real data folder {REAL_DATA} not available", allow_module_level=True)

ENV = {"LERENET_USER": "tester"}  # no S3 endpoint: nothing is uploaded


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("classes")
    prototype_checkpoint(root / "ckpt" / "model.pt")
    copy_class(root / "src", "Steel_In", 7)
    copy_class(root / "src", "MT_Uneven", ["exp0_num_461", "exp3_num_45042"])  # the second mask is empty
    copy_class(root / "src", "Leather_Color", 2)
    return root


@pytest.fixture
def params(work, tmp_path):
    return load_params(write_small_params(tmp_path / "params.yaml", work / "src", tmp_path / "data",
                                          classes={"dir": "store"}), env={})


def pairs(work, cls: str, n: int) -> list[tuple[Path, Path]]:
    return RF.supports_from_class_dir(work / "src" / cls, limit=n)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones included) with its sha256: 'nothing written' is equality."""
    return {str(p.relative_to(folder)): sha(p) for p in sorted(folder.rglob("*")) if p.is_file()} \
        if folder.exists() else {}


# ----------------------------------------------------------------------------- the store
def test_add_list_show_remove_round_trip(params, work):
    src = pairs(work, "Steel_In", 2)
    info = add_class(params, "Steel_In", src, env=ENV)
    store = params.root / "store"
    assert info.folder == store / "Steel_In" and info.version == 1 and info.shots == 2
    rec = json.loads((store / "Steel_In" / "class.json").read_text())
    assert rec["name"] == "Steel_In" and rec["created_by"] == "tester" and rec["shots"] == 2
    assert rec["created"].endswith("+00:00") and rec["mask_threshold"] == 127
    for (img, msk), s in zip(src, rec["supports"]):  # stored bytes = given bytes, sha256 recorded
        assert s["image_sha256"] == sha(img) == sha(store / "Steel_In" / s["image"])
        assert s["mask_sha256"] == sha(msk) == sha(store / "Steel_In" / s["mask"])
        assert (s["width"], s["height"]) == Image.open(img).size
    assert [c.name for c in list_classes(params)] == ["Steel_In"]
    assert show_class(params, "Steel_In").problem is None
    # the reader the server uses gives the same pixels as reading the given files
    images, masks, _ = C.load_class(store, "Steel_In")
    ref_i, ref_m = RF.load_supports(src)
    assert all(np.array_equal(a, b) for a, b in zip(images, ref_i)) and all(np.array_equal(a, b) for a, b in zip(masks, ref_m))

    # a second class from a folder (first 5 by file name), replace bumps the version
    assert add_class(params, "Leather_Color", pairs(work, "Leather_Color", 1), env=ENV).version == 1
    with pytest.raises(ClassStoreError, match="exists .*pass --replace"):
        add_class(params, "Steel_In", src[:1], env=ENV)
    again = add_class(params, "Steel_In", src[:1], replace=True, env=ENV)
    assert again.version == 2 and again.shots == 1 and again.fingerprint != info.fingerprint
    assert [c.name for c in list_classes(params)] == ["Leather_Color", "Steel_In"]

    # a file edited after `add` is detected by show, predict --class and the server's reader
    (store / "Steel_In" / again.record["supports"][0]["mask"]).write_bytes(src[1][1].read_bytes())
    assert "does not match the sha256" in show_class(params, "Steel_In").problem
    with pytest.raises(ClassStoreError, match="does not match the sha256"):
        class_pairs(params, "Steel_In")
    with pytest.raises(C.ClassSetError, match="does not match the sha256"):
        C.load_class(store, "Steel_In")

    assert remove_class(params, "Steel_In", env=ENV).name == "Steel_In"
    assert [c.name for c in list_classes(params)] == ["Leather_Color"]
    assert sorted(p.name for p in store.iterdir()) == ["Leather_Color"]  # nothing left aside
    with pytest.raises(ClassStoreError, match="not in the class store") as err:
        remove_class(params, "Steel_In", env=ENV)
    assert err.value.missing


def test_bad_input_names_the_problem_and_writes_nothing(params, work, tmp_path):
    store = params.root / "store"
    add_class(params, "Kept", pairs(work, "Steel_In", 1), env=ENV)
    before = snapshot(store)
    img, msk = pairs(work, "Steel_In", 1)[0]
    small = tmp_path / "small.png"
    Image.new("L", (10, 10), 255).save(small)
    empty_img, empty_msk = work / "src/MT_Uneven/Images/exp3_num_45042.jpg", work / "src/MT_Uneven/GT/exp3_num_45042.png"
    cases = [  # (name, pairs, part of the message)
        ("New", [(img, tmp_path / "nope.png")], f"support mask {tmp_path / 'nope.png'} does not exist"),
        ("New", [(tmp_path / "nope.jpg", msk)], f"support image {tmp_path / 'nope.jpg'} does not exist"),
        ("New", [(img, small)], "mask is 10x10 (WxH) but the image is 200x200"),
        ("New", [(empty_img, empty_msk)], "the mask is empty"),
        ("New", pairs(work, "Steel_In", 6), "6 support pairs given; a class holds 1 to 5"),
        ("New", [(img, msk), (img, msk)], "is the same file as"),
        ("New", [], "no support given"),
        ("../evil", [(img, msk)], "not a safe folder name"),
        ("a b", [(img, msk)], "not a safe folder name"),
        ("Kept", [(img, msk)], "class Kept exists"),
    ]
    for name, given, reason in cases:
        with pytest.raises(ClassStoreError) as err:
            add_class(params, name, given, env=ENV)
        assert reason in str(err.value), (name, str(err.value))
        assert snapshot(store) == before, name  # not one file written, no temporary folder left
    # an image with a mask but a bad mask later in the list: the good first pair is not stored either
    with pytest.raises(ClassStoreError, match="the mask is empty"):
        add_class(params, "Mixed", [(img, msk), (empty_img, empty_msk)], env=ENV)
    assert snapshot(store) == before


def test_cli_round_trip_and_exit_codes(params, work):
    p = str(params.root / "params.yaml")
    run = lambda *a: CliRunner().invoke(app, [*a, "--params", p])  # noqa: E731
    res = run("classes", "add", "Steel_In", "--from-dir", str(work / "src" / "Steel_In"))
    assert res.exit_code == 0, res.output
    assert "class Steel_In version 1: 5 shot(s)" in res.output  # --from-dir takes the first 5 of 7
    res = run("classes", "list")
    assert res.exit_code == 0 and re.search(r"Steel_In\s+1\s+5\s+[0-9a-f]{16}", res.output), res.output
    res = run("classes", "show", "Steel_In")
    assert res.exit_code == 0 and "files match their sha256" in res.output, res.output
    assert run("classes", "add", "Steel_In", "--from-dir", str(work / "src" / "Steel_In")).exit_code == 2
    res = run("classes", "add", "X", "--from-dir", str(work / "src"))
    assert res.exit_code == 2 and "--from-dir" in res.output and "no Images/ subfolder" in res.output
    res = run("classes", "show", "Nope")
    assert res.exit_code == 1 and "known: ['Steel_In']" in res.output
    assert run("classes", "remove", "Steel_In").exit_code == 0
    assert "no class in" in run("classes", "list").output


def test_name_rule_is_the_config_rule():
    assert C.CLASS_NAME_PATTERN == CLASS_NAME_PATTERN


# ----------------------------------------------------------------------------- predict --class
def test_predict_by_class_equals_explicit_supports(params, work, tmp_path):
    model = Predictor.load(work / "ckpt" / "model.pt")
    src = pairs(work, "Steel_In", 2)
    add_class(params, "Steel_In", src, env=ENV)
    queries = [work / "src/Steel_In/Images/In_102.png", work / "src/MT_Uneven/Images/exp0_num_461.jpg",
               next((work / "src/Leather_Color/Images").iterdir())]
    stored, info = class_pairs(params, "Steel_In")
    by_class = P.predict_folder(model, stored, queries, tmp_path / "a", progress=False,
                                support_class={"name": "Steel_In", "version": info.version})
    explicit = P.predict_folder(model, src, queries, tmp_path / "b", progress=False)
    for ra, rb in zip(by_class["images"], explicit["images"]):
        assert (tmp_path / "a" / ra["mask"]).read_bytes() == (tmp_path / "b" / rb["mask"]).read_bytes()
        assert ra["max_score"] == rb["max_score"] and ra["defect_fraction"] == rb["defect_fraction"]
    assert by_class["class"]["name"] == "Steel_In"

    # the CLI: --class NAME, and the clear errors
    p = str(params.root / "params.yaml")
    res = CliRunner().invoke(app, ["predict", "--params", p, "--class", "Steel_In", "-q", str(queries[0]),
                                   "-o", str(tmp_path / "c"), "-m", str(work / "ckpt" / "model.pt"), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "K=2, class Steel_In v1" in res.output
    assert (tmp_path / "c" / "masks" / "In_102.png").read_bytes() == (tmp_path / "b" / "masks" / "In_102.png").read_bytes()
    res = CliRunner().invoke(app, ["predict", "--params", p, "--class", "Nope", "-q", str(queries[0]),
                                   "-o", str(tmp_path / "d"), "-m", str(work / "ckpt" / "model.pt")])
    assert res.exit_code == 1 and "class 'Nope' is not in the class store" in res.output and not (tmp_path / "d").exists()
    res = CliRunner().invoke(app, ["predict", "--params", p, "--class", "Steel_In", "--support-dir",
                                   str(work / "src/Steel_In"), "-q", str(queries[0]), "-o", str(tmp_path / "d")])
    assert res.exit_code == 2 and "give one of them" in res.output


# ----------------------------------------------------------------------------- served pyfunc, in-process
def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def served(checkpoint: Path, store: Path | None, **config) -> SegmenterPyfunc:
    model = SegmenterPyfunc()
    cfg = {**config, **({C.CONFIG_KEY: str(store)} if store else {})}
    model.load_context(PythonModelContext(artifacts={"checkpoint": str(checkpoint)}, model_config=cfg))
    return model


def test_pyfunc_by_class_equals_supports_in_request_and_caches(params, work, tmp_path):
    store = params.root / "store"
    src = pairs(work, "Steel_In", 1)
    add_class(params, "Steel_In", src, env=ENV)
    add_class(params, "Leather_Color", pairs(work, "Leather_Color", 1), env=ENV)
    model = served(work / "ckpt" / "model.pt", store, class_cache_size=1)
    queries = [b64(q) for q in sorted((work / "src/Steel_In/Images").iterdir())[2:5]]
    (img, msk), = src
    by_supports = model.predict(None, pd.DataFrame({"support_images": [[b64(img)]] * 3,
                                                    "support_masks": [[b64(msk)]] * 3, "query_image": queries}))
    by_name = model.predict(None, pd.DataFrame({"class": ["Steel_In"] * 3, "query_image": queries}))
    assert model.classes.misses == 1 and model.classes.hits == 0  # three rows, one encoding
    for a, b in zip(by_name.itertuples(), by_supports.itertuples()):
        ma = np.asarray(Image.open(io.BytesIO(base64.b64decode(a.mask))))
        mb = np.asarray(Image.open(io.BytesIO(base64.b64decode(b.mask))))
        assert (ma != mb).mean() <= 1e-4 and a.max_score == pytest.approx(b.max_score, abs=1e-5)
    model.predict(None, pd.DataFrame({"class": ["Steel_In"], "query_image": queries[:1]}))
    assert (model.classes.hits, model.classes.misses) == (1, 1)

    # mixed request (records form: a class row carries empty support lists), order kept
    mixed = model.predict(None, pd.DataFrame([
        {"support_images": [b64(img)], "support_masks": [b64(msk)], "class": None, "query_image": queries[0]},
        {"support_images": [], "support_masks": [], "class": "Steel_In", "query_image": queries[1]}]))
    assert list(mixed["mask"]) == [by_supports["mask"][0], by_name["mask"][1]]

    # bounded: capacity 1, another class evicts Steel_In; a changed class is re-encoded
    model.predict(None, pd.DataFrame({"class": ["Leather_Color"], "query_image": queries[:1]}))
    assert model.classes.evictions == 1 and "Steel_In" not in model.classes and len(model.classes) == 1
    add_class(params, "Leather_Color", src, replace=True, env=ENV)  # new supports: sha256s change
    again = model.predict(None, pd.DataFrame({"class": ["Leather_Color"], "query_image": queries[:1]}))
    assert model.classes.misses == 3 and again["mask"][0] == by_supports["mask"][0]

    # a different model drops every entry
    model.classes.set_model("another-model")
    assert len(model.classes) == 0

    # errors: unknown class, no store configured, both a class and supports in one row
    with pytest.raises(MlflowException, match=r"class 'Nope' is not in the class store .*known: \['Leather_Color', "
                                              r"'Steel_In'\]"):
        model.predict(None, pd.DataFrame({"class": ["Nope"], "query_image": queries[:1]}))
    with pytest.raises(MlflowException, match="this server has no class store"):
        served(work / "ckpt" / "model.pt", None).predict(None, pd.DataFrame({"class": ["Steel_In"],
                                                                              "query_image": queries[:1]}))
    with pytest.raises(MlflowException, match="row 0: both class 'Steel_In' and support_images"):
        model.predict(None, pd.DataFrame({"class": ["Steel_In"], "support_images": [[b64(img)]],
                                          "support_masks": [[b64(msk)]], "query_image": queries[:1]}))
    with pytest.raises(ValueError, match="class_cache_size must be a positive integer"):
        served(work / "ckpt" / "model.pt", store, class_cache_size=0)


def test_store_from_config_and_env(tmp_path):
    assert C.store_from_config({C.CONFIG_KEY: str(tmp_path)}, env={C.STORE_ENV: "/elsewhere"}) == tmp_path
    assert C.store_from_config({}, env={C.STORE_ENV: str(tmp_path)}) == tmp_path
    assert C.store_from_config(None, env={}) is None



# ----------------------------------------------------------------------------- S3 (real SeaweedFS)
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A real SeaweedFS with the models bucket (``lerenet services up --only seaweedfs``); stopped at the end."""
    from pipeline import services as svc
    from _s3_server import services_params

    sparams = services_params(tmp_path_factory.mktemp("s3state"))
    keys = {"AWS_ACCESS_KEY_ID": "lerenet-test-key", "AWS_SECRET_ACCESS_KEY": "lerenet-test-secret-0123456789"}
    svc.up(sparams, ["seaweedfs"], env=keys)
    creds = svc.ensure_credentials(sparams, keys)
    store = svc.local_store(sparams, creds, max_attempts=2, connect_timeout=1.0, read_timeout=10.0)
    try:
        yield {"LERENET_S3_ENDPOINT_URL": svc.s3_endpoint(sparams), **keys, **ENV}, store
    finally:
        svc.down(sparams)


def test_add_uploads_versioned_objects_and_remove_drops_the_pointer(params, work, s3):
    env, s3store = s3
    bucket = params.services.models_bucket
    src = pairs(work, "Steel_In", 2)
    info = add_class(params, "Steel_In", src, env=env)
    assert info.uploaded[-1] == f"s3://{bucket}/classes/Steel_In/latest.json"
    rec = json.loads(s3store.get_bytes(bucket, "classes/Steel_In/v1/class.json"))
    assert rec == info.record
    for s in rec["supports"]:  # the objects are the stored files
        assert hashlib.sha256(s3store.get_bytes(bucket, f"classes/Steel_In/v1/{s['image']}")).hexdigest() == s["image_sha256"]
        assert hashlib.sha256(s3store.get_bytes(bucket, f"classes/Steel_In/v1/{s['mask']}")).hexdigest() == s["mask_sha256"]
    add_class(params, "Steel_In", src[:1], replace=True, env=env)
    latest = json.loads(s3store.get_bytes(bucket, "classes/Steel_In/latest.json"))
    assert latest["version"] == 2 and latest["prefix"] == "classes/Steel_In/v2/"
    assert s3store.exists(bucket, "classes/Steel_In/v1/class.json")  # versions are kept
    remove_class(params, "Steel_In", env=env)
    assert not s3store.exists(bucket, "classes/Steel_In/latest.json")
    assert s3store.exists(bucket, "classes/Steel_In/v2/class.json")
