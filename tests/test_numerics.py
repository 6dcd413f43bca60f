"""Portable numerics: machines that pick different CPU kernels give the same weights.

Each "machine" is a subprocess whose environment makes torch and MKL choose what another
CPU would choose (ATen's instruction-set level, MKL's code path, the thread count). It trains
the Task 2 MLP (softmax head, mirrored batches) for 2 epochs, the CNN for a few steps and a
narrow ConvNet with Task 7's recipe for 2 epochs, and prints a digest of the weights. Native
mode: the machines disagree. Portable: they agree.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

from pipeline import numerics
from pipeline.config import ROOT

MACHINES = {  # what differs between CPUs, as the environment tells torch and MKL
    "AVX2, 1 core": ({"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}, 1),
    "AVX-512, 2 cores": ({"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "AUTO"}, 2),
    "no SIMD kernels, generic MKL, 3 cores": (
        {"ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE"},
        3,
    ),
}


def probe(mode: str, threads: int) -> None:
    """Pin `mode`, train, print the weights' digest and the fingerprint as JSON."""
    import torch  # imported, not yet used: as in a stage when it pins its numerics

    numerics.configure(mode, threads)

    from pipeline.config import TrainParams
    from pipeline.training.loop import Split, fit, set_seed
    from pipeline.training.model import ModelConfig, build

    g = torch.Generator().manual_seed(0)
    x = torch.rand(640, 28, 28, generator=g) * 2 - 1
    y = torch.randint(0, 10, (640,), generator=g)
    data = {"train": Split(x[:512], y[:512]), "val": Split(x[512:], y[512:])}
    set_seed(0)
    mlp = build(ModelConfig(hidden=(64,)))
    p = TrainParams(max_epochs=2, patience=2, device="cpu")
    fit(mlp, data, p, lr=0.1, seed=0)
    set_seed(0)
    cnn = build(ModelConfig(arch="cnn", hidden=(32,), input_channels=1, softmax_output=False))
    p = TrainParams(max_epochs=1, patience=1, hflip=False, input_channels=1, device="cpu")
    fit(cnn, data, p, lr=1e-3, seed=0, optimizer="adam")
    conv = task7_recipe(data)
    digest = hashlib.sha256()
    for model in (mlp, cnn, conv):
        for tensor in model.state_dict().values():
            digest.update(tensor.numpy().tobytes())
    print(json.dumps({"weights": digest.hexdigest(), "numerics": numerics.fingerprint()}))


def task7_recipe(data: dict):
    """Task 7's recipe as params.yaml sets it (augmentation, noise, schedule, AdamW), on a
    narrow ConvNet for 2 epochs (the last plain), batches of 64 (NNPACK takes 16 or more)."""
    import dataclasses

    from pipeline.config import Task7Params, TrainParams, load
    from pipeline.stages import train_task7
    from pipeline.training import runner
    from pipeline.training.loop import fit, set_seed
    from pipeline.training.model import build

    task7 = load(ROOT / "params.yaml", "task7", Task7Params)
    task7 = dataclasses.replace(task7, widths=[4, 8], max_epochs=2, patience=2, plain_epochs=1)
    c = train_task7.candidate(task7)
    settings = {**runner.CORRECTED, "max_epochs": 2, "patience": 2, "batch_size": 64}
    p = TrainParams(device="cpu", **settings)
    set_seed(0)
    model = build(c.model_config(p))
    fit(model, data, p, lr=c.lr, seed=0, optimizer=c.train_recipe())
    return model


def run_machine(name: str, mode: str) -> dict:
    env_vars, cores = MACHINES[name]
    threads = 2 if mode == "portable" else cores  # portable: base.threads, the same everywhere
    env = {**os.environ, **env_vars, "OMP_NUM_THREADS": str(cores)}
    for var in ("NOTMNIST_NUMERICS", "NOTMNIST_THREADS", "ONEDNN_MAX_CPU_ISA"):
        env.pop(var, None)
    code = f"from tests.test_numerics import probe; probe({mode!r}, {threads})"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def results() -> dict:
    return {(m, mode): run_machine(m, mode) for m in MACHINES for mode in numerics.MODES}


def test_native_mode_differs_between_machines(results):
    weights = {results[m, "native"]["weights"] for m in MACHINES}
    assert len(weights) == len(MACHINES)


@pytest.mark.skipif(not numerics.portable_possible(), reason="portable mode needs x86-64 AVX2")
def test_portable_mode_gives_the_same_weights_everywhere(results):
    weights = {results[m, "portable"]["weights"] for m in MACHINES}
    assert len(weights) == 1
    for m in MACHINES:
        fp = results[m, "portable"]["numerics"]
        assert (fp["mode"], fp["isa"], fp["mkl_path"], fp["onednn_isa"], fp["threads"]) == (
            "portable",
            "AVX2",
            "AVX2,STRICT",
            "off",
            "2",
        ), m


def test_native_fingerprint_says_what_each_machine_used(results):
    fp = results["no SIMD kernels, generic MKL, 3 cores", "native"]["numerics"]
    assert (fp["mode"], fp["isa"], fp["mkl_path"], fp["threads"]) == (
        "native",
        "DEFAULT",
        "COMPATIBLE",
        "3",
    )
    for key in ("cpu_model", "cpu_isa", "mkl", "onednn", "torch", "device"):
        assert fp[key], key


