"""The model section of ``params.yaml`` (:class:`ModelParams`) and the model names of the pipeline, defined once;
:mod:`pipeline.config` assembles it into :class:`~pipeline.config.Params` and re-exports every name here."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from pipeline.config_ops import _Section
from pipeline.inference.limits import MAX_TRANSDUCTIVE_STEPS


ModelName = Literal["lerenet", "baseline", "prototype", "sofs", "jaffnet"]
#: the model names of the pipeline, defined once here (``model.MODELS`` is the model package's own
#: build table; tests/test_architecture.py checks that both list the same names)
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
#: the architecture deployed to users: trained on every class (``train_production``) and registered
PRODUCTION_MODEL = "lerenet"
Variant = Literal["mpr", "mpe", "mpe*", "mpr+mpe", "mpr+mpe*"]


# = model.priors.SKIP_FACTORS (a test keeps them equal; not imported: only training depends on model/)
SKIP_SOURCES = ("nn", "linear", "proto", "self", "logistic", "hypercolumn")


class ModelParams(_Section):
    """Which models to train/evaluate and their backbone (see ``model.build_model``)."""

    names: list[ModelName] = Field(default_factory=lambda: ["lerenet", "baseline", "prototype"])
    backbone: Literal["efficientnet_lite0", "efficientnet_lite2", "resnet50", "vgg16_bn"] = "efficientnet_lite0"
    freeze_backbone: bool = True
    weights: Path | None = None
    variant: Variant = "mpr+mpe*"
    channels: int = Field(256, ge=8)
    dilated: bool = False  # ResNet-50 only: dilated layer3/layer4, output stride 8
    # LERENet only (model.LERENet): frozen-feature guidance, prior skip, raw-query path (docs/model.md)
    priors: list[Literal["fg", "abnormal", "nn", "linear", "proto", "self", "logistic", "hypercolumn"]] = Field(
        default_factory=list)
    prior_skip: bool = False
    skip_source: str = "nn"  # nn | linear | proto, or several joined by "+" (model.priors.nearest_neighbour_score)

    @field_validator("skip_source")
    @classmethod
    def _skip_source(cls, v: str) -> str:
        kinds = v.split("+")
        if not v or any(k not in SKIP_SOURCES for k in kinds) or len(set(kinds)) != len(kinds):
            raise ValueError(f"skip_source must be one or more of {', '.join(SKIP_SOURCES)} joined by '+'; got {v!r}")
        return v
    query_path: Literal["on", "dropout", "off"] = "on"

    @field_validator("query_path", mode="before")
    @classmethod
    def _yaml_on_off(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare on/off as a boolean: `query_path: off` means "off"
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v

    @field_validator("priors")
    @classmethod
    def _distinct_priors(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"priors must not repeat a kind, got {v}")
        return v

    native_area: float | None = Field(None, gt=0, le=1)  # SOFS non-resizing for lerenet and sofs: support defects
                                                         # <= this share of the image -> native crops / windows
    transductive_steps: int = Field(0, ge=0, le=MAX_TRANSDUCTIVE_STEPS)  # RePRI-style refinement of the hypercolumn probe per query

    @field_validator("transductive_steps")
    @classmethod
    def _transductive_needs_hypercolumn(cls, v: int, info: Any) -> int:
        d = info.data
        if v and "hypercolumn" not in d.get("priors", []) and "hypercolumn" not in d.get("skip_source", "").split("+"):
            raise ValueError("refines the hypercolumn probe: add hypercolumn to model.priors (or model.skip_source) "
                             "or set it to 0")
        return v

    # SOFS only (model.SOFS): its mechanisms as switches for the ablation (issue 12, docs/experiments.md)
    sofs_mask_resize: Literal["area", "nearest"] = "area"  # prototype intensity downsampling, or binary nearest
    sofs_priors: bool = True                                # semantic + abnormal priors in the query merge

    def options(self, name: str) -> dict[str, Any]:
        """The model-specific keywords of ``model.build_model`` for model ``name`` (empty: the published model)."""
        if name == "lerenet":
            return self.lerenet_options()
        if name != "sofs":
            return {}
        defaults = {"mask_resize": "area", "priors": True, "native_area": None}
        return {k: v for k, v in (("mask_resize", self.sofs_mask_resize), ("priors", self.sofs_priors),
                                  ("native_area", self.native_area)) if v != defaults[k]}

    def lerenet_options(self) -> dict[str, Any]:
        """The LERENet-only keywords of ``model.build_model`` (empty where they keep the paper's model)."""
        opts: dict[str, Any] = {}
        if self.priors:
            opts["priors"] = list(self.priors)
        if self.prior_skip:
            opts["prior_skip"] = True
            if self.skip_source != "nn":
                opts["skip_source"] = self.skip_source
        if self.query_path != "on":
            opts["query_path"] = self.query_path
        if self.transductive_steps:
            opts["transductive_steps"] = self.transductive_steps
        if self.native_area is not None:
            opts["native_area"] = self.native_area
        return opts
