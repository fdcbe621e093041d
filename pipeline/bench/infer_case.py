"""Benchmark case ``inference``: ms per query and queries/s, supports cached vs not, batch 1 and 16.

Model: LERENet as ``params.model`` configures it (the deployed configuration; CPU profile:
EfficientNet-Lite0 with its packaged ImageNet weights, 64-channel descriptors), untrained head
(speed does not depend on the weights), eval mode, no autograd, ``S x S`` input (200), K
support pairs (1) and ``queries`` query images, all real images of ``data.source`` decoded
beforehand (decoding is not timed; resizing, the network and the upsampling of each probability
map to its query's original size are).

* **cached**: what ``lerenet predict`` does (:mod:`pipeline.predict`): the support set is encoded
  once per pass (:meth:`Predictor.encode_support <pipeline.inference.predictor.Predictor.encode_support>`),
  then every batch of queries runs ``encode(queries)`` + ``forward_features``
  (:meth:`~pipeline.inference.predictor.Predictor.predict_probabilities`).
* **cached, N transductive steps** (a network with the hypercolumn probe): the cached pass with the test-time
  refinement on (:meth:`~pipeline.inference.predictor.Predictor.transductive`, ``infer_transductive`` steps),
  and its cost as a time ratio to the cached pass; the two plain passes then run with the refinement off.
* **cached, R reference images** (when ``data.source/<class>/Nd`` has images): the cached pass whose support set
  also scores R defect-free reference images (R = ``train.presence_references``, at least 1; the presence gate's
  reference level, :meth:`~pipeline.inference.predictor.Predictor.encode_support`), once per pass as
  ``lerenet predict --reference`` does, and its cost as a time ratio to the cached pass.
* **not cached**: the same Predictor calls, except that the K supports are encoded again for every
  query of every batch (``encode`` of ``n*K`` support images + ``n`` queries, then
  :meth:`~pipeline.inference.predictor.Predictor.head`), as a service that does not reuse the
  support set would.

``lerenet bench-predict`` (:func:`pipeline.usecases.bench.bench_inference`) times the same two passes on a
registered model or an untrained architecture.

One pass = all queries in batches of ``batch``; a figure is the median (min, max) over repeated
passes after warm-up passes. ``speed-up`` is the per-repeat ratio not-cached / cached pass time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench.harness import ratio_stats, summarize, time_calls
from pipeline.images import IMAGE_SUFFIXES, read_image, read_mask


def load_images(source: Path, cls: str, shots: int, queries: int,
                threshold: int = 127) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """First ``shots`` image/mask pairs with a non-empty mask of ``source/cls`` (file-name order) as
    supports, the next ``queries`` images as queries: ``(H, W, 3)`` uint8 arrays and ``(H, W)`` bool masks.

    Raises:
        FileNotFoundError: the class folder is missing or has too few images (names folder and counts).
    """
    images_dir = Path(source) / cls / "Images"
    if not images_dir.is_dir():
        raise FileNotFoundError(f"benchmark data: {images_dir} does not exist (set data.source / LERENET_SOURCE)")
    files = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    sup_img, sup_msk, rest = [], [], []
    for p in files:
        mask_path = Path(source) / cls / "GT" / f"{p.stem}.png"
        if len(sup_img) < shots and mask_path.is_file():
            m = read_mask(mask_path, threshold)
            if m.any():
                sup_img.append(read_image(p))
                sup_msk.append(m)
                continue
        if len(rest) < queries:
            rest.append(p)
        if len(sup_img) == shots and len(rest) == queries:
            break
    if len(sup_img) < shots or len(rest) < queries:
        raise FileNotFoundError(f"benchmark data: {images_dir} gives {len(sup_img)} supports and {len(rest)} queries; "
                                f"{shots} and {queries} are needed")
    return sup_img, sup_msk, [read_image(p) for p in rest]


def load_references(source: Path, cls: str, count: int) -> list[np.ndarray]:
    """The first ``count`` defect-free images of ``source/cls/Nd`` (file-name order) as ``(H, W, 3)`` uint8; fewer
    (none) when the folder has fewer (none)."""
    folder = Path(source) / cls / "Nd"
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
    return [read_image(p) for p in files[:count]]


def make_passes(predictor: Any, supports: list[np.ndarray], masks: list[np.ndarray], queries: list[np.ndarray],
                batch: int, references: list[np.ndarray] | None = None):
    """``(cached_pass, uncached_pass)``: callables that process every query once with ``predictor``
    (a :class:`pipeline.inference.predictor.Predictor`; module docstring); the cached pass encodes the support
    set with ``references`` when given."""

    def cached() -> None:
        sup = predictor.encode_support(supports, masks, references)
        for i in range(0, len(queries), batch):
            predictor.predict_probabilities(sup, queries[i:i + batch])

    s_img = predictor.image_batch(supports)
    s_msk = predictor.mask_batch(masks)

    @torch.inference_mode()
    def uncached() -> None:
        for i in range(0, len(queries), batch):
            chunk = queries[i:i + batch]
            n, k = len(chunk), s_img.shape[0]
            sf = predictor.encode(s_img[None].expand(n, *s_img.shape).flatten(0, 1)).unflatten(0, (n, k))
            logits = predictor.head(sf, s_msk[None].expand(n, *s_msk.shape), predictor.encode_images(chunk))
            for up in predictor.upsample(logits, [im.shape[:2] for im in chunk]):
                torch.sigmoid(up).cpu().numpy()

    return cached, uncached


def run(ctx: Any) -> dict[str, Any]:
    """Measure inference (module docstring) with ``ctx`` (:class:`pipeline.bench.runner.Context`)."""
    from pipeline.checkpoint import build_net
    from pipeline.inference.predictor import Predictor

    s, device, m = ctx.settings, ctx.device, ctx.params.model
    supports, masks, queries = load_images(ctx.source, s.infer_class, s.shots, s.infer_queries)
    torch.manual_seed(0)
    net = build_net(ctx.params, "lerenet", pretrained=m.backbone.startswith("efficientnet_lite")).to(device).eval()
    predictor = Predictor(net, s.image_size, {"model": "lerenet", "backbone": m.backbone, "image_size": s.image_size})
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    n = len(queries)
    references = load_references(ctx.source, s.infer_class, max(1, ctx.params.train.presence_references))
    if references:  # a reference threshold makes encode_support score them (the value does not change the time)
        predictor.meta.update(presence_threshold_ref=0.0, presence_references=len(references))
    rows: list[dict[str, Any]] = []
    steps = s.infer_transductive if predictor.transductive_steps is not None else 0
    plain = 0 if predictor.transductive_steps is not None else None   # the plain passes: no refinement

    def with_steps(f, n):
        def run_with() -> None:
            with predictor.transductive(n):
                f()
        return run_with

    for batch in s.infer_batches:
        cached, uncached = make_passes(predictor, supports, masks, queries, batch)
        passes = {"supports cached": with_steps(cached, plain), "not cached": with_steps(uncached, plain)}
        if steps:
            passes[f"supports cached, {steps} transductive steps"] = with_steps(cached, steps)
        ref_tag = f"supports cached, {len(references)} reference image(s)"
        if references:
            passes[ref_tag] = with_steps(make_passes(predictor, supports, masks, queries, batch, references)[0], plain)
        times: dict[str, list[float]] = {tag: [] for tag in passes}
        for _ in range(s.infer_warmup):
            for f in passes.values():
                f()
        for _ in range(s.infer_repeats):  # alternate, so all see the same machine state
            for tag, f in passes.items():
                times[tag] += time_calls(f, warmup=0, repeats=1, sync=sync)
        for tag, t in times.items():
            rows.append({"label": f"batch {batch}, {tag}: ms/query",
                         **summarize([1000 * x / n for x in t], "ms/query").as_dict()})
            rows.append({"label": f"batch {batch}, {tag}: queries/s",
                         **summarize([n / x for x in t], "queries/s").as_dict()})
        rows.append({"label": f"batch {batch}: caching speed-up",
                     **ratio_stats(times["not cached"], times["supports cached"]).as_dict()})
        if steps:
            rows.append({"label": f"batch {batch}: cost of {steps} transductive steps (time ratio, cached)",
                         **ratio_stats(times[f"supports cached, {steps} transductive steps"],
                                       times["supports cached"]).as_dict()})
        if references:
            rows.append({"label": f"batch {batch}: cost of {len(references)} reference image(s) (time ratio, cached)",
                         **ratio_stats(times[ref_tag], times["supports cached"]).as_dict()})
    info = {"model": "lerenet", "backbone": m.backbone, "dilated": m.dilated, "channels": m.channels,
            "weights": "backbone ImageNet (packaged)" if m.backbone.startswith("efficientnet_lite") else "random init",
            "profile": ctx.params.profile,
            "image_size": s.image_size, "shots": s.shots, "queries_per_pass": n, "class": s.infer_class,
            "batches": list(s.infer_batches), "warmup_passes": s.infer_warmup, "repeats": s.infer_repeats,
            "transductive_steps": {"model file": predictor.transductive_steps, "timed variant": steps},
            "reference_images": len(references),
            "timed": "resize + network + upsampling to original size (decoding excluded)"}
    return {"rows": rows, "info": info}
