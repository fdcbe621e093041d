"""SOFS (model/sofs.py, model/sofs_ops.py): shapes, gradients, the area-fraction mask
downsampling and the priors on hand-made inputs, anomaly-detection mode, a real-data overfit."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from _real_pairs import iou, real_pairs
from model import SOFS, build_model
from model.losses import segmentation_loss
from model.sofs_ops import area_fraction, feature_target, level_priors, mask_fusion, sofs_priors

D = 32  # small embedding for speed


def episode(b: int = 2, k: int = 1, h: int = 64, w: int = 80, seed: int = 0):
    """Random images with a rectangular defect in every support mask."""
    g = torch.Generator().manual_seed(seed)
    support = torch.rand(b, k, 3, h, w, generator=g)
    masks = torch.zeros(b, k, 1, h, w)
    masks[..., h // 4: h // 2, w // 3: w // 2 + 3] = 1.0
    return support, masks, torch.rand(b, 3, h, w, generator=g)


@pytest.fixture(scope="module")
def net() -> SOFS:
    torch.manual_seed(0)
    return build_model("sofs", channels=D).eval()


# ----------------------------------------------------------------------------- shapes / contract
@pytest.mark.parametrize("k,h,w", [(1, 64, 80), (5, 64, 80), (1, 67, 81), (5, 33, 47)])
def test_output_shape_any_size(net, k, h, w):
    support, masks, query = episode(k=k, h=h, w=w)
    with torch.no_grad():
        out = net(support, masks, query)
    assert out.shape == (2, 1, h, w) and torch.isfinite(out).all()


def test_support_and_query_grids_may_differ(net):
    """Sliding windows at native resolution: support and query feature grids of different sizes."""
    support, masks, _ = episode(b=1, k=2, h=64, w=64)
    query = torch.rand(1, 3, 96, 72)
    with torch.no_grad():
        sf = net.encode(support.flatten(0, 1)).unflatten(0, (1, 2))
        qf = net.encode(query)
        out = net.forward_features(sf, masks, qf, (96, 72))
    assert sf.shape[-2:] == (8, 8) and qf.shape[-2:] == (12, 9) and out.shape == (1, 1, 96, 72)


def test_forward_equals_forward_features_and_k_identical_shots(net):
    support, masks, query = episode(b=1, k=1)
    with torch.no_grad():
        full = net(support, masks, query)
        sf = net.encode(support.flatten(0, 1)).unflatten(0, (1, 1))
        torch.testing.assert_close(full, net.forward_features(sf, masks, net.encode(query), query.shape[-2:]))
        five = net(support.expand(1, 5, -1, -1, -1), masks.expand(1, 5, -1, -1, -1), query)
    torch.testing.assert_close(full, five, rtol=1e-4, atol=1e-4)


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    model = build_model("sofs", channels=D, pretrained=False).train()
    support, masks, query = episode(b=2, k=2)
    target = torch.zeros(2, 1, 64, 80)
    target[:, :, 16:40, 20:50] = 1.0
    segmentation_loss(model(support, masks, query), target, "dice").backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(not n.startswith("backbone.") for n, _ in trainable)
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_config_rebuilds_and_options(net):
    twin = build_model(**net.config, pretrained=False)
    twin.load_state_dict(net.state_dict(), strict=True)
    support, masks, query = episode()
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(support, masks, query), net(support, masks, query))
    assert build_model("sofs").merge_query[0].out_channels == 64           # the model's own default width
    no_prior = build_model("sofs", channels=D, priors=False, pretrained=False)
    assert no_prior.merge_query[0].in_channels == 2 * D
    assert net.merge_query[0].in_channels == 2 * D + 4                     # 2 priors x 2 Lite0 levels
    with pytest.raises(ValueError, match="mask_resize"):
        build_model("sofs", mask_resize="bilinear", pretrained=False)
    with pytest.raises(ValueError, match="anomaly_threshold"):
        build_model("sofs", anomaly_threshold=1.0, pretrained=False)


def test_backbone_levels_split_the_features():
    for name, levels in [("efficientnet_lite0", (40, 112)), ("resnet50", (512, 1024)), ("vgg16_bn", (256, 512))]:
        model = build_model("sofs", name, channels=D, pretrained=False)
        assert model.levels == levels and sum(levels) == model.feature_channels
        assert model.merge_query[0].in_channels == 2 * D + 2 * len(levels)


# ----------------------------------------------------------------------------- area fraction
def test_area_fraction_integer_ratio_is_the_ones_kernel_convolution():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 0, 0] = 1.0                                   # one defect pixel in the top-left 8x8 cell
    mask[..., 8:12, 8:16] = 1.0                             # half of the bottom-right cell
    out = area_fraction(mask, (2, 2))
    torch.testing.assert_close(out, torch.tensor([[[[1 / 64, 0.0], [0.0, 0.5]]]]))
    rnd = (torch.rand(3, 1, 24, 40, generator=torch.Generator().manual_seed(1)) > 0.7).float()
    ones = torch.ones(1, 1, 8, 8)
    torch.testing.assert_close(area_fraction(rnd, (3, 5)), F.conv2d(rnd, ones, stride=8) / 64)


def test_area_fraction_non_integer_ratio_counts_partial_pixels():
    # 5 pixels -> 2 cells: cell 0 covers pixels 0, 1 fully and half of pixel 2 (weights 0.4, 0.4, 0.2)
    mask = torch.zeros(1, 1, 5, 5)
    mask[..., 2, 2] = 1.0                                   # the centre pixel is shared by all 4 cells
    torch.testing.assert_close(area_fraction(mask, (2, 2)), torch.full((1, 1, 2, 2), 0.04))
    mask = torch.zeros(1, 1, 5, 5)
    mask[..., 0, 0] = 1.0
    out = area_fraction(mask, (2, 2))
    assert out[0, 0, 0, 0].item() == pytest.approx(0.16) and out.sum().item() == pytest.approx(0.16)
    # adaptive average pooling would count the pixel in a 3x3 window: 1/9 (not an area fraction)
    assert F.adaptive_avg_pool2d(mask, (2, 2))[0, 0, 0, 0].item() == pytest.approx(1 / 9)
    # total defect area is preserved for any ratio: sum(out) * cell area == sum(mask)
    rnd = (torch.rand(2, 1, 67, 81, generator=torch.Generator().manual_seed(2)) > 0.9).float()
    small = area_fraction(rnd, (9, 11))
    assert small.min() >= 0 and small.max() <= 1
    torch.testing.assert_close(small.sum((1, 2, 3)) * (67 * 81) / (9 * 11), rnd.sum((1, 2, 3)))


def test_feature_target_thresholds_the_area_fraction():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 0:2, 0:4] = 1.0                               # 8/64 = 0.125 > 0.1
    mask[..., 8, 8:14] = 1.0                                # 6/64 = 0.094 < 0.1
    torch.testing.assert_close(feature_target(mask, (2, 2)), torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]))


def test_nearest_ablation_loses_a_sub_cell_defect():
    model = build_model("sofs", channels=D, mask_resize="nearest", pretrained=False)
    mask = torch.zeros(1, 1, 1, 16, 16)
    mask[..., 3, 3] = 1.0
    assert model.downsample_masks(mask, (2, 2)).sum() == 0
    assert build_model("sofs", channels=D, pretrained=False).downsample_masks(mask, (2, 2)).sum() > 0


# ----------------------------------------------------------------------------- priors
E = torch.eye(3)
ROOT2 = 1 / math.sqrt(2)


def hand_support():
    """One shot, 2x2 grid: e1 (mask 1), e2 (mask 0.5), e3 (mask 0), e1+e2 (mask 0)."""
    s = torch.stack([E[0], E[1], E[2], E[0] + E[1]]).T.reshape(1, 1, 3, 2, 2)
    m = torch.tensor([1.0, 0.5, 0.0, 0.0]).view(1, 1, 1, 2, 2)
    return s, m


def hand_query():
    """Query 1x4 grid: e1, e3, -e1, e2."""
    return torch.stack([E[0], E[2], -E[0], E[1]]).T.reshape(1, 3, 1, 4)


def test_priors_on_hand_made_descriptors():
    s, m = hand_support()
    sem, abn = sofs_priors(hand_query(), s, m)
    # semantic: max_j cos(q, s_j m_j); cells with m = 0 are the zero vector (cosine 0)
    torch.testing.assert_close(sem.flatten(), torch.tensor([1.0, 0.0, 0.0, 1.0]))
    # abnormal: 1 - max_j cos(q, s_j)(1 - m_j), (1 - m) = [0, 0.5, 1, 1]
    expected = torch.tensor([1 - ROOT2, 1 - 1.0, 1 - 0.0, 1 - ROOT2])
    torch.testing.assert_close(abn.flatten(), expected)


def test_priors_k_shots_mean_and_max_and_empty_shot():
    s1, m1 = hand_support()
    s2 = torch.stack([E[2], E[2], E[0], E[0]]).T.reshape(1, 1, 3, 2, 2)   # shot 2: e3 on the defect
    m2 = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 2, 2)
    s, m = torch.cat([s1, s2], 1), torch.cat([m1, m2], 1)
    sem, abn = sofs_priors(hand_query(), s, m)
    # semantic per shot: shot 1 [1, 0, 0, 1], shot 2 [0, 1, 0, 0] -> mean over shots
    torch.testing.assert_close(sem.flatten(), torch.tensor([0.5, 0.5, 0.0, 0.5]))
    # abnormal: max over all cells of both shots; shot 2's background is e3, e1, e1 (1 - m = 1)
    torch.testing.assert_close(abn.flatten(), torch.tensor([0.0, 0.0, 1.0, 1 - ROOT2]))
    # a shot with an empty mask does not dilute the semantic prior
    sem_e, _ = sofs_priors(hand_query(), s, torch.cat([m1, torch.zeros_like(m2)], 1))
    torch.testing.assert_close(sem_e.flatten(), torch.tensor([1.0, 0.0, 0.0, 1.0]))


def test_priors_match_the_literal_definition_on_random_features():
    g = torch.Generator().manual_seed(3)
    q, s = torch.randn(2, 6, 3, 4, generator=g), torch.randn(2, 3, 6, 2, 5, generator=g)
    m = torch.rand(2, 3, 1, 2, 5, generator=g) * (torch.rand(2, 3, 1, 2, 5, generator=g) > 0.5)
    sem, abn = sofs_priors(q, s, m)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                qv = q[b, :, i, j]
                per_shot = [max(F.cosine_similarity(qv, (s[b, k] * m[b, k]).flatten(1)[:, t], dim=0, eps=1e-6).item()
                                for t in range(10)) for k in range(3)]
                assert sem[b, 0, i, j].item() == pytest.approx(sum(per_shot) / 3, abs=1e-5)
                best = max(F.cosine_similarity(qv, s[b, k].flatten(1)[:, t], dim=0).item()
                           * (1 - m[b, k].flatten()[t].item()) for k in range(3) for t in range(10))
                assert abn[b, 0, i, j].item() == pytest.approx(1 - best, abs=1e-5)


def test_level_priors_split_channels():
    s, m = hand_support()
    q = hand_query()
    both = level_priors(torch.cat([q, q], 1), torch.cat([s, s], 2), m, (3, 3))
    sem, abn = sofs_priors(q, s, m)
    torch.testing.assert_close(both, torch.cat([sem, abn, sem, abn], 1))
    with pytest.raises(ValueError, match="do not sum"):
        level_priors(q, s, m, (2, 2))


def test_mask_fusion_adds_the_matching_defect_token_only():
    support = torch.stack([E[0], E[1]])[None, None] * 2.0                  # (1, 1, 2, 3): defect e1, background e2
    masks = torch.tensor([[[1.0, 0.0]]])
    query = torch.stack([E[0], E[1]])[None]                               # like the defect, like the background
    out = mask_fusion(query, support, masks, temperature=0.1)
    w = 1 / (1 + math.exp(-10))                                           # softmax weight of the matching token
    torch.testing.assert_close(out[0, 0], E[0] + w * 2.0 * E[0])
    torch.testing.assert_close(out[0, 1], E[1] + (1 - w) * 2.0 * E[0])   # only exp(-10)-small leakage


# ----------------------------------------------------------------------------- anomaly-detection mode
def test_empty_support_masks_give_the_abnormal_prior(net):
    support, masks, query = episode(b=2, k=2)
    masks[1] = 0.0                                                        # episode 1: normal supports only
    with torch.no_grad():
        sf = net.encode(support.flatten(0, 1)).unflatten(0, (2, 2))
        qf = net.encode(query)
        out = net.forward_features(sf, masks, qf, qf.shape[-2:])
        priors = net.priors(sf, net.downsample_masks(masks, sf.shape[-2:]), qf)
        alone = net.forward_features(sf[:1], masks[:1], qf[:1], qf.shape[-2:])
    abnormal = priors[1:, 1::2].mean(1, keepdim=True).clamp(1e-4, 1 - 1e-4)
    torch.testing.assert_close(torch.sigmoid(out[1:]), abnormal, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[:1], alone, rtol=1e-4, atol=1e-4)     # the other episode is untouched
    shifted = build_model("sofs", channels=D, anomaly_threshold=0.3).eval()
    shifted.load_state_dict(net.state_dict())
    with torch.no_grad():
        out3 = shifted.forward_features(sf, masks, qf, qf.shape[-2:])
    assert ((out3[1:] > 0) == (abnormal > 0.3)).all()


def test_anomaly_logits_stay_finite_for_bfloat16_priors(net):
    """In bfloat16 ``1 - 1e-4`` rounds to 1 (an infinite logit): the clamp and the logit run in float32."""
    priors = torch.full((1, 4, 2, 2), 0.99995, dtype=torch.bfloat16)      # rounds to 1.0 in bfloat16
    logits = net.anomaly_logits(priors)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert logits.max().item() == pytest.approx(math.log((1 - 1e-4) / 1e-4), rel=1e-3)


# ----------------------------------------------------------------------------- real data
def test_overfits_a_few_real_images():
    """4 Steel_Pa images at 80x80, episode i -> i+1: 30 Adam steps lift the training IoU above 0.6."""
    images, masks = real_pairs("Steel_Pa", [f"Pa_{i}.png" for i in (1, 2, 3, 4)], 80)
    torch.manual_seed(0)
    model = build_model("sofs", channels=D, num_layers=1).train()
    with torch.no_grad():
        feats = model.encode(images)
    s, q = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0])
    opt = torch.optim.AdamW(model.head_parameters(), lr=3e-3)

    def logits() -> torch.Tensor:
        return model.forward_features(feats[s][:, None], masks[s][:, None], feats[q], (80, 80))

    with torch.no_grad():
        before = iou(model.eval()(images[s][:, None], masks[s][:, None], images[q]), masks[q])
    model.train()
    for _ in range(30):
        loss = segmentation_loss(logits(), masks[q], "dice")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = iou(model.eval().forward_features(feats[s][:, None], masks[s][:, None], feats[q], (80, 80)), masks[q])
    assert after > 0.6 and after > before + 0.2, (before, after)
