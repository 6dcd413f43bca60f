"""MLflow set-up, the tags every run carries, and a writer that survives a server outage."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import subprocess
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

from pipeline import numerics, signals
from pipeline.config import TASK_COLORS, StageError
from pipeline.data.archive import reason

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


def tags(
    task: str, root: Path, content_digest: str, device: torch.device, seed: int | None = None
) -> dict[str, str]:
    """Where a run comes from: code, data, seed, machine numerics, and the process (host, pid)."""
    commit, dirty = git_state(root)
    out = {
        "task": task,
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "data_content_digest": content_digest,
        "device": str(device),
        "torch_version": torch.__version__,
        **process_tags(),
        **{f"numerics.{k}": v for k, v in numerics.fingerprint(device).items()},
        **source_tags(task, root, commit),
    }
    if seed is not None:
        out["seed"] = str(seed)
    if os.environ.get("DVC_EXP_NAME"):
        out["dvc_exp_name"] = os.environ["DVC_EXP_NAME"]
    return out


def source_tags(task: str, root: Path, commit: str) -> dict[str, str]:
    """MLflow's own source tags, which its UI shows: the stage in the Source column (a job run
    by DVC), the commit in the Version column, and the branch where one is checked out."""
    out = {"mlflow.source.type": "JOB", "mlflow.source.name": stage_module(task)}
    if commit != "unknown":
        out["mlflow.source.git.commit"] = commit
    if branch := git_branch(root):
        out["mlflow.source.git.branch"] = branch
    return out


def stage_module(task: str) -> str:
    """The stage that trains `task`, as `python -m` runs it (Task 6's two models: train_task6)."""
    return f"pipeline.stages.train_{task.split('_')[0]}"


def git_branch(root: Path) -> str | None:
    """The checked-out branch; None on a detached HEAD (CI, a DVC queue's copy) or outside git."""
    try:
        done = subprocess.run(
            ["git", "symbolic-ref", "--short", "-q", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
        )
    except OSError:
        return None
    return done.stdout.strip() or None


# MLflow's chart view draws a metric named "<section>/<name>" in a section of its own and puts
# the named sections, sorted by name, ahead of the unnamed one ("Model metrics"). So a task's
# results on its parent run come first ("results" sorts before "robustness"), its robustness
# after them; the candidates' per-epoch metrics keep plain names (val_loss, ...).
RESULTS_SECTION, ROBUSTNESS_SECTION = "results", "robustness"


def results_key(name: str) -> str:
    """The MLflow name of one of a parent run's results, e.g. results/test_accuracy."""
    return f"{RESULTS_SECTION}/{name}"


def parent_tags(summary: dict, reported: dict | None) -> dict[str, str]:
    """A task's parent run as MLflow's UI shows it: the task's colour, as in `dvc plots show`,
    and a description: the task, the configuration it chose, the original's number.

    `summary` is the task's best.json; `reported`, what the original reported for the task. The
    description is plain text: the runs table shows it as such, the run's page as Markdown.
    """
    task, n = summary["task"], len(summary["candidates"])
    lines = [
        f"{summary['title']}: chose {summary['config']['label']} of {n} "
        f"configuration{'s' if n > 1 else ''} by validation loss (epoch {summary['best_epoch']} "
        f"of {summary['epochs_run']}: val loss {summary['val_loss']:.4f}, val accuracy "
        f"{100 * summary['val_accuracy']:.2f}%).",
        f"The original coursework reported {100 * reported['test_accuracy']:.2f}% test accuracy "
        f"({reported['model']}); this model's is {results_key('test_accuracy')}, from the "
        "evaluate stage."
        if reported
        else "Beyond the original coursework, which reported no number for this task.",
    ]
    return {"mlflow.note.content": "\n\n".join(lines), "mlflow.runColor": TASK_COLORS[task]}


def describe_parent(tracker, parent, summary: dict, reported: dict | None) -> None:
    """Give the parent run its description and colour (parent_tags), in the tracker's order.

    A note already on the run stays, below: a run marked KILLED by mark_stale_runs, then
    resumed to its end, says so.
    """

    def write():
        from mlflow.entities import RunTag

        run_id, tags = _resolve(parent), parent_tags(summary, reported)
        ours = tags["mlflow.note.content"]
        earlier = tracker.client.get_run(run_id).data.tags.get("mlflow.note.content", "")
        if earlier := earlier.removeprefix(ours).strip():  # not ours: from before, kept
            tags["mlflow.note.content"] = f"{ours}\n\n{earlier}"
        tracker.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    tracker.call(write)


def process_tags(pid: int | None = None) -> dict[str, str]:
    """The host and process that own a run, so a later start can tell if it is still alive."""
    pid = pid or os.getpid()
    out = {"host": socket.gethostname(), "pid": str(pid)}
    if started := process_start(pid):
        out["pid_start"] = started
    return out


def process_start(pid: int) -> str | None:
    """A process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def process_alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return started is None or process_start(pid) in (None, started)


def mark_stale_runs(client, experiment_id: str, task: str, stage: str) -> list[str]:
    """Mark KILLED this task's RUNNING runs whose process (on this host) is gone; returns ids.

    A process killed by SIGKILL or the out-of-memory killer cannot end its runs. Runs of live
    processes (a queued experiment's worker) and of other hosts are left alone.
    """
    here, marked = socket.gethostname(), []
    runs = client.search_runs(
        [experiment_id], f"tags.task = '{task}' and attributes.status = 'RUNNING'"
    )
    for run in runs:
        t = run.data.tags
        if t.get("host") != here or not t.get("pid", "").isdigit():
            continue
        if process_alive(int(t["pid"]), t.get("pid_start")):
            continue
        note = (
            f"Marked KILLED by the next start of {stage} on "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}: its process (pid {t['pid']} on {here}) "
            "had ended without ending the run (killed by SIGKILL or out of memory)."
        )
        client.set_tag(run.info.run_id, "mlflow.note.content", note)
        client.set_terminated(run.info.run_id, status="KILLED")
        marked.append(run.info.run_id)
    if marked:
        log.info("marked %d stale run(s) of %s KILLED: %s", len(marked), task, ", ".join(marked))
    return marked


class RunRef:
    """An MLflow run whose id may arrive later (its creation can wait in the buffer)."""

    def __init__(self, name: str):
        self.name, self.id, self.ended = name, None, False


def _resolve(value):
    if isinstance(value, RunRef):
        if value.id is None:
            raise RuntimeError(f"run {value.name} used before it was created")
        return value.id
    return value


class Tracker:
    """The stage's MLflow writes, in order; held back while an MLflow server does not answer.

    Each write runs at once when it can. When a write fails and the server does not answer
    its health check, that write and every later one wait in a buffer (training goes on) and
    are sent, in order, once the server answers again. finish() waits at most `wait_s` for
    that, then fails in one line; the caller keeps its checkpoints, so a rerun resumes.
    """

    PROBE_EVERY_S = 5.0

    def __init__(self, uri: str, experiment_id: str, wait_s: float | None = None):
        from mlflow import MlflowClient

        self.uri, self.experiment_id = uri, experiment_id
        self.client = MlflowClient(uri)
        self.wait_s = wait_s if wait_s is not None else float(os.environ.get(WAIT_ENV, 60))
        self.pending: list = []
        self.refs: list[RunRef] = []
        self.down_since: float | None = None
        self.next_probe = 0.0

    # -- writes
    def start_run(
        self,
        name: str,
        tags: dict,
        parent: RunRef | None = None,
        resume_id: str | None = None,
        on_created=None,
    ) -> RunRef:
        """A new run (nested under `parent`), or the run `resume_id` reopened if it exists.

        on_created(ref) runs with the creation, in one step (e.g. to record the run's id).
        """
        ref = RunRef(name)
        self.refs.append(ref)

        def create():
            if resume_id and self._exists(resume_id):
                self.client.update_run(resume_id, status="RUNNING")
                ref.id = resume_id
            else:
                all_tags = dict(tags)
                if parent is not None:
                    all_tags["mlflow.parentRunId"] = _resolve(parent)
                ref.id = self.client.create_run(
                    self.experiment_id, tags=all_tags, run_name=name
                ).info.run_id
            if on_created:
                on_created(ref)

        self.call(create)
        return ref

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_run(run_id).info.experiment_id == self.experiment_id
        except MlflowException:
            return False

    def log(
        self,
        ref: RunRef,
        metrics: dict | None = None,
        params: dict | None = None,
        tags: dict | None = None,
        step: int | None = None,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)  # when it happened, not when the buffer is sent
        batch = {
            "metrics": [Metric(k, float(v), now, step or 0) for k, v in (metrics or {}).items()],
            "params": [Param(k, str(v)) for k, v in (params or {}).items()],
            "tags": [RunTag(k, str(v)) for k, v in (tags or {}).items()],
        }
        self.call(lambda: self.client.log_batch(_resolve(ref), **batch))

    def log_bytes(self, ref: RunRef, name: str, data: bytes, folder: str | None = None) -> None:
        """A small file artifact, kept in memory, so a held write needs no file of its own."""

        def upload():
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / name
                path.write_bytes(data)
                self.client.log_artifact(_resolve(ref), str(path), folder)

        self.call(upload)

    def log_file(self, ref: RunRef, path: Path, folder: str | None = None) -> None:
        self.log_bytes(ref, path.name, path.read_bytes(), folder)

    def end_run(self, ref: RunRef, status: str = "FINISHED") -> None:
        def end():
            self.client.set_terminated(_resolve(ref), status=status)
            ref.ended = True

        self.call(end)

    def call(self, fn) -> None:
        """Run fn now, or after the writes waiting before it."""
        self.pending.append(fn)
        self.flush()

    # -- the buffer
    def flush(self, wait_s: float = 0.0) -> bool:
        """Send waiting writes in order; True when none is left."""
        deadline = time.monotonic() + wait_s
        while self.pending:
            if self.down_since is not None:
                if not self._answers(deadline):
                    return False
                log.warning(
                    "MLflow tracking server %s answers again: sending %d held write(s)",
                    self.uri,
                    len(self.pending),
                )
                self.down_since = None
            try:
                with signals.shield():  # a database write is never cut in half
                    self.pending[0]()
            except Exception:
                if not self.uri.startswith(("http://", "https://")) or server_answers(self.uri):
                    raise
                self.down_since = time.monotonic()
                self.next_probe = self.down_since + self.PROBE_EVERY_S
                log.warning(
                    "MLflow tracking server %s stopped answering: holding its "
                    "writes, training goes on",
                    self.uri,
                )
                continue
            self.pending.pop(0)
        return True

    def _answers(self, deadline: float) -> bool:
        while True:
            now = time.monotonic()
            if now >= self.next_probe:
                self.next_probe = now + self.PROBE_EVERY_S
                if server_answers(self.uri):
                    return True
            if now >= deadline:
                return False
            time.sleep(max(0.0, min(self.next_probe, deadline) - now))

    def finish(self, keep: str) -> None:
        """Wait (at most wait_s) until every write is sent, else fail in one line."""
        if self.pending and self.down_since is not None:
            log.info("waiting up to %.0f s for MLflow tracking server %s", self.wait_s, self.uri)
        if not self.flush(self.wait_s):
            raise StageError(
                f"MLflow tracking server {self.uri} did not answer for {self.wait_s:.0f} s; "
                f"{len(self.pending)} write(s) not sent. {keep}"
            )

    def end_open(self, status: str) -> int:
        """On the way out: end every run still open with `status` (no buffer); returns how many."""
        count = 0
        for ref in self.refs:
            if ref.id and not ref.ended:
                with contextlib.suppress(Exception):
                    self.client.set_terminated(ref.id, status=status)
                    ref.ended = True
                    count += 1
        return count


WAIT_ENV = "NOTMNIST_MLFLOW_WAIT_S"


def server_env() -> dict[str, str]:
    """Environment for an `mlflow server` or `mlflow ui` the project starts: MLflow 3's job
    runner off, unless the environment turns it on. The runner is 8 more processes (about
    17 CPU seconds to start, then polling) for features the project does not use (GenAI
    judges, trace roll-ups)."""
    name = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
    return {name: os.environ.get(name, "false")}


def server_answers(uri: str, timeout_s: float = 3.0) -> bool:
    import requests

    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).ok
    except requests.RequestException:
        return False


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
    runs = (
        []
        if found is None
        else client.search_runs(
            [found.experiment_id],
            f"tags.task = '{task}' AND tags.`mlflow.parentRunId` IS NULL "
            f"AND attributes.run_id = '{run_id}'",
        )
    )
    if not runs:
        raise StageError(
            f"{task}'s MLflow parent run {run_id} is not in experiment '{experiment}' of "
            f"{client.tracking_uri}; retrain it with `dvc repro --force train_{task}`"
        )
    return runs[0].info.run_id
