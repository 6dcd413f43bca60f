"""The robustness stage: perturbations by hand, font discovery, then the stage on a tiny project."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import matplotlib
import mlflow
import numpy as np
import pytest
import torch
import yaml

from pipeline import tracking
from pipeline.config import LETTERS, ROOT, TASKS, Paths, RobustnessParams, StageError, load
from pipeline.data import glyph
from pipeline.evaluation import perturb
from pipeline.stages import report, robustness, theory
from pipeline.training.loop import normalize
from pipeline.training.model import load_model as load_model
from tests.conftest import unknown_parent_run, write_params

MPL_FONTS = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
METRIC_NAME = re.compile(r"^[/\w.\- :]*$")  # what MLflow accepts as a metric name

# Perturbations by hand


def dot(r: int, c: int) -> np.ndarray:
    x = np.zeros((1, 28, 28), np.uint8)
    x[0, r, c] = 200
    return x


@pytest.mark.parametrize("dx, dy", [(1, 0), (-2, 0), (0, 3), (0, -1), (2, -3)])
def test_shift_moves_pixels_exactly_and_fills_black(dx, dy):
    moved = perturb.shift(dot(10, 12), dx, dy)
    assert np.flatnonzero(moved[0]).tolist() == [(10 + dy) * 28 + 12 + dx]
    assert moved.sum() == 200
    full = np.full((1, 28, 28), 255, np.uint8)
    shifted = perturb.shift(full, dx, dy)[0]
    assert (shifted == 0).sum() == 28 * 28 - (28 - abs(dx)) * (28 - abs(dy))


def test_shift_off_the_edge_is_lost():
    assert perturb.shift(dot(0, 27), 1, 0).sum() == 0


def test_rotate_positive_is_counter_clockwise_about_the_center():
    x = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    # A quarter turn maps pixel centers onto pixel centers: bilinear resampling is exact.
    np.testing.assert_array_equal(perturb.rotate(x, 90), np.rot90(x, 1, axes=(1, 2)))
    np.testing.assert_array_equal(perturb.rotate(x, -90), np.rot90(x, -1, axes=(1, 2)))


def test_scale_about_the_center():
    x = np.random.default_rng(1).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    np.testing.assert_array_equal(perturb.scale(x, 1.0), x)
    half = perturb.scale(np.full((1, 28, 28), 255, np.uint8), 0.5)[0]
    rows, cols = np.flatnonzero(half.any(1)), np.flatnonzero(half.any(0))
    assert (rows[0], rows[-1], cols[0], cols[-1]) == (7, 20, 7, 20)  # 14 px centered
    assert half[8:20, 8:20].min() == 255 and half[:6].max() == 0
    bigger = perturb.scale(dot(10, 10), 2.0)[0]  # 4 px from the center -> about 8
    r, c = np.unravel_index(bigger.argmax(), bigger.shape)
    assert abs(r - 6) <= 1 and abs(c - 6) <= 1


def test_noise_is_seeded_clipped_and_centered():
    x = np.full((50, 28, 28), 128, np.uint8)
    a, b = perturb.noise(x, 0.1, 0, 0), perturb.noise(x, 0.1, 0, 0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, perturb.noise(x, 0.1, 0, 1))
    assert not np.array_equal(a, perturb.noise(x, 0.1, 1, 0))
    assert a.dtype == np.uint8
    assert abs(a.astype(float).mean() - 128) < 0.5
    assert abs(a.astype(float).std() - 25.5) < 0.5
    strong = perturb.noise(np.zeros((5, 28, 28), np.uint8), 1.0, 0, 0)
    assert strong.min() == 0 and strong.max() == 255  # clipped, not wrapped


def test_default_conditions_names_and_order():
    names = [c.name for c in perturb.conditions(RobustnessParams(), seed=0)]
    assert names[0] == "clean"
    assert len(names) == len(set(names)) == 1 + 12 + 4 + 2 + 2 + 1
    assert names[1:5] == ["shift right 1", "shift left 1", "shift down 1", "shift up 1"]
    assert {
        "rotate 10 ccw",
        "rotate 20 cw",
        "scale 0.8",
        "scale 1.2",
        "noise 0.1",
        "noise 0.3",
        "inverted",
    } <= set(names)
    assert all(METRIC_NAME.match(f"robustness/{n}") for n in names)


def test_conditions_are_deterministic():
    x = np.random.default_rng(2).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    for a, b in zip(
        perturb.conditions(RobustnessParams(), 0),
        perturb.conditions(RobustnessParams(), 0),
        strict=True,
    ):
        np.testing.assert_array_equal(a.apply(x), b.apply(x), err_msg=a.name)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("shifts", [0], "robustness.shifts: must be a non-empty list of pixel counts in 1..27"),
        ("shifts", [1.5], "pixel counts"),
        ("rotations", [], "rotations: must be a non-empty list"),
        ("scales", [1], "scales: must be a non-empty list of factors in (0, 4], not 1"),
        ("noise_std", [2], "noise_std: must be a non-empty list of fractions in (0, 1]"),
        ("invert", "yes", "invert: must be true or false"),
        ("font_size", 8, "font_size: must be an integer in 16..512"),
        ("colour", 1, "unknown key robustness.colour"),
    ],
)
def test_bad_robustness_params_fail_in_one_line(tmp_path, key, value, message):
    write_params(tmp_path, robustness={key: value})
    with pytest.raises(StageError, match=re.escape(message)):
        load(tmp_path / "params.yaml", "robustness", RobustnessParams)


# Fonts


def test_chart_draws_each_task_in_its_colour(tmp_path):
    """robustness.png uses TASK_COLORS, as `dvc plots show` and the MLflow UI do; a model that
    is no task takes matplotlib's next colour."""
    from PIL import Image

    from pipeline import plots
    from pipeline.config import TASK_COLORS

    path = tmp_path / "chart.png"
    accuracy = {"task7": [90.0, 80.0, 70.0], "task2": [60.0, 50.0, 40.0], "other": [30.0] * 3}
    plots.robustness_chart(["clean", "noise", "inverted"], accuracy, path, "t")
    pixels = set(Image.open(path).convert("RGB").getdata())

    def rgb(color: str) -> tuple:
        return tuple(round(255 * c) for c in matplotlib.colors.to_rgb(color))

    assert rgb(TASK_COLORS["task7"]) in pixels and rgb(TASK_COLORS["task2"]) in pixels
    assert rgb("tab:green") in pixels  # "other": the third colour of tab10
    assert rgb("tab:blue") not in pixels and rgb("tab:orange") not in pixels


