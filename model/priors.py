"""Class-agnostic guidance computed on the *frozen* backbone features (no learnable parameters).

LERENet's own prior ``D_cos`` is computed on the learned projection, which drifts towards the
base classes during episodic training; PFENet (Tian et al., TPAMI 2020) computes its prior on
frozen features, which is why it generalises to novel classes. These maps follow that rule and
the SOFS priors (Zhang et al., arXiv 2407.21351, Sec. 3.2), per backbone level:

* ``fg``: foreground prior, each query descriptor's max cosine to the support's *defect*
  descriptors (all K shots), in ``[-1, 1]``;
* ``abnormal``: SOFS abnormal prior, ``1 -`` max cosine to the support's *background*
  descriptors, in ``[0, 2]``;
* ``nn``: nearest-neighbour map, ``fg - (1 - abnormal)`` = max cosine to defect minus max
  cosine to background, in ``[-2, 2]``; ``> 0`` where the query descriptor is closer to a
  support defect descriptor than to any support background descriptor (a 1-nearest-neighbour
  classifier over the support's local descriptors).
* ``linear``: per-episode linear probe, the score of a class-balanced ridge-regression
  classifier fitted (closed form, no gradient) on the support's defect (+1) and background
  (-1) descriptors of this episode and applied to the query descriptors; ``> 0`` = defect.
  The test-time fit the foundation issue measured (a per-episode logistic regression on the
  same frozen descriptors) in its cheapest exact form: one ``(C+1) x (C+1)`` solve per episode.
* ``logistic``: the per-episode *logistic* regression the foundation issue measured (class-balanced,
  L2 penalty ``LOGISTIC_L2`` on the weights, fitted by ``LOGISTIC_STEPS`` Newton steps from the ridge
  solution, float64), reported as ``2 sigmoid(z) - 1`` in ``(-1, 1)``, ``> 0`` = defect. Unlike the ridge
  probe it does not pull well-separated cells towards ``+-1``, so the support's easy cells stop
  dictating the boundary.
* ``hypercolumn``: the logistic probe fitted once per episode on the *hypercolumn* of every level
  (Hariharan et al., CVPR 2015: each cell's L2-normalised level descriptors concatenated, scaled by
  ``1/sqrt(levels)`` so the cell stays unit-norm), L2 penalty ``HYPERCOLUMN_L2 / K`` (a K-shot support
  holds K times the evidence, so the penalty shrinks as the shots grow); the same map at every level.
  One classifier sees how shallow texture and deeper shape agree in a cell, which the per-level probes,
  averaged, cannot.
* ``proto``: the prototype model's map on the frozen features (PANet, Wang et al. ICCV 2019):
  ``cos(q, p_fg) - cos(q, p_bg)`` with ``p_fg`` / ``p_bg`` the masked average pooling of the
  support over its defect area fractions / their complement (all shots), in ``[-2, 2]``.
* ``self``: the linear probe refitted with the query's own confident cells (self-support, after
  SSP, Fan et al. ECCV 2022, "Self-Support Few-Shot Semantic Segmentation"): the query cells whose
  level-averaged ``linear+proto`` score (:func:`skip_score`) is above ``SELF_MARGIN`` join the
  defect cells and those below ``-SELF_MARGIN`` the background cells, then the class-balanced ridge
  probe is fitted again on support + query cells. The query's own normal surface is the best
  model of what is *not* a defect in it (intra-class differences between support and query are
  what LERENet sets out to remove), so the refit mainly cuts false positives.

Shapes: ``B`` episodes, ``K`` shots, ``Cb`` frozen channels (the backbone's levels
concatenated, ``Backbone.level_channels``), ``h x w`` grid. A support cell is *defect* when its
defect area fraction is at least ``FG_SHARE`` of the episode's largest fraction (so a defect
smaller than a cell still has defect cells) and *background* when it holds no defect pixel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PRIOR_KINDS = ("fg", "abnormal", "nn", "linear", "proto", "self", "logistic", "hypercolumn")
#: kinds a prior skip can start from, and the factor that puts each in the ``nn`` map's units
#: (``skip_scale`` x factor = initial logit per unit of the map): the linear probe scores about
#: ``[-1, 1]`` where the cosine differences move about twice as little
SKIP_FACTORS = {"nn": 1.0, "linear": 0.5, "proto": 1.0, "self": 0.5, "logistic": 0.5, "hypercolumn": 0.5}
#: skip sources whose score is ``2 sigmoid(z) - 1`` of a logistic probe (``LERENet.presence_log_odds`` inverts it)
SIGMOID_KINDS = ("logistic", "hypercolumn")
FG_SHARE = 0.5
RIDGE = 0.001  # ridge of the linear probe, relative to the unit total weight of the support cells
_NONE = -2.0  # below any cosine: "no such support cell"
#: |linear+proto score| a query cell needs to join the self-support refit (``self``), in skip-score units
#: (logit / skip scale); 0.1 chosen on the selection classes over 0 / 0.05 (docs/experiments.md, e19)
SELF_MARGIN = 0.1
#: L2 penalty of the logistic probe, relative to the unit total weight of the support cells; 1e-4 chosen on the
#: leave-one-material-out selection classes over 1e-2 / 1e-3 / 1e-5 (docs/experiments.md, fourth session)
LOGISTIC_L2 = 1e-4
#: above this many feature channels per level the logistic prior keeps the ridge solution (no Newton steps)
LOGISTIC_MAX_CHANNELS = 512
LOGISTIC_STEPS = 8
#: L2 penalty of the hypercolumn probe at K=1 (``/ K`` at K shots); 5e-4 chosen on the leave-one-material-out
#: selection classes over 1e-3 / 1e-4 / 1e-5 fixed and 1e-3 / K (docs/experiments.md, fifth session)
HYPERCOLUMN_L2 = 5e-4
#: transductive refinement of the hypercolumn probe on the query (RePRI, Boudiaf et al. CVPR 2021; the step count
#: is ``frozen_priors(transductive_steps=)``, ``model.transductive_steps``): Adam step size in weight units, and
#: the weights of the query entropy and proportion terms
TRANSDUCTIVE_LR = 0.1      # 0.1 x 20 steps chosen on the held-out-material episodes over 0.05 x 20, 0.02 x 50, 0.05 x 50
                           # (docs/experiments.md, e27); entropy without the share term collapses K=1
TRANSDUCTIVE_ENTROPY = 1.0
TRANSDUCTIVE_KL = 1.0


def _cells(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q (B, C, Lq), s (B, C, K*Ls), fg, bg (B, 1, K*Ls) bool)``: L2-normalised descriptors and
    the support's defect / background cells."""
    q = F.normalize(query.float().flatten(2), dim=1)                          # (B, C, Lq)
    s = F.normalize(support.float().transpose(1, 2).flatten(2), dim=1)        # (B, C, K*Ls)
    m = masks.float().transpose(1, 2).flatten(2)                              # (B, 1, K*Ls)
    peak = m.amax(dim=2, keepdim=True)
    fg = (m >= FG_SHARE * peak) & (peak > 0)
    return q, s, fg, m <= 0


