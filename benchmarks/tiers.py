"""How long the test tiers take: `make test-quick` and `make test`, timed, into a JSON file.

`python -m benchmarks.tiers [--tier quick|full|both] [--json reports/speed/tests.json]`
runs each tier's pytest command (the Makefile's, 2 workers) in a fresh process and records its
wall and CPU seconds, its counts (passed, failed, ...), the cores and the load average before
and after (other work on the machine stretches wall time; CPU seconds much less). An existing
JSON file keeps the tier not run. docs/development.md shows the figures (python -m scripts.docs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTEST = [sys.executable, "-m", "pytest", "-n", "2"]
COMMANDS = {  # as the Makefile runs them
    "quick": [*PYTEST, "-m", "not slow"],
    "full": [*PYTEST, "--dist", "loadfile", "--no-loadscope-reorder"],
}
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def _load_average() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def run_tier(name: str) -> dict:
    """One tier's pytest run: wall and CPU seconds, counts, exit code, load around it."""
    before, start, load_before = (
        resource.getrusage(resource.RUSAGE_CHILDREN),
        time.time(),
        _load_average(),
    )
    done = subprocess.run(COMMANDS[name], cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    counts = {kind.rstrip("s") if kind.startswith("error") else kind: int(n)
              for n, kind in COUNT.findall(summary)}  # fmt: skip
    return {
        "command": " ".join(["python", *COMMANDS[name][1:]]),
        "wall_s": round(wall, 1),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
        "tests": sum(counts.get(k, 0) for k in ("passed", "failed", "skipped", "error")),
        "counts": counts,
        "exit_code": done.returncode,
        "not_passed": [
            line.split(" - ")[0]
            for line in done.stdout.splitlines()
            if line.startswith(("FAILED ", "ERROR "))
        ],
        "cpus": os.cpu_count(),
        "load_before": load_before,
        "load_after": _load_average(),
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime(start)),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tiers", description=__doc__)
    p.add_argument("--tier", choices=("quick", "full", "both"), default="both")
    p.add_argument("--json", type=Path, default=ROOT / "reports" / "speed" / "tests.json")
    args = p.parse_args(argv)
    figures = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for name in ("quick", "full") if args.tier == "both" else (args.tier,):
        print(f"tiers: {name}: {' '.join(COMMANDS[name][1:])}", file=sys.stderr)
        figures[name] = run_tier(name)
        f = figures[name]
        print(f"{name}: {f['tests']} tests in {f['wall_s']} s wall, {f['cpu_s']} CPU s, exit "
              f"{f['exit_code']}, load {f['load_before']} -> {f['load_after']}")  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
