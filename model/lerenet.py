"""LERENet (Ding et al., arXiv 2403.11122): MPR + MPE + IFM on local descriptors.

Shapes: ``B`` episodes, ``K`` shots, ``c`` channels after projection, ``h x w`` feature
grid (stride 8), ``L = h*w`` local descriptors. The choices where the paper is ambiguous
are listed in docs/model.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.backbones import Backbone
from model.base import FewShotSegmenter, check_native_area
from model.layers import (
    CBAM,
    EPS,
    GRAPHS,
    Classifier,
    FeatureProjection,
    ResidualBlock,
    resize_mask,
    shot_prototype,
)
from model.priors import (SIGMOID_KINDS, SKIP_FACTORS, check_kinds, check_skip_source, frozen_priors,
                          nearest_neighbour_score, skip_score)

VARIANTS = ("mpr", "mpe", "mpe*", "mpr+mpe", "mpr+mpe*")
QUERY_PATHS = ("on", "dropout", "off")


def cosine_prior(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor,
                 rel_threshold: float = 0.5) -> torch.Tensor:
    """``D_cos``: prior map of each query descriptor's best match among support defect descriptors.

    For every query location, the maximum cosine similarity to the support descriptors
    (all K shots) that lie on the defect, min-max normalised per query to ``[0, 1]``
    (as PFENet's prior mask). Comparing each query descriptor with *all* defect
    descriptors, not with the support descriptor at the same location, makes the map
    independent of where the defect lies in the support image.

    Args:
        query: ``(B, c, h, w)`` query descriptors.
        support: ``(B, K, c, hs, ws)`` support descriptors.
        masks: ``(B, K, 1, hs, ws)`` defect share per support cell, ``[0, 1]``. Cells with
            at least ``rel_threshold`` x the episode's largest share count as defect, so a
            defect smaller than one cell still yields a prior.

    Returns:
        ``(B, 1, h, w)`` in ``[0, 1]``; zeros for an episode whose support masks are empty.
    """
    b, _, h, w = query.shape
    q = F.normalize(query.flatten(2), dim=1)                              # (B, c, Lq)
    s = F.normalize(support.transpose(1, 2).flatten(2), dim=1)            # (B, c, K*Ls)
    m = masks.transpose(1, 2).flatten(2)                                  # (B, 1, K*Ls)
    peak = m.amax(dim=2, keepdim=True)                                    # (B, 1, 1)
    fg = (m >= rel_threshold * peak) & (peak > 0)                         # (B, 1, K*Ls)
    sim = s.transpose(1, 2) @ q                                           # (B, K*Ls, Lq)
    sim = torch.where(fg.transpose(1, 2), sim, sim.new_tensor(-2.0))
    prior = sim.amax(dim=1)                                               # (B, Lq)
    lo, hi = prior.amin(dim=1, keepdim=True), prior.amax(dim=1, keepdim=True)
    prior = (prior - lo) / (hi - lo + EPS)
    prior = torch.where(peak.view(b, 1) > 0, prior, torch.zeros_like(prior))
    return prior.view(b, 1, h, w)


class MultiPrototypeReasoning(nn.Module):
    """MPR (paper Eqs. 7-11 with the GCN of Eqs. 1-3): support-query reasoning in graph space.

    1. node-level prototypes ``P^v = conv1d_v(X)`` (``N x L``: N soft assignments of the
       L descriptors) and channel-level prototypes ``P^d = conv1d_d(X)`` (``S x L``), the
       same 1-D convolutions for support and query;
    2. cross relations ``G^v_sq = P^v_q P^d_s^T`` (``N x S``) and ``G^d_sq = P^d_q P^v_s^T``
       (``S x N``), each divided by ``L`` (size independent), concatenated into an
       ``N``-node graph with ``2S`` features per node;
    3. graph reasoning (``GloReGCN`` learned adjacency, default, or ``LaplacianGCN``) to
       ``S`` features per node;
    4. back-projection with the query's node prototypes ``P^v_q`` to ``S x L``, 1x1 conv to
       ``c``, BatchNorm, residual add to ``X_q``: ``P_main``. The residual is the raw-query
       path that lets a head segment "anything defect-like" without the support:
       ``query_path="dropout"`` drops it channel-wise in training (``Dropout2d(query_dropout)``),
       ``"off"`` removes it (``P_main`` is the reasoning output alone).

    ``forward(x_q (B,c,h,w), x_s (B,c,h,w) masked, shot-averaged)`` -> ``(B,c,h,w)``.
    """

    def __init__(self, channels: int, num_nodes: int, num_state: int, graph: str = "glore",
                 query_path: str = "on", query_dropout: float = 0.5) -> None:
        super().__init__()
        if query_path not in QUERY_PATHS:
            raise ValueError(f"unknown query_path {query_path!r}; valid: {', '.join(QUERY_PATHS)}")
        self.query_path = query_path
        self.query_drop = nn.Dropout2d(query_dropout) if query_path == "dropout" else nn.Identity()
        if graph not in GRAPHS:
            raise ValueError(f"unknown graph {graph!r}; valid: {', '.join(GRAPHS)}")
        self.node_proj = nn.Conv1d(channels, num_nodes, 1)
        self.state_proj = nn.Conv1d(channels, num_state, 1)
        self.gcn = GRAPHS[graph](num_nodes, 2 * num_state, num_state)
        self.out = nn.Sequential(nn.Conv2d(num_state, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x_q: torch.Tensor, x_s: torch.Tensor) -> torch.Tensor:
        """See class docstring."""
        b, _, h, w = x_q.shape
        length = h * w
        q, s = x_q.flatten(2), x_s.flatten(2)                                 # (B, c, L)
        pv_q, pd_q = self.node_proj(q), self.state_proj(q)                   # (B, N, L), (B, S, L)
        pv_s, pd_s = self.node_proj(s), self.state_proj(s)
        g_v = (pd_s @ pv_q.transpose(1, 2)) / length                          # (B, S, N) = (P^v_q P^d_s^T)^T
        g_d = (pd_q @ pv_s.transpose(1, 2)) / length                          # (B, S, N) = P^d_q P^v_s^T
        nodes = self.gcn(torch.cat([g_v, g_d], dim=1))                        # (B, S, N)
        y = (nodes @ pv_q).view(b, -1, h, w)                                  # (B, S, h, w)
        if self.query_path == "off":
            return self.out(y)
        return self.query_drop(x_q) + self.out(y)


class MultiPrototypeExcitation(nn.Module):
    """MPE (paper Eqs. 12-14 with CBAM Eqs. 4-5): global-view guidance.

    1. prototype ``p`` by masked average pooling over the defect area of all K shots;
    2. ``P_proj = ReLU(conv1x1([X_q; p expanded]))``: the prototype applied to every query
       descriptor;
    3. ``P_e = CBAM(P_proj)`` (channel then spatial attention);
    4. with ``with_prior`` (the "MPE*" of Table 3): ``P_aux = [P_e; D_cos]``
       (``cosine_prior``), else ``P_aux = P_e``.

    ``forward(x_q (B,c,h,w), x_s (B,K,c,h,w), m_s (B,K,1,h,w))`` -> ``(B, c [+1], h, w)``.
    """

    def __init__(self, channels: int, with_prior: bool) -> None:
        super().__init__()
        self.with_prior = with_prior
        self.fuse = nn.Sequential(nn.Conv2d(2 * channels, channels, 1, bias=False), nn.ReLU(inplace=True))
        self.cbam = CBAM(channels)

    @property
    def out_channels_extra(self) -> int:
        """1 when ``D_cos`` is appended, else 0."""
        return int(self.with_prior)

    def forward(self, x_q: torch.Tensor, x_s: torch.Tensor, m_s: torch.Tensor) -> torch.Tensor:
        """See class docstring."""
        proto = shot_prototype(x_s, m_s)                                      # (B, c)
        p_proj = self.fuse(torch.cat([x_q, proto[:, :, None, None].expand_as(x_q)], dim=1))
        p_e = self.cbam(p_proj)
        if not self.with_prior:
            return p_e
        return torch.cat([p_e, cosine_prior(x_q, x_s, m_s)], dim=1)


class InformationFusion(nn.Module):
    """IFM (paper Eq. 15): ``[P_main; P_aux]`` -> 1x1 conv + ReLU -> 2 residual blocks -> Cls.

    ``(B, in_channels, h, w)`` -> ``(B, 1, h, w)`` logits at feature resolution.
    """

    def __init__(self, in_channels: int, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, channels, 1, bias=False), nn.ReLU(inplace=True))
        self.res = nn.Sequential(ResidualBlock(channels), ResidualBlock(channels))
        self.cls = Classifier(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """See class docstring."""
        return self.cls(self.res(self.reduce(x)))


class LERENet(FewShotSegmenter):
    """LERENet with the ablation switches of the paper's Table 3.

    Args:
        backbone: a ``Backbone`` (``Cb`` channels).
        freeze_backbone: see ``FewShotSegmenter``.
        variant: ``"mpr"``, ``"mpe"``, ``"mpe*"``, ``"mpr+mpe"`` or ``"mpr+mpe*"`` (full
            model). ``mpr``: ``P_main`` only; ``mpe``: ``P_e`` only; ``*``: ``D_cos`` added.
        channels: ``c``, channels of the local descriptors after the 1x1 projection.
        graph: ``"glore"`` (learned adjacency, as the authors' code) or ``"laplacian"``
            (``D~^-1/2 A~ D~^-1/2`` on a feature-affinity graph).
        num_nodes: graph nodes ``N`` (default ``c // 4``).
        num_state: state channels ``S`` (default ``c // 2``).
        dropout: Dropout2d after the projection.
        priors: class-agnostic guidance on the *frozen* features (``model.priors``: ``"fg"``,
            ``"abnormal"``, ``"nn"``), one map per kind and backbone level, appended to the IFM
            input beside ``[P_main; P_aux]``. Empty (default) = the paper's model.
        prior_skip: output ``logit = a * nn + b + IFM(...)`` where ``nn`` is the level-averaged
            nearest-neighbour map (:func:`model.priors.nearest_neighbour_score`), ``a`` and ``b``
            learned scalars (initialised ``skip_scale`` and 0) and the IFM classifier's last conv
            zero-initialised: the untrained network *is* the nearest-support-descriptor
            classifier, and training learns a correction to it (a residual on a support-driven
            decision instead of a base-class detector learned from scratch).
        skip_scale: initial ``a`` (logit per unit of cosine difference), > 0.
        skip_source: the training-free classifier of ``prior_skip``: ``"nn"`` (nearest support
            descriptor), ``"linear"`` (per-episode ridge-regression probe on the support's frozen
            descriptors), ``"proto"`` (prototype map), or several joined by ``+`` (their logits
            averaged); :func:`model.priors.nearest_neighbour_score`.
        query_path: the MPR residual (raw query features): ``"on"`` (paper), ``"dropout"``
            or ``"off"`` (:class:`MultiPrototypeReasoning`).
        query_dropout: drop rate of ``query_path="dropout"``.
        transductive_steps: test-time refinement of the ``hypercolumn`` probe on each query's own cells
            (RePRI-style, :func:`model.priors.frozen_priors`); 0 = off. A plain attribute, not a weight:
            inference may change it on a loaded network.
        native_area: SOFS non-resizing at inference (:func:`model.base.check_native_area`; ``None`` = off):
            small support defects are cropped and queries segmented in native-resolution windows by
            ``pipeline.inference``. A plain attribute stored with the model; the forward is unchanged.

    Raises:
        ValueError: unknown variant, graph, prior kind, skip source or query path;
            ``channels < 8``; ``skip_scale <= 0``; ``transductive_steps < 0``; ``native_area``
            outside ``(0, 1]``.
    """

    def __init__(self, backbone: Backbone, *, freeze_backbone: bool = True, variant: str = "mpr+mpe*",
                 channels: int = 256, graph: str = "glore", num_nodes: int | None = None,
                 num_state: int | None = None, dropout: float = 0.5, priors: tuple[str, ...] | list[str] = (),
                 prior_skip: bool = False, skip_scale: float = 20.0, skip_source: str = "nn",
                 query_path: str = "on", query_dropout: float = 0.5, transductive_steps: int = 0,
                 native_area: float | None = None) -> None:
        super().__init__(backbone, freeze_backbone=freeze_backbone)
        self.priors = tuple(priors)
        if transductive_steps < 0:
            raise ValueError(f"transductive_steps must be >= 0, got {transductive_steps}")
        self.transductive_steps = int(transductive_steps)
        self.native_area = check_native_area(native_area)
        if self.priors:
            check_kinds(self.priors)
        if skip_scale <= 0:
            raise ValueError(f"skip_scale must be > 0, got {skip_scale}")
        check_skip_source(skip_source)
        self.skip_source = skip_source
        self.skip_kinds = tuple(skip_source.split("+"))
        self.levels = tuple(int(c) for c in backbone.level_channels)
        if variant not in VARIANTS:
            raise ValueError(f"unknown LERENet variant {variant!r}; valid variants (Table 3): {', '.join(VARIANTS)}")
        if channels < 8:
            raise ValueError(f"channels must be >= 8, got {channels}")
        self.variant = variant
        parts = variant.split("+")
        self.project = FeatureProjection(backbone.out_channels, channels, dropout)
        in_ch = 0
        self.mpr: MultiPrototypeReasoning | None = None
        self.mpe: MultiPrototypeExcitation | None = None
        if "mpr" in parts:
            self.mpr = MultiPrototypeReasoning(channels, num_nodes or channels // 4, num_state or channels // 2, graph,
                                               query_path, query_dropout)
            in_ch += channels
        mpe = next((p for p in parts if p.startswith("mpe")), None)
        if mpe is not None:
            self.mpe = MultiPrototypeExcitation(channels, with_prior=mpe.endswith("*"))
            in_ch += channels + self.mpe.out_channels_extra
        in_ch += len(self.priors) * len(self.levels)
        self.ifm = InformationFusion(in_ch, channels)
        self.skip: nn.Parameter | None = None
        if prior_skip:
            self.skip = nn.Parameter(torch.tensor([float(skip_scale), 0.0]))  # (a, b)
            last = self.ifm.cls[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    @property
    def refinable(self) -> bool:
        """Whether the ``hypercolumn`` probe is computed (in ``priors`` or ``skip_source``), i.e. whether
        ``transductive_steps`` has a probe to refine."""
        return "hypercolumn" in self.priors + self.skip_kinds

    def presence_log_odds(self, logits: torch.Tensor) -> torch.Tensor:
        """The probe's log-odds ``z`` behind output logits ``y = a f (2 sigmoid(z) - 1) + b`` when the skip source
        is one sigmoid probe (``logistic`` or ``hypercolumn``; ``a``, ``b`` the skip scalars, ``f`` its
        :data:`model.priors.SKIP_FACTORS`): ``z = 2 atanh((y - b) / (a f))``, the ratio clipped to
        ``+-(1 - 1e-7)`` (``|z| <= 32.6``). Near ``+-a f`` the output saturates, so differences of ``y`` between
        images say little and differences of ``z`` do (docs/experiments.md, eighth session). Exact while the IFM
        head outputs zero (the training-free default: its last conv is zero-initialised); an approximation
        once it is trained. Other configurations: the identity (:meth:`FewShotSegmenter.presence_log_odds`).

        Args:
            logits: any shape, output logits.

        Returns:
            the same shape, float64.
        """
        if self.skip is None or len(self.skip_kinds) != 1 or self.skip_kinds[0] not in SIGMOID_KINDS:
            return super().presence_log_odds(logits)
        a, b = (float(v) for v in self.skip.detach())
        bound = abs(a) * SKIP_FACTORS[self.skip_kinds[0]]
        u = ((logits.double() - b) / bound).clamp(-1 + 1e-7, 1 - 1e-7)
        return 2.0 * torch.atanh(u)

    def forward_features(self, support_feats: torch.Tensor, support_masks: torch.Tensor,
                         query_feats: torch.Tensor, out_size: tuple[int, int]) -> torch.Tensor:
        """Logits from encoded features.

        Args:
            support_feats: ``(B, K, Cb, h, w)`` from ``encode``.
            support_masks: ``(B, K, 1, H, W)`` float ``{0, 1}`` at image resolution; resized
                to ``h x w`` by area averaging (``resize_mask``).
            query_feats: ``(B, Cb, h, w)`` from ``encode``.
            out_size: ``(H, W)`` of the query image.

        Returns:
            ``(B, 1, H, W)`` logits (bilinear upsampling of the ``h x w`` logits).
        """
        b, k, masks = self._check_features(support_feats, support_masks, query_feats, out_size)
        h, w = query_feats.shape[-2:]
        x_s = self.project(support_feats.flatten(0, 1))                        # (B*K, c, h, w)
        m_s = resize_mask(masks.flatten(0, 1), (h, w))                        # (B*K, 1, h, w)
        x_s, m_s = x_s.unflatten(0, (b, k)), m_s.unflatten(0, (b, k))
        x_q = self.project(query_feats)                                       # (B, c, h, w)
        parts = []
        if self.mpr is not None:
            parts.append(self.mpr(x_q, (x_s * m_s).mean(dim=1)))              # Eq. 16: mean over shots
        if self.mpe is not None:
            parts.append(self.mpe(x_q, x_s, m_s))
        maps = None
        if self.priors:  # on the frozen features, not the learned projection (model/priors.py)
            maps = frozen_priors(query_feats, support_feats, m_s, self.levels, self.priors, self.transductive_steps)
            parts.append(maps.to(parts[0].dtype))
        logits = self.ifm(torch.cat(parts, dim=1))
        if self.skip is not None:
            if maps is not None and set(self.skip_kinds) <= set(self.priors):  # reuse the prior maps
                nn_score = skip_score(maps, self.priors, self.skip_kinds)
            else:
                nn_score = nearest_neighbour_score(query_feats, support_feats, m_s, self.levels, self.skip_source,
                                                   self.transductive_steps)
            logits = logits.float() + self.skip[0] * nn_score + self.skip[1]
        return F.interpolate(logits, size=tuple(int(s) for s in out_size), mode="bilinear", align_corners=False)
