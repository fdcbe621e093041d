"""``lerenet model-info``: JSON with parameter counts, FLOPs/MACs and optional latency."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lerenet.cli import app
from model import build_model
from model.profile import episode_flops, parameter_counts


def _invoke(*args: str) -> dict:
    result = CliRunner().invoke(app, ["model-info", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_model_info_resnet50_counts_and_flops():
    out = _invoke("--model", "lerenet", "--backbone", "resnet50", "--shots", "1", "--size", "64")
    net = build_model("lerenet", "resnet50", pretrained=False)
    counts = parameter_counts(net)
    assert out["params_total"] == counts["total"] == counts["backbone"] + counts["head"]
    assert out["params_learnable"] == out["params_head"] == counts["head"]  # frozen backbone
    assert out["params_backbone"] == 8_543_296  # torchvision resnet50 conv1 + layer1-3
    assert out["macs"] == out["flops"] // 2 and out["flops"] > out["backbone_gflops"] * 1e9 > 0
    assert "latency_ms_median" not in out


def test_model_info_fine_tuned_latency_and_shots():
    out = _invoke("--model", "prototype", "--backbone", "efficientnet_lite0", "--fine-tuned", "--size", "48",
                  "--shots", "2", "--latency", "--runs", "1")
    assert out["params_learnable"] == out["params_total"]
    assert out["latency_runs"] == 1 and out["latency_ms_median"] > 0
    net = build_model("prototype", "efficientnet_lite0")
    assert out["flops"] == episode_flops(net, shots=2, size=48)["flops"]
    # the prototype model has no head compute: all FLOPs are the 3 image encodings
    assert out["flops"] == episode_flops(net, shots=2, size=48)["backbone_flops"]


def test_model_info_rejects_unknown_model():
    result = CliRunner().invoke(app, ["model-info", "--model", "pfenet"])
    assert result.exit_code == 2
    assert "valid models: lerenet, baseline, prototype" in result.output


def test_model_info_sofs_and_jaffnet():
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from model.pyramid import encoder_pyramid

    sofs = _invoke("--model", "sofs", "--size", "64")
    net = build_model("sofs", "efficientnet_lite0")
    assert sofs["channels"] == 64 and sofs["variant"] is None            # the model's own default width
    assert sofs["params_head"] == sum(p.numel() for p in net.head_parameters()) == sofs["params_learnable"]
    lerenet = _invoke("--model", "lerenet", "--size", "64")
    assert lerenet["backbone_gflops"] == sofs["backbone_gflops"] > 0      # both encode support + query
    one = _invoke("--model", "jaffnet", "--size", "64", "--fine-tuned")
    five = _invoke("--model", "jaffnet", "--size", "64", "--fine-tuned", "--shots", "5")
    assert one["flops"] == five["flops"]                                 # the support is never used
    assert one["params_learnable"] == one["params_total"]
    jaff = build_model("jaffnet", "efficientnet_lite0")
    with torch.no_grad(), FlopCounterMode(display=False) as enc:
        encoder_pyramid(jaff.backbone, torch.rand(1, 3, 64, 64))
    assert one["backbone_gflops"] == round(enc.get_total_flops() / 1e9, 3) > 0
    assert episode_flops(jaff, shots=1, size=64)["backbone_flops"] == enc.get_total_flops()
