"""Project paths and params: every stage finds its files and settings here."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.numerics import cores

ROOT = Path(__file__).resolve().parents[1]
LETTERS = tuple("ABCDEFGHIJ")
SIZE = 28  # notMNIST images are SIZE x SIZE pixels
SPLITS = ("train", "val", "test")
# The trained tasks: the original's four, Task 6's corrected MLP and CNN, Task 7's CNN.
TASKS = ("task2", "task3", "task4", "task5", "task6_mlp", "task6_cnn", "task7")
# Each task's colour, as `dvc plots show` draws it: .dvc/plots/tasks.json colours by task with
# Vega's "tableau10" scheme, and Vega sorts a nominal domain, so sorted(TASKS)[i] takes colour
# i. The MLflow parent runs carry the same colour (tag mlflow.runColor).
TABLEAU10 = tuple(
    "#4c78a8 #f58518 #e45756 #72b7b2 #54a24b #eeca3b #b279a2 #ff9da6 #9d755d #bab0ac".split()
)
TASK_COLORS = dict(zip(sorted(TASKS), TABLEAU10[: len(TASKS)], strict=True))


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
        # One name whatever data.variant is: `clean` depends on this path, not on the variant.
        return self.root / "data" / "raw" / "notMNIST.tar.gz"

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

    @property
    def models(self) -> Path:
        return self.root / "models"

    def train_reports(self, task: str) -> Path:
        return self.root / "reports" / "train" / task

    def eval_reports(self, task: str) -> Path:
        return self.root / "reports" / "eval" / task

    @property
    def metrics(self) -> Path:
        return self.root / "reports" / "metrics.json"

    @property
    def seeds_dir(self) -> Path:
        """The seed study's results (`make seeds`), outside the DVC pipeline."""
        return self.root / "reports" / "seeds"

    @property
    def summary(self) -> Path:
        return self.root / "reports" / "summary.md"

    def timing(self, stage: str) -> Path:
        return self.root / "reports" / "timing" / f"{stage}.json"

    @property
    def robustness(self) -> Path:
        return self.root / "reports" / "robustness.json"

    @property
    def plots(self) -> Path:
        return self.root / "reports" / "plots"

    @property
    def mlflow_store(self) -> Path:
        return self.root / "mlflow.db"

    def checkpoints(self, task: str) -> Path:
        """A training stage's resumable state; outside DVC's outputs, removed on success."""
        return self.root / "checkpoints" / task


def _section(params_file: Path, name: str) -> dict:
    try:
        params = yaml.safe_load(params_file.read_text())
    except FileNotFoundError:
        raise StageError(f"{params_file}: not found") from None
    except yaml.YAMLError as e:
        raise StageError(f"{params_file}: not valid YAML ({yaml_problem(e)})") from None
    section = (params or {}).get(name)
    if not isinstance(section, dict):
        raise StageError(f"{params_file}: missing section '{name}'")
    return section


def yaml_problem(e: yaml.YAMLError) -> str:
    """Where and what, on one line ("line 3, column 7: ..."); PyYAML's own text spans several."""
    mark = getattr(e, "problem_mark", None)
    if mark is None or not getattr(e, "problem", None):
        return " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}"


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


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BaseParams:
    seed: int = 0
    numerics: str = "portable"  # portable: the same bits on any x86-64 CPU with AVX2; native
    threads: int = 2  # intra-op threads of every torch process (results depend on it)

    def __post_init__(self):
        _check(_int(self.seed) and self.seed >= 0, "seed: must be an integer >= 0")
        _check(self.numerics in ("portable", "native"), "numerics: must be portable or native")
        _check(_int(self.threads) and self.threads >= 1, "threads: must be an integer >= 1")


def _per_variant(value, variant: str, key: str):
    """A setting given once (any variant) or as a mapping variant -> setting."""
    if not isinstance(value, dict):
        return value
    _check(variant in value, f"{key}: no entry for variant '{variant}' (has {sorted(value)})")
    return value[variant]


