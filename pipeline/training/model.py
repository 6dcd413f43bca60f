"""The original experiment's models: MLPs over (optionally RGB-copied) 28x28 letters."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from pipeline import signals
from pipeline.config import LETTERS
from pipeline.files import atomic_file


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "mlp"  # "mlp" (Tasks 2-5), "cnn" (LeNet-5 style, Task 6), "convnet" (Task 7)
    hidden: tuple[int, ...] = (1000,)  # hidden widths; for "cnn" its fully connected layers
    input_channels: int = 3  # 3 reproduces ImageFolder's RGB copies of the gray image
    dropout: float = 0.0  # after each hidden activation
    softmax_output: bool = True  # the original's Softmax before CrossEntropyLoss
    n_classes: int = len(LETTERS)
    members: int = 1  # "convnet": more than 1 trains an Ensemble of that many

    @property
    def in_features(self) -> int:
        return self.input_channels * 28 * 28


def head(width: int, cfg: ModelConfig) -> list[nn.Module]:
    """Linear + ReLU (+ Dropout) per hidden width, then the output layer (+ Softmax)."""
    layers: list[nn.Module] = []
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        width = h
    layers.append(nn.Linear(width, cfg.n_classes))
    if cfg.softmax_output:
        layers.append(nn.Softmax(dim=1))
    return layers


class MLP(nn.Module):
    """x (B, 28, 28) normalized to [-1, 1] -> (B, 10) scores (probabilities if softmax_output).

    The original fed C identical copies of each gray image (C*784 inputs). A first layer W =
    [W_1 .. W_C] over such input equals one layer over the 784 pixels with weight sum(W_c),
    and under plain SGD every block W_c receives the same gradient, so the sum moves C times
    as far as one block. The model keeps that sum (C times less work) and `param_groups`
    gives its weight C times the learning rate: the same function and the same SGD steps as
    the C*784-input layer, up to float rounding.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        layers = head(cfg.in_features, cfg)
        first = layers[0]  # initialized as the C*784-input layer, then folded (no extra RNG draw)
        blocks = first.weight.detach().view(first.out_features, cfg.input_channels, 28 * 28)
        first.weight = nn.Parameter(blocks.sum(1))
        first.in_features = 28 * 28
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))  # (B, 28, 28) -> (B, 784)

    def param_groups(self, lr: float) -> list[dict]:
        """SGD parameter groups: the folded weight stands for C blocks, so it gets C * lr."""
        first = self.net[0].weight
        rest = [p for p in self.parameters() if p is not first]
        return [{"params": [first], "lr": lr * self.cfg.input_channels}, {"params": rest}]


class LeNet(nn.Module):
    """LeNet-5 adapted to 28x28 letters: x (B, 28, 28) -> (B, 10) logits (or probabilities).

    conv 5x5 pad 2 -> 6x28x28, max-pool 2 -> 6x14x14, conv 5x5 -> 16x10x10, max-pool 2 ->
    16x5x5, then fully connected 400 -> hidden (120, 84) -> 10. Padding 2 gives the 28x28 input
    the 32x32 field the original LeNet-5 had. ReLU and max-pooling instead of tanh and average
    subsampling: they train faster with Adam and are what LeNet-style nets use today.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.input_channels != 1:
            raise ValueError("the CNN takes one gray channel: set input_channels to 1")
        self.cfg = cfg
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.net = nn.Sequential(nn.Flatten(), *head(16 * 5 * 5, cfg))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.features(x.unsqueeze(1)))  # (B, 28, 28) -> (B, 1, 28, 28)


class _Conv3x3(torch.autograd.Function):
    """conv2d(x, w, padding=1) whose input gradient is computed as a convolution too.

    On the CPU without oneDNN (portable numerics), PyTorch runs a 3x3 convolution through
    NNPACK but its backward through im2col, image by image. The input gradient is itself a
    convolution: of the output gradient with the kernels turned 180 degrees and their in and
    out channels swapped, which NNPACK computes too (for Task 7's 24-channel 28x28 layer, 19 ms
    per batch of 128 against 82 ms; README, "Speed"). The weight gradient keeps ATen's kernel.
    """

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return F.conv2d(x, w, padding=1)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = F.conv2d(grad, w.transpose(0, 1).flip(2, 3), padding=1)
        gw = torch.ops.aten.convolution_backward(
            grad, x, w, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [False, True, False]
        )[1]
        return gx, gw


class Conv3x3(nn.Conv2d):
    """A 3x3 convolution with padding 1 and no bias, faster to train on the CPU (_Conv3x3)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and torch.is_grad_enabled() and self.weight.requires_grad:
            return _Conv3x3.apply(x, self.weight)
        return super().forward(x)


