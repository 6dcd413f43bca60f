"""The original's written part (its Part I), each claim computed in code."""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from itertools import pairwise

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pipeline.markdown import table

log = logging.getLogger(__name__)

SEED = 0

TOL = 1e-12  # float64: two sides of an identity are equal when they differ by less than this

POINTS = 10_001  # evaluation points in [-20, 20] for the sigmoid and tanh identities

# What the original wrote, per claim. An identity's value is 0: its two sides are equal.
ORIGINAL = {
    "linear": {"stack vs one Linear: max abs difference": 0.0},
    "conv": {
        "conv output (H x W x C)": (6, 6, 20),
        "max-pool output (H x W x C)": (4, 4, 20),
        "multiplications per filter application": 800,
        "additions per filter application": 799,
        "FLOPs per filter application": 1_599,
        "convolution FLOPs": 1_151_280,
        "max-pool comparisons": 2_560,
        "bias additions": 720,
        "total FLOPs": 1_154_560,
    },
    "lenet": {
        "after conv1 (H x W x C)": (28, 28, 6),
        "after subsampling 1": (14, 14, 6),
        "after conv2": (10, 10, 16),
        "after subsampling 2": (5, 5, 16),
        "conv1 parameters": 156,
        "conv2 parameters": 2_416,
        "fc1 parameters": 48_000,
        "fc2 parameters": 10_080,
        "fc3 parameters": 840,
        "total parameters": 61_492,
    },
    "sigmoid": {
        "autograd `d sigma/dz` vs `sigma(z)(1 - sigma(z))`": 0.0,
        "`sigma(z)(1 - sigma(z))` vs `e^-z / (1 + e^-z)^2`": 0.0,
    },
    "tanh": {
        "`tanh(x)` vs `2 sigma(2x) - 1`": 0.0,
        "autograd `d tanh/dx` vs `1 - tanh^2(x)`": 0.0,
        "autograd `d tanh/dx` vs `4 sigma(2x) - 4 sigma(2x)^2`": 0.0,
    },
}


def same(computed, original) -> bool:
    if isinstance(computed, float) or isinstance(original, float):
        return abs(computed - original) < TOL
    return computed == original


@dataclass(frozen=True)
class Check:
    """One claim: the original's numbers, ours (a superset, in table order) and a note."""

    title: str
    claim: str
    original: dict
    computed: dict
    note: str
    details: tuple = ()  # optional extra table: (header, rows)

    @property
    def holds(self) -> bool:
        return all(same(self.computed[k], v) for k, v in self.original.items())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def hwc(t: torch.Tensor) -> tuple:
    """A 1 x C x H x W batch's shape as the original wrote it: H x W x C."""
    _, c, h, w = t.shape
    return (h, w, c)


def linear_collapse(original: dict = ORIGINAL["linear"], seed: int = SEED) -> Check:
    sizes, n = (784, 256, 128, 10), 1000
    torch.manual_seed(seed)
    layers = [nn.Linear(a, b, dtype=torch.float64) for a, b in pairwise(sizes)]
    x = torch.randn(n, sizes[0], dtype=torch.float64)
    with torch.no_grad():
        weight, bias = layers[0].weight, layers[0].bias
        for layer in layers[1:]:  # W = W3 W2 W1, b = W3 (W2 b1 + b2) + b3
            weight, bias = layer.weight @ weight, layer.weight @ bias + layer.bias
        one = nn.Linear(sizes[0], sizes[-1], dtype=torch.float64)
        one.weight.copy_(weight)
        one.bias.copy_(bias)
        linear = max_diff(nn.Sequential(*layers)(x), one(x))
        l1, l2, l3 = layers
        relu = max_diff(nn.Sequential(l1, nn.ReLU(), l2, nn.ReLU(), l3)(x), one(x))
    computed = {
        "layers": " -> ".join(map(str, sizes)),
        "random inputs": n,
        "stack vs one Linear: max abs difference": linear,
        "with a ReLU after each hidden layer: max abs difference": relu,
    }
    note = (
        "One `nn.Linear` with `W = W3 W2 W1` and `b = W3 (W2 b1 + b2) + b3` gives the stack's "
        f"outputs; with ReLUs the same single layer misses by {relu:.1e}, so the non-linearity "
        "is what keeps the layers from collapsing."
    )
    return Check(
        "Linear layers without a non-linearity collapse",
        "Stacking linear layers without a non-linearity collapses to one linear map.",
        original,
        computed,
        note,
    )


