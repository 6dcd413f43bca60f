"""How do the data stages and a training epoch grow with the data? Measured on synthetic archives.

notMNIST_large (about 529,000 images) cannot be downloaded here, so for each size N this builds
a deterministic archive of N images from the mirror: every clean image of the mirror, then
copies of them rolled by a different (dy, dx) offset per copy and re-encoded as PNG, so every
file is distinct and valid (letters interleaved, so any N is balanced), plus one truncated PNG
per --broken-every images, as notMNIST_large holds unreadable files. On each archive it runs,
each in its own process on a scratch project (data.variant large, sourced from the archive):

  download  (a local source: copy and content digest)
  clean     with clean.workers 1 and 2 (in turn: 1 first in odd rounds, 2 first in even ones)
  validate  (max_rejected and max_label_conflicts as fractions)
  split     (train 0.8, val 0.1)
  epoch     one epoch of the Task 2 model: pipeline.training.loop.fit with max_epochs 1 on the split

--repeats times over (default 5; the stages in turn, so that a slow spell of the machine
falls on different stages), and records per stage and N: wall seconds of the process (start-up
included; the run of median seconds), images per second, and peak resident memory (the
stage's processes together, sampled every 50 ms, or the kernel's peak for its largest process,
whichever is higher; the highest of the runs). It fits seconds = a*N + b and
memory = c*N + d per stage, projects both to 529,000 images, checks the goals (time linear in
N; projected peak memory under 4 GB in every stage; clean with 2 processes at least 1.7x as
fast as with 1, at the largest N: the median over rounds of each round's ratio, as the two
runs of a round are next to each other in time) and writes scale.md (tables), scale.json
and scale.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import yaml
from PIL import Image

from pipeline.config import LETTERS, ROOT, DataParams, load

LARGE = 529_000  # notMNIST_large, roughly
GOAL_RSS_MIB = 4e9 / 2**20  # 4 GB
GOAL_SPEEDUP = 1.7
LINEAR_SLACK = 1.25  # the largest size's seconds within 1.25x of the line through the others
SIZES = (20_000, 100_000, 250_000)
QUICK_SIZES = (300, 600)
SHIFT = 3  # copies are rolled by up to 3 pixels each way: 48 offsets besides (0, 0)
OFFSETS = sorted(
    ((dy, dx) for dy in range(-SHIFT, SHIFT + 1) for dx in range(-SHIFT, SHIFT + 1)),
    key=lambda o: (abs(o[0]) + abs(o[1]), o),
)
STAGES = ("download", "clean_1", "clean_2", "validate", "split", "epoch")
SAMPLE_S = 0.05


def say(message: str) -> None:
    print(f"scale: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- synthetic archives


def mirror_archive(params_file: Path) -> Path:
    """The first local source of the small variant in params.yaml that exists."""
    data = load(params_file, "data", DataParams)
    for source in data.sources:
        url = urlparse(source)
        if url.scheme not in ("", "file"):
            continue
        path = Path(unquote(url.path) if url.scheme else source)
        path = path if path.is_absolute() else params_file.parent / path
        if path.is_file():
            return path.resolve()
    sys.exit(f"scale: no local archive among data.sources {data.sources} (use --mirror)")


def base_images(mirror: Path) -> tuple[np.ndarray, list[str], list[str]]:
    """(images, letters, file stems) of the mirror's clean images, letters interleaved
    (A0 B0 ... J0 A1 B1 ...), so every prefix of the synthetic archive is balanced."""
    from pipeline.data import decode

    images, index, _ = decode.scan(mirror)
    by_letter = [np.flatnonzero(index["letter"].to_numpy() == c) for c in LETTERS]
    order = [
        rows[j] for j in range(max(map(len, by_letter))) for rows in by_letter if j < len(rows)
    ]
    paths = index["path"].to_numpy()[order]
    stems = [Path(p).stem for p in paths]
    return images[order], list(index["letter"].to_numpy()[order]), stems


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")  # uint8, 2-D: mode L
    return buf.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed owner, mode and time: the same bytes every run
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def synthesize(base: tuple, n: int, broken_every: int, dest: Path) -> dict:
    """Write an archive of n images (plus n // broken_every truncated files) to dest."""
    images, letters, stems = base
    copies = -(-n // len(images))
    if copies > len(OFFSETS):
        sys.exit(f"scale: {n} images need {copies} copies of {len(images)}; at most {len(OFFSETS)}")
    broken = 0
    tmp = dest.with_name(f".{dest.name}.tmp")
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as gz:
        with tarfile.open(fileobj=gz, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for j in range(n):
                i, k = j % len(images), j // len(images)
                pixels = np.roll(images[i], OFFSETS[k], axis=(0, 1))
                data = png(pixels)
                add(tar, f"notMNIST_large/{letters[i]}/{stems[i]}_{k:02d}.png", data)
                if (j + 1) % broken_every == 0:
                    name = f"notMNIST_large/{letters[i]}/broken{j:07d}.png"
                    add(tar, name, data[: len(data) // 2])
                    broken += 1
    tmp.replace(dest)
    return {"images": n, "broken": broken, "bytes": dest.stat().st_size}


# --------------------------------------------------------------------------- measuring a process


# A process's peak resident size (ru_maxrss) starts at the size of the process it was forked
# from: the kernel carries the old memory's high-water mark across exec. So each stage starts
# from this small launcher (about 10 MiB), which reports the stage's own peak and CPU time.
LAUNCHER = """
import json, os, sys

pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    json.dump({"maxrss_kib": usage.ru_maxrss, "cpu_s": usage.ru_utime + usage.ru_stime}, f)
sys.exit(os.waitstatus_to_exitcode(status))
"""


def descendants(pid: int) -> dict[int, tuple[int, float]]:
    """(resident bytes, CPU seconds so far) of each descendant of a process, from /proc."""
    children: dict[int, list[int]] = {}
    stats: dict[int, tuple[int, float]] = {}
    page, tick = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_CLK_TCK")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
            fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
            p = int(entry.name)
            children.setdefault(int(fields[1]), []).append(p)
            stats[p] = (int(fields[21]) * page, (int(fields[11]) + int(fields[12])) / tick)
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    out, todo = {}, list(children.get(pid, []))
    while todo:
        p = todo.pop()
        if p in stats:
            out[p] = stats[p]
        todo += children.get(p, [])
    return out


RSS_KINDS = ("RssAnon", "RssFile")  # /proc/PID/status: the heap and such; mapped files


def resident_kinds(pids) -> dict[str, int]:
    """Bytes of anonymous and of file-backed resident memory, summed over processes."""
    out = dict.fromkeys(RSS_KINDS, 0)
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in out:
                        out[key] += int(value.split()[0]) * 1024
        except (OSError, ValueError):  # gone meanwhile
            continue
    return out


def measure(cmd: list[str], log: Path, env: dict) -> dict:
    """Run cmd; its wall seconds, CPU seconds (all its processes, and the busiest one) and
    peak memory: its processes' resident sizes summed and sampled every SAMPLE_S, or the
    kernel's peak for the largest of them, whichever is higher."""
    usage_file = log.with_suffix(".usage.json")
    start = time.perf_counter()
    with open(log, "wb") as out:
        launcher = [sys.executable, "-c", LAUNCHER, str(usage_file), *cmd]
        proc = subprocess.Popen(launcher, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
        sampled, cpu, kinds = 0, {}, dict.fromkeys(RSS_KINDS, 0)
        while proc.poll() is None:
            seen = descendants(proc.pid)
            sampled = max(sampled, sum(rss for rss, _ in seen.values()))
            for kind, size in resident_kinds(seen).items():
                kinds[kind] = max(kinds[kind], size)
            cpu.update({p: c for p, (_, c) in seen.items()})  # the last reading before exit
            time.sleep(SAMPLE_S)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        sys.exit(f"scale: {' '.join(map(str, cmd))} failed:\n" + "\n".join(tail))
    usage = json.loads(usage_file.read_text())
    largest = usage["maxrss_kib"] * 1024  # KiB on Linux
    return {
        "seconds": seconds,
        "peak_rss_mib": max(sampled, largest) / 2**20,
        "sampled_rss_mib": sampled / 2**20,
        "largest_process_rss_mib": largest / 2**20,
        "anon_rss_mib": kinds["RssAnon"] / 2**20,  # of the sampled sum: the heap and such
        "file_rss_mib": kinds["RssFile"] / 2**20,  # mapped files: libraries, memory-mapped data
        "cpu_s": usage["cpu_s"],  # exact: the kernel's count for the stage and its helpers
        "busiest_process_cpu_s": max(cpu.values(), default=0.0),  # sampled, to 50 ms
        "processes": len(cpu),
    }


# --------------------------------------------------------------------------- one size


def scratch_params(root: Path, archive: Path, workers: int, broken_every: int) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    data = params["data"]
    data["variant"] = "large"
    data["sources"] = {**data["sources"], "large": [str(archive)]}
    data["content_digest"] = {**data["content_digest"], "large": None}
    params["clean"] = {"workers": workers}
    # Room for twice the truncated files put in; the mirror's two conflicting images recur
    # once per copy (at most 49 copies, 0.1% of any N here).
    max_rejected = min(0.5, 2 / broken_every)
    params["validate"].update(max_rejected=max_rejected, max_label_conflicts=0.001)
    params["split"].update(train_size=0.8, val_size=0.1, group_duplicates=False)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage_seconds(root: Path, stage: str) -> float | None:
    path = root / "reports" / "timing" / f"{stage}.json"
    return json.loads(path.read_text())["seconds"] if path.exists() else None


def typical(tries: list[dict]) -> dict:
    """One stage's figures from its runs: the run of median seconds, with every run's seconds,
    CPU seconds and peak memory, and the highest peak memory of them all."""
    fig = dict(sorted(tries, key=lambda f: f["seconds"])[(len(tries) - 1) // 2])
    fig["tries_seconds"] = [f["seconds"] for f in tries]
    fig["tries_cpu_s"] = [f["cpu_s"] for f in tries]
    for key in ("peak_rss_mib", "sampled_rss_mib", "largest_process_rss_mib", "anon_rss_mib"):
        if all(key in f for f in tries):
            fig[f"tries_{key}"] = [f[key] for f in tries]
    fig["peak_rss_mib"] = max(f["peak_rss_mib"] for f in tries)
    return fig


def round_order(attempt: int) -> tuple[str, ...]:
    """The stages of round `attempt` (from 1): clean_2 before clean_1 in even rounds, so that a
    machine slowing down or speeding up over a round favours neither."""
    if attempt % 2:
        return STAGES
    swap = {"clean_1": "clean_2", "clean_2": "clean_1"}
    return tuple(swap.get(s, s) for s in STAGES)


def run_size(
    n: int, archive: Path, work: Path, hidden: int, broken_every: int, repeats: int = 1
) -> dict:
    """Every stage on one archive, each in its own process, `repeats` times over in turn;
    figures per stage (typical)."""
    root = work / f"project-{n}"
    root.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("MLFLOW_TRACKING_URI", None)  # no stage here logs to MLflow
    python = [sys.executable]
    tries = {stage: [] for stage in STAGES}
    for attempt, stage in ((a, s) for a in range(1, repeats + 1) for s in round_order(a)):
        workers = 2 if stage == "clean_2" else 1
        scratch_params(root, archive, workers, broken_every)
        if stage == "epoch":
            cmd = [
                *python,
                "-m",
                "benchmarks.scale",  # from the project root (measure's cwd)
                "--epoch",
                str(root),
                "--hidden",
                str(hidden),
            ]
        else:
            cmd = [*python, "-m", f"pipeline.stages.{stage.split('_')[0]}", "--root", str(root)]
        say(f"N={n:,}: {stage} ({attempt} of {repeats})")
        fig = measure(cmd, root / f"{stage}.log", env)
        if stage == "epoch":
            fig.update(json.loads((root / "epoch.json").read_text()))
        else:
            fig["stage_seconds"] = stage_seconds(root, stage.split("_")[0])
        fig["images_per_s"] = n / fig["seconds"]
        tries[stage].append(fig)
        say(
            f"N={n:,}: {stage}: {fig['seconds']:.1f} s, {fig['images_per_s']:,.0f} images/s, "
            f"peak {fig['peak_rss_mib']:,.0f} MiB"
        )
    figures = {stage: typical(runs) for stage, runs in tries.items()}
    index = root / "data" / "clean" / "index.csv"
    figures["clean_images"] = sum(1 for _ in open(index)) - 1
    figures["rejected"] = sum(1 for _ in open(root / "reports" / "data" / "rejected.csv")) - 1
    split = json.loads((root / "reports" / "data" / "split.json").read_text())
    figures["split"]["counts"] = split["counts"]
    return figures


def epoch(root: Path, hidden: int) -> None:
    """One epoch of the Task 2 model on root's split (run in its own process)."""
    import torch

    from pipeline import numerics
    from pipeline.config import BaseParams, Paths, Task2Params, TrainParams
    from pipeline.training.loop import fit, load_splits, set_seed
    from pipeline.training.model import ModelConfig, build

    paths = Paths(root)
    p = dataclasses.replace(load(paths.params, "train", TrainParams), max_epochs=1)
    seed = load(paths.params, "base", BaseParams).seed
    lr = load(paths.params, "task2", Task2Params).learning_rates[0]
    numerics.deterministic()
    start = time.perf_counter()
    data = load_splits(paths, torch.device("cpu"))
    loaded = time.perf_counter()
    set_seed(seed)
    cfg = ModelConfig(
        hidden=(hidden,), input_channels=p.input_channels, softmax_output=p.softmax_output
    )
    result = fit(build(cfg), data, p, lr, seed, label="scale")
    done = time.perf_counter()
    out = {
        "load_s": loaded - start,
        "fit_s": done - loaded,
        "train_images": len(data["train"]),
        "train_images_per_s": len(data["train"]) / (done - loaded),
        "train_loss": result.history[-1]["train_loss"],
        "threads": torch.get_num_threads(),
    }
    (root / "epoch.json").write_text(json.dumps(out, indent=2) + "\n")


# --------------------------------------------------------------------------- fits and goals


def fit_line(x: list[float], y: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept)."""
    slope, intercept = np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)
    return float(slope), float(intercept)


def line_growth(sizes: list[int], values: list[float]) -> float | None:
    """The largest size's value over the straight line through the two sizes before it,
    extended to it (flat if it falls): 1 for linear (or constant) growth, more when growth
    speeds up. None for two sizes (nothing to extend). A start-up cost does not move it, unlike
    a ratio of per-image slopes, which a stage dominated by its start-up (a first slope near 0)
    fails."""
    if len(sizes) < 3:
        return None
    (n0, n1, n2), (v0, v1, v2) = sizes[-3:], values[-3:]
    # Seconds do not fall as data grows: a falling line is the noise of a stage that its
    # start-up dominates, and extended it would call noise growth. Such a line is taken flat.
    line = v1 + max(0.0, (v1 - v0) / (n1 - n0)) * (n2 - n1)
    return v2 / line if line > 0 else float("inf")


def analyse(sizes: list[int], runs: dict[int, dict]) -> dict:
    """Per stage: the fits, the projection to LARGE, and the goals."""
    out = {}
    for stage in STAGES:
        seconds = [runs[n][stage]["seconds"] for n in sizes]
        cpu = [runs[n][stage]["cpu_s"] for n in sizes]
        rss = [runs[n][stage]["peak_rss_mib"] for n in sizes]
        a, b = fit_line(sizes, seconds)
        c, d = fit_line(sizes, rss)
        growth, cpu_growth = line_growth(sizes, seconds), line_growth(sizes, cpu)
        projected_s = a * LARGE + b
        projected_rss = c * LARGE + d
        out[stage] = {
            "seconds_per_image": a,
            "seconds_fixed": b,
            "mib_per_image": c,
            "mib_fixed": d,
            "line_growth": growth,
            "cpu_seconds_per_image": fit_line(sizes, cpu)[0],
            "cpu_line_growth": cpu_growth,
            "cpu_linear": None if cpu_growth is None else cpu_growth <= LINEAR_SLACK,
            "projected_seconds": projected_s,
            "projected_images_per_s": LARGE / projected_s if projected_s > 0 else None,
            "projected_peak_rss_mib": projected_rss,
            "linear": None if growth is None else growth <= LINEAR_SLACK,
            "rss_under_goal": projected_rss < GOAL_RSS_MIB,
        }
    largest = sizes[-1]
    one, two = runs[largest]["clean_1"], runs[largest]["clean_2"]
    of_medians = one["seconds"] / two["seconds"]
    per_try = [a / b for a, b in zip(one["tries_seconds"], two["tries_seconds"], strict=True)]
    speedup = float(np.median(per_try))  # each round's two runs are next to each other
    # With a core per process and no waiting, 2 processes take as long as the busier one (or
    # half the total): a bound that other load on the machine does not move.
    bound = one["cpu_s"] / max(two["busiest_process_cpu_s"], two["cpu_s"] / 2)
    stage_speedup = None
    s1, s2 = (runs[largest][s].get("stage_seconds") for s in ("clean_1", "clean_2"))
    if s1 and s2:
        stage_speedup = s1 / s2
    return {
        "stages": out,
        "clean_speedup": speedup,
        "clean_speedup_per_try": per_try,
        "clean_speedup_of_medians": of_medians,
        "clean_speedup_after_startup": stage_speedup,
        "clean_speedup_cpu_bound": bound,
        "goals": {
            "time_linear": None if len(sizes) < 3 else all(s["linear"] for s in out.values()),
            "cpu_time_linear": (
                None if len(sizes) < 3 else all(s["cpu_linear"] for s in out.values())
            ),
            "rss_under_4gb_at_529k": all(s["rss_under_goal"] for s in out.values()),
            "clean_2_processes_1_7x": speedup >= GOAL_SPEEDUP,
        },
    }


# --------------------------------------------------------------------------- outputs


def yes(ok: bool | None) -> str:
    return "n/a" if ok is None else "yes" if ok else "**no**"


def growth(ratio: float | None) -> str:
    return "n/a (two sizes)" if ratio is None else f"{ratio:.2f}x"


def markdown(result: dict) -> str:
    sizes, runs, fits = result["sizes"], result["runs"], result["analysis"]
    m = result["machine"]
    lines = [
        "# Data stages and one training epoch against archive size",
        "",
        f"`{result['command']}` on {m['cpus']} CPUs ({m['platform']}, Python {m['python']}, "
        f"load average {m['load_before']} before and {m['load_after']} after), "
        f"{result['date']}. Synthetic archives from the mirror: rolled, re-encoded copies, one "
        f"truncated PNG per {result['broken_every']:,} images. Seconds are the stage process's "
        "wall time, start-up included (CPU: the CPU seconds of all its processes, which other "
        "load on the machine moves much less); peak memory is the larger of the stage's "
        "processes sampled together every 50 ms and the kernel's peak for its largest process. "
        f"Each stage ran {result['repeats']} times, the stages in turn (clean_2 before "
        "clean_1 in even rounds): seconds are the run of median seconds, peak memory the "
        "highest of the runs.",
        "",
        "| stage | " + " | ".join(f"N = {n:,}" for n in sizes) + " |",
        "| --- | " + " | ".join("---" for _ in sizes) + " |",
    ]
    for stage in STAGES:
        cells = []
        for n in sizes:
            f = runs[n][stage]
            cells.append(
                f"{f['seconds']:.1f} s ({f['cpu_s']:.1f} s CPU), "
                f"{f['images_per_s']:,.0f}/s, {f['peak_rss_mib']:,.0f} MiB"
            )
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "clean_1 and clean_2: `clean.workers` 1 and 2. epoch: the Task 2 model, one epoch on "
        "the train split (0.8 of the clean images), its validation pass included.",
        "",
        f"## Fitted growth, projected to {LARGE:,} images",
        "",
        "| stage | seconds = a*N + b | largest N over the line through the others (CPU) "
        "| projected s | projected images/s | MiB = c*N + d | projected peak MiB "
        "| linear (CPU) | under 4 GB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for stage, f in fits["stages"].items():
        lines.append(
            f"| {stage} | {f['seconds_per_image'] * 1e6:.1f} us*N + {f['seconds_fixed']:.1f} "
            f"| {growth(f['line_growth'])} ({growth(f['cpu_line_growth'])}) "
            f"| {f['projected_seconds']:,.0f} | {f['projected_images_per_s'] or 0:,.0f} "
            f"| {f['mib_per_image'] * 1e3:.3f} KiB*N + {f['mib_fixed']:.0f} "
            f"| {f['projected_peak_rss_mib']:,.0f} | {yes(f['linear'])} ({yes(f['cpu_linear'])}) "
            f"| {yes(f['rss_under_goal'])} |"
        )
    g = fits["goals"]
    after = fits["clean_speedup_after_startup"]
    lines += [
        "",
        "## Goals",
        "",
        f"- Time linear in N (the largest N's seconds within {LINEAR_SLACK}x of the straight "
        "line through the two sizes before it, taken flat where it falls) in every stage: "
        f"{yes(g['time_linear'])}; in CPU seconds: {yes(g['cpu_time_linear'])}",
        f"- Projected peak memory at {LARGE:,} images under 4 GB ({GOAL_RSS_MIB:,.0f} MiB) in "
        f"every stage: {yes(g['rss_under_4gb_at_529k'])}",
        f"- clean with 2 processes at least {GOAL_SPEEDUP}x as fast as with 1 at N = "
        f"{sizes[-1]:,}: {fits['clean_speedup']:.2f}x, the median of the rounds' ratios "
        f"({yes(g['clean_2_processes_1_7x'])}; round by round: "
        + ", ".join(f"{r:.2f}x" for r in fits["clean_speedup_per_try"])
        + f"; median seconds over median seconds: {fits['clean_speedup_of_medians']:.2f}x)"
        + (f"; {after:.2f}x after start-up (the stage's own seconds)" if after else "")
        + f"; at most {fits['clean_speedup_cpu_bound']:.2f}x on two idle cores, from CPU time "
        "(clean_1's CPU seconds over the busier process of clean_2, or half its total)",
        "",
        "![seconds and peak memory against N](scale.png)",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, runs, fits = result["sizes"], result["runs"], result["analysis"]["stages"]
    fig, (data, train, memory) = plt.subplots(1, 3, figsize=(15, 4.8))
    xs = np.array([0, LARGE])
    for i, stage in enumerate(STAGES):
        color, f = f"C{i}", fits[stage]
        time_ax = train if stage == "epoch" else data
        time_ax.plot(
            sizes, [runs[n][stage]["seconds"] for n in sizes], "o", color=color, label=stage
        )
        time_ax.plot(xs, f["seconds_per_image"] * xs + f["seconds_fixed"], "--", color=color, lw=1)
        memory.plot(
            sizes, [runs[n][stage]["peak_rss_mib"] for n in sizes], "o", color=color, label=stage
        )
        memory.plot(xs, f["mib_per_image"] * xs + f["mib_fixed"], "--", color=color, lw=1)
    memory.axhline(GOAL_RSS_MIB, color="red", lw=1)
    memory.text(LARGE, GOAL_RSS_MIB * 0.98, "4 GB goal ", color="red", ha="right", va="top")
    highest = max(runs[n][stage]["peak_rss_mib"] for n in sizes for stage in STAGES)
    memory.set_ylim(0, max(GOAL_RSS_MIB, highest) * 1.08)  # every measured point in view
    thousands = matplotlib.ticker.FuncFormatter(lambda x, _: f"{x / 1000:,.0f}k" if x else "0")
    for ax, title, ylabel in (
        (data, "data stages: time", "seconds (process wall time)"),
        (train, "one training epoch: time", "seconds (process wall time)"),
        (memory, "peak memory", "peak resident MiB"),
    ):
        ax.set_title(title)
        ax.xaxis.set_major_formatter(thousands)
        ax.axvline(LARGE, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("images in the archive (N); dashed: linear fit")
        ax.set_ylabel(ylabel)
        ax.set_xlim(0, LARGE * 1.04)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best" if ax is memory else "upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.scale",
        description=__doc__.split("\n\n")[0],
        epilog="Writes <out>/scale.md, scale.json and scale.png; the archives and scratch "
        "projects go to --work (kept) or a temporary folder (removed).",
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(SIZES),
        help="archive sizes N, at least two (default: %(default)s)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke test: N = {QUICK_SIZES}, a truncated file every 100, a 16-unit hidden layer",
    )
    p.add_argument(
        "--mirror",
        type=Path,
        help="the archive to copy from (default: the first local data.sources "
        "entry of params.yaml's small variant)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "reports" / "scale",
        help="where the table, JSON and plot go (default: %(default)s)",
    )
    p.add_argument(
        "--work",
        type=Path,
        help="keep archives and scratch projects here; an archive already there is reused",
    )
    p.add_argument(
        "--broken-every",
        type=int,
        default=10_000,
        help="one truncated PNG per this many images (default: %(default)s)",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="runs of each stage per size, in turn; the median is reported "
        "(default: 5, 1 with --quick)",
    )
    p.add_argument(
        "--hidden",
        type=int,
        default=1000,
        help="the Task 2 model's hidden width for the epoch (default: %(default)s)",
    )
    p.add_argument("--epoch", type=Path, help=argparse.SUPPRESS)  # the epoch's own process
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.broken_every, args.hidden = list(QUICK_SIZES), 100, 16
    if len(set(args.sizes)) < 2 or min(args.sizes) < 100:
        p.error("--sizes needs at least two different sizes of 100 or more")
    if args.repeats is None:
        args.repeats = 1 if args.quick else 5
    if args.broken_every < 1 or args.hidden < 1 or args.repeats < 1:
        p.error("--broken-every, --hidden and --repeats must be >= 1")
    args.sizes = sorted(set(args.sizes))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.epoch:
        epoch(args.epoch.resolve(), args.hidden)
        return 0
    mirror = args.mirror.resolve() if args.mirror else mirror_archive(ROOT / "params.yaml")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        say(f"decoding {mirror}")
        base = base_images(mirror)
        tag = hashlib.sha256(mirror.read_bytes()).hexdigest()[:12]
        runs, archives = {}, {}
        for n in args.sizes:
            archive = work / f"synthetic-{tag}-{n}-{args.broken_every}.tar.gz"
            if not archive.exists():
                say(f"building {archive.name}")
                start = time.perf_counter()
                archives[n] = synthesize(base, n, args.broken_every, archive)
                archives[n]["build_s"] = time.perf_counter() - start
            else:
                archives[n] = {"images": n, "bytes": archive.stat().st_size, "reused": True}
            runs[n] = run_size(n, archive, work, args.hidden, args.broken_every, args.repeats)
    result = {
        "command": " ".join(["python -m benchmarks.scale", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(terse=True),
            "python": platform.python_version(),
            "load_before": " ".join(f"{x:.1f}" for x in load_before),
            "load_after": " ".join(f"{x:.1f}" for x in os.getloadavg()),
        },
        "mirror": str(mirror),
        "broken_every": args.broken_every,
        "hidden": args.hidden,
        "repeats": args.repeats,
        "sizes": args.sizes,
        "archives": archives,
        "runs": runs,
    }
    result["analysis"] = analyse(args.sizes, runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (args.out / "scale.md").write_text(markdown(result))
    plot(result, args.out / "scale.png")
    print((args.out / "scale.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
