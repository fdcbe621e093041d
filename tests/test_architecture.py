"""The architecture as the code states it: no import cycle, ``model/`` pure, self-contained inference,
small modules, one Predictor, model names defined once, and ``dvc.yaml`` matching the artifact layout
(outs and data deps = :class:`pipeline.layout.Layout`; code deps = what each stage's step imports).

The import graph is read from the source (``tests/_imports.py``); ``dvc.yaml`` is resolved by DVC
itself (matrix and foreach expanded), so a renamed path or a forgotten module fails here.
"""

from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import pytest

from _imports import PACKAGES, ROOT, closure, cycles, function_imports, import_graph, module_files
from pipeline.config import MODEL_NAMES, PRODUCTION_MODEL, load_params
from pipeline.layout import Layout

MAX_LINES = 500


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_no_import_cycles(graph):
    assert cycles(graph) == [], "import cycles (module-level or lazy imports) among model/, pipeline/, flows/, lerenet/"


def test_layers_import_downwards_only(graph):
    """model -> nothing of ours; pipeline -> model; flows -> pipeline; lerenet -> flows/pipeline."""
    allowed = {"model": ("model",), "pipeline": ("pipeline", "model"), "flows": ("flows", "pipeline", "model"),
               "lerenet": PACKAGES}
    bad = {m: sorted(d for d in deps if not d.split(".")[0] in allowed[m.split(".")[0]])
           for m, deps in graph.items()}
    assert {m: d for m, d in bad.items() if d} == {}


def test_inference_and_serving_are_self_contained(graph):
    """The served model ships model/, pipeline/inference/ and pipeline/serving/ only: they must import
    nothing else of ours, and inference never imports serving."""
    for m, deps in graph.items():
        if m.startswith("pipeline.inference"):
            assert all(d.startswith(("pipeline.inference", "model")) for d in deps), (m, deps)
        if m.startswith("pipeline.serving"):
            assert all(d.startswith(("pipeline.serving", "pipeline.inference", "model")) for d in deps), (m, deps)
    from pipeline.serving.pyfunc import SHIPPED_PACKAGES

    assert set(SHIPPED_PACKAGES) == {"inference", "serving"}