def test_text_fonts_are_told_from_symbol_and_fallback_fonts():
    assert perturb.text_font_name(MPL_FONTS / "DejaVuSans.ttf") == ("DejaVu Sans Book", "")
    assert perturb.text_font_name(MPL_FONTS / "cmr10.ttf")[0] == "cmr10"
    assert perturb.text_font_name(MPL_FONTS / "cmex10.ttf")[0] is None  # delimiters at A-J
    assert perturb.text_font_name(MPL_FONTS / "LastResortHE-Regular.ttf")[0] is None
    assert perturb.text_font_name(MPL_FONTS / "STIXSizOneSymReg.ttf")[0] is None


def test_text_font_name_of_a_broken_file(tmp_path):
    bad = tmp_path / "bad.ttf"
    bad.write_bytes(b"not a font")
    name, why = perturb.text_font_name(bad)
    assert name is None and why.startswith("unreadable")


def test_find_fonts_bundled_first_sorted_and_unique():
    fonts, skipped = perturb.find_fonts(system=True)
    names = [f.name for f in fonts]
    assert len(names) == len(set(names))
    sources = [f.source for f in fonts]
    assert sources == sorted(sources)  # "matplotlib" < "system": every bundled font first
    bundled = [f.path for f in fonts if f.source == "matplotlib"]
    assert bundled == sorted(bundled)
    for family in ("DejaVu Sans", "DejaVu Serif", "STIXGeneral", "cmr10", "cmss10", "cmtt10"):
        assert any(n.startswith(family) for n in names), family
    assert {"cmex10.ttf", "LastResortHE-Regular.ttf"} <= {s["file"] for s in skipped}
    only_bundled, _ = perturb.find_fonts(system=False)
    assert [f.name for f in only_bundled] == [f.name for f in fonts if f.source == "matplotlib"]
    assert perturb.find_fonts(system=True)[0] == fonts


