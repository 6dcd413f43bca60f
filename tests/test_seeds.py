"""The seed study: parsing DVC's output, the statistics over seeds, and the files it writes."""

from __future__ import annotations

import json
import statistics
import subprocess

import pytest

from pipeline import seeds
from pipeline.config import Paths, StageError
from pipeline.evaluation import original

LOG = """\
Reproducing experiment 'seed-1'
'data/raw/notMNIST_small.tar.gz' didn't change, skipping
Stage 'split' didn't change, skipping
Running stage 'train_task2':
> python -m pipeline.stages.train_task2
Running stage 'evaluate':
> python -m pipeline.stages.evaluate
Updating lock file 'dvc.lock'
"""


@pytest.mark.slow
def test_the_queue_is_read_as_dvc_queue_status_lists_it(tmp_path):
    """A queued experiment in a real git + DVC repository: its task id, name and status."""

    def run(*cmd: str) -> str:
        return subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True, text=True).stdout

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    (tmp_path / "params.yaml").write_text("base:\n  seed: 0\n")
    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  report:\n    cmd: echo\n    params: [base.seed]\n"
    )
    run("git", "add", "-A")
    run("git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "x")
    assert seeds.queue_tasks(tmp_path) == {}
    run("dvc", "exp", "run", "--queue", "-n", "seed-3", "-S", "base.seed=3", "report")
    ((task, row),) = seeds.queue_tasks(tmp_path).items()
    assert row == ("seed-3", "Queued")
    listed = [line.split() for line in run("dvc", "queue", "status").splitlines()]
    assert [task, "seed-3"] in [cells[:2] for cells in listed]
    run("dvc", "queue", "remove", "--all")
    assert seeds.queue_tasks(tmp_path) == {}


def test_a_queue_that_cannot_be_read_is_one_line(tmp_path):
    with pytest.raises(StageError, match="^cannot read the DVC queue: .*") as e:
        seeds.queue_tasks(tmp_path)  # not a DVC repository
    assert "\n" not in str(e.value)


def scripted_queue(monkeypatch, tmp_path, statuses: list[dict]) -> list[list[str]]:
    """seeds.queue_tasks answering with `statuses` in turn; seeds.dvc (`queue logs`): a line."""
    calls = []

    def dvc(root, *args, check=True):
        calls.append(list(args))
        return "last line\n"

    monkeypatch.setattr(seeds, "queue_tasks", lambda root: statuses.pop(0))
    monkeypatch.setattr(seeds, "dvc", dvc)
    monkeypatch.setattr(seeds, "POLL_S", 0)
    (tmp_path / ".dvc" / "tmp" / "seeds").mkdir(parents=True, exist_ok=True)
    return calls


def status(*rows: str) -> dict:
    """{task id: (name, status)} from "task name status" rows."""
    return {task: (name, state) for task, name, state in (r.split() for r in rows)}


def test_wait_looks_again_at_a_task_on_its_way_to_a_worker(monkeypatch, tmp_path):
    """Between the queue and a worker a task is briefly in neither list: not a failure."""
    a, b = "aaaaaaa seed-1 ", "bbbbbbb seed-2 "
    statuses = [
        status(a + "Running", b + "Queued"),
        status(a + "Running"),
        status(a + "Running"),
        status(a + "Success", b + "Running"),
        status(a + "Success", b + "Success"),
    ]
    scripted_queue(monkeypatch, tmp_path, statuses)
    seeds.wait(Paths(tmp_path), {"aaaaaaa": "seed-1", "bbbbbbb": "seed-2"}, None)
    assert statuses == []


def test_wait_fails_on_a_failed_task_or_one_lost_for_good(monkeypatch, tmp_path):
    a, b = "aaaaaaa seed-1 ", "bbbbbbb seed-2 "
    ours = {"aaaaaaa": "seed-1", "bbbbbbb": "seed-2"}
    scripted_queue(monkeypatch, tmp_path, [status(a + "Running", b + "Failed")])
    with pytest.raises(StageError, match=r"failed: seed-2 .*seed-2: last line"):
        seeds.wait(Paths(tmp_path), ours, None)
    scripted_queue(monkeypatch, tmp_path, [status(a + "Running")] * seeds.MISSING_POLLS)
    with pytest.raises(StageError, match="failed: seed-2"):
        seeds.wait(Paths(tmp_path), ours, None)
    assert (tmp_path / ".dvc" / "tmp" / "seeds" / "seed-2.log").read_text() == "last line\n"


def test_stages_run_are_read_from_the_log():
    assert seeds.stages_run(LOG) == ["train_task2", "evaluate"]
    assert seeds.stages_run("Stage 'split' didn't change, skipping\n") == []


def exp_record(name: str, rev: str, seed: int, error=None) -> dict:
    """One experiment as `dvc exp show --json` (DVC 3) lists it."""
    data = {
        "rev": rev,
        "params": {"params.yaml": {"data": {"base": {"seed": seed}}}},
        "metrics": {},
    }
    return {
        "revs": [{"rev": rev, "name": name, "data": data, "error": error, "experiments": None}],
        "name": name,
    }


def test_experiment_revs_from_exp_show_json():
    shown = [
        {"rev": "workspace", "name": None, "experiments": None},
        {
            "rev": "d2d8" * 10,
            "name": "main",
            "experiments": [
                exp_record("seed-1", "24af" * 10, 1),
                exp_record("seed-0", "1451" * 10, 0),
                exp_record("lr-high", "9999" * 10, 0),
                exp_record("seed-2", "aaaa" * 10, 2, error={"msg": "failed"}),
            ],
        },
    ]
    found = seeds.experiment_revs(shown, ["seed-0", "seed-1", "seed-2"])
    assert found == {
        "seed-0": {"rev": "1451" * 10, "seed": 0},
        "seed-1": {"rev": "24af" * 10, "seed": 1},
    }


def seed_metrics(acc2, lr, acc3, hidden, acc6) -> dict:
    """A metrics.json with Tasks 2, 3 and 6 (CNN)."""
    return {
        "task2": {
            "test_accuracy": acc2,
            "test_unique_accuracy": acc2 - 0.002,
            "config": {"label": f"lr={lr}", "lr": lr},
        },
        "task3": {
            "test_accuracy": acc3,
            "test_unique_accuracy": acc3 - 0.002,
            "config": {"label": f"hidden={hidden}", "lr": lr},
        },
        "task6_cnn": {
            "test_accuracy": acc6,
            "test_unique_accuracy": acc6 - 0.002,
            "config": {"label": "lr=0.001", "lr": 0.001},
        },
    }


PER_SEED = {
    0: seed_metrics(0.8954, 0.05, 0.8954, 1000, 0.9314),
    1: seed_metrics(0.8910, 0.1, 0.8880, 500, 0.9280),
    2: seed_metrics(0.8990, 0.05, 0.8990, 1000, 0.9350),
    3: seed_metrics(0.8938, 0.05, 0.8930, 1000, 0.9300),
}


def test_summary_statistics_by_hand():
    tasks = seeds.summarize(PER_SEED)
    assert list(tasks) == ["task2", "task3", "task6_cnn"]  # the pipeline's order
    t2 = tasks["task2"]
    values = [0.8954, 0.8910, 0.8990, 0.8938]
    assert t2["accuracies"] == {"0": 0.8954, "1": 0.8910, "2": 0.8990, "3": 0.8938}
    assert t2["mean"] == pytest.approx(statistics.mean(values))
    assert t2["sd"] == pytest.approx(statistics.stdev(values))  # n - 1
    assert (t2["min"], t2["max"]) == (0.8910, 0.8990)
    assert t2["unique_mean"] == pytest.approx(statistics.mean(values) - 0.002)
    assert t2["chosen"] == {"lr=0.05": 3, "lr=0.1": 1}
    assert tasks["task3"]["chosen"] == {"hidden=1000": 3, "hidden=500": 1}
    assert tasks["task3"]["lr"] == {"0.05": 3, "0.1": 1}  # Task 2's choice, inherited


def test_the_original_against_the_seeds():
    tasks = seeds.summarize(PER_SEED)
    t2, t3 = tasks["task2"], tasks["task3"]
    # Task 2: 89.46 inside [89.10, 89.90]; mean 89.48, sd 0.334: z = -0.06.
    assert t2["original"] == original.REPORTED["task2"]["test_accuracy"] == 0.8946
    assert t2["original_in_range"] is True and t2["original_within_2sd"] is True
    assert t2["original_z"] == pytest.approx((0.8946 - 0.8948) / 0.0033392, rel=1e-3)
    # Task 3: 89.24 inside [88.80, 89.90]
    assert t3["original_in_range"] is True
    # Task 6 has no original
    assert tasks["task6_cnn"]["original"] is None
    assert "original_within_2sd" not in tasks["task6_cnn"]


def test_an_original_outside_two_sd_is_flagged():
    per_seed = {
        k: {
            "task4": {
                "test_accuracy": a,
                "test_unique_accuracy": a,
                "config": {"label": "hidden=500-500", "lr": 0.05},
            }
        }
        for k, a in enumerate([0.8910, 0.8920, 0.8915, 0.8905])
    }
    t = seeds.summarize(per_seed)["task4"]  # the original's 88.40 is far below
    assert t["original_in_range"] is False and t["original_within_2sd"] is False
    assert t["original_z"] < -2


def test_one_seed_is_not_a_study():
    with pytest.raises(StageError, match="at least 2 seeds"):
        seeds.summarize({0: PER_SEED[0]})


def test_sd_factors_match_the_chi_square_interval():
    low, high = seeds.sd_factors(5)  # df 4: chi2 quantiles 0.4844 and 11.1433
    assert low == pytest.approx((4 / 11.143287) ** 0.5, rel=1e-5)
    assert high == pytest.approx((4 / 0.484419) ** 0.5, rel=1e-5)


def study_dict() -> dict:
    return {
        "n": 4,
        "seeds": [0, 1, 2, 3],
        "baseline_commit": "ab" * 20,
        "workspace_dirty": False,
        "split_seed": 0,
        "target": "report",
        "wall_seconds": 1234.5,
        "jobs": 2,
        "stages_run": {"seed-0": ["train_task2", "evaluate"], "seed-1": ["train_task2"]},
        "experiments": {},
        "tasks": seeds.summarize(PER_SEED),
    }


def test_markdown_tables():
    text = seeds.study_markdown(study_dict())
    assert text.startswith("# Seed study\n")
    row = next(line for line in text.splitlines() if line.startswith("| task2 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:8] == ["task2", "89.46", "89.48 +- 0.33", "89.10", "89.90", "yes", "yes", "-0.06"]
    assert cells[8] == "lr=0.05: 3, lr=0.1: 1"
    cnn = next(line for line in text.splitlines() if line.startswith("| task6_cnn |"))
    assert "| 93.11 +- 0.30 |" in cnn
    assert "| 2 | 89.90 | 89.90 | 93.50 |" in text  # the per-seed table
    assert "1,234 s with 2 worker(s)" in text or "1,235 s with 2 worker(s)" in text
    assert "the data stages came from the DVC cache" in text
    assert "commit `abababababab`" in text


def test_markdown_says_when_a_data_stage_reran():
    study = {**study_dict(), "stages_run": {"seed-0": ["split", "train_task2"]}}
    assert "Data stages rerun in an experiment: split." in seeds.study_markdown(study)


def test_aggregate_writes_json_markdown_and_png(tmp_path, monkeypatch):
    monkeypatch.setattr(
        seeds,
        "collect",
        lambda paths, s, baseline: (
            PER_SEED,
            {f"seed-{k}": {"rev": f"{k}" * 40, "seed": k} for k in PER_SEED},
        ),
    )
    monkeypatch.setattr(seeds, "git_show", lambda root, rev, path: "split:\n  seed: 3\n")
    monkeypatch.setattr(seeds, "command", lambda root, *args, check=True: "")
    paths = Paths(tmp_path)
    study = seeds.aggregate(
        paths, [0, 1, 2, 3], "ab" * 20, {"wall_seconds": 10.0, "jobs": 2, "stages_run": {}}
    )
    saved = json.loads((paths.seeds_dir / "seeds.json").read_text())
    assert saved == json.loads(json.dumps(study))
    assert saved["split_seed"] == 3 and saved["wall_seconds"] == 10.0
    assert saved["experiments"]["seed-2"] == {"rev": "2" * 40, "seed": 2}
    assert (paths.seeds_dir / "seeds.md").read_text().startswith("# Seed study")
    assert (paths.seeds_dir / "seeds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Aggregating the same experiments again keeps the run's wall time.
    again = seeds.aggregate(paths, [0, 1, 2, 3], "ab" * 20, None)
    assert again["wall_seconds"] == 10.0 and again["jobs"] == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seeds", "1"], "--seeds 1: need at least 2 seeds"),
        (["--jobs", "0"], "--jobs 0: need at least 1 worker"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, capsys, args, message):
    assert seeds.main(["--root", str(tmp_path), *args]) == 1
    assert capsys.readouterr().err.strip() == f"seeds: error: {message}"


def test_help_says_what_it_reads_and_writes(capsys):
    with pytest.raises(SystemExit) as done:
        seeds.main(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0
    assert out.startswith("usage: python -m pipeline.seeds ")
    for text in ("reads:", "writes:", "reports/seeds/seeds.json", "seeds.png", "--jobs", "--run"):
        assert text in out
