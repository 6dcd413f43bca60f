"""One training task: train each configuration, log it to MLflow, keep the best by val loss.

The configurations train in training.sweep (resumable, in parallel workers on the CPU); this
process alone writes to MLflow, from their events: one parent run per task, one nested run per
configuration. A configuration that an upstream task already trained (same key) is reused from
that task's outputs, which the stage lists as deps, not retrained.

Outputs are written only once everything succeeded; the checkpoints go then. On SIGINT or
SIGTERM the open runs are marked KILLED and the checkpoints stay, so a rerun resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from pipeline import cli, numerics, plots, signals, tracking
from pipeline.config import BaseParams, MlflowParams, Paths, StageError, TrainParams, load
from pipeline.evaluation.original import REPORTED
from pipeline.files import atomic_file, read_json, write_json
from pipeline.signals import Interrupted
from pipeline.training import distributed, sweep
from pipeline.training.loop import Result, load_splits, pick_device
from pipeline.training.model import FiniteInput, build, save_model
from pipeline.training.model import load_model as load_model
from pipeline.training.sweep import Candidate, Job

__all__ = ["Candidate", "best_lr", "main", "run"]
log = logging.getLogger(__name__)
# Tasks 6 and 7: the original's quirks corrected (one gray channel, logits, no mirrored letters).
CORRECTED = {"input_channels": 1, "softmax_output": False, "hflip": False}
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def best_lr(paths: Paths) -> float:
    """Task 2's chosen learning rate, from its best.json."""
    path = paths.train_reports("task2") / "best.json"
    try:
        return float(json.loads(path.read_text())["config"]["lr"])
    except (OSError, KeyError, ValueError) as e:
        raise StageError(f"{path}: cannot read Task 2's best learning rate ({e})") from None


def history_rows(c: Candidate, result: Result) -> list[dict]:
    """history.csv's rows of one configuration: no seconds, so reruns give the same bytes."""
    last = len(result.history)
    return [
        {
            "config": c.label,
            "lr": c.lr,
            "hidden": "-".join(map(str, c.hidden)),
            "dropout": c.dropout,
            **{k: row[k] for k in ("epoch", *EPOCH_METRICS)},
            "status": result.status if i == last else "ok",
        }
        for i, row in enumerate(result.history, 1)
    ]


