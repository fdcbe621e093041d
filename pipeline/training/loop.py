"""The optimisation loop of :func:`pipeline.train.train`: optimiser, schedule, validation, steps.

* Loss (``train.loss``): binary cross-entropy with logits between the query logits and its mask
  (paper Eq. 6), or SOFS's mixed normal Dice + ``train.bce_weight`` x BCE (``model.losses``); a
  deep-supervised model (JAFFNet) gets its own hybrid loss on every side output (:meth:`Session.loss`).
* Optimiser (authors' code): SGD, momentum ``train.momentum`` (0.9), weight decay
  ``train.weight_decay`` (1e-4); poly schedule ``lr_s = lr * (1 - s / steps) ** poly_power``;
  a fine-tuned backbone gets ``lr * backbone_lr_mult``.
* Model selection: every ``train.val_every`` steps (and at the last step), mean foreground IoU
  over the training classes on ``train.val_episodes`` fixed episodes whose queries are the fold's
  held-out ``val_ids`` (:func:`validate`), minus ``train.support_penalty`` x the same with
  mismatched supports (:meth:`Session.selection_score`); the best state is kept. Test classes are
  never touched.
* Checkpoints: every ``train.checkpoint_every`` steps (and at the end) the full training state is
  written (:mod:`pipeline.training.state`); ``stop_after`` simulates a killed run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from model.losses import deep_supervision_loss, segmentation_loss

from pipeline import device as dev
from pipeline.config import Params
from pipeline.episodes import Episode
from pipeline.features import FeatureStore
from pipeline.metrics import IoUAccumulator
from pipeline.training.batches import ImageEpisodes, gather
from pipeline.training.state import Progress, save_progress


class TrainingStopped(RuntimeError):
    """Raised by ``train(..., stop_after=N)`` after step N: simulates a killed run (tests, demos)."""


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite (e.g. a learning rate too high for the model)."""


def poly_factor(step: int, steps: int, power: float) -> float:
    """Poly learning-rate factor ``(1 - step / steps) ** power`` in [0, 1] (authors' schedule)."""
    return max(0.0, 1.0 - step / max(1, steps)) ** power


