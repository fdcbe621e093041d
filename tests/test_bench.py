"""Benchmark harness and cases: statistics, peak memory, and tiny real runs that write valid JSON.

No timing assertion anywhere: the figures themselves are only checked for shape and consistency
(min <= median <= max, positive rates), never against a speed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pipeline.bench import harness
from pipeline.bench.runner import Settings, format_table, run_bench


# --------------------------------------------------------------------------- statistics
def test_summarize_median_min_max_odd_and_even():
    s = harness.summarize([3.0, 1.0, 2.0], "s")
    assert (s.median, s.min, s.max, s.n, s.unit) == (2.0, 1.0, 3.0, 3, "s")
    s = harness.summarize([4, 1, 3, 2], "ms")
    assert (s.median, s.min, s.max, s.n) == (2.5, 1.0, 4.0, 4)
    assert harness.summarize([7], "x").as_dict() == {"median": 7.0, "min": 7.0, "max": 7.0, "n": 1, "unit": "x"}


@pytest.mark.parametrize("values", [[], [1.0, math.nan], [math.inf]])
def test_summarize_rejects_empty_and_non_finite(values):
    with pytest.raises(ValueError):
        harness.summarize(values, "s")


def test_ratio_stats_pairs_repeats_one_to_one():
    r = harness.ratio_stats([2.0, 6.0, 8.0], [1.0, 2.0, 2.0])  # ratios 2, 3, 4
    assert (r.median, r.min, r.max, r.unit) == (3.0, 2.0, 4.0, "x")
    with pytest.raises(ValueError, match="pair"):
        harness.ratio_stats([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="zero"):
        harness.ratio_stats([1.0], [0.0])


def test_time_calls_runs_warmup_untimed_then_repeats():
    calls, syncs = [], []
    times = harness.time_calls(lambda: calls.append(1), warmup=2, repeats=3, sync=lambda: syncs.append(1))
    assert len(calls) == 5 and len(times) == 3 and all(t >= 0 for t in times)
    assert len(syncs) == 6  # before and after each timed call, never around the warm-up
    with pytest.raises(ValueError):
        harness.time_calls(lambda: None, warmup=0, repeats=0)


def test_peak_memory_sees_an_allocation_inside_the_block():
    with harness.PeakMemory("cpu") as mem:
        block = np.ones(40 * 2**20 // 8)  # 40 MiB, alive until after the block ends
    res = mem.result()
    assert block.sum() > 0
    assert res["rss_peak_mib"] >= res["rss_start_mib"] + 30
    assert res["process_maxrss_mib"] >= res["rss_peak_mib"] - 1
    assert res["cuda_max_allocated_mib"] is None


def test_machine_info_names_cpu_and_torch():
    info = harness.machine_info("cpu")
    assert info["cpu_count"] >= 1 and info["torch"] and info["gpu"] is None


# --------------------------------------------------------------------------- tiny real runs
def _check_rows(case: dict) -> None:
    assert case["error"] is None, case["info"].get("traceback")
    assert case["rows"]
    for row in case["rows"]:
        assert set(row) == {"label", "median", "min", "max", "n", "unit"}
        assert row["min"] <= row["median"] <= row["max"]
        assert row["n"] >= 1


def test_inference_train_and_ingest_cases_write_valid_json(small_params_file, tmp_path: Path):
    from pipeline.config import load_params

    small_params = load_params(small_params_file, {"model": {"priors": ["hypercolumn"], "prior_skip": True,
                                                             "skip_source": "hypercolumn"}}, env={})
    tiny = Settings(train_warmup=0, train_repeats=2, infer_warmup=0, infer_repeats=2, image_size=64, train_steps=1,
                    train_classes=("Steel_In", "Leather_Color"), train_images_per_class=6, infer_class="Steel_In",
                    infer_queries=2, infer_batches=(1, 2), data_warmup=0, data_repeats=1)
    out = tmp_path / "bench" / "results.json"
    res = run_bench(small_params, cases=["inference", "train", "ingest"], settings=tiny, device="cpu", out=out,
                    workdir=tmp_path / "work", echo=lambda _m: None)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(res, default=str))
    assert data["schema"] == "lerenet-bench/1" and data["device"] == "cpu" and data["preset"] == "custom"
    assert list(data["cases"]) == ["inference", "train", "ingest"]
    for case in data["cases"].values():
        _check_rows(case)
        assert case["memory"]["rss_peak_mib"] > 0
    labels = {r["label"] for r in data["cases"]["inference"]["rows"]}
    assert {"batch 1, supports cached: ms/query", "batch 2, not cached: queries/s",
            "batch 2: caching speed-up", "batch 2, supports cached, 20 transductive steps: ms/query",
            "batch 2: cost of 20 transductive steps (time ratio, cached)"} <= labels  # a network with the probe
    train_rows = {r["label"]: r for r in data["cases"]["train"]["rows"]}
    for cfg in ("lite0-frozen-cached (cpu profile)", "r50-finetuned-images (paper profile)"):
        assert train_rows[f"{cfg}: episodes/s"]["median"] > 0
        assert 0 <= train_rows[f"{cfg}: data wait share"]["median"] <= 1
    ingest = data["cases"]["ingest"]
    assert ingest["info"]["images"] == 25  # the small source: 22 defect + 3 defect-free images
    assert "| ingest | ingest: images/s |" in data["table"]
    assert not list((tmp_path / "work").glob("*/data*/.ingest.tmp-*"))


def test_inference_case_times_the_reference_images_where_the_class_has_defect_free_images(small_params, tmp_path):
    """MT_Uneven has ``Nd`` images: the case adds the cached pass with R reference images and its time ratio."""
    s = Settings(infer_warmup=0, infer_repeats=2, image_size=48, infer_class="MT_Uneven", infer_queries=2,
                 infer_batches=(2,))
    data = run_bench(small_params, cases=["inference"], settings=s, device="cpu", out=tmp_path / "r.json",
                     workdir=tmp_path / "w", echo=lambda _m: None)["cases"]["inference"]
    _check_rows(data)
    rows = {r["label"]: r for r in data["rows"]}
    assert data["info"]["reference_images"] == 1  # train.presence_references defaults to 0 here: at least one
    assert rows["batch 2: cost of 1 reference image(s) (time ratio, cached)"]["n"] == 2
    assert "batch 2, supports cached, 1 reference image(s): ms/query" in rows


def test_loss_case_times_the_separable_ssim_against_the_former_window(small_params, tmp_path: Path):
    s = Settings(infer_warmup=0, infer_repeats=2, image_size=48)
    data = run_bench(small_params, cases=["loss"], settings=s, device="cpu", out=tmp_path / "r.json",
                     workdir=tmp_path / "w", echo=lambda _m: None)["cases"]["loss"]
    _check_rows(data)
    rows = {r["label"]: r for r in data["rows"]}
    assert rows["speed-up: 11x11 window / separable (per repeat)"]["n"] == 2
    assert data["info"]["max_abs_difference"] < 1e-4  # the same SSIM map, whichever way it is computed


def test_failed_case_is_recorded_and_named_while_json_is_still_written(small_params, tmp_path: Path):
    out = tmp_path / "r.json"
    bad = Settings(infer_class="NoSuchClass", infer_warmup=0, infer_repeats=1)
    res = run_bench(small_params, cases=["inference"], settings=bad, device="cpu", out=out, workdir=tmp_path / "w",
                    echo=lambda _m: None)
    err = json.loads(out.read_text())["cases"]["inference"]["error"]
    assert "NoSuchClass" in err and "does not exist" in err
    assert "FAILED" in format_table(res)


def test_unknown_case_is_refused(small_params, tmp_path: Path):
    with pytest.raises(ValueError, match="unknown benchmark case"):
        run_bench(small_params, cases=["nope"], out=tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_cli_rejects_unknown_case(small_params_file: Path):
    from typer.testing import CliRunner

    from lerenet.cli import app

    r = CliRunner().invoke(app, ["bench", "--only", "nope", "--params", str(small_params_file)])
    assert r.exit_code == 2
    assert "unknown case" in r.output


@pytest.mark.slow
def test_overhead_case_runs_plain_dvc_and_prefect(small_params, tmp_path: Path):
    """One round of the three real pipeline runs (plain Python, dvc repro, Prefect flow): minutes."""
    s = Settings(overhead_warmup=0, overhead_repeats=1, overhead_classes=("Steel_In", "MT_Uneven", "Leather_Color"),
                 overhead_images_per_class=7)
    res = run_bench(small_params, cases=["overhead"], settings=s, device="cpu", out=tmp_path / "r.json",
                    workdir=tmp_path / "w", echo=lambda _m: None)
    case = res["cases"]["overhead"]
    _check_rows(case)
    labels = {r["label"] for r in case["rows"]}
    assert {"plain: wall seconds per pipeline run", "dvc / plain wall time", "prefect / dvc CPU time"} <= labels
    assert (tmp_path / "w" / "overhead" / "dvc.lock").is_file()


def test_tree_memory_sees_a_grandchild_allocation(tmp_path: Path):
    import subprocess
    import sys

    from pipeline.bench.overhead_case import TreeMemory

    child = "import numpy, time; a = numpy.ones(60 * 2**20 // 8); time.sleep(1.5); print(a.sum())"
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}], check=True)"
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.DEVNULL)
    with TreeMemory(proc.pid, interval=0.05) as mem:
        assert proc.wait() == 0
    assert mem.largest_mib >= 60
    assert mem.total_mib >= mem.largest_mib


def test_bench_inference_use_case_times_the_predictor_of_the_configured_model(small_params):
    """`lerenet bench-predict --architecture`: the net is built as params.model says (dilation and
    weights included, unlike a bare build_model), and both passes run through the Predictor."""
    from pipeline.config import load_params
    from pipeline.usecases.bench import bench_inference, untrained_predictor

    dilated = load_params(small_params.root / "params.yaml", env={},
                          overrides={"model": {"backbone": "resnet50", "dilated": True, "channels": 32}})
    p = untrained_predictor(dilated, "lerenet", "cpu")
    assert p.net.config["dilated"] is True and p.net.config["backbone"] == "resnet50"
    assert p.source.uri == "untrained:lerenet" and p.image_size == dilated.train.image_size
    proto = untrained_predictor(small_params, "prototype", "cpu")
    res = bench_inference(small_params, proto, small_params.data.source / "Steel_In", queries=2, shots=1,
                          batch_size=2, repeats=1)
    assert res["queries"] == 2 and res["model"]["uri"] == "untrained:prototype"
    assert res["cached_qps"] > 0 and res["uncached_qps"] > 0 and res["speedup"] == pytest.approx(
        res["uncached_s"] / res["cached_s"])
    with pytest.raises(ValueError, match="need 101"):
        bench_inference(small_params, proto, small_params.data.source / "Steel_In", queries=100)


def test_serving_case_in_process_writes_valid_json(small_params, tmp_path: Path):
    """Class by name vs supports per row through the real pyfunc; the timed by-class requests are cache hits."""
    s = Settings(image_size=64, serve_class="Steel_In", serve_queries=3, serve_warmup=0, serve_repeats=2,
                 serve_http=False)
    res = run_bench(small_params, cases=["serving"], settings=s, device="cpu", out=tmp_path / "r.json",
                    workdir=tmp_path / "w", echo=lambda _m: None)
    case = res["cases"]["serving"]
    _check_rows(case)
    labels = {r["label"] for r in case["rows"]}
    assert {"in-process pyfunc, class by name (cached): queries/s", "in-process pyfunc, supports per row: queries/s",
            "in-process pyfunc: speed-up of the class by name"} <= labels
    assert case["info"]["in_process"] == {"cache_hits": 2, "cache_misses": 1}  # warm-up encodes, repeats hit
    assert case["info"]["queries_per_request"] == 3 and "http" not in case["info"]
    assert json.loads((tmp_path / "w" / "serving" / "classes" / "bench-class" / "class.json").read_text())["shots"] == 1


@pytest.mark.slow
def test_serving_case_over_http(small_params, tmp_path: Path):
    """The same requests against the real `mlflow models serve` (model logged into a scratch SQLite store)."""
    s = Settings(image_size=64, serve_class="Steel_In", serve_queries=2, serve_warmup=0, serve_repeats=1)
    res = run_bench(small_params, cases=["serving"], settings=s, device="cpu", out=tmp_path / "r.json",
                    workdir=tmp_path / "w", echo=lambda _m: None)
    case = res["cases"]["serving"]
    _check_rows(case)
    assert "HTTP mlflow models serve, class by name (cached): queries/s" in {r["label"] for r in case["rows"]}
    assert case["info"]["http"]["model_uri"].startswith("models:/")
    assert case["info"]["http"]["request_bytes_by_class"] < case["info"]["http"]["request_bytes_supports_per_row"]
def test_task_stream_picture_is_a_small_png_with_one_lane_per_worker(tmp_path: Path):
    """The ``dask`` case's picture: drawn from task-stream rows (worker, thread, start/stop), labelled by cell."""
    from PIL import Image

    from pipeline.bench.task_stream import draw_task_stream

    stream = [{"key": "train_task-a", "worker": "tcp://127.0.0.1:1", "thread": 1, "start": 100.0, "stop": 130.0},
              {"key": "train_task-b", "worker": "tcp://127.0.0.1:2", "thread": 2, "start": 100.5, "stop": 120.0},
              {"key": "train_task-c", "worker": "tcp://127.0.0.1:2", "thread": 2, "start": 120.1, "stop": 121.0}]
    labels = {"train_task-a": "fold0/lerenet", "train_task-b": "fold0/baseline", "train_task-c": "fold0/prototype"}
    out = draw_task_stream(stream, labels, tmp_path / "ts.png", "title")
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] == 1400
    assert out.stat().st_size < 300_000
    assert [p.name for p in tmp_path.iterdir()] == ["ts.png"]
    with pytest.raises(ValueError, match="empty task stream"):
        draw_task_stream([], {}, tmp_path / "none.png", "t")


