"""Project paths and params: every stage finds its files and settings here."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LETTERS = tuple("ABCDEFGHIJ")
SPLITS = ("train", "val", "test")


class StageError(Exception):
    """A problem a user can fix; the stage prints it as one line and exits 1."""


@dataclass(frozen=True)
class Paths:
    """Every file a stage reads or writes, derived from one project root."""

    root: Path = ROOT

    @property
    def params(self) -> Path:
        return self.root / "params.yaml"

    @property
    def raw_archive(self) -> Path:
        return self.root / "data" / "raw" / "notMNIST_small.tar.gz"

    @property
    def clean_dir(self) -> Path:
        return self.root / "data" / "clean"

    @property
    def split_dir(self) -> Path:
        return self.root / "data" / "split"

    @property
    def data_reports(self) -> Path:
        return self.root / "reports" / "data"

    @property
    def validation_dir(self) -> Path:
        return self.root / "reports" / "validation"


def _section(params_file: Path, name: str) -> dict:
    try:
        params = yaml.safe_load(params_file.read_text())
    except FileNotFoundError:
        raise StageError(f"{params_file}: not found") from None
    except yaml.YAMLError as e:
        raise StageError(f"{params_file}: not valid YAML ({e})") from None
    section = (params or {}).get(name)
    if not isinstance(section, dict):
        raise StageError(f"{params_file}: missing section '{name}'")
    return section


def load(params_file: Path, name: str, cls: type):
    """Read section `name` of params.yaml into the frozen dataclass `cls`, validated."""
    section = _section(params_file, name)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise StageError(f"{params_file}: unknown key {name}.{unknown[0]}")
    try:
        return cls(**section)
    except TypeError as e:  # a required key is missing
        raise StageError(f"{params_file}: section '{name}': {e}") from None
    except ValueError as e:
        raise StageError(f"{params_file}: {name}.{e}") from None


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class BaseParams:
    seed: int = 0

    def __post_init__(self):
        _check(isinstance(self.seed, int) and self.seed >= 0, "seed: must be an integer >= 0")


@dataclass(frozen=True)
class DataParams:
    sources: list
    content_digest: str | None
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    retries: int = 3

    def __post_init__(self):
        _check(
            isinstance(self.sources, list)
            and self.sources
            and all(isinstance(s, str) and s for s in self.sources),
            "sources: must be a non-empty list of paths or URLs",
        )
        _check(
            self.content_digest is None
            or bool(re.fullmatch(r"[0-9a-f]{64}", str(self.content_digest))),
            "content_digest: must be 64 lowercase hex digits or null",
        )
        _check(self.connect_timeout_s > 0, "connect_timeout_s: must be > 0")
        _check(self.read_timeout_s > 0, "read_timeout_s: must be > 0")
        _check(isinstance(self.retries, int) and self.retries >= 0, "retries: must be >= 0")


@dataclass(frozen=True)
class ValidateParams:
    class_balance_tolerance: float = 0.05
    max_rejected: int = 10
    max_label_conflicts: int = 2
    min_mean_pixel: float = 5.0
    max_mean_pixel: float = 250.0

    def __post_init__(self):
        _check(0 <= self.class_balance_tolerance < 1, "class_balance_tolerance: must be in [0, 1)")
        _check(self.max_rejected >= 0, "max_rejected: must be >= 0")
        _check(self.max_label_conflicts >= 0, "max_label_conflicts: must be >= 0")
        _check(
            0 <= self.min_mean_pixel <= self.max_mean_pixel <= 255,
            "min_mean_pixel/max_mean_pixel: need 0 <= min <= max <= 255",
        )


@dataclass(frozen=True)
class SplitParams:
    train_size: int = 15000
    val_size: int = 1000
    group_duplicates: bool = False

    def __post_init__(self):
        _check(isinstance(self.train_size, int) and self.train_size > 0, "train_size: must be > 0")
        _check(isinstance(self.val_size, int) and self.val_size > 0, "val_size: must be > 0")
        _check(isinstance(self.group_duplicates, bool), "group_duplicates: must be true or false")
