"""The shared training loop: metrics, early stopping, divergence, seeding, flips, devices."""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import Paths, StageError, TrainParams
from pipeline.data import decode
from pipeline.stages import clean, split, train_task2
from pipeline.training import loop, runner
from pipeline.training.loop import (
    Batches,
    Result,
    Split,
    evaluate_split,
    fit,
    normalize,
    pick_device,
)
from pipeline.training.model import MLP, ModelConfig, build
from tests.conftest import make_archive, tiny_dataset, write_params

METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
ROW_KEYS = ["epoch", *METRICS, "seconds"]


def stripes(n: int, seed: int) -> Split:
    """An easy pattern: class k is a bright band on rows 2k+4, 2k+5 over light noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 10
    x = torch.rand(n, 28, 28, generator=g) * 0.4 - 1
    for i, k in enumerate(y.tolist()):
        x[i, 2 * k + 4 : 2 * k + 6] = 1.0
    perm = torch.randperm(n, generator=g)
    return Split(x[perm], y[perm])


def noise(n: int, seed: int) -> Split:
    """Random images with random labels: nothing to learn, so val loss soon gets worse."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 28, 28, generator=g) * 2 - 1
    return Split(x, torch.randint(0, 10, (n,), generator=g))


def easy_data() -> dict[str, Split]:
    return {"train": stripes(200, 1), "val": stripes(50, 2)}


def params(**kw) -> TrainParams:
    base = dict(
        batch_size=20,
        max_epochs=4,
        patience=2,
        input_channels=1,
        softmax_output=False,
        hflip=False,
        device="cpu",
    )
    return TrainParams(**{**base, **kw})


def new_model(seed: int = 0, hidden=(16,), dropout: float = 0.0, **kw) -> MLP:
    loop.set_seed(seed)
    cfg = dict(hidden=hidden, input_channels=1, softmax_output=False, dropout=dropout)
    return MLP(ModelConfig(**{**cfg, **kw}))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def scripted_evaluate(monkeypatch, val_losses: list[float]) -> list[float]:
    """Make fit() see these validation losses, one per epoch; returns the calls' record."""
    calls = []

    def fake(model, data, batch_size=1024):
        calls.append(len(calls) + 1)
        return val_losses[len(calls) - 1], 0.5

    monkeypatch.setattr(loop, "evaluate_split", fake)
    return calls


# fit: metrics and the weights it keeps


def test_fit_learns_an_easy_pattern_and_keeps_the_best_epoch():
    data, model = easy_data(), new_model()
    seen = []
    p = params(max_epochs=4, patience=4)
    result = fit(model, data, p, lr=0.1, seed=0, on_epoch=seen.append)

    assert result.status == "ok"
    assert [row["epoch"] for row in result.history] == [1, 2, 3, 4]
    assert all(list(row) == ROW_KEYS for row in result.history)
    assert seen == result.history  # on_epoch got every row, in order
    val = [row["val_loss"] for row in result.history]
    assert result.best_epoch == 1 + int(np.argmin(val))
    assert result.best == result.history[result.best_epoch - 1]
    assert result.best["val_accuracy"] >= 0.9  # the bands are easy
    for row in result.history:
        assert 0 <= row["train_accuracy"] <= 1 and 0 <= row["val_accuracy"] <= 1
        assert row["seconds"] >= 0
    # The model holds the best epoch's weights: its val metrics are that row's, exactly.
    assert evaluate_split(model, data["val"]) == (
        result.best["val_loss"],
        result.best["val_accuracy"],
    )


def test_an_epoch_keeps_no_tensor_per_step():
    """Per-step records go into tensors made once per epoch. Small tensors kept alive between
    each step's large temporaries fragmented glibc's heap: a 250,000-image epoch sometimes
    grew from 1.2 to 5.5 GB (README, "Data variants and scale")."""
    data, model = easy_data(), new_model()  # 10 steps of 20 images per epoch
    alive = []

    def count(module, args, out):
        gc.collect()
        alive.append(sum(isinstance(o, torch.Tensor) for o in gc.get_objects()))

    model.register_forward_hook(count)
    gc.freeze()  # what exists now is left out of the counts (and of each collection's walk)
    try:
        fit(model, data, params(max_epochs=1), lr=0.1, seed=0)
    finally:
        gc.unfreeze()
    steps = alive[:10]  # then the validation pass
    assert max(steps[2:]) - steps[1] <= 1, steps  # with a list per record: +3 a step


