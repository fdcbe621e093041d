"""Use case register-and-gate: register the production model as challenger, gate it, record, publish the card."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import PRODUCTION_MODEL, Params
from pipeline.layout import Layout
from pipeline.storage import StorageError

log = logging.getLogger(__name__)


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
    version = registry.register(params, ckpt, cells, model_name=model_name, extra_tags=extra_tags)
    log_pictures(params, version, model_name)
    describe_pipeline_run(params, model_name, version)
    return version


def log_pictures(params: Params, version: str, model_name: str = PRODUCTION_MODEL) -> list[str]:
    """Best effort: the cross-validation pictures onto the version's register run and the production training
    run (:func:`pipeline.champion_pictures.log_champion_pictures`); returns the artifact paths logged. A
    failure is logged as a warning and changes nothing else: the version and its metrics stand without them."""
    from pipeline.champion_pictures import log_champion_pictures

    try:
        return log_champion_pictures(params, version, model_name).artifacts
    except Exception as exc:  # noqa: BLE001 -- pictures are documentation; registration must not fail on them
        log.warning("%s v%s: pictures not logged onto its runs (%s: %s)", params.mlflow.registered_model, version,
                    type(exc).__name__, exc)
        return []


def cv_table(params: Params) -> dict[str, dict[str, float]]:
    """``{model: {"k<K>_miou", "k<K>_fbiou" (paper protocol), "false_alarm_rate" (smallest K)}}``, means over
    the folds whose ``metrics/fold<f>.json`` has the model (values in [0, 1]); ``{}`` when none is evaluated."""
    from pipeline.evaluation.results import FoldMetrics

    layout = Layout.of(params)
    acc: dict[str, dict[str, list[float]]] = {}
    for fold in sorted(params.folds):
        path = layout.fold_metrics(fold)
        if not path.is_file():
            continue
        for name, m in FoldMetrics.read(path).models.items():
            row = acc.setdefault(name, {})
            for k, by in m.scores.items():
                if "paper" in by:
                    row.setdefault(f"k{k}_miou", []).append(by["paper"].miou)
                    row.setdefault(f"k{k}_fbiou", []).append(by["paper"].fbiou)
            if m.fp:
                row.setdefault("false_alarm_rate", []).append(m.fp[min(m.fp)].image_rate)
    return {name: {k: sum(v) / len(v) for k, v in row.items()} for name, row in acc.items()}


def describe_pipeline_run(params: Params, model_name: str, version: str) -> str:
    """Give the pipeline's parent MLflow run its CV summary: metrics ``cv_<model>_k<K>_miou`` / ``_fbiou`` /
    ``cv_<model>_false_alarm_rate`` for every evaluated model, and a markdown description (the table,
    which version was registered); returns the description."""
    from pipeline import tracking

    table = cv_table(params)
    shots = sorted({int(k[1:].split("_")[0]) for row in table.values() for k in row if k.startswith("k")})
    name = params.mlflow.registered_model
    lines = [f"Pipeline run: git `{tracking.git_commit(params.root)[:12]}`, data `{tracking.data_version(params)}`, "
             f"params `{tracking.params_hash(params)}`, profile `{params.profile}`.", "",
             f"Cross-validation on novel classes (paper protocol, mean over folds {sorted(params.folds)}); "
             f"`{model_name}` trained on every class was registered as **{name} v{version}** "
             f"(`models:/{name}/{version}`; the decision is on the version).", "",
             "| model " + "".join(f"| mIoU K={k} | FB-IoU K={k} " for k in shots) + "| false alarms |",
             "|---" + "|---:|---:" * len(shots) + "|---:|"]
    for model, row in table.items():
        cells = "".join(f"| {row.get(f'k{k}_miou', float('nan')):.4f} | {row.get(f'k{k}_fbiou', float('nan')):.4f} "
                        for k in shots)
        fa = row.get("false_alarm_rate")
        lines.append(f"| {'**' + model + '**' if model == model_name else model} {cells}"
                     f"| {'-' if fa is None else f'{100 * fa:.1f}%'} |")
    text = "\n".join(lines) + "\n"
    metrics = {f"cv_{model}_{k}": v for model, row in table.items() for k, v in row.items()}
    tracking.describe_run(params, tracking.parent_run_id(params), text, metrics)
    return text


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
