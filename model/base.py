"""Common base of the few-shot segmentation models: backbone handling and the
``encode`` / ``forward_features`` / ``forward`` contract (docs/architecture.md)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from model.backbones import Backbone


def check_native_area(area: float | None) -> float | None:
    """Validate a non-resizing threshold (SOFS, arXiv 2407.21351, Sec. 3.4): a support defect covering at most
    this share of its image, in ``(0, 1]``, is *small*, and inference then works on native-resolution crops
    and sliding windows (``pipeline.inference.native``); ``None``: off. Returns it as a float (or ``None``).

    Raises:
        ValueError: outside ``(0, 1]``.
    """
    if area is None:
        return None
    if not 0.0 < float(area) <= 1.0:
        raise ValueError(f"native_area must be in (0, 1] or None, got {area}")
    return float(area)


class FewShotSegmenter(nn.Module):
    """One-way K-shot segmenter: support images + masks and a query -> query logits.

    Subclasses implement ``forward_features``. This class owns the backbone:

    * ``freeze_backbone=True``: backbone parameters get ``requires_grad=False`` and the
      backbone stays in eval mode (BatchNorm statistics fixed, no stochastic depth) even
      after ``model.train()``; ``encode`` then runs without autograd and is deterministic,
      so its output can be cached.
    * ``freeze_backbone=False``: the backbone is fine-tuned; give ``backbone_parameters()``
      its own (e.g. 0.1x) learning rate and ``head_parameters()`` the base rate.

    Attributes:
        backbone: the ``Backbone`` (``out_channels`` = ``Cb``).
        config: keyword arguments that rebuild this architecture with ``build_model``
            (set by the registry).
    """

    def __init__(self, backbone: Backbone, *, freeze_backbone: bool = True) -> None:
        super().__init__()
        self.backbone = backbone
        self.freeze_backbone = bool(freeze_backbone)
        self.config: dict[str, Any] = {}
        if self.freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()

    # ------------------------------------------------------------------ parameters / modes
    @property
    def feature_channels(self) -> int:
        """``Cb``: channels of ``encode``'s output."""
        return int(self.backbone.out_channels)

    @property
    def caches_features(self) -> bool:
        """Whether ``encode`` returns the backbone's features (``True`` here), so that a frozen
        backbone's output can be read from the pipeline's feature store instead of being computed.
        A model whose ``encode`` is something else (JAFFNet's own encoder pass) returns ``False``."""
        return True

    def presence_log_odds(self, logits: torch.Tensor) -> torch.Tensor:
        """The log-odds behind output logits, for image-level scores compared *across* images (the presence
        gate's reference score, ``pipeline.inference.gate``). Here the identity: a plain output logit already
        is a log-odds. Models whose output saturates override it.

        Args:
            logits: any shape, output logits.

        Returns:
            the same shape, float64.
        """
        return logits.double()

    def train(self, mode: bool = True) -> FewShotSegmenter:
        """Set train/eval mode; a frozen backbone always stays in eval mode."""
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Trainable backbone parameters (empty when frozen)."""
        return [p for p in self.backbone.parameters() if p.requires_grad]

    def head_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters outside the backbone (projection, MPR, MPE, IFM, ...)."""
        return [p for n, p in self.named_parameters() if not n.startswith("backbone.") and p.requires_grad]

    # ------------------------------------------------------------------ contract
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone mid-level features.

        Args:
            images: ``(N, 3, H, W)`` float RGB in ``[0, 1]`` (the backbone applies its own
                normalisation).

        Returns:
            ``(N, Cb, h, w)``, ``h, w`` about ``H/8, W/8``. No autograd graph when frozen.

        Raises:
            ValueError: wrong rank/channels, non-float dtype, or values outside ``[0, 1]``
                (e.g. 0-255 images).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"encode expects images (N, 3, H, W), got shape {tuple(images.shape)}; "
                             "replicate gray images to 3 channels")
        if not images.is_floating_point():
            raise ValueError(f"encode expects float images in [0, 1], got dtype {images.dtype}; divide by 255")
        if images.numel() and (images.min() < -1e-3 or images.max() > 1 + 1e-3):
            raise ValueError(f"encode expects images in [0, 1], got range [{images.min().item():.3g}, "
                             f"{images.max().item():.3g}]; divide 0-255 images by 255")
        grad = torch.is_grad_enabled() and not self.freeze_backbone
        with torch.set_grad_enabled(grad):
            return self.backbone(images)

    def forward_features(self, support_feats: torch.Tensor, support_masks: torch.Tensor,
                         query_feats: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Logits from encoded features: ``(B,K,Cb,h,w)``, ``(B,K,1,H,W)``, ``(B,Cb,h,w)``, ``(H,W)`` -> ``(B,1,H,W)``."""
        raise NotImplementedError

    def forward(self, support_images: torch.Tensor, support_masks: torch.Tensor,
                query_images: torch.Tensor) -> torch.Tensor:
        """One batch of episodes end to end.

        Args:
            support_images: ``(B, K, 3, H, W)`` float in ``[0, 1]``.
            support_masks: ``(B, K, 1, H, W)`` float in ``{0, 1}`` (1 = defect).
            query_images: ``(B, 3, H, W)`` float in ``[0, 1]``.

        Returns:
            ``(B, 1, H, W)`` logits at the query's size (sigmoid > 0.5 = defect). Equal to
            ``forward_features(encode(support.flatten(0, 1)).unflatten(0, (B, K)),
            support_masks, encode(query), query.shape[-2:])``.
        """
        if support_images.dim() != 5:
            raise ValueError(f"support_images must be (B, K, 3, H, W), got {tuple(support_images.shape)}")
        if query_images.dim() != 4:
            raise ValueError(f"query_images must be (B, 3, H, W), got {tuple(query_images.shape)}")
        b, k = support_images.shape[:2]
        support = self.encode(support_images.flatten(0, 1)).unflatten(0, (b, k))
        query = self.encode(query_images)
        return self.forward_features(support, support_masks, query, tuple(query_images.shape[-2:]))

    # ------------------------------------------------------------------ validation helper
    def _check_features(self, support_feats: torch.Tensor, support_masks: torch.Tensor,
                        query_feats: torch.Tensor, out_size: tuple[int, int],
                        same_size: bool = True) -> tuple[int, int, torch.Tensor]:
        """Validate ``forward_features`` inputs; return ``(B, K, masks as float)``.

        Raises:
            ValueError: naming the argument whose shape does not fit the others.
        """
        cb = self.feature_channels
        if support_feats.dim() != 5 or support_feats.shape[2] != cb:
            raise ValueError(f"support_feats must be (B, K, {cb}, h, w) as returned by encode, "
                             f"got {tuple(support_feats.shape)}")
        b, k = support_feats.shape[:2]
        if query_feats.dim() != 4 or query_feats.shape[0] != b or query_feats.shape[1] != cb:
            raise ValueError(f"query_feats must be ({b}, {cb}, h, w), got {tuple(query_feats.shape)}")
        if same_size and query_feats.shape[-2:] != support_feats.shape[-2:]:
            raise ValueError(f"support and query feature maps differ in size: {tuple(support_feats.shape[-2:])} "
                             f"vs {tuple(query_feats.shape[-2:])}; resize support and query images alike")
        if support_masks.dim() != 5 or tuple(support_masks.shape[:3]) != (b, k, 1):
            raise ValueError(f"support_masks must be ({b}, {k}, 1, H, W), got {tuple(support_masks.shape)}")
        if len(tuple(out_size)) != 2 or min(int(s) for s in out_size) < 1:
            raise ValueError(f"out_size must be (H, W) with positive ints, got {out_size!r}")
        return b, k, support_masks.to(support_feats.dtype)
