"""`python -m benchmarks.train_speed` on a tiny archive; speed is printed, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common, stages
from benchmarks.train_speed import timed_stages
from pipeline import numerics
from pipeline.config import ROOT, TASKS
from tests.conftest import make_archive, tiny_dataset, write_params

SCRIPT = ["-m", "benchmarks.train_speed"]  # run from the project root
LOOPS = ("original", "project", "project_train_only")
# A whole pipeline in seconds: 300 random glyphs, small models, one epoch, a gate that passes.
TINY = {
    "data": {"content_digest": None},  # the tiny archive is not the mirror
    "split": {"train_size": 200, "val_size": 50},
    "train": {"max_epochs": 1, "patience": 1},
    "task2": {"learning_rates": [0.1, 0.05], "hidden": [32]},
    "task3": {"hidden_sizes": [16, 32]},
    "task4": {"hidden": [16, 16]},
    "task5": {"hidden": [32]},
    "task6": {"max_epochs": 1, "patience": 1, "cnn_hidden": [16]},
    "gate": {"min_test_accuracy": dict.fromkeys(TASKS, 0.0)},
}


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *SCRIPT, *args], capture_output=True, text=True, timeout=1800, cwd=ROOT
    )


def tiny_root(folder: Path) -> tuple[Path, Path]:
    """(a project root with tiny params, a 300-image archive)."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = make_archive(folder / "tiny.tar.gz", tiny_dataset(per_letter=30))
    write_params(folder, **TINY)
    return folder, archive


def test_help():
    done = run_script("--help")
    assert done.returncode == 0, done.stderr
    for flag in (
        "--epochs",
        "--json",
        "--repro",
        "--root",
        "--mirror",
        "--limit",
        "--hidden",
        "--numerics",
        "--spin",
        "--profile",
        "--sweep",
        "--startup",
        "--suite",
        "--max-epochs",
    ):
        assert flag in done.stdout


def test_tiny_run(tmp_path):
    root, archive = tiny_root(tmp_path)
    out = tmp_path / "out.json"
    done = run_script(
        *("--epochs", "1", "--limit", "200", "--hidden", "16"),
        *("--json", str(out), "--mirror", str(archive), "--root", str(root)),
    )
    assert done.returncode == 0, done.stderr
    print(done.stdout)  # shown with -s

    fig = json.loads(out.read_text())
    assert fig["clean"]["images"] == 300
    assert fig["clean"]["seconds"] > 0 and fig["clean"]["images_per_s"] > 0
    assert fig["train"]["train_images"] == 200 and fig["train"]["val_images"] == 50
    for loop in LOOPS:
        assert len(fig[loop]["epoch_seconds"]) == 1
        for key in ("median_epoch_s", "images_per_s", "last_train_loss"):
            assert fig[loop][key] > 0, (loop, key)
    for key in ("ratio", "ratio_train_only", "peak_rss_mib", "threads", "cpus"):
        assert fig[key] > 0, key
    if numerics.portable_possible():  # computed in params.yaml's mode, as the stages do
        assert fig["fingerprint"]["mode"] == "portable"
    assert not set(fig) & {"repro", "numerics", "profile", "sweep", "startup", "suite"}

    assert "original: ImageFolder + DataLoader" in done.stdout
    assert "project: pipeline.training.loop.fit" in done.stdout
    assert "original / project" in done.stdout and "peak resident memory" in done.stdout


def run_mode(folder: Path, *args: str) -> tuple[dict, str]:
    """One tiny run of the benchmark with `args`: (its JSON, its printed tables)."""
    root, archive = tiny_root(folder)
    out = folder / "out.json"
    done = run_script(
        *args,
        *("--limit", "200", "--max-epochs", "1", "--hidden", "16"),
        *("--json", str(out), "--mirror", str(archive), "--root", str(root)),
    )
    assert done.returncode == 0, done.stderr[-5000:]
    print(done.stdout)  # shown with -s
    return json.loads(out.read_text()), done.stdout


def test_numerics_runs_each_mode_in_its_own_process(tmp_path):
    fig, printed = run_mode(tmp_path, "--numerics", "--epochs", "2")
    n = fig["numerics"]
    for mode in ("portable", "native"):
        assert len(n[mode]["epoch_seconds"]) == 2 and n[mode]["median_epoch_s"] > 0
        assert n[mode]["last_train_loss"] > 0
    assert n["native"]["fingerprint"]["mode"] == "native"
    if numerics.portable_possible():  # x86-64 with AVX2: the portable process pinned its kernels
        assert n["portable"]["fingerprint"]["mode"] == "portable"
        assert n["portable"]["fingerprint"]["isa"] == "AVX2"
        assert n["native"]["fingerprint"]["isa"] == numerics.machine_isa()
    assert n["ratio"] > 0 and "portable / native" in printed


