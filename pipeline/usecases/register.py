"""Use case register-and-gate: register the production model as challenger, gate it, record, publish the card."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PRODUCTION_MODEL, Params
from pipeline.layout import Layout
from pipeline.storage import StorageError


class ModelCardError(StorageError):
    """A version was promoted but its model card could not be published (the decision stands)."""


@dataclass
class GateOutcome:
    """Result of :func:`gate`: the promotion decision, where its record was written, the card URIs."""

    decision: Any
    record: Path
    card_uris: list[str] = field(default_factory=list)


def register_production(params: Params, model_name: str = PRODUCTION_MODEL, checkpoint: Path | None = None,
                        extra_tags: dict[str, str] | None = None) -> str:
    """Register the production model (default ``models/all/<model>/model.pt``) with its CV cells from
    ``metrics/fold*.json`` as a new version with alias ``challenger``; returns the version.

    Raises:
        pipeline.registry.RegistryError: a fold's metrics are missing / out of range.
        FileNotFoundError: the checkpoint is missing.
    """
    from pipeline import registry

    ckpt = Path(checkpoint) if checkpoint is not None else Layout.of(params).model_file(None, model_name)
    cells = registry.collect_cv_cells(params, model_name)
    return registry.register(params, ckpt, cells, model_name=model_name, extra_tags=extra_tags)


def gate(params: Params, version: str, *, force: bool = False, record: Path | None = None) -> GateOutcome:
    """Promotion gate on ``version``, then the decision record, then (if promoted and S3 is configured)
    the champion's model card.

    Raises:
        pipeline.registry.RegistryError: the version does not exist or has no CV tags.
        ModelCardError: promoted, record written, but the card could not be published.
    """
    from pipeline import registry
    from pipeline.model_card import publish_champion_card

    decision = registry.promote(params, version, force=force)
    path = registry.write_record(record or Layout.of(params).registry_record, decision)
    try:
        uris = publish_champion_card(params, version, decision.promoted)
    except StorageError as exc:
        raise ModelCardError(f"{decision.model} v{version} was promoted, but its model card was not published: "
                             f"{exc}") from exc
    return GateOutcome(decision, path, uris)


def register_and_gate(params: Params, model_name: str = PRODUCTION_MODEL, checkpoint: Path | None = None, *,
                      promote: bool = True, record: Path | None = None) -> tuple[str, GateOutcome | None]:
    """:func:`register_production` then, with ``promote``, :func:`gate`; returns ``(version, outcome | None)``."""
    version = register_production(params, model_name, checkpoint)
    return version, (gate(params, version, record=record) if promote else None)


def cv_summary(params: Params, model_name: str = PRODUCTION_MODEL) -> dict[str, float]:
    """Mean CV mIoU over folds per ``<protocol>.k<K>`` (4 decimals), from ``metrics/fold*.json``."""
    from pipeline import registry

    cv: dict[str, list[float]] = {}
    for c in registry.collect_cv_cells(params, model_name):
        cv.setdefault(f"{c.protocol}.k{c.shots}", []).append(c.miou)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(cv.items())}