def test_fit_metrics_are_the_epoch_means():
    """With lr 0 the weights never move: each metric is the plain mean over the split."""
    data, model = easy_data(), new_model()
    before = weights(model)
    result = fit(model, data, params(max_epochs=3, patience=1), lr=0.0, seed=0)

    with torch.no_grad():
        out = model.eval()(data["train"].x)
    train_loss = nn.functional.cross_entropy(out, data["train"].y).item()
    train_acc = (out.argmax(1) == data["train"].y).float().mean().item()
    val_loss, val_acc = evaluate_split(model, data["val"])
    first = result.history[0]
    assert first["train_loss"] == pytest.approx(train_loss, rel=1e-5)
    assert first["train_accuracy"] == pytest.approx(train_acc)
    assert (first["val_loss"], first["val_accuracy"]) == (val_loss, val_acc)
    # Equal val losses are not an improvement: best epoch 1, stop after `patience` more.
    assert result.best_epoch == 1
    assert len(result.history) == 2
    assert same_weights(weights(model), before)


@pytest.mark.parametrize(
    "val_losses, patience, max_epochs, epochs_run, best_epoch",
    [
        ([1.0, 0.5, 0.7, 0.8, 0.4, 0.3], 2, 6, 4, 2),  # stops 2 epochs after the best
        ([1.0, 0.5, 0.7, 0.8, 0.4, 0.3], 1, 6, 3, 2),  # patience 1: the first worse epoch
        ([1.0, 0.5, 0.7, 0.8, 0.4, 0.3], 3, 6, 6, 6),  # waits long enough to see 0.4 and 0.3
        ([0.5, 0.5, 0.5, 0.5], 2, 4, 3, 1),  # an equal loss is no improvement
        ([0.9, 0.8, 0.7], 1, 3, 3, 3),  # always better: runs to max_epochs
        ([0.9, 1.0, 0.8, 0.9, 0.95], 2, 5, 5, 3),  # the wait restarts at a new best
    ],
)
def test_fit_early_stopping_restores_the_best_epochs_weights(
    monkeypatch, val_losses, patience, max_epochs, epochs_run, best_epoch
):
    calls = scripted_evaluate(monkeypatch, val_losses)
    data, model = easy_data(), new_model()
    snapshots = {}

    def on_epoch(row):
        snapshots[row["epoch"]] = weights(model)

    p = params(max_epochs=max_epochs, patience=patience)
    result = fit(model, data, p, lr=0.1, seed=0, on_epoch=on_epoch)

    assert result.status == "ok"
    assert len(calls) == epochs_run
    assert [row["epoch"] for row in result.history] == list(range(1, epochs_run + 1))
    assert [row["val_loss"] for row in result.history] == val_losses[:epochs_run]
    assert result.best_epoch == best_epoch
    assert result.best["val_loss"] == val_losses[best_epoch - 1]
    assert sorted(snapshots) == list(range(1, epochs_run + 1))
    assert same_weights(weights(model), snapshots[best_epoch])
    if best_epoch != epochs_run:
        assert not same_weights(weights(model), snapshots[epochs_run])


def test_fit_stops_early_on_real_overfitting():
    """Random labels and a large step: val loss rises after the first epochs."""
    data = {"train": noise(30, 1), "val": noise(50, 2)}
    model = new_model(hidden=(64,))
    p = params(batch_size=5, max_epochs=8, patience=2)
    result = fit(model, data, p, lr=0.3, seed=0)

    val = [row["val_loss"] for row in result.history]
    assert result.status == "ok"
    assert len(val) < p.max_epochs
    assert len(val) == result.best_epoch + p.patience
    assert min(val) == val[result.best_epoch - 1]
    assert all(v >= val[result.best_epoch - 1] for v in val[result.best_epoch :])
    assert evaluate_split(model, data["val"])[0] == val[result.best_epoch - 1]


