"""One training task: train each configuration, log it to MLflow, keep the best by val loss.

The configurations train in pipeline.sweep (resumable, in parallel workers on the CPU); this
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

from pipeline import cli, distributed, numerics, plots, signals, sweep, tracking
from pipeline.config import BaseParams, MlflowParams, Paths, StageError, TrainParams, load
from pipeline.files import atomic_file, read_json, write_json
from pipeline.model import build, save
from pipeline.model import load as load_model
from pipeline.signals import Interrupted
from pipeline.sweep import Candidate, Job
from pipeline.train import Result, load_splits, pick_device

__all__ = ["Candidate", "best_lr", "main", "run"]
log = logging.getLogger(__name__)
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
            history = [{"epoch": int(r["epoch"]), **{k: float(r[k]) for k in EPOCH_METRICS}}
                       for _, r in rows.iterrows()]  # fmt: skip
            out[job.label] = (Result(history, best["best_epoch"]), model.state_dict(), name)
    return out


class Monitor:
    """The MLflow side of a sweep: one nested run per configuration, fed by sweep events."""

    def __init__(self, task: str, tracker: tracking.Tracker, parent, tags: dict, flat: dict,
                 jobs: list[Job], record: dict, record_path):  # fmt: skip
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
            self.tracker.log(self.children[label], step=row["epoch"],
                             metrics={**{k: row[k] for k in EPOCH_METRICS},
                                      "epoch_seconds": row["seconds"]})  # fmt: skip

    def start(self, label: str, rows: list[dict], tags: dict | None = None) -> None:
        """Open (or reopen, after an interruption) the configuration's run."""
        job = self.jobs[label]
        resume = self.record.get("children", {}).get(label)
        run = self.tracker.start_run(
            f"{self.task} {label}", {**self.tags, "config_key": job.key, **(tags or {})},
            parent=self.parent, resume_id=resume, on_created=lambda r: self.save_record(label, r),
        )  # fmt: skip
        self.children[label] = run
        c = job.candidate
        hidden = "-".join(map(str, c.hidden))
        self.tracker.log(run, params={**self.flat, **c.as_dict(), "hidden": hidden})
        if resume is None:
            log_dataset(self.tracker, run, self.tags["data_content_digest"], self.dataset)
        if rows:  # epochs trained before an interruption: the run gets each one once
            self.tracker.call(lambda: self.log_missing(run, rows))
        if rows and resume is not None:
            self.tracker.log(run, tags={"resumed_after_epoch": rows[-1]["epoch"],
                                        **tracking.process_tags()})  # fmt: skip

    def log_missing(self, run: tracking.RunRef, rows: list[dict]) -> None:
        """Log the epochs of `rows` the run does not have yet (all of them in a new run)."""
        from mlflow.entities import Metric

        have = {m.step for m in self.tracker.client.get_metric_history(run.id, "val_loss")}
        now = int(time.time() * 1000)
        metrics = [Metric(k, float(row[k]), now, row["epoch"])
                   for row in rows if row["epoch"] not in have for k in EPOCH_METRICS]  # fmt: skip
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
            self.tracker.log(run, metrics={**{f"best_{k}": result.best[k] for k in EPOCH_METRICS},
                                           "best_epoch": result.best_epoch})  # fmt: skip
        self.tracker.log(run, tags={"status": result.status})
        self.tracker.end_run(run, "FINISHED" if result.status == "ok" else "FAILED")


