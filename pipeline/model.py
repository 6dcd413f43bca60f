"""The original experiment's models: MLPs over (optionally RGB-copied) 28x28 letters."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.config import LETTERS
from pipeline.files import atomic_file


@dataclass(frozen=True)
class ModelConfig:
    hidden: tuple[int, ...] = (1000,)
    input_channels: int = 3  # 3 reproduces ImageFolder's RGB copies of the gray image
    dropout: float = 0.0  # after each hidden activation
    softmax_output: bool = True  # the original's Softmax before CrossEntropyLoss
    n_classes: int = len(LETTERS)

    @property
    def in_features(self) -> int:
        return self.input_channels * 28 * 28


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
        layers: list[nn.Module] = []
        width = cfg.in_features
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if cfg.dropout:
                layers.append(nn.Dropout(cfg.dropout))
            width = h
        layers.append(nn.Linear(width, cfg.n_classes))
        if cfg.softmax_output:
            layers.append(nn.Softmax(dim=1))
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


def save(model: MLP, path: Path, extra: dict | None = None) -> None:
    """State dict plus the config needed to rebuild it; loadable with weights_only=True."""
    cfg = asdict(model.cfg)
    cfg["hidden"] = list(cfg["hidden"])
    blob = {"state_dict": model.state_dict(), "config": cfg, "letters": list(LETTERS)}
    blob.update(extra or {})
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(blob, f)  # a file object: the zip's inner folder name stays fixed


def load(path: Path, device: str | torch.device = "cpu") -> tuple[MLP, dict]:
    """The model saved by save(), in eval mode, and the whole saved dict."""
    blob = torch.load(path, map_location=device, weights_only=True)
    cfg = dict(blob["config"])
    cfg["hidden"] = tuple(cfg["hidden"])
    model = MLP(ModelConfig(**cfg)).to(device)
    model.load_state_dict(blob["state_dict"])
    return model.eval(), blob
