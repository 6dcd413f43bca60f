"""Every stage's command line, and params.yaml against its dataclasses."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest
import yaml

from pipeline import config
from pipeline.config import ROOT, StageError, load
from tests.conftest import write_params

STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_help_says_what_the_stage_reads_and_writes(name, capsys):
    """`python -m <module> --help`, in this process: the stage's main() with --help (every
    stage also runs as `python -m` in tests/test_repro.py's `dvc repro`)."""
    module = STAGES[name]["cmd"].split("-m ", 1)[1].split()[0]
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: python -m {module} ")
    assert "reads:" in out and "writes:" in out
    for path in STAGES[name].get("outs", []):
        path = path if isinstance(path, str) else next(iter(path))
        file, text = path.split("/")[-1], out.replace("\n", " ").replace("  ", "")
        assert file in text or re.sub(r"task\d(_mlp|_cnn)?", "<task>", file) in text, path


SECTIONS = {
    "base": config.BaseParams,
    "data": config.DataParams,
    "clean": config.CleanParams,
    "validate": config.ValidateParams,
    "split": config.SplitParams,
    "train": config.TrainParams,
    "task2": config.Task2Params,
    "task3": config.Task3Params,
    "task4": config.HiddenParams,
    "task5": config.HiddenParams,
    "task6": config.Task6Params,
    "task7": config.Task7Params,
    "mlflow": config.MlflowParams,
    "robustness": config.RobustnessParams,
    "gate": config.GateParams,
}


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_default_params_load(name):
    load(ROOT / "params.yaml", name, SECTIONS[name])


def test_default_params_reproduce_the_original():
    train = load(ROOT / "params.yaml", "train", config.TrainParams)
    assert (train.batch_size, train.max_epochs, train.patience) == (32, 20, 2)
    assert (train.input_channels, train.softmax_output, train.hflip) == (3, True, True)
    task2 = load(ROOT / "params.yaml", "task2", config.Task2Params)
    assert task2.learning_rates == [0.1, 0.05, 0.03, 0.01, 0.005]
    split = load(ROOT / "params.yaml", "split", config.SplitParams)
    assert (split.train_size, split.val_size, split.seed) == (15000, 1000, 0)


@pytest.mark.parametrize(
    "section, values, message",
    [
        ("train", {"batch_sise": 32}, "unknown key train.batch_sise"),
        ("train", {"input_channels": 2}, "train.input_channels: must be 1 or 3"),
        ("train", {"max_epochs": True}, "train.max_epochs: must be >= 1"),
        ("task2", {"learning_rates": []}, "task2.learning_rates"),
        ("task5", {"dropout": 1.5}, "task5.dropout"),
        ("task7", {"max_epochs": 3, "plain_epochs": 4}, "task7.plain_epochs: must be an integer"),
        ("task7", {"noise_share": 1.5}, "task7.noise_share: must be at most 1"),
        ("task7", {"noise_std": -0.1}, "task7.noise_std: must be a number >= 0"),
        ("task7", {"members": 0}, "task7.members: must be >= 1"),
        ("data", {"content_digest": "abc"}, "data.content_digest"),
    ],
)
def test_bad_params_name_the_key(tmp_path, section, values, message):
    path = write_params(tmp_path, **{section: values})
    with pytest.raises(StageError, match=message):
        load(path, section, SECTIONS[section])


def test_missing_section_and_file(tmp_path):
    (tmp_path / "params.yaml").write_text("base: {seed: 1}\n")
    with pytest.raises(StageError, match="missing section 'split'"):
        load(tmp_path / "params.yaml", "split", config.SplitParams)
    with pytest.raises(StageError, match="not found"):
        load(tmp_path / "nope.yaml", "split", config.SplitParams)


@pytest.mark.parametrize(
    "text, where",
    [
        ("base: {seed: 1}\nsplit:\n  train_size: 10\n: oops [\n", "line 4, column 1: expected"),
        ("split: {train_size: 10\n", "line 2, column 1: expected ',' or '}'"),
        ("split:\n\ttrain_size: 10\n", "line 2, column 1: found character '\\t'"),
    ],
)
def test_invalid_yaml_is_one_line_naming_where(tmp_path, text, where):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(StageError) as e:
        load(tmp_path / "params.yaml", "split", config.SplitParams)
    message = str(e.value)
    assert "\n" not in message and "not valid YAML (" in message, message
    assert where in message, message


def test_learning_rates_accept_exponent_strings(tmp_path):
    path = write_params(tmp_path, task2={"learning_rates": ["1e-3", 0.1]})
    assert load(path, "task2", config.Task2Params).learning_rates == [0.001, 0.1]


@pytest.mark.parametrize("stage", ["validate", "split", "train_task2"])
def test_missing_input_is_one_line(tmp_path, stage):
    write_params(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", f"pipeline.stages.{stage}", "--root", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        next(line for line in done.stderr.splitlines() if "error: missing input" in line)
    ], done.stderr


def test_process_age_is_this_process_start_up_so_far():
    """The timing file's startup_s: seconds since the process started, from /proc."""
    from pipeline import cli

    first = cli.process_age()
    assert first is not None and first > 0
    assert cli.process_age() >= first


@pytest.mark.slow  # runs a stage's cli.run (with no work)
def test_a_test_calling_a_stage_keeps_its_garbage_collector_as_it_was(tmp_path):
    """Only a stage's own process changes the collector (pipeline.cli.run): a test's is left."""
    import argparse
    import gc

    from pipeline import cli

    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    gc.set_threshold(701, 11, 12)  # whatever the test process set
    try:
        assert cli.run("split", argparse.Namespace(root=tmp_path), lambda paths: None) == 0
        assert gc.get_threshold() == (701, 11, 12) and gc.isenabled()
        assert gc.get_freeze_count() == frozen
    finally:
        gc.set_threshold(*before)


# A stage's process as `python -m` starts it (runpy, __main__ the stage), then what its
# collector looks like after main() returned: the stage fails on a missing input, after run().
OWN_PROCESS = """
import gc, runpy, sys
sys.argv = ["split", "--root", sys.argv[1]]
try:
    runpy.run_module("pipeline.stages.split", run_name="__main__", alter_sys=True)
except SystemExit as e:
    print(e.code, list(gc.get_threshold()), gc.isenabled(), gc.get_freeze_count() > 0)
"""


@pytest.mark.slow  # a stage's process
def test_a_stage_s_own_process_collects_less_often_and_skips_the_exit_passes(tmp_path):
    from pipeline import cli

    write_params(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", OWN_PROCESS, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0 and "error: missing input" in done.stderr, done.stderr
    assert done.stdout.split() == ["1", *str(list(cli.GC_THRESHOLDS)).split(), "False", "True"]
