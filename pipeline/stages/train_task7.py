"""Stage `train_task7`: a compact CNN with batch norm, trained on shifted, turned, scaled glyphs.

Beyond the original: one gray channel, logits, no mirrored letters (a mirror is not the same
letter); random shifts, rotations and scaling of each training image instead, and Gaussian
noise on a share of them, except in the last task7.plain_epochs epochs; AdamW with a one-cycle
learning rate and label smoothing; the best epoch by validation loss is kept. With
task7.members above 1, an ensemble of that many ConvNets trains side by side.
"""

import sys

from pipeline import numerics

numerics.spin_briefly()  # before torch loads

from pipeline import cli  # noqa: E402
from pipeline.config import Task7Params, load  # noqa: E402
from pipeline.training import runner  # noqa: E402
from pipeline.training.augment import Affine  # noqa: E402

TITLE = "Task 7: CNN with batch norm and augmentation"


def candidate(p: Task7Params) -> runner.Candidate:
    recipe = (
        ("weight_decay", p.weight_decay),
        ("schedule", "onecycle"),
        ("augment", Affine(p.shift_px, p.rotate_deg, p.scale)),
        ("label_smoothing", p.label_smoothing),
        ("plain_epochs", p.plain_epochs),
        ("noise", p.noise_std),
        ("noise_share", p.noise_share),
    )
    label = f"ConvNet {'-'.join(map(str, p.widths))} adamw lr={p.lr}"
    if p.members > 1:
        label = f"{p.members} x {label}"
    return runner.Candidate(
        label,
        p.lr,
        tuple(p.widths),
        p.dropout,
        arch="convnet",
        optimizer="adamw",
        recipe=recipe,
        members=p.members,
    )


def run(paths) -> None:
    p = load(paths.params, "task7", Task7Params)
    settings = dict(
        runner.CORRECTED, max_epochs=p.max_epochs, patience=p.patience, batch_size=p.batch_size
    )
    runner.run("task7", TITLE, [candidate(p)], paths, **settings)


def main(argv=None) -> int:
    args = cli.parser(
        "train_task7",
        "Beyond the original: a compact CNN with batch norm (task7.widths; task7.members > 1: "
        "an ensemble), trained with random shifts, rotations and scaling of the glyphs and "
        "Gaussian noise on a share of them (task7.noise_std, task7.noise_share; not in the last "
        "task7.plain_epochs epochs), AdamW, a one-cycle learning rate and label smoothing; the "
        "best epoch by validation loss is kept.",
        reads="params.yaml (base.*, train.device, train.workers, task7.*, mlflow.*), data/clean/, "
        "data/split/, reports/data/download.json",
        writes="models/task7.pt, reports/train/task7/{history.csv,best.json,mlflow.json}, "
        "reports/plots/task7_curves.png, MLflow runs",
    ).parse_args(argv)
    code = runner.parallel("train_task7", args, argv)
    return cli.run("train_task7", args, run) if code is None else code


if __name__ == "__main__":
    sys.exit(main())
