"""Stage `evaluate`: score every task's model on the test split with the training loss.

Writes reports/metrics.json, per-task per-letter metrics, confusion data and curves for
`dvc plots`, PNGs, logs test metrics to each task's MLflow run and registers the best model
(by validation accuracy) as notmnist-classifier@champion. Each task is also scored on the test
images that have no exact pixel copy in train, which a model may have memorized. Every test
accuracy comes with a 95% Wilson score interval, and every test image's prediction is kept in
reports/eval/<task>/predictions.csv so that two revisions can be compared image by image.
"""

from __future__ import annotations

import logging
import sys
import textwrap

import pandas as pd
import torch

from pipeline import cli, plots
from pipeline.config import TASKS, MlflowParams, Paths, load
from pipeline.data.decode import load_clean
from pipeline.evaluation import original
from pipeline.evaluation.scoring import (
    ALIAS,
    REGISTERED_MODEL,
    evaluate_task,
    log_test_metrics,
    task_runs,
    unseen_in_train,
)
from pipeline.files import write_json
from pipeline.training.loop import load_splits

log = logging.getLogger(__name__)


def run(paths: Paths, tasks=TASKS) -> dict:
    load(paths.params, "mlflow", MlflowParams)  # params are valid before any work
    client, runs = task_runs(paths, tasks)
    data = load_splits(paths, torch.device("cpu"))  # checks split.csv against the clean index
    images, _ = load_clean(paths.clean_dir)
    table = pd.read_csv(paths.split_dir / "split.csv", dtype={"path": str})
    split = table["split"].to_numpy()
    unseen = unseen_in_train(images, split)
    test_paths = table["path"].to_numpy()[split == "test"]  # load_splits' order
    metrics, rows = {}, []
    for task in tasks:
        metrics[task] = evaluate_task(task, paths, data, unseen, test_paths)
        label = f"{task}\n{textwrap.fill(metrics[task]['config']['label'], 18)}"
        rows.append(
            {
                "label": label,
                "test_accuracy": metrics[task]["test_accuracy"],
                "ci95": metrics[task]["test_accuracy_ci95"],
                "original": original.REPORTED.get(task, {}).get("test_accuracy"),
            }
        )
    plots.task_accuracies(rows, paths.plots / "tasks.png", "Test accuracy per task")
    write_json(paths.metrics, metrics)
    registry = log_test_metrics(client, runs, metrics, paths)
    write_json(paths.root / "reports" / "registry.json", registry)
    return metrics


def main(argv=None) -> int:
    args = cli.parser(
        "evaluate",
        "Score each task's model on the test split with the loss it was trained with, also on "
        "the test images without an exact copy in train, each accuracy with a 95% Wilson score "
        "interval; keep every test image's prediction; register the best model by validation "
        f"accuracy as {REGISTERED_MODEL}@{ALIAS}.",
        reads="models/<task>.pt, reports/train/<task>/{best.json,history.csv,mlflow.json}, "
        "data/clean/, data/split/, params.yaml (mlflow.*), the MLflow runs mlflow.json names",
        writes="reports/metrics.json, "
        "reports/eval/<task>/{per_class,confusion,epochs,predictions}.csv, "
        "reports/registry.json, reports/plots/<task>_confusion.png, "
        "reports/plots/<task>_mistakes.png, "
        "reports/plots/tasks.png, test metrics in MLflow, the model registry",
    ).parse_args(argv)
    return cli.run("evaluate", args, run)


if __name__ == "__main__":
    sys.exit(main())
