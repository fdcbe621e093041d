"""Screenshots a person can check, taken with headless Chromium: MLflow registry and champion run, DVC plots,
Great Expectations Data Docs.

Run after ``make run`` (or any pipeline run whose results are in the project folder)::

    .venv/bin/python docs/screenshots.py                      # -> docs/img/*.png
    .venv/bin/python docs/screenshots.py --project /path/to/project --out /tmp/shots
    .venv/bin/python docs/screenshots.py --project RUN --dvc-project .   # MLflow/GX of RUN, DVC plots of .

What it does:

1. starts ``mlflow ui`` (``mlflow server``, one worker, no job runner) on 127.0.0.1 over the project's
   tracking database (``mlflow.tracking_uri`` of ``params.yaml``), and stops it at the end;
2. runs ``dvc plots show`` in the project (to a temporary folder) and takes the latest GX validation page
   of ``data/validation/docs``;
3. shoots (MLflow pages 1800 px wide, since MLflow 3.17 opens its Assistant panel on the right): ``mlflow_registered_model.png`` (the model and its description),
   ``mlflow_model_version.png`` (the champion version: description, decision, tags),
   ``mlflow_champion_run_pictures.png`` (the champion's register run showing
   ``pictures/fold0/overlays_k1_paper.png``), ``mlflow_champion_run_chart.png``
   (``pictures/per_class_iou.png``), ``dvc_plots.png`` and ``gx_data_docs.png``;
4. shrinks a PNG over ``--max-kb`` (default 290 KiB, under 300 kB): scaled down to 1200 px wide, then quantised (:func:`shrink`).

Needs ``chromium`` (Debian: ``apt-get install -y chromium``). The DVC plots page and the Data Docs load
Vega, Bootstrap, jQuery and Font Awesome from CDNs; offline those assets are missing (no plots, unstyled
page). With ``npm`` on the PATH the script fetches the same versions from the npm registry once
(``npm pack``, into ``--assets``, default ``~/.cache/lerenet/web-assets``) and points a temporary copy of
each page at them; ``--no-fetch`` skips that, and the script prints every asset it could not replace.
The MLflow UI serves its own assets. Exit status: 0 when every picture was taken, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: CDN URLs that are not of the ``<cdn>/npm/<package>@<version>/<file>`` form: URL -> (package, version, file)
CDN_FILES = {
    "https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css": ("bootstrap", "4.3.1", "dist/css/bootstrap.min.css"),
    "https://stackpath.bootstrapcdn.com/bootstrap/4.3.1/js/bootstrap.min.js": ("bootstrap", "4.3.1", "dist/js/bootstrap.min.js"),
    "https://code.jquery.com/jquery-3.7.1.min.js": ("jquery", "3.7.1", "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/popper.js/1.12.9/umd/popper.min.js": ("popper.js", "1.12.9", "dist/umd/popper.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css": (
        "@fortawesome/fontawesome-free", "6.6.0", "css/all.min.css"),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/css/bootstrap-datepicker.min.css": (
        "bootstrap-datepicker", "1.9.0", "dist/css/bootstrap-datepicker.min.css"),
    "https://cdnjs.cloudflare.com/ajax/libs/bootstrap-datepicker/1.9.0/js/bootstrap-datepicker.min.js": (
        "bootstrap-datepicker", "1.9.0", "dist/js/bootstrap-datepicker.min.js"),
}
NPM_CDN = re.compile(r"https://(?:cdn\.jsdelivr\.net/npm|unpkg\.com)/(@[^/@]+/[^/@]+|[^/@]+)@([^/]+)(/.*)?$")
ASSET_URL = re.compile(r"""(?:src|href)=["'](https?://[^"']+)["']""")


def npm_package(cache: Path, name: str, version: str, fetch: bool) -> Path | None:
    """Folder of ``name@version`` unpacked under ``cache`` (``npm pack`` once when ``fetch``), or None."""
    folder = cache / f"{name.replace('/', '+')}@{version}"
    if (folder / "package.json").is_file():
        return folder
    if not fetch or not shutil.which("npm"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(["npm", "pack", f"{name}@{version}", "--pack-destination", tmp, "--silent"],
                           capture_output=True, text=True, timeout=300)
        tgz = list(Path(tmp).glob("*.tgz"))
        if r.returncode or not tgz:
            print(f"  npm pack {name}@{version} failed: {r.stderr.strip()[-300:]}")
            return None
        part = folder.with_name(folder.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        with tarfile.open(tgz[0]) as tar:
            tar.extractall(part, filter="data")
        shutil.rmtree(folder, ignore_errors=True)
        (part / "package").rename(folder)
        shutil.rmtree(part, ignore_errors=True)
    return folder


def local_asset(url: str, cache: Path, fetch: bool) -> Path | None:
    """The local file standing for a CDN ``url`` (see :data:`CDN_FILES` and :data:`NPM_CDN`), or None."""
    if url in CDN_FILES:
        name, version, file = CDN_FILES[url]
    else:
        m = NPM_CDN.match(url)
        if not m:
            return None
        name, version, file = m.group(1), m.group(2), (m.group(3) or "").lstrip("/")
    pkg = npm_package(cache, name, version, fetch)
    if pkg is None:
        return None
    if not file:  # bare package URL: the browser build the CDN would serve
        meta = json.loads((pkg / "package.json").read_text())
        file = next((meta[k] for k in ("jsdelivr", "unpkg", "browser", "main") if isinstance(meta.get(k), str)), "")
    path = (pkg / file).resolve()
    return path if path.is_file() and pkg.resolve() in path.parents else None


def offline_copy(page: Path, cache: Path, fetch: bool, css: str = "") -> tuple[Path, list[str]]:
    """Rewrite the CDN assets of ``page`` to local files (and append ``css`` to its head), in a copy next to
    it; returns (copy, missing URLs)."""
    html = page.read_text(encoding="utf-8")
    if css:
        html = html.replace("</head>", f"<style>{css}</style></head>", 1)
    missing: list[str] = []
    for url in sorted(set(ASSET_URL.findall(html))):
        local = local_asset(url, cache, fetch)
        if local is None:
            missing.append(url)
        else:
            html = html.replace(f'"{url}"', f'"{local.as_uri()}"').replace(f"'{url}'", f"'{local.as_uri()}'")
    out = page.with_name(page.stem + ".offline.html")
    out.write_text(html, encoding="utf-8")
    return out, missing


def find_chromium() -> str:
    """Path of a Chromium/Chrome binary. Raises SystemExit naming the install command when none is found."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)  # type: ignore[return-value]
    raise SystemExit("no chromium on PATH: apt-get update && apt-get install -y chromium")


def shoot(chromium: str, url: str, out: Path, width: int = 1400, height: int = 1000, wait_ms: int = 15000) -> bool:
    """Screenshot ``url`` into ``out`` (PNG, ``width`` x ``height``) after ``wait_ms`` of page time; True on success."""
    with tempfile.TemporaryDirectory(prefix="lerenet-chromium-") as profile:
        cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--hide-scrollbars", f"--user-data-dir={profile}", f"--virtual-time-budget={wait_ms}",
               f"--screenshot={out}", f"--window-size={width},{height}", url]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120 + wait_ms // 1000)
    ok = r.returncode == 0 and out.is_file() and out.stat().st_size > 0
    print(f"  {'ok ' if ok else 'FAILED'} {out.name}: {url}" + ("" if ok else f"\n{r.stderr[-800:]}"))
    return ok


def shrink(path: Path, max_kb: int, min_width: int = 1200) -> None:
    """Keep ``path`` under ``max_kb`` KiB: scale it down (factor 0.85 a step, true colour) to ``min_width``,
    then, if still too big, quantise it to 256 colours (fast octree: keeps the overlay colours) and go on
    scaling down."""
    from PIL import Image

    if path.stat().st_size <= max_kb * 1024:
        return
    img = Image.open(path).convert("RGB")
    quantise = False
    while True:
        (img.quantize(256, method=Image.Quantize.FASTOCTREE) if quantise else img).save(path, optimize=True)
        if path.stat().st_size <= max_kb * 1024 or img.width < 500:
            return
        if not quantise and img.width * 0.85 < min_width:
            quantise = True
            continue
        img = img.resize((int(img.width * 0.85), int(img.height * 0.85)), Image.Resampling.LANCZOS)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the MLflow UI)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow(uri: str, port: int, log: Path) -> subprocess.Popen:
    """``mlflow server`` (what ``mlflow ui`` runs) on 127.0.0.1:``port``, healthy; raises SystemExit if not in 90 s."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], env=env, stdout=log.open("wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise SystemExit(f"mlflow server not healthy after 90 s; see {log}")


def main(argv: list[str] | None = None) -> int:
    """Take every screenshot (module docstring); returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--project", type=Path, default=ROOT, help="project folder with params.yaml (default: this checkout)")
    ap.add_argument("--dvc-project", type=Path, default=None,
                    help="DVC project whose `dvc plots show` to shoot (default: --project)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img", help="where the PNGs go (default docs/img)")
    ap.add_argument("--assets", type=Path, default=Path.home() / ".cache" / "lerenet" / "web-assets",
                    help="local copies of the CDN assets (npm packages)")
    ap.add_argument("--no-fetch", action="store_true", help="do not run npm pack for missing CDN assets")
    ap.add_argument("--max-kb", type=int, default=290, help="largest PNG to keep (KiB; 290 KiB < 300 kB)")
    ap.add_argument("--wait-ms", type=int, default=15000, help="page time before each screenshot")
    args = ap.parse_args(argv)

    from pipeline import registry, tracking
    from pipeline.config import load_params
    from pipeline.registry_text import PICTURES_DIR

    project = args.project.resolve()
    params = load_params(project / "params.yaml", env={})
    chromium = find_chromium()
    args.out.mkdir(parents=True, exist_ok=True)
    uri, name = tracking.tracking_uri(params), params.mlflow.registered_model
    client = registry.client(params)
    version = registry.alias_version(params, registry.CHAMPION)
    if version is None:
        raise SystemExit(f"{name} has no champion in {uri}: run the pipeline first (make run)")
    run_id = client.get_model_version(name, version).run_id
    exp_id = client.get_run(run_id).info.experiment_id
    ok: list[bool] = []
    with tempfile.TemporaryDirectory(prefix="lerenet-shots-") as tmp:
        tmpd = Path(tmp)
        port = free_port()
        server = start_mlflow(uri, port, tmpd / "mlflow.log")
        try:
            base = f"http://127.0.0.1:{port}/#"
            server_url = f"http://127.0.0.1:{port}/"

            def run(*picture: str) -> str:  # the model-training pages, not GenAI (tracking.ui_route)
                return server_url + tracking.ui_route(exp_id, "runs", run_id, "artifacts", PICTURES_DIR, *picture)

            for file, url, height in [
                    ("mlflow_registered_model.png", f"{base}/models/{name}", 1000),
                    ("mlflow_model_version.png", f"{base}/models/{name}/versions/{version}", 1400),
                    ("mlflow_champion_run_pictures.png", run("fold0", "overlays_k1_paper.png"), 1200),
                    ("mlflow_champion_run_chart.png", run("per_class_iou.png"), 900)]:
                # 1800 px wide: MLflow 3.17 opens its "MLflow Assistant" panel on the right (~25 % of the width)
                ok.append(shoot(chromium, url, args.out / file, width=1800, height=height, wait_ms=args.wait_ms))
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
        dvc = Path(sys.executable).with_name("dvc")
        r = subprocess.run([str(dvc), "plots", "show", "-o", str(tmpd / "dvc_plots")], cwd=args.dvc_project or project,
                           capture_output=True, text=True, timeout=300)
        # DVC stacks the plots in one column: lay them out side by side so one picture shows all of them
        grid = "body{display:flex;flex-wrap:wrap;gap:4px 12px}"
        pages = [("dvc_plots.png", tmpd / "dvc_plots" / "index.html", 1900, 2500, grid)] if r.returncode == 0 else []
        if r.returncode:
            print(f"  FAILED dvc plots show: {r.stderr.strip()[-500:]}")
            ok.append(False)
        docs = project / params.data.dir / "validation" / "docs"
        validations = sorted((docs / "validations").rglob("*.html"), key=lambda p: p.stat().st_mtime)
        if validations:
            copy = tmpd / "data_docs"
            shutil.copytree(docs, copy)
            pages.append(("gx_data_docs.png", copy / validations[-1].relative_to(docs), 1400, 2400, ""))
        else:
            print(f"  FAILED no GX validation page under {docs}: run `lerenet validate`")
            ok.append(False)
        for file, page, width, height, css in pages:
            local, missing = offline_copy(page, args.assets, not args.no_fetch, css)
            for url in missing:
                print(f"  {file}: CDN asset missing offline: {url}")
            ok.append(shoot(chromium, local.as_uri(), args.out / file, width, height, args.wait_ms))
    for png in sorted(args.out.glob("*.png")):
        shrink(png, args.max_kb)
        print(f"  {png}: {png.stat().st_size // 1024} KiB")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
