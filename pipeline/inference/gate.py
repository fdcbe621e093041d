"""Image-level presence gate: a query whose presence score is below the model's threshold gets an empty mask.

The presence score of a query is its maximum logit on the feature grid (the max-score image-level
decision of inspection systems). The threshold ``tau`` is calibrated at training on the selection
classes (:mod:`pipeline.training.gate`) and stored in the model file (``meta["presence_threshold"]``);
:meth:`pipeline.inference.predictor.Predictor.head` applies it, so evaluation, ``lerenet predict``
and the served model take the same decision.

Two thresholds by support size (``train.presence_small_area``, :class:`PresenceGate`): an episode whose
support defects are small (mean defect share of the K support masks in ``(0, small_area]``; SOFS's
small-defect bound is 0.01) gets its own ``tau``. On defect-free images the max logit depends on the
support far more than on the query: with a small support a defect-free tile scores about -5, with a
large low-contrast one (MT_Uneven) about +10, as high as a defect (docs/experiments.md, eighth session).
One threshold set by the false-alarm target of the large supports gated off most small defects.

Reference images (``train.presence_references``, :meth:`PresenceGate.gate`): when an episode comes with R
defect-free images of the query's surface, its presence score is relative to them: the query's max log-odds
minus the highest max log-odds of the references *under the same support* (``net.presence_log_odds``;
:meth:`pipeline.inference.predictor.Predictor.reference_levels`), compared with its own threshold
``reference_threshold``. The support-dependent level of "how a good part scores" cancels out. Episodes without
references keep the max-logit gate above.

Area of the reference score (``train.presence_reference_area`` = c, :func:`presence_peak`): with c > 0 the query's
and the references' "max" is the k-th highest grid logit, k = ``ceil(c x support share x grid cells)``, i.e. the
level that a region of c times the support's defect area exceeds. Small supports keep (nearly) the max; a large
low-contrast support (MT_Uneven) asks for a large region, which one bright spot on a good tile does not give.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

#: Logit given to every pixel of a gated-off query: just below the decision boundary (sigmoid 0.49975),
#: so masks are empty and probability maps show "not sure" rather than a confident zero.
ABSENT_LOGIT = -1e-3


def apply_gate(logits: torch.Tensor, threshold: float | torch.Tensor | None,
               scores: torch.Tensor | None = None) -> torch.Tensor:
    """Empty the queries whose presence score is below ``threshold``.

    Args:
        logits: ``(B, 1, h, w)`` logits on the feature grid.
        threshold: ``tau`` in logit units, a ``(B,)`` tensor of one ``tau`` per query (``-inf``: that query
            is not gated), or ``None`` (no gate: ``logits`` returned as is).
        scores: ``(B,)`` presence scores in the units of ``threshold``; ``None``: each query's max logit.

    Returns:
        ``(B, 1, h, w)``: unchanged for queries with ``score >= tau``, else clamped to at most
        :data:`ABSENT_LOGIT` (no pixel > 0).
    """
    if threshold is None:
        return logits
    if isinstance(threshold, torch.Tensor):
        threshold = threshold.to(device=logits.device, dtype=torch.float64)
    if scores is None:
        scores = logits.amax(dim=(1, 2, 3))
    off = scores.to(logits.device).double() < threshold  # float64: a tau one ulp above a float32 score gates it
    if not bool(off.any()):
        return logits
    return torch.where(off.view(-1, 1, 1, 1), logits.clamp(max=ABSENT_LOGIT), logits)


def presence_peak(logits: torch.Tensor, shares: torch.Tensor, area: float = 0.0) -> torch.Tensor:
    """The presence statistic of each query: its k-th highest logit, ``k = max(1, ceil(area * share * h * w))``.

    Args:
        logits: ``(B, 1, h, w)`` logits (any grid: the feature grid or a stitched native-resolution map).
        shares: ``(B,)`` support size of each episode (:func:`support_shares`), in ``[0, 1]``.
        area: c >= 0, the region asked for as a multiple of the support's defect share; 0: the max logit.

    Returns:
        ``(B,)`` in the dtype of ``logits``. Quantiles commute with monotone maps, so
        ``net.presence_log_odds(presence_peak(y))`` is the same statistic of the log-odds.

    Raises:
        ValueError: ``area < 0``.
    """
    if area < 0:
        raise ValueError(f"presence area must be >= 0, got {area}")
    flat = logits.flatten(1)
    if area == 0:
        return flat.amax(dim=1)
    cells = flat.shape[1]
    k = torch.ceil(area * shares.to(torch.float64).cpu() * cells).clamp(1, cells).long()
    top = torch.topk(flat, int(k.max()), dim=1).values
    return top.gather(1, (k - 1).to(top.device).view(-1, 1)).squeeze(1)


def support_shares(support_masks: torch.Tensor) -> torch.Tensor:
    """The gate's support size of each episode: ``(B, K, 1, S, S)`` masks in ``{0, 1}`` -> ``(B,)`` mean over the K
    shots of each mask's defect share, in ``[0, 1]``."""
    return support_masks.float().mean(dim=(2, 3, 4)).mean(dim=1)