def test_spin_compares_libgomps_default_with_the_task7_stages_count(tmp_path):
    fig, printed = run_mode(tmp_path, "--spin", "--epochs", "2")
    s = fig["spin"]
    assert s["default"]["spin_count"] == "300000" and s["stage"]["spin_count"] == "3000"
    for name in ("default", "stage"):
        assert len(s[name]["epoch_seconds"]) == 2 and s[name]["median_epoch_s"] > 0
    assert s["default"]["last_train_loss"] == s["stage"]["last_train_loss"]  # the same bits
    assert s["ratio"] > 0 and "stage / default" in printed


def test_profile_before_after_and_floor(tmp_path):
    fig, printed = run_mode(
        tmp_path, "--profile", *("--steps", "10", "--warmup", "2", "--repeats", "1")
    )
    p = fig["profile"]
    for k in ("before", "after", "floor"):
        assert p[k]["ms_per_step"] > 0 and len(p[k]["runs_ms_per_step"]) == 1
    assert set(p["floor"]["parts_ms_per_step"]) == {
        "forward_product",
        "weight_gradient_product",
        "sgd_update",
    }
    for k in ("before", "after"):
        ops = p[k]["top_ops"]
        assert "aten::addmm" in {o["op"] for o in ops}
        shares = [o["share"] for o in ops]
        assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1 + 1e-9
    assert p["speedup"] > 0 and "top ops by self CPU time" in printed


def test_sweep_pools_give_the_same_bytes(tmp_path):
    fig, printed = run_mode(tmp_path, "--sweep")
    s = fig["sweep"]
    assert set(s["workers"]) == {"1", "2"}
    assert s["identical"] is True
    one, two = s["workers"]["1"]["sha256"], s["workers"]["2"]["sha256"]
    assert one == two and set(one) == set(stages.SWEEP_OUTPUTS)
    for r in s["workers"].values():
        assert r["wall_s"] > r["stage_s"] > 0 and r["peak_rss_mib"] > 0
    assert s["speedup"] > 0 and "byte-identical" in printed


def test_startup_table(tmp_path):
    fig, printed = run_mode(
        tmp_path, "--startup", "--repeats", "1", "--stages", "download,train_task2"
    )
    s = fig["startup"]
    assert set(s["stages"]) == {"download", "train_task2"}
    assert set(s["baseline"]) == {
        "python",
        "import torch",
        "torch, use_deterministic_algorithms",
        "torch, numerics.apply",
    }
    for r in [*s["stages"].values(), *s["baseline"].values()]:
        assert r["wall_s"] > r["import_s"] > 0
    assert "torch" in s["stages"]["train_task2"]["heaviest"]
    assert "imports s" in printed


def test_stage_cost_before_and_after(tmp_path):
    """--stage-cost: the stage the old way and the new way, each from its own timing file."""
    fig, printed = run_mode(tmp_path, "--stage-cost", "--rounds", "1", "--stages", "train_task2")
    s = fig["stage_cost"]
    assert s["stage"] == "train_task2" and set(s["runs"]) == {"before", "after"}
    for runs in s["runs"].values():
        (r,) = runs
        assert r["wall_s"] > r["stage_s"] > r["epochs_s"] > 0
        assert r["startup_s"] > 0 and r["log_model_s"] > 0 and r["log_model_cpu_s"] > 0
        assert r["fixed_s"] == pytest.approx(r["wall_s"] - r["epochs_s"])
    assert "fixed cost (wall - epochs)" in printed


def test_suite_both_sides_and_the_ratio(tmp_path):
    fig, printed = run_mode(tmp_path, "--suite")
    s = fig["suite"]
    o = s["original"]
    assert set(o["tasks"]) == {"task2", "task3", "task4", "task5"}
    assert o["epochs"] == 2 + 2 + 1 + 1  # one epoch per configuration
    assert o["images"] == {"train": 200, "val": 50, "test": 50}
    assert o["tasks"]["task3"]["chosen"]["lr"] == o["tasks"]["task2"]["chosen"]["lr"]
    assert not o["is_original"] and o["seconds"] > 0 and o["peak_rss_mib"] > 0
    ran = s["project"]["stages"]
    assert set(stages.ORIGINAL_STAGES) <= set(ran)
    assert set(s["original_stages"]) == set(stages.ORIGINAL_STAGES)
    assert {"train_task6", "theory"} <= set(s["beyond_stages"])
    assert set(s["original_stages"]) | set(s["beyond_stages"]) == set(ran)
    assert s["original_stages_s"] == pytest.approx(sum(ran[k] for k in stages.ORIGINAL_STAGES))
    assert s["ratio"] == pytest.approx(s["original_stages_s"] / o["seconds"])
    assert set(s["project"]["peak_rss_mib"]) == set(ran)  # every stage wrote its timing file
    assert s["project"]["max_peak_rss_mib"] == max(s["project"]["peak_rss_mib"].values())
    assert "stages beyond the original" in printed and "goal at most 1/6" in printed


