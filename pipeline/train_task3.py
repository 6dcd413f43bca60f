"""Stage `train_task3`: hidden-layer sizes at Task 2's best learning rate.

Its H = 1000 is Task 2's chosen configuration: reused from Task 2's outputs, not retrained.
"""

import sys

from pipeline import task
from pipeline.config import Task3Params, load

TITLE = "Task 3: hidden-size sweep"


def candidates(paths) -> list[task.Candidate]:
    p = load(paths.params, "task3", Task3Params)
    lr = task.best_lr(paths)
    return [task.Candidate(f"hidden={h}", lr, (h,)) for h in p.hidden_sizes]


def main(argv=None) -> int:
    return task.main("task3", TITLE, candidates, argv, reuse=("task2",),
                     reads=", reports/train/task2/{best.json,history.csv}, models/task2.pt")


if __name__ == "__main__":
    sys.exit(main())
