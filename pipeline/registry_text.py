"""What a person reads on the MLflow registry page: descriptions, a few summary tags, the CV cell table.

A registered version carries only **summary tags** (:func:`summary_tags`)::

    cv.miou.k<K>          mean CV mIoU over folds, headline protocol (``paper`` when evaluated), in [0, 1]
    cv.support_gain       cv.miou at the largest K minus at the smallest K (mIoU points, may be < 0)
    cv.false_alarm_rate   share of defect-free test images with any predicted defect pixel, smallest K,
                          mean over folds, in [0, 1] (absent when not measured)
    cv.protocol           the headline protocol;  cv.folds  the folds averaged, e.g. ``0,1,2``
    cv.cells              ``runs:/<register run>/registry/cv_cells.json``: where the cells are

The per-cell table (fold, protocol, K, mIoU, FB-IoU, episode hash) lives in two artifacts of the
``register-<model>`` run, :data:`CELLS_JSON` (read back by the promotion gate,
:func:`version_cells`) and :data:`CELLS_MD` (for people), linked from the version's markdown
description (:func:`version_description`), which also says what the model is, its CV scores, the
data version, the promotion decision and why, and how to call ``lerenet predict`` and the REST
endpoint. :func:`describe_version` (re)writes the description and mirrors the version's
``decision`` tag onto its run.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import Params
from pipeline.tracking import ui_route

log = logging.getLogger(__name__)

CELLS_JSON = "registry/cv_cells.json"
CELLS_MD = "registry/cv_cells.md"
HEADLINE_PROTOCOL = "paper"
CELLS_TAG = "cv.cells"
#: artifact folder of the pictures logged onto the register and production runs (pipeline.champion_pictures)
PICTURES_DIR = "pictures"


# ---------------------------------------------------------------------------------------- cells
def _headline(cells: list[Any]) -> str:
    protocols = sorted({c.protocol for c in cells})
    return HEADLINE_PROTOCOL if HEADLINE_PROTOCOL in protocols else protocols[0]


def means(cells: Iterable[Any]) -> dict[str, float]:
    """``{"<protocol>.k<K>.miou": mean, "<protocol>.k<K>.fb_iou": mean}`` over folds (values in [0, 1])."""
    groups: dict[tuple[str, int], list[Any]] = {}
    for c in cells:
        groups.setdefault((c.protocol, c.shots), []).append(c)
    out: dict[str, float] = {}
    for (protocol, k), cs in sorted(groups.items()):
        out[f"{protocol}.k{k}.miou"] = sum(c.miou for c in cs) / len(cs)
        out[f"{protocol}.k{k}.fb_iou"] = sum(c.fb_iou for c in cs) / len(cs)
    return out


def summary_tags(cells: Iterable[Any], false_alarm_rate: float | None = None) -> dict[str, str]:
    """The few readable CV tags of a version (module docstring), from its cells
    (:class:`pipeline.registry.CvCell`, already validated); ``cv.cells`` is added by the caller."""
    cells = list(cells)
    head = _headline(cells)
    m = means(cells)
    shots = sorted({c.shots for c in cells if c.protocol == head})
    tags = {f"cv.miou.k{k}": f"{m[f'{head}.k{k}.miou']:.4f}" for k in shots}
    if len(shots) > 1:
        tags["cv.support_gain"] = f"{m[f'{head}.k{shots[-1]}.miou'] - m[f'{head}.k{shots[0]}.miou']:+.4f}"
    if false_alarm_rate is not None:
        tags["cv.false_alarm_rate"] = f"{false_alarm_rate:.4f}"
    tags["cv.protocol"] = head
    tags["cv.folds"] = ",".join(str(f) for f in sorted({c.fold for c in cells}))
    return tags


def cells_document(cells: Iterable[Any], false_alarm_rate: float | None = None) -> dict[str, Any]:
    """The JSON artifact :data:`CELLS_JSON`: ``{"cells": [{fold, protocol, shots, miou, fb_iou, episodes}],
    "means": {...}, "false_alarm_rate": float | None}`` (cells sorted by protocol, K, fold)."""
    cells = sorted(cells, key=lambda c: (c.protocol, c.shots, c.fold))
    return {"cells": [{"fold": c.fold, "protocol": c.protocol, "shots": c.shots, "miou": c.miou,
                       "fb_iou": c.fb_iou, "episodes": c.episodes} for c in cells],
            "means": means(cells), "false_alarm_rate": false_alarm_rate}


def cells_markdown(doc: Mapping[str, Any]) -> str:
    """:data:`CELLS_MD`: the cells of :func:`cells_document` as a markdown table."""
    lines = ["# Cross-validation cells", "",
             "One row per (fold, protocol, K): the model trained without the fold's test classes, scored on",
             "the saved episodes whose content hash is given (the promotion gate compares only cells with",
             "identical hashes).", "",
             "| fold | protocol | K | mIoU | FB-IoU | episodes (sha256[:16]) |", "|---:|---|---:|---:|---:|---|"]
    for c in doc["cells"]:
        lines.append(f"| {c['fold']} | {c['protocol']} | {c['shots']} | {c['miou']:.4f} | {c['fb_iou']:.4f} "
                     f"| `{c['episodes']}` |")
    return "\n".join(lines) + "\n"


def cells_of_document(doc: Mapping[str, Any]) -> dict[str, tuple[float, str]]:
    """``{"cv.f<f>.<protocol>.k<K>": (miou, episodes hash)}`` (the gate's view of a version's cells)."""
    return {f"cv.f{c['fold']}.{c['protocol']}.k{c['shots']}": (float(c["miou"]), str(c["episodes"]))
            for c in doc.get("cells", [])}


def cells_from_tags(tags: Mapping[str, str]) -> dict[str, tuple[float, str]]:
    """``{cell key: (miou, episodes hash)}`` read back from a version's tags."""
    out = {}
    for k, v in tags.items():
        if k.startswith("cv.f") and k.endswith(".miou"):
            key = k[: -len(".miou")]
            ep = tags.get(f"{key}.episodes")
            if ep:
                out[key] = (float(v), ep)
    return out


