"""Episodic training of one model on one fold (DVC stage ``train``, ``foreach`` fold x model).

One *step* = one batch of ``params.train.batch_size`` episodes from the fold's training classes
(``pipeline.episodes``), each 1 support set of ``K = params.train.shots`` images + 1 query.
``params.train.episodes`` is the total number of training episodes: ``steps = ceil(episodes /
batch_size)``.

* Loss: binary cross-entropy with logits between the query logits and its mask (paper Eq. 6).
* Optimiser (authors' code): SGD, momentum ``train.momentum`` (0.9), weight decay
  ``train.weight_decay`` (1e-4); poly schedule ``lr_s = lr * (1 - s / steps) ** poly_power``;
  a fine-tuned backbone gets ``lr * backbone_lr_mult``.
* Frozen backbone (CPU profile): episodes are assembled from the feature store
  (:mod:`pipeline.features`): a random stored view (clean or augmented) per image per episode;
  the backbone never runs during training. Fine-tuned backbone (paper profile) or
  ``use_cache=False``: images are read and augmented on the fly by a ``torch.utils.data.DataLoader``
  (workers ``train.num_workers``, pinned memory on CUDA).
* Determinism: episode ``i`` depends only on ``(train.seed, i)``; the head's initialisation and the
  dropout masks come from the training's own generator, seeded by ``(train.seed, fold, model)``
  (:mod:`pipeline.training.rng`; torch's global RNG is never used), so trainings running side by side in
  threads or processes do not disturb each other; its state is checkpointed; on CPU the same seed
  gives bit-identical weights and metrics, sequentially, in threads or on Dask workers.
* Checkpoints: every ``train.checkpoint_every`` steps (and at the end) the full training state
  is written atomically to ``checkpoints/<tag>/<model>/state.pt``; a restarted run with the same
  params, data version and training code resumes from it and ends with the result of an uninterrupted
  run; a state written for other params, data or code (finished or not) is stale: training starts
  over and says why (:mod:`pipeline.training.state`).
* Model selection: every ``train.val_every`` steps (and at the last step), mean foreground IoU
  over the training classes on ``train.val_episodes`` fixed episodes whose queries are the fold's
  held-out ``val_ids``; the best state is kept. Test classes are never touched.
* The prototype model has no head to train (its only parameter, the cosine scale, never changes
  a decision): ``train()`` scores it once on the validation episodes and writes its model file.

Outputs (paths from :class:`pipeline.layout.Layout`): ``models/<tag>/<model>/model.pt``
(:func:`pipeline.inference.model_file.load_model`), ``models/<tag>/<model>/run.json`` (MLflow ids),
``metrics/train/<tag>_<model>.csv`` (``step,episodes,loss,lr,val_miou,episodes_per_s``).

This module is the stage (arguments, outputs, order of the work); the episode sources, the loop, the
resumable state and the MLflow logging are in :mod:`pipeline.training`.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline import device as dev
from pipeline.atomic import atomic_write_text, remove_stale_temps
from pipeline.checkpoint import build_net, save_model
from pipeline.config import MODEL_NAMES, Params
from pipeline.episodes import mismatched_validation, normal_pools, training_pools, validation_episodes
from pipeline.features import FeatureStore, build_feature_store
from pipeline.images import load_validated
from pipeline.layout import Layout, fold_tag
from pipeline.training.batches import CachedEpisodes, ImageEpisodes, check_store, image_loader, total_steps
from pipeline.training.gate import presence_gate
from pipeline.training.loop import (Session, TrainingDiverged, TrainingStopped, optimizer, run_steps, scheduler, start_validation,
                                    validate)
from pipeline.training.rng import build_seeded, make_generator, training_seed, use_generator
from pipeline.training.state import Progress, code_version, resume, state_key

CURVE_FIELDS = ("step", "episodes", "loss", "lr", "val_miou", "episodes_per_s", "val_mismatched_miou")


@dataclass
class TrainResult:
    """What :func:`train` produced (paths absolute)."""

    model_path: Path
    curve_path: Path
    run_json: Path
    run_id: str | None
    steps: int
    best_val_miou: float
    best_step: int
    resumed_from: int
    episodes_per_s: float
    seconds: float


def _write_curve(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CURVE_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _meta(params: Params, net: torch.nn.Module, fold: int | None, model_name: str, step: int,
          best: float, best_step: int, run_id: str | None) -> dict[str, Any]:
    from pipeline.tracking import data_version, git_commit, params_hash

    return {
        "model": model_name, "backbone": params.model.backbone, "variant": params.model.variant,
        "channels": params.model.channels, "freeze_backbone": params.model.freeze_backbone,
        "image_size": params.train.image_size, "train_shots": params.train.shots, "fold": fold,
        "params_hash": params_hash(params), "data_version": data_version(params), "code_version": code_version(),
        "git_commit": git_commit(params.root), "step": step, "best_val_miou": best, "best_step": best_step,
        "run_id": run_id, "config": dict(getattr(net, "config", {}) or {}),
    }


def _check_args(params: Params, fold: int | None, model_name: str) -> None:
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; expected one of {MODEL_NAMES}")
    if fold is not None and fold not in params.folds:
        raise ValueError(f"fold {fold} is not in params.yaml folds {sorted(params.folds)}")


def _batches(params: Params, store: FeatureStore | None, pools: Any, rows: dict[str, Any], start: int,
             device: torch.device, native_area: float | None = None) -> Callable[[int], dict[str, torch.Tensor]]:
    """``batch(step)`` for the loop: cached features (random stored view per image) or a DataLoader (always
    for SOFS non-resizing, ``native_area``: its native crops are not in the store)."""
    t = params.train
    normals = normal_pools(params, pools) if t.negative_share > 0 else {}
    if store is not None and native_area is None:
        source = CachedEpisodes(store, pools, t.shots, t.seed, t.augment, t.negative_share, normals)
        return lambda step: source.batch(step * t.batch_size, t.batch_size)
    if normals:
        normal_rows = load_validated(params.data.dir, kind="normal").to_dict("records")
        rows = {**rows, **{r["id"]: r for r in normal_rows}}
    loader_iter = iter(image_loader(params, pools, rows, start, device, normals, native_area))
    return lambda step: next(loader_iter)


def _finish(params: Params, fold: int | None, model_name: str, net: torch.nn.Module, p: Progress, steps: int,
            paths: tuple[Path, Path], tracker: Any, t0: float, gate: dict[str, Any]) -> TrainResult:
    """Write the model file, the curve and ``run.json``; close the MLflow run."""
    out_dir, curve_file = paths
    net.eval()
    seconds = time.perf_counter() - t0
    measured = [r["episodes_per_s"] for r in p.curve if r.get("episodes_per_s")]
    result = TrainResult(
        model_path=out_dir / "model.pt", curve_path=curve_file, run_json=out_dir / "run.json",
        run_id=p.run_id, steps=steps, best_val_miou=float(p.best), best_step=p.best_step, resumed_from=p.resumed_from,
        episodes_per_s=float(measured[-1]) if measured else 0.0, seconds=round(seconds, 2))
    save_model(result.model_path, net.to("cpu"),
               {**_meta(params, net, fold, model_name, steps, float(p.best), p.best_step, p.run_id), **gate})
    _write_curve(curve_file, p.curve)
    run_info = {"run_id": p.run_id, "fold": fold, "model": model_name, "backbone": params.model.backbone,
                "train_shots": params.train.shots, "best_val_miou": float(p.best), "best_step": p.best_step,
                "steps": steps, **gate}
    if tracker:
        run_info.update(tracker.info())
        tracker.finish(result, curve_file)
    atomic_write_text(result.run_json, json.dumps(run_info, indent=2) + "\n")
    return result


def train(params: Params, fold: int | None, model_name: str, out_dir: Path | None = None, *,
          feature_store: Path | None = None, checkpoint_file: Path | None = None, curve_file: Path | None = None,
          use_cache: bool | None = None, stop_after: int | None = None, track: bool = True,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``model_name`` on the training classes of ``fold`` and write its model file.

    Args:
        params: validated params (``train``, ``model``, ``data``, ``mlflow`` sections).
        fold: cross-validation fold (a key of ``params.folds``) or ``None`` for the production
            model trained on every class.
        model_name: one of :data:`pipeline.config.MODEL_NAMES`; its ``train.per_model`` entry applies.
        out_dir: where ``model.pt`` and ``run.json`` go (default :meth:`Layout.model_dir`).
        feature_store: store folder (default: :func:`pipeline.features.build_feature_store`, which
            reuses an up-to-date store and builds it otherwise).
        checkpoint_file: resumable state (default :meth:`Layout.train_state`).
        curve_file: training curve CSV (default :meth:`Layout.curve`).
        use_cache: train on cached features (default: iff the backbone is frozen). ``False`` with
            a frozen backbone runs the backbone every episode (benchmark of the cache's effect).
        stop_after: raise :class:`~pipeline.training.loop.TrainingStopped` after this many steps (simulated kill).
        track: log to MLflow (parent run per pipeline run, nested run per fold/model/backbone/K).
        progress: tqdm bar with loss and episodes/s.
        on_step: called as ``on_step(step, loss)`` after every optimiser step.

    Returns:
        :class:`TrainResult`.

    Raises:
        ValueError: unknown model name, or a fold not in ``params.folds``.
        FeatureStoreError: the store is stale for these params.
        DataArtifactError: validated data or the fold's split is missing (run the data stages).
        TrainingStopped: ``stop_after`` reached.
        TrainingDiverged: the loss became NaN or infinite (no model file is written).
    """
    from pipeline.training.tracking import Tracker

    _check_args(params, fold, model_name)
    params = params.for_model(model_name)  # train.per_model[model_name] over train (e.g. SOFS's own lr)
    t0 = time.perf_counter()
    t = params.train
    device = dev.resolve_device(t.device)
    dev.configure_threads(device)
    seed = training_seed(t.seed, fold, model_name)

    layout = Layout.of(params)
    out_dir = Path(out_dir) if out_dir is not None else layout.model_dir(fold, model_name)
    state_file = Path(checkpoint_file) if checkpoint_file is not None else layout.train_state(fold, model_name)
    curve_file = Path(curve_file) if curve_file is not None else layout.curve(fold, model_name)
    # a previous attempt killed mid-write (SIGKILL: a lost Dask worker, the OOM killer) left only orphan temporaries
    remove_stale_temps(out_dir / "model.pt", out_dir / "run.json", state_file, curve_file)
    train_pools, val_pools = training_pools(params, fold)
    rows = {r["id"]: r for r in load_validated(params.data.dir, kind="defect").to_dict("records")}
    val_eps = validation_episodes(val_pools, train_pools, t.shots, t.val_episodes, t.seed)

    net = build_seeded(lambda: build_net(params, model_name), seed).to(device)
    generator = make_generator(seed, device)
    use_generator(net, generator)  # dropout masks from this training's generator, not the global RNG
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    cached = params.model.freeze_backbone if use_cache is None else (use_cache and params.model.freeze_backbone)
    cached = cached and getattr(net, "caches_features", True)  # JAFFNet's own encoder pass: images, not the store
    store = None
    if cached:
        store = FeatureStore.open(feature_store or build_feature_store(params, progress=progress))
        check_store(store, net, params, rows)
    val_data = None if cached else ImageEpisodes(params, val_pools, rows, augment=False, episodes=val_eps)
    val_mis = mismatched_validation(val_eps, val_pools, train_pools, params.split.mismatched_seed) \
        if t.support_penalty > 0 else []
    val_mis_data = None if cached or not val_mis else ImageEpisodes(params, val_pools, rows, augment=False,
                                                                     episodes=val_mis)

    # parameter-free (prototype) or kept at its training-free start (train.untrained_models): scored, gated, not trained
    trainable = model_name != "prototype" and model_name not in t.untrained_models
    steps = total_steps(params) if trainable else 0
    opt = optimizer(net, params) if trainable else None
    sched = scheduler(opt, steps, t.poly_power) if opt is not None else None
    scaler = dev.grad_scaler(device)
    key = state_key(params, fold, model_name)  # a state written for other params/data/code is stale: not resumed
    p = resume(state_file, key, net, opt, sched, scaler, generator) if trainable else Progress()

    tracker = Tracker(params, fold, model_name, p.run_id) if track else None
    p.run_id = tracker.run_id if tracker else None
    session = Session(params, net, device, opt, sched, scaler, val_eps, store, val_data, state_file, key, tracker,
                      f"train {fold_tag(fold)}/{model_name}", progress, on_step, stop_after, generator,
                      val_mis, val_mis_data)
    try:
        if not trainable:
            p.best = session.validate()
            p.curve = [{"step": 0, "episodes": 0, "loss": None, "lr": None, "val_miou": round(p.best, 6),
                        "episodes_per_s": None}]
            if tracker:
                tracker.add("val_miou", p.best, 0)
        else:
            if t.validate_at_start and p.step == 0 and not p.curve:
                start_validation(session, p)
            run_steps(session, _batches(params, store, train_pools, rows, p.step, device,
                                        getattr(net, "native_area", None)), p, steps)
        gate = presence_gate(params, net, (train_pools, val_pools), rows, store, device)
        return _finish(params, fold, model_name, net, p, steps, (out_dir, curve_file), tracker, t0, gate)
    except BaseException as exc:
        if tracker:
            tracker.close(failed=not isinstance(exc, TrainingStopped))
        raise


def result_dict(result: TrainResult) -> dict[str, Any]:
    """JSON-friendly view of a :class:`TrainResult`."""
    d = asdict(result)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


__all__ = ["TrainResult", "TrainingDiverged", "TrainingStopped", "result_dict", "train", "validate"]
