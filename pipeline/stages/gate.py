"""Stage `gate`: fail when a task's test accuracy regressed.

Compares reports/metrics.json with the minimums in params.yaml (gate.min_test_accuracy) and,
with --baseline REV, with the revision REV: image by image where REV committed
reports/eval/<task>/predictions.csv (McNemar's exact test on the pairs the two models disagree
on; worse at level gate.alpha fails), else by accuracy (at most gate.max_drop lower). Prints a
table, writes reports/gate.json either way, exits 1 on a regression.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from pipeline import cli
from pipeline.evaluation.regression import run_gate

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    p = cli.parser(
        "gate",
        "Fail (exit 1) when a task's test accuracy is below its minimum in params.yaml or, "
        "with --baseline, significantly worse than the baseline revision's on the same test "
        "images (McNemar's exact test, p < gate.alpha; more than gate.max_drop lower where "
        "the baseline has no per-image predictions); print the table either way.",
        reads="reports/metrics.json, params.yaml (gate.*); with --baseline also "
        "reports/eval/<task>/predictions.csv, and both files at the baseline git revision",
        writes="reports/gate.json (also on failure)",
    )
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="a git revision (commit, branch, tag) whose reports/metrics.json is the baseline",
    )
    p.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE",
        help="also append the table to FILE as Markdown (e.g. $GITHUB_STEP_SUMMARY)",
    )
    args = p.parse_args(argv)
    return cli.run("gate", args, lambda paths: run_gate(paths, args.baseline, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
