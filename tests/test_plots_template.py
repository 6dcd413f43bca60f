"""`dvc plots show`: one color and legend entry per task in the per-epoch charts."""

from __future__ import annotations

import json
import subprocess
import sys

import yaml

from pipeline.config import ROOT, TASKS

TEMPLATE = ROOT / ".dvc" / "plots" / "tasks.json"


def epoch_plots() -> dict[str, dict]:
    """The top-level plots of dvc.yaml drawn from reports/eval/<task>/epochs.csv."""
    out = {}
    for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]:
        if isinstance(entry, dict):
            ((name, spec),) = entry.items()
            if isinstance(spec.get("y"), dict) and all(f.endswith("epochs.csv") for f in spec["y"]):
                out[name] = spec
    return out


def test_every_epoch_plot_uses_the_task_template_and_lists_every_task():
    plots = epoch_plots()
    assert len(plots) == 3
    for name, spec in plots.items():
        assert spec["template"] == "tasks", name
        assert sorted(spec["y"]) == sorted(f"reports/eval/{t}/epochs.csv" for t in TASKS), name


def test_template_colors_by_task_and_dashes_by_revision():
    text = TEMPLATE.read_text()
    assert "<DVC_METRIC_DATA>" in text
    template = json.loads(text)
    assert template["encoding"]["color"]["field"] == "task"
    assert template["layer"][0]["encoding"]["strokeDash"]["field"] == "rev"


def test_dvc_plots_show_fills_the_template_with_every_task():
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    data = json.loads(done.stdout)["data"]
    for name in epoch_plots():
        (plot,) = data[name]
        content = plot["content"]
        assert content["encoding"]["color"]["field"] == "task"
        files = {v["filename"] for v in content["data"]["values"]}
        # The template's expression takes the folder above epochs.csv: the task.
        assert {f.split("/")[-2] for f in files} == set(TASKS), name
