"""reports/summary.md's sections: the reproduced numbers beside the original's."""

from __future__ import annotations

import json
import logging

import pandas as pd

from pipeline.config import TASKS, Paths
from pipeline.evaluation import original
from pipeline.files import read_json
from pipeline.markdown import table

log = logging.getLogger(__name__)

STAGES = (
    "download",
    "clean",
    "validate",
    "split",
    "train_task2",
    "train_task3",
    "train_task4",
    "train_task5",
    "train_task6",
    "train_task7",
    "evaluate",
    "robustness",
)


def pct(x: float | None) -> str:
    """An accuracy fraction as the original wrote it: 89.46%."""
    return "" if x is None else f"{100 * x:.2f}%"


def loss(x: float | None) -> str:
    return "" if x is None else f"{x:.4f}"


BEYOND = {  # tasks the original did not have
    "task6_mlp": "the best MLP above, corrected: 784 inputs, logits, no flips",
    "task6_cnn": "LeNet-5-style CNN (ReLU, max-pool), 1 channel, logits, no flips",
    "task7": "compact CNN with batch norm, augmented glyphs (shifts, rotations, scaling, noise)",
}


def pct_ci(x: float, ci: list | None) -> str:
    """An accuracy and its 95% interval: 89.54% [88.36, 90.62]."""
    return pct(x) if not ci else f"{pct(x)} [{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def read_seeds(paths: Paths) -> dict | None:
    """The seed study's results, if `make seeds` has written them.

    Not a DVC dependency on purpose: the study runs outside `dvc repro` (each of its
    experiments is itself a repro), and a dependency would make every repro fail where it
    has not run. `make seeds` reruns this stage afterwards.
    """
    path = paths.seeds_dir / "seeds.json"
    return read_json(path) if path.is_file() else None


def agreement(task: str, m: dict, seeds: dict | None) -> tuple[str, str]:
    """(the seeds' mean +- sd, whether the original agrees): against the seed study when there
    is one, else the original's own tolerance."""
    theirs = original.REPORTED.get(task, {}).get("test_accuracy")
    t = (seeds or {}).get("tasks", {}).get(task)
    if seeds is not None:
        if t is None:
            return "", ""
        spread = f"{pct(t['mean'])} +- {100 * t['sd']:.2f}"
        if theirs is None:
            return spread, ""
        z = t.get("original_z")
        verdict = "yes" if t["original_within_2sd"] else "**no**"
        return spread, verdict if z is None else f"{verdict} (z = {z:+.2f})"
    if theirs is None:
        return "", ""
    close = abs(m["test_accuracy"] - theirs) <= original.TOLERANCE + 1e-12
    return "", "yes" if close else "**no**"


def results_section(metrics: dict, split: dict, seeds: dict | None = None) -> str:
    """Test accuracy (with its interval) beside the original's, on the test images without a copy
    in train, and against the seed study when there is one."""
    rows = [result_row(task, m, seeds) for task, m in metrics.items()]
    unique = next(iter(metrics.values()))["test_unique_images"]  # one test split for all tasks
    header = [
        "task",
        "model",
        "chosen",
        "original test acc.",
        "reproduced [95% CI]",
        f"test acc. without train duplicates ({unique:,} images) [95% CI]",
        "difference (points)",
    ]
    if seeds:
        header += [
            f"{seeds['n']} seeds: mean +- sd",
            f"original within mean +- 2 sd of {seeds['n']} seeds",
        ]
    else:
        header += [f"within {100 * original.TOLERANCE:.1f} points"]
    header += ["original test loss", "reproduced test loss"]
    return (
        "## Test results\n\n"
        + table(header, rows)
        + "\n\n"
        + "\n\n".join(results_notes(split, unique, seeds))
        + "\n\n![Test accuracy per task](plots/tasks.png)\n"
    )


def result_row(task: str, m: dict, seeds: dict | None) -> list:
    """One task's row of the results table."""
    orig = original.REPORTED.get(task, {})
    theirs = orig.get("test_accuracy")
    diff = "" if theirs is None else f"{100 * (m['test_accuracy'] - theirs):+.2f}"
    spread, agrees = agreement(task, m, seeds)
    model = orig.get("model") or BEYOND.get(task, "")
    acc = pct_ci(m["test_accuracy"], m.get("test_accuracy_ci95"))
    unique_acc = pct_ci(m["test_unique_accuracy"], m.get("test_unique_accuracy_ci95"))
    row = [task, model, m["config"]["label"], pct(theirs), acc, unique_acc, diff]
    row += [spread] if seeds else []
    return row + [agrees, loss(orig.get("test_loss")), loss(m["test_loss"])]


