"""Figures written to reports/plots/."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from pipeline.config import TASK_COLORS  # noqa: E402
from pipeline.files import atomic_file  # noqa: E402


def curves(history: list[dict], path: Path, title: str, best_epoch: int) -> None:
    """Loss and accuracy per epoch, train and val side by side, as the original plotted them."""
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy (%)")):
        scale = 100 if key == "accuracy" else 1
        for split, style in (("train", "o-"), ("val", "s-")):
            values = [scale * r[f"{split}_{key}"] for r in history]
            ax.plot(epochs, values, style, label=split, markersize=4)
        ax.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def _save(fig, path: Path) -> None:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)


def confusion(matrix, letters, path: Path, title: str) -> None:
    """Counts of true letter (rows) against predicted letter (columns)."""
    n = len(letters)
    fig, ax = plt.subplots(figsize=(6.5, 5.8))
    image = ax.imshow(matrix, cmap="Blues")
    threshold = matrix.max() / 2
    for i in range(n):
        for j in range(n):
            color = "white" if matrix[i, j] > threshold else "black"
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(n), letters)
    ax.set_yticks(range(n), letters)
    ax.set_xlabel("predicted letter")
    ax.set_ylabel("true letter")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.subplots_adjust(left=0.09, right=0.9, bottom=0.09, top=0.94)  # tight_layout: 4x slower
    _save(fig, path)


def mistakes(images, true, pred, confidence, letters, path: Path, title: str, cols=8) -> None:
    """A grid of misclassified images, each titled true -> predicted (confidence).

    One image of all the tiles, with one text per tile: 40 axes would take seconds to lay out.
    """
    rows = max(1, -(-len(images) // cols))
    fig = plt.figure(figsize=(1.5 * cols, 1.75 * rows + 0.6))
    band = 0.6 / fig.get_figheight()  # the title's strip
    ax = fig.add_axes((0, 0, 1, 1 - band))
    cell_w, cell_h, side = 34, 40, 28  # px per tile: 3 px margins, the label's strip above
    grid = np.full((rows * cell_h, cols * cell_w), 255, dtype=np.uint8)
    for k, image in enumerate(images):
        top, left = (k // cols) * cell_h + cell_h - side - 2, (k % cols) * cell_w + 3
        grid[top : top + side, left : left + side] = image
        label = f"{letters[true[k]]} → {letters[pred[k]]} ({100 * confidence[k]:.1f}%)"
        ax.text(left + side / 2, top - 1.5, label, ha="center", va="bottom", fontsize=9)
    ax.imshow(grid, cmap="gray", vmin=0, vmax=255, aspect="auto", interpolation="nearest")
    ax.axis("off")
    if not len(images):
        ax.text(grid.shape[1] / 2, grid.shape[0] / 2, "no mistakes", ha="center", va="center")
    fig.suptitle(title, y=1 - band / 4, va="top")
    _save(fig, path)


def task_accuracies(rows: list[dict], path: Path, title: str) -> None:
    """Test accuracy per task: bars for this run with their 95% interval (a row's "ci95", if
    any), a red mark at the original's value."""
    ours = [100 * r["test_accuracy"] for r in rows]
    theirs = [(i, 100 * r["original"]) for i, r in enumerate(rows) if r.get("original")]
    cis = [(i, [100 * b for b in r["ci95"]]) for i, r in enumerate(rows) if r.get("ci95")]
    values = ours + [v for _, v in theirs] + [b for _, ci in cis for b in ci]
    bottom, top = max(0, 5 * (min(values) // 5) - 5), min(100, max(values) + 6)  # legend room
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 3, 4.5))
    ax.bar(range(len(rows)), ours, width=0.6, color="tab:blue", label="reproduced")
    if cis:
        x = [i for i, _ in cis]
        low = [ours[i] - ci[0] for i, ci in cis]
        high = [ci[1] - ours[i] for i, ci in cis]
        ax.errorbar(
            x,
            [ours[i] for i in x],
            yerr=[low, high],
            fmt="none",
            ecolor="black",
            capsize=6,
            label="95% Wilson interval",
        )
    for i, v in enumerate(ours):
        ax.text(i, bottom + 0.02 * (top - bottom), f"{v:.2f}", ha="center", color="white")
    if theirs:
        ax.scatter(
            *zip(*theirs, strict=True),
            marker="_",
            s=1200,
            linewidths=3,
            color="tab:red",
            zorder=3,
            label="original",
        )
        tops = {i: ci[1] for i, ci in cis}
        for i, v in theirs:  # above the bar, its interval or the mark, whichever is highest
            ax.annotate(
                f"original {v:.2f}",
                (i, max(v, ours[i], tops.get(i, 0))),
                xytext=(0, 5),
                textcoords="offset points",
                ha="center",
                color="tab:red",
            )
    ax.set_xticks(range(len(rows)), [r["label"] for r in rows])
    ax.set_ylim(bottom, top)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", ncol=3)
    fig.tight_layout()
    _save(fig, path)


