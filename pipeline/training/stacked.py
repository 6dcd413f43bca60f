"""On CUDA: a sweep's plain-SGD configurations that differ only in learning rate train as one.

Each configuration of a task starts from the same seed, so from the same initial weights, and
draws the same batches; with plain SGD, no dropout and no augmentation nothing else tells them
apart but the learning rate. Their weights are stacked along a new first dimension
(`torch.func.stack_module_state`) and one forward pass over a batch serves all of them
(`torch.func.vmap` over `functional_call`): one kernel per layer instead of one per layer and
configuration, which is what a GPU, bound by kernel launches for models this small, needs.
Each configuration's loss depends on its own weights alone, so one backward pass of the summed
losses gives every configuration its own gradient, and one multiply-add per tensor applies each
its own learning rate. Nothing waits for the device inside an epoch: losses and correct counts
add up on it, and one transfer per epoch brings the validation metrics for early stopping,
which each configuration does on its own, as `fit` does.

The result of each configuration is what `fit` gives it alone, up to float rounding (the
batched kernels sum in another order). It is written as `result.pt` in the job's folder, as
`sweep.train_job` writes it; no per-epoch checkpoint is kept (a whole sweep takes seconds).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from pipeline import signals
from pipeline.files import atomic_file
from pipeline.training.loop import Batches, Result, log_epoch, set_seed
from pipeline.training.model import build

log = logging.getLogger(__name__)


def signature(job):
    """Jobs with the same signature can train stacked; None: this one cannot."""
    c = job.candidate
    if c.optimizer != "sgd" or c.dropout or c.recipe or c.arch != "mlp":
        return None
    return dataclasses.replace(c, label="", lr=0.0), job.params, job.seed


def groups(jobs: list) -> list[list]:
    """The jobs that can train stacked, grouped by signature (a group may hold one job)."""
    out: dict = {}
    for job in jobs:
        key = signature(job)
        if key is not None:
            out.setdefault(key, []).append(job)
    return list(out.values())


class Stack:
    """k copies of one model as stacked weights (one per learning rate), stepped together by
    plain SGD: one forward and backward pass for all of them."""

    def __init__(self, model: nn.Module, lrs: list[float], device):
        factor = {id(w): 1.0 for w in model.parameters()}  # the folded layer's lr factor
        if hasattr(model, "param_groups"):
            for group in model.param_groups(1.0):
                for w in group["params"]:
                    factor[id(w)] = group.get("lr", 1.0)
        k = self.k = len(lrs)
        self.params, self.buffers = stack_module_state([model] * k)
        lr = torch.tensor(lrs, device=device)
        self.steps = {
            name: -lr.view(k, *[1] * w.dim()) * factor[id(w)]
            for name, w in model.named_parameters()
        }
        base = copy.deepcopy(model).to("meta")

        def forward(params, buffers, x):
            return functional_call(base, (params, buffers), (x,))

        self.stacked = vmap(forward, in_dims=(0, 0, None))  # x is shared: (B, ...) -> (k, B, 10)
        self.weights = list(self.params.values())
        self.loss_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.correct = torch.zeros(k, dtype=torch.long, device=device)

    def step(self, x, y) -> None:
        k = self.k
        out = self.stacked(self.params, self.buffers, x)
        losses = (
            nn.functional.cross_entropy(out.flatten(0, 1), y.repeat(k), reduction="none")
            .view(k, -1)
            .mean(1)
        )
        grads = torch.autograd.grad(losses.sum(), self.weights)  # each loss has its own weights
        with torch.no_grad():
            for w, g, lr in zip(self.weights, grads, self.steps.values(), strict=True):
                w.addcmul_(g, lr)
            self.loss_sum.add_(losses.double() * len(y))
            self.correct.add_((out.argmax(-1) == y).sum(1))


def train(jobs: list, data: dict, emit, graphs: bool | None = None) -> dict[str, Path]:
    """Train the jobs (one signature) stacked; returns {label: result file}.

    graphs: replay each full batch's step as one CUDA graph (None: on CUDA); a step that
    cannot be captured runs as it is.

    emit gets the events `sweep.train_job` sends: ("start", label, [], False), then per epoch
    ("epoch_start", label, epoch) and ("epoch", label, row), and ("done", label) at the end.
    """
    c, p, seed = jobs[0].candidate, jobs[0].params, jobs[0].seed
    train_split, val = data["train"], data["val"]
    device = train_split.x.device
    set_seed(seed)
    model = build(c.model_config(p)).to(device)  # each job's initial weights (the same seed)
    s = Stack(model, [j.candidate.lr for j in jobs], device)
    use_graph = device.type == "cuda" if graphs is None else graphs
    graph = None  # not captured yet; False: capture failed
    generator = torch.Generator().manual_seed(seed)
    batches = Batches(train_split, p.batch_size, p.hflip)
    track = Tracking(jobs, emit, p)
    for job in jobs:
        emit(("start", job.label, [], False))
    for epoch in range(1, p.max_epochs + 1):
        if not track.active:
            break
        for i in track.active:
            emit(("epoch_start", jobs[i].label, epoch))
        start = time.perf_counter()
        s.loss_sum.zero_()
        s.correct.zero_()
        for x, y in batches.epoch(generator):
            if len(y) == p.batch_size and graph is None and use_graph:
                graph = _capture(s.step, x, y, [*s.weights, s.loss_sum, s.correct])
            (graph if graph and len(y) == p.batch_size else s.step)(x, y)
        val_loss, val_acc = _validate(s.stacked, s.params, s.buffers, val)
        seconds = round(time.perf_counter() - start, 3)
        n = len(train_split)
        train_loss, train_acc = (s.loss_sum / n).tolist(), (s.correct / n).tolist()
        for i in list(track.active):
            row = {
                "epoch": epoch,
                "train_loss": train_loss[i],
                "train_accuracy": train_acc[i],
                "val_loss": val_loss[i],
                "val_accuracy": val_acc[i],
                "seconds": seconds,
            }
            track.epoch(i, row, s.params)
    out = {}
    for i, job in enumerate(jobs):
        out[job.label] = _save(job, track.results[i], track.best[i][1])
        emit(("done", job.label))
    return out


class Tracking:
    """Each stacked job's history, best epoch and early stopping, as fit keeps them."""

    def __init__(self, jobs: list, emit, p):
        self.jobs, self.emit, self.p = jobs, emit, p
        self.results = [Result() for _ in jobs]
        self.best = [(math.inf, None) for _ in jobs]  # (val loss, weights) of each best epoch
        self.waited, self.active = [0] * len(jobs), list(range(len(jobs)))

    def epoch(self, i: int, row: dict, params) -> None:
        job, result, epoch = self.jobs[i], self.results[i], row["epoch"]
        if not (math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])):
            log.info("%s epoch %d: the loss is not finite: diverged", job.label, epoch)
            result.diverged(epoch, row["seconds"])
            self.best[i] = (self.best[i][0], _weights(params, i))  # as fit leaves it: the last
            self.active.remove(i)
            return
        result.history.append(row)
        log_epoch(job.label, row, self.p.max_epochs)
        if row["val_loss"] < self.best[i][0]:
            self.best[i], self.waited[i] = (row["val_loss"], _weights(params, i)), 0
            result.best_epoch = epoch
        else:
            self.waited[i] += 1
            if self.waited[i] >= self.p.patience:
                log.info(
                    "%s: no better val loss for %d epochs, stopping", job.label, self.waited[i]
                )
                self.active.remove(i)
        self.emit(("epoch", job.label, row))