def worker_count(p: TrainParams, threads: int) -> int:
    """train.workers; auto: as many as the cores hold at `threads` (base.threads) each."""
    return max(1, numerics.cores() // threads) if p.workers == "auto" else p.workers


def reusable(paths: Paths, upstream, jobs: list[Job]) -> dict[str, tuple]:
    """{label: (result, weights, task)} for jobs an upstream task trained as its choice."""
    out = {}
    for name in upstream:
        best = read_json(paths.train_reports(name) / "best.json")
        for job in jobs:
            if job.key != best.get("config_key"):
                continue
            model, _ = load_model(paths.models / f"{name}.pt")
            table = pd.read_csv(paths.train_reports(name) / "history.csv")
            rows = table[table["config"] == best["config"]["label"]]
            history = [
                {"epoch": int(r["epoch"]), **{k: float(r[k]) for k in EPOCH_METRICS}}
                for _, r in rows.iterrows()
            ]
            out[job.label] = (Result(history, best["best_epoch"]), model.state_dict(), name)
    return out


class Monitor:
    """The MLflow side of a sweep: one nested run per configuration, fed by sweep events."""

    def __init__(
        self,
        task: str,
        tracker: tracking.Tracker,
        parent,
        tags: dict,
        flat: dict,
        jobs: list[Job],
        record: dict,
        record_path,
    ):
        self.task, self.tracker, self.parent = task, tracker, parent
        self.tags, self.flat = tags, flat
        self.dataset = f"notMNIST_{flat.get('data.variant', 'small')}"
        self.jobs = {j.label: j for j in jobs}
        self.record, self.record_path = record, record_path
        self.children: dict[str, tracking.RunRef] = {}
        self.running: dict[str, int] = {}
        self.seconds: dict[str, list[float]] = {}

    def on_event(self, event) -> None:
        kind, label = event[0], event[1]
        if kind == "start":
            self.start(label, rows=event[2])
        elif kind == "epoch_start":
            self.running[label] = event[2]
            signals.doing(", ".join(f"{name}, epoch {e}" for name, e in self.running.items()))
        elif kind == "epoch":
            row = event[2]
            self.seconds.setdefault(label, []).append(row["seconds"])
            self.tracker.log(
                self.children[label],
                step=row["epoch"],
                metrics={**{k: row[k] for k in EPOCH_METRICS}, "epoch_seconds": row["seconds"]},
            )

    def start(self, label: str, rows: list[dict], tags: dict | None = None) -> None:
        """Open (or reopen, after an interruption) the configuration's run."""
        job = self.jobs[label]
        resume = self.record.get("children", {}).get(label)
        run = self.tracker.start_run(
            f"{self.task} {label}",
            {**self.tags, "config_key": job.key, **(tags or {})},
            parent=self.parent,
            resume_id=resume,
            on_created=lambda r: self.save_record(label, r),
        )
        self.children[label] = run
        c = job.candidate
        hidden = "-".join(map(str, c.hidden))
        self.tracker.log(run, params={**self.flat, **c.as_dict(), "hidden": hidden})
        if resume is None:
            log_dataset(self.tracker, run, self.tags["data_content_digest"], self.dataset)
        if rows:  # epochs trained before an interruption: the run gets each one once
            self.tracker.call(lambda: self.log_missing(run, rows))
        if rows and resume is not None:
            self.tracker.log(
                run, tags={"resumed_after_epoch": rows[-1]["epoch"], **tracking.process_tags()}
            )

    def log_missing(self, run: tracking.RunRef, rows: list[dict]) -> None:
        """Log the epochs of `rows` the run does not have yet (all of them in a new run)."""
        from mlflow.entities import Metric

        have = {m.step for m in self.tracker.client.get_metric_history(run.id, "val_loss")}
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(row[k]), now, row["epoch"])
            for row in rows
            if row["epoch"] not in have
            for k in EPOCH_METRICS
        ]
        for i in range(0, len(metrics), 1000):  # MLflow's batch limit
            self.tracker.client.log_batch(run.id, metrics=metrics[i : i + 1000])

    def save_record(self, label: str, run: tracking.RunRef) -> None:
        """checkpoints/<task>/runs.json: the runs a resumed stage continues."""
        self.record.setdefault("children", {})[label] = run.id
        write_json(self.record_path, self.record)

    def finish(self, label: str, result: Result) -> None:
        """The configuration's history, best metrics and status; end its run."""
        run, job = self.children[label], self.jobs[label]
        self.running.pop(label, None)
        rows = history_rows(job.candidate, result)
        self.tracker.log_bytes(run, "history.csv", pd.DataFrame(rows).to_csv(index=False).encode())
        if result.status == "ok":
            self.tracker.log(
                run,
                metrics={
                    **{f"best_{k}": result.best[k] for k in EPOCH_METRICS},
                    "best_epoch": result.best_epoch,
                },
            )
        self.tracker.log(run, tags={"status": result.status})
        self.tracker.end_run(run, "FINISHED" if result.status == "ok" else "FAILED")


@dataclasses.dataclass(frozen=True)
class Setup:
    """What a task reads before it trains: its settings, its jobs and where they live."""

    p: TrainParams
    threads: int
    seed: int
    experiment: str
    flat: dict  # the params logged to MLflow
    digest: str  # the data's content digest
    device: object
    folder: Path
    jobs: list