def _max_cosines(q: torch.Tensor, s: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fg_max, bg_max)``, each ``(B, Lq)``: max cosine of each query descriptor to the support's
    defect cells and to its background cells (``_NONE`` where the support has no such cell)."""
    sim = s.transpose(1, 2) @ q                                               # (B, K*Ls, Lq)
    none = sim.new_tensor(_NONE)
    fg_max = torch.where(fg.transpose(1, 2), sim, none).amax(dim=1)
    bg_max = torch.where(bg.transpose(1, 2), sim, none).amax(dim=1)
    return fg_max, bg_max


def _design(s: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x (B, C+1, N), wt (B, N), y (B, N), n_fg (B, 1))`` float64: support cells with a bias row, class
    weights (each class sums to 1/2), targets ``+1`` defect / ``-1`` background / 0 neither, defect-cell count."""
    s = torch.nan_to_num(s, 0.0, 0.0, 0.0)  # a diverged fine-tuned backbone: the map is undefined, the step runs
    x = torch.cat([s, s.new_ones(s.shape[0], 1, s.shape[2])], dim=1).double()
    fgw, bgw = fg.squeeze(1).double(), bg.squeeze(1).double()
    n_fg, n_bg = fgw.sum(1, keepdim=True), bgw.sum(1, keepdim=True)
    return x, 0.5 * fgw / n_fg.clamp_min(1) + 0.5 * bgw / n_bg.clamp_min(1), fgw - bgw, n_fg


