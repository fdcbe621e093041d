"""JAFFNet (Jiang et al., "Joint Attention-Guided Feature Fusion Network for Saliency
Detection of Surface Defects", arXiv 2402.02797): a supervised encoder-decoder that takes
no support, fitted into the few-shot contract so it can be scored on the same episodes.

Encoder: our backbones instead of the paper's own CNN encoder (EfficientNet-Lite0 up to
block 10 by default, ImageNet weights, fine-tuned by default). Two feature sources:

* ``encoder="pyramid"`` (default): the decoder reads four encoder levels (strides 2, 4, 8,
  16, ``model.pyramid``). ``encode`` is then the identity on the ``[0, 1]`` images (the
  "features" are the pixels, ``Cb = 3``, stride 1) and ``forward_features`` runs the
  encoder itself, so the model still fits ``encode`` / ``forward_features``; the frozen
  feature store of the other models (stride 8, 152 channels) does not apply.
* ``encoder="features"``: the decoder reads only ``encode``'s cached stride-8 output, split
  into its stages (``Backbone.level_channels``, 40 + 112 for Lite0): cacheable with a
  frozen backbone and cheap, but without the fine levels the paper decodes from.

The support is never read: ``forward_features`` checks its shapes and ignores its values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones import Backbone
from model.base import FewShotSegmenter
from model.jaffnet_blocks import DRF, JAFF
from model.pyramid import encoder_pyramid, pyramid_channels

ENCODERS = ("pyramid", "features")


class JAFFNet(FewShotSegmenter):
    """Encoder -> DRF on the deepest level -> JAFF decoding stages -> side outputs.

    With encoder levels ``E_1 .. E_n`` (finest first; ``n = 4`` for ``"pyramid"``, 2 for
    ``"features"``): ``D_n = DRF(E_n)``, ``D_i = JAFF(E_i, D_{i+1})`` for ``i = n-1 .. 1``;
    side output ``S_i = conv3x3(D_i)`` (one logit channel) at every stage, each bilinearly
    upsampled to ``out_size``. ``S_1`` (the finest) is the prediction; all sides are trained
    with the hybrid loss (deep supervision, ``model.losses.deep_supervision_loss``).
    Decoder widths: ``channels`` at the deepest level, ``min(channels, C(E_i))`` at the
    others (keeps the stride-2 and stride-4 stages cheap on a CPU).

    Args:
        backbone: a ``Backbone`` (EfficientNet-Lite0, ResNet-50 or VGG-16-BN).
        freeze_backbone: see ``FewShotSegmenter``; the paper trains the encoder (use ``False``).
        channels: decoder width at the deepest level (default 64).
        encoder: ``"pyramid"`` or ``"features"`` (module docstring).
        drf_units: MRF units in the DRF module.
        drf_rates: dilation rates of each MRF unit's parallel 3x3 convs.

    Raises:
        ValueError: unknown ``encoder``, ``channels < 8`` or bad DRF settings.
    """

    def __init__(self, backbone: Backbone, *, freeze_backbone: bool = False, channels: int = 64,
                 encoder: str = "pyramid", drf_units: int = 3, drf_rates: tuple[int, ...] = (1, 3, 5)) -> None:
        super().__init__(backbone, freeze_backbone=freeze_backbone)
        if encoder not in ENCODERS:
            raise ValueError(f"unknown JAFFNet encoder {encoder!r}; valid: {', '.join(ENCODERS)}")
        if channels < 8:
            raise ValueError(f"channels must be >= 8, got {channels}")
        self.encoder = encoder
        levels = pyramid_channels(backbone) if encoder == "pyramid" else tuple(backbone.level_channels)
        widths = [min(int(channels), c) for c in levels[:-1]] + [int(channels)]
        self.level_channels = tuple(int(c) for c in levels)
        self.drf = DRF(levels[-1], widths[-1], units=drf_units, rates=tuple(int(r) for r in drf_rates))
        # jaff[i] fuses level i with the decoder output of level i + 1
        self.jaff = nn.ModuleList(JAFF(levels[i], widths[i + 1], widths[i]) for i in range(len(levels) - 1))
        self.side = nn.ModuleList(nn.Conv2d(w, 1, 3, padding=1) for w in widths)

    @property
    def feature_channels(self) -> int:
        """``Cb`` of ``encode``'s output: 3 (pixels) for ``"pyramid"``, the backbone's for ``"features"``."""
        return 3 if self.encoder == "pyramid" else int(self.backbone.out_channels)

    @property
    def caches_features(self) -> bool:
        """``"features"`` only: ``"pyramid"`` encodes the images itself, the feature store does not apply."""
        return self.encoder == "features"

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``"pyramid"``: the validated images themselves ``(N, 3, H, W)``; ``"features"``: backbone features.

        Raises:
            ValueError: as ``FewShotSegmenter.encode`` (shape, dtype, range outside ``[0, 1]``).
        """
        if self.encoder == "features":
            return super().encode(images)
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"encode expects images (N, 3, H, W), got shape {tuple(images.shape)}; "
                             "replicate gray images to 3 channels")
        if not images.is_floating_point():
            raise ValueError(f"encode expects float images in [0, 1], got dtype {images.dtype}; divide by 255")
        if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
            raise ValueError(f"encode expects images in [0, 1], got range [{images.min().item():.3g}, "
                             f"{images.max().item():.3g}]; divide 0-255 images by 255")
        return images

    def _levels(self, query_feats: torch.Tensor) -> list[torch.Tensor]:
        """Encoder levels, finest first."""
        if self.encoder == "features":
            return list(query_feats.split(list(self.level_channels), dim=1))
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            return encoder_pyramid(self.backbone, query_feats)

    def _decode(self, support_feats: torch.Tensor, support_masks: torch.Tensor, query_feats: torch.Tensor,
                out_size: tuple[int, int]) -> list[torch.Tensor]:
        """Decoder outputs ``D_1 .. D_n`` (finest first); the support's shapes are checked, never its values."""
        self._check_features(support_feats, support_masks, query_feats, out_size, same_size=False)
        levels = self._levels(query_feats)
        x = self.drf(levels[-1])
        decoded = [x]
        for i in range(len(levels) - 2, -1, -1):
            x = self.jaff[i](levels[i], x)
            decoded.append(x)
        return decoded[::-1]

    def side_logits(self, support_feats: torch.Tensor, support_masks: torch.Tensor,
                    query_feats: torch.Tensor, out_size: tuple[int, int]) -> list[torch.Tensor]:
        """All side outputs, finest first, each ``(B, 1, H, W)`` logits at ``out_size``.

        Same arguments as ``forward_features`` (the support is ignored); ``[0]`` equals
        ``forward_features``. Use for deep supervision: ``deep_supervision_loss(sides, target)``.
        """
        size = tuple(int(s) for s in out_size)
        decoded = self._decode(support_feats, support_masks, query_feats, out_size)
        return [F.interpolate(head(d), size=size, mode="bilinear", align_corners=False)
                for head, d in zip(self.side, decoded)]

    def forward_features(self, support_feats: torch.Tensor, support_masks: torch.Tensor,
                         query_feats: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Query logits; the support is ignored (only its shapes are checked).

        Args:
            support_feats: ``(B, K, Cb, hs, ws)`` from ``encode`` (unused).
            support_masks: ``(B, K, 1, H, W)`` (unused).
            query_feats: ``(B, Cb, h, w)`` from ``encode``: the ``[0, 1]`` query images for
                ``"pyramid"`` (``Cb = 3``, ``h, w = H, W``), backbone features for ``"features"``.
            out_size: ``(H, W)`` of the returned logits (the image size for ``"pyramid"``).

        Returns:
            ``(B, 1, H, W)`` logits of the finest side output.
        """
        finest = self._decode(support_feats, support_masks, query_feats, out_size)[0]
        return F.interpolate(self.side[0](finest), size=tuple(int(s) for s in out_size), mode="bilinear",
                             align_corners=False)
