"""Throw-away projects for the benchmark: a small copy of the real data and a tiny params file.

The benchmark never touches the project's own ``data/``, ``models/`` or MLflow store: every case
that needs ingested data or a pipeline works in a temporary folder built here, on real images
copied from ``params.data.source`` (the same pattern as the tests' small real-data fixture).
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import DEFAULT_PARAMS, _deep_merge
from pipeline.images import IMAGE_SUFFIXES

#: default classes of the small source: one per family (steel, magnetic tile, leather), one per fold
SMALL_CLASSES = ("Steel_In", "MT_Blowhole", "Leather_Color")


def make_small_source(source: Path, dest: Path, classes: Sequence[str] = SMALL_CLASSES,
                      images_per_class: int = 8, normals_per_class: int = 2) -> Path:
    """Copy the first ``images_per_class`` image/mask pairs (file-name order) of each class, plus up to
    ``normals_per_class`` defect-free ``Nd`` images, from ``source`` into ``dest`` (Surface Defects-4i layout).

    Images without a ``GT/<stem>.png`` mask are skipped. Returns ``dest``.

    Raises:
        FileNotFoundError: ``source/<class>/Images`` is missing (names the class and the folder), or a
            class has fewer than ``images_per_class`` images with masks.
    """
    for cls in classes:
        images_dir = Path(source) / cls / "Images"
        if not images_dir.is_dir():
            raise FileNotFoundError(f"benchmark data: {images_dir} does not exist; set data.source (or "
                                    f"LERENET_SOURCE) to a Surface Defects-4i-layout folder holding class {cls}")
        pairs = []
        for p in sorted(images_dir.iterdir()):
            mask = Path(source) / cls / "GT" / f"{p.stem}.png"
            if p.suffix.lower() in IMAGE_SUFFIXES and mask.is_file():
                pairs.append((p, mask))
            if len(pairs) == images_per_class:
                break
        if len(pairs) < images_per_class:
            raise FileNotFoundError(f"benchmark data: class {cls} in {source} has {len(pairs)} images with masks; "
                                    f"{images_per_class} are needed")
        for sub in ("Images", "GT"):
            (dest / cls / sub).mkdir(parents=True, exist_ok=True)
        for img, mask in pairs:
            shutil.copy2(img, dest / cls / "Images" / img.name)
            shutil.copy2(mask, dest / cls / "GT" / mask.name)
        nd = Path(source) / cls / "Nd"
        if normals_per_class and nd.is_dir():
            (dest / cls / "Nd").mkdir(exist_ok=True)
            for p in sorted(q for q in nd.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)[:normals_per_class]:
                shutil.copy2(p, dest / cls / "Nd" / p.name)
    return dest


def tiny_overrides(classes: Sequence[str], image_size: int = 64) -> dict[str, Any]:
    """Params overrides of a tiny but complete pipeline run: one class per fold, ``lerenet`` only,
    K = 1, 2 training steps of 2 episodes at ``image_size`` px, a handful of evaluation episodes."""
    return {
        "folds": {i: [c] for i, c in enumerate(classes)},
        "model": {"names": ["lerenet"], "channels": 32},
        "split": {"shots": [1], "standard_seeds": [0], "standard_episodes": 10},
        "train": {"image_size": image_size, "episodes": 4, "batch_size": 2, "feature_views": 1, "val_every": 2,
                  "val_episodes": 2, "checkpoint_every": 2, "device": "cpu", "num_workers": 0},
        "evaluate": {"latency_queries": 1, "overlay_episodes_per_class": 0, "log_pyfunc": False},
    }


def write_params(path: Path, source: Path, overrides: Mapping[str, Any] | None = None,
                 base: Path = DEFAULT_PARAMS) -> Path:
    """Write ``path`` = the project's params file ``base`` with ``data.source = source``, data, MLflow
    store and service state inside ``path.parent``, an empty ``incoming`` folder, profile ``cpu``, and
    ``overrides`` merged last (``folds`` is replaced, not merged). Returns ``path``."""
    raw = yaml.safe_load(Path(base).read_text()) or {}
    raw = copy.deepcopy(raw)
    root = path.parent
    (root / "incoming").mkdir(parents=True, exist_ok=True)
    raw["profile"] = "cpu"
    raw.setdefault("data", {}).update({"source": str(source), "incoming": str(root / "incoming"), "dir": "data"})
    raw.setdefault("mlflow", {})["tracking_uri"] = "sqlite:///mlruns.db"
    raw.setdefault("services", {})["state_dir"] = ".lerenet"
    over = dict(overrides or {})
    if "folds" in over:
        raw["folds"] = over.pop("folds")
    raw = _deep_merge(raw, over)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def load(path: Path, overrides: Mapping[str, Any] | None = None, profile: str | None = None):
    """Validated :class:`pipeline.config.Params` of ``path`` with the ``profiles:`` overlay ``profile``
    (default: the file's ``profile``); other environment overrides are ignored."""
    from pipeline.config import load_params

    env = {"LERENET_PROFILE": profile} if profile else {}
    return load_params(path, overrides=dict(overrides) if overrides else None, env=env)


def ingest_and_validate(params) -> int:
    """Run the real ingest and validate steps on ``params`` (quietly); returns the validated row count.

    Raises:
        pipeline.validate.DataValidationError: the small copy does not validate (message lists why).
    """
    from pipeline.ingest import ingest
    from pipeline.validate import validate

    ingest(params, progress=False)
    report = validate(params)
    return int(report["usable_rows"])
