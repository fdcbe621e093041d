"""PANet-style prototype model: masked average pooling + cosine similarity, no learned head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones import Backbone
from model.base import FewShotSegmenter
from model.layers import resize_mask, shot_prototype


class PrototypeNet(FewShotSegmenter):
    """Foreground/background prototypes compared to each query descriptor (Wang et al. 2019).

    ``p_fg`` = masked average pooling of the support features over the defect area of all
    K shots, ``p_bg`` the same over the rest. PANet classifies each query location by a
    softmax over ``alpha * cos(F_q, p)``; for two classes that is a sigmoid of the binary
    logit ``alpha * (cos(F_q, p_fg) - cos(F_q, p_bg))``, which this model returns, so
    ``sigmoid > 0.5`` <=> the location is closer to the defect prototype. Works directly
    on the backbone features (no projection): only ``alpha`` can be learned.

    Args:
        backbone: a ``Backbone``.
        freeze_backbone: see ``FewShotSegmenter``.
        scale: ``alpha``, PANet's 20.
        learn_scale: make ``alpha`` a trainable scalar (it never changes the decision).
    """

    def __init__(self, backbone: Backbone, *, freeze_backbone: bool = True, scale: float = 20.0,
                 learn_scale: bool = True) -> None:
        super().__init__(backbone, freeze_backbone=freeze_backbone)
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        value = torch.tensor(float(scale))
        if learn_scale:
            self.scale = nn.Parameter(value)
        else:
            self.register_buffer("scale", value)

    def forward_features(self, support_feats: torch.Tensor, support_masks: torch.Tensor,
                         query_feats: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """``(B,K,Cb,hs,ws)``, ``(B,K,1,H,W)`` {0,1}, ``(B,Cb,h,w)``, ``(H,W)`` -> ``(B,1,H,W)`` logits.

        Support and query grids may differ in size here.
        """
        b, k, masks = self._check_features(support_feats, support_masks, query_feats, out_size, same_size=False)
        m = resize_mask(masks.flatten(0, 1), tuple(support_feats.shape[-2:])).unflatten(0, (b, k))
        p_fg = shot_prototype(support_feats, m)[:, :, None, None]             # (B, Cb, 1, 1)
        p_bg = shot_prototype(support_feats, 1.0 - m)[:, :, None, None]
        cos_fg = F.cosine_similarity(query_feats, p_fg, dim=1, eps=1e-6)     # (B, h, w)
        cos_bg = F.cosine_similarity(query_feats, p_bg, dim=1, eps=1e-6)
        logits = (self.scale * (cos_fg - cos_bg)).unsqueeze(1)
        return F.interpolate(logits, size=tuple(int(s) for s in out_size), mode="bilinear", align_corners=False)
