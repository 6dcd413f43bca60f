"""The command line shared by every stage: --help, --root, logging, one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
import time
from pathlib import Path

from pipeline.config import ROOT, Paths, StageError
from pipeline.files import write_json


def one_line(e: BaseException) -> str:
    """An exception's text on one line (tarfile's and requests' messages span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def parser(name: str, summary: str, reads: str, writes: str) -> argparse.ArgumentParser:
    def wrap(text: str, head: str = "") -> str:
        return textwrap.fill(text, 88, initial_indent=head, subsequent_indent=" " * len(head))

    p = argparse.ArgumentParser(
        prog=f"python -m pipeline.{name}",
        description=f"{wrap(summary)}\n\n{wrap(reads, 'reads:  ')}\n"
        + wrap(f"{writes}; its run time to reports/timing/{name}.json", "writes: "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="project folder holding params.yaml; inputs and outputs are under it "
        "(default: %(default)s)",
    )
    return p


def run(name: str, args: argparse.Namespace, work) -> int:
    """Call work(Paths) and turn a StageError into one line on stderr and exit code 1."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{name}: %(message)s"))
    # Our modules only ("__main__" when run with -m); libraries keep their own level.
    for logger in map(logging.getLogger, ("pipeline", "__main__")):
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False
    paths, start = Paths(args.root.resolve()), time.perf_counter()
    try:
        work(paths)
    except StageError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:  # an input an earlier stage writes
        print(f"{name}: error: missing input {e.filename} (run `dvc repro`)", file=sys.stderr)
        return 1
    seconds = round(time.perf_counter() - start, 1)  # after imports: add ~2-6 s of start-up
    write_json(paths.timing(name), {"stage": name, "seconds": seconds, "cpus": os.cpu_count()})
    return 0
