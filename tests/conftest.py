"""Shared pytest fixtures.

Data fixtures build a SMALL copy of the real data (``/work/shared/datasets/defects12``, or
``$LERENET_TEST_DATA``) in the Surface Defects-4i layout, so the data steps run on real
pixels in about a second:

* ``Steel_In``: 7 gray PNG images with 0/255 masks;
* ``MT_Uneven``: 7 gray JPEG images with soft-edged masks, plus 1 image whose mask is empty
  as published (``exp3_num_45042``), plus 3 defect-free ``Nd`` images;
* ``Leather_Color``: 7 RGB PNG images.

``small_params_file`` writes a matching ``params.yaml`` (one class per fold, K in {1, 5},
few standard episodes) whose ``data.dir`` is ``<tmp_path>/data``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

REAL_DATA = Path(os.environ.get("LERENET_TEST_DATA", "/work/shared/datasets/defects12"))

#: class -> (defect image file names, normal image file names) copied by ``make_small_source``
SMALL_SET: dict[str, tuple[list[str], list[str]]] = {
    "Steel_In": ([f"In_{i}.png" for i in (1, 2, 3, 4, 5, 6, 7)], []),
    "MT_Uneven": (["exp0_num_461.jpg", "exp1_num_109232.jpg", "exp1_num_124236.jpg", "exp1_num_129031.jpg",
                   "exp1_num_139798.jpg", "exp1_num_155300.jpg", "exp1_num_172241.jpg",
                   "exp3_num_45042.jpg"],  # empty mask as published
                  ["exp1_num_118871.jpg", "exp1_num_261937.jpg", "exp1_num_304672.jpg"]),
    "Leather_Color": ([f"color{i}.png" for i in (0, 102, 108, 12, 18, 24, 30)], []),
}
SMALL_FOLDS = {0: ["Steel_In"], 1: ["MT_Uneven"], 2: ["Leather_Color"]}
EMPTY_MASK_IMAGE = "MT_Uneven/Images/exp3_num_45042.jpg"


def make_small_source(dest: Path, real: Path = REAL_DATA) -> Path:
    """Copy ``SMALL_SET`` from the real data into ``dest`` (Surface Defects-4i layout); returns ``dest``."""
    if not real.is_dir():
        pytest.skip(f"real data folder {real} not available (set LERENET_TEST_DATA)")
    for cls, (images, normals) in SMALL_SET.items():
        for sub in ("Images", "GT"):
            (dest / cls / sub).mkdir(parents=True, exist_ok=True)
        for name in images:
            shutil.copy2(real / cls / "Images" / name, dest / cls / "Images" / name)
            stem = Path(name).stem
            shutil.copy2(real / cls / "GT" / f"{stem}.png", dest / cls / "GT" / f"{stem}.png")
        if normals:
            (dest / cls / "Nd").mkdir(exist_ok=True)
            for name in normals:
                shutil.copy2(real / cls / "Nd" / name, dest / cls / "Nd" / name)
    return dest


def write_small_params(path: Path, source: Path, data_dir: Path, **sections: dict) -> Path:
    """Write a small params.yaml at ``path``; ``sections`` are merged over the defaults per section."""
    raw = {
        "data": {"source": str(source), "dir": str(data_dir)},
        "folds": {k: list(v) for k, v in SMALL_FOLDS.items()},
        "split": {"shots": [1, 5], "val_fraction": 0.15, "paper_seed": 1334, "standard_seeds": [0, 1],
                  "standard_episodes": 20, "seed": 0},
        "mlflow": {"tracking_uri": f"sqlite:///{path.parent / 'mlruns.db'}"},
    }
    for key, value in sections.items():  # sections are merged key by key, except `folds` (replaced)
        merge = key != "folds" and isinstance(value, dict) and isinstance(raw.get(key), dict)
        raw[key] = {**raw[key], **value} if merge else value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def small_source(tmp_path: Path) -> Path:
    """A fresh small Surface Defects-4i-layout folder at ``<tmp_path>/source`` (tests may modify it)."""
    return make_small_source(tmp_path / "source")


@pytest.fixture
def small_params_file(tmp_path: Path, small_source: Path) -> Path:
    """``<tmp_path>/params.yaml`` pointing at ``small_source`` with ``data.dir = <tmp_path>/data``."""
    return write_small_params(tmp_path / "params.yaml", small_source, tmp_path / "data")


@pytest.fixture
def small_params(small_params_file: Path):
    """Validated :class:`pipeline.config.Params` of ``small_params_file`` (environment ignored)."""
    from pipeline.config import load_params

    return load_params(small_params_file, env={})


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (SQLite) for the whole session (~13 s to start; ../shared/STACK.md).

    The start-up timeout is generous because a loaded 2-core CI machine can take over 30 s.
    """
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
