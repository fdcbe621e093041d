"""The paper's Baseline (§5.1): LERENet with MPR, MPE and IFM removed."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones import Backbone
from model.base import FewShotSegmenter
from model.layers import Classifier, FeatureProjection, ResidualBlock, resize_mask


class Baseline(FewShotSegmenter):
    """Masked support features and query features concatenated -> one Res module -> Cls.

    Same projection as LERENet (1x1 conv to ``c`` + ReLU + Dropout2d); the support
    descriptors are masked by the resized support mask and averaged over the K shots
    (Eq. 16); ``[X_s; X_q]`` -> 1x1 conv + ReLU (``2c -> c``) -> ``ResidualBlock`` ->
    ``Classifier`` -> bilinear upsampling to the query size.

    Args:
        backbone: a ``Backbone``.
        freeze_backbone: see ``FewShotSegmenter``.
        channels: ``c`` (>= 8).
        dropout: Dropout2d after the projection.
    """

    def __init__(self, backbone: Backbone, *, freeze_backbone: bool = True, channels: int = 256,
                 dropout: float = 0.5) -> None:
        super().__init__(backbone, freeze_backbone=freeze_backbone)
        if channels < 8:
            raise ValueError(f"channels must be >= 8, got {channels}")
        self.project = FeatureProjection(backbone.out_channels, channels, dropout)
        self.reduce = nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False), nn.ReLU(inplace=True))
        self.res = ResidualBlock(channels)
        self.cls = Classifier(channels)

    def forward_features(self, support_feats: torch.Tensor, support_masks: torch.Tensor,
                         query_feats: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """``(B,K,Cb,h,w)``, ``(B,K,1,H,W)`` {0,1}, ``(B,Cb,h,w)``, ``(H,W)`` -> ``(B,1,H,W)`` logits."""
        b, k, masks = self._check_features(support_feats, support_masks, query_feats, out_size)
        h, w = query_feats.shape[-2:]
        x_s = self.project(support_feats.flatten(0, 1)) * resize_mask(masks.flatten(0, 1), (h, w))
        x_s = x_s.unflatten(0, (b, k)).mean(dim=1)                            # (B, c, h, w)
        x_q = self.project(query_feats)
        logits = self.cls(self.res(self.reduce(torch.cat([x_s, x_q], dim=1))))
        return F.interpolate(logits, size=tuple(int(s) for s in out_size), mode="bilinear", align_corners=False)
