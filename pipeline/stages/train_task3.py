"""Stage `train_task3`: hidden-layer sizes at Task 2's best learning rate.

Its H = 1000 is Task 2's chosen configuration: reused from Task 2's outputs, not retrained.
"""

import sys

from pipeline.config import Task3Params, load
from pipeline.training import runner

TITLE = "Task 3: hidden-size sweep"


def candidates(paths) -> list[runner.Candidate]:
    p = load(paths.params, "task3", Task3Params)
    lr = runner.best_lr(paths)
    return [runner.Candidate(f"hidden={h}", lr, (h,)) for h in p.hidden_sizes]


def main(argv=None) -> int:
    return runner.main(
        "task3",
        TITLE,
        candidates,
        argv,
        reuse=("task2",),
        reads=", reports/train/task2/{best.json,history.csv}, models/task2.pt",
    )


if __name__ == "__main__":
    sys.exit(main())
