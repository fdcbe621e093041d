"""JAFFNet building blocks (Jiang et al., arXiv 2402.02797, Sec. III): the joint
attention-guided feature fusion (JAFF) module and the dense receptive field (DRF) module
made of multi-receptive-field (MRF) units. All blocks keep ``(N, C, H, W)`` layouts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvBNReLU(nn.Sequential):
    """``k x k`` conv (no bias, "same" padding, optional dilation) -> BatchNorm -> ReLU.

    ``(N, in_ch, H, W)`` -> ``(N, out_ch, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, dilation: int = 1) -> None:
        pad = dilation * (kernel // 2)
        super().__init__(nn.Conv2d(in_ch, out_ch, kernel, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True))


class JAFF(nn.Module):
    """Joint attention-guided feature fusion of a low-level and a high-level map (Sec. III-B).

    With ``L`` the low-level encoder features and ``H`` the high-level (coarser) decoder
    features, ``H^ = up(H)`` bilinearly to ``L``'s size:

    * channel attention from the high level: ``a_c = sigmoid(MLP(avg(H)) + MLP(max(H)))``,
      one weight per output channel (shared two-layer 1x1 MLP, CBAM-style pooling);
    * spatial attention from the high level: ``a_s = sigmoid(conv7x7([mean_c(H^); max_c(H^)]))``;
    * joint map ``A = a_c ⊗ a_s`` (outer product: ``(N, C, 1, 1) * (N, 1, H, W)``) multiplies
      the projected low-level features, ``L~ = ReLU(BN(conv1x1(L))) ⊙ A``, so only what the
      semantic level marks as defect passes;
    * fusion ``ReLU(BN(conv3x3([L~; H^])))``.

    ``forward(low (N, low_ch, h, w), high (N, high_ch, h', w'))`` -> ``(N, out_ch, h, w)``.
    """

    def __init__(self, low_ch: int, high_ch: int, out_ch: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(high_ch // reduction, 8)
        self.low = ConvBNReLU(low_ch, out_ch, 1)
        self.channel_mlp = nn.Sequential(nn.Conv2d(high_ch, hidden, 1), nn.ReLU(inplace=True),
                                         nn.Conv2d(hidden, out_ch, 1))
        self.spatial = nn.Conv2d(2, 1, 7, padding=3)
        self.fuse = ConvBNReLU(out_ch + high_ch, out_ch, 3)

    def attention(self, high: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, H^)``: joint attention ``(N, out_ch, h, w)`` in ``(0, 1)`` and the upsampled high level."""
        up = F.interpolate(high, size=size, mode="bilinear", align_corners=False)
        a_c = torch.sigmoid(self.channel_mlp(high.mean(dim=(2, 3), keepdim=True))
                            + self.channel_mlp(high.amax(dim=(2, 3), keepdim=True)))
        a_s = torch.sigmoid(self.spatial(torch.cat([up.mean(dim=1, keepdim=True), up.amax(dim=1, keepdim=True)], 1)))
        return a_c * a_s, up

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        """See class docstring."""
        att, up = self.attention(high, tuple(low.shape[-2:]))
        return self.fuse(torch.cat([self.low(low) * att, up], dim=1))


class MRF(nn.Module):
    """Multi-receptive-field unit: 1x1 reduction, parallel 3x3 convs at several dilation rates,
    concatenated and fused by a 1x1 conv (each conv followed by BN + ReLU).

    ``(N, in_ch, H, W)`` -> ``(N, out_ch, H, W)``; receptive fields ``2 r + 1`` per rate ``r``.
    """

    def __init__(self, in_ch: int, out_ch: int, rates: tuple[int, ...] = (1, 3, 5)) -> None:
        super().__init__()
        if not rates or min(rates) < 1:
            raise ValueError(f"dilation rates must be positive ints, got {rates!r}")
        self.reduce = ConvBNReLU(in_ch, out_ch, 1)
        self.branches = nn.ModuleList(ConvBNReLU(out_ch, out_ch, 3, dilation=int(r)) for r in rates)
        self.fuse = ConvBNReLU(len(rates) * out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See class docstring."""
        y = self.reduce(x)
        return self.fuse(torch.cat([b(y) for b in self.branches], dim=1))


class DRF(nn.Module):
    """Dense receptive field module (Sec. III-C): densely connected MRF units.

    Unit ``j`` takes ``[X; M_1; ...; M_{j-1}]`` (the module's input and every preceding
    unit's output, concatenated), so the receptive fields of the units compose; the output
    is ``ReLU(BN(conv1x1([X; M_1; ...; M_n])))``.

    ``(N, in_ch, H, W)`` -> ``(N, out_ch, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int, units: int = 3, rates: tuple[int, ...] = (1, 3, 5)) -> None:
        super().__init__()
        if units < 1:
            raise ValueError(f"DRF needs at least one MRF unit, got {units}")
        self.units = nn.ModuleList(MRF(in_ch + j * out_ch, out_ch, rates) for j in range(units))
        self.out = ConvBNReLU(in_ch + units * out_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See class docstring."""
        feats = [x]
        for unit in self.units:
            feats.append(unit(torch.cat(feats, dim=1)))
        return self.out(torch.cat(feats, dim=1))
