"""Stage `report`: reports/summary.md, the reproduced numbers beside the original's."""

from __future__ import annotations

import logging
import sys

from pipeline import cli
from pipeline.config import Paths
from pipeline.evaluation.summary import render_summary
from pipeline.files import write_text

log = logging.getLogger(__name__)


def run(paths: Paths) -> None:
    write_text(paths.summary, render_summary(paths))
    log.info("wrote %s", paths.summary.relative_to(paths.root))


def main(argv=None) -> int:
    args = cli.parser(
        "report",
        "Write reports/summary.md: data, sweeps, test results with 95% intervals beside the "
        "original's (and against the seed study's spread, when there is one), links to the "
        "plots, and last the machine, its numerics and the stage times.",
        reads="reports/metrics.json, reports/registry.json, reports/train/<task>/best.json, "
        "reports/data/*, reports/validation/summary.json, reports/timing/*.json, "
        "reports/seeds/seeds.json if present (`make seeds`)",
        writes="reports/summary.md",
    ).parse_args(argv)
    return cli.run("report", args, run)


if __name__ == "__main__":
    sys.exit(main())