def load_cells_document(params: Params, run_id: str | None) -> dict[str, Any] | None:
    """:data:`CELLS_JSON` of the register run ``run_id``; ``None`` when there is no run or no such artifact
    (a version registered before the cells moved out of the tags, or by hand)."""
    if not run_id:
        return None
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    with tempfile.TemporaryDirectory(prefix="lerenet-cells-") as tmp, tracking.no_artifact_progress_bar():
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=CELLS_JSON, dst_path=tmp,
                                                       tracking_uri=tracking.tracking_uri(params))
        except (MlflowException, OSError) as exc:
            log.debug("run %s has no %s: %s", run_id, CELLS_JSON, exc)
            return None
        return json.loads(Path(path).read_text())


def version_cells(params: Params, mv: Any) -> dict[str, tuple[float, str]]:
    """The cells of model version ``mv``: from its run's :data:`CELLS_JSON`, else (older versions) from
    its ``cv.f*`` tags (:func:`cells_from_tags`); ``{}`` when it has none."""
    doc = load_cells_document(params, getattr(mv, "run_id", None))
    if doc is not None:
        return cells_of_document(doc)
    return cells_from_tags(mv.tags)


def false_alarm_rate(params: Params, model_name: str) -> float | None:
    """Mean over folds of the image false-alarm rate at the smallest K, from ``metrics/fold<f>.json``;
    ``None`` if no fold file has a false-alarm measurement for ``model_name``."""
    from pipeline.evaluation.results import FoldMetrics
    from pipeline.layout import Layout

    layout = Layout.of(params)
    rates = []
    for fold in sorted(params.folds):
        try:
            m = FoldMetrics.read(layout.fold_metrics(fold)).models.get(model_name)
        except (OSError, ValueError, KeyError):
            continue
        if m is not None and m.fp:
            rates.append(m.fp[min(m.fp)].image_rate)
    return sum(rates) / len(rates) if rates else None


