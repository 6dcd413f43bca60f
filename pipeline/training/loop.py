"""The training loop shared by every task: data on the device once, batches as index slices."""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline import signals
from pipeline.cli import one_line
from pipeline.config import SPLITS, Paths, StageError, TrainParams
from pipeline.data.decode import load_clean
from pipeline.files import atomic_file
from pipeline.training import distributed
from pipeline.training.augment import Affine, random_affine, random_noise

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    """Seed every generator a run touches (Python, NumPy, torch on all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA, then Apple MPS, then CPU; any other value is used as given."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as e:
        raise StageError(f"train.device '{name}' is not usable here ({one_line(e)})") from None
    if device.type == "meta":
        raise StageError("train.device 'meta' holds no data: pick cpu, cuda or mps")
    return device


@dataclass
class Split:
    """One split on the device: x (N, 28, 28), y (N,) class ids.

    x is float in [-1, 1], or the 8-bit pixels (as load_splits keeps the training images: a
    quarter of the memory), which `floats()` and the training batches normalize on the way.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def floats(self) -> torch.Tensor:
        return normalize(self.x) if self.x.dtype == torch.uint8 else self.x


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]: the original's ToTensor() then Normalize(0.5, 0.5)."""
    # One float copy, changed in place: temporaries would triple a large split's memory.
    x = torch.as_tensor(images).to(torch.float32, copy=True)
    return x.div_(255).sub_(0.5).div_(0.5)


def load_splits(paths: Paths, device: torch.device) -> dict[str, Split]:
    """The clean images per split, moved to the device once: val and test normalized, train as
    8-bit pixels (normalized batch by batch, to the same floats: a quarter of the memory)."""
    images, index = load_clean(paths.clean_dir)
    table = pd.read_csv(paths.split_dir / "split.csv", dtype={"path": str})
    if not table["path"].equals(index["path"]):
        raise StageError(f"{paths.split_dir}/split.csv does not match {paths.clean_dir}/index.csv")
    out = {}
    for s in SPLITS:
        rows = (table["split"] == s).to_numpy()
        pixels = torch.as_tensor(images[rows])
        out[s] = Split(
            (pixels if s == "train" else normalize(pixels)).to(device),
            torch.as_tensor(index["class_id"].to_numpy()[rows], dtype=torch.long).to(device),
        )
    return out


