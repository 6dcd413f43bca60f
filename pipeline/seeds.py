"""The seed study: the task suite once per training seed, as queued DVC experiments.

With --run: queue `dvc exp run --queue -n seed-K -S base.seed=K report` for K = 0..N-1, run
the queue with `dvc queue start -j JOBS`, wait for every experiment, then aggregate. Without it:
aggregate the seed-K experiments of HEAD that already exist. The split has its own seed
(split.seed), so the data stages come from the DVC cache and only training and evaluation rerun.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from pipeline import cli, numerics, plots
from pipeline.config import TASKS, BaseParams, Paths, StageError, load
from pipeline.evaluation import original
from pipeline.files import read_json, write_json, write_text
from pipeline.markdown import table

log = logging.getLogger(__name__)
NAME = "seed-{}"
# Not `gate`: its absolute minimums would fail a low seed's experiment and drop it from the
# distribution the study is measuring.
TARGET = "report"
DATA_STAGES = ("download", "clean", "validate", "split")
PENDING, DONE = ("Queued", "Running"), "Success"
POLL_S = 2  # a poll reads the queue's files in this process: no `dvc` process, no worker asked
MISSING_POLLS = 8  # a task on its way from the queue to a worker is briefly in neither list


def log_dir(paths: Paths) -> Path:
    """Queue and experiment logs: under .dvc/tmp, which git and DVC ignore."""
    return paths.root / ".dvc" / "tmp" / "seeds"


# DVC and git


def _env() -> dict:
    """The stages and the queue's workers run this environment's `python` and `dvc`."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")


def command(root: Path, *args: str, check: bool = True) -> str:
    """Run dvc or git in the project; a failure is one StageError line."""
    try:
        done = subprocess.run(args, cwd=root, env=_env(), capture_output=True, text=True)
    except OSError as e:
        raise StageError(f"cannot run {args[0]}: {cli.one_line(e)}") from None
    if check and done.returncode != 0:
        why = cli.one_line(Exception(done.stderr or done.stdout))
        raise StageError(f"`{' '.join(args)}` failed: {why}")
    return done.stdout


def dvc(root: Path, *args: str, check: bool = True) -> str:
    return command(root, "dvc", *args, check=check)


def queue_tasks(root: Path) -> dict[str, tuple[str, str]]:
    """The DVC queue's tasks as `dvc queue status` lists them: {task id: (name, status)}.

    Read with DVC's own code in this process: the command would start a process per poll and
    ask the workers how they are, which the study does not need.
    """
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            rows = repo.experiments.celery_queue.status()
    except Exception as e:  # DVC's, git's or the queue's own: one line, whichever
        raise StageError(f"cannot read the DVC queue: {cli.one_line(e)}") from None
    return {r["rev"][:7]: (r["name"] or "", r["status"]) for r in rows}


def stages_run(log_text: str) -> list[str]:
    """The stages an experiment's log says it ran, in order."""
    return re.findall(r"^Running stage '([^']+)'", log_text, re.M)


def experiment_revs(shown: list, names) -> dict[str, dict]:
    """From `dvc exp show --json`: {name: {"rev", "seed"}} for the experiments named `names`."""
    out = {}
    for record in shown:
        for exp in record.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") in names and not rev.get("error"):
                    params = rev["data"]["params"]["params.yaml"]["data"]
                    out[rev["name"]] = {"rev": rev["rev"], "seed": params["base"]["seed"]}
    return out


def git_show(root: Path, rev: str, relative: str) -> str:
    return command(root, "git", "show", f"{rev}:./{relative}")  # ./ : from the project root


# Running the study


