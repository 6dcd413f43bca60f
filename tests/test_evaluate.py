"""The evaluate and report stages: metric arithmetic by hand, then both stages on a tiny project."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from sklearn.metrics import precision_recall_fscore_support

from pipeline import stats
from pipeline.config import LETTERS, ROOT, TASKS, Paths
from pipeline.data import decode
from pipeline.evaluation import scoring, summary
from pipeline.stages import evaluate, report, robustness, theory
from pipeline.training.loop import load_splits
from pipeline.training.model import load_model
from tests.conftest import TINY_TRAINING, tiny_project, train_every_task, unknown_parent_run

# Metric arithmetic on a hand-made case


def test_confusion_matrix_counts_true_rows_predicted_columns():
    true = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = scoring.confusion_matrix(true, pred, n=3)
    assert m.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_per_class_by_hand():
    #            predicted a  b  c
    m = np.array(
        [
            [2, 1, 0],  # true a: 3 images
            [0, 1, 1],  # true b: 2
            [0, 0, 1],
        ]
    )  # true c: 1
    table = scoring.per_class(m, letters="abc")
    assert table["letter"].tolist() == ["a", "b", "c"]
    assert table["support"].tolist() == [3, 2, 1]
    # a: precision 2/2, recall 2/3; b: 1/2, 1/2; c: 1/2, 1/1
    np.testing.assert_allclose(table["precision"], [1.0, 0.5, 0.5])
    np.testing.assert_allclose(table["recall"], [2 / 3, 0.5, 1.0])
    np.testing.assert_allclose(table["f1"], [0.8, 0.5, 2 / 3])


def test_per_class_never_predicted_or_absent_class_is_zero_not_nan():
    m = np.array([[3, 0, 0], [2, 0, 0], [0, 0, 0]])  # b never predicted right, c absent
    table = scoring.per_class(m, letters="abc")
    assert not table[["precision", "recall", "f1"]].isna().any().any()
    assert table.loc[1, ["precision", "recall", "f1"]].tolist() == [0.0, 0.0, 0.0]
    assert table.loc[2, ["precision", "recall", "f1", "support"]].tolist() == [0, 0, 0, 0]


def test_per_class_agrees_with_sklearn_on_random_labels():
    rng = np.random.default_rng(0)
    true, pred = rng.integers(0, 10, 500), rng.integers(0, 10, 500)
    table = scoring.per_class(scoring.confusion_matrix(true, pred))
    p, r, f, s = precision_recall_fscore_support(true, pred, labels=range(10), zero_division=0)
    np.testing.assert_allclose(table["precision"], p)
    np.testing.assert_allclose(table["recall"], r)
    np.testing.assert_allclose(table["f1"], f)
    assert table["support"].tolist() == s.tolist()


def test_worst_mistakes_most_confident_first_ties_by_index():
    true = np.array([0, 1, 2, 3, 4, 5])
    pred = np.array([0, 2, 1, 3, 0, 0])  # rows 1, 2, 4, 5 wrong
    conf = np.array([0.99, 0.6, 0.9, 0.2, 0.6, 0.7])
    assert scoring.worst_mistakes(true, pred, conf).tolist() == [2, 5, 1, 4]
    assert scoring.worst_mistakes(true, pred, conf, limit=2).tolist() == [2, 5]
    assert scoring.worst_mistakes(true, true, conf).tolist() == []


def test_champion_is_chosen_by_validation_never_by_test():
    metrics = {
        "task2": {"val_accuracy": 0.90, "test_accuracy": 0.95},
        "task3": {"val_accuracy": 0.92, "test_accuracy": 0.80},
        "task4": {"val_accuracy": 0.92, "test_accuracy": 0.99},  # a tie: the earlier task wins
    }
    assert scoring.pick_champion(metrics) == "task3"


def test_chosen_epochs_keeps_the_chosen_configuration_and_drops_diverged_rows():
    history = pd.DataFrame(
        {
            "config": ["lr=1", "lr=0.1", "lr=0.1", "lr=0.1"],
            "epoch": [1, 1, 2, 3],
            "train_loss": [np.nan, 2.0, 1.5, 1.4],
            "train_accuracy": [np.nan, 0.5, 0.6, 0.7],
            "val_loss": [np.nan, 2.1, 1.6, 1.7],
            "val_accuracy": [np.nan, 0.4, 0.5, 0.5],
            "seconds": [0.1, 1, 1, 1],
        }
    )
    rows = scoring.chosen_epochs(history, "lr=0.1")
    assert rows.columns.tolist() == scoring.EPOCH_COLUMNS
    assert rows["epoch"].tolist() == [1, 2, 3]
    assert rows["val_loss"].tolist() == [2.1, 1.6, 1.7]


def test_unseen_in_train_masks_only_test_copies_of_train_images():
    a, b, c, d, e, f = (np.zeros((28, 28), np.uint8) for _ in range(6))
    b[0, 0], c[27, 27], d[27, 27], e[5, 5], f[9, 9] = 1, 1, 2, 1, 1  # c differs from a by one pixel
    images = np.stack([a, e, b, a, c, c, f, d, e, f, b])
    labels = np.array(
        ["train", "test", "train", "test", "test", "val", "val", "test", "test", "val", "val"]
    )
    # test rows, in order: e, a, c, d, e. Only the copy of a is in train; e twice in test,
    # c in test and val, f twice in val and b in val and train do not count.
    assert scoring.unseen_in_train(images, labels).tolist() == [True, False, True, True, True]
    assert scoring.unseen_in_train(images, np.full(11, "test")).all()  # no train at all


def test_wilson_interval_by_hand():
    """8 of 10 at z = 1.96: center (0.8 + 0.19208) / 1.38416 = 0.716738, half-width
    1.96 / 1.38416 * sqrt(0.016 + 0.009604) = 0.226582: [0.490156, 0.943320]."""
    low, high = stats.wilson(8, 10, z=1.96)
    assert low == pytest.approx(0.490156, abs=1e-6)
    assert high == pytest.approx(0.943320, abs=1e-6)
    assert stats.Z95 == pytest.approx(1.959963984540054, rel=1e-15)


@pytest.mark.parametrize(
    "hits, n",
    [
        (0, 1),
        (1, 1),
        (0, 30),
        (3, 30),
        (27, 30),
        (30, 30),
        (2439, 2724),
        (2537, 2724),
        (1, 2724),
        (2723, 2724),
    ],
)
def test_wilson_interval_matches_scipy(hits, n):
    from scipy.stats import binomtest

    ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = stats.wilson(hits, n)
    assert low == pytest.approx(ci.low, abs=1e-12) and high == pytest.approx(ci.high, abs=1e-12)
    assert 0 <= low <= hits / n <= high <= 1
    assert (low == 0) == (hits == 0) and (high == 1) == (hits == n)


@pytest.mark.parametrize("hits, n", [(-1, 10), (11, 10), (0, 0)])
def test_wilson_interval_rejects_impossible_counts(hits, n):
    with pytest.raises(ValueError, match="need 0 <= hits <= n"):
        stats.wilson(hits, n)


def test_accuracy_ci95_of_an_empty_selection_is_none():
    assert scoring.accuracy_ci95(np.array([], dtype=bool)) is None
    assert scoring.accuracy_ci95(np.array([True, False, True])) == list(stats.wilson(2, 3))


# Both stages on a tiny project


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Tiny data, the four tasks trained, then evaluate and report run once."""
    base = tmp_path_factory.mktemp("evaluate")
    root = tiny_project(base / "proj", **TINY_TRAINING)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # robustness: the summary shows its table; theory: the summary links its page
    train_every_task(root, base / "artifacts", robustness, theory, report, tracking_uri=uri)
    return root, uri


