"""MLflow set-up: where runs go, and the tags every run carries."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from pipeline.config import StageError
from pipeline.download import reason

ARTIFACTS_ENV = "NOTMNIST_MLFLOW_ARTIFACTS"
RUNTIME_PACKAGES = ("torch", "mlflow", "numpy")


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else the SQLite store at the project root (absolute).

    A queued `dvc exp run` works in a temporary copy of the project; DVC then sets DVC_ROOT
    to the real project, whose store is the one to use.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    project = Path(os.environ.get("DVC_ROOT") or root).resolve()
    return f"sqlite:///{project / 'mlflow.db'}"


def check_server(uri: str, timeout_s: float = 10.0) -> None:
    """Fail fast, in one line, when an http(s) tracking server does not answer.

    MLflow retries a failed request for minutes by default; this also bounds its retries
    for the calls that follow (unless the MLFLOW_HTTP_REQUEST_* variables are set).
    """
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s)
    except requests.RequestException as e:
        raise StageError(f"MLflow tracking server {uri} is unreachable ({reason(e)})") from None


def artifacts_dir() -> Path:
    """A local store's artifacts: outside the project tree, where DVC and git never look."""
    if os.environ.get(ARTIFACTS_ENV):
        return Path(os.environ[ARTIFACTS_ENV]).resolve()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "notmnist-pipeline" / "mlartifacts"


def setup(root: Path, experiment: str) -> str:
    """Point MLflow at the store and experiment; returns the tracking URI."""
    import mlflow

    uri = tracking_uri(root)
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):  # the first use creates the tables and the experiment
        if mlflow.get_experiment_by_name(experiment) is None:
            local = uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri
            location = artifacts_dir().as_uri() if local else None
            mlflow.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment)
    return uri


def store_lock(uri: str):
    """An inter-process lock for one SQLite store, else a no-op.

    Two processes opening a new SQLite store at once both run MLflow's schema migrations and
    one fails; two creating the same experiment or model version race too. Parallel stages
    (`dvc queue start -j 2`) take this lock around those steps. A server needs none.
    """
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    path = uri.removeprefix("sqlite:///").split("?")[0]
    key = hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"notmnist-mlflow-{key}.lock", timeout=300)


def git_state(root: Path) -> tuple[str, bool | None]:
    """(commit, dirty) of the project, or ("unknown", None) outside git."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None


def tags(task: str, root: Path, content_digest: str, device: torch.device) -> dict[str, str]:
    commit, dirty = git_state(root)
    out = {
        "task": task,
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "data_content_digest": content_digest,
        "device": str(device),
        "torch_version": torch.__version__,
    }
    if os.environ.get("DVC_EXP_NAME"):
        out["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return out


def flatten(params: dict, prefix: str = "") -> dict[str, object]:
    """{'train': {'batch_size': 32}} -> {'train.batch_size': 32}."""
    out = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def pip_requirements() -> list[str]:
    """The installed runtime packages, pinned (saves MLflow ~10 s of inferring them)."""
    return [f"{name}=={version(name)}" for name in RUNTIME_PACKAGES]


def recorded_run_id(paths, task: str) -> str:
    """The parent MLflow run id the training stage recorded for `task`.

    Read from reports/train/<task>/mlflow.json, or, where a run predates that file, from the
    "mlflow" entry of reports/train/<task>/best.json.
    """
    from pipeline.files import read_json

    folder = paths.train_reports(task)
    path = folder / "mlflow.json"
    try:
        record = read_json(path) if path.is_file() else read_json(folder / "best.json")["mlflow"]
        return str(record["parent_run_id"])
    except (KeyError, TypeError):
        raise StageError(f"{folder}: no MLflow parent run id recorded for {task}") from None


def parent_run(client, paths, task: str, experiment: str) -> str:
    """The id of `task`'s parent run in `experiment`: the recorded one, checked in the store.

    Searched as a run tagged with the task, without a parent, whose id the training stage
    recorded; a StageError in one line when the store does not have it.
    """
    run_id = recorded_run_id(paths, task)
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs(
        [found.experiment_id],
        f"tags.task = '{task}' AND tags.`mlflow.parentRunId` IS NULL "
        f"AND attributes.run_id = '{run_id}'",
    )  # fmt: skip
    if not runs:
        raise StageError(
            f"{task}'s MLflow parent run {run_id} is not in experiment '{experiment}' of "
            f"{client.tracking_uri}; retrain it with `dvc repro --force train_{task}`"
        )
    return runs[0].info.run_id