def test_dask_case_is_registered_but_not_in_the_default_run():
    from pipeline.bench.runner import CASES, DEFAULT_CASES

    assert "dask" in CASES and "dask" not in DEFAULT_CASES and set(DEFAULT_CASES) < set(CASES)


def test_dask_case_rows_pair_the_modes_of_each_round():
    from pipeline.bench.dask_case import _rows

    def run(grid, start, stop):
        return {"grid_s": grid, "runner_start_s": start, "runner_stop_s": stop, "process_s": grid + 5, "cpu_s": 1.0}

    rows = {r["label"]: r for r in _rows("g", {"sequential": [run(10, 0, 0), run(12, 0, 0)],
                                              "dask": [run(5, 1, 2), run(4, 1, 2)]})}
    assert rows["g: sequential / dask grid wall time (speed-up)"]["median"] == 2.5  # (2.0, 3.0)
    assert rows["g: dask - sequential, runner start + grid + stop"]["median"] == -3.5  # (8 - 10, 7 - 12)
    assert rows["g, dask: runner start + grid + stop"]["max"] == 8


def test_run_logged_appends_output_and_returns_exit_code_and_cpu(tmp_path: Path):
    import contextlib
    import sys

    from pipeline.bench.harness import run_logged

    log = tmp_path / "run.log"
    log.write_text("earlier\n")
    seen = []

    @contextlib.contextmanager
    def monitor(pid):
        seen.append(pid)
        yield "watched"

    code = "import sys; s = sum(i * i for i in range(2_000_000)); print('out', s > 0); sys.exit(3)"
    rc, wall, cpu, watched = run_logged([sys.executable, "-c", code], tmp_path, {}, log, monitor)
    assert rc == 3 and watched == "watched" and len(seen) == 1
    assert wall > 0 and cpu > 0                       # the child's own CPU time, via os.wait4
    text = log.read_text()
    assert text.startswith("earlier\n") and f"$ {sys.executable} -c" in text and "out True" in text
    assert run_logged([sys.executable, "-c", "pass"], tmp_path, {}, log)[::3] == (0, None)
