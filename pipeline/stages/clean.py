"""Stage `clean`: decode every image once, keep the good ones, record why each other file went.

The work is pipeline.data.decode's; this module reads params and writes outs.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from typing import TYPE_CHECKING

from pipeline import cli
from pipeline.config import CleanParams, Paths, load
from pipeline.files import atomic_dir, atomic_file

if TYPE_CHECKING:
    pass
from pipeline.data.decode import REJECTED_COLUMNS, clean_archive, write_csv

log = logging.getLogger(__name__)


def main(argv=None) -> int:
    args = cli.parser(
        "clean",
        "Decode every PNG in the archive once, in clean.workers processes; keep readable "
        "28x28 grayscale images under A..J, reject every other file with a reason.",
        reads="params.yaml (clean.workers), data/raw/notMNIST.tar.gz",
        writes="data/clean/images.npy (N x 28 x 28 uint8), data/clean/index.csv "
        "(path, letter, class_id, sha256), reports/data/rejected.csv (path, reason, detail)",
    ).parse_args(argv)

    def work(paths: Paths) -> None:
        processes = load(paths.params, "clean", CleanParams).processes()
        with atomic_dir(paths.clean_dir) as tmp:
            kept, rejected = clean_archive(paths.raw_archive, tmp, processes)
        with atomic_file(paths.data_reports / "rejected.csv") as tmp:
            write_csv(tmp, REJECTED_COLUMNS, rejected)
        reasons = dict(Counter(reason for _, reason, _ in rejected))
        log.info(
            "kept %d images, rejected %d files %s (%d decoding process%s)",
            kept,
            len(rejected),
            reasons,
            processes,
            "es" * (processes > 1),
        )

    return cli.run("clean", args, work)


if __name__ == "__main__":
    sys.exit(main())
