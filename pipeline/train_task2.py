"""Stage `train_task2`: the learning-rate sweep of MLP 2352 -> 1000 -> 10."""

import sys

from pipeline import task
from pipeline.config import Task2Params, load

TITLE = "Task 2: learning-rate sweep"


def candidates(paths) -> list[task.Candidate]:
    p = load(paths.params, "task2", Task2Params)
    return [task.Candidate(f"lr={lr}", lr, tuple(p.hidden)) for lr in p.learning_rates]


def main(argv=None) -> int:
    return task.main("task2", TITLE, candidates, argv)


if __name__ == "__main__":
    sys.exit(main())
