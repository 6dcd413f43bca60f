"""How much faster is the project's training loop than the original's? Measured on the real data.

One run, on the mirror archive and the project's own split (params.yaml's split.*; base.seed
seeds training and the subset):
  1. the `clean` stage's work: decode every image of the archive in memory (pipeline.clean.scan);
  2. the original's loop: the train split written as grayscale PNGs into an ImageFolder tree,
     RandomHorizontalFlip + ColorJitter + ToTensor + Normalize, DataLoader(batch_size=32,
     shuffle=True, num_workers=0), Flatten -> Linear(2352, H) -> ReLU -> Linear(H, 10) ->
     Softmax, CrossEntropyLoss, SGD(lr=0.1); each epoch timed (train pass only);
  3. the project's loop: pipeline.train.fit on the same split with the same model and settings,
     once as the pipeline runs it (each epoch ends with a pass over the 1,000 val images) and
     once with a 1-image val split (train pass only, comparable with 2).
It prints the median epoch seconds of each loop, their ratio, images per second, the decode
rate and the peak resident memory; --json writes the same figures. --repro also times each
stage of a real `dvc repro --force` on a temporary git + DVC copy of the project.

If params.yaml's data.content_digest is set, the archive must match it (as in `download`);
a params.yaml with `content_digest: null` (see --root) accepts any archive of A..J folders.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python benchmarks/train_speed.py`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from pipeline import clean, download, split  # noqa: E402
from pipeline.config import (  # noqa: E402
    LETTERS,
    BaseParams,
    DataParams,
    Paths,
    SplitParams,
    StageError,
    TrainParams,
    load,
)
from pipeline.model import MLP, ModelConfig  # noqa: E402
from pipeline.train import Split, fit, load_splits, set_seed  # noqa: E402

LR, BATCH = 0.1, 32  # the original's Task 2 winner and its batch size
# What a temporary copy of the project needs for `dvc repro` (as tests/test_repro.py copies).
COPY = ["pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvc/.gitignore", ".gitignore"]
STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def say(message: str) -> None:
    print(f"train_speed: {message}", file=sys.stderr, flush=True)


def find_archive(data: DataParams, root: Path) -> Path:
    """The first local entry of data.sources (a path relative to root, or file://) that exists."""
    for source in data.sources:
        url = urlparse(source)
        if url.scheme not in ("", "file"):
            continue
        path = Path(unquote(url.path) if url.scheme else source)
        path = path if path.is_absolute() else root / path
        if path.is_file():
            return path.resolve()
    sys.exit(f"train_speed: no local archive among data.sources {data.sources} (use --mirror)")


def decode(archive: Path) -> tuple[dict, tuple]:
    """Time pipeline.clean.scan on the archive: the `clean` stage's work, all in memory."""
    start = time.perf_counter()
    images, index, rejected = clean.scan(archive)
    seconds = time.perf_counter() - start
    figures = {"seconds": seconds, "images": len(index), "images_per_s": len(index) / seconds}
    return figures, (images, index, rejected)


def seed(params_file: Path) -> int:
    return load(params_file, "base", BaseParams).seed


def build_splits(decoded: tuple, params_file: Path, root: Path, limit: int | None) -> dict:
    """The project's split under a scratch root, read back with pipeline.train.load_splits."""
    images, index, rejected = decoded
    paths = Paths(root)
    clean.save(images, index, rejected, paths)
    p = load(params_file, "split", SplitParams)
    assigned = split.assign(index, p, p.seed)
    paths.split_dir.mkdir(parents=True, exist_ok=True)
    index[["path", "letter"]].assign(split=assigned).to_csv(
        paths.split_dir / "split.csv", index=False
    )
    data = load_splits(paths, torch.device("cpu"))
    if limit:  # a seeded subset, so every letter stays in (the rows are sorted by letter)
        g = torch.Generator().manual_seed(seed(params_file))
        for name, s in data.items():
            keep = torch.randperm(len(s), generator=g)[:limit].sort().values
            data[name] = Split(s.x[keep], s.y[keep])
    return data


def write_image_folder(train: Split, folder: Path) -> None:
    """<folder>/<letter>/<i>.png, 8-bit grayscale like the archive's files."""
    pixels = ((train.x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for letter in LETTERS:
        (folder / letter).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(pixels, train.y.tolist(), strict=True)):
        Image.fromarray(image).save(folder / LETTERS[label] / f"{i}.png")


def original_loop(folder: Path, hidden: int, epochs: int, seed: int) -> dict:
    """The original's training pass: PIL decoding and transforms per image, every epoch."""
    torch.manual_seed(seed)
    train_tf = transforms.Compose(
        [
            transforms.RandomHorizontalFlip(),
            transforms.ColorJitter(),
            transforms.ToTensor(),
            transforms.Normalize((0.5,), (0.5,)),
        ]
    )
    dataset = datasets.ImageFolder(folder, transform=train_tf, allow_empty=True)  # RGB: 3x28x28
    assert dataset.classes == list(LETTERS), dataset.classes
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True)
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(3 * 28 * 28, hidden),
        nn.ReLU(),
        nn.Linear(hidden, len(LETTERS)),
        nn.Softmax(dim=1),
    )
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    seconds = []
    for epoch in range(1, epochs + 1):
        start, loss_sum, correct = time.perf_counter(), 0.0, 0
        model.train()
        for x, y in loader:
            opt.zero_grad()
            out = model(x)
            loss = loss_fn(out, y)
            loss.backward()
            opt.step()
            loss_sum += loss.item() * len(y)  # the original tracked loss and accuracy
            correct += (out.argmax(1) == y).sum().item()
        seconds.append(time.perf_counter() - start)
        say(f"original epoch {epoch}/{epochs}: {seconds[-1]:.1f}s")
    n = len(dataset)
    return loop_figures(seconds, n, loss_sum / n, correct / n)


