"""Benchmark case ``serving``: served queries/s, a stored class (support set cached by the server) vs
the support images sent in every request row, side by side.

Model: LERENet as ``params.model`` configures it (as the ``inference`` case: CPU profile
EfficientNet-Lite0 with its packaged ImageNet weights, untrained head -- speed does not depend on
the weights), written as a model file. Data: the first ``shots`` images of ``serve_class`` (default
``Steel_In``, native 200 x 200) with a non-empty mask as the support set, stored as a class with
:func:`pipeline.classes_store.add_class` in the scratch folder; the next ``serve_queries`` images as
the queries of one request (one row each), sent as base64 PNG/JPEG file bytes.

Two requests carry the same queries:

* **by class**: columns ``class``, ``query_image`` -- the server reads ``class.json``, finds the
  support set encoded in its cache and runs the rows as batches of queries;
* **supports per row**: ``support_images``, ``support_masks``, ``query_image`` -- what a client had
  to send before; every row is decoded and its support set encoded again.

Two transports, each timed request by request, the two request kinds alternating:

* **in-process**: the project's pyfunc (:class:`pipeline.serving.pyfunc.SegmenterPyfunc`, loaded with
  MLflow's own ``PythonModelContext``), ``predict(frame)``: limits, base64 decoding, the cache, the
  network, the PNG encoding of each mask -- the server's work without HTTP;
* **HTTP** (``serve_http``): the same model logged with ``log_pyfunc`` into a SQLite MLflow store in
  the scratch folder (a subprocess) and served by the real ``mlflow models serve --env-manager local
  --workers 1`` on a free loopback port, ``LERENET_CLASS_STORE`` pointing at the class; the client
  (``httpx``, bodies serialised beforehand) runs on the same machine.

Figures: queries/s per request kind (``serve_queries`` / wall seconds per request), the per-repeat
speed-up supports-per-row / by-class, and CPU milliseconds per query (user + system time of the
process doing the work: this one in-process, the server's process tree over HTTP -- on a shared
machine a much steadier figure than wall time). One warm-up request of each kind first (the by-class warm-up
fills the cache: the timed by-class requests are cache hits, as in production).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.bench.harness import ratio_stats, summarize

CLASS_NAME = "bench-class"
_LOG = """
import sys
import mlflow
from pipeline.serving.pyfunc import log_pyfunc
mlflow.set_experiment("lerenet-bench")
with mlflow.start_run():
    print(log_pyfunc(sys.argv[1], name="model"))
"""


class ServeBenchError(RuntimeError):
    """Logging or serving the benchmark model failed; the message holds the log's tail."""


def _b64(path: Path) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _files(source: Path, cls: str, shots: int, queries: int) -> tuple[list[tuple[Path, Path]], list[Path]]:
    """The first ``shots`` image/mask pairs of ``source/cls`` with a non-empty mask (file-name order) and
    the next ``queries`` images.

    Raises:
        FileNotFoundError: the class folder is missing or has too few images (names folder and counts).
    """
    from pipeline.images import IMAGE_SUFFIXES, read_mask

    images_dir = Path(source) / cls / "Images"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"benchmark data: {images_dir} does not exist (set data.source / LERENET_SOURCE)")
    pairs, rest = [], []
    for p in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        mask = Path(source) / cls / "GT" / f"{p.stem}.png"
        if len(pairs) < shots and mask.is_file() and read_mask(mask).any():
            pairs.append((p, mask))
        elif len(rest) < queries:
            rest.append(p)
    if len(pairs) < shots or len(rest) < queries:
        raise FileNotFoundError(f"benchmark data: {images_dir} gives {len(pairs)} supports and {len(rest)} queries; "
                                f"{shots} and {queries} are needed")
    return pairs, rest


def _model_file(ctx: Any, path: Path) -> Path:
    import torch

    from pipeline.checkpoint import build_net, save_model

    m, s = ctx.params.model, ctx.settings
    torch.manual_seed(0)
    net = build_net(ctx.params, "lerenet", pretrained=m.backbone.startswith("efficientnet_lite")).eval()
    save_model(path, net, {"model": "lerenet", "backbone": m.backbone, "variant": m.variant, "channels": m.channels,
                           "freeze_backbone": m.freeze_backbone, "image_size": s.image_size, "train_shots": s.shots,
                           "fold": None, "run_id": None, "config": dict(getattr(net, "config", {}) or {})})
    return path


