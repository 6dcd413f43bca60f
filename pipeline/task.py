"""One training task: train each configuration, log it to MLflow, keep the best by val loss."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from pipeline import cli, plots, tracking
from pipeline.config import BaseParams, MlflowParams, Paths, StageError, TrainParams, load
from pipeline.files import atomic_file, write_json
from pipeline.model import ModelConfig, build, save
from pipeline.train import Result, configure_determinism, fit, load_splits, pick_device, set_seed

log = logging.getLogger(__name__)
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class Candidate:
    """One configuration a task trains."""

    label: str  # e.g. "lr=0.1" or "hidden=500"
    lr: float
    hidden: tuple[int, ...]
    dropout: float = 0.0
    arch: str = "mlp"  # or "cnn"
    optimizer: str = "sgd"  # or "adam"

    def as_dict(self) -> dict:
        return {"lr": self.lr, "hidden": list(self.hidden), "dropout": self.dropout,
                "arch": self.arch, "optimizer": self.optimizer}  # fmt: skip


def best_lr(paths: Paths) -> float:
    """Task 2's chosen learning rate, from its best.json."""
    path = paths.train_reports("task2") / "best.json"
    try:
        return float(json.loads(path.read_text())["config"]["lr"])
    except (OSError, KeyError, ValueError) as e:
        raise StageError(f"{path}: cannot read Task 2's best learning rate ({e})") from None


def history_rows(c: Candidate, result: Result) -> list[dict]:
    last = len(result.history)
    return [
        {
            "config": c.label,
            "lr": c.lr,
            "hidden": "-".join(map(str, c.hidden)),
            "dropout": c.dropout,
            **row,
            "status": result.status if i == last else "ok",
        }
        for i, row in enumerate(result.history, 1)
    ]


def train_candidate(task, c, data, p, seed, device, flat, run_tags, dataset):
    """Train one configuration inside its own nested MLflow run. -> (result, model, run id)"""
    import mlflow

    set_seed(seed)
    cfg = ModelConfig(
        arch=c.arch,
        hidden=c.hidden,
        input_channels=p.input_channels,
        dropout=c.dropout,
        softmax_output=p.softmax_output,
    )
    model = build(cfg).to(device)
    with mlflow.start_run(run_name=f"{task} {c.label}", nested=True, tags=run_tags) as run:
        mlflow.log_params({**flat, **c.as_dict(), "hidden": "-".join(map(str, c.hidden))})
        mlflow.log_input(dataset, context="training")

        def log_epoch(row: dict) -> None:
            mlflow.log_metrics({k: row[k] for k in EPOCH_METRICS}, step=row["epoch"])

        label = f"{task} {c.label}"
        result = fit(model, data, p, c.lr, seed, label, on_epoch=log_epoch, optimizer=c.optimizer)
        with tempfile.TemporaryDirectory() as tmp:
            csv = Path(tmp) / "history.csv"
            pd.DataFrame(history_rows(c, result)).to_csv(csv, index=False)
            mlflow.log_artifact(str(csv))
        if result.status == "ok":
            best = result.best
            mlflow.log_metrics({f"best_{k}": best[k] for k in EPOCH_METRICS})
            mlflow.log_metric("best_epoch", result.best_epoch)
        mlflow.set_tag("status", result.status)
    if result.status != "ok":
        mlflow.MlflowClient().set_terminated(run.info.run_id, status="FAILED")
    return result, model, run.info.run_id


