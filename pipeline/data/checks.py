"""The clean data's Great Expectations suites: what is checked and the Data Docs."""

from __future__ import annotations

import datetime
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.config import LETTERS, Paths, ValidateParams
from pipeline.data.decode import image_chunks, load_index, npy_layout
from pipeline.files import atomic_dir, write_json

log = logging.getLogger(__name__)

# A fixed run time and name: the same data must give the same Data Docs bytes.
RUN_TIME = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)

RUN_NAME = "validate"


@dataclass(frozen=True)
class ImageStats:
    """What the suites check of the pixels: the array's shape and type, each image's mean."""

    shape: tuple
    dtype: str
    mean_pixel: np.ndarray  # one float per image


def image_stats(images: np.ndarray) -> ImageStats:
    """Stats of an in-memory array of images."""
    means = images.reshape(len(images), -1).mean(axis=1) if len(images) else np.zeros(0)
    return ImageStats(images.shape, str(images.dtype), means)


def image_stats_file(path: Path) -> ImageStats:
    """Stats of a .npy file of images, read a chunk at a time (bounded memory)."""
    shape, dtype, _ = npy_layout(path)
    means = [c.reshape(len(c), -1).mean(axis=1) for c in image_chunks(path)]
    return ImageStats(shape, str(dtype), np.concatenate(means) if means else np.zeros(0))


def tables(stats: ImageStats, index: pd.DataFrame, rejected: pd.DataFrame) -> dict:
    """The three tables the suites check: one row per image, per letter, and for the data set."""
    three_d = len(stats.shape) == 3
    per_image = pd.DataFrame(
        {
            "path": index["path"],
            "letter": index["letter"],
            "class_id": index["class_id"],
            "sha256": index["sha256"],
            "height": stats.shape[1] if three_d else -1,
            "width": stats.shape[2] if three_d else -1,
            "dtype": stats.dtype,
            "mean_pixel": stats.mean_pixel if len(index) else [],
        }
    )
    counts = index["letter"].value_counts()
    per_letter = pd.DataFrame(
        {"letter": list(LETTERS), "count": [int(counts.get(c, 0)) for c in LETTERS]}
    )
    conflicts = label_conflicts(index)
    dataset = pd.DataFrame(
        {
            "images": [len(index)],
            "rejected_files": [len(rejected)],
            "label_conflicts": [len(conflicts)],
        }
    )
    return {"images": per_image, "letters": per_letter, "dataset": dataset}


def label_conflicts(index: pd.DataFrame) -> list[dict]:
    """Identical pixel arrays that carry more than one letter, with their paths."""
    letters = index.groupby("sha256")["letter"].nunique()
    clash = index[index["sha256"].isin(letters[letters > 1].index)]
    return [
        {"sha256": sha, "letters": sorted(set(g["letter"])), "paths": sorted(g["path"])}
        for sha, g in clash.groupby("sha256")
    ]


def limit(value: int | float, total: int, of: str) -> tuple[int | float, str]:
    """(the allowed count, how to say it): a count as given, a fraction of `total` files or
    images rounded down."""
    if isinstance(value, int):
        return value, str(value)
    allowed = math.floor(value * total)
    return allowed, f"{allowed} ({value:.2%} of {total:,} {of})"


def expectations(p: ValidateParams, mean_count: float, files: int = 0, images: int = 0) -> dict:
    """Expectations per table, each with a description that names the rule.

    `files` (kept and rejected) and `images` (kept) turn fractional limits into counts.
    """
    import great_expectations.expectations as gxe

    return {
        "images": image_expectations(gxe, p),
        "letters": letter_expectations(gxe, p, mean_count),
        "dataset": dataset_expectations(gxe, p, files, images),
    }


def image_expectations(gxe, p: ValidateParams) -> list:
    """One row per clean image: shape, type, letters, no nulls, unique paths, mean pixel."""
    return [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, description="at least one image"),
        gxe.ExpectColumnDistinctValuesToEqualSet(
            column="letter", value_set=list(LETTERS), description="letters are exactly A..J"
        ),
        gxe.ExpectColumnDistinctValuesToEqualSet(
            column="height", value_set=[28], description="image height is 28"
        ),
        gxe.ExpectColumnDistinctValuesToEqualSet(
            column="width", value_set=[28], description="image width is 28"
        ),
        gxe.ExpectColumnDistinctValuesToEqualSet(
            column="dtype", value_set=["uint8"], description="pixels are uint8"
        ),
        *[
            gxe.ExpectColumnValuesToNotBeNull(column=c, description=f"no null {c}")
            for c in ("path", "letter", "class_id", "sha256", "mean_pixel")
        ],
        gxe.ExpectColumnValuesToBeUnique(column="path", description="paths are unique"),
        gxe.ExpectColumnMinToBeBetween(
            column="mean_pixel",
            min_value=p.min_mean_pixel,
            description=f"every image's mean pixel >= {p.min_mean_pixel}",
        ),
        gxe.ExpectColumnMaxToBeBetween(
            column="mean_pixel",
            max_value=p.max_mean_pixel,
            description=f"every image's mean pixel <= {p.max_mean_pixel}",
        ),
    ]


def letter_expectations(gxe, p: ValidateParams, mean_count: float) -> list:
    """One row per letter: its count within the tolerance of the mean."""
    low = mean_count * (1 - p.class_balance_tolerance)
    high = mean_count * (1 + p.class_balance_tolerance)
    tol = f"{p.class_balance_tolerance:.0%}"
    return [
        gxe.ExpectColumnMinToBeBetween(
            column="count",
            min_value=low,
            description=f"every letter's count >= {low:.1f} (mean {mean_count:.1f} - {tol})",
        ),
        gxe.ExpectColumnMaxToBeBetween(
            column="count",
            max_value=high,
            description=f"every letter's count <= {high:.1f} (mean {mean_count:.1f} + {tol})",
        ),
    ]


