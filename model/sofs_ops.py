"""SOFS operations without learnable parameters (Zhang et al., arXiv 2407.21351, Sec. 3):
prototype intensity downsampling of the support masks, the semantic and abnormal priors,
and the mask-weighted query-support fusion.

Shapes: ``B`` episodes, ``K`` shots, ``C`` channels, query grid ``h x w`` (``Lq = h*w``),
support grid ``hs x ws`` (``Ls = hs*ws``); support and query grids may differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def _overlap_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(n_out, n_in)``: share of output cell ``i``'s extent covered by input pixel ``y``.

    Output cell ``i`` spans ``[i r, (i + 1) r)`` in pixel units, ``r = n_in / n_out``; entry
    ``(i, y)`` = length of ``[y, y + 1) ∩ [i r, (i + 1) r)`` divided by ``r``. Rows sum to 1.
    """
    r = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64, device=device)[:, None] * r
    y = torch.arange(n_in, dtype=torch.float64, device=device)[None, :]
    overlap = (torch.minimum(y + 1, lo + r) - torch.maximum(y, lo)).clamp_min(0.0)
    return (overlap / r).to(dtype)


def area_fraction(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Prototype intensity downsampling (SOFS Sec. 3.2): defect area fraction per feature cell.

    Each of the ``h x w`` cells covers ``H/h x W/w`` pixels of the mask; its value is the
    mean of the mask over that rectangle, fractional pixels counted by their covered area.
    For integer ratios this is exactly SOFS's ``conv_down_sample_vit`` (convolution with a
    ones kernel of the patch size, stride = patch size, divided by the patch area), i.e.
    ``F.avg_pool2d(mask, H // h)``. For non-integer ratios it stays the exact area fraction
    (``F.adaptive_avg_pool2d`` would count boundary pixels whole in two cells), so the total
    defect area is preserved: ``area_fraction(m).sum() * (H*W)/(h*w) == m.sum()``. A defect
    smaller than a cell keeps a weak but correct intensity instead of vanishing (nearest) or
    being sampled (bilinear).

    Args:
        mask: ``(N, 1, H, W)`` float in ``[0, 1]`` (1 = defect) at image resolution.
        size: ``(h, w)`` of the feature grid, positive ints.

    Returns:
        ``(N, 1, h, w)`` in ``[0, 1]``, same dtype as ``mask``.

    Raises:
        ValueError: ``mask`` not 4-D or ``size`` not two positive ints.
    """
    if mask.dim() != 4:
        raise ValueError(f"area_fraction expects a mask (N, 1, H, W), got shape {tuple(mask.shape)}")
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be two positive ints, got {size!r}")
    big_h, big_w = mask.shape[-2:]
    if (big_h, big_w) == (h, w):
        return mask
    if big_h % h == 0 and big_w % w == 0:
        kh, kw = big_h // h, big_w // w
        return F.avg_pool2d(mask, kernel_size=(kh, kw), stride=(kh, kw))
    a_h = _overlap_matrix(big_h, h, mask.dtype, mask.device)
    a_w = _overlap_matrix(big_w, w, mask.dtype, mask.device)
    return torch.einsum("iy,ncyx,jx->ncij", a_h, mask, a_w)


def feature_target(mask: torch.Tensor, size: tuple[int, int], threshold: float = 0.1) -> torch.Tensor:
    """Binary training target at feature resolution: cells whose defect area fraction > ``threshold``.

    The target of SOFS's feature-resolution loss (cells with more than 10 % defect count as
    defect). ``(N, 1, H, W)`` in ``[0, 1]`` -> ``(N, 1, h, w)`` float ``{0, 1}``.

    Raises:
        ValueError: ``threshold`` outside ``[0, 1)`` (or as ``area_fraction``).
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    return (area_fraction(mask, size) > threshold).to(mask.dtype)


