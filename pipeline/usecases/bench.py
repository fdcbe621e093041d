"""Use case bench-inference: queries/s of a model with the support set encoded once vs per query."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from pipeline.config import Params


def untrained_predictor(params: Params, architecture: str, device: Any):
    """A Predictor on an untrained ``architecture`` built as ``params.model`` configures it (backbone,
    dilation, channels, ``model.weights``; ImageNet weights for EfficientNet-Lite0, else random when no
    weights file is given: speed does not depend on the weights), ``S = train.image_size``."""
    from pipeline.checkpoint import build_net
    from pipeline.inference.predictor import Predictor
    from pipeline.inference.resolve import ModelSource

    m = params.model
    net = build_net(params, architecture, pretrained=m.backbone.startswith("efficientnet_lite") or m.weights is not None)
    meta = {"model": architecture, "backbone": m.backbone, "image_size": params.train.image_size}
    return Predictor(net.to(device).eval(), params.train.image_size, meta, ModelSource(f"untrained:{architecture}"))


def bench_inference(params: Params, predictor: Any, class_dir: Path | None = None, *, queries: int = 64,
                    shots: int = 1, batch_size: int = 8, repeats: int = 3) -> dict[str, Any]:
    """Queries per second with the support set encoded once (cached) vs re-encoded for every query.

    The passes are those of the ``inference`` benchmark case (:func:`pipeline.bench.infer_case.make_passes`):
    resizing, network and upsampling to each query's size are timed, decoding is not; one warm-up pass,
    then the best of ``repeats`` wall-clock passes per mode.

    Args:
        class_dir: Surface Defects-4i class folder for the first ``shots`` supports and the next
            ``queries`` queries (default ``<data.source>/Steel_In``).

    Returns:
        ``{"queries", "shots", "image_size", "batch_size", "device", "threads", "cached_qps", "uncached_qps",
        "speedup", "cached_s", "uncached_s", "model", "class_dir", "machine", "cpu_count", "torch", "gpu"}``.

    Raises:
        ValueError: the class folder has fewer than ``shots + queries`` images.
        pipeline.inference.predictor.PredictInputError: no ``Images/``, or an image without its mask.
    """
    import torch

    from pipeline.bench.harness import time_calls
    from pipeline.bench.infer_case import make_passes
    from pipeline.images import read_image, read_mask
    from pipeline.request_files import supports_from_class_dir

    cdir = Path(class_dir) if class_dir is not None else params.data.source / "Steel_In"
    pairs = supports_from_class_dir(cdir, limit=shots + queries)
    if len(pairs) < shots + queries:
        raise ValueError(f"{cdir} has {len(pairs)} images; need {shots + queries} (--shots + --queries)")
    s_img = [read_image(i) for i, _ in pairs[:shots]]
    s_msk = [read_mask(m, params.data.mask_threshold) for _, m in pairs[:shots]]
    q_img = [read_image(i) for i, _ in pairs[shots:]]
    device = predictor.device
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    cached, uncached = make_passes(predictor, s_img, s_msk, q_img, batch_size)
    t_c = min(time_calls(cached, warmup=1, repeats=repeats, sync=sync))
    t_u = min(time_calls(uncached, warmup=1, repeats=repeats, sync=sync))
    n = len(q_img)
    return {"queries": n, "shots": shots, "image_size": predictor.image_size, "batch_size": batch_size,
            "device": str(device), "threads": torch.get_num_threads(), "cached_qps": n / t_c,
            "uncached_qps": n / t_u, "speedup": t_u / t_c, "cached_s": t_c, "uncached_s": t_u,
            "model": predictor.describe(), "class_dir": str(cdir), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None}
