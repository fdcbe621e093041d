"""The MLflow pyfunc wrapper: codec, logging to SQLite MLflow, load, predict == direct model prediction."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.augment import clean_pair, to_tensor_pair
from pipeline.images import read_image, read_mask, resize_image
from pipeline.serving.codec import PyfuncInputError, decode_image, decode_mask, encode_png, parse_input
from pipeline.serving.limits import DEFAULT_MAX_REQUEST_BYTES

from conftest import REAL_DATA

SUPPORTS = ["exp1_num_109232", "exp1_num_124236"]  # MT_Uneven, gray JPEG, soft masks
QUERY = "exp1_num_129031"


def _pair(stem: str) -> tuple[np.ndarray, np.ndarray]:
    if not REAL_DATA.is_dir():
        pytest.skip(f"real data {REAL_DATA} not available")
    return (read_image(REAL_DATA / "MT_Uneven" / "Images" / f"{stem}.jpg"),
            read_mask(REAL_DATA / "MT_Uneven" / "GT" / f"{stem}.png"))


def _b64_file(path: Path) -> str:
    import base64

    return base64.b64encode(path.read_bytes()).decode()


def test_codec_round_trip_is_lossless():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (13, 17, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (13, 17), dtype=np.uint8)
    mask = rng.random((13, 17)) > 0.5
    assert np.array_equal(decode_image(encode_png(rgb)), rgb)
    assert np.array_equal(decode_image(encode_png(gray)), np.repeat(gray[:, :, None], 3, 2))
    assert np.array_equal(decode_mask(encode_png(mask)), mask)
    with pytest.raises(ValueError, match="png_bytes expects"):
        encode_png(np.zeros((4, 4), np.float32))


def test_parse_input_names_row_and_column():
    img = encode_png(np.zeros((8, 8, 3), np.uint8))
    msk = encode_png(np.zeros((8, 8), bool))
    bad_size = encode_png(np.zeros((9, 8), bool))
    with pytest.raises(PyfuncInputError, match="missing column"):
        parse_input(pd.DataFrame({"support_images": [[img]], "query_image": [img]}))
    with pytest.raises(PyfuncInputError, match=r"row 1, support_masks\[0\]: mask size"):
        parse_input(pd.DataFrame({"support_images": [[img], [img]], "support_masks": [[msk], [bad_size]],
                                  "query_image": [img, img]}))
    with pytest.raises(PyfuncInputError, match=r"row 0, query_image: not valid base64"):
        parse_input(pd.DataFrame({"support_images": [[img]], "support_masks": [[msk]], "query_image": ["@@@"]}))
    with pytest.raises(PyfuncInputError, match="1 support_images but 2 support_masks"):
        parse_input(pd.DataFrame({"support_images": [[img]], "support_masks": [[msk, msk]], "query_image": [img]}))


def _direct_prediction(net, image_size, supports, query) -> np.ndarray:
    """Reference: preprocessing as in training, model.forward_features asked for the query's size."""
    imgs, msks = zip(*(to_tensor_pair(*clean_pair(i, m, image_size)) for i, m in supports))
    q = torch.from_numpy(resize_image(query, image_size)).permute(2, 0, 1).float().div(255)
    with torch.no_grad():
        sf = net.encode(torch.stack(imgs)).unsqueeze(0)
        qf = net.encode(q[None])
        logits = net.forward_features(sf, torch.stack(msks)[None], qf, query.shape[:2])
    return (logits[0, 0] > 0).numpy()


@pytest.mark.parametrize("model_name", ["prototype", "lerenet"])
def test_pyfunc_round_trip_equals_direct_prediction(tmp_path, model_name):

    from model import build_model
    from pipeline.checkpoint import load_model, save_model

    torch.manual_seed(0)
    net = build_model(model_name, pretrained=True, channels=32)
    ckpt = tmp_path / "model.pt"
    save_model(ckpt, net, {"model": model_name, "backbone": "efficientnet_lite0", "variant": "mpr+mpe*",
                           "channels": 32, "freeze_backbone": True, "image_size": 96})
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    try:
        _round_trip(tmp_path, ckpt, load_model)
    finally:
        mlflow.set_tracking_uri(previous)


