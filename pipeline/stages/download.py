"""Stage `download`: fetch the archive from the first source whose content verifies."""

from __future__ import annotations

import logging
import sys

from pipeline import cli
from pipeline.config import DataParams, Paths, load
from pipeline.data.archive import fetch
from pipeline.files import write_json

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    args = cli.parser(
        "download",
        "Fetch the archive of data.variant (notMNIST_small or notMNIST_large) from the first "
        "of its data.sources whose content digest verifies.",
        reads="params.yaml (data.*), the sources it names",
        writes="data/raw/notMNIST.tar.gz, reports/data/download.json",
    ).parse_args(argv)

    def work(paths: Paths) -> None:
        p = load(paths.params, "data", DataParams)
        info = fetch(p, paths.raw_archive, paths.root)
        write_json(paths.data_reports / "download.json", info)

    return cli.run("download", args, work)


if __name__ == "__main__":
    sys.exit(main())
