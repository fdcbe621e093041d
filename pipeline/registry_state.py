"""What the registry holds for one version, read without deciding anything: the promotion decision on
record (its ``decision*`` tags) and whether the version's model files still exist.

Used by :mod:`pipeline.registry` (idempotent promotion, refusing a version whose files are gone) and
by :mod:`pipeline.usecases.register` (the model card's publication state, tag :data:`CARD_TAG`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DECIDED = ("promoted", "not promoted")
"""Values of tag ``decision`` that mean a decision is on record (``pending`` and ``error`` do not)."""
CARD_TAG = "model_card"
"""Version tag recording the model card's publication: ``pending``, ``published: <uris>``,
``failed: <error> …`` or ``not published: <why>``."""


def decision_fields(tags: Mapping[str, str]) -> dict[str, Any] | None:
    """Keyword arguments of :class:`pipeline.registry.PromotionDecision` (all but ``model`` and
    ``version``) read back from a version's tags; ``None`` when no decision is on record."""
    if tags.get("decision") not in DECIDED:
        return None

    def num(key: str) -> float | None:
        v = tags.get(key, "-")
        return None if v in ("-", "") else float(v)

    before = tags.get("decision.champion_before", "-")
    compared = tags.get("decision.compared", "-")
    return {"promoted": tags["decision"] == "promoted", "reason": tags.get("decision.reason", ""),
            "champion_before": None if before == "-" else before,
            "challenger_miou": num("decision.challenger_miou"), "champion_miou": num("decision.champion_miou"),
            "margin": num("decision.margin") or 0.0,
            "compared": [] if compared in ("-", "") else compared.split(",")}


def missing_files(name: str, version: str, tracking_uri: str) -> str | None:
    """``None`` if registered ``name`` v``version`` still has its ``MLmodel`` and checkpoint artifact, else
    the message of :func:`pipeline.inference.resolve.check_artifacts` (which artifact, where)."""
    from pipeline.inference.resolve import ModelNotFoundError, check_artifacts

    try:
        check_artifacts(f"models:/{name}/{version}", tracking_uri)
    except ModelNotFoundError as exc:
        return str(exc)
    return None