# fit: divergence


def test_fit_absurd_learning_rate_diverges(monkeypatch):
    evaluated = []

    def spy(*args, **kwargs):
        evaluated.append(1)
        return evaluate_split(*args, **kwargs)

    monkeypatch.setattr(loop, "evaluate_split", spy)
    data, model = easy_data(), new_model()
    seen = []
    result = fit(model, data, params(max_epochs=3), lr=1e30, seed=0, on_epoch=seen.append)
    assert evaluated == []  # stopped at the first non-finite training loss, mid-epoch

    # The loss really went non-finite: the weights it stopped at give a NaN/inf loss.
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(data["train"].x), data["train"].y).item()
    assert not math.isfinite(loss)

    assert result.status == "diverged"
    assert result.best_epoch == 0 and result.best == {}
    assert seen == []  # no completed epoch to log
    last = result.history[-1]
    assert list(last) == ROW_KEYS
    assert last["epoch"] == len(result.history) == 1
    assert all(math.isnan(last[k]) for k in METRICS)
    assert math.isfinite(last["seconds"])


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_fit_non_finite_validation_loss_diverges_after_good_epochs(monkeypatch, bad):
    scripted_evaluate(monkeypatch, [1.0, 0.8, bad, 0.1])
    data, model = easy_data(), new_model()
    seen = []
    p = params(max_epochs=4, patience=3)
    result = fit(model, data, p, lr=0.1, seed=0, on_epoch=seen.append)

    assert result.status == "diverged"
    assert [row["epoch"] for row in result.history] == [1, 2, 3]
    assert [row["val_loss"] for row in result.history[:2]] == [1.0, 0.8]
    assert all(math.isnan(result.history[2][k]) for k in METRICS)
    assert [row["epoch"] for row in seen] == [1, 2]
    assert result.best_epoch == 2 and result.best["val_loss"] == 0.8


def test_result_diverged_row():
    r = Result(history=[{"epoch": 1, "val_loss": 1.0}], best_epoch=1)
    assert r.diverged(2, 1.23456) is r
    assert r.status == "diverged"
    assert r.history[-1]["epoch"] == 2 and r.history[-1]["seconds"] == 1.235
    assert r.best == {"epoch": 1, "val_loss": 1.0}


# fit: seeding


def run_once(seed: int) -> tuple[Result, dict]:
    data = easy_data()
    model = new_model(seed, hidden=(32,), dropout=0.5)  # dropout uses torch's global generator
    p = params(max_epochs=3, patience=3, hflip=True)  # flips and shuffling use fit's generator
    result = fit(model, data, p, lr=0.05, seed=seed)
    return result, weights(model)


def test_fit_same_seed_same_history_and_weights():
    a, wa = run_once(0)
    b, wb = run_once(0)
    assert len(a.history) == 3
    assert without_seconds(a.history) == without_seconds(b.history)
    assert a.best_epoch == b.best_epoch
    assert same_weights(wa, wb)

    c, wc = run_once(1)
    assert without_seconds(c.history) != without_seconds(a.history)
    pairs = zip(a.history, c.history, strict=True)
    assert all(x["train_loss"] != y["train_loss"] for x, y in pairs)
    assert not same_weights(wa, wc)


def test_set_seed_seeds_python_numpy_and_torch():
    def draw():
        return random.random(), np.random.rand(), torch.rand(1).item()

    loop.set_seed(7)
    first = draw()
    loop.set_seed(7)
    assert draw() == first
    loop.set_seed(8)
    assert all(x != y for x, y in zip(draw(), first, strict=True))


# flips, devices, normalization


def epoch_batches(x: torch.Tensor, y: torch.Tensor, seed: int, bs: int = 7, hflip=True):
    batches = Batches(Split(x, y), bs, hflip)
    got = list(batches.epoch(torch.Generator().manual_seed(seed)))
    return got, batches.labels


