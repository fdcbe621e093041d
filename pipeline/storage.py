"""What the pipeline itself reads and writes in S3-compatible object storage (boto3).

One job: a thin, fail-clearly layer over a boto3 S3 client, used for objects
the pipeline publishes for consumers (the champion's model card). DVC and
MLflow talk to the same store through their own S3 support; this module is not
in their path.

Behaviour (documented contract, covered by ``tests/test_storage.py`` against a
real SeaweedFS server):

* **Endpoint and credentials** come from :class:`S3Settings`: explicit values,
  else the environment (``LERENET_S3_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` /
  ``AWS_ENDPOINT_URL`` / ``MLFLOW_S3_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
  ``AWS_SECRET_ACCESS_KEY``), else, in :func:`settings_from_params`, the local
  services (``http://<services.host>:<services.s3_port>`` and
  ``<services.state_dir>/credentials.env``). ``endpoint_url=None`` means AWS S3.
* **Bounded retries**: botocore "standard" retry mode with ``max_attempts``
  attempts in total and explicit connect/read timeouts (seconds). When the
  endpoint cannot be reached after them, :class:`EndpointUnreachableError` names
  the endpoint, the operation and the attempt count.
* **Credentials** rejected by the server (``InvalidAccessKeyId``,
  ``SignatureDoesNotMatch``, ``AccessDenied``, HTTP 403) or missing raise
  :class:`CredentialsError` naming the endpoint and the access key id (never the
  secret). Nothing is written.
* **Missing bucket**: never created implicitly. Writers take
  ``create_bucket=False``; with the default a missing bucket raises
  :class:`BucketMissingError` naming bucket and endpoint and the fix
  (``lerenet services up`` creates the configured buckets, or pass
  ``create_bucket=True``). The local SeaweedFS is started with
  ``-s3.autoCreateBucket=false`` so it behaves like AWS S3 here.
* **Atomic uploads**: :meth:`S3Store.put_fileobj` (and ``put_bytes``,
  ``put_file``, ``put_json``) first uploads to a temporary key under
  :data:`TMP_PREFIX`, checks that the stored size equals the number of bytes
  read, then copies server-side to the final key and deletes the temporary
  key. A single S3 PUT is already all-or-nothing and an unfinished multipart
  upload is invisible (s3transfer aborts it on error), but the temp-then-copy
  step makes the guarantee independent of the server and of the transfer mode:
  the final key only ever receives a complete, size-checked object. If the
  process dies between the two steps a stray object may remain under
  ``.lerenet-tmp/`` (never under the final key); a bucket lifecycle rule on that
  prefix cleans it up.
"""

from __future__ import annotations

import io
import json
import os
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectionClosedError, ConnectTimeoutError,
                                 EndpointConnectionError, NoCredentialsError, PartialCredentialsError,
                                 ReadTimeoutError)

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import Params

TMP_PREFIX = ".lerenet-tmp/"
"""Prefix of temporary keys used by atomic uploads; consumers should ignore it."""

ENDPOINT_ENV_VARS = ("LERENET_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
"""Environment variables read, in this order, for the S3 endpoint URL."""

CREDENTIALS_FILE = "credentials.env"
"""Name of the git-ignored credentials file inside ``services.state_dir``."""

_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "InvalidToken",
                     "ExpiredToken", "AuthorizationHeaderMalformed"}
_MISSING_BUCKET_CODES = {"NoSuchBucket", "404"}
_UNREACHABLE = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)


class StorageError(RuntimeError):
    """An object-storage operation failed; the message names endpoint, bucket/key and what to do."""


class EndpointUnreachableError(StorageError):
    """The S3 endpoint could not be reached after the bounded retries."""


class CredentialsError(StorageError):
    """Credentials are missing or were rejected by the S3 endpoint."""


class BucketMissingError(StorageError):
    """The bucket does not exist (and ``create_bucket`` was not requested)."""


