"""Training on a GPU against the committed CPU run: epoch time and test accuracy.

    python -m benchmarks.gpu [--out DIR]

Needs CUDA, and data/clean/ and data/split/ from `dvc repro` (the default split). Trains, with
the settings of params.yaml and the training code the stages use (MLflow is not needed):

  task2 one by one   Task 2's five learning rates, each alone (`sweep.train_job`, as on a CPU)
  task2 stacked      the same five as one program (`training.stacked`, what the stage does on
                     CUDA: each step replayed as one CUDA graph), after one warm-up epoch that
                     is not counted; "no graph": the same, launching each kernel
  task6_cnn          Task 6's LeNet-5-style CNN
  task7              Task 7's batch-norm CNN

and prints per run: epochs, seconds, seconds per epoch, the learning rate chosen (by val loss,
as the stage chooses), test accuracy, and the committed CPU run's test accuracy and stage time
(reports/metrics.json, reports/timing/). Writes gpu.json to --out. `--device cpu --max-epochs 1`
is a smoke test that needs no GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline import numerics
from pipeline.config import BaseParams, Paths, Task6Params, Task7Params, TrainParams, load
from pipeline.stages import train_task2, train_task6, train_task7
from pipeline.training import runner, stacked
from pipeline.training.loop import evaluate_split, load_splits
from pipeline.training.model import build
from pipeline.training.sweep import Job, read_result, train_job

ROOT = Path(__file__).resolve().parents[1]


def say(message: str) -> None:
    print(f"gpu: {message}", file=sys.stderr, flush=True)


def jobs(candidates, params: TrainParams, seed: int, folder: Path) -> list[Job]:
    return [
        Job(c, params, seed, str(ROOT), str(folder / f"{i}"), key=f"{i}")
        for i, c in enumerate(candidates)
    ]


def outcome(job: Job, data: dict) -> dict:
    """The job's result file: epochs, best val loss and its weights' test accuracy."""
    result, weights = read_result(Path(job.folder) / "result.pt")
    model = build(job.candidate.model_config(job.params)).to(data["test"].x.device)
    model.load_state_dict(weights)
    test_loss, test_acc = evaluate_split(model, data["test"])
    return {
        "label": job.label,
        "lr": job.candidate.lr,
        "epochs": len(result.history),
        "status": result.status,
        "val_loss": result.best.get("val_loss"),
        "test_accuracy": test_acc,
    }


def timed(name: str, todo, runs: list[dict], data: dict, cpu: dict) -> dict:
    """Run todo() (which trains and returns its jobs), record one row of the table."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    done = todo()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    per_job = [outcome(job, data) for job in done]
    epochs = sum(o["epochs"] for o in per_job)
    chosen = min(per_job, key=lambda o: o["val_loss"])
    row = {
        "run": name,
        "seconds": round(seconds, 2),
        "epochs": epochs,
        "seconds_per_epoch": round(seconds / epochs, 3),
        "chosen": chosen["label"],
        "test_accuracy": chosen["test_accuracy"],
        "candidates": per_job,
        **cpu,
    }
    runs.append(row)
    say(
        f"{name}: {seconds:.1f} s, {epochs} epochs ({row['seconds_per_epoch']:.3f} s each), "
        f"chose {chosen['label']}, test accuracy {100 * chosen['test_accuracy']:.2f}% (CPU: "
        f"{100 * cpu['cpu_test_accuracy']:.2f}% in {cpu['cpu_stage_seconds']} s)"
    )
    return row


def cpu_reference(task: str) -> dict:
    metrics = json.loads((ROOT / "reports" / "metrics.json").read_text())
    stage = "train_task6" if task.startswith("task6") else f"train_{task}"
    timing = json.loads((ROOT / "reports" / "timing" / f"{stage}.json").read_text())
    return {
        "cpu_test_accuracy": metrics[task]["test_accuracy"],
        "cpu_stage_seconds": timing.get("seconds"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "reports" / "gpu", help="where gpu.json goes")
    p.add_argument("--device", default="cuda", help="cuda (default), or cpu for a smoke test")
    p.add_argument("--max-epochs", type=int, help="cap every run's epochs (a smoke test)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    numerics.deterministic()
    paths = Paths(ROOT)
    base = load(paths.params, "base", BaseParams)
    cap = {"max_epochs": args.max_epochs} if args.max_epochs else {}
    train = dataclasses.replace(load(paths.params, "train", TrainParams), **cap)
    t6, t7 = load(paths.params, "task6", Task6Params), load(paths.params, "task7", Task7Params)
    p6 = dataclasses.replace(
        train, **{"max_epochs": t6.max_epochs, "patience": t6.patience, **runner.CORRECTED, **cap}
    )
    p7 = dataclasses.replace(
        train,
        **{
            "max_epochs": t7.max_epochs,
            "patience": t7.patience,
            "batch_size": t7.batch_size,
            **runner.CORRECTED,
            **cap,
        },
    )
    data = load_splits(paths, device)
    sweep = train_task2.candidates(paths)
    runs: list[dict] = []
    quiet = lambda event: None  # noqa: E731

    def each(todo: list[Job]) -> list[Job]:
        for job in todo:
            train_job(job, data, quiet)
        return todo

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        warm = jobs(sweep, dataclasses.replace(train, max_epochs=1), base.seed, folder / "warm")
        stacked.train(warm, data, quiet)  # CUDA's and cuBLAS's start-up, not counted
        one = jobs(sweep, train, base.seed, folder / "one")
        timed("task2 one by one", lambda: each(one), runs, data, cpu_reference("task2"))
        for name, graphs in [("task2 stacked", None), ("task2 stacked, no graph", False)]:
            together = jobs(sweep, train, base.seed, folder / name)
            timed(
                name,
                lambda j=together, g=graphs: stacked.train(j, data, quiet, g) and j,
                runs,
                data,
                cpu_reference("task2"),
            )
        for name, candidate, params in [
            ("task6_cnn", train_task6.cnn(t6), p6),
            ("task7", train_task7.candidate(t7), p7),
        ]:
            job = jobs([candidate], params, base.seed, folder / name)
            timed(name, lambda job=job: each(job), runs, data, cpu_reference(name))
    props = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    report = {
        "device": props.name if props else platform.processor() or "cpu",
        "torch": torch.__version__,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"{'run':<24} {'epochs':>6} {'seconds':>8} {'s/epoch':>8} {'test acc':>9} "
        f"{'CPU test acc':>12} {'CPU stage s':>11}"
    )
    for r in runs:
        print(
            f"{r['run']:<24} {r['epochs']:>6} {r['seconds']:>8.1f} "
            f"{r['seconds_per_epoch']:>8.3f} {100 * r['test_accuracy']:>8.2f}% "
            f"{100 * r['cpu_test_accuracy']:>11.2f}% {r['cpu_stage_seconds']:>11}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
