"""Decoding the archive's images once: keep the good ones, record why each other went.

Members are read straight from the archive into memory and never written to disk, so no
member name (absolute, `..`, a link) can write anywhere: unsafe entries are refused and
recorded like any other bad file.

Memory stays bounded whatever the archive's size: the stage's process decompresses the archive
and cuts it between members into pieces of BATCH members, each a small tar archive of its own;
`clean.workers` processes parse and decode the pieces (a bounded number ahead), and each writes
its pixels straight to a file, at the piece's own place; what stays in memory is one short
record per image (path, its line of index.csv, row); the decoding processes make the lines.
Parsing tar headers costs as much as a third of the decoding, so it is shared out too: the
process that reads the archive only finds where each member ends.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import logging
import lzma
import multiprocessing
import os
import re
import sys
import tarfile
import threading
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import partial
from itertools import pairwise
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from pipeline import cli
from pipeline.config import LETTERS, SIZE, Paths, StageError
from pipeline.data.archive import member_path, members
from pipeline.files import atomic_dir, atomic_file

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


MAX_FILE_BYTES = 1 << 20  # a 28x28 PNG is well under 1 KiB; refuse to read huge members

BATCH = 256  # members per piece (decoding task): large enough that inter-process traffic is cheap

AHEAD = 2  # pieces queued per helper process: enough to keep it busy

BLOCK = tarfile.BLOCKSIZE

ZERO = bytes(BLOCK)  # an archive's first zero block ends it (as tarfile reads it)

END = 2 * ZERO  # a tar archive's end

READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)

NO_DATA = {
    tarfile.LNKTYPE,
    tarfile.SYMTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.DIRTYPE,
    tarfile.FIFOTYPE,
}  # header-only members, whatever their size field says (as tarfile)

EXTENDED = {
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.XGLTYPE,
}  # headers that belong to the next member

CHUNK_ROWS = 8192  # images per read or write when an images file is streamed (6 MiB)

INDEX_COLUMNS = ("path", "letter", "class_id", "sha256")  # data/clean/index.csv

REJECTED_COLUMNS = ("path", "reason", "detail")  # reports/data/rejected.csv

CSV_SPECIAL = re.compile('[,"\n]')  # what csv.writer quotes: its delimiter, quote, line end


def path_parts(path: str) -> list[str]:
    """A member path's components, as PurePosixPath.parts gives them for a relative path."""
    return [p for p in path.split("/") if p not in ("", ".")]


def member_problem(m: tarfile.TarInfo) -> str | None:
    """Why a member is unsafe or not a regular file (None for a regular file or a folder)."""
    name = m.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "unsafe path: absolute"
    if ".." in name.replace("\\", "/").split("/"):
        return "unsafe path: '..'"
    if m.issym() or m.islnk():
        return "link"
    if m.ischr() or m.isblk() or m.isfifo():
        return "device entry"
    if not (m.isfile() or m.isdir()):
        return "not a regular file"
    return None


def decode_image(data: bytes) -> tuple[np.ndarray | None, str, str]:
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


