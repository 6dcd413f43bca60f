"""Stage `train_task5`: dropout after the hidden layer at Task 2's best learning rate."""

import sys

from pipeline.config import HiddenParams, load
from pipeline.training import runner

TITLE = "Task 5: dropout"


def candidates(paths) -> list[runner.Candidate]:
    p = load(paths.params, "task5", HiddenParams)
    hidden = tuple(p.hidden)
    label = "hidden=" + "-".join(map(str, hidden)) + f" dropout={p.dropout}"
    return [runner.Candidate(label, runner.best_lr(paths), hidden, p.dropout)]


def main(argv=None) -> int:
    return runner.main("task5", TITLE, candidates, argv, reads=", reports/train/task2/best.json")


if __name__ == "__main__":
    sys.exit(main())
