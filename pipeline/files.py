"""Atomic writes: an interrupted stage never leaves a half-written output."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pipeline import signals
from pipeline.config import StageError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_file(path: Path):
    """Yield a temp path beside `path`; rename it onto `path` only if the block succeeds.

    The rename and the removal of the temp file are never cut short by a signal.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with signals.shield():
            tmp.chmod(0o666 & ~_umask())  # mkstemp makes 0600; give the usual mode
            os.replace(tmp, path)
    finally:
        with signals.shield():
            tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: Path):
    """Yield an empty temp folder beside `path`; it replaces `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        with signals.shield():
            tmp.chmod(0o777 & ~_umask())
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        with signals.shield():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: Path):
    """A JSON file; a broken one is a one-line StageError naming it."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise StageError(f"{path}: not valid JSON ({e})") from None


def write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj) -> None:
    """Stable JSON: sorted keys, fixed indent, trailing newline."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