def open_stream(archive: Path):
    """The archive's uncompressed tar stream (gzip, bzip2, xz or none, told by its magic)."""
    with open(archive, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(archive, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(archive, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(archive, "rb")
    return open(archive, "rb")


def read_exactly(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) != n:
        raise tarfile.ReadError("unexpected end of data")
    return data


def unreadable(archive: Path, e: BaseException) -> StageError:
    return StageError(f"{archive}: not a readable tar archive ({cli.one_line(e)})")


def pieces(archive: Path, per_piece: int | None = None) -> Iterator[bytes]:
    """The archive cut between members into pieces of `per_piece` (default BATCH) members, in
    order; each piece is a tar archive of its own that tarfile reads as it would read those
    members in place.

    Only sizes are read here (headers are parsed, checked and judged where a piece is read): a
    member's extended headers (long names, pax records) travel with it, global pax headers
    start every later piece, and a member over MAX_FILE_BYTES travels alone, without its data
    (it is rejected from its header), so memory stays bounded.
    """
    per_piece = per_piece or BATCH
    bar = tqdm(unit=" files", desc="clean", disable=not sys.stderr.isatty())
    try:
        yield from _pieces(archive, per_piece, bar)
    except READ_ERRORS as e:
        raise unreadable(archive, e) from None


def _pieces(archive: Path, per_piece: int, bar) -> Iterator[bytes]:
    with bar, open_stream(archive) as stream:
        glob, prefix, piece, count, empty = b"", [], [], 0, True
        while len(header := stream.read(BLOCK)) == BLOCK and header != ZERO:
            kind, size = header[156:157], tarfile.nti(header[124:136])
            if kind == tarfile.GNUTYPE_SPARSE:
                raise tarfile.ReadError("GNU sparse members are not supported")
            length = 0 if kind in NO_DATA else -(-size // BLOCK) * BLOCK
            empty = False
            if kind in EXTENDED:
                if size > MAX_FILE_BYTES:
                    raise tarfile.ReadError(f"an extended header of {size} bytes")
                record = header + read_exactly(stream, length)
                prefix.append(record)
                glob += record if kind == tarfile.XGLTYPE else b""
                continue
            bar.update()
            if length > MAX_FILE_BYTES:  # judged from its header alone, in a piece of its own
                while length:
                    length -= len(read_exactly(stream, min(length, 1 << 20)))
                if count:
                    yield b"".join(piece) + END
                yield b"".join([glob, *prefix, header, END])
                piece, count = [glob], 0
            else:
                piece += [*prefix, header, read_exactly(stream, length)]
                count += 1
            prefix = []
            if count == per_piece:
                yield b"".join(piece) + END
                piece, count = [glob], 0
        if len(header) not in (0, BLOCK):
            raise tarfile.ReadError("unexpected end of data")
        if empty:
            raise tarfile.ReadError("empty file")
        if count:
            yield b"".join(piece) + END


def decode_piece(piece: bytes) -> tuple[bytes, list[tuple[str, str, str, str]]]:
    """Read one piece of the archive and decode its images: (the good images' pixels,
    concatenated in order; per member but folders (path, reason, detail, index line), reason
    empty and the line of index.csv (index_line) for a good image, line empty otherwise)."""
    pixels, records = [], []
    with tarfile.open(fileobj=io.BytesIO(piece), mode="r:") as tar:
        for m in members(tar):
            path = member_path(m.name)
            problem = member_problem(m)
            if problem is None and m.isdir():
                continue
            problem = problem or file_problem(path, m.size)
            image, reason, detail = (
                (None, problem, "") if problem else decode_image(tar.extractfile(m).read())
            )
            if image is None:
                records.append((path, reason, detail, ""))
            else:
                raw = image.tobytes()
                pixels.append(raw)
                records.append((path, "", "", index_line(path, hashlib.sha256(raw).hexdigest())))
            if m.type not in NO_DATA and m.size > MAX_FILE_BYTES:  # alone, without its data
                return b"", records
        if piece[tar.offset :].strip(b"\0"):  # tarfile stops quietly at a bad header
            raise tarfile.ReadError(f"a bad tar header after {len(records)} members of a piece")
    return b"".join(pixels), records


def decode_into(rows_file: str, per_piece: int, item: tuple[int, bytes]) -> tuple[int, list]:
    """decode_piece of piece k = item[0], its pixels written to `rows_file` at row k * per_piece
    (a piece has at most per_piece images): (k, its records). Only the short records go back to
    the stage's process, not the pixels."""
    k, piece = item
    pixels, records = decode_piece(piece)
    with open(rows_file, "r+b") as f:
        f.seek(k * per_piece * SIZE * SIZE)
        f.write(pixels)
    return k, records


def index_line(path: str, sha256: str) -> str:
    """The line of index.csv for a good image (INDEX_COLUMNS), as write_csv writes it."""
    letter = path_parts(path)[-2]
    fields = (path, letter, LETTERS.index(letter), sha256)
    if CSV_SPECIAL.search(path):  # only the path can need quoting
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerow(fields)
        return buf.getvalue()
    return ",".join(map(str, fields)) + "\n"


def file_problem(path: str, size: int) -> str | None:
    """Why a regular file cannot be a letter image, judged from its path and size."""
    parts = path_parts(path)
    if not path.endswith(".png"):
        return "not a .png"
    if len(parts) < 2 or parts[-2] not in LETTERS:
        return "unknown folder"
    if size > MAX_FILE_BYTES:
        return "too large"
    return None


def _context() -> multiprocessing.context.BaseContext:
    # fork starts a helper in milliseconds with everything imported, but is only safe in a
    # process with one thread (the stage; not always a test runner) and on Linux.
    if sys.platform == "linux" and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def decoded(items: Iterable, processes: int, work: Callable) -> Iterator:
    """work(item) of each item (decode_into of a piece), in order, by `processes` processes:
    this one (which also reads the archive) and processes - 1 helpers. An item goes to a helper
    while fewer than AHEAD per helper wait; otherwise this process works on it rather than wait. At
    most AHEAD * processes items are held, so memory does not grow with the archive."""
    if processes <= 1:
        yield from map(work, items)
        return
    helpers = processes - 1
    try:
        with ProcessPoolExecutor(helpers, mp_context=_context()) as pool:
            pending = deque()  # futures and finished results, in piece order
            for item in items:
                queued = sum(isinstance(f, Future) and not f.done() for f in pending)
                if queued < AHEAD * helpers:
                    pending.append(pool.submit(work, item))
                else:
                    pending.append(work(item))
                while pending and (len(pending) >= AHEAD * processes or _done(pending[0])):
                    yield _result(pending.popleft())
            while pending:
                yield _result(pending.popleft())
    except BrokenProcessPool as e:
        raise StageError(f"a decoding process died ({cli.one_line(e)})") from None


def _done(item) -> bool:
    return not isinstance(item, Future) or item.done()


def _result(item):
    return item.result() if isinstance(item, Future) else item


def write_npy_header(f, rows: int) -> None:
    """The header np.save writes for a (rows, 28, 28) uint8 array."""
    d = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": (rows, SIZE, SIZE),
    }
    np.lib.format.write_array_header_1_0(f, d)


def reorder(rows_file: Path, total: int, order: np.ndarray, dest: Path, threads: Executor) -> None:
    """Write rows `order` of a raw file of `total` images to the .npy file `dest`, in chunks
    shared out to `threads` (numpy's gather and the writes run without the GIL)."""
    with open(dest, "wb") as out:
        write_npy_header(out, len(order))
        head, fd = out.tell(), out.fileno()

        def chunk(start: int) -> None:
            # A fresh mapping per chunk: dropping it releases the pages this chunk touched.
            src = np.memmap(rows_file, np.uint8, "r", shape=(total, SIZE * SIZE))
            data = memoryview(src[order[start : start + CHUNK_ROWS]]).cast("B")  # no copy
            at = head + start * SIZE * SIZE
            while data:
                done = os.pwrite(fd, data, at)
                data, at = data[done:], at + done

        list(threads.map(chunk, range(0, len(order), CHUNK_ROWS)))


def write_lines(dest: Path, header: str, lines: Iterable[str]) -> None:
    with open(dest, "w", encoding="utf-8", newline="") as f:
        f.write(header + "\n")
        f.write("".join(lines))


def clean_archive(archive: Path, out: Path, processes: int = 1) -> tuple[int, list[tuple]]:
    """Decode the archive into out/images.npy (N x 28 x 28 uint8) and out/index.csv
    (INDEX_COLUMNS), rows sorted by path.

    Returns (N, the rejected files' rows (REJECTED_COLUMNS) sorted by path). Same bytes
    whatever `processes` is: pieces are decoded independently and taken back in order.
    """
    kept, rejected = [], []  # kept: (path, index line, row of the raw file)
    rows_file = out / ".images.npy.rows"
    per_piece = BATCH  # piece k's images are rows k * per_piece onwards of the raw file
    try:
        rows_file.write_bytes(b"")
        work = partial(decode_into, str(rows_file), per_piece)
        slots = 0
        for k, records in decoded(enumerate(pieces(archive, per_piece)), processes, work):
            row, slots = k * per_piece, k + 1
            for path, reason, detail, line in records:
                if reason:
                    rejected.append((path, reason, detail))
                else:
                    kept.append((path, line, row))
                    row += 1
        total = slots * per_piece
        with open(rows_file, "r+b") as f:  # rows of rejected files and the last piece's tail:
            f.truncate(total * SIZE * SIZE)  # zeros (holes), never read
        kept.sort(key=itemgetter(0))
        paths = [path for path, _, _ in kept]
        twice = {a for a, b in pairwise(paths) if a == b}
        if twice:  # which copy would win depends on member order: keep none
            copies = Counter(p for p in paths if p in twice)
            for path, k in copies.items():
                rejected += [(path, "duplicate path", f"{k} copies")] * k
            kept = [r for r in kept if r[0] not in twice]
        rows = np.fromiter((r[2] for r in kept), dtype=np.int64, count=len(kept))
        with ThreadPoolExecutor(processes) as threads:  # index.csv while images.npy is written
            index = threads.submit(
                write_lines,
                out / "index.csv",
                ",".join(INDEX_COLUMNS),
                (line for _, line, _ in kept),
            )
            reorder(rows_file, total, rows, out / "images.npy", threads)
            index.result()
    except tarfile.TarError as e:  # from a piece (reading the archive raises StageError)
        raise unreadable(archive, e) from None
    finally:
        rows_file.unlink(missing_ok=True)
    rejected.sort()
    return len(kept), rejected


def write_csv(dest: Path, columns: Iterable[str], rows: Iterable[tuple]) -> None:
    """A table as pandas' DataFrame.to_csv(dest, index=False) writes it, byte for byte."""
    with open(dest, "w", encoding="utf-8", newline="") as f:
        out = csv.writer(f, lineterminator="\n")
        out.writerow(columns)
        out.writerows(rows)


def scan(archive: Path, processes: int = 1) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """(images, index, rejected) of an archive, all in memory: for small archives and tests."""
    import tempfile

    import pandas as pd

    with tempfile.TemporaryDirectory(prefix="clean-") as tmp:
        _, rejected = clean_archive(archive, Path(tmp), processes)
        images, index = load_clean(Path(tmp))
    return images, index, pd.DataFrame(rejected, columns=list(REJECTED_COLUMNS))


def save_clean(
    images: np.ndarray, index: pd.DataFrame, rejected: pd.DataFrame, paths: Paths
) -> None:
    with atomic_dir(paths.clean_dir) as tmp:
        np.save(tmp / "images.npy", images, allow_pickle=False)
        index.to_csv(tmp / "index.csv", index=False)
    with atomic_file(paths.data_reports / "rejected.csv") as tmp:
        rejected.to_csv(tmp, index=False)


def npy_layout(path: Path) -> tuple[tuple, np.dtype, int]:
    """(shape, dtype, offset of the data) of a .npy file, from its header alone."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            version, np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read(f)
        if fortran_order:
            raise StageError(f"{path}: Fortran-ordered array")
        return shape, dtype, f.tell()


def image_chunks(path: Path, rows: int = CHUNK_ROWS) -> Iterator[np.ndarray]:
    """The images of a .npy file, `rows` at a time, read without loading the whole file."""
    shape, dtype, offset = npy_layout(path)
    per_row = int(np.prod(shape[1:], dtype=np.int64))
    with open(path, "rb") as f:
        f.seek(offset)
        for start in range(0, shape[0], rows):
            count = min(rows, shape[0] - start) * per_row
            chunk = np.fromfile(f, dtype=dtype, count=count)
            if chunk.size != count:
                raise StageError(f"{path}: ends after {start} images of {shape[0]}")
            yield chunk.reshape(-1, *shape[1:])


def load_index(clean_dir: Path) -> pd.DataFrame:
    """The clean images' index, checked against the images file's row count."""
    import pandas as pd

    index = pd.read_csv(clean_dir / "index.csv", dtype={"path": str, "letter": str})
    shape, _, _ = npy_layout(clean_dir / "images.npy")
    if shape[0] != len(index):
        raise StageError(f"{clean_dir}: {shape[0]} images but {len(index)} index rows")
    return index


def load_clean(clean_dir: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """The clean images and their index, as `clean` wrote them."""
    import pandas as pd

    images = np.load(clean_dir / "images.npy", allow_pickle=False)
    index = pd.read_csv(clean_dir / "index.csv", dtype={"path": str, "letter": str})
    if len(images) != len(index):
        raise StageError(f"{clean_dir}: {len(images)} images but {len(index)} index rows")
    return images, index
