"""The artifact layout: the one place that knows where every step reads and writes its files.

Two roots: ``root`` (the folder of ``params.yaml``, ``params.root``) and ``data``
(``params.data.dir``, default ``<root>/data``). ``<tag>`` is ``fold<f>`` for a cross-validation
fold and ``all`` for the production model (``fold=None``)::

    <data>/raw/  manifest.parquet  validated.parquet  validation/{report.json,docs/}
    <data>/splits/fold<f>.json  <data>/episodes/fold<f>_<protocol>_k<K>.parquet  <data>/features/
    <root>/models/<tag>/<model>/{model.pt,run.json}   <root>/checkpoints/<tag>/<model>/state.pt
    <root>/metrics/train/<tag>_<model>.csv            <root>/metrics/fold<f>.json
    <root>/metrics/per_class/fold<f>.csv              <root>/metrics/plots/per_class_fold<f>.csv
    <root>/metrics/summary/fold<f>.json               <root>/metrics/curves/{val_miou,loss}_fold<f>.csv
    <root>/docs/results_table.md  <root>/reports/registry.json  <root>/bench/results.json

``dvc.yaml`` restates these paths for DVC (it cannot import Python); ``tests/test_architecture.py``
fails when a stage's ``outs``/``deps`` differ from this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: File and folder names under the data folder (``params.data.dir``).
RAW_DIR = "raw"
MANIFEST = "manifest.parquet"
INGEST_REPORT = "ingest_report.json"  # files of the source that ingest did not use (pipeline.ingest)
#: Marker written by ``pipeline.classes.source_view`` into a view folder: which class links it holds
#: and the source root each may point into (``pipeline.ingest`` follows those links and no others).
VIEW_MARKER = ".lerenet-view.json"
VALIDATION_DIR = "validation"
REPORT = "validation/report.json"
DOCS_DIR = "validation/docs"
VALIDATED = "validated.parquet"
SPLITS_DIR = "splits"
EPISODES_DIR = "episodes"
FEATURES_DIR = "features"
#: saved episode files per fold and K; ``mismatched`` is derived from ``paper`` (support-sensitivity
#: control, pipeline/split.py) and scored whenever ``paper`` is (it is not an ``evaluate.protocols`` entry)
PROTOCOLS = ("paper", "standard", "mismatched")


def fold_tag(fold: int | None) -> str:
    """``"fold<f>"`` for a cross-validation fold, ``"all"`` for the production model (``fold=None``)."""
    return "all" if fold is None else f"fold{fold}"


def split_name(fold: int) -> str:
    """``fold<f>.json``: the split file of ``fold`` inside :data:`SPLITS_DIR`."""
    return f"fold{fold}.json"


def episodes_name(fold: int, protocol: str, shots: int) -> str:
    """``fold<f>_<protocol>_k<K>.parquet``: a saved episode file inside :data:`EPISODES_DIR`.

    Raises:
        ValueError: ``protocol`` is not one of :data:`PROTOCOLS`.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    return f"fold{fold}_{protocol}_k{shots}.parquet"