def test_portable_mode_refuses_a_torch_that_already_picked_its_kernels():
    code = (
        "import torch; torch.ones(2) + 1\n"
        "from pipeline import numerics\n"
        "numerics.configure('portable', 2)\n"
        "numerics.check()\n"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx512"}
    env.pop("NOTMNIST_NUMERICS", None)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    if numerics.machine_isa() == "AVX512":
        assert done.returncode != 0 and "already uses AVX512" in done.stderr
    else:  # an AVX2 machine: torch's own choice is the portable one
        assert done.returncode == 0, done.stderr


def test_configure_overrides_the_machines_settings_only_in_portable_mode(monkeypatch):
    for var in (*numerics.PORTABLE_ENV, "OMP_NUM_THREADS"):
        monkeypatch.setenv(var, "machine's own")
    monkeypatch.setitem(sys.modules, "torch", None)  # configure() must not touch torch here
    monkeypatch.delitem(sys.modules, "torch")
    numerics.configure("native", 3)
    assert os.environ["ATEN_CPU_CAPABILITY"] == "machine's own"
    assert os.environ["OMP_NUM_THREADS"] == "3"
    numerics.configure("portable", 2)
    if numerics.portable_possible():
        assert {v: os.environ[v] for v in numerics.PORTABLE_ENV} == numerics.PORTABLE_ENV
    with pytest.raises(ValueError, match="portable"):
        numerics.configure("fast", 2)


def test_apply_makes_torch_deterministic_without_importing_its_compiler():
    """torch.use_deterministic_algorithms imports torch._inductor (seconds per process) to set
    a flag only torch.compile reads; apply sets the same flags without it."""
    code = (
        "import sys, torch; from pipeline import numerics; numerics.apply(); "
        "print(torch.are_deterministic_algorithms_enabled(), "
        "torch.is_deterministic_algorithms_warn_only_enabled(), 'torch._inductor' in sys.modules, "
        "torch.utils.deterministic.fill_uninitialized_memory)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["True", "True", "False", "False"]


def test_training_reads_no_memory_left_unwritten():
    """With the NaN fill on, a kernel that read memory nobody wrote would turn the weights NaN
    or change them; the fill is off in the stages, so both ways must give the same bits."""
    import torch

    from pipeline.training.augment import Affine, random_affine
    from pipeline.training.loop import make_optimizer
    from pipeline.training.model import ModelConfig, build

    def train(fill: bool) -> dict:
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.manual_seed(0)
        cfg = ModelConfig(arch="convnet", hidden=(4, 8), input_channels=1, softmax_output=False)
        model = build(cfg).train()
        opt = make_optimizer(model, "adamw", 0.01)
        g = torch.Generator().manual_seed(0)
        for _ in range(3):
            x = random_affine(torch.rand(32, 28, 28, generator=g) * 2 - 1, Affine(2, 10, 0.1), g)
            loss = torch.nn.functional.cross_entropy(model(x), torch.arange(32) % 10)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return model.state_dict()

    before = torch.utils.deterministic.fill_uninitialized_memory
    try:
        filled, plain = train(True), train(False)
    finally:
        torch.utils.deterministic.fill_uninitialized_memory = before
    assert all(torch.isfinite(v.float()).all() for v in filled.values())
    assert all(torch.equal(filled[k], plain[k]) for k in filled)


def test_threads_sleep_at_once_only_where_processes_outnumber_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(numerics, "cores", lambda: 2)
    assert numerics.sharing(1, 2) == {}  # a stage alone: its threads spin before they sleep
    assert numerics.sharing(2, 1) == {}
    assert numerics.sharing(2, 2) == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert numerics.sharing(2, 2) == {}  # a policy in the environment is kept


def test_environ_sets_for_the_block_then_restores_each_variable(monkeypatch):
    """A pool's children get `sharing`'s variables; the stage keeps its own values after."""
    monkeypatch.setenv("GOMP_SPINCOUNT", "3000")  # as Task 7's stage sets it
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with numerics.environ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}):
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["GOMP_SPINCOUNT"] == "0"
    assert os.environ["GOMP_SPINCOUNT"] == "3000" and "OMP_WAIT_POLICY" not in os.environ
    with pytest.raises(RuntimeError), numerics.environ({"GOMP_SPINCOUNT": "0"}):
        raise RuntimeError  # a child that fails to start
    assert os.environ["GOMP_SPINCOUNT"] == "3000"


def test_spin_briefly_keeps_a_policy_or_count_already_set(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    numerics.spin_briefly()
    assert os.environ["GOMP_SPINCOUNT"] == "3000"
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    numerics.spin_briefly()
    assert os.environ["GOMP_SPINCOUNT"] == "7"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    numerics.spin_briefly()
    assert "GOMP_SPINCOUNT" not in os.environ


def test_task7_sets_the_spin_count_before_torch_loads():
    """OpenMP reads GOMP_SPINCOUNT once, when torch loads it: later would do nothing."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = (
        "import os, sys\n"
        "class Watch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            print(os.environ.get('GOMP_SPINCOUNT'))\n"
        "sys.meta_path.insert(0, Watch())\n"
        "import pipeline.stages.train_task7\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.splitlines()[0] == "3000"


def test_stages_leave_openmps_wait_policy_alone():
    """Importing the pipeline sets no policy: a stage alone gets OpenMP's default."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = (
        "import os, pipeline.cli, pipeline.training.runner; "
        "print(os.environ.get('OMP_WAIT_POLICY'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "None"
