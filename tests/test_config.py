"""params.yaml is validated once; errors name the key; profiles and env overrides apply."""

from pathlib import Path

import pytest
import yaml

from pipeline.config import DEFAULT_PARAMS, ConfigError, load_params

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _base() -> dict:
    return yaml.safe_load(DEFAULT_PARAMS.read_text())


def test_project_params_validate_and_resolve_paths():
    params = load_params(DEFAULT_PARAMS, env={})
    assert params.data.source == (ROOT / "../shared/datasets/defects12").resolve()
    assert params.data.dir == ROOT / "data"
    assert params.train_classes(0) == [c for c in params.all_classes if c not in params.folds[0]]
    assert len(params.all_classes) == 12
    assert params.data.mask_threshold == 127


def test_wrong_type_names_the_key(tmp_path):
    raw = _base()
    raw["train"]["lr"] = "fast"
    with pytest.raises(ConfigError, match=r"train\.lr"):
        load_params(_write(tmp_path, raw), env={})


def test_unknown_key_is_rejected_with_its_name(tmp_path):
    raw = _base()
    raw["train"]["epochz"] = 3
    with pytest.raises(ConfigError, match=r"train\.epochz"):
        load_params(_write(tmp_path, raw), env={})


def test_overlapping_folds_rejected(tmp_path):
    raw = _base()
    raw["folds"][1].append(raw["folds"][0][0])
    with pytest.raises(ConfigError, match="folds must be disjoint"):
        load_params(_write(tmp_path, raw), env={})


def test_profile_overlay_and_env_overrides(tmp_path):
    path = _write(tmp_path, _base())
    paper = load_params(path, env={"LERENET_PROFILE": "paper"})
    assert paper.profile == "paper"
    assert paper.model.backbone == "resnet50" and paper.model.freeze_backbone is False
    assert paper.train.batch_size == 2
    cpu = load_params(path, env={"LERENET_SOURCE": str(tmp_path / "src"), "MLFLOW_TRACKING_URI": "sqlite:///x.db"})
    assert cpu.model.backbone == "efficientnet_lite0"
    assert cpu.data.source == tmp_path / "src"
    assert cpu.mlflow.tracking_uri == "sqlite:///x.db"


def test_unknown_profile_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="profile 'gpu'"):
        load_params(_write(tmp_path, _base()), env={"LERENET_PROFILE": "gpu"})
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml", env={})


def test_overrides_merge_deeply(tmp_path):
    params = load_params(_write(tmp_path, _base()), overrides={"train": {"episodes": 7}}, env={})
    assert params.train.episodes == 7 and params.train.batch_size == _base()["train"]["batch_size"]


# ---- issue 14 item 10: parameters that have the right type but are wrong -----------------
@pytest.mark.parametrize("section,key,value", [
    ("train", "lr", float("inf")), ("train", "lr", float("nan")), ("train", "lr", float("-inf")),
    ("train", "momentum", float("nan")), ("data", "max_soft_fraction", float("nan")),
    ("split", "val_fraction", float("nan")), ("mlflow", "promotion_margin", float("inf")),
    ("services", "start_timeout", float("inf")),
])
def test_config_rejects_non_finite_float(tmp_path, section, key, value):
    raw = _base()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: Input should be a finite number"):
        load_params(_write(tmp_path, raw), env={})


@pytest.mark.parametrize("entry,message", [
    ({"sofs": {"lr": -1}}, r"train\.per_model: .*sofs: lr: Input should be greater than 0"),
    ({"sofs": {"lrr": 0.1}}, r"train\.per_model: .*sofs: lrr: Extra inputs are not permitted"),
    ({"sofs": {"per_model": {}}}, r"train\.per_model: .*sofs: per_model cannot be nested"),
    ({"unet": {"lr": 0.1}}, r"train\.per_model\.unet\.\[key\]: Input should be 'lerenet'"),
])
def test_config_rejects_bad_per_model_train_settings(tmp_path, entry, message):
    raw = _base()
    raw["train"]["per_model"] = entry
    with pytest.raises(ConfigError, match=message):
        load_params(_write(tmp_path, raw), env={})