def conv_pool(original: dict = ORIGINAL["conv"]) -> Check:
    conv = nn.Conv2d(50, 20, kernel_size=4, stride=2, padding=1)
    pool = nn.MaxPool2d(3, stride=1)
    x = torch.zeros(1, 50, 12, 12)
    with torch.no_grad(), FlopCounterMode(display=False) as counted_conv:
        y = conv(x)
    with torch.no_grad(), FlopCounterMode(display=False) as counted_pool:
        z = pool(y)
    mults = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    window = pool.kernel_size * pool.kernel_size
    per_filter, conv_outputs = 2 * mults - 1, y.numel()
    computed = {
        "conv output (H x W x C)": hwc(y),
        "max-pool output (H x W x C)": hwc(z),
        "multiplications per filter application": mults,
        "additions per filter application": mults - 1,
        "FLOPs per filter application": per_filter,
        "convolution FLOPs": per_filter * conv_outputs,
        "max-pool comparisons": (window - 1) * z.numel(),
        "bias additions": conv_outputs,
    }
    computed["total FLOPs"] = sum(
        computed[k] for k in ("convolution FLOPs", "max-pool comparisons", "bias additions")
    )
    computed["FlopCounterMode: convolution"] = counted_conv.get_total_flops()
    computed["FlopCounterMode: max-pool"] = counted_pool.get_total_flops()
    flops = computed["FlopCounterMode: convolution"]
    note = (
        "Counted from the layers' shapes. `torch.utils.flop_counter.FlopCounterMode` differs by "
        f"convention: it counts a multiply-add as 2 FLOPs ({flops // conv_outputs:,} per output "
        f"where the original counts {per_filter:,} plus 1 bias addition), ignores the bias and "
        f"counts nothing for max-pooling, so its {flops:,} equals the original's convolution "
        f"plus bias additions and is {computed['total FLOPs'] - flops:,} (the pooling) below "
        "the original's total."
    )
    return Check(
        "A convolution and a max-pool: shapes and FLOPs",
        "A convolution of 20 filters of 4x4x50 over a 12x12x50 input, padding 1, stride 2, "
        "gives 6x6x20; 3x3 max-pooling with stride 1 then gives 4x4x20. The author counted "
        "1,599 FLOPs per filter application (800 multiplications, 799 additions), 1,151,280 "
        "for the convolution, 2,560 for the pooling (8 comparisons per output), 720 bias "
        "additions: 1,154,560 in total.",
        original,
        computed,
        note,
    )


def lenet5() -> nn.Sequential:
    """LeNet-5 on 32x32x1; activations have no parameters and keep shapes, so left out."""
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(1, 6, 5),  # -> 6 x 28 x 28
            pool1=nn.AvgPool2d(2, 2),  # -> 6 x 14 x 14
            conv2=nn.Conv2d(6, 16, 5),  # -> 16 x 10 x 10
            pool2=nn.AvgPool2d(2, 2),  # -> 16 x 5 x 5
            flatten=nn.Flatten(),
            fc1=nn.Linear(400, 120),
            fc2=nn.Linear(120, 84),
            fc3=nn.Linear(84, 10),
        )
    )


