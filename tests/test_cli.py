"""What ``lerenet --help`` shows: panels in pipeline order, conventional metavars, an example per command,
``--version``. The real Typer app rendered by Typer's own test runner (no terminal, 80 columns)."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from lerenet.app import package_version
from lerenet.cli import app
from lerenet.help import PANELS, reflow

TYPER_TYPE_DISPLAY = re.compile(r"<(bool|int|float|str|path|list\[[^\]]*\]|int range|float range)>")


def _help(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    return res.output


def _commands(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the click group (``("predict",)``, ``("flow", "training")``, ...)."""
    out = []
    for name, cmd in group.commands.items():
        path = (*prefix, name)
        out.append(path)
        if hasattr(cmd, "commands"):
            out += _commands(cmd, path)
    return out


COMMANDS = _commands(typer.main.get_command(app))


def test_top_level_help_shows_the_panels_in_pipeline_order():
    text = _help()
    titles = re.findall(r"╭─ (.+?) ─", text)
    assert titles == ["Options", *PANELS]
    assert PANELS == ("Data", "Train and evaluate", "Registry", "Inference", "Services and orchestration",
                      "Benchmarks")
    # each command sits in its panel: the panel's box spans from its title to the next one
    boxes = dict(zip(titles, re.split(r"╭─ .+? ─+╮", text)[1:]))
    expected = {"Data": ["ingest", "validate", "split", "import-coco"],
                "Train and evaluate": ["features", "train", "evaluate", "report"],
                "Registry": ["register", "promote"], "Inference": ["predict", "classes"],
                "Services and orchestration": ["serve", "flow", "services"],
                "Benchmarks": ["bench-predict", "bench", "model-info"]}
    for panel, names in expected.items():
        listed = re.findall(r"^│ (\S+) ", boxes[panel], flags=re.M)
        assert listed == names, panel


@pytest.mark.parametrize("path", COMMANDS, ids=" ".join)
def test_help_uses_conventional_metavars_and_shows_an_example(path):
    text = _help(*path)
    assert "<bool>" not in text and TYPER_TYPE_DISPLAY.search(text) is None, text
    assert "Example" in text, text
    example = text.split("Example", 1)[1]
    assert f"lerenet {' '.join(path)}" in example, example


def test_metavars_by_type():
    text = _help("predict")
    row = {m.group(1): m.group(2) for m in re.finditer(r"(--[\w-]+)(?:\s+-\w)?\s+([A-Z]+)?\s", text)}
    assert row["--query"] == "PATH" and row["--out"] == "PATH" and row["--support"] == "TEXT"
    assert row["--shots-limit"] == "INT" and row["--threshold"] == "FLOAT"
    assert re.search(r"--overwrite\s+replace an existing", text)          # a flag shows no value
    assert re.search(r"--progress\s+--no-progress\s+progress bar", text)
    assert "INT [x>=1]" in text                                          # the range still shows


def test_version_option_prints_the_package_version():
    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0
    assert res.output == f"lerenet {package_version()}\n"
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", package_version())


def test_reflow_joins_prose_and_keeps_example_lines():
    text = "First line\n    goes on.\n\n    Longer prose\n    wrapped.\n\n    Example:\n      lerenet a \\\n        --b c\n"
    assert reflow(text) == "First line goes on.\n\nLonger prose wrapped.\n\nExample:\nlerenet a \\\n--b c"
    assert reflow(None) is None and reflow("") == ""