def run(task: str, title: str, candidates: list[Candidate], paths: Paths,
        section: str | None = None, reuse=(), **train_overrides) -> dict:  # fmt: skip
    """Train every candidate; write the best one's model, history, best.json and curves.

    `section` names the params.yaml section of the task (default: the task's name);
    `reuse` names upstream tasks whose chosen configuration may be one of ours (reused, not
    retrained); `train_overrides` replace `train.*` settings (Task 6 corrects the quirks).
    """
    import mlflow

    p = dataclasses.replace(load(paths.params, "train", TrainParams), **train_overrides)
    base = load(paths.params, "base", BaseParams)
    seed = base.seed
    experiment = load(paths.params, "mlflow", MlflowParams).experiment
    params = yaml.safe_load(paths.params.read_text())
    section = section or task
    flat = tracking.flatten({k: params[k] for k in ("base", "train", section) if k in params})
    flat["data.variant"] = params.get("data", {}).get("variant", "small")
    flat.update({f"train.{k}": v for k, v in train_overrides.items()})
    digest = read_json(paths.data_reports / "download.json")["content_digest"]
    device = pick_device(p.device)
    folder = paths.checkpoints(task)
    jobs = [Job(c, p, seed, str(paths.root), "", sweep.job_key(c, p, seed, paths, device))
            for c in candidates]  # fmt: skip
    jobs = [dataclasses.replace(j, folder=str(folder / j.key)) for j in jobs]
    reused = reusable(paths, reuse, jobs)
    distributed.start(device)  # under torchrun: join the other ranks
    if not distributed.is_main():  # train in step with rank 0; it alone logs and writes
        data = load_splits(paths, device)
        for job in jobs:
            if job.label not in reused:
                sweep.train_job(job, data, None)
        return {}
    sweep.prepare(folder, {j.key for j in jobs})

    uri = tracking.setup(paths.root, experiment)  # an unreachable server fails here
    experiment_id = mlflow.get_experiment_by_name(experiment).experiment_id
    tracker = tracking.Tracker(uri, experiment_id)
    tracking.mark_stale_runs(tracker.client, experiment_id, task, f"train_{task}")
    record_path = folder / "runs.json"  # the runs an interrupted attempt left, to continue
    record = read_json(record_path) if record_path.is_file() else {}
    keys = sorted(j.key for j in jobs)
    if (record.get("uri"), record.get("keys")) != (uri, keys):
        record = {"uri": uri, "keys": keys}
    tags = tracking.tags(task, paths.root, digest, device, seed)
    workers = worker_count(p, base.threads)
    how = f"{min(workers, len(jobs) - len(reused)) or 1} worker(s)"
    if distributed.world() > 1:
        how = f"{distributed.world()} processes (torchrun, DistributedDataParallel)"
    log.info("%s: %d configuration(s) on device %s, %s%s", task, len(jobs), device, how,
             f", {len(reused)} reused" if reused else "")  # fmt: skip
    try:
        folder.mkdir(parents=True, exist_ok=True)

        def created(run):
            record["parent"] = run.id
            write_json(record_path, record)

        parent = tracker.start_run(task, tags, resume_id=record.get("parent"), on_created=created)
        tracker.log(parent, params=flat)
        log_dataset(tracker, parent, digest, f"notMNIST_{flat['data.variant']}")
        monitor = Monitor(task, tracker, parent, tags, flat, jobs, record, record_path)
        results, weights = {}, {}
        for label, (result, state, source) in reused.items():
            monitor.start(label, result.history, tags=reuse_tags(tracker, source, jobs, label))
            results[label], weights[label] = result, state
        todo = [j for j in jobs if j.label not in reused]

        def on_event(event):
            monitor.on_event(event)
            if event[0] == "done":
                result, state = sweep.read_result(files_done[event[1]])
                results[event[1]], weights[event[1]] = result, state
                monitor.finish(event[1], result)

        files_done = {j.label: folder / j.key / "result.pt" for j in todo}
        if todo:
            sweep.run(todo, workers, device, on_event)
        for label in reused:
            monitor.finish(label, results[label])
        summary, model, best = choose(task, title, jobs, results, weights, p, device, seed)
        tracker.log(parent, params={f"chosen.{k}": v for k, v in summary["config"].items()},
                    metrics={**_best_metrics(best), "best_epoch": best.best_epoch})  # fmt: skip
        rows = [r for j in jobs for r in history_rows(j.candidate, results[j.label])]
        curves = folder / f"{task}_curves.png"
        plots.curves(best.history, curves, f"{title}: {summary['config']['label']}",
                     best.best_epoch)  # fmt: skip
        tracker.log_file(parent, curves)
        logged = {}
        example = load_splits(paths, pick_device("cpu"))["val"].x[:8].numpy()
        tracker.call(lambda: logged.update(uri=log_model(parent.id, model, example)))
        tracker.end_run(parent)
        tracker.finish(f"The trained configurations are kept in {folder}: rerun to log them.")
    except BaseException as e:
        signum = e.signum if isinstance(e, Interrupted) else signals.received()
        ended = tracker.down_since is None and tracker.end_open("KILLED" if signum else "FAILED")
        if not signum:
            raise
        stop = e if isinstance(e, Interrupted) else Interrupted(signum)
        if ended:
            stop.cleanup.append("runs marked KILLED")
        raise stop from None
    write_outputs(task, summary, rows, best, model, paths, curves)
    write_json(paths.train_reports(task) / "mlflow.json", {
        "experiment": experiment, "tracking_uri": uri, "parent_run_id": parent.id,
        "run_id": monitor.children[summary["config"]["label"]].id, "model_uri": logged["uri"],
        "candidates": {label: ref.id for label, ref in monitor.children.items()},
    })  # fmt: skip
    cli.record_timing(**{task: {"epoch_seconds": monitor.seconds, "workers": workers}},
                      numerics=numerics.fingerprint(device))
    remove_checkpoints(folder)
    log.info(
        "%s: chose %s (epoch %d): val loss %.4f, val accuracy %.2f%%",
        task, summary["config"]["label"], best.best_epoch, summary["val_loss"],
        100 * summary["val_accuracy"],
    )  # fmt: skip
    return summary