def run(task: str, title: str, candidates: list[Candidate], paths: Paths,
        section: str | None = None, **train_overrides) -> dict:  # fmt: skip
    """Train every candidate; write the best one's model, history, best.json and curves.

    `section` names the params.yaml section of the task (default: the task's name);
    `train_overrides` replace `train.*` settings (Task 6 corrects the original's quirks).
    """
    import mlflow

    p = dataclasses.replace(load(paths.params, "train", TrainParams), **train_overrides)
    seed = load(paths.params, "base", BaseParams).seed
    experiment = load(paths.params, "mlflow", MlflowParams).experiment
    params = yaml.safe_load(paths.params.read_text())
    section = section or task
    flat = tracking.flatten({k: params[k] for k in ("base", "train", section) if k in params})
    flat.update({f"train.{k}": v for k, v in train_overrides.items()})
    digest = json.loads((paths.data_reports / "download.json").read_text())["content_digest"]

    configure_determinism()
    device = pick_device(p.device)
    tracking.setup(paths.root, experiment)  # an unreachable server fails here, before training
    log.info("%s: %d configuration(s) on device %s", task, len(candidates), device)
    data = load_splits(paths, device)
    run_tags = tracking.tags(task, paths.root, digest, device)
    dataset = mlflow.data.from_numpy(
        data["train"].x[:1].cpu().numpy(), name="notMNIST_small", digest=digest[:16]
    )

    rows, outcomes, best = [], [], None
    with mlflow.start_run(run_name=task, tags=run_tags) as parent:
        mlflow.log_params(flat)
        mlflow.log_input(dataset, context="training")
        for c in candidates:
            result, model, run_id = train_candidate(
                task, c, data, p, seed, device, flat, run_tags, dataset
            )
            rows += history_rows(c, result)
            outcome = {"label": c.label, **c.as_dict(), "status": result.status, "run_id": run_id}
            if result.status == "ok":
                outcome.update(best_epoch=result.best_epoch, **_best_metrics(result))
                if best is None or result.best["val_loss"] < best[1].best["val_loss"]:
                    best = (c, result, copy.deepcopy(model).cpu(), run_id)
            outcomes.append(outcome)
        if best is None:
            raise StageError(f"every configuration of {task} diverged")
        c, result, model, run_id = best
        summary = {
            "task": task,
            "title": title,
            "config": {"label": c.label, **c.as_dict(), **_model_settings(p)},
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            **_best_metrics(result),
            "device": str(device),
            "seed": seed,
            "mlflow": {"experiment": experiment, "parent_run_id": parent.info.run_id,
                       "run_id": run_id},
            "candidates": outcomes,
        }  # fmt: skip
        mlflow.log_params({f"chosen.{k}": v for k, v in summary["config"].items()})
        mlflow.log_metrics({**_best_metrics(result), "best_epoch": result.best_epoch})
        example = data["val"].x[:8].cpu().numpy()  # several rows: the batch size stays dynamic
        logged = mlflow.pytorch.log_model(
            model.eval(),
            name="model",
            input_example=example,
            pip_requirements=tracking.pip_requirements(),
        )
        summary["mlflow"]["model_uri"] = logged.model_uri
        write_outputs(task, title, summary, rows, result, model, paths)
        mlflow.log_artifact(str(paths.plots / f"{task}_curves.png"))
    log.info(
        "%s: chose %s (epoch %d): val loss %.4f, val accuracy %.2f%%",
        task, c.label, result.best_epoch, summary["val_loss"], 100 * summary["val_accuracy"],
    )  # fmt: skip
    return summary


def _best_metrics(result: Result) -> dict:
    return {k: result.best[k] for k in EPOCH_METRICS}


def _model_settings(p: TrainParams) -> dict:
    return {"input_channels": p.input_channels, "softmax_output": p.softmax_output,
            "hflip": p.hflip}  # fmt: skip


def write_outputs(task, title, summary, rows, result, model, paths: Paths) -> None:
    out = paths.train_reports(task)
    save(model, paths.models / f"{task}.pt", {"task": task, "best_epoch": result.best_epoch})
    with atomic_file(out / "history.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    write_json(out / "best.json", summary)
    plots.curves(
        result.history,
        paths.plots / f"{task}_curves.png",
        f"{title}: {summary['config']['label']}",
        result.best_epoch,
    )


def main(task: str, title: str, candidates, argv=None, reads: str = "") -> int:
    """The command line of a train_<task> stage; `candidates(paths)` lists its configurations."""
    args = cli.parser(
        f"train_{task}",
        f"{title}. Each configuration is a nested MLflow run under one parent run; the best "
        "by validation loss is kept.",
        reads=f"params.yaml (base.seed, train.*, {task}.*, mlflow.*), data/clean/, data/split/, "
        f"reports/data/download.json{reads}",
        writes=f"models/{task}.pt, reports/train/{task}/history.csv, "
        f"reports/train/{task}/best.json, reports/plots/{task}_curves.png, MLflow runs "
        "(MLFLOW_TRACKING_URI, default sqlite:///<project>/mlflow.db)",
    ).parse_args(argv)
    return cli.run(f"train_{task}", args, lambda paths: run(task, title, candidates(paths), paths))