@torch.inference_mode()
def reference_levels(net: torch.nn.Module, support_feats: torch.Tensor, support_masks: torch.Tensor,
                     reference_feats: torch.Tensor, area: float = 0.0,
                     shares: torch.Tensor | None = None) -> torch.Tensor:
    """The reference level of each episode: the highest max log-odds (``net.presence_log_odds`` of the max grid
    logit, ungated; with ``area`` > 0 of :func:`presence_peak` instead of the max) of the R reference images, each
    segmented as a query under the episode's support.

    Args:
        net: a ``model.FewShotSegmenter``.
        support_feats: ``(B, K, Cb, h, w)``. support_masks: ``(B, K, 1, S, S)`` float {0, 1}.
        reference_feats: ``(R, Cb, h, w)`` backbone features of defect-free images of the queries' surface.
        shares: ``(B,)`` support size for :func:`presence_peak` (the one the gate gives the queries); ``None``:
            :func:`support_shares` of ``support_masks``.

    Returns:
        ``(B,)`` float64 on the CPU.
    """
    b = support_feats.shape[0]
    shares = support_shares(support_masks) if shares is None else shares
    best = torch.full((b,), float("-inf"), dtype=torch.float64)
    for r in range(reference_feats.shape[0]):
        ref = reference_feats[r:r + 1].expand(b, *reference_feats.shape[1:]).to(support_feats.device)
        logits = net.forward_features(support_feats, support_masks, ref, tuple(ref.shape[-2:])).float()
        best = torch.maximum(best, net.presence_log_odds(presence_peak(logits, shares, area)).cpu())
    return best


