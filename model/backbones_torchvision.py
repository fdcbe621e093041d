"""ResNet-50 and VGG-16-BN with torchvision's layout and parameter names (the paper's backbones, appendix B.1).

Built with the *whole* torchvision architecture so that a torchvision checkpoint loads with ``strict=True``; the
parts the features do not use are dropped after loading (``drop_unused``). Features: see :mod:`model.backbones`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from model.backbone_base import IMAGENET_MEAN, IMAGENET_STD, Backbone, load_state_dict_strict


# ----------------------------------------------------------------------------- ResNet-50
class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck (stride on the 3x3 conv), same parameter names."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, inplanes, h, w)`` -> ``(N, 4*planes, h/stride, w/stride)``."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(Backbone):
    """ResNet-50 with torchvision names; features ``layer2`` + ``layer3`` (``Cb = 1536``).

    Args:
        dilated: replace the stride of ``layer3`` and ``layer4`` by dilation 2 and 4
            (torchvision's ``replace_stride_with_dilation=[False, True, True]``), so both
            feature stages have output stride 8.

    Built whole (``layer4``, ``avgpool``, ``fc`` included) so a torchvision checkpoint
    loads with ``load_torchvision``; call ``drop_unused()`` afterwards.
    """

    out_channels = 512 + 1024
    level_channels = (512, 1024)

    def __init__(self, dilated: bool = False) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        self.dilated = dilated
        self._inplanes, self._dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, 3)
        self.layer2 = self._make_layer(128, 4, stride=2)
        self.layer3 = self._make_layer(256, 6, stride=2, dilate=dilated)
        self.layer4 = self._make_layer(512, 3, stride=2, dilate=dilated)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2048, 1000)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._inplanes, planes * Bottleneck.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self._inplanes, planes, stride, downsample, dilation=previous_dilation)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes, dilation=self._dilation) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def load_torchvision(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Strictly load a torchvision ``resnet50`` state dict (raises ``WeightsError``)."""
        load_state_dict_strict(self, state_dict, "resnet50 (torchvision layout)")

    def drop_unused(self) -> None:
        """Delete ``layer4``, ``avgpool`` and ``fc``: the features never use them."""
        for name in ("layer4", "avgpool", "fc"):
            if hasattr(self, name):
                delattr(self, name)

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``(N, 3, H, W)`` -> (layer2 ``(N, 512, H/8, W/8)``, layer3 ``(N, 1024, H/16 or H/8, ...)``)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        f2 = self.layer2(self.layer1(x))
        return f2, self.layer3(f2)


# ----------------------------------------------------------------------------- VGG-16-BN
_VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG16BN(Backbone):
    """VGG-16 with batch norm, torchvision names; features ``features[:24]`` + ``features[24:34]``.

    ``features[:24]`` ends after pool3 (256 ch, stride 8), ``features[24:34]`` after pool4
    (512 ch, stride 16): ``Cb = 768``. Built whole (``features[34:]``, ``avgpool``,
    ``classifier``) for strict loading; ``drop_unused()`` removes them.
    """

    out_channels = 256 + 512
    level_channels = (256, 512)

    def __init__(self) -> None:
        super().__init__(IMAGENET_MEAN, IMAGENET_STD)
        layers: list[nn.Module] = []
        in_ch = 3
        for v in _VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_ch, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                in_ch = int(v)
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
            nn.Linear(4096, 1000),
        )

    def load_torchvision(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Strictly load a torchvision ``vgg16_bn`` state dict (raises ``WeightsError``)."""
        load_state_dict_strict(self, state_dict, "vgg16_bn (torchvision layout)")

    def drop_unused(self) -> None:
        """Delete ``features[34:]`` (conv5 block), ``avgpool`` and ``classifier``."""
        for idx in range(34, len(self.features)):
            del self.features._modules[str(idx)]
        for name in ("avgpool", "classifier"):
            if hasattr(self, name):
                delattr(self, name)

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``(N, 3, H, W)`` -> (pool3 ``(N, 256, H/8, W/8)``, pool4 ``(N, 512, H/16, W/16)``)."""
        f3 = self.features[:24](x)
        return f3, self.features[24:34](f3)
