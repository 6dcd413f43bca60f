"""Stage `robustness`: every task's model on perturbed test images and on letters from fonts.

The work is pipeline.evaluation.perturb's; this module reads params and writes outs.
"""

from __future__ import annotations

import logging
import sys

from pipeline import cli, plots
from pipeline.config import (
    LETTERS,
    TASKS,
    BaseParams,
    Paths,
    RobustnessParams,
    load,
)
from pipeline.evaluation.perturb import (
    conditions,
    find_fonts,
    font_sets,
    load_test_split,
    log_robustness,
    render_fonts,
    robustness_runs,
    sample_rows,
    score_conditions,
)
from pipeline.files import write_json
from pipeline.training.model import load_model as load_model

log = logging.getLogger(__name__)


def run(paths: Paths, tasks=TASKS) -> dict:
    p = load(paths.params, "robustness", RobustnessParams)
    seed = load(paths.params, "base", BaseParams).seed
    client, runs = robustness_runs(paths, tasks)
    models = {t: load_model(paths.models / f"{t}.pt")[0] for t in tasks}
    images, labels = load_test_split(paths)
    sets = [(c, c.apply(images), labels) for c in conditions(p, seed)]
    fonts, skipped = find_fonts(p.system_fonts)
    fonts, font_images, font_labels = render_fonts(fonts, p.font_size)
    sets += font_sets(fonts, font_images, font_labels)
    log.info("%d test conditions, %d fonts (%d files skipped)", len(sets), len(fonts), len(skipped))

    results = score_conditions(models, sets)
    report = {
        "seed": seed,
        "conditions": [
            {"name": c.name, "description": c.description, "images": len(y)} for c, _, y in sets
        ],
        "results": results,
        "fonts": [f.as_dict() for f in fonts],
        "fonts_skipped": skipped,
    }
    write_json(paths.robustness, report)
    names = [c.name for c, _, _ in sets]
    plots.robustness_chart(
        names,
        {t: [100 * results[t][n]["accuracy"] for n in names] for t in tasks},
        paths.plots / "robustness.png",
        f"Accuracy per condition ({len(labels):,} test images; {len(fonts)} fonts x A-J)",
    )
    row_names, grid = sample_rows(sets, fonts, font_images, labels)
    title = "The first test image of each letter per condition; A-J from a few fonts"
    plots.sample_grid(grid, row_names, LETTERS, paths.plots / "robustness_samples.png", title)
    for task in tasks:
        worst = min(names, key=lambda n: results[task][n]["accuracy"])
        log.info(
            "%s: clean %.2f%%, worst %s %.2f%%",
            task,
            100 * results[task]["clean"]["accuracy"],
            worst,
            100 * results[task][worst]["accuracy"],
        )
    log_robustness(client, runs, results, paths)
    return report


def main(argv=None) -> int:
    args = cli.parser(
        "robustness",
        "Score every task's model on the test split under shifts, rotations, scalings, noise "
        "and inverted contrast, and on the letters A-J drawn from the environment's fonts "
        "(matplotlib's, then the system's); log the results to each task's MLflow parent run.",
        reads="models/<task>.pt, data/clean/, data/split/, reports/train/<task>/ (MLflow run "
        "ids), params.yaml (base.seed, robustness.*, mlflow.*), the environment's font files",
        writes="reports/robustness.json, reports/plots/robustness.png, "
        "reports/plots/robustness_samples.png, artifacts and metrics in the MLflow runs",
    ).parse_args(argv)
    return cli.run("robustness", args, run)


if __name__ == "__main__":
    sys.exit(main())