@dataclass(frozen=True)
class S3Settings:
    """How to reach an S3-compatible store.

    Attributes:
        endpoint_url: e.g. ``http://127.0.0.1:8333``; ``None`` = AWS S3.
        access_key_id / secret_access_key: credentials; ``None`` lets boto3 use
            its default chain (env, ``~/.aws``, instance role).
        region: signing region (SeaweedFS/MinIO accept ``us-east-1``).
        max_attempts: total attempts per request, >= 1 (botocore standard mode).
        connect_timeout / read_timeout: seconds, > 0.
    """

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    region: str = "us-east-1"
    max_attempts: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"S3Settings.max_attempts must be >= 1, got {self.max_attempts}")
        if self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ValueError("S3Settings timeouts must be > 0 seconds")

    @property
    def endpoint_label(self) -> str:
        """Endpoint as shown in error messages."""
        return self.endpoint_url or "AWS S3 (default endpoint)"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> "S3Settings":
        """Settings from environment variables (see :data:`ENDPOINT_ENV_VARS`), then ``overrides``."""
        env = os.environ if env is None else env
        endpoint = next((env[k] for k in ENDPOINT_ENV_VARS if env.get(k)), None)
        base = cls(endpoint_url=endpoint, access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
                   secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
                   region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or "us-east-1")
        return replace(base, **overrides)


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a ``KEY=value`` file (``#`` comments, blank lines, optional quotes).

    Raises:
        StorageError: a line is not ``KEY=value`` (names file and line number).
    """
    p = Path(path)
    out: dict[str, str] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):]
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise StorageError(f"{p}:{n}: expected KEY=value, got {line!r}")
        out[key.strip()] = value.strip().strip("'\"")
    return out


def settings_from_params(params: "Params", env: Mapping[str, str] | None = None, **overrides: Any) -> S3Settings:
    """Settings for the project's store: environment first, else the local services.

    Endpoint: first of :data:`ENDPOINT_ENV_VARS`, else
    ``http://<services.host>:<services.s3_port>``. Credentials: ``AWS_ACCESS_KEY_ID`` /
    ``AWS_SECRET_ACCESS_KEY``, else ``<services.state_dir>/credentials.env`` (written by
    ``lerenet services up``), else boto3's default chain.
    """
    env = os.environ if env is None else env
    s = S3Settings.from_env(env)
    if s.endpoint_url is None:
        s = replace(s, endpoint_url=f"http://{params.services.host}:{params.services.s3_port}")
    if s.access_key_id is None or s.secret_access_key is None:
        cred = Path(params.services.state_dir) / CREDENTIALS_FILE
        if cred.is_file():
            values = read_env_file(cred)
            s = replace(s, access_key_id=values.get("AWS_ACCESS_KEY_ID"),
                        secret_access_key=values.get("AWS_SECRET_ACCESS_KEY"))
    return replace(s, **overrides)


def make_client(settings: S3Settings):  # -> botocore S3 client
    """A boto3 S3 client with path-style addressing, bounded retries and timeouts."""
    config = Config(
        retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        s3={"addressing_style": "path"},
        signature_version="s3v4",
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region,
        aws_access_key_id=settings.access_key_id, aws_secret_access_key=settings.secret_access_key,
        config=config)


class _CountingReader(io.RawIOBase):
    """Read-only, non-seekable view of a file object that counts the bytes read."""

    def __init__(self, raw: IO[bytes]):
        super().__init__()
        self._raw = raw
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size if size is not None else -1)
        if not isinstance(data, (bytes, bytearray)):
            raise StorageError(f"upload source returned {type(data).__name__}, expected bytes (open it in 'rb' mode)")
        self.nbytes += len(data)
        return bytes(data)

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class S3Store:
    """A bucket-agnostic S3 store: boto3 client + the settings it was made from.

    Every method translates botocore failures into :class:`StorageError`
    subclasses whose message names the endpoint, the ``s3://bucket/key`` and the
    remedy.
    """

    def __init__(self, settings: S3Settings, client: Any | None = None):
        self.settings = settings
        self.client = client if client is not None else make_client(settings)

    @classmethod
    def from_params(cls, params: "Params", env: Mapping[str, str] | None = None, **overrides: Any) -> "S3Store":
        """Store for the project (see :func:`settings_from_params`)."""
        return cls(settings_from_params(params, env, **overrides))

    # ---- error translation ---------------------------------------------
    @contextmanager
    def _errors(self, op: str, bucket: str, key: str | None = None) -> Iterator[None]:
        where = f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
        ep = self.settings.endpoint_label
        try:
            yield
        except StorageError:
            raise
        except _UNREACHABLE as exc:
            raise EndpointUnreachableError(
                f"S3 endpoint {ep} is unreachable ({op} {where}) after {self.settings.max_attempts} attempt(s): "
                f"{exc}. Start the local store with `lerenet services up` or point LERENET_S3_ENDPOINT_URL "
                f"at a running server.") from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise CredentialsError(
                f"no S3 credentials for endpoint {ep} ({op} {where}): set AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY (or run `lerenet services up`, which writes .lerenet/credentials.env)") from exc
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _CREDENTIAL_CODES or status == 403:
                raise CredentialsError(
                    f"S3 endpoint {ep} rejected the credentials (access key id "
                    f"{self.settings.access_key_id or '<default chain>'!r}) for {op} {where}: {code} "
                    f"{err.get('Message', '')}. Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.") from exc
            if code in _MISSING_BUCKET_CODES and (code == "NoSuchBucket" or key is None):
                raise BucketMissingError(self._missing_bucket_message(bucket)) from exc
            raise StorageError(f"S3 {op} {where} on {ep} failed: {code} {err.get('Message', '')}".rstrip()) from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 {op} {where} on {ep} failed: {exc}") from exc

    def _missing_bucket_message(self, bucket: str) -> str:
        return (f"bucket {bucket!r} does not exist on S3 endpoint {self.settings.endpoint_label}: "
                f"`lerenet services up` creates the configured buckets, or call with create_bucket=True")

    # ---- buckets ---------------------------------------------------------
    def bucket_exists(self, bucket: str) -> bool:
        """True if ``bucket`` exists; raises for unreachable endpoint / bad credentials."""
        try:
            with self._errors("head bucket", bucket):
                self.client.head_bucket(Bucket=bucket)
        except BucketMissingError:
            return False
        return True

    def ensure_bucket(self, bucket: str, *, create: bool = True) -> bool:
        """Make sure ``bucket`` exists. Returns True if it was created now.

        Raises:
            BucketMissingError: missing and ``create`` is False.
        """
        if self.bucket_exists(bucket):
            return False
        if not create:
            raise BucketMissingError(self._missing_bucket_message(bucket))
        with self._errors("create bucket", bucket):
            try:
                self.client.create_bucket(Bucket=bucket)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise
                return False
        return True

    # ---- objects -----------------------------------------------------------
    def put_fileobj(self, bucket: str, key: str, fileobj: IO[bytes], *, content_type: str | None = None,
                    create_bucket: bool = False) -> str:
        """Upload a binary file object atomically to ``s3://bucket/key``; returns that URI.

        Steps: upload to ``.lerenet-tmp/<uuid>/<name>`` (s3transfer: single PUT
        or multipart, aborted on error), check the stored size equals the bytes
        read, server-side copy to ``key``, delete the temporary key (also on
        failure). A source that raises mid-read leaves nothing under ``key``.

        Raises:
            BucketMissingError, CredentialsError, EndpointUnreachableError,
            StorageError (incl. the source's own read error, wrapped, naming the key).
        """
        if not key or key.startswith("/") or key.startswith(TMP_PREFIX):
            raise StorageError(f"invalid object key {key!r}: must be non-empty, relative and not under {TMP_PREFIX}")
        self.ensure_bucket(bucket, create=create_bucket)
        tmp_key = f"{TMP_PREFIX}{uuid.uuid4().hex}/{key.rsplit('/', 1)[-1]}"
        extra = {"ContentType": content_type} if content_type else None
        reader = _CountingReader(fileobj)
        # Non-seekable reader: s3transfer buffers chunk by chunk; 8 MiB parts, bounded concurrency.
        transfer = TransferConfig(multipart_threshold=8 * 2**20, multipart_chunksize=8 * 2**20, max_concurrency=4)
        try:
            with self._errors("upload", bucket, key):
                try:
                    self.client.upload_fileobj(reader, bucket, tmp_key, ExtraArgs=extra, Config=transfer)
                except (OSError, ValueError) as exc:
                    raise StorageError(f"upload to s3://{bucket}/{key} aborted: reading the source failed after "
                                       f"{reader.nbytes} bytes: {exc}; nothing was written under the key") from exc
                size = self.client.head_object(Bucket=bucket, Key=tmp_key)["ContentLength"]
                if size != reader.nbytes:
                    raise StorageError(f"upload to s3://{bucket}/{key} incomplete: server stored {size} of "
                                       f"{reader.nbytes} bytes; the final key was not written")
                # copy_object is a single atomic server-side operation for objects < 5 GiB;
                # above that s3transfer's managed copy uses multipart copy (also invisible until complete).
                self.client.copy({"Bucket": bucket, "Key": tmp_key}, bucket, key,
                                 Config=TransferConfig(multipart_threshold=5 * 2**30 - 1))
        finally:
            try:
                self.client.delete_object(Bucket=bucket, Key=tmp_key)
            except (ClientError, BotoCoreError):  # best effort; the final key is unaffected
                pass
        return f"s3://{bucket}/{key}"

    def put_bytes(self, bucket: str, key: str, data: bytes, *, content_type: str | None = None,
                  create_bucket: bool = False) -> str:
        """Atomic upload of ``data`` (see :meth:`put_fileobj`)."""
        return self.put_fileobj(bucket, key, io.BytesIO(data), content_type=content_type, create_bucket=create_bucket)

    def put_file(self, bucket: str, key: str, path: str | os.PathLike[str], *, content_type: str | None = None,
                 create_bucket: bool = False) -> str:
        """Atomic upload of a local file (see :meth:`put_fileobj`); FileNotFoundError names the path."""
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"{p}: no such file to upload to s3://{bucket}/{key}")
        with p.open("rb") as fh:
            return self.put_fileobj(bucket, key, fh, content_type=content_type, create_bucket=create_bucket)

    def put_json(self, bucket: str, key: str, obj: Any, *, create_bucket: bool = False) -> str:
        """Atomic upload of ``obj`` as UTF-8 JSON (indent 2, sorted keys, ``application/json``)."""
        data = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False).encode()
        return self.put_bytes(bucket, key, data, content_type="application/json", create_bucket=create_bucket)

    def get_bytes(self, bucket: str, key: str) -> bytes:
        """Whole object body. Raises StorageError (code ``NoSuchKey``) if absent."""
        with self._errors("download", bucket, key):
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def exists(self, bucket: str, key: str) -> bool:
        """True if ``s3://bucket/key`` exists (BucketMissingError if the bucket does not)."""
        try:
            with self._errors("head", bucket, key):
                self.client.head_object(Bucket=bucket, Key=key)
        except StorageError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientError) and str(cause.response.get("Error", {}).get("Code")) in ("404", "NoSuchKey"):
                if not self.bucket_exists(bucket):
                    raise BucketMissingError(self._missing_bucket_message(bucket)) from None
                return False
            raise
        return True

    def list_keys(self, bucket: str, prefix: str = "", *, include_tmp: bool = False) -> list[str]:
        """All keys under ``prefix`` (paginated), sorted; temporary upload keys hidden unless asked."""
        keys: list[str] = []
        with self._errors("list", bucket, prefix or None):
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                keys.extend(o["Key"] for o in page.get("Contents", []))
        return sorted(k for k in keys if include_tmp or not k.startswith(TMP_PREFIX))

    def delete(self, bucket: str, key: str) -> None:
        """Delete one object (no error if it does not exist)."""
        with self._errors("delete", bucket, key):
            self.client.delete_object(Bucket=bucket, Key=key)
