"""Data-parallel training with torch.distributed, launched by torchrun.

With `train.processes: N` > 1 a training stage starts itself again under `torchrun
--nproc_per_node N` (the same entry point, the same arguments). Every rank trains the same
configurations in the same order; each takes a disjoint shard of every global batch
(rows rank, rank + N, ...), DistributedDataParallel averages the gradients, and the loss is
scaled so that a step equals the single-process step on the whole batch. Rank 0 alone logs
to MLflow, writes checkpoints and outputs, and decides early stopping, which it broadcasts.
gloo on the CPU, NCCL on CUDA. A failed rank stops them all (torchrun's agent ends the others)
and the stage says which in one line.

Several machines: run the stage on each with torchrun's rendezvous, e.g.
  torchrun --nnodes 2 --nproc_per_node 4 --rdzv-backend c10d \\
      --rdzv-endpoint host0.example.org:29400 --rdzv-id notmnist -m pipeline.stages.train_task2
(the stage sees WORLD_SIZE and does not launch torchrun again).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from datetime import timedelta

import torch
from torch import distributed as dist

from pipeline import numerics

TIMEOUT_S = 60  # a collective that waits longer than this fails instead of hanging


def launched() -> bool:
    """True inside a torchrun worker (torchrun sets WORLD_SIZE and RANK)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def start(device: torch.device) -> None:
    """Join the process group torchrun prepared (gloo on the CPU, NCCL on CUDA)."""
    if not launched() or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=timedelta(seconds=TIMEOUT_S))


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast(values: list[float], device: torch.device) -> list[float]:
    """Rank 0's values, on every rank."""
    if world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def total(values: list[float], device: torch.device) -> list[float]:
    """The sums over the ranks."""
    if world() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


ROOT_CAUSE = re.compile(r"Root Cause.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.S)
FIRST_FAILURE = re.compile(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+)")


def launch(stage: str, argv: list[str], processes: int, threads: int) -> int:
    """Run `python -m pipeline.<stage> argv` as `processes` torchrun workers on this machine.

    The ranks' output passes through until one fails; what follows (the other ranks' errors
    once their peer is gone, torchrun's multi-line report) becomes one line naming the rank
    that failed first. SIGINT and SIGTERM go on to torchrun, which stops the ranks.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "--max-restarts=0",
        "-m",
        f"pipeline.stages.{stage}",
        *argv,
    ]
    env = dict(os.environ, **numerics.sharing(processes, threads))
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    got = []

    def pass_on(signum, frame):
        got.append(signum)
        proc.send_signal(signum)

    forward = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
    report = []
    try:
        for line in proc.stderr:
            if report or line.startswith("[rank") or "torch/distributed/elastic" in line:
                report.append(line)  # a rank failed: the rest is its consequences
            else:
                sys.stderr.write(line)
        code = proc.wait()
    finally:
        for s, handler in forward.items():
            signal.signal(s, handler)
    if code == 0:
        return 0
    if got:  # rank 0 already said what it did with its runs
        print(f"{stage}: interrupted ({signal.Signals(got[0]).name})", file=sys.stderr)
        return 128 + got[0]
    text = "".join(report)
    if found := ROOT_CAUSE.search(text):
        who, exit_code = found[1], found[2]
    elif found := FIRST_FAILURE.search(text):
        who, exit_code = found[2], found[1]
    else:
        sys.stderr.write(text)
        return code if code > 0 else 1
    print(
        f"{stage}: error: rank {who} of {processes} failed (exit code {exit_code}); "
        "torchrun stopped the others",
        file=sys.stderr,
    )
    return 1