def dataset_expectations(gxe, p: ValidateParams, files: int, images: int) -> list:
    """One row for the whole set: rejected files and conflicting labels within their limits."""
    max_rejected, rejected_text = limit(p.max_rejected, files, "files")
    max_conflicts, conflicts_text = limit(p.max_label_conflicts, images, "images")
    return [
        gxe.ExpectColumnMaxToBeBetween(
            column="rejected_files",
            max_value=max_rejected,
            description=f"rejected files <= {rejected_text}",
        ),
        gxe.ExpectColumnMaxToBeBetween(
            column="label_conflicts",
            max_value=max_conflicts,
            description=f"identical images with conflicting letters <= {conflicts_text}",
        ),
    ]


def observed(result: dict, kind: str, column: str | None, table: pd.DataFrame) -> object:
    """The value a person wants to see for one expectation's result."""
    if result.get("observed_value") is not None:
        return result["observed_value"]
    if kind == "expect_column_distinct_values_to_equal_set":
        return sorted(_jsonable(v) for v in table[column].dropna().unique())
    if "unexpected_count" in result:
        seen = {"unexpected_count": result["unexpected_count"]}
        if result.get("partial_unexpected_list"):
            seen["examples"] = result["partial_unexpected_list"][:5]
        return seen
    return result.get("details") or result


def _jsonable(value):
    return value.item() if isinstance(value, np.generic) else value


def run_suites(data: dict, p: ValidateParams, docs_dir: Path) -> list[dict]:
    """Validate each table with its suite and build Data Docs; one entry per expectation."""
    context = gx_context(docs_dir)  # first: it sets what Great Expectations reads on import
    from great_expectations.core.run_identifier import RunIdentifier

    source = context.data_sources.add_pandas("notmnist")
    run_id = RunIdentifier(run_name=RUN_NAME, run_time=RUN_TIME)
    entries = []
    mean_count = float(data["letters"]["count"].mean())
    dataset = data["dataset"].iloc[0]
    images, files = int(dataset["images"]), int(dataset["images"] + dataset["rejected_files"])
    for table, exps in expectations(p, mean_count, files, images).items():
        result = validate_table(context, source, table, exps, data[table], run_id)
        entries += [entry(table, r, data[table]) for r in result.results]
    context.build_data_docs()
    stabilize_docs(docs_dir)
    return entries


def gx_context(docs_dir: Path):
    """An in-memory Great Expectations context whose Data Docs go to docs_dir."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    # Data Docs show the run time in the local time zone: render it in UTC on every machine.
    os.environ["TZ"] = "UTC"
    time.tzset()
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    site = {
        "class_name": "SiteBuilder",
        "show_how_to_buttons": False,
        "store_backend": {
            "class_name": "TupleFilesystemStoreBackend",
            "base_directory": str(docs_dir),
        },
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
    }
    return gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False),
            data_docs_sites={"local": site},
        ),
    )


def validate_table(context, source, table: str, exps: list, frame: pd.DataFrame, run_id):
    """Run one table's suite on its data frame."""
    import great_expectations as gx

    batch = source.add_dataframe_asset(table).add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(gx.ExpectationSuite(name=table))
    for e in exps:
        suite.add_expectation(e)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=table, data=batch, suite=suite)
    )
    return definition.run(batch_parameters={"dataframe": frame}, run_id=run_id)


def entry(table: str, r, frame: pd.DataFrame) -> dict:
    """summary.json's record of one expectation's result."""
    cfg = r.expectation_config
    return {
        "table": table,
        "expectation": cfg.type,
        "description": cfg.description,
        "kwargs": {k: _jsonable(v) for k, v in cfg.kwargs.items() if k != "batch_id"},
        "success": bool(r.success),
        "observed": _jsonable(observed(r.result, cfg.type, cfg.kwargs.get("column"), frame)),
    }


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")

_STAMP = re.compile(r"\d{8}T\d{6}\.\d{6}Z")


def stabilize_docs(docs_dir: Path) -> None:
    """Data Docs embed build times and random element ids; make them fixed so bytes repeat."""
    fixed = RUN_TIME.strftime("%Y%m%dT%H%M%S.%fZ")
    for page in docs_dir.rglob("*.html"):
        text = page.read_text()
        for i, uuid in enumerate(dict.fromkeys(_UUID.findall(text))):
            text = text.replace(uuid, f"id{i}")
        page.write_text(_STAMP.sub(fixed, text))


def run_checks(paths: Paths, p: ValidateParams) -> dict:
    """Run the suites, write summary.json and Data Docs; return the summary."""
    index = load_index(paths.clean_dir)
    stats = image_stats_file(paths.clean_dir / "images.npy")
    rejected = pd.read_csv(paths.data_reports / "rejected.csv")
    data = tables(stats, index, rejected)
    out = paths.validation_dir
    with atomic_dir(out / "docs") as docs:
        entries = run_suites(data, p, docs)
    summary = {
        "success": all(e["success"] for e in entries),
        "expectations": entries,
        "images": len(index),
        "rejected_files": len(rejected),
        "label_conflicts": label_conflicts(index),
    }
    write_json(out / "summary.json", summary)
    return summary