def test_render_draws_white_on_black_filling_the_frame_like_notmnist():
    font = perturb.Font("DejaVu Sans Book", MPL_FONTS / "DejaVuSans.ttf", "matplotlib")
    a = perturb.render_letter(font, "A", 64)
    assert a.shape == (28, 28) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, perturb.render_letter(font, "A", 64))
    ink = a > 0
    assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
    assert a[0, 0] == 0 and a[0, -1] == 0  # an A's top corners are background
    assert a[-1, 0] > 64 and a[-1, -1] > 64  # its feet reach the bottom corners
    assert not np.array_equal(a, perturb.render_letter(font, "B", 64))


def test_fit_crops_the_glyph_and_stretches_it_to_the_frame():
    canvas = np.zeros((200, 300), np.uint8)
    canvas[50:70, 100:260] = 255  # a wide bar, far from the center
    out = glyph.fit_frame(canvas)
    assert out.shape == (28, 28) and out.min() == 255  # stretched on both axes, no margin
    with pytest.raises(ValueError, match="blank"):
        glyph.fit_frame(np.zeros((40, 40), np.uint8))


# The stage on a tiny project


@pytest.fixture(scope="module")
def project(trained_project):
    root, uri = trained_project
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert robustness.main(["--root", str(root)]) == 0
        assert theory.main(["--root", str(root)]) == 0  # the summary links its page
        assert report.main(["--root", str(root)]) == 0
    return root, uri


def result(root: Path) -> dict:
    return json.loads((root / "reports" / "robustness.json").read_text())


def test_every_declared_output_is_written(project):
    root, _ = project
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["robustness"]
    for entry in spec["outs"]:
        assert (root / (entry if isinstance(entry, str) else next(iter(entry)))).is_file()
    for task in TASKS:  # a new task needs its model and run ids among the stage's deps
        assert f"models/{task}.pt" in spec["deps"]
        assert f"reports/train/{task}" in spec["deps"]
    assert set(spec["params"]) == {"base", "robustness", "mlflow"}  # seed and numerics


def test_robustness_json_shape(project):
    root, _ = project
    data = result(root)
    names = [c["name"] for c in data["conditions"]]
    assert names[0] == "clean" and "fonts matplotlib" in names
    assert list(data["results"]) == sorted(TASKS)
    n_fonts = {s: sum(f["source"] == s for f in data["fonts"]) for s in ("matplotlib", "system")}
    for c in data["conditions"]:
        expected = 10 * n_fonts[c["name"].split()[1]] if c["name"].startswith("fonts ") else 30
        assert c["images"] == expected, c["name"]
        for task in TASKS:
            r = data["results"][task][c["name"]]
            assert r["images"] == c["images"]
            assert r["accuracy"] == r["correct"] / r["images"]
    assert n_fonts["matplotlib"] >= 20  # DejaVu, STIX, Computer Modern
    assert all(len(f["sha256"]) == 16 for f in data["fonts"])


def test_clean_accuracy_is_evaluate_s_test_accuracy(project):
    root, _ = project
    data = result(root)
    metrics = json.loads((root / "reports" / "metrics.json").read_text())
    for task in TASKS:
        clean = data["results"][task]["clean"]["accuracy"]
        assert clean == pytest.approx(metrics[task]["test_accuracy"], abs=1e-12), task


def test_perturbed_accuracy_recomputed_independently(project):
    """np.roll plus a zeroed band, and 255 - x, scored with the model file directly."""
    root, _ = project
    images, labels = perturb.load_test_split(Paths(root))
    rolled = np.roll(images, 2, axis=2)
    rolled[:, :, :2] = 0
    data = result(root)
    for task in TASKS:
        model, _ = load_model(root / "models" / f"{task}.pt")
        for name, x in (("shift right 2", rolled), ("inverted", 255 - images)):
            with torch.no_grad():
                hits = (model(normalize(x)).argmax(1).numpy() == labels).sum()
            assert data["results"][task][name]["correct"] == hits, (task, name)


def test_rerun_writes_the_same_bytes(project):
    root, _ = project
    names = [
        "reports/robustness.json",
        "reports/plots/robustness.png",
        "reports/plots/robustness_samples.png",
    ]
    before = {n: (root / n).read_bytes() for n in names}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert robustness.main(["--root", str(root)]) == 0
    for n in names:
        assert (root / n).read_bytes() == before[n], n


