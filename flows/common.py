"""Shared task settings of the Prefect flows: which failures are transient, retries with backoff.

The classification is :func:`pipeline.faults.is_transient` (one rule for the flows and for the calls
the pipeline retries itself): network and tracking-server trouble -- ``ConnectionError``,
``TimeoutError``, other ``OSError``, SQLite "database is locked", an ``MlflowException`` with a "try
again" error code or raised from a connection error (a tracking server that is down or restarting) --
is retried; a full disk (``ENOSPC``, quota, read-only file system) never is, nor a wrong path
(``FileNotFoundError``, ...), bad data (``DataValidationError``) or bad parameters (``ValueError``),
because a retry would fail the same way.
"""

from __future__ import annotations

import os
from typing import Any

from prefect.cache_policies import NO_CACHE

from pipeline.faults import PERMANENT_OS_ERRORS, TRANSIENT_MLFLOW_CODES, is_transient  # noqa: F401 (re-exported)

RETRIES = int(os.environ.get("LERENET_TASK_RETRIES", "2"))
RETRY_DELAYS = [float(x) for x in os.environ.get("LERENET_RETRY_DELAYS", "2,10").split(",")]
"""Seconds before retry 1, 2, ... (backoff); env ``LERENET_RETRY_DELAYS`` overrides (e.g. tests: ``0.1,0.2``)."""


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
