"""Reading the data archive safely: members, content digests, fetching a source."""

from __future__ import annotations

import hashlib
import logging
import re
import sys
import tarfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
import urllib3
from tqdm import tqdm

from pipeline import cli
from pipeline.config import DataParams, StageError
from pipeline.files import atomic_file

log = logging.getLogger(__name__)

CHUNK = 1 << 16


class SourceError(Exception):
    """One source failed; the message says why in a few words."""


def member_path(name: str) -> str:
    """A tar member's path relative to the archive root ('./a/b' -> 'a/b')."""
    while name.startswith("./"):
        name = name[2:]
    return name


def members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The archive's members in order, each forgotten once the next is read.

    TarFile otherwise keeps every header it has read (about 550 bytes each: 280 MiB for
    notMNIST_large's 529k files).
    """
    while (m := tar.next()) is not None:
        yield m
        tar.members.clear()


def content_digest(archive: Path) -> str:
    """sha256 over sorted '<path>\\t<sha256 of bytes>' lines, one per regular file.

    Independent of how the archive was packed; members are streamed, never extracted.
    """
    lines = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            for m in members(tar):
                if m.isfile():
                    sha = hashlib.sha256(tar.extractfile(m).read()).hexdigest()
                    lines.append(f"{member_path(m.name)}\t{sha}\n".encode())
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise SourceError(f"not a readable tar archive ({cli.one_line(e)})") from None
    if not lines:
        raise SourceError("archive holds no files")
    return hashlib.sha256(b"".join(sorted(lines))).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _progress(total: int | None, name: str) -> tqdm:
    return tqdm(total=total, unit="B", unit_scale=True, desc=name, disable=not sys.stderr.isatty())


def copy_local(path: Path, dest: Path) -> None:
    if not path.is_file():
        raise SourceError("no such file")
    with open(path, "rb") as src, open(dest, "wb") as out:
        with _progress(path.stat().st_size, path.name) as bar:
            while chunk := src.read(CHUNK):
                out.write(chunk)
                bar.update(len(chunk))


def reason(e: Exception) -> str:
    """The root cause of a network error, e.g. '[Errno 111] Connection refused'."""
    text = cli.one_line(e)
    found = re.findall(r"\[Errno -?\d+\][^'\")]*|Read timed out\.?|timed out", text)
    return found[-1].strip() if found else text


def fetch_http(url: str, dest: Path, p: DataParams, backoff_s: float = 1.0) -> None:
    """GET `url` into `dest`; after a broken transfer, resume with a Range request.

    Bytes are saved as sent (no Content-Encoding decoding), so a .tar.gz stays one.
    """
    have, last = 0, None
    for attempt in range(p.retries + 1):
        if attempt:
            time.sleep(backoff_s * attempt)
            log.info("%s: retry %d after: %s", url, attempt, last)
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with requests.get(
                url, headers=headers, stream=True, timeout=(p.connect_timeout_s, p.read_timeout_s)
            ) as r:
                resumed = r.headers.get("Content-Range", "").startswith(f"bytes {have}-")
                if r.status_code == 206 and have and resumed:
                    mode = "ab"
                elif r.status_code == 200:
                    mode, have = "wb", 0  # server ignored the Range: start over
                elif r.status_code == 206 or 500 <= r.status_code < 600:
                    have = 0 if r.status_code == 206 else have  # 206 at a wrong offset: restart
                    last = f"HTTP {r.status_code}"
                    continue
                else:
                    raise SourceError(f"HTTP {r.status_code} {r.reason}")
                length = r.headers.get("Content-Length")
                total = have + int(length) if length else None
                with open(dest, mode) as out, _progress(total, Path(url).name) as bar:
                    bar.update(have)
                    for chunk in r.raw.stream(CHUNK, decode_content=False):
                        out.write(chunk)
                        have += len(chunk)
                        bar.update(len(chunk))
                if total is not None and have < total:
                    last = f"connection closed at {have} of {total} bytes"
                    continue
                return
        except (requests.RequestException, urllib3.exceptions.HTTPError) as e:
            last = reason(e)
            have = dest.stat().st_size
    attempts = p.retries + 1
    raise SourceError(f"gave up after {attempts} attempt{'s' * (attempts > 1)}: {last}")


def fetch_one(source: str, dest: Path, root: Path, p: DataParams) -> None:
    url = urlparse(source)
    if url.scheme in ("http", "https"):
        fetch_http(source, dest, p)
    elif url.scheme == "file":
        copy_local(Path(unquote(url.path)), dest)
    elif url.scheme == "" or len(url.scheme) == 1:  # a path (or a Windows drive letter)
        copy_local(root / source, dest)
    else:
        raise SourceError(f"unsupported scheme '{url.scheme}'")


def fetch(p: DataParams, dest: Path, root: Path) -> dict:
    """Try each source in order; keep the first whose content verifies. Atomic."""
    failures = []
    for source in p.sources:
        log.info("trying %s", source)
        try:
            with atomic_file(dest) as tmp:
                fetch_one(source, tmp, root, p)
                digest = content_digest(tmp)
                if p.content_digest is not None and digest != p.content_digest:
                    raise SourceError(f"content digest {digest} != expected {p.content_digest}")
                info = {
                    "source": source,
                    "bytes": tmp.stat().st_size,
                    "archive_sha256": file_sha256(tmp),
                    "content_digest": digest,
                    "content_digest_checked": p.content_digest is not None,
                }
        except SourceError as e:
            failures.append(f"{source}: {e}")
            log.info("%s", failures[-1])
            continue
        log.info("%s: %s bytes, content digest %s", source, f"{info['bytes']:,}", digest)
        return info
    raise StageError("no source gave verified content:\n  " + "\n  ".join(failures))
