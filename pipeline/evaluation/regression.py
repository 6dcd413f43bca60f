"""The regression gate's checks: minimums and paired tests against a baseline."""

from __future__ import annotations

import io
import json
import logging
import subprocess
from pathlib import Path

import pandas as pd

from pipeline import cli, stats
from pipeline.config import TASKS, GateParams, Paths, StageError, load
from pipeline.files import write_json

log = logging.getLogger(__name__)

EPS = 1e-9  # an accuracy exactly at its minimum passes, whatever the float rounding

HEADER = ["task", "baseline", "now", "b", "c", "p", "allowed", "verdict"]

PREDICTION_KEYS = ["row", "path", "true"]  # what pairs two revisions' predictions


def pct_cell(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def parse_metrics(text: str, source: str) -> dict:
    try:
        metrics = json.loads(text)
    except json.JSONDecodeError as e:
        raise StageError(f"{source}: not valid JSON ({e})") from None
    if not isinstance(metrics, dict):
        raise StageError(f"{source}: not a mapping task -> metrics")
    return metrics


def run_git(root: Path, *args: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    except OSError as e:
        raise StageError(f"cannot run git: {cli.one_line(e)}") from None


def baseline_metrics(paths: Paths, rev: str) -> tuple[str, dict]:
    """(commit, metrics.json) at git revision `rev` of the repository holding the project."""
    done = run_git(
        paths.root, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"
    )
    if done.returncode != 0:
        why = " ".join(done.stderr.split()) or "no such commit"
        raise StageError(f"--baseline {rev}: {why}")
    commit = done.stdout.strip()
    relative = paths.metrics.relative_to(paths.root).as_posix()
    done = run_git(
        paths.root, "show", f"{commit}:./{relative}"
    )  # ./ : relative to the project root
    if done.returncode != 0:
        raise StageError(f"--baseline {rev}: no {relative} in that revision")
    return commit, parse_metrics(done.stdout, f"{relative} at {rev}")


def predictions_path(task: str) -> str:
    return f"reports/eval/{task}/predictions.csv"


def parse_predictions(text: str, source: str) -> pd.DataFrame:
    try:
        table = pd.read_csv(io.StringIO(text), dtype={"path": str, "true": str, "predicted": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise StageError(f"{source}: not a predictions table ({cli.one_line(e)})") from None
    missing = [c for c in [*PREDICTION_KEYS, "predicted"] if c not in table.columns]
    if missing:
        raise StageError(f"{source}: no column {missing[0]!r}")
    return table


def baseline_predictions(paths: Paths, commit: str, task: str) -> pd.DataFrame | None:
    """A task's predictions.csv at `commit`; None when that revision has none (older ones)."""
    relative = predictions_path(task)
    done = run_git(paths.root, "show", f"{commit}:./{relative}")
    if done.returncode != 0:
        return None
    return parse_predictions(done.stdout, f"{relative} at {commit[:12]}")


def current_predictions(paths: Paths, task: str) -> pd.DataFrame | None:
    path = paths.root / predictions_path(task)
    return parse_predictions(path.read_text(), str(path)) if path.is_file() else None


def discordant(old: pd.DataFrame, new: pd.DataFrame, task: str) -> tuple[int, int]:
    """(b, c) over the same test images: b = old right and new wrong, c = old wrong and new right.

    The two tables must list the same test rows with the same paths and letters: a paired test
    on different test images would compare nothing.
    """
    keys_old, keys_new = old[PREDICTION_KEYS], new[PREDICTION_KEYS]
    if len(old) != len(new) or not keys_old.equals(keys_new):
        if len(old) != len(new):
            why = f"{len(old)} test images then, {len(new)} now"
        else:
            i = int((keys_old != keys_new).any(axis=1).to_numpy().argmax())
            then, now = (" ".join(map(str, k.iloc[i].tolist())) for k in (keys_old, keys_new))
            why = f"row, path, letter: {then} then, {now} now"
        raise StageError(
            f"{task}: the test split differs between the baseline and now ({why}); the paired "
            "test needs the same test images (compare with --baseline on the same split)"
        )
    old_ok = (old["true"] == old["predicted"]).to_numpy()
    new_ok = (new["true"] == new["predicted"]).to_numpy()
    return int((old_ok & ~new_ok).sum()), int((~old_ok & new_ok).sum())


def check_consistent(table: pd.DataFrame, acc: float | None, source: str) -> None:
    """predictions.csv and metrics.json come from one evaluate run: their accuracies agree."""
    if acc is None or not len(table):
        return
    from_table = float((table["true"] == table["predicted"]).mean())
    if abs(from_table - acc) > 0.5 / len(table):
        raise StageError(
            f"{source}: accuracy {100 * from_table:.2f}% but metrics.json says "
            f"{100 * acc:.2f}%: not from the same evaluate run (run `dvc repro`)"
        )


def accuracy(metrics: dict | None, task: str) -> float | None:
    """A task's test accuracy; None when the task (or a numeric test_accuracy) is missing."""
    entry = (metrics or {}).get(task)
    value = entry.get("test_accuracy") if isinstance(entry, dict) else None
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def check_task(now, threshold, baseline, max_drop: float, pair=None, alpha: float = 0.05) -> dict:
    """One task's row.

    With `pair` = (b, c), the discordant counts against the baseline: fail when the new model
    is worse (b > c) and McNemar's exact p < alpha; the minimum is the threshold. Without it:
    the minimum is max(threshold, baseline - max_drop).
    """
    b, c = pair if pair is not None else (None, None)
    p = None if pair is None else stats.mcnemar_exact(b, c)
    floor = None if baseline is None or pair is not None else baseline - max_drop
    bounds = [x for x in (threshold, floor) if x is not None]
    allowed = max(bounds) if bounds else None
    reasons = []
    if now is None:
        reasons.append("missing from metrics.json")
    else:
        if threshold is not None and now < threshold - EPS:
            reasons.append("below threshold")
        if floor is not None and now < floor - EPS:
            reasons.append(f"dropped {100 * (baseline - now):.2f} points from baseline")
    if p is not None and b > c and p < alpha:
        reasons.append(f"significantly worse than baseline (p = {p:.2g} < {alpha:g})")
    verdict = "FAIL: " + "; ".join(reasons) if reasons else "ok"
    if not reasons and p is not None and c > b and p < alpha:
        verdict = "ok: significantly better"
    return {
        "baseline": baseline,
        "now": now,
        "b": b,
        "c": c,
        "p": p,
        "allowed": allowed,
        "verdict": verdict,
        "passed": not reasons,
    }


def check_metrics(
    metrics: dict, p: GateParams, baseline: dict | None, pairs: dict | None = None
) -> dict:
    """Every task in the thresholds, metrics.json or the baseline, in the pipeline's order.

    `pairs` maps a task to its (b, c) against the baseline where both revisions have
    per-image predictions; the other tasks of a baseline fall back to gate.max_drop.
    """
    names = set(p.min_test_accuracy) | set(metrics) | set(baseline or {})
    pairs = pairs or {}
    tasks = {}
    for task in [t for t in TASKS if t in names] + sorted(names - set(TASKS)):
        now, then = accuracy(metrics, task), accuracy(baseline, task)
        row = check_task(
            now, p.min_test_accuracy.get(task), then, p.max_drop, pairs.get(task), p.alpha
        )
        row["test"] = None
        if baseline is not None and row["baseline"] is None:
            row["verdict"] += " (not in baseline: threshold only)"
        elif baseline is not None:
            row["test"] = "mcnemar" if task in pairs else "max_drop"
            if task not in pairs:
                row["verdict"] += " (no per-image predictions at baseline: max_drop rule)"
        tasks[task] = row
    return {"passed": all(r["passed"] for r in tasks.values()), "tasks": tasks}


def pair_predictions(paths: Paths, commit: str, metrics: dict, baseline: dict) -> dict:
    """{task: (b, c)} for every task with predictions at `commit` and now."""
    pairs = {}
    for task in [t for t in metrics if t in baseline]:
        old = baseline_predictions(paths, commit, task)
        new = current_predictions(paths, task) if old is not None else None
        if old is None or new is None:
            continue
        check_consistent(old, accuracy(baseline, task), f"{predictions_path(task)} at baseline")
        check_consistent(new, accuracy(metrics, task), predictions_path(task))
        pairs[task] = discordant(old, new, task)
    return pairs


def verdict_table(tasks: dict) -> str:
    """A GitHub Markdown table, padded so that it also reads as plain text."""

    def count(x) -> str:
        return "-" if x is None else str(x)

    rows = [HEADER] + [
        [
            task,
            pct_cell(r["baseline"]),
            "missing" if r["now"] is None else pct_cell(r["now"]),
            count(r.get("b")),
            count(r.get("c")),
            "-" if r.get("p") is None else f"{r['p']:.3g}",
            pct_cell(r["allowed"]),
            r["verdict"],
        ]
        for task, r in tasks.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), rule, *map(line, rows[1:])])


def append_markdown(path: Path, result: dict, p: GateParams) -> None:
    """The table under a heading, appended (as $GITHUB_STEP_SUMMARY expects)."""
    rev = result["baseline"]
    against = (
        f"Baseline `{rev}` ({result['baseline_commit'][:12]}): image by image, McNemar's exact "
        f"test on the test images the two models disagree on (b: baseline right, now wrong; "
        f"c: baseline wrong, now right), failing when now is worse at p < {p.alpha:g}; where "
        f"the baseline has no per-image predictions, at most {100 * p.max_drop:.2f} points "
        "lower. And the minimums in params.yaml."
        if rev
        else "The minimums in params.yaml (no baseline)."
    )
    heading = f"### Regression gate: {'passed' if result['passed'] else 'FAILED'}"
    try:
        with path.open("a") as f:
            f.write(f"{heading}\n\n{against}\n\n{verdict_table(result['tasks'])}\n\n")
    except OSError as e:
        raise StageError(f"--markdown {path}: {e.strerror or cli.one_line(e)}") from None


def run_gate(paths: Paths, rev: str | None = None, markdown: Path | None = None) -> dict:
    """Check, print the table, write reports/gate.json; raise StageError on a regression."""
    p = load(paths.params, "gate", GateParams)
    metrics = parse_metrics(paths.metrics.read_text(), str(paths.metrics))
    commit, baseline = baseline_metrics(paths, rev) if rev else (None, None)
    pairs = pair_predictions(paths, commit, metrics, baseline) if rev else {}
    result = {
        **check_metrics(metrics, p, baseline, pairs),
        "baseline": rev,
        "baseline_commit": commit,
        "max_drop": p.max_drop,
        "alpha": p.alpha,
    }
    print(verdict_table(result["tasks"]), flush=True)
    write_json(paths.root / "reports" / "gate.json", result)
    if markdown is not None:
        append_markdown(markdown, result, p)
    failed = [task for task, r in result["tasks"].items() if not r["passed"]]
    if failed:
        raise StageError(f"{len(failed)} task(s) regressed: {', '.join(failed)}")
    log.info("all %d task(s) passed", len(result["tasks"]))
    return result
