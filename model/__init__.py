"""Pure-PyTorch few-shot defect segmentation models: LERENet, the paper's Baseline, a
PANet-style prototype model, SOFS and the support-free JAFFNet, on ResNet-50 / VGG-16-BN /
EfficientNet-Lite0 backbones.

``build_model(name, backbone, ...)`` is the entry point (see docs/model.md).
"""

from model.backbones import BACKBONES, WeightsError, build_backbone, torchvision_state_dict_shapes
from model.base import FewShotSegmenter
from model.baseline import Baseline
from model.jaffnet import JAFFNet
from model.lerenet import VARIANTS, LERENet
from model.prototype import PrototypeNet
from model.registry import MODELS, build_model
from model.sofs import SOFS

__all__ = [
    "BACKBONES",
    "MODELS",
    "VARIANTS",
    "Baseline",
    "FewShotSegmenter",
    "JAFFNet",
    "LERENet",
    "PrototypeNet",
    "SOFS",
    "WeightsError",
    "build_backbone",
    "build_model",
    "torchvision_state_dict_shapes",
]
