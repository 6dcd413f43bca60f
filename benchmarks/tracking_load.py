"""Many writers at once on one MLflow store: a team's tracking server, or the SQLite file.

Run through `python -m benchmarks.load tracking` and `python -m benchmarks.load sqlite`. Each
writer is a process of its own (`python -m benchmarks.tracking_load writer ...`, internal): it
imports MLflow, says "ready", waits for "go" on its stdin (so the K or N writers start their
writes together, not their imports) and prints what it sent as one line of JSON. Afterwards the
orchestrator counts, through MlflowClient (and boto3 for the team stack's bucket), every run,
status, metric step, param and artifact the writers said they sent.

Two ways of writing:

- team: a tiny training run as a team member's script logs it: params, the training data as a
  dataset input (the same for every writer), per-epoch metrics one `log_metric` call each, a
  model artifact (a weights file and an MLmodel file), FINISHED.
- stage: what one `train_*` stage and then `evaluate` write (pipeline/training/runner.py and
  pipeline/stages/evaluate.py, reproduced here rather than imported): a search for stale runs,
  a parent run with the stages' tags and params, a dataset input, nested runs per
  configuration whose per-epoch metrics go in one `log_batch` each, history and curve files,
  the model, the evaluation's single `log_metric` calls and files, and a registered model
  version under the same file lock the stages take around registering.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

log = logging.getLogger("benchmarks.load")
ROOT = Path(__file__).resolve().parents[1]
TEAM_METRICS = ("train_loss", "val_loss", "val_accuracy")
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "epoch_seconds")
BEST_METRICS = (
    "best_train_loss",
    "best_train_accuracy",
    "best_val_loss",
    "best_val_accuracy",
    "best_epoch",
)
EVAL_METRICS = ("test_accuracy", "test_loss", "test_unique_accuracy")
MODEL_NAME = "load-classifier-{}"  # per experiment id; registered by the stage writers
WRITERS_K, WRITERS_N = (2, 4, 8), (1, 2, 4, 8)
LOCKED = "database is locked"
# Whether writers log the training data as a dataset input, set by the writer's --no-dataset.
# Writers that log the same data set for the first time in an experiment at once can race.
LOG_DATASETS = True
RESULT = "@@load "  # a writer's result line starts with this
TELEMETRY_VAR = "_MLFLOW_TELEMETRY_SESSION_ID"
COUNTS = (
    "complete",
    "finished",
    "params_found",
    "steps_sent",
    "steps_found",
    "steps_duplicated",
    "artifacts_found",
    "objects_found",
)


# --------------------------------------------------------------------------- one writer


def error_kind(e: BaseException) -> str:
    """A failed call's kind: `database is locked`, a UNIQUE constraint of a table, MLflow's
    telemetry race, a timeout, or the exception's type."""
    text = str(e)
    if LOCKED in text:
        return LOCKED
    if TELEMETRY_VAR in text:  # its thread unset the variable while a request read os.environ
        return "KeyError from MLflow's telemetry thread"
    if m := re.search(r"UNIQUE constraint failed: (\w+)|duplicate key value violates unique "
                      r'constraint "(\w+)"', text):  # fmt: skip
        return f"UNIQUE constraint failed ({m[1] or m[2]})"
    if "timed out" in text.lower() or isinstance(e, TimeoutError):
        return "timeout"
    return type(e).__name__


def failed_in(e: BaseException) -> str:
    """The function of this module whose call failed."""
    frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == __file__]
    return frames[-1].name if frames else "?"


def curve(seed: int, epoch: int, name: str) -> float:
    """A plausible, deterministic metric value: losses fall, accuracies rise, with noise."""
    noise = np.random.default_rng([seed, epoch, len(name)]).normal(0, 0.01)
    if "accuracy" in name:
        return float(min(1.0, 0.6 + 0.35 * (1 - np.exp(-epoch / 5)) + noise))
    if name == "epoch_seconds":
        return float(1.5 + abs(noise) * 10)
    return float(0.3 + 1.5 * np.exp(-epoch / 5) + noise)


def model_files(folder: Path, kib: int, seed: int) -> dict[str, int]:
    """A small model: float32 weights of `kib` KiB and an MLmodel file; {path: bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = np.random.default_rng(seed).standard_normal(kib * 256).astype(np.float32)
    np.save(folder / "weights.npy", weights)
    (folder / "MLmodel").write_text(f"artifact_path: model\nflavors:\n  numpy:\n    seed: {seed}\n")
    return {f"model/{p.name}": p.stat().st_size for p in sorted(folder.iterdir())}


def team_run(client, experiment_id: str, index: int, number: int, epochs: int, kib: int) -> dict:
    """One tiny training run, as a team member's script logs it; what was sent."""
    from mlflow.entities import Param

    seed = 1000 * index + number
    start = time.perf_counter()
    run = client.create_run(
        experiment_id,
        run_name=f"writer{index} run{number}",
        tags={"writer": str(index), "host": socket.gethostname()},
    )
    run_id = run.info.run_id
    params = {
        "lr": 0.01 * (1 + number),
        "batch_size": 64,
        "seed": seed,
        "writer": index,
        **{f"hidden.{j}": 32 * (j + 1) for j in range(16)},
    }
    client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
    log_dataset(client, run_id)  # the training data: the same for every writer
    for epoch in range(1, epochs + 1):
        for name in TEAM_METRICS:
            client.log_metric(run_id, name, curve(seed, epoch, name), step=epoch)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = model_files(Path(tmp) / "model", kib, seed)
        client.log_artifacts(run_id, str(Path(tmp) / "model"), "model")
    client.set_terminated(run_id, "FINISHED")
    return {
        "run_id": run_id,
        "seconds": time.perf_counter() - start,
        "params": len(params),
        "metrics": {name: list(range(1, epochs + 1)) for name in TEAM_METRICS},
        "artifacts": artifacts,
    }