@dataclass(frozen=True)
class DataParams:
    """Where the archive comes from. `sources` and `content_digest` may each be a mapping
    from variant name (small, large) to its setting; `variant` picks one, and after loading
    both hold the picked variant's setting."""

    sources: list | dict
    content_digest: str | dict | None
    variant: str = "small"
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    retries: int = 3

    def __post_init__(self):
        _check(isinstance(self.variant, str) and bool(self.variant), "variant: must be a name")
        if isinstance(self.sources, dict):
            _check(
                self.variant in self.sources,
                f"variant: '{self.variant}' is not one of {sorted(self.sources)} (data.sources)",
            )
        object.__setattr__(self, "sources", _per_variant(self.sources, self.variant, "sources"))
        object.__setattr__(
            self,
            "content_digest",
            _per_variant(self.content_digest, self.variant, "content_digest"),
        )
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
        _check(_int(self.retries) and self.retries >= 0, "retries: must be >= 0")


@dataclass(frozen=True)
class CleanParams:
    workers: int = 0  # decoding processes; 0: one per CPU core

    def __post_init__(self):
        _check(_int(self.workers) and self.workers >= 0, "workers: must be an integer >= 0")

    def processes(self) -> int:
        """How many processes decode: `workers`, or the CPU cores this process may use."""
        return self.workers or cores()


def _count_or_fraction(value) -> bool:
    """An integer count >= 0, or a fraction strictly between 0 and 1."""
    if _int(value):
        return value >= 0
    return isinstance(value, float) and 0 < value < 1


def resolve_size(value: int | float, total: int) -> int:
    """A count as given; a fraction of `total`, rounded to the nearest integer (half up)."""
    return value if _int(value) else math.floor(value * total + 0.5)


@dataclass(frozen=True)
class ValidateParams:
    class_balance_tolerance: float = 0.05
    max_rejected: int | float = 10  # a count, or a fraction of the archive's files
    max_label_conflicts: int | float = 2  # a count, or a fraction of the clean images
    min_mean_pixel: float = 2.0
    max_mean_pixel: float = 255.0

    def __post_init__(self):
        _check(0 <= self.class_balance_tolerance < 1, "class_balance_tolerance: must be in [0, 1)")
        for key in ("max_rejected", "max_label_conflicts"):
            _check(
                _count_or_fraction(getattr(self, key)),
                f"{key}: must be >= 0: a count, or a fraction in (0, 1)",
            )
        _check(
            0 <= self.min_mean_pixel <= self.max_mean_pixel <= 255,
            "min_mean_pixel/max_mean_pixel: need 0 <= min <= max <= 255",
        )


@dataclass(frozen=True)
class SplitParams:
    train_size: int | float = 15000  # a count, or a fraction of the clean images
    val_size: int | float = 1000  # likewise; test is the rest
    group_duplicates: bool = False
    seed: int = 0  # the split's own: a training seed (base.seed) never reshuffles the data

    def __post_init__(self):
        _check(_int(self.seed) and self.seed >= 0, "seed: must be an integer >= 0")
        for key in ("train_size", "val_size"):
            value = getattr(self, key)
            _check(
                _count_or_fraction(value) and value != 0,
                f"{key}: must be > 0: an image count, or a fraction in (0, 1)",
            )
        if isinstance(self.train_size, float) and isinstance(self.val_size, float):
            _check(self.train_size + self.val_size < 1, "train_size + val_size: must be < 1")
        _check(isinstance(self.group_duplicates, bool), "group_duplicates: must be true or false")

    def sizes(self, n: int) -> tuple[int, int]:
        """(train, val) image counts for a data set of n images."""
        return resolve_size(self.train_size, n), resolve_size(self.val_size, n)


@dataclass(frozen=True)
class TrainParams:
    batch_size: int = 32
    max_epochs: int = 20
    patience: int = 2  # epochs without a new best val loss before stopping
    input_channels: int = 3  # 3: the original's RGB copies (2,352 inputs); 1: 784 inputs
    softmax_output: bool = True  # the original's Softmax before CrossEntropyLoss
    hflip: bool = True  # the original's RandomHorizontalFlip on training batches
    device: str = "auto"  # auto: cuda, then mps, then cpu; or any torch device string
    workers: int | str = "auto"  # sweep candidates trained at once; auto: cores // base.threads
    processes: int = 1  # > 1: data-parallel training under torchrun (gloo on CPU, NCCL on CUDA)

    def __post_init__(self):
        _check(_int(self.batch_size) and self.batch_size >= 1, "batch_size: must be >= 1")
        _check(_int(self.max_epochs) and self.max_epochs >= 1, "max_epochs: must be >= 1")
        _check(_int(self.patience) and self.patience >= 1, "patience: must be >= 1")
        _check(self.input_channels in (1, 3), "input_channels: must be 1 or 3")
        _check(isinstance(self.softmax_output, bool), "softmax_output: must be true or false")
        _check(isinstance(self.hflip, bool), "hflip: must be true or false")
        _check(isinstance(self.device, str) and self.device, "device: must be a device string")
        _check(
            self.workers == "auto" or (_int(self.workers) and self.workers >= 1),
            "workers: must be auto or an integer >= 1",
        )
        _check(_int(self.processes) and self.processes >= 1, "processes: must be an integer >= 1")