def test_logged_to_each_task_s_parent_run(project):
    root, uri = project
    client = mlflow.MlflowClient(tracking_uri=uri)
    data = result(root)
    for task in TASKS:
        run_id = tracking.recorded_run_id(Paths(root), task)
        run = client.get_run(run_id)
        assert "mlflow.parentRunId" not in run.data.tags and run.data.tags["task"] == task
        files = {f.path for f in client.list_artifacts(run_id, "robustness")}
        assert files == {"robustness/robustness.json", "robustness/robustness.png"}
        for name, r in data["results"][task].items():
            assert run.data.metrics[f"robustness/{name}"] == pytest.approx(r["accuracy"])


def test_parent_run_is_read_from_mlflow_json_first(project, tmp_path):
    root, uri = project
    paths = Paths(tmp_path)
    folder = paths.train_reports("task2")
    folder.mkdir(parents=True)
    real = tracking.recorded_run_id(Paths(root), "task2")
    (folder / "best.json").write_text(json.dumps({"mlflow": {"parent_run_id": "b" * 32}}))
    assert tracking.recorded_run_id(paths, "task2") == "b" * 32
    (folder / "mlflow.json").write_text(json.dumps({"parent_run_id": real}))
    assert tracking.recorded_run_id(paths, "task2") == real
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert tracking.parent_run(client, paths, "task2", "notmnist") == real
    paths.train_reports("task3").mkdir(parents=True)
    (paths.train_reports("task3") / "mlflow.json").write_text(json.dumps({"parent_run_id": real}))
    with pytest.raises(StageError, match="task3's MLflow parent run .* is not in experiment"):
        tracking.parent_run(client, paths, "task3", "notmnist")  # task2's run is not task3's
    (folder / "mlflow.json").write_text("{}")
    with pytest.raises(StageError, match="no MLflow parent run id recorded for task2"):
        tracking.recorded_run_id(paths, "task2")


def test_child_run_id_is_not_a_parent(project):
    root, uri = project
    record = json.loads((root / "reports" / "train" / "task2" / "mlflow.json").read_text())
    paths = Paths(root / "fake")
    (paths.train_reports("task2")).mkdir(parents=True)
    (paths.train_reports("task2") / "mlflow.json").write_text(
        json.dumps({"parent_run_id": record["run_id"]})  # the chosen child run
    )
    with pytest.raises(StageError):
        tracking.parent_run(mlflow.MlflowClient(tracking_uri=uri), paths, "task2", "notmnist")


def test_missing_run_fails_in_one_line_before_writing(project):
    root, _ = project
    before = (root / "reports" / "robustness.json").read_bytes()
    err = io.StringIO()
    with (
        unknown_parent_run(root, "task4"),
        pytest.MonkeyPatch.context() as mp,
        contextlib.redirect_stderr(err),
    ):
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        code = robustness.main(["--root", str(root)])
    assert code == 1
    last = err.getvalue().strip().splitlines()[-1]
    assert last.startswith("robustness: error: task4's MLflow parent run 000")
    assert "dvc repro --force train_task4" in last
    assert (root / "reports" / "robustness.json").read_bytes() == before


def test_summary_has_the_robustness_table(project):
    root, _ = project
    text = (root / "reports" / "summary.md").read_text()
    data = result(root)
    assert "## Robustness" in text
    header = next(line for line in text.splitlines() if line.startswith("| condition | images |"))
    assert header.split(" | ")[2:] == [*TASKS[:-1], TASKS[-1] + " |"]
    for c in data["conditions"]:
        row = next(line for line in text.splitlines() if line.startswith(f"| {c['name']} |"))
        cells = row.strip("| ").split(" | ")
        assert cells[1] == f"{c['images']:,}"
        expected = [f"{100 * data['results'][t][c['name']]['accuracy']:.2f}%" for t in TASKS]
        assert cells[2:] == expected
    for link in re.findall(r"\]\(([^)]+)\)", text):
        assert (root / "reports" / link).is_file(), link


def test_fonts_rendered_for_the_report_are_the_letters(project):
    """Every font's A-J, as the stage scores them: ten different glyphs per font."""
    fonts, _ = perturb.find_fonts(system=True)
    kept, images, labels = perturb.render_fonts(fonts, 64)
    assert len(images) == 10 * len(kept) and labels[:10].tolist() == list(range(10))
    for k in range(len(kept)):
        block = images[10 * k : 10 * k + 10].reshape(10, -1)
        assert len({row.tobytes() for row in block}) == 10, kept[k].name
    assert LETTERS[labels[13]] == "D"
