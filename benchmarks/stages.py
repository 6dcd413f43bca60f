"""The project's stages, measured as they run: `dvc repro`, a sweep's pool, start-up times."""

from __future__ import annotations

import hashlib
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    ROOT,
    mlflow_env,
    project_copy,
    read_params,
    run_module,
    say,
    stage_modules,
    timing_files,
    write_params,
)
from scripts.docs import ORIGINAL_STAGES as ORIGINAL_STAGES  # data, Tasks 2-5, evaluate, report

STAGE_LINE = re.compile(r"Running stage '([^']+)'")
DATA_STAGES = ("download", "clean", "validate", "split")
SWEEP_OUTPUTS = (
    "models/task2.pt",
    "reports/train/task2/history.csv",
    "reports/train/task2/best.json",
)


def timed_stages(cmd: list[str], cwd: Path, env: dict) -> tuple[dict[str, float], float, int]:
    """Run cmd, echo its output to stderr, time each stage from when its lines arrive.

    A stage runs from its "Running stage 'X'" line to the next stage's line or the end.
    Returns ({stage: seconds}, total seconds, exit code).
    """
    marks, start = [], time.perf_counter()
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            now = time.perf_counter()
            sys.stderr.write(line)
            if m := STAGE_LINE.search(line):
                marks.append((m[1], now))
    end = time.perf_counter()
    ends = [t for _, t in marks[1:]] + [end]
    stages = {name: t_end - t for (name, t), t_end in zip(marks, ends, strict=True)}
    return stages, end - start, proc.returncode


def repro(params: dict, archive: Path) -> dict:
    """`dvc repro --force` on a fresh git + DVC copy of the project fed by `archive`: each
    stage's wall time (start-up included) and its timing file's peak RSS."""
    with project_copy(params, archive, "train-speed-repro-") as root:
        say(f"dvc repro --force in {root}")
        stages, total, code = timed_stages(
            ["dvc", "repro", "--force"], root, mlflow_env(root.parent)
        )
        timings = timing_files(root)
    if code != 0:
        sys.exit(f"train_speed: dvc repro failed with exit code {code}")
    rss = {name: t["peak_rss_mib"] for name, t in timings.items() if "peak_rss_mib" in t}
    return {
        "stages": stages,
        "total_s": total,
        "peak_rss_mib": rss,
        "max_peak_rss_mib": max(rss.values(), default=0),
    }


def repro_report(fig: dict) -> str:
    lines = [f"{'dvc repro --force stage':<24}{'wall s':>10}{'peak RSS MiB':>14}"]
    for name, s in fig["stages"].items():
        rss = fig["peak_rss_mib"].get(name)
        lines.append(f"{name:<24}{s:>10.1f}{'-' if rss is None else rss:>14}")
    lines.append(f"{'total':<24}{fig['total_s']:>10.1f}{fig['max_peak_rss_mib']:>14}  (max)")
    return "\n".join(lines)


# --- the sweep's pool -------------------------------------------------------------------------


def sweep(params: dict, archive: Path, workers=(1, 2)) -> dict:
    """Task 2's stage on a copy of the project (data stages first), once per pool size: its
    wall time, and whether its outputs are the same bytes every time."""
    with project_copy(params, archive, "train-speed-sweep-") as root:
        env = mlflow_env(root.parent)
        for stage in DATA_STAGES:
            say(f"sweep: {stage}")
            run_module(f"pipeline.stages.{stage}", root, env)
        runs = {}
        for w in workers:
            copied = read_params(root / "params.yaml")
            copied["train"]["workers"] = w
            write_params(root, copied)
            say(f"sweep: train_task2 with {w} worker(s)")
            seconds = run_module(
                "pipeline.stages.train_task2", root, mlflow_env(root.parent, f"w{w}")
            )
            timing = timing_files(root)["train_task2"]
            runs[w] = {
                "wall_s": seconds,
                "stage_s": timing["seconds"],
                "peak_rss_mib": timing["peak_rss_mib"],
                "sha256": {
                    p: hashlib.sha256((root / p).read_bytes()).hexdigest() for p in SWEEP_OUTPUTS
                },
            }
    first, *rest = runs.values()
    return {
        "workers": {str(w): r for w, r in runs.items()},
        "speedup": first["wall_s"] / rest[-1]["wall_s"] if rest else 1.0,
        "identical": all(r["sha256"] == first["sha256"] for r in rest),
        "candidates": len(params["task2"]["learning_rates"]),
    }


def sweep_report(fig: dict) -> str:
    lines = [
        f"train_task2 stage ({fig['candidates']} candidates), a fresh process each",
        f"{'workers':<10}{'wall s':>10}{'in-stage s':>12}{'peak RSS MiB':>14}",
    ]
    for w, r in fig["workers"].items():
        lines.append(f"{w:<10}{r['wall_s']:>10.1f}{r['stage_s']:>12.1f}{r['peak_rss_mib']:>14}")
    sizes = list(fig["workers"])
    lines.append(
        f"speed-up {sizes[0]} -> {sizes[-1]} workers: {fig['speedup']:.2f}x; outputs "
        f"({', '.join(SWEEP_OUTPUTS)}) " + ("byte-identical" if fig["identical"] else "DIFFER")
    )
    return "\n".join(lines)


# --- start-up ----------------------------------------------------------------------------------


def import_times(stderr: str) -> tuple[int, dict[str, int]]:
    """`-X importtime` output -> (the sum of the top-level imports' cumulative us, {package: its
    cumulative us} for every package without a dot in its name, at whatever depth it came in)."""
    total, packages = 0, {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line[len("import time:") :].split("|")
        if not name[1:].startswith(" "):  # nested imports are indented under their importer
            total += int(cumulative)
        if "." not in name:
            packages[name.strip()] = int(cumulative)
    return total, packages


def startup_one(cmd: list[str], repeats: int, env: dict) -> dict:
    """Median import time and wall time of `python -X importtime CMD`, over `repeats` runs."""
    imports, walls, tops = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-X", "importtime", *cmd],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        walls.append(time.perf_counter() - start)
        if done.returncode != 0:
            sys.exit(f"train_speed: {' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        total, packages = import_times(done.stderr)
        imports.append(total / 1e6)
        tops.append(packages)
    heaviest = sorted(tops[-1].items(), key=lambda kv: -kv[1])[:5]
    return {
        "import_s": statistics.median(imports),
        "wall_s": statistics.median(walls),
        "heaviest": {name: us / 1e6 for name, us in heaviest},
    }


def startup(repeats: int, env: dict, only=None) -> dict:
    """Per dvc.yaml stage (or those named in `only`): `python -X importtime -m <module>
    --help`; baselines: the bare interpreter and `import torch`."""
    baseline = {
        "python": startup_one(["-c", "pass"], repeats, env),
        "import torch": startup_one(["-c", "import torch"], repeats, env),
        # what every torch stage and worker process does first, before and after: the public
        # switch imports torch._inductor; numerics.apply sets the same flag without it
        "torch, use_deterministic_algorithms": startup_one(
            ["-c", "import torch; torch.use_deterministic_algorithms(True, warn_only=True)"],
            repeats,
            env,
        ),
        "torch, numerics.apply": startup_one(
            ["-c", "import torch; from pipeline import numerics; numerics.apply()"], repeats, env
        ),
    }
    stages = {}
    modules = stage_modules()
    unknown = sorted(set(only or ()) - set(modules))
    if unknown:
        sys.exit(f"train_speed: no stage {unknown[0]} in dvc.yaml ({', '.join(modules)})")
    for name, module in modules.items():
        if only and name not in only:
            continue
        say(f"startup: {name}")
        stages[name] = startup_one(["-m", module, "--help"], repeats, env)
    return {"repeats": repeats, "baseline": baseline, "stages": stages}


def startup_report(fig: dict) -> str:
    lines = [
        f"start-up: median of {fig['repeats']} run(s) of `python -X importtime -m <stage> --help`",
        f"{'stage':<38}{'imports s':>10}{'wall s':>9}  heaviest packages (cumulative s)",
    ]
    rows = [*fig["baseline"].items(), *fig["stages"].items()]
    for name, r in rows:
        heavy = ", ".join(f"{k} {v:.2f}" for k, v in list(r["heaviest"].items())[:3])
        lines.append(f"{name:<38}{r['import_s']:>10.2f}{r['wall_s']:>9.2f}  {heavy}")
    return "\n".join(lines)
