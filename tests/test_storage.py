"""pipeline/storage.py against a real SeaweedFS server (started on free ports by pipeline.services)."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from pydantic import ValidationError

from _s3_server import assert_no_process, free_ports, services_params
from pipeline import services as svc
from pipeline.model_card import ModelCard, publish_model_card, read_model_card
from pipeline.storage import (
    TMP_PREFIX,
    BucketMissingError,
    CredentialsError,
    EndpointUnreachableError,
    S3Settings,
    S3Store,
    StorageError,
    read_env_file,
    settings_from_params,
)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(params, store) on a real SeaweedFS for this module; stopped (and checked gone) at the end."""
    params = services_params(tmp_path_factory.mktemp("s3state"))
    env = {"AWS_ACCESS_KEY_ID": "lerenet-test-key", "AWS_SECRET_ACCESS_KEY": "lerenet-test-secret-0123456789"}
    rows = svc.up(params, ["seaweedfs"], env=env)
    pids = [r.pid for r in rows]
    creds = svc.ensure_credentials(params, env)
    store = svc.local_store(params, creds, max_attempts=2, connect_timeout=1.0, read_timeout=10.0)
    try:
        yield params, store
    finally:
        svc.down(params)
        assert_no_process(pids)


class FailingReader(io.RawIOBase):
    """A source that yields ``fail_at`` bytes of data, then raises OSError (like a disk dying)."""

    def __init__(self, fail_at: int):
        super().__init__()
        self.fail_at = fail_at
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.pos >= self.fail_at:
            raise OSError(f"simulated read failure at byte {self.pos}")
        n = min(len(b), self.fail_at - self.pos)
        b[:n] = b"\xab" * n
        self.pos += n
        return n


def test_put_get_roundtrip_hides_temp_keys(s3):
    params, store = s3
    bucket = params.services.models_bucket
    uri = store.put_bytes(bucket, "t/roundtrip.bin", b"payload")
    assert uri == f"s3://{bucket}/t/roundtrip.bin"
    assert store.get_bytes(bucket, "t/roundtrip.bin") == b"payload"
    assert store.exists(bucket, "t/roundtrip.bin") and not store.exists(bucket, "t/absent.bin")
    assert store.list_keys(bucket, "t/") == ["t/roundtrip.bin"]
    assert store.list_keys(bucket, TMP_PREFIX, include_tmp=True) == []  # temp key removed after the copy


