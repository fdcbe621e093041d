"""Serving the registered champion over REST with the real ``mlflow models serve``.

Registers a real prototype model (no training needed) in a SQLite MLflow registry under tmp_path, sets
alias ``champion``, starts ``mlflow models serve -m models:/<name>@champion --env-manager local`` on a
free loopback port, posts real HTTP requests (httpx) and checks the returned masks against
``pipeline.predict.predict_folder`` (the code behind ``lerenet predict``) on the same files. The served
model carries only ``model/`` and ``pipeline/{inference,serving}`` as code, so this also checks that
serving needs nothing else of the project. The server is started once for the module, with a byte limit
of :data:`SERVED_LIMIT` set the way an operator would (``SERVING_MODEL_CONFIG``), and hostile or malformed
payloads (tests/_payloads.py) must each get HTTP 400 with the reason. Requests naming a stored class
(``lerenet classes add``; the server finds the store through ``LERENET_CLASS_STORE``) must give the
same masks as the same supports sent in the request. The server is always stopped by the fixture's
finalizer. About 20-40 s.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import pipeline.predict as P
from pipeline.bench.serve_case import free_port as _free_port
from pipeline.bench.serve_case import stop_group as _stop
from pipeline.inference.predictor import Predictor
from pipeline.serving.class_sets import STORE_ENV
from pipeline.serving.limits import MAX_QUERIES_PER_REQUEST
from _payloads import EPS, b64, png_declaring, png_with_tail, random_bytes
from _registry import REAL_DATA, copy_class, prototype_checkpoint, register_champion

if not REAL_DATA.is_dir():  # pragma: no cover
    pytest.skip(f"real data folder {REAL_DATA} not available", allow_module_level=True)

START_TIMEOUT = 180.0
#: the served model's byte limit for this module (the logged default, 32 MiB, overridden when serving)
SERVED_LIMIT = 1024 * 1024


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """``(base_url, registry info, data folder)`` of a live scoring server for the champion."""
    root = tmp_path_factory.mktemp("serving")
    ckpt = prototype_checkpoint(root / "ckpt" / "model.pt")
    reg = register_champion(root, ckpt, name="lerenet-serving-test")
    copy_class(root / "src", "Steel_In", 3)
    copy_class(root / "src", "MT_Uneven", ["exp0_num_461"])
    copy_class(root / "src", "Leather_Color", 1)
    port = _free_port()
    bin_dir = Path(sys.executable).parent  # the server runs `uvicorn` from PATH: the venv's bin first
    env = {**os.environ, "MLFLOW_TRACKING_URI": reg["tracking_uri"], "MLFLOW_REGISTRY_URI": reg["tracking_uri"],
           STORE_ENV: str(root / "classes"),  # the class store of by-name requests (filled by the tests)
           "MLFLOW_ENABLE_TELEMETRY": "false", "SERVING_MODEL_CONFIG": json.dumps({"max_request_bytes": SERVED_LIMIT}),
           "DO_NOT_TRACK": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_cli = bin_dir / "mlflow"
    log = (root / "server.log").open("wb")
    proc = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", f"models:/{reg['name']}@champion", "--host", "127.0.0.1",
         "--port", str(port), "--env-manager", "local", "--workers", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n"
                            f"{(root / 'server.log').read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT} s:\n{(root / 'server.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield url, reg, root
    finally:
        _stop(proc)
        log.close()


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode("ascii")


def test_served_champion_matches_lerenet_predict(served, tmp_path):
    url, reg, root = served
    src = root / "src"
    support_img, support_mask = src / "Steel_In" / "Images" / "In_1.png", src / "Steel_In" / "GT" / "In_1.png"
    queries = [src / "Steel_In" / "Images" / "In_10.png", src / "MT_Uneven" / "Images" / "exp0_num_461.jpg",
               next((src / "Leather_Color" / "Images").iterdir())]
    payload = {"dataframe_split": {
        "columns": ["support_images", "support_masks", "query_image"],
        "data": [[[_b64(support_img)], [_b64(support_mask)], _b64(q)] for q in queries]}}
    r = httpx.post(f"{url}/invocations", json=payload, timeout=120)
    assert r.status_code == 200, r.text[-2000:]
    preds = r.json()["predictions"]
    assert len(preds) == len(queries)

    # the same request through the CLI's code path, with the champion resolved from the registry
    model = Predictor.load(f"models:/{reg['name']}@champion", tracking_uri=reg["tracking_uri"])
    qdir = tmp_path / "q"
    qdir.mkdir()
    for i, q in enumerate(queries):  # keep the request order in file-name order
        (qdir / f"{i}_{q.name}").write_bytes(q.read_bytes())
    summary = P.predict_folder(model, [(support_img, support_mask)], [qdir], tmp_path / "out", progress=False)
    for pred, rec, q in zip(preds, summary["images"], queries):
        served_mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(pred["mask"]))))
        cli_mask = np.asarray(Image.open(tmp_path / "out" / rec["mask"]))
        with Image.open(q) as im:
            assert served_mask.shape == cli_mask.shape == (im.height, im.width)
        assert (served_mask != cli_mask).mean() <= 1e-4, f"{q.name}: served and CLI masks differ"
        assert pred["defect_fraction"] == pytest.approx(rec["defect_fraction"], abs=1e-4)
        assert pred["max_score"] == pytest.approx(rec["max_score"], abs=1e-4)


def test_served_records_format_and_errors(served):
    url, _, root = served
    img = root / "src" / "Steel_In" / "Images" / "In_1.png"
    mask = root / "src" / "Steel_In" / "GT" / "In_1.png"
    row = {"support_images": [_b64(img)], "support_masks": [_b64(mask)], "query_image": _b64(img)}
    r = httpx.post(f"{url}/invocations", json={"dataframe_records": [row]}, timeout=120)
    assert r.status_code == 200, r.text[-2000:]
    assert set(r.json()["predictions"][0]) == {"mask", "defect_fraction", "max_score"}

    # too many queries in one request: refused with the documented limit
    r = httpx.post(f"{url}/invocations", json={"dataframe_records": [row] * (MAX_QUERIES_PER_REQUEST + 1)},
                   timeout=120)
    assert r.status_code == 400
    assert f"the limit is {MAX_QUERIES_PER_REQUEST} per request" in r.text

    # a support mask of another size than its image
    small = io.BytesIO()
    Image.new("L", (10, 10), 255).save(small, format="PNG")
    bad = dict(row, support_masks=[base64.b64encode(small.getvalue()).decode()])
    r = httpx.post(f"{url}/invocations", json={"dataframe_records": [bad]}, timeout=120)
    assert r.status_code == 400 and "support_masks[0]" in r.text
    assert json.loads(r.text)["error_code"] == "BAD_REQUEST"


def test_served_references_column(served):
    """The logged signature takes the optional ``references`` column; the served prototype has no reference threshold,
    so valid references leave the mask as without them; a bad reference is HTTP 400 naming row and field."""
    url, _, root = served
    img = _b64(root / "src" / "Steel_In" / "Images" / "In_1.png")
    row = {"support_images": [img], "support_masks": [_b64(root / "src" / "Steel_In" / "GT" / "In_1.png")],
           "query_image": img}
    nd = _b64(next((REAL_DATA / "MT_Blowhole" / "Nd").iterdir()))
    r = httpx.post(f"{url}/invocations", json={"dataframe_records": [{**row, "references": [nd]},
                                                                     {**row, "references": []}]}, timeout=120)
    assert r.status_code == 200, r.text[-2000:]
    preds = r.json()["predictions"]
    assert preds[0]["mask"] == preds[1]["mask"]
    r = httpx.post(f"{url}/invocations", json={"dataframe_records": [{**row, "references": [nd, "not base64!"]}]},
                   timeout=120)
    assert r.status_code == 400 and r.json()["error_code"] == "BAD_REQUEST"
    assert "row 0, references[1]: not valid base64" in r.json()["message"]


def test_served_refuses_oversized_and_hostile_payloads(served):
    """Each bad payload gets HTTP 400, error code BAD_REQUEST and a message naming row and field (no traceback)."""
    url, _, root = served
    img = _b64(root / "src" / "Steel_In" / "Images" / "In_1.png")
    mask = _b64(root / "src" / "Steel_In" / "GT" / "In_1.png")
    base = {"support_images": [img], "support_masks": [mask], "query_image": img}
    padded = b64(png_with_tail(SERVED_LIMIT))  # an 8x8 PNG + 1 MiB of zeros: ~1.4 MB of base64
    cases = [  # (what, fields replaced in the one row, expected part of the message)
        ("8x8 PNG + zeros over the limit", {"query_image": padded},
         f"row 0, query_image: the request's base64 image data reaches {len(img) + len(mask) + len(padded)} bytes "
         f"here ({len(padded)} in this field), above the limit of {SERVED_LIMIT} bytes per request"),
        ("EPS", {"query_image": b64(EPS)}, "row 0, query_image: not a PNG, JPEG, BMP or TIFF file (it starts with "
                                           "b'%!PS-Ado'); other formats (EPS/PostScript"),
        ("decompression bomb", {"support_images": [b64(png_declaring(100_000, 100_000))]},
         "row 0, support_images[0]: refused as a possible decompression bomb"),
        ("bad base64", {"support_masks": ["not base64!"]}, "row 0, support_masks[0]: not valid base64"),
        ("two masks for one image", {"support_masks": [mask, mask]},
         "row 0: 1 support_images but 2 support_masks; send one mask per support image, in the same order"),
        ("random bytes", {"query_image": b64(random_bytes())}, "row 0, query_image: not a PNG, JPEG, BMP or TIFF file"),
    ]
    for what, fields, reason in cases:
        r = httpx.post(f"{url}/invocations", json={"dataframe_records": [{**base, **fields}]}, timeout=120)
        assert r.status_code == 400, (what, r.status_code, r.text[-1000:])
        body = r.json()
        assert body["error_code"] == "BAD_REQUEST", what
        assert reason in body["message"], (what, body["message"][-1000:])
        assert "stack_trace" not in body and "Traceback" not in r.text, what
    # the same 8x8 PNG with a tail under the limit is a valid image: it was the byte limit that refused it
    r = httpx.post(f"{url}/invocations", json={"dataframe_records": [
        {**base, "query_image": b64(png_with_tail(SERVED_LIMIT // 2))}]}, timeout=120)
    assert r.status_code == 200, r.text[-1000:]
    assert Image.open(io.BytesIO(base64.b64decode(r.json()["predictions"][0]["mask"]))).size == (8, 8)


def test_served_by_class_name_equals_supports_in_request(served, tmp_path):
    """`lerenet classes add` on the store the running server reads; then a request with a `class` column
    (no support images) answers as the same supports sent in the request, and a replaced class is seen
    without restarting the server."""
    from lerenet.cli import app
    from typer.testing import CliRunner

    from conftest import write_small_params

    url, _, root = served
    src = root / "src"
    params = write_small_params(tmp_path / "params.yaml", src, tmp_path / "data", classes={"dir": str(root / "classes")})
    s_img, s_msk = src / "Steel_In" / "Images" / "In_1.png", src / "Steel_In" / "GT" / "In_1.png"
    res = CliRunner().invoke(app, ["classes", "add", "Steel_In", "--support", f"{s_img}:{s_msk}",
                                   "--params", str(params), "--replace"])
    assert res.exit_code == 0, res.output
    queries = [src / "Steel_In" / "Images" / "In_10.png", src / "MT_Uneven" / "Images" / "exp0_num_461.jpg",
               next((src / "Leather_Color" / "Images").iterdir())]
    with_supports = {"dataframe_split": {"columns": ["support_images", "support_masks", "query_image"],
                                         "data": [[[_b64(s_img)], [_b64(s_msk)], _b64(q)] for q in queries]}}
    by_name = {"dataframe_split": {"columns": ["class", "query_image"], "data": [["Steel_In", _b64(q)] for q in queries]}}
    r_sup = httpx.post(f"{url}/invocations", json=with_supports, timeout=120)
    r_cls = httpx.post(f"{url}/invocations", json=by_name, timeout=120)
    assert r_sup.status_code == 200 and r_cls.status_code == 200, (r_sup.text[-1000:], r_cls.text[-1000:])
    for a, b, q in zip(r_cls.json()["predictions"], r_sup.json()["predictions"], queries):
        ma = np.asarray(Image.open(io.BytesIO(base64.b64decode(a["mask"]))))
        mb = np.asarray(Image.open(io.BytesIO(base64.b64decode(b["mask"]))))
        assert ma.shape == mb.shape and (ma != mb).mean() <= 1e-4, q.name
        assert a["max_score"] == pytest.approx(b["max_score"], abs=1e-4)

    # records form, one row by name and one with supports (the class row sends empty support lists)
    rows = [{"class": "Steel_In", "support_images": [], "support_masks": [], "query_image": _b64(queries[0])},
            {"support_images": [_b64(s_img)], "support_masks": [_b64(s_msk)], "query_image": _b64(queries[1])}]
    r = httpx.post(f"{url}/invocations", json={"dataframe_records": rows}, timeout=120)
    assert r.status_code == 200, r.text[-1000:]
    assert [p["mask"] for p in r.json()["predictions"]] == [p["mask"] for p in r_cls.json()["predictions"][:2]]

    # the class is replaced with other supports: the server re-encodes it (sha256s changed), no restart
    l_img = next((src / "Leather_Color" / "Images").iterdir())
    l_msk = src / "Leather_Color" / "GT" / f"{l_img.stem}.png"
    res = CliRunner().invoke(app, ["classes", "add", "Steel_In", "--support", f"{l_img}:{l_msk}", "--replace",
                                   "--params", str(params)])
    assert res.exit_code == 0, res.output
    leather = {"dataframe_split": {"columns": ["support_images", "support_masks", "query_image"],
                                   "data": [[[_b64(l_img)], [_b64(l_msk)], _b64(q)] for q in queries]}}
    r_new = httpx.post(f"{url}/invocations", json=by_name, timeout=120)
    r_ref = httpx.post(f"{url}/invocations", json=leather, timeout=120)
    assert [p["max_score"] for p in r_new.json()["predictions"]] == \
        pytest.approx([p["max_score"] for p in r_ref.json()["predictions"]], abs=1e-4)

    # an unknown class: HTTP 400 naming it and the known ones
    r = httpx.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["class", "query_image"],
                                                                     "data": [["Nope", _b64(queries[0])]]}}, timeout=120)
    assert r.status_code == 400 and r.json()["error_code"] == "BAD_REQUEST"
    assert "class 'Nope' is not in the class store" in r.json()["message"] and "Steel_In" in r.json()["message"]
