"""The mixed normal Dice loss (SOFS) and the loss switch, with values checked by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.losses import (
    DICE_SMOOTH,
    SSIM_C1,
    SSIM_C2,
    deep_supervision_loss,
    gaussian_window,
    hybrid_loss,
    iou_loss,
    mixed_normal_dice,
    segmentation_loss,
    ssim_loss,
    ssim_map,
)


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


# ----------------------------------------------------------------------------- JAFFNet hybrid loss
def test_ssim_of_identical_maps_is_one():
    x = torch.rand(2, 1, 17, 23, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ssim_map(x, x), torch.ones_like(x))
    assert ssim_loss(logits_of(x.clamp(0.01, 0.99)), x.clamp(0.01, 0.99)).abs().max().item() < 1e-5


def test_ssim_of_constant_maps_matches_the_luminance_term():
    # away from the zero-padded border: variances 0, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    x, y = torch.full((1, 1, 21, 21), 0.2), torch.full((1, 1, 21, 21), 0.6)
    expected = (2 * 0.2 * 0.6 + 0.01 ** 2) / (0.2 ** 2 + 0.6 ** 2 + 0.01 ** 2)
    # float32 variances: E[y^2] - E[y]^2 cancels to ~1e-7 against C2 = 9e-4 (rounding of the two 1-D passes)
    assert ssim_map(x, y)[0, 0, 10, 10].item() == pytest.approx(expected, rel=3e-4)
    assert (SSIM_C1, SSIM_C2) == (0.01 ** 2, 0.03 ** 2)


def test_ssim_centre_pixel_matches_a_numpy_computation():
    """11x11 maps: the centre window covers the whole map (no padding): Gaussian-weighted stats by hand."""
    import numpy as np

    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, 1, 11, 11, generator=g), torch.rand(1, 1, 11, 11, generator=g)
    t = np.arange(11) - 5
    w1 = np.exp(-t ** 2 / (2 * 1.5 ** 2))
    w = np.outer(w1, w1) / np.outer(w1, w1).sum()
    np.testing.assert_allclose(gaussian_window().numpy(), w, rtol=1e-6)
    a, b = x[0, 0].double().numpy(), y[0, 0].double().numpy()
    mx, my = (w * a).sum(), (w * b).sum()
    vx, vy, cxy = (w * a * a).sum() - mx ** 2, (w * b * b).sum() - my ** 2, (w * a * b).sum() - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    expected = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    assert ssim_map(x, y)[0, 0, 5, 5].item() == pytest.approx(expected, rel=1e-4)


def test_separable_ssim_equals_the_two_dimensional_window_everywhere():
    """The row + column passes give the 11x11 window's SSIM at every pixel, borders (zero padding) included,
    and the same gradient."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 2, 37, 29, generator=g, requires_grad=True)
    y = (torch.rand(3, 2, 37, 29, generator=g) > 0.6).float()
    w = gaussian_window().expand(2, 1, 11, 11)
    blur = lambda t: F.conv2d(t, w, padding=5, groups=2)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    ref = (2 * mx * my + 0.01 ** 2) * (2 * cxy + 0.03 ** 2) / ((mx ** 2 + my ** 2 + 0.01 ** 2) * (vx + vy + 0.03 ** 2))
    got = ssim_map(x, y)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    (ga,) = torch.autograd.grad(got.sum(), x)
    (gb,) = torch.autograd.grad(ref.sum(), x)
    torch.testing.assert_close(ga, gb, atol=1e-4, rtol=1e-3)


def test_iou_loss_hand_values():
    # p = 0.5 everywhere, g = [1, 1, 0, 0]: sum pg = 1, sum(p + g - pg) = 3
    g = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    assert iou_loss(torch.zeros(1, 1, 2, 2), g).item() == pytest.approx(1 - 1 / 3, rel=1e-6)
    perfect = torch.where(g > 0, torch.tensor(30.0), torch.tensor(-30.0))
    assert iou_loss(perfect, g).item() < 1e-6
    assert iou_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)).item() == pytest.approx(1.0)


def test_hybrid_loss_is_the_sum_of_its_three_terms_and_zero_when_perfect():
    g = torch.zeros(2, 1, 16, 16)
    g[0, :, 4:10, 3:12] = 1.0
    logits = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    bce = F.binary_cross_entropy_with_logits(logits, g)
    total = hybrid_loss(logits, g)
    expected = bce + iou_loss(logits, g).mean() + (1 - ssim_map(torch.sigmoid(logits), g).mean((1, 2, 3))).mean()
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)
    # batch of one with p = 0.5 on 2x2, g = [1, 1, 0, 0]: log 2 + 2/3 + (1 - SSIM)
    g1 = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    ssim_term = 1 - ssim_map(torch.full_like(g1, 0.5), g1).mean().item()
    assert hybrid_loss(torch.zeros_like(g1), g1).item() == pytest.approx(math.log(2) + 2 / 3 + ssim_term, rel=1e-6)
    perfect = torch.where(g[:1] > 0, torch.tensor(30.0), torch.tensor(-30.0))
    assert hybrid_loss(perfect, g[:1]).item() < 1e-4


def test_deep_supervision_sums_the_sides_and_errors():
    g = torch.zeros(1, 1, 12, 12)
    g[..., 3:8, 2:9] = 1.0
    gen = torch.Generator().manual_seed(3)
    sides = [torch.randn(1, 1, 12, 12, generator=gen, requires_grad=True) for _ in range(3)]
    total = deep_supervision_loss(sides, g)
    assert total.item() == pytest.approx(sum(hybrid_loss(s, g).item() for s in sides), rel=1e-6)
    total.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in sides)
    with pytest.raises(ValueError, match="at least one"):
        deep_supervision_loss([], g)
    with pytest.raises(ValueError, match="differ in shape"):
        hybrid_loss(torch.zeros(1, 1, 12, 11), g)
    with pytest.raises(ValueError, match="odd"):
        gaussian_window(10)
