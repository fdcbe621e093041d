"""Load and validate ``params.yaml`` once: the single source of configuration.

Every step (DVC stage, Prefect task, CLI command) receives a validated
:class:`Params`. Errors name the offending key, e.g. ``train.lr: Input should be
a valid number``. Relative paths are resolved against the folder that holds the
params file, so the pipeline behaves the same whatever the working directory.

Environment overrides (applied after the profile overlay):

* ``LERENET_SOURCE``      -> ``data.source``
* ``LERENET_INCOMING``    -> ``data.incoming``
* ``LERENET_PROFILE``     -> ``profile``
* ``MLFLOW_TRACKING_URI`` -> ``mlflow.tracking_uri``
* ``LERENET_DASK_ADDRESS`` -> ``distributed.address``
* ``LERENET_LOCK_TIMEOUT`` -> ``distributed.lock_timeout``
"""

from __future__ import annotations

import copy, os  # noqa: E401
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from pipeline.class_names import CLASS_NAME_PATTERN, ClassName, check_class_name  # noqa: F401  (re-exported)
from pipeline.config_ops import (  # noqa: F401  (re-exported)
    DistributedParams, RetrainParams, ServicesParams, _Section, check_timezone)
from pipeline.config_model import (  # noqa: F401  (re-exported)
    MODEL_NAMES, PRODUCTION_MODEL, SKIP_SOURCES, ModelName, ModelParams, Variant)

DEFAULT_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


class ConfigError(ValueError):
    """``params.yaml`` is missing, unreadable or invalid; the message names file and key."""


class DataParams(_Section):
    """Where data comes from and how masks are read.

    ``mask_threshold``: defect where mask value > threshold, in 0..254 (8-bit masks). ``soft_tolerance``: a pixel
    is "soft" (neither near 0 nor near 255) if ``tol < v < 255 - tol``. ``max_soft_fraction``: masks above it are
    rejected as not binarisable. ``near_duplicate_distance``: perceptual-hash Hamming distance (64-bit pHash) at or
    below which two images are near-duplicates. ``near_duplicate_allow``: reviewed pairs of defect images (paths
    relative to the source root, ``<Class>/Images/<file>``) that are near-duplicates across classes and are
    accepted anyway (validation reports them instead of failing).
    """

    source: Path
    incoming: Path | None = None
    dir: Path = Path("data")
    mask_threshold: int = Field(127, ge=0, le=254)
    soft_tolerance: int = Field(32, ge=0, le=127)
    max_soft_fraction: float = Field(0.25, ge=0.0, le=1.0)
    near_duplicate_distance: int = Field(2, ge=0, le=64)
    near_duplicate_allow: list[tuple[str, str]] = Field(default_factory=list)


class SplitParams(_Section):
    """Fold split and saved test episodes (paper and standard protocols, and the ``mismatched``
    control: the paper episodes with the support from another novel class, drawn with
    ``mismatched_seed``; pipeline/split.py)."""

    shots: list[int] = Field(default_factory=lambda: [1, 5])
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    paper_seed: int = 1334
    mismatched_seed: int = Field(2718, ge=0)
    standard_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    standard_episodes: int = Field(1000, ge=1)
    seed: int = 0

    @field_validator("shots")
    @classmethod
    def _positive_shots(cls, v: list[int]) -> list[int]:
        if not v or any(k < 1 for k in v):
            raise ValueError("shots must be a non-empty list of integers >= 1")
        return sorted(set(v))


