"""Device selection, thread count, mixed precision and seeding for training and inference.

* ``auto`` picks CUDA when ``torch.cuda.is_available()``, else CPU.
* CPU: ``torch.set_num_threads(os.cpu_count())`` (all cores; ``$LERENET_TORCH_THREADS`` overrides).
* CUDA: mixed precision with :func:`torch.autocast` (bfloat16 where supported, else float16 with a
  gradient scaler) and ``channels_last`` memory format for 4-D tensors.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """Return the torch device for ``name`` in ``{"auto", "cpu", "cuda"}``.

    Raises:
        ValueError: unknown name, or ``"cuda"`` requested but no CUDA device is visible
            (set ``train.device: auto`` or ``cpu`` in params.yaml).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        return torch.device("cuda")
    raise ValueError(f"unknown device {name!r}; expected 'auto', 'cpu' or 'cuda'")


THREADS_ENV = "LERENET_TORCH_THREADS"
"""Torch intra-op threads per process (default: every core); a Dask worker of a local cluster gets
``cores // workers`` (``flows/runner.py``) so that workers do not oversubscribe the machine."""


def configure_threads(device: torch.device) -> int:
    """Intra-op threads on CPU: ``$LERENET_TORCH_THREADS`` if set, else every core; returns the
    count set (0 on CUDA).

    Raises:
        ValueError: ``$LERENET_TORCH_THREADS`` is not a positive integer.
    """
    if device.type != "cpu":
        return 0
    raw = os.environ.get(THREADS_ENV)
    if raw is not None and not (raw.strip().isdigit() and int(raw) > 0):
        raise ValueError(f"${THREADS_ENV}={raw!r}: expected a positive integer (torch threads per process)")
    n = int(raw) if raw is not None else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``device``: bfloat16/float16 on CUDA, ``None`` (full float32) on CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """Mixed-precision context on CUDA; a no-op on CPU (results stay bit-reproducible there)."""
    dtype = amp_dtype(device)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type="cuda", dtype=dtype):
        yield


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """Gradient scaler, enabled only for float16 autocast (bfloat16 and CPU need none)."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype(device) == torch.float16)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move ``x`` to ``device``; on CUDA, 4-D tensors are made ``channels_last`` (non-blocking copy)."""
    if device.type == "cuda":
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    return x.to(device)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Snapshot of the Python, NumPy and torch RNG states (for checkpoints)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore a snapshot taken by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