class ConvNet(nn.Module):
    """A compact CNN with batch norm: x (B, 28, 28) -> (B, 10) logits.

    One block per width in `hidden`: two 3x3 convolutions, each with batch norm and ReLU, then
    2x2 max-pooling (28 -> 14 -> 7 for two blocks); after the last block, global average
    pooling over the positions, dropout and the output layer. Averaging over positions makes
    the prediction depend little on where the glyph sits.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.input_channels != 1 or cfg.softmax_output:
            raise ValueError("the batch-norm CNN takes one gray channel and outputs logits")
        self.cfg = cfg
        layers, width = [], 1
        for i, h in enumerate(cfg.hidden):
            for _ in range(2):
                layers += [Conv3x3(width, h), nn.BatchNorm2d(h), nn.ReLU()]
                width = h
            if i < len(cfg.hidden) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(width, cfg.n_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.features(x.unsqueeze(1))  # (B, 1, 28, 28) -> (B, C, H, W)
        return self.head(z.mean((2, 3)))


class FiniteInput(nn.Module):
    """The model as it is served: input with a NaN or infinite pixel raises an error (which
    MLflow's scoring server answers with 400) instead of giving NaN scores. The check is an
    operation of the exported graph (torch.export keeps `_assert_async`), so it travels with
    the logged model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert_async(torch.isfinite(x).all(), "input pixels must be finite numbers")
        return self.model(x)


class Ensemble(nn.Module):
    """`cfg.members` ConvNets side by side: x (B, 28, 28) -> (B, 10) log-probabilities.

    Each member starts from its own initialization and, in training mode, returns its own
    logits, (M, B, 10), so that each learns on its own loss (the training loop averages them);
    in eval mode the output is the log of the members' mean probability. Averaging members
    that err on different images makes fewer errors than any one of them.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        one = dataclasses.replace(cfg, members=1)
        self.members = nn.ModuleList(ConvNet(one) for _ in range(cfg.members))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.stack([m(x) for m in self.members])  # (M, B, 10) logits
        if self.training:
            return out
        return out.log_softmax(-1).logsumexp(0) - math.log(len(self.members))


ARCHS = {"mlp": MLP, "cnn": LeNet, "convnet": ConvNet}


def build(cfg: ModelConfig) -> nn.Module:
    """The model a config describes."""
    if cfg.arch not in ARCHS:
        raise ValueError(f"unknown model arch '{cfg.arch}' ({', '.join(ARCHS)})")
    if cfg.members != 1:
        if cfg.arch != "convnet" or cfg.members < 1:
            raise ValueError("members: an ensemble is of 1 or more 'convnet' models")
        return Ensemble(cfg)
    return ARCHS[cfg.arch](cfg)


def save_model(model: nn.Module, path: Path, extra: dict | None = None) -> None:
    """State dict plus the config needed to rebuild it; loadable with weights_only=True."""
    cfg = asdict(model.cfg)
    cfg["hidden"] = list(cfg["hidden"])
    if cfg["members"] == 1:  # a single model's file stays as it was before ensembles
        del cfg["members"]
    blob = {"state_dict": model.state_dict(), "config": cfg, "letters": list(LETTERS)}
    blob.update(extra or {})
    with signals.shield(), atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(blob, f)  # a file object: the zip's inner folder name stays fixed


def load_model(path: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """The model saved by save(), in eval mode, and the whole saved dict."""
    blob = torch.load(path, map_location=device, weights_only=True)
    cfg = dict(blob["config"])
    cfg["hidden"] = tuple(cfg["hidden"])
    model = build(ModelConfig(**cfg)).to(device)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob
