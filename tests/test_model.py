"""The MLPs of Tasks 2-5: layer shapes, the softmax switch, RGB copies, dropout, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from pipeline.config import LETTERS
from pipeline.training.loop import normalize
from pipeline.training.model import MLP, LeNet, ModelConfig, build, load_model, save_model
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
        (  # Tasks 2 and 3: 2352 -> 1000 -> 10 (stored folded), the original's Softmax at the end
            ModelConfig(hidden=(1000,)),
            [(784, 1000), (1000, 10)],
            [nn.Linear, nn.ReLU, nn.Linear, nn.Softmax],
        ),
        (  # one gray channel: 784 inputs
            ModelConfig(hidden=(1000,), input_channels=1),
            [(784, 1000), (1000, 10)],
            [nn.Linear, nn.ReLU, nn.Linear, nn.Softmax],
        ),
        (  # Task 4: two hidden layers of 500
            ModelConfig(hidden=(500, 500)),
            [(784, 500), (500, 500), (500, 10)],
            [nn.Linear, nn.ReLU, nn.Linear, nn.ReLU, nn.Linear, nn.Softmax],
        ),
        (  # Task 5: dropout after the hidden activation
            ModelConfig(hidden=(1000,), dropout=0.5),
            [(784, 1000), (1000, 10)],
            [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.Softmax],
        ),
        (  # logits: no Softmax layer
            ModelConfig(hidden=(100,), softmax_output=False),
            [(784, 100), (100, 10)],
            [nn.Linear, nn.ReLU, nn.Linear],
        ),
    ],
    ids=["task2-3", "one-channel", "task4", "task5", "logits"],
)
def test_layers_per_task(cfg, shapes, types):
    model = MLP(cfg)
    assert cfg.in_features == 784 * cfg.input_channels  # the original's input width
    assert linear_shapes(model) == shapes  # the C identical channels folded into 784
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


def faithful(cfg: ModelConfig, seed: int) -> nn.Sequential:
    """The original's network over the flattened C-channel input, seeded like MLP(cfg)."""
    torch.manual_seed(seed)
    layers, width = [], cfg.in_features
    for h in cfg.hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, cfg.n_classes))
    if cfg.softmax_output:
        layers.append(nn.Softmax(dim=1))
    return nn.Sequential(*layers)


def rgb_input(gray: np.ndarray) -> torch.Tensor:
    """ImageFolder's input: PIL RGB copy -> ToTensor -> Normalize(0.5, 0.5) -> flatten."""
    to_tensor = transforms.Compose([transforms.ToTensor(), transforms.Normalize(0.5, 0.5)])
    rgb = torch.stack([to_tensor(Image.fromarray(g).convert("RGB")) for g in gray])
    assert rgb.shape == (len(gray), 3, 28, 28)
    return rgb.flatten(1)  # channel-major: all R pixels, then all G, then all B


