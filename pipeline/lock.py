"""One project-wide lock for the runs that train or promote (issue 14, item 4).

Two such runs at once -- two flow runs, a manual ``lerenet flow training`` beside a scheduled retrain,
``dvc repro`` beside a flow -- would overwrite each other's models and could take two promotion
decisions for one champion. Every one of them takes :func:`project_lock` first:

* the lock is an OS file lock (``filelock``; ``fcntl.flock`` on Linux) on
  :attr:`pipeline.layout.Layout.project_lock` (``<root>/.lerenet/project.lock``), so it is released by
  the kernel when its process dies, even by ``kill -9``: there is no stale lock to clean up;
* the holder writes a record next to it (``project.lock.json``: ``pid``, ``host``, ``started`` (UTC ISO
  8601), ``command``) so a second run can say who holds it;
* a second run waits up to ``timeout`` seconds (``params.distributed.lock_timeout``, env
  ``LERENET_LOCK_TIMEOUT``; 0 = not at all) and then raises :class:`ProjectLocked` naming the holder;
* re-entrant within one process (a flow that holds it runs a subflow that asks again): a count per path.

Callers: the CLI commands ``train``, ``register`` and ``promote`` (so every DVC stage that trains or
promotes) and the flows (``flows/exclusive.py``, which adds a Prefect global concurrency limit).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from pipeline.atomic import atomic_write_text

_HELD: dict[str, list[Any]] = {}  # resolved lock path -> [FileLock, depth]
_GUARD = threading.Lock()


class ProjectLocked(RuntimeError):
    """Another run holds the project lock; the message names it (pid, host, start, command) and what to do."""

    def __init__(self, message: str, holder: dict[str, Any] | None) -> None:
        super().__init__(message)
        self.holder = holder


def holder_record(lock_path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The holder record written next to ``lock_path`` (``None`` if missing or unreadable)."""
    try:
        return json.loads(Path(f"{lock_path}.json").read_text())
    except (OSError, ValueError):
        return None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "another process (no holder record)"
    return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')} "
            f"running `{holder.get('command')}`")


def is_held_here(lock_path: str | os.PathLike[str]) -> bool:
    """True if this process holds the lock at ``lock_path``."""
    return str(Path(lock_path).resolve()) in _HELD


@contextlib.contextmanager
def project_lock(lock_path: str | os.PathLike[str], command: str | None = None,
                 timeout: float = 0.0) -> Iterator[dict[str, Any]]:
    """Hold the project lock at ``lock_path`` for the block; yields the holder record.

    Args:
        lock_path: the lock file (``Layout.project_lock``); its folder is created.
        command: what this run is, for the record (default: this process's command line).
        timeout: seconds to wait for a lock held by another process (0: fail at once).

    Raises:
        ProjectLocked: still held by another process after ``timeout`` s (names the holder and what to do).
    """
    key = str(Path(lock_path).resolve())
    with _GUARD:
        if key in _HELD:  # re-entry in this process
            _HELD[key][1] += 1
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield holder_record(key) or {}
        finally:
            with _GUARD:
                _HELD[key][1] -= 1
        return
    Path(key).parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(key, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = holder_record(key)
        if timeout <= 0:
            raise ProjectLocked(_locked_message(key, holder, timeout), holder) from None
        print(f"waiting up to {timeout:.0f} s for the project lock {key}, held by {_describe(holder)}",
              file=sys.stderr, flush=True)
        try:
            lock.acquire(timeout=timeout)
        except Timeout:
            holder = holder_record(key)
            raise ProjectLocked(_locked_message(key, holder, timeout), holder) from None
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    try:
        atomic_write_text(Path(f"{key}.json"), json.dumps(record, indent=2) + "\n")
        with _GUARD:
            _HELD[key] = [lock, 1]
        yield record
    finally:
        with _GUARD:
            _HELD.pop(key, None)
        with contextlib.suppress(OSError):
            Path(f"{key}.json").unlink()
        lock.release()


def _locked_message(key: str, holder: dict[str, Any] | None, timeout: float) -> str:
    waited = f"after waiting {timeout:.0f} s" if timeout > 0 else "(not waiting: distributed.lock_timeout is 0)"
    return (f"another run holds the project lock {key} {waited}: {_describe(holder)}. Two runs that train or "
            "promote at once would overwrite each other's models. Wait for it to finish, or let this run wait: "
            "set distributed.lock_timeout (seconds) in params.yaml or $LERENET_LOCK_TIMEOUT. If that process is "
            "gone, the lock is already free (the OS releases it with the process): just run again.")


def params_lock(params: Any, command: str | None = None) -> contextlib.AbstractContextManager[dict[str, Any]]:
    """:func:`project_lock` of the project of ``params`` (``Layout.project_lock``), waiting
    ``params.distributed.lock_timeout`` seconds.

    Raises:
        ProjectLocked: as :func:`project_lock`.
    """
    from pipeline.layout import Layout

    return project_lock(Layout.of(params).project_lock, command, params.distributed.lock_timeout)
