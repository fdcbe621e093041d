"""The mixed normal Dice loss (SOFS) and the loss switch, with values checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.losses import DICE_SMOOTH, mixed_normal_dice, segmentation_loss


def logits_of(p: torch.Tensor) -> torch.Tensor:
    """Logits whose sigmoid is ``p`` (0 < p < 1)."""
    return torch.log(p) - torch.log1p(-p)


def test_dice_on_non_empty_target_matches_hand_value():
    # 4 pixels: p = 0.5 everywhere, g = [1, 1, 0, 0] -> sum pg = 1, sum p = 2, sum g = 2
    p = torch.full((1, 1, 2, 2), 0.5)
    g = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    expected = 1 - (2 * 1 + DICE_SMOOTH) / (2 + 2 + DICE_SMOOTH)
    assert mixed_normal_dice(logits_of(p), g).item() == pytest.approx(expected, rel=1e-6)


def test_empty_target_punishes_any_predicted_area():
    g = torch.zeros(1, 1, 2, 2)
    # sum p = 4e-5 -> 1 - 1 / (1e5 * 4e-5 + 1) = 1 - 1/5 = 0.8
    p = torch.full((1, 1, 2, 2), 1e-5)
    assert mixed_normal_dice(logits_of(p), g).item() == pytest.approx(0.8, rel=1e-3)
    # nothing predicted -> ~0
    assert mixed_normal_dice(torch.full((1, 1, 2, 2), -40.0), g).item() < 1e-6


def test_per_sample_mix_and_switch():
    g = torch.zeros(2, 1, 2, 2)
    g[0, 0, 0, 0] = 1.0
    logits = torch.zeros(2, 1, 2, 2)                       # p = 0.5
    per = mixed_normal_dice(logits, g)
    dice0 = 1 - (2 * 0.5 + DICE_SMOOTH) / (2 + 1 + DICE_SMOOTH)
    normal1 = 1 - 1 / (1e5 * 2 + 1)
    assert per.tolist() == pytest.approx([dice0, normal1], rel=1e-6)
    bce = F.binary_cross_entropy_with_logits(logits, g).item()
    assert bce == pytest.approx(math.log(2), rel=1e-6)
    total = segmentation_loss(logits, g, "dice", bce_weight=0.01).item()
    assert total == pytest.approx((dice0 + normal1) / 2 + 0.01 * bce, rel=1e-6)
    assert segmentation_loss(logits, g, "bce").item() == pytest.approx(bce, rel=1e-6)


def test_gradient_flows_and_errors():
    logits = torch.zeros(1, 1, 3, 3, requires_grad=True)
    segmentation_loss(logits, torch.zeros(1, 1, 3, 3), "dice").backward()
    assert logits.grad is not None and (logits.grad > 0).all()   # raising any score raises the loss
    with pytest.raises(ValueError, match="unknown loss"):
        segmentation_loss(logits, torch.zeros(1, 1, 3, 3), "focal")
    with pytest.raises(ValueError, match="differ in shape"):
        mixed_normal_dice(logits, torch.zeros(1, 1, 3, 4))
