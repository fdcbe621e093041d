"""Multi-level encoder features of our backbones (strides 2, 4, 8, 16) for encoder-decoder models.

``encode`` gives one stride-8 map (two stages concatenated); a saliency decoder such as
JAFFNet's needs the finer stages too. ``encoder_pyramid(backbone, images)`` walks the same
modules (no new parameters, every backbone parameter used) and returns four maps, finest
first:

=======================  =====================  =====================  =====================  ======================
backbone                 stride 2               stride 4               stride 8               stride 16
=======================  =====================  =====================  =====================  ======================
``efficientnet_lite0``   block 0 (16 ch)        block 2 (24 ch)        block 4 (40 ch)        block 10 (112 ch)
``efficientnet_lite2``   block 0 (16 ch)        block 3 (24 ch)        block 6 (48 ch)        block 14 (120 ch)
``resnet50``             ``relu(bn1(conv1))``   ``layer1`` (256 ch)    ``layer2`` (512 ch)    ``layer3`` (1024 ch)
                         (64 ch)                                                              (stride 8 if dilated)
``vgg16_bn``             ``features[:7]``       ``features[7:14]``     ``features[14:24]``    ``features[24:34]``
                         (pool1, 64 ch)         (pool2, 128 ch)        (pool3, 256 ch)        (pool4, 512 ch)
=======================  =====================  =====================  =====================  ======================

The stride-8 and stride-16 maps are exactly the two stages of ``Backbone.stages``. Sizes are
``ceil(H / s)`` for EfficientNet-Lite0 (TF "SAME" padding) and the usual floor-based
PyTorch sizes for ResNet/VGG.
"""

from __future__ import annotations

import torch

from model.backbones import VGG16BN, Backbone, EfficientNetLite, ResNet50

PYRAMID_STRIDES = (2, 4, 8, 16)

_VGG_BOUNDS = (0, 7, 14, 24, 34)  # features[a:b] per level


def pyramid_channels(backbone: Backbone) -> tuple[int, int, int, int]:
    """Channels of the four levels of ``encoder_pyramid`` (finest first).

    Raises:
        TypeError: a backbone class without a pyramid definition.
    """
    if isinstance(backbone, EfficientNetLite):
        return backbone.PYRAMID_CHANNELS
    if isinstance(backbone, ResNet50):
        return (64, 256, 512, 1024)
    if isinstance(backbone, VGG16BN):
        return (64, 128, 256, 512)
    raise TypeError(f"no multi-level pyramid defined for backbone {type(backbone).__name__}")


def encoder_pyramid(backbone: Backbone, images: torch.Tensor) -> list[torch.Tensor]:
    """Four feature maps of ``images`` at strides 2, 4, 8, 16 (table in the module docstring).

    Args:
        backbone: an ``EfficientNetLite`` (Lite0 / Lite2), ``ResNet50`` or ``VGG16BN`` (after ``drop_unused``).
        images: ``(N, 3, H, W)`` float RGB in ``[0, 1]``; the backbone's own normalisation
            is applied here.

    Returns:
        ``[(N, c1, ~H/2, ~W/2), (N, c2, ~H/4, ...), (N, c3, ~H/8, ...), (N, c4, ~H/16, ...)]``
        with ``(c1..c4) = pyramid_channels(backbone)``. Autograd follows the caller's mode.

    Raises:
        ValueError: ``images`` not ``(N, 3, H, W)``.
        TypeError: unknown backbone class.
    """
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"encoder_pyramid expects images (N, 3, H, W), got {tuple(images.shape)}")
    x = (images - backbone.mean) / backbone.std
    out: list[torch.Tensor] = []
    if isinstance(backbone, EfficientNetLite):
        x = backbone._act(backbone._bn0(backbone._conv_stem(x)))
        for idx, block in enumerate(backbone._blocks):
            x = block(x, drop_connect_rate=backbone._drop_rates[idx])
            if idx in backbone.PYRAMID_TAPS:
                out.append(x)
        return out
    if isinstance(backbone, ResNet50):
        x = backbone.relu(backbone.bn1(backbone.conv1(x)))
        out.append(x)
        for layer in (backbone.layer1, backbone.layer2, backbone.layer3):
            x = layer(backbone.maxpool(x) if layer is backbone.layer1 else x)
            out.append(x)
        return out
    if isinstance(backbone, VGG16BN):
        for a, b in zip(_VGG_BOUNDS[:-1], _VGG_BOUNDS[1:]):
            for i in range(a, b):  # index, do not slice: a sliced Sequential is a new module
                x = backbone.features[i](x)
            out.append(x)
        return out
    raise TypeError(f"no multi-level pyramid defined for backbone {type(backbone).__name__}")