def test_file_upload_multipart_size(s3, tmp_path):
    params, store = s3
    bucket = params.services.models_bucket
    src = tmp_path / "big.bin"
    data = bytes(range(256)) * (12 * 2**20 // 256)  # 12 MiB: multipart (8 MiB parts) + managed copy
    src.write_bytes(data)
    store.put_file(bucket, "t/big.bin", src, content_type="application/octet-stream")
    assert store.get_bytes(bucket, "t/big.bin") == data
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        store.put_file(bucket, "t/x.bin", tmp_path / "nope.bin")


@pytest.mark.parametrize("size,fail_at", [(3 * 2**20, 2**20 + 17), (20 * 2**20, 17 * 2**20)],
                         ids=["single-put", "multipart"])
def test_half_failed_upload_leaves_no_partial_object(s3, size, fail_at):
    params, store = s3
    bucket = params.services.models_bucket
    key = f"t/partial-{size}.bin"
    store.put_bytes(bucket, key, b"previous complete version")
    with pytest.raises(StorageError, match=rf"s3://{bucket}/{key}.*reading the source failed after"):
        store.put_fileobj(bucket, key, io.BufferedReader(FailingReader(fail_at)))
    # the final key still holds the previous complete object; no temp object, no open multipart upload
    assert store.get_bytes(bucket, key) == b"previous complete version"
    assert store.list_keys(bucket, TMP_PREFIX, include_tmp=True) == []
    assert not store.client.list_multipart_uploads(Bucket=bucket).get("Uploads")
    fresh = f"t/fresh-{size}.bin"
    with pytest.raises(StorageError):
        store.put_fileobj(bucket, fresh, io.BufferedReader(FailingReader(fail_at)))
    assert not store.exists(bucket, fresh)


def test_server_down_clear_error_after_bounded_retries():
    (port,) = free_ports(1)  # nothing listens there
    store = S3Store(S3Settings(endpoint_url=f"http://127.0.0.1:{port}", access_key_id="k", secret_access_key="s",
                               max_attempts=3, connect_timeout=0.5, read_timeout=1.0))
    attempts = []
    store.client.meta.events.register("before-send.s3.*", lambda **kw: attempts.append(1))
    with pytest.raises(EndpointUnreachableError, match=rf"http://127.0.0.1:{port} is unreachable .*after 3 attempt"):
        store.put_bytes("any-bucket", "k.json", b"{}")
    assert len(attempts) == 3


def test_wrong_credentials_clear_error_nothing_written(s3):
    params, store = s3
    bucket = params.services.models_bucket
    for bad in (replace(store.settings, secret_access_key="wrong-secret"),
                replace(store.settings, access_key_id="NOSUCHKEY", secret_access_key="wrong-secret")):
        with pytest.raises(CredentialsError, match=rf"{store.settings.endpoint_url} rejected the credentials"):
            S3Store(bad).put_bytes(bucket, "t/should-not-exist.json", b"{}")
    assert not store.exists(bucket, "t/should-not-exist.json")
    assert store.list_keys(bucket, TMP_PREFIX, include_tmp=True) == []


def test_missing_bucket_is_an_error_unless_create_requested(s3):
    params, store = s3
    with pytest.raises(BucketMissingError, match=r"bucket 'no-such-bucket' does not exist on S3 endpoint http://"):
        store.put_bytes("no-such-bucket", "a.json", b"{}")
    assert not store.bucket_exists("no-such-bucket")  # the server did not auto-create it either
    with pytest.raises(BucketMissingError):
        store.get_bytes("no-such-bucket", "a.json")
    store.put_bytes("created-on-request", "a.json", b"{}", create_bucket=True)
    assert store.get_bytes("created-on-request", "a.json") == b"{}"
    assert store.ensure_bucket("created-on-request") is False


def _card(**kw) -> dict:
    card = {"model_name": "lerenet-defects", "version": 3, "run_id": "abc123", "data_version": "md5:0123abcd",
            "metrics": {"mIoU": 0.42, "FB-IoU": 0.67},
            "per_class_iou": {"MT_Crack": 0.31, "Steel_Pa": 0.55, "Leather_Cut": 0.40}}
    card.update(kw)
    return card


def test_publish_model_card_roundtrip(s3):
    params, store = s3
    bucket = params.services.models_bucket
    uris = publish_model_card(store, _card(), bucket)
    assert uris == [f"s3://{bucket}/model-cards/lerenet-defects/v3.json",
                    f"s3://{bucket}/model-cards/lerenet-defects/champion.json"]
    body = json.loads(store.get_bytes(bucket, "model-cards/lerenet-defects/champion.json"))
    assert body["per_class_iou"]["Steel_Pa"] == 0.55 and body["data_version"] == "md5:0123abcd"
    assert body["version"] == "3" and body["metrics"]["FB-IoU"] == 0.67
    card = read_model_card(store, bucket, "lerenet-defects")
    assert isinstance(card, ModelCard) and card.run_id == "abc123"
    ctype = store.client.head_object(Bucket=bucket, Key="model-cards/lerenet-defects/v3.json")["ContentType"]
    assert ctype == "application/json"


def test_publish_model_card_rejects_bad_card_and_writes_nothing(s3):
    params, store = s3
    bucket = params.services.models_bucket
    with pytest.raises(ValidationError, match="per_class_iou"):
        publish_model_card(store, _card(model_name="bad-card", per_class_iou={"MT_Crack": 1.5}), bucket)
    with pytest.raises(ValidationError, match="data_version"):
        publish_model_card(store, {k: v for k, v in _card(model_name="bad-card").items() if k != "data_version"}, bucket)
    assert store.list_keys(bucket, "model-cards/bad-card/") == []


def test_settings_from_params_env_then_credentials_file(tmp_path):
    params = services_params(tmp_path / "state")
    s = settings_from_params(params, env={})
    assert s.endpoint_url == f"http://127.0.0.1:{params.services.s3_port}" and s.access_key_id is None
    creds = svc.ensure_credentials(params, env={})  # generates the git-ignored file
    assert (tmp_path / "state" / "credentials.env").stat().st_mode & 0o777 == 0o600
    s = settings_from_params(params, env={})
    assert (s.access_key_id, s.secret_access_key) == (creds.access_key_id, creds.secret_access_key)
    assert svc.ensure_credentials(params, env={}) == creds  # stable on later calls
    s = settings_from_params(params, env={"LERENET_S3_ENDPOINT_URL": "http://s3.example:9000",
                                          "AWS_ACCESS_KEY_ID": "A", "AWS_SECRET_ACCESS_KEY": "B"})
    assert (s.endpoint_url, s.access_key_id, s.secret_access_key) == ("http://s3.example:9000", "A", "B")
    bad = tmp_path / "bad.env"
    bad.write_text("# comment\nGOOD=1\nthis line is wrong\n")
    with pytest.raises(StorageError, match=r"bad.env:3: expected KEY=value"):
        read_env_file(bad)
    with pytest.raises(ValueError, match="max_attempts"):
        S3Settings(max_attempts=0)


def _prototype_model_and_tables(params, tmp_path, per_class_rows: str):
    """A prototype model file at ``tmp_path/model.pt`` and ``metrics/per_class/fold0.csv`` with ``per_class_rows``
    (the inputs of a registered version's model card); returns the model file."""
    from model import build_model
    from pipeline.checkpoint import save_model

    ckpt = tmp_path / "model.pt"
    save_model(ckpt, build_model("prototype", pretrained=False),
               dict(model="prototype", backbone="efficientnet_lite0", freeze_backbone=True, variant="mpr+mpe*",
                    channels=64, image_size=64))
    per_class = params.root / "metrics" / "per_class"
    per_class.mkdir(parents=True)
    (per_class / "fold0.csv").write_text("fold,model,shots,protocol,class_name,iou,iou_std,episodes\n" + per_class_rows)
    return ckpt


def test_promoted_champion_publishes_its_model_card(s3, small_params_file, tmp_path):
    """register -> promote -> model card in the models bucket, built from the version's CV tags and the
    per-class tables; nothing is published for a version that was not promoted or without S3."""
    from pipeline import registry
    from pipeline.config import load_params
    from pipeline.model_card import publish_champion_card

    s3_params, store = s3
    params = load_params(small_params_file, env={})
    ckpt = _prototype_model_and_tables(params, tmp_path, "0,lerenet,1,paper,MT_Uneven,0.25,,5\n"
                                       "0,lerenet,5,paper,MT_Uneven,0.5,,5\n0,lerenet,1,standard,MT_Uneven,0.9,0.1,20\n")
    env = {"LERENET_S3_ENDPOINT_URL": svc.s3_endpoint(s3_params),
           "AWS_ACCESS_KEY_ID": store.settings.access_key_id,
           "AWS_SECRET_ACCESS_KEY": store.settings.secret_access_key}
    cells = [registry.CvCell(0, "paper", 1, 0.4, 0.6, "e0")]
    v1 = registry.register(params, ckpt, cells, model_name="prototype")
    assert publish_champion_card(params, v1, promoted=True, env={}) == []  # embedded default: no S3
    decision = registry.promote(params, v1)
    uris = publish_champion_card(params, v1, decision.promoted, env=env)
    assert uris[-1].endswith("/champion.json") and len(uris) == 2
    card = read_model_card(store, params.services.models_bucket, params.mlflow.registered_model)
    assert card.version == v1 and card.metrics["paper.k1.miou"] == pytest.approx(0.4)
    tags = registry.client(params).get_model_version(params.mlflow.registered_model, v1).tags
    assert card.per_class_iou == {"MT_Uneven": 0.25} and card.data_version == tags["data_version"]
    v2 = registry.register(params, ckpt, [registry.CvCell(0, "paper", 1, 0.1, 0.3, "e0")], model_name="prototype")
    d2 = registry.promote(params, v2)
    assert not d2.promoted and publish_champion_card(params, v2, d2.promoted, env=env) == []
    assert read_model_card(store, params.services.models_bucket, params.mlflow.registered_model).version == v1


def test_promotion_retried_after_card_failure_changes_nothing_and_publishes_the_card(
        s3, small_params_file, tmp_path, monkeypatch):
    """The flow's promote task after the card failed (S3 unreachable: a closed port) is retried: the retry
    keeps the recorded decision (champion_before, compared cells), publishes the card once the store is
    back, and between the two the version's ``model_card`` tag and the record say why the card lags."""
    import json as _json

    from pipeline import registry
    from pipeline.config import load_params
    from pipeline.faults import is_transient
    from pipeline.usecases.register import ModelCardError, gate

    s3_params, store = s3
    params = load_params(small_params_file, env={})
    ckpt = _prototype_model_and_tables(params, tmp_path, "0,lerenet,1,paper,MT_Uneven,0.25,,5\n")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", store.settings.access_key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", store.settings.secret_access_key)
    monkeypatch.setenv("LERENET_S3_ENDPOINT_URL", svc.s3_endpoint(s3_params))
    bucket, name = params.services.models_bucket, params.mlflow.registered_model
    v1 = registry.register(params, ckpt, [registry.CvCell(0, "paper", 1, 0.4, 0.6, "e0")], model_name="prototype")
    assert gate(params, v1).card_uris
    v2 = registry.register(params, ckpt, [registry.CvCell(0, "paper", 1, 0.6, 0.7, "e0")], model_name="prototype")

    monkeypatch.setenv("LERENET_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")  # store unreachable
    with pytest.raises(ModelCardError, match=rf"v{v2} was promoted, but its model card was not published") as err:
        gate(params, v2)
    assert is_transient(err.value)  # so the flow's promote task is retried
    tags = registry.client(params).get_model_version(name, v2).tags
    assert registry.alias_version(params, registry.CHAMPION) == v2
    assert tags["model_card"].startswith("failed: ") and "unreachable" in tags["model_card"]
    record = _json.loads((params.root / "reports" / "registry.json").read_text())
    assert record["champion_before"] == v1 and "not published" in record["model_card"]
    decided = {k: v for k, v in tags.items() if k.startswith("decision")}

    monkeypatch.setenv("LERENET_S3_ENDPOINT_URL", svc.s3_endpoint(s3_params))  # the store is back: the retry
    retry = gate(params, v2)
    assert retry.decision.champion_before == v1 and retry.decision.compared == ["cv.f0.paper.k1"]
    tags = registry.client(params).get_model_version(name, v2).tags
    assert {k: v for k, v in tags.items() if k.startswith("decision")} == decided  # decision not rewritten
    assert tags["model_card"] == "published: " + ",".join(retry.card_uris)
    assert read_model_card(store, bucket, name).version == v2
    again = gate(params, v2)  # a further retry changes nothing
    assert again.decision == retry.decision and again.card_uris == retry.card_uris
    # a late retry of v1's promotion after v2 took over: v1 stays decided, the champion card stays v2's
    assert gate(params, v1).decision.promoted and registry.alias_version(params, registry.CHAMPION) == v2
    assert read_model_card(store, bucket, name).version == v2
