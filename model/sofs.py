"""SOFS (Zhang et al., "Small Object Few-shot Segmentation for Vision-based Industrial
Inspection", arXiv 2407.21351) on our frozen CNN backbones.

Shapes: ``B`` episodes, ``K`` shots, ``Cb`` backbone channels (split into the backbone's
stages, ``Backbone.level_channels``), ``D`` embedding channels (``channels``), query grid
``h x w`` (``Lq = h*w``), support grid ``hs x ws`` (``Ls``). The published model uses a
frozen DINOv2 ViT-B/14 and several of its layers as levels; here the levels are the stages
concatenated by ``encode`` (EfficientNet-Lite0: 40 + 112 channels at stride 8). Every
choice where the paper or the authors' code is ambiguous is listed in docs/model.md.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones import Backbone
from model.base import FewShotSegmenter, check_native_area
from model.layers import FeatureProjection, masked_average_pooling
from model.sofs_ops import area_fraction, level_priors, mask_fusion, shot_mean

MASK_RESIZE = ("area", "nearest")


class TokenLayer(nn.Module):
    """Pre-norm transformer layer with a depthwise-conv feed-forward (SOFS Sec. 3.3).

    ``x <- x + MHSA(LN(x))``, ``x <- x + W2 GELU(DWConv3x3(W1 LN(x)))``: multi-head
    self-attention over the tokens of one image, then a feed-forward whose hidden
    activations are mixed with their 3x3 grid neighbours by a depthwise convolution
    (positional information without position embeddings, as SegFormer's Mix-FFN).

    ``forward(x (N, L, D), hw=(h, w))`` with ``L = h*w`` -> ``(N, L, D)``.

    Args:
        dim: ``D``. heads: attention heads (``D % heads == 0``). mlp_ratio: hidden width / ``D``.
    """

    def __init__(self, dim: int, heads: int = 4, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"channels {dim} must be divisible by heads {heads}")
        hidden = max(int(dim * mlp_ratio), 1)
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """See class docstring."""
        n, length, dim = x.shape
        h, w = hw
        if h * w != length:
            raise ValueError(f"{length} tokens do not form a {h}x{w} grid")
        q, k, v = self.qkv(self.norm1(x)).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v)                         # softmax(q k^T / sqrt(d)) v
        x = x + self.proj(att.transpose(1, 2).reshape(n, length, dim))
        y = self.fc1(self.norm2(x)).transpose(1, 2).reshape(n, -1, h, w)
        y = self.dwconv(y).flatten(2).transpose(1, 2)
        return x + self.fc2(F.gelu(y))


class SOFS(FewShotSegmenter):
    """SOFS: priors from frozen features, prototype-guided embedding, attention, prototype classifier.

    ``forward_features`` (shapes in the module docstring):

    1. prototype intensity downsampling: ``m = area_fraction(M_s, (hs, ws))`` (Sec. 3.2);
    2. per backbone level, the semantic and abnormal priors (``sofs_ops.sofs_priors``);
    3. ``X_q = drop(ReLU(W_q F_q))``, ``X_s = drop(ReLU(W_s F_s))`` (1x1 convs to ``D``);
       the weighted-GAP prototype ``p_k = MAP(F_s^k, m_k)`` reduced by ``W_s`` likewise;
       query merge ``ReLU(W_mq [X_q; mean_k p_k; 10 * priors])``, support merge
       ``ReLU(W_ms [X_s^k; p_k])``;
    4. ``num_layers`` ``TokenLayer``s, shared weights, applied to the query tokens and to each
       shot's support tokens separately;
    5. ``sofs_ops.mask_fusion`` (cosine attention, temperature 0.1, values ``s * m``);
    6. meta classifier: ``p = mean_k MAP(W_c S^k, m_k)`` (1x1 conv of the support tokens),
       logit ``z_i = <q_i, p>``; bilinear upsampling to ``out_size``.

    Anomaly-detection mode: for an episode whose support masks are all empty the logits are
    ``logit(mean_l P_abn^l) - logit(anomaly_threshold)``, i.e. ``sigmoid`` of the output is
    the abnormal prior (averaged over levels, clamped to ``[1e-4, 1 - 1e-4]``) shifted so that
    the decision ``sigmoid > 0.5`` means ``P_abn > anomaly_threshold``.

    Args:
        backbone: a ``Backbone`` with ``level_channels``.
        freeze_backbone: see ``FewShotSegmenter`` (SOFS keeps its backbone frozen).
        channels: ``D`` (default 64; the authors use wider embeddings on a GPU).
        num_layers: transformer layers (``>= 0``).
        heads: attention heads.
        dropout: Dropout2d after the 1x1 reductions (0.5).
        prior_scale: factor on the priors before the query merge (10).
        temperature: softmax temperature of the fusion (0.1).
        anomaly_threshold: abnormal-prior level that counts as defect in anomaly-detection
            mode, in ``(0, 1)``; select it on training-side classes, never on test folds.
        mask_resize: ``"area"`` (prototype intensity downsampling, default) or ``"nearest"``
            (ablation: the usual binary nearest-neighbour mask).
        priors: use the priors (``False``: ablation, the query merge sees ``[X_q; p]`` only;
            anomaly-detection mode still uses the abnormal prior).
        native_area: SOFS non-resizing (Sec. 3.4, :func:`model.base.check_native_area`; the authors
            use 0.01); ``None`` (default): every image is resized whole. Stored with the model; the
            network's forward is the same either way (its support and query grids may differ).

    Raises:
        ValueError: bad option values.
    """

    def __init__(self, backbone: Backbone, *, freeze_backbone: bool = True, channels: int = 64,
                 num_layers: int = 2, heads: int = 4, dropout: float = 0.5, prior_scale: float = 10.0,
                 temperature: float = 0.1, anomaly_threshold: float = 0.5, mask_resize: str = "area",
                 priors: bool = True, native_area: float | None = None) -> None:
        super().__init__(backbone, freeze_backbone=freeze_backbone)
        if channels < 8:
            raise ValueError(f"channels must be >= 8, got {channels}")
        if num_layers < 0:
            raise ValueError(f"num_layers must be >= 0, got {num_layers}")
        if not 0.0 < anomaly_threshold < 1.0:
            raise ValueError(f"anomaly_threshold must be in (0, 1), got {anomaly_threshold}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if mask_resize not in MASK_RESIZE:
            raise ValueError(f"unknown mask_resize {mask_resize!r}; valid: {', '.join(MASK_RESIZE)}")
        self.native_area = check_native_area(native_area)
        self.levels = tuple(int(c) for c in backbone.level_channels)
        if sum(self.levels) != backbone.out_channels:
            raise ValueError(f"backbone level_channels {self.levels} do not sum to out_channels {backbone.out_channels}")
        cb, d = backbone.out_channels, int(channels)
        self.prior_scale, self.temperature = float(prior_scale), float(temperature)
        self.anomaly_threshold, self.mask_resize, self.use_priors = float(anomaly_threshold), mask_resize, bool(priors)
        self.down_query = FeatureProjection(cb, d, dropout)
        self.down_support = FeatureProjection(cb, d, dropout)
        n_prior = 2 * len(self.levels) if self.use_priors else 0
        self.merge_query = nn.Sequential(nn.Conv2d(2 * d + n_prior, d, 1, bias=False), nn.ReLU(inplace=True))
        self.merge_support = nn.Sequential(nn.Conv2d(2 * d, d, 1, bias=False), nn.ReLU(inplace=True))
        self.layers = nn.ModuleList(TokenLayer(d, heads) for _ in range(num_layers))
        self.cls_support = nn.Linear(d, d)

    # ------------------------------------------------------------------ pieces
    def downsample_masks(self, support_masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(B, K, 1, H, W)`` -> ``(B, K, 1, hs, ws)`` area fractions (``"nearest"``: binary nearest)."""
        flat = support_masks.flatten(0, 1).float()
        if self.mask_resize == "nearest":
            small = F.interpolate(flat, size=size, mode="nearest")
        else:
            small = area_fraction(flat, size)
        return small.unflatten(0, tuple(support_masks.shape[:2]))

    def priors(self, support_feats: torch.Tensor, masks: torch.Tensor, query_feats: torch.Tensor) -> torch.Tensor:
        """All levels' priors ``(B, 2 * levels, h, w)`` float32 (``sofs_ops.level_priors``; masks downsampled).

        Computed in float32 even under autocast (cosines near 1 and ``1 - max cos`` need the precision).
        """
        with torch.autocast(device_type=query_feats.device.type, enabled=False):
            return level_priors(query_feats.float(), support_feats.float(), masks.float(), self.levels)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, D, h, w)`` -> ``(N, h*w, D)`` after the transformer layers."""
        hw = tuple(x.shape[-2:])
        t = x.flatten(2).transpose(1, 2)
        for layer in self.layers:
            t = layer(t, hw)
        return t

    def anomaly_logits(self, priors: torch.Tensor) -> torch.Tensor:
        """Anomaly-detection logits ``(B, 1, h, w)`` from ``(B, 2 * levels, h, w)`` priors (class docstring)."""
        abnormal = priors[:, 1::2].float().mean(dim=1, keepdim=True).clamp(1e-4, 1.0 - 1e-4)  # float32: 1 - 1e-4
        t = self.anomaly_threshold                                                          # is 1.0 in bf16
        return torch.log(abnormal / (1.0 - abnormal)) - math.log(t / (1.0 - t))

    # ------------------------------------------------------------------ contract
    def forward_features(self, support_feats: torch.Tensor, support_masks: torch.Tensor,
                         query_feats: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Logits from encoded features.

        Args:
            support_feats: ``(B, K, Cb, hs, ws)`` from ``encode``.
            support_masks: ``(B, K, 1, H, W)`` float in ``[0, 1]`` at image resolution (an
                all-zero set of masks switches the episode to anomaly-detection mode).
            query_feats: ``(B, Cb, h, w)`` from ``encode``; its grid may differ from the
                support's (e.g. sliding windows at native resolution).
            out_size: ``(H, W)`` of the returned logits (feature grid or image size).

        Returns:
            ``(B, 1, H, W)`` logits (bilinear upsampling of the ``h x w`` logits).
        """
        b, k, masks = self._check_features(support_feats, support_masks, query_feats, out_size, same_size=False)
        hs, ws = support_feats.shape[-2:]
        h, w = query_feats.shape[-2:]
        d = self.merge_support[0].out_channels
        m = self.downsample_masks(masks, (hs, ws))                             # (B, K, 1, hs, ws)
        has = m.flatten(2).sum(-1) > 0                                        # (B, K)
        priors = self.priors(support_feats, m, query_feats)                   # (B, 2L, h, w)

        s_flat, m_flat = support_feats.flatten(0, 1), m.flatten(0, 1)
        x_q = self.down_query(query_feats)                                    # (B, D, h, w)
        x_s = self.down_support(s_flat)                                       # (B*K, D, hs, ws)
        proto = self.down_support(masked_average_pooling(s_flat, m_flat)[..., None, None])  # (B*K, D, 1, 1)
        proto_q = shot_mean(proto.view(b, k, d), has)[..., None, None]        # (B, D, 1, 1)
        parts = [x_q, proto_q.expand(-1, -1, h, w)]
        if self.use_priors:
            parts.append(self.prior_scale * priors)
        x_q = self.merge_query(torch.cat(parts, dim=1))
        x_s = self.merge_support(torch.cat([x_s, proto.expand(-1, -1, hs, ws)], dim=1))

        t_q = self._tokens(x_q)                                               # (B, Lq, D)
        t_s = self._tokens(x_s).view(b, k, hs * ws, d)                        # (B, K, Ls, D)
        m_tok = m.view(b, k, hs * ws)
        t_q = mask_fusion(t_q, t_s, m_tok, self.temperature)

        c_s = self.cls_support(t_s)                                           # (B, K, Ls, D)
        p_k = (c_s * m_tok[..., None]).sum(2) / (m_tok.sum(2)[..., None] + 1e-5)  # (B, K, D) MAP per shot
        p = shot_mean(p_k, has)                                               # (B, D)
        logits = (t_q @ p[:, :, None]).transpose(1, 2).reshape(b, 1, h, w)

        normal_support = ~has.any(dim=1)                                      # (B,) anomaly-detection mode
        if bool(normal_support.any()):
            logits = torch.where(normal_support.view(b, 1, 1, 1), self.anomaly_logits(priors), logits)
        return F.interpolate(logits, size=tuple(int(s) for s in out_size), mode="bilinear", align_corners=False)
