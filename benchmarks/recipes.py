"""Task 7 recipes side by side: each trained with several seeds, scored on the test split.

    python -m benchmarks.recipes --seeds 2 3 --trial noise task7.noise_std=0.6 \\
        --trial longer task7.noise_std=0.6 task7.max_epochs=16

A trial is a name and `task7.<key>=<value>` overrides of params.yaml; `current` (params.yaml as
it is) always runs first. Each training is the stage's own (`train_task7.candidate`, the same
numerics, seed and data as `dvc repro` on this workspace's data/clean and data/split), without
MLflow. Prints one line per training and a table, with what the seeds' models make together
(their averaged probabilities: an ensemble of that many full trainings) and the test images
every seed gets wrong; `--out` also writes them as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

from pipeline import numerics

numerics.spin_briefly()  # as the stage does, before torch loads

from pipeline.config import BaseParams, Paths, Task7Params, TrainParams, load  # noqa: E402
from pipeline.stages import train_task7  # noqa: E402
from pipeline.training import runner  # noqa: E402
from pipeline.training.loop import (  # noqa: E402
    evaluate_split,
    fit,
    load_splits,
    predict_batched,
    score,
    set_seed,
)
from pipeline.training.model import build  # noqa: E402


def trial_params(paths: Paths, overrides: list[str]) -> Task7Params:
    """task7 of params.yaml with `task7.key=value` overrides (values read as YAML)."""
    section = dataclasses.asdict(load(paths.params, "task7", Task7Params))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.startswith("task7.") or key[6:] not in section:
            raise SystemExit(f"recipes: '{item}' is not task7.<key>=<value>")
        section[key[6:]] = yaml.safe_load(value)
    return Task7Params(**section)


def train_once(p: Task7Params, seed: int, data: dict, train: TrainParams) -> dict:
    """One training as the stage runs it: test accuracy, best epoch, seconds."""
    c = train_task7.candidate(p)
    settings = dict(
        runner.CORRECTED, max_epochs=p.max_epochs, patience=p.patience, batch_size=p.batch_size
    )
    tp = dataclasses.replace(train, **settings)
    set_seed(seed)
    model = build(c.model_config(tp))
    start = time.perf_counter()
    result = fit(model, data, tp, c.lr, seed, c.label, optimizer=c.train_recipe())
    seconds = round(time.perf_counter() - start, 1)
    outputs = predict_batched(model, data["test"].x)
    _, test = score(outputs, data["test"].y)
    _, val = evaluate_split(model, data["val"])
    return {
        "seed": seed,
        "test_accuracy": test,
        "val_accuracy": val,
        "best_epoch": result.best_epoch,
        "seconds": seconds,
        "probabilities": outputs.softmax(1),  # for the ensemble of the seeds; not in the JSON
    }


def over_seeds(runs: list[dict], y: torch.Tensor) -> dict:
    """What the seeds' models make together: the test accuracy of their averaged
    probabilities, and the test images every one of them gets wrong."""
    probabilities = torch.stack([r.pop("probabilities") for r in runs])
    wrong = probabilities.argmax(2) != y
    return {
        "ensemble_test_accuracy": (probabilities.mean(0).argmax(1) == y).double().mean().item(),
        "wrong_in_every_seed": int(wrong.all(0).sum()),
        "wrong_in_some_seed": int(wrong.any(0).sum()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.recipes",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument(
        "--trial", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE")
    )
    ap.add_argument("--skip-current", action="store_true", help="do not train params.yaml's")
    ap.add_argument("--out", type=Path, help="also write the results here (JSON)")
    ap.add_argument(
        "--root", type=Path, default=Paths().root, help="the project (default: %(default)s)"
    )
    args = ap.parse_args(argv)
    paths = Paths(args.root)
    base = load(paths.params, "base", BaseParams)
    numerics.configure(base.numerics, base.threads)
    trials = ([] if args.skip_current else [["current"]]) + args.trial
    plans = [(t[0], trial_params(paths, t[1:]), t[1:]) for t in trials]
    data = load_splits(paths, runner.pick_device("cpu"))
    train = load(paths.params, "train", TrainParams)
    results = {}
    for name, p, overrides in plans:
        runs = []
        for seed in args.seeds:
            row = train_once(p, seed, data, train)
            runs.append(row)
            print(
                f"{name} seed {seed}: test {100 * row['test_accuracy']:.2f}% "
                f"val {100 * row['val_accuracy']:.2f}% (epoch {row['best_epoch']}, "
                f"{row['seconds']} s)",
                flush=True,
            )
        results[name] = {"overrides": overrides, "runs": runs, **over_seeds(runs, data["test"].y)}
    print(
        "\n| trial | seeds | test mean | min | val mean | seconds per training "
        "| the seeds' models averaged | test images wrong in every seed / in some |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        tests = [x["test_accuracy"] * 100 for x in r["runs"]]
        vals = [x["val_accuracy"] * 100 for x in r["runs"]]
        secs = statistics.mean(x["seconds"] for x in r["runs"])
        print(
            f"| {name} {' '.join(r['overrides'])} | {len(tests)} | {statistics.mean(tests):.2f} "
            f"| {min(tests):.2f} | {statistics.mean(vals):.2f} | {secs:.0f} "
            f"| {100 * r['ensemble_test_accuracy']:.2f} "
            f"| {r['wrong_in_every_seed']} / {r['wrong_in_some_seed']} |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