def _positive_ints(values) -> bool:
    return (
        isinstance(values, list)
        and bool(values)
        and all(isinstance(v, int) and v > 0 for v in values)
    )


@dataclass(frozen=True)
class Task2Params:
    learning_rates: list
    hidden: list

    def __post_init__(self):
        message = "learning_rates: must be a non-empty list of numbers > 0"
        _check(isinstance(self.learning_rates, list) and bool(self.learning_rates), message)
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string; DVC's YAML 1.2 reads a float
            rates = [float(v) for v in self.learning_rates if not isinstance(v, bool)]
        except ValueError:
            raise ValueError(message) from None
        _check(len(rates) == len(self.learning_rates) and min(rates) > 0, message)
        object.__setattr__(self, "learning_rates", rates)
        _check(_positive_ints(self.hidden), "hidden: must be a non-empty list of sizes")


@dataclass(frozen=True)
class Task3Params:
    hidden_sizes: list

    def __post_init__(self):
        _check(_positive_ints(self.hidden_sizes), "hidden_sizes: must be a non-empty list of sizes")


@dataclass(frozen=True)
class HiddenParams:
    """Tasks 4 and 5: one architecture at Task 2's best learning rate."""

    hidden: list
    dropout: float

    def __post_init__(self):
        _check(_positive_ints(self.hidden), "hidden: must be a non-empty list of sizes")
        _check(0 <= self.dropout < 1, "dropout: must be in [0, 1)")


@dataclass(frozen=True)
class Task6Params:
    """Task 6: the best MLP of Tasks 2-5 without the original's quirks, and a CNN."""

    max_epochs: int = 30
    patience: int = 3
    cnn_hidden: list = dataclasses.field(default_factory=lambda: [120, 84])
    cnn_lr: float = 0.001
    cnn_optimizer: str = "adam"

    def __post_init__(self):
        _check(_int(self.max_epochs) and self.max_epochs >= 1, "max_epochs: must be >= 1")
        _check(_int(self.patience) and self.patience >= 1, "patience: must be >= 1")
        _check(_positive_ints(self.cnn_hidden), "cnn_hidden: must be a non-empty list of sizes")
        _check(
            isinstance(self.cnn_lr, int | float)
            and not isinstance(self.cnn_lr, bool)
            and self.cnn_lr > 0,
            "cnn_lr: must be a number > 0",
        )
        _check(self.cnn_optimizer in ("sgd", "adam"), "cnn_optimizer: must be sgd or adam")


