"""Benchmark case ``loss``: JAFFNet's SSIM loss term, the separable computation against the 11 x 11 window.

JAFFNet's deep-supervised hybrid loss sums BCE + IoU + SSIM over 4 side outputs; on CPU the SSIM term's
Gaussian blurs were most of a training step (docs/saliency.md). :func:`model.losses.ssim_map` now runs the
five blurs as one grouped convolution of two 1-D passes. This case times, side by side and alternating
order each repeat, one forward + backward of ``ssim_map`` and of the former computation (five 2-D 11 x 11
convolutions, kept here as the reference) on ``(8, 1, S, S)`` maps (a training batch's side output at
``S = settings.image_size``), and reports the per-repeat ratio reference / separable.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from model.losses import SSIM_C1, SSIM_C2, gaussian_window, ssim_map
from pipeline.bench.harness import ratio_stats, summarize


def ssim_2d(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The former ``ssim_map``: five separate 11 x 11 Gaussian convolutions, ``(B, 1, H, W)`` -> same shape."""
    w = gaussian_window().to(x.device)[None, None]
    blur = lambda t: F.conv2d(t, w, padding=5)  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    return (2 * mx * my + SSIM_C1) * (2 * cxy + SSIM_C2) / ((mx ** 2 + my ** 2 + SSIM_C1) * (vx + vy + SSIM_C2))


def _once(fn: Any, x: torch.Tensor, y: torch.Tensor) -> float:
    x.grad = None
    t0 = time.perf_counter()
    fn(x, y).mean().backward()
    return time.perf_counter() - t0


def run(ctx: Any) -> dict[str, Any]:
    """Rows: ms per forward + backward of each computation, and the ratio 2-D / separable."""
    s = ctx.settings
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 1, s.image_size, s.image_size, generator=g).requires_grad_(True)
    y = (torch.rand(8, 1, s.image_size, s.image_size, generator=g) > 0.7).float()
    err = float((ssim_map(x, y) - ssim_2d(x, y)).abs().max())
    sep, ref = [], []
    for i in range(s.infer_warmup + s.infer_repeats):
        order = [(ssim_map, sep), (ssim_2d, ref)][:: 1 if i % 2 == 0 else -1]
        for fn, out in order:
            t = _once(fn, x, y)
            if i >= s.infer_warmup:
                out.append(1000 * t)
    return {"rows": [
        {"label": f"SSIM forward+backward, separable (8x1x{s.image_size}x{s.image_size})", **summarize(sep, "ms").as_dict()},
        {"label": "SSIM forward+backward, 11x11 window (former)", **summarize(ref, "ms").as_dict()},
        {"label": "speed-up: 11x11 window / separable (per repeat)", **ratio_stats(ref, sep).as_dict()},
    ], "info": {"max_abs_difference": err, "threads": torch.get_num_threads()}}
