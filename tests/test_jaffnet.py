"""JAFFNet (model/jaffnet.py, model/jaffnet_blocks.py, model/pyramid.py): shapes, gradients,
the support is ignored, the JAFF attention and DRF wiring, a real-data overfit."""

from __future__ import annotations

import pytest
import torch

from _real_pairs import iou, real_pairs
from model import JAFFNet, build_model
from model.backbones import build_backbone
from model.jaffnet_blocks import DRF, JAFF
from model.losses import deep_supervision_loss
from model.pyramid import encoder_pyramid, pyramid_channels

C = 32


def episode(b: int = 2, k: int = 1, h: int = 64, w: int = 80, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    support = torch.rand(b, k, 3, h, w, generator=g)
    masks = torch.zeros(b, k, 1, h, w)
    masks[..., h // 4: h // 2, w // 3: w // 2 + 3] = 1.0
    return support, masks, torch.rand(b, 3, h, w, generator=g)


@pytest.fixture(scope="module")
def nets() -> dict[str, JAFFNet]:
    torch.manual_seed(0)
    return {enc: build_model("jaffnet", channels=C, encoder=enc).eval() for enc in ("pyramid", "features")}


@pytest.mark.parametrize("encoder", ["pyramid", "features"])
@pytest.mark.parametrize("k,h,w", [(1, 64, 80), (5, 64, 80), (1, 67, 81), (5, 33, 47)])
def test_output_shape_any_size(nets, encoder, k, h, w):
    support, masks, query = episode(k=k, h=h, w=w)
    with torch.no_grad():
        out = nets[encoder](support, masks, query)
        sides = nets[encoder].side_logits(nets[encoder].encode(support.flatten(0, 1)).unflatten(0, (2, k)), masks,
                                          nets[encoder].encode(query), (h, w))
    assert out.shape == (2, 1, h, w) and torch.isfinite(out).all()
    assert len(sides) == (4 if encoder == "pyramid" else 2)
    assert all(s.shape == (2, 1, h, w) for s in sides)
    torch.testing.assert_close(sides[0], out)


@pytest.mark.parametrize("encoder", ["pyramid", "features"])
def test_support_is_ignored(nets, encoder):
    net = nets[encoder]
    s1, m1, query = episode(b=2, k=2, seed=1)
    s2, m2, _ = episode(b=2, k=2, seed=2)
    m2 = torch.flip(m2, dims=(-1,)) * 0.0                                  # no defect at all
    with torch.no_grad():
        torch.testing.assert_close(net(s1, m1, query), net(s2, m2, query), rtol=0, atol=0)


def test_pyramid_encode_is_the_image_and_feature_channels(nets):
    x = torch.rand(3, 3, 40, 56)
    assert torch.equal(nets["pyramid"].encode(x), x) and nets["pyramid"].feature_channels == 3
    assert nets["features"].encode(x).shape == (3, 152, 5, 7) and nets["features"].feature_channels == 152
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        nets["pyramid"].encode(x * 255)
    with pytest.raises(ValueError, match="3 channels"):
        nets["pyramid"].encode(torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="encoder"):
        build_model("jaffnet", encoder="vit", pretrained=False)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50", "vgg16_bn"])
def test_encoder_pyramid_levels_and_strides(name):
    backbone = build_backbone(name, pretrained=False).eval()
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        levels = encoder_pyramid(backbone, x)
        shallow, deep = backbone.stages((x - backbone.mean) / backbone.std)
    assert [lv.shape[1] for lv in levels] == list(pyramid_channels(backbone))
    assert [lv.shape[-2:] for lv in levels] == [(32, 48), (16, 24), (8, 12), (4, 6)]
    assert torch.equal(levels[2], shallow) and torch.equal(levels[3], deep)  # the stages of encode


@pytest.mark.parametrize("freeze", [False, True])
def test_gradients_reach_every_trainable_parameter(freeze):
    torch.manual_seed(0)
    net = build_model("jaffnet", channels=C, pretrained=False, freeze_backbone=freeze).train()
    support, masks, query = episode(b=2, k=1, h=48, w=48)
    target = torch.zeros(2, 1, 48, 48)
    target[:, :, 10:30, 12:40] = 1.0
    deep_supervision_loss(net.side_logits(support, masks, query, (48, 48)), target).backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert any(n.startswith("backbone.") for n, _ in trainable) != freeze
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not missing, f"parameters without gradient: {missing}"
    if freeze:
        assert all(p.grad is None for p in net.backbone.parameters()) and not net.backbone.training


def test_jaff_attention_is_the_product_of_channel_and_spatial_maps():
    torch.manual_seed(0)
    jaff = JAFF(low_ch=6, high_ch=8, out_ch=4).eval()
    high = torch.randn(2, 8, 3, 5)
    att, up = jaff.attention(high, (6, 10))
    assert att.shape == (2, 4, 6, 10) and up.shape == (2, 8, 6, 10)
    assert (att > 0).all() and (att < 1).all()
    # rank one per sample: A[c, y, x] = a_c[c] * a_s[y, x]
    a = att[0].flatten(1)
    ratio = a / a[:1]
    torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    # a low-level input is suppressed where the attention is: zero attention -> only the high path fuses
    low = torch.randn(2, 6, 6, 10)
    with torch.no_grad():
        assert not torch.allclose(jaff(low, high), jaff(torch.zeros_like(low), high), atol=1e-3)
        jaff.spatial.bias.fill_(-1e4)                                     # spatial attention -> 0
        no_low = jaff(low, high)
        assert torch.allclose(no_low, jaff(torch.zeros_like(low), high), atol=1e-5)


def test_drf_units_are_densely_connected():
    drf = DRF(in_ch=10, out_ch=4, units=3, rates=(1, 2))
    assert [u.reduce[0].in_channels for u in drf.units] == [10, 14, 18]  # input + all preceding units
    assert drf.out[0].in_channels == 10 + 3 * 4
    assert [b[0].dilation for b in drf.units[0].branches] == [(1, 1), (2, 2)]
    assert drf(torch.randn(2, 10, 7, 9)).shape == (2, 4, 7, 9)


def test_config_rebuilds_the_same_architecture(nets):
    net = nets["pyramid"]
    twin = build_model(**net.config, pretrained=False)
    twin.load_state_dict(net.state_dict(), strict=True)
    support, masks, query = episode()
    with torch.no_grad():
        torch.testing.assert_close(twin.eval()(support, masks, query), net(support, masks, query))


def test_overfits_a_few_real_images():
    """4 Steel_Pa images at 64x64, frozen encoder: 30 Adam steps of the hybrid loss with deep supervision."""
    images, masks = real_pairs("Steel_Pa", [f"Pa_{i}.png" for i in (1, 2, 3, 4)], 64)
    torch.manual_seed(0)
    net = build_model("jaffnet", channels=C).train()                      # frozen backbone (build_model default)
    opt = torch.optim.AdamW(net.head_parameters(), lr=3e-3)
    support, support_masks = images[:1, None], masks[:1, None]            # any support: it is ignored
    for _ in range(30):
        loss = deep_supervision_loss(net.side_logits(support.expand(4, -1, -1, -1, -1),
                                                     support_masks.expand(4, -1, -1, -1, -1), images, (64, 64)), masks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = iou(net.eval()(support.expand(4, -1, -1, -1, -1), support_masks.expand(4, -1, -1, -1, -1), images),
                    masks)
    assert after > 0.6, after
