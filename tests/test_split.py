"""Stage `split`: exact sizes, stratified by letter, seeded, duplicates kept together on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import LETTERS, SPLITS, Paths, SplitParams, StageError, load
from pipeline.data import splitting
from pipeline.stages import split
from tests.conftest import write_params


def make_index(counts: dict[str, int], sha: list[str] | None = None) -> pd.DataFrame:
    """An index.csv-like table: `counts[letter]` rows per letter, unique hashes unless given."""
    rows = [(f"n/{c}/img{i:03d}.png", c) for c in LETTERS for i in range(counts.get(c, 0))]
    index = pd.DataFrame(rows, columns=["path", "letter"])
    index["class_id"] = [LETTERS.index(c) for c in index["letter"]]
    index["sha256"] = sha if sha is not None else [f"{i:064x}" for i in range(len(index))]
    return index


def uniform(k: int) -> dict[str, int]:
    return dict.fromkeys(LETTERS, k)


UNEVEN = dict(zip(LETTERS, (7, 9, 11, 13, 8, 10, 12, 14, 6, 15), strict=True))
RISING = dict(zip(LETTERS, range(10, 20), strict=True))


def deviations(index: pd.DataFrame, out: np.ndarray, p: SplitParams) -> dict[str, float]:
    """Per split: the largest |count of a letter - its proportional share|."""
    n = len(index)
    sizes = {"train": p.train_size, "val": p.val_size, "test": n - p.train_size - p.val_size}
    counts = index["letter"].value_counts()
    per_letter = splitting.split_report(index, out)["per_letter"]
    return {
        s: max(abs(per_letter[s].get(c, 0) - k * sizes[s] / n) for c, k in counts.items())
        for s in SPLITS
    }


# quotas


@pytest.mark.parametrize(
    "counts, size",
    [(UNEVEN, 60), (RISING, 100), (uniform(10), 19), (uniform(3), 10), ({"A": 1, "B": 2}, 2)],
)
def test_quotas_exact_totals_each_cell_within_one_of_its_share(counts, size):
    total = sum(counts.values())
    val = (total - size) // 3
    sizes = {"train": size, "val": val, "test": total - size - val}
    q = splitting.quotas(counts, sizes)
    assert set(q) == set(sizes)
    for s, n in sizes.items():
        assert set(q[s]) == set(counts)
        assert sum(q[s].values()) == n, s
        for c, k in counts.items():
            assert abs(q[s][c] - k * n / total) < 1, (s, c)
    for c, k in counts.items():
        assert sum(q[s][c] for s in sizes) == k, c
    assert splitting.quotas(dict(reversed(counts.items())), sizes) == q


def test_quotas_hold_on_many_random_tables():
    rng = np.random.default_rng(0)
    for _ in range(300):
        counts = dict(zip(LETTERS, rng.integers(1, 60, 10).tolist(), strict=True))
        total = sum(counts.values())
        train = int(rng.integers(1, total - 1))
        val = int(rng.integers(0, total - train))
        sizes = {"train": train, "val": val, "test": total - train - val}
        q = splitting.quotas(counts, sizes)
        for s, n in sizes.items():
            assert sum(q[s].values()) == n
            assert all(abs(q[s][c] - k * n / total) < 1 for c, k in counts.items())
        assert all(sum(q[s][c] for s in sizes) == k for c, k in counts.items())


# assign


@pytest.mark.parametrize(
    "counts, train, val",
    [(UNEVEN, 60, 15), (RISING, 100, 20), (uniform(20), 150, 20), (uniform(5), 20, 10)],
)
def test_assign_exact_sizes_stratified_every_row_once(counts, train, val):
    index = make_index(counts)
    p = SplitParams(train_size=train, val_size=val)
    out = splitting.assign(index, p, seed=0)

    assert out.shape == (len(index),)
    assert set(out) <= set(SPLITS)
    assert {s: int((out == s).sum()) for s in SPLITS} == {
        "train": train,
        "val": val,
        "test": len(index) - train - val,
    }
    for s, worst in deviations(index, out, p).items():
        assert worst < 1, (s, worst)


def test_assign_test_split_within_one_of_proportional_on_ties():
    # 10 letters x 10 images, train 19, val 19: A..I get 2 + 2, J gets 1 + 1, so J's test
    # count is 8 against a proportional 6.2.
    index = make_index(uniform(10))
    p = SplitParams(train_size=19, val_size=19)
    out = splitting.assign(index, p, seed=0)
    assert deviations(index, out, p)["test"] < 1


def test_assign_deterministic_per_seed():
    index = make_index(RISING)
    p = SplitParams(train_size=100, val_size=20)
    a = splitting.assign(index, p, seed=0)
    np.testing.assert_array_equal(splitting.assign(index, p, seed=0), a)
    b = splitting.assign(index, p, seed=1)
    assert (a != b).any()
    assert splitting.split_report(index, a)["counts"] == splitting.split_report(index, b)["counts"]


def duplicate_index() -> tuple[pd.DataFrame, dict[str, list[int]]]:
    """10 letters x 10 images. Every letter's images come in identical pairs, except that
    A and B each hold one unique image and one half of a pair that spans both letters.

    With train 50 / val 20 every letter gets 5 train images: an odd number, so without
    grouping at least one of C's pairs has one copy in train and the other outside.
    """
    index = make_index(uniform(10))
    sha = []  # stand-ins for pixel hashes: only equality matters
    for c in LETTERS:
        for i in range(10):
            if c in "AB" and i == 8:
                sha.append("pair spanning A and B")
            elif c in "AB" and i == 9:
                sha.append(f"unique {c}")
            else:
                sha.append(f"pair {c}{i // 2}")
    index["sha256"] = sha
    groups = index.groupby("sha256").indices
    return index, {k: list(v) for k, v in groups.items()}


def test_duplicate_index_is_built_as_described():
    index, groups = duplicate_index()
    sizes = sorted(len(v) for v in groups.values())
    assert sizes == [1, 1] + [2] * 49
    assert sorted(index["letter"][groups["pair spanning A and B"]]) == ["A", "B"]


def test_group_duplicates_keeps_copies_in_one_split():
    index, groups = duplicate_index()
    p = SplitParams(train_size=50, val_size=20, group_duplicates=True)
    for seed in (0, 1, 2):
        out = splitting.assign(index, p, seed)
        assert set(out) <= set(SPLITS) and len(out) == len(index)
        for sha, rows in groups.items():
            assert len(set(out[rows])) == 1, (seed, sha, out[rows])
        r = splitting.split_report(index, out)
        assert r["duplicates_in_train"] == {"val": 0, "test": 0}
        assert sum(r["counts"].values()) == len(index)


def test_without_grouping_copies_leak_into_val_or_test():
    index, _ = duplicate_index()
    p = SplitParams(train_size=50, val_size=20, group_duplicates=False)
    for seed in (0, 1, 2):
        out = splitting.assign(index, p, seed)
        r = splitting.split_report(index, out)
        assert r["counts"] == {"train": 50, "val": 20, "test": 30}
        assert r["duplicates_in_train"]["val"] + r["duplicates_in_train"]["test"] > 0


def test_group_duplicates_with_a_non_default_row_index():
    index, _ = duplicate_index()
    subset = index[index["letter"] != "A"]  # labels 10..99, as after any filter
    out = splitting.assign(
        subset, SplitParams(train_size=40, val_size=20, group_duplicates=True), 0
    )
    assert set(out) <= set(SPLITS)


def test_report_counts_and_leakage():
    index = make_index(uniform(2))
    index.loc[index["letter"] == "B", "sha256"] = index["sha256"][0]  # B copies A's first image
    out = np.array(["train", "val"] + ["test", "val"] + ["train", "test"] * 8)
    r = splitting.split_report(index, out)
    assert r["counts"] == {"train": 9, "val": 2, "test": 9}
    assert r["per_letter"]["train"]["A"] == 1 and r["per_letter"]["val"]["B"] == 1
    assert r["duplicates_in_train"] == {"val": 1, "test": 1}


def test_vectorized_rows_match_the_unit_by_unit_assignment():
    """Without grouping, each row is a unit: the vectorized path gives what the unit loop
    (the algorithm that produced the committed split) gives, row for row."""
    rng = np.random.default_rng(0)
    for trial in range(60):
        counts = dict(zip(LETTERS, rng.integers(3, 40, 10).tolist(), strict=True))
        index = make_index(counts)
        n = len(index)
        train = int(rng.integers(1, n - 20))
        val = int(rng.integers(1, n - train - 1))
        sizes = {"train": train, "val": val, "test": n - train - val}
        want = splitting.quotas(counts, sizes)
        letters = index["letter"].to_numpy()
        rows = splitting.assign_rows(letters, want, trial)
        loop = splitting.assign_groups(letters, np.arange(n), want, trial)
        np.testing.assert_array_equal(rows, loop)
        assert rows.dtype == loop.dtype


# fractions


@pytest.mark.parametrize(
    "train, val, n, want",
    [
        (0.8, 0.1, 1000, (800, 100)),
        (0.8, 0.1, 529_000, (423_200, 52_900)),
        (0.7, 300, 1000, (700, 300)),  # a fraction and a count mix
        (15000, 1000, 18724, (15000, 1000)),  # counts as given
        (0.5, 0.25, 5, (3, 1)),  # nearest, halves up: 2.5 -> 3, 1.25 -> 1
    ],
)
def test_split_sizes_fractions_and_counts(train, val, n, want):
    assert SplitParams(train_size=train, val_size=val).sizes(n) == want


def test_assign_with_fractions():
    index = make_index(uniform(20))  # 200 images
    out = splitting.assign(index, SplitParams(train_size=0.75, val_size=0.1), seed=0)
    assert splitting.split_report(index, out)["counts"] == {"train": 150, "val": 20, "test": 30}
    same = splitting.assign(index, SplitParams(train_size=150, val_size=20), seed=0)
    np.testing.assert_array_equal(out, same)  # a fraction is only another way to give a count


def test_fractions_that_round_to_nothing_raise():
    index = make_index(uniform(2))  # 20 images
    with pytest.raises(StageError, match=r"val_size 0.01 \(train 16, val 0\) leaves an empty"):
        splitting.assign(index, SplitParams(train_size=0.8, val_size=0.01), 0)
    with pytest.raises(StageError, match="leaves no test images out of 20"):
        splitting.assign(index, SplitParams(train_size=0.9, val_size=2), 0)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"train_size": 1.0}, "train_size: must be > 0"),
        ({"train_size": 1.5}, "train_size: must be > 0"),
        ({"val_size": 0.0}, "val_size: must be > 0"),
        ({"val_size": -0.1}, "val_size: must be > 0"),
        ({"train_size": 0.8, "val_size": 0.2}, "train_size \\+ val_size: must be < 1"),
        ({"train_size": "0.8"}, "train_size: must be > 0"),
    ],
)
def test_split_params_reject_bad_fractions(tmp_path, values, message):
    params = write_params(tmp_path, split=values)
    with pytest.raises(StageError, match=f"split.{message}"):
        load(params, "split", SplitParams)


def test_split_params_load_fractions_from_yaml(tmp_path):
    params = write_params(tmp_path, split={"train_size": 0.8, "val_size": 0.1})
    p = load(params, "split", SplitParams)
    assert (p.train_size, p.val_size) == (0.8, 0.1)


def test_too_few_for_test_raises():
    index = make_index(uniform(5))
    with pytest.raises(StageError, match="leaves no test images out of 50"):
        splitting.assign(index, SplitParams(train_size=40, val_size=10), 0)
    with pytest.raises(StageError, match="leaves no test images"):
        splitting.assign(index, SplitParams(train_size=45, val_size=10), 0)


def test_letter_too_small_to_stratify_raises_naming_it():
    index = make_index({**uniform(20), "G": 2})
    with pytest.raises(StageError, match=r"letter G has only 2 images"):
        splitting.assign(index, SplitParams(train_size=100, val_size=20), 0)


# SplitParams and config.load


@pytest.mark.parametrize(
    "key, value", [("train_size", 0), ("train_size", -5), ("val_size", 0), ("val_size", -1)]
)
def test_split_params_reject_non_positive_sizes(tmp_path, key, value):
    with pytest.raises(ValueError, match=f"{key}: must be > 0"):
        SplitParams(**{key: value})
    params = write_params(tmp_path, split={key: value})
    with pytest.raises(StageError, match=f"split.{key}: must be > 0"):
        load(params, "split", SplitParams)


@pytest.mark.parametrize("value", [-1, 1.5, True, "0"])
def test_split_seed_must_be_a_non_negative_integer(tmp_path, value):
    params = write_params(tmp_path, split={"seed": value})
    with pytest.raises(StageError, match=r"split.seed: must be an integer >= 0"):
        load(params, "split", SplitParams)


def test_training_seed_does_not_move_the_split(tmp_path):
    """base.seed is the training seed: a seed study retrains on one split from the cache."""
    index = make_index(RISING)
    outputs = []
    for name, base_seed, split_seed in (("a", 0, 0), ("b", 7, 0), ("c", 0, 5)):
        (tmp_path / name).mkdir()
        root = project(tmp_path / name, index, seed=split_seed, train_size=100, val_size=20)
        write_params(
            root,
            base={"seed": base_seed},
            split={"seed": split_seed, "train_size": 100, "val_size": 20},
        )
        assert split.main(["--root", str(root)]) == 0
        outputs.append((Paths(root).split_dir / "split.csv").read_bytes())
    assert outputs[1] == outputs[0]  # another base.seed: the same split
    assert outputs[2] != outputs[0]  # another split.seed: another split


def test_split_params_reject_booleans_as_sizes():
    with pytest.raises(ValueError, match="train_size"):
        SplitParams(train_size=True)


# main


def project(tmp_path: Path, index: pd.DataFrame, seed: int = 0, **split_params) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    write_params(root, split={**split_params, "seed": seed})
    clean_dir = Paths(root).clean_dir
    clean_dir.mkdir(parents=True)
    index.to_csv(clean_dir / "index.csv", index=False)
    return root


def test_main_writes_split_and_report(tmp_path):
    index = make_index(RISING)
    root = project(tmp_path, index, seed=3, train_size=100, val_size=20, group_duplicates=False)
    assert split.main(["--root", str(root)]) == 0
    p = Paths(root)
    table = pd.read_csv(p.split_dir / "split.csv")
    assert list(table.columns) == ["path", "letter", "split"]
    assert list(table["path"]) == list(index["path"])
    assert list(table["letter"]) == list(index["letter"])
    want = splitting.assign(index, SplitParams(train_size=100, val_size=20), 3)
    assert list(table["split"]) == list(want)
    summary = json.loads((p.data_reports / "split.json").read_text())
    assert summary == splitting.split_report(index, want)
    assert summary["counts"] == {"train": 100, "val": 20, "test": 25}

    first = [(p.split_dir / "split.csv").read_bytes(), (p.data_reports / "split.json").read_bytes()]
    assert split.main(["--root", str(root)]) == 0
    again = [(p.split_dir / "split.csv").read_bytes(), (p.data_reports / "split.json").read_bytes()]
    assert again == first


@pytest.mark.parametrize(
    "counts, params, message",
    [
        (uniform(5), {"train_size": 40, "val_size": 10}, "leaves no test images out of 50"),
        (
            {**uniform(20), "G": 2},
            {"train_size": 100, "val_size": 20},
            "letter G has only 2 images",
        ),
        (uniform(5), {"train_size": 0, "val_size": 10}, "split.train_size: must be > 0"),
        (uniform(5), {"train_size": 10, "val_size": -2}, "split.val_size: must be > 0"),
    ],
)
def test_main_user_errors_exit_1_with_one_line(tmp_path, capsys, counts, params, message):
    root = project(tmp_path, make_index(counts), **params)
    assert split.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("split: error: ") and message in err, err
    assert not Paths(root).split_dir.exists()
    assert not (Paths(root).data_reports / "split.json").exists()


def test_main_rejects_letters_outside_a_to_j(tmp_path, capsys):
    index = make_index(uniform(5))
    index.loc[0, "letter"] = "K"
    root = project(tmp_path, index, train_size=20, val_size=10)
    assert split.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == "split: error: index.csv has letters outside A..J: ['K']"