def test_batches_cover_the_epoch_once_and_flip_about_half_exactly():
    x = torch.rand(400, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(400)  # labels name the image, so each batch row can be traced
    got, labels = epoch_batches(x, y, seed=1)

    assert [len(b) for b, _ in got] == [7] * 57 + [1]
    seen = torch.cat([yb for _, yb in got])
    assert torch.equal(seen, labels) and sorted(seen.tolist()) == list(range(400))
    images = torch.cat([xb for xb, _ in got])
    flipped = [torch.equal(im, x[i].flip(-1)) for im, i in zip(images, seen.tolist(), strict=True)]
    kept = [torch.equal(im, x[i]) for im, i in zip(images, seen.tolist(), strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each image is one or the other
    assert 150 <= sum(flipped) <= 250
    # Left-right: row r of a flipped image is row r reversed, not another row.
    j = flipped.index(True)
    assert torch.equal(images[j, 3], x[seen[j], 3].flip(0))
    # The generator decides: same seed, same epoch; another seed, another one.
    again, _ = epoch_batches(x, y, seed=1)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(got, again, strict=True))
    other, _ = epoch_batches(x, y, seed=2)
    assert not torch.equal(torch.cat([yb for _, yb in other]), seen)


@pytest.mark.parametrize("hflip", [True, False])
def test_batches_of_8_bit_pixels_are_the_normalized_batches_bit_for_bit(hflip):
    pixels = torch.randint(
        0, 256, (300, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    y = torch.arange(300)
    got, labels = epoch_batches(pixels, y, seed=4, hflip=hflip)
    want, want_labels = epoch_batches(normalize(pixels), y, seed=4, hflip=hflip)
    assert torch.equal(labels, want_labels)
    for (a, ya), (b, yb) in zip(got, want, strict=True):
        assert a.dtype == torch.float32 and torch.equal(a, b) and torch.equal(ya, yb)


def test_batches_without_flips_are_the_images_themselves():
    x = torch.rand(50, 28, 28, generator=torch.Generator().manual_seed(0))
    got, labels = epoch_batches(x, torch.arange(50), seed=3, hflip=False)
    assert torch.equal(torch.cat([xb for xb, _ in got]), x[labels])


def test_pick_device_auto_and_cpu(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        expected = "cuda"
    elif torch.backends.mps.is_available():
        expected = "mps"
    else:
        expected = "cpu"
    assert pick_device("auto").type == expected
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")


@pytest.mark.parametrize("name", ["nonsense", "", "cuda:banana"])
def test_pick_device_unusable_name_is_a_stage_error(name):
    with pytest.raises(StageError, match="train.device"):
        pick_device(name)


def test_pick_device_unavailable_backend_is_a_stage_error():
    with pytest.raises(StageError, match="train.device 'xla' is not usable here"):
        pick_device("xla")


def run_stage_on_device(tmp_path, capsys, device: str) -> tuple[int, list[str]]:
    """train_task2 on a project that stops at pick_device (no data needed before it)."""
    root = tmp_path / "proj"
    root.mkdir()
    write_params(root, train={"device": device})
    paths = Paths(root)
    paths.data_reports.mkdir(parents=True)
    (paths.data_reports / "download.json").write_text(json.dumps({"content_digest": "0" * 64}))
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        code = train_task2.main(["--root", str(root)])
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
    return code, capsys.readouterr().err.splitlines()


def test_stage_with_unusable_device_exits_1(tmp_path, capsys):
    code, err = run_stage_on_device(tmp_path, capsys, "nonsense")
    assert code == 1
    assert len(err) == 1
    assert err[0].startswith("train_task2: error: train.device 'nonsense' is not usable here (")
    assert not (tmp_path / "proj" / "models").exists()


def test_stage_with_unavailable_backend_prints_one_line(tmp_path, capsys):
    code, err = run_stage_on_device(tmp_path, capsys, "xla")
    assert code == 1
    assert err[0].startswith("train_task2: error: train.device 'xla' is not usable here (")
    assert len(err) == 1, f"{len(err)} lines"


def test_normalize_maps_pixels_to_minus_one_one():
    pixels = np.array([[0, 255, 51]], dtype=np.uint8)
    x = normalize(pixels)
    assert x.dtype == torch.float32
    assert x[0, 0] == -1.0 and x[0, 1] == 1.0
    assert x[0, 2].item() == pytest.approx(51 / 127.5 - 1)
    assert torch.equal(normalize(torch.as_tensor(pixels)), x)
    assert normalize(np.zeros((3, 28, 28), np.uint8)).shape == (3, 28, 28)


# load_splits on a tiny project


def tiny_project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    (root / "data" / "raw").mkdir(parents=True)
    make_archive(Paths(root).raw_archive, tiny_dataset(per_letter=6))
    write_params(root, split={"train_size": 30, "val_size": 20})
    assert clean.main(["--root", str(root)]) == 0
    assert split.main(["--root", str(root)]) == 0
    return root


def test_load_splits_normalized_with_class_ids(tmp_path):
    root = tiny_project(tmp_path)
    paths = Paths(root)
    data = loop.load_splits(paths, torch.device("cpu"))

    assert {s: len(d) for s, d in data.items()} == {"train": 30, "val": 20, "test": 10}
    images, index = decode.load_clean(paths.clean_dir)
    table = pd.read_csv(paths.split_dir / "split.csv")
    for s, d in data.items():
        rows = (table["split"] == s).to_numpy()
        want = torch.uint8 if s == "train" else torch.float32  # train: pixels, a quarter the size
        assert d.x.dtype == want and d.x.shape == (rows.sum(), 28, 28)
        assert torch.equal(d.floats(), normalize(images[rows]))
        if s == "train":
            assert torch.equal(d.x, torch.as_tensor(images[rows]))
        d.x = d.floats()
        assert d.y.dtype == torch.long
        assert d.y.tolist() == index["class_id"][rows].tolist()
        assert -1 <= d.x.min() and d.x.max() <= 1


def test_load_splits_refuses_a_split_of_other_images(tmp_path):
    root = tiny_project(tmp_path)
    csv = Paths(root).split_dir / "split.csv"
    table = pd.read_csv(csv)
    table.iloc[::-1].to_csv(csv, index=False)  # same rows, other order
    with pytest.raises(StageError, match="does not match"):
        loop.load_splits(Paths(root), torch.device("cpu"))


# task helpers


def test_history_rows_mark_only_the_last_row():
    c = runner.Candidate("hidden=500-500", 0.1, (500, 500), 0.5)
    assert c.as_dict() == {
        "lr": 0.1,
        "hidden": [500, 500],
        "dropout": 0.5,
        "arch": "mlp",
        "optimizer": "sgd",
    }
    metrics = {"train_loss": 1.5, "train_accuracy": 0.5, "val_accuracy": 0.6}
    result = Result(
        history=[
            {"epoch": 1, **metrics, "val_loss": 1.0, "seconds": 0.7},
            {"epoch": 2, **metrics, "val_loss": 0.9, "seconds": 0.8},
        ]
    )
    rows = runner.history_rows(c, copy.deepcopy(result))
    assert rows == [  # no seconds: a rerun writes the same bytes
        {
            "config": c.label,
            "lr": 0.1,
            "hidden": "500-500",
            "dropout": 0.5,
            "epoch": 1,
            **metrics,
            "val_loss": 1.0,
            "status": "ok",
        },
        {
            "config": c.label,
            "lr": 0.1,
            "hidden": "500-500",
            "dropout": 0.5,
            "epoch": 2,
            **metrics,
            "val_loss": 0.9,
            "status": "ok",
        },
    ]
    result.diverged(3, 0.1)
    rows = runner.history_rows(c, result)
    assert [r["status"] for r in rows] == ["ok", "ok", "diverged"]


def test_best_lr_reads_task2_best_json(tmp_path):
    paths = Paths(tmp_path)
    with pytest.raises(StageError, match="Task 2's best learning rate"):
        runner.best_lr(paths)
    best = paths.train_reports("task2") / "best.json"
    best.parent.mkdir(parents=True)
    best.write_text("{not json")
    with pytest.raises(StageError, match="best.json"):
        runner.best_lr(paths)
    best.write_text(json.dumps({"config": {"label": "lr=0.03"}}))
    with pytest.raises(StageError, match="best.json"):
        runner.best_lr(paths)
    best.write_text(json.dumps({"config": {"lr": 0.03}}))
    assert runner.best_lr(paths) == 0.03


def test_fit_with_adam_trains_the_cnn_on_the_easy_pattern():
    data = easy_data()
    loop.set_seed(0)
    cfg = ModelConfig(arch="cnn", hidden=(8,), input_channels=1, softmax_output=False)
    model = build(cfg)
    result = fit(model, data, params(max_epochs=3, patience=3), lr=0.01, seed=0, optimizer="adam")
    assert result.status == "ok"
    assert result.best["val_accuracy"] >= 0.9


def test_make_optimizer_kinds():
    model = new_model()
    assert isinstance(loop.make_optimizer(model, "adam", 0.01), torch.optim.Adam)
    sgd = loop.make_optimizer(new_model(hidden=(4,), input_channels=3), "sgd", 0.1)
    assert [g["lr"] for g in sgd.param_groups] == pytest.approx([0.3, 0.1])  # folded: 3 * lr
    with pytest.raises(ValueError, match="unknown optimizer"):
        loop.make_optimizer(model, "rmsprop", 0.1)


def test_task6_takes_the_best_validation_mlp_of_tasks_2_to_5(tmp_path):
    from pipeline.stages import train_task6

    paths = Paths(tmp_path)
    scores = {"task2": 0.90, "task3": 0.92, "task4": 0.92, "task5": 0.91}  # a tie: the earlier
    for name, acc in scores.items():
        out = paths.train_reports(name)
        out.mkdir(parents=True)
        config = {"lr": 0.05, "hidden": [500, 500] if name == "task4" else [100], "dropout": 0.0}
        (out / "best.json").write_text(json.dumps({"val_accuracy": acc, "config": config}))
    c = train_task6.best_mlp(paths)
    assert (c.hidden, c.lr, c.dropout, c.arch) == ((100,), 0.05, 0.0, "mlp")
    assert c.label == "hidden=100 lr=0.05 (as task3)"
    (paths.train_reports("task5") / "best.json").write_text("{")
    with pytest.raises(StageError, match="not valid JSON"):
        train_task6.best_mlp(paths)


# Task 7's pieces: augmentation, the batch-norm CNN, a recipe; resuming is bit-identical


def test_affine_shift_of_one_pixel_moves_the_glyph_by_one_pixel():
    from pipeline.training.augment import Affine, matrices, warp

    x = torch.rand(2, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    u = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0]])  # 1 px along x, along y
    out = warp(x, matrices(u, Affine(shift_px=1.0)))
    background = -torch.ones(28, 1)
    left = torch.cat([x[0, :, 1:], background], 1)  # content moved one pixel to the left
    up = torch.cat([background.T, x[1, :-1]], 0)  # content moved one pixel down
    torch.testing.assert_close(out[0], left, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1], up, rtol=0, atol=1e-5)


def test_random_affine_is_seeded_and_keeps_the_range():
    from pipeline.training.augment import Affine, random_affine

    x = torch.rand(16, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    a = Affine(shift_px=2, rotate_deg=10, scale=0.1)
    one = random_affine(x, a, torch.Generator().manual_seed(1))
    assert torch.equal(one, random_affine(x, a, torch.Generator().manual_seed(1)))
    assert not torch.equal(one, random_affine(x, a, torch.Generator().manual_seed(2)))
    assert one.min() >= -1 - 1e-6 and one.max() <= 1 + 1e-6
    assert not Affine() and a


def test_random_noise_is_seeded_on_a_share_and_keeps_the_range():
    from pipeline.training.augment import random_noise

    x = torch.rand(400, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    one = random_noise(x, 0.6, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(one, random_noise(x, 0.6, 0.5, torch.Generator().manual_seed(1)))
    assert not torch.equal(one, random_noise(x, 0.6, 0.5, torch.Generator().manual_seed(2)))
    assert one.min() >= -1 and one.max() <= 1
    changed = (one != x).flatten(1).any(1).float().mean().item()
    assert 0.4 < changed < 0.6  # about half the images
    residual = (one - x)[(one - x).abs().flatten(1).amax(1) > 0]
    assert 0.05 < residual.std().item() < 0.6  # std drawn up to 0.6, less where clipped
    assert torch.equal(random_noise(x, 0.6, 0.0, torch.Generator().manual_seed(1)), x)
    everywhere = random_noise(x, 0.6, 1.0, torch.Generator().manual_seed(1))
    assert (everywhere != x).flatten(1).any(1).float().mean().item() > 0.99


def test_convnet_shapes_parameters_and_no_flips_or_softmax():
    model = build(
        ModelConfig(
            arch="convnet", hidden=(8, 16), input_channels=1, dropout=0.1, softmax_output=False
        )
    )
    assert model(torch.zeros(3, 28, 28)).shape == (3, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    with pytest.raises(ValueError, match="one gray channel"):
        build(ModelConfig(arch="convnet", hidden=(8,), input_channels=3))


@pytest.mark.parametrize("batch", [3, 32])  # NNPACK takes batches of 16 or more, ATen the rest
def test_conv3x3_gradients_are_the_convolutions(batch):
    from pipeline.training.model import Conv3x3

    torch.manual_seed(0)
    conv = Conv3x3(5, 7)
    ref = nn.Conv2d(5, 7, 3, padding=1, bias=False)
    ref.weight = nn.Parameter(conv.weight.detach().clone())
    x = torch.randn(batch, 5, 12, 12)
    grad = torch.randn(batch, 7, 12, 12)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    outs = [conv(xs[0]), ref(xs[1])]
    assert outs[0].grad_fn.name().startswith("_Conv3x3")  # the faster backward is in use
    assert torch.equal(outs[0], outs[1])  # the same forward kernel
    for out in outs:
        out.backward(grad)
    x64, w64 = x.double().requires_grad_(), conv.weight.detach().double().requires_grad_()
    F.conv2d(x64, w64, padding=1).backward(grad.double())  # the exact gradients, to compare
    # Both float32 kernels round (long sums, in their own orders, on each CPU its own way), so
    # each is compared with the exact gradient, to 1e-5 of its largest entry; measured here:
    # 3e-7 (input) and 1.4e-6 (weights) of it. A wrong kernel is off by a tenth or more.
    for got, exact in [
        (xs[0].grad, x64.grad),
        (xs[1].grad, x64.grad),
        (conv.weight.grad, w64.grad),
        (ref.weight.grad, w64.grad),
    ]:
        scale = exact.abs().max().item()
        torch.testing.assert_close(got.double(), exact, rtol=0, atol=1e-5 * scale)
    torch.manual_seed(0)
    assert torch.equal(conv.weight, nn.Conv2d(5, 7, 3, padding=1, bias=False).weight)  # same init
    with torch.no_grad():  # evaluation: the plain convolution
        assert conv(x).grad_fn is None and torch.equal(conv(x), ref(x))
    first = Conv3x3(1, 4)  # the first layer: an input without gradient, the weight's alone
    first(torch.randn(batch, 1, 12, 12)).sum().backward()
    assert first.weight.grad is not None


def test_the_last_plain_epochs_train_on_the_images_as_they_are(monkeypatch):
    from pipeline.training.augment import Affine
    from pipeline.training.loop import Recipe

    calls, noisy, epoch = [], [], [0]
    real, real_noise = loop.random_affine, loop.random_noise

    def counted(x, a, generator):
        calls.append(epoch[0])
        return real(x, a, generator)

    def counted_noise(x, largest, share, generator):
        noisy.append(epoch[0])
        return real_noise(x, largest, share, generator)

    monkeypatch.setattr(loop, "random_affine", counted)
    monkeypatch.setattr(loop, "random_noise", counted_noise)
    cfg = ModelConfig(arch="convnet", hidden=(4,), input_channels=1, softmax_output=False)
    p = params(max_epochs=3, patience=3, hflip=False, input_channels=1)
    for plain, augmented in [(0, {1, 2, 3}), (1, {1, 2}), (3, set())]:
        calls.clear(), noisy.clear()
        recipe = Recipe("adamw", augment=Affine(2, 10, 0.1), plain_epochs=plain, noise=0.6)
        loop.set_seed(0)
        fit(
            build(cfg),
            easy_data(),
            p,
            lr=0.01,
            seed=0,
            optimizer=recipe,
            on_start=lambda e: epoch.__setitem__(0, e),
        )
        assert set(calls) == augmented and set(noisy) == augmented


def test_resuming_a_recipe_with_schedule_and_augmentation_is_bit_identical(tmp_path):
    from pipeline.training.augment import Affine
    from pipeline.training.loop import Recipe

    data = easy_data()
    cfg = ModelConfig(
        arch="convnet", hidden=(4, 8), input_channels=1, dropout=0.2, softmax_output=False
    )
    recipe = Recipe(
        "adamw",
        weight_decay=1e-3,
        schedule="onecycle",
        augment=Affine(2, 10, 0.1),
        label_smoothing=0.1,
        plain_epochs=2,
        noise=0.6,
    )
    p = params(max_epochs=4, patience=4, hflip=False, input_channels=1)

    def new():
        loop.set_seed(0)
        return build(cfg)

    whole = new()
    expected = fit(whole, data, p, lr=0.01, seed=0, optimizer=recipe)

    class Stop(Exception):
        pass

    def stop_after_two(row):
        if row["epoch"] == 2:
            raise Stop

    checkpoint = tmp_path / "state.pt"
    with pytest.raises(Stop):
        fit(
            new(),
            data,
            p,
            lr=0.01,
            seed=0,
            optimizer=recipe,
            checkpoint=checkpoint,
            on_epoch=stop_after_two,
        )
    loop.set_seed(123)  # whatever the process did meanwhile: the checkpoint restores it
    resumed = new()
    got = fit(resumed, data, p, lr=0.01, seed=0, optimizer=recipe, checkpoint=checkpoint)
    assert without_seconds(got.history) == without_seconds(expected.history)
    assert got.best_epoch == expected.best_epoch
    assert same_weights(weights(resumed), weights(whole))


def test_an_ensembles_members_learn_on_their_own_losses_and_score_together():
    """Each member gets the gradient of its own loss: the same steps as training it alone on
    the same batches (a member's gradient never depends on the others)."""
    from pipeline.training.loop import Recipe
    from pipeline.training.model import ConvNet, Ensemble

    cfg = ModelConfig(arch="convnet", hidden=(4,), input_channels=1, softmax_output=False)
    loop.set_seed(0)
    ensemble = build(dataclasses.replace(cfg, members=2))
    assert isinstance(ensemble, Ensemble) and len(ensemble.members) == 2
    first = weights(ensemble.members[0])
    assert not same_weights(first, weights(ensemble.members[1]))  # each its own initialization
    p = params(max_epochs=1, patience=1)
    fit(ensemble, easy_data(), p, lr=0.02, seed=0, optimizer=Recipe("sgd"))

    alone = ConvNet(cfg)
    alone.load_state_dict(first)
    # The mean of 2 losses halves each member's gradient: plain SGD at half the rate takes
    # the same steps alone.
    fit(alone, easy_data(), p, lr=0.01, seed=0, optimizer=Recipe("sgd"))
    for k, v in weights(alone).items():
        torch.testing.assert_close(weights(ensemble.members[0])[k], v, rtol=0, atol=1e-5)

    x = easy_data()["val"].x
    ensemble.eval()
    mean = torch.stack([m.eval()(x).softmax(1) for m in ensemble.members]).mean(0)
    torch.testing.assert_close(ensemble(x).exp(), mean)
    with pytest.raises(ValueError, match="ensemble"):
        build(dataclasses.replace(cfg, arch="mlp", input_channels=3, members=2))


def test_a_single_models_file_has_no_members_key(tmp_path):
    from pipeline.training.model import load_model, save_model

    cfg = ModelConfig(arch="convnet", hidden=(4,), input_channels=1, softmax_output=False)
    save_model(build(cfg), tmp_path / "one.pt")
    blob = torch.load(tmp_path / "one.pt", weights_only=True)
    assert "members" not in blob["config"]
    save_model(build(dataclasses.replace(cfg, members=2)), tmp_path / "two.pt")
    model, blob = load_model(tmp_path / "two.pt")
    assert blob["config"]["members"] == 2 and len(model.members) == 2
