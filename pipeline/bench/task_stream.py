"""Draw a Dask task stream (what the dashboard's *Task Stream* plot shows) as a PNG with matplotlib.

The live dashboard (``http://127.0.0.1:8787/status``) needs Bokeh, which is not part of the pinned stack;
the scheduler records the same data without it (``distributed.Client.get_task_stream``: per task the
worker, thread and compute start/stop), so the benchmark draws it here: one row per worker thread,
one bar per task, coloured by model, labelled ``f<fold> <model>``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

COLOURS = {"lerenet": "#1f77b4", "baseline": "#ff7f0e", "prototype": "#2ca02c"}


def draw_task_stream(stream: Sequence[Mapping[str, Any]], labels: Mapping[str, str], path: Path,
                     title: str) -> Path:
    """Write the task stream ``stream`` as a PNG at ``path`` (atomically); returns ``path``.

    Args:
        stream: rows ``{"key", "worker", "thread", "start", "stop"}`` (start/stop in epoch seconds).
        labels: Dask key -> ``"fold<f>/<model>"`` (keys without a label are drawn grey, labelled by key).
        path: the PNG (about 1400 x 500 px, a few tens of KB).
        title: figure title.

    Raises:
        ValueError: ``stream`` is empty.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.atomic import atomic_write

    if not stream:
        raise ValueError("empty task stream: nothing to draw")
    t0 = min(r["start"] for r in stream)
    lanes = sorted({(str(r["worker"]), str(r.get("thread"))) for r in stream},
                   key=lambda w: min(r["start"] for r in stream if (str(r["worker"]), str(r.get("thread"))) == w))
    fig, ax = plt.subplots(figsize=(14, 1.2 + 1.1 * len(lanes)), dpi=100)
    for r in stream:
        y = lanes.index((str(r["worker"]), str(r.get("thread"))))
        label = labels.get(str(r["key"]), str(r["key"])[:18])
        model = label.split("/")[-1]
        x0, w = r["start"] - t0, r["stop"] - r["start"]
        ax.broken_barh([(x0, w)], (y - 0.38, 0.76), facecolors=COLOURS.get(model, "#999999"), edgecolor="white")
        if w > 0.04 * max(q["stop"] - t0 for q in stream):
            ax.text(x0 + w / 2, y, label.replace("fold", "f").replace("/", " "), ha="center", va="center",
                    fontsize=9, color="white")
    ax.set_yticks(range(len(lanes)), [f"worker {i + 1}\n{w.split('//')[-1]}" for i, (w, _t) in enumerate(lanes)])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first task started")
    ax.set_xlim(0, max(r["stop"] for r in stream) - t0)
    ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in COLOURS.values()]
    ax.legend(handles, list(COLOURS), loc="upper right", bbox_to_anchor=(1.0, -0.1), ncols=3, fontsize=9, frameon=False)
    ax.set_title(title, fontsize=10, loc="left")
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    finally:
        plt.close(fig)