def layer_name(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        k = "x".join(map(str, module.kernel_size))
        return f"conv {k}, {module.in_channels} -> {module.out_channels} channels"
    return f"fully connected, {module.in_features} -> {module.out_features}"


def lenet_parameters(original: dict = ORIGINAL["lenet"]) -> Check:
    model, x = lenet5(), torch.zeros(1, 1, 32, 32)
    shapes = {}
    with torch.no_grad():
        for name, module in model.named_children():
            x = module(x)
            shapes[name] = x
    labels = (
        "after conv1 (H x W x C)",
        "after subsampling 1",
        "after conv2",
        "after subsampling 2",
    )
    computed = {
        label: hwc(shapes[n])
        for label, n in zip(labels, ("conv1", "pool1", "conv2", "pool2"), strict=True)
    }
    rows = []
    for name, module in model.named_children():
        if hasattr(module, "weight"):
            weights, biases = module.weight.numel(), module.bias.numel()
            computed[f"{name} parameters"] = weights + biases
            rows.append([name, layer_name(module), weights, biases])
    computed["total parameters"] = sum(p.numel() for p in model.parameters())
    return Check(
        "LeNet-5: feature maps and parameters",
        "LeNet-5 on 32x32x1: conv 5x5x6 -> 28x28x6, 2x2/2 subsampling -> 14x14x6, conv 5x5x16 "
        "-> 10x10x16, subsampling -> 5x5x16, FC 120, FC 84, FC 10. The author counted 156 + "
        "2,416 + 48,000 + 10,080 + 840 = 61,492 parameters.",
        original,
        computed,
        lenet_note(original, computed, rows),
        (["layer", "module", "weights", "biases"], rows),
    )


def lenet_note(original: dict, computed: dict, rows: list) -> str:
    """Why the counts differ: which layers the original counted without their biases."""
    shape_keys = [k for k, v in original.items() if isinstance(v, tuple)]
    shapes = "match" if all(computed[k] == original[k] for k in shape_keys) else "do not match"
    missed = [r for r in rows if original.get(f"{r[0]} parameters") != r[2] + r[3]]
    total = computed["total parameters"]
    if not missed:
        counts = "Every layer's parameter count and the total match the module's."
    elif any(original.get(f"{r[0]} parameters") != r[2] for r in missed):
        counts = "The original's per-layer counts do not match the module's (see the table)."
    else:
        biases = [r[3] for r in missed]
        counts = (
            f"The original's counts for {', '.join(r[0] for r in missed)} are their weights "
            f"alone: it left out their biases ({' + '.join(map(str, biases))} = {sum(biases)}), "
            f"and {total:,} - {sum(biases)} = {total - sum(biases):,}."
        )
    return f"{counts} The feature-map shapes (from a forward pass) {shapes}."


def points() -> torch.Tensor:
    return torch.linspace(-20, 20, POINTS, dtype=torch.float64, requires_grad=True)


def sigmoid_gradient(original: dict = ORIGINAL["sigmoid"]) -> Check:
    z = points()
    s = torch.sigmoid(z)
    (grad,) = torch.autograd.grad(s.sum(), z)
    z, s = z.detach(), s.detach()
    from_output = s * (1 - s)  # needs only the forward output s
    computed = {"points in [-20, 20]": POINTS}
    keys = list(ORIGINAL["sigmoid"])
    computed[keys[0]] = max_diff(grad, from_output)
    computed[keys[1]] = max_diff(from_output, torch.exp(-z) / (1 + torch.exp(-z)) ** 2)
    note = (
        "PyTorch's own sigmoid backward is computed from the output the same way, so the second "
        "row, against the quotient-rule derivative, is the independent check."
    )
    return Check(
        "The sigmoid's gradient needs only its output",
        "The logistic sigmoid's gradient with respect to its input needs only its output: "
        "d sigma(z)/dz = sigma(z)(1 - sigma(z)).",
        original,
        computed,
        note,
    )


def tanh_identities(original: dict = ORIGINAL["tanh"]) -> Check:
    x = points()
    t = torch.tanh(x)
    (grad,) = torch.autograd.grad(t.sum(), x)
    x, t = x.detach(), t.detach()
    s2 = torch.sigmoid(2 * x)
    keys = list(ORIGINAL["tanh"])
    computed = {"points in [-20, 20]": POINTS}
    computed[keys[0]] = max_diff(t, 2 * s2 - 1)
    computed[keys[1]] = max_diff(grad, 1 - t**2)
    computed[keys[2]] = max_diff(grad, 4 * s2 - 4 * s2**2)
    return Check(
        "tanh through the sigmoid, and its derivative",
        "tanh(x) = 2 sigma(2x) - 1, and d tanh/dx = 1 - tanh^2(x) = 4 sigma(2x) - 4 sigma(2x)^2.",
        original,
        computed,
        "The derivative is PyTorch's autograd of `torch.tanh`, in float64.",
    )


def all_claims() -> list[Check]:
    return [
        linear_collapse(),
        conv_pool(),
        lenet_parameters(),
        sigmoid_gradient(),
        tanh_identities(),
    ]


def fmt(value, measured: bool = False) -> str:
    """Shapes as 6x6x20, counts with commas; a measured difference below TOL as `< 1e-12`, so
    rounding that varies across machines never changes the file."""
    if isinstance(value, tuple):
        return "x".join(map(str, value))
    if isinstance(value, float):
        if not measured:
            return f"{value:g}"
        return f"< {TOL:.0e}" if abs(value) < TOL else f"{value:.1e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render_claims(results: list[Check]) -> str:
    parts = [
        "# The original's written part, checked with PyTorch\n\n"
        "Written by the `theory` stage of `dvc repro`: each claim of the coursework's Part I "
        f"beside what PyTorch computes (float64 for the identities, seed {SEED}). An identity's "
        "original value is 0 (its two sides are equal); computed is the largest absolute "
        f"difference, shown as `< {TOL:.0e}` when below that tolerance.\n"
    ]
    for i, c in enumerate(results, 1):
        rows = [
            [k, fmt(c.original[k]) if k in c.original else "", fmt(v, measured=True)]
            for k, v in c.computed.items()
        ]
        text = f"## {i}. {c.title}\n\n> {c.claim}\n\n"
        text += table(["quantity", "original", "computed"], rows) + "\n\n"
        if c.details:
            header, detail = c.details
            text += table(header, [[fmt(v) for v in row] for row in detail]) + "\n\n"
        text += f"Verdict: **{'holds' if c.holds else 'differs'}**. {c.note}\n"
        parts.append(text)
    return "\n".join(parts)
