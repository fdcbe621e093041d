"""Reading a model file (``models/<tag>/<model>/model.pt``): the network it describes, weights loaded.

Format ``{"format": "lerenet-model/1", "meta": {...}, "state_dict": {...}}``: plain tensors and
JSON-like metadata only, so it loads with ``torch.load(weights_only=True)``. :func:`load_model`
rebuilds the network with ``model.build_model`` from the metadata (no ImageNet download: the
backbone weights are in the state dict). Written by :func:`pipeline.checkpoint.save_model`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

MODEL_FORMAT = "lerenet-model/1"
META_KEYS = ("model", "backbone", "variant", "channels", "freeze_backbone", "image_size")


class CheckpointError(RuntimeError):
    """A model or training-state file is missing, not ours, or does not fit its architecture."""


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
    """Load a model file written by :func:`pipeline.checkpoint.save_model` (training's ``model.pt``).

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
