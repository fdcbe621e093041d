"""At most one training/promoting run per project at a time (issue 14, item 4), for the flows.

:func:`exclusive` wraps a flow function so that its whole run holds

1. the project file lock (:func:`pipeline.lock.params_lock`: the one ``lerenet train``, ``register`` and
   ``promote`` -- hence ``dvc repro`` -- take too; waits ``distributed.lock_timeout`` s, then
   :class:`~pipeline.lock.ProjectLocked` naming the holder), and
2. one slot of the Prefect global concurrency limit :data:`GCL_NAME` (limit 1, created if missing), so
   flow runs on other machines that share the Prefect server exclude each other as well
   (``prefect gcl inspect lerenet-project`` shows it). Its lease expires if the holder dies.

Re-entrant in one process: ``retrain_on_new_classes`` holds both while its ``training_pipeline``
subflow runs.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pipeline.config import Params, load_params
from pipeline.lock import ProjectLocked, params_lock

GCL_NAME = "lerenet-project"
_HELD_GCL: dict[str, int] = {}
_GUARD = threading.Lock()
F = TypeVar("F", bound=Callable[..., Any])


def ensure_limit(name: str = GCL_NAME, limit: int = 1) -> None:
    """Create the Prefect global concurrency limit ``name`` with ``limit`` slots unless it exists."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=limit))


@contextlib.contextmanager
def prefect_slot(timeout: float, name: str = GCL_NAME) -> Iterator[None]:
    """Hold one slot of the global concurrency limit ``name`` (re-entrant in this process).

    Raises:
        ProjectLocked: no slot within ``max(timeout, 2)`` seconds (another flow run holds it).
    """
    from prefect.concurrency.sync import concurrency

    with _GUARD:
        depth = _HELD_GCL.get(name, 0)
        _HELD_GCL[name] = depth + 1
    try:
        if depth:
            yield
            return
        ensure_limit(name)
        try:
            slot = concurrency(name, occupy=1, timeout_seconds=max(timeout, 2.0), strict=True)
            slot.__enter__()
        except TimeoutError:
            raise ProjectLocked(
                f"another flow run holds the Prefect global concurrency limit {name!r} (one training/promoting "
                f"run per project; `prefect gcl inspect {name}` shows it). Wait for it to finish, or raise "
                "distributed.lock_timeout / $LERENET_LOCK_TIMEOUT to wait longer.", None) from None
        try:
            yield
        finally:
            slot.__exit__(None, None, None)
    finally:
        with _GUARD:
            _HELD_GCL[name] -= 1
            if not _HELD_GCL[name]:
                del _HELD_GCL[name]


@contextlib.contextmanager
def exclusive_run(params: Params, command: str) -> Iterator[None]:
    """Hold the project file lock, then the Prefect slot, for the block (module docstring)."""
    with params_lock(params, command), prefect_slot(params.distributed.lock_timeout):
        yield


def exclusive(flow_name: str) -> Callable[[F], F]:
    """Decorator for a flow function whose first two parameters are ``params_path`` and ``overrides``:
    the call runs under :func:`exclusive_run` (signature kept, so Prefect sees the same parameters)."""
    def wrap(fn: F) -> F:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            params = load_params(bound.arguments.get("params_path"), bound.arguments.get("overrides"))
            with exclusive_run(params, f"flow {flow_name}"):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]
    return wrap
