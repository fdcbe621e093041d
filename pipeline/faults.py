"""Which failures are worth a retry, and a bounded retry with backoff for the calls that may meet them.

Classification (:func:`is_transient`), walking the exception and the exceptions it was raised from
(``__cause__`` / ``__context__``):

* **never retried** -- a full disk or quota, or a read-only file system (``OSError`` with errno
  ``ENOSPC``, ``EDQUOT``, ``EROFS``, a server error whose text says "No space left on device", SQLite's
  "database or disk is full"):
  a retry writes into the same full disk; a wrong path (``FileNotFoundError``, ``NotADirectoryError``,
  ``IsADirectoryError``, ``PermissionError``). These win over everything else in the chain.
* **transient** -- network and tracking-server trouble: ``ConnectionError`` (``requests``' connection
  errors are ``OSError`` too), ``TimeoutError``, any other ``OSError``; SQLite "database is locked";
  an :class:`mlflow.exceptions.MlflowException` with a "try again" error code
  (:data:`TRANSIENT_MLFLOW_CODES`) *or raised from* one of those (an MLflow server that is down or
  restarting: MLflow's REST client gives up with ``INTERNAL_ERROR`` raised from the ``requests``
  connection error).
* everything else (bad data, bad parameters, an MLflow error such as ``INVALID_PARAMETER_VALUE``)
  is permanent: a retry would fail the same way.

:func:`retry_call` retries a transient failure with bounded backoff (:func:`tracking_retry_delays`,
env ``LERENET_TRACKING_RETRY_DELAYS``), logging a warning per retry, and re-raises a permanent one at
once. MLflow's client already retries each HTTP request (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, 7 by
default); this is the layer above it, so that an outage longer than those retries does not abort a
training run at a metrics flush. The Prefect task retries (:mod:`flows.common`) use the same
classification.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

NEVER_RETRY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})
"""``OSError.errno`` values that mean "the disk cannot take it": never retried."""
NEVER_RETRY_TEXT = ("No space left on device", "Disk quota exceeded", "Read-only file system",
                    "database or disk is full")
"""The same conditions as reported by a server (e.g. the MLflow server's own disk is full) or by SQLite."""
PERMANENT_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
TRANSIENT_MLFLOW_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED",
                                    "ABORTED", "IO_ERROR", "RESOURCE_EXHAUSTED"})
"""``MlflowException.error_code`` values worth a retry. ``INTERNAL_ERROR`` (the default code of a bare
``MlflowException``) alone is not: an HTTP failure reaches us chained from the ``requests`` error."""


def _delays(env: str, default: str) -> tuple[float, ...]:
    raw = os.environ.get(env, default)
    try:
        out = tuple(float(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"${env}={raw!r}: expected comma-separated seconds, e.g. {default!r}") from None
    if any(d < 0 for d in out):
        raise ValueError(f"${env}={raw!r}: delays must be >= 0 seconds")
    return out


TRACKING_RETRY_DELAYS = "2,5,10,20,40"
"""Default seconds before retry 1, 2, ... of a tracking call (:func:`retry_call`): 5 retries, ~77 s of
waiting on top of MLflow's own per-request retries; ``$LERENET_TRACKING_RETRY_DELAYS`` overrides it."""


def tracking_retry_delays() -> tuple[float, ...]:
    """The retry delays in seconds: ``$LERENET_TRACKING_RETRY_DELAYS`` (read at each call) or
    :data:`TRACKING_RETRY_DELAYS`.

    Raises:
        ValueError: the variable is not comma-separated non-negative seconds.
    """
    return _delays("LERENET_TRACKING_RETRY_DELAYS", TRACKING_RETRY_DELAYS)


def _chain(exc: BaseException | None) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_disk_full(exc: BaseException) -> bool:
    """True if ``exc`` or an exception it was raised from says the disk is full, over quota or read-only."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in NEVER_RETRY_ERRNOS:
            return True
        if any(t in str(e) for t in NEVER_RETRY_TEXT) or "[Errno 28]" in str(e):
            return True
    return False


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` is worth retrying (module docstring); ``False`` for a full disk whatever the chain."""
    if is_disk_full(exc):
        return False
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover
        MlflowException = ()  # type: ignore[assignment]  # noqa: N806
    for e in _chain(exc):
        if isinstance(e, PERMANENT_OS_ERRORS):
            return False
        if isinstance(e, (ConnectionError, TimeoutError, OSError)):
            return True
        if "database is locked" in str(e):
            return True
        if MlflowException and isinstance(e, MlflowException) \
                and str(getattr(e, "error_code", "")) in TRANSIENT_MLFLOW_CODES:
            return True
    return False


def describe(exc: BaseException) -> str:
    """One line for logs: ``"disk full (never retried): ..."``, ``"transient: ..."`` or ``"permanent: ..."``."""
    kind = "disk full (never retried)" if is_disk_full(exc) else "transient" if is_transient(exc) else "permanent"
    first = (str(exc).splitlines() or [""])[0][:300]
    return f"{kind}: {type(exc).__name__}: {first}"


def retry_call(fn: Callable[[], T], what: str, delays: Sequence[float] | None = None,
               sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, retried after each delay of ``delays`` (default :func:`tracking_retry_delays`) while it
    fails with a transient error (:func:`is_transient`); ``what`` names the call in the warnings.

    Raises:
        The last exception: at once when it is not transient (a full disk included), else after
        ``len(delays)`` retries (the message of the final warning says how many).
    """
    delays = tracking_retry_delays() if delays is None else tuple(delays)
    for attempt in range(len(delays) + 1):
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or attempt == len(delays):
                if attempt:
                    log.error("%s failed after %d retries (%s)", what, attempt, describe(exc))
                raise
            log.warning("%s failed (%s); retry %d of %d in %gs", what, describe(exc), attempt + 1, len(delays),
                        delays[attempt])
            sleep(delays[attempt])
    raise AssertionError("unreachable")  # pragma: no cover