def task_setup(task: str, candidates: list[Candidate], paths: Paths, section, overrides) -> Setup:
    """Read the task's params and make one job per candidate (keys decide resumption)."""
    p = dataclasses.replace(load(paths.params, "train", TrainParams), **overrides)
    base = load(paths.params, "base", BaseParams)
    experiment = load(paths.params, "mlflow", MlflowParams).experiment
    params = yaml.safe_load(paths.params.read_text())
    section = section or task
    flat = tracking.flatten({k: params[k] for k in ("base", "train", section) if k in params})
    flat["data.variant"] = params.get("data", {}).get("variant", "small")
    flat.update({f"train.{k}": v for k, v in overrides.items()})
    digest = read_json(paths.data_reports / "download.json")["content_digest"]
    device = pick_device(p.device)
    folder = paths.checkpoints(task)
    jobs = [
        Job(c, p, base.seed, str(paths.root), "", sweep.job_key(c, p, base.seed, paths, device))
        for c in candidates
    ]
    jobs = [dataclasses.replace(j, folder=str(folder / j.key)) for j in jobs]
    return Setup(p, base.threads, base.seed, experiment, flat, digest, device, folder, jobs)


def run(
    task: str,
    title: str,
    candidates: list[Candidate],
    paths: Paths,
    section: str | None = None,
    reuse=(),
    **train_overrides,
) -> dict:
    """Train every candidate; write the best one's model, history, best.json and curves.

    `section` names the params.yaml section of the task (default: the task's name);
    `reuse` names upstream tasks whose chosen configuration may be one of ours (reused, not
    retrained); `train_overrides` replace `train.*` settings (Task 6 corrects the quirks).
    """
    s = task_setup(task, candidates, paths, section, train_overrides)
    reused = reusable(paths, reuse, s.jobs)
    distributed.start(s.device)  # under torchrun: join the other ranks
    if not distributed.is_main():  # train in step with rank 0; it alone logs and writes
        data = load_splits(paths, s.device)
        for job in s.jobs:
            if job.label not in reused:
                sweep.train_job(job, data, None)
        return {}
    sweep.prepare_folder(s.folder, {j.key for j in s.jobs})
    tracker = open_tracker(task, s, paths)  # an unreachable server fails here
    workers = worker_count(s.p, s.threads)
    announce(task, s, reused, workers)
    try:
        out = train_and_log(task, title, s, paths, tracker, reused, workers)
    except BaseException as e:
        signum = e.signum if isinstance(e, Interrupted) else signals.received()
        ended = tracker.down_since is None and tracker.end_open("KILLED" if signum else "FAILED")
        if not signum:
            raise
        stop = e if isinstance(e, Interrupted) else Interrupted(signum)
        if ended:
            stop.cleanup.append("runs marked KILLED")
        raise stop from None
    return finish(task, s, paths, tracker, out, workers)


def finish(task: str, s: Setup, paths: Paths, tracker, out: dict, workers: int) -> dict:
    """Write the task's outputs, its runs' ids and timing; drop the checkpoints."""
    summary, best = out["summary"], out["best"]
    write_outputs(task, summary, out["rows"], best, out["model"], paths, out["curves"])
    monitor = out["monitor"]
    write_json(
        paths.train_reports(task) / "mlflow.json",
        {
            "experiment": s.experiment,
            "tracking_uri": tracker.uri,
            "parent_run_id": out["parent"].id,
            "run_id": monitor.children[summary["config"]["label"]].id,
            "model_uri": out["model_uri"],
            "candidates": {label: ref.id for label, ref in monitor.children.items()},
        },
    )
    cli.record_timing(
        **{task: {"epoch_seconds": monitor.seconds, "workers": workers}},
        numerics=numerics.fingerprint(s.device),
    )
    remove_checkpoints(s.folder)
    log.info(
        "%s: chose %s (epoch %d): val loss %.4f, val accuracy %.2f%%",
        task,
        summary["config"]["label"],
        best.best_epoch,
        summary["val_loss"],
        100 * summary["val_accuracy"],
    )
    return summary


