"""Shared task settings of the Prefect flows: which failures are transient, retries with backoff.

Transient (retried): network and tracking-server trouble -- ``ConnectionError``, ``TimeoutError``,
other ``OSError`` except the ones that mean "wrong path" (``FileNotFoundError``,
``NotADirectoryError``, ``IsADirectoryError``, ``PermissionError``), SQLite "database is locked",
and :class:`mlflow.exceptions.MlflowException` with a "try again" error code
(``TEMPORARILY_UNAVAILABLE``, ``REQUEST_LIMIT_EXCEEDED``, ...) or caused by a connection error. Everything else -- bad data
(``DataValidationError``), bad parameters (``ValueError``), a missing input file -- fails at once,
because a retry would fail the same way.
"""

from __future__ import annotations

import os
from typing import Any

from prefect.cache_policies import NO_CACHE

PERMANENT_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)
TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED", "ABORTED",
                          "IO_ERROR", "RESOURCE_EXHAUSTED"}
"""``MlflowException.error_code`` values worth a retry. ``INTERNAL_ERROR`` (the default code of a bare
``MlflowException``) is not: an HTTP failure reaches us chained from the ``requests`` error instead."""
RETRIES = int(os.environ.get("LERENET_TASK_RETRIES", "2"))
RETRY_DELAYS = [float(x) for x in os.environ.get("LERENET_RETRY_DELAYS", "2,10").split(",")]
"""Seconds before retry 1, 2, ... (backoff); env ``LERENET_RETRY_DELAYS`` overrides (e.g. tests: ``0.1,0.2``)."""


def is_transient(exc: BaseException) -> bool:
    """True if ``exc`` (or an exception it was raised from) is worth retrying (module docstring)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, PERMANENT_OS_ERRORS):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            return True
        if "database is locked" in str(exc):
            return True
        try:
            from mlflow.exceptions import MlflowException

            if isinstance(exc, MlflowException):
                return str(getattr(exc, "error_code", "")) in TRANSIENT_MLFLOW_CODES
        except ImportError:  # pragma: no cover
            pass
        exc = exc.__cause__ or exc.__context__
    return False


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only when the failed state's exception is transient."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as exc:  # noqa: BLE001 -- we classify whatever the task raised
        return is_transient(exc)
    return False


TASK_OPTIONS: dict[str, Any] = {
    "cache_policy": NO_CACHE,  # steps are DVC-style idempotent themselves; Prefect must always run them
    "retries": RETRIES,
    "retry_delay_seconds": RETRY_DELAYS,
    "retry_jitter_factor": 0.2,
    "retry_condition_fn": retry_transient,
}
"""Keyword arguments for ``@task`` on every step task."""
