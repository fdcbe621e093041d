"""Class-agnostic guidance computed on the *frozen* backbone features (no learnable parameters).

LERENet's own prior ``D_cos`` is computed on the learned projection, which drifts towards the
base classes during episodic training; PFENet (Tian et al., TPAMI 2020) computes its prior on
frozen features, which is why it generalises to novel classes. These maps follow that rule and
the SOFS priors (Zhang et al., arXiv 2407.21351, Sec. 3.2), per backbone level:

* ``fg``: foreground prior, each query descriptor's max cosine to the support's *defect*
  descriptors (all K shots), in ``[-1, 1]``;
* ``abnormal``: SOFS abnormal prior, ``1 -`` max cosine to the support's *background*
  descriptors, in ``[0, 2]``;
* ``nn``: nearest-neighbour map, ``fg - (1 - abnormal)`` = max cosine to defect minus max
  cosine to background, in ``[-2, 2]``; ``> 0`` where the query descriptor is closer to a
  support defect descriptor than to any support background descriptor (a 1-nearest-neighbour
  classifier over the support's local descriptors).

Shapes: ``B`` episodes, ``K`` shots, ``Cb`` frozen channels (the backbone's levels
concatenated, ``Backbone.level_channels``), ``h x w`` grid. A support cell is *defect* when its
defect area fraction is at least ``FG_SHARE`` of the episode's largest fraction (so a defect
smaller than a cell still has defect cells) and *background* when it holds no defect pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PRIOR_KINDS = ("fg", "abnormal", "nn")
FG_SHARE = 0.5
_NONE = -2.0  # below any cosine: "no such support cell"


def _max_cosines(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fg_max, bg_max)``, each ``(B, Lq)``: max cosine of each query descriptor to the support's
    defect cells and to its background cells (``_NONE`` where the support has no such cell)."""
    q = F.normalize(query.float().flatten(2), dim=1)                          # (B, C, Lq)
    s = F.normalize(support.float().transpose(1, 2).flatten(2), dim=1)        # (B, C, K*Ls)
    m = masks.float().transpose(1, 2).flatten(2)                              # (B, 1, K*Ls)
    peak = m.amax(dim=2, keepdim=True)
    fg = (m >= FG_SHARE * peak) & (peak > 0)
    bg = m <= 0
    sim = s.transpose(1, 2) @ q                                               # (B, K*Ls, Lq)
    none = sim.new_tensor(_NONE)
    fg_max = torch.where(fg.transpose(1, 2), sim, none).amax(dim=1)
    bg_max = torch.where(bg.transpose(1, 2), sim, none).amax(dim=1)
    return fg_max, bg_max


def frozen_priors(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor,
                  levels: tuple[int, ...], kinds: tuple[str, ...]) -> torch.Tensor:
    """The requested priors at every backbone level.

    Args:
        query: ``(B, Cb, h, w)`` frozen query features.
        support: ``(B, K, Cb, h, w)`` frozen support features.
        masks: ``(B, K, 1, h, w)`` defect area fraction per support cell, ``[0, 1]``.
        levels: channels per backbone level, summing to ``Cb`` (``Backbone.level_channels``).
        kinds: a non-empty subset of :data:`PRIOR_KINDS`, in the order wanted.

    Returns:
        ``(B, len(kinds) * len(levels), h, w)`` float32, channel order level-major
        (``[k_1@level_1, k_2@level_1, ..., k_1@level_2, ...]``). An episode without defect cells
        gets ``fg = -2`` (nothing is like its defect); without background cells ``abnormal = 3``.

    Raises:
        ValueError: unknown kind, empty ``kinds``, or ``levels`` not summing to ``Cb``.
    """
    check_kinds(kinds)
    if sum(levels) != query.shape[1]:
        raise ValueError(f"levels {levels} do not sum to the {query.shape[1]} feature channels")
    b, _, h, w = query.shape
    out = []
    for q, s in zip(query.split(list(levels), dim=1), support.split(list(levels), dim=2)):
        fg_max, bg_max = _max_cosines(q, s, masks)
        maps = {"fg": fg_max, "abnormal": 1.0 - bg_max, "nn": fg_max - bg_max}
        out.extend(maps[k].view(b, 1, h, w) for k in kinds)
    return torch.cat(out, dim=1)


def nearest_neighbour_score(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor,
                            levels: tuple[int, ...]) -> torch.Tensor:
    """``(B, 1, h, w)``: the ``nn`` map averaged over the backbone levels, in ``[-2, 2]``.

    ``> 0`` = defect by the nearest-support-descriptor rule; the training-free classifier that
    LERENet's ``prior_skip`` starts from. Arguments as :func:`frozen_priors`.
    """
    return frozen_priors(query, support, masks, levels, ("nn",)).mean(dim=1, keepdim=True)


def check_kinds(kinds: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``kinds`` is a non-empty subset of :data:`PRIOR_KINDS` without repeats."""
    bad = [k for k in kinds if k not in PRIOR_KINDS]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"priors must be distinct names among {', '.join(PRIOR_KINDS)}; got {list(kinds)}")
