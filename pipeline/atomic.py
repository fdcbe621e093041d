"""The one atomic-write helper: a file or folder is either complete or absent, never half-written.

Every writer of an artifact (data steps, model files, metrics, plots, decision records, pid files,
credentials, the params file's fold table) goes through :func:`atomic_write`: the content is written
to a temporary file in the target's folder (same file system) and renamed over the target with
:func:`os.replace` (atomic on POSIX). A failure removes the temporary file and leaves any old target
untouched. Folders are swapped in with :func:`replace_dir`.

A process killed by SIGKILL (an out-of-memory kill, a lost Dask worker) gets no chance to remove its
temporary file: the target stays complete (old or absent), and the orphan ``.<name>.<random>.tmp<suffix>``
is removed by :func:`remove_stale_temps`, which a step that owns its targets (one training, one fold's
evaluation) calls when it starts again.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

_UMASK = os.umask(0o022)
os.umask(_UMASK)
#: mode of written artifacts: mkstemp creates 0600, readers expect the usual 0666 & ~umask
FILE_MODE = 0o666 & ~_UMASK


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], Any], *, mode: int | None = None) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file, then ``os.replace(tmp, path)``.

    Args:
        path: target file; its folder is created if missing.
        write: called with the temporary file's path (same folder, name ``.<name>.<random>.tmp<suffix>``
            so that suffix-sniffing writers such as matplotlib keep the format); it must write the
            whole content there.
        mode: permission bits of the final file (default :data:`FILE_MODE`; credentials use 0o600).
            The temporary file is created 0600, so the content is never readable by others before
            the final mode is set.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        Whatever ``write`` raises (the temporary file is removed, the old target is kept).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, mode: int | None = None) -> Path:
    """Atomically write ``data`` to ``path`` (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), mode=mode)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, mode: int | None = None) -> Path:
    """Atomically write UTF-8 ``text`` to ``path`` (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_parquet(path: str | os.PathLike[str], df: Any) -> Path:
    """Atomically write the pandas DataFrame ``df`` as Parquet without the index (byte-identical for
    identical frames)."""
    return atomic_write(path, lambda tmp: df.to_parquet(tmp, index=False))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (model files, training state)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def remove_stale_temps(*targets: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files that :func:`atomic_write` left for ``targets`` when its process was killed.

    Only files named like this module's temporaries of exactly these targets
    (``<folder>/.<name>.<8 random chars>.tmp<suffix>``) are removed, so other files of the folder and
    the temporaries of other targets are left alone. Call it only where no other process writes the
    same targets at the same time (the project lock, ``pipeline.lock``, ensures one run per project).

    Returns:
        The removed paths (empty when there were none or a folder does not exist).
    """
    removed: list[Path] = []
    for target in targets:
        t = Path(target)
        if not t.parent.is_dir():
            continue
        for tmp in t.parent.glob(f".{glob_escape(t.name)}.*.tmp{glob_escape(t.suffix)}"):
            middle = tmp.name[len(t.name) + 2:-len(f".tmp{t.suffix}")]
            if tmp.is_file() and middle and "." not in middle:
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


def glob_escape(text: str) -> str:
    """``text`` with the glob metacharacters ``*?[`` escaped (a literal part of a :meth:`Path.glob` pattern)."""
    import glob

    return glob.escape(text)


def replace_dir(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Swap the finished folder ``src`` in as ``dest`` (same file system).

    The old ``dest`` is first renamed aside, then ``src`` is renamed into place, then the old copy is
    deleted: readers see either the complete old folder or the complete new one, never a mix.
    """
    src, dest = Path(src), Path(dest)
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    if dest.exists():
        os.replace(dest, old)
    os.replace(src, dest)
    shutil.rmtree(old, ignore_errors=True)