def store_lock(uri: str):
    """The lock the stages take around creating experiments and model versions in a SQLite
    store (pipeline/tracking.py's store_lock: same file, so the two exclude each other)."""
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()
    key = hashlib.sha256(str(db).encode()).hexdigest()[:16]
    return FileLock(Path(tempfile.gettempdir()) / f"notmnist-mlflow-{key}.lock", timeout=300)


def stage_tags(task: str, index: int) -> dict[str, str]:
    """The tags the stages put on every run (pipeline/tracking.py's tags())."""
    numerics = {f"numerics.{k}": "x" for k in ("mode", "threads", "deterministic", "tf32", "cudnn")}
    return {
        "task": task,
        "git_commit": "0" * 40,
        "git_dirty": "false",
        "data_content_digest": "f" * 64,
        "device": "cpu",
        "torch_version": "2",
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "pid_start": "1",
        "seed": str(index),
        "writer": str(index),
        **numerics,
    }


def log_dataset(client, run_id: str) -> None:
    """A dataset input, as the stages record the training data (unless --no-dataset)."""
    if not LOG_DATASETS:
        return
    import mlflow
    from mlflow.entities import DatasetInput, InputTag

    dataset = mlflow.data.from_numpy(
        np.zeros((1, 28, 28), np.float32), name="notMNIST_small", digest="f" * 16
    )
    entry = DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")])
    client.log_inputs(run_id, datasets=[entry])


def batch(
    metrics: dict | None = None, params: dict | None = None, tags: dict | None = None, step: int = 0
) -> dict:
    """log_batch's arguments, as the stages' Tracker.log builds them."""
    from mlflow.entities import Metric, Param, RunTag

    now = int(time.time() * 1000)
    return {
        "metrics": [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()],
        "params": [Param(k, str(v)) for k, v in (params or {}).items()],
        "tags": [RunTag(k, str(v)) for k, v in (tags or {}).items()],
    }


def stage_children(
    client,
    experiment_id: str,
    parent: str,
    task: str,
    tags: dict,
    flat: dict,
    children: int,
    epochs: int,
    seed: int,
    tmp: Path,
) -> list[dict]:
    """The nested runs of one stage: one per configuration, epochs interleaved as the sweep's
    workers report them; what was sent for each."""
    kids = []
    for c in range(children):
        run = client.create_run(
            experiment_id,
            run_name=f"{task} c{c}",
            tags={**tags, "config_key": f"{seed}-{c}", "mlflow.parentRunId": parent},
        )
        kid_params = {**flat, "lr": 0.1 / (c + 1), "hidden": "64-32"}
        client.log_batch(run.info.run_id, **batch(params=kid_params))
        log_dataset(client, run.info.run_id)
        kids.append(
            {
                "run_id": run.info.run_id,
                "params": len(kid_params),
                "artifacts": {},
                "metrics": {name: list(range(1, epochs + 1)) for name in EPOCH_METRICS},
            }
        )
    for epoch in range(1, epochs + 1):
        for c, kid in enumerate(kids):
            values = {name: curve(seed + c, epoch, name) for name in EPOCH_METRICS}
            client.log_batch(kid["run_id"], **batch(metrics=values, step=epoch))
    for c, kid in enumerate(kids):
        history = tmp / f"history{c}" / "history.csv"
        history.parent.mkdir()
        history.write_text("epoch,val_loss\n" + "".join(f"{e},0.5\n" for e in range(epochs)))
        client.log_artifact(kid["run_id"], str(history))
        best = {name: 0.5 for name in BEST_METRICS}
        client.log_batch(kid["run_id"], **batch(metrics=best))
        client.log_batch(kid["run_id"], **batch(tags={"status": "ok"}))
        client.set_terminated(kid["run_id"], "FINISHED")
        kid["metrics"].update({name: [0] for name in BEST_METRICS})
        kid["artifacts"] = {"history.csv": history.stat().st_size}
    return kids


def stage_run(
    client,
    uri: str,
    experiment_id: str,
    index: int,
    number: int,
    epochs: int,
    children: int,
    kib: int,
) -> list[dict]:
    """One training stage then its share of `evaluate`, as the project writes them; what was
    sent for the parent run (first) and each nested run."""
    task, seed = f"task{number + 2}", 1000 * index + number
    with store_lock(uri):  # tracking.setup: the experiment, looked up under the lock
        client.get_experiment(experiment_id)
    client.search_runs([experiment_id], f"tags.task = '{task}' and attributes.status = 'RUNNING'")
    tags = stage_tags(task, index)
    flat = {f"train.p{j}": j for j in range(24)} | {"base.seed": seed, "data.variant": "small"}
    parent = client.create_run(experiment_id, run_name=task, tags=tags).info.run_id
    client.log_batch(parent, **batch(params=flat))
    log_dataset(client, parent)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        kids = stage_children(
            client, experiment_id, parent, task, tags, flat, children, epochs, seed, tmp
        )
        chosen = {"chosen.lr": 0.1, "chosen.hidden": "64-32", "chosen.label": "c0"}
        client.log_batch(
            parent, **batch(params=chosen, metrics={name: 0.5 for name in BEST_METRICS})
        )
        curves = tmp / f"{task}_curves.png"
        curves.write_bytes(np.random.default_rng(seed).bytes(20_000))
        client.log_artifact(parent, str(curves))
        artifacts = {curves.name: curves.stat().st_size}
        artifacts |= model_files(tmp / "model", kib, seed)
        client.log_artifacts(parent, str(tmp / "model"), "model")
        client.set_terminated(parent, "FINISHED")
        for name in EVAL_METRICS:  # evaluate: one log_metric call each, then its files
            client.log_metric(parent, name, curve(seed, 99, name))
        per_class = tmp / "per_class.csv"
        per_class.write_text("letter,accuracy\n" + "".join(f"{c},0.9\n" for c in "ABCDEFGHIJ"))
        client.log_artifact(parent, str(per_class), artifact_path="evaluation")
        artifacts["evaluation/per_class.csv"] = per_class.stat().st_size
    metrics = {name: [0] for name in (*BEST_METRICS, *EVAL_METRICS)}
    record = {
        "run_id": parent,
        "params": len(flat) + len(chosen),
        "metrics": metrics,
        "artifacts": artifacts,
    }
    return [record, *kids]


