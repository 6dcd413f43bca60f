"""The Task 2 step and epoch, measured: per-step profiles, the cost of portable numerics.

Task 2's model throughout: MLP 2,352 -> 1,000 -> 10 folded to 784 inputs, Softmax head, batch
32, lr 0.1, random horizontal flips, plain SGD, on the CPU.

`python -m benchmarks.steps` trains Task 2 epochs with training.loop.fit in a process of its
own, in the numerics mode it is given: the mode must be pinned before torch runs anything, so
portable and native cannot share a process.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import pipeline  # noqa: F401  (first: it sets OpenMP's waiting policy before torch loads)

# isort: on
import torch
from torch import nn
from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from benchmarks.common import subset
from pipeline import numerics
from pipeline.config import Paths, TrainParams
from pipeline.training.loop import Split, fit, load_splits, make_optimizer, set_seed
from pipeline.training.model import MLP, ModelConfig

LR, BATCH, HIDDEN = 0.1, 32, 1000  # the original's Task 2 winner, its batch size and width


def task2_params(epochs: int):
    return TrainParams(
        batch_size=BATCH,
        max_epochs=epochs,
        patience=epochs + 1,  # no early stop
        input_channels=3,
        softmax_output=True,
        hflip=True,
        device="cpu",
    )


def task2_model(hidden: int, seed: int):
    set_seed(seed)
    return MLP(ModelConfig(hidden=(hidden,), input_channels=3, softmax_output=True))


def fit_epochs(data: dict, hidden: int, epochs: int, seed: int, label: str) -> dict:
    """pipeline.training.loop.fit, Task 2's settings; per-epoch seconds (val pass included)."""
    result = fit(task2_model(hidden, seed), data, task2_params(epochs), LR, seed, label=label)
    if result.status != "ok":
        raise RuntimeError(f"{label}: {result.status}")
    rows = result.history
    return {
        "epoch_seconds": [r["seconds"] for r in rows],
        "median_epoch_s": statistics.median(r["seconds"] for r in rows),
        "images_per_s": len(data["train"]) / statistics.median(r["seconds"] for r in rows),
        "last_train_loss": rows[-1]["train_loss"],
        "last_train_accuracy": rows[-1]["train_accuracy"],
    }


# --- portable against native: one fresh process per mode ------------------------------------


def numerics_cost(
    root: Path,
    limit: int | None,
    seed: int,
    hidden: int,
    epochs: int,
    threads: int,
    rounds: int,
    env: dict,
    say,
) -> dict:
    """Task 2 epochs in portable and in native mode, each round one fresh process per mode
    (alternating, so a change in the machine's load hits both); the median epoch of each."""
    runs = {"portable": [], "native": []}
    with tempfile.TemporaryDirectory(prefix="train-speed-numerics-") as tmp:
        for r in range(rounds):
            for mode in runs:
                out = Path(tmp) / f"{mode}-{r}.json"
                cmd = [
                    sys.executable,
                    "-m",
                    "benchmarks.steps",
                    "--root",
                    str(root),
                    "--mode",
                    mode,
                    "--threads",
                    str(threads),
                    "--epochs",
                    str(epochs),
                    "--hidden",
                    str(hidden),
                    "--seed",
                    str(seed),
                    "--json",
                    str(out),
                ]
                if limit:
                    cmd += ["--limit", str(limit)]
                say(f"numerics: {mode} mode, round {r + 1}/{rounds}, {epochs} epoch(s)")
                subprocess.run(cmd, cwd=Path(__file__).parents[1], env=env, check=True)
                runs[mode].append(json.loads(out.read_text()))
    figures = {}
    for mode, found in runs.items():
        seconds = [s for f in found for s in f["epoch_seconds"]]
        figures[mode] = {
            "epoch_seconds": seconds,
            "median_epoch_s": statistics.median(seconds),
            "last_train_loss": found[-1]["last_train_loss"],
            "fingerprint": found[-1]["fingerprint"],
        }
    figures["ratio"] = figures["portable"]["median_epoch_s"] / figures["native"]["median_epoch_s"]
    figures.update(epochs=epochs, rounds=rounds, threads=threads, hidden=hidden)
    return figures


