"""``lerenet model-info``: parameters, FLOPs and CPU latency of a model for one episode."""

from __future__ import annotations

import json

import typer

from lerenet.app import app
from lerenet.commands._common import fail
from lerenet.help import PANEL_BENCH


@app.command("model-info", rich_help_panel=PANEL_BENCH)
def model_info(
    model: str = typer.Option("lerenet", "--model", help="lerenet | baseline | prototype | sofs | jaffnet"),
    backbone: str = typer.Option("efficientnet_lite0", "--backbone", help="efficientnet_lite0 | efficientnet_lite2 | resnet50 | vgg16_bn"),
    shots: int = typer.Option(1, "--shots", min=1, help="K support images per episode"),
    size: int = typer.Option(200, "--size", min=16, help="square image side in pixels"),
    variant: str = typer.Option("mpr+mpe*", "--variant", help="LERENet ablation (Table 3)"),
    channels: int | None = typer.Option(
        None, "--channels", min=8,
        help="c of the projected descriptors (lerenet/baseline, default 256), SOFS embedding / JAFFNet decoder "
             "width (default 64); omitted = the model's default"),
    freeze_backbone: bool = typer.Option(True, "--frozen/--fine-tuned", help="frozen or fine-tuned backbone"),
    dilated: bool = typer.Option(False, "--dilated", help="ResNet-50 with output stride 8"),
    latency: bool = typer.Option(False, "--latency", help="also time one episode's forward pass"),
    runs: int = typer.Option(10, "--runs", min=1, help="timed runs for --latency (median reported)"),
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads (0 = torch default)"),
) -> None:
    """Print JSON: total/learnable parameters, FLOPs and MACs (and latency) of one episode.

    ResNet-50 / VGG-16-BN are built with random weights (counts and FLOPs do not depend on
    them); EfficientNet-Lite0 with its packaged ImageNet weights. ``backbone_gflops`` is the
    compute inside the backbone (JAFFNet ignores the support, so only the query is encoded).

    Example:
      lerenet model-info --model lerenet --backbone resnet50 --shots 5 --size 200 --latency
    """
    import torch

    from model import build_model
    from model.profile import episode_flops, episode_latency_ms, parameter_counts

    if threads:
        torch.set_num_threads(threads)
    try:
        net = build_model(model, backbone, freeze_backbone=freeze_backbone,
                          pretrained=backbone.startswith("efficientnet_lite"), variant=variant, channels=channels,
                          dilated=dilated)
    except ValueError as exc:
        fail(str(exc), code=2)
    counts = parameter_counts(net)
    flops = episode_flops(net, shots=shots, size=size)
    out: dict[str, object] = {
        "model": model, "backbone": backbone, "variant": variant if model == "lerenet" else None,
        "channels": net.config.get("channels"), "freeze_backbone": freeze_backbone, "dilated": dilated,
        "shots": shots, "size": size,
        "params_total": counts["total"], "params_learnable": counts["learnable"],
        "params_backbone": counts["backbone"], "params_head": counts["head"],
        "flops": flops["flops"], "macs": flops["macs"],
        "gflops": round(flops["flops"] / 1e9, 3), "gmacs": round(flops["macs"] / 1e9, 3),
        "backbone_gflops": round(flops["backbone_flops"] / 1e9, 3),
        "flop_convention": "torch.utils.flop_counter: 1 multiply-add = 2 FLOPs; macs = flops / 2",
        "torch": torch.__version__,
    }
    if latency:
        lat = episode_latency_ms(net, shots=shots, size=size, runs=runs)
        out.update({"latency_ms_median": round(lat["median_ms"], 2), "latency_ms_min": round(lat["min_ms"], 2),
                    "latency_ms_max": round(lat["max_ms"], 2), "latency_runs": runs,
                    "threads": int(lat["threads"]), "device": "cpu"})
    typer.echo(json.dumps(out, indent=2))
