"""The training loop shared by every task: data on the device once, batches as index slices."""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from pipeline.clean import load_clean
from pipeline.cli import one_line
from pipeline.config import SPLITS, Paths, StageError, TrainParams

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
    """One split on the device: x (N, 28, 28) float in [-1, 1], y (N,) class ids."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]: the original's ToTensor() then Normalize(0.5, 0.5)."""
    # One float copy, changed in place: temporaries would triple a large split's memory.
    x = torch.as_tensor(images).to(torch.float32, copy=True)
    return x.div_(255).sub_(0.5).div_(0.5)


def load_splits(paths: Paths, device: torch.device) -> dict[str, Split]:
    """The clean images per split, normalized and moved to the device once."""
    images, index = load_clean(paths.clean_dir)
    table = pd.read_csv(paths.split_dir / "split.csv", dtype={"path": str})
    if not table["path"].equals(index["path"]):
        raise StageError(f"{paths.split_dir}/split.csv does not match {paths.clean_dir}/index.csv")
    out = {}
    for s in SPLITS:
        rows = (table["split"] == s).to_numpy()
        out[s] = Split(
            normalize(images[rows]).to(device),
            torch.as_tensor(index["class_id"].to_numpy()[rows], dtype=torch.long).to(device),
        )
    return out


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """The model's outputs for every row of x, in eval mode."""
    model.eval()
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def score(outputs: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean loss, accuracy) with the training loss applied to the model's outputs."""
    loss = nn.functional.cross_entropy(outputs.double(), y).item()
    return loss, (outputs.argmax(1) == y).double().mean().item()


def evaluate(model: nn.Module, data: Split) -> tuple[float, float]:
    """(mean loss, accuracy) of the model on one split, in eval mode."""
    return score(predict(model, data.x), data.y)


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of a batch left-right with probability 1/2."""
    flip = torch.rand(len(x), generator=generator, device=generator.device) < 0.5
    return torch.where(flip.to(x.device)[:, None, None], x.flip(-1), x)


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


def make_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """Plain SGD, the original's (with the MLP's folded-channel groups), or Adam."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name != "sgd":
        raise ValueError(f"unknown optimizer '{name}' (sgd or adam)")
    groups = model.param_groups(lr) if hasattr(model, "param_groups") else model.parameters()
    return torch.optim.SGD(groups, lr=lr)


def fit(model, data, p: TrainParams, lr: float, seed: int, label: str = "", on_epoch=None,
        optimizer: str = "sgd"):  # fmt: skip
    """Train with early stopping on val loss; restores the best epoch's weights.

    Stops at once when the loss is NaN or infinite (status "diverged").
    `on_epoch(row)` is called after each epoch, e.g. to log metrics.
    """
    train, val = data["train"], data["val"]
    generator = torch.Generator().manual_seed(seed)  # shuffling and flips, on the CPU
    opt = make_optimizer(model, optimizer, lr)
    loss_fn = nn.CrossEntropyLoss()
    result, best_loss, best_state, waited = Result(), math.inf, None, 0
    n, bs = len(train), p.batch_size
    for epoch in range(1, p.max_epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator).to(train.x.device)
        loss_sum = torch.zeros((), device=train.x.device)
        correct = torch.zeros((), dtype=torch.long, device=train.x.device)
        steps = range(0, n, bs)
        bar = tqdm(
            steps, desc=f"{label} epoch {epoch}", leave=False, disable=not sys.stderr.isatty()
        )
        for i in bar:
            idx = order[i : i + bs]
            x, y = train.x[idx], train.y[idx]
            if p.hflip:
                x = random_hflip(x, generator)
            out = model(x)
            loss = loss_fn(out, y)
            if not math.isfinite(loss.item()):
                log.info("%s epoch %d: loss is %s, stopping: diverged", label, epoch, loss.item())
                return result.diverged(epoch, time.perf_counter() - start)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * len(y)
            correct += (out.argmax(1) == y).sum()
        val_loss, val_acc = evaluate(model, val)
        row = {
            "epoch": epoch,
            "train_loss": loss_sum.item() / n,
            "train_accuracy": correct.item() / n,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "seconds": round(time.perf_counter() - start, 3),
        }
        if not math.isfinite(val_loss):
            log.info("%s epoch %d: validation loss is %s: diverged", label, epoch, val_loss)
            return result.diverged(epoch, row["seconds"])
        result.history.append(row)
        log.info(
            "%s epoch %2d/%d: train loss %.4f acc %.2f%% | val loss %.4f acc %.2f%% | %.1fs",
            label, epoch, p.max_epochs, row["train_loss"], 100 * row["train_accuracy"],
            val_loss, 100 * val_acc, row["seconds"],
        )  # fmt: skip
        if on_epoch:
            on_epoch(row)
        if val_loss < best_loss:
            best_loss, best_state, waited = val_loss, copy.deepcopy(model.state_dict()), 0
            result.best_epoch = epoch
        else:
            waited += 1
            if waited >= p.patience:
                log.info("%s: no better val loss for %d epochs, stopping", label, waited)
                break
    model.load_state_dict(best_state)
    return result


def configure_determinism() -> None:
    """Deterministic kernels where the device has them (CUDA needs the cuBLAS setting)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