def numerics_report(fig: dict) -> str:
    lines = [
        f"Task 2 epoch (fit, val pass included), {fig['threads']} threads, "
        f"{fig['epochs']} epochs x {fig['rounds']} round(s) per mode, each a fresh process",
        f"{'mode':<10}{'isa':>8}{'median s/epoch':>16}{'last loss':>12}  per epoch (s)",
    ]
    for mode in ("portable", "native"):
        r = fig[mode]
        per_epoch = " ".join(f"{s:.2f}" for s in r["epoch_seconds"])
        lines.append(
            f"{mode:<10}{r['fingerprint']['isa']:>8}{r['median_epoch_s']:>16.3f}"
            f"{r['last_train_loss']:>12.6f}  {per_epoch}"
        )
    lines.append(f"portable / native: {fig['ratio']:.3f} (goal: at most 1.10)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.steps", description=__doc__)
    p.add_argument("--root", type=Path, required=True, help="holds data/clean and data/split")
    p.add_argument("--mode", choices=numerics.MODES, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    numerics.configure(args.mode, args.threads)  # before torch's first operation

    data = subset(load_splits(Paths(args.root), torch.device("cpu")), args.limit, args.seed)
    figures = fit_epochs(data, args.hidden, args.epochs, args.seed, args.mode)
    figures["fingerprint"] = numerics.fingerprint("cpu")
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


# --- one step, before and after; the products' floor ----------------------------------------


def batch_rows(n: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Row indices of `steps` full batches: shuffled epochs back to back."""
    epochs = math.ceil(steps * BATCH / n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])


def before_steps(data: dict, hidden: int, steps: int, seed: int) -> float:
    """The previous loop's steps: gather and flip each batch, loss.item() every step, and a
    per-tensor SGD loop. Returns seconds."""
    train = Split(data["train"].floats(), data["train"].y)  # the previous loop's float images
    model = task2_model(hidden, seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.param_groups(LR), lr=LR, foreach=False)  # the for-loop SGD
    loss_fn = nn.CrossEntropyLoss()
    order = batch_rows(len(train), steps, g)
    loss_sum, correct = torch.zeros(()), torch.zeros((), dtype=torch.long)
    model.train()
    start = time.perf_counter()
    for i in range(0, steps * BATCH, BATCH):
        idx = order[i : i + BATCH]
        x, y = train.x[idx], train.y[idx]
        flip = torch.rand(len(x), generator=g) < 0.5
        x = torch.where(flip[:, None, None], x.flip(-1), x)
        out = model(x)
        loss = loss_fn(out, y)
        if not math.isfinite(loss.item()):
            raise RuntimeError("diverged")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach() * len(y)
        correct += (out.argmax(1) == y).sum()
    return time.perf_counter() - start


def after_steps(data: dict, hidden: int, steps: int, seed: int) -> tuple[float, int]:
    """pipeline.training.loop.fit itself, whole, over about `steps` steps (as few epochs of a seeded
    subset of at most steps x 32 training images as it takes, a 1-image val set).
    Returns (seconds, steps run)."""
    train = data["train"]
    n = min(len(train), steps * BATCH)
    per_epoch = math.ceil(n / BATCH)
    epochs = math.ceil(steps / per_epoch)
    rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    val = Split(train.x[:1], train.y[:1])
    small = {"train": Split(train.x[rows], train.y[rows]), "val": Split(val.floats(), val.y)}
    model = task2_model(hidden, seed)
    start = time.perf_counter()
    fit(model, small, task2_params(epochs), LR, seed, label="profile")
    return time.perf_counter() - start, epochs * per_epoch


def floor_steps(data: dict, hidden: int, steps: int, seed: int) -> dict:
    """Seconds of `steps` forward products (32x784 @ 784xH), weight-gradient products
    (Hx32 @ 32x784) and fused SGD updates of every parameter (fit's optimizer), each alone."""
    model = task2_model(hidden, seed)
    first = model.net[0]
    x = data["train"].floats().flatten(1)
    x = x.repeat(math.ceil(steps * BATCH / len(x)), 1)[: steps * BATCH].contiguous()
    grad_out = torch.randn(BATCH, hidden)
    opt = make_optimizer(model, "sgd", LR)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    batches = [x[i : i + BATCH] for i in range(0, steps * BATCH, BATCH)]
    out = {}
    with torch.no_grad():
        start = time.perf_counter()
        for b in batches:
            torch.addmm(first.bias, b, first.weight.t())
        out["forward_product"] = time.perf_counter() - start
        start = time.perf_counter()
        for b in batches:
            grad_out.t().mm(b)
        out["weight_gradient_product"] = time.perf_counter() - start
        start = time.perf_counter()
        for _ in batches:
            opt.step()
        out["sgd_update"] = time.perf_counter() - start
    return out


def top_ops(prof, steps: int, k: int) -> list[dict]:
    """The k ops with the most self CPU time: per step and as a share of the whole."""
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [
        {
            "op": e.key,
            "calls_per_step": e.count / steps,
            "self_us_per_step": e.self_cpu_time_total / steps,
            "share": e.self_cpu_time_total / total,
        }
        for e in events[:k]
    ]


def profile(
    data: dict,
    hidden: int,
    steps: int,
    warmup: int,
    repeats: int,
    seed: int,
    top: int = 12,
    say=lambda message: None,
) -> dict:
    """ms per step before and after (median of `repeats` timed runs after `warmup` steps of
    each), the top ops of one more profiled run of each, and the products' floor."""
    say(f"profile: warm-up, {warmup} steps of each")
    before_steps(data, hidden, warmup, seed)
    after_steps(data, hidden, warmup, seed)
    floor_steps(data, hidden, warmup, seed)
    ms = {"before": [], "after": [], "floor": []}
    parts = []
    for r in range(repeats):
        say(f"profile: timed run {r + 1}/{repeats}, {steps} steps of each")
        ms["before"].append(1000 * before_steps(data, hidden, steps, seed) / steps)
        seconds, ran = after_steps(data, hidden, steps, seed)
        ms["after"].append(1000 * seconds / ran)
        parts.append(
            {k: 1000 * v / steps for k, v in floor_steps(data, hidden, steps, seed).items()}
        )
        ms["floor"].append(sum(parts[-1].values()))
    figures = {
        name: {"ms_per_step": statistics.median(v), "runs_ms_per_step": v} for name, v in ms.items()
    }
    figures["floor"]["parts_ms_per_step"] = {
        k: statistics.median(p[k] for p in parts) for k in parts[0]
    }
    say("profile: profiled runs")
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        before_steps(data, hidden, steps, seed)
    figures["before"]["top_ops"] = top_ops(prof, steps, top)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        _, ran = after_steps(data, hidden, steps, seed)
    figures["after"]["top_ops"] = top_ops(prof, ran, top)
    figures["speedup"] = figures["before"]["ms_per_step"] / figures["after"]["ms_per_step"]
    figures.update(
        steps=steps,
        warmup=warmup,
        repeats=repeats,
        hidden=hidden,
        numerics=numerics.fingerprint("cpu"),
    )
    return figures


def profile_report(fig: dict) -> str:
    nx = fig["numerics"]
    names = {
        "before": "before: gather + flip per batch, loss.item(), for-loop SGD",
        "after": "after: pipeline.training.loop.fit (Batches, fused SGD), whole",
        "floor": "floor: the 2 large products + fused SGD update",
    }
    lines = [
        f"one Task 2 step (hidden {fig['hidden']}, batch {BATCH}), {fig['steps']} steps, "
        f"median of {fig['repeats']} runs; {nx['mode']} numerics, isa {nx['isa']}, "
        f"{nx['threads']} threads",
        f"{'step':<62}{'ms/step':>9}",
    ]
    lines += [f"{text:<62}{fig[k]['ms_per_step']:>9.3f}" for k, text in names.items()]
    lines += [f"  {k:<60}{v:>9.3f}" for k, v in fig["floor"]["parts_ms_per_step"].items()]
    lines.append(
        f"before / after: {fig['speedup']:.2f}x; after / floor: "
        f"{fig['after']['ms_per_step'] / fig['floor']['ms_per_step']:.2f}x"
    )
    for k in ("before", "after"):
        lines += [
            "",
            f"top ops by self CPU time, {k}:",
            f"  {'op':<44}{'calls/step':>11}{'us/step':>10}{'share':>8}",
        ]
        lines += [
            f"  {o['op'][:44]:<44}{o['calls_per_step']:>11.2f}{o['self_us_per_step']:>10.1f}"
            f"{100 * o['share']:>7.1f}%"
            for o in fig[k]["top_ops"]
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