def _with_bias(q: torch.Tensor) -> torch.Tensor:
    """``(B, C+1, Lq)`` float64: query cells ``q (B, C, Lq)`` (non-finite values as 0) with a row of ones."""
    q = torch.nan_to_num(q, 0.0, 0.0, 0.0)
    return torch.cat([q, q.new_ones(q.shape[0], 1, q.shape[2])], dim=1).double()


def _apply(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(B, Lq)`` float64: ``[q; 1] . w`` for weights ``w (B, C+1, 1)`` and query cells ``q (B, C, Lq)``."""
    return (w.transpose(1, 2) @ _with_bias(q)).squeeze(1)


def _ridge_weights(x: torch.Tensor, wt: torch.Tensor, y: torch.Tensor, ridge: float) -> torch.Tensor:
    """``(B, C+1, 1)``: ``w = (X^T W X + ridge I)^-1 X^T W y`` (primal or dual form, whichever is smaller)."""
    a = x * wt.sqrt()[:, None, :]                                               # X W^1/2
    rhs = (wt.sqrt() * y)[:, :, None]                                           # W^1/2 y, (B, N, 1)
    if a.shape[1] <= a.shape[2]:   # primal: (A A^T + r I) w = A W^1/2 y, a (C+1) x (C+1) system
        gram = a @ a.transpose(1, 2) + ridge * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
        return torch.cholesky_solve(a @ rhs, torch.linalg.cholesky(gram))
    gram = a.transpose(1, 2) @ a + ridge * torch.eye(a.shape[2], dtype=a.dtype, device=a.device)
    return a @ torch.cholesky_solve(rhs, torch.linalg.cholesky(gram))  # dual: few cells, wide features


def _linear_probe(q: torch.Tensor, s: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor,
                  ridge: float | None = None) -> torch.Tensor:
    """``(B, Lq)``: query scores of a ridge-regression classifier fitted on this episode's support.

    Weighted least squares on the support cells with targets ``+1`` (defect) / ``-1`` (background),
    each class weighted to a total of 1/2 (class balance: a defect covers a few cells), a bias
    column, and ``ridge * I``: ``w = (X^T W X + ridge I)^-1 X^T W y``, score ``= [q; 1] . w``.
    A support without defect cells scores ``-1`` everywhere (nothing to find). float64 solve.
    """
    x, wt, y, n_fg = _design(s, fg, bg)
    score = _apply(_ridge_weights(x, wt, y, RIDGE if ridge is None else ridge), q)
    return torch.where(n_fg > 0, score, score.new_tensor(-1.0)).float()


def _logistic_probe(q: torch.Tensor, s: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor,
                    l2: float | None = None, transductive: int = 0) -> torch.Tensor:
    """``(B, Lq)`` in ``(-1, 1)``: ``2 sigmoid(z) - 1`` of a class-balanced logistic regression on the support.

    Minimises ``sum_i wt_i BCE(z_i, y_i) + LOGISTIC_L2 / 2 |w_1..C|^2`` (bias unpenalised) over the
    support's defect (``y = 1``) and background (``y = 0``) cells, class weights as :func:`_linear_probe`
    (``l2`` replaces ``LOGISTIC_L2`` when given);
    at most ``LOGISTIC_STEPS`` Newton steps ``w -= H^-1 g`` from the ridge solution, fewer once no weight
    of any episode moves by 1e-7 (the loss is convex; the Hessian product is float32, the Cholesky solve
    float64; an episode whose Hessian is not numerically positive definite keeps its weights);
    levels wider than ``LOGISTIC_MAX_CHANNELS`` keep the ridge solution (an O(C^3) solve per step). A support without defect cells scores ``-1`` everywhere.
    ``transductive > 0``: that many refinement steps on the query (:func:`_transductive_weights`) follow the fit.
    """
    with torch.no_grad():             # the fit is a per-episode solver, not a layer: no gradient through its steps
        x, wt, y, n_fg = _design(s, fg, bg)
        l2 = LOGISTIC_L2 if l2 is None else l2
        w = _logistic_weights(x, wt, y, l2)
        if transductive > 0:
            w = _transductive_weights(w, x, wt, y, q, l2, transductive)
    score = 2 * torch.sigmoid(_apply(w, q)) - 1
    return torch.where(n_fg > 0, score, score.new_tensor(-1.0)).float()


def _logistic_weights(x: torch.Tensor, wt: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """``(B, C+1, 1)``: the Newton iterations of :func:`_logistic_probe` on its design (:func:`_design`), penalty ``l2``."""
    t = (y > 0).double()
    c = x.shape[1]
    pen = l2 * torch.eye(c, dtype=x.dtype, device=x.device)
    pen[-1, -1] = 1e-8                                                          # the bias: no penalty
    w = _ridge_weights(x, wt, y, RIDGE)
    if c > LOGISTIC_MAX_CHANNELS:     # wide features (ResNet-50: 3,072 channels): an O(C^3) Newton system per step
        return w                      # would dwarf the network; keep the ridge solution, the same boundary family
    x32 = x.float()                   # the Hessian's (C+1) x N x (C+1) product in float32 (the cost), solved in float64
    for _ in range(LOGISTIC_STEPS):
        p = torch.sigmoid((w.transpose(1, 2) @ x).squeeze(1))                 # (B, N)
        g = x @ (wt * (p - t))[:, :, None] + pen @ w                            # (B, C+1, 1)
        h = ((x32 * (wt * p * (1 - p)).float()[:, None, :]) @ x32.transpose(1, 2)).double() + pen
        # Cholesky (h is symmetric positive definite), not torch.linalg.solve: torch 2.13's batched float64 LU
        # fails on CPU with 2 threads at ~150 unknowns (oneMKL "DLASWP parameter 6" errors, then a hang)
        chol, info = torch.linalg.cholesky_ex(h)
        step = torch.cholesky_solve(g, chol)
        step = torch.where((info == 0).view(-1, 1, 1), step, torch.zeros_like(step))  # not PD: keep this w
        w = w - step
        if not bool(step.abs().max() >= 1e-7):                                  # converged (or not finite)
            break
    return w


def _transductive_weights(w: torch.Tensor, x: torch.Tensor, wt: torch.Tensor, y: torch.Tensor, q: torch.Tensor,
                          l2: float, steps: int) -> torch.Tensor:
    """``(B, C+1, 1)``: the probe's weights refined on the unlabelled query cells ``q (B, C, Lq)`` (RePRI).

    Minimises, from the support fit ``w``, the support loss of :func:`_logistic_probe` plus
    ``TRANSDUCTIVE_ENTROPY`` x the mean binary entropy of the query cells' probabilities ``p`` plus
    ``TRANSDUCTIVE_KL`` x ``KL(pi || pi_0)`` between the query's predicted defect share ``pi = mean p`` and the
    share ``pi_0`` the support fit predicts (Boudiaf et al., "Few-Shot Segmentation Without Meta-Learning: A Good
    Transductive Inference Is All You Need?", CVPR 2021, Eq. 3-5, with the support fit's share as the prior
    proportion). ``steps`` Adam steps of size ``TRANSDUCTIVE_LR`` with the analytic gradients (float64, no
    autograd, so it runs inside ``torch.inference_mode``)."""
    qx = _with_bias(q)
    t = (y > 0).double()
    pen = torch.full((x.shape[1], 1), l2, dtype=x.dtype, device=x.device)
    pen[-1] = 0.0                                                               # the bias: no penalty
    pi0 = torch.sigmoid((w.transpose(1, 2) @ qx).squeeze(1)).mean(1, keepdim=True).clamp(1e-6, 1 - 1e-6)
    m, v = torch.zeros_like(w), torch.zeros_like(w)
    for i in range(1, steps + 1):
        g = _transductive_grad(w, x, wt, t, qx, pen, pi0)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w = w - TRANSDUCTIVE_LR * (m / (1 - 0.9 ** i)) / ((v / (1 - 0.999 ** i)).sqrt() + 1e-8)
    return w


def _transductive_grad(w: torch.Tensor, x: torch.Tensor, wt: torch.Tensor, t: torch.Tensor, qx: torch.Tensor,
                       pen: torch.Tensor, pi0: torch.Tensor) -> torch.Tensor:
    """``(B, C+1, 1)``: gradient of :func:`_transductive_weights`' objective at ``w``; ``qx (B, C+1, Lq)`` query
    cells with the bias row, ``t (B, N)`` support targets in {0, 1}, ``pen (C+1, 1)`` L2 weights, ``pi0 (B, 1)``."""
    p = torch.sigmoid((w.transpose(1, 2) @ x).squeeze(1))                     # support cells (B, N)
    zq = (w.transpose(1, 2) @ qx).squeeze(1)                                   # query logits (B, Lq)
    pq = torch.sigmoid(zq)
    pi = pq.mean(1, keepdim=True).clamp(1e-6, 1 - 1e-6)
    dkl = torch.log(pi / pi0) - torch.log((1 - pi) / (1 - pi0))                 # d KL / d pi, (B, 1)
    dq = pq * (1 - pq) * (TRANSDUCTIVE_ENTROPY * -zq + TRANSDUCTIVE_KL * dkl) / zq.shape[1]  # d / d z_query
    return x @ (wt * (p - t))[:, :, None] + pen * w + qx @ dq[:, :, None]


def _prototype_map(qn: torch.Tensor, support: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """``(B, Lq)``: ``cos(q, p_fg) - cos(q, p_bg)``, prototypes by masked average pooling of the raw
    support features ``(B, K, C, h, w)`` over ``masks`` / ``1 - masks``; 0 where a pool is empty."""
    m = masks.float()
    f = support.float()
    p_fg = (f * m).sum(dim=(1, 3, 4)) / m.sum(dim=(1, 3, 4)).clamp_min(1e-6)           # (B, C)
    p_bg = (f * (1 - m)).sum(dim=(1, 3, 4)) / (1 - m).sum(dim=(1, 3, 4)).clamp_min(1e-6)
    cos = lambda p: (F.normalize(p, dim=1)[:, None, :] @ qn).squeeze(1)  # noqa: E731  (B, Lq)
    return cos(p_fg) - cos(p_bg)


def frozen_priors(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor,
                  levels: tuple[int, ...], kinds: tuple[str, ...], transductive_steps: int = 0) -> torch.Tensor:
    """The requested priors at every backbone level.

    Args:
        query: ``(B, Cb, h, w)`` frozen query features.
        support: ``(B, K, Cb, h, w)`` frozen support features.
        masks: ``(B, K, 1, h, w)`` defect area fraction per support cell, ``[0, 1]``.
        levels: channels per backbone level, summing to ``Cb`` (``Backbone.level_channels``).
        kinds: a non-empty subset of :data:`PRIOR_KINDS`, in the order wanted.
        transductive_steps: ``hypercolumn`` only: refinement steps of its probe on the query's own cells
            (:func:`_transductive_weights`, RePRI); 0 = the support fit alone.

    Returns:
        ``(B, len(kinds) * len(levels), h, w)`` float32, channel order level-major
        (``[k_1@level_1, k_2@level_1, ..., k_1@level_2, ...]``). An episode without defect cells
        gets ``fg = -2`` (nothing is like its defect); without background cells ``abnormal = 3``.

    Raises:
        ValueError: unknown kind, empty ``kinds``, ``levels`` not summing to ``Cb``, or negative
            ``transductive_steps``.
    """
    check_kinds(kinds)
    if transductive_steps < 0:
        raise ValueError(f"transductive_steps must be >= 0, got {transductive_steps}")
    if sum(levels) != query.shape[1]:
        raise ValueError(f"levels {levels} do not sum to the {query.shape[1]} feature channels")
    with torch.autocast(query.device.type, enabled=False):  # float32/64 maths even inside a caller's AMP
        return _frozen_priors(query, support, masks, levels, kinds, transductive_steps)


def _frozen_priors(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor,
                   levels: tuple[int, ...], kinds: tuple[str, ...], transductive_steps: int) -> torch.Tensor:
    b, _, h, w = query.shape
    want = set(kinds) | ({"linear", "proto"} if "self" in kinds else set())
    per_level = []
    for q, s in zip(query.split(list(levels), dim=1), support.split(list(levels), dim=2)):
        qn, sn, fg, bg = _cells(q, s, masks)
        maps = {}
        if {"fg", "abnormal", "nn"} & want:
            fg_max, bg_max = _max_cosines(qn, sn, fg, bg)
            maps = {"fg": fg_max, "abnormal": 1.0 - bg_max, "nn": fg_max - bg_max}
        if "linear" in want:
            maps["linear"] = _linear_probe(qn, sn, fg, bg)
        if "logistic" in want:
            maps["logistic"] = _logistic_probe(qn, sn, fg, bg)
        if "proto" in want:
            maps["proto"] = _prototype_map(qn, s, masks)
        per_level.append((qn, sn, fg, bg, maps))
    if "hypercolumn" in want:
        scale = len(levels) ** -0.5
        qh, sh = (torch.cat([lv[i] for lv in per_level], dim=1) * scale for i in (0, 1))
        joint = _logistic_probe(qh, sh, per_level[0][2], per_level[0][3], HYPERCOLUMN_L2 / support.shape[1],
                                transductive_steps)
        for *_, maps in per_level:
            maps["hypercolumn"] = joint
    if "self" in kinds:
        base = torch.stack([(SKIP_FACTORS["linear"] * m["linear"] + SKIP_FACTORS["proto"] * m["proto"]) / 2
                            for *_, m in per_level]).mean(dim=0)                 # (B, Lq) linear+proto skip score
        q_fg, q_bg = (base > SELF_MARGIN)[:, None, :], (base < -SELF_MARGIN)[:, None, :]
        for qn, sn, fg, bg, maps in per_level:
            maps["self"] = _linear_probe(qn, torch.cat([sn, qn], dim=2), torch.cat([fg, q_fg], dim=2),
                                         torch.cat([bg, q_bg], dim=2))
    out = []
    for *_, maps in per_level:
        out.extend(maps[k].view(b, 1, h, w) for k in kinds)
    return torch.cat(out, dim=1)


def nearest_neighbour_score(query: torch.Tensor, support: torch.Tensor, masks: torch.Tensor,
                            levels: tuple[int, ...], kind: str = "nn", transductive_steps: int = 0) -> torch.Tensor:
    """``(B, 1, h, w)``: the training-free score LERENet's ``prior_skip`` starts from.

    ``kind`` is one of :data:`SKIP_FACTORS` (``"nn"``, ``"linear"``, ``"proto"``) or several joined
    by ``+`` (e.g. ``"linear+proto"``): each map is averaged over the backbone levels, multiplied by
    its factor, and the kinds are averaged, so ``> 0`` = defect by the mean of the classifiers'
    logits. Other arguments as :func:`frozen_priors`.

    Raises:
        ValueError: an unknown or repeated kind.
    """
    kinds = tuple(kind.split("+"))
    check_skip_source(kind)
    maps = frozen_priors(query, support, masks, levels, kinds, transductive_steps)  # level-major
    return skip_score(maps, kinds, kinds)


def skip_score(maps: torch.Tensor, map_kinds: tuple[str, ...], kinds: tuple[str, ...]) -> torch.Tensor:
    """``(B, 1, h, w)``: the skip score of ``kinds`` from ``maps`` ``(B, len(map_kinds) * levels, h, w)``
    (:func:`frozen_priors` output for ``map_kinds``, which must contain every kind of ``kinds``)."""
    n = len(map_kinds)
    parts = [SKIP_FACTORS[k] * maps[:, map_kinds.index(k)::n].mean(dim=1, keepdim=True) for k in kinds]
    return torch.stack(parts).mean(dim=0)


def check_skip_source(kind: str) -> None:
    """Raise ``ValueError`` unless ``kind`` is ``+``-joined distinct names of :data:`SKIP_FACTORS`."""
    kinds = kind.split("+") if isinstance(kind, str) else []
    if not kinds or any(k not in SKIP_FACTORS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"skip_source must be one or more of {', '.join(SKIP_FACTORS)} joined by '+'; got {kind!r}")


def check_kinds(kinds: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``kinds`` is a non-empty subset of :data:`PRIOR_KINDS` without repeats."""
    bad = [k for k in kinds if k not in PRIOR_KINDS]
    if bad or not kinds or len(set(kinds)) != len(kinds):
        raise ValueError(f"priors must be distinct names among {', '.join(PRIOR_KINDS)}; got {list(kinds)}")
