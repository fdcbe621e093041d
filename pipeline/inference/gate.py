"""Image-level presence gate: a query whose presence score is below the model's threshold gets an empty mask.

The presence score of a query is its maximum logit on the feature grid (the max-score image-level
decision of inspection systems). The threshold ``tau`` is calibrated at training on the selection
classes (:mod:`pipeline.training.gate`) and stored in the model file (``meta["presence_threshold"]``);
:meth:`pipeline.inference.predictor.Predictor.head` applies it, so evaluation, ``lerenet predict``
and the served model take the same decision.
"""

from __future__ import annotations

import torch

#: Logit given to every pixel of a gated-off query: just below the decision boundary (sigmoid 0.49975),
#: so masks are empty and probability maps show "not sure" rather than a confident zero.
ABSENT_LOGIT = -1e-3


def apply_gate(logits: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Empty the queries whose presence score (max logit) is below ``threshold``.

    Args:
        logits: ``(B, 1, h, w)`` logits on the feature grid.
        threshold: ``tau`` in logit units, or ``None`` (no gate: ``logits`` returned as is).

    Returns:
        ``(B, 1, h, w)``: unchanged for queries with ``max >= tau``, else clamped to at most
        :data:`ABSENT_LOGIT` (no pixel > 0).
    """
    if threshold is None:
        return logits
    off = logits.amax(dim=(1, 2, 3)) < threshold
    if not bool(off.any()):
        return logits
    return torch.where(off.view(-1, 1, 1, 1), logits.clamp(max=ABSENT_LOGIT), logits)