@torch.no_grad()
def predict_batched(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's outputs for every row of x, in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def score(outputs: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean loss, accuracy) with the training loss applied to the model's outputs."""
    loss = nn.functional.cross_entropy(outputs.double(), y).item()
    return loss, (outputs.argmax(1) == y).double().mean().item()


def evaluate_split(model: nn.Module, data: Split) -> tuple[float, float]:
    """(mean loss, accuracy) of the model on one split, in eval mode."""
    return score(predict_batched(model, data.x), data.y)


@dataclass
class Result:
    """What one configuration's training produced."""

    history: list[dict] = field(default_factory=list)  # one row per epoch
    best_epoch: int = 0
    status: str = "ok"  # or "diverged"

    @property
    def best(self) -> dict:
        return self.history[self.best_epoch - 1] if self.best_epoch else {}

    def diverged(self, epoch: int, seconds: float) -> Result:
        """Mark the run diverged at `epoch`, with a row of NaN metrics for it."""
        self.status = "diverged"
        nan = {k: math.nan for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy")}
        self.history.append({"epoch": epoch, **nan, "seconds": round(seconds, 3)})
        return self


@dataclass(frozen=True)
class Recipe:
    """How a configuration trains, beyond train.*: optimizer, schedule, augmentation, loss."""

    optimizer: str = "sgd"  # sgd (the original's), adam or adamw
    weight_decay: float = 0.0
    schedule: str = "constant"  # or "onecycle": warm up, then anneal, over max_epochs
    augment: Affine = Affine()  # random shifts, rotations, scaling of training images
    label_smoothing: float = 0.0
    plain_epochs: int = 0  # the last epochs of max_epochs train on the images as they are
    noise: float = 0.0  # Gaussian noise on a share of the augmented images, std up to this
    noise_share: float = 0.5


def make_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Plain SGD, the original's (with the MLP's folded-channel groups), Adam or AdamW.

    One fused kernel updates every parameter (instead of a loop of small ops per tensor).
    """
    fused = {"fused": True} if _fused_ok(model) else {"foreach": True}
    if name in ("adam", "adamw"):
        kind = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return kind(model.parameters(), lr=lr, weight_decay=weight_decay, **fused)
    if name != "sgd":
        raise ValueError(f"unknown optimizer '{name}' (sgd, adam or adamw)")
    groups = model.param_groups(lr) if hasattr(model, "param_groups") else model.parameters()
    return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay, **fused)


def make_schedule(opt: torch.optim.Optimizer, name: str, steps: int):
    """A per-step learning-rate schedule, or None for a constant rate."""
    if name == "constant":
        return None
    if name != "onecycle":
        raise ValueError(f"unknown schedule '{name}' (constant or onecycle)")
    peaks = [g["lr"] for g in opt.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=peaks, total_steps=steps)


def _fused_ok(model: nn.Module) -> bool:
    device = next(model.parameters()).device.type
    return device in ("cpu", "cuda")


class Batches:
    """Shuffled (and randomly mirrored) training batches, each a contiguous slice.

    The mirrored copy of the training set is made once; each epoch draws one permutation and,
    with flips, one coin per image from the generator, then gathers the epoch's images in
    blocks, so a step takes a slice (a view) instead of gathering and flipping a batch. 8-bit
    pixels stay 8-bit until a block is gathered, then are normalized (the same floats as
    normalizing first, since both are elementwise).
    """

    BLOCK = 64  # batches gathered at once: bounds the extra memory to BLOCK batches

    def __init__(self, data: Split, batch_size: int, hflip: bool):
        self.n, self.bs, self.hflip = len(data), batch_size, hflip
        self.x = torch.cat([data.x, data.x.flip(-1)]) if hflip else data.x
        self.y = data.y

    def epoch(self, generator: torch.Generator):
        """Yield (x, y) batches of one epoch: the permutation, then the coins, from `generator`.

        `labels` then holds the epoch's labels in batch order.
        """
        order = torch.randperm(self.n, generator=generator)
        rows = order
        if self.hflip:
            flips = torch.rand(self.n, generator=generator) < 0.5
            rows = order + self.n * flips.long()
        rows = rows.to(self.x.device)
        self.labels = self.y[order.to(self.y.device)]
        span = self.BLOCK * self.bs
        for start in range(0, self.n, span):
            x, y = self.x[rows[start : start + span]], self.labels[start : start + span]
            if x.dtype == torch.uint8:
                x = normalize(x)
            for i in range(0, len(y), self.bs):
                yield x[i : i + self.bs], y[i : i + self.bs]


CHECK_EVERY = 50  # steps between checks for a non-finite loss (each check waits for the device)


def fit(
    model,
    data,
    p: TrainParams,
    lr: float,
    seed: int,
    label: str = "",
    on_epoch=None,
    optimizer: str | Recipe = "sgd",
    checkpoint: Path | None = None,
    on_start=None,
):
    """Train with early stopping on val loss; restores the best epoch's weights.

    Stops when the loss turns NaN or infinite (status "diverged"; checked every CHECK_EVERY
    steps and at the end of each epoch). `on_start(epoch)` and `on_epoch(row)` are called
    around each epoch, e.g. to log metrics. With `checkpoint`, the complete state (weights,
    optimizer, every generator, early stopping, history) is written there after each epoch
    and a later call resumes from it: the result is bit-identical to an uninterrupted run.
    `optimizer` names one (with no other settings) or is a whole Recipe.
    """
    train, val = data["train"], data["val"]
    steps = make_steps(model, p, lr, seed, optimizer, len(train))
    opt, schedule, generator = steps.opt, steps.schedule, steps.generator
    state = fresh_state()
    if checkpoint is not None and checkpoint.is_file():
        state = load_checkpoint(checkpoint, model, opt, generator, schedule)
        log.info("%s: resuming after epoch %d from %s", label, state["epoch"], checkpoint)
    result = Result(history=state["history"], best_epoch=state["best_epoch"])
    batches = Batches(train, p.batch_size, p.hflip)
    if distributed.world() > 1:  # after a resume: DDP starts every rank from rank 0's weights
        steps.net = nn.parallel.DistributedDataParallel(model)
    for epoch in range(state["epoch"] + 1, p.max_epochs + 1):
        if state["stopped"]:
            break
        if on_start:
            on_start(epoch)
        start = time.perf_counter()
        model.train()
        n = len(train)
        loss_sum, correct, bad = train_epoch(steps, batches, epoch, p, n, train.x.device)
        if bad:
            log.info("%s epoch %d: training loss is not finite, stopping: diverged", label, epoch)
            return result.diverged(epoch, time.perf_counter() - start)
        row = epoch_row(model, val, epoch, loss_sum / n, correct / n, start)
        if not math.isfinite(row["val_loss"]):
            log.info("%s epoch %d: validation loss is %s: diverged", label, epoch, row["val_loss"])
            return result.diverged(epoch, row["seconds"])
        keep_best(state, result, model, row, p.patience)
        if checkpoint is not None and distributed.is_main():
            save_checkpoint(checkpoint, state, model, opt, generator, schedule)
        # Logged once the checkpoint holds the epoch: a stage stopped after this line resumes
        # after this epoch.
        log_epoch(label, row, p.max_epochs)
        if state["stopped"]:
            log.info("%s: no better val loss for %d epochs, stopping", label, state["waited"])
        if on_epoch:
            on_epoch(row)
    model.load_state_dict(state["best_state"])
    return result


def make_steps(model, p: TrainParams, lr: float, seed: int, optimizer, n: int) -> Steps:
    """The optimizer, schedule, loss and generator of one fit, as a recipe says."""
    r = optimizer if isinstance(optimizer, Recipe) else Recipe(optimizer)
    generator = torch.Generator().manual_seed(seed)  # shuffling, flips, augmentation; on the CPU
    opt = make_optimizer(model, r.optimizer, lr, r.weight_decay)
    schedule = make_schedule(opt, r.schedule, p.max_epochs * math.ceil(n / p.batch_size))
    loss_fn = nn.CrossEntropyLoss(label_smoothing=r.label_smoothing)
    return Steps(model, loss_fn, opt, schedule, r, generator)  # fit wraps it for several ranks


def epoch_row(model, val: Split, epoch: int, train_loss, train_acc, start: float) -> dict:
    """history.csv's row of an epoch: the training figures given, the validation computed."""
    val_loss, val_acc = distributed.broadcast(list(evaluate_split(model, val)), val.x.device)
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "seconds": round(time.perf_counter() - start, 3),
    }