def optimizer(net: torch.nn.Module, params: Params) -> torch.optim.SGD:
    """SGD over the head at ``train.lr`` and a fine-tuned backbone at ``lr * backbone_lr_mult``."""
    t = params.train
    groups = [{"params": net.head_parameters(), "lr": t.lr, "lr_mult": 1.0}]
    bb = net.backbone_parameters()
    if bb:
        groups.append({"params": bb, "lr": t.lr * t.backbone_lr_mult, "lr_mult": t.backbone_lr_mult})
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def scheduler(opt: torch.optim.Optimizer, steps: int, power: float) -> torch.optim.lr_scheduler.LambdaLR:
    """The poly schedule over ``steps`` optimiser steps (:func:`poly_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: poly_factor(s, steps, power))


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
            b = gather(store, [i for e in chunk for i in e.support_ids], [e.query_id for e in chunk], 0, 0, n, k)
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


@dataclass
class Session:
    """What the step loop needs: the network and its optimiser state, the episode sources, where to
    checkpoint and what to report. ``key``: the :class:`~pipeline.training.state.StateKey` of the resumable state."""

    params: Params
    net: torch.nn.Module
    device: torch.device
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    val_episodes: Sequence[Episode]
    store: FeatureStore | None
    val_data: ImageEpisodes | None
    state_file: Any
    key: tuple  # pipeline.training.state.StateKey
    tracker: Any = None
    desc: str = "train"
    progress: bool = True
    on_step: Callable[[int, float], None] | None = None
    stop_after: int | None = None
    generator: torch.Generator | None = None
    val_mismatched: Sequence[Episode] = ()
    val_mismatched_data: ImageEpisodes | None = None

    def validate(self) -> float:
        """:func:`validate` on the fixed validation episodes (cached features or images)."""
        return validate(self.net, self.val_episodes, store=self.store, dataset=self.val_data, device=self.device)

    def selection_score(self) -> tuple[float, float, float | None]:
        """``(score, val mIoU, mismatched val mIoU or None)``: the model-selection score is the val
        mIoU minus ``train.support_penalty`` x the mIoU of the same queries with supports of another
        selection class (:func:`pipeline.episodes.mismatched_validation`); plain mIoU without them."""
        miou = self.validate()
        lam = self.params.train.support_penalty
        if lam <= 0 or not self.val_mismatched:
            return miou, miou, None
        mis = validate(self.net, self.val_mismatched, store=self.store, dataset=self.val_mismatched_data,
                       device=self.device)
        return miou - lam * mis, miou, mis

    def features(self, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(support_feats, support_masks, query_feats)`` of a batch on the device: the cached features,
        or ``net.encode`` of the images (as ``FewShotSegmenter.forward`` does)."""
        d = self.device
        masks = dev.to_device(b["support_masks"], d)
        if "support_feats" in b:
            return dev.to_device(b["support_feats"], d), masks, dev.to_device(b["query_feats"], d)
        sup = dev.to_device(b["support_images"], d)
        bk = tuple(sup.shape[:2])
        return (self.net.encode(sup.flatten(0, 1)).unflatten(0, bk), masks,
                self.net.encode(dev.to_device(b["query_images"], d)))

    def forward(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """Query logits of a batch: ``forward_features`` on cached features, else the full ``net(...)``."""
        d = self.device
        with dev.autocast(d):
            if "support_feats" in b:
                return self.net.forward_features(dev.to_device(b["support_feats"], d),
                                                 dev.to_device(b["support_masks"], d),
                                                 dev.to_device(b["query_feats"], d), b["query_masks"].shape[-2:])
            return self.net(dev.to_device(b["support_images"], d), dev.to_device(b["support_masks"], d),
                            dev.to_device(b["query_images"], d))

    def loss(self, b: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch.

        A model with deep supervision (``side_logits``: JAFFNet) is trained with its paper's loss,
        :func:`model.losses.deep_supervision_loss` (BCE + IoU + SSIM summed over every side output;
        ``train.loss`` does not apply); every other model with ``train.loss`` (BCE, or mixed normal
        Dice + ``train.bce_weight`` x BCE) on its query logits.
        """
        target = dev.to_device(b["query_masks"], self.device)
        if hasattr(self.net, "side_logits"):
            with dev.autocast(self.device):
                sides = self.net.side_logits(*self.features(b), tuple(target.shape[-2:]))
            return deep_supervision_loss([x.float() for x in sides], target)
        t = self.params.train
        return segmentation_loss(self.forward(b).float(), target, t.loss, t.bce_weight)


def _step(s: Session, b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """One optimiser step (:meth:`Session.loss`; backward, SGD, schedule); returns ``(loss, lr used)``."""
    loss = s.loss(b)
    s.opt.zero_grad(set_to_none=True)
    s.scaler.scale(loss).backward()
    s.scaler.step(s.opt)
    s.scaler.update()
    lr = s.opt.param_groups[0]["lr"]
    s.sched.step()
    return float(loss.detach()), lr


def _validate_into(s: Session, p: Progress, done: int, row: dict[str, Any]) -> None:
    score, miou, mis = s.selection_score()
    s.net.train()
    row["val_miou"] = round(miou, 6)
    if mis is not None:
        row["val_mismatched_miou"] = round(mis, 6)
    if s.tracker:
        s.tracker.add("val_miou", miou, done)
        if mis is not None:
            s.tracker.add("val_mismatched_miou", mis, done)
            s.tracker.add("val_score", score, done)
        s.tracker.flush()
    if score > p.best:
        p.best, p.best_step = score, done
        p.best_state = {k: v.detach().to("cpu").clone() for k, v in s.net.state_dict().items()}


def start_validation(s: Session, p: Progress) -> None:
    """Score the untrained network (``train.validate_at_start``): step 0 becomes a curve row and a
    candidate of model selection, so training is kept only where it beats its starting point."""
    row = {"step": 0, "episodes": 0, "loss": None, "lr": None, "val_miou": None, "episodes_per_s": None}
    _validate_into(s, p, 0, row)
    p.curve.append(row)


def run_steps(s: Session, batches: Callable[[int], dict[str, torch.Tensor]], p: Progress, steps: int) -> None:
    """Optimiser steps ``p.step + 1 .. steps``, updating ``p`` (curve, best state); loads the best state
    into the network at the end.

    Args:
        batches: ``batches(step)`` -> the batch of step ``step`` (0-based).

    Raises:
        TrainingStopped: ``s.stop_after`` reached before the last step (state checkpointed before).
        TrainingDiverged: a non-finite loss (nothing is checkpointed after it).
    """
    t = s.params.train
    s.net.train()
    bar = tqdm(total=steps, initial=p.step, desc=s.desc, unit="step", disable=not s.progress)
    tick, tick_eps = time.perf_counter(), 0
    for step in range(p.step, steps):
        loss_v, lr = _step(s, batches(step))
        done = step + 1
        if not math.isfinite(loss_v):
            bar.close()
            raise TrainingDiverged(f"{s.desc}: the loss is {loss_v} at step {done} (lr {lr:g}); the weights are lost, "
                                   "no model file is written. Lower train.lr, or only this model's with "
                                   "train.per_model.<model>.lr, and train again (other settings start from step 0).")
        tick_eps += t.batch_size
        elapsed = time.perf_counter() - tick
        eps = tick_eps / elapsed if elapsed > 0 else 0.0
        row = {"step": done, "episodes": done * t.batch_size, "loss": round(loss_v, 6), "lr": lr,
               "val_miou": None, "episodes_per_s": round(eps, 2)}
        if s.tracker:
            s.tracker.add("loss", loss_v, done)
            s.tracker.add("lr", lr, done)
        if done % t.val_every == 0 or done == steps:
            _validate_into(s, p, done, row)
        p.curve.append(row)
        p.step = done
        if done % t.checkpoint_every == 0 or done == steps:
            save_progress(s.state_file, s.key, p, s.net, s.opt, s.sched, s.scaler, s.generator)
        if s.on_step:
            s.on_step(done, loss_v)
        bar.set_postfix(loss=f"{loss_v:.4f}", eps=f"{eps:.1f}/s")
        bar.update(1)
        if s.stop_after is not None and done >= s.stop_after and done < steps:
            bar.close()
            raise TrainingStopped(f"stopped after step {done} (stop_after={s.stop_after})")
    bar.close()
    if p.best_state is not None:
        s.net.load_state_dict(p.best_state)
