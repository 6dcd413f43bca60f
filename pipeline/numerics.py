"""Pinned CPU numerics: the same inputs give the same bits on any x86-64 CPU with AVX2.

PyTorch picks CPU kernels by the instruction set it finds (ATen's AVX2 or AVX-512 kernels),
Intel MKL picks its own code path for matrix products, oneDNN JIT-compiles convolutions for
the CPU at hand, and the thread count changes how reductions are split. Each choice changes
float rounding, so one seed gives different results on two machines. `portable` mode pins all
four before torch runs its first operation:

- ATEN_CPU_CAPABILITY=avx2: ATen's vectorized kernels use AVX2 even where AVX-512 exists;
- MKL_CBWR=AVX2,STRICT: MKL's conditional numerical reproducibility, the AVX2 branch, strict;
- oneDNN off (convolutions run as ATen's im2col + MKL products, covered above), and
  ONEDNN_MAX_CPU_ISA=AVX2 for anything that still reaches it;
- a fixed intra-op thread count (base.threads) and deterministic algorithms.

`native` mode only fixes the thread count and deterministic algorithms: fastest, but the
results belong to the machine. GPUs, Apple MPS and arm64 CPUs have no portable mode.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from contextlib import contextmanager
from functools import cache

MODES = ("portable", "native")
PORTABLE_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}
PORTABLE_ISA = "AVX2"


def configure(mode: str, threads: int) -> None:
    """Set the environment for `mode`; apply it to torch now if torch is already imported.

    Portable settings override whatever the environment held, so that a machine's own
    settings cannot leak into the results. Worker processes inherit the environment.
    """
    if mode not in MODES:
        raise ValueError(f"numerics mode must be one of {MODES}, not {mode!r}")
    if mode == "native" and os.environ.get("NOTMNIST_NUMERICS") == "portable":
        for name, value in PORTABLE_ENV.items():  # inherited from a portable parent: not ours
            if os.environ.get(name) == value:
                del os.environ[name]
    os.environ["NOTMNIST_NUMERICS"] = mode
    os.environ["NOTMNIST_THREADS"] = str(threads)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = str(threads)
    if mode == "portable" and portable_possible():
        os.environ.update(PORTABLE_ENV)
    if "torch" in sys.modules:
        apply()


def apply() -> None:
    """Apply the configured mode to torch (call before its first CPU operation)."""
    import torch

    torch.set_num_threads(int(os.environ.get("NOTMNIST_THREADS", torch.get_num_threads())))
    deterministic()
    if os.environ.get("NOTMNIST_NUMERICS") == "portable" and portable_possible():
        torch.backends.mkldnn.enabled = False


def cores() -> int:
    """The CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def sharing(processes: int, threads: int) -> dict[str, str]:
    """Environment for `processes` torch processes of `threads` threads each, side by side.

    An idle OpenMP thread spins a while before it sleeps (libgomp's default), so the many
    small operations of a training step hand over work at once: a 2-thread epoch of the
    Task 2 MLP takes 0.6 s, against 1.7 s with threads that sleep at once. But processes whose
    threads outnumber the cores then slow each other 5-20x (measured: README, "Speed"), so
    there the threads sleep (OMP_WAIT_POLICY=PASSIVE, read when torch loads OpenMP). A policy
    already in the environment is kept. No result depends on it.
    """
    if processes * threads <= cores() or "OMP_WAIT_POLICY" in os.environ:
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}  # (0: not spin_briefly's)


@contextmanager
def environ(extra: dict[str, str]):
    """This process's environment with `extra` set (for the children started in the block),
    then as it was: each variable back to its earlier value, or unset if it had none."""
    before = {name: os.environ.get(name) for name in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def spin_briefly() -> None:
    """This process's idle OpenMP threads spin 3,000 turns before they sleep, not 300,000.

    For a stage whose convolutions run through NNPACK (portable numerics): NNPACK has a thread
    pool of its own, and an idle OpenMP thread spinning libgomp's default 300,000 turns (about
    3 ms) keeps a core from it. Task 7's training step took 20% less time (README, "Speed").
    Call before torch loads OpenMP, which reads it once; a policy or a count already in the
    environment is kept. No result depends on it.
    """
    if "OMP_WAIT_POLICY" not in os.environ:
        os.environ.setdefault("GOMP_SPINCOUNT", "3000")


def deterministic() -> None:
    """Deterministic kernels where the device has them (CUDA needs the cuBLAS setting).

    The flag `torch.use_deterministic_algorithms(True, warn_only=True)` sets, without that
    function's import of torch._inductor (1.7 s in every process) for a setting that only
    torch.compile reads: nothing here compiles. New tensors are not filled with NaN first, as
    that mode does by default to expose kernels that read memory nobody wrote: no kernel used
    here does (every output reproduces bit for bit without the fill: README, "Speed"), and the
    fill wrote every activation twice, 5% of a Task 7 training step.
    """
    import torch
    import torch.utils.deterministic

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False


def check() -> str:
    """The mode in force: 'portable', or 'native' (with the reason where portable was asked).

    Raises RuntimeError when portable mode was asked for on a capable CPU but torch had already
    picked its kernels (it ran an operation before configure()).
    """
    import torch

    asked = os.environ.get("NOTMNIST_NUMERICS", "native")
    if asked != "portable":
        return "native"
    if not portable_possible():
        return f"native (portable needs x86-64 with AVX2; this is {machine_isa()})"
    isa = torch.backends.cpu.get_cpu_capability()
    if isa != PORTABLE_ISA:
        raise RuntimeError(
            f"portable numerics need ATen's {PORTABLE_ISA} kernels, but torch already uses {isa}: "
            "it ran an operation before the stage pinned its numerics"
        )
    return "portable"


def portable_possible() -> bool:
    return machine_isa() in ("AVX2", "AVX512")


@cache
def cpu_flags() -> set[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return set()
    found = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(found[1].split()) if found else set()


@cache
def machine_isa() -> str:
    """The widest vector level this CPU offers, in ATen's names (or the machine's arch)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return platform.machine() or "unknown"
    flags = cpu_flags()
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "AVX512"
    if {"avx2", "fma"} <= flags:
        return "AVX2"
    return "DEFAULT" if flags else "x86_64 (flags unknown)"


@cache
def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _library_versions() -> dict[str, str]:
    import torch

    text = torch.__config__.show()
    mkl = re.search(r"Math Kernel Library Version ([\d.]+)", text)
    onednn = re.search(r"MKL-DNN v([\w.]+)", text)
    return {"mkl": mkl[1] if mkl else "none", "onednn": onednn[1] if onednn else "none"}


def fingerprint(device: str = "cpu") -> dict[str, str]:
    """What decides a run's float rounding: a run on another machine differs where this does."""
    import torch

    mode = check()
    portable = mode == "portable"
    return {
        "mode": mode,
        "cpu_model": cpu_model(),
        "cpu_isa": machine_isa(),  # what the CPU offers
        "isa": torch.backends.cpu.get_cpu_capability(),  # what ATen's kernels use
        "mkl_path": os.environ.get("MKL_CBWR", "auto"),
        "onednn_isa": "off" if portable else os.environ.get("ONEDNN_MAX_CPU_ISA", "auto"),
        **_library_versions(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "device": str(device),
    }
