"""Stage `train_task2`: the learning-rate sweep of MLP 2352 -> 1000 -> 10."""

import sys

from pipeline.config import Task2Params, load
from pipeline.training import runner

TITLE = "Task 2: learning-rate sweep"


def candidates(paths) -> list[runner.Candidate]:
    p = load(paths.params, "task2", Task2Params)
    return [runner.Candidate(f"lr={lr}", lr, tuple(p.hidden)) for lr in p.learning_rates]


def main(argv=None) -> int:
    return runner.main("task2", TITLE, candidates, argv)


if __name__ == "__main__":
    sys.exit(main())
