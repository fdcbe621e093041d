"""Model size, compute and CPU latency of one episode (for ``lerenet model-info``)."""

from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.base import FewShotSegmenter


def episode_inputs(shots: int, height: int, width: int | None = None, batch: int = 1,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random episode tensors: support ``(B,K,3,H,W)`` in [0,1], masks ``(B,K,1,H,W)`` {0,1}, query ``(B,3,H,W)``.

    The masks mark a centred rectangle (a quarter of the image) as defect.
    """
    width = width or height
    g = torch.Generator().manual_seed(seed)
    support = torch.rand(batch, shots, 3, height, width, generator=g)
    masks = torch.zeros(batch, shots, 1, height, width)
    masks[..., height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 1.0
    query = torch.rand(batch, 3, height, width, generator=g)
    return support, masks, query


def parameter_counts(model: FewShotSegmenter) -> dict[str, int]:
    """Parameter counts: ``total``, ``learnable`` (requires_grad), ``backbone``, ``head``."""
    backbone = sum(p.numel() for p in model.backbone.parameters())
    total = sum(p.numel() for p in model.parameters())
    learnable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "learnable": learnable, "backbone": backbone, "head": total - backbone}


def _backbone_flops(counts: dict[str, dict[object, int]], root: str) -> int:
    """FLOPs spent inside ``<root>.backbone`` from a ``FlopCounterMode`` per-module breakdown.

    Module keys are hierarchical (a parent's count includes its children's); a model may call
    the backbone's own ``forward`` (key ``<root>.backbone``) or walk its stages directly
    (JAFFNet's pyramid: keys ``<root>.backbone.<stage>``), so the outermost backbone keys are summed.
    """
    prefix = f"{root}.backbone"
    keys = [k for k in counts if k == prefix or k.startswith(prefix + ".")]
    outer = [k for k in keys if not any(k != j and k.startswith(j + ".") for j in keys)]
    return int(sum(sum(counts[k].values()) for k in outer))


def episode_flops(model: FewShotSegmenter, shots: int = 1, size: int = 200) -> dict[str, int]:
    """FLOPs of one episode's forward pass (batch 1, ``shots`` supports, ``size x size`` images).

    Counted by ``torch.utils.flop_counter.FlopCounterMode``, which counts a multiply-add
    as 2 FLOPs (convolutions, matrix products); element-wise ops, pooling and
    interpolation are not counted. Attention runs on PyTorch's math backend while counting
    (its CPU flash kernel has no FLOP formula; the math backend's matrix products are
    counted and give the same result). Returns ``flops`` (whole episode),
    ``backbone_flops`` (the part computed inside ``model.backbone``: the ``shots + 1`` image
    encodings, or only the query's for a model that ignores the support) and
    ``macs = flops // 2``.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    support, masks, query = episode_inputs(shots, size)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            with FlopCounterMode(display=False) as total:
                model(support, masks, query)
    finally:
        model.train(was_training)
    flops = int(total.get_total_flops())
    backbone = _backbone_flops(total.get_flop_counts(), type(model).__name__)
    return {"flops": flops, "macs": flops // 2, "backbone_flops": backbone}


def episode_latency_ms(model: FewShotSegmenter, shots: int = 1, size: int = 200, runs: int = 10,
                       warmup: int = 3) -> dict[str, float]:
    """Wall-clock forward latency of one episode (batch 1) in eval mode without autograd.

    Runs ``warmup`` untimed passes, then ``runs`` timed ones on the current device of the
    model's parameters. Returns ``median_ms``, ``min_ms``, ``max_ms`` and ``threads``
    (``torch.get_num_threads()``).
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    device = next(model.parameters()).device
    support, masks, query = (t.to(device) for t in episode_inputs(shots, size))
    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.no_grad():
            for i in range(warmup + runs):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                model(support, masks, query)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        model.train(was_training)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "threads": float(torch.get_num_threads())}