def register(client, uri: str, experiment_id: str, run_id: str) -> str:
    """A model version of the writer's last parent run, as `evaluate` registers the champion:
    under the store's lock (parallel experiments register too)."""
    from mlflow.exceptions import MlflowException

    name = MODEL_NAME.format(experiment_id)
    with store_lock(uri):
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name)
        source = f"{client.get_run(run_id).info.artifact_uri}/model"
        found = client.create_model_version(name, source, run_id=run_id)
        client.set_registered_model_alias(name, f"writer{os.getpid()}", found.version)
    return found.version


def unit(client, args: argparse.Namespace, number: int) -> list[dict]:
    """One run (team) or one stage (stage) of the writer; what was sent for each run."""
    if args.style == "team":
        return [team_run(client, args.experiment_id, args.index, number, args.epochs,
                         args.artifact_kib)]  # fmt: skip
    return stage_run(client, args.uri, args.experiment_id, args.index, number, args.epochs,
                     args.children, args.artifact_kib)  # fmt: skip


def note(out: dict, e: Exception) -> str:
    """Count a failed call by kind; keep the first few messages, with the step that failed."""
    kind, where = error_kind(e), f"{error_kind(e)} in {failed_in(e)}"
    out["errors"][kind] = out["errors"].get(kind, 0) + 1
    out.setdefault("where", {})[where] = out.get("where", {}).get(where, 0) + 1
    out["messages"] = (out["messages"] + [f"{where}: {str(e)[:300]}"])[:5]
    return kind


def end_open(client, experiment_id: str, index: int) -> None:
    """After a failure, as the stages' Tracker.end_open does: the writer's runs still RUNNING
    end FAILED (as far as the store lets them)."""
    with contextlib.suppress(Exception):
        query = f"tags.writer = '{index}' and attributes.status = 'RUNNING'"
        for run in client.search_runs([experiment_id], query):
            client.set_terminated(run.info.run_id, "FAILED")


def do_units(client, args: argparse.Namespace) -> dict:
    """The writer's runs (team) or stages (stage), one after another; a failed one is recorded,
    its open runs end FAILED and the next one goes on, as the next queued experiment would."""
    out = {"index": args.index, "runs": [], "units": [], "errors": {}, "messages": [],
           "versions": [], "started": time.time()}  # fmt: skip
    for number in range(args.units):
        start = time.perf_counter()
        try:
            out["runs"] += unit(client, args, number)
            out["units"].append({"seconds": time.perf_counter() - start, "ok": True})
        except Exception as e:  # counted; the runs it left are checked like the rest
            kind = note(out, e)
            out["units"].append({"seconds": time.perf_counter() - start, "ok": False,
                                 "error": kind})  # fmt: skip
            end_open(client, args.experiment_id, args.index)
    if args.style == "stage" and out["runs"]:
        try:
            parent = out["runs"][0]["run_id"]
            out["versions"].append(register(client, args.uri, args.experiment_id, parent))
        except Exception as e:
            note(out, e)
    out["ended"] = time.time()
    return out


def writer(argv: list[str]) -> int:
    """One writer process: import, say ready, wait for go, write, print the record."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.tracking_load writer")
    p.add_argument("--uri", required=True)
    p.add_argument("--experiment-id", required=True)
    p.add_argument("--style", choices=("team", "stage", "race"), required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--units", type=int, default=1, help="runs (team) or stages (stage)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--children", type=int, default=2)
    p.add_argument("--artifact-kib", type=int, default=64)
    p.add_argument("--no-dataset", action="store_true", help="log no dataset input")
    args = p.parse_args(argv)
    global LOG_DATASETS
    LOG_DATASETS = not args.no_dataset
    start = time.perf_counter()
    from mlflow import MlflowClient

    client = MlflowClient(args.uri)
    client.get_experiment(args.experiment_id)  # the store answers before the start line
    import_s = time.perf_counter() - start
    print("ready", flush=True)
    if args.style == "race":
        return race_writer(client, args.index)
    if sys.stdin.readline().strip() != "go":
        return 1
    out = do_units(client, args)
    out["import_s"] = import_s
    print(RESULT + json.dumps(out), flush=True)
    return 0


def race_writer(client, index: int) -> int:
    """A race writer: for each "go <experiment id>" line, a run that logs the data set."""
    while line := sys.stdin.readline():
        experiment_id = line.split()[1]
        try:
            run_id = client.create_run(experiment_id, tags={"writer": str(index)}).info.run_id
            log_dataset(client, run_id)
            client.set_terminated(run_id, "FINISHED")
            answer = {"ok": True}
        except Exception as e:
            answer = {"ok": False, "error": f"{error_kind(e)} in {failed_in(e)}"}
        print(RESULT + json.dumps(answer), flush=True)
    return 0


# --------------------------------------------------------------------------- many writers


@contextlib.contextmanager
def writers(count: int, args: list[str], env: dict, logs: Path, timeout_s: float):
    """`count` writer processes, yielded once every one has said ready; killed when the block
    ends, and every one of them past timeout_s (a hung writer does not hang the benchmark)."""
    cmd = [sys.executable, "-m", "benchmarks.tracking_load", "writer", *args]
    env = {**env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    killer = threading.Timer(timeout_s, lambda: [p.kill() for p in procs if p.poll() is None])
    killer.start()
    try:
        for i in range(count):
            with (logs / f"writer{i}.log").open("w") as err:
                procs.append(subprocess.Popen([*cmd, "--index", str(i)], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, stderr=err, text=True,
                                              cwd=ROOT, env=env))  # fmt: skip
        for i, proc in enumerate(procs):
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"writer {i} did not start: see {logs / f'writer{i}.log'}")
        yield procs
    finally:
        killer.cancel()
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


def result_line(text: str) -> dict | None:
    """The last RESULT line of a writer's output (MLflow prints links on stdout too)."""
    lines = [line for line in text.splitlines() if line.startswith(RESULT)]
    return json.loads(lines[-1].removeprefix(RESULT)) if lines else None