@pytest.mark.parametrize("hidden", [(64,), (32, 16)])
def test_folded_model_is_the_original_on_rgb_copies(hidden):
    """Same seed: the folded MLP computes what the 2,352-input network computes."""
    cfg = ModelConfig(hidden=hidden)
    torch.manual_seed(7)
    model = MLP(cfg).eval()
    after_model = torch.rand(3)
    reference = faithful(cfg, seed=7).eval()
    # Folding draws nothing more: dropout masks and shuffles that follow are the original's.
    assert torch.equal(torch.rand(3), after_model)
    gray = np.stack([glyph(i) for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(model(normalize(gray)), reference(rgb_input(gray)))
        # The whole first layer was folded: its weight is the sum of the three channel blocks.
        blocks = reference[0].weight.view(hidden[0], 3, 784)
        torch.testing.assert_close(model.net[0].weight, blocks.sum(1))


@pytest.mark.parametrize("channels", [3, 1])
def test_folded_model_takes_the_originals_sgd_steps(channels):
    """param_groups: C * lr on the folded weight gives the C*784-input layer's SGD steps."""
    cfg = ModelConfig(hidden=(32,), input_channels=channels)
    torch.manual_seed(3)
    model = MLP(cfg)
    reference = faithful(cfg, seed=3)
    lr = 0.5
    opt = torch.optim.SGD(model.param_groups(lr), lr=lr)
    opt_ref = torch.optim.SGD(reference.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = torch.rand(16, 28, 28, generator=gen) * 2 - 1
        y = torch.randint(0, 10, (16,), generator=gen)
        wide = x.unsqueeze(1).expand(-1, channels, -1, -1).flatten(1)
        for net, o, inp in ((model, opt, x), (reference, opt_ref, wide)):
            o.zero_grad()
            nn.functional.cross_entropy(net(inp), y).backward()
            o.step()
    x = images(8)
    wide = x.unsqueeze(1).expand(-1, channels, -1, -1).flatten(1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(wide), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(model(x), MLP(cfg)(x), atol=1e-3)  # it did train
    # Without the C * lr the steps would differ (for C > 1).
    if channels > 1:
        torch.manual_seed(3)
        plain = MLP(cfg)
        o = torch.optim.SGD(plain.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(0)
        for _ in range(30):
            xb = torch.rand(16, 28, 28, generator=gen) * 2 - 1
            yb = torch.randint(0, 10, (16,), generator=gen)
            o.zero_grad()
            nn.functional.cross_entropy(plain(xb), yb).backward()
            o.step()
        with torch.no_grad():
            assert not torch.allclose(plain(x), reference(wide), atol=1e-5)


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
        torch.testing.assert_close(plain(x.flatten(1)), a)


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
    save_model(model, path, {"task": "task2", "best_epoch": 3})
    assert sorted(p.name for p in path.parent.iterdir()) == ["task2.pt"]  # no temp file left

    blob = torch.load(path, weights_only=True)
    assert {"state_dict", "config", "letters"} <= set(blob)
    assert blob["letters"] == list(LETTERS)
    assert blob["config"] == {
        "arch": "mlp",
        "hidden": list(cfg.hidden),
        "input_channels": cfg.input_channels,
        "dropout": cfg.dropout,
        "softmax_output": cfg.softmax_output,
        "n_classes": 10,
    }
    assert blob["task"] == "task2" and blob["best_epoch"] == 3
    assert blob["state_dict"].keys() == model.state_dict().keys()

    loaded, blob2 = load_model(path)
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
    save_model(MLP(ModelConfig(hidden=(4,))), path, {"task": "task3"})
    second = MLP(ModelConfig(hidden=(6,), input_channels=1))
    save_model(second, path)
    loaded, blob = load_model(path)
    assert "task" not in blob
    assert linear_shapes(loaded) == [(784, 6), (6, 10)]
    assert torch.equal(loaded.net[0].weight, second.net[0].weight)


def test_same_model_saves_to_the_same_bytes(tmp_path):
    torch.manual_seed(0)
    model = MLP(ModelConfig(hidden=(4,)))
    save_model(model, tmp_path / "a.pt", {"task": "task2"})
    save_model(model, tmp_path / "b" / "task2.pt", {"task": "task2"})
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b" / "task2.pt").read_bytes()


# Task 6's CNN


def test_lenet_shapes_and_parameter_count():
    cfg = ModelConfig(arch="cnn", hidden=(120, 84), input_channels=1, softmax_output=False)
    model = build(cfg).eval()
    assert isinstance(model, LeNet)
    assert sum(p.numel() for p in model.parameters()) == 61_706  # LeNet-5's, biases included
    x = images(5)
    shapes, h = [], x.unsqueeze(1)
    for layer in model.features:
        h = layer(h)
        if isinstance(layer, nn.MaxPool2d | nn.Conv2d):
            shapes.append(tuple(h.shape[1:]))
    assert shapes == [(6, 28, 28), (6, 14, 14), (16, 10, 10), (16, 5, 5)]
    assert model(x).shape == (5, 10)


def test_lenet_round_trip_and_bad_configs(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(arch="cnn", hidden=(8,), input_channels=1, softmax_output=False)
    model = build(cfg)
    save_model(model, tmp_path / "cnn.pt")
    loaded, blob = load_model(tmp_path / "cnn.pt")
    assert blob["config"]["arch"] == "cnn" and isinstance(loaded, LeNet)
    x = images(3)
    with torch.no_grad():
        assert torch.equal(loaded(x), model.eval()(x))
    with pytest.raises(ValueError, match="one gray channel"):
        build(ModelConfig(arch="cnn", input_channels=3))
    with pytest.raises(ValueError, match="unknown model arch"):
        build(ModelConfig(arch="rnn"))


def test_the_served_model_refuses_non_finite_pixels_even_exported():
    """FiniteInput (what log_model logs): the same scores, an error on NaN or infinity, also
    after torch.export (the graph MLflow's pt2 format keeps and the scoring server runs)."""
    from pipeline.training.model import FiniteInput

    torch.manual_seed(0)
    model = build(ModelConfig(hidden=(8,), input_channels=1)).eval()
    guarded = FiniteInput(model).eval()
    x = torch.rand(4, 28, 28) * 2 - 1
    exported = torch.export.export(guarded, (x,)).module()
    for m in (guarded, exported):
        assert torch.equal(m(x), model(x))
        for bad in (float("nan"), float("inf")):
            y = x.clone()
            y[1, 3, 4] = bad
            with pytest.raises(RuntimeError, match="finite"):
                m(y)
