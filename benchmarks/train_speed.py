"""How much faster is the project's training than the original's? Measured on the real data.

The default run, on the mirror archive and the project's own split (params.yaml's split.* and
base.seed):
  1. the `clean` stage's work: decode every image of the archive in memory (data.decode.scan);
  2. the original's loop: the train split written as grayscale PNGs into an ImageFolder tree,
     RandomHorizontalFlip + ColorJitter + ToTensor + Normalize, DataLoader(batch_size=32,
     shuffle=True, num_workers=0), Flatten -> Linear(2352, H) -> ReLU -> Linear(H, 10) ->
     Softmax, CrossEntropyLoss, SGD(lr=0.1); each epoch timed (train pass only);
  3. the project's loop: training.loop.fit on the same split with the same model and settings,
     once as the pipeline runs it (each epoch ends with a pass over the 1,000 val images) and
     once with a 1-image val split (train pass only, comparable with 2).
It prints the median epoch seconds of each loop, their ratio, images per second, the decode
rate and the peak resident memory. This process computes in params.yaml's base.numerics mode
and base.threads, as the stages do. --repro also times each stage of a real `dvc repro
--force` on a temporary git + DVC copy of the project.

Other measurements, each beside a baseline from the same run (any of them replaces the default
run; --json writes every figure):
  --numerics  the Task 2 epoch in portable and in native numerics, each in a fresh process;
  --spin      Task 7 epochs with libgomp's default spin count (300,000) and with the stage's
              (3,000), each in a fresh process;
  --profile   one Task 2 step before (the previous loop) and after (fit), top ops, and the
              floor: the step's two large products and the SGD update alone;
  --sweep     Task 2's stage on a copy of the project with 1 and then 2 workers: wall times,
              speed-up, and whether the outputs are byte-identical;
  --startup   per dvc.yaml stage, import and wall time of `--help`; baselines: the bare
              interpreter and `import torch`;
  --stage-cost  a training stage's fixed cost (wall - epochs) the way it ran before (MLflow's
              requirements check, Python's default garbage collection) and now, in
              alternating fresh processes (--rounds each; --stages: the first, default
              train_task4) on a copy of the project capped by --limit and --max-epochs;
  --suite     the original's whole protocol (Tasks 2-5 in its style) against the project's
              whole `dvc repro --force`, the ratio, each stage's time and peak memory.

If params.yaml's data.content_digest is set, the archive must match it (as in `download`);
a params.yaml with `content_digest: null` (see --root) accepts any archive of A..J folders.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

# isort: off
import pipeline  # noqa: F401  (first: it sets OpenMP's waiting policy before torch loads)

# isort: on
import torch  # (importing runs no operation: numerics are pinned in time)

from benchmarks import common, coursework, spin, stage_cost, stages, steps, suite
from benchmarks.common import say
from benchmarks.stages import timed_stages  # noqa: F401  (tests use it from here)
from pipeline import numerics
from pipeline.config import BaseParams, DataParams, Paths, StageError, load
from pipeline.data.archive import content_digest
from pipeline.training.loop import Split

ROOT = Path(__file__).resolve().parents[1]
MODES = ("numerics", "spin", "profile", "sweep", "startup", "stage_cost", "suite")


def loops(data: dict, tmp: Path, hidden: int, epochs: int, seed: int) -> dict:
    """The default run: the original's training passes against the project's fit."""
    say(f"writing {len(data['train'])} train images as PNGs")
    train = data["train"]
    pixels = ((train.floats() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    coursework.write_image_folder(pixels.numpy(), train.y.tolist(), tmp / "train")
    seconds, loss, acc = coursework.train_loop(
        tmp / "train", hidden, epochs, seed, steps.LR, steps.BATCH, say
    )
    median = statistics.median(seconds)
    one_val = {"train": train, "val": Split(data["val"].x[:1], data["val"].y[:1])}
    figures = {
        "train": {
            "train_images": len(train),
            "val_images": len(data["val"]),
            "hidden": hidden,
            "epochs": epochs,
            "batch_size": steps.BATCH,
            "lr": steps.LR,
        },
        "original": {
            "epoch_seconds": seconds,
            "median_epoch_s": median,
            "images_per_s": len(train) / median,
            "last_train_loss": loss,
            "last_train_accuracy": acc,
        },
        "project": steps.fit_epochs(data, hidden, epochs, seed, "project"),
        "project_train_only": steps.fit_epochs(one_val, hidden, epochs, seed, "train only"),
    }
    figures["ratio"] = median / figures["project"]["median_epoch_s"]
    figures["ratio_train_only"] = median / figures["project_train_only"]["median_epoch_s"]
    return figures


def loops_report(fig: dict) -> str:
    t, c = fig["train"], fig["clean"]
    lines = [
        f"clean: {c['images']} images decoded in {c['seconds']:.2f} s "
        f"({c['images_per_s']:.0f} images/s)",
        f"training: {t['train_images']} train images, {t['val_images']} val, hidden {t['hidden']}, "
        f"batch {t['batch_size']}, lr {t['lr']}, {t['epochs']} epochs",
        "",
        f"{'loop':<48}{'median s/epoch':>15}{'images/s':>10}{'last loss':>11}  per epoch (s)",
    ]
    names = {
        "original": "original: ImageFolder + DataLoader, train pass",
        "project": "project: pipeline.training.loop.fit, incl. val pass",
        "project_train_only": "project: pipeline.training.loop.fit, train pass only",
    }
    for key, name in names.items():
        r = fig[key]
        per_epoch = " ".join(f"{s:.2f}" for s in r["epoch_seconds"])
        lines.append(
            f"{name:<48}{r['median_epoch_s']:>15.2f}{r['images_per_s']:>10.0f}"
            f"{r['last_train_loss']:>11.4f}  {per_epoch}"
        )
    lines += [
        "",
        f"original / project: {fig['ratio']:.2f}x incl. the project's val pass, "
        f"{fig['ratio_train_only']:.2f}x train pass against train pass",
        f"peak resident memory of this process: {fig['peak_rss_mib']:.0f} MiB",
    ]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.train_speed",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = p.add_argument
    add(
        "--epochs",
        type=int,
        default=3,
        help="epochs per loop, and per process with --numerics and --spin (default: 3)",
    )
    add("--json", type=Path, help="also write every figure to this JSON file")
    add(
        "--repro",
        action="store_true",
        help="also run `dvc repro --force` on a temporary copy of the project and time each "
        "stage (about 10 minutes on 2 cores with the default params)",
    )
    add(
        "--root",
        type=Path,
        default=ROOT,
        help="folder whose params.yaml gives data.*, split.*, base.* (and, for --sweep, --suite "
        "and --repro, every other section); relative data.sources are resolved against it "
        "(default: %(default)s)",
    )
    add(
        "--mirror",
        type=Path,
        help="the notMNIST archive to use (default: the first local entry of data.sources, "
        "i.e. ../shared/data/notMNIST_small.tar.gz); checked against data.content_digest "
        "unless that is null",
    )
    add(
        "--limit",
        type=int,
        help="a quick run: at most this many train and this many val images (the default run, "
        "--numerics, --spin, --profile: a seeded subset; --sweep, --suite, --repro: "
        "split.train_size and split.val_size, the test split is the rest)",
    )
    add(
        "--max-epochs",
        type=int,
        help="--sweep, --suite, --repro: at most this many epochs per configuration (both "
        "sides; every max_epochs in params.yaml)",
    )
    add("--hidden", type=int, default=steps.HIDDEN, help="hidden layer size (default: 1000)")
    add(
        "--numerics",
        action="store_true",
        help="the Task 2 epoch in portable and in native numerics, each in a fresh process; "
        "median s/epoch, portable/native",
    )
    add(
        "--rounds",
        type=int,
        default=1,
        help="--numerics, --spin, --stage-cost: processes per setting, alternating (default: 1)",
    )
    add(
        "--spin",
        action="store_true",
        help="Task 7 epochs with libgomp's default spin count and with the stage's, each in a "
        "fresh process (--rounds alternates them); median s/epoch, stage/default",
    )
    add(
        "--profile",
        action="store_true",
        help="ms per Task 2 step before and after, the top ops, the products' floor",
    )
    add("--steps", type=int, default=200, help="--profile: steps per run (default: 200)")
    add("--warmup", type=int, default=50, help="--profile: warm-up steps (default: 50)")
    add(
        "--repeats",
        type=int,
        default=3,
        help="--profile, --startup: timed runs, the median is kept (default: 3)",
    )
    add(
        "--sweep",
        action="store_true",
        help="Task 2's stage on a copy of the project, 1 then 2 workers",
    )
    add("--startup", action="store_true", help="import and wall time of each stage's --help")
    add(
        "--stages",
        type=lambda text: [s for s in text.split(",") if s],
        help="--startup: only these stages, comma-separated (default: every stage of dvc.yaml); "
        "--stage-cost: the first is measured (default: train_task4)",
    )
    add(
        "--stage-cost",
        action="store_true",
        help="a training stage's fixed cost before (MLflow's requirements check, default "
        "garbage collection) and now, alternating fresh processes",
    )
    add(
        "--suite",
        action="store_true",
        help="the original's whole protocol against the project's whole `dvc repro --force`",
    )
    args = p.parse_args(argv)
    counts = (
        args.epochs,
        args.hidden,
        args.limit or 1,
        args.max_epochs or 1,
        args.rounds,
        args.steps,
        args.warmup,
        args.repeats,
    )
    if min(counts) < 1:
        p.error(
            "--epochs, --hidden, --limit, --max-epochs, --rounds, --steps, --warmup and "
            "--repeats must be >= 1"
        )
    return args


def check_archive(args, root: Path) -> Path:
    params_file = Paths(root).params
    data_params = load(params_file, "data", DataParams)
    archive = args.mirror.resolve() if args.mirror else common.find_archive(data_params, root)
    if data_params.content_digest:
        say(f"checking the content digest of {archive}")
        if content_digest(archive) != data_params.content_digest:
            sys.exit(f"train_speed: {archive} does not match data.content_digest in {params_file}")
    return archive


def measure(args) -> tuple[dict, list[str]]:
    """Every figure asked for, and the printed sections."""
    root = args.root.resolve()
    params_file = Paths(root).params
    base = load(params_file, "base", BaseParams)
    numerics.configure(base.numerics, base.threads)  # before torch's first operation
    archive = check_archive(args, root)
    modes = [m for m in MODES if getattr(args, m)]
    seed = base.seed
    figures = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "archive": str(archive),
        "fingerprint": numerics.fingerprint("cpu"),
    }
    printed = [
        f"torch {figures['torch']}, {figures['threads']} threads, {figures['cpus']} CPUs, "
        f"{base.numerics} numerics (isa {figures['fingerprint']['isa']}); "
        f"archive {archive}"
    ]
    params = common.capped(common.read_params(params_file), args.limit, args.max_epochs)

    if not modes or {"numerics", "spin", "profile"} & set(modes):
        say(f"decoding {archive}")
        figures["clean"], decoded = common.decode_archive(archive)
        with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
            scratch = Path(tmp) / "project"
            data = common.build_splits(decoded, params_file, scratch, args.limit)
            del decoded
            if not modes:
                figures.update(loops(data, Path(tmp), args.hidden, args.epochs, seed))
                figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                printed.append(loops_report(figures))
            if "numerics" in modes:
                figures["numerics"] = steps.numerics_cost(
                    scratch,
                    args.limit,
                    seed,
                    args.hidden,
                    args.epochs,
                    base.threads,
                    args.rounds,
                    common.child_env(),
                    say,
                )
                printed.append(steps.numerics_report(figures["numerics"]))
            if "spin" in modes:
                figures["spin"] = spin.spin_cost(
                    scratch,
                    params_file,
                    args.limit,
                    seed,
                    args.epochs,
                    base.threads,
                    args.rounds,
                    common.child_env(),
                    say,
                )
                printed.append(spin.spin_report(figures["spin"]))
            if "profile" in modes:
                figures["profile"] = steps.profile(
                    data, args.hidden, args.steps, args.warmup, args.repeats, seed, say=say
                )
                printed.append(steps.profile_report(figures["profile"]))
    if "sweep" in modes:
        figures["sweep"] = stages.sweep(params, archive)
        printed.append(stages.sweep_report(figures["sweep"]))
    if "startup" in modes:
        figures["startup"] = stages.startup(args.repeats, common.child_env(), args.stages)
        printed.append(stages.startup_report(figures["startup"]))
    if "stage_cost" in modes:
        stage = (args.stages or ["train_task4"])[0]
        figures["stage_cost"] = stage_cost.stage_cost(params, archive, stage, args.rounds)
        printed.append(stage_cost.report(figures["stage_cost"]))
    if "suite" in modes:
        figures["suite"] = suite.suite(params, archive, seed)
        printed.append(suite.report(figures["suite"]))
    if args.repro:
        figures["repro"] = stages.repro(params, archive)
        printed.append(stages.repro_report(figures["repro"]))
    return figures, printed


def main(argv=None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)  # fit's one line per epoch, as progress
    handler.setFormatter(logging.Formatter("train_speed: %(message)s"))
    logging.getLogger("pipeline").addHandler(handler)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    figures, printed = measure(args)
    print("\n\n".join(printed))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StageError as e:  # bad params or data: one line, as the stages print it
        sys.exit(f"train_speed: error: {e}")
