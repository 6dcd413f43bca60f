"""`make verify`: rerun the pipeline from nothing in a clean clone; compare with dvc.lock.

Clones the repository at a revision (default HEAD) beside it, so that relative data sources
(../shared/...) resolve as they do for the project, runs `dvc repro` there with this Python's
environment and an empty DVC cache, and compares every output's hash in the new dvc.lock with
the committed one. Outputs that record when and where a run happened are left out: the
stages' timing files (reports/timing/), the MLflow run records (reports/train/*/mlflow.json,
reports/registry.json) and the summary's closing section on the machine and the stage times
(the rest of the summary is compared). A differing metrics file is shown key by key.

Exit 0 when every output reproduced, 1 when one differs (each is named), 2 on a usage error.
`--in-place` skips the clone and the rerun: it compares the workspace (after your own
`dvc repro --force`) with the revision's dvc.lock and files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from pipeline.config import ROOT
from pipeline.evaluation.summary import MACHINE_SECTION
from pipeline.markdown import table

SUMMARY = "reports/summary.md"


def skipped(path: str) -> bool:
    """Outputs that record a moment or a store, not a result."""
    return (
        path.startswith("reports/timing/")
        or path.endswith("/mlflow.json")
        or path == "reports/registry.json"
    )


def git_output(cwd: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"verify: git {' '.join(args)}: {' '.join(done.stderr.split())}")
    return done.stdout


def lock_outs(text: str) -> dict[str, str]:
    """{out path: md5} over every stage of a dvc.lock."""
    lock = yaml.safe_load(text) or {}
    return {
        o["path"]: o.get("md5", "")
        for stage in lock.get("stages", {}).values()
        for o in stage.get("outs", [])
    }


def flat_keys(obj, prefix: str = "") -> dict[str, object]:
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(flat_keys(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def metric_rows(old_text: str, new_text: str) -> list[list[str]]:
    """[key, committed, rerun, difference] for every metric that changed."""
    old, new = flat_keys(json.loads(old_text)), flat_keys(json.loads(new_text))
    rows = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
        rows.append([key, str(a), str(b), f"{b - a:+.6g}" if numbers else ""])
    return rows


def json_changes(path: str, before: str | None, now: Path) -> list[list[str]]:
    """The changed keys of a JSON output (metrics.json above all), else nothing."""
    if not path.endswith(".json") or before is None or not now.is_file():
        return []
    try:
        return [[f"{path}: {r[0]}", *r[1:]] for r in metric_rows(before, now.read_text())]
    except json.JSONDecodeError:
        return []


def summary_body(text: str) -> str:
    return text.split(MACHINE_SECTION, 1)[0]


def compare(project: Path, rev_lock: str, show, changed=lambda path: []):
    """(differing outputs, metric changes, outputs compared) between a revision and `project`.

    show(path) returns a file's text at the revision (None when it has none); changed(folder)
    the files of a git-tracked folder that differ from the revision.
    """
    old, new = lock_outs(rev_lock), lock_outs((project / "dvc.lock").read_text())
    differ, metrics, compared = [], [], 0
    for path in sorted(set(old) | set(new)):
        if skipped(path):
            continue
        compared += 1
        if path == SUMMARY:
            before, here = show(path), project / path
            now = here.read_text() if here.is_file() else None
            if before is None or now is None or summary_body(before) != summary_body(now):
                differ.append([path, "results part of the summary differs"])
            continue
        if old.get(path) == new.get(path):
            continue
        if path not in new:
            note = "missing from the rerun"
        elif path not in old:
            note = "new in the rerun"
        else:
            note = f"md5 {old[path][:8]} -> {new[path][:8]}"
        differ.append([path, note])
        differ += [[f, "differs"] for f in changed(path) if not skipped(f)]
        metrics += json_changes(path, show(path), project / path)
    return differ, metrics, compared


def verify_report(differ, metrics, compared: int, where: str) -> str:
    if not differ:
        return (
            f"### Reproducibility: all {compared} outputs reproduced\n\n{where}\n\n"
            "Timing files and MLflow run records are not compared.\n"
        )
    text = (
        f"### Reproducibility: {len(differ)} of {compared} outputs differ\n\n{where}\n\n"
        + table(["output", "committed -> rerun"], differ)
        + "\n"
    )
    if metrics:
        text += "\n" + table(["metric", "committed", "rerun", "difference"], metrics) + "\n"
    return text


def rerun(repo: Path, project_rel: Path, rev: str, keep: bool) -> tuple[Path, Path, str]:
    """Clone `rev` beside the repository and run `dvc repro` in it; (clone, project, lock)."""
    clone = Path(tempfile.mkdtemp(prefix=f".{repo.name}-verify-", dir=repo.parent))
    print(f"verify: cloning {rev} into {clone}", file=sys.stderr, flush=True)
    git_output(repo.parent, "clone", "--quiet", "--no-hardlinks", str(repo), str(clone))
    git_output(clone, "checkout", "--quiet", "--detach", rev)
    project = clone / project_rel
    lock = (project / "dvc.lock").read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    print(
        f"verify: dvc repro in {project} (from nothing: an empty DVC cache)",
        file=sys.stderr,
        flush=True,
    )
    done = subprocess.run(["dvc", "repro"], cwd=project, env=env)
    if done.returncode != 0:
        raise SystemExit(
            f"verify: dvc repro failed in {project} (exit {done.returncode})"
            + ("" if keep else "; rerun with --keep to look at it")
        )
    return clone, project, lock


def verify_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.verify",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--rev", default="HEAD", help="the git revision to check (default: HEAD)")
    p.add_argument("--root", type=Path, default=ROOT, help="the project (default: %(default)s)")
    p.add_argument(
        "--in-place",
        action="store_true",
        help="compare the workspace as it is, without a clone or a rerun",
    )
    p.add_argument("--keep", action="store_true", help="keep the clone (it is printed)")
    p.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE",
        help="also append the report to FILE (e.g. $GITHUB_STEP_SUMMARY)",
    )
    return p


def main(argv=None) -> int:
    args = verify_parser().parse_args(argv)
    root = args.root.resolve()
    repo = Path(git_output(root, "rev-parse", "--show-toplevel").strip())
    rel = root.relative_to(repo)
    commit = git_output(repo, "rev-parse", "--verify", f"{args.rev}^{{commit}}").strip()
    clone = None
    try:
        if args.in_place:
            project = root
            lock = git_output(repo, "show", f"{commit}:{(rel / 'dvc.lock').as_posix()}")
            where = f"The workspace against {args.rev} ({commit[:12]})."
        else:
            clone, project, lock = rerun(repo, rel, commit, args.keep)
            where = f"`dvc repro` from nothing in a clean clone of {args.rev} ({commit[:12]})."
        differ, metrics, compared = compare(
            project, lock, committed(repo, rel, commit), changed_since(project, commit)
        )
    finally:
        if clone is not None and not args.keep:
            shutil.rmtree(clone, ignore_errors=True)
    text = verify_report(differ, metrics, compared, where)
    print(text)
    if args.markdown:
        with args.markdown.open("a") as f:
            f.write(text + "\n")
    return 1 if differ else 0


def committed(repo: Path, rel: Path, commit: str):
    """A reader of files as committed: path -> text, or None where the commit has none."""

    def show(path: str) -> str | None:
        done = subprocess.run(
            ["git", "show", f"{commit}:{(rel / path).as_posix()}"],
            cwd=repo,
            capture_output=True,
            text=True,
        )
        return done.stdout if done.returncode == 0 else None

    return show


def changed_since(project: Path, commit: str):
    """A lister of the files under a folder that differ from the commit."""

    def changed(path: str) -> list[str]:
        if not (project / path).is_dir():
            return []
        done = subprocess.run(
            ["git", "diff", "--name-only", "--relative", commit, "--", path],
            cwd=project,
            capture_output=True,
            text=True,
        )
        return done.stdout.split()

    return changed


if __name__ == "__main__":
    sys.exit(main())
