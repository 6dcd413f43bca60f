"""Stage `clean`: decode every image once, keep the good ones, record why each other file went.

Members are read straight from the archive into memory and never written to disk, so no
member name (absolute, `..`, a link) can write anywhere: unsafe entries are refused and
recorded like any other bad file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import sys
import tarfile
import zlib
from collections import Counter, defaultdict
from pathlib import Path, PurePosixPath

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline import cli
from pipeline.config import LETTERS, Paths, StageError
from pipeline.download import member_path
from pipeline.files import atomic_dir, atomic_file

log = logging.getLogger(__name__)
SIZE = 28
MAX_FILE_BYTES = 1 << 20  # a 28x28 PNG is well under 1 KiB; refuse to read huge members


def member_problem(m: tarfile.TarInfo) -> str | None:
    """Why a member is unsafe or not a regular file (None for a regular file or a folder)."""
    name = m.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "unsafe path: absolute"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "unsafe path: '..'"
    if m.issym() or m.islnk():
        return "link"
    if m.ischr() or m.isblk() or m.isfifo():
        return "device entry"
    if not (m.isfile() or m.isdir()):
        return "not a regular file"
    return None


def decode(data: bytes) -> tuple[np.ndarray | None, str, str]:
    """Pixels of a 28x28 8-bit grayscale PNG, or (None, reason, detail)."""
    if not data:
        return None, "empty file", ""
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None, "not an image", ""
    if img.format != "PNG":
        return None, "not an image", f"format {img.format}"
    if img.size != (SIZE, SIZE):
        return None, "wrong size", f"{img.size[0]}x{img.size[1]}"
    if img.mode != "L":
        return None, "wrong mode", f"mode {img.mode}"
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, zlib.error) as e:
        reason = "truncated" if "truncated" in str(e) else "corrupt"
        return None, reason, str(e)[:100]
    return np.asarray(img, dtype=np.uint8), "", ""


def scan(archive: Path) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """(images N x 28 x 28 uint8, index table, rejected table), rows sorted by path."""
    kept, rejected = defaultdict(list), []
    try:
        with (
            tarfile.open(archive, "r:*") as tar,
            tqdm(unit=" files", desc="clean", disable=not sys.stderr.isatty()) as bar,
        ):
            for m in tar:
                bar.update()
                path = member_path(m.name)
                problem = member_problem(m)
                if problem is None and m.isdir():
                    continue
                parts = PurePosixPath(path).parts
                if problem is None and not path.endswith(".png"):
                    problem = "not a .png"
                if problem is None and (len(parts) < 2 or parts[-2] not in LETTERS):
                    problem = "unknown folder"
                if problem is None and m.size > MAX_FILE_BYTES:
                    problem = "too large"
                if problem:
                    rejected.append((path, problem, ""))
                    continue
                pixels, reason, detail = decode(tar.extractfile(m).read())
                if pixels is None:
                    rejected.append((path, reason, detail))
                else:
                    kept[path].append((parts[-2], pixels))
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise StageError(f"{archive}: not a readable tar archive ({cli.one_line(e)})") from None
    for path in [p for p, copies in kept.items() if len(copies) > 1]:
        # Which copy would win depends on member order: keep none.
        rejected += [(path, "duplicate path", f"{len(kept[path])} copies")] * len(kept.pop(path))
    paths = sorted(kept)
    images = (
        np.stack([kept[p][0][1] for p in paths]) if paths else np.zeros((0, SIZE, SIZE), np.uint8)
    )
    letters = [kept[p][0][0] for p in paths]
    index = pd.DataFrame(
        {
            "path": paths,
            "letter": letters,
            "class_id": [LETTERS.index(c) for c in letters],
            "sha256": [hashlib.sha256(im.tobytes()).hexdigest() for im in images],
        }
    )
    rejected = pd.DataFrame(sorted(rejected), columns=["path", "reason", "detail"])
    return images, index, rejected


def save(images: np.ndarray, index: pd.DataFrame, rejected: pd.DataFrame, paths: Paths) -> None:
    with atomic_dir(paths.clean_dir) as tmp:
        np.save(tmp / "images.npy", images, allow_pickle=False)
        index.to_csv(tmp / "index.csv", index=False)
    with atomic_file(paths.data_reports / "rejected.csv") as tmp:
        rejected.to_csv(tmp, index=False)


def load_clean(clean_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """The clean images and their index, as `clean` wrote them."""
    images = np.load(clean_dir / "images.npy", allow_pickle=False)
    index = pd.read_csv(clean_dir / "index.csv", dtype={"path": str, "letter": str})
    if len(images) != len(index):
        raise StageError(f"{clean_dir}: {len(images)} images but {len(index)} index rows")
    return images, index


def main(argv=None) -> int:
    args = cli.parser(
        "clean",
        "Decode every PNG in the archive once; keep readable 28x28 grayscale images "
        "under A..J, reject every other file with a reason.",
        reads="data/raw/notMNIST_small.tar.gz",
        writes="data/clean/images.npy (N x 28 x 28 uint8), data/clean/index.csv "
        "(path, letter, class_id, sha256), reports/data/rejected.csv (path, reason, detail)",
    ).parse_args(argv)

    def work(paths: Paths) -> None:
        images, index, rejected = scan(paths.raw_archive)
        save(images, index, rejected, paths)
        reasons = Counter(rejected["reason"])
        log.info("kept %d images, rejected %d files %s", len(index), len(rejected), dict(reasons))

    return cli.run("clean", args, work)


if __name__ == "__main__":
    sys.exit(main())
