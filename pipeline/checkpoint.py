"""Writing model files and resumable training state, both atomically (:mod:`pipeline.atomic`).

Two kinds of file:

* **model file** (``models/<tag>/<model>/model.pt``): ``{"format": "lerenet-model/1",
  "meta": {...}, "state_dict": {...}}``; plain tensors and JSON-like metadata only, so it loads
  with ``torch.load(weights_only=True)``. Written by :func:`save_model`; read by
  :func:`pipeline.inference.model_file.load_model` (re-exported here), which the served model ships.
* **training state** (``checkpoints/<tag>/<model>/state.pt``): model, optimiser, scheduler,
  gradient-scaler and RNG states, step, best validation score and state, curve so far. Our own
  trusted file, loaded with ``weights_only=False`` (it holds NumPy RNG state).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_torch_save
from pipeline.inference.model_file import (META_KEYS, MODEL_FORMAT, CheckpointError,  # noqa: F401 (re-exported)
                                           build_from_meta, load_model)


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
                       dilated=params.model.dilated, backbone_state_dict=state,
                       **(params.model.lerenet_options() if model_name == "lerenet" else {}))