def test_no_module_over_500_lines():
    files = [p for pkg in (*PACKAGES, "tests") for p in (ROOT / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_exactly_one_predictor_class():
    found = [f"{p.relative_to(ROOT)}:{n.lineno}" for p in module_files().values()
             for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.ClassDef) and n.name == "Predictor"]
    assert [f.split(":")[0] for f in found] == ["pipeline/inference/predictor.py"], found


def test_model_names_defined_once_match_the_model_registry():
    from model import MODELS

    assert set(MODEL_NAMES) == set(MODELS) and PRODUCTION_MODEL in MODEL_NAMES
    names = list(load_params(ROOT / "params.yaml", env={}).model.names)
    assert names and set(names) <= set(MODEL_NAMES) and PRODUCTION_MODEL in names


# ---------------------------------------------------------------------------
# dvc.yaml <-> layout and imports
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dvc_stages() -> dict[str, tuple[list[str], list[str]]]:
    """``{stage address: (outs, deps)}`` as DVC resolves dvc.yaml (paths relative to the project)."""
    from dvc.repo import Repo

    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    if not (ROOT / ".dvc").is_dir():
        pytest.skip("project is not `dvc init`-ed")
    with Repo(str(ROOT)) as repo:
        return {st.addressing: ([o.def_path for o in st.outs], [d.def_path for d in st.deps])
                for st in repo.index.stages}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_dvc_outs_are_the_layout(dvc_stages):
    params = load_params(ROOT / "params.yaml", env={})
    lay = Layout.of(params)
    expected: dict[str, list[Path]] = {
        "ingest": [lay.raw, lay.manifest, lay.ingest_report],
        "validate": [lay.validated, lay.validation_docs, lay.validation_report],
        "split": [lay.splits_dir, lay.episodes_dir],
        "features": [lay.features_dir],
        "report": [lay.results_table, lay.summary_dir, lay.curves_dir],
        "train_production": [lay.model_dir(None, PRODUCTION_MODEL), lay.curve(None, PRODUCTION_MODEL)],
        "register": [lay.registry_record],
    }
    for f in sorted(params.folds):
        expected[f"evaluate@{f}"] = [lay.fold_metrics(f), lay.per_class(f), lay.per_class_plot(f)]
        for m in params.model.names:
            expected[f"train@{f}-{m}"] = [lay.model_dir(f, m), lay.curve(f, m)]
    assert set(dvc_stages) == set(expected)
    for stage, paths in expected.items():
        assert sorted(dvc_stages[stage][0]) == sorted(_rel(p) for p in paths), stage


def test_dvc_metrics_are_the_compact_files_and_plots_compare_every_model():
    """`dvc metrics show` reads only metrics/summary (the detailed JSON and report.json are plain outs);
    every top-level plot reads a Layout table, and each compares every model of model.names: the
    per-class bars one column per model, the curves a long table (a `model` column, the template's colour;
    tests/test_summary.py checks every model is in it)."""
    import yaml

    params = load_params(ROOT / "params.yaml", env={})
    lay = Layout.of(params)
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    declared = [next(iter(m)) if isinstance(m, dict) else m for st in spec["stages"].values()
                for m in (st.get("do", st).get("metrics") or [])]
    assert declared == [_rel(lay.summary_dir)]
    assert not [st for st in spec["stages"].values() if st.get("do", st).get("plots")], "plots are top-level only"
    names = list(params.model.names)
    folds = sorted(params.folds)
    expected = {}
    for f in folds:
        expected[f"val_miou_fold{f}"] = (_rel(lay.curve_plot(f, "val_miou")), ["val_miou"])
        expected[f"loss_fold{f}"] = (_rel(lay.curve_plot(f, "loss")), ["loss"])
        for k in params.split.shots:
            expected[f"per_class_fold{f}_k{k}"] = (_rel(lay.per_class_plot(f)), [f"{m}_k{k}_paper" for m in names])
    got = {}
    for item in spec["plots"]:
        (pid, d), = item.items()
        (path, fields), = d["y"].items()
        got[pid] = (path, fields)
        assert (ROOT / ".dvc" / "plots" / f"{d['template']}.json").is_file(), pid
        if pid.startswith(("val_miou_", "loss_")):
            template = json.loads((ROOT / ".dvc" / "plots" / f"{d['template']}.json").read_text())
            assert template["encoding"]["color"]["field"] == "model", pid
    assert got == expected
    assert "/dvc_plots/" in (ROOT / ".gitignore").read_text().splitlines()


def test_dvc_data_deps_are_layout_paths(dvc_stages):
    params = load_params(ROOT / "params.yaml", env={})
    lay = Layout.of(params)
    folds = sorted(params.folds)
    known = {_rel(p) for p in (lay.raw, lay.manifest, lay.ingest_report, lay.validated, lay.splits_dir, lay.episodes_dir,
                               lay.features_dir, lay.metrics_dir, lay.results_table, lay.train_curves_dir,
                               *(lay.fold_metrics(f) for f in folds),
                               lay.model_dir(None, PRODUCTION_MODEL), *(lay.models_of(f) for f in folds))}
    for stage, (_, deps) in dvc_stages.items():
        data = [d for d in deps if not d.startswith(("../", "/")) and d.split("/")[0] not in PACKAGES
                and d != "params.yaml"]  # params.yaml: the `params:` section
        assert set(data) <= known, (stage, sorted(set(data) - known))


def _step_roots(stage: str, modules: dict[str, Path]) -> set[str]:
    """Modules imported by the flow task(s) of ``stage`` (the flow and DVC run the same step functions)."""
    base = stage.split("@")[0]
    roots = function_imports("flows.training_pipeline", f"{base}_task", modules)
    if base == "register":  # the DVC register stage also promotes (`lerenet register --promote`)
        roots |= function_imports("flows.training_pipeline", "promote_task", modules)
    return roots


def test_dvc_code_deps_are_what_each_step_imports(dvc_stages, graph):
    """Every module a stage's step imports (transitively) is a dep, and every code dep is imported."""
    modules = module_files()
    for stage, (_, deps) in dvc_stages.items():
        code = [d.rstrip("/") for d in deps if d.split("/")[0] in PACKAGES]
        files = {_rel(modules[m]) for m in closure(graph, _step_roots(stage, modules))}

        def covered(f: str) -> bool:
            return any(f == d or f.startswith(d + "/") for d in code)

        assert sorted(f for f in files if not covered(f)) == [], f"{stage}: imported but not a dep"
        assert [d for d in code if not any(f == d or f.startswith(d + "/") for f in files)] == [], \
            f"{stage}: dep not imported by its step"
