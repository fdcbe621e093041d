"""MLflow model registry: register the production model as ``challenger``, promote it to ``champion`` behind a gate.

Registered model: ``params.mlflow.registered_model`` (tracking/registry URI ``params.mlflow.tracking_uri``;
the SQLite default needs no server). Aliases (MLflow 3 replaces stages by aliases):

* ``challenger`` -- the newest registered version waiting for (or refused by) the gate;
* ``champion``   -- the version users deploy (``models:/<name>@champion``).

Every version is created **with** its summary tags in one registry call (the SQL store writes the
version row and its tags in one transaction), and its cross-validation cells are logged as an
artifact of the same run before the version exists, so no version exists without its metrics.
Tags per version (few and readable; :mod:`pipeline.registry_text`):

========================================  ==========================================================
tag                                       value
========================================  ==========================================================
``data_version``                          DVC md5 of ``data/raw`` (``pipeline.tracking.data_version``)
``git_commit``                            ``git rev-parse HEAD`` of the project
``params_hash``                           sha256[:16] of the validated params (paths excluded)
``model_name``                            lerenet | baseline | prototype
``protocol``                              protocols evaluated, e.g. ``paper,standard``
``cv.miou.k<K>``, ``cv.support_gain``,    CV summary (headline protocol ``cv.protocol``, mean over
``cv.false_alarm_rate``                   ``cv.folds``); see :mod:`pipeline.registry_text`
``cv.cells``                              ``runs:/<id>/registry/cv_cells.json``: every cell (fold,
                                          protocol, K, mIoU, FB-IoU, episode hash), what the gate reads
``decision``                              pending | promoted | not promoted | error
``decision.reason`` and ``decision.*``    why, the compared cells, both scores, the margin
========================================  ==========================================================

The version's markdown description (what the model is, its scores, the decision, how to call it) is
written at registration and rewritten after each decision (:func:`pipeline.registry_text.describe_version`).

Promotion gate (:func:`promote`): compare only cells (fold, protocol, K) whose saved episodes are
identical (same episode hash) in challenger and champion; the challenger's mean mIoU over those
cells must be >= the champion's + ``params.mlflow.promotion_margin``. No champion yet: promoted.
No common cells: not promoted (the reason says so; ``force=True`` overrides, recorded as such).
The ``champion`` alias is moved by a single ``set_registered_model_alias`` call after every
decision tag is written, so there is never more than one champion and never a champion whose
decision is not on record.

Idempotent (:func:`promote`): a version whose decision is on record (tag ``decision`` = ``promoted`` /
``not promoted``) is not decided again -- a retry returns the recorded decision and changes nothing,
except finishing an alias move the recorded decision made but a failure interrupted
(:func:`recorded_decision`). A version whose model files are gone (``MLmodel`` or its checkpoint
deleted from the artifact store) is never promoted: :func:`require_artifacts`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline import tracking
from pipeline.registry_cells import (  # noqa: F401 -- CvCell, cv_tags, collect_cv_cells, episodes_hash re-exported
    CvCell,
    RegistryError,
    collect_cv_cells,
    cv_tags,
    episodes_hash,
)
from pipeline.registry_text import cells_from_tags  # noqa: F401 -- re-exported (older callers)
from pipeline.atomic import atomic_write_text
from pipeline.config import PRODUCTION_MODEL, Params

log = logging.getLogger(__name__)

CHAMPION = "champion"
CHALLENGER = "challenger"


@dataclass(frozen=True)
class PromotionDecision:
    """Outcome of :func:`promote`, also written as ``decision.*`` tags on the version.

    Scores are mean mIoU in [0, 1] over the ``compared`` cells (``None`` when nothing was compared).
    """

    model: str
    version: str
    promoted: bool
    reason: str
    champion_before: str | None
    challenger_miou: float | None
    champion_miou: float | None
    margin: float
    compared: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain-JSON view (for the flow result and ``registry.json``)."""
        return asdict(self)


