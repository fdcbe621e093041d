"""Training progress and the resumable training state (``checkpoints/<tag>/<model>/state.pt``).

The state holds everything a restarted run needs to end with the result of an uninterrupted one:
network, optimiser, scheduler and gradient-scaler states, the training's generator state and the
torch/NumPy/Python RNG states, the step,
the best validation score, step and weights so far, the curve so far and the MLflow run id. It is
keyed by ``(params_hash, fold, model_name)``: a state written for other params is ignored (with a
note), never resumed from. Files: :func:`pipeline.checkpoint.save_state` / ``load_state`` (atomic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pipeline import device as dev
from pipeline.checkpoint import load_state, save_state


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


def save_progress(path: Path, key: tuple[str, int | None, str], p: Progress, net: torch.nn.Module,
                  opt: torch.optim.Optimizer, sched: Any, scaler: Any, generator: torch.Generator | None = None) -> None:
    """Write the resumable state of step ``p.step`` (module docstring) atomically to ``path``;
    ``generator``: the training's own generator (:mod:`pipeline.training.rng`), saved as ``generator``."""
    params_hash, fold, model_name = key
    save_state(path, {
        "params_hash": params_hash, "fold": fold, "model_name": model_name, "step": p.step,
        "model": net.state_dict(), "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": dev.rng_state(),
        "best_val_miou": p.best, "best_step": p.best_step, "best_state": p.best_state,
        "curve": p.curve, "run_id": p.run_id,
        "generator": generator.get_state() if generator is not None else None})


def resume(path: Path, key: tuple[str, int | None, str], net: torch.nn.Module, opt: torch.optim.Optimizer,
           sched: Any, scaler: Any, generator: torch.Generator | None = None) -> Progress:
    """Restore the state at ``path`` into the network, optimiser, scheduler, scaler and RNGs if it was
    written for ``key``; else (no file, or other params/fold/model: noted) a fresh :class:`Progress`.

    Raises:
        pipeline.checkpoint.CheckpointError: the file exists but cannot be read (delete it to start over).
    """
    state = load_state(path)
    if state is None:
        return Progress()
    if (state.get("params_hash"), state.get("fold"), state.get("model_name")) != tuple(key):
        tqdm.write(f"note: ignoring {path}: it belongs to other params/fold/model (params hash "
                   f"{state.get('params_hash')} != {key[0]}); training from step 0")
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
