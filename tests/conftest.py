"""Shared test helpers: tiny PNGs and archives built on the fly, a scratch project root."""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import io
import json
import os
import re
import tarfile
from pathlib import Path

# Tests run side by side (pytest-xdist) and start stages, ranks and servers: idle OpenMP
# threads sleep at once, as where a stage's processes share the cores (numerics.sharing). Set
# before torch loads OpenMP; stage processes the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Every `mlflow server` the tests start without MLflow 3's job runner (8 processes each), as
# the project's scripts start theirs (pipeline.tracking.server_env).
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import numerics
from pipeline.cli import GC_THRESHOLDS
from pipeline.config import ROOT

# The test processes collect garbage as a stage's own process does (pipeline.cli): with torch
# and MLflow loaded, each full pass of the collector walks millions of long-lived objects.
gc.set_threshold(*GC_THRESHOLDS)

# Stages called in this process find torch pinned as their own processes pin it (params.yaml's
# base.numerics and base.threads defaults), before any test runs a torch operation.
numerics.configure("portable", 2)

pytest_plugins = ["tests.stack"]  # the session's PostgreSQL + S3 + MLflow server stack
MIRROR = Path(
    os.environ.get("NOTMNIST_MIRROR", ROOT.parent / "shared" / "data" / "notMNIST_small.tar.gz")
)
MIRROR_DIGEST = "2d379e7090811ece33b5eab67c7c217a01f47da4b4c94cd790117419ec934429"


@pytest.fixture
def mirror() -> Path:
    """The real data set; its absence is a failure, not a skip."""
    if not MIRROR.is_file():
        pytest.fail(f"data mirror not found at {MIRROR} (set NOTMNIST_MIRROR)")
    return MIRROR


def png_bytes(pixels: np.ndarray, mode: str = "L", fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, fmt)
    return buf.getvalue()


def glyph(seed: int) -> np.ndarray:
    """A distinct 28x28 uint8 image per seed."""
    return np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)