@dataclass(frozen=True)
class Layout:
    """Absolute artifact paths of one project (see the module docstring for the tree).

    Build it with :meth:`of` from validated params; every path method is pure (creates nothing).
    """

    root: Path
    data: Path

    @classmethod
    def of(cls, params: Any, data_dir: str | os.PathLike[str] | None = None) -> Layout:
        """The layout of ``params`` (``params.root``, ``params.data.dir`` unless ``data_dir`` is given)."""
        return cls(Path(params.root), Path(data_dir) if data_dir is not None else Path(params.data.dir))

    # ---- data steps ---------------------------------------------------------------------------
    @property
    def raw(self) -> Path:
        """``<data>/raw``: the ingested copy of the source (ingest)."""
        return self.data / RAW_DIR

    @property
    def manifest(self) -> Path:
        """``<data>/manifest.parquet`` (ingest)."""
        return self.data / MANIFEST

    @property
    def ingest_report(self) -> Path:
        """``<data>/ingest_report.json``: files of the source ingest did not use (ingest)."""
        return self.data / INGEST_REPORT

    @property
    def validated(self) -> Path:
        """``<data>/validated.parquet`` (validate)."""
        return self.data / VALIDATED

    @property
    def validation_report(self) -> Path:
        """``<data>/validation/report.json`` (validate)."""
        return self.data / REPORT

    @property
    def validation_docs(self) -> Path:
        """``<data>/validation/docs`` (validate; Great Expectations Data Docs)."""
        return self.data / DOCS_DIR

    @property
    def splits_dir(self) -> Path:
        """``<data>/splits`` (split)."""
        return self.data / SPLITS_DIR

    def split(self, fold: int) -> Path:
        """``<data>/splits/fold<f>.json``."""
        return self.splits_dir / split_name(fold)

    @property
    def episodes_dir(self) -> Path:
        """``<data>/episodes`` (split)."""
        return self.data / EPISODES_DIR

    def episodes(self, fold: int, protocol: str, shots: int) -> Path:
        """``<data>/episodes/fold<f>_<protocol>_k<K>.parquet`` (raises ``ValueError`` for an unknown protocol)."""
        return self.episodes_dir / episodes_name(fold, protocol, shots)

    @property
    def features_dir(self) -> Path:
        """``<data>/features``: the frozen-backbone feature stores (features)."""
        return self.data / FEATURES_DIR

    # ---- training -----------------------------------------------------------------------------
    def models_of(self, fold: int | None) -> Path:
        """``<root>/models/<tag>``: the model folders of one fold (what its evaluation reads)."""
        return self.root / "models" / fold_tag(fold)

    def model_dir(self, fold: int | None, model: str) -> Path:
        """``<root>/models/<tag>/<model>`` (train; a DVC output folder)."""
        return self.models_of(fold) / model

    def model_file(self, fold: int | None, model: str) -> Path:
        """``<root>/models/<tag>/<model>/model.pt``."""
        return self.model_dir(fold, model) / "model.pt"

    def run_json(self, fold: int | None, model: str) -> Path:
        """``<root>/models/<tag>/<model>/run.json`` (MLflow ids of the training run)."""
        return self.model_dir(fold, model) / "run.json"

    def curve(self, fold: int | None, model: str) -> Path:
        """``<root>/metrics/train/<tag>_<model>.csv`` (DVC plot)."""
        return self.train_curves_dir / f"{fold_tag(fold)}_{model}.csv"

    def train_state(self, fold: int | None, model: str) -> Path:
        """``<root>/checkpoints/<tag>/<model>/state.pt``: resumable state, outside DVC outputs (DVC
        deletes outputs before re-running a stage)."""
        return self.root / "checkpoints" / fold_tag(fold) / model / "state.pt"

    # ---- evaluation, report, registry, benchmark ----------------------------------------------
    @property
    def metrics_dir(self) -> Path:
        """``<root>/metrics``."""
        return self.root / "metrics"

    def fold_metrics(self, fold: int) -> Path:
        """``<root>/metrics/fold<f>.json`` (evaluate; the detailed metrics, a plain output)."""
        return self.metrics_dir / f"fold{fold}.json"

    def per_class(self, fold: int) -> Path:
        """``<root>/metrics/per_class/fold<f>.csv`` (evaluate; long per-class table)."""
        return self.metrics_dir / "per_class" / f"fold{fold}.csv"

    def per_class_plot(self, fold: int) -> Path:
        """``<root>/metrics/plots/per_class_fold<f>.csv`` (evaluate; DVC plot)."""
        return self.metrics_dir / "plots" / f"per_class_fold{fold}.csv"

    @property
    def summary_dir(self) -> Path:
        """``<root>/metrics/summary`` (report; DVC metrics: the compact files)."""
        return self.metrics_dir / "summary"

    def fold_summary(self, fold: int) -> Path:
        """``<root>/metrics/summary/fold<f>.json``: compact metrics of a fold (``pipeline.summary``)."""
        return self.summary_dir / f"fold{fold}.json"

    @property
    def curves_dir(self) -> Path:
        """``<root>/metrics/curves`` (report; tables of the DVC comparison plots)."""
        return self.metrics_dir / "curves"

    def curve_plot(self, fold: int, kind: str) -> Path:
        """``<root>/metrics/curves/<kind>_fold<f>.csv``: long table ``step, model, <kind>``, a row
        where a model has a value (``kind``: ``val_miou`` | ``loss``)."""
        return self.curves_dir / f"{kind}_fold{fold}.csv"

    @property
    def train_curves_dir(self) -> Path:
        """``<root>/metrics/train``: every training curve (:meth:`curve`)."""
        return self.metrics_dir / "train"

    def per_class_tables(self) -> list[Path]:
        """Every existing ``metrics/per_class/fold*.csv``, sorted."""
        return sorted((self.metrics_dir / "per_class").glob("fold*.csv"))

    @property
    def results_table(self) -> Path:
        """``<root>/docs/results_table.md`` (report)."""
        return self.root / "docs" / "results_table.md"

    @property
    def registry_record(self) -> Path:
        """``<root>/reports/registry.json``: decision record of the last register + promote (register)."""
        return self.root / "reports" / "registry.json"

    @property
    def project_lock(self) -> Path:
        """``<root>/.lerenet/project.lock``: the project-wide lock of training/promoting runs (:mod:`pipeline.lock`);
        its holder record is ``project.lock.json`` beside it."""
        return self.root / ".lerenet" / "project.lock"

    @property
    def bench_results(self) -> Path:
        """``<root>/bench/results.json`` (``lerenet bench``)."""
        return self.root / "bench" / "results.json"
