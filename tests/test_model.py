"""The MLPs of Tasks 2-5: layer shapes, the softmax switch, RGB copies, dropout, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from pipeline.config import LETTERS
from pipeline.model import MLP, ModelConfig, load, save
from pipeline.train import normalize
from tests.conftest import glyph


def linear_shapes(model: MLP) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in model.net if isinstance(m, nn.Linear)]


def layer_types(model: MLP) -> list[type]:
    return [type(m) for m in model.net]


def images(n: int, seed: int = 0) -> torch.Tensor:
    """n random images, normalized like the pipeline's: (n, 28, 28) float32 in [-1, 1]."""
    return normalize(np.stack([glyph(seed + i) for i in range(n)]))


# Architectures


@pytest.mark.parametrize(
    "cfg, shapes, types",
    [
        (  # Tasks 2 and 3: 2352 -> 1000 -> 10, the original's Softmax at the end
            ModelConfig(hidden=(1000,)),
            [(2352, 1000), (1000, 10)],
            [nn.Linear, nn.ReLU, nn.Linear, nn.Softmax],
        ),
        (  # one gray channel: 784 inputs
            ModelConfig(hidden=(1000,), input_channels=1),
            [(784, 1000), (1000, 10)],
            [nn.Linear, nn.ReLU, nn.Linear, nn.Softmax],
        ),
        (  # Task 4: two hidden layers of 500
            ModelConfig(hidden=(500, 500)),
            [(2352, 500), (500, 500), (500, 10)],
            [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear, nn.Softmax],
        ),
        (  # Task 5: dropout after the hidden activation
            ModelConfig(hidden=(1000,), dropout=0.5),
            [(2352, 1000), (1000, 10)],
            [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.Softmax],
        ),
        (  # logits: no Softmax layer
            ModelConfig(hidden=(100,), softmax_output=False),
            [(2352, 100), (100, 10)],
            [nn.Linear, nn.ReLU, nn.Linear],
        ),
    ],
    ids=["task2-3", "one-channel", "task4", "task5", "logits"],
)
def test_layers_per_task(cfg, shapes, types):
    model = MLP(cfg)
    assert cfg.in_features == shapes[0][0]
    assert linear_shapes(model) == shapes
    assert layer_types(model) == types
    for batch in (1, 5):
        out = model.eval()(images(batch))
        assert out.shape == (batch, len(LETTERS))
        assert out.dtype == torch.float32


def test_task5_dropout_probability_and_placement():
    model = MLP(ModelConfig(hidden=(1000,), dropout=0.5))
    relu = next(i for i, m in enumerate(model.net) if isinstance(m, nn.ReLU))
    assert isinstance(model.net[relu + 1], nn.Dropout)
    assert model.net[relu + 1].p == 0.5
    # No dropout layer at all without dropout.
    assert not any(isinstance(m, nn.Dropout) for m in MLP(ModelConfig(hidden=(1000,))).net)


def test_default_config_is_the_original():
    cfg = ModelConfig()
    assert cfg == ModelConfig(hidden=(1000,), input_channels=3, dropout=0.0, softmax_output=True)
    assert cfg.n_classes == 10
    assert cfg.in_features == 2352


# Outputs


def test_softmax_output_rows_are_probabilities():
    torch.manual_seed(0)
    x = images(6)
    probs = MLP(ModelConfig(hidden=(32,), softmax_output=True)).eval()(x)
    assert (probs >= 0).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(6))


def test_logits_without_softmax():
    torch.manual_seed(0)
    x = images(6)
    logits_model = MLP(ModelConfig(hidden=(32,), softmax_output=False)).eval()
    logits = logits_model(x)
    assert not torch.allclose(logits.sum(1), torch.ones(6), atol=1e-3)
    assert (logits < 0).any()  # not probabilities
    # Same weights with the softmax switched on: exactly softmax(logits).
    probs_model = MLP(ModelConfig(hidden=(32,), softmax_output=True)).eval()
    probs_model.load_state_dict(logits_model.state_dict())
    torch.testing.assert_close(probs_model(x), torch.softmax(logits, dim=1))