def open_tracker(task: str, s: Setup, paths: Paths) -> tracking.Tracker:
    """The MLflow writer for this task, its stale runs marked, and what an earlier try left."""
    import mlflow

    uri = tracking.setup(paths.root, s.experiment)  # an unreachable server fails here
    experiment_id = mlflow.get_experiment_by_name(s.experiment).experiment_id
    tracker = tracking.Tracker(uri, experiment_id)
    tracking.mark_stale_runs(tracker.client, experiment_id, task, f"train_{task}")
    return tracker


def announce(task: str, s: Setup, reused: dict, workers: int) -> None:
    how = f"{min(workers, len(s.jobs) - len(reused)) or 1} worker(s)"
    if distributed.world() > 1:
        how = f"{distributed.world()} processes (torchrun, DistributedDataParallel)"
    log.info(
        "%s: %d configuration(s) on device %s, %s%s",
        task,
        len(s.jobs),
        s.device,
        how,
        f", {len(reused)} reused" if reused else "",
    )


def run_record(folder: Path, uri: str, jobs: list[Job]) -> tuple[dict, Path]:
    """The runs an interrupted attempt left (to continue them), when it had the same jobs."""
    record_path = folder / "runs.json"
    record = read_json(record_path) if record_path.is_file() else {}
    keys = sorted(j.key for j in jobs)
    if (record.get("uri"), record.get("keys")) != (uri, keys):
        record = {"uri": uri, "keys": keys}
    return record, record_path


def train_and_log(task, title, s: Setup, paths: Paths, tracker, reused: dict, workers) -> dict:
    """Train what is not reused, logging as it goes; choose the best; log the parent's results."""
    record, record_path = run_record(s.folder, tracker.uri, s.jobs)
    tags = tracking.tags(task, paths.root, s.digest, s.device, s.seed)
    s.folder.mkdir(parents=True, exist_ok=True)

    def created(run):
        record["parent"] = run.id
        write_json(record_path, record)

    parent = tracker.start_run(task, tags, resume_id=record.get("parent"), on_created=created)
    tracker.log(parent, params=s.flat)
    log_dataset(tracker, parent, s.digest, f"notMNIST_{s.flat['data.variant']}")
    monitor = Monitor(task, tracker, parent, tags, s.flat, s.jobs, record, record_path)
    results, weights = train_all(s, reused, monitor, tracker, workers)
    summary, model, best = choose(task, title, s.jobs, results, weights, s.p, s.device, s.seed)
    tracker.log(
        parent,
        params={f"chosen.{k}": v for k, v in summary["config"].items()},
        metrics={
            tracking.results_key(k): v
            for k, v in {**_best_metrics(best), "best_epoch": best.best_epoch}.items()
        },
    )
    tracking.describe_parent(tracker, parent, summary, REPORTED.get(task))  # note, colour
    rows = [r for j in s.jobs for r in history_rows(j.candidate, results[j.label])]
    curves = s.folder / f"{task}_curves.png"
    plots.curves(best.history, curves, f"{title}: {summary['config']['label']}", best.best_epoch)
    tracker.log_file(parent, curves)
    logged = {}
    example = load_splits(paths, pick_device("cpu"))["val"].x[:8].numpy()
    tracker.call(lambda: logged.update(uri=log_model(parent.id, model, example)))
    tracker.end_run(parent)
    tracker.finish(f"The trained configurations are kept in {s.folder}: rerun to log them.")
    return {"summary": summary, "model": model, "best": best, "rows": rows, "curves": curves,
            "parent": parent, "monitor": monitor, "model_uri": logged["uri"]}  # fmt: skip


