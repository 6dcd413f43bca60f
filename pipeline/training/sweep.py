"""Train a task's configurations, each resumable, in this process or in a pool of workers.

Every configuration trains with the same seed, params and pinned numerics whichever process
runs it, so a sweep gives the same bits with one worker or several. Workers are spawned
processes (fresh interpreters: torch starts with the stage's pinned numerics) that take jobs
from a queue and report progress as events; the stage's own process handles the events (it
alone talks to MLflow).

A job's folder, checkpoints/<task>/<key>/, holds `state.pt` (the last completed epoch) while it
trains and `result.pt` (its best weights and history) once done; the key covers everything that
determines the result (code, data, params, seed, numerics), so a stale folder is never resumed.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from pipeline import numerics, signals
from pipeline.config import ROOT, Paths, StageError, TrainParams
from pipeline.files import atomic_file
from pipeline.training import distributed, stacked
from pipeline.training.augment import Affine
from pipeline.training.loop import Recipe, Result, fit, load_splits, pick_device, set_seed
from pipeline.training.model import ModelConfig, build

log = logging.getLogger(__name__)
# The code that decides a job's bits, relative to the project root (a folder: its modules).
# Every training stage lists these under its deps in dvc.yaml (tests/test_layout.py checks).
CODE = ("pipeline/training", "pipeline/config.py", "pipeline/numerics.py")


@dataclass(frozen=True)
class Candidate:
    """One configuration a task trains."""

    label: str  # e.g. "lr=0.1" or "hidden=500"
    lr: float
    hidden: tuple[int, ...]
    dropout: float = 0.0
    arch: str = "mlp"  # "cnn", "convnet"
    optimizer: str = "sgd"  # "adam", "adamw"
    recipe: tuple = ()  # further Recipe settings, as (name, value) pairs (e.g. Task 7's)
    members: int = 1  # "convnet": an ensemble of this many

    def as_dict(self) -> dict:
        return {
            "lr": self.lr,
            "hidden": list(self.hidden),
            "dropout": self.dropout,
            "arch": self.arch,
            "optimizer": self.optimizer,
            **({"members": self.members} if self.members != 1 else {}),
            **self.settings(),
        }

    def settings(self) -> dict:
        """The recipe settings, JSON-ready (augment as a mapping)."""
        return {k: (asdict(v) if isinstance(v, Affine) else v) for k, v in self.recipe}

    def train_recipe(self) -> Recipe:
        return Recipe(optimizer=self.optimizer, **dict(self.recipe))

    def model_config(self, p: TrainParams) -> ModelConfig:
        """The model this configuration trains under the task's training params."""
        return ModelConfig(
            arch=self.arch,
            hidden=self.hidden,
            input_channels=p.input_channels,
            dropout=self.dropout,
            softmax_output=p.softmax_output,
            members=self.members,
        )


@dataclass(frozen=True)
class Job:
    """One configuration to train, with everything a worker process needs."""

    candidate: Candidate
    params: TrainParams
    seed: int
    root: str  # the project root, to load the data
    folder: str  # checkpoints/<task>/<key>
    key: str

    @property
    def label(self) -> str:
        return self.candidate.label


def code_files() -> list[Path]:
    """CODE's files, folders expanded to their modules in name order."""
    files = []
    for name in CODE:
        path = ROOT / name
        files += sorted(path.glob("*.py")) if path.is_dir() else [path]
    return files


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def job_key(c: Candidate, p: TrainParams, seed: int, paths: Paths, device: torch.device) -> str:
    """A digest of everything that determines a configuration's trained weights and history."""
    settings = {k: v for k, v in asdict(p).items() if k not in ("workers", "device")}
    blob = {
        "candidate": c.as_dict(),
        "train": settings,
        "seed": seed,
        "numerics": [os.environ.get("NOTMNIST_NUMERICS"), os.environ.get("NOTMNIST_THREADS")],
        "device": device.type,
        "torch": torch.__version__,
        "code": digest(code_files()),
        "data": digest(
            [
                paths.clean_dir / "images.npy",
                paths.clean_dir / "index.csv",
                paths.split_dir / "split.csv",
            ]
        ),
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:20]


def prepare_folder(folder: Path, keys: set[str]) -> None:
    """Keep only the checkpoint folders of these keys: anything else is stale."""
    if folder.is_dir():
        for child in folder.iterdir():
            if child.is_dir() and child.name not in keys:
                shutil.rmtree(child)


