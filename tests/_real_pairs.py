"""A few real images and masks from the shared data, decoded with Pillow, for model-level tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REAL_DATA


def real_pairs(cls: str, names: list[str], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 3, size, size)`` RGB in [0, 1] and ``(N, 1, size, size)`` {0, 1} masks (value > 127).

    Skips the test when the real data folder is not there.
    """
    from PIL import Image

    root = Path(REAL_DATA) / cls
    if not root.is_dir():
        pytest.skip(f"real data class folder {root} not available (set LERENET_TEST_DATA)")
    images, masks = [], []
    for name in names:
        im = Image.open(root / "Images" / name).convert("RGB").resize((size, size), Image.BILINEAR)
        gt = Image.open(root / "GT" / f"{Path(name).stem}.png").convert("L").resize((size, size), Image.NEAREST)
        images.append(torch.from_numpy(np.asarray(im, np.float32) / 255.0).permute(2, 0, 1))
        masks.append(torch.from_numpy((np.asarray(gt) > 127).astype(np.float32))[None])
    return torch.stack(images), torch.stack(masks)


def iou(logits: torch.Tensor, masks: torch.Tensor) -> float:
    """Foreground IoU of ``logits > 0`` against ``masks > 0.5`` over the whole batch."""
    p, g = logits > 0, masks > 0.5
    return float((p & g).sum()) / max(float((p | g).sum()), 1.0)
