"""Segmentation losses on logits: BCE (LERENet Eq. 6) and the mixed normal Dice loss of SOFS.

All functions take logits ``(B, 1, H, W)`` (any float dtype; computed in float32) and targets
of the same shape with values in ``[0, 1]`` (``1`` = defect), and return a scalar tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DICE_SMOOTH = 1e-5
"""Additive smoothing of the Dice ratio (SOFS code, ``1e-5``)."""

NORMAL_SCALE = 1e5
"""Scale of the predicted area in the normal-image term ``1 - 1 / (scale * sum p + 1)``."""


def _check(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    if logits.dim() < 2:
        raise ValueError(f"expected (B, ...) logits, got shape {tuple(logits.shape)}")


def mixed_normal_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mixed normal Dice loss (SOFS, Zhang et al., arXiv 2407.21351, Sec. 3.4).

    With ``p = sigmoid(logits)`` and ``g = target`` summed over each sample's pixels:

    - a sample whose target has defect pixels (``sum g > 0``) gets ordinary Dice,
      ``1 - (2 sum(p g) + s) / (sum p + sum g + s)`` with ``s = DICE_SMOOTH``;
    - a sample with an empty target (a normal image, or a query of another class) gets
      ``1 - 1 / (NORMAL_SCALE * sum p + 1)``: ``0`` when nothing is predicted, close to ``1``
      as soon as a fraction of one pixel is predicted, so every false alarm is punished.

    Args:
        logits: ``(B, 1, H, W)`` (or ``(B, ...)``) raw scores.
        target: same shape, in ``[0, 1]``.

    Returns:
        ``(B,)`` float32 loss per sample, each in ``[0, 1]``.

    Raises:
        ValueError: shapes differ or the input has no batch dimension.
    """
    _check(logits, target)
    p = torch.sigmoid(logits.float()).flatten(1)
    g = target.float().flatten(1)
    inter, sp, sg = (p * g).sum(1), p.sum(1), g.sum(1)
    dice = 1.0 - (2.0 * inter + DICE_SMOOTH) / (sp + sg + DICE_SMOOTH)
    normal = 1.0 - 1.0 / (NORMAL_SCALE * sp + 1.0)
    return torch.where(sg > 0, dice, normal)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce",
                      bce_weight: float = 0.01) -> torch.Tensor:
    """The training loss selected by ``train.loss`` in params.

    Args:
        logits: ``(B, 1, H, W)`` raw scores.
        target: same shape, in ``[0, 1]``.
        kind: ``"bce"`` (LERENet Eq. 6: mean binary cross-entropy over pixels) or
            ``"dice"`` (mean of ``mixed_normal_dice`` over the batch ``+ bce_weight * BCE``;
            SOFS uses ``bce_weight = 0.01``).
        bce_weight: weight of the BCE term for ``"dice"``, ``>= 0``.

    Returns:
        Scalar float32 loss.

    Raises:
        ValueError: unknown ``kind``, negative ``bce_weight`` or mismatched shapes.
    """
    _check(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    if kind == "bce":
        return bce
    if kind != "dice":
        raise ValueError(f"unknown loss {kind!r}; valid: bce, dice")
    if bce_weight < 0:
        raise ValueError(f"bce_weight must be >= 0, got {bce_weight}")
    return mixed_normal_dice(logits, target).mean() + bce_weight * bce
