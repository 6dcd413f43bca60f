"""Stage `theory`: each claim's numbers, the verdict logic and reports/theory.md."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipeline.config import ROOT
from pipeline.evaluation import claims
from pipeline.evaluation.claims import ORIGINAL, TOL
from pipeline.stages import theory


@pytest.fixture(scope="module")
def checks():
    return dict(zip(ORIGINAL, claims.all_claims(), strict=True))


def test_linear_stack_collapses_and_a_relu_breaks_it(checks):
    c = checks["linear"]
    assert c.computed["stack vs one Linear: max abs difference"] < TOL
    assert c.computed["with a ReLU after each hidden layer: max abs difference"] > 0.1
    assert c.computed["layers"] == "784 -> 256 -> 128 -> 10"
    assert c.holds


def test_conv_pool_shapes_and_flops(checks):
    c = checks["conv"]
    assert c.computed["conv output (H x W x C)"] == (6, 6, 20)
    assert c.computed["max-pool output (H x W x C)"] == (4, 4, 20)
    expected = {
        "multiplications per filter application": 800,
        "additions per filter application": 799,
        "FLOPs per filter application": 1_599,
        "convolution FLOPs": 1_151_280,
        "max-pool comparisons": 2_560,
        "bias additions": 720,
        "total FLOPs": 1_154_560,
        "FlopCounterMode: convolution": 2 * 800 * 720,  # 1,152,000: no bias, no pooling
        "FlopCounterMode: max-pool": 0,
    }
    assert {k: c.computed[k] for k in expected} == expected
    assert c.holds
    assert "1,152,000" in c.note and "2,560" in c.note


def test_lenet_shapes_parameters_and_the_missing_fc_biases(checks):
    c = checks["lenet"]
    shapes = [(28, 28, 6), (14, 14, 6), (10, 10, 16), (5, 5, 16)]
    assert [v for v in c.computed.values() if isinstance(v, tuple)] == shapes
    assert c.computed["total parameters"] == 61_706
    assert sum(p.numel() for p in claims.lenet5().parameters()) == 61_706
    header, rows = c.details
    assert header == ["layer", "module", "weights", "biases"]
    assert [(r[0], r[2], r[3]) for r in rows] == [
        ("conv1", 150, 6),
        ("conv2", 2_400, 16),
        ("fc1", 48_000, 120),
        ("fc2", 10_080, 84),
        ("fc3", 840, 10),
    ]
    assert not c.holds  # the original's 61,492 = 61,706 - (120 + 84 + 10)
    assert "fc1, fc2, fc3" in c.note and "214" in c.note and "61,492" in c.note


def test_sigmoid_and_tanh_identities(checks):
    for name in ("sigmoid", "tanh"):
        c = checks[name]
        assert c.computed["points in [-20, 20]"] == 10_001
        assert all(c.computed[k] < TOL for k in ORIGINAL[name]), c.computed
        assert c.holds


@pytest.mark.parametrize(
    "claim, key, value",
    [
        ("linear", "stack vs one Linear: max abs difference", 1.0),
        ("conv", "total FLOPs", 1_154_561),
        ("conv", "max-pool output (H x W x C)", (3, 3, 20)),
        ("sigmoid", "autograd `d sigma/dz` vs `sigma(z)(1 - sigma(z))`", 1e-3),
        ("tanh", "`tanh(x)` vs `2 sigma(2x) - 1`", 0.5),
    ],
)
def test_a_tampered_original_differs(claim, key, value):
    function = {
        "linear": claims.linear_collapse,
        "conv": claims.conv_pool,
        "sigmoid": claims.sigmoid_gradient,
        "tanh": claims.tanh_identities,
    }[claim]
    assert function().holds
    assert not function({**ORIGINAL[claim], key: value}).holds


def test_lenet_holds_once_the_original_counts_the_biases():
    fixed = {**ORIGINAL["lenet"], "fc1 parameters": 48_120, "fc2 parameters": 10_164}
    fixed.update({"fc3 parameters": 850, "total parameters": 61_706})
    c = claims.lenet_parameters(fixed)
    assert c.holds and c.note.startswith("Every layer's parameter count")
    wrong_shape = claims.lenet_parameters({**fixed, "after conv2": (12, 12, 16)})
    assert not wrong_shape.holds and "do not match" in wrong_shape.note


def test_measured_differences_render_the_same_everywhere():
    assert claims.fmt(0.0, measured=True) == claims.fmt(3e-16, measured=True) == "< 1e-12"
    assert claims.fmt(0.6187, measured=True) == "6.2e-01"
    assert claims.fmt(0.0) == "0"
    assert claims.fmt((6, 6, 20)) == "6x6x20" and claims.fmt(1_154_560) == "1,154,560"


def test_main_writes_every_claim_twice_identically(tmp_path):
    out = tmp_path / "reports" / "theory.md"
    assert theory.main(["--root", str(tmp_path)]) == 0
    first = out.read_bytes()
    assert theory.main(["--root", str(tmp_path)]) == 0
    assert out.read_bytes() == first
    assert (tmp_path / "reports" / "timing" / "theory.json").is_file()
    text = first.decode()
    for i, c in enumerate(claims.all_claims(), 1):
        assert f"## {i}. {c.title}" in text
    assert text.count("Verdict: **holds**") == 4 and text.count("Verdict: **differs**") == 1
    assert "| total parameters | 61,492 | 61,706 |" in text
    assert "| total FLOPs | 1,154,560 | 1,154,560 |" in text
    assert "<" not in text.replace("< 1e-12", "")  # plain Markdown, no HTML


def test_help_says_what_it_reads_and_writes():
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.theory", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "reads:" in done.stdout and "writes:" in done.stdout
    assert "reports/theory.md" in done.stdout
