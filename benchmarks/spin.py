"""Task 7's epoch with libgomp's default spin and with the stage's own (numerics.spin_briefly).

An idle OpenMP thread spins GOMP_SPINCOUNT turns before it sleeps: 300,000 by default, 3,000 in
the train_task7 stage, whose convolutions run through NNPACK's own thread pool.

`python -m benchmarks.spin` trains Task 7's model (task7.* in params.yaml) with training.loop.fit
in a process of its own, as the stage does: it imports stages.train_task7 first, so the spin
count is the stage's unless the environment sets one. OpenMP reads it once, as torch loads, so
each setting needs a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DEFAULT = "300000"  # libgomp's own, when OMP_WAIT_POLICY is unset
SETTINGS = {"default": {"GOMP_SPINCOUNT": DEFAULT}, "stage": {}}  # stage: spin_briefly decides


def spin_cost(
    root: Path,
    params: Path,
    limit: int | None,
    seed: int,
    epochs: int,
    threads: int,
    rounds: int,
    env: dict,
    say,
) -> dict:
    """Task 7 epochs with each setting, each round one fresh process per setting (alternating,
    so a change in the machine's load hits both); the median epoch of each."""
    env = {k: v for k, v in env.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    runs = {name: [] for name in SETTINGS}
    with tempfile.TemporaryDirectory(prefix="train-speed-spin-") as tmp:
        for r in range(rounds):
            for name, extra in SETTINGS.items():
                out = Path(tmp) / f"{name}-{r}.json"
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.spin",
                    "--root",
                    str(root),
                    "--params",
                    str(params),
                    "--threads",
                    str(threads),
                    "--epochs",
                    str(epochs),
                    "--seed",
                    str(seed),
                    "--json",
                    str(out),
                ]
                if limit:
                    cmd += ["--limit", str(limit)]
                say(f"spin: {name}, round {r + 1}/{rounds}, {epochs} Task 7 epoch(s)")
                subprocess.run(cmd, cwd=Path(__file__).parents[1], env={**env, **extra}, check=True)
                runs[name].append(json.loads(out.read_text()))
    figures = {}
    for name, found in runs.items():
        seconds = [s for f in found for s in f["epoch_seconds"]]
        figures[name] = {
            "spin_count": found[-1]["spin_count"],
            "epoch_seconds": seconds,
            "median_epoch_s": statistics.median(seconds),
            "last_train_loss": found[-1]["last_train_loss"],
        }
    figures["ratio"] = figures["stage"]["median_epoch_s"] / figures["default"]["median_epoch_s"]
    figures.update(epochs=epochs, rounds=rounds, threads=threads, limit=limit)
    return figures


def spin_report(fig: dict) -> str:
    images = f"{fig['limit']} train images" if fig["limit"] else "the whole train split"
    lines = [
        f"Task 7 epoch (fit on {images}, val pass included), {fig['threads']} threads, "
        f"{fig['epochs']} epochs x {fig['rounds']} round(s) per setting, each a fresh process",
        f"{'setting':<10}{'GOMP_SPINCOUNT':>16}{'median s/epoch':>16}{'last loss':>12}"
        "  per epoch (s)",
    ]
    for name in SETTINGS:
        r = fig[name]
        per_epoch = " ".join(f"{s:.2f}" for s in r["epoch_seconds"])
        lines.append(
            f"{name:<10}{r['spin_count']:>16}{r['median_epoch_s']:>16.3f}"
            f"{r['last_train_loss']:>12.6f}  {per_epoch}"
        )
    lines.append(f"stage / default: {fig['ratio']:.3f} (the same losses: no result depends on it)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.spin", description=__doc__)
    p.add_argument("--root", type=Path, required=True, help="holds data/clean and data/split")
    p.add_argument("--params", type=Path, required=True, help="gives task7.* and base.numerics")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    # isort: off
    from pipeline.stages import train_task7

    # isort: on
    import torch

    from benchmarks.common import subset
    from pipeline import numerics
    from pipeline.config import BaseParams, Paths, Task7Params, TrainParams, load
    from pipeline.training import runner
    from pipeline.training.loop import fit, load_splits, set_seed
    from pipeline.training.model import build

    numerics.configure(load(args.params, "base", BaseParams).numerics, args.threads)
    t7 = load(args.params, "task7", Task7Params)
    c = train_task7.candidate(t7)
    tp = TrainParams(
        **runner.CORRECTED,
        max_epochs=args.epochs,
        patience=args.epochs + 1,
        batch_size=t7.batch_size,
        device="cpu",
    )
    data = subset(load_splits(Paths(args.root), torch.device("cpu")), args.limit, args.seed)
    set_seed(args.seed)
    model = build(c.model_config(tp))
    result = fit(model, data, tp, c.lr, args.seed, "task7", optimizer=c.train_recipe())
    rows = result.history
    figures = {
        "spin_count": os.environ.get("GOMP_SPINCOUNT", DEFAULT),
        "epoch_seconds": [r["seconds"] for r in rows],
        "last_train_loss": rows[-1]["train_loss"],
    }
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