def seed_accuracies(tasks: dict[str, dict], path: Path, title: str) -> None:
    """Each task's test accuracy per seed (dots), mean +- 2 sd (bar), the original's (red x)."""
    fig, ax = plt.subplots(figsize=(1.5 * len(tasks) + 3, 4.8))
    values = []
    for i, t in enumerate(tasks.values()):
        accs = [100 * a for a in t["accuracies"].values()]
        n = len(accs)  # the seeds side by side, left of the mean
        offsets = [0.25 * (k - (n - 1) / 2) / max(1, n - 1) for k in range(n)]
        ax.scatter(
            [i - 0.12 + o for o in offsets],
            accs,
            s=22,
            color="tab:blue",
            zorder=3,
            label="one seed" if i == 0 else None,
        )
        mean, sd = 100 * t["mean"], 100 * t["sd"]
        ax.errorbar(
            i + 0.2,
            mean,
            yerr=2 * sd,
            fmt="o",
            color="black",
            capsize=6,
            markersize=5,
            label="mean +- 2 sd" if i == 0 else None,
        )
        values += accs + [mean - 2 * sd, mean + 2 * sd]
        if t.get("original") is not None:
            theirs = 100 * t["original"]
            ax.scatter(
                [i + 0.2],
                [theirs],
                marker="x",
                s=90,
                linewidths=2.5,
                color="tab:red",
                zorder=4,
                label="original" if "original" not in _labels(ax) else None,
            )
            values.append(theirs)
    bottom, top = min(values), max(values)
    pad = max(0.5, 0.08 * (top - bottom))
    ax.set_ylim(bottom - pad, top + pad)
    ax.set_xticks(range(len(tasks)), list(tasks))
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    fig.tight_layout()
    _save(fig, path)


def robustness_chart(
    conditions: list[str], accuracy: dict[str, list[float]], path: Path, title: str
) -> None:
    """Accuracy (%) per condition, one line per model, each task in its colour (TASK_COLORS:
    as in `dvc plots show` and the MLflow UI)."""
    fig, ax = plt.subplots(figsize=(max(8.0, 0.45 * len(conditions) + 3), 5.5))
    x = range(len(conditions))
    for k, (model, values) in enumerate(accuracy.items()):
        ax.plot(
            x,
            values,
            marker="os^vD<>ph*"[k % 10],
            markersize=5,
            label=model,
            color=TASK_COLORS.get(model, plt.get_cmap("tab10")(k % 10)),
        )
    ax.set_xticks(x, conditions, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_xlim(-0.5, len(conditions) - 0.5)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9)  # clear of the lines
    fig.tight_layout()
    _save(fig, path)


def _labels(ax) -> list[str]:
    return ax.get_legend_handles_labels()[1]


def sample_grid(images, rows: list[str], columns, path: Path, title: str) -> None:
    """(R, C, H, W) uint8 images as one mosaic, a label per row and per column."""
    n_rows, n_cols, h, w = images.shape
    gap = 2
    mosaic = np.full((n_rows * (h + gap) - gap, n_cols * (w + gap) - gap), 96, np.uint8)
    for r in range(n_rows):
        for c in range(n_cols):
            top, left = r * (h + gap), c * (w + gap)
            mosaic[top : top + h, left : left + w] = images[r, c]
    fig, ax = plt.subplots(figsize=(0.42 * n_cols + 2.6, 0.42 * n_rows + 0.8))
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_yticks([r * (h + gap) + h / 2 for r in range(n_rows)], rows, fontsize=8)
    ax.set_xticks([c * (w + gap) + w / 2 for c in range(n_cols)], list(columns), fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
