"""Stage `theory`: reports/theory.md, the original's written part (its Part I) checked in code.

Each claim's numbers are computed with PyTorch (float64, seeded) and set beside the original's;
a claim holds when every number it states matches (identities: within TOL).
"""

from __future__ import annotations

import logging
import sys

from pipeline import cli
from pipeline.config import Paths
from pipeline.evaluation.claims import all_claims, render_claims
from pipeline.files import write_text

log = logging.getLogger(__name__)


def run(paths: Paths) -> None:
    out = paths.root / "reports" / "theory.md"
    write_text(out, render_claims(all_claims()))
    log.info("wrote %s", out.relative_to(paths.root))


def main(argv=None) -> int:
    args = cli.parser(
        "theory",
        "Write reports/theory.md: the original's written claims (linear collapse, a conv and "
        "max-pool's shapes and FLOPs, LeNet-5's parameters, the sigmoid and tanh identities) "
        "beside what PyTorch computes, each marked holds or differs.",
        reads="nothing (it computes everything)",
        writes="reports/theory.md",
    ).parse_args(argv)
    return cli.run("theory", args, run)


if __name__ == "__main__":
    sys.exit(main())
