"""Building blocks shared by the models: masked average pooling, mask resizing, CBAM,
residual blocks, classifier, the feature projection and graph reasoning units."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-5


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a binary mask to feature resolution by area averaging.

    Args:
        mask: ``(N, 1, H, W)`` float in ``{0, 1}`` (or soft ``[0, 1]``) at image resolution.
        size: target ``(h, w)``.

    Returns:
        ``(N, 1, h, w)`` in ``[0, 1]``: the share of defect pixels under each feature cell
        (``F.interpolate(mode="area")``, i.e. adaptive average pooling), so a defect smaller
        than a cell is kept with a small weight instead of vanishing as with nearest.
    """
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return F.interpolate(mask, size=size, mode="area")


def masked_average_pooling(feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked average pooling over the mask area (PANet / SG-One).

    ``p = sum_xy F(x,y) M(x,y) / (sum_xy M(x,y) + eps)``, averaged over the *mask area*,
    not the whole image, so the prototype does not shrink with the defect size.

    Args:
        feats: ``(N, C, h, w)`` features.
        mask: ``(N, 1, h, w)`` weights in ``[0, 1]`` at feature resolution.

    Returns:
        ``(N, C)`` prototypes; all zeros where the mask is empty.
    """
    num = (feats * mask).sum(dim=(2, 3))
    return num / (mask.sum(dim=(2, 3)) + EPS)


def shot_prototype(feats: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Prototype pooled over all K shots: ``sum_k sum_xy F_k M_k / sum_k sum_xy M_k``.

    Args:
        feats: ``(B, K, C, h, w)`` support features.
        masks: ``(B, K, 1, h, w)`` support masks at feature resolution, ``[0, 1]``.

    Returns:
        ``(B, C)``: the masked average pooling of the shot-averaged masked features
        (Eq. 16 then MAP), i.e. every defect pixel of every shot weighs the same.
    """
    num = (feats * masks).sum(dim=(1, 3, 4))
    return num / (masks.sum(dim=(1, 3, 4)) + EPS)


class FeatureProjection(nn.Sequential):
    """Learnable 1x1 projection of the concatenated backbone stages to ``c`` channels.

    Paper appendix B.1 (as in PFENet's ``down`` layers): 1x1 conv (no bias) -> ReLU ->
    Dropout2d(p). ``(N, Cb, h, w)`` -> ``(N, c, h, w)``, non-negative.
    """

    def __init__(self, in_channels: int, channels: int, dropout: float = 0.5) -> None:
        super().__init__(
            nn.Conv2d(in_channels, channels, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )


class ResidualBlock(nn.Module):
    """Residual module ``x + conv3x3(ReLU(conv3x3(x)))`` then ReLU, channels kept.

    ``(N, C, h, w)`` -> ``(N, C, h, w)``. The "Res" module of the paper's IFM (Eq. 15) and
    Baseline; CANet/PFENet-style (no normalisation).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See class docstring."""
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class Classifier(nn.Sequential):
    """The "Cls" head: conv3x3 -> ReLU -> Dropout(0.1) -> conv1x1 to one logit channel.

    ``(N, C, h, w)`` -> ``(N, 1, h, w)`` logits (sigmoid > 0.5 = defect).
    """

    def __init__(self, channels: int, dropout: float = 0.1) -> None:
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(channels, 1, 1),
        )


class ChannelAttention(nn.Module):
    """CBAM channel attention (Woo et al. 2018, Eq. 2).

    ``M_c = sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))``, shared MLP ``C -> max(C/r, 8) -> C``;
    returns ``x * M_c``, ``(N, C, h, w)`` -> same shape.
    """

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 8)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.ReLU(inplace=True), nn.Conv2d(hidden, channels, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See class docstring."""
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        mx = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return x * torch.sigmoid(avg + mx)


class SpatialAttention(nn.Module):
    """CBAM spatial attention (Woo et al. 2018, Eq. 3).

    ``M_s = sigmoid(conv7x7([mean_c(x); max_c(x)]))``; returns ``x * M_s``.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, h, w)`` -> ``(N, C, h, w)``."""
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(desc))


class CBAM(nn.Sequential):
    """CBAM: channel attention then spatial attention (paper Eqs. 4-5). Shape-preserving."""

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__(ChannelAttention(channels, reduction), SpatialAttention(kernel_size))


class GloReGCN(nn.Module):
    """Graph convolution with a learned adjacency, as in GloRe (Chen et al. 2019).

    Node features ``V`` are ``(B, S, N)`` (S state channels, N nodes). One layer:
    ``H = V + conv1d_nodes(V)`` (a learned ``N x N`` adjacency, i.e. ``V (I + A_g)``),
    then ``ReLU``, then ``conv1d_channels`` (``S_in -> S_out``, learned state update ``W_g``).
    Returns ``(B, S_out, N)``.
    """

    def __init__(self, num_nodes: int, in_state: int, out_state: int) -> None:
        super().__init__()
        self.node_conv = nn.Conv1d(num_nodes, num_nodes, 1)
        self.state_conv = nn.Conv1d(in_state, out_state, 1, bias=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """``(B, S_in, N)`` -> ``(B, S_out, N)``."""
        h = v + self.node_conv(v.transpose(1, 2)).transpose(1, 2)
        return self.state_conv(F.relu(h))


class LaplacianGCN(nn.Module):
    """Graph convolution ``H = ReLU(L~ V^T W)`` with ``L~ = D~^{-1/2} A~ D~^{-1/2}`` (Kipf & Welling).

    The adjacency is computed from the node features themselves:
    ``A = ReLU(cos(V_i, V_j))`` (non-negative affinity), ``A~ = A + I``. Node features
    ``(B, S_in, N)`` -> ``(B, S_out, N)``; ``W`` is a learned ``S_in x S_out`` map.
    """

    def __init__(self, num_nodes: int, in_state: int, out_state: int) -> None:
        super().__init__()
        del num_nodes  # adjacency is data dependent; signature matches GloReGCN
        self.weight = nn.Conv1d(in_state, out_state, 1, bias=False)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """``(B, S_in, N)`` -> ``(B, S_out, N)``."""
        vn = F.normalize(v, dim=1)
        adj = F.relu(vn.transpose(1, 2) @ vn)  # (B, N, N), diagonal = 1 already
        adj = adj + torch.eye(adj.shape[-1], device=v.device, dtype=v.dtype)
        d_inv_sqrt = adj.sum(-1).clamp_min(EPS).rsqrt()
        lap = d_inv_sqrt.unsqueeze(-1) * adj * d_inv_sqrt.unsqueeze(-2)
        return F.relu(self.weight(v @ lap))  # lap symmetric: (V L~)^T = L~ V^T


GRAPHS = {"glore": GloReGCN, "laplacian": LaplacianGCN}