def _capture(step, x: torch.Tensor, y: torch.Tensor, state: list[torch.Tensor]):
    """`step` recorded as one CUDA graph, as a function of (x, y); False if capture fails.

    A graph replays the step's kernels in one launch (the Python and launch overhead of ~50
    small kernels per step is what bounds a GPU here). Capture needs a few warm-up steps; they
    change `state` (the weights and counters), which is put back afterwards.
    """
    saved = [t.detach().clone() for t in state]
    static_x, static_y = x.clone(), y.clone()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step(static_x, static_y)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step(static_x, static_y)
    except RuntimeError as e:
        log.info("CUDA graph capture failed, steps run one kernel at a time: %s", e)
        return False
    finally:
        with torch.no_grad():
            for t, before in zip(state, saved, strict=True):
                t.copy_(before)

    def replay(x, y):
        static_x.copy_(x)
        static_y.copy_(y)
        graph.replay()

    return replay


@torch.no_grad()
def _validate(stacked, params, buffers, val, batch_size: int = 1024):
    """Every job's (val loss, val accuracy), as `train.evaluate` computes them, as lists."""
    out = torch.cat(
        [
            stacked(params, buffers, val.x[i : i + batch_size])
            for i in range(0, len(val), batch_size)
        ],
        dim=1,
    )
    k = out.shape[0]
    loss = (
        nn.functional.cross_entropy(out.flatten(0, 1).double(), val.y.repeat(k), reduction="none")
        .view(k, -1)
        .mean(1)
    )
    acc = (out.argmax(-1) == val.y).double().mean(1)
    return loss.tolist(), acc.tolist()


def _weights(params: dict, i: int) -> dict:
    return {name: w[i].detach().clone() for name, w in params.items()}


def _save(job, result: Result, weights: dict) -> Path:
    done = Path(job.folder) / "result.pt"
    done.parent.mkdir(parents=True, exist_ok=True)
    blob = {
        "state_dict": {name: w.cpu() for name, w in weights.items()},
        "history": result.history,
        "best_epoch": result.best_epoch,
        "status": result.status,
    }
    with signals.shield(), atomic_file(done) as tmp, open(tmp, "wb") as f:
        torch.save(blob, f)
    return done
