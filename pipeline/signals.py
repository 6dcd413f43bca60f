"""SIGINT and SIGTERM as an exception raised where it is safe, and what the stage is doing.

A signal raises Interrupted in the main thread, except inside `shield()` (a short write: a
checkpoint, a file's rename, an MLflow write): there it waits until the block ends, so no file
is left half-written and no database write half-done. A second signal exits at once.
"""

from __future__ import annotations

import os
import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"doing": "", "signal": 0, "pending": 0, "shield": 0, "installed": False}


class Interrupted(BaseException):
    """SIGINT or SIGTERM: the stage cleans up, says so in one line and exits 128 + signal.

    A BaseException, so that no `except Exception` on the way swallows it; code that owns
    resources (MLflow runs) adds what it did to `cleanup`.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.cleanup: list[str] = []


def doing(text: str) -> None:
    """Record what the stage is doing now (e.g. 'lr=0.05, epoch 9'), named on interruption."""
    _state["doing"] = text


def now_doing() -> str:
    return _state["doing"]


def received() -> int:
    """The signal that arrived (0 if none): an error raised while unwinding from it is its."""
    return _state["signal"]


def handle(signum, frame) -> None:
    """The signal handler: raise Interrupted now, or when the current shield ends."""
    if _state["signal"]:  # a second signal, while cleaning up or waiting: leave at once
        os._exit(128 + signum)
        return  # (only reached when a test replaces os._exit)
    _state["signal"] = signum
    if _state["shield"]:
        _state["pending"] = signum
        return
    raise Interrupted(signum)


@contextmanager
def installed():
    """Handle SIGINT and SIGTERM as Interrupted inside the block (main thread only)."""
    previous = {s: signal.signal(s, handle) for s in SIGNALS}
    _state.update(doing="", signal=0, pending=0, shield=0, installed=True)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state["installed"] = False


@contextmanager
def shield():
    """Hold a signal until the block ends (then raise it), so the block is never cut short."""
    _state["shield"] += 1
    try:
        yield
    finally:
        _state["shield"] -= 1
        if not _state["shield"] and _state["pending"]:
            signum, _state["pending"] = _state["pending"], 0
            raise Interrupted(signum)
