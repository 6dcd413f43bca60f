"""The whole experiment both ways, in one run: the original's protocol in its style against the
project's `dvc repro --force`, on the same archive and the same split."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from benchmarks import stages
from benchmarks.common import ROOT, child_env, say, split_params
from benchmarks.coursework import Protocol, write_splits
from pipeline.data import decode, splitting

GOAL, STRETCH = 1 / 6, 1 / 8  # the project's share of the original's time


def original_env() -> dict:
    """The original's process environment: torch's defaults (no pinned numerics, and OpenMP's
    own waiting policy rather than the project's)."""
    env = child_env()
    env.pop("OMP_WAIT_POLICY", None)
    return env


def run_original(params: dict, archive: Path, seed: int) -> dict:
    """The original's Tasks 2-5 in a process of its own, over PNG files of the project's split
    (written first, untimed: the original had its files on disk)."""
    with tempfile.TemporaryDirectory(prefix="train-speed-original-") as tmp:
        start = time.perf_counter()
        images, index, _ = decode.scan(archive)
        assigned = splitting.assign(index, split_params(params), seed)
        counts = write_splits(images, index["class_id"].to_numpy(), assigned, Path(tmp) / "png")
        setup = time.perf_counter() - start
        del images
        settings = asdict(Protocol.from_params(params))
        out = Path(tmp) / "original.json"
        say(f"suite: the original's protocol on {counts}")
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "benchmarks.coursework",
                str(Path(tmp) / "png"),
                "--settings",
                json.dumps(settings),
                "--seed",
                str(seed),
                "--json",
                str(out),
            ],
            cwd=ROOT,
            env=original_env(),
            check=True,
        )
        wall = time.perf_counter() - start
        figures = json.loads(out.read_text())
    policy = original_env().get("OMP_WAIT_POLICY", "OpenMP's default")
    figures.update(wall_s=wall, setup_s=setup, images=counts, omp_wait_policy=policy)
    return figures


def suite(params: dict, archive: Path, seed: int) -> dict:
    """Both sides, then the project's stages split into those that reproduce the original and
    those beyond it; the ratio is the former's time over the original's protocol's."""
    original = run_original(params, archive, seed)
    project = stages.repro(params, archive)
    ours = {k: v for k, v in project["stages"].items() if k in stages.ORIGINAL_STAGES}
    beyond = {k: v for k, v in project["stages"].items() if k not in stages.ORIGINAL_STAGES}
    ours_s = sum(ours.values())
    return {
        "original": original,
        "project": project,
        "original_stages": list(ours),
        "original_stages_s": ours_s,
        "beyond_stages": list(beyond),
        "beyond_stages_s": sum(beyond.values()),
        "ratio": ours_s / original["seconds"],
        "goal_ratio": GOAL,
        "stretch_ratio": STRETCH,
    }


def report(fig: dict) -> str:
    o, p = fig["original"], fig["project"]
    per_task = ", ".join(
        f"{name} {t['seconds']:.1f} s / {t['epochs']} ep / test {100 * t['test_accuracy']:.2f}%"
        for name, t in o["tasks"].items()
    )
    lines = [
        f"original's protocol, its style (ImageFolder, transforms, DataLoader, early stopping), "
        f"{o['threads']} threads, isa {o['isa']}, OpenMP waiting: {o['omp_wait_policy']}, "
        f"images {o['images']}"
        + ("" if o["is_original"] else " [params differ from the original's settings]"),
        f"  Tasks 2-5: {o['seconds']:.1f} s, {o['epochs']} epochs ({per_task}); "
        f"process {o['wall_s']:.1f} s; peak RSS {o['peak_rss_mib']:.0f} MiB",
        f"project, dvc repro --force: {p['total_s']:.1f} s in all",
        "",
        stages.repro_report(p),
        "",
        f"stages reproducing the original ({', '.join(fig['original_stages'])}): "
        f"{fig['original_stages_s']:.1f} s",
        f"  / the original's protocol {o['seconds']:.1f} s = {fig['ratio']:.3f}, the original "
        f"takes {1 / fig['ratio']:.2f}x as long (goal at most 1/6 = {GOAL:.3f}, stretch 1/8 = "
        f"{STRETCH:.3f})",
        f"stages beyond the original ({', '.join(fig['beyond_stages']) or 'none'}): "
        f"{fig['beyond_stages_s']:.1f} s",
        f"dvc outside the stages (start, lock file): "
        f"{p['total_s'] - fig['original_stages_s'] - fig['beyond_stages_s']:.1f} s",
    ]
    return "\n".join(lines)