class TrainParams(_Section):
    """Episodic training (paper §5.1 / authors' code): SGD + poly schedule, BCE loss."""

    image_size: int = Field(200, ge=32)
    shots: int = Field(1, ge=1)
    episodes: int = Field(3000, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(0.005, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0)
    poly_power: float = Field(0.9, ge=0)
    backbone_lr_mult: float = Field(0.1, ge=0)
    augment: bool = True
    feature_views: int = Field(4, ge=0)
    checkpoint_every: int = Field(500, ge=1)
    val_every: int = Field(500, ge=1)
    val_episodes: int = Field(200, ge=1)
    seed: int = 0
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # support learning (docs/model.md, docs/experiments.md)
    loss: Literal["bce", "dice"] = "bce"          # dice = SOFS mixed normal Dice + bce_weight * BCE
    bce_weight: float = Field(0.01, ge=0)
    negative_share: float = Field(0.0, ge=0, lt=1)  # share of episodes whose query has none of the support's defect
    selection_classes: int = Field(0, ge=0)        # whole training classes held out for model selection (0: images)
    selection_material: bool = False               # hold out every training class of one material instead
    untrained_models: list[Literal["lerenet", "prototype"]] = []  # scored and gated at their training-free start
    validate_at_start: bool = False                # score the untrained network too (step 0 is selectable)
    support_penalty: float = Field(0.0, ge=0.0, le=1.0)  # selection score = val mIoU - this x val mIoU with
                                                   # supports of another selection class (0: plain mIoU)
    presence_budget: float | None = Field(None, ge=0.0, allow_inf_nan=False)  # mIoU points (pipeline/training/gate.py)
    presence_fp: float | None = Field(None, ge=0.0, le=1.0)  # max share of training-side defect-free images flagged
    presence_small_area: float | None = Field(None, gt=0.0, le=1.0)  # small supports (mean defect share <= this)
                                                   # get their own gate threshold (pipeline/inference/gate.py)
    presence_references: int = Field(0, ge=0, le=16)  # R defect-free reference images per material: a second gate
                                                   # threshold on the score relative to them (0: off)
    presence_reference_area: float = Field(0.0, ge=0.0, le=1.0)  # c: that score on the k-th highest logit,
                                                   # k = c x support share x cells (0: the max; inference/gate.py)
    presence_fp_scope: Literal["all", "gated"] = "all"  # defect-free queries that raise the max-logit threshold:
                                                   # all, or those it gates (no references; training/gate.py)
    per_model: dict[ModelName, dict[str, Any]] = {}  # one model's train settings over these (Params.for_model)

    @field_validator("per_model")
    @classmethod
    def _per_model_valid(cls, v: dict[str, dict[str, Any]], info: Any) -> dict[str, dict[str, Any]]:
        for name, over in v.items():
            if "per_model" in over:
                raise ValueError(f"{name}: per_model cannot be nested")
            try:
                TrainParams.model_validate({**info.data, **over, "per_model": {}})
            except ValidationError as exc:
                bad = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"{name}: {bad}") from None
        return v


class EvaluateParams(_Section):
    """Scoring on the saved episodes; latency; overlay pictures.

    ``batch_size``: episodes per forward pass. ``log_pyfunc``: also log each evaluated model as an
    MLflow pyfunc (``pipeline/serving/pyfunc.py``) in its nested run, loadable as ``runs:/<run_id>/model``.
    """

    protocols: list[Literal["paper", "standard"]] = Field(default_factory=lambda: ["paper", "standard"])
    latency_queries: int = Field(20, ge=1)
    overlay_episodes_per_class: int = Field(2, ge=0)
    batch_size: int = Field(64, ge=1)
    log_pyfunc: bool = True


class MlflowParams(_Section):
    """Tracking/registry location and the champion/challenger promotion gate."""

    tracking_uri: str = "sqlite:///mlruns.db"
    experiment: str = "lerenet-defects"
    registered_model: str = "lerenet-defects"
    promotion_margin: float = Field(0.005, ge=0)


class ServeParams(_Section):
    """Limits of the model served over REST (``mlflow models serve``; ``docs/inference.md``).

    ``max_request_bytes``: bytes of base64 image data (all supports, masks and queries) one request may carry,
    checked before anything is decoded; stored in each logged pyfunc's ``model_config`` (``log_pyfunc``), overridden
    when serving by ``SERVING_MODEL_CONFIG='{"max_request_bytes": N}'``. Default 32 MiB (= ``serving.limits.
    DEFAULT_MAX_REQUEST_BYTES``). Not a training setting: excluded from ``params_hash``."""

    max_request_bytes: int = Field(32 * 1024 * 1024, gt=0, le=2**31 - 1, strict=True)


class ClassesParams(_Section):
    """``dir``: the store of defect classes by name (``lerenet classes``, ``pipeline/classes_store.py``), one folder
    per class; served with ``LERENET_CLASS_STORE=<dir>`` (docs/inference.md). Excluded from ``params_hash``."""

    dir: Path = Path("classes")