def fresh_state() -> dict:
    """Early stopping's state before the first epoch (a checkpoint holds the same keys)."""
    return {
        "epoch": 0,
        "best_loss": math.inf,
        "best_state": None,
        "waited": 0,
        "best_epoch": 0,
        "history": [],
        "stopped": False,
    }


@dataclass
class Steps:
    """What one fit's steps use: the network (DDP-wrapped on several ranks), loss, optimizer,
    schedule, recipe and the generator that shuffles, flips and augments."""

    net: nn.Module
    loss_fn: nn.Module
    opt: torch.optim.Optimizer
    schedule: object
    recipe: Recipe
    generator: torch.Generator


def train_epoch(s: Steps, batches, epoch: int, p: TrainParams, n: int, device):
    """One epoch's steps -> (summed loss, correct predictions, diverged), over every rank."""
    r, ranks = s.recipe, distributed.world()
    # Per-step records go into tensors made once per epoch: small tensors kept for the
    # whole epoch between each step's large temporaries fragment the heap, which then grows.
    losses, sizes = None, []
    correct = torch.zeros((), dtype=torch.long, device=device)
    for step, (x, y) in enumerate(batches.epoch(s.generator), 1):
        if epoch <= p.max_epochs - r.plain_epochs:  # the global batch, as one process
            if r.augment:
                x = random_affine(x, r.augment, s.generator)
            if r.noise:
                x = random_noise(x, r.noise, r.noise_share, s.generator)
        scale = 1.0
        if ranks > 1:  # this rank's rows of the batch; the loss as a share of the batch's
            scale = math.ceil((len(y) - distributed.rank()) / ranks) * ranks / len(y)
            x, y = x[distributed.rank() :: ranks], y[distributed.rank() :: ranks]
        out = s.net(x)
        if out.dim() == 3:  # an ensemble's members, (M, B, 10): the mean of their losses
            loss = s.loss_fn(out.flatten(0, 1), y.repeat(len(out)))
            out = out.mean(0)
        else:
            loss = s.loss_fn(out, y)
        s.opt.zero_grad(set_to_none=True)
        (loss * scale if ranks > 1 else loss).backward()
        s.opt.step()
        if s.schedule is not None:
            s.schedule.step()
        if losses is None:
            losses = loss.new_empty(math.ceil(n / p.batch_size))
        losses[step - 1] = loss.detach()
        sizes.append(len(y))
        correct += (out.detach().argmax(1) == y).sum()
        if ranks == 1 and step % CHECK_EVERY == 0 and not torch.isfinite(losses[step - 1]):
            break  # (several ranks check together, at the end of the epoch)
    train_losses = losses[: len(sizes)].double()
    weights = torch.tensor(sizes, dtype=torch.float64, device=train_losses.device)
    finite = torch.isfinite(train_losses).all().item()
    return distributed.total(
        [(train_losses @ weights).item() if finite else math.nan, correct.item(), not finite],
        device,
    )


