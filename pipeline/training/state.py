"""Training progress and the resumable training state (``checkpoints/<tag>/<model>/state.pt``).

The state holds everything a restarted run needs to end with the result of an uninterrupted one:
network, optimiser, scheduler and gradient-scaler states, the training's own generator state
(:mod:`pipeline.training.rng`), the torch/NumPy/Python RNG states, the step,
the best validation score, step and weights so far, the curve so far and the MLflow run id.

It is keyed by :class:`StateKey` = ``(params_hash, data_version, code_version, fold, model_name)``:
the params hash (machine-local settings excluded: :func:`pipeline.tracking.params_hash`), the data
version (:func:`pipeline.tracking.data_version`), the code version (:func:`code_version`: a hash of
the training code, not the git commit, which changes on every commit), the fold and the model. A
state written for another key -- a finished one included -- is *stale*: it is never resumed from;
training starts over from step 0 and a note names what changed. Files:
:func:`pipeline.checkpoint.save_state` / ``load_state`` (atomic; loaded with ``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from pipeline import device as dev
from pipeline.checkpoint import load_state, save_state

log = logging.getLogger(__name__)

CODE_PATHS = ("model", "pipeline/training", "pipeline/train.py", "pipeline/episodes.py", "pipeline/augment.py",
              "pipeline/features.py", "pipeline/checkpoint.py", "pipeline/device.py")
"""The code a training state depends on (relative to the folder that holds ``model/`` and ``pipeline/``):
every ``*.py`` file under these paths enters :func:`code_version`."""

_PACKAGES_ROOT = Path(__file__).resolve().parents[2]


def code_version(root: Path | None = None, paths: tuple[str, ...] = CODE_PATHS) -> str:
    """16-hex sha256 over the relative path and bytes of every ``*.py`` file under ``paths`` in ``root``
    (default: the folder of the running ``model/`` and ``pipeline/`` packages). Equal on every clone for
    equal code; changes when the training code does, not on every git commit."""
    root = Path(root) if root is not None else _PACKAGES_ROOT
    h = hashlib.sha256()
    for rel in paths:
        p = root / rel
        files = sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.is_file() else []
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


class StateKey(NamedTuple):
    """What a training state was written for; a state is resumed only when all five fields match."""

    params_hash: str
    data_version: str
    code_version: str
    fold: int | None
    model_name: str


def state_key(params: Any, fold: int | None, model_name: str) -> StateKey:
    """The :class:`StateKey` of training ``model_name`` on ``fold`` with ``params`` and the running code."""
    from pipeline.tracking import data_version, params_hash

    return StateKey(params_hash(params), data_version(params), code_version(), fold, model_name)


@dataclass
class Progress:
    """Where a training run stands: last completed ``step``, best validation mIoU in [0, 1] (``-1`` before
    the first validation), its step and weights (CPU copies), the curve rows so far, the MLflow run id,
    and the step this attempt resumed from (0 for a fresh run)."""

    step: int = 0
    best: float = -1.0
    best_step: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    run_id: str | None = None
    resumed_from: int = 0


def save_progress(path: Path, key: StateKey, p: Progress, net: torch.nn.Module,
                  opt: torch.optim.Optimizer, sched: Any, scaler: Any, generator: torch.Generator | None = None) -> None:
    """Write the resumable state of step ``p.step`` (module docstring) atomically to ``path``;
    ``generator``: the training's own generator (:mod:`pipeline.training.rng`), saved as ``generator``."""
    save_state(path, {
        **StateKey(*key)._asdict(), "step": p.step,
        "model": net.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": dev.rng_state(),
        "best_val_miou": p.best, "best_step": p.best_step, "best_state": p.best_state,
        "curve": p.curve, "run_id": p.run_id,
        "generator": generator.get_state() if generator is not None else None})


def stale_fields(state: dict[str, Any], key: StateKey) -> list[str]:
    """``"field: stored -> wanted"`` for each field of ``key`` the state was not written for (empty: resumable)."""
    return [f"{name}: {state.get(name, '<not recorded>')} -> {want}"
            for name, want in StateKey(*key)._asdict().items() if state.get(name, "<not recorded>") != want]


def resume(path: Path, key: StateKey, net: torch.nn.Module, opt: torch.optim.Optimizer,
           sched: Any, scaler: Any, generator: torch.Generator | None = None) -> Progress:
    """Restore the state at ``path`` into the network, optimiser, scheduler, scaler and RNGs if it was
    written for ``key``; else (no file, or a stale state: other params, data, code, fold or model, named
    in a warning) a fresh :class:`Progress` -- training starts over, the stale file is overwritten at the
    first checkpoint.

    Raises:
        pipeline.checkpoint.CheckpointError: the file exists but cannot be read, or holds pickled objects
            (delete it to start over).
    """
    state = load_state(path)
    if state is None:
        return Progress()
    stale = stale_fields(state, key)
    if stale:
        msg = (f"stale training state {path} (step {state.get('step')}) not resumed: it was written for other "
               f"{'; '.join(stale)}; training {StateKey(*key).model_name} from step 0")
        log.warning(msg)
        tqdm.write(f"note: {msg}")
        return Progress()
    net.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    dev.set_rng_state(state["rng"])
    if generator is not None and state.get("generator") is not None:
        generator.set_state(state["generator"])
    return Progress(state["step"], state["best_val_miou"], state["best_step"], state["best_state"],
                    state["curve"], state.get("run_id"), resumed_from=state["step"])
