"""Stage `validate`: check the clean data with Great Expectations; stop the pipeline on failure."""

from __future__ import annotations

import logging
import sys

from pipeline import cli
from pipeline.config import Paths, StageError, ValidateParams, load
from pipeline.data.checks import run_checks

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    args = cli.parser(
        "validate",
        "Check the clean data with Great Expectations suites; exit 1 with one line per "
        "failed expectation, so `dvc repro` stops before training.",
        reads="params.yaml (validate.*), data/clean/, reports/data/rejected.csv",
        writes="reports/validation/summary.json, reports/validation/docs/index.html (Data Docs)",
    ).parse_args(argv)

    def work(paths: Paths) -> None:
        summary = run_checks(paths, load(paths.params, "validate", ValidateParams))
        failed = [e for e in summary["expectations"] if not e["success"]]
        for e in summary["expectations"]:
            verdict = "ok  " if e["success"] else "FAIL"
            log.info("%s %s: observed %s", verdict, e["description"], e["observed"])
        if failed:
            lines = [f"{e['description']} (observed {e['observed']})" for e in failed]
            raise StageError(
                f"{len(failed)} expectation(s) failed "
                f"(Data Docs: {paths.validation_dir}/docs/index.html):\n  " + "\n  ".join(lines)
            )
        log.info("all %d expectations passed", len(summary["expectations"]))

    return cli.run("validate", args, work)


if __name__ == "__main__":
    sys.exit(main())