def _time_pair(by_class: Any, per_row: Any, warmup: int, repeats: int, cpu: Any = time.process_time
               ) -> tuple[list[float], list[float], list[float], list[float]]:
    """Wall and CPU seconds of ``repeats`` calls of each, alternating, after ``max(warmup, 1)`` warm-up
    calls of each: ``(wall by_class, wall per_row, cpu by_class, cpu per_row)``; ``cpu()`` reads the CPU
    seconds of whoever does the work (this process, or the server's process tree)."""
    for _ in range(max(warmup, 1)):
        by_class()
        per_row()
    t_c, t_r, c_c, c_r = [], [], [], []
    for _ in range(repeats):  # alternate, so both see the same machine state
        for fn, wall, cpus in ((by_class, t_c, c_c), (per_row, t_r, c_r)):
            c0, t0 = cpu(), time.perf_counter()
            fn()
            wall.append(time.perf_counter() - t0)
            cpus.append(cpu() - c0)
    return t_c, t_r, c_c, c_r


def _tree_cpu(pid: int) -> Any:
    """A callable returning the CPU seconds (user + system) of process ``pid`` and its descendants."""
    import psutil

    root = psutil.Process(pid)

    def total() -> float:
        secs = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                secs += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return secs

    return total


def _rows(transport: str, n: int, times: tuple[list[float], list[float], list[float], list[float]]
          ) -> list[dict[str, Any]]:
    t_c, t_r, c_c, c_r = times

    def qps(wall: list[float]) -> dict[str, Any]:
        return summarize([n / t for t in wall], "queries/s").as_dict()

    def cpu_ms(cpu: list[float]) -> dict[str, Any]:
        return summarize([1000 * c / n for c in cpu], "CPU ms/query").as_dict()

    return [{"label": f"{transport}, class by name (cached): queries/s", **qps(t_c)},
            {"label": f"{transport}, supports per row: queries/s", **qps(t_r)},
            {"label": f"{transport}: speed-up of the class by name", **ratio_stats(t_r, t_c).as_dict()},
            {"label": f"{transport}, class by name (cached): CPU ms/query", **cpu_ms(c_c)},
            {"label": f"{transport}, supports per row: CPU ms/query", **cpu_ms(c_r)}]