def _round_trip(tmp_path, ckpt, load_model):
    """Log ``ckpt`` as a pyfunc, load it back, predict, compare with the direct model prediction."""
    from pipeline.inference.predictor import Predictor
    from pipeline.serving.pyfunc import log_pyfunc

    exp = mlflow.create_experiment("pyfunc-test", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        uri = log_pyfunc(ckpt, name="model", registered_model_name="pyfunc-test-model")
    # a clean console: no "input example was not provided" (or other) user-visible warning; MLflow's own
    # pandas DeprecationWarning is hidden by Python's default filters outside __main__
    assert [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)] == []
    loaded = mlflow.pyfunc.load_model(uri)
    example = loaded.input_example  # logged with the model (shown in the MLflow UI)
    assert list(example.columns) == ["support_images", "support_masks", "query_image", "references"]
    assert len(example) == 1  # the references column passes the logged signature (optional: `frame` below has none)
    assert list(loaded.predict(example).columns) == ["mask", "defect_fraction", "max_score"]
    # the model ships model/ and only the inference and serving packages of pipeline/
    code = Path(mlflow.artifacts.download_artifacts(uri)) / "code"
    assert sorted(p.name for p in code.iterdir()) == ["model", "pipeline"]
    assert sorted(p.name for p in (code / "pipeline").iterdir()) == ["__init__.py", "inference", "serving"]
    assert Predictor.load(uri).image_size == 96  # the logged-model URI (models:/m-...) resolves too
    # the byte limit travels as the model's model_config, and a loader (the server) can override it
    assert loaded.model_config == {"max_request_bytes": DEFAULT_MAX_REQUEST_BYTES}
    tight = mlflow.pyfunc.load_model(uri, model_config={"max_request_bytes": 100})
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"row 0, support_masks\[0\]: .* above the limit "
                                                                r"of 100 bytes per request"):
        tight.predict(pd.DataFrame({"support_images": [[encode_png(np.zeros((8, 8), np.uint8))]],
                                    "support_masks": [[encode_png(np.ones((8, 8), bool))]],
                                    "query_image": [encode_png(np.zeros((8, 8), np.uint8))]}))

    supports = [_pair(s) for s in SUPPORTS]
    query, _ = _pair(QUERY)
    imgs = [_b64_file(REAL_DATA / "MT_Uneven" / "Images" / f"{s}.jpg") for s in SUPPORTS]
    msks = [_b64_file(REAL_DATA / "MT_Uneven" / "GT" / f"{s}.png") for s in SUPPORTS]
    q64 = _b64_file(REAL_DATA / "MT_Uneven" / "Images" / f"{QUERY}.jpg")
    # row 0: 2-shot; row 1: 1-shot with the second support only
    frame = pd.DataFrame({"support_images": [imgs, imgs[1:]], "support_masks": [msks, msks[1:]],
                          "query_image": [q64, q64]})
    out = loaded.predict(frame)
    assert list(out.columns) == ["mask", "defect_fraction", "max_score"] and len(out) == 2

    ref_net, meta = load_model(ckpt)
    for row, sup in enumerate([supports, supports[1:]]):
        expected = _direct_prediction(ref_net, meta["image_size"], sup, query)
        got = decode_mask(out["mask"][row])
        assert got.shape == query.shape[:2]  # the query's original size
        assert np.array_equal(got, expected)
        assert out["defect_fraction"][row] == pytest.approx(expected.mean())
        assert 0.0 <= out["max_score"][row] <= 1.0

    # the registered model URI loads back to the same network for evaluation
    predictor = Predictor.load("models:/pyfunc-test-model/1")
    assert predictor.image_size == 96 and predictor.version == "1"
    sd1, sd2 = ref_net.state_dict(), predictor.net.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)


def test_pyfunc_transductive_steps_parameter_changes_the_call_only(tmp_path):
    """``params={"transductive_steps": N}`` refines the hypercolumn probe for that call (RePRI-style test-time
    adaptation); no parameter = the model file's setting; the setting is restored after the call; bad values and
    a model without the probe get HTTP 400 (``BAD_REQUEST``)."""
    from model import build_model
    from pipeline.checkpoint import save_model
    from pipeline.inference.predictor import PredictInputError, Predictor
    from pipeline.serving.pyfunc import log_pyfunc

    torch.manual_seed(0)
    net = build_model("lerenet", pretrained=True, channels=16, priors=["hypercolumn"], prior_skip=True,
                      skip_source="hypercolumn", query_path="off")
    ckpt = tmp_path / "model.pt"
    save_model(ckpt, net, {"model": "lerenet", "backbone": "efficientnet_lite0", "variant": "mpr+mpe*",
                           "channels": 16, "freeze_backbone": True, "image_size": 96, "config": net.config})
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns.db'}")
    try:
        exp = mlflow.create_experiment("tta", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp):
            uri = log_pyfunc(ckpt, name="model")
        loaded = mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_tracking_uri(previous)
    assert [p.name for p in loaded.metadata.get_params_schema().params] == ["transductive_steps"]
    imgs = [_b64_file(REAL_DATA / "MT_Uneven" / "Images" / f"{s}.jpg") for s in SUPPORTS[:1]]
    msks = [_b64_file(REAL_DATA / "MT_Uneven" / "GT" / f"{s}.png") for s in SUPPORTS[:1]]
    _pair(QUERY)  # skips without the real data
    frame = pd.DataFrame({"support_images": [imgs], "support_masks": [msks],
                          "query_image": [_b64_file(REAL_DATA / "MT_Uneven" / "Images" / f"{QUERY}.jpg")]})
    plain = loaded.predict(frame)
    assert plain.equals(loaded.predict(frame, params={"transductive_steps": 0}))   # the model file says 0
    refined = loaded.predict(frame, params={"transductive_steps": 50})
    assert refined["max_score"][0] != pytest.approx(plain["max_score"][0], abs=1e-6)
    assert plain.equals(loaded.predict(frame))                                      # restored after the call
    with pytest.raises(mlflow.exceptions.MlflowException, match=r"transductive_steps must be an integer in \[0, 1000\]"):
        loaded.predict(frame, params={"transductive_steps": 5000})
    proto = Predictor(build_model("prototype", pretrained=False), 96, {"model": "prototype"})
    assert proto.transductive_steps is None
    with pytest.raises(PredictInputError, match="has no hypercolumn probe"):
        with proto.transductive(3):
            pass
