"""Stage `train_task4`: two hidden layers at Task 2's best learning rate."""

import sys

from pipeline import task
from pipeline.config import HiddenParams, load

TITLE = "Task 4: two hidden layers"


def candidates(paths) -> list[task.Candidate]:
    p = load(paths.params, "task4", HiddenParams)
    hidden = tuple(p.hidden)
    label = "hidden=" + "-".join(map(str, hidden))
    return [task.Candidate(label, task.best_lr(paths), hidden, p.dropout)]


def main(argv=None) -> int:
    return task.main("task4", TITLE, candidates, argv, reads=", reports/train/task2/best.json")


if __name__ == "__main__":
    sys.exit(main())
