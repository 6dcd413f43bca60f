"""The original's training, in its own style: ImageFolder over PNG files, per-image transforms,
a DataLoader at batch 32, an MLP over 2,352 inputs with Softmax before CrossEntropyLoss, SGD.

`protocol` runs its whole experiment (Tasks 2-5, early stopping on val loss, a test pass per
task). `python -m benchmarks.coursework` runs it in a process of its own, as the original ran:
torch's default threads, kernels and OpenMP waiting, none of the project's pinning.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch  # before pipeline: OpenMP starts with the environment the original had
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from pipeline.config import LETTERS, SPLITS


@dataclass(frozen=True)
class Protocol:
    """The original's experiment; the defaults are its settings (see SEED_PROTOCOL.md)."""

    learning_rates: tuple = (0.1, 0.05, 0.03, 0.01, 0.005)  # Task 2, at hidden_task2
    hidden_task2: tuple = (1000,)
    hidden_sizes: tuple = (100, 500, 1000)  # Task 3, at Task 2's best lr
    hidden_task4: tuple = (500, 500)
    hidden_task5: tuple = (1000,)
    dropout_task5: float = 0.5
    max_epochs: int = 20
    patience: int = 2
    batch_size: int = 32

    @classmethod
    def from_params(cls, params: dict) -> Protocol:
        """The protocol params.yaml describes (its defaults are the original's)."""
        train = params["train"]
        return cls(
            learning_rates=tuple(float(v) for v in params["task2"]["learning_rates"]),
            hidden_task2=tuple(params["task2"]["hidden"]),
            hidden_sizes=tuple(params["task3"]["hidden_sizes"]),
            hidden_task4=tuple(params["task4"]["hidden"]),
            hidden_task5=tuple(params["task5"]["hidden"]),
            dropout_task5=float(params["task5"].get("dropout", 0.0)),
            max_epochs=train["max_epochs"],
            patience=train["patience"],
            batch_size=train["batch_size"],
        )


def write_image_folder(pixels, labels, folder: Path) -> None:
    """<folder>/<letter>/<i>.png, 8-bit grayscale like the archive's files."""
    for letter in LETTERS:
        (folder / letter).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(pixels, labels, strict=True)):
        Image.fromarray(image).save(folder / LETTERS[label] / f"{i}.png")


def write_splits(images, class_ids, assigned, folder: Path) -> dict[str, int]:
    """<folder>/{train,val,test}/<letter>/<i>.png from uint8 images and their split names."""
    counts = {}
    for s in SPLITS:
        rows = assigned == s
        write_image_folder(images[rows], class_ids[rows].tolist(), folder / s)
        counts[s] = int(rows.sum())
    return counts


def loader(folder: Path, train: bool, batch_size: int) -> DataLoader:
    """ImageFolder (RGB: 3x28x28) with the original's transforms, shuffled like all of its."""
    steps = [transforms.RandomHorizontalFlip(), transforms.ColorJitter()] if train else []
    tf = transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    dataset = datasets.ImageFolder(folder, transform=tf, allow_empty=True)
    assert dataset.classes == list(LETTERS), dataset.classes
    return DataLoader(dataset, batch_size=batch_size, shuffle=True)


def model(hidden: tuple, dropout: float = 0.0) -> nn.Sequential:
    layers, width = [nn.Flatten()], 3 * 28 * 28
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    return nn.Sequential(*layers, nn.Linear(width, len(LETTERS)), nn.Softmax(dim=1))


def train_pass(net: nn.Module, batches: DataLoader, opt, loss_fn) -> tuple[float, float]:
    """One epoch of training: (mean loss, accuracy), tracked per batch as the original did."""
    net.train()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in batches:
        opt.zero_grad()
        out = net(x)
        loss = loss_fn(out, y)
        loss.backward()
        opt.step()
        loss_sum += loss.item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return loss_sum / n, correct / n


@torch.no_grad()
def eval_pass(net: nn.Module, batches: DataLoader, loss_fn) -> tuple[float, float]:
    net.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in batches:
        out = net(x)
        loss_sum += loss_fn(out, y).item() * len(y)
        correct += (out.argmax(1) == y).sum().item()
        n += len(y)
    return loss_sum / n, correct / n


def train_loop(
    folder: Path,
    hidden: int,
    epochs: int,
    seed: int,
    lr: float,
    batch_size: int,
    say=lambda message: None,
) -> tuple[list[float], float, float]:
    """`epochs` training passes over <folder> (no validation): (seconds of each, the last
    pass's loss and accuracy)."""
    torch.manual_seed(seed)
    batches = loader(folder, True, batch_size)
    net = model((hidden,))
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    seconds = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        loss, accuracy = train_pass(net, batches, opt, nn.CrossEntropyLoss())
        seconds.append(time.perf_counter() - start)
        say(f"original epoch {epoch}/{epochs}: {seconds[-1]:.1f}s")
    return seconds, loss, accuracy