def start_writers(
    count: int, args: list[str], env: dict, logs: Path, timeout_s: float
) -> tuple[list[dict], float]:
    """`count` writer processes; all say ready, then all get go at once. Their records and the
    seconds from go to the last one's exit."""
    with writers(count, args, env, logs, timeout_s) as procs:
        start = time.perf_counter()
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outs = [proc.communicate()[0] for proc in procs]
        wall = time.perf_counter() - start
    records = []
    for i, (proc, text) in enumerate(zip(procs, outs, strict=True)):
        record = result_line(text)
        if proc.returncode or record is None:  # killed or crashed: what it sent counts as lost
            log.error(
                "writer %d exited with %s: see %s", i, proc.returncode, logs / f"writer{i}.log"
            )
            record = {"index": i, "runs": [], "units": [], "versions": [], "messages": [],
                      "errors": {f"writer exit {proc.returncode}": 1}}  # fmt: skip
        records.append(record)
    return records, wall


def race(uri: str, env: dict, count: int, rounds: int, work: Path, timeout_s: float = 600) -> dict:
    """`rounds` times over: a new experiment, and `count` writers each starting a run in it and
    logging the same data set at one moment, as parallel stages do first thing. How many rounds
    lost a run, and the failed calls by kind."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    name = f"load-race-{count}-{time.strftime('%H%M%S')}-{os.getpid()}"
    location = (work / "artifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
    probe = client.create_experiment(name, artifact_location=location)
    args = ["--uri", uri, "--experiment-id", probe, "--style", "race"]
    failed, bad_rounds = {}, 0
    with writers(count, args, env, work / "logs" / name, timeout_s) as procs:
        for r in range(rounds):
            experiment_id = client.create_experiment(f"{name}-{r}", artifact_location=location)
            for proc in procs:
                proc.stdin.write(f"go {experiment_id}\n")
                proc.stdin.flush()
            answers = [read_answer(proc) for proc in procs]
            errors = [a["error"] for a in answers if not a["ok"]]
            bad_rounds += bool(errors)
            for kind in errors:
                failed[kind] = failed.get(kind, 0) + 1
    log.info("  race, %d writers: %d of %d rounds lost a run (%s)", count, bad_rounds, rounds,
             failed or "no failed call")  # fmt: skip
    return {"writers": count, "rounds": rounds, "rounds_with_loss": bad_rounds, "failed": failed}


def read_answer(proc: subprocess.Popen) -> dict:
    """A race writer's answer to one round (its end of output: a failed writer)."""
    while line := proc.stdout.readline():
        if line.startswith(RESULT):
            return json.loads(line.removeprefix(RESULT))
    return {"ok": False, "error": f"writer exit {proc.poll()}"}


# --------------------------------------------------------------------------- counting


def bucket_objects(s3: dict) -> dict[str, int]:
    """{key: bytes} of every object in the team stack's bucket."""
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3["endpoint"],
        aws_access_key_id=s3["key"],
        aws_secret_access_key=s3["secret"],
        region_name=s3["region"],
    )
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"]):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return out


def listed(client, run_id: str, folder: str | None, cache: dict) -> dict[str, int]:
    """{path: bytes} of the files in one artifact folder of a run (through the store)."""
    if (run_id, folder) not in cache:
        cache[run_id, folder] = {
            f.path: f.file_size for f in client.list_artifacts(run_id, folder) if not f.is_dir
        }
    return cache[run_id, folder]


def check_run(client, run: dict, found, objects: dict | None, cache: dict) -> dict:
    """One sent run against the store: status, params, every metric step, every artifact."""
    run_id, n = run["run_id"], {}
    n["finished"] = found.info.status == "FINISHED"
    n["params_found"] = len(found.data.params)
    n["steps_sent"] = n["steps_found"] = n["steps_duplicated"] = 0
    for name, steps in run["metrics"].items():
        n["steps_sent"] += len(steps)
        if steps == [0]:  # a single value: the run's latest metrics hold it
            n["steps_found"] += name in found.data.metrics
            continue
        got = [m.step for m in client.get_metric_history(run_id, name)]
        n["steps_found"] += len(set(steps) & set(got))
        n["steps_duplicated"] += len(got) - len(set(got))
    n["artifacts_found"] = n["objects_found"] = 0
    for path, size in run["artifacts"].items():
        folder = path.rsplit("/", 1)[0] if "/" in path else None
        n["artifacts_found"] += listed(client, run_id, folder, cache).get(path) == size
        if objects is not None:
            n["objects_found"] += any(
                key.endswith(f"/{run_id}/artifacts/{path}") and got == size
                for key, got in objects.items()
            )
    n["complete"] = (
        n["finished"]
        and n["params_found"] == run["params"]
        and n["steps_found"] == n["steps_sent"]
        and not n["steps_duplicated"]
        and n["artifacts_found"] == len(run["artifacts"])
        and (objects is None or n["objects_found"] == len(run["artifacts"]))
    )
    return n