def test_three_channel_forward_is_the_rgb_copy_channel_major():
    """The input is ImageFolder's: PIL RGB copy -> ToTensor -> Normalize(0.5, 0.5) -> flatten."""
    torch.manual_seed(0)
    model = MLP(ModelConfig(hidden=(64,))).eval()
    gray = np.stack([glyph(i) for i in range(4)])

    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])
    rgb = torch.stack([to_tensor(Image.fromarray(g).convert("RGB")) for g in gray])
    assert rgb.shape == (4, 3, 28, 28)
    flat = rgb.flatten(1)  # channel-major: all R pixels, then all G, then all B
    x = normalize(gray)
    torch.testing.assert_close(flat, torch.cat([x.flatten(1)] * 3, dim=1))

    # By hand: Linear -> ReLU -> Linear -> Softmax on the flattened RGB copy.
    lin1, lin2 = (m for m in model.net if isinstance(m, nn.Linear))
    hidden = torch.relu(flat @ lin1.weight.T + lin1.bias)
    expected = torch.softmax(hidden @ lin2.weight.T + lin2.bias, dim=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected)
        # Pixel-major order (R, G, B of pixel 0, then pixel 1, ...) would give other scores.
        interleaved = rgb.permute(0, 2, 3, 1).flatten(1)
        assert not torch.allclose(model.net(interleaved), expected)


def test_one_channel_forward_is_the_flat_image():
    torch.manual_seed(0)
    model = MLP(ModelConfig(hidden=(16,), input_channels=1, softmax_output=False)).eval()
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.net(x.reshape(3, 784)))


def test_dropout_only_in_train_mode():
    torch.manual_seed(0)
    model = MLP(ModelConfig(hidden=(1000,), dropout=0.5))
    x = images(4)
    with torch.no_grad():
        model.eval()
        a, b = model(x), model(x)
        assert torch.equal(a, b)
        model.train()
        c, d = model(x), model(x)
        assert not torch.equal(c, d)
        assert not torch.equal(c, a)
        # Eval mode is the same network without dropout.
        plain = nn.Sequential(*(m for m in model.net if not isinstance(m, nn.Dropout))).eval()
        torch.testing.assert_close(plain(torch.cat([x.flatten(1)] * 3, dim=1)), a)


# Save and load


@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(hidden=(1000,)),
        ModelConfig(hidden=(500, 500)),
        ModelConfig(hidden=(1000,), dropout=0.5),
        ModelConfig(hidden=(8,), input_channels=1, softmax_output=False),
    ],
    ids=["task2", "task4", "task5", "gray-logits"],
)
def test_save_load_round_trip(tmp_path, cfg):
    torch.manual_seed(0)
    model = MLP(cfg)
    path = tmp_path / "models" / "task2.pt"
    save(model, path, {"task": "task2", "best_epoch": 3})
    assert sorted(p.name for p in path.parent.iterdir()) == ["task2.pt"]  # no temp file left

    blob = torch.load(path, weights_only=True)
    assert {"state_dict", "config", "letters"} <= set(blob)
    assert blob["letters"] == list(LETTERS)
    assert blob["config"] == {
        "hidden": list(cfg.hidden),
        "input_channels": cfg.input_channels,
        "dropout": cfg.dropout,
        "softmax_output": cfg.softmax_output,
        "n_classes": 10,
    }
    assert blob["task"] == "task2" and blob["best_epoch"] == 3
    assert blob["state_dict"].keys() == model.state_dict().keys()

    loaded, blob2 = load(path)
    assert not loaded.training  # eval mode: no dropout at prediction time
    assert loaded.cfg == cfg
    assert blob2["config"] == blob["config"]
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = images(5)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))


def test_save_overwrites_and_extra_is_optional(tmp_path):
    path = tmp_path / "task3.pt"
    torch.manual_seed(0)
    save(MLP(ModelConfig(hidden=(4,))), path, {"task": "task3"})
    second = MLP(ModelConfig(hidden=(6,), input_channels=1))
    save(second, path)
    loaded, blob = load(path)
    assert "task" not in blob
    assert linear_shapes(loaded) == [(784, 6), (6, 10)]
    assert torch.equal(loaded.net[0].weight, second.net[0].weight)


def test_same_model_saves_to_the_same_bytes(tmp_path):
    torch.manual_seed(0)
    model = MLP(ModelConfig(hidden=(4,)))
    save(model, tmp_path / "a.pt", {"task": "task2"})
    save(model, tmp_path / "b" / "task2.pt", {"task": "task2"})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "task2.pt").read_bytes()
