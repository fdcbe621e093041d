"""Publish the champion's model card to object storage after a promotion.

The card (:class:`ModelCard`) is what a consumer of the champion needs without
access to MLflow: registered name and version, data version, the cross-validation metrics the
promotion gate used (means over folds ``<protocol>.k<K>.miou`` / ``fb_iou`` of the version's
``registry/cv_cells.json``, values in [0, 1]) and the per-class foreground IoU on the novel classes (``metrics/per_class/fold*.csv``,
paper protocol, K = 1). It is written to ``s3://<services.models_bucket>/model-cards/`` by
:func:`publish_model_card` (versioned card first, ``champion.json`` last).

Publishing happens only when an S3 endpoint is configured (``LERENET_S3_ENDPOINT_URL`` or the
other variables of :data:`pipeline.storage.ENDPOINT_ENV_VARS`, as set by
``eval "$(lerenet services env)"`` or a team setup); the embedded default (no object storage)
skips it and says so.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.config import PRODUCTION_MODEL, Params
from pipeline.layout import Layout
from pipeline.storage import ENDPOINT_ENV_VARS, S3Store

log = logging.getLogger(__name__)


class ModelCard(BaseModel):
    """The champion's model card: what a consumer needs to trust and use the model.

    ``metrics``: aggregate scores in [0, 1] on the saved test episodes, e.g.
    ``{"mIoU": 0.41, "FB-IoU": 0.66}`` (mean of per-class foreground IoU, and
    mean of foreground/background IoU). ``per_class_iou``: foreground IoU of each
    test class in [0, 1]. ``data_version``: identifier of the data the model was
    trained and scored on (e.g. the DVC md5 of ``data/raw`` or a git revision).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    schema_version: int = 1
    model_name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    alias: str = "champion"
    run_id: str | None = None
    model_uri: str | None = None
    data_version: str = Field(min_length=1)
    metrics: dict[str, float]
    per_class_iou: dict[str, float]
    params: dict[str, Any] = Field(default_factory=dict)
    created_at: str = Field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @field_validator("version", mode="before")
    @classmethod
    def _version_str(cls, v: Any) -> str:
        return str(v)

    @field_validator("metrics", "per_class_iou")
    @classmethod
    def _finite_unit(cls, v: dict[str, float]) -> dict[str, float]:
        for k, x in v.items():
            if not math.isfinite(x):
                raise ValueError(f"{k}: value {x} is not finite")
        return v

    @field_validator("per_class_iou")
    @classmethod
    def _iou_range(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("per_class_iou must name at least one class")
        bad = {k: x for k, x in v.items() if not 0.0 <= x <= 1.0}
        if bad:
            raise ValueError(f"IoU must be in [0, 1]; out of range: {bad}")
        return v


def model_card_keys(model_name: str, version: str, alias: str = "champion", prefix: str = "model-cards") -> tuple[str, str]:
    """(versioned key, alias key): ``<prefix>/<model>/v<version>.json``, ``<prefix>/<model>/<alias>.json``."""
    base = f"{prefix.strip('/')}/{model_name}"
    return f"{base}/v{version}.json", f"{base}/{alias}.json"


def publish_model_card(store: S3Store, card: ModelCard | Mapping[str, Any], bucket: str, *,
                       prefix: str = "model-cards", create_bucket: bool = False) -> list[str]:
    """Write the model card JSON for consumers; returns the two ``s3://`` URIs written.

    The versioned card (``.../v<version>.json``) is written first and the alias
    card (``.../champion.json``) last, each atomically, so the alias never points
    at a card that is not fully published.

    Raises:
        pydantic.ValidationError: ``card`` is a mapping with a missing/invalid field.
        BucketMissingError / CredentialsError / EndpointUnreachableError / StorageError.
    """
    card = card if isinstance(card, ModelCard) else ModelCard.model_validate(dict(card))
    body = card.model_dump(mode="json")
    versioned, alias = model_card_keys(card.model_name, card.version, card.alias, prefix)
    return [store.put_json(bucket, versioned, body, create_bucket=create_bucket),
            store.put_json(bucket, alias, body)]


def read_model_card(store: S3Store, bucket: str, model_name: str, alias: str = "champion",
                    prefix: str = "model-cards") -> ModelCard:
    """Read and validate the card published under ``alias`` (see :func:`publish_model_card`)."""
    _, key = model_card_keys(model_name, "0", alias, prefix)
    return ModelCard.model_validate_json(store.get_bytes(bucket, key))


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