class Params(_Section):
    """All validated parameters. ``root`` is the folder of the params file."""

    root: Path
    profile: str = "cpu"
    data: DataParams
    folds: dict[int, list[ClassName]]
    split: SplitParams = SplitParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    mlflow: MlflowParams = MlflowParams()
    serve: ServeParams = ServeParams()
    classes: ClassesParams = ClassesParams()
    retrain: RetrainParams = RetrainParams()
    services: ServicesParams = ServicesParams()
    distributed: DistributedParams = DistributedParams()

    @field_validator("folds")
    @classmethod
    def _folds_disjoint(cls, v: dict[int, list[str]]) -> dict[int, list[str]]:
        if not v:
            raise ValueError("at least one fold is required")
        seen: dict[str, int] = {}
        for fold, classes in v.items():
            if not classes:
                raise ValueError(f"fold {fold} has no test classes")
            for c in classes:
                if c in seen:
                    raise ValueError(f"class {c!r} is in fold {seen[c]} and fold {fold}; folds must be disjoint")
                seen[c] = fold
        return v

    @model_validator(mode="after")
    def _check_and_resolve_paths(self) -> "Params":
        if "lerenet" in self.train.untrained_models and not self.model.prior_skip:
            raise ValueError("train.untrained_models lists lerenet but model.prior_skip is false: an untrained "
                             "LERENet is then a random network; set model.prior_skip: true or remove lerenet")
        def res(p: Path | None) -> Path | None:
            return None if p is None else (p if p.is_absolute() else (self.root / p).resolve())

        object.__setattr__(self, "data", self.data.model_copy(update={
            "source": res(self.data.source), "incoming": res(self.data.incoming), "dir": res(self.data.dir)}))
        if self.model.weights is not None:
            object.__setattr__(self, "model", self.model.model_copy(update={"weights": res(self.model.weights)}))
        object.__setattr__(self, "services", self.services.model_copy(
            update={"state_dir": res(self.services.state_dir)}))
        object.__setattr__(self, "classes", self.classes.model_copy(update={"dir": res(self.classes.dir)}))
        return self

    # ---- derived views -------------------------------------------------
    @property
    def all_classes(self) -> list[str]:
        """All classes named in the fold table, in fold order."""
        return [c for f in sorted(self.folds) for c in self.folds[f]]

    def test_classes(self, fold: int) -> list[str]:
        """Novel (test) classes of ``fold``; raises KeyError naming the known folds."""
        if fold not in self.folds:
            raise KeyError(f"fold {fold} is not in params.yaml folds {sorted(self.folds)}")
        return list(self.folds[fold])

    def for_model(self, name: str) -> "Params":
        """The params ``name`` trains with: ``train.per_model[name]`` over ``train``, and ``per_model`` emptied (so
        one model's entry does not change another's params hash). Overrides were validated with the file."""
        over = self.train.per_model.get(name) or {}  # type: ignore[call-overload]
        return self.model_copy(update={"train": self.train.model_copy(update={**over, "per_model": {}})})

    def train_classes(self, fold: int | None) -> list[str]:
        """Base (training) classes of ``fold``: all other folds; ``None`` = all classes."""
        if fold is None:
            return self.all_classes
        test = set(self.test_classes(fold))
        return [c for c in self.all_classes if c not in test]


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


_ENV_OVERRIDES = {"LERENET_SOURCE": ("data", "source"), "LERENET_INCOMING": ("data", "incoming"),
                  "MLFLOW_TRACKING_URI": ("mlflow", "tracking_uri"), "LERENET_DASK_ADDRESS": ("distributed", "address"),
                  "LERENET_LOCK_TIMEOUT": ("distributed", "lock_timeout")}


def resolve_raw(raw: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Apply the selected profile overlay and environment overrides to raw YAML.

    Raises :class:`ConfigError` if the profile does not exist.
    """
    env = dict(os.environ) if env is None else env
    raw = copy.deepcopy(raw)
    profiles = raw.pop("profiles", {}) or {}
    profile = env.get("LERENET_PROFILE") or raw.get("profile", "cpu")
    if profile not in profiles and profile != "cpu":
        raise ConfigError(f"profile {profile!r} is not defined under 'profiles:' (known: {sorted(profiles)})")
    raw = _deep_merge(raw, profiles.get(profile) or {})
    raw["profile"] = profile
    raw.setdefault("data", {})
    for var, (section, key) in _ENV_OVERRIDES.items():
        if env.get(var):
            raw.setdefault(section, {})[key] = env[var]
    return raw


def load_params(path: str | os.PathLike[str] | None = None, overrides: dict[str, Any] | None = None,
                env: dict[str, str] | None = None) -> Params:
    """Read, overlay and validate a params file.

    Args:
        path: params YAML; default ``params.yaml`` next to the project root, or
            ``$LERENET_PARAMS``.
        overrides: nested dict merged last (e.g. ``{"train": {"episodes": 10}}``),
            used by tests and CLI flags.
        env: environment used for overrides (default ``os.environ``).

    Raises:
        ConfigError: file missing/unreadable, YAML invalid, or a key with a wrong
            type/value; the message lists every offending key as ``a.b.c``.
    """
    env = dict(os.environ) if env is None else env
    p = Path(path or env.get("LERENET_PARAMS") or DEFAULT_PARAMS).resolve()
    if not p.is_file():
        raise ConfigError(f"{p}: params file not found (pass --params or set LERENET_PARAMS)")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: top level must be a mapping of sections")
    raw = resolve_raw(raw, env)
    if overrides:
        raw = _deep_merge(raw, overrides)
    raw["root"] = str(p.parent)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(x) for x in err["loc"])
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{p}: invalid parameters:\n" + "\n".join(lines)) from None