@pytest.fixture(scope="module")
def client(project):
    return mlflow.MlflowClient(tracking_uri=project[1])


def metrics_of(root: Path) -> dict:
    return json.loads((root / "reports" / "metrics.json").read_text())


def declared(stage: str) -> list[str]:
    """The outs and metrics dvc.yaml declares for a stage."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    entries = spec.get("outs", []) + spec.get("metrics", [])
    return [e if isinstance(e, str) else next(iter(e)) for e in entries]


def plot_files() -> list[str]:
    """Every data or image file the top-level `plots:` of dvc.yaml names."""
    files = []
    for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]:
        name, spec = (entry, None) if isinstance(entry, str) else next(iter(entry.items()))
        if spec and isinstance(spec.get("y"), dict):
            files += list(spec["y"])
        else:
            files.append(name)
    return files


@pytest.mark.parametrize("stage", ["evaluate", "report"])
def test_every_declared_output_is_written(project, stage):
    root, _ = project
    for path in declared(stage):
        assert (root / path).exists(), path
    for task in TASKS:
        for name in ("per_class.csv", "confusion.csv", "epochs.csv", "predictions.csv"):
            assert (root / "reports" / "eval" / task / name).is_file()


def test_every_plot_in_dvc_yaml_exists(project):
    root, _ = project
    files = plot_files()
    assert any(f.endswith("confusion.csv") for f in files)
    assert any(f.endswith("epochs.csv") for f in files)
    assert not any(f.endswith("predictions.csv") for f in files)  # data, not a plot
    for path in files:
        assert (root / path).is_file(), path


def test_metrics_json_shape(project):
    root, _ = project
    metrics = metrics_of(root)
    assert list(metrics) == sorted(TASKS)
    for task, m in metrics.items():
        best = json.loads((root / "reports" / "train" / task / "best.json").read_text())
        assert set(m) >= {
            "test_accuracy",
            "test_loss",
            "val_accuracy",
            "val_loss",
            "best_epoch",
            "config",
        }
        assert 0 <= m["test_accuracy"] <= 1 and 0 <= m["val_accuracy"] <= 1
        assert m["config"] == best["config"]
        assert m["best_epoch"] == best["best_epoch"]
        # The model file holds the best epoch: its val scores are best.json's.
        assert m["val_loss"] == pytest.approx(best["val_loss"], rel=1e-5)
        assert m["val_accuracy"] == pytest.approx(best["val_accuracy"])


def test_test_metrics_recomputed_independently(project):
    root, _ = project
    test = load_splits(Paths(root), torch.device("cpu"))["test"]
    metrics = metrics_of(root)
    for task in TASKS:
        model, _ = load_model(root / "models" / f"{task}.pt")
        with torch.no_grad():
            out = model(test.x)
        loss = torch.nn.CrossEntropyLoss()(out, test.y).item()
        acc = (out.argmax(1) == test.y).float().mean().item()
        assert metrics[task]["test_accuracy"] == pytest.approx(acc)
        assert metrics[task]["test_loss"] == pytest.approx(loss, rel=1e-5)

        confusion = pd.read_csv(root / "reports" / "eval" / task / "confusion.csv")
        assert len(confusion) == len(test)
        assert confusion["actual"].tolist() == [LETTERS[i] for i in test.y.tolist()]
        hits = (confusion["actual"] == confusion["predicted"]).mean()
        assert hits == pytest.approx(acc)

        per_class = pd.read_csv(root / "reports" / "eval" / task / "per_class.csv")
        assert per_class["letter"].tolist() == list(LETTERS)
        assert per_class["support"].sum() == len(test)
        recall = confusion.groupby("actual").apply(
            lambda g: (g["predicted"] == g.name).mean(), include_groups=False
        )
        np.testing.assert_allclose(per_class["recall"], recall.reindex(list(LETTERS)), atol=1e-4)


def test_intervals_in_metrics_json_are_wilson_on_the_test_counts(project):
    root, _ = project
    test = load_splits(Paths(root), torch.device("cpu"))["test"]
    metrics = metrics_of(root)
    for task in TASKS:
        m = metrics[task]
        hits = round(m["test_accuracy"] * len(test))
        assert m["test_accuracy_ci95"] == pytest.approx(list(stats.wilson(hits, len(test))))
        low, high = m["test_accuracy_ci95"]
        assert low <= m["test_accuracy"] <= high
        unique = m["test_unique_images"]
        unique_hits = round(m["test_unique_accuracy"] * unique)
        assert m["test_unique_accuracy_ci95"] == pytest.approx(
            list(stats.wilson(unique_hits, unique))
        )


def test_predictions_csv_recomputed_independently(project):
    root, _ = project
    test = load_splits(Paths(root), torch.device("cpu"))["test"]
    split = pd.read_csv(root / "data" / "split" / "split.csv")
    metrics = metrics_of(root)
    for task in TASKS:
        table = pd.read_csv(root / "reports" / "eval" / task / "predictions.csv")
        assert table.columns.tolist() == ["row", "path", "true", "predicted", "probability"]
        assert table["row"].tolist() == list(range(len(test)))
        assert table["path"].tolist() == split.loc[split["split"] == "test", "path"].tolist()
        assert table["true"].tolist() == [LETTERS[i] for i in test.y.tolist()]
        model, _ = load_model(root / "models" / f"{task}.pt")
        with torch.no_grad():
            out = model(test.x)
        probs = out if model.cfg.softmax_output else torch.softmax(out, 1)
        assert table["predicted"].tolist() == [LETTERS[i] for i in out.argmax(1).tolist()]
        np.testing.assert_allclose(table["probability"], probs.max(1).values, atol=1e-6)
        hits = (table["true"] == table["predicted"]).mean()
        assert hits == pytest.approx(metrics[task]["test_accuracy"])
        text = (root / "reports" / "eval" / task / "predictions.csv").read_text()
        assert re.fullmatch(r"(\d+,[^,]+,[A-J],[A-J],[01]\.\d{6}\n)+", text.split("\n", 1)[1])


def test_leak_free_metrics_recomputed_independently(project):
    root, _ = project
    images, _ = decode.load_clean(root / "data" / "clean")
    labels = pd.read_csv(root / "data" / "split" / "split.csv")["split"].to_numpy()
    train = {im.tobytes() for im in images[labels == "train"]}
    copied = np.array([im.tobytes() in train for im in images[labels == "test"]])
    split_report = json.loads((root / "reports" / "data" / "split.json").read_text())
    assert copied.sum() == split_report["duplicates_in_train"]["test"]
    test = load_splits(Paths(root), torch.device("cpu"))["test"]
    keep = torch.as_tensor(~copied)
    metrics = metrics_of(root)
    for task in TASKS:
        m = metrics[task]
        assert m["test_unique_images"] + copied.sum() == len(test)
        model, _ = load_model(root / "models" / f"{task}.pt")
        with torch.no_grad():
            out = model(test.x)[keep]
        acc = (out.argmax(1) == test.y[keep]).float().mean().item()
        loss = torch.nn.CrossEntropyLoss()(out, test.y[keep]).item()
        assert m["test_unique_accuracy"] == pytest.approx(acc)
        assert m["test_unique_loss"] == pytest.approx(loss, rel=1e-5)


def test_epochs_csv_is_the_chosen_configurations_history(project):
    root, _ = project
    for task in TASKS:
        best = json.loads((root / "reports" / "train" / task / "best.json").read_text())
        history = pd.read_csv(root / "reports" / "train" / task / "history.csv")
        epochs = pd.read_csv(root / "reports" / "eval" / task / "epochs.csv")
        assert len(epochs) == best["epochs_run"]
        chosen = history[history["config"] == best["config"]["label"]]
        assert epochs["val_loss"].tolist() == pytest.approx(chosen["val_loss"].tolist())


def test_test_metrics_logged_to_each_parent_run(project, client):
    root, _ = project
    metrics = metrics_of(root)
    for task in TASKS:
        record = json.loads((root / "reports" / "train" / task / "mlflow.json").read_text())
        run = client.get_run(record["parent_run_id"])
        for key in ("test_accuracy", "test_loss", "test_unique_accuracy"):
            assert run.data.metrics[f"results/{key}"] == pytest.approx(metrics[task][key])
        names = {f.path for f in client.list_artifacts(run.info.run_id, "evaluation")}
        assert f"evaluation/{task}_confusion.png" in names
        assert "evaluation/per_class.csv" in names
        assert "evaluation/predictions.csv" in names


def test_champion_alias_points_at_the_best_validation_model(project, client):
    root, uri = project
    metrics = metrics_of(root)
    champion = scoring.pick_champion(metrics)
    record = json.loads((root / "reports" / "train" / champion / "mlflow.json").read_text())
    version = client.get_model_version_by_alias("notmnist-classifier", "champion")
    assert version.run_id == record["parent_run_id"]
    assert version.tags["task"] == champion
    registry = json.loads((root / "reports" / "registry.json").read_text())
    assert registry["version"] == int(version.version) and registry["task"] == champion

    # The registered model predicts what the model file predicts.
    mlflow.set_tracking_uri(uri)
    served = mlflow.pyfunc.load_model("models:/notmnist-classifier@champion")
    x = load_splits(Paths(root), torch.device("cpu"))["test"].x[:5]
    model, _ = load_model(root / "models" / f"{champion}.pt")
    with torch.no_grad():
        expected = model(x).numpy()
    np.testing.assert_allclose(served.predict(x.numpy()), expected, rtol=1e-5, atol=1e-6)


def test_rerun_reuses_the_registered_version_and_rewrites_the_same_files(project, client):
    root, uri = project
    names = [
        "reports/metrics.json",
        "reports/eval/task2/confusion.csv",
        "reports/eval/task3/per_class.csv",
        "reports/eval/task6_cnn/predictions.csv",
        "reports/eval/task4/predictions.csv",
        "reports/summary.md",
    ]
    before = {n: (root / n).read_bytes() for n in names}
    versions = len(client.search_model_versions("name='notmnist-classifier'"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        assert evaluate.main(["--root", str(root)]) == 0
        assert report.main(["--root", str(root)]) == 0
    assert len(client.search_model_versions("name='notmnist-classifier'")) == versions
    for n in names[:-1]:
        assert (root / n).read_bytes() == before[n], n
    # Only the closing section (machine and stage times) may differ in the summary.
    cut = summary.MACHINE_SECTION
    assert (root / names[-1]).read_text().split(cut)[0] == before[names[-1]].decode().split(cut)[0]


def test_missing_mlflow_run_fails_in_one_line_before_writing(project, tmp_path):
    root, _ = project
    metrics_before = (root / "reports" / "metrics.json").read_bytes()
    err = io.StringIO()
    with (
        unknown_parent_run(root, "task4"),
        pytest.MonkeyPatch.context() as mp,
        contextlib.redirect_stderr(err),
    ):
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        code = evaluate.main(["--root", str(root)])
    assert code == 1
    lines = err.getvalue().strip().splitlines()
    assert lines[-1].startswith("evaluate: error: task4's MLflow run 000")
    assert "dvc repro --force train_task4" in lines[-1]
    assert (root / "reports" / "metrics.json").read_bytes() == metrics_before


def test_summary_tables_and_links(project):
    root, _ = project
    text = (root / "reports" / "summary.md").read_text()
    metrics = metrics_of(root)
    headings = (
        "## Test results",
        "## Training",
        "### Task 2: learning rate",
        "### Task 3: hidden layer size",
        "## Data",
        summary.MACHINE_SECTION,
    )
    for heading in headings:
        assert heading in text
    header = next(line for line in text.splitlines() if line.startswith("| task | model |"))
    cells = header.split(" | ")
    column = cells.index("test acc. without train duplicates (30 images) [95% CI]")
    for task in TASKS:
        m = metrics[task]
        row = next(line for line in text.splitlines() if line.startswith(f"| {task} |"))
        low, high = m["test_accuracy_ci95"]
        acc = f"{100 * m['test_accuracy']:.2f}% [{100 * low:.2f}, {100 * high:.2f}]"
        assert row.split(" | ")[cells.index("reproduced [95% CI]")] == acc
        low, high = m["test_unique_accuracy_ci95"]
        unique = f"{100 * m['test_unique_accuracy']:.2f}% [{100 * low:.2f}, {100 * high:.2f}]"
        assert row.split(" | ")[column] == unique
    assert "within 1.5 points" in header  # no seed study in this project
    assert "No seed study yet (`make seeds`)" in text
    assert "95% Wilson score intervals" in text
    assert "0 of the 30 test images have an exact pixel copy in the train split" in text
    assert re.search(
        r"^\| task2 \| MLP 2352-1000-10, learning-rate sweep \| lr=0\.\S+ \| 89\.46% \|", text, re.M
    )
    for link in re.findall(r"\]\(([^)]+)\)", text):
        assert (root / "reports" / link).is_file(), link
    assert "train 60, validation 30, test 30" in text
    for stage in ("clean", "split", "train_task2", "evaluate"):
        assert f"| `{stage}` |" in text
    machine = text.split(summary.MACHINE_SECTION)[1]  # the closing section: machine and times
    assert "| numerics mode | portable |" in machine and "| ATen kernels | AVX2 |" in machine
    assert "| MKL path (MKL_CBWR) | AVX2,STRICT |" in machine


# The summary against a seed study (constructed numbers)


def seed_study(**tasks) -> dict:
    """A seeds.json with {task: (mean, sd, original_within_2sd, original_z)}."""
    return {
        "n": 5,
        "seeds": [0, 1, 2, 3, 4],
        "baseline_commit": "0123456789abcdef" * 2 + "01234567",
        "tasks": {
            t: {"mean": m, "sd": sd, "original_within_2sd": ok, "original_z": z}
            for t, (m, sd, ok, z) in tasks.items()
        },
    }


def one_metrics(acc: float) -> dict:
    return {
        "test_accuracy": acc,
        "test_accuracy_ci95": [acc - 0.01, acc + 0.01],
        "test_unique_accuracy": acc,
        "test_unique_accuracy_ci95": None,
        "test_unique_images": 2630,
        "test_loss": 1.57,
        "config": {"label": "lr=0.05"},
    }


SPLIT = {"duplicates_in_train": {"test": 94}, "counts": {"test": 2724}}


def results_rows(text: str) -> dict[str, list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {
        cells[0]: dict(zip(header, cells, strict=True))
        for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[1:])
    }


def test_summary_verdict_comes_from_the_seeds_when_there_is_a_study():
    metrics = {
        "task2": one_metrics(0.8954),
        "task4": one_metrics(0.8910),
        "task6_cnn": one_metrics(0.9314),
    }
    seeds = seed_study(
        task2=(0.894, 0.003, True, 0.2),
        task4=(0.8925, 0.0015, False, -5.67),
        task6_cnn=(0.930, 0.004, None, None),
    )
    text = summary.results_section(metrics, SPLIT, seeds)
    rows = results_rows(text)
    verdict = "original within mean +- 2 sd of 5 seeds"
    assert rows["task2"][verdict] == "yes (z = +0.20)"
    assert rows["task4"][verdict] == "**no** (z = -5.67)"  # 88.40: 5.7 sd below, within 1.5
    assert rows["task6_cnn"][verdict] == ""  # no original to compare
    assert rows["task2"]["5 seeds: mean +- sd"] == "89.40% +- 0.30"
    assert rows["task6_cnn"]["5 seeds: mean +- sd"] == "93.00% +- 0.40"
    assert rows["task2"]["reproduced [95% CI]"] == "89.54% [88.54, 90.54]"
    assert rows["task2"]["test acc. without train duplicates (2,630 images) [95% CI]"] == "89.54%"
    assert "within 1.5 points" not in text and "[seeds.md](seeds/seeds.md)" in text
    assert "training seeds 0..4" in text and "`0123456789ab`" in text


def test_summary_falls_back_to_the_tolerance_without_a_study():
    metrics = {"task2": one_metrics(0.8954), "task4": one_metrics(0.8640)}
    rows = results_rows(summary.results_section(metrics, SPLIT, None))
    assert rows["task2"]["within 1.5 points"] == "yes"  # +0.08 points
    assert rows["task4"]["within 1.5 points"] == "**no**"  # -2.00 points
    assert "5 seeds: mean +- sd" not in rows["task2"]


def test_report_reads_seeds_json_only_when_present(tmp_path):
    paths = Paths(tmp_path)
    assert summary.read_seeds(paths) is None
    paths.seeds_dir.mkdir(parents=True)
    study = seed_study(task2=(0.89, 0.01, True, 0.5))
    (paths.seeds_dir / "seeds.json").write_text(json.dumps(study))
    assert summary.read_seeds(paths)["n"] == 5