def train_all(s: Setup, reused: dict, monitor, tracker, workers) -> tuple[dict, dict]:
    """Every job's result and weights: the reused ones as they are, the others trained."""
    results, weights = {}, {}
    for label, (result, state, source) in reused.items():
        monitor.start(label, result.history, tags=reuse_tags(tracker, source, s.jobs, label))
        results[label], weights[label] = result, state
    todo = [j for j in s.jobs if j.label not in reused]
    files_done = {j.label: s.folder / j.key / "result.pt" for j in todo}

    def on_event(event):
        monitor.on_event(event)
        if event[0] == "done":
            result, state = sweep.read_result(files_done[event[1]])
            results[event[1]], weights[event[1]] = result, state
            monitor.finish(event[1], result)

    if todo:
        sweep.run(todo, workers, s.device, on_event)
    for label in reused:
        monitor.finish(label, results[label])
    return results, weights


def choose(task, title, jobs, results, weights, p, device, seed):
    """The best configuration by val loss (ties: the earlier one) -> (best.json, model, result)."""
    outcomes, best = [], None
    for job in jobs:
        c, result = job.candidate, results[job.label]
        outcome = {"label": c.label, **c.as_dict(), "status": result.status, "config_key": job.key}
        if result.status == "ok":
            outcome.update(best_epoch=result.best_epoch, **_best_metrics(result))
            if best is None or result.best["val_loss"] < results[best.label].best["val_loss"]:
                best = job
        outcomes.append(outcome)
    if best is None:
        remove_checkpoints(Path(jobs[0].folder).parent)  # a final outcome: no rerun resumes it
        raise StageError(f"every configuration of {task} diverged")
    c, result = best.candidate, results[best.label]
    model = build(c.model_config(p))
    model.load_state_dict(weights[best.label])
    summary = {
        "task": task,
        "title": title,
        "config": {"label": c.label, **c.as_dict(), **_model_settings(p)},
        "config_key": best.key,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        **_best_metrics(result),
        "device": str(device),
        "seed": seed,
        "candidates": outcomes,
    }
    return summary, model.eval(), result


def remove_checkpoints(folder: Path) -> None:
    """The task's checkpoints, and checkpoints/ itself once empty."""
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()


def reuse_tags(tracker: tracking.Tracker, source: str, jobs: list[Job], label: str) -> dict:
    """Tags of a reused configuration's run: where its result comes from."""
    key = next(j.key for j in jobs if j.label == label)
    found = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.task = '{source}' and tags.config_key = '{key}'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    note = (
        f"Not retrained: {source} trained this configuration with the same data, seed, "
        f"numerics and code (key {key}); its model and history are reused."
    )
    tags = {"reused_from_task": source, "mlflow.note.content": note}
    if found:
        tags["reused_from_run"] = found[0].info.run_id
    return tags


def log_dataset(
    tracker: tracking.Tracker, run: tracking.RunRef, digest: str, name: str = "notMNIST_small"
) -> None:
    import mlflow
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.exceptions import MlflowException

    dataset = mlflow.data.from_numpy(
        np.zeros((1, 28, 28), np.float32), name=name, digest=digest[:16]
    )
    entry = DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")])

    def log_inputs():
        try:
            tracker.client.log_inputs(tracking._resolve(run), datasets=[entry])
        except MlflowException:
            # Runs that log the same new dataset at once (queue workers, a team's CI) race to
            # insert it and one loses on its unique key; a second try finds it in place.
            tracker.client.log_inputs(tracking._resolve(run), datasets=[entry])

    tracker.call(log_inputs)


def log_model(run_id: str, model, example) -> str:
    """The model into the run (MLflow's pytorch flavor); returns its models:/ URI.

    Saved as `pt2` (torch.export): loading it runs no pickled code, unlike the `pickle` format
    (~0.4 s cheaper once the optimizer has imported torch._dynamo; docs/speed.md). Wrapped in
    FiniteInput, so that the served model refuses NaN pixels. Its seconds go to the timing file
    as log_model_s.
    """
    import mlflow

    start = time.perf_counter()
    with mlflow.start_run(run_id=run_id), requirements_unchecked():
        info = mlflow.pytorch.log_model(
            FiniteInput(model),
            name="model",
            input_example=example,
            pip_requirements=tracking.pip_requirements(),
            serialization_format="pt2",  # MLflow 3's default outside Databricks, made explicit
        )
    cli.record_timing(log_model_s=round(time.perf_counter() - start, 2))
    return info.model_uri