def _cosine_table(query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """``(B, K, Ls, Lq)`` cosine similarity of every support descriptor with every query descriptor."""
    q = F.normalize(query.flatten(2), dim=1, eps=EPS)                       # (B, C, Lq)
    s = F.normalize(support.flatten(3), dim=2, eps=EPS)                     # (B, K, C, Ls)
    return torch.einsum("bkcl,bcq->bklq", s, q)


def shot_mean(values: torch.Tensor, has_defect: torch.Tensor) -> torch.Tensor:
    """Mean over the shots whose mask is not empty.

    Args:
        values: ``(B, K, ...)`` per-shot values.
        has_defect: ``(B, K)`` bool, the shot's downsampled mask has a positive sum.

    Returns:
        ``(B, ...)``; equal to ``values.mean(1)`` when every shot has a defect, zeros for an
        episode without any.
    """
    w = has_defect.to(values.dtype).view(*has_defect.shape, *([1] * (values.dim() - 2)))
    return (values * w).sum(1) / w.sum(1).clamp_min(1.0)


def sofs_priors(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Semantic and abnormal priors of one feature level (SOFS Sec. 3.2).

    With ``cos`` the cosine similarity, ``q_i`` a query descriptor, ``s_{k,j}`` support
    descriptor ``j`` of shot ``k`` and ``m_{k,j}`` its defect area fraction:

    * semantic prior ``P_sem(i) = mean_k max_j cos(q_i, s_{k,j} * m_{k,j})``: no threshold,
      no min-max normalisation. Since the cosine does not depend on the scale of a vector,
      this is ``cos(q_i, s_{k,j})`` on cells with ``m > 0`` and ``0`` on cells with ``m = 0``
      (the zero vector), which is how it is computed. The mean runs over the shots with a
      non-empty mask (all shots in ordinary episodes); 0 for an episode without any.
    * abnormal prior ``P_abn(i) = 1 - max_{k,j} cos(q_i, s_{k,j}) * (1 - m_{k,j})``: how
      unlike the support's normal background the query descriptor is (max over all shots).

    Args:
        query: ``(B, C, h, w)``.
        support: ``(B, K, C, hs, ws)``.
        masks: ``(B, K, 1, hs, ws)`` area fractions in ``[0, 1]`` (``area_fraction``).

    Returns:
        ``(semantic, abnormal)``, each ``(B, 1, h, w)``; semantic in ``[-1, 1]``, abnormal
        in ``[0, 2]`` (``1`` where every support cell is a full defect).
    """
    b, _, h, w = query.shape
    cos = _cosine_table(query, support)                                      # (B, K, Ls, Lq)
    m = masks.flatten(2)[..., None]                                          # (B, K, Ls, 1)
    sem = torch.where(m > 0, cos, torch.zeros_like(cos)).amax(dim=2)         # (B, K, Lq)
    semantic = shot_mean(sem, m.flatten(2).sum(-1) > 0)                      # (B, Lq)
    abnormal = 1.0 - (cos * (1.0 - m)).flatten(1, 2).amax(dim=1)            # (B, Lq)
    return semantic.view(b, 1, h, w), abnormal.view(b, 1, h, w)


def level_priors(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor,
                 levels: tuple[int, ...]) -> torch.Tensor:
    """Priors of every backbone level: ``(B, 2 * len(levels), h, w)``.

    The ``Cb`` channels of ``encode``'s output are split into the backbone's stages
    (``Backbone.level_channels``, e.g. 40 + 112 for EfficientNet-Lite0) and ``sofs_priors``
    is computed per stage; channel order ``[sem_1, abn_1, sem_2, abn_2, ...]``.

    Args:
        query: ``(B, Cb, h, w)``. support: ``(B, K, Cb, hs, ws)``.
        masks: ``(B, K, 1, hs, ws)`` area fractions. levels: channels per stage, summing to ``Cb``.

    Raises:
        ValueError: ``levels`` do not sum to the channel count.
    """
    if sum(levels) != query.shape[1]:
        raise ValueError(f"levels {levels} do not sum to the {query.shape[1]} feature channels")
    out = []
    for q, s in zip(query.split(list(levels), dim=1), support.split(list(levels), dim=2)):
        out.extend(sofs_priors(q, s, masks))
    return torch.cat(out, dim=1)


def mask_fusion(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor,
                temperature: float = 0.1) -> torch.Tensor:
    """Non-learnable query-support fusion after the transformer layers (SOFS Sec. 3.3).

    ``A = softmax_j(cos(q_i, s_j) / temperature)`` over all ``K * Ls`` support tokens, then
    ``q_i <- q_i + sum_j A_ij m_j s_j``: a query token receives the support features of the
    defect cells it resembles, weighted by their area fraction; a token that resembles
    the support background gets (almost) nothing added.

    Args:
        query: ``(B, Lq, D)`` tokens.
        support: ``(B, K, Ls, D)`` tokens.
        masks: ``(B, K, Ls)`` area fractions in ``[0, 1]``.
        temperature: softmax temperature (SOFS: 0.1), > 0.

    Returns:
        ``(B, Lq, D)``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    s = support.flatten(1, 2)                                                # (B, K*Ls, D)
    fused = F.scaled_dot_product_attention(F.normalize(query, dim=-1, eps=EPS), F.normalize(s, dim=-1, eps=EPS),
                                           s * masks.flatten(1)[..., None], scale=1.0 / temperature)
    return query + fused