def keep_best(state: dict, result: Result, model, row: dict, patience: int) -> None:
    """Early stopping: keep the best val loss's weights; stop after `patience` worse epochs."""
    result.history.append(row)
    if row["val_loss"] < state["best_loss"]:
        state.update(
            best_loss=row["val_loss"],
            best_state=copy.deepcopy(model.state_dict()),
            waited=0,
            best_epoch=row["epoch"],
        )
        result.best_epoch = row["epoch"]
    else:
        state["waited"] += 1
        state["stopped"] = state["waited"] >= patience
    state.update(epoch=row["epoch"], history=result.history)


def log_epoch(label: str, row: dict, max_epochs: int) -> None:
    """One line per epoch, with the numbers a person wants."""
    log.info(
        "%s epoch %2d/%d: train loss %.4f acc %.2f%% | val loss %.4f acc %.2f%% | %.1fs",
        label,
        row["epoch"],
        max_epochs,
        row["train_loss"],
        100 * row["train_accuracy"],
        row["val_loss"],
        100 * row["val_accuracy"],
        row["seconds"],
    )


def save_checkpoint(
    path: Path, state: dict, model, opt, generator: torch.Generator, schedule=None
) -> None:
    """Everything fit() needs to continue exactly where it stopped, written atomically."""
    blob = {
        **state,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "schedule": schedule.state_dict() if schedule is not None else None,
        "generator": generator.get_state(),
        "rng": rng_states(),
    }
    with signals.shield(), atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(blob, f)  # shielded: a signal waits for this short write


def load_checkpoint(path: Path, model, opt, generator: torch.Generator, schedule=None) -> dict:
    blob = torch.load(path, map_location=next(model.parameters()).device, weights_only=True)
    model.load_state_dict(blob.pop("model"))
    opt.load_state_dict(blob.pop("optimizer"))
    if schedule is not None:
        schedule.load_state_dict(blob.pop("schedule"))
    blob.pop("schedule", None)
    generator.set_state(blob.pop("generator"))
    set_rng_states(blob.pop("rng"))
    return blob


def rng_states() -> dict:
    """Python's, NumPy's and torch's global generators (dropout draws from torch's)."""
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(keys), gauss],
        "numpy": [name, mt.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def set_rng_states(states: dict) -> None:
    version, keys, gauss = states["python"]
    random.setstate((version, tuple(keys), gauss))
    name, mt, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(mt, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])