@contextlib.contextmanager
def requirements_unchecked():
    """MLflow's check that this environment satisfies a model's requirements, skipped.

    log_model pins this environment's own versions (tracking.pip_requirements), so the check
    cannot fail, and it only ever warns. MLflow 3.17 runs it twice per log_model: where it
    writes the requirements (mlflow.utils.environment) and where it loads the logged model
    back to check that the input example serves (mlflow.pyfunc.load_model). The first call
    maps every installed package's files (~0.7 s here) and keeps the map, so skipping one
    call only moves the cost to the other: both are swapped for a no-op while logging (if
    MLflow renames either, the check simply runs again; tests/test_mlflow.py notices).
    """
    import importlib

    name = "warn_dependency_requirement_mismatches"
    # The modules themselves: `from mlflow import pyfunc` gives a lazy proxy whose attributes
    # are not the module's.
    modules = [importlib.import_module(m) for m in ("mlflow.utils.environment", "mlflow.pyfunc")]
    modules = [m for m in modules if hasattr(m, name)]
    saved = [getattr(m, name) for m in modules]
    for module in modules:
        setattr(module, name, lambda requirements: None)
    try:
        yield
    finally:
        for module, check in zip(modules, saved, strict=True):
            setattr(module, name, check)


def _best_metrics(result: Result) -> dict:
    return {k: result.best[k] for k in EPOCH_METRICS}


def _model_settings(p: TrainParams) -> dict:
    return {
        "input_channels": p.input_channels,
        "softmax_output": p.softmax_output,
        "hflip": p.hflip,
    }


def write_outputs(task, summary, rows, result, model, paths: Paths, curves) -> None:
    out = paths.train_reports(task)
    save_model(model, paths.models / f"{task}.pt", {"task": task, "best_epoch": result.best_epoch})
    with atomic_file(out / "history.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    write_json(out / "best.json", summary)
    with atomic_file(paths.plots / f"{task}_curves.png") as tmp:
        shutil.copyfile(curves, tmp)


def parallel(stage: str, args, argv) -> int | None:
    """With train.processes > 1, the stage again under torchrun (its exit code); else None."""
    if distributed.launched():
        return None
    params = Paths(args.root.resolve()).params
    try:
        processes = load(params, "train", TrainParams).processes
        threads = load(params, "base", BaseParams).threads
    except StageError:
        return None  # the stage itself reports the problem
    if processes <= 1:
        return None
    argv = list(sys.argv[1:] if argv is None else argv)
    return distributed.launch(stage, argv, processes, threads)


def main(task: str, title: str, candidates, argv=None, reads: str = "", reuse=()) -> int:
    """The command line of a train_<task> stage; `candidates(paths)` lists its configurations."""
    args = cli.parser(
        f"train_{task}",
        f"{title}. Each configuration is a nested MLflow run under one parent run; the best "
        "by validation loss is kept. Configurations train in parallel (train.workers) and "
        f"checkpoint every epoch under checkpoints/{task}/, so a rerun after an interruption "
        "resumes; the folder is removed when the stage succeeds.",
        reads=f"params.yaml (base.*, train.*, {task}.*, mlflow.*), data/clean/, data/split/, "
        f"reports/data/download.json{reads}",
        writes=f"models/{task}.pt, reports/train/{task}/{{history.csv,best.json,mlflow.json}}, "
        f"reports/plots/{task}_curves.png, MLflow runs "
        "(MLFLOW_TRACKING_URI, default sqlite:///<project>/mlflow.db)",
    ).parse_args(argv)
    code = parallel(f"train_{task}", args, argv)
    if code is not None:
        return code
    return cli.run(
        f"train_{task}", args, lambda paths: run(task, title, candidates(paths), paths, reuse=reuse)
    )