def project_loop(data: dict, hidden: int, epochs: int, seed: int, label: str) -> dict:
    """pipeline.train.fit with the original's model and settings; seconds from its history."""
    set_seed(seed)
    model = MLP(ModelConfig(hidden=(hidden,), input_channels=3, softmax_output=True))
    p = TrainParams(
        batch_size=BATCH,
        max_epochs=epochs,
        patience=epochs + 1,  # never stop early: time every epoch
        input_channels=3,
        softmax_output=True,
        hflip=True,
        device="cpu",
    )
    result = fit(model, data, p, LR, seed, label=label)
    if result.status != "ok":
        say(f"{label}: {result.status}")
    rows = result.history
    last = rows[-1]
    n = len(data["train"])
    return loop_figures([r["seconds"] for r in rows], n, last["train_loss"], last["train_accuracy"])


def loop_figures(seconds: list[float], images: int, loss: float, accuracy: float) -> dict:
    """Per-epoch seconds, their median, images per second, the last epoch's train metrics."""
    median = statistics.median(seconds)
    return {
        "epoch_seconds": seconds,
        "median_epoch_s": median,
        "images_per_s": images / median,
        "last_train_loss": loss,
        "last_train_accuracy": accuracy,
    }


def timed_stages(cmd: list[str], cwd: Path, env: dict) -> tuple[dict[str, float], float, int]:
    """Run cmd, echo its output to stderr, time each stage from when its lines arrive.

    A stage runs from its "Running stage 'X'" line to the next stage's line or the end.
    Returns ({stage: seconds}, total seconds, exit code).
    """
    marks, start = [], time.perf_counter()
    with subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        for line in proc.stdout:
            now = time.perf_counter()
            sys.stderr.write(line)
            if m := STAGE_LINE.search(line):
                marks.append((m[1], now))
    end = time.perf_counter()
    ends = [t for _, t in marks[1:]] + [end]
    stages = {name: t_end - t for (name, t), t_end in zip(marks, ends, strict=True)}
    return stages, end - start, proc.returncode


def repro(params_file: Path, archive: Path) -> dict:
    """`dvc repro --force` on a fresh git + DVC copy of the project fed by `archive`."""
    with tempfile.TemporaryDirectory(prefix="train-speed-repro-") as tmp:
        root = Path(tmp) / "project"
        for name in COPY:
            src, dst = ROOT / name, root / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, dst)
        params = yaml.safe_load(params_file.read_text())
        params["data"]["sources"] = [str(archive)]
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
        env = dict(
            os.environ,
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db",
            NOTMNIST_MLFLOW_ARTIFACTS=f"{tmp}/artifacts",
            PYTHONUNBUFFERED="1",  # lines arrive when printed, so their times are right
        )
        say(f"dvc repro --force in {root}")
        stages, total, code = timed_stages(["dvc", "repro", "--force"], root, env)
    if code != 0:
        sys.exit(f"train_speed: dvc repro failed with exit code {code}")
    return {"stages": stages, "total_s": total}