# ---------------------------------------------------------------------------------- descriptions
def model_description(params: Params) -> str:
    """Markdown description of the registered model (the same for every version)."""
    name = params.mlflow.registered_model
    return (f"**{name}**: few-shot defect segmentation. Given 1-5 annotated images of a defect (the support) "
            "and a new image (the query), it returns a defect mask for the query, also for defect classes it "
            "never saw in training.\n\n"
            f"Deploy `models:/{name}@champion` (alias `champion`: the version that passed the promotion gate; "
            "`challenger`: the newest one waiting or refused). Each version's description gives its "
            "cross-validation scores on novel classes, the data version and the decision.")


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def version_description(params: Params, version: str, tags: Mapping[str, str], doc: Mapping[str, Any] | None,
                        run_id: str | None, experiment_id: str | None) -> str:
    """Markdown description of one version from its tags (summary + ``decision*``) and cells document."""
    name = params.mlflow.registered_model
    model = tags.get("model_name", "?")
    head = tags.get("cv.protocol", HEADLINE_PROTOCOL)
    decision = tags.get("decision", "pending")
    reason = tags.get("decision.reason")
    out = [f"### {name} v{version}: `{model}` few-shot defect segmenter", "",
           f"**Decision: {decision}**" + (f" -- {reason}" if reason else " (the promotion gate has not run yet)"), "",
           f"**What it is.** `{model}` network on a `{params.model.backbone}` backbone "
           f"({'frozen' if params.model.freeze_backbone else 'fine-tuned'}, variant `{params.model.variant}`, "
           f"{params.model.channels} channels), images resized to {params.train.image_size}x{params.train.image_size}, "
           f"trained on every class with K={params.train.shots} episodes. Its scores below are the cross-validation "
           f"estimate: one model per fold, scored on that fold's novel (unseen) classes.", ""]
    m = (doc or {}).get("means") or {}
    shots = sorted({int(k.split(".")[1][1:]) for k in m})
    if shots:
        protocols = sorted({k.split(".")[0] for k in m}, key=lambda p: (p != head, p))
        out += ["| mean over folds " + "".join(f"| K={k} " for k in shots) + "|",
                "|---" + "|---:" * len(shots) + "|"]
        for p in protocols:
            for metric, label in (("miou", "mIoU"), ("fb_iou", "FB-IoU")):
                vals = [m.get(f"{p}.k{k}.{metric}") for k in shots]
                out.append(f"| {label} ({p} protocol) " + "".join("| - " if v is None else f"| {v:.4f} " for v in vals)
                           + "|")
        out.append("")
    if "cv.support_gain" in tags:
        out.append(f"- Support gain (mIoU at K={shots[-1] if shots else '?'} minus K={shots[0] if shots else '?'}, "
                   f"{head}): **{tags['cv.support_gain']}**")
    fa = tags.get("cv.false_alarm_rate")
    out.append(f"- False-alarm rate (defect-free images with any predicted defect pixel): "
               f"**{_pct(float(fa)) if fa else 'not measured'}**")
    out.append(f"- Data version `{tags.get('data_version', 'unknown')}`, git `{tags.get('git_commit', 'unknown')[:12]}`, "
               f"params `{tags.get('params_hash', '?')}`, profile `{tags.get('profile', '?')}`")
    if run_id:
        link = ui_route(experiment_id, "runs", run_id, "artifacts") if experiment_id else None
        where = f"[the register run's artifacts]({link})" if link else "the register run"
        out.append(f"- Per-fold cells and episode hashes: `{CELLS_MD}` / `{CELLS_JSON}` in {where} "
                   f"(`runs:/{run_id}/{CELLS_JSON}`)")
        out.append(f"- Pictures (cross-validation on novel classes): `{PICTURES_DIR}/per_class_iou.png` and the "
                   f"overlay sheets `{PICTURES_DIR}/fold<f>/overlays_k<K>_paper.png` (support, query, truth, "
                   f"prediction) in {where} and in the production model's training run")
    uri = f"models:/{name}/{version}"
    out += ["", "**Use it** (or `models:/" + name + "@champion` for whichever version is champion):", "", "```bash",
            f"lerenet predict --model {uri} --support-dir DEFECT_CLASS_DIR --shots-limit 5 \\",
            "                --query NEW_IMAGES/ --out predictions/",
            f"mlflow models serve -m \"{uri}\" --host 127.0.0.1 --port 5055 --env-manager local",
            "curl -s http://127.0.0.1:5055/invocations -H 'Content-Type: application/json' --data @request.json",
            "```",
            "`request.json`: `{\"dataframe_split\": {\"columns\": [\"support_images\", \"support_masks\", "
            "\"query_image\"], \"data\": [[[\"<base64 PNG>\"], [\"<base64 mask PNG>\"], \"<base64 PNG>\"]]}}`; "
            "the answer has `mask` (base64 PNG, 255 = defect), `defect_fraction`, `max_score` (docs/inference.md)."]
    return "\n".join(out) + "\n"


def describe_version(params: Params, version: str) -> str:
    """(Re)write the markdown description of ``version`` and of the registered model, and mirror the
    version's ``decision`` tag onto its run; returns the version description.

    Raises:
        mlflow.exceptions.MlflowException: the registry failed.
    """
    import mlflow

    from pipeline import tracking

    tracking.configure(params)
    uri = tracking.tracking_uri(params)
    cl = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = params.mlflow.registered_model
    mv = cl.get_model_version(name, str(version))
    exp_id = None
    if mv.run_id:
        exp_id = cl.get_run(mv.run_id).info.experiment_id
        cl.set_tag(mv.run_id, "decision", mv.tags.get("decision", "pending"))
    text = version_description(params, str(version), mv.tags, load_cells_document(params, mv.run_id),
                               mv.run_id, exp_id)
    cl.update_model_version(name, str(version), description=text)
    cl.update_registered_model(name, description=model_description(params))
    return text


def log_cells(doc: Mapping[str, Any]) -> None:
    """Log :data:`CELLS_JSON` and :data:`CELLS_MD` into the *active* MLflow run."""
    import mlflow

    mlflow.log_dict(dict(doc), CELLS_JSON)
    mlflow.log_text(cells_markdown(doc), CELLS_MD)
