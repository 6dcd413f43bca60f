"""Session fixtures for a team's stack: PostgreSQL, an S3 endpoint (moto) and `mlflow server`.

Started once per test session with `python -m scripts.server start` (behind `make server`),
on 127.0.0.1, and stopped with `python -m scripts.server stop` whether the tests pass or fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.config import ROOT

SCRIPT = ["-m", "scripts.server"]  # the module behind `make server`
SCRIPT_ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def alive(pid: int) -> bool:
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="session")
def stack(tmp_path_factory) -> dict:
    """The stack's state: `env` (the variables a client exports), `backend_store_uri`, pids."""
    folder = tmp_path_factory.mktemp("stack")
    cmd = [sys.executable, *SCRIPT, "start", "--dir", str(folder), "--port", "0", "--json"]
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, cwd=folder, env=SCRIPT_ENV
        )
        if done.returncode:
            logs = {p.name: p.read_text()[-3000:] for p in folder.glob("*.log")}
            pytest.fail(f"the stack did not start: {done.stderr}\n{logs}")
        state = json.loads(done.stdout)
        yield state
    finally:
        started = (
            json.loads((folder / "state.json").read_text())
            if (folder / "state.json").exists()
            else {"pids": {}}
        )
        subprocess.run(
            [sys.executable, *SCRIPT, "stop", "--dir", str(folder)],
            capture_output=True,
            timeout=120,
            cwd=ROOT,
        )
        left = [pid for pid in started["pids"].values() if alive(pid)]
        assert not left, f"stack processes still running: {left}"


def client_env(state: dict, **extra) -> dict:
    """This environment pointed at the stack, as a team member's shell would be."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("MLFLOW_", "AWS_", "DVC_")) and k != "NOTMNIST_MLFLOW_ARTIFACTS"
    }
    env.update(state["env"], **extra)
    env.pop("MLFLOW_S3_ENDPOINT_URL")  # the server proxies artifacts: clients need no S3 endpoint
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"
    return env
