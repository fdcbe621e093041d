"""JAFFNet in its own setting: supervised saliency detection trained and tested within classes (issue 12).

Usage (needs ``data/validated.parquet`` from ``dvc repro validate``, or ``--source FOLDER``)::

    python -m pipeline.bench.saliency [--classes C ...] [--epochs N] [--image-size S] [--out FILE] [--help]

1. **Split** (:func:`within_class_split`): the defect images of each class (default :data:`DEFAULT_CLASSES`,
   the SD-saliency-900 and magnetic-tile classes) split 80/20 into train/test, seeded per class by
   ``split.seed``; rows from the validated manifest, or a Surface Defects-4i folder (``--source``).
2. **Training** (:func:`train`): one ``jaffnet`` (:func:`pipeline.checkpoint.build_net`; encoder fine-tuned
   unless ``--frozen``) on the train images of all classes, image -> mask, with the training loop's JAFFNet
   loss :func:`model.losses.deep_supervision_loss` (BCE + IoU + SSIM over the side outputs) and optimiser
   (:func:`pipeline.training.loop.optimizer`, poly schedule); the support is an empty K = 1 episode (JAFFNet
   ignores it). Inputs: the clean ``S x S`` view, augmented by :mod:`pipeline.augment`. Torch threads:
   ``$OMP_NUM_THREADS``.
3. **Test** (:func:`evaluate`): ``sigmoid(logits)`` upsampled bilinearly to each test image's original size,
   scored against its original mask (:mod:`pipeline.bench.saliency_metrics`: MAE, max F with beta^2 = 0.3
   over thresholds 0..255, IoU at 0.5) per class, per source data set (:data:`GROUPS`) and overall.
4. **Speed** (:func:`forward_speed`): images/s of one full forward at ``S x S``, batch 1, ``--speed-threads``
   torch threads (default 2), median of timed repeats after warm-up.

Every figure, the settings and the seconds spent go to ``--out`` as JSON, written atomically.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from pipeline.atomic import atomic_write_text
from pipeline.bench.harness import cpu_seconds, load_average, machine_info, summarize, time_calls
from pipeline.bench.saliency_metrics import BETA2, LEVELS, SaliencyAccumulator

DEFAULT_CLASSES = ("Steel_In", "Steel_Pa", "Steel_Sc", "MT_Blowhole", "MT_Break", "MT_Crack", "MT_Fray", "MT_Uneven")
"""The classes of JAFFNet's data sets present in ``defects12``: SD-saliency-900 and Magnetic-tile."""

GROUPS = {"Steel_": "SD-saliency-900", "MT_": "Magnetic-tile", "Leather_": "MVTec-AD-leather"}
"""Class-name prefix -> the public data set the class comes from (``../shared/datasets/README.md``)."""

