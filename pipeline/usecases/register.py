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
    """Promotion gate on ``version``, then (if promoted and S3 is configured) the champion's model card,
    then the decision record.

    Safe to retry (the flow's ``promote`` task is): the gate returns the decision on record for a decided
    version (:func:`pipeline.registry.promote`), and the card is published only while ``version`` is the
    champion and not yet published. The card's state is recorded on the version (tag ``model_card``:
    ``pending`` before publishing, then ``published: <uris>``, ``failed: <error> …`` or ``not published:
    <why>``) and in the record, so registry and card never disagree without a recorded reason.

    Raises:
        pipeline.registry.RegistryError: the version does not exist, has no CV tags, or its files are gone.
        ModelCardError: promoted, but the card could not be published (recorded; a retry publishes it).
    """
    from pipeline import registry

    decision = registry.promote(params, version, force=force)
    path = record or Layout.of(params).registry_record
    try:
        uris, card = publish_card(params, str(version), decision.promoted)
    except ModelCardError as exc:
        registry.write_record(path, decision, {"model_card": str(exc)})
        raise
    registry.write_record(path, decision, {"model_card": card})
    return GateOutcome(decision, path, uris)


def publish_card(params: Params, version: str, promoted: bool) -> tuple[list[str], str]:
    """Publish the model card of a promoted ``version`` once, while it is the champion and S3 is configured,
    recording its state in tag ``model_card`` (see :func:`gate`); returns ``(uris, state)``.

    Raises:
        ModelCardError: the store failed (tag ``model_card`` = ``failed: …``; calling again retries).
    """
    from pipeline import registry
    from pipeline.model_card import publish_champion_card, s3_configured
    from pipeline.registry_state import CARD_TAG

    if not promoted:
        return [], "not published: not promoted"
    cl, name = registry.client(params), params.mlflow.registered_model
    state = cl.get_model_version(name, version).tags.get(CARD_TAG, "")
    if state.startswith("published: "):
        return state[len("published: "):].split(","), state
    champion = registry.alias_version(params, registry.CHAMPION)
    if champion != version:
        state = f"not published: v{champion} is the champion now"
    elif not s3_configured():
        state = "not published: no S3 endpoint configured"
    else:
        cl.set_model_version_tag(name, version, CARD_TAG, "pending")
        try:
            uris = publish_champion_card(params, version, True)
        except StorageError as exc:
            msg = (f"{name} v{version} was promoted, but its model card was not published: {exc} -> the champion "
                   f"card in S3 still shows the previous champion; run `lerenet promote {version}` (or retry the "
                   "flow's promote task) to publish it")
            registry._safe(lambda: cl.set_model_version_tag(name, version, CARD_TAG, f"failed: {msg}"[:5000]))
            raise ModelCardError(msg) from exc
        state = "published: " + ",".join(uris)
        cl.set_model_version_tag(name, version, CARD_TAG, state)
        return uris, state
    cl.set_model_version_tag(name, version, CARD_TAG, state)
    return [], state


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