def verify(
    uri: str, experiment_id: str, records: list[dict], s3: dict | None, registered: bool
) -> dict:
    """Count what the writers sent that the store (and bucket) holds."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(uri)
    stored = {
        r.info.run_id: r
        for r in client.search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=50_000)
    }
    objects = bucket_objects(s3) if s3 else None
    sent = [run for rec in records for run in rec["runs"]]
    totals = dict.fromkeys(COUNTS, 0) | {
        "runs_sent": len(sent),
        "runs_in_store": len(stored),
        "runs_missing": 0,
        "params_sent": sum(r["params"] for r in sent),
        "artifacts_sent": sum(len(r["artifacts"]) for r in sent),
    }
    cache: dict = {}
    for run in sent:
        if run["run_id"] not in stored:
            totals["runs_missing"] += 1
            continue
        for key, value in check_run(client, run, stored[run["run_id"]], objects, cache).items():
            totals[key] = totals.get(key, 0) + int(value)
    totals["runs_unreported"] = len(set(stored) - {r["run_id"] for r in sent})
    if registered:
        versions = client.search_model_versions(f"name = '{MODEL_NAME.format(experiment_id)}'")
        totals["versions_sent"] = sum(len(rec.get("versions", [])) for rec in records)
        totals["versions_found"] = len(versions)
    return totals


def spread(values: list[float]) -> dict:
    if not values:
        return {"median": None, "mean": None, "min": None, "max": None}
    a = np.asarray(values)
    return {
        "median": float(np.median(a)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
    }


def level(
    style: str,
    uri: str,
    env: dict,
    count: int,
    settings: dict,
    work: Path,
    s3: dict | None = None,
    timeout_s: float = 600,
) -> dict:
    """`count` writers at once on one new experiment of the store; what they sent, what the
    store holds, and how long each run (team) or stage (stage) took."""
    from mlflow import MlflowClient

    name = f"load-{style}-{count}-{time.strftime('%H%M%S')}-{os.getpid()}"
    location = (work / "artifacts").resolve().as_uri() if uri.startswith("sqlite:") else None
    experiment_id = MlflowClient(uri).create_experiment(name, artifact_location=location)
    args = ["--uri", uri, "--experiment-id", experiment_id, "--style", style]
    for key, value in settings.items():  # True: a flag; False: left out
        flag = f"--{key.replace('_', '-')}"
        args += [flag] if value is True else [] if value is False else [f"{flag}={value}"]
    log.info("%s: %d writer(s) at once, %s", name, count, settings)
    records, wall = start_writers(count, args, env, work / "logs" / name, timeout_s)
    per_unit = 1 if style == "team" else 1 + settings["children"]
    out = {
        "writers": count,
        "experiment": name,
        "wall_s": wall,
        "expected_runs": count * settings["units"] * per_unit,
        **sent_by(records),
        **verify(uri, experiment_id, records, s3, registered=style == "stage"),
    }
    out["lost_runs"] = out["expected_runs"] - out["complete"]
    out["runs_per_s"] = out["complete"] / wall
    log.info(
        "  %d/%d runs complete, %d lost, errors %s, %.2f s per %s (median), wall %.1f s",
        out["complete"],
        out["expected_runs"],
        out["lost_runs"],
        out["errors"] or "none",
        out["unit_seconds"]["median"] or 0,
        "run" if style == "team" else "stage",
        wall,
    )
    return out


def sent_by(records: list[dict]) -> dict:
    """The writers' own account: runs or stages done and failed, their seconds, errors."""
    units = [u for rec in records for u in rec["units"]]
    errors: dict[str, int] = {}
    where: dict[str, int] = {}
    for rec in records:
        for kind, n in rec["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
        for step, n in rec.get("where", {}).items():
            where[step] = where.get(step, 0) + n
    started = [rec["started"] for rec in records if "started" in rec]
    return {
        "units_sent": len(units),
        "units_failed": sum(not u["ok"] for u in units),
        "unit_seconds": spread([u["seconds"] for u in units if u["ok"]]),
        "errors": errors,
        "failed_calls": where,
        "locked_errors": errors.get(LOCKED, 0),
        "messages": [m for rec in records for m in rec["messages"]][:10],
        "start_spread_s": max(started) - min(started) if started else None,
        "import_s": spread([rec["import_s"] for rec in records if "import_s" in rec]),
    }


# --------------------------------------------------------------------------- the team stack


def start_stack(folder: Path) -> dict:
    """scripts/server.py start in `folder` (PostgreSQL, S3 and mlflow server on 127.0.0.1)."""
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "server.py"),
        "start",
        "--dir",
        str(folder),
        "--port",
        "0",
        "--json",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # the script may import the project
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=folder, env=env)
    if done.returncode:
        raise RuntimeError(f"the stack did not start: {done.stderr.strip()}")
    return json.loads(done.stdout)


def stop_stack(folder: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "server.py"), "stop", "--dir", str(folder)],
        capture_output=True,
        timeout=120,
    )


def team_env(state_env: dict) -> dict:
    """This environment pointed at the stack as a team member's shell is: the server proxies
    artifacts, so a client needs no S3 endpoint of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env.update(state_env)
    env.pop("MLFLOW_S3_ENDPOINT_URL", None)
    return env


def s3_of(state_env: dict, bucket: str = "notmnist") -> dict:
    """How boto3 reaches the stack's bucket."""
    return {
        "endpoint": state_env["AWS_ENDPOINT_URL"],
        "bucket": bucket,
        "key": state_env["AWS_ACCESS_KEY_ID"],
        "secret": state_env["AWS_SECRET_ACCESS_KEY"],
        "region": state_env.get("AWS_DEFAULT_REGION", "us-east-1"),
    }


