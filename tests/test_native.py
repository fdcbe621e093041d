"""SOFS non-resizing (pipeline/inference/native.py): windows, crops and stitching, and the one inference
path that uses them (Predictor, evaluation, training views) on real magnetic-tile images."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import REAL_DATA
from pipeline.inference import native

S = 64  # window side (the network's image size) in these tests


# ----------------------------------------------------------------------------- pure functions
def test_windows_follow_the_sofs_tiling_and_cover_every_pixel_once_or_more():
    boxes = native.windows(400, 630, 200)
    assert [b[:2] for b in boxes] == [(t, l) for t in (0, 200) for l in (0, 200, 400, 430)]
    assert {b[2:] for b in boxes} == {(200, 200)}
    cover = np.zeros((400, 630), int)
    for t, l, h, w in boxes:
        cover[t:t + h, l:l + w] += 1
    assert cover.min() == 1 and cover[:, 430:600].max() == 2 and cover[:, :400].max() == 1
    # an image narrower than a window: windows as tall as the image, the last one on the right edge
    assert native.windows(100, 220, 200) == [(0, 0, 100, 200), (0, 20, 100, 200)]
    assert native.windows(200, 200, 200) == [(0, 0, 200, 200)]
    with pytest.raises(ValueError, match="positive"):
        native.windows(0, 10, 5)


def test_stitch_averages_the_overlaps_and_refuses_gaps():
    boxes = native.windows(3, 5, 3)  # columns 0..2 and 2..4: column 2 seen twice
    out = native.stitch([np.full((3, 3), 1.0), np.full((3, 3), 3.0)], boxes, (3, 5))
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out[0], [1, 1, 2, 3, 3])
    with pytest.raises(ValueError, match="cover"):
        native.stitch([np.zeros((3, 3))], boxes[:1], (3, 5))
    with pytest.raises(ValueError, match="window"):
        native.stitch([np.zeros((2, 3)), np.zeros((3, 3))], boxes, (3, 5))


def test_small_means_a_defect_of_at_most_the_area_share():
    m = np.zeros((100, 100), bool)
    assert not native.is_small(m, 0.01)  # no defect: nothing to crop around (anomaly mode)
    m[:10, :10] = True                  # exactly 1 %
    assert native.is_small(m, 0.01) and not native.is_small(m, 0.0099) and not native.is_small(m, None)
    assert native.defect_share(m) == pytest.approx(0.01)


def test_support_crop_is_centred_on_the_defect_and_stays_inside_the_image():
    m = np.zeros((300, 500), bool)
    m[140:150, 240:260] = True
    t, l, h, w = native.crop_box(m, 100)
    assert (h, w) == (100, 100) and abs((t + 49.5) - 144.5) <= 1 and abs((l + 49.5) - 249.5) <= 1
    m[:] = False
    m[0:3, 495:500] = True                                   # in the top-right corner: shifted inside
    assert native.crop_box(m, 100) == (0, 400, 100, 100)
    assert native.crop_box(np.zeros((50, 80), bool), 100) == (0, 0, 50, 80)  # image smaller than the window
    with pytest.raises(ValueError, match="mask"):
        native.crop_box(np.zeros(5, bool), 10)


def test_training_crops_hold_a_defect_pixel_and_vary_their_size_as_sofs():
    m = np.zeros((400, 600), bool)
    m[200, 300] = True
    rng = np.random.default_rng(0)
    sides = set()
    for _ in range(200):
        t, l, h, w = native.crop_box(m, 200, rng)
        assert t <= 200 < t + h and l <= 300 < l + w and h == w
        sides.add(h)
    assert min(sides) >= 140 and max(sides) <= 240 and len(sides) > 20
    t, l, h, w = native.crop_box(np.zeros((400, 600), bool), 200, np.random.default_rng(1))  # defect-free: anywhere
    assert 0 <= t <= 400 - h and 0 <= l <= 600 - w


# ----------------------------------------------------------------------------- the inference path
def _pairs(cls: str, n: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    root = REAL_DATA / cls
    if not root.is_dir():
        pytest.skip(f"real data folder {root} not available (set LERENET_TEST_DATA)")
    names = sorted((root / "Images").iterdir())[:n]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in names]
    masks = [np.asarray(Image.open(root / "GT" / f"{p.stem}.png").convert("L")) > 127 for p in names]
    return images, masks, [str(p) for p in names]


@pytest.fixture(scope="module")
def predictor():
    from model import build_model
    from pipeline.inference.predictor import Predictor

    torch.manual_seed(0)
    net = build_model("sofs", channels=32, native_area=0.01).eval()  # ImageNet Lite0: logits of both signs
    return Predictor(net, S, {"model": "sofs"})


def test_small_supports_are_cropped_and_queries_segmented_window_by_window(predictor):
    images, masks, _ = _pairs("MT_Blowhole", 3)  # every blowhole covers < 1 % of its tile
    assert all(native.is_small(m, 0.01) for m in masks)
    support = predictor.encode_support(images[:1], masks[:1])
    assert support.native
    box = native.crop_box(masks[0], S)
    resized_crop = predictor.mask_batch([native.cut(masks[0], box)])
    assert torch.equal(support.masks[0], resized_crop)      # the mask of the native crop, not of the whole tile
    assert support.masks.sum() > predictor.mask_batch(masks[:1]).sum()  # the defect keeps more cells

    query = images[1]
    out = predictor.predict_logits(support, [query])[0]
    assert out.shape == query.shape[:2]
    # each window is what the resized path gives for that window alone (windows are S x S: no resizing)
    plain = dataclasses.replace(support, native=False)
    boxes = native.windows(*query.shape[:2], S)
    tiles = [predictor.predict_logits(plain, [native.cut(query, b)])[0] for b in boxes]
    np.testing.assert_allclose(out, native.stitch(tiles, boxes, query.shape[:2]), atol=1e-5)


def test_large_supports_or_no_threshold_keep_the_resized_path(predictor):
    images, masks, _ = _pairs("MT_Uneven", 3)
    large = [i for i, m in enumerate(masks) if native.defect_share(m) > 0.01]
    assert large
    j = large[0]
    support = predictor.encode_support([images[j]], [masks[j]])
    assert not support.native
    assert torch.equal(support.masks[0], predictor.mask_batch([masks[j]]))
    blow, bmask, _ = _pairs("MT_Blowhole", 1)
    area = predictor.net.native_area
    try:
        predictor.net.native_area = None  # a model file without the switch: small defects are resized too
        assert predictor.native_area is None and not predictor.encode_support(blow, bmask).native
    finally:
        predictor.net.native_area = area


def test_evaluation_routes_small_support_episodes_through_the_native_path(predictor):
    from pipeline.evaluation.data import FeatureSource, ImageTable
    from pipeline.evaluation.scoring import episode_masks

    rows = []
    for cls in ("MT_Blowhole", "MT_Uneven"):
        _, masks, paths = _pairs(cls, 3)
        for p in paths:
            rows.append({"id": f"{cls}/{Path(p).stem}", "class_name": cls, "kind": "defect", "image_path": p,
                         "mask_path": str(Path(p).parent.parent / "GT" / f"{Path(p).stem}.png")})
    table = ImageTable(pd.DataFrame(rows), base=Path("/"))
    src = FeatureSource(predictor, table)
    big = next(r["id"] for r in rows[3:] if native.defect_share(table.mask(r["id"])) > 0.01)
    sup = [[rows[0]["id"]], [big]]
    qry = [rows[1]["id"], rows[2]["id"]]
    assert src.is_native(sup[0]) and not src.is_native(sup[1])
    got = episode_masks(src, sup, qry, [table.size(i) for i in qry])
    direct = predictor.segment([table.image(sup[0][0])], [table.mask(sup[0][0])], table.image(qry[0])) > 0
    assert torch.equal(got[0], torch.from_numpy(direct))
    resized = predictor.predict_logits(predictor.encode_support([table.image(big)], [table.mask(big)]),
                                       [table.image(qry[1])])[0] > 0
    assert torch.equal(got[1], torch.from_numpy(resized))
    # the native prediction is not what the resized path would have given for that episode
    plain = dataclasses.replace(src.native_support(sup[0]), native=False)
    assert not np.array_equal(direct, predictor.predict_logits(plain, [table.image(qry[0])])[0] > 0)


def test_training_views_of_small_defects_are_native_crops(small_params):
    """``ImageEpisodes`` with ``native_area``: a blowhole's augmented view comes from a native crop (its defect
    keeps many more pixels than in the resized tile); without it, the same seed gives the resized view."""
    from pipeline.training.batches import ImageEpisodes

    images, masks, paths = _pairs("MT_Blowhole", 2)
    rows = {f"b{j}": {"image_path": p, "mask_path": str(Path(p).parent.parent / "GT" / f"{Path(p).stem}.png")}
            for j, p in enumerate(paths)}
    params = small_params.model_copy(update={"train": small_params.train.model_copy(update={"image_size": S})})
    whole = ImageEpisodes(params, {}, rows, augment=True)
    crops = ImageEpisodes(params, {}, rows, augment=True, native_area=0.01)
    for j in range(2):
        _, m_whole = whole._pair(f"b{j}", seed=7)
        _, m_crop = crops._pair(f"b{j}", seed=7)
        assert m_crop.sum() > 2 * max(float(m_whole.sum()), 1.0)
        assert m_crop.shape == m_whole.shape == (1, S, S)
    _, m_clean = crops._pair("b0", seed=None)             # validation views stay whole
    _, m_clean_whole = whole._pair("b0", seed=None)
    assert torch.equal(m_clean, m_clean_whole)


@pytest.mark.parametrize("name", ["sofs", "lerenet"])
def test_params_switch_reaches_the_model_file_config(name):
    from pipeline.checkpoint import build_net
    from pipeline.config import DEFAULT_PARAMS, ConfigError, load_params

    on = load_params(DEFAULT_PARAMS, env={}, overrides={"model": {"native_area": 0.01}})
    net = build_net(on, name, pretrained=False)
    assert net.native_area == 0.01 and net.config["native_area"] == 0.01
    off = build_net(load_params(DEFAULT_PARAMS, env={}), name, pretrained=False)
    assert off.native_area is None and "native_area" not in off.config
    assert not hasattr(build_net(on, "baseline", pretrained=False), "native_area")  # only lerenet and sofs
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match="native_area"):
            load_params(DEFAULT_PARAMS, env={}, overrides={"model": {"native_area": bad}})
