"""Test-time adaptation (issue 11, item 7): the RePRI-style transductive refinement of the hypercolumn probe,
its switch in ``params.yaml`` and the model file, and its per-call override in inference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model import build_model
from model.priors import frozen_priors


def test_transductive_refinement_descends_the_repri_objective_inside_inference_mode(monkeypatch):
    """``transductive_steps``: the analytic gradient is autograd's of support loss + L2 + query entropy + KL of the
    query's defect share to the support fit's (RePRI); the steps lower that objective, run under
    ``torch.inference_mode``, and 0 steps leave the hypercolumn map unchanged."""
    import model.priors as priors

    g = torch.Generator().manual_seed(3)
    b, c, n, lq = 2, 5, 40, 30
    x = torch.cat([torch.randn(b, c, n, generator=g), torch.ones(b, 1, n)], 1).double()
    qx = torch.cat([torch.randn(b, c, lq, generator=g) + 0.5, torch.ones(b, 1, lq)], 1).double()
    t = (torch.rand(b, n, generator=g) > 0.7).double()
    wt = torch.where(t > 0, 0.5 / t.sum(1, keepdim=True), 0.5 / (1 - t).sum(1, keepdim=True))
    pen = torch.full((c + 1, 1), 0.01, dtype=torch.float64)
    pen[-1] = 0.0
    w0 = torch.randn(b, c + 1, 1, generator=g, dtype=torch.float64)
    pi0 = torch.tensor([[0.3], [0.6]], dtype=torch.float64)

    def objective(w):
        z, zq = (w.transpose(1, 2) @ x).squeeze(1), (w.transpose(1, 2) @ qx).squeeze(1)
        sup = (wt * F.binary_cross_entropy_with_logits(z, t, reduction="none")).sum(1)
        pq = torch.sigmoid(zq)
        ent = -(pq * torch.log(pq) + (1 - pq) * torch.log(1 - pq)).mean(1)
        pi = pq.mean(1, keepdim=True)
        kl = (pi * torch.log(pi / pi0) + (1 - pi) * torch.log((1 - pi) / (1 - pi0))).squeeze(1)
        return sup + 0.5 * (pen * w * w).sum((1, 2)) + 2.0 * ent + 3.0 * kl

    monkeypatch.setattr(priors, "TRANSDUCTIVE_ENTROPY", 2.0)
    monkeypatch.setattr(priors, "TRANSDUCTIVE_KL", 3.0)
    w = w0.clone().requires_grad_(True)
    objective(w).sum().backward()
    assert torch.allclose(priors._transductive_grad(w0, x, wt, t, qx, pen, pi0), w.grad, atol=1e-10)

    s, m, q = torch.randn(1, 2, 6, 4, 4, generator=g), torch.zeros(1, 2, 1, 4, 4), torch.randn(1, 6, 4, 4, generator=g)
    m[..., 1:3, 1:3] = 1.0
    plain = frozen_priors(q, s, m, (2, 4), ("hypercolumn",))
    with torch.inference_mode():
        refined = frozen_priors(q, s, m, (2, 4), ("hypercolumn",), transductive_steps=30)
    assert refined.shape == plain.shape and not torch.allclose(refined, plain)
    assert torch.equal(frozen_priors(q, s, m, (2, 4), ("hypercolumn",), transductive_steps=0), plain)
    with pytest.raises(ValueError, match="transductive_steps must be >= 0"):
        frozen_priors(q, s, m, (2, 4), ("hypercolumn",), transductive_steps=-1)
    # the steps descend the objective (from the support fit, its own share as the prior)
    w_fit = w0.clone()
    pi_fit = torch.sigmoid((w_fit.transpose(1, 2) @ qx).squeeze(1)).mean(1, keepdim=True)
    pi0 = pi_fit  # noqa: F841 -- objective() reads it
    after = priors._transductive_weights(w_fit, x, wt, t * 2 - 1, qx[:, :-1], 0.01, 30)
    assert torch.all(objective(after) < objective(w_fit))


def test_transductive_steps_travel_from_params_to_the_model_file_and_are_overridden_per_call(tmp_path):
    from pipeline.checkpoint import load_model, save_model
    from pipeline.config import DEFAULT_PARAMS, ConfigError, load_params
    from pipeline.inference.predictor import PredictInputError, Predictor

    params = load_params(DEFAULT_PARAMS, {"model": {"transductive_steps": 7}})
    opts = params.model.lerenet_options()
    assert opts["transductive_steps"] == 7
    off = load_params(DEFAULT_PARAMS, {"model": {"transductive_steps": 0}}).model.lerenet_options()
    assert "transductive_steps" not in off      # 0 builds the network without the keyword (older model files)
    with pytest.raises(ConfigError, match="model.transductive_steps: .*refines the hypercolumn probe"):
        load_params(DEFAULT_PARAMS, {"model": {"transductive_steps": 7, "priors": ["logistic"],
                                               "skip_source": "logistic"}})
    net = build_model("lerenet", pretrained=False, channels=16, **opts)
    save_model(tmp_path / "m.pt", net, {"model": "lerenet", "backbone": "efficientnet_lite0", "variant": "mpr+mpe*",
                                        "channels": 16, "freeze_backbone": True, "image_size": 64, "config": net.config})
    loaded, meta = load_model(tmp_path / "m.pt")
    assert loaded.transductive_steps == 7
    pred = Predictor(loaded, 64, meta)
    with pred.transductive(0):
        assert loaded.transductive_steps == 0 and pred.describe()["transductive_steps"] == 0
    with pred.transductive(None):
        assert loaded.transductive_steps == 7
    assert loaded.transductive_steps == 7
    with pytest.raises(PredictInputError, match=r"integer in \[0, 1000\], got -1"):
        with pred.transductive(-1):
            pass
    with pytest.raises(ValueError, match="transductive_steps must be >= 0"):
        build_model("lerenet", pretrained=False, channels=16, priors=["hypercolumn"], transductive_steps=-2)
