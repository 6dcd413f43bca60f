"""benchmarks/train_speed.py end to end on a tiny archive; speed is printed, never asserted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from benchmarks.train_speed import timed_stages
from pipeline.config import ROOT
from tests.conftest import make_archive, tiny_dataset, write_params

SCRIPT = ROOT / "benchmarks" / "train_speed.py"
LOOPS = ("original", "project", "project_train_only")


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600
    )


def test_help():
    done = run_script("--help")
    assert done.returncode == 0, done.stderr
    for flag in ("--epochs", "--json", "--repro", "--root", "--mirror", "--limit", "--hidden"):
        assert flag in done.stdout


def test_tiny_run(tmp_path):
    # The tiny archive's content digest is not the mirror's: a scratch params.yaml with
    # content_digest null accepts it, and split sizes that fit its 300 images.
    archive = make_archive(tmp_path / "tiny.tar.gz", tiny_dataset(per_letter=30))
    write_params(tmp_path, data={"content_digest": None}, split={"train_size": 240, "val_size": 40})
    out = tmp_path / "out.json"
    done = run_script(
        *("--epochs", "1", "--limit", "200", "--hidden", "16"),
        *("--json", str(out), "--mirror", str(archive), "--root", str(tmp_path)),
    )
    assert done.returncode == 0, done.stderr
    print(done.stdout)  # shown with -s

    fig = json.loads(out.read_text())
    assert fig["clean"]["images"] == 300
    assert fig["clean"]["seconds"] > 0 and fig["clean"]["images_per_s"] > 0
    assert fig["train"]["train_images"] == 200 and fig["train"]["val_images"] == 40
    for loop in LOOPS:
        assert len(fig[loop]["epoch_seconds"]) == 1
        for key in ("median_epoch_s", "images_per_s", "last_train_loss"):
            assert fig[loop][key] > 0, (loop, key)
    for key in ("ratio", "ratio_train_only", "peak_rss_mib", "threads", "cpus"):
        assert fig[key] > 0, key
    assert "repro" not in fig

    assert "original: ImageFolder + DataLoader" in done.stdout
    assert "project: pipeline.train.fit" in done.stdout
    assert "original / project" in done.stdout and "peak resident memory" in done.stdout


def test_stage_times_follow_the_stage_lines(tmp_path):
    code = (
        "import time\n"
        "print(\"Running stage 'a':\", flush=True)\n"
        "time.sleep(1.0)\n"
        "print(\"Running stage 'b':\", flush=True)\n"
        "print('Updating lock file', flush=True)\n"
    )
    stages, total, rc = timed_stages([sys.executable, "-c", code], tmp_path, dict(os.environ))
    assert rc == 0
    assert list(stages) == ["a", "b"]
    assert stages["a"] >= 0.9 and stages["b"] < stages["a"]  # the sleep belongs to stage a
    assert total >= stages["a"] + stages["b"]