def add_file(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_archive(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> Path:
    """A .tar.gz holding `files` (name -> bytes) plus raw `extra` members (links, devices)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            add_file(tar, name, data)
        for info in extra:
            tar.addfile(info)
    return path


def tiny_dataset(per_letter: int = 12, top: str = "notMNIST_small") -> dict[str, bytes]:
    """A good archive's files: `per_letter` distinct PNGs in each folder A..J."""
    files = {}
    for c in range(10):
        letter = "ABCDEFGHIJ"[c]
        for i in range(per_letter):
            files[f"{top}/{letter}/img{i:03d}.png"] = png_bytes(glyph(max(100, per_letter) * c + i))
    return files


def write_params(root: Path, **sections) -> Path:
    """params.yaml under `root` from the repository's, with sections overridden."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, values in sections.items():
        params.setdefault(name, {}).update(values)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def tiny_project(root: Path, per_letter: int = 12, **sections) -> Path:
    """A project root with a tiny archive, params.yaml and its data stages run."""
    import json

    from pipeline.config import Paths
    from pipeline.data import archive
    from pipeline.stages import clean, split, validate

    paths = Paths(root)
    (root / "data" / "raw").mkdir(parents=True)
    make_archive(paths.raw_archive, tiny_dataset(per_letter=per_letter))
    sections.setdefault("split", {"train_size": 60, "val_size": 30})
    # Decoded in this process: a helper started from a test process is spawned (0.7 CPU s of
    # imports for 120 images). test_clean.py runs more decoding processes.
    sections.setdefault("clean", {"workers": 1})
    write_params(root, **sections)
    paths.data_reports.mkdir(parents=True)
    digest = archive.content_digest(paths.raw_archive)
    report = {"content_digest": digest, "source": "tiny.tar.gz"}
    (paths.data_reports / "download.json").write_text(json.dumps(report))
    for stage in (clean, validate, split):
        assert stage.main(["--root", str(root)]) == 0, stage.__name__
    return root


TINY_TRAINING = {  # a few seconds per task on the tiny data
    "train": {"batch_size": 16, "max_epochs": 2, "patience": 1, "device": "cpu"},
    "task2": {"learning_rates": [0.1, 0.05], "hidden": [16]},
    "task3": {"hidden_sizes": [8, 16]},
    "task4": {"hidden": [8, 8]},
    "task5": {"hidden": [16], "dropout": 0.5},
    "task6": {"max_epochs": 2, "patience": 1, "cnn_hidden": [8]},
    "task7": {"widths": [4, 8, 8], "batch_size": 16, "max_epochs": 2, "patience": 1},
}


def training_stages() -> list[str]:
    """The train_* stages of dvc.yaml, in its order (each task's inputs come before it)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return [name for name in stages if name.startswith("train_")]


def train_every_task(root: Path, artifacts: Path, *after, tracking_uri: str | None = None) -> None:
    """Every training stage of dvc.yaml, `evaluate`, then each stage module in `after`, in this
    process, on `root`; torch's deterministic-algorithm settings are restored afterwards."""
    import importlib

    import torch

    from pipeline.stages import evaluate

    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with pytest.MonkeyPatch.context() as mp:
        if tracking_uri is None:
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        else:
            mp.setenv("MLFLOW_TRACKING_URI", tracking_uri)
        mp.setenv("NOTMNIST_MLFLOW_ARTIFACTS", str(artifacts))
        mp.chdir(root)
        args = ["--root", str(root)]
        for name in training_stages():
            assert importlib.import_module(f"pipeline.stages.{name}").main(args) == 0, name
        for stage in (evaluate, *after):
            assert stage.main(args) == 0, stage.__name__
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory):
    """A tiny project with every task trained, evaluated and its champion registered.

    Returns (root, tracking URI). The store is the project's default, <root>/mlflow.db, so
    commands run with --root find it without MLFLOW_TRACKING_URI.
    """
    base = tmp_path_factory.mktemp("trained")
    root = tiny_project(base / "proj", **TINY_TRAINING)
    train_every_task(root, base / "artifacts")
    return root, f"sqlite:///{root / 'mlflow.db'}"


@contextlib.contextmanager
def unknown_parent_run(root: Path, task: str):
    """reports/train/<task>/mlflow.json naming a parent run no store has, restored after."""
    path = root / "reports" / "train" / task / "mlflow.json"
    saved = path.read_text()
    path.write_text(json.dumps({**json.loads(saved), "parent_run_id": "0" * 32}))
    try:
        yield
    finally:
        path.write_text(saved)


# The longest files (measured: 3 to 5 minutes each), longest first. `make test`'s workers take
# one file at a time in collection order (--no-loadscope-reorder; xdist's default order puts
# the files with the most tests first), so these start at once, side by side, and the short
# files fill in around them instead of leaving one worker alone with a long file at the end.
LONGEST = (
    "test_repro.py",
    "test_interrupt.py",
    "test_repro_study.py",
    "test_benchmark.py",
    "test_team.py",
)


def pytest_collection_modifyitems(config, items):
    """Mark the slow tests (SLOW_FIXTURES, SLOW_FILES); put the LONGEST files first, keeping the
    order of tests within each file."""
    for item in items:
        if slow_reason(item):
            item.add_marker(pytest.mark.slow)
    rank = {name: i for i, name in enumerate(LONGEST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST)))


# --- The quick tier (`make test-quick`: pytest -m "not slow"): tests that start no stage,
# pipeline or server. A test is slow when it is marked so, uses one of SLOW_FIXTURES (directly
# or through another fixture), or SLOW_TESTS names it: per file, test names (fnmatch patterns;
# "*": the whole file) or "@fixture" for the tests that use that fixture of the file. Every
# test left quick runs under `no_stages` (in `make test` too): one that starts a stage, a
# pipeline or a server fails, naming what to mark, so the tier cannot grow slow unnoticed.
# Also slow, though it starts none: test_numerics' `results` (processes per simulated
# machine).
SLOW_FIXTURES = {"trained_project", "stack", "mirror"}
SLOW_TESTS = {
    "test_benchmark.py": (
        "test_help",
        "test_numerics_runs_each_mode_in_its_own_process",
        "test_profile_before_after_and_floor",
        "test_recipes_trains_each_trial_with_each_seed",
        "test_spin_compares_libgomps_default_with_the_task7_stages_count",
        "test_stage_cost_before_and_after",
        "test_startup_table",
        "test_suite_both_sides_and_the_ratio",
        "test_sweep_pools_give_the_same_bytes",
        "test_tiny_run",
    ),
    "test_clean.py": ("test_main_*",),
    "test_cli.py": ("@stage",),
    "test_distributed.py": ("*",),
    "test_docs.py": ("test_every_generated_block_equals_what_reports_say",),
    "test_download.py": ("test_main_*",),
    "test_evaluate.py": ("@project", "@client", "@stage"),
    "test_gate.py": (
        "test_alpha_is_the_params_level",
        "test_another_test_size_fails_in_one_line",
        "test_another_test_split_fails_in_one_line",
        "test_bad_revision_is_one_line",
        "test_baseline_without_predictions_falls_back_per_task",
        "test_below_threshold_fails_with_table_and_one_line",
        "test_drop_from_git_baseline_fails",
        "test_drop_within_max_drop_passes",
        "test_identical_predictions_pass_with_p_one",
        "test_markdown_is_appended_as_a_table",
        "test_markdown_names_the_paired_test",
        "test_missing_metrics_is_the_missing_input_line",
        "test_pass_prints_every_task_and_writes_gate_json",
        "test_predictions_that_disagree_with_metrics_fail",
        "test_revision_without_metrics_is_one_line",
        "test_significantly_better_passes_and_says_so",
        "test_significantly_worse_fails",
        "test_slightly_worse_but_not_significant_passes",
        "test_task_missing_from_baseline_is_checked_against_the_threshold",
        "test_task_missing_from_metrics_fails",
        "test_the_paired_test_also_keeps_the_minimum",
        "test_threshold_at_exactly_the_minimum_passes",
    ),
    "test_interrupt.py": ("*",),
    "test_layout.py": ("test_no_two_modules_define_the_same_public_name",),
    "test_load.py": ("test_sqlite_store_loses_no_run_of_two_concurrent_stages",),
    "test_mlflow.py": ("@project",),
    "test_numerics.py": ("@results",),
    "test_plots_template.py": ("test_dvc_plots_show_fills_the_template_with_every_task",),
    "test_repro.py": ("*",),
    "test_repro_study.py": ("*",),
    "test_scale.py": ("test_help_and_bad_sizes", "test_quick_run_end_to_end"),
    "test_seeds.py": ("test_bad_arguments_are_one_line",),
    "test_server.py": ("*",),
    "test_split.py": (
        "test_main_rejects_letters_outside_a_to_j",
        "test_main_user_errors_exit_1_with_one_line",
        "test_main_writes_split_and_report",
        "test_training_seed_does_not_move_the_split",
    ),
    "test_sweep.py": ("*",),
    "test_theory.py": (
        "test_help_says_what_it_reads_and_writes",
        "test_main_writes_every_claim_twice_identically",
    ),
    "test_train.py": (
        "test_load_splits_normalized_with_class_ids",
        "test_load_splits_refuses_a_split_of_other_images",
        "test_stage_with_unavailable_backend_prints_one_line",
        "test_stage_with_unusable_device_exits_1",
    ),
    "test_validate.py": (
        "test_bad_params_exit_1_naming_the_key",
        "test_data_docs_are_the_same_in_another_time_zone_and_folder",
        "test_good_set_passes_and_reports_are_byte_identical",
        "test_imbalanced_set_fails_class_count",
        "test_index_and_images_of_different_lengths_stop_the_stage",
        "test_label_conflicts_over_the_limit_fail",
        "test_missing_letter_fails_and_shows_observed_letters",
        "test_too_many_rejected_and_all_black_image_fail",
        "test_too_many_rejected_as_a_fraction_fails",
    ),
    "test_workflow.py": ("test_pipeline_modules_exist",),
}
# Commands a quick test may not start: stages and commands of the project, DVC, MLflow's
# server and UI, the team stack, torchrun, make.
SLOW_COMMAND = re.compile(
    r"(-m\s+(pipeline|benchmarks|scripts)\b|(^|[/\s])(dvc|mlflow|torchrun|make|initdb|pg_ctl|"
    r"postgres)(\s|$)|scripts/server\.py)"
)


def slow_reason(item) -> str | None:
    """Why `item` is in the slow tier, or None."""
    if item.get_closest_marker("slow"):
        return "marked slow"
    fixtures = set(getattr(item, "fixturenames", ()))
    if used := SLOW_FIXTURES & fixtures:
        return f"uses {sorted(used)[0]}"
    name = getattr(item, "originalname", item.name)
    for entry in SLOW_TESTS.get(item.path.name, ()):
        if entry[1:] in fixtures if entry.startswith("@") else fnmatch.fnmatch(name, entry):
            return f"SLOW_TESTS names it ({entry})"
    return None


def _refuse(what: str):
    pytest.fail(f"a quick test {what}: mark it @pytest.mark.slow (tests/conftest.py)", False)


@contextlib.contextmanager
def no_stages():
    """Fail the test if it starts a stage in this process (cli.run) or a slow command."""
    import subprocess

    from pipeline import cli

    popen_init, run = subprocess.Popen.__init__, cli.run

    def checked_init(self, args, *a, **k):
        text = args if isinstance(args, str) else " ".join(map(str, args))
        if SLOW_COMMAND.search(text):
            _refuse(f"starts `{text[:120]}`")
        popen_init(self, args, *a, **k)

    def checked_run(name, *a, **k):
        _refuse(f"runs stage {name}")

    subprocess.Popen.__init__, cli.run = checked_init, checked_run
    try:
        yield
    finally:
        subprocess.Popen.__init__, cli.run = popen_init, run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    with no_stages() if not slow_reason(item) else contextlib.nullcontext():
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    with no_stages() if not slow_reason(item) else contextlib.nullcontext():
        yield
