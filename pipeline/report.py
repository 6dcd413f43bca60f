"""Stage `report`: reports/summary.md, the reproduced numbers beside the original's."""

from __future__ import annotations

import logging
import sys

import pandas as pd

from pipeline import cli, original
from pipeline.config import TASKS, Paths
from pipeline.files import read_json, write_text

log = logging.getLogger(__name__)
STAGES = ("download", "clean", "validate", "split", "train_task2", "train_task3", "train_task4",
          "train_task5", "train_task6", "evaluate")  # fmt: skip


def pct(x: float | None) -> str:
    """An accuracy fraction as the original wrote it: 89.46%."""
    return "" if x is None else f"{100 * x:.2f}%"


def loss(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


def table(header: list[str], rows: list[list]) -> str:
    """A GitHub Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


BEYOND = {  # tasks the original did not have
    "task6_mlp": "the best MLP above, corrected: 784 inputs, logits, no flips",
    "task6_cnn": "LeNet-5-style CNN (ReLU, max-pool), 1 channel, logits, no flips",
}


def results_section(metrics: dict, split: dict) -> str:
    """Test accuracy beside the original's, and on the test images without a copy in train."""
    rows = []
    for task, m in metrics.items():
        orig = original.TASKS.get(task, {})
        theirs = orig.get("test_accuracy")
        diff = "" if theirs is None else f"{100 * (m['test_accuracy'] - theirs):+.2f}"
        within = "" if theirs is None else (
            "yes" if abs(m["test_accuracy"] - theirs) <= original.TOLERANCE + 1e-12 else "**no**"
        )  # fmt: skip
        model = orig.get("model") or BEYOND.get(task, "")
        rows.append([task, model, m["config"]["label"], pct(theirs),
                     pct(m["test_accuracy"]), pct(m["test_unique_accuracy"]), diff, within,
                     loss(orig.get("test_loss")), loss(m["test_loss"])])  # fmt: skip
    unique = next(iter(metrics.values()))["test_unique_images"]  # one test split for all tasks
    header = ["task", "model", "chosen", "original test acc.", "reproduced",
              f"test acc. without train duplicates ({unique:,} images)", "difference (points)",
              f"within {100 * original.TOLERANCE:.1f} points", "original test loss",
              "reproduced test loss"]  # fmt: skip
    copies, total = split["duplicates_in_train"]["test"], split["counts"]["test"]
    note = (
        f"{copies} of the {total:,} test images have an exact pixel copy in the train split, "
        "which a model may have memorized; the column without train duplicates scores each "
        f"model on the other {unique:,} test images only, with the same loss."
    )
    return (
        "## Test results\n\n"
        + table(header, rows)
        + f"\n\n{note}\n\n![Test accuracy per task](plots/tasks.png)\n"
    )


def training_section(metrics: dict, best: dict) -> str:
    rows = []
    for task, m in metrics.items():
        orig, b = original.TASKS.get(task, {}), best[task]
        rows.append([task, m["config"]["label"], f"{b['best_epoch']} / {b['epochs_run']}",
                     loss(b["train_loss"]), loss(orig.get("train_loss")), loss(m["val_loss"]),
                     loss(orig.get("val_loss")), pct(m["val_accuracy"])])  # fmt: skip
    header = ["task", "chosen", "best epoch / epochs run", "train loss", "original",
              "val loss", "original", "val acc."]  # fmt: skip
    note = (
        "Train and validation loss at the best epoch (lowest validation loss); training stops "
        "after `train.patience` epochs without a new best and restores the best weights."
    )
    return "## Training\n\n" + note + "\n\n" + table(header, rows) + "\n"


def sweep_rows(best: dict, key: str, theirs: dict) -> list[list]:
    rows = []
    for c in best["candidates"]:
        value = c[key] if key == "lr" else c["hidden"][0]
        mark = "**" if c["label"] == best["config"]["label"] else ""
        ok = c["status"] == "ok"
        rows.append([f"{mark}{value}{mark}", c.get("best_epoch", ""),
                     loss(c["val_loss"]) if ok else c["status"], loss(theirs.get(value)),
                     pct(c["val_accuracy"]) if ok else ""])  # fmt: skip
    return rows


def sweeps_section(best: dict) -> str:
    out = []
    if "task2" in best:
        theirs = {original.TASKS["task2"]["best_lr"]: original.TASKS["task2"]["val_loss"]}
        out.append(
            "### Task 2: learning rate (best by validation loss, in bold)\n\n"
            + table(
                ["learning rate", "best epoch", "val loss", "original val loss", "val acc."],
                sweep_rows(best["task2"], "lr", theirs),
            )  # fmt: skip
            + "\n\nThe original reported the validation loss of its chosen rate only.\n"
        )
    if "task3" in best:
        theirs = original.TASKS["task3"]["val_loss_by_hidden"]
        out.append(
            "### Task 3: hidden layer size\n\n"
            + table(
                ["hidden units", "best epoch", "val loss", "original val loss", "val acc."],
                sweep_rows(best["task3"], "hidden", theirs),
            )  # fmt: skip
            + "\n"
        )
    return "## Sweeps\n\n" + "\n".join(out)


def data_section(paths: Paths) -> str:
    download = read_json(paths.data_reports / "download.json")
    validation = read_json(paths.validation_dir / "summary.json")
    split = read_json(paths.data_reports / "split.json")
    rejected = pd.read_csv(paths.data_reports / "rejected.csv")
    reasons = ", ".join(f"{n} {r}" for r, n in rejected["reason"].value_counts().items())
    counts, dup = split["counts"], split["duplicates_in_train"]
    lines = [
        f"- Archive: `{download['source']}`, content digest `{download['content_digest'][:16]}…`.",
        f"- Images kept: {validation['images']:,}; rejected by `clean`: "
        f"{validation['rejected_files']}" + (f" ({reasons})." if reasons else "."),
        f"- Great Expectations validation: {'passed' if validation['success'] else 'FAILED'}; "
        f"{len(validation['label_conflicts'])} group(s) of identical images with different "
        "letters.",
        f"- Split (stratified by letter): train {counts['train']:,}, validation "
        f"{counts['val']:,}, test {counts['test']:,}.",
        f"- Duplicate leakage: {dup['val']} validation and {dup['test']} test images have an "
        "exact pixel copy in train.",
    ]
    return "## Data\n\n" + "\n".join(lines) + "\n"


def timing_section(paths: Paths, best: dict) -> str:
    rows, total = [], 0.0
    for stage in STAGES:
        path = paths.timing(stage)
        if path.is_file():
            seconds = read_json(path)["seconds"]
            total += seconds
            task = stage.removeprefix("train_")
            device = best[task]["device"] if task in best else "cpu"
            rows.append([f"`{stage}`", f"{seconds:.1f}", device])
    rows.append(["total", f"{total:.1f}", ""])
    cpus = {read_json(p).get("cpus") for p in paths.timing("x").parent.glob("*.json")}
    note = (
        "Seconds inside each stage, from its last run (Python start-up and imports, a few "
        f"seconds per stage, not included). CPU cores: {', '.join(map(str, sorted(cpus)))}."
    )
    return "## Stage wall times\n\n" + table(["stage", "seconds", "device"], rows) + f"\n\n{note}\n"


def plots_section(tasks) -> str:
    rows = [[t, f"[curves](plots/{t}_curves.png)", f"[confusion](plots/{t}_confusion.png)",
             f"[mistakes](plots/{t}_mistakes.png)"] for t in tasks]  # fmt: skip
    return "## Plots\n\n" + table(["task", "loss and accuracy", "confusion matrix",
                                   "most confident mistakes"], rows) + "\n"  # fmt: skip


def robustness_section(paths: Paths) -> str:
    """Accuracy per condition (rows) and task (columns), from reports/robustness.json."""
    if not paths.robustness.is_file():
        return "## Robustness\n\nNot measured: no reports/robustness.json (`dvc repro`).\n"
    data = read_json(paths.robustness)
    results = data["results"]
    tasks = [t for t in TASKS if t in results] + sorted(set(results) - set(TASKS))
    rows = [[c["name"], f"{c['images']:,}",
             *(pct(results[t][c["name"]]["accuracy"]) for t in tasks)]
            for c in data["conditions"]]  # fmt: skip
    fonts = sorted({f["source"] for f in data["fonts"]})
    note = (
        "Accuracy of each task's model on the test images under each perturbation, and on the "
        f"letters A-J drawn from {len(data['fonts'])} fonts ({', '.join(fonts)}) and fitted to "
        "28x28 as notMNIST glyphs are; each condition is described in `robustness.json`. "
        "[Samples of every condition](plots/robustness_samples.png)."
    )
    return (
        "## Robustness\n\n" + note + "\n\n" + table(["condition", "images", *tasks], rows)
        + "\n\n![Accuracy per condition](plots/robustness.png)\n"
    )  # fmt: skip


def summary(paths: Paths) -> str:
    metrics = read_json(paths.metrics)
    order = [t for t in TASKS if t in metrics] + sorted(set(metrics) - set(TASKS))
    metrics = {t: metrics[t] for t in order}  # the tasks in their own order, not sorted
    best = {t: read_json(paths.train_reports(t) / "best.json") for t in metrics}
    registry = read_json(paths.root / "reports" / "eval" / "registry.json")
    seeds = sorted({b["seed"] for b in best.values()})
    champion = registry["task"]
    head = (
        "# notMNIST: the original experiment, reproduced\n\n"
        f"Written by the `report` stage of `dvc repro`. Seed {', '.join(map(str, seeds))}. "
        "Accuracies in %, two decimals, as the original reported them; losses are "
        "`CrossEntropyLoss` on the model's output, as in training.\n\n"
        f"Registered model: `{registry['name']}` version {registry['version']} "
        f"(`@{registry['alias']}`) is {champion}, the best validation accuracy "
        f"({pct(metrics[champion]['val_accuracy'])}).\n\n"
        "The original's written part (Part I), checked with PyTorch: [theory.md](theory.md).\n"
    )
    split = read_json(paths.data_reports / "split.json")
    parts = [head, results_section(metrics, split), training_section(metrics, best),
             sweeps_section(best), robustness_section(paths), data_section(paths),
             timing_section(paths, best),
             plots_section(metrics)]  # fmt: skip
    return "\n".join(parts)


def run(paths: Paths) -> None:
    write_text(paths.summary, summary(paths))
    log.info("wrote %s", paths.summary.relative_to(paths.root))


def main(argv=None) -> int:
    args = cli.parser(
        "report",
        "Write reports/summary.md: data, sweeps, test results beside the original's, stage "
        "times and links to the plots.",
        reads="reports/metrics.json, reports/eval/registry.json, reports/train/<task>/best.json, "
        "reports/data/*, reports/validation/summary.json, reports/timing/*.json",
        writes="reports/summary.md",
    ).parse_args(argv)
    return cli.run("report", args, run)


if __name__ == "__main__":
    sys.exit(main())