@dataclass(frozen=True)
class PresenceGate:
    """The presence gate of a model file (``meta`` keys written by :func:`pipeline.training.gate.presence_gate`).

    Attributes:
        threshold: ``tau`` (logit units) of every episode, or of the episodes whose support is not small when
            ``small_area`` is set; ``None``: those episodes are not gated.
        small_threshold: ``tau`` of the episodes whose support is small; ``None``: not gated.
        small_area: the small-support bound on the mean support defect share, in ``(0, 1]``; ``None``: one
            threshold for every episode (model files written before the split).
        reference_threshold: ``tau`` of the reference score (log-odds units, :meth:`gate`) of the episodes that
            come with reference images; ``None``: no reference score.
        references: R, the number of reference images the threshold was calibrated with (0: none).
        reference_area: c of :func:`presence_peak` for the reference score (0: the max logit).
    """

    threshold: float | None
    small_threshold: float | None = None
    small_area: float | None = None
    reference_threshold: float | None = None
    references: int = 0
    reference_area: float = 0.0

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> PresenceGate:
        """The gate stored in a model file's ``meta`` (keys ``presence_threshold``, ``presence_threshold_small``,
        ``presence_small_area``, ``presence_threshold_ref``, ``presence_references``, ``presence_reference_area``;
        absent keys: ungated / one threshold / no reference score / the max)."""
        def num(key: str) -> float | None:
            v = meta.get(key)
            return None if v is None else float(v)
        return cls(num("presence_threshold"), num("presence_threshold_small"), num("presence_small_area"),
                   num("presence_threshold_ref"), int(meta.get("presence_references") or 0),
                   float(meta.get("presence_reference_area") or 0.0))

    @property
    def uses_references(self) -> bool:
        """Whether episodes with reference images get the reference score (a calibrated ``reference_threshold``)."""
        return self.reference_threshold is not None and self.references > 0

    def gate(self, logits: torch.Tensor, shares: torch.Tensor, levels: torch.Tensor | None = None,
             log_odds: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """Apply the gate to a batch (:func:`apply_gate`).

        Args:
            logits: ``(B, 1, h, w)`` logits on the feature grid.
            shares: ``(B,)`` support size of each episode (:func:`support_shares`).
            levels: ``(B,)`` reference level of each episode (highest max log-odds of its reference images under
                its support, :meth:`pipeline.inference.predictor.Predictor.reference_levels`), ``NaN`` where the
                episode has no references; ``None``: no episode has.
            log_odds: the network's ``presence_log_odds`` (required with ``levels``).

        Returns:
            ``(B, 1, h, w)`` gated logits. An episode with a level is gated by ``log_odds(peak) - level <
            reference_threshold`` (peak: :func:`presence_peak` with :attr:`reference_area`); the others by
            :meth:`thresholds`.

        Raises:
            ValueError: ``levels`` without ``log_odds``.
        """
        taus = self.thresholds(shares)
        if levels is None or not self.uses_references:
            return apply_gate(logits, taus)
        if log_odds is None:
            raise ValueError("reference levels need the network's presence_log_odds")
        levels = levels.to(device=logits.device, dtype=torch.float64)
        has = ~torch.isnan(levels)
        top = logits.amax(dim=(1, 2, 3))
        peak = presence_peak(logits, shares, self.reference_area)
        base = torch.full_like(levels, float("-inf")) if taus is None else (
            taus.to(levels) if isinstance(taus, torch.Tensor) else torch.full_like(levels, taus))
        tau = torch.where(has, torch.full_like(levels, self.reference_threshold), base)  # type: ignore[arg-type]
        score = torch.where(has, log_odds(peak).double() - torch.nan_to_num(levels), top.double())
        return apply_gate(logits, tau, score)

    @property
    def split(self) -> bool:
        """Whether small supports have their own threshold."""
        return self.small_area is not None

    def is_small(self, share: float) -> bool:
        """Whether an episode whose support defects cover ``share`` of the image (mean over the shots) is small:
        ``0 < share <= small_area`` (an empty support is not small, as ``pipeline.inference.native.is_small``)."""
        return self.small_area is not None and 0.0 < share <= self.small_area

    def threshold_for(self, share: float) -> float | None:
        """The threshold of one episode whose support defects cover ``share`` of the image (``None``: not gated)."""
        return self.small_threshold if self.is_small(share) else self.threshold

    def thresholds(self, shares: torch.Tensor) -> float | torch.Tensor | None:
        """The threshold of each episode, for :func:`apply_gate`.

        Args:
            shares: ``(B,)`` mean support defect share of each episode, in ``[0, 1]``.

        Returns:
            ``threshold`` when the gate has one threshold; else a ``(B,)`` float64 tensor (``-inf`` where that
            episode's threshold is ``None``).
        """
        if not self.split:
            return self.threshold
        taus = (self.threshold_for(float(x)) for x in shares.reshape(-1))
        return torch.tensor([float("-inf") if t is None else t for t in taus], dtype=torch.float64)
