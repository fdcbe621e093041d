"""Writing model files and resumable training state, both atomically (:mod:`pipeline.atomic`).

Two kinds of file:

* **model file** (``models/<tag>/<model>/model.pt``): ``{"format": "lerenet-model/1",
  "meta": {...}, "state_dict": {...}}``; plain tensors and JSON-like metadata only, so it loads
  with ``torch.load(weights_only=True)``. Written by :func:`save_model`; read by
  :func:`pipeline.inference.model_file.load_model` (re-exported here), which the served model ships.
* **training state** (``checkpoints/<tag>/<model>/state.pt``): model, optimiser, scheduler,
  gradient-scaler and RNG states, step, best validation score and state, curve so far, and the key
  it was written for (:mod:`pipeline.training.state`). Also plain tensors and JSON-like values only:
  NumPy arrays (the NumPy RNG state) are stored as ``{"__ndarray__": dtype, "data": list}`` and
  turned back on reading, so the file loads with ``torch.load(weights_only=True)``; a state that
  needs unpickling of arbitrary objects (written by an older version, or not by us) is refused.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import atomic_torch_save
from pipeline.inference.model_file import (META_KEYS, MODEL_FORMAT, CheckpointError,  # noqa: F401 (re-exported)
                                           build_from_meta, load_model)


_NDARRAY = "__ndarray__"


def _plain(obj: Any) -> Any:
    """``obj`` with every NumPy array replaced by ``{"__ndarray__": dtype, "data": list}`` (and NumPy
    scalars by Python numbers), containers rebuilt with the same type (dict, list, tuple)."""
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: str(obj.dtype), "data": obj.tolist()}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _restore(obj: Any) -> Any:
    """Inverse of :func:`_plain`."""
    if isinstance(obj, dict):
        if set(obj) == {_NDARRAY, "data"}:
            return np.asarray(obj["data"], dtype=obj[_NDARRAY])
        return {k: _restore(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_restore(v) for v in obj)
    return obj


def save_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write a resumable training state dict (see module docstring) atomically; NumPy arrays are
    stored as plain lists so that :func:`load_state` needs no unpickling of objects."""
    atomic_torch_save(_plain(state), path)


def load_state(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Read a training state written by :func:`save_state` with ``torch.load(weights_only=True)``;
    ``None`` if the file does not exist.

    Raises:
        CheckpointError: the file exists but cannot be read, or needs unpickling of arbitrary
            objects (a pickled state of an older version, or a file not written by us); the message
            names the file and says to delete it to train from scratch.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        why = next((ln.strip().split(" was not")[0] for ln in str(exc).splitlines() if "Unsupported global" in ln), None)
        if why is None:  # not even a torch file
            raise CheckpointError(f"{path}: cannot read training state ({exc}); delete it to train from scratch") from None
        raise CheckpointError(
            f"{path}: refusing to load this training state: it holds pickled Python objects that "
            f"torch.load(weights_only=True) does not allow (written by an older version of the pipeline, "
            f"or not by it; loading it could run code): {why}. Delete the file to train from scratch") from None
    except Exception as exc:  # corrupted / foreign file
        raise CheckpointError(f"{path}: cannot read training state ({exc}); delete it to train from scratch") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a training state (a {type(state).__name__}, expected a dict); "
                              "delete it to train from scratch")
    return _restore(state)


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
                       **params.model.options(model_name))
