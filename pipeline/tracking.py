"""MLflow set-up: where runs go, and the tags every run carries."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import subprocess
import tempfile
from importlib.metadata import version
from pathlib import Path

import torch

from pipeline.config import StageError
from pipeline.download import reason

log = logging.getLogger(__name__)
ARTIFACTS_ENV = "NOTMNIST_MLFLOW_ARTIFACTS"
RUNTIME_PACKAGES = ("torch", "mlflow", "numpy")
# The experiment's kind in MLflow 3: model training, not GenAI. MLflow 3.17's UI opens an
# experiment by its sidebar switch (GenAI by default, remembered per browser) rather than by
# this tag, so the stages also print a link that opens the runs page.
KIND_TAG, KIND_TRAINING = "mlflow.experimentKind", "custom_model_development"
RUNS_PAGE = "{uri}/#/experiments/{id}/runs?workflowType=machine_learning"


def project_dir(root: Path) -> Path:
    """The project that holds the local store: DVC_ROOT when set, else `root`.

    A queued `dvc exp run` works in a temporary copy of the project; DVC then sets DVC_ROOT
    to the real project, whose store is the one to use.
    """
    return Path(os.environ.get("DVC_ROOT") or root).resolve()


def tracking_uri(root: Path) -> str:
    """MLFLOW_TRACKING_URI when set, else the SQLite store at the project root (absolute)."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{project_dir(root) / 'mlflow.db'}"


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


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of a local store keeps its artifacts; None: MLflow's default.

    A SQLite store's go to `mlartifacts/` beside the database file: where `mlflow ui`, run
    from the project root, looks by default, ignored by git and DVC, and uploaded with the
    store by CI. NOTMNIST_MLFLOW_ARTIFACTS overrides it. A server decides for itself.
    """
    if "://" in uri and not uri.startswith(("sqlite:", "file:")):
        return None
    if os.environ.get(ARTIFACTS_ENV):
        return Path(os.environ[ARTIFACTS_ENV]).resolve().as_uri()
    db = sqlite_path(uri)
    return (db.parent / "mlartifacts").as_uri() if db else None


def setup(root: Path, experiment: str) -> str:
    """Point MLflow at the store and experiment, marked as model training; returns the URI."""
    import mlflow

    uri = tracking_uri(root)
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    with store_lock(uri):  # the first use creates the tables and the experiment
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            mlflow.create_experiment(
                experiment, artifact_location=artifact_location(uri), tags={KIND_TAG: KIND_TRAINING}
            )
        elif KIND_TAG not in found.tags:  # made before the tag existed; a user's choice stays
            mlflow.MlflowClient().set_experiment_tag(found.experiment_id, KIND_TAG, KIND_TRAINING)
    found = mlflow.set_experiment(experiment)
    if uri.startswith(("http://", "https://")):
        log.info("runs: %s", RUNS_PAGE.format(uri=uri.rstrip("/"), id=found.experiment_id))
    return uri


def store_lock(uri: str):
    """An inter-process lock for one SQLite store, else a no-op.

    Two processes opening a new SQLite store at once both run MLflow's schema migrations and
    one fails; two creating the same experiment or model version race too. Parallel stages
    (`dvc queue start -j 2`) take this lock around those steps. A server needs none.
    """
    db = sqlite_path(uri)
    if db is None:
        return contextlib.nullcontext()
    from filelock import FileLock

    key = hashlib.sha256(str(db).encode()).hexdigest()[:16]
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
