"""Segmentation losses on logits: BCE (LERENet Eq. 6), the mixed normal Dice loss of SOFS and
JAFFNet's hybrid loss (BCE + IoU + SSIM) with deep supervision.

All functions take logits ``(B, 1, H, W)`` (any float dtype; computed in float32) and targets
of the same shape with values in ``[0, 1]`` (``1`` = defect); the per-sample ones return
``(B,)``, the others a scalar tensor.
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


# ----------------------------------------------------------------------------- JAFFNet hybrid loss
SSIM_WINDOW = 11
"""Side of the Gaussian SSIM window (Wang et al. 2004: 11 x 11, sigma 1.5)."""

SSIM_SIGMA = 1.5
SSIM_C1 = 0.01 ** 2
"""SSIM stabilisers ``(K1 L)^2``, ``(K2 L)^2`` with ``K1 = 0.01``, ``K2 = 0.03`` and dynamic range ``L = 1``."""
SSIM_C2 = 0.03 ** 2


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    """``(size,)`` float64 Gaussian weights summing to 1; raises ``ValueError`` unless ``size`` is a positive odd int."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"SSIM window size must be a positive odd int, got {size}")
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return (g / g.sum()).float()


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """``(size, size)`` float32 Gaussian weights summing to 1 (outer product of a 1-D Gaussian)."""
    g = _gaussian_1d(size, sigma).double()
    return (g[:, None] * g[None, :]).float()


def ssim_map(x: torch.Tensor, y: torch.Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Local structural similarity (Wang et al., IEEE TIP 2004, Eq. 13) of two maps in ``[0, 1]``.

    ``SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2))``
    with Gaussian-weighted local means, variances and covariance (``window x window``,
    ``sigma``), ``C1 = 0.01^2``, ``C2 = 0.03^2``. Zero padding of ``window // 2`` keeps the
    size (as BASNet's SSIM loss, which JAFFNet's hybrid loss follows).

    Args:
        x, y: ``(B, 1, H, W)`` (or ``(B, C, H, W)``, channels treated separately).

    Returns:
        ``(B, C, H, W)`` float32 SSIM values in ``[-1, 1]``; all ones when ``x == y``.

    Raises:
        ValueError: shapes differ or the input is not 4-D.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim_map expects two (B, C, H, W) maps of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    with torch.autocast(device_type=x.device.type, enabled=False):  # variances need float32
        return _ssim_float32(x.float(), y.float(), window, sigma)


def _ssim_float32(x: torch.Tensor, y: torch.Tensor, window: int, sigma: float) -> torch.Tensor:
    """``ssim_map`` body on float32 ``(B, C, H, W)`` maps, autocast off.

    The five Gaussian blurs (of ``x``, ``y``, ``x^2``, ``y^2``, ``xy``) run as one grouped convolution, and the
    ``window x window`` Gaussian as its two 1-D factors (a row pass, then a column pass): the same weights
    as :func:`gaussian_window` (an outer product), ``2 window`` instead of ``window^2`` multiply-adds per
    pixel, 7-8x faster forward + backward on CPU at 200 x 200, equal to float32 rounding (tested)."""
    c = x.shape[1]
    g = _gaussian_1d(window, sigma).to(x.device)
    pad = window // 2
    t = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    n = t.shape[1]
    t = F.conv2d(t, g.view(1, 1, 1, window).expand(n, 1, 1, window), padding=(0, pad), groups=n)
    t = F.conv2d(t, g.view(1, 1, window, 1).expand(n, 1, window, 1), padding=(pad, 0), groups=n)
    mu_x, mu_y, xx, yy, xy = t.split(c, dim=1)
    var_x = xx - mu_x ** 2
    var_y = yy - mu_y ** 2
    cov = xy - mu_x * mu_y
    num = (2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
    den = (mu_x ** 2 + mu_y ** 2 + SSIM_C1) * (var_x + var_y + SSIM_C2)
    return num / den


def ssim_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample ``1 - mean SSIM(sigmoid(logits), target)``: ``(B, 1, H, W)`` -> ``(B,)`` float32 in ``[0, 2]``."""
    _check(logits, target)
    return 1.0 - ssim_map(torch.sigmoid(logits.float()), target.float()).flatten(1).mean(1)


def iou_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample soft IoU loss (BASNet, Qin et al. 2019): ``1 - sum(p g) / sum(p + g - p g)``.

    ``p = sigmoid(logits)``; ``(B, 1, H, W)`` -> ``(B,)`` float32 in ``[0, 1]``. An empty
    target gives the constant 1 (intersection 0; no gradient), so on defect-free images
    only the BCE and SSIM terms of ``hybrid_loss`` act.
    """
    _check(logits, target)
    p = torch.sigmoid(logits.float()).flatten(1)
    g = target.float().flatten(1)
    inter = (p * g).sum(1)
    union = (p + g - p * g).sum(1)
    return 1.0 - inter / union.clamp_min(1e-8)


def hybrid_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """JAFFNet's hybrid loss (arXiv 2402.02797, Sec. III-D, after BASNet): BCE + IoU + SSIM.

    ``L = BCE(p, g) + (1 - IoU(p, g)) + (1 - SSIM(p, g))``, each term averaged over the batch
    (BCE over pixels), equal weights. BCE is pixel-level, SSIM patch-level (11x11 Gaussian
    window), IoU map-level.

    Args:
        logits: ``(B, 1, H, W)`` raw scores. target: same shape, in ``[0, 1]``.

    Returns:
        Scalar float32 loss.
    """
    _check(logits, target)
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return bce + iou_loss(logits, target).mean() + ssim_loss(logits, target).mean()


def deep_supervision_loss(side_logits: list[torch.Tensor] | tuple[torch.Tensor, ...],
                          target: torch.Tensor) -> torch.Tensor:
    """Sum of ``hybrid_loss`` over every side output (JAFFNet's deep supervision, equal weights).

    Args:
        side_logits: ``(B, 1, H, W)`` logits per decoder stage at the target's size
            (``JAFFNet.side_logits``).
        target: ``(B, 1, H, W)`` in ``[0, 1]``.

    Raises:
        ValueError: no side outputs, or a side whose shape differs from the target's.
    """
    if not side_logits:
        raise ValueError("deep_supervision_loss needs at least one side output")
    return torch.stack([hybrid_loss(s, target) for s in side_logits]).sum()