def warm_up(uri: str) -> None:
    """One short run as the writers log theirs, in an experiment of its own, before any level:
    the server's first answers to each kind of request (imports, connections) are not timed."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    team_run(client, client.create_experiment("load-warm-up"), 999, 0, epochs=2, kib=4)


def quiet(env: dict, telemetry: bool) -> dict:
    """The writers' environment; with telemetry False, MLflow's usage telemetry is off (its
    thread edits os.environ while requests read it: see error_kind)."""
    return env if telemetry else {**env, "MLFLOW_DISABLE_TELEMETRY": "true"}


def team_levels(state: dict, writers: list[int], settings: dict, work: Path, rounds: int = 0,
                telemetry: bool = True) -> list[dict]:  # fmt: skip
    """Each K on the one stack (a new experiment each); then `rounds` rounds of the race."""
    uri, env = state["env"]["MLFLOW_TRACKING_URI"], quiet(team_env(state["env"]), telemetry)
    warm_up(uri)
    out = []
    for k in writers:
        out.append(level("team", uri, env, k, settings, work, s3=s3_of(state["env"])))
        if rounds and k > 1:
            out[-1]["race"] = race(uri, env, k, rounds, work)
    return out


def sqlite_levels(writers: list[int], settings: dict, work: Path, rounds: int = 0,
                  telemetry: bool = True) -> list[dict]:  # fmt: skip
    """Each N on a new SQLite store (made, with its tables, before the writers start); then
    `rounds` rounds of the race on the same store."""
    from mlflow import MlflowClient

    out = []
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env = quiet(env, telemetry)
    for n in writers:
        folder = work / f"sqlite-{n}"
        folder.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        MlflowClient(uri).search_experiments()  # creates the tables: the stages' first use
        out.append(level("stage", uri, env, n, settings, folder))
        if rounds and n > 1:
            out[-1]["race"] = race(uri, env, n, rounds, folder)
    return out


# --------------------------------------------------------------------------- outputs


def level_row(lv: dict, team: bool) -> str:
    """One level as a row of the Levels table."""
    from benchmarks.load import errors_text, fmt

    s = lv["unit_seconds"]
    artifacts = f"{lv['artifacts_found']}/{lv['artifacts_sent']}"
    if team:
        artifacts = f"{lv['artifacts_found']} / {lv['objects_found']} of {lv['artifacts_sent']}"
    cells = [
        lv["writers"],
        f"{lv['complete']}/{lv['expected_runs']}",
        lv["lost_runs"],
        lv["finished"],
        f"{lv['params_found']:,}/{lv['params_sent']:,}",
        f"{lv['steps_found']:,}/{lv['steps_sent']:,}",
        artifacts,
        errors_text(lv.get("failed_calls") or lv["errors"]),
        *([] if team else [lv["locked_errors"], f"{lv['versions_found']}/{lv['versions_sent']}"]),
        f"{fmt(s['median'], 2)} ({fmt(s['min'], 2)}-{fmt(s['max'], 2)})",
        f"{lv['wall_s']:.1f}",
        f"{lv['runs_per_s']:.2f}",
    ]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def levels_table(result: dict, team: bool) -> list[str]:
    """## Levels: what each number of writers sent, and what the store holds."""
    unit = "run" if team else "stage"
    header = ["writers", "runs complete / expected", "runs lost", "FINISHED", "params",
              "metric steps", "artifacts (server / bucket)" if team else "artifacts",
              "failed calls", *([] if team else [f"`{LOCKED}`", "model versions"]),
              f"s per {unit}: median (min-max)", "wall s", "complete runs/s"]  # fmt: skip
    lines = ["## Levels", "", "| " + " | ".join(header) + " |", "|" + " ---: |" * len(header)]
    return lines + [level_row(lv, team) for lv in result["levels"]]


