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
* Determinism: episode ``i`` depends only on ``(train.seed, i)``; torch/NumPy/Python RNG states
  are checkpointed; on CPU the same seed gives bit-identical weights and metrics.
* Checkpoints: every ``train.checkpoint_every`` steps (and at the end) the full training state
  is written atomically to ``checkpoints/<tag>/<model>/state.pt``; a restarted run with the same
  params resumes from it and ends with the result of an uninterrupted run.
* Model selection: every ``train.val_every`` steps (and at the last step), mean foreground IoU
  over the training classes on ``train.val_episodes`` fixed episodes whose queries are the fold's
  held-out ``val_ids``; the best state is kept. Test classes are never touched.
* The prototype model has no head to train (its only parameter, the cosine scale, never changes
  a decision): ``train()`` scores it once on the validation episodes and writes its model file.

Outputs: ``models/<tag>/<model>/model.pt`` (:func:`pipeline.checkpoint.load_model`),
``models/<tag>/<model>/run.json`` (MLflow ids), ``metrics/train/<tag>_<model>.csv``
(``step,episodes,loss,lr,val_miou,episodes_per_s``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipeline import device as dev
from pipeline.augment import augment_pair, build_augment, clean_pair, to_tensor_pair
from pipeline.checkpoint import build_net, load_state, save_model, save_state
from pipeline.config import Params
from pipeline.episodes import Episode, Pools, episode_rng, sample_episode, training_pools, validation_episodes
from pipeline.features import FeatureStore, build_feature_store, view_seed
from pipeline.images import atomic_write_text, load_validated, read_image, read_mask, resolve
from pipeline.metrics import IoUAccumulator

MODEL_NAMES = ("lerenet", "baseline", "prototype")
CURVE_FIELDS = ("step", "episodes", "loss", "lr", "val_miou", "episodes_per_s")


class TrainingStopped(RuntimeError):
    """Raised by ``train(..., stop_after=N)`` after step N: simulates a killed run (tests, demos)."""


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


def fold_tag(fold: int | None) -> str:
    """``"fold<f>"`` for a cross-validation fold, ``"all"`` for the production model (``fold=None``)."""
    return "all" if fold is None else f"fold{fold}"


def model_dir(params: Params, fold: int | None, model_name: str) -> Path:
    """``<root>/models/<tag>/<model>``."""
    return params.root / "models" / fold_tag(fold) / model_name


def curve_path(params: Params, fold: int | None, model_name: str) -> Path:
    """``<root>/metrics/train/<tag>_<model>.csv`` (DVC plots)."""
    return params.root / "metrics" / "train" / f"{fold_tag(fold)}_{model_name}.csv"


def checkpoint_path(params: Params, fold: int | None, model_name: str) -> Path:
    """``<root>/checkpoints/<tag>/<model>/state.pt`` (outside DVC outputs, which DVC deletes before a run)."""
    return params.root / "checkpoints" / fold_tag(fold) / model_name / "state.pt"


def total_steps(params: Params) -> int:
    """``ceil(train.episodes / train.batch_size)``."""
    return math.ceil(params.train.episodes / params.train.batch_size)


def poly_factor(step: int, steps: int, power: float) -> float:
    """Poly learning-rate factor ``(1 - step / steps) ** power`` in [0, 1] (authors' schedule)."""
    return max(0.0, 1.0 - step / max(1, steps)) ** power


# ----------------------------------------------------------------------------- episode sources
class CachedEpisodes:
    """Episodes assembled from a :class:`FeatureStore` (frozen backbone): no backbone call."""

    def __init__(self, store: FeatureStore, pools: Pools, shots: int, seed: int, augment: bool) -> None:
        self.store, self.pools, self.shots, self.seed, self.augment = store, pools, shots, seed, augment

    def batch(self, first: int, n: int) -> dict[str, Any]:
        """Episodes ``first .. first+n-1``: features ``(n,K,Cb,h,w)``, ``(n,Cb,h,w)``; masks ``(n,K,1,S,S)``, ``(n,1,S,S)``."""
        sup, qry, sv, qv = [], [], [], []
        for idx in range(first, first + n):
            rng = episode_rng(self.seed, idx)
            ep = sample_episode(self.pools, self.shots, rng)
            ids = [*ep.support_ids, ep.query_id]
            views = [int(rng.integers(self.store.views_of(i))) if self.augment else 0 for i in ids]
            sup.extend(ep.support_ids)
            qry.append(ep.query_id)
            sv.extend(views[:-1])
            qv.append(views[-1])
        return _gather(self.store, sup, qry, sv, qv, n, self.shots)


def _gather(store: FeatureStore, sup: Sequence[str], qry: Sequence[str], sv: Sequence[int] | int,
            qv: Sequence[int] | int, n: int, k: int) -> dict[str, torch.Tensor]:
    s = store.image_size
    return {
        "support_feats": store.get(sup, sv).unflatten(0, (n, k)),
        "support_masks": store.masks(sup, sv).reshape(n, k, 1, s, s),
        "query_feats": store.get(qry, qv),
        "query_masks": store.masks(qry, qv),
    }


class ImageEpisodes(torch.utils.data.Dataset):
    """Map-style dataset: item ``i`` = training episode ``i`` as images (read + augmented on the fly).

    Item: ``support_images (K,3,S,S)``, ``support_masks (K,1,S,S)``, ``query_images (3,S,S)``,
    ``query_masks (1,S,S)``; floats in [0, 1] / {0, 1}. Works in DataLoader worker processes.
    """

    def __init__(self, params: Params, pools: Pools, rows: dict[str, Any], augment: bool,
                 episodes: Sequence[Episode] | None = None) -> None:
        self.params, self.pools, self.rows, self.augment = params, pools, rows, augment
        self.fixed = list(episodes) if episodes is not None else None
        self.pipeline = build_augment(params.train.image_size)

    def __len__(self) -> int:
        return len(self.fixed) if self.fixed is not None else total_steps(self.params) * self.params.train.batch_size

    def _pair(self, image_id: str, seed: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.rows[image_id]
        data_dir = self.params.data.dir
        image = read_image(resolve(data_dir, row["image_path"]))
        mask = read_mask(resolve(data_dir, row["mask_path"]), self.params.data.mask_threshold)
        if seed is None:
            return to_tensor_pair(*clean_pair(image, mask, self.params.train.image_size))
        return to_tensor_pair(*augment_pair(self.pipeline, image, mask, seed))

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if self.fixed is not None:
            ep, seeds = self.fixed[idx], None
        else:
            ep = sample_episode(self.pools, self.params.train.shots, episode_rng(self.params.train.seed, idx))
            seeds = self.augment
        ids = [*ep.support_ids, ep.query_id]
        pairs = [self._pair(i, view_seed(self.params.train.seed, f"{idx}:{i}", j) if seeds else None)
                 for j, i in enumerate(ids)]
        return {
            "support_images": torch.stack([p[0] for p in pairs[:-1]]),
            "support_masks": torch.stack([p[1] for p in pairs[:-1]]),
            "query_images": pairs[-1][0],
            "query_masks": pairs[-1][1],
        }


# ----------------------------------------------------------------------------- validation
@torch.inference_mode()
def validate(net: torch.nn.Module, episodes: Sequence[Episode], *, store: FeatureStore | None = None,
             dataset: ImageEpisodes | None = None, device: torch.device = torch.device("cpu"),
             batch_size: int = 16) -> float:
    """Mean foreground IoU over classes (``pipeline.metrics.IoUAccumulator.miou``) on fixed episodes.

    Predictions ``logit > 0`` at ``S x S`` against the view-0 (clean) masks. Uses cached features
    when ``store`` is given, else ``dataset`` (an :class:`ImageEpisodes` over ``episodes``).
    Leaves ``net`` in eval mode (the caller switches back).
    """
    net.eval()
    acc = IoUAccumulator()
    k = len(episodes[0].support_ids)
    for first in range(0, len(episodes), batch_size):
        chunk = episodes[first:first + batch_size]
        n = len(chunk)
        if store is not None:
            b = _gather(store, [i for e in chunk for i in e.support_ids], [e.query_id for e in chunk], 0, 0, n, k)
            with dev.autocast(device):
                logits = net.forward_features(dev.to_device(b["support_feats"], device),
                                              dev.to_device(b["support_masks"], device),
                                              dev.to_device(b["query_feats"], device), b["query_masks"].shape[-2:])
        else:
            items = [dataset[first + j] for j in range(n)]  # type: ignore[index]
            b = {key: torch.stack([it[key] for it in items]) for key in items[0]}
            with dev.autocast(device):
                logits = net(dev.to_device(b["support_images"], device), dev.to_device(b["support_masks"], device),
                             dev.to_device(b["query_images"], device))
        pred = (logits.float() > 0).squeeze(1).cpu()
        gt = b["query_masks"].squeeze(1).bool()
        for j, e in enumerate(chunk):
            acc.update(pred[j], gt[j], e.class_name)
    return acc.miou()


# ----------------------------------------------------------------------------- helpers
def _optimizer(net: torch.nn.Module, params: Params) -> torch.optim.SGD:
    t = params.train
    groups = [{"params": net.head_parameters(), "lr": t.lr, "lr_mult": 1.0}]
    bb = net.backbone_parameters()
    if bb:
        groups.append({"params": bb, "lr": t.lr * t.backbone_lr_mult, "lr_mult": t.backbone_lr_mult})
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def _write_curve(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in CURVE_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _check_store(store: FeatureStore, net: torch.nn.Module, params: Params, rows: dict[str, Any]) -> None:
    """Guard against a stale store: re-encode one image and compare with its cached view 0."""
    from pipeline.features import FeatureStoreError

    if store.image_size != params.train.image_size or store.backbone != params.model.backbone:
        raise FeatureStoreError(f"{store.path} holds {store.backbone} features at {store.image_size}px; params want "
                                f"{params.model.backbone} at {params.train.image_size}px: run `lerenet features`")
    image_id = sorted(i for i in rows if i in store)[0]
    row = rows[image_id]
    img, _ = clean_pair(read_image(resolve(params.data.dir, row["image_path"])), None, params.train.image_size)
    with torch.inference_mode():
        fresh = net.encode(to_tensor_pair(img, np.zeros(img.shape[:2], bool))[0][None].to(next(net.parameters()).device))
    cached = store.get([image_id], 0).to(fresh.device)
    tol = 1e-2 * float(fresh.abs().max()) + 1e-2
    if fresh.shape != cached.shape or float((fresh.float() - cached).abs().max()) > tol:
        raise FeatureStoreError(f"{store.path}: cached features of image {image_id} differ from this backbone's "
                                "encode output (different weights?); rebuild with `lerenet features --force`")


def _meta(params: Params, net: torch.nn.Module, fold: int | None, model_name: str, step: int,
          best: float, best_step: int, run_id: str | None) -> dict[str, Any]:
    from pipeline.tracking import data_version, git_commit, params_hash

    return {
        "model": model_name, "backbone": params.model.backbone, "variant": params.model.variant,
        "channels": params.model.channels, "freeze_backbone": params.model.freeze_backbone,
        "image_size": params.train.image_size, "train_shots": params.train.shots, "fold": fold,
        "params_hash": params_hash(params), "data_version": data_version(params),
        "git_commit": git_commit(params.root), "step": step, "best_val_miou": best, "best_step": best_step,
        "run_id": run_id, "config": dict(getattr(net, "config", {}) or {}),
    }


# ----------------------------------------------------------------------------- train
def train(params: Params, fold: int | None, model_name: str, out_dir: Path | None = None, *,
          feature_store: Path | None = None, checkpoint_file: Path | None = None, curve_file: Path | None = None,
          use_cache: bool | None = None, stop_after: int | None = None, track: bool = True,
          progress: bool = True, on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train ``model_name`` on the training classes of ``fold`` and write its model file.

    Args:
        params: validated params (``train``, ``model``, ``data``, ``mlflow`` sections).
        fold: cross-validation fold (a key of ``params.folds``) or ``None`` for the production
            model trained on every class.
        model_name: ``"lerenet"``, ``"baseline"`` or ``"prototype"``.
        out_dir: where ``model.pt`` and ``run.json`` go (default :func:`model_dir`).
        feature_store: store folder (default: :func:`pipeline.features.build_feature_store`, which
            reuses an up-to-date store and builds it otherwise).
        checkpoint_file: resumable state (default :func:`checkpoint_path`).
        curve_file: training curve CSV (default :func:`curve_path`).
        use_cache: train on cached features (default: iff the backbone is frozen). ``False`` with
            a frozen backbone runs the backbone every episode (benchmark of the cache's effect).
        stop_after: raise :class:`TrainingStopped` after this many steps (simulated kill).
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
    """
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; expected one of {MODEL_NAMES}")
    if fold is not None and fold not in params.folds:
        raise ValueError(f"fold {fold} is not in params.yaml folds {sorted(params.folds)}")
    t0 = time.perf_counter()
    t = params.train
    device = dev.resolve_device(t.device)
    dev.configure_threads(device)
    dev.seed_everything(t.seed)

    out_dir = Path(out_dir) if out_dir is not None else model_dir(params, fold, model_name)
    ckpt = Path(checkpoint_file) if checkpoint_file is not None else checkpoint_path(params, fold, model_name)
    curve_file = Path(curve_file) if curve_file is not None else curve_path(params, fold, model_name)
    train_pools, val_pools = training_pools(params, fold)
    rows = {r["id"]: r for r in load_validated(params.data.dir, kind="defect").to_dict("records")}
    val_eps = validation_episodes(val_pools, train_pools, t.shots, t.val_episodes, t.seed)

    net = build_net(params, model_name).to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    cached = params.model.freeze_backbone if use_cache is None else (use_cache and params.model.freeze_backbone)
    store = None
    if cached:
        store = FeatureStore.open(feature_store or build_feature_store(params, progress=progress))
        _check_store(store, net, params, rows)
    val_data = None if cached else ImageEpisodes(params, val_pools, rows, augment=False, episodes=val_eps)

    trainable = model_name != "prototype"
    steps = total_steps(params) if trainable else 0
    opt = _optimizer(net, params) if trainable else None
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda s: poly_factor(s, steps, t.poly_power))
             if opt is not None else None)
    scaler = dev.grad_scaler(device)

    from pipeline.tracking import params_hash
    ph = params_hash(params)
    start, best, best_step, best_state, curve, run_id = 0, -1.0, 0, None, [], None
    state = load_state(ckpt) if trainable else None
    if state is not None and (state.get("params_hash"), state.get("fold"), state.get("model_name")) == (ph, fold, model_name):
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        dev.set_rng_state(state["rng"])
        start, best, best_step = state["step"], state["best_val_miou"], state["best_step"]
        best_state, curve, run_id = state["best_state"], state["curve"], state.get("run_id")
    elif state is not None:
        tqdm.write(f"note: ignoring {ckpt}: it belongs to other params/fold/model (params hash "
                   f"{state.get('params_hash')} != {ph}); training from step 0")

    tracker = _Tracker(params, fold, model_name, run_id) if track else None
    run_id = tracker.run_id if tracker else None
    try:
        if not trainable:
            best = validate(net, val_eps, store=store, dataset=val_data, device=device)
            curve = [{"step": 0, "episodes": 0, "loss": None, "lr": None, "val_miou": round(best, 6),
                      "episodes_per_s": None}]
            if tracker:
                tracker.add("val_miou", best, 0)
        else:
            source = (CachedEpisodes(store, train_pools, t.shots, t.seed, t.augment) if cached else
                      _image_loader(params, train_pools, rows, start, device))
            loader_iter = None if cached else iter(source)
            net.train()
            bar = tqdm(total=steps, initial=start, desc=f"train {fold_tag(fold)}/{model_name}", unit="step",
                       disable=not progress)
            tick, tick_eps = time.perf_counter(), 0
            for step in range(start, steps):
                b = source.batch(step * t.batch_size, t.batch_size) if cached else next(loader_iter)
                with dev.autocast(device):
                    if cached:
                        logits = net.forward_features(dev.to_device(b["support_feats"], device),
                                                      dev.to_device(b["support_masks"], device),
                                                      dev.to_device(b["query_feats"], device),
                                                      b["query_masks"].shape[-2:])
                    else:
                        logits = net(dev.to_device(b["support_images"], device),
                                     dev.to_device(b["support_masks"], device),
                                     dev.to_device(b["query_images"], device))
                loss = F.binary_cross_entropy_with_logits(logits.float(), dev.to_device(b["query_masks"], device))
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                lr = opt.param_groups[0]["lr"]
                sched.step()
                done = step + 1
                loss_v = float(loss.detach())
                tick_eps += t.batch_size
                elapsed = time.perf_counter() - tick
                eps = tick_eps / elapsed if elapsed > 0 else 0.0
                row = {"step": done, "episodes": done * t.batch_size, "loss": round(loss_v, 6), "lr": lr,
                       "val_miou": None, "episodes_per_s": round(eps, 2)}
                if tracker:
                    tracker.add("loss", loss_v, done)
                    tracker.add("lr", lr, done)
                if done % t.val_every == 0 or done == steps:
                    score = validate(net, val_eps, store=store, dataset=val_data, device=device)
                    net.train()
                    row["val_miou"] = round(score, 6)
                    if tracker:
                        tracker.add("val_miou", score, done)
                        tracker.flush()
                    if score > best:
                        best, best_step = score, done
                        best_state = {k: v.detach().to("cpu").clone() for k, v in net.state_dict().items()}
                curve.append(row)
                if done % t.checkpoint_every == 0 or done == steps:
                    save_state(ckpt, {
                        "params_hash": ph, "fold": fold, "model_name": model_name, "step": done,
                        "model": net.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": dev.rng_state(),
                        "best_val_miou": best, "best_step": best_step, "best_state": best_state,
                        "curve": curve, "run_id": run_id})
                if on_step:
                    on_step(done, loss_v)
                bar.set_postfix(loss=f"{loss_v:.4f}", eps=f"{eps:.1f}/s")
                bar.update(1)
                if stop_after is not None and done >= stop_after and done < steps:
                    bar.close()
                    raise TrainingStopped(f"stopped after step {done} (stop_after={stop_after})")
            bar.close()
            if best_state is not None:
                net.load_state_dict(best_state)

        net.eval()
        seconds = time.perf_counter() - t0
        measured = [r["episodes_per_s"] for r in curve if r.get("episodes_per_s")]
        result = TrainResult(
            model_path=out_dir / "model.pt", curve_path=curve_file, run_json=out_dir / "run.json",
            run_id=run_id, steps=steps, best_val_miou=float(best), best_step=best_step, resumed_from=start,
            episodes_per_s=float(measured[-1]) if measured else 0.0, seconds=round(seconds, 2))
        save_model(result.model_path, net.to("cpu"),
                   _meta(params, net, fold, model_name, steps, float(best), best_step, run_id))
        _write_curve(curve_file, curve)
        run_info = {"run_id": run_id, "fold": fold, "model": model_name, "backbone": params.model.backbone,
                    "train_shots": t.shots, "best_val_miou": float(best), "best_step": best_step, "steps": steps}
        if tracker:
            run_info.update(tracker.info())
            tracker.finish(result, curve_file)
        atomic_write_text(result.run_json, json.dumps(run_info, indent=2) + "\n")
        return result
    except BaseException as exc:
        if tracker:
            tracker.close(failed=not isinstance(exc, TrainingStopped))
        raise


def _image_loader(params: Params, pools: Pools, rows: dict[str, Any], start_step: int,
                  device: torch.device) -> torch.utils.data.DataLoader:
    t = params.train
    ds = ImageEpisodes(params, pools, rows, augment=t.augment)
    sampler = range(start_step * t.batch_size, total_steps(params) * t.batch_size)
    return torch.utils.data.DataLoader(
        ds, batch_size=t.batch_size, sampler=sampler, num_workers=t.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=t.num_workers > 0,
        generator=torch.Generator().manual_seed(t.seed))  # worker seeds never touch the global RNG


class _Tracker:
    """Buffers metric points of one training run and logs them in batches to its nested MLflow run."""

    def __init__(self, params: Params, fold: int | None, model_name: str, run_id: str | None) -> None:
        from pipeline import tracking

        self.params = params
        self.parent_id = tracking.parent_run_id(params)
        name = f"{fold_tag(fold)}/{model_name}/{params.model.backbone}/k{params.train.shots}"
        tags = {"model": model_name, "backbone": params.model.backbone, "shots": params.train.shots,
                "fold": fold_tag(fold), "stage": "train", "variant": params.model.variant}
        if run_id is not None:  # resumed training: log into the run of the interrupted attempt if it still exists
            try:
                tracking.client(params).get_run(run_id)
            except Exception:
                run_id = None
        self._ctx = (tracking.resume_run(params, run_id) if run_id else
                     tracking.nested_run(params, self.parent_id, name, tags))
        self.run = self._ctx.__enter__()
        self.run_id = self.run.info.run_id
        self.rows: list[tuple[str, float, int]] = []

    def add(self, key: str, value: float, step: int) -> None:
        self.rows.append((key, float(value), int(step)))
        if len(self.rows) >= 3000:
            self.flush()

    def flush(self) -> None:
        from pipeline.tracking import log_metrics_batch

        log_metrics_batch(self.params, self.run_id, self.rows)
        self.rows = []

    def info(self) -> dict[str, Any]:
        from pipeline.tracking import tracking_uri

        return {"parent_run_id": self.parent_id, "experiment_id": self.run.info.experiment_id,
                "tracking_uri": tracking_uri(self.params)}

    def finish(self, result: TrainResult, curve_file: Path) -> None:
        import mlflow

        self.flush()
        mlflow.log_metrics({"best_val_miou": result.best_val_miou, "train_seconds": result.seconds,
                            "train_episodes_per_s": result.episodes_per_s})
        mlflow.set_tags({"best_step": result.best_step, "resumed_from": result.resumed_from})
        mlflow.log_artifact(str(curve_file), artifact_path="training")
        self.close(failed=False)

    def close(self, failed: bool) -> None:
        if self._ctx is None:
            return
        try:
            self.flush()
        finally:
            ctx, self._ctx = self._ctx, None
            if failed:
                ctx.__exit__(RuntimeError, RuntimeError("training failed"), None)
            else:
                ctx.__exit__(None, None, None)


def result_dict(result: TrainResult) -> dict[str, Any]:
    """JSON-friendly view of a :class:`TrainResult`."""
    d = asdict(result)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}
