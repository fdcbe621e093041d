"""Evaluation pictures on real defects12 images: the overlay sheet's layout, size and colours."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from conftest import REAL_DATA

#: (class, support stems, query stem): brown leather (RGB), gray steel (L), a dark non-square magnetic tile
EPISODES = [("Leather_Color", ["color0", "color102"], "color24"),
            ("Steel_In", ["In_1", "In_2"], "In_6"),
            ("MT_Uneven", ["exp1_num_109232"], "exp1_num_124236")]


def _episodes():
    from pipeline.images import read_image, read_mask
    from pipeline.plots import OverlayEpisode

    if not REAL_DATA.is_dir():
        pytest.skip(f"real data folder {REAL_DATA} not available (set LERENET_TEST_DATA)")
    out = []
    for cls, supports, query in EPISODES:
        def img(stem: str):
            return read_image(next((REAL_DATA / cls / "Images").glob(f"{stem}.*")))

        truth = read_mask(REAL_DATA / cls / "GT" / f"{query}.png")
        pred = np.roll(truth, 7, axis=1)  # a prediction that overlaps the truth partly
        pred[5:25, 5:30] = True           # and one false alarm
        out.append(OverlayEpisode(cls, [img(s) for s in supports],
                                  [read_mask(REAL_DATA / cls / "GT" / f"{s}.png") for s in supports],
                                  img(query), truth, pred, 0.42, query_id=query))
    out[2].support_images = out[2].support_images[:1]  # rows may have fewer supports
    return out


def _colour_share(px: np.ndarray, colour: tuple[float, float, float], tol: int = 40) -> float:
    """Share of pixels of ``px`` (h, w, 3) uint8 within ``tol`` of ``colour`` (RGB in [0, 1]) on every channel."""
    target = np.round(np.asarray(colour) * 255).astype(int)
    return float((np.abs(px[..., :3].astype(int) - target) <= tol).all(axis=-1).mean())


def test_overlay_sheet_has_big_tiles_legend_colours_and_no_blank_band(tmp_path):
    from pipeline.plots import ANNOTATION_COLOUR, PREDICTION_COLOUR, overlay_grid, sheet_layout

    eps = _episodes()
    path = overlay_grid(eps, tmp_path / "sheet.png", "lerenet, fold 0: K=2, paper episodes", tile_px=240)
    px = np.asarray(Image.open(path).convert("RGB"))
    lay = sheet_layout(eps, 240)
    assert (px.shape[1], px.shape[0]) == (lay.width, lay.height) and lay.columns == 5  # 2 supports + 3
    assert lay.width >= 5 * 240
    # square leather and steel images get square 240 px tiles; the wide magnetic tile (h/w ~0.4-0.6) a shorter row
    assert [h for _, h in lay.rows[:2]] == [240, 240] and 120 <= lay.rows[2][1] < 240
    # no blank band: no run of 30 or more all-white pixel rows anywhere in the sheet
    white = (px >= 250).all(axis=(1, 2))
    longest, run = 0, 0
    for w in white:
        run = run + 1 if w else 0
        longest = max(longest, run)
    assert longest < 30, f"blank band of {longest} px"
    # the prediction colour (cyan) is visible in every row's prediction tile -- on leather, steel and tile --
    # and the annotation colour (yellow) in its ground-truth tile; no red from the old sheet
    for r, (top, h) in enumerate(lay.rows):
        truth_tile = px[top:top + h, lay.column_x(3):lay.column_x(3) + 240]
        pred_tile = px[top:top + h, lay.column_x(4):lay.column_x(4) + 240]
        assert _colour_share(pred_tile, PREDICTION_COLOUR) > 0.002, f"row {r}: no cyan in the prediction tile"
        assert _colour_share(truth_tile, ANNOTATION_COLOUR) > 0.001, f"row {r}: no yellow in the truth tile"
        assert _colour_share(pred_tile, (1.0, 0.1, 0.1), tol=30) < 0.001
    header = px[: lay.rows[0][0] - 26]  # title, legend, column headings
    assert _colour_share(header, PREDICTION_COLOUR) > 0 and _colour_share(header, ANNOTATION_COLOUR) > 0  # legend


def test_overlay_sheet_titles_carry_the_iou_and_never_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from pipeline.plots import overlay_figure

    eps = _episodes()
    eps[1].iou, eps[1].support_class = 0.07, "Steel_Pa"
    fig = overlay_figure(eps, "a title", tile_px=240)
    renderer = FigureCanvasAgg(fig).get_renderer()
    texts = [t for t in fig.texts if t.get_text()]
    titles = [t.get_text() for t in texts]
    assert "Leather_Color  ·  query color24  ·  IoU 0.42" in titles
    assert "Steel_In  ·  query In_6  ·  supports from Steel_Pa  ·  IoU 0.07" in titles
    assert {"support 1", "support 2", "query", "ground truth", "prediction"} <= set(titles)
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == [
        "annotated defect (support mask, ground truth)", "predicted defect", "ground-truth outline on the prediction"]
    boxes = [t.get_window_extent(renderer) for t in texts] + [legend.get_window_extent(renderer)]
    for a, b in combinations(boxes, 2):
        assert not a.overlaps(b), (a, b)
    tiles = [ax.get_window_extent(renderer) for ax in fig.axes]
    assert len(tiles) == 2 + 2 + 1 + 3 * 3  # supports per row (2, 2, 1) + query, truth, prediction per row
    for box in boxes:
        assert not any(box.overlaps(t) for t in tiles)


def test_overlay_sheet_titles_name_protocol_and_k():
    from pipeline.evaluation.tracking import sheet_title

    assert sheet_title("lerenet", 0, "k1_paper") == "lerenet, fold 0 (novel classes): K=1, paper episodes"
    assert sheet_title("baseline", 2, "k5_mismatched") == (
        "baseline, fold 2 (novel classes): K=5, mismatched-support control episodes")