def queue(paths: Paths, seeds: list[int]) -> dict[str, str]:
    """Queue one experiment per seed, replacing earlier ones of HEAD; -> {task id: name}."""
    root = paths.root
    before = queue_tasks(root)
    waiting = sorted(name for name, state in before.values() if state in PENDING)
    if waiting:
        raise StageError(
            f"the DVC queue already holds {len(waiting)} queued or running experiment(s) "
            f"({', '.join(waiting)}); let them finish or remove them (`dvc queue status`)"
        )
    names = [NAME.format(k) for k in seeds]
    stale = sorted(set(names) & set(dvc(root, "exp", "list", "--name-only").split()))
    if stale:  # names are unique per baseline commit; a rerun of the study replaces them
        log.info("removing earlier experiments %s", ", ".join(stale))
        dvc(root, "exp", "remove", *stale)
    for k, name in zip(seeds, names, strict=True):
        dvc(root, "exp", "run", "--queue", "-n", name, "-S", f"base.seed={k}", TARGET)
    ours = {
        task: name
        for task, (name, _) in queue_tasks(root).items()
        if task not in before and name in names
    }
    if sorted(ours.values()) != sorted(names):
        raise StageError(f"queued {sorted(ours.values())}, expected {names}")
    return ours


def save_logs(paths: Paths, ours: dict[str, str]) -> dict[str, str]:
    """Each experiment's log into .dvc/tmp/seeds/<name>.log; -> {name: log text}."""
    logs = {}
    for task, name in ours.items():
        logs[name] = dvc(paths.root, "queue", "logs", task, check=False)
        (log_dir(paths) / f"{name}.log").write_text(logs[name])
    return logs


def wait(paths: Paths, ours: dict[str, str], timeout_s: float | None) -> None:
    """Until every experiment succeeded; a failure is a StageError naming its log."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    missing = dict.fromkeys(ours, 0)  # polls in a row that did not list the task
    while True:
        rows = queue_tasks(paths.root)
        states = {task: rows.get(task, (name, "missing"))[1] for task, name in ours.items()}
        for task, state in states.items():
            missing[task] = missing[task] + 1 if state == "missing" else 0
            if 0 < missing[task] < MISSING_POLLS:
                states[task] = "Queued"  # look again before calling it lost
        failed = sorted(ours[t] for t, s in states.items() if s not in (*PENDING, DONE))
        if failed:
            logs = save_logs(paths, {t: n for t, n in ours.items() if n in failed})
            last = next((line for line in reversed(logs[failed[0]].splitlines()) if line), "")
            where = log_dir(paths).relative_to(paths.root)
            raise StageError(
                f"seed experiment(s) failed: {', '.join(failed)} (logs in {where}/; "
                f"{failed[0]}: {last.strip()})"
            )
        if all(s == DONE for s in states.values()):
            return
        if deadline is not None and time.monotonic() > deadline:
            raise StageError(
                f"the seed experiments did not finish in {timeout_s:.0f} s "
                "(`dvc queue status`; `dvc queue kill` stops them)"
            )
        time.sleep(POLL_S)


def cancel(paths: Paths, ours: dict[str, str]) -> None:
    """Remove the study's queued experiments and stop its running ones: no hours on a void study."""
    try:
        rows = queue_tasks(paths.root)
    except StageError:  # the error being handled is the one to report
        return
    queued = [t for t in ours if rows.get(t, ("", ""))[1] == "Queued"]
    running = [t for t in ours if rows.get(t, ("", ""))[1] == "Running"]
    if queued:
        dvc(paths.root, "queue", "remove", *queued, check=False)
    if running:
        dvc(paths.root, "queue", "kill", *running, check=False)