def train_config(
    folders: dict, hidden: tuple, dropout: float, lr: float, p: Protocol, seed: int, say
) -> tuple[nn.Module, dict]:
    """One configuration: train with a val pass per epoch, stop early, restore the best."""
    torch.manual_seed(seed)
    net, loss_fn = model(hidden, dropout), nn.CrossEntropyLoss()
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    train, val = (
        loader(folders["train"], True, p.batch_size),
        loader(folders["val"], False, p.batch_size),
    )
    best, best_state, waited, history = float("inf"), None, 0, []
    for epoch in range(1, p.max_epochs + 1):
        train_loss, _ = train_pass(net, train, opt, loss_fn)
        val_loss, val_acc = eval_pass(net, val, loss_fn)
        history.append(val_loss)
        say(
            f"original {hidden} lr={lr} epoch {epoch}: train loss {train_loss:.4f}, "
            f"val loss {val_loss:.4f} acc {100 * val_acc:.2f}%"
        )
        if val_loss < best:
            best, best_state, waited = val_loss, copy.deepcopy(net.state_dict()), 0
        else:
            waited += 1
            if waited >= p.patience:
                break
    if best_state is None:  # a NaN val loss from the first epoch on
        raise RuntimeError(f"original {hidden} lr={lr}: diverged")
    net.load_state_dict(best_state)
    run = {"epochs": len(history), "best_epoch": history.index(best) + 1, "best_val_loss": best}
    return net, run


def task(name: str, configs: list[tuple], folders: dict, p: Protocol, seed: int, say) -> dict:
    """Train each (hidden, dropout, lr); keep the best by val loss; its test pass."""
    start, runs, best = time.perf_counter(), [], None
    for hidden, dropout, lr in configs:
        net, run = train_config(folders, hidden, dropout, lr, p, seed, say)
        runs.append({"hidden": list(hidden), "dropout": dropout, "lr": lr, **run})
        if best is None or run["best_val_loss"] < best[1]["best_val_loss"]:
            best = (net, runs[-1])
    test_loss, test_acc = eval_pass(
        best[0], loader(folders["test"], False, p.batch_size), nn.CrossEntropyLoss()
    )
    seconds = time.perf_counter() - start
    say(f"original {name}: {seconds:.1f}s, test accuracy {100 * test_acc:.2f}%")
    return {
        "seconds": seconds,
        "epochs": sum(r["epochs"] for r in runs),
        "runs": runs,
        "chosen": best[1],
        "test_loss": test_loss,
        "test_accuracy": test_acc,
    }


def protocol(folder: Path, p: Protocol, seed: int, say=lambda message: None) -> dict:
    """The original's Tasks 2-5 over <folder>/{train,val,test}; seconds, epochs, results."""
    folders = {s: folder / s for s in SPLITS}
    start = time.perf_counter()
    tasks = {
        "task2": task(
            "task2", [(p.hidden_task2, 0.0, lr) for lr in p.learning_rates], folders, p, seed, say
        )
    }
    lr = tasks["task2"]["chosen"]["lr"]
    tasks["task3"] = task("task3", [((h,), 0.0, lr) for h in p.hidden_sizes], folders, p, seed, say)
    tasks["task4"] = task("task4", [(p.hidden_task4, 0.0, lr)], folders, p, seed, say)
    tasks["task5"] = task("task5", [(p.hidden_task5, p.dropout_task5, lr)], folders, p, seed, say)
    return {
        "seconds": time.perf_counter() - start,
        "epochs": sum(t["epochs"] for t in tasks.values()),
        "tasks": tasks,
        "settings": asdict(p),
        "is_original": p == Protocol(),
        "threads": torch.get_num_threads(),
        "isa": torch.backends.cpu.get_cpu_capability(),
    }


def main(argv=None) -> int:
    """Run protocol() in this process; its figures as JSON (with this process's peak RSS)."""
    import resource

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.coursework", description=protocol.__doc__
    )
    parser.add_argument("folder", type=Path, help="holds train/, val/ and test/ ImageFolders")
    parser.add_argument("--settings", required=True, help="a Protocol as JSON")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, required=True, help="write the figures here")
    args = parser.parse_args(argv)
    settings = {
        k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.settings).items()
    }
    figures = protocol(
        args.folder,
        Protocol(**settings),
        args.seed,
        lambda message: print(message, file=sys.stderr, flush=True),
    )
    figures["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