def test_config_rejects_non_finite_float_written_as_yaml(tmp_path):
    """The YAML spellings a user types (`.inf`, `.nan`) reach the model as floats and are rejected."""
    for spelling in (".inf", ".nan", "-.Inf", ".NaN"):
        text = DEFAULT_PARAMS.read_text().replace("  lr: 0.05 ", f"  lr: {spelling} ", 1)
        assert f"lr: {spelling}" in text
        p = tmp_path / "params.yaml"
        p.write_text(text)
        with pytest.raises(ConfigError, match=r"train\.lr: Input should be a finite number"):
            load_params(p, env={})


@pytest.mark.parametrize("name", ["../../x", "..", "a/b", "a\\b", "/abs", "Leather Fold", "", ".hidden",
                                  "-rf", "x..y", "naïve", "a\x00b", "c" * 101])
def test_config_rejects_unsafe_fold_class_name(tmp_path, name):
    raw = _base()
    raw["folds"][1].append(name)
    position = len(raw["folds"][1]) - 1
    with pytest.raises(ConfigError, match=rf"folds\.1\.{position}: .*class name .* is not a safe folder name"):
        load_params(_write(tmp_path, raw), env={})


@pytest.mark.parametrize("name", ["Leather_Fold", "MT-Crack", "steel.v2", "A+B", "7", "c" * 100])
def test_config_accepts_safe_class_names(tmp_path, name):
    raw = _base()
    raw["folds"][1].append(name)
    assert name in load_params(_write(tmp_path, raw), env={}).folds[1]


def test_config_rejects_unsafe_class_name_arriving_in_incoming():
    """The retrain flow places new incoming class folders with extend_folds before writing params.yaml:
    an unsafe folder name stops it there, naming the folder."""
    from pipeline.classes import ClassTableError, extend_folds

    with pytest.raises(ClassTableError, match=r"new class folder 'Leather Fold' cannot join the fold table.*rename"):
        extend_folds({0: ["A"], 1: ["B"]}, {"A": 5, "B": 5, "Leather Fold": 3}, ["Leather Fold"])
    assert extend_folds({0: ["A"], 1: ["B"]}, {"A": 5, "B": 9, "Leather_Fold": 3}, ["Leather_Fold"]) == {
        0: ["A", "Leather_Fold"], 1: ["B"]}


# ---- issue 14 item 8: the served model's byte limit ----------------------------------------
def test_serve_max_request_bytes_default_and_validation(tmp_path):
    from pipeline.serving.limits import DEFAULT_MAX_REQUEST_BYTES

    assert load_params(DEFAULT_PARAMS, env={}).serve.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES == 32 * 2**20
    raw = _base()
    del raw["serve"]
    assert load_params(_write(tmp_path, raw), env={}).serve.max_request_bytes == DEFAULT_MAX_REQUEST_BYTES
    for bad in (0, -5, "32MiB", True, 1.5, 2**31):
        raw["serve"] = {"max_request_bytes": bad}
        with pytest.raises(ConfigError, match=r"serve\.max_request_bytes: "):
            load_params(_write(tmp_path, raw), env={})


# ---- issue 16: the retrain schedule's time zone -------------------------------------------
def test_retrain_timezone_defaults_to_utc_and_accepts_iana_names(tmp_path):
    raw = _base()
    raw["retrain"].pop("timezone", None)
    assert load_params(_write(tmp_path, raw), env={}).retrain.timezone == "UTC"
    raw["retrain"]["timezone"] = "Europe/Berlin"
    assert load_params(_write(tmp_path, raw), env={}).retrain.timezone == "Europe/Berlin"


@pytest.mark.parametrize("name", ["Berlin", "CET+1", "utc ", "Europe/Nowhere", ""])
def test_retrain_timezone_rejects_a_non_iana_name_naming_the_key(tmp_path, name):
    raw = _base()
    raw["retrain"]["timezone"] = name
    with pytest.raises(ConfigError, match=r"retrain\.timezone: .*not an IANA time zone name"):
        load_params(_write(tmp_path, raw), env={})