DEFAULT_OUT = Path("bench/saliency/results.json")
TEST_FRACTION = 0.2


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` with its float values rounded to 5 decimals (JSON figures)."""
    return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in d.items()}


# ----------------------------------------------------------------------------- split
def class_split(ids: Sequence[str], seed: int, class_name: str,
                test_fraction: float = TEST_FRACTION) -> tuple[list[str], list[str]]:
    """Seeded train/test split of one class's image ids.

    The ids are sorted, then permuted by ``np.random.default_rng([seed, crc32(class_name)])`` (a stream
    per class: adding or removing another class leaves this split unchanged); the first
    ``max(1, round(n * test_fraction))`` become the test set.

    Returns:
        ``(train_ids, test_ids)``, each sorted, disjoint, together ``ids``.

    Raises:
        ValueError: fewer than 2 ids, duplicate ids, or ``test_fraction`` outside ``(0, 1)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    ordered = sorted(str(i) for i in ids)
    if len(set(ordered)) != len(ordered):
        raise ValueError(f"class {class_name!r} has duplicate image ids")
    if len(ordered) < 2:
        raise ValueError(f"class {class_name!r} has {len(ordered)} image(s); a train/test split needs >= 2")
    n_test = min(len(ordered) - 1, max(1, round(len(ordered) * test_fraction)))
    perm = np.random.default_rng([int(seed), zlib.crc32(class_name.encode())]).permutation(len(ordered))
    test = sorted(ordered[i] for i in perm[:n_test])
    return sorted(set(ordered) - set(test)), test


def within_class_split(rows: pd.DataFrame, classes: Sequence[str], seed: int,
                       test_fraction: float = TEST_FRACTION) -> dict[str, dict[str, list[str]]]:
    """:func:`class_split` of every class in ``classes``: ``{class: {"train": ids, "test": ids}}``.

    Args:
        rows: one row per defect image with ``id`` and ``class_name`` (manifest schema).

    Raises:
        ValueError: a class has no row (names the available ones), or as :func:`class_split`.
    """
    missing = [c for c in classes if c not in set(rows["class_name"])]
    if missing:
        raise ValueError(f"no defect image of class(es) {missing}; available: {sorted(set(rows['class_name']))}")
    out = {}
    for c in classes:
        train, test = class_split(rows.loc[rows["class_name"] == c, "id"].tolist(), seed, c, test_fraction)
        out[c] = {"train": train, "test": test}
    return out


def load_rows(data_dir: Path | None = None, source: Path | None = None, threshold: int = 127) -> pd.DataFrame:
    """Defect images with non-empty masks: ``id, class_name, image_path, mask_path`` (paths absolute or
    relative to ``data_dir``), from ``<data_dir>/validated.parquet`` or, if given, the folder ``source``.

    Raises:
        pipeline.images.DataArtifactError: no validated manifest (run ``dvc repro validate``).
        pipeline.evaluation.data.EvaluationError: ``source`` is not a usable Surface Defects-4i folder.
        ValueError: neither argument given.
    """
    if source is not None:
        from pipeline.evaluation.folder import folder_table

        df = folder_table(Path(source), threshold)[0].rows
        return df[df["kind"] == "defect"].reset_index(drop=True)
    if data_dir is None:
        raise ValueError("give data_dir (validated manifest) or source (image folder)")
    from pipeline.images import load_validated

    return load_validated(data_dir, kind="defect")


# ----------------------------------------------------------------------------- data
def clean_views(rows: pd.DataFrame, ids: Sequence[str], data_dir: Path, size: int,
                threshold: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per id: the clean view ``(image (S, S, 3) uint8, mask (S, S) bool)`` (bilinear / nearest resize)."""
    from pipeline.images import read_image, read_mask, resolve
    from pipeline.inference.preprocess import clean_pair

    by_id = rows.set_index("id")
    out = []
    for i in ids:
        r = by_id.loc[i]
        out.append(clean_pair(read_image(resolve(data_dir, r["image_path"])),
                              read_mask(resolve(data_dir, r["mask_path"]), threshold), size))
    return out


def empty_support(net: torch.nn.Module, batch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An all-zero K = 1 support ``(feats (B, 1, Cb, h, w), masks (B, 1, 1, S, S))`` (JAFFNet ignores it)."""
    with torch.no_grad():
        feats = net.encode(torch.zeros(batch, 3, size, size))
    return feats.unsqueeze(1), torch.zeros(batch, 1, 1, size, size)


# ----------------------------------------------------------------------------- train / test / speed
def train(net: torch.nn.Module, views: Sequence[tuple[np.ndarray, np.ndarray]], params: Any, epochs: int,
          *, augment: bool = True, max_seconds: float | None = None, log: Callable[[str], None] = print
          ) -> dict[str, Any]:
    """Supervised training of ``net`` on ``views`` with JAFFNet's deep-supervised hybrid loss.

    ``ceil(n / train.batch_size)`` SGD steps per epoch (:func:`pipeline.training.loop.optimizer`,
    ``train.lr``, poly decay over all steps), images shuffled per epoch with the RNG
    ``[train.seed, epoch]``; with ``augment`` each image gets the project's augmentation seeded by
    ``(train.seed, epoch, index)``. ``max_seconds``: wall-time budget; training stops after the step
    that passes it (the schedule is not shortened; ``stopped_early`` says so). Leaves ``net`` in eval mode.

    Returns:
        ``{"steps", "planned_steps", "epochs", "stopped_early", "epoch_loss": [mean loss per (started)
        epoch], "seconds_per_epoch": [...]}``.

    Raises:
        ValueError: no views or ``epochs < 1``.
        FloatingPointError: the loss became NaN/infinite (names the epoch and step).
    """
    from model.losses import deep_supervision_loss
    from pipeline.augment import augment_pair, build_augment
    from pipeline.features import view_seed
    from pipeline.inference.preprocess import to_tensor_pair
    from pipeline.training.loop import optimizer, scheduler

    if not views or epochs < 1:
        raise ValueError(f"need >= 1 training image and >= 1 epoch, got {len(views)} and {epochs}")
    t = params.train
    size = views[0][0].shape[0]
    per_epoch = math.ceil(len(views) / t.batch_size)
    opt = optimizer(net, params)
    sched = scheduler(opt, per_epoch * epochs, t.poly_power)
    pipe = build_augment(size)
    history: dict[str, Any] = {"steps": 0, "planned_steps": per_epoch * epochs, "epochs": epochs,
                               "stopped_early": False, "epoch_loss": [], "seconds_per_epoch": []}
    net.train()
    began = time.perf_counter()
    for epoch in range(epochs):
        if history["stopped_early"]:
            break
        start, losses = time.perf_counter(), []
        order = np.random.default_rng([int(t.seed), epoch]).permutation(len(views))
        for first in range(0, len(order), t.batch_size):
            pairs = [to_tensor_pair(*(augment_pair(pipe, *views[j], view_seed(t.seed, f"{epoch}:{j}", 0))
                                      if augment else views[j])) for j in order[first:first + t.batch_size]]
            x, y = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
            sup, sup_masks = empty_support(net, len(pairs), size)
            loss = deep_supervision_loss(net.side_logits(sup, sup_masks, net.encode(x), (size, size)), y)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss {loss.item()} at epoch {epoch + 1}, step {history['steps'] + 1}; "
                                         "lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            history["steps"] += 1
            losses.append(float(loss.detach()))
            if max_seconds is not None and time.perf_counter() - began > max_seconds:
                history["stopped_early"] = True
                break
        history["epoch_loss"].append(round(float(np.mean(losses)), 5))
        history["seconds_per_epoch"].append(round(time.perf_counter() - start, 1))
        log(f"epoch {epoch + 1}/{epochs}: loss {history['epoch_loss'][-1]:.4f}, {history['seconds_per_epoch'][-1]:.0f}"
            f" s, step {history['steps']}/{history['planned_steps']}{' (time budget hit)' * history['stopped_early']}")
    net.eval()
    return history


@torch.inference_mode()
def evaluate(net: torch.nn.Module, rows: pd.DataFrame, split: dict[str, dict[str, list[str]]], data_dir: Path,
             size: int, threshold: int, batch_size: int = 16) -> SaliencyAccumulator:
    """Scores every test image of ``split`` at its original resolution (module docstring, step 3).

    Returns:
        The filled :class:`~pipeline.bench.saliency_metrics.SaliencyAccumulator`.
    """
    from pipeline.images import read_image, read_mask, resolve
    from pipeline.inference.predictor import Predictor
    from pipeline.inference.preprocess import clean_tensors

    net.eval()
    acc = SaliencyAccumulator()
    by_id = rows.set_index("id")
    items = [(c, i) for c, s in split.items() for i in s["test"]]
    for first in range(0, len(items), batch_size):
        chunk = items[first:first + batch_size]
        images, masks = [], []
        for _, i in chunk:
            r = by_id.loc[i]
            images.append(clean_tensors(read_image(resolve(data_dir, r["image_path"])), None, size)[0])
            masks.append(read_mask(resolve(data_dir, r["mask_path"]), threshold))
        sup, sup_masks = empty_support(net, len(chunk), size)
        logits = net.forward_features(sup, sup_masks, net.encode(torch.stack(images)), (size, size))
        for (c, _), up, gt in zip(chunk, Predictor.upsample(logits, [m.shape for m in masks]), masks):
            acc.update(torch.sigmoid(up.float()).numpy(), gt, c)
    return acc


def forward_speed(net: torch.nn.Module, image: torch.Tensor, threads: int = 2, warmup: int = 5,
                  repeats: int = 30) -> dict[str, Any]:
    """Images/s of ``net(support, masks, image)`` on an ``image (3, S, S)`` in ``[0, 1]``: batch 1, full
    forward, ``inference_mode``, ``threads`` torch threads (restored afterwards).

    Returns ``{"images_per_s": 1 / median wall time, "images_per_s_best": 1 / fastest, "ms_per_image":
    {"median", "min", "max", "n", "unit"} (wall), "cpu_ms_per_image": the same in process CPU time (all
    threads), "threads", "input_size", "batch": 1, "warmup", "repeats"}``. Raises ``ValueError`` for
    ``threads < 1`` and as :func:`pipeline.bench.harness.time_calls`.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    size = int(image.shape[-1])
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net.eval()
        x = image[None]
        sup, sup_masks = torch.zeros(1, 1, 3, size, size), torch.zeros(1, 1, 1, size, size)
        cpu: list[float] = []

        def forward() -> None:
            c0 = time.process_time()
            net(sup, sup_masks, x)
            cpu.append(time.process_time() - c0)

        with torch.inference_mode():
            times = time_calls(forward, warmup=warmup, repeats=repeats)
    finally:
        torch.set_num_threads(prev)
    ms = summarize([1000.0 * s for s in times], "ms/image")
    cpu_ms = summarize([1000.0 * s for s in cpu[warmup:]], "CPU ms/image")
    return {"images_per_s": round(1000.0 / ms.median, 2), "images_per_s_best": round(1000.0 / ms.min, 2),
            "ms_per_image": _rounded(ms.as_dict()), "cpu_ms_per_image": _rounded(cpu_ms.as_dict()),
            "threads": threads, "input_size": size, "batch": 1, "warmup": warmup, "repeats": repeats}


# ----------------------------------------------------------------------------- the run
def group_of(class_name: str) -> str:
    """The source data set of a class (:data:`GROUPS`), ``"other"`` for an unknown prefix."""
    return next((g for p, g in GROUPS.items() if class_name.startswith(p)), "other")


def _class_row(acc: SaliencyAccumulator, c: str, train_images: int) -> dict[str, Any]:
    """One class's figures; its IoU is ``iou`` (``miou`` of a single class)."""
    row = _rounded(acc.summary([c]))
    row["iou"] = row.pop("miou")
    return {**row, "train_images": train_images}


def run(params: Any, rows: pd.DataFrame, classes: Sequence[str], epochs: int, out: Path, *,
        data_dir: Path | None = None, augment: bool = True, max_train_minutes: float | None = None,
        speed_threads: int = 2, speed_warmup: int = 5, speed_repeats: int = 30, speed_only: bool = False,
        test_fraction: float = TEST_FRACTION, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Split, train, test and time JAFFNet (module docstring) and write the JSON to ``out``; with
    ``speed_only`` only step 4, on the untrained network (same architecture: its speed does not depend
    on the weights), e.g. to re-time at a quiet moment of a shared machine.

    ``params``: validated params (``split.seed``, ``train.*``, ``model.*``, ``data.mask_threshold``);
    ``rows``: :func:`load_rows` output, relative paths from ``data_dir`` (default ``params.data.dir``).
    Returns the dictionary written. Raises ``ValueError`` / ``FloatingPointError`` as
    :func:`within_class_split` and :func:`train`.
    """
    from pipeline import device as dev
    from pipeline.checkpoint import build_net
    from pipeline.inference.preprocess import to_tensor_pair

    t0, c0, start_load = time.perf_counter(), cpu_seconds(), load_average()
    data_dir = Path(data_dir or params.data.dir)
    size, thr = int(params.train.image_size), int(params.data.mask_threshold)
    split = within_class_split(rows, classes, params.split.seed, test_fraction)
    train_ids = [i for c in classes for i in split[c]["train"]]
    views = clean_views(rows, train_ids[:1] if speed_only else train_ids, data_dir, size, thr)
    t_load = time.perf_counter()
    log(f"{len(train_ids)} train / {sum(len(s['test']) for s in split.values())} test images, {len(classes)} classes, "
        f"{size}x{size}, {torch.get_num_threads()} torch threads{', speed only' * speed_only}")
    dev.seed_everything(params.train.seed)
    net = build_net(params, "jaffnet")
    history = None if speed_only else train(net, views, params, epochs, augment=augment, log=log, max_seconds=None
                                            if max_train_minutes is None else 60.0 * max_train_minutes)
    t_train = time.perf_counter()
    acc = None if speed_only else evaluate(net, rows, split, data_dir, size, thr)
    t_test = time.perf_counter()
    speed = forward_speed(net, to_tensor_pair(*views[0])[0], speed_threads, speed_warmup, speed_repeats)
    t_speed = time.perf_counter()
    groups: dict[str, list[str]] = {}
    for c in classes:
        groups.setdefault(group_of(c), []).append(c)
    result: dict[str, Any] = {
        "setting": "JAFFNet supervised within classes: per-class seeded train/test split, one model trained on the "
                   "train images of all classes, scored on the held-out images of the same classes"
                   + (" (speed only: not trained, not scored)" if speed_only else ""),
        **({} if acc is None else {
            "per_class": {c: _class_row(acc, c, len(split[c]["train"])) for c in classes},
            "groups": {g: {**_rounded(acc.summary(cs)), "classes": cs} for g, cs in groups.items()},
            "overall": {**_rounded(acc.summary(list(classes))), "classes": list(classes)}}),
        "speed": speed,
        "training": history,
        "settings": {"model": "jaffnet", "backbone": params.model.backbone, "channels": params.model.channels,
                     "freeze_backbone": bool(net.freeze_backbone), "epochs": epochs,
                     "max_train_minutes": max_train_minutes, "optimizer": "SGD (pipeline.training.loop.optimizer)",
                     **{k: getattr(params.train, k) for k in ("image_size", "batch_size", "lr", "momentum",
                        "weight_decay", "backbone_lr_mult", "poly_power", "seed")}, "augment": augment,
                     "split_seed": params.split.seed, "test_fraction": test_fraction, "mask_threshold": thr,
                     "loss": "model.losses.deep_supervision_loss (BCE + IoU + SSIM per side output, summed)",
                     "beta2": BETA2, "thresholds": LEVELS, "iou_threshold": 0.5,
                     "evaluated_at": "original mask resolution (logits upsampled bilinearly)",
                     "train_threads": torch.get_num_threads()},
        "test_ids": {c: split[c]["test"] for c in classes},
        "seconds": {"load": round(t_load - t0, 1), "train": round(t_train - t_load, 1),
                    "test": round(t_test - t_train, 1), "speed": round(t_speed - t_test, 1),
                    "total": round(t_speed - t0, 1), "cpu_total": round(cpu_seconds() - c0, 1)},
        "machine": {**machine_info("cpu"), "load_average_start": start_load, "load_average_end": load_average()},
    }
    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    log(f"wrote {out}")
    return result


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command line (module docstring); returns the written result. Exit status 2 on bad options."""
    from pipeline.config import load_params

    ap = argparse.ArgumentParser(prog="python -m pipeline.bench.saliency", description=__doc__.splitlines()[0])
    ap.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES), metavar="CLASS")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=None, help="S (default train.image_size)")
    ap.add_argument("--batch-size", type=int, default=None, help="default train.batch_size")
    ap.add_argument("--lr", type=float, default=None, help="default train.lr")
    ap.add_argument("--frozen", action="store_true", help="freeze the encoder (default: fine-tuned, as the paper)")
    ap.add_argument("--no-augment", action="store_true")
    ap.add_argument("--max-train-minutes", type=float, default=None, help="stop training after this wall time")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--params", type=Path, default=None, help="params file (default params.yaml)")
    ap.add_argument("--data-dir", type=Path, default=None, help="folder of validated.parquet (default data.dir)")
    ap.add_argument("--source", type=Path, default=None, help="read this Surface Defects-4i folder instead")
    ap.add_argument("--speed-threads", type=int, default=2)
    ap.add_argument("--speed-warmup", type=int, default=5)
    ap.add_argument("--speed-repeats", type=int, default=30)
    ap.add_argument("--speed-only", action="store_true", help="only time the forward (untrained network)")
    a = ap.parse_args(argv)
    if (a.epochs < 1 or (a.image_size is not None and a.image_size < 32) or a.speed_threads < 1
            or a.speed_repeats < 1 or (a.max_train_minutes is not None and a.max_train_minutes < 0)):
        ap.error("need --epochs >= 1, --image-size >= 32, --speed-threads >= 1, --speed-repeats >= 1, "
                 "--max-train-minutes >= 0")
    train_over = {k: v for k, v in {"image_size": a.image_size, "batch_size": a.batch_size, "lr": a.lr}.items()
                  if v is not None}
    params = load_params(a.params, overrides={"train": train_over, "model": {"freeze_backbone": bool(a.frozen)}})
    threads = os.environ.get("OMP_NUM_THREADS", "")
    torch.set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0 else (os.cpu_count() or 1))
    data_dir = a.data_dir or params.data.dir
    rows = load_rows(data_dir, a.source, params.data.mask_threshold)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    return run(params, rows, a.classes, a.epochs, a.out, data_dir=data_dir, augment=not a.no_augment,
               max_train_minutes=a.max_train_minutes, speed_threads=a.speed_threads, speed_warmup=a.speed_warmup,
               speed_repeats=a.speed_repeats, speed_only=a.speed_only, log=log)


if __name__ == "__main__":
    main()
