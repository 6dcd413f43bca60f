"""Stage `train_task6`: beyond the original: its best MLP corrected, and a LeNet-5-style CNN.

Both take one gray channel, output logits for CrossEntropyLoss and see no mirrored letters.
"""

import sys

from pipeline import cli
from pipeline.config import TASKS, Task6Params, load
from pipeline.files import read_json
from pipeline.training import runner

TITLE_MLP = "Task 6: the corrected MLP"
TITLE_CNN = "Task 6: LeNet-5-style CNN"
ORIGINAL_TASKS = TASKS[:4]


def best_mlp(paths) -> runner.Candidate:
    """The architecture and lr of the task with the best validation accuracy (ties: earlier)."""
    best = {}
    for name in ORIGINAL_TASKS:
        best[name] = read_json(paths.train_reports(name) / "best.json")
    name = max(best, key=lambda t: best[t]["val_accuracy"])
    c = best[name]["config"]
    hidden = tuple(c["hidden"])
    dropout = f" dropout={c['dropout']}" if c["dropout"] else ""
    label = f"hidden={'-'.join(map(str, hidden))}{dropout} lr={c['lr']} (as {name})"
    return runner.Candidate(label, float(c["lr"]), hidden, float(c["dropout"]))


def cnn(p: Task6Params) -> runner.Candidate:
    label = f"LeNet-5 {p.cnn_optimizer} lr={p.cnn_lr}"
    return runner.Candidate(
        label, p.cnn_lr, tuple(p.cnn_hidden), arch="cnn", optimizer=p.cnn_optimizer
    )


def run(paths) -> None:
    p = load(paths.params, "task6", Task6Params)
    settings = dict(runner.CORRECTED, max_epochs=p.max_epochs, patience=p.patience)
    runner.run("task6_mlp", TITLE_MLP, [best_mlp(paths)], paths, section="task6", **settings)
    runner.run("task6_cnn", TITLE_CNN, [cnn(p)], paths, section="task6", **settings)


def main(argv=None) -> int:
    outputs = [
        f"models/{t}.pt, reports/train/{t}/{{history.csv,best.json,mlflow.json}}, "
        f"reports/plots/{t}_curves.png"
        for t in ("task6_mlp", "task6_cnn")
    ]
    args = cli.parser(
        "train_task6",
        "Beyond the original: its best MLP (Tasks 2-5, by validation accuracy) with the quirks "
        "corrected (one channel, logits, no flips), and a LeNet-5-style CNN; early stopping.",
        reads="params.yaml (base.seed, train.batch_size, task6.*, mlflow.*), data/clean/, "
        "data/split/, reports/data/download.json, reports/train/task{2,3,4,5}/best.json",
        writes=", ".join(outputs) + ", MLflow runs",
    ).parse_args(argv)
    code = runner.parallel("train_task6", args, argv)
    return cli.run("train_task6", args, run) if code is None else code


if __name__ == "__main__":
    sys.exit(main())