# ---------------------------------------------------------------------------
# registry operations
# ---------------------------------------------------------------------------
def client(params: Params):
    """An :class:`mlflow.MlflowClient` on the tracking/registry URI (relative SQLite resolved against the project)."""
    import mlflow

    tracking.configure(params)
    uri = tracking.tracking_uri(params)
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def alias_version(params: Params, alias: str) -> str | None:
    """Version number that ``alias`` points to, or ``None`` if unset (or no registered model yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client(params).get_model_version_by_alias(params.mlflow.registered_model, alias).version)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower() \
                or "does not exist" in str(exc).lower():
            return None
        raise


def register(params: Params, model_checkpoint: Path, cv_metrics: Iterable[CvCell], *,
             model_name: str = PRODUCTION_MODEL, extra_tags: Mapping[str, str] | None = None) -> str:
    """Log ``model_checkpoint`` as a pyfunc and register it as a new version with alias ``challenger``.

    Args:
        params: validated params (``mlflow.*``).
        model_checkpoint: ``model.pt`` of the production model (trained on all classes).
        cv_metrics: its cross-validation cells (same training recipe, one model per fold).
        model_name: which architecture the checkpoint is (tag ``model_name``).
        extra_tags: more version tags (e.g. ``flow_run_id``).

    Returns:
        The new version number (str).

    Raises:
        RegistryError: no metrics / metric outside [0, 1].
        FileNotFoundError: checkpoint missing.
        MlflowException: the tracking server failed; a version created before the failure has its
            ``challenger`` alias unset and is deleted, so no half-registered version is left.
    """
    import mlflow

    from pipeline.serving.pyfunc import log_pyfunc

    from pipeline import registry_text

    ckpt = Path(model_checkpoint)
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: production checkpoint not found; run `lerenet train --production` first")
    cells = list(cv_metrics)
    cell_tags = cv_tags(cells)  # validates the cells (none, or a metric outside [0, 1]: RegistryError)
    false_alarms = registry_text.false_alarm_rate(params, model_name)
    tags = {
        **registry_text.summary_tags(cells, false_alarms),
        "protocol": cell_tags["protocol"],
        "data_version": tracking.data_version(params),
        "git_commit": tracking.git_commit(params.root),
        "params_hash": tracking.params_hash(params),
        "model_name": model_name,
        "profile": params.profile,
        "decision": "pending",
        **{k: str(v) for k, v in (extra_tags or {}).items()},
    }
    name = params.mlflow.registered_model
    cl = client(params)
    parent = tracking.parent_run_id(params)
    with tracking.nested_run(params, parent, f"register-{model_name}", tags={"lerenet.step": "register"},
                             reuse=False) as run:
        mlflow.log_metrics({k.replace(".", "_"): float(v) for k, v in cell_tags.items()
                            if k.startswith("cv.") and (k.endswith(".miou") or k.endswith(".fb_iou"))})
        tags[registry_text.CELLS_TAG] = f"runs:/{run.info.run_id}/{registry_text.CELLS_JSON}"
        registry_text.log_cells(registry_text.cells_document(cells, false_alarms))
        mlflow.set_tags(tags)
        uri = log_pyfunc(ckpt, name=f"all-{model_name}", metadata_={"model_name": model_name},
                         max_request_bytes=params.serve.max_request_bytes)
        mv = mlflow.register_model(uri, name, tags=tags)
    version = str(mv.version)
    try:
        stored = cl.get_model_version(name, version).tags
        missing = sorted(set(tags) - set(stored))
        if missing:
            raise RegistryError(f"{name} v{version}: tags {missing[:5]} were not stored")
        registry_text.describe_version(params, version)
        cl.set_registered_model_alias(name, CHALLENGER, version)
    except Exception:
        log.error("registering %s v%s failed; deleting the version so none is left without metrics", name, version)
        _safe(lambda: cl.delete_model_version(name, version))
        raise
    log.info("registered %s v%s (run %s) as %s", name, version, run.info.run_id, CHALLENGER)
    return version


def _safe(fn) -> None:
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 -- best-effort cleanup, the original error is re-raised
        log.warning("cleanup step failed: %s", exc)


def promote(params: Params, version: str | int, *, force: bool = False) -> PromotionDecision:
    """Gate ``version`` against the current champion and move ``champion`` to it if it passes.

    Rule (module docstring): mean mIoU over the cells both versions were scored on with identical
    saved episodes; promoted iff challenger >= champion + ``params.mlflow.promotion_margin``; the
    first model is promoted; ``force`` promotes whatever the scores (recorded in the reason).
    Calling it again on a decided version returns the decision on record and changes nothing (a
    recorded refusal can still be overridden with ``force``); on a champion without a recorded decision
    it reports that it is already the champion.

    Returns:
        The decision; also written on the version as tags ``decision``, ``decision.reason``,
        ``decision.compared``, ``decision.champion_before``, ``decision.challenger_miou``,
        ``decision.champion_miou``, ``decision.margin``, ``decision.time``.

    Raises:
        RegistryError: the version does not exist, has no ``cv.*`` metric tags, or its model files are
            gone (:func:`require_artifacts`).
        MlflowException: the registry failed (tag ``decision`` is then ``error`` if it could be written).
    """
    from mlflow.exceptions import MlflowException

    cl = client(params)
    name, version, margin = params.mlflow.registered_model, str(version), float(params.mlflow.promotion_margin)
    try:
        mv = cl.get_model_version(name, version)
    except MlflowException as exc:
        raise RegistryError(f"{name} v{version} does not exist in {params.mlflow.tracking_uri}: {exc}") from None
    from pipeline.registry_text import CELLS_JSON, describe_version, version_cells

    mine = version_cells(params, mv)
    if not mine:
        raise RegistryError(f"{name} v{version} has no cross-validation cells (no {CELLS_JSON} artifact, no "
                            "cv.* tags); it cannot be gated (register it with pipeline.registry.register)")
    recorded = recorded_decision(name, version, mv.tags)
    if recorded is not None and not (force and not recorded.promoted):
        _finish_recorded_move(params, recorded)
        log.info("%s v%s: decision already on record (%s, %s): not decided again", name, version,
                 mv.tags.get("decision"), mv.tags.get("decision.time"))
        return recorded
    require_artifacts(params, version)
    before = alias_version(params, CHAMPION)
    compared: list[str] = []
    ch_score = champ_score = None
    if before == version:
        promoted, reason = True, f"v{version} is already the champion"
    elif before is None:
        promoted, reason = True, "first model: no champion yet"
        ch_score = _mean(v[0] for v in mine.values())
    else:
        theirs = version_cells(params, cl.get_model_version(name, before))
        compared = sorted(k for k in mine if k in theirs and mine[k][1] == theirs[k][1])
        if compared:
            ch_score = _mean(mine[k][0] for k in compared)
            champ_score = _mean(theirs[k][0] for k in compared)
            promoted = ch_score >= champ_score + margin - 1e-9  # float noise must not decide a tie
            reason = (f"CV mIoU {ch_score:.4f} {'>=' if promoted else '<'} champion v{before} {champ_score:.4f} "
                      f"+ margin {margin:g} on {len(compared)} identical episode set(s)")
        else:
            promoted = False
            reason = (f"no saved episodes in common with champion v{before} (fold table or data changed): "
                      "scores are not comparable; promote by hand with `lerenet promote --force`")
        if force and not promoted:
            promoted, reason = True, f"forced by operator ({reason})"
    decision = PromotionDecision(name, version, promoted, reason, before, ch_score, champ_score, margin, compared)
    tags = {
        "decision": "promoted" if promoted else "not promoted",
        "decision.reason": reason,
        "decision.compared": ",".join(compared) or "-",
        "decision.champion_before": before or "-",
        "decision.challenger_miou": "-" if ch_score is None else f"{ch_score:.6f}",
        "decision.champion_miou": "-" if champ_score is None else f"{champ_score:.6f}",
        "decision.margin": f"{margin:g}",
        "decision.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        for k, v in tags.items():
            cl.set_model_version_tag(name, version, k, v)
        if promoted and before != version:
            cl.set_registered_model_alias(name, CHAMPION, version)  # single-valued: moves atomically
            if alias_version(params, CHALLENGER) == version:
                cl.delete_registered_model_alias(name, CHALLENGER)
            if before is not None:
                _safe(lambda: cl.set_model_version_tag(name, before, "superseded_by", version))
    except Exception:
        _safe(lambda: cl.set_model_version_tag(name, version, "decision", "error"))
        raise
    _safe(lambda: describe_version(params, version))  # description + the register run's decision tag
    log.info("%s v%s: %s (%s)", name, version, tags["decision"], reason)
    return decision


def require_artifacts(params: Params, version: str | int, purpose: str = "promoted") -> None:
    """Check that registered ``version`` still has its model files (``MLmodel`` and the checkpoint it names)
    before it is ``purpose`` (``promoted``, ``probed``: words of the message).

    Raises:
        RegistryError: an artifact is missing; names the version, the artifact and where it was looked for.
    """
    from pipeline.registry_state import missing_files

    problem = missing_files(params.mlflow.registered_model, str(version), tracking.tracking_uri(params))
    if problem:
        raise RegistryError(f"{params.mlflow.registered_model} v{version} cannot be {purpose}: {problem}")


def recorded_decision(name: str, version: str, tags: Mapping[str, str]) -> PromotionDecision | None:
    """The :class:`PromotionDecision` on record in a version's ``decision*`` tags, or ``None`` when none is
    (``pending``, ``error`` or no tag): :func:`pipeline.registry_state.decision_fields`."""
    from pipeline.registry_state import decision_fields

    fields = decision_fields(tags)
    return None if fields is None else PromotionDecision(name, str(version), **fields)


def _finish_recorded_move(params: Params, d: PromotionDecision) -> None:
    """A recorded ``promoted`` whose alias move was interrupted (champion still the recorded
    ``champion_before``): move it now. Any other state (already moved, or the champion has moved on
    since) is left as it is."""
    if not d.promoted:
        return
    current = alias_version(params, CHAMPION)
    if current == d.version or current != d.champion_before:
        return
    cl = client(params)
    cl.set_registered_model_alias(d.model, CHAMPION, d.version)
    log.warning("%s v%s: finished the interrupted move of %s (recorded decision: %s)", d.model, d.version,
                CHAMPION, d.reason)
    if alias_version(params, CHALLENGER) == d.version:
        cl.delete_registered_model_alias(d.model, CHALLENGER)
    if d.champion_before is not None:
        _safe(lambda: cl.set_model_version_tag(d.model, d.champion_before, "superseded_by", d.version))


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals)


def write_record(path: Path, decision: PromotionDecision, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the decision record JSON (the ``register`` stage's output, :attr:`Layout.registry_record`)
    atomically; returns ``path``."""
    text = json.dumps({**decision.as_dict(), **(extra or {})}, indent=2, sort_keys=True) + "\n"
    return atomic_write_text(path, text, mode=0o644)
