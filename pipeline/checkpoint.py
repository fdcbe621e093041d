"""Model files and resumable training state, both written atomically (temp file + ``os.replace``).

Two kinds of file:

* **model file** (``models/<tag>/<model>/model.pt``): ``{"format": "lerenet-model/1",
  "meta": {...}, "state_dict": {...}}``; plain tensors and JSON-like metadata only, so it loads
  with ``torch.load(weights_only=True)``. :func:`load_model` rebuilds the network with
  ``model.build_model`` from the metadata (no ImageNet download needed: the backbone weights are
  in the state dict).
* **training state** (``checkpoints/<tag>/<model>/state.pt``): model, optimiser, scheduler,
  gradient-scaler and RNG states, step, best validation score and state, curve so far. Our own
  trusted file, loaded with ``weights_only=False`` (it holds NumPy RNG state).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

MODEL_FORMAT = "lerenet-model/1"
META_KEYS = ("model", "backbone", "variant", "channels", "freeze_backbone", "image_size")


class CheckpointError(RuntimeError):
    """A model or training-state file is missing, not ours, or does not fit its architecture."""


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to a temp file in the target folder, then ``os.replace``: never half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a resumable training state dict (see module docstring) atomically."""
    atomic_torch_save(state, path)


def load_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Read a training state written by :func:`save_state`; ``None`` if the file does not exist.

    Raises:
        CheckpointError: the file exists but cannot be read (names the file; delete it to start over).
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # corrupted / foreign file
        raise CheckpointError(f"{path}: cannot read training state ({exc}); delete it to train from scratch") from exc


def save_model(path: str | os.PathLike[str], net: torch.nn.Module, meta: dict[str, Any]) -> None:
    """Write a model file: ``net``'s state dict (on CPU) and ``meta`` (must hold :data:`META_KEYS`).

    Raises:
        ValueError: ``meta`` lacks one of :data:`META_KEYS` (names them).
    """
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"model metadata lacks {missing}; needed to rebuild the network")
    state = {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}
    atomic_torch_save({"format": MODEL_FORMAT, "meta": dict(meta), "state_dict": state}, path)


def build_net(params: Any, model_name: str, pretrained: bool = True) -> torch.nn.Module:
    """Build ``model_name`` with the backbone settings of ``params.model``.

    ``params.model.weights`` (a torchvision ``.pth`` for resnet50 / vgg16_bn) is read here with
    ``torch.load(weights_only=True)`` and passed as ``backbone_state_dict`` (``model/`` does no I/O).

    Raises:
        CheckpointError: the weights file is missing or unreadable.
        ValueError: from ``model.build_model`` (unknown name, pretrained ResNet/VGG without weights).
    """
    from model import build_model

    state = None
    if pretrained and params.model.weights is not None:
        w = Path(params.model.weights)
        if not w.is_file():
            raise CheckpointError(f"model.weights: {w} does not exist; give a torchvision checkpoint or null")
        try:
            state = torch.load(w, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CheckpointError(f"model.weights: {w} is not a readable torch state dict ({exc})") from exc
    return build_model(model_name, backbone=params.model.backbone, freeze_backbone=params.model.freeze_backbone,
                       pretrained=pretrained, variant=params.model.variant, channels=params.model.channels,
                       dilated=params.model.dilated, backbone_state_dict=state)


def build_from_meta(meta: dict[str, Any]) -> torch.nn.Module:
    """An untrained network with the architecture described by model metadata (no pretrained weights:
    the model file's state dict holds them). Uses ``meta["config"]`` (``net.config``) when present."""
    from model import build_model

    config = dict(meta.get("config") or {})
    if config:
        name = config.pop("name", meta["model"])
        config.update(freeze_backbone=bool(meta["freeze_backbone"]))
        return build_model(name, pretrained=False, **config)
    return build_model(meta["model"], backbone=meta["backbone"], freeze_backbone=bool(meta["freeze_backbone"]),
                       pretrained=False, variant=meta["variant"], channels=int(meta["channels"]))


def load_model(path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
               ) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a model file written by :func:`save_model` (training's ``model.pt``).

    Returns:
        ``(net, meta)``: the network in eval mode on ``map_location`` with the stored weights
        loaded strictly, and its metadata (model, backbone, variant, channels, freeze_backbone,
        image_size, train_shots, fold, params_hash, data_version, git_commit, step,
        best_val_miou, best_step, run_id).

    Raises:
        CheckpointError: file missing, not a LERENet model file, or weights that do not fit the
            architecture named in its metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: model file not found; train it with `lerenet train` (or `dvc repro train`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable torch file ({exc})") from exc
    if not isinstance(blob, dict) or blob.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: not a LERENet model file (expected format {MODEL_FORMAT!r})")
    meta = blob["meta"]
    net = build_from_meta(meta)
    try:
        net.load_state_dict(blob["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {meta['model']}/{meta['backbone']}: {exc}") from exc
    return net.to(map_location).eval(), meta
