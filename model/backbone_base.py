"""The backbone base class (:class:`Backbone`: ``[0, 1]`` RGB in, two mid-level stages concatenated out), ImageNet
normalisation constants and strict state-dict loading with readable errors. The backbones themselves:
:mod:`model.backbones` (EfficientNet-Lite, ``build_backbone``) and :mod:`model.backbones_torchvision` (ResNet-50,
VGG-16-BN in torchvision's layout)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(ValueError):
    """A state dict does not match a module: lists the missing and unexpected keys."""


def load_state_dict_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """Load ``state_dict`` into ``module`` with ``strict=True`` semantics and clear errors.

    Args:
        module: the module to load into (its parameters and persistent buffers).
        state_dict: mapping of parameter name -> tensor, e.g. ``torch.load(path)`` of a
            torchvision checkpoint.
        what: a name for the error message, e.g. ``"resnet50 (torchvision layout)"``.

    Raises:
        WeightsError: keys missing from / unexpected in ``state_dict`` (first 10 of each
            listed with counts), or tensors whose shape differs from the module's.
    """
    if not isinstance(state_dict, Mapping):
        raise WeightsError(f"{what}: expected a state dict (mapping name -> tensor), got {type(state_dict).__name__}")
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        def fmt(keys: list[str]) -> str:
            shown = ", ".join(keys[:10])
            return f"{len(keys)} ({shown}{', ...' if len(keys) > 10 else ''})"

        hint = ""
        if unexpected and all(k.startswith("module.") for k in unexpected):
            hint = " The keys start with 'module.': strip that DataParallel prefix first."
        raise WeightsError(
            f"{what}: state dict does not match the architecture: missing keys {fmt(missing)}; "
            f"unexpected keys {fmt(unexpected)}.{hint} Pass a checkpoint of this exact architecture."
        )
    bad = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if tuple(v.shape) != tuple(own[k].shape)
    ]
    if bad:
        raise WeightsError(f"{what}: {len(bad)} tensors have the wrong shape: " + "; ".join(bad[:10]))
    module.load_state_dict(dict(state_dict), strict=True)


class Backbone(nn.Module):
    """Base class: normalises ``[0, 1]`` RGB images and returns mid-level features.

    Subclasses set ``out_channels`` (``Cb``) and implement ``stages(x)`` on normalised
    input. ``forward(images)``: ``(N, 3, H, W)`` float in ``[0, 1]`` -> ``(N, Cb, h, w)``
    with ``h, w`` the spatial size of the shallower (stride-8) stage.
    """

    out_channels: int
    level_channels: tuple[int, ...]
    """Channels of each stage concatenated in ``forward``'s output, shallow first (sum = ``out_channels``):
    ``features.split(level_channels, dim=1)`` recovers the levels (SOFS's per-level priors)."""
    stride: int = 8

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        # non-persistent: not part of the state dict, so torchvision checkpoints match exactly
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (shallow, deep) stage outputs of normalised input ``x``."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in ``[0, 1]`` -> ``(N, Cb, h, w)`` (see class docstring)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"backbone expects images of shape (N, 3, H, W), got {tuple(images.shape)}")
        x = (images - self.mean) / self.std
        shallow, deep = self.stages(x)
        if deep.shape[-2:] != shallow.shape[-2:]:
            deep = F.interpolate(deep, size=shallow.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([shallow, deep], dim=1)