def report(fig: dict) -> str:
    t, c = fig["train"], fig["clean"]
    lines = [
        f"torch {fig['torch']}, {fig['threads']} threads, {fig['cpus']} CPUs; "
        f"archive {fig['archive']}",
        f"clean: {c['images']} images decoded in {c['seconds']:.2f} s "
        f"({c['images_per_s']:.0f} images/s)",
        f"training: {t['train_images']} train images, {t['val_images']} val, hidden {t['hidden']}, "
        f"batch {BATCH}, lr {LR}, {t['epochs']} epochs",
        "",
        f"{'loop':<48}{'median s/epoch':>15}{'images/s':>10}{'last loss':>11}  per epoch (s)",
    ]
    names = {
        "original": "original: ImageFolder + DataLoader, train pass",
        "project": "project: pipeline.train.fit, incl. val pass",
        "project_train_only": "project: pipeline.train.fit, train pass only",
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
    if "repro" in fig:
        lines += ["", f"{'dvc repro --force stage':<24}{'wall s':>10}"]
        lines += [f"{name:<24}{s:>10.1f}" for name, s in fig["repro"]["stages"].items()]
        lines.append(f"{'total':<24}{fig['repro']['total_s']:>10.1f}")
        lines.append(f"peak resident memory of a stage: {fig['repro']['peak_rss_mib']:.0f} MiB")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python benchmarks/train_speed.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--epochs", type=int, default=3, help="epochs per loop (default: 3)")
    p.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    p.add_argument(
        "--repro",
        action="store_true",
        help="also run `dvc repro --force` on a temporary copy of the project and time each "
        "stage (about 10 minutes on 2 cores with the default params)",
    )
    p.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="folder whose params.yaml gives data.*, split.* and base.seed; relative "
        "data.sources are resolved against it (default: %(default)s)",
    )
    p.add_argument(
        "--mirror",
        type=Path,
        help="the notMNIST archive to use (default: the first local entry of data.sources, "
        "i.e. ../shared/data/notMNIST_small.tar.gz); checked against data.content_digest "
        "unless that is null",
    )
    p.add_argument(
        "--limit",
        type=int,
        help="use at most this many train and this many val images (a seeded subset), "
        "for a quick smoke run",
    )
    p.add_argument("--hidden", type=int, default=1000, help="hidden layer size (default: 1000)")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.hidden < 1 or (args.limit is not None and args.limit < 1):
        p.error("--epochs, --hidden and --limit must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)  # fit's one line per epoch, as progress
    handler.setFormatter(logging.Formatter("train_speed: %(message)s"))
    logging.getLogger("pipeline").addHandler(handler)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    root = args.root.resolve()
    params_file = Paths(root).params
    data_params = load(params_file, "data", DataParams)
    archive = args.mirror.resolve() if args.mirror else find_archive(data_params, root)
    if data_params.content_digest:
        say(f"checking the content digest of {archive}")
        if download.content_digest(archive) != data_params.content_digest:
            sys.exit(f"train_speed: {archive} does not match data.content_digest in {params_file}")

    say(f"decoding {archive}")
    clean_figures, decoded = decode(archive)
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        data = build_splits(decoded, params_file, Path(tmp) / "project", args.limit)
        del decoded
        say(f"writing {len(data['train'])} train images as PNGs")
        write_image_folder(data["train"], Path(tmp) / "train")
        s = seed(params_file)
        original = original_loop(Path(tmp) / "train", args.hidden, args.epochs, s)
    one_val = {"train": data["train"], "val": Split(data["val"].x[:1], data["val"].y[:1])}
    figures = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "archive": str(archive),
        "clean": clean_figures,
        "train": {
            "train_images": len(data["train"]),
            "val_images": len(data["val"]),
            "hidden": args.hidden,
            "epochs": args.epochs,
            "batch_size": BATCH,
            "lr": LR,
        },
        "original": original,
        "project": project_loop(data, args.hidden, args.epochs, s, "project"),
        "project_train_only": project_loop(one_val, args.hidden, args.epochs, s, "train only"),
    }
    figures["ratio"] = original["median_epoch_s"] / figures["project"]["median_epoch_s"]
    figures["ratio_train_only"] = (
        original["median_epoch_s"] / figures["project_train_only"]["median_epoch_s"]
    )
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    if args.repro:
        figures["repro"] = repro(params_file, archive)
        figures["repro"]["peak_rss_mib"] = (
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        )
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StageError as e:  # bad params or data: one line, as the stages print it
        sys.exit(f"train_speed: error: {e}")
