"""Stage `clean`: every bad or unsafe member is rejected with its reason, nothing is extracted."""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import random
import tarfile
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import LETTERS, Paths, StageError
from pipeline.data import archive as archive_lib
from pipeline.data import decode
from pipeline.stages import clean
from tests.conftest import add_file, glyph, make_archive, png_bytes, write_params

TOP = "notMNIST_small"


def good_images() -> dict[str, np.ndarray]:
    """Two distinct glyphs per letter, plus one member written with a leading './'."""
    images = {}
    for c, letter in enumerate(LETTERS):
        for i in range(2):
            images[f"{TOP}/{letter}/good{i}.png"] = glyph(10 * c + i)
    images[f"./{TOP}/B/dotted.png"] = glyph(999)
    return images


def stored_path(name: str) -> str:
    return name.removeprefix("./")


def bad_files(abs_dir: Path) -> dict[str, tuple[bytes, str, str]]:
    """name -> (bytes, reason, detail) for regular-file members that must be rejected."""
    png = png_bytes(glyph(7))
    return {
        f"{TOP}/A/empty.png": (b"", "empty file", ""),
        f"{TOP}/A/text.png": (b"just some text, not an image\n", "not an image", ""),
        f"{TOP}/A/truncated.png": (
            png[: len(png) // 2],
            "truncated",
            "image file is truncated",
        ),
        f"{TOP}/B/wide.png": (
            png_bytes(np.full((28, 32), 128, np.uint8)),
            "wrong size",
            "32x28",
        ),
        f"{TOP}/B/rgb.png": (png_bytes(glyph(8), "RGB"), "wrong mode", "mode RGB"),
        f"{TOP}/C/sixteen.png": (png_bytes(glyph(9), "I;16"), "wrong mode", "mode I;16"),
        f"{TOP}/C/alpha.png": (png_bytes(glyph(10), "LA"), "wrong mode", "mode LA"),
        f"{TOP}/D/photo.png": (png_bytes(glyph(11), fmt="JPEG"), "not an image", "format JPEG"),
        f"{TOP}/K/unknown.png": (png, "unknown folder", ""),
        f"{TOP}/loose.png": (png, "unknown folder", ""),
        "top.png": (png, "unknown folder", ""),
        f"{TOP}/A/.DS_Store": (b"\x00\x00\x00\x01Bud1", "not a .png", ""),
        f"{TOP}/A/big.png": (bytes(decode.MAX_FILE_BYTES + 1), "too large", ""),
        "../evil.png": (png, "unsafe path: '..'", ""),
        f"{TOP}/A/../../evil2.png": (png, "unsafe path: '..'", ""),
        f"{abs_dir}/abs.png": (png, "unsafe path: absolute", ""),
    }


def special(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 3
    return info


def special_members(abs_dir: Path) -> dict[str, tuple[tarfile.TarInfo, str]]:
    """name -> (member, reason) for links and devices, all under a letter folder as .png."""
    return {
        f"{TOP}/A/sym.png": (special(f"{TOP}/A/sym.png", tarfile.SYMTYPE, "/etc/passwd"), "link"),
        f"{TOP}/A/symout.png": (
            special(f"{TOP}/A/symout.png", tarfile.SYMTYPE, f"{abs_dir}/link-target"),
            "link",
        ),
        f"{TOP}/A/hard.png": (
            special(f"{TOP}/A/hard.png", tarfile.LNKTYPE, f"{TOP}/A/good0.png"),
            "link",
        ),
        f"{TOP}/A/chr.png": (special(f"{TOP}/A/chr.png", tarfile.CHRTYPE), "device entry"),
        f"{TOP}/A/blk.png": (special(f"{TOP}/A/blk.png", tarfile.BLKTYPE), "device entry"),
        f"{TOP}/A/fifo.png": (special(f"{TOP}/A/fifo.png", tarfile.FIFOTYPE), "device entry"),
    }


def members(abs_dir: Path) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """Every member of the messy archive, as (info, data) in a canonical order."""
    out = []
    folder = tarfile.TarInfo(f"{TOP}/A")
    folder.type = tarfile.DIRTYPE
    out.append((folder, None))
    files = {name: png_bytes(px) for name, px in good_images().items()}
    files.update({name: data for name, (data, _, _) in bad_files(abs_dir).items()})
    # An exact second copy of a good image under the same path.
    files_dup = (f"{TOP}/C/good0.png", files[f"{TOP}/C/good0.png"])
    for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size = len(data)
        out.append((info, data))
    info = tarfile.TarInfo(files_dup[0])
    info.size = len(files_dup[1])
    out.append((info, files_dup[1]))
    out.extend((info, None) for info, _ in special_members(abs_dir).values())
    return out


def write_members(path: Path, items: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for info, data in items:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return path


@pytest.fixture
def abs_dir() -> Path:
    """An absolute folder outside tmp_path that must never be created."""
    path = Path(f"/tmp/notmnist-clean-test-{uuid.uuid4().hex}")
    yield path
    assert not path.exists(), f"{path} was created"


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def expected_rejections(abs_dir: Path) -> dict[str, tuple[str, str]]:
    want = {stored_path(n): (r, d) for n, (_, r, d) in bad_files(abs_dir).items()}
    want.update({n: (r, "") for n, (_, r) in special_members(abs_dir).items()})
    return want


def test_scan_rejects_every_bad_member_and_writes_nothing(tmp_path, abs_dir, monkeypatch):
    work = tmp_path / "work" / "deeper"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)  # a relative escape would land inside tmp_path, where we look
    archive = write_members(tmp_path / "messy.tar.gz", members(abs_dir))
    before = tree(tmp_path)

    images, index, rejected = decode.scan(archive)

    assert tree(tmp_path) == before, "scan wrote to disk"
    for escaped in (
        tmp_path / "evil.png",
        tmp_path / "work" / "evil.png",
        work / "evil2.png",
        tmp_path.parent / "evil.png",
        tmp_path.parent / "evil2.png",
        abs_dir,
        abs_dir / "abs.png",
    ):
        assert not escaped.exists(), escaped

    want = expected_rejections(abs_dir)
    dup = f"{TOP}/C/good0.png"
    got = {(r.path, r.reason, r.detail) for r in rejected.fillna("").itertuples()}
    # The truncation detail carries a byte count after the message; compare its start.
    got_fixed = {(p, r, d.split(" (")[0] if r == "truncated" else d) for p, r, d in got}
    assert got_fixed == {(p, r, d) for p, (r, d) in want.items()} | {
        (dup, "duplicate path", "2 copies")
    }
    assert len(rejected) == len(want) + 2  # both copies of the duplicated path
    assert list(rejected.columns) == ["path", "reason", "detail"]
    assert list(rejected["path"]) == sorted(rejected["path"])

    good = {stored_path(n): px for n, px in good_images().items()}
    # Neither copy of a duplicated path is kept: which one would win depends on member order.
    assert set(rejected["path"]) & set(good) == {dup}
    del good[dup]
    assert list(index.columns) == ["path", "letter", "class_id", "sha256"]
    assert list(index["path"]) == sorted(good)
    assert images.dtype == np.uint8 and images.shape == (len(good), 28, 28)
    for row, px in zip(index.itertuples(), images, strict=True):
        np.testing.assert_array_equal(px, good[row.path])
        letter = row.path.split("/")[-2]
        assert row.letter == letter
        assert row.class_id == LETTERS.index(letter)
        assert row.sha256 == hashlib.sha256(good[row.path].tobytes()).hexdigest()


def test_scan_empty_archive_keeps_nothing(tmp_path):
    archive = make_archive(tmp_path / "a.tar.gz", {"readme.txt": b"hi"})
    images, index, rejected = decode.scan(archive)
    assert images.shape == (0, 28, 28) and images.dtype == np.uint8
    assert len(index) == 0 and list(index.columns) == ["path", "letter", "class_id", "sha256"]
    assert rejected[["path", "reason"]].values.tolist() == [["readme.txt", "not a .png"]]


def test_scan_ignores_member_order(tmp_path, abs_dir):
    items = members(abs_dir)
    ref = decode.scan(write_members(tmp_path / "ref.tar.gz", items))
    for seed in range(3):
        shuffled = items[:]
        random.Random(seed).shuffle(shuffled)
        got = decode.scan(write_members(tmp_path / f"s{seed}.tar.gz", shuffled))
        np.testing.assert_array_equal(got[0], ref[0])
        pd.testing.assert_frame_equal(got[1], ref[1])
        pd.testing.assert_frame_equal(got[2], ref[2])


def test_scan_duplicate_path_with_different_pixels_ignores_order(tmp_path):
    name = f"{TOP}/A/same.png"
    first, second = png_bytes(glyph(1)), png_bytes(glyph(2))
    with tarfile.open(tmp_path / "ab.tar.gz", "w:gz") as tar:
        add_file(tar, name, first)
        add_file(tar, name, second)
    with tarfile.open(tmp_path / "ba.tar.gz", "w:gz") as tar:
        add_file(tar, name, second)
        add_file(tar, name, first)
    ab = decode.scan(tmp_path / "ab.tar.gz")
    ba = decode.scan(tmp_path / "ba.tar.gz")
    np.testing.assert_array_equal(ab[0], ba[0])


def project(tmp_path: Path, archive_bytes: bytes | None) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    write_params(root)
    if archive_bytes is not None:
        raw = Paths(root).raw_archive
        raw.parent.mkdir(parents=True)
        raw.write_bytes(archive_bytes)
    return root


def outputs(root: Path) -> dict[str, bytes]:
    p = Paths(root)
    files = [p.clean_dir / "images.npy", p.clean_dir / "index.csv", p.data_reports / "rejected.csv"]
    return {str(f.relative_to(root)): f.read_bytes() for f in files}


def test_main_end_to_end_is_repeatable(tmp_path, abs_dir):
    archive = write_members(tmp_path / "messy.tar.gz", members(abs_dir))
    root = project(tmp_path, archive.read_bytes())
    assert clean.main(["--root", str(root)]) == 0
    first = outputs(root)

    p = Paths(root)
    images = np.load(p.clean_dir / "images.npy", allow_pickle=False)
    good = {stored_path(n): px for n, px in good_images().items()}
    del good[f"{TOP}/C/good0.png"]  # twice in the archive: both copies rejected
    assert images.dtype == np.uint8 and images.shape == (len(good), 28, 28)
    loaded, index = decode.load_clean(p.clean_dir)
    np.testing.assert_array_equal(loaded, images)
    assert list(index["path"]) == sorted(good)
    for path, px in zip(index["path"], images, strict=True):
        np.testing.assert_array_equal(px, good[path])
    rejected = pd.read_csv(p.data_reports / "rejected.csv")
    assert list(rejected.columns) == ["path", "reason", "detail"]
    assert set(rejected["path"]) == set(expected_rejections(abs_dir)) | {f"{TOP}/C/good0.png"}
    assert not (root / "evil.png").exists() and not (root.parent / "evil.png").exists()

    assert clean.main(["--root", str(root)]) == 0
    assert outputs(root) == first
    # No temp files are left beside the outputs.
    assert sorted(f.name for f in p.clean_dir.iterdir()) == ["images.npy", "index.csv"]
    assert sorted(f.name for f in p.data_reports.iterdir()) == ["rejected.csv"]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clean: error: "), err
    return lines[0]


def test_main_missing_archive_exits_1(tmp_path, capsys):
    root = project(tmp_path, None)
    assert clean.main(["--root", str(root)]) == 1
    line = one_error_line(capsys)
    assert "data/raw/notMNIST.tar.gz" in line
    assert not Paths(root).clean_dir.exists()


def test_scan_not_an_archive_raises_stage_error(tmp_path):
    bad = tmp_path / "x.tar.gz"
    bad.write_text("this is not a tar archive\n")
    with pytest.raises(StageError, match="not a readable tar archive"):
        decode.scan(bad)


def test_main_not_an_archive_exits_1_with_one_line(tmp_path, capsys):
    root = project(tmp_path, b"this is not a tar archive\n")
    assert clean.main(["--root", str(root)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("clean: error:") and "not a readable tar archive" in err
    assert len(err.strip().splitlines()) == 1, err


def test_main_truncated_archive_exits_1(tmp_path, capsys):
    data = make_archive(
        tmp_path / "a.tar.gz", {f"{TOP}/A/i{i}.png": png_bytes(glyph(i)) for i in range(30)}
    ).read_bytes()
    root = project(tmp_path, data[: len(data) // 2])
    assert clean.main(["--root", str(root)]) == 1
    assert "clean: error:" in capsys.readouterr().err


# Streaming and parallel decoding


def messy_with_many(abs_dir: Path, extra: int) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The messy archive plus `extra` good images, so that it spans many batches."""
    items = members(abs_dir)
    for i in range(extra):
        data = png_bytes(glyph(5000 + i))
        info = tarfile.TarInfo(f"{TOP}/{LETTERS[i % 10]}/many{i:04d}.png")
        info.size = len(data)
        items.append((info, data))
    random.Random(1).shuffle(items)  # rows are sorted by path whatever the member order
    return items


@pytest.fixture
def second_thread():
    """A live second thread: helpers are then spawned, not forked."""
    import threading

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait)
    thread.start()
    assert decode._context().get_start_method() == "spawn"
    yield
    stop.set()
    thread.join()


@pytest.mark.parametrize("processes, start", [(2, "fork"), (3, "fork"), (2, "spawn")])
def test_parallel_decode_is_byte_identical_to_one_process(
    tmp_path, abs_dir, monkeypatch, request, processes, start
):
    if start == "spawn":
        request.getfixturevalue("second_thread")
    monkeypatch.setattr(decode, "BATCH", 7)  # many small batches, a partial one at the end
    monkeypatch.setattr(decode, "CHUNK_ROWS", 16)  # images.npy written in chunks, by threads
    archive = write_members(tmp_path / "messy.tar.gz", messy_with_many(abs_dir, 200))
    outputs = {}
    for n in (1, processes):
        out = tmp_path / f"p{n}"
        out.mkdir()
        _, rejected = decode.clean_archive(archive, out, n)
        decode.write_csv(out / "rejected.csv", decode.REJECTED_COLUMNS, rejected)
        outputs[n] = {f.name: f.read_bytes() for f in sorted(out.iterdir())}
    assert sorted(outputs[1]) == ["images.npy", "index.csv", "rejected.csv"]  # no temp file left
    assert outputs[processes] == outputs[1]
    rejected = pd.read_csv(tmp_path / "p1" / "rejected.csv")
    assert len(rejected) == len(expected_rejections(abs_dir)) + 2
    # The images file is exactly what np.save writes for the same array.
    images, index, _ = decode.scan(archive)
    assert len(index) == len(good_images()) - 1 + 200
    buf = io.BytesIO()
    np.save(buf, images, allow_pickle=False)
    assert buf.getvalue() == outputs[1]["images.npy"]


@pytest.mark.parametrize("rows", [0, 1, 5])
def test_npy_header_and_chunks_match_numpy(tmp_path, monkeypatch, rows):
    images = np.stack([glyph(i) for i in range(rows)]) if rows else np.zeros((0, 28, 28), np.uint8)
    buf = io.BytesIO()
    np.save(buf, images, allow_pickle=False)
    header = io.BytesIO()
    decode.write_npy_header(header, rows)
    assert buf.getvalue() == header.getvalue() + images.tobytes()

    path = tmp_path / "images.npy"
    path.write_bytes(buf.getvalue())
    assert decode.npy_layout(path)[:2] == ((rows, 28, 28), np.dtype(np.uint8))
    chunks = list(decode.image_chunks(path, rows=2))
    assert len(chunks) == (rows + 1) // 2
    got = np.concatenate(chunks) if chunks else np.zeros((0, 28, 28), np.uint8)
    np.testing.assert_array_equal(got, images)


def test_image_chunks_report_a_short_file(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, np.stack([glyph(i) for i in range(4)]), allow_pickle=False)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(StageError, match="ends after 2 images of 4"):
        list(decode.image_chunks(path, rows=2))


def test_members_forgets_each_header_once_the_next_is_read(tmp_path):
    archive = make_archive(
        tmp_path / "a.tar.gz", {f"{TOP}/A/i{i}.png": png_bytes(glyph(i)) for i in range(50)}
    )
    seen = 0
    with tarfile.open(archive, "r:*") as tar:
        for _ in archive_lib.members(tar):
            seen += 1
            assert len(tar.members) <= 1  # TarFile would otherwise keep all of them
    assert seen == 50


def tar_bytes(files: dict[str, bytes]) -> bytes:
    """An uncompressed tar archive of `files`, in memory."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:") as tar:
        for name, data in files.items():
            add_file(tar, name, data)
    return out.getvalue()


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_decoded_keeps_order_and_reads_a_bounded_number_of_pieces_ahead(processes):
    pulled, taken, ahead = 0, 0, []
    pieces = [
        tar_bytes({f"{TOP}/A/{b}-{i}.png": png_bytes(glyph(100 * b + i)) for i in range(2)})
        for b in range(120)
    ]

    def source():
        nonlocal pulled
        for piece in pieces:
            pulled += 1
            yield piece

    results = []
    for result in decode.decoded(source(), processes, decode.decode_piece):
        taken += 1
        ahead.append(pulled - taken)
        results.append(result)
    assert results == [decode.decode_piece(p) for p in pieces]
    assert [r[0] for _, records in results for r in records] == [
        f"{TOP}/A/{b}-{i}.png" for b in range(120) for i in range(2)
    ]
    assert max(ahead) <= decode.AHEAD * processes < len(pieces)  # never the whole archive


def long_named(abs_dir: Path, fmt: int, path: Path) -> Path:
    """The messy archive in tar format `fmt`, plus members whose names need extended headers
    (over 100 characters) and, in pax format, a global header."""
    items = members(abs_dir)
    for i in range(3):
        name = f"{TOP}/{LETTERS[i]}/{'long' * 30}{i}.png"
        info = tarfile.TarInfo(name)
        data = png_bytes(glyph(500 + i))
        info.size = len(data)
        items.insert(2 * i + 1, (info, data))
    extra = {"pax_headers": {"comment": "global"}} if fmt == tarfile.PAX_FORMAT else {}
    with tarfile.open(path, "w:gz", format=fmt, **extra) as tar:
        for info, data in items:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return path


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_pieces_of_any_size_read_as_the_whole_archive(tmp_path, abs_dir, monkeypatch, fmt):
    """Cut between any two members, with long names and a too-large member, every piece reads
    as tarfile reads those members in the whole archive."""
    archive = long_named(abs_dir, fmt, tmp_path / "long.tar.gz")
    with tarfile.open(archive) as tar:
        want = [archive_lib.member_path(m.name) for m in tar if not m.isdir()]
    assert any(len(name) > 100 for name in want)
    whole = decode.scan(archive)
    for per_piece in (1, 2, 3, 7):
        monkeypatch.setattr(decode, "BATCH", per_piece)
        pieces = list(decode.pieces(archive))
        got = [r[0] for piece in pieces for r in decode.decode_piece(piece)[1]]
        assert got == want
        for piece in pieces:
            with tarfile.open(fileobj=io.BytesIO(piece)) as tar:  # reads the first header
                assert fmt != tarfile.PAX_FORMAT or tar.pax_headers == {"comment": "global"}
        assert len(pieces) >= len(want) // per_piece
        images, index, rejected = decode.scan(archive)
        np.testing.assert_array_equal(images, whole[0])
        pd.testing.assert_frame_equal(index, whole[1])
        pd.testing.assert_frame_equal(rejected, whole[2])
    assert ("too large" in set(whole[2]["reason"])) and len(whole[1]) == 2 * len(LETTERS) + 3


def test_a_too_large_member_is_skipped_not_held(tmp_path):
    """Its data never enters a piece: the piece holds its header alone."""
    big = f"{TOP}/A/big.png"
    files = {big: bytes(3 * decode.MAX_FILE_BYTES), f"{TOP}/A/ok.png": png_bytes(glyph(1))}
    archive = make_archive(tmp_path / "a.tar.gz", files)
    pieces = list(decode.pieces(archive))
    assert max(len(p) for p in pieces) < decode.MAX_FILE_BYTES
    assert [r[:2] for p in pieces for r in decode.decode_piece(p)[1]] == [
        (big, "too large"),
        (f"{TOP}/A/ok.png", ""),
    ]


@pytest.mark.parametrize("where", ["first", "later"])
def test_a_bad_header_fails_the_stage(tmp_path, where):
    data = bytearray(tar_bytes({f"{TOP}/A/i{i}.png": png_bytes(glyph(i)) for i in range(3)}))
    with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
        offset = tar.getmembers()[0 if where == "first" else 2].offset
    data[offset + 148 : offset + 156] = b"0000000\0"  # a wrong checksum
    archive = tmp_path / "bad.tar"
    archive.write_bytes(bytes(data))
    with pytest.raises(StageError, match="not a readable tar archive"):
        decode.scan(archive)


def test_tables_are_written_as_pandas_writes_them(tmp_path):
    rows = [
        ("a/A/x.png", "not an image", ""),
        ('q"uote,comma/B/ü.png', "wrong size", "1x2"),
        ("new\nline/C/ .png", "corrupt", 'a "quoted", detail'),
        ("", "", ""),
    ]
    for some in (rows, []):
        decode.write_csv(tmp_path / "ours.csv", decode.REJECTED_COLUMNS, some)
        pd.DataFrame(some, columns=list(decode.REJECTED_COLUMNS)).to_csv(
            tmp_path / "pandas.csv", index=False
        )
        assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "pandas.csv").read_bytes()
    # index.csv's lines are made where the images are decoded, most without the csv module
    paths = [r[0] for r in rows[:3]] + [
        "a,b/F/c.png",
        'say "hi"/E/q.png',
        "x\r/J/y.png",
        "plain/D/ok.png",
    ]
    ours = (
        ",".join(decode.INDEX_COLUMNS)
        + "\n"
        + "".join(decode.index_line(p, f"{i:064x}") for i, p in enumerate(paths))
    )
    letters = [p.split("/")[-2] for p in paths]
    pd.DataFrame(
        {
            "path": paths,
            "letter": letters,
            "class_id": [LETTERS.index(c) for c in letters],
            "sha256": [f"{i:064x}" for i in range(len(paths))],
        }
    ).to_csv(tmp_path / "pandas.csv", index=False)
    assert ours.encode() == (tmp_path / "pandas.csv").read_bytes()


def test_clean_memory_stays_below_one_copy_of_the_pixels(tmp_path, monkeypatch):
    """Traced allocations, not timings: the old decode-everything-then-stack design peaked at
    3.3 copies of the pixels; streaming holds a few batches and one record per image."""
    import tracemalloc

    n = 6000
    files = {f"{TOP}/{LETTERS[i % 10]}/i{i:05d}.png": png_bytes(glyph(i)) for i in range(n)}
    archive = make_archive(tmp_path / "a.tar.gz", files)
    del files
    monkeypatch.setattr(decode, "CHUNK_ROWS", 256)  # what a large archive sees per chunk
    tracemalloc.start()
    try:
        kept, _ = decode.clean_archive(archive, tmp_path, 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept == n
    assert peak < n * 28 * 28, f"peak {peak:,} bytes for {n * 28 * 28:,} bytes of pixels"


DECODE_INTO = decode.decode_into


def die_in_a_helper(*args):
    """decode_into, except that a helper process exits at once (as if killed)."""
    if multiprocessing.parent_process() is not None:
        os._exit(3)
    return DECODE_INTO(*args)


def test_a_decoding_process_that_dies_fails_the_stage_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "decode_into", die_in_a_helper)
    monkeypatch.setattr(decode, "BATCH", 4)
    archive = make_archive(
        tmp_path / "a.tar.gz", {f"{TOP}/A/i{i}.png": png_bytes(glyph(i)) for i in range(40)}
    )
    with pytest.raises(StageError, match="a decoding process died"):
        decode.clean_archive(archive, tmp_path, 2)
    assert list(tmp_path.iterdir()) == [archive]  # no half-written images, no temp file


def test_main_reads_clean_workers(tmp_path, abs_dir, capsys):
    archive = write_members(tmp_path / "messy.tar.gz", members(abs_dir))
    root = project(tmp_path, archive.read_bytes())
    write_params(root, clean={"workers": 2})
    assert clean.main(["--root", str(root)]) == 0
    assert "(2 decoding processes)" in capsys.readouterr().err
    two = outputs(root)
    write_params(root, clean={"workers": 1})
    assert clean.main(["--root", str(root)]) == 0
    assert outputs(root) == two
    write_params(root, clean={"workers": -1})
    assert clean.main(["--root", str(root)]) == 1
    assert "clean.workers: must be an integer >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("processes", [1, 2])
def test_truncated_archive_stops_cleanly_with_helpers(tmp_path, processes):
    data = make_archive(
        tmp_path / "a.tar.gz", {f"{TOP}/A/i{i}.png": png_bytes(glyph(i)) for i in range(600)}
    ).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StageError, match="not a readable tar archive"):
        decode.clean_archive(cut, out, processes)
    assert list(out.iterdir()) == []  # the raw rows file is gone too