def train_job(job: Job, data: dict, emit) -> Path:
    """Train (or resume, or find finished) one job; returns its result file.

    emit(event) gets ("start", label, rows already done), ("epoch_start", label, epoch) and
    ("epoch", label, row) as training goes. Under torchrun every rank trains; rank 0 alone
    emits and writes.
    """
    main = distributed.is_main()
    emit = emit if main else (lambda event: None)
    folder = Path(job.folder)
    done = folder / "result.pt"
    if done.is_file():
        log.info("%s: trained before an interruption, kept in %s", job.label, folder)
        emit(("start", job.label, read_result(done)[0].history, True))
        return done
    folder.mkdir(parents=True, exist_ok=True)
    state = folder / "state.pt"
    c, p = job.candidate, job.params
    set_seed(job.seed)
    device = data["train"].x.device
    model = build(c.model_config(p)).to(device)
    emit(("start", job.label, _resumed_rows(state, device), False))
    result = fit(
        model,
        data,
        p,
        c.lr,
        job.seed,
        job.label,
        optimizer=c.train_recipe(),
        checkpoint=state,
        on_start=lambda epoch: emit(("epoch_start", job.label, epoch)),
        on_epoch=lambda row: emit(("epoch", job.label, row)),
    )
    if main:
        blob = {
            "state_dict": model.state_dict(),
            "history": result.history,
            "best_epoch": result.best_epoch,
            "status": result.status,
        }
        with signals.shield(), atomic_file(done) as tmp, open(tmp, "wb") as f:
            torch.save(blob, f)
        state.unlink(missing_ok=True)
    return done


def _resumed_rows(state: Path, device) -> list[dict]:
    if not state.is_file():
        return []
    return torch.load(state, map_location=device, weights_only=True)["history"]


def read_result(path: Path) -> tuple[Result, dict]:
    """(the job's Result, its best weights) from result.pt."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    result = Result(history=blob["history"], best_epoch=blob["best_epoch"], status=blob["status"])
    return result, blob["state_dict"]


def run(jobs: list[Job], workers: int, device: torch.device, on_event) -> dict[str, Path]:
    """Train every job; returns {label: result file}. on_event(event) sees every event."""
    if workers <= 1 or len(jobs) <= 1 or device.type != "cpu" or distributed.world() > 1:
        data = load_splits(Paths(Path(jobs[0].root)), device)
        out = {}
        if device.type == "cuda" and distributed.world() == 1:  # plain-SGD sweeps as one program
            todo = [job for job in jobs if not (Path(job.folder) / "result.pt").is_file()]
            for group in stacked.groups(todo):
                out.update(stacked.train(group, data, on_event))
        for job in jobs:
            if job.label in out:
                continue
            out[job.label] = train_job(job, data, on_event)
            on_event(("done", job.label))
        return out
    return _pool(jobs, min(workers, len(jobs)), on_event)


def queue_order(jobs: list[Job]) -> list[Job]:
    """The pool's order: smallest learning rate first (ties: as given).

    A smaller rate converges later, so it tends to run more epochs before early stopping:
    starting the long jobs first leaves a short one, not a long one, alone at the end. The
    order changes no result, only how busy the workers stay.
    """
    return sorted(jobs, key=lambda job: job.candidate.lr)


def _pool(jobs: list[Job], workers: int, on_event) -> dict[str, Path]:
    ctx = multiprocessing.get_context("spawn")  # fork after torch's thread pools start is unsafe
    todo, events = ctx.Queue(), ctx.Queue()
    for job in queue_order(jobs):
        todo.put(job)
    for _ in range(workers):
        todo.put(None)
    procs = [ctx.Process(target=_worker, args=(todo, events), daemon=True) for _ in range(workers)]
    with numerics.environ(numerics.sharing(workers, torch.get_num_threads())):
        for proc in procs:  # each worker's OpenMP reads it as the worker starts
            proc.start()
    out = {}
    try:
        while len(out) < len(jobs):
            try:
                event = events.get(timeout=1)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise StageError(f"a training worker died (exit code {dead[0]})") from None
                continue
            if event[0] == "error":
                raise StageError(f"{event[1]}: {event[2]}")
            if event[0] == "done":
                out[event[1]] = Path(event[2])
            on_event(event[:2] if event[0] == "done" else event)
    finally:
        for proc in procs:  # done: they leave by themselves; interrupted: they are stopped
            proc.join(timeout=5 if len(out) == len(jobs) else 0)
            if proc.is_alive():
                proc.terminate()
                proc.join()
    return out


def _worker(todo, events) -> None:
    """A worker process: train jobs from `todo` until None, reporting to `events`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the stage process's to handle
    signal.signal(signal.SIGTERM, signals.handle)  # the stage stops us, never mid-checkpoint
    _die_with_parent()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"{os.environ.get('NOTMNIST_STAGE', 'worker')}: %(message)s")
    )
    logging.getLogger("pipeline").handlers[:] = [handler]
    logging.getLogger("pipeline").setLevel(logging.INFO)
    numerics.apply()
    data = None
    try:
        while (job := todo.get()) is not None:
            if data is None:
                data = load_splits(Paths(Path(job.root)), pick_device("cpu"))
            done = train_job(job, data, events.put)
            events.put(("done", job.label, str(done)))
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # nothing left to save: leave quietly
    except signals.Interrupted as e:
        os._exit(128 + e.signum)
    except Exception as e:  # the stage reports it in one line and stops
        events.put(("error", job.label, " ".join(str(e).split()) or type(e).__name__))


def _die_with_parent() -> None:
    """Linux: end this worker when the stage's process dies (even by SIGKILL)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass
