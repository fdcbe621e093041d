"""docs/screenshots.py without a browser: CDN assets mapped to local npm packages, pages rewritten, PNGs kept small."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def _script():
    spec = importlib.util.spec_from_file_location("screenshots", ROOT / "docs" / "screenshots.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _package(cache: Path, name: str, version: str, files: dict[str, str], meta: dict | None = None) -> None:
    folder = cache / f"{name.replace('/', '+')}@{version}"
    for rel, text in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    (folder / "package.json").write_text(json.dumps({"name": name, "version": version, **(meta or {})}))


def test_cdn_assets_resolve_to_local_npm_files_and_the_page_copy_uses_them(tmp_path):
    S = _script()
    cache = tmp_path / "assets"
    _package(cache, "vega", "5.20.2", {"build/vega.min.js": "vega"}, {"jsdelivr": "build/vega.min.js"})
    _package(cache, "bootstrap", "4.3.1", {"dist/css/bootstrap.min.css": "css"})
    _package(cache, "@fortawesome/fontawesome-free", "6.6.0", {"css/all.min.css": "fa"})
    vega = S.local_asset("https://cdn.jsdelivr.net/npm/vega@5.20.2", cache, fetch=False)
    assert vega == (cache / "vega@5.20.2" / "build" / "vega.min.js").resolve()
    assert S.local_asset("https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css", cache, False).read_text() == "css"
    assert S.local_asset("https://cdnjs.cloudflare.com/ajax/libs/font-awesome/6.6.0/css/all.min.css", cache, False)
    assert S.local_asset("https://unpkg.com/vega@5.20.2/../../../etc/passwd", cache, False) is None  # stays in the package
    assert S.local_asset("https://cdn.jsdelivr.net/npm/vega-lite@5.2.0", cache, False) is None  # not there, no fetch
    assert S.local_asset("https://example.org/logo.png", cache, False) is None

    page = tmp_path / "site" / "index.html"
    page.parent.mkdir()
    page.write_text('<html><head><script src="https://cdn.jsdelivr.net/npm/vega@5.20.2"></script>'
                    '<link href="https://maxcdn.bootstrapcdn.com/bootstrap/4.3.1/css/bootstrap.min.css"></head>'
                    '<body><img src="https://example.org/logo.png"></body></html>')
    copy, missing = S.offline_copy(page, cache, False, css="body{display:flex}")
    html = copy.read_text()
    assert copy.parent == page.parent and page.read_text().count("https://") == 3  # the original is untouched
    assert vega.as_uri() in html and "cdn.jsdelivr.net" not in html and "bootstrapcdn" not in html
    assert missing == ["https://example.org/logo.png"] and "<style>body{display:flex}</style></head>" in html


def test_shrink_keeps_a_png_under_the_limit_and_leaves_small_ones_alone(tmp_path):
    S = _script()
    rng = np.random.default_rng(0)
    big = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 255, (900, 1600, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 1_000_000
    S.shrink(big, 300)
    assert big.stat().st_size <= 300 * 1024 and Image.open(big).width >= 500
    small = tmp_path / "small.png"
    Image.new("RGB", (200, 100), "white").save(small)
    before = small.read_bytes()
    S.shrink(small, 300)
    assert small.read_bytes() == before
