"""The command line shared by every stage: --help, --root, logging, one-line errors, signals."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import textwrap
import time
from pathlib import Path

from pipeline import numerics, signals
from pipeline.config import ROOT, BaseParams, Paths, StageError, load
from pipeline.files import write_json

_timing: dict = {}  # figures a stage adds to its timing file


def record_timing(**figures) -> None:
    """Add figures (e.g. per-epoch seconds) to the stage's reports/timing/<stage>.json."""
    _timing.update(figures)


def interrupted(name: str, e: signals.Interrupted) -> int:
    """The one line a signal gets, and the shell's exit code for it."""
    where = f" in {signals.now_doing()}" if signals.now_doing() else ""
    done = "".join(f"; {c}" for c in e.cleanup)
    print(f"{name}: interrupted ({e}){where}{done}", file=sys.stderr, flush=True)
    return 128 + e.signum


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere): its start-up, imports
    included, when called as the stage's work begins."""
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))


def peak_rss_mib() -> int:
    """The largest resident memory of this process or of any worker it waited for (Linux KiB)."""
    import resource

    kib = max(
        resource.getrusage(who).ru_maxrss
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return round(kib / 1024)


def pin_numerics(paths: Paths) -> None:
    """base.numerics and base.threads, set before the stage's first torch operation."""
    try:
        base = load(paths.params, "base", BaseParams)
    except StageError:
        if paths.params.is_file() and "base" in paths.params.read_text():
            raise
        base = BaseParams()  # no params.yaml or no base section: the stage reports it itself
    numerics.configure(base.numerics, base.threads)


def one_line(e: BaseException) -> str:
    """An exception's text on one line (tarfile's and requests' messages span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def parser(name: str, summary: str, reads: str, writes: str) -> argparse.ArgumentParser:
    def wrap(text: str, head: str = "") -> str:
        return textwrap.fill(text, 88, initial_indent=head, subsequent_indent=" " * len(head))

    p = argparse.ArgumentParser(
        prog=f"python -m pipeline.stages.{name}",
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
    """Pin numerics, call work(Paths); a StageError or a signal becomes one line and an exit code.

    Exit codes: 0 done, 1 a problem to fix (the line says which), 128 + N on signal N (130 for
    Ctrl-C, 143 for SIGTERM).
    """
    main = getattr(sys.modules["__main__"], "__spec__", None)
    own_process = bool(main and main.name == f"pipeline.stages.{name}")  # not a test's main()
    if own_process:
        gc.set_threshold(*GC_THRESHOLDS)
    try:
        return _run(name, args, work, process_age() if own_process else None)
    finally:
        if own_process:
            ending()


# A stage's process holds millions of long-lived objects once torch, MLflow and SQLAlchemy are
# loaded, and each full pass of Python's cyclic garbage collector walks them all: with the
# default thresholds (700, 10, 10) a tiny training stage spent about a quarter of its work in
# the collector. Its own process collects less often (as mypy does); cyclic garbage is still
# freed. docs/speed.md has the figures.
GC_THRESHOLDS = (100_000, 50, 100)


def ending() -> None:
    """The process ends next: no more garbage-collector passes. Python's exit clears every
    module, and each pass of the collector it sets off walks every object left (over a second
    of a training stage's process; docs/speed.md). Exit handlers still run and files still
    flush; what the collector alone would free, the end of the process does."""
    gc.disable()
    gc.freeze()


def _run(name: str, args: argparse.Namespace, work, startup: float | None) -> int:
    """run(), with `startup` the seconds before it in the stage's own process (else None)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{name}: %(message)s"))
    # Our modules only ("__main__" when run with -m); libraries keep their own level.
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 reports
    for logger in map(logging.getLogger, ("pipeline", "__main__")):
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO if main_rank else logging.WARNING)
        logger.propagate = False
    paths, start = Paths(args.root.resolve()), time.perf_counter()
    os.environ["NOTMNIST_STAGE"] = name  # worker processes log under the stage's name
    # No usage reports from MLflow: a stage talks to its tracking store only (and the reporting
    # thread once failed a concurrent call by editing the environment: docs/load.md).
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    _timing.clear()
    try:
        with signals.installed():
            pin_numerics(paths)
            work(paths)
    except StageError as e:
        if signals.received():  # raised on the way out from a signal: the signal is the news
            return interrupted(name, signals.Interrupted(signals.received()))
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except FileNotFoundError as e:  # an input an earlier stage writes
        print(f"{name}: error: missing input {e.filename} (run `dvc repro`)", file=sys.stderr)
        return 1
    except signals.Interrupted as e:
        return interrupted(name, e)
    except Exception:
        if signals.received():  # e.g. a library's clean-up failed under the signal
            return interrupted(name, signals.Interrupted(signals.received()))
        raise
    seconds = round(time.perf_counter() - start, 1)  # after imports: add ~1-4 s of start-up
    timing = {
        "stage": name,
        "seconds": seconds,
        "cpus": os.cpu_count(),
        "peak_rss_mib": peak_rss_mib(),
    }
    if startup is not None:  # before `seconds`: the interpreter, the imports, the parser
        timing["startup_s"] = round(startup, 1)
    if "torch" in sys.modules:  # a stage that computed with torch records its numerics
        timing["numerics"] = numerics.fingerprint()
    timing.update(_timing)
    if main_rank:
        write_json(paths.timing(name), timing)
    return 0
