"""Stage `gate`: fail when a task's test accuracy regressed.

Compares reports/metrics.json with the minimums in params.yaml (gate.min_test_accuracy) and,
with --baseline REV, with the metrics.json committed at git revision REV (at most
gate.max_drop lower). Prints a table, writes reports/gate.json either way, exits 1 on a
regression.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

from pipeline import cli
from pipeline.config import TASKS, GateParams, Paths, StageError, load
from pipeline.files import write_json

log = logging.getLogger(__name__)
EPS = 1e-9  # an accuracy exactly at its minimum passes, whatever the float rounding
HEADER = ["task", "baseline", "now", "allowed", "verdict"]


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def parse_metrics(text: str, source: str) -> dict:
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as e:
        raise StageError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(metrics, dict):
        raise StageError(f"{source}: not a mapping task -> metrics")
    return metrics


def git(root: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except OSError as e:
        raise StageError(f"cannot run git: {cli.one_line(e)}") from None


def baseline_metrics(paths: Paths, rev: str) -> tuple[str, dict]:
    """(commit, metrics.json) at git revision `rev` of the repository holding the project."""
    done = git(
        paths.root, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"
    )
    if done.returncode != 0:
        why = " ".join(done.stderr.split()) or "no such commit"
        raise StageError(f"--baseline {rev}: {why}")
    commit = done.stdout.strip()
    relative = paths.metrics.relative_to(paths.root).as_posix()
    done = git(paths.root, "show", f"{commit}:./{relative}")  # ./ : relative to the project root
    if done.returncode != 0:
        raise StageError(f"--baseline {rev}: no {relative} in that revision")
    return commit, parse_metrics(done.stdout, f"{relative} at {rev}")


def accuracy(metrics: dict | None, task: str) -> float | None:
    """A task's test accuracy; None when the task (or a numeric test_accuracy) is missing."""
    entry = (metrics or {}).get(task)
    value = entry.get("test_accuracy") if isinstance(entry, dict) else None
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def check_task(now, threshold, baseline, max_drop: float) -> dict:
    """One task's row: the effective minimum is max(threshold, baseline - max_drop)."""
    floor = None if baseline is None else baseline - max_drop
    bounds = [b for b in (threshold, floor) if b is not None]
    allowed = max(bounds) if bounds else None
    reasons = []
    if now is None:
        reasons.append("missing from metrics.json")
    else:
        if threshold is not None and now < threshold - EPS:
            reasons.append("below threshold")
        if floor is not None and now < floor - EPS:
            reasons.append(f"dropped {100 * (baseline - now):.2f} points from baseline")
    verdict = "FAIL: " + "; ".join(reasons) if reasons else "ok"
    return {"baseline": baseline, "now": now, "allowed": allowed, "verdict": verdict,
            "passed": not reasons}  # fmt: skip


def check(metrics: dict, p: GateParams, baseline: dict | None) -> dict:
    """Every task in the thresholds, metrics.json or the baseline, in the pipeline's order."""
    names = set(p.min_test_accuracy) | set(metrics) | set(baseline or {})
    tasks = {}
    for task in [t for t in TASKS if t in names] + sorted(names - set(TASKS)):
        row = check_task(accuracy(metrics, task), p.min_test_accuracy.get(task),
                         accuracy(baseline, task), p.max_drop)  # fmt: skip
        if baseline is not None and row["baseline"] is None:
            row["verdict"] += " (not in baseline: threshold only)"
        tasks[task] = row
    return {"passed": all(r["passed"] for r in tasks.values()), "tasks": tasks}


def table(tasks: dict) -> str:
    """A GitHub Markdown table, padded so that it also reads as plain text."""
    rows = [HEADER] + [
        [task, pct(r["baseline"]), "missing" if r["now"] is None else pct(r["now"]),
         pct(r["allowed"]), r["verdict"]]
        for task, r in tasks.items()
    ]  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), rule, *map(line, rows[1:])])


def append_markdown(path: Path, result: dict, p: GateParams) -> None:
    """The table under a heading, appended (as $GITHUB_STEP_SUMMARY expects)."""
    rev = result["baseline"]
    against = (
        f"Baseline `{rev}` ({result['baseline_commit'][:12]}), at most "
        f"{100 * p.max_drop:.2f} points lower; and the minimums in params.yaml."
        if rev else "The minimums in params.yaml (no baseline)."
    )  # fmt: skip
    heading = f"### Regression gate: {'passed' if result['passed'] else 'FAILED'}"
    try:
        with path.open("a") as f:
            f.write(f"{heading}\n\n{against}\n\n{table(result['tasks'])}\n\n")
    except OSError as e:
        raise StageError(f"--markdown {path}: {e.strerror or cli.one_line(e)}") from None


def gate(paths: Paths, rev: str | None = None, markdown: Path | None = None) -> dict:
    """Check, print the table, write reports/gate.json; raise StageError on a regression."""
    p = load(paths.params, "gate", GateParams)
    metrics = parse_metrics(paths.metrics.read_text(), str(paths.metrics))
    commit, baseline = baseline_metrics(paths, rev) if rev else (None, None)
    result = {**check(metrics, p, baseline), "baseline": rev, "baseline_commit": commit,
              "max_drop": p.max_drop}  # fmt: skip
    print(table(result["tasks"]), flush=True)
    write_json(paths.root / "reports" / "gate.json", result)
    if markdown is not None:
        append_markdown(markdown, result, p)
    failed = [task for task, r in result["tasks"].items() if not r["passed"]]
    if failed:
        raise StageError(f"{len(failed)} task(s) regressed: {', '.join(failed)}")
    log.info("all %d task(s) passed", len(result["tasks"]))
    return result


def main(argv=None) -> int:
    p = cli.parser(
        "gate",
        "Fail (exit 1) when a task's test accuracy is below its minimum in params.yaml or, "
        "with --baseline, more than gate.max_drop below the baseline revision's; print the "
        "table either way.",
        reads="reports/metrics.json, params.yaml (gate.*), reports/metrics.json at the "
        "--baseline git revision",
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
    return cli.run("gate", args, lambda paths: gate(paths, args.baseline, args.markdown))


if __name__ == "__main__":
    sys.exit(main())
