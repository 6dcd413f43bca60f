"""A training stage's fixed cost: what its process spends outside its epochs, before and after.

`python -m benchmarks.train_speed --stage-cost` runs one training stage (default train_task4) on
a small copy of the project, alternately the way it ran before (restored in the child process)
and the way it runs now, each in a fresh process, `--rounds` times each. Before: MLflow's
requirements check scanned every installed package while the model was logged (runner.log_model
as of commit 1325f2e), and Python's garbage collector ran with its default thresholds, its exit
passes included (pipeline.cli as of commit 65ffcbc). Each run's figures come from its timing
file (startup_s: interpreter and imports; seconds: the stage's work; epoch_seconds; log_model_s)
and from this process (wall and CPU seconds of the child). Fixed cost = wall - sum of epochs.

Run as a child: `python -m benchmarks.stage_cost {before,after} STAGE --root ROOT`."""

from __future__ import annotations

import gc
import resource
import runpy
import statistics
import subprocess
import sys
import time
from pathlib import Path

WAYS = ("before", "after")


def log_model_before(run_id: str, model, example) -> str:
    """runner.log_model as it was (MLflow's default format and requirements check)."""
    import mlflow

    from pipeline import cli, tracking

    start = time.perf_counter()
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(
            model, name="model", input_example=example, pip_requirements=tracking.pip_requirements()
        )
    cli.record_timing(log_model_s=round(time.perf_counter() - start, 2))
    return info.model_uri


def child(argv: list[str]) -> None:
    """Run stage `argv[1]` as `python -m` would, the `argv[0]` way; exits with its code."""
    way, stage, *rest = argv
    from pipeline import cli
    from pipeline.training import runner

    logged = log_model_before if way == "before" else runner.log_model
    if way == "before":  # the collector as Python sets it, exit included
        cli.GC_THRESHOLDS, cli.ending = gc.get_threshold(), lambda: None

    def log_model(*args):  # its CPU seconds too: wall seconds mean little on a busy machine
        start = time.process_time()
        try:
            return logged(*args)
        finally:
            cli.record_timing(log_model_cpu_s=round(time.process_time() - start, 2))

    runner.log_model = log_model
    sys.argv = [stage, *rest]
    runpy.run_module(f"pipeline.stages.{stage}", run_name="__main__", alter_sys=True)


def upstream(stage: str) -> list[str]:
    """The training stages of dvc.yaml up to `stage`, in its order, `stage` included."""
    from benchmarks.common import stage_modules

    names = [n for n in stage_modules() if n.startswith("train_")]
    if stage not in names:
        sys.exit(f"train_speed: {stage} is not a training stage of dvc.yaml ({', '.join(names)})")
    return names[: names.index(stage) + 1]


def one_run(way: str, stage: str, root: Path, env: dict) -> dict:
    """One fresh process of `stage` the `way` way: its timing figures, wall and CPU seconds."""
    from benchmarks.common import timing_files

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.stage_cost", way, stage, "--root", str(root)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"train_speed: {stage} ({way}) failed:\n{done.stderr[-3000:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    timing = timing_files(root)[stage]
    task = stage.removeprefix("train_")
    epochs = sum(sum(s) for s in timing[task]["epoch_seconds"].values())
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "startup_s": timing["startup_s"],
        "stage_s": timing["seconds"],
        "epochs_s": epochs,
        "log_model_s": timing["log_model_s"],
        "log_model_cpu_s": timing["log_model_cpu_s"],
        "fixed_s": wall - epochs,
        "in_stage_fixed_s": timing["seconds"] - epochs,
    }


def stage_cost(params: dict, archive: Path, stage: str, rounds: int) -> dict:
    """`stage` before and after, alternating, `rounds` fresh processes each, after the data
    stages and one untimed run of each training stage up to it (the MLflow store's creation
    and its inputs); medians and every run."""
    from benchmarks.common import ROOT, mlflow_env, project_copy, run_module, say
    from benchmarks.stages import DATA_STAGES

    runs = {way: [] for way in WAYS}
    with project_copy(params, archive, "train-speed-cost-") as root:
        env = {**mlflow_env(root.parent), "PYTHONPATH": str(ROOT)}  # benchmarks/ too
        for name in DATA_STAGES:
            say(f"stage cost: {name}")
            run_module(f"pipeline.stages.{name}", root, env)
        for name in upstream(stage):  # untimed: the store's creation, the inputs of `stage`
            say(f"stage cost: {name}, untimed")
            one_run("after", name, root, env)
        for i in range(rounds):
            order = WAYS if i % 2 == 0 else WAYS[::-1]
            for way in order:
                say(f"stage cost: {stage} {way} ({i + 1}/{rounds})")
                runs[way].append(one_run(way, stage, root, env))
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").is_file() else []
    medians = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for w, rs in runs.items()}
    return {"stage": stage, "rounds": rounds, "load": load, "median": medians, "runs": runs}


def report(fig: dict) -> str:
    keys = ("wall_s", "cpu_s", "startup_s", "stage_s", "epochs_s", "log_model_s", "fixed_s")
    keys = (*keys[:6], "log_model_cpu_s", keys[6])
    lines = [
        f"{fig['stage']}: median of {fig['rounds']} fresh process(es) per way, alternating; "
        f"load average at the end {' '.join(fig['load'])}",
        f"{'way':<8}" + "".join(f"{k:>16}" for k in keys),
    ]
    for way, m in fig["median"].items():
        lines.append(f"{way:<8}" + "".join(f"{m[k]:>16.2f}" for k in keys))
    b, a = fig["median"]["before"], fig["median"]["after"]
    lines.append(
        f"fixed cost (wall - epochs): {b['fixed_s']:.2f} s -> {a['fixed_s']:.2f} s; in the stage "
        f"(seconds - epochs, after imports): {b['in_stage_fixed_s']:.2f} s -> "
        f"{a['in_stage_fixed_s']:.2f} s; log_model: {b['log_model_s']:.2f} s -> "
        f"{a['log_model_s']:.2f} s ({b['log_model_cpu_s']:.2f} -> {a['log_model_cpu_s']:.2f} CPU s)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    child(sys.argv[1:])
