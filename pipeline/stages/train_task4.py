"""Stage `train_task4`: two hidden layers at Task 2's best learning rate."""

import sys

from pipeline.config import HiddenParams, load
from pipeline.training import runner

TITLE = "Task 4: two hidden layers"


def candidates(paths) -> list[runner.Candidate]:
    p = load(paths.params, "task4", HiddenParams)
    hidden = tuple(p.hidden)
    label = "hidden=" + "-".join(map(str, hidden))
    return [runner.Candidate(label, runner.best_lr(paths), hidden, p.dropout)]


def main(argv=None) -> int:
    return runner.main("task4", TITLE, candidates, argv, reads=", reports/train/task2/best.json")


if __name__ == "__main__":
    sys.exit(main())