def results_notes(split: dict, unique: int, seeds: dict | None) -> list[str]:
    """What the results table's columns mean: duplicates, intervals, the seed study."""
    copies, total = split["duplicates_in_train"]["test"], split["counts"]["test"]
    notes = [
        f"{copies} of the {total:,} test images have an exact pixel copy in the train split, "
        "which a model may have memorized; the column without train duplicates scores each "
        f"model on the other {unique:,} test images only, with the same loss.",
        "Intervals: 95% Wilson score intervals over the test images (the noise of which images "
        "happen to be in the test split, for this one trained model).",
    ]
    if seeds:
        first, last = seeds["seeds"][0], seeds["seeds"][-1]
        notes.append(
            f"Seed study ([seeds.md](seeds/seeds.md)): the suite retrained with training seeds "
            f"{first}..{last} on this split, at commit `{seeds['baseline_commit'][:12]}`. The "
            "original agrees when its number lies within the seeds' mean +- 2 sd (sample sd); "
            "the other columns are this run's seed."
        )
    else:
        notes.append(
            f'No seed study yet (`make seeds`): "within {100 * original.TOLERANCE:.1f} points" '
            "is the original's own guess at run-to-run noise, not a measured spread."
        )
    return notes


def training_section(metrics: dict, best: dict) -> str:
    rows = []
    for task, m in metrics.items():
        orig, b = original.REPORTED.get(task, {}), best[task]
        rows.append(
            [
                task,
                m["config"]["label"],
                f"{b['best_epoch']} / {b['epochs_run']}",
                loss(b["train_loss"]),
                loss(orig.get("train_loss")),
                loss(m["val_loss"]),
                loss(orig.get("val_loss")),
                pct(m["val_accuracy"]),
            ]
        )
    header = [
        "task",
        "chosen",
        "best epoch / epochs run",
        "train loss",
        "original",
        "val loss",
        "original",
        "val acc.",
    ]
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
        rows.append(
            [
                f"{mark}{value}{mark}",
                c.get("best_epoch", ""),
                loss(c["val_loss"]) if ok else c["status"],
                loss(theirs.get(value)),
                pct(c["val_accuracy"]) if ok else "",
            ]
        )
    return rows


