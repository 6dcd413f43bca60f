"""Scoring a task's model on the test split: metrics, intervals, the champion."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import torch

from pipeline import plots, stats, tracking
from pipeline.config import LETTERS, Paths, StageError
from pipeline.evaluation import original
from pipeline.files import atomic_file, read_json
from pipeline.training.loop import Split, evaluate_split, predict_batched, score
from pipeline.training.model import load_model as load_model

log = logging.getLogger(__name__)

REGISTERED_MODEL = "notmnist-classifier"

ALIAS = "champion"

N_MISTAKES = 40  # images in each task's grid of mistakes

EPOCH_COLUMNS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]


def confusion_matrix(true: np.ndarray, pred: np.ndarray, n: int = len(LETTERS)) -> np.ndarray:
    """(n, n) counts: row = true class, column = predicted class."""
    return np.bincount(n * np.asarray(true) + np.asarray(pred), minlength=n * n).reshape(n, n)


def per_class(matrix: np.ndarray, letters=LETTERS) -> pd.DataFrame:
    """Precision, recall, F1 and support per class from a confusion matrix (0 where undefined)."""
    hits = np.diag(matrix).astype(float)
    predicted, actual = matrix.sum(0), matrix.sum(1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return pd.DataFrame(
        {
            "letter": list(letters),
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": actual,
        }
    )


def worst_mistakes(true, pred, confidence, limit: int = N_MISTAKES) -> np.ndarray:
    """Indices of misclassified rows, most confident first (ties: lowest index)."""
    wrong = np.flatnonzero(true != pred)
    return wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]


def pick_champion(metrics: dict[str, dict]) -> str:
    """The task with the best validation accuracy (ties: the earlier one); never by test."""
    return max(metrics, key=lambda task: metrics[task]["val_accuracy"])


def unseen_in_train(images: np.ndarray, split: np.ndarray) -> np.ndarray:
    """Over the test rows, in order: True where no train image has exactly the same pixels.

    Copies inside test or val, or between them, do not count: only train is memorized.
    """
    train = {im.tobytes() for im in images[split == "train"]}
    return np.array([im.tobytes() not in train for im in images[split == "test"]], dtype=bool)


def accuracy_ci95(correct: np.ndarray) -> list[float] | None:
    """95% Wilson score interval of the accuracy over boolean `correct`; None when empty."""
    n = len(correct)
    return list(stats.wilson(int(correct.sum()), n)) if n else None


def predictions_table(paths, true, pred, probability) -> pd.DataFrame:
    """One row per test image, in test-split order: what a paired comparison needs."""
    letters = np.array(LETTERS)
    return pd.DataFrame(
        {
            "row": np.arange(len(true)),
            "path": paths,
            "true": letters[true],
            "predicted": letters[pred],
            "probability": probability,
        }
    )


def chosen_epochs(history: pd.DataFrame, label: str) -> pd.DataFrame:
    """The per-epoch metrics of the configuration a task chose."""
    rows = history[(history["config"] == label) & history["val_loss"].notna()]
    return rows[EPOCH_COLUMNS].reset_index(drop=True)


def evaluate_task(
    task: str, paths: Paths, data: dict[str, Split], unseen: np.ndarray, test_paths: np.ndarray
) -> dict:
    """Score one task's model on the test split; write its per-task files and PNGs.

    Also scores the test rows where `unseen` is True (no exact copy in train), same loss.
    `test_paths` names the test images, in the order of data["test"].
    """
    best = read_json(paths.train_reports(task) / "best.json")
    model, _ = load_model(paths.models / f"{task}.pt")
    test = Split(data["test"].x.cpu(), data["test"].y.cpu())
    outputs = predict_batched(model, test.x)
    test_loss, test_acc = score(outputs, test.y)
    keep = torch.as_tensor(unseen)
    unique_loss, unique_acc = score(outputs[keep], test.y[keep])
    val_loss, val_acc = evaluate_split(model, Split(data["val"].x.cpu(), data["val"].y.cpu()))
    probs = outputs if model.cfg.softmax_output else torch.softmax(outputs, 1)
    confidence, pred = probs.max(1)
    true, pred, confidence = test.y.numpy(), pred.numpy(), confidence.double().numpy()
    matrix = confusion_matrix(true, pred)

    write_task_files(task, paths, best, matrix, test_paths, true, pred, confidence)
    write_task_plots(task, paths, test_acc, matrix, test.x, true, pred, confidence)
    correct = true == pred
    metrics = {
        "test_accuracy": test_acc,
        "test_accuracy_ci95": accuracy_ci95(correct),
        "test_loss": test_loss,
        "test_unique_accuracy": unique_acc,
        "test_unique_accuracy_ci95": accuracy_ci95(correct[unseen]),
        "test_unique_loss": unique_loss,
        "test_unique_images": int(unseen.sum()),
        "val_accuracy": val_acc,
        "val_loss": val_loss,
        "train_loss": best["train_loss"],
        "best_epoch": best["best_epoch"],
        "config": best["config"],
    }
    log_task(task, metrics)
    return metrics


def write_task_files(task, paths: Paths, best, matrix, test_paths, true, pred, confidence) -> None:
    """reports/eval/<task>/: per-letter metrics, every test prediction, confusion, epochs."""
    out = paths.eval_reports(task)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "per_class.csv") as tmp:
        per_class(matrix).to_csv(tmp, index=False, float_format="%.4f")
    with atomic_file(out / "predictions.csv") as tmp:  # fixed decimals: byte-identical reruns
        predictions_table(test_paths, true, pred, confidence).to_csv(
            tmp, index=False, float_format="%.6f"
        )
    with atomic_file(out / "confusion.csv") as tmp:
        letters = np.array(LETTERS)
        pd.DataFrame({"actual": letters[true], "predicted": letters[pred]}).to_csv(tmp, index=False)
    history = pd.read_csv(paths.train_reports(task) / "history.csv")
    with atomic_file(out / "epochs.csv") as tmp:
        chosen_epochs(history, best["config"]["label"]).to_csv(tmp, index=False)


def write_task_plots(task, paths: Paths, test_acc, matrix, x, true, pred, confidence) -> None:
    """The task's confusion matrix and its most confident mistakes, as PNGs."""
    title = f"{task}: test accuracy {100 * test_acc:.2f}%"
    plots.confusion(matrix, LETTERS, paths.plots / f"{task}_confusion.png", title)
    worst = worst_mistakes(true, pred, confidence)
    images = ((x[worst] * 0.5 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8).numpy()
    plots.mistakes(
        images,
        true[worst],
        pred[worst],
        confidence[worst],
        LETTERS,
        paths.plots / f"{task}_mistakes.png",
        f"{task}: the {len(worst)} most confident of {int((true != pred).sum())} test mistakes",
    )


def log_task(task: str, metrics: dict) -> None:
    theirs = original.REPORTED.get(task, {}).get("test_accuracy")  # None for a task of our own
    versus = "" if theirs is None else f" (original {100 * theirs:.2f}%)"
    low, high = metrics["test_accuracy_ci95"]
    log.info(
        "%s: test loss %.4f, test accuracy %.2f%% (95%% CI %.2f-%.2f)%s; leak-free %.2f%% on %d "
        "images",
        task,
        metrics["test_loss"],
        100 * metrics["test_accuracy"],
        100 * low,
        100 * high,
        versus,
        100 * metrics["test_unique_accuracy"],
        metrics["test_unique_images"],
    )


def task_runs(paths: Paths, tasks) -> tuple[object, dict[str, str]]:
    """The MLflow client and each task's parent run id; fails early if a run is missing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking.tracking_uri(paths.root)
    tracking.check_server(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    runs = {}
    for task in tasks:
        run_id = read_json(paths.train_reports(task) / "mlflow.json")["parent_run_id"]
        try:
            client.get_run(run_id)
        except MlflowException:
            raise StageError(
                f"{task}'s MLflow run {run_id} is not in {uri}; retrain it with "
                f"`dvc repro --force train_{task}`"
            ) from None
        runs[task] = run_id
    return client, runs


def log_test_metrics(client, runs: dict[str, str], metrics: dict, paths: Paths) -> dict:
    """Test metrics and evaluation files into each parent run; register the champion."""
    import mlflow

    for task, run_id in runs.items():
        for key in ("test_accuracy", "test_loss", "test_unique_accuracy"):
            client.log_metric(run_id, tracking.results_key(key), metrics[task][key])
        for path in (
            paths.plots / f"{task}_confusion.png",
            paths.plots / f"{task}_mistakes.png",
            paths.eval_reports(task) / "per_class.csv",
            paths.eval_reports(task) / "predictions.csv",
        ):
            client.log_artifact(run_id, str(path), artifact_path="evaluation")
    champion = pick_champion(metrics)
    run_id = runs[champion]
    with tracking.store_lock(mlflow.get_tracking_uri()):  # parallel experiments register too
        found = client.search_model_versions(f"name='{REGISTERED_MODEL}' and run_id='{run_id}'")
        if found:
            version = found[0].version
        else:
            tags = {"task": champion, "val_accuracy": str(metrics[champion]["val_accuracy"])}
            uri = read_json(paths.train_reports(champion) / "mlflow.json")["model_uri"]
            version = mlflow.register_model(uri, REGISTERED_MODEL, tags=tags).version
        client.set_registered_model_alias(REGISTERED_MODEL, ALIAS, version)
    log.info("registered %s version %s (%s) as @%s", REGISTERED_MODEL, version, champion, ALIAS)
    return {
        "name": REGISTERED_MODEL,
        "alias": ALIAS,
        "version": int(version),
        "task": champion,
        "run_id": run_id,
    }