def test_capped_params_shrink_the_split_and_every_epoch_limit():
    params = common.read_params(ROOT / "params.yaml")
    small = common.capped(params, limit=100, max_epochs=2)
    assert small["split"]["train_size"] == 100 and small["split"]["val_size"] == 100
    assert small["train"]["max_epochs"] == 2 and small["task6"]["max_epochs"] == 2
    assert params["train"]["max_epochs"] != 2  # the original is left as it was
    assert common.capped(params) == params


def test_import_times_sum_the_top_level_imports():
    text = (
        "import time: self [us] | cumulative | imported package\n"
        "import time:       100 |        100 | site\n"
        "import time:        50 |         50 |   numpy.core\n"
        "import time:       200 |        300 |   numpy\n"
        "import time:      1000 |       4000 | torch\n"
    )
    total, packages = stages.import_times(text)
    assert total == 4100  # site + torch; numpy was imported by something else
    assert packages == {"site": 100, "numpy": 300, "torch": 4000}


def test_stage_modules_come_from_dvc_yaml():
    found = common.stage_modules()
    assert (
        found["train_task2"] == "pipeline.stages.train_task2"
        and found["gate"] == "pipeline.stages.gate"
    )
    assert set(stages.ORIGINAL_STAGES) <= set(found)


def test_stage_times_follow_the_stage_lines(tmp_path):
    code = (
        "import time\n"
        "print(\"Running stage 'a':\", flush=True)\n"
        "time.sleep(1.0)\n"
        "print(\"Running stage 'b':\", flush=True)\n"
        "print('Updating lock file', flush=True)\n"
    )
    stages_, total, rc = timed_stages([sys.executable, "-c", code], tmp_path, dict(os.environ))
    assert rc == 0
    assert list(stages_) == ["a", "b"]
    assert stages_["a"] >= 0.9 and stages_["b"] < stages_["a"]  # the sleep belongs to stage a
    assert total >= stages_["a"] + stages_["b"]


def test_children_do_not_inherit_our_numerics(monkeypatch):
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("NOTMNIST_NUMERICS", "portable")
    env = common.child_env(EXTRA="1")
    assert "ATEN_CPU_CAPABILITY" not in env and "NOTMNIST_NUMERICS" not in env
    assert env["EXTRA"] == "1" and env["PATH"].startswith(str(Path(sys.executable).parent))


def test_recipes_trains_each_trial_with_each_seed(tmp_path):
    """`python -m benchmarks.recipes`: params.yaml's Task 7 and a trial, two seeds each."""
    from tests.conftest import tiny_project

    task7 = {"widths": [4, 8], "max_epochs": 1, "patience": 1, "batch_size": 16}
    root = tiny_project(tmp_path / "proj", task7=task7)
    out = tmp_path / "recipes.json"
    cmd = [sys.executable, "-m", "benchmarks.recipes", "--root", str(root), "--seeds", "0", "1"]
    trial = ["--trial", "noisy", "task7.noise_std=0.6", "task7.members=2"]
    done = subprocess.run(
        [*cmd, *trial, "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(out.read_text())
    assert list(found) == ["current", "noisy"]
    assert found["noisy"]["overrides"] == ["task7.noise_std=0.6", "task7.members=2"]
    test_images = 12 * 10 - 60 - 30  # tiny_project: 12 per letter, split 60 + 30, the rest
    for trial in found.values():
        assert [r["seed"] for r in trial["runs"]] == [0, 1]
        for r in trial["runs"]:
            assert 0 <= r["test_accuracy"] <= 1 and r["best_epoch"] == 1 and r["seconds"] >= 0
        wrong = [round((1 - r["test_accuracy"]) * test_images) for r in trial["runs"]]
        assert trial["wrong_in_every_seed"] <= min(wrong) <= max(wrong)
        assert max(wrong) <= trial["wrong_in_some_seed"] <= min(sum(wrong), test_images)
        assert 0 <= trial["ensemble_test_accuracy"] <= 1
    assert "| noisy task7.noise_std=0.6 task7.members=2 | 2 |" in done.stdout
    bad = subprocess.run(
        [*cmd, "--trial", "x", "widths=[8]"], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode != 0 and "is not task7.<key>=<value>" in bad.stderr
