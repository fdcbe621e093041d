"""Publish the champion's model card to object storage after a promotion.

The card (:class:`pipeline.storage.ModelCard`) is what a consumer of the champion needs without
access to MLflow: registered name and version, data version, the cross-validation metrics the
promotion gate used (means over folds ``<protocol>.k<K>.miou`` / ``fb_iou`` of the version's
``registry/cv_cells.json``, values in [0, 1]) and the per-class foreground IoU on the novel classes (``metrics/per_class/fold*.csv``,
paper protocol, K = 1). It is written to ``s3://<services.models_bucket>/model-cards/`` by
:func:`pipeline.storage.publish_model_card` (versioned card first, ``champion.json`` last).

Publishing happens only when an S3 endpoint is configured (``LERENET_S3_ENDPOINT_URL`` or the
other variables of :data:`pipeline.storage.ENDPOINT_ENV_VARS`, as set by
``eval "$(lerenet services env)"`` or a team setup); the embedded default (no object storage)
skips it and says so.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import pandas as pd

from pipeline.config import PRODUCTION_MODEL, Params
from pipeline.layout import Layout
from pipeline.storage import ENDPOINT_ENV_VARS, ModelCard, S3Store, publish_model_card

log = logging.getLogger(__name__)


def per_class_iou(params: Params, model_name: str = PRODUCTION_MODEL, protocol: str = "paper", shots: int = 1
                  ) -> dict[str, float]:
    """Foreground IoU in [0, 1] of each novel class, from the evaluation's per-class tables.

    Raises:
        FileNotFoundError: no ``metrics/per_class/fold*.csv`` under ``params.root`` (run ``lerenet
            evaluate`` for every fold first).
    """
    layout = Layout.of(params)
    files = layout.per_class_tables()
    if not files:
        raise FileNotFoundError(f"{layout.metrics_dir / 'per_class'}: no per-class tables fold*.csv; run `lerenet evaluate`")
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    sel = df[(df["model"] == model_name) & (df["protocol"] == protocol) & (df["shots"] == shots)]
    return {str(r.class_name): float(r.iou) for r in sel.itertuples()}


def build_card(params: Params, version: str, tags: Mapping[str, str], run_id: str | None,
               model_name: str = PRODUCTION_MODEL, metrics: Mapping[str, float] | None = None) -> ModelCard:
    """The model card of registered ``version`` from its tags (``data_version``, ``protocol``) and its CV
    means ``metrics`` (``{"<protocol>.k<K>.miou" | ".fb_iou": value}``, the ``means`` of
    :func:`pipeline.registry_text.cells_document`); without ``metrics``, the ``cv.<protocol>.k<K>.*``
    tags of a version registered before the cells moved into an artifact.

    Raises:
        pydantic.ValidationError: a metric outside [0, 1] or a missing data version.
    """
    if metrics is None:
        metrics = {k[len("cv."):]: float(v) for k, v in tags.items()
                   if k.startswith("cv.") and k.count(".") == 3 and (k.endswith(".miou") or k.endswith(".fb_iou"))}
    return ModelCard(model_name=params.mlflow.registered_model, version=str(version), run_id=run_id,
                     model_uri=f"models:/{params.mlflow.registered_model}/{version}",
                     data_version=tags.get("data_version") or "unknown", metrics=dict(metrics),
                     per_class_iou=per_class_iou(params, model_name),
                     params={"profile": params.profile, "backbone": params.model.backbone,
                             "channels": params.model.channels, "variant": params.model.variant,
                             "image_size": params.train.image_size,
                             "protocol": tags.get("protocol") or tags.get("cv.protocol", "")})


def s3_configured(env: Mapping[str, str] | None = None) -> bool:
    """True when an S3 endpoint variable is set (services profile or team setup)."""
    env = os.environ if env is None else env
    return any(env.get(k) for k in ENDPOINT_ENV_VARS)


def publish_champion_card(params: Params, version: str, promoted: bool,
                          env: Mapping[str, str] | None = None) -> list[str]:
    """Publish the card of ``version`` if it was just promoted and S3 is configured.

    Returns:
        The ``s3://`` URIs written (versioned card, then ``champion.json``); ``[]`` when the version
        was not promoted or no S3 endpoint is configured (logged).

    Raises:
        pipeline.storage.StorageError: the store is unreachable, rejects the credentials, or the
            models bucket does not exist (``lerenet services up`` creates it).
    """
    if not promoted:
        return []
    if not s3_configured(env):
        log.info("model card not published: no S3 endpoint configured (%s)", ", ".join(ENDPOINT_ENV_VARS))
        return []
    from pipeline.registry import client
    from pipeline.registry_text import load_cells_document

    mv = client(params).get_model_version(params.mlflow.registered_model, str(version))
    doc = load_cells_document(params, mv.run_id)
    card = build_card(params, str(version), mv.tags, mv.run_id, metrics=None if doc is None else doc["means"])
    uris = publish_model_card(S3Store.from_params(params, env), card, params.services.models_bucket)
    log.info("model card of %s v%s published: %s", params.mlflow.registered_model, version, ", ".join(uris))
    return uris