def run_study(paths: Paths, seeds: list[int], jobs: int, timeout_s: float | None) -> dict:
    """Queue, run and wait for the seeds' experiments. -> wall time and stages run per seed."""
    log_dir(paths).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    ours = queue(paths, seeds)
    log.info("queued %d experiment(s); running them with %d worker(s)", len(ours), jobs)
    queue_log = log_dir(paths) / "queue.log"
    try:
        # Output to a file, not a pipe: the workers inherit the descriptors and outlive
        # `dvc queue start`, so reading a pipe to its end would wait for them.
        with queue_log.open("w") as out:
            threads = load(paths.params, "base", BaseParams).threads
            env = {**_env(), **numerics.sharing(jobs, threads)}  # the stages run side by side
            done = subprocess.run(
                ["dvc", "queue", "start", "-j", str(jobs)],
                cwd=paths.root,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        if done.returncode != 0:
            raise StageError(f"`dvc queue start` failed: see {queue_log}")
        wait(paths, ours, timeout_s)
    except BaseException:  # a failed seed, the timeout, Ctrl-C: the study is void
        cancel(paths, ours)
        raise
    finally:
        dvc(paths.root, "queue", "stop", check=False)  # idle workers would linger
    seconds = round(time.perf_counter() - start, 1)
    logs = save_logs(paths, ours)
    return {
        "wall_seconds": seconds,
        "jobs": jobs,
        "stages_run": {name: stages_run(text) for name, text in logs.items()},
    }


# Aggregation


def collect(paths: Paths, seeds: list[int], baseline: str) -> tuple[dict, dict]:
    """({seed: metrics.json}, {name: {"rev", "seed"}}) of the seed experiments of `baseline`."""
    names = [NAME.format(k) for k in seeds]
    shown = json.loads(
        dvc(
            paths.root, "exp", "show", "--json", "--rev", baseline, "--hide-queued", "--hide-failed"
        )
    )
    found = experiment_revs(shown, names)
    missing = [n for n in names if n not in found]
    if missing:
        raise StageError(
            f"no experiment {', '.join(missing)} for commit {baseline[:12]} "
            "(`make seeds` runs them; `dvc exp show` lists what exists)"
        )
    per_seed = {}
    for k, name in zip(seeds, names, strict=True):
        if found[name]["seed"] != k:
            raise StageError(f"experiment {name} ran with base.seed={found[name]['seed']}")
        text = git_show(paths.root, found[name]["rev"], "reports/metrics.json")
        per_seed[k] = json.loads(text)
    return per_seed, found


def counts(values) -> dict[str, int]:
    """How often each value occurs, most frequent first (ties: in order of first appearance)."""
    return dict(Counter(str(v) for v in values).most_common())


def summarize_task(task: str, per_seed: dict[int, dict]) -> dict:
    """Mean, sd (n - 1), range and choices of one task over seeds; the original against them."""
    accs = {str(k): m[task]["test_accuracy"] for k, m in per_seed.items()}
    a = np.array(list(accs.values()))
    mean, sd = float(a.mean()), float(a.std(ddof=1))
    unique = np.array([m[task]["test_unique_accuracy"] for m in per_seed.values()])
    t = {
        "accuracies": accs,
        "mean": mean,
        "sd": sd,
        "min": float(a.min()),
        "max": float(a.max()),
        "unique_mean": float(unique.mean()),
        "unique_sd": float(unique.std(ddof=1)),
        "chosen": counts(m[task]["config"]["label"] for m in per_seed.values()),
        "lr": counts(m[task]["config"]["lr"] for m in per_seed.values()),
        "original": original.REPORTED.get(task, {}).get("test_accuracy"),
    }
    theirs = t["original"]
    if theirs is not None:
        t["original_in_range"] = bool(t["min"] <= theirs <= t["max"])
        t["original_within_2sd"] = bool(abs(theirs - mean) <= 2 * sd + 1e-12)
        t["original_z"] = (theirs - mean) / sd if sd > 0 else None
    return t


def summarize(per_seed: dict[int, dict]) -> dict[str, dict]:
    """Every task that all seeds have, in the pipeline's order."""
    if len(per_seed) < 2:
        raise StageError("a seed study needs at least 2 seeds (an sd of one value is undefined)")
    common = set.intersection(*(set(m) for m in per_seed.values()))
    order = [t for t in TASKS if t in common] + sorted(common - set(TASKS))
    return {task: summarize_task(task, per_seed) for task in order}


def pct_plain(x: float) -> str:
    return f"{100 * x:.2f}"


def yes(flag: bool) -> str:
    return "yes" if flag else "**no**"


def sd_factors(n: int) -> tuple[float, float]:
    """The 95% interval of a normal sd from n values, as multiples of the estimate (chi-square)."""
    from scipy.stats import chi2

    df = n - 1
    return float(np.sqrt(df / chi2.ppf(0.975, df))), float(np.sqrt(df / chi2.ppf(0.025, df)))


def study_markdown(study: dict) -> str:
    """seeds.md: the study's table, each seed's accuracies, and how to read the spread."""
    tasks, n = study["tasks"], study["n"]
    seeds = study["seeds"]
    per_seed = [["seed", *tasks]] + [
        [str(k), *(pct_plain(t["accuracies"][str(k)]) for t in tasks.values())] for k in seeds
    ]
    low, high = sd_factors(n)
    wall = study.get("wall_seconds")
    lines = [
        "# Seed study",
        "",
        f"The task suite trained with {n} training seeds (`base.seed` {', '.join(map(str, seeds))})"
        f" on one split (`split.seed` {study['split_seed']}), as DVC experiments "
        f"{NAME.format(seeds[0])} .. {NAME.format(seeds[-1])} of commit "
        f"`{study['baseline_commit'][:12]}`"
        + (" plus uncommitted changes" if study.get("workspace_dirty") else "")
        + ". "
        "Test accuracy in %, on the same test images for every seed.",
        "",
        summary_table(tasks),
        "",
        "## Test accuracy per seed",
        "",
        table(per_seed[0], per_seed[1:]),
        "",
        f"sd is the sample standard deviation (n - 1). With {n} seeds it is itself uncertain: "
        f"its 95% interval runs from {low:.2f} to {high:.2f} times the estimate (chi-square, "
        "normal seeds), so mean +- 2 sd is a rough band. The seeds vary the initialization, "
        "the shuffling and the flips; the 95% Wilson interval in metrics.json covers the other "
        "source of noise, the choice of test images.",
        "",
        "Wall time of the study: "
        + (
            f"{wall:,.0f} s with {study['jobs']} worker(s)."
            if wall is not None
            else "not measured (aggregated from existing experiments)."
        )
        + " "
        + stages_note(study),
        "",
        "![Test accuracy per seed](seeds.png)",
        "",
    ]
    return "\n".join(lines)


def summary_table(tasks: dict) -> str:
    """One row per task: the original, the seeds' mean, spread and range, the choices."""
    header = [
        "task",
        "original",
        "mean +- sd",
        "min",
        "max",
        "original in range",
        "original within mean +- 2 sd",
        "z of original",
        "chosen (seeds)",
        "lr (seeds)",
    ]
    rows = []
    for task, t in tasks.items():
        has = t["original"] is not None
        z = t.get("original_z")
        rows.append(
            [
                task,
                pct_plain(t["original"]) if has else "",
                f"{pct_plain(t['mean'])} +- {pct_plain(t['sd'])}",
                pct_plain(t["min"]),
                pct_plain(t["max"]),
                yes(t["original_in_range"]) if has else "",
                yes(t["original_within_2sd"]) if has else "",
                "" if z is None else f"{z:+.2f}",
                ", ".join(f"{k}: {v}" for k, v in t["chosen"].items()),
                ", ".join(f"{k}: {v}" for k, v in t["lr"].items()),
            ]
        )
    return table(header, rows)


def stages_note(study: dict) -> str:
    ran = study.get("stages_run")
    if not ran:
        return ""
    data = sorted({s for stages in ran.values() for s in stages if s in DATA_STAGES})
    every = sorted({s for stages in ran.values() for s in stages})
    if data:
        return f"Data stages rerun in an experiment: {', '.join(data)}."
    return f"Stages rerun: {', '.join(every)}; the data stages came from the DVC cache."


def previous_run(paths: Paths, found: dict) -> dict:
    """The run record of the existing seeds.json when it describes these same experiments."""
    path = paths.seeds_dir / "seeds.json"
    if not path.is_file():
        return {}
    old = read_json(path)
    same = {n: e.get("rev") for n, e in old.get("experiments", {}).items()} == {
        n: e["rev"] for n, e in found.items()
    }
    return {k: old.get(k) for k in ("wall_seconds", "jobs", "stages_run")} if same else {}


def aggregate(paths: Paths, seeds: list[int], baseline: str, run: dict | None) -> dict:
    """Write reports/seeds/seeds.{json,md,png} from the seeds' experiments."""
    per_seed, found = collect(paths, seeds, baseline)
    run = run or previous_run(paths, found)
    params = git_show(paths.root, baseline, "params.yaml")
    split_seed = (yaml.safe_load(params).get("split") or {}).get("seed", 0)
    dirty = bool(command(paths.root, "git", "status", "--porcelain", "--untracked-files=no"))
    stages = (run.get("stages_run") or {}) if run else {}
    study = {
        "n": len(seeds),
        "seeds": seeds,
        "baseline_commit": baseline,
        "workspace_dirty": dirty,
        "split_seed": split_seed,
        "target": TARGET,
        "wall_seconds": run.get("wall_seconds"),
        "jobs": run.get("jobs"),
        "stages_run": stages or None,
        "experiments": {n: {"rev": e["rev"], "seed": e["seed"]} for n, e in found.items()},
        "tasks": summarize(per_seed),
    }
    out = paths.seeds_dir
    write_json(out / "seeds.json", study)
    write_text(out / "seeds.md", study_markdown(study))
    plots.seed_accuracies(
        study["tasks"], out / "seeds.png", f"Test accuracy over {len(seeds)} training seeds"
    )
    for task, t in study["tasks"].items():
        log.info(
            "%s: %s%% +- %s over %d seeds (min %s, max %s)",
            task,
            pct_plain(t["mean"]),
            pct_plain(t["sd"]),
            len(seeds),
            pct_plain(t["min"]),
            pct_plain(t["max"]),
        )
    return study


def study(paths: Paths, n: int, jobs: int, run: bool, timeout_s: float | None) -> dict:
    if n < 2:
        raise StageError(f"--seeds {n}: need at least 2 seeds")
    if jobs < 1:
        raise StageError(f"--jobs {jobs}: need at least 1 worker")
    seeds = list(range(n))
    # Queued experiments are based on HEAD at queue time: pin it for the aggregation.
    baseline = command(paths.root, "git", "rev-parse", "HEAD").strip()
    record = run_study(paths, seeds, jobs, timeout_s) if run else None
    return aggregate(paths, seeds, baseline, record)


def main(argv=None) -> int:
    p = cli.parser(
        "seeds",
        "The seed study: with --run, queue one DVC experiment per training seed "
        f"(`dvc exp run --queue -n seed-K -S base.seed=K {TARGET}`, K = 0..N-1), run them with "
        "`dvc queue start -j JOBS` and wait; then (or, without --run, from the seed-K "
        "experiments of HEAD that exist) aggregate each task's test accuracy over the seeds.",
        reads="the DVC experiments seed-0..seed-(N-1) of HEAD (params.yaml, reports/metrics.json "
        "in each), pipeline/evaluation/original.py",
        writes="reports/seeds/seeds.json, reports/seeds/seeds.md, reports/seeds/seeds.png, "
        "queue and experiment logs in .dvc/tmp/seeds/",
    )
    p.prog = "python -m pipeline.seeds"  # a command, not a stage
    p.add_argument(
        "--seeds",
        type=int,
        default=5,
        metavar="N",
        help="number of seeds, 0..N-1 (default: %(default)s)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        metavar="J",
        help="queue workers running at once (default: %(default)s)",
    )
    p.add_argument(
        "--run",
        action="store_true",
        help="run the experiments first (else: aggregate existing ones)",
    )
    p.add_argument(
        "--timeout-s",
        type=float,
        default=None,
        metavar="S",
        help="give up when the experiments take longer (default: wait)",
    )
    args = p.parse_args(argv)
    return cli.run(
        "seeds", args, lambda paths: study(paths, args.seeds, args.jobs, args.run, args.timeout_s)
    )


if __name__ == "__main__":
    sys.exit(main())