def _in_process(checkpoint: Path, store: Path, frames: tuple[Any, Any], warmup: int, repeats: int
                ) -> tuple[tuple[list[float], ...], dict[str, int]]:
    from mlflow.pyfunc import PythonModelContext

    from pipeline.serving.class_sets import CONFIG_KEY
    from pipeline.serving.pyfunc import SegmenterPyfunc

    model = SegmenterPyfunc()
    model.load_context(PythonModelContext(artifacts={"checkpoint": str(checkpoint)},
                                          model_config={CONFIG_KEY: str(store)}))
    by_class, per_row = frames
    times = _time_pair(lambda: model.predict(None, by_class), lambda: model.predict(None, per_row), warmup, repeats)
    c = model.classes
    return times, {"cache_hits": c.hits, "cache_misses": c.misses}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM ``proc``'s process group (started with ``start_new_session``), SIGKILL after 30 s; a no-op
    once it has exited."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _http(work: Path, checkpoint: Path, store: Path, bodies: tuple[bytes, bytes], warmup: int, repeats: int,
          timeout: float = 240.0) -> tuple[tuple[list[float], ...], dict[str, Any]]:
    import httpx

    from pipeline.serving.class_sets import STORE_ENV

    bin_dir = Path(sys.executable).parent
    root = Path(__file__).resolve().parent.parent.parent
    uri = f"sqlite:///{work / 'mlruns.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "MLFLOW_ENABLE_TELEMETRY": "false",
           "DO_NOT_TRACK": "1", STORE_ENV: str(store), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    env.pop("SERVING_MODEL_CONFIG", None)
    t0 = time.perf_counter()
    log = subprocess.run([sys.executable, "-c", _LOG, str(checkpoint)], env=env, cwd=work, capture_output=True,
                         text=True, timeout=600)
    if log.returncode != 0:
        raise ServeBenchError(f"logging the benchmark model failed:\n{log.stderr[-3000:]}")
    model_uri = log.stdout.split()[-1]
    log_s = time.perf_counter() - t0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with (work / "server.log").open("wb") as out:
        proc = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--host", "127.0.0.1",
                                 "--port", str(port), "--env-manager", "local", "--workers", "1"],
                                env=env, cwd=work, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        t1 = time.perf_counter()
        while True:
            if proc.poll() is not None or time.perf_counter() - t1 > timeout:
                raise ServeBenchError(f"mlflow models serve did not become healthy:\n"
                                      f"{(work / 'server.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        start_s = time.perf_counter() - t1
        headers = {"Content-Type": "application/json"}
        with httpx.Client(timeout=300) as client:
            def post(body: bytes) -> None:
                r = client.post(f"{url}/invocations", content=body, headers=headers)
                if r.status_code != 200:
                    raise ServeBenchError(f"HTTP {r.status_code}: {r.text[-1000:]}")

            times = _time_pair(lambda: post(bodies[0]), lambda: post(bodies[1]), warmup, repeats, _tree_cpu(proc.pid))
    finally:
        stop_group(proc)
    return times, {"model_uri": model_uri, "log_seconds": round(log_s, 1), "server_start_seconds": round(start_s, 1),
                      "request_bytes_by_class": len(bodies[0]), "request_bytes_supports_per_row": len(bodies[1])}


def run(ctx: Any) -> dict[str, Any]:
    """Measure served queries/s (module docstring) with ``ctx`` (:class:`pipeline.bench.runner.Context`)."""
    import pandas as pd

    from pipeline.classes_store import add_class
    from pipeline.config import ClassesParams

    s = ctx.settings
    work = Path(ctx.workdir) / "serving"
    work.mkdir(parents=True, exist_ok=True)
    pairs, queries = _files(ctx.source, s.serve_class, s.shots, s.serve_queries)
    store = work / "classes"
    params = ctx.params.model_copy(update={"classes": ClassesParams(dir=store)})
    add_class(params, CLASS_NAME, pairs, replace=True, env={"LERENET_USER": "bench"}, upload=False)
    checkpoint = _model_file(ctx, work / "model.pt")
    q64 = [_b64(q) for q in queries]
    s_img, s_msk = [_b64(i) for i, _ in pairs], [_b64(m) for _, m in pairs]
    by_class = {"columns": ["class", "query_image"], "data": [[CLASS_NAME, q] for q in q64]}
    per_row = {"columns": ["support_images", "support_masks", "query_image"], "data": [[s_img, s_msk, q] for q in q64]}
    frames = tuple(pd.DataFrame(d["data"], columns=d["columns"]) for d in (by_class, per_row))
    n = len(queries)
    times, cache = _in_process(checkpoint, store, frames, s.serve_warmup, s.serve_repeats)
    rows = _rows("in-process pyfunc", n, times)
    info: dict[str, Any] = {"model": "lerenet", "backbone": ctx.params.model.backbone,
                            "channels": ctx.params.model.channels, "image_size": s.image_size, "shots": s.shots,
                            "class": s.serve_class, "queries_per_request": n, "warmup_requests": max(s.serve_warmup, 1),
                            "repeats": s.serve_repeats, "in_process": cache,
                            "timed": "one request: limits, base64 decoding, support set (cached or encoded per row), "
                                     "network, upsampling, PNG encoding of each mask (+ HTTP and JSON for http)"}
    if s.serve_http:
        bodies = tuple(json.dumps({"dataframe_split": d}).encode() for d in (by_class, per_row))
        times, http = _http(work, checkpoint, store, bodies, s.serve_warmup, s.serve_repeats)
        rows += _rows("HTTP mlflow models serve", n, times)
        info["http"] = http
    return {"rows": rows, "info": info}
