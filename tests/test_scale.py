"""`python -m benchmarks.scale`: synthetic archives, the fits, and a --quick run end to end.

Timings are printed and checked for being measured, never for their values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from benchmarks import scale
from pipeline.config import LETTERS, ROOT
from pipeline.data import decode
from tests.conftest import make_archive, tiny_dataset

SCRIPT = ["-m", "benchmarks.scale"]  # run from the project root


@pytest.fixture(scope="module")
def tiny_mirror(tmp_path_factory):
    """A stand-in for the mirror: 30 distinct images per letter."""
    return make_archive(tmp_path_factory.mktemp("mirror") / "tiny.tar.gz", tiny_dataset(30))


def test_synthetic_archive_is_deterministic_distinct_valid_and_balanced(tiny_mirror, tmp_path):
    base = scale.base_images(tiny_mirror)
    assert base[1][:10] == list(LETTERS)  # interleaved
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    info = scale.synthesize(base, 655, 100, a)
    scale.synthesize(base, 655, 100, b)
    assert info == {"images": 655, "broken": 6, "bytes": a.stat().st_size}
    assert a.read_bytes() == b.read_bytes()

    images, index, rejected = decode.scan(a)
    assert len(index) == 655
    assert index["sha256"].nunique() == 655  # rolled copies: every image differs
    assert list(rejected["reason"]) == ["truncated"] * 6
    counts = Counter(index["letter"])
    assert max(counts.values()) - min(counts.values()) <= 1
    # The second copy of an image is the first rolled by the second offset.
    first = index.index[index["path"].str.endswith("_00.png")][0]
    second = index.index[index["path"] == index["path"][first].replace("_00.png", "_01.png")]
    assert len(second) == 1
    rolled = np.roll(images[first], scale.OFFSETS[1], axis=(0, 1))
    np.testing.assert_array_equal(images[second[0]], rolled)


def test_too_many_copies_are_refused(tiny_mirror, tmp_path):
    base = scale.base_images(tiny_mirror)  # 300 images: at most 49 copies
    with pytest.raises(SystemExit, match="need 50 copies of 300"):
        scale.synthesize(base, 300 * 49 + 1, 10_000, tmp_path / "x.tar.gz")


def fake_runs(sizes, seconds, rss) -> dict:
    """Figures as run_size() gives them from three runs per stage (the second slow, the third
    fast, the first the median); clean_2 takes 1/1.8 of clean_1's time in the median run, its
    busier process 55% of the CPU seconds; its third run is a slow one."""
    runs = {}
    for n in sizes:
        s = seconds(n)
        tries = {
            stage: [
                {"seconds": s * f, "cpu_s": s, "peak_rss_mib": rss(n) * f} for f in (1.0, 1.3, 0.95)
            ]
            for stage in scale.STAGES
        }
        tries["clean_2"] = [
            {
                "seconds": s / 1.8 * f,
                "cpu_s": s,
                "peak_rss_mib": rss(n),
                "busiest_process_cpu_s": 0.55 * s,
            }
            for f in (1.0, 0.9, 2.0)
        ]
        runs[n] = {stage: scale.typical(figs) for stage, figs in tries.items()}
    return runs


def test_a_stage_is_reported_by_its_median_run_and_its_highest_memory():
    fig = scale.typical(
        [
            {"seconds": 3.0, "cpu_s": 2.0, "peak_rss_mib": 10, "run": 1},
            {"seconds": 9.0, "cpu_s": 8.0, "peak_rss_mib": 50, "run": 2},
            {"seconds": 1.0, "cpu_s": 1.0, "peak_rss_mib": 20, "run": 3},
        ]
    )
    assert fig["run"] == 1 and fig["seconds"] == 3.0 and fig["cpu_s"] == 2.0
    assert fig["peak_rss_mib"] == 50
    assert fig["tries_seconds"] == [3.0, 9.0, 1.0] and fig["tries_cpu_s"] == [2.0, 8.0, 1.0]
    assert fig["tries_peak_rss_mib"] == [10, 50, 20]


def test_analysis_fits_projects_and_judges_the_goals():
    sizes = [20_000, 100_000, 250_000]
    linear = scale.analyse(sizes, fake_runs(sizes, lambda n: 2 + n * 1e-4, lambda n: 100 + n / 200))
    clean = linear["stages"]["clean_1"]
    assert clean["seconds_per_image"] == pytest.approx(1e-4)
    assert clean["seconds_fixed"] == pytest.approx(2)
    assert clean["projected_seconds"] == pytest.approx(2 + 52.9)
    assert clean["projected_peak_rss_mib"] == pytest.approx((100 + 529_000 / 200) * 1.3)
    assert clean["line_growth"] == pytest.approx(1)
    assert linear["clean_speedup_per_try"] == pytest.approx([1.8, 1.8 * 1.3 / 0.9, 1.8 * 0.95 / 2])
    assert linear["clean_speedup"] == pytest.approx(1.8)  # the median round's ratio
    assert linear["clean_speedup_of_medians"] == pytest.approx(1.8)
    assert linear["clean_speedup_cpu_bound"] == pytest.approx(1 / 0.55)
    assert linear["goals"] == {
        "time_linear": True,
        "cpu_time_linear": True,
        "rss_under_4gb_at_529k": True,
        "clean_2_processes_1_7x": True,
    }

    square = scale.analyse(sizes, fake_runs(sizes, lambda n: n * n * 1e-9, lambda n: n / 100))
    assert square["stages"]["validate"]["line_growth"] > 2  # 62.5 s against the line's 28 s
    assert square["goals"]["time_linear"] is False
    assert square["goals"]["cpu_time_linear"] is False
    assert square["goals"]["rss_under_4gb_at_529k"] is False  # 5,290 MiB

    # A stage whose start-up dominates (constant seconds, a little noise) is not superlinear.
    flat = scale.analyse(
        sizes, fake_runs(sizes, lambda n: 5.0 - (n == 100_000) * 0.1, lambda n: 100)
    )
    assert flat["stages"]["validate"]["line_growth"] == pytest.approx(5.0 / 4.9)  # taken flat
    assert flat["goals"]["time_linear"] is True
    # Noise that makes the line fall: the line is taken flat, not extended downwards.
    falling = scale.analyse(
        sizes, fake_runs(sizes, {20_000: 5.5, 100_000: 5.2, 250_000: 6.0}.get, lambda n: 100)
    )
    assert falling["stages"]["validate"]["line_growth"] == pytest.approx(6.0 / 5.2)
    assert falling["goals"]["time_linear"] is True
    rising = scale.analyse(
        sizes, fake_runs(sizes, {20_000: 5.0, 100_000: 5.2, 250_000: 6.0}.get, lambda n: 100)
    )
    assert rising["stages"]["validate"]["line_growth"] == pytest.approx(6.0 / 5.575)

    two = scale.analyse(sizes[:2], fake_runs(sizes[:2], lambda n: n * 1e-4, lambda n: 100))
    assert two["goals"]["time_linear"] is None  # two sizes give no second step to compare
    assert two["stages"]["split"]["linear"] is None


def test_clean_runs_alternate_which_goes_first():
    assert scale.round_order(1) == scale.STAGES
    second = scale.round_order(2)
    assert second.index("clean_2") + 1 == second.index("clean_1")
    assert sorted(second) == sorted(scale.STAGES) and scale.round_order(3) == scale.STAGES
    ratios = scale.analyse([300, 600], fake_runs([300, 600], lambda n: 10.0, lambda n: 100))
    assert ratios["clean_speedup"] == pytest.approx(1.8)  # rounds: 1.8, 2.6, 0.855


def test_help_and_bad_sizes():
    done = subprocess.run(
        [sys.executable, *SCRIPT, "--help"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    for flag in ("--sizes", "--quick", "--mirror", "--out", "--work", "--broken-every"):
        assert flag in done.stdout
    assert "--epoch" not in done.stdout  # internal
    with pytest.raises(SystemExit):
        scale.parse_args(["--sizes", "500"])


def test_quick_run_end_to_end(tiny_mirror, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run(
        [
            sys.executable,
            *SCRIPT,
            "--quick",
            "--mirror",
            str(tiny_mirror),
            "--out",
            str(out),
            "--work",
            str(work),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    print(done.stdout)  # shown with -s

    result = json.loads((out / "scale.json").read_text())
    assert result["sizes"] == list(scale.QUICK_SIZES)
    for n in map(str, scale.QUICK_SIZES):
        run = result["runs"][n]
        assert run["clean_images"] == int(n) and run["rejected"] == int(n) // 100
        assert run["split"]["counts"] == {
            "train": int(n) * 8 // 10,
            "val": int(n) // 10,
            "test": int(n) // 10,
        }
        for stage in scale.STAGES:
            fig = run[stage]
            for key in (
                "seconds",
                "images_per_s",
                "peak_rss_mib",
                "largest_process_rss_mib",
                "cpu_s",
                "busiest_process_cpu_s",
            ):
                assert fig[key] > 0, (n, stage, key)
        assert run["clean_1"]["processes"] == 1  # a helper of clean_2 may live under 50 ms
        assert run["epoch"]["train_images"] == int(n) * 8 // 10
        assert run["epoch"]["train_loss"] > 0
    analysis = result["analysis"]
    assert set(analysis["stages"]) == set(scale.STAGES)
    assert analysis["clean_speedup"] > 0
    assert analysis["clean_speedup_cpu_bound"] > 0
    assert set(analysis["goals"]) == {
        "time_linear",
        "cpu_time_linear",
        "rss_under_4gb_at_529k",
        "clean_2_processes_1_7x",
    }

    table = (out / "scale.md").read_text()
    assert "| stage | N = 300 | N = 600 |" in table
    assert "## Fitted growth, projected to 529,000 images" in table
    assert all(f"| {stage} |" in table for stage in scale.STAGES)
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The archives and scratch projects stay in --work; an archive there is reused.
    assert len(list(work.glob("synthetic-*.tar.gz"))) == 2
    assert (work / "project-600" / "data" / "clean" / "images.npy").is_file()
    assert result["archives"]["300"]["broken"] == 3