@dataclass(frozen=True)
class Task7Params:
    """Task 7: a compact CNN with batch norm, augmented glyphs, AdamW with a one-cycle rate."""

    widths: list = dataclasses.field(default_factory=lambda: [24, 48, 96])  # conv blocks
    dropout: float = 0.1
    lr: float = 0.004  # the one-cycle schedule's peak
    weight_decay: float = 0.0005
    label_smoothing: float = 0.05
    batch_size: int = 128
    max_epochs: int = 12
    patience: int = 12  # the one-cycle schedule ends at max_epochs; keep the best epoch
    shift_px: float = 2.0
    rotate_deg: float = 10.0
    scale: float = 0.1
    plain_epochs: int = 1  # the last epochs train on the glyphs as they are
    noise_std: float = 0.6  # Gaussian noise, std up to this in the [-1, 1] scale
    noise_share: float = 0.5  # of the augmented images that get noise
    members: int = 1  # more than 1: an ensemble of that many ConvNets, trained side by side

    def __post_init__(self):
        _check(_positive_ints(self.widths), "widths: must be a non-empty list of sizes")
        _check(_number(self.dropout) and 0 <= self.dropout < 1, "dropout: must be in [0, 1)")
        for name in (
            "lr",
            "weight_decay",
            "label_smoothing",
            "shift_px",
            "rotate_deg",
            "scale",
            "noise_std",
            "noise_share",
        ):
            _check(
                _number(getattr(self, name)) and getattr(self, name) >= 0,
                f"{name}: must be a number >= 0",
            )
        _check(self.lr > 0, "lr: must be > 0")
        _check(self.noise_share <= 1, "noise_share: must be at most 1")
        _check(self.label_smoothing < 1 and self.scale < 1, "label_smoothing, scale: below 1")
        for name in ("batch_size", "max_epochs", "patience", "members"):
            _check(_int(getattr(self, name)) and getattr(self, name) >= 1, f"{name}: must be >= 1")
        _check(
            _int(self.plain_epochs) and 0 <= self.plain_epochs <= self.max_epochs,
            "plain_epochs: must be an integer from 0 to max_epochs",
        )


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class MlflowParams:
    experiment: str = "notmnist"

    def __post_init__(self):
        _check(isinstance(self.experiment, str) and self.experiment, "experiment: must be a name")


def _numbers(values, ok) -> bool:
    return (
        isinstance(values, list)
        and bool(values)
        and all(isinstance(v, int | float) and not isinstance(v, bool) and ok(v) for v in values)
    )


@dataclass(frozen=True)
class RobustnessParams:
    """Stage `robustness`: the perturbations of the test split and the rendered fonts."""

    shifts: list = dataclasses.field(default_factory=lambda: [1, 2, 3])  # px
    rotations: list = dataclasses.field(default_factory=lambda: [10, 20])  # degrees
    scales: list = dataclasses.field(default_factory=lambda: [0.8, 1.2])
    noise_std: list = dataclasses.field(default_factory=lambda: [0.1, 0.3])  # of 0-255
    invert: bool = True
    font_size: int = 64  # px, before the glyph is fitted to 28x28
    system_fonts: bool = False  # true: also the fonts fontconfig and the usual folders list

    def __post_init__(self):
        _check(
            isinstance(self.shifts, list)
            and bool(self.shifts)
            and all(_int(v) and 1 <= v <= 27 for v in self.shifts),
            "shifts: must be a non-empty list of pixel counts in 1..27",
        )
        _check(
            _numbers(self.rotations, lambda v: 0 < v <= 180),
            "rotations: must be a non-empty list of angles in (0, 180]",
        )
        _check(
            _numbers(self.scales, lambda v: 0 < v <= 4 and v != 1),
            "scales: must be a non-empty list of factors in (0, 4], not 1",
        )
        _check(
            _numbers(self.noise_std, lambda v: 0 < v <= 1),
            "noise_std: must be a non-empty list of fractions in (0, 1]",
        )
        _check(isinstance(self.invert, bool), "invert: must be true or false")
        _check(
            _int(self.font_size) and 16 <= self.font_size <= 512,
            "font_size: must be an integer in 16..512",
        )
        _check(isinstance(self.system_fonts, bool), "system_fonts: must be true or false")


def _fraction(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


@dataclass(frozen=True)
class GateParams:
    """The regression gate: a minimum test accuracy per task, and what counts as worse.

    With --baseline, a task fails when McNemar's exact test on the paired test predictions
    finds it worse at level `alpha`; `max_drop` applies only when the baseline revision has
    no per-image predictions.
    """

    min_test_accuracy: dict  # task -> fraction
    max_drop: float = 0.01  # from the --baseline revision's test accuracy, a fraction
    alpha: float = 0.05  # significance level of the paired test against --baseline

    def __post_init__(self):
        _check(
            isinstance(self.min_test_accuracy, dict),
            "min_test_accuracy: must be a mapping task -> accuracy",
        )
        for task, value in self.min_test_accuracy.items():
            _check(task in TASKS, f"min_test_accuracy: unknown task {task!r} (tasks: {TASKS})")
            _check(_fraction(value), f"min_test_accuracy.{task}: must be a number in [0, 1]")
        _check(_fraction(self.max_drop), "max_drop: must be a number in [0, 1]")
        _check(_fraction(self.alpha) and 0 < self.alpha < 1, "alpha: must be a number in (0, 1)")
