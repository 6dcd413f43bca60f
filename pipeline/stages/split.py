"""Stage `split`: stratified train/val/test assignment of the clean images."""

from __future__ import annotations

import logging
import sys

import pandas as pd

from pipeline import cli
from pipeline.config import LETTERS, Paths, SplitParams, StageError, load
from pipeline.data.splitting import assign, split_report
from pipeline.files import atomic_dir, write_json

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    args = cli.parser(
        "split",
        "Assign each clean image to train, val or test, stratified by letter with split.seed "
        "(its own seed: changing the training seed base.seed keeps the split).",
        reads="params.yaml (split.*), data/clean/index.csv",
        writes="data/split/split.csv (path, letter, split; rows in data/clean order), "
        "reports/data/split.json (counts, duplicate leakage)",
    ).parse_args(argv)

    def work(paths: Paths) -> None:
        p = load(paths.params, "split", SplitParams)
        index = pd.read_csv(paths.clean_dir / "index.csv", dtype={"path": str, "letter": str})
        unknown = set(index["letter"]) - set(LETTERS)
        if unknown:
            raise StageError(f"index.csv has letters outside A..J: {sorted(unknown)}")
        split = assign(index, p, p.seed)
        with atomic_dir(paths.split_dir) as tmp:
            table = index[["path", "letter"]].assign(split=split)
            table.to_csv(tmp / "split.csv", index=False)
        summary = split_report(index, split)
        write_json(paths.data_reports / "split.json", summary)
        log.info(
            "%s; val/test images with an exact copy in train: %s",
            summary["counts"],
            summary["duplicates_in_train"],
        )

    return cli.run("split", args, work)


if __name__ == "__main__":
    sys.exit(main())
