"""Stage `validate`: the suites pass on good data, name the rule that failed on bad data."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import LETTERS, Paths, ValidateParams
from pipeline.data import checks, decode
from pipeline.stages import validate
from tests.conftest import glyph, write_params

PARAMS = {
    "class_balance_tolerance": 0.05,
    "max_rejected": 10,
    "max_label_conflicts": 2,
    "min_mean_pixel": 2.0,
    "max_mean_pixel": 255.0,
}
ALL_LETTERS = "['A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'J']"


def good_set(per_letter: int = 20) -> dict[str, np.ndarray]:
    """path -> pixels: `per_letter` distinct glyphs in each of A..J."""
    return {
        f"notMNIST_small/{letter}/img{i:03d}.png": glyph(1000 * c + i)
        for c, letter in enumerate(LETTERS)
        for i in range(per_letter)
    }


def index_of(files: dict[str, np.ndarray]) -> tuple[np.ndarray, pd.DataFrame]:
    paths = sorted(files)
    letters = [p.split("/")[-2] for p in paths]
    index = pd.DataFrame(
        {
            "path": paths,
            "letter": letters,
            "class_id": [LETTERS.index(c) for c in letters],
            "sha256": [hashlib.sha256(files[p].tobytes()).hexdigest() for p in paths],
        }
    )
    return np.stack([files[p] for p in paths]), index


def no_rejects() -> pd.DataFrame:
    return pd.DataFrame(columns=["path", "reason", "detail"])


def project(
    tmp_path: Path, files: dict[str, np.ndarray], rejected: pd.DataFrame | None = None, **params
) -> Path:
    """A project root with params.yaml, data/clean and reports/data/rejected.csv (clean.save)."""
    root = tmp_path / "proj"
    root.mkdir()
    write_params(root, validate={**PARAMS, **params})
    images, index = index_of(files)
    decode.save_clean(images, index, no_rejects() if rejected is None else rejected, Paths(root))
    return root


def summary_of(root: Path) -> dict:
    return json.loads((Paths(root).validation_dir / "summary.json").read_text())


def failed(summary: dict) -> set[str]:
    return {e["description"] for e in summary["expectations"] if not e["success"]}


def report_bytes(root: Path) -> dict[str, bytes]:
    out = Paths(root).validation_dir
    return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


# Pure functions: no Great Expectations run.


def test_tables_one_row_per_image_letter_and_data_set():
    files = good_set(3)
    files = {p: px for p, px in files.items() if "/J/" not in p}
    images, index = index_of(files)
    rejected = pd.DataFrame([["x/A/bad.png", "empty file", ""]], columns=no_rejects().columns)
    data = checks.tables(checks.image_stats(images), index, rejected)

    per_image = data["images"]
    assert len(per_image) == 27
    assert list(per_image["path"]) == list(index["path"])
    assert set(per_image["height"]) == {28} and set(per_image["width"]) == {28}
    assert set(per_image["dtype"]) == {"uint8"}
    np.testing.assert_allclose(per_image["mean_pixel"], images.reshape(27, -1).mean(axis=1))

    letters = data["letters"]
    assert list(letters["letter"]) == list(LETTERS)
    assert list(letters["count"]) == [3] * 9 + [0]

    assert data["dataset"].to_dict("records") == [
        {"images": 27, "rejected_files": 1, "label_conflicts": 0}
    ]


def test_label_conflicts_lists_pixels_under_more_than_one_letter():
    files = good_set(3)
    shared, triple = glyph(50_000), glyph(50_001)
    files["n/A/shared.png"] = shared
    files["n/B/shared-too.png"] = shared
    files["n/A/t1.png"] = triple
    files["n/C/t2.png"] = triple
    files["n/D/t3.png"] = triple
    files["n/E/same1.png"] = glyph(50_002)  # a copy within one letter is no conflict
    files["n/E/same2.png"] = glyph(50_002)
    _, index = index_of(files)

    conflicts = checks.label_conflicts(index)

    sha = {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in (("s", shared), ("t", triple))}
    assert sorted(conflicts, key=lambda c: c["sha256"]) == sorted(
        [
            {
                "sha256": sha["s"],
                "letters": ["A", "B"],
                "paths": ["n/A/shared.png", "n/B/shared-too.png"],
            },
            {
                "sha256": sha["t"],
                "letters": ["A", "C", "D"],
                "paths": ["n/A/t1.png", "n/C/t2.png", "n/D/t3.png"],
            },
        ],
        key=lambda c: c["sha256"],
    )
    images, index = index_of(files)
    data = checks.tables(checks.image_stats(images), index, no_rejects())
    assert data["dataset"]["label_conflicts"][0] == 2


# Full runs: each starts Great Expectations once (the first pays the import).


def test_good_set_passes_and_reports_are_byte_identical(tmp_path, capsys):
    root = project(tmp_path, good_set())
    assert validate.main(["--root", str(root)]) == 0
    assert "expectations passed" in capsys.readouterr().err

    summary = summary_of(root)
    assert summary["success"] is True
    assert summary["images"] == 200 and summary["rejected_files"] == 0
    assert summary["label_conflicts"] == []
    wanted = checks.expectations(ValidateParams(**PARAMS), 20.0)
    assert len(summary["expectations"]) == sum(len(v) for v in wanted.values())
    assert {e["description"] for e in summary["expectations"]} == {
        e.description for v in wanted.values() for e in v
    }
    for e in summary["expectations"]:
        assert set(e) == {"table", "expectation", "description", "kwargs", "success", "observed"}
        assert e["success"] is True and e["observed"] is not None, e
    by_desc = {e["description"]: e for e in summary["expectations"]}
    assert by_desc["letters are exactly A..J"]["observed"] == list(LETTERS)
    assert by_desc["at least one image"]["observed"] == 200
    assert by_desc["image height is 28"]["observed"] == [28]

    docs = Paths(root).validation_dir / "docs"
    assert (docs / "index.html").is_file()
    first = report_bytes(root)
    assert sorted(p.name for p in Paths(root).validation_dir.iterdir()) == ["docs", "summary.json"]

    assert validate.main(["--root", str(root)]) == 0
    second = report_bytes(root)
    assert sorted(second) == sorted(first)
    changed = [name for name in first if first[name] != second[name]]
    assert changed == []


def test_missing_letter_fails_and_shows_observed_letters(tmp_path, capsys):
    files = {p: px for p, px in good_set().items() if "/J/" not in p}
    root = project(tmp_path, files)
    assert validate.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "validate: error: " in err
    observed = "['A', 'B', 'C', 'D', 'E', 'F', 'G', 'H', 'I']"
    assert f"letters are exactly A..J (observed {observed})" in err
    summary = summary_of(root)
    assert summary["success"] is False
    assert "letters are exactly A..J" in failed(summary)


def test_imbalanced_set_fails_class_count(tmp_path, capsys):
    files = good_set()
    files.update({f"notMNIST_small/C/extra{i:03d}.png": glyph(90_000 + i) for i in range(40)})
    root = project(tmp_path, files)
    assert validate.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    # mean 24: C (60) is far above, every other letter (20) below the 5% band.
    assert "every letter's count <= 25.2 (mean 24.0 + 5%) (observed 60)" in err
    assert "every letter's count >= 22.8 (mean 24.0 - 5%) (observed 20)" in err
    assert failed(summary_of(root)) == {
        "every letter's count <= 25.2 (mean 24.0 + 5%)",
        "every letter's count >= 22.8 (mean 24.0 - 5%)",
    }
    assert "letters are exactly A..J (observed" not in err


def test_label_conflicts_over_the_limit_fail(tmp_path, capsys):
    files = good_set()
    a_path = "notMNIST_small/A/img000.png"
    files["notMNIST_small/B/img000.png"] = files[a_path]  # same pixels, two letters
    root = project(tmp_path, files, max_label_conflicts=0)
    assert validate.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "identical images with conflicting letters <= 0 (observed 1)" in err

    summary = summary_of(root)
    assert failed(summary) == {"identical images with conflicting letters <= 0"}
    assert summary["label_conflicts"] == [
        {
            "sha256": hashlib.sha256(files[a_path].tobytes()).hexdigest(),
            "letters": ["A", "B"],
            "paths": [a_path, "notMNIST_small/B/img000.png"],
        }
    ]


def test_too_many_rejected_and_all_black_image_fail(tmp_path, capsys):
    files = good_set()
    files["notMNIST_small/D/img005.png"] = np.zeros((28, 28), np.uint8)
    rejected = pd.DataFrame(
        [["notMNIST_small/A/broken.png", "truncated", "image file is truncated"]],
        columns=["path", "reason", "detail"],
    )
    root = project(tmp_path, files, rejected, max_rejected=0)
    assert validate.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert "rejected files <= 0 (observed 1)" in err
    assert "every image's mean pixel >= 2.0 (observed 0.0)" in err

    summary = summary_of(root)
    assert failed(summary) == {"rejected files <= 0", "every image's mean pixel >= 2.0"}
    assert summary["rejected_files"] == 1


@pytest.mark.parametrize(
    "key, value",
    [("max_rejected", -1), ("class_balance_tolerance", 1.0), ("min_mean_pixel", 300)],
)
def test_bad_params_exit_1_naming_the_key(tmp_path, capsys, key, value):
    root = project(tmp_path, good_set(2), **{key: value})
    assert validate.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("validate: error: "), err
    assert key in err
    assert not Paths(root).validation_dir.exists()


def test_data_docs_are_the_same_in_another_time_zone_and_folder(tmp_path):
    """Two machines: another clock setting, another checkout folder, the same Data Docs."""
    import shutil
    import subprocess
    import sys

    from pipeline.config import ROOT

    here = project(tmp_path, good_set())
    assert validate.main(["--root", str(here)]) == 0
    there = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(here, there)
    shutil.rmtree(there / "reports" / "validation")
    env = {**os.environ, "TZ": "America/New_York", "LC_ALL": "C.UTF-8"}
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.stages.validate", "--root", str(there)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert report_bytes(there) == report_bytes(here)


# Limits as fractions, stats in chunks


def test_fractional_limits_become_counts_of_files_and_images():
    p = ValidateParams(**{**PARAMS, "max_rejected": 0.001, "max_label_conflicts": 0.0005})
    exps = checks.expectations(p, 52_900.0, files=529_000, images=528_990)
    by_desc = {e.description: e for v in exps.values() for e in v}
    rejected = by_desc["rejected files <= 529 (0.10% of 529,000 files)"]
    assert rejected.max_value == 529
    conflicts = by_desc[
        "identical images with conflicting letters <= 264 (0.05% of 528,990 images)"
    ]
    assert conflicts.max_value == 264
    # Counts stay counts, with the same descriptions as before fractions existed.
    exps = checks.expectations(ValidateParams(**PARAMS), 52_900.0, files=529_000, images=1)
    descriptions = {e.description for v in exps.values() for e in v}
    assert "rejected files <= 10" in descriptions
    assert "identical images with conflicting letters <= 2" in descriptions


@pytest.mark.parametrize("key", ["max_rejected", "max_label_conflicts"])
@pytest.mark.parametrize("value", [-1, 1.0, 2.5, True, "0.1"])
def test_limits_must_be_counts_or_fractions(key, value):
    with pytest.raises(ValueError, match=f"{key}: must be >= 0: a count, or a fraction"):
        ValidateParams(**{**PARAMS, key: value})


def test_too_many_rejected_as_a_fraction_fails(tmp_path, capsys):
    rejected = pd.DataFrame(
        [[f"notMNIST_small/A/broken{i}.png", "truncated", ""] for i in range(3)],
        columns=["path", "reason", "detail"],
    )
    root = project(tmp_path, good_set(), rejected, max_rejected=0.01)  # 2 of 203 files
    assert validate.main(["--root", str(root)]) == 1
    assert "rejected files <= 2 (1.00% of 203 files) (observed 3)" in capsys.readouterr().err


def test_image_stats_from_a_file_in_chunks_equal_the_array_stats(tmp_path, monkeypatch):
    images, _ = index_of(good_set(7))
    np.save(tmp_path / "images.npy", images, allow_pickle=False)
    monkeypatch.setattr(decode, "CHUNK_ROWS", 8)  # 70 images: 9 chunks, the last partial
    got = checks.image_stats_file(tmp_path / "images.npy")
    want = checks.image_stats(images)
    assert (got.shape, got.dtype) == (want.shape, want.dtype) == ((70, 28, 28), "uint8")
    np.testing.assert_array_equal(got.mean_pixel, want.mean_pixel)


def test_index_and_images_of_different_lengths_stop_the_stage(tmp_path, capsys):
    root = project(tmp_path, good_set(2))
    images, _ = index_of(good_set(2))
    np.save(Paths(root).clean_dir / "images.npy", images[:-1], allow_pickle=False)
    assert validate.main(["--root", str(root)]) == 1
    assert "19 images but 20 index rows" in capsys.readouterr().err