def sweeps_section(best: dict) -> str:
    out = []
    if "task2" in best:
        theirs = {original.REPORTED["task2"]["best_lr"]: original.REPORTED["task2"]["val_loss"]}
        out.append(
            "### Task 2: learning rate (best by validation loss, in bold)\n\n"
            + table(
                ["learning rate", "best epoch", "val loss", "original val loss", "val acc."],
                sweep_rows(best["task2"], "lr", theirs),
            )
            + "\n\nThe original reported the validation loss of its chosen rate only.\n"
        )
    if "task3" in best:
        theirs = original.REPORTED["task3"]["val_loss_by_hidden"]
        out.append(
            "### Task 3: hidden layer size\n\n"
            + table(
                ["hidden units", "best epoch", "val loss", "original val loss", "val acc."],
                sweep_rows(best["task3"], "hidden", theirs),
            )
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


MACHINE_SECTION = "## Machine, numerics and stage times"  # last: it differs between machines

FINGERPRINT = [
    ("mode", "numerics mode"),
    ("cpu_model", "CPU"),
    ("cpu_isa", "CPU offers"),
    ("isa", "ATen kernels"),
    ("mkl_path", "MKL path (MKL_CBWR)"),
    ("mkl", "MKL"),
    ("onednn_isa", "oneDNN"),
    ("onednn", "oneDNN version"),
    ("torch", "torch"),
    ("threads", "threads"),
    ("device", "device"),
]


def machine_section(paths: Paths, best: dict) -> str:
    """Where and how this run computed (the numerics fingerprint), and each stage's seconds.

    The only part of the summary that depends on the machine: `make verify` compares the rest.
    """
    rows, total, prints = [], 0.0, {}
    for stage in STAGES:
        path = paths.timing(stage)
        if path.is_file():
            timing = read_json(path)
            total += timing["seconds"]
            task = stage.removeprefix("train_")
            device = best[task]["device"] if task in best else "cpu"
            rss = f"{timing['peak_rss_mib']:,}" if "peak_rss_mib" in timing else ""
            rows.append([f"`{stage}`", f"{timing['seconds']:.1f}", rss, device])
            if "numerics" in timing:
                prints.setdefault(json.dumps(timing["numerics"], sort_keys=True), []).append(stage)
    rows.append(["total", f"{total:.1f}", "", ""])
    cpus = {read_json(p).get("cpus") for p in paths.timing("x").parent.glob("*.json")}
    parts = [MACHINE_SECTION, ""]
    for blob, stages in prints.items():
        fp = json.loads(blob)
        where = "every torch stage" if len(prints) == 1 else ", ".join(f"`{s}`" for s in stages)
        parts += [
            f"Numerics of {where}: what decides the float rounding (a run whose "
            "fingerprint differs may differ in the last bits).",
            "",
            table(["", "value"], [[name, str(fp.get(key, ""))] for key, name in FINGERPRINT]),
            "",
        ]
    note = (
        "Seconds inside each stage, from its last run (Python start-up and imports, a few "
        "seconds per stage, not included); peak resident memory of the stage's process and its "
        f"workers. CPU cores: {', '.join(map(str, sorted(cpus)))}."
    )
    parts += [table(["stage", "seconds", "peak memory (MiB)", "device"], rows), "", note]
    return "\n".join(parts) + "\n"


def plots_section(tasks) -> str:
    rows = [
        [
            t,
            f"[curves](plots/{t}_curves.png)",
            f"[confusion](plots/{t}_confusion.png)",
            f"[mistakes](plots/{t}_mistakes.png)",
        ]
        for t in tasks
    ]
    return (
        "## Plots\n\n"
        + table(["task", "loss and accuracy", "confusion matrix", "most confident mistakes"], rows)
        + "\n"
    )


def robustness_section(paths: Paths) -> str:
    """Accuracy per condition (rows) and task (columns), from reports/robustness.json."""
    if not paths.robustness.is_file():
        return "## Robustness\n\nNot measured: no reports/robustness.json (`dvc repro`).\n"
    data = read_json(paths.robustness)
    results = data["results"]
    tasks = [t for t in TASKS if t in results] + sorted(set(results) - set(TASKS))
    rows = [
        [c["name"], f"{c['images']:,}", *(pct(results[t][c["name"]]["accuracy"]) for t in tasks)]
        for c in data["conditions"]
    ]
    fonts = sorted({f["source"] for f in data["fonts"]})
    note = (
        "Accuracy of each task's model on the test images under each perturbation, and on the "
        f"letters A-J drawn from {len(data['fonts'])} fonts ({', '.join(fonts)}) and fitted to "
        "28x28 as notMNIST glyphs are; each condition is described in `robustness.json`. "
        "[Samples of every condition](plots/robustness_samples.png)."
    )
    return (
        "## Robustness\n\n"
        + note
        + "\n\n"
        + table(["condition", "images", *tasks], rows)
        + "\n\n![Accuracy per condition](plots/robustness.png)\n"
    )


def render_summary(paths: Paths) -> str:
    metrics = read_json(paths.metrics)
    order = [t for t in TASKS if t in metrics] + sorted(set(metrics) - set(TASKS))
    metrics = {t: metrics[t] for t in order}  # the tasks in their own order, not sorted
    best = {t: read_json(paths.train_reports(t) / "best.json") for t in metrics}
    registry = read_json(paths.root / "reports" / "registry.json")
    seeds = sorted({b["seed"] for b in best.values()})
    champion = registry["task"]
    head = (
        "# notMNIST: the original experiment, reproduced\n\n"
        f"Written by the `report` stage of `dvc repro`. Seed {', '.join(map(str, seeds))}. "
        "Accuracies in %, two decimals, as the original reported them; losses are "
        "`CrossEntropyLoss` on the model's output, as in training.\n\n"
        f"Registered model: `{registry['name']}@{registry['alias']}` is {champion}, the best "
        f"validation accuracy ({pct(metrics[champion]['val_accuracy'])}); its version in this "
        "store is in `registry.json` (a record of the store, like the run ids).\n\n"
        "The original's written part (Part I), checked with PyTorch: [theory.md](theory.md).\n"
    )
    split = read_json(paths.data_reports / "split.json")
    parts = [
        head,
        results_section(metrics, split, read_seeds(paths)),
        training_section(metrics, best),
        sweeps_section(best),
        robustness_section(paths),
        data_section(paths),
        plots_section(metrics),
        machine_section(paths, best),
    ]
    return "\n".join(parts)