def choose(task, title, jobs, results, weights, p, device, seed):
    """The best configuration by val loss (ties: the earlier one) -> (best.json, model, result)."""
    outcomes, best = [], None
    for job in jobs:
        c, result = job.candidate, results[job.label]
        outcome = {"label": c.label, **c.as_dict(), "status": result.status,
                   "config_key": job.key}  # fmt: skip
        if result.status == "ok":
            outcome.update(best_epoch=result.best_epoch, **_best_metrics(result))
            if best is None or result.best["val_loss"] < results[best.label].best["val_loss"]:
                best = job
        outcomes.append(outcome)
    if best is None:
        remove_checkpoints(Path(jobs[0].folder).parent)  # a final outcome: no rerun resumes it
        raise StageError(f"every configuration of {task} diverged")
    c, result = best.candidate, results[best.label]
    model = build(sweep.model_config(c, p))
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
        [tracker.experiment_id], f"tags.task = '{source}' and tags.config_key = '{key}'",
        max_results=1, order_by=["attributes.start_time DESC"],
    )  # fmt: skip
    note = (
        f"Not retrained: {source} trained this configuration with the same data, seed, "
        f"numerics and code (key {key}); its model and history are reused."
    )
    tags = {"reused_from_task": source, "mlflow.note.content": note}
    if found:
        tags["reused_from_run"] = found[0].info.run_id
    return tags


def log_dataset(tracker: tracking.Tracker, run: tracking.RunRef, digest: str,
                name: str = "notMNIST_small") -> None:  # fmt: skip
    import mlflow
    from mlflow.entities import DatasetInput, InputTag

    dataset = mlflow.data.from_numpy(np.zeros((1, 28, 28), np.float32), name=name,
                                     digest=digest[:16])  # fmt: skip
    entry = DatasetInput(dataset._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")])
    tracker.call(lambda: tracker.client.log_inputs(tracking._resolve(run), datasets=[entry]))


def log_model(run_id: str, model, example) -> str:
    """The model into the run (MLflow's pytorch flavor); returns its models:/ URI."""
    import mlflow

    with mlflow.start_run(run_id=run_id):
        info = mlflow.pytorch.log_model(model, name="model", input_example=example,
                                        pip_requirements=tracking.pip_requirements())  # fmt: skip
    return info.model_uri


def _best_metrics(result: Result) -> dict:
    return {k: result.best[k] for k in EPOCH_METRICS}


def _model_settings(p: TrainParams) -> dict:
    return {"input_channels": p.input_channels, "softmax_output": p.softmax_output,
            "hflip": p.hflip}  # fmt: skip


def write_outputs(task, summary, rows, result, model, paths: Paths, curves) -> None:
    out = paths.train_reports(task)
    save(model, paths.models / f"{task}.pt", {"task": task, "best_epoch": result.best_epoch})
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
