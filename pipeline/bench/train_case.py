"""Benchmark case ``train``: training throughput in episodes/s, with data loading timed apart.

Two configurations of LERENet, K = ``shots`` (1), ``S x S`` images (200), on the current device,
each with the model and training settings of a ``profiles:`` entry of the project's params.yaml:

* ``lite0-frozen-cached`` (profile ``cpu``): EfficientNet-Lite0 backbone frozen (packaged ImageNet
  weights), the CPU profile's descriptor width and batch size; episodes assembled from the feature
  cache (:class:`pipeline.training.batches.CachedEpisodes`). The backbone never runs.
* ``r50-finetuned-images`` (profile ``paper``): ResNet-50 fine-tuned, as the paper profile sets it
  (dilation, descriptor width, batch 2, DataLoader workers), randomly initialised (no ImageNet
  weights can be downloaded here; speed does not depend on the weights); episodes read and
  augmented from images by a ``DataLoader`` over :class:`pipeline.training.batches.ImageEpisodes` (pinned
  memory on CUDA).

One *step* is what :func:`pipeline.train.train` does per optimiser step: move the batch to the
device, forward, BCE loss (paper Eq. 6), backward, SGD step (momentum 0.9, weight decay 1e-4,
0.1x backbone learning rate). Each timed block of ``steps`` steps records the wall time, the time
spent waiting for the next batch on the host (*data*) and the time of the train step (*step*,
synchronised on CUDA), so a data-starved accelerator shows as a high data-wait share.

On CUDA each configuration runs with mixed precision + ``channels_last`` (what ``train()`` does:
:func:`pipeline.device.autocast` / :func:`pipeline.device.to_device`) and without (float32,
contiguous); the speed-up is the per-repeat ratio of the two throughputs. On CPU only the float32
path exists (autocast is CUDA-only in this project).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from pipeline import device as dev
from pipeline.bench import workspace
from pipeline.bench.harness import ratio_stats, summarize
from pipeline.training.loop import optimizer

#: configuration name -> params profile it takes its ``model`` and ``train`` settings from
CONFIGS: dict[str, str] = {"lite0-frozen-cached": "cpu", "r50-finetuned-images": "paper"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(net: torch.nn.Module, params: Any, device: torch.device, amp: bool,
              cached: bool) -> Callable[[dict[str, torch.Tensor]], None]:
    """One optimiser step on a batch (dict of tensors from ``CachedEpisodes.batch`` or the DataLoader).

    ``amp=True`` (CUDA only): autocast (bfloat16/float16) + ``channels_last`` inputs and weights,
    gradient scaler for float16 -- the settings of ``pipeline.train``. ``amp=False``: float32.
    """
    opt = optimizer(net, params)
    scaler = dev.grad_scaler(device) if amp else torch.amp.GradScaler("cuda", enabled=False)
    if amp and device.type == "cuda":
        net.to(memory_format=torch.channels_last)

    def move(x: torch.Tensor) -> torch.Tensor:
        return dev.to_device(x, device) if amp else x.to(device, non_blocking=True)

    def step(b: dict[str, torch.Tensor]) -> None:
        ctx = dev.autocast(device) if amp else contextlib.nullcontext()
        with ctx:
            if cached:
                logits = net.forward_features(move(b["support_feats"]), move(b["support_masks"]),
                                              move(b["query_feats"]), b["query_masks"].shape[-2:])
            else:
                logits = net(move(b["support_images"]), move(b["support_masks"]), move(b["query_images"]))
        loss = F.binary_cross_entropy_with_logits(logits.float(), b["query_masks"].to(device, non_blocking=True))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def time_blocks(batches: Iterator[dict[str, torch.Tensor]], step: Callable[[dict[str, torch.Tensor]], None],
                device: torch.device, *, steps: int, warmup: int, repeats: int) -> list[dict[str, float]]:
    """Run ``warmup`` untimed then ``repeats`` timed blocks of ``steps`` steps.

    Returns one ``{"total_s", "data_s", "step_s"}`` per timed block: wall seconds of the block,
    seconds spent in ``next(batches)`` (data) and in ``step`` (synchronised on CUDA).
    """
    out = []
    for block in range(warmup + repeats):
        data_s = step_s = 0.0
        _sync(device)
        t_block = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            b = next(batches)
            t1 = time.perf_counter()
            step(b)
            _sync(device)
            t2 = time.perf_counter()
            data_s += t1 - t0
            step_s += t2 - t1
        total = time.perf_counter() - t_block
        if block >= warmup:
            out.append({"total_s": total, "data_s": data_s, "step_s": step_s})
    return out


def _cached_batches(params: Any) -> Iterator[dict[str, torch.Tensor]]:
    from pipeline.episodes import training_pools
    from pipeline.features import FeatureStore, build_feature_store
    from pipeline.training.batches import CachedEpisodes

    store = FeatureStore.open(build_feature_store(params, progress=False))
    pools, _ = training_pools(params, None)
    t = params.train
    source = CachedEpisodes(store, pools, t.shots, t.seed, t.augment)
    i = 0
    while True:
        yield source.batch(i * t.batch_size, t.batch_size)
        i += 1


def _image_batches(params: Any, device: torch.device, n_steps: int, workers: int) -> Iterator[dict[str, torch.Tensor]]:
    from pipeline.episodes import training_pools
    from pipeline.images import load_validated
    from pipeline.training.batches import ImageEpisodes

    pools, _ = training_pools(params, None)
    rows = {r["id"]: r for r in load_validated(params.data.dir, kind="defect").to_dict("records")}
    t = params.train
    ds = ImageEpisodes(params, pools, rows, augment=t.augment)
    loader = torch.utils.data.DataLoader(ds, batch_size=t.batch_size, sampler=range(n_steps * t.batch_size),
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    return iter(loader)


def run(ctx: Any) -> dict[str, Any]:
    """Measure both configurations (module docstring) with ``ctx`` (:class:`pipeline.bench.runner.Context`).

    Returns ``{"rows": [...], "info": {...}}``: per configuration (and AMP setting on CUDA)
    episodes/s, data-wait share, ms per step (data and step apart), and on CUDA the AMP speed-up.
    """
    from pipeline.checkpoint import build_net

    s, device = ctx.settings, ctx.device
    root = ctx.workdir / "train"
    source = workspace.make_small_source(ctx.source, root / "source", s.train_classes, s.train_images_per_class, 0)
    pf = workspace.write_params(root / "params.yaml", source, {
        "folds": {i: [c] for i, c in enumerate(s.train_classes)},
        "split": {"shots": [s.shots]},
        "train": {"image_size": s.image_size, "shots": s.shots, "feature_views": 1, "augment": True,
                  "device": device.type},
    })
    base = workspace.load(pf)
    workspace.ingest_and_validate(base)
    amp_modes = [True, False] if device.type == "cuda" else [False]
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = {"image_size": s.image_size, "shots": s.shots, "steps_per_block": s.train_steps,
                            "warmup_blocks": s.train_warmup, "repeats": s.train_repeats,
                            "classes": list(s.train_classes), "images_per_class": s.train_images_per_class,
                            "configs": {}}
    for name, profile in CONFIGS.items():
        params = workspace.load(pf, profile=profile)
        cached = params.model.freeze_backbone
        workers = params.train.num_workers if s.workers is None else s.workers
        eps: dict[bool, list[float]] = {}
        for amp in amp_modes:
            torch.manual_seed(params.train.seed)
            net = build_net(params, "lerenet", pretrained=params.model.backbone.startswith("efficientnet_lite"))
            net = net.to(device).train()
            n_steps = (s.train_warmup + s.train_repeats) * s.train_steps
            batches = _cached_batches(params) if cached else _image_batches(params, device, n_steps, workers)
            blocks = time_blocks(batches, make_step(net, params, device, amp, cached), device,
                                 steps=s.train_steps, warmup=s.train_warmup, repeats=s.train_repeats)
            bs = params.train.batch_size
            eps[amp] = [s.train_steps * bs / b["total_s"] for b in blocks]
            tag = f"{name} ({profile} profile)"
            if device.type == "cuda":
                tag += " amp+channels_last" if amp else " fp32"
            rows.append({"label": f"{tag}: episodes/s", **summarize(eps[amp], "episodes/s").as_dict()})
            rows.append({"label": f"{tag}: data wait share",
                         **summarize([b["data_s"] / b["total_s"] for b in blocks], "fraction").as_dict()})
            rows.append({"label": f"{tag}: data ms/step",
                         **summarize([1000 * b["data_s"] / s.train_steps for b in blocks], "ms").as_dict()})
            rows.append({"label": f"{tag}: train step ms/step",
                         **summarize([1000 * b["step_s"] / s.train_steps for b in blocks], "ms").as_dict()})
            del net, batches
        if len(amp_modes) == 2:
            rows.append({"label": f"{name} ({profile} profile): AMP+channels_last speed-up",
                         **ratio_stats(eps[True], eps[False]).as_dict()})
        info["configs"][name] = {"profile": profile, "backbone": params.model.backbone,
                                 "dilated": params.model.dilated, "channels": params.model.channels,
                                 "freeze_backbone": params.model.freeze_backbone,
                                 "batch_size": params.train.batch_size, "loader_workers": None if cached else workers,
                                 "episode_source":
                                 "feature cache" if cached else "images (DataLoader)",
                                 "backbone_weights": "ImageNet (packaged)" if cached else "random init"}
    return {"rows": rows, "info": info}