def race_table(result: dict) -> list[str]:
    """## Race rounds: writers logging one data set at the same moment, round after round."""
    from benchmarks.load import errors_text

    races = [lv["race"] for lv in result["levels"] if "race" in lv]
    if not races:
        return []
    lines = ["## Race rounds", "", "| writers | rounds | rounds that lost a run | failed calls |",
             "| ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in races:
        lines.append(f"| {r['writers']} | {r['rounds']} | {r['rounds_with_loss']} | "
                     f"{errors_text(r['failed'])} |")  # fmt: skip
    return [*lines, ""]


def markdown(name: str, result: dict) -> str:
    """tracking.md or sqlite.md: the levels, the race rounds, the findings."""
    from benchmarks.load import machine_line

    team = name == "tracking"
    title = "The team tracking server" if team else "The SQLite store"
    lines = [f"# {title} under concurrent writers", "",
             f"`{result['command']}`, {result['date']}, on "
             f"{machine_line(result['machine'], result['machine_after'])}.", "",
             result["setup"], "", *levels_table(result, team), "", *race_table(result),
             "## Findings", "", *(f"- {line}" for line in verdict(name, result).values()), "",
             f"![seconds per {'run' if team else 'stage'}]({name}.png)", ""]  # fmt: skip
    return "\n".join(lines)


def verdict(name: str, result: dict) -> dict[str, str]:
    """The findings, one sentence each (the table's notes; docs/load.md shows them)."""
    from benchmarks.load import errors_text, fmt

    levels, team = result["levels"], name == "tracking"
    unit, letter = ("run", "K") if team else ("stage", "N")
    tested = ", ".join(str(lv["writers"]) for lv in levels)
    times = ", ".join(f"{fmt(lv['unit_seconds']['median'], 2)} s at {letter} = {lv['writers']}"
                      for lv in levels)  # fmt: skip
    out = {"seconds": f"Seconds per {unit} (median): {times}."}
    lossy = [lv for lv in levels if lv["lost_runs"] or lv["errors"]]
    out["levels"] = (
        f"In the levels, no run lost at {letter} = {tested}: every run FINISHED with every "
        "param, metric step and artifact" + (" (in the bucket too)." if team else ".")
        if not lossy else "In the levels, runs lost at " + "; ".join(
            f"{letter} = {lv['writers']}: {lv['lost_runs']} of {lv['expected_runs']} "
            f"(failed calls: {errors_text(lv.get('failed_calls') or lv['errors'])})"
            for lv in lossy) + f"; none at the other {letter} of {tested}."
    )  # fmt: skip
    if races := [lv["race"] for lv in levels if "race" in lv]:
        out["race"] = race_text(races, letter)
    if not team:
        locked = [lv for lv in levels if lv["locked_errors"]]
        out["locked"] = (f"`{LOCKED}` first at N = {locked[0]['writers']}." if locked
                         else f"No `{LOCKED}` error at N = {tested}.")  # fmt: skip
        base, top = levels[0]["unit_seconds"]["median"], levels[-1]["unit_seconds"]["median"]
        if len(levels) > 1 and base and top:
            out["growth"] = (f"A stage's writes took {top / base:.1f}x as long at N = "
                             f"{levels[-1]['writers']} as at N = {levels[0]['writers']}: the "
                             "writers take turns at the database's single write lock, and "
                             "share the cores.")  # fmt: skip
    return out


def race_rounds(races: list[dict], letter: str) -> str:
    """The race rounds that lost a run, per number of writers: a phrase."""
    return "; ".join(
        f"{letter} = {r['writers']}: {r['rounds_with_loss']} of {r['rounds']}" for r in races
    )


def race_text(races: list[dict], letter: str) -> str:
    """The race rounds in a sentence."""
    return (
        "Writers starting a run and logging the same data set at one moment in a new "
        "experiment (what parallel stages do first thing), rounds that lost a run: "
        f"{race_rounds(races, letter)}."
    )


def plot(name: str, result: dict, path: Path) -> None:
    """Seconds per run or stage (median, min-max bars) against writers at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = result["levels"]
    x = [lv["writers"] for lv in levels]
    med = np.array([lv["unit_seconds"]["median"] or np.nan for lv in levels])
    low = med - np.array([lv["unit_seconds"]["min"] or np.nan for lv in levels])
    high = np.array([lv["unit_seconds"]["max"] or np.nan for lv in levels]) - med
    unit = "run" if name == "tracking" else "stage"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.errorbar(x, med, yerr=[low, high], fmt="-o", capsize=4)
    left.set_ylabel(f"seconds per {unit} (median; bars: min-max)")
    right.plot(x, [lv["runs_per_s"] for lv in levels], "-o", color="C1")
    right.set_ylabel("complete runs per second, all writers")
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel("writers at once")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    title = "team stack: mlflow server (PostgreSQL + S3)" if name == "tracking" else "SQLite store"
    lost = sum(lv["lost_runs"] for lv in levels)
    errors = sum(sum(lv["errors"].values()) for lv in levels)
    m = result["machine"]
    races = [lv["race"] for lv in levels if "race" in lv]
    if races:
        lossy = sum(r["rounds_with_loss"] for r in races)
        title += f"; race rounds that lost a run {lossy} of {sum(r['rounds'] for r in races)}"
    fig.suptitle(
        f"{title}\nin the levels: runs lost {lost}, failed calls {errors}; {m['cpu']}, "
        f"{m['usable_cores']} "
        f"cores, load average {m['load_average']} before, "
        f"{result['machine_after']['load_average']} after",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- the subcommands


def tracking_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--writers",
        type=int,
        nargs="+",
        default=list(WRITERS_K),
        help="writer processes at once, one level each (default: %(default)s)",
    )
    p.add_argument(
        "--runs",
        type=int,
        default=2,
        help="runs each writer logs, one after another (default: %(default)s)",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=20,
        help=f"epochs per run, {len(TEAM_METRICS)} metrics each (default: %(default)s)",
    )
    p.add_argument(
        "--artifact-kib",
        type=int,
        default=64,
        help="size of each run's model weights file (default: %(default)s)",
    )
    p.add_argument(
        "--no-dataset",
        action="store_true",
        help="log no dataset input: leaves out the race of writers logging the same data set "
        "for the first time at once",
    )
    p.add_argument(
        "--no-telemetry",
        action="store_true",
        help="writers run with MLFLOW_DISABLE_TELEMETRY=true (default: as the stages run, "
        "MLflow's own default)",
    )
    p.add_argument(
        "--race-rounds",
        type=int,
        default=10,
        help="after each level of 2 writers or more: this many rounds of the writers starting a "
        "run and logging the same data set at once in a new experiment (default: %(default)s; "
        "0: none)",
    )


def sqlite_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--writers",
        type=int,
        nargs="+",
        default=list(WRITERS_N),
        help="writer processes at once, one level each (default: %(default)s)",
    )
    p.add_argument(
        "--stages",
        type=int,
        default=7,
        help="training stages each writer runs, one after another, as a queued "
        "experiment runs the pipeline's seven (default: %(default)s)",
    )
    p.add_argument(
        "--children",
        type=int,
        default=2,
        help="configurations (nested runs) per stage (default: %(default)s)",
    )
    p.add_argument(
        "--epochs", type=int, default=10, help="epochs per configuration (default: %(default)s)"
    )
    p.add_argument(
        "--artifact-kib",
        type=int,
        default=64,
        help="size of each stage's model weights file (default: %(default)s)",
    )
    p.add_argument(
        "--no-dataset",
        action="store_true",
        help="log no dataset input: leaves out the race of writers logging the same data set "
        "for the first time at once",
    )
    p.add_argument(
        "--no-telemetry",
        action="store_true",
        help="writers run with MLFLOW_DISABLE_TELEMETRY=true (default: as the stages run, "
        "MLflow's own default)",
    )
    p.add_argument(
        "--race-rounds",
        type=int,
        default=10,
        help="after each level of 2 writers or more: this many rounds of the writers starting a "
        "run and logging the same data set at once in a new experiment (default: %(default)s; "
        "0: none)",
    )
    p.add_argument(
        "--work",
        type=Path,
        help="keep the stores and writer logs here (default: a temporary folder)",
    )


def finish(
    name: str,
    args: argparse.Namespace,
    argv: list[str],
    before: dict,
    setup: str,
    levels: list[dict],
) -> int:
    """Write <name>.json, .md and .png; 0 when nothing was lost."""
    from benchmarks.load import machine, write

    result = {
        "command": "python -m benchmarks.load " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": before,
        "machine_after": machine(),
        "setup": setup,
        "levels": levels,
    }
    result["verdict"] = verdict(name, result)
    result["race_rounds"] = race_rounds(
        [lv["race"] for lv in levels if "race" in lv], "K" if name == "tracking" else "N"
    )
    write(args.out, name, result, markdown(name, result))
    plot(name, result, args.out / f"{name}.png")
    return 0 if not any(lv["lost_runs"] for lv in levels) else 1


def telemetry_text(args: argparse.Namespace) -> str:
    if args.no_telemetry:
        return " Writers ran with MLflow's usage telemetry off (`--no-telemetry`)."
    return " Writers ran with MLflow's usage telemetry as by default (on), as the stages run."


def dataset_text(args: argparse.Namespace) -> str:
    if args.no_dataset:
        return "no dataset input (--no-dataset)"
    return "a dataset input (one data set for all writers, as the stages log the same data)"


def team_setup(args: argparse.Namespace) -> str:
    """What the tracking levels did, in words (tracking.md)."""
    return (
        "One stack from `scripts/server.py start`: PostgreSQL, moto's S3 and `mlflow server "
        "--workers 1` on 127.0.0.1; artifacts go through the server to the bucket. Each writer "
        f"process logs {args.runs} run(s) one after another: {len(TEAM_METRICS)} metrics x "
        f"{args.epochs} epochs as single `log_metric` calls, 20 params in one batch, "
        f"{dataset_text(args)}, a model folder ({args.artifact_kib} KiB of weights and an "
        "MLmodel file). Counted afterwards through MlflowClient (status, params, every metric "
        "step, artifact listing) and boto3 (every object in the bucket, by size)."
        + telemetry_text(args)
    )


def sqlite_setup(args: argparse.Namespace) -> str:
    """What the SQLite levels did, in words (sqlite.md)."""
    return (
        "Each N on a new `sqlite:///.../mlflow.db` (its tables made first, as the first "
        f"stage's lock-guarded set-up does). Each writer process runs {args.stages} training "
        "stages one after another, as one `dvc queue` worker runs the pipeline, writing what "
        f"the stages and `evaluate` write: a parent run ({len(stage_tags('x', 0))} tags, "
        f"29 params, {dataset_text(args)}, curves, a model folder, {len(EVAL_METRICS)} single "
        f"`log_metric` calls and a file from evaluate) and {args.children} nested runs per "
        f"stage ({len(EPOCH_METRICS)} metrics x {args.epochs} epochs, one `log_batch` per "
        "epoch, a history file, best metrics, a status tag), then registers one model version "
        "under the stages' store lock. A failed call is counted by kind (with the step that "
        "made it), the writer's open runs end FAILED and it goes on with its next stage."
        + telemetry_text(args)
    )


def tracking_main(args: argparse.Namespace, argv: list[str]) -> int:
    """K writers at once on a new team stack, for each K; the stack is stopped afterwards."""
    from benchmarks.load import machine

    before = machine()
    settings = {"units": args.runs, "epochs": args.epochs, "artifact_kib": args.artifact_kib,
                "no_dataset": args.no_dataset}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="load-stack-") as tmp:
        log.info("starting the team stack (scripts/server.py start)")
        state = start_stack(Path(tmp))
        try:
            levels = team_levels(state, args.writers, settings, Path(tmp), args.race_rounds,
                                 telemetry=not args.no_telemetry)  # fmt: skip
        finally:
            stop_stack(Path(tmp))
    return finish("tracking", args, argv, before, team_setup(args), levels)


def sqlite_main(args: argparse.Namespace, argv: list[str]) -> int:
    """N writers at once on a new SQLite store, for each N."""
    from benchmarks.load import machine

    before = machine()
    settings = {
        "units": args.stages,
        "epochs": args.epochs,
        "children": args.children,
        "no_dataset": args.no_dataset,
        "artifact_kib": args.artifact_kib,
    }
    with tempfile.TemporaryDirectory(prefix="load-sqlite-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        levels = sqlite_levels(args.writers, settings, work, args.race_rounds,
                               telemetry=not args.no_telemetry)  # fmt: skip
    return finish("sqlite", args, argv, before, sqlite_setup(args), levels)


if __name__ == "__main__":
    if sys.argv[1:2] == ["writer"]:
        sys.exit(writer(sys.argv[2:]))
    sys.exit("use `python -m benchmarks.load tracking` or `... sqlite` (see --help)")
