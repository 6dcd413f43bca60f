"""Stage `download`: sources tried in order, content verified, resumed HTTP, atomic output.

Every HTTP test talks to a throw-away server on 127.0.0.1 whose behaviour per request is
scripted by the test (serve, 404, 500, drop part-way, ignore Range, stall).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.config import DataParams, StageError
from pipeline.data import archive as archive_lib
from pipeline.data.archive import SourceError, content_digest, fetch, fetch_http
from pipeline.stages.download import main
from tests.conftest import (
    MIRROR_DIGEST,
    make_archive,
    png_bytes,
    tiny_dataset,
    write_params,
)

# --------------------------------------------------------------------------- local HTTP server

Route = Callable[["_Handler", int], None]


class _Handler(BaseHTTPRequestHandler):
    """Records each request, then runs the route registered for its path (404 if none)."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        srv: Server = self.server.owner
        with srv.lock:
            nth = sum(1 for path, _ in srv.requests if path == self.path)
            srv.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        route = srv.routes.get(self.path)
        try:
            if route is None:
                self.send_error(404)
            else:
                route(self, nth)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on us
            self.close_connection = True


class _HTTPServer(ThreadingHTTPServer):
    def server_bind(self) -> None:  # skip HTTPServer's getfqdn(): no DNS on a test machine
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up mid-response is part of what we test


class Server:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.lock = threading.Lock()
        self.release = threading.Event()  # set at teardown: stalled handlers finish
        self.httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def route(self, path: str, fn: Route) -> str:
        """Serve `path` with fn(handler, n) (n = how many earlier requests for path); its URL."""
        self.routes[path] = fn
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def headers(self, path: str) -> list[dict[str, str]]:
        """Headers of each request for `path`, in arrival order (keys lower-case)."""
        return [h for p, h in self.requests if p == path]


@pytest.fixture
def server():
    srv = Server()
    srv.thread.start()
    yield srv
    srv.release.set()
    srv.httpd.shutdown()
    srv.httpd.server_close()
    srv.thread.join(5)


def send(h: _Handler, data: bytes, *, ranges: bool = True, status: int = 200) -> None:
    """Reply with `data`; a 'Range: bytes=N-' gets 206 and data[N:] unless ranges=False."""
    m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
    if ranges and m and status == 200:
        start = int(m.group(1))
        body = data[start:]
        h.send_response(206)
        h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    else:
        body = data
        h.send_response(status)
    h.send_header("Content-Type", "application/gzip")
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    h.wfile.write(body)


def send_cut(h: _Handler, data: bytes, cut: int) -> None:
    """Announce all of `data`, write only data[:cut], then hang up."""
    h.send_response(200)
    h.send_header("Content-Type", "application/gzip")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    h.wfile.write(data[:cut])
    h.wfile.flush()
    h.close_connection = True


def send_status(h: _Handler, status: int) -> None:
    h.send_response(status)
    h.send_header("Content-Length", "0")
    h.end_headers()


def stall(h: _Handler, head: bytes | None = None, total: int = 0) -> None:
    """Say nothing (head=None) or send headers and `head` of a `total`-byte body; then hang."""
    if head is not None:
        h.send_response(200)
        h.send_header("Content-Length", str(total))
        h.end_headers()
        h.wfile.write(head)
        h.wfile.flush()
    h.server.owner.release.wait(10)
    h.close_connection = True


# --------------------------------------------------------------------------- fixtures, helpers


@pytest.fixture(autouse=True)
def sleeps(monkeypatch) -> list[float]:
    """Retries back off through download.time.sleep: record the waits instead of sleeping."""
    waits: list[float] = []
    monkeypatch.setattr(archive_lib, "time", SimpleNamespace(sleep=waits.append))
    return waits


@pytest.fixture(autouse=True)
def restore_logging():
    """cli.run points the 'pipeline' logger at the current (captured) stderr; undo that."""
    saved = {}
    for name in ("pipeline", "__main__"):
        lg = logging.getLogger(name)
        saved[name] = (list(lg.handlers), lg.level, lg.propagate)
    yield
    for name, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(name)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A ~100 kB valid archive (more than one 64 kB read chunk), 12 PNGs per letter."""
    return make_archive(tmp_path_factory.mktemp("src") / "small.tar.gz", tiny_dataset(12))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_archive(tmp_path_factory.mktemp("src") / "tiny.tar.gz", tiny_dataset(2))


def params(*sources: str, digest: str | None = None, retries: int = 2, **kw) -> DataParams:
    return DataParams(sources=list(sources), content_digest=digest, retries=retries, **kw)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def dead_port() -> int:
    """A 127.0.0.1 port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- HTTP: good paths


@pytest.mark.integration
def test_http_fetch_of_real_mirror(server, mirror, tmp_path):
    data = mirror.read_bytes()
    url = server.route("/notMNIST_small.tar.gz", lambda h, n: send(h, data))
    dest = tmp_path / "raw" / "notMNIST_small.tar.gz"

    info = fetch(params(url, digest=MIRROR_DIGEST), dest, tmp_path)

    assert dest.read_bytes() == data
    assert info == {
        "source": url,
        "bytes": len(data),
        "archive_sha256": sha256(data),
        "content_digest": MIRROR_DIGEST,
        "content_digest_checked": True,
    }
    assert leftovers(dest.parent) == [dest.name]  # no temp file beside it
    assert len(server.requests) == 1


def test_dropped_connection_resumes_with_range(server, archive, tmp_path, sleeps):
    data = archive.read_bytes()
    cut = 70_000  # past the first 64 kB chunk
    assert len(data) > cut

    def route(h, n):
        send_cut(h, data, cut) if n == 0 else send(h, data)

    url = server.route("/a.tar.gz", route)
    dest = tmp_path / "out.tar.gz"

    info = fetch(params(url, digest=content_digest(archive)), dest, tmp_path)

    first, second = server.headers("/a.tar.gz")
    assert "range" not in first
    m = re.fullmatch(r"bytes=(\d+)-", second.get("range", ""))
    assert m, f"resume request carried no 'Range: bytes=N-': {second}"
    assert 0 < int(m.group(1)) <= cut
    assert dest.read_bytes() == data
    assert info["bytes"] == len(data) and info["archive_sha256"] == sha256(data)
    assert len(sleeps) == 1  # one retry, one back-off


def test_dropped_connection_server_ignores_range_restarts(server, archive, tmp_path):
    data = archive.read_bytes()

    def route(h, n):
        send_cut(h, data, 70_000) if n == 0 else send(h, data, ranges=False)

    url = server.route("/a.tar.gz", route)
    dest = tmp_path / "out.tar.gz"

    info = fetch(params(url, digest=content_digest(archive)), dest, tmp_path)

    first, second = server.headers("/a.tar.gz")
    assert second.get("range", "").startswith("bytes=")  # it asked to resume ...
    assert dest.read_bytes() == data  # ... got 200 and the whole body: not appended
    assert info["bytes"] == len(data)


def test_fetch_http_survives_several_drops(server, tmp_path):
    data = np.random.default_rng(0).bytes(400_000)  # fetch_http does not look inside
    cuts = [100_000, 200_000, 300_000]  # absolute offsets where response n hangs up

    def route(h, n):
        if n >= len(cuts):
            return send(h, data)
        m = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
        start = int(m.group(1)) if m else 0
        h.send_response(206 if start else 200)
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.send_header("Content-Length", str(len(data) - start))
        h.end_headers()
        h.wfile.write(data[start : cuts[n]])
        h.wfile.flush()
        h.close_connection = True

    url = server.route("/a.bin", route)
    dest = tmp_path / "out.bin"
    fetch_http(url, dest, params(url, retries=3), backoff_s=0)

    assert dest.read_bytes() == data
    ranges = [h.get("range") for h in server.headers("/a.bin")]
    assert len(ranges) == 4 and ranges[0] is None
    starts = [int(re.fullmatch(r"bytes=(\d+)-", r).group(1)) for r in ranges[1:]]
    # each resume starts after the last one and no later than what the server had sent
    assert 0 < starts[0] <= cuts[0] < starts[2] <= cuts[2]
    assert starts[0] < starts[1] <= cuts[1]


def test_500_is_retried(server, tiny, tmp_path, sleeps):
    data = tiny.read_bytes()

    def route(h, n):
        send_status(h, 500) if n < 2 else send(h, data)

    url = server.route("/a.tar.gz", route)
    info = fetch(params(url, retries=2), tmp_path / "out.tar.gz", tmp_path)

    assert len(server.requests) == 3
    assert info["source"] == url and (tmp_path / "out.tar.gz").read_bytes() == data
    assert sleeps == [1.0, 2.0]  # default back-off grows with the attempt


def test_500_every_time_gives_up_after_retries(server, tmp_path):
    url = server.route("/a.tar.gz", lambda h, n: send_status(h, 503))
    with pytest.raises(StageError, match=r"gave up after 3 attempts: HTTP 503"):
        fetch(params(url, retries=2), tmp_path / "raw" / "out.tar.gz", tmp_path)
    assert len(server.requests) == 3
    assert leftovers(tmp_path / "raw") == []


def test_404_is_not_retried(server, tmp_path):
    url = server.url("/missing.tar.gz")
    with pytest.raises(SourceError, match="HTTP 404"):
        fetch_http(url, tmp_path / "out", params(url, retries=3), backoff_s=0)
    assert len(server.requests) == 1


def test_read_timeout_before_headers_fails_clearly(server, tmp_path):
    url = server.route("/slow.tar.gz", lambda h, n: stall(h))
    p = params(url, retries=1, read_timeout_s=0.2)
    with pytest.raises(StageError) as e:
        fetch(p, tmp_path / "raw" / "out.tar.gz", tmp_path)
    msg = str(e.value)
    assert f"{url}: gave up after 2 attempts" in msg
    assert "timed out" in msg.lower()
    assert len(server.requests) == 2
    assert leftovers(tmp_path / "raw") == []


def test_read_timeout_mid_body_then_resume(server, archive, tmp_path):
    data = archive.read_bytes()

    def route(h, n):
        stall(h, data[:70_000], len(data)) if n == 0 else send(h, data)

    url = server.route("/a.tar.gz", route)
    dest = tmp_path / "out.tar.gz"
    fetch(
        params(url, retries=1, read_timeout_s=0.2, digest=content_digest(archive)), dest, tmp_path
    )

    second = server.headers("/a.tar.gz")[1]
    assert re.fullmatch(r"bytes=[1-9]\d*-", second.get("range", ""))
    assert dest.read_bytes() == data


# --------------------------------------------------------------------------- verification


def test_altered_content_is_rejected_and_nothing_left(server, tmp_path):
    files = tiny_dataset(2)
    good = make_archive(tmp_path / "good.tar.gz", files)
    name = sorted(files)[5]
    altered_files = {**files, name: png_bytes(np.zeros((28, 28), dtype=np.uint8))}
    bad = make_archive(tmp_path / "bad.tar.gz", altered_files)
    assert content_digest(bad) != content_digest(good)

    url = server.route("/a.tar.gz", lambda h, n: send(h, bad.read_bytes()))
    dest = tmp_path / "raw" / "notMNIST_small.tar.gz"
    with pytest.raises(StageError) as e:
        fetch(params(url, digest=content_digest(good)), dest, tmp_path)

    msg = str(e.value)
    assert "content digest" in msg
    assert content_digest(good) in msg and content_digest(bad) in msg
    assert leftovers(dest.parent) == []  # no dest, no .tmp
    assert len(server.requests) == 1  # a digest mismatch is not a transfer error: no retry


def test_failed_fetch_keeps_previous_output(server, tiny, tmp_path):
    dest = tmp_path / "raw" / "out.tar.gz"
    dest.parent.mkdir()
    dest.write_bytes(b"previous")
    url = server.url("/missing")
    with pytest.raises(StageError):
        fetch(params(url), dest, tmp_path)
    assert dest.read_bytes() == b"previous"
    assert leftovers(dest.parent) == ["out.tar.gz"]


def test_null_digest_accepts_any_readable_archive(tiny, tmp_path):
    dest = tmp_path / "out.tar.gz"
    info = fetch(params(str(tiny), digest=None), dest, tmp_path)
    assert info["content_digest_checked"] is False
    assert info["content_digest"] == content_digest(tiny)
    assert dest.read_bytes() == tiny.read_bytes()


def test_null_digest_still_rejects_non_archive(tmp_path):
    (tmp_path / "notes.txt").write_text("not a tarball\n")
    with pytest.raises(StageError, match="notes.txt: not a readable tar archive"):
        fetch(params("notes.txt"), tmp_path / "out" / "x.tar.gz", tmp_path)


def test_empty_archive_is_rejected(tmp_path):
    make_archive(tmp_path / "empty.tar.gz", {})
    with pytest.raises(StageError, match="archive holds no files"):
        fetch(params("empty.tar.gz"), tmp_path / "out" / "x.tar.gz", tmp_path)


def test_content_digest_ignores_packing(tmp_path):
    files = tiny_dataset(2)
    a = make_archive(tmp_path / "a.tar.gz", files)
    b = make_archive(tmp_path / "b.tar.gz", dict(reversed(files.items())))
    c = make_archive(tmp_path / "c.tar.gz", {f"./{k}": v for k, v in files.items()})
    assert content_digest(a) == content_digest(b) == content_digest(c)
    assert a.read_bytes() != b.read_bytes()


# --------------------------------------------------------------------------- source kinds, order


def test_404_falls_through_to_local_path(server, tiny, tmp_path):
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "t.tar.gz").write_bytes(tiny.read_bytes())
    bad = server.url("/gone.tar.gz")
    dest = tmp_path / "raw" / "out.tar.gz"

    info = fetch(params(bad, "mirror/t.tar.gz", digest=content_digest(tiny)), dest, tmp_path)

    assert info["source"] == "mirror/t.tar.gz"  # relative to root
    assert dest.read_bytes() == tiny.read_bytes()
    assert len(server.requests) == 1


def test_404_falls_through_to_second_url(server, tiny, tmp_path):
    bad = server.url("/gone.tar.gz")
    good = server.route("/ok.tar.gz", lambda h, n: send(h, tiny.read_bytes()))
    dest = tmp_path / "out.tar.gz"
    info = fetch(params(bad, good, digest=content_digest(tiny)), dest, tmp_path)
    assert info["source"] == good
    assert [p for p, _ in server.requests] == ["/gone.tar.gz", "/ok.tar.gz"]


def test_first_good_source_wins(server, tiny, tmp_path):
    url = server.route("/ok.tar.gz", lambda h, n: send(h, tiny.read_bytes()))
    info = fetch(params(str(tiny), url), tmp_path / "out.tar.gz", tmp_path)
    assert info["source"] == str(tiny)
    assert server.requests == []  # never reached


def test_partial_download_of_failed_source_does_not_leak(server, archive, tiny, tmp_path):
    data = archive.read_bytes()
    url = server.route("/a.tar.gz", lambda h, n: send_cut(h, data, 70_000))
    dest = tmp_path / "raw" / "out.tar.gz"
    info = fetch(params(url, str(tiny), retries=1), dest, tmp_path)
    assert info["source"] == str(tiny)
    assert dest.read_bytes() == tiny.read_bytes()
    assert leftovers(dest.parent) == ["out.tar.gz"]


def test_file_url_source(tiny, tmp_path):
    folder = tmp_path / "with space"
    folder.mkdir()
    src = folder / "t.tar.gz"
    src.write_bytes(tiny.read_bytes())
    url = src.as_uri()
    assert "%20" in url
    dest = tmp_path / "out.tar.gz"
    info = fetch(params(url, digest=content_digest(tiny)), dest, tmp_path)
    assert info["source"] == url
    assert dest.read_bytes() == tiny.read_bytes()


def test_unsupported_scheme(tmp_path):
    with pytest.raises(StageError, match="unsupported scheme 'ftp'"):
        fetch(params("ftp://127.0.0.1/x.tar.gz"), tmp_path / "out.tar.gz", tmp_path)


def test_connection_refused_is_retried_then_reported(tmp_path, sleeps):
    url = f"http://127.0.0.1:{dead_port()}/x.tar.gz"
    with pytest.raises(StageError, match=r"gave up after 3 attempts"):
        fetch(params(url, retries=2), tmp_path / "out.tar.gz", tmp_path)
    assert len(sleeps) == 2


# --------------------------------------------------------------------------- main(--root)


REASONS = ["HTTP 404", "no such file$", "not a readable tar archive", "gave up after 2 attempts"]


def bad_sources(server, root: Path) -> list[str]:
    (root / "notes.txt").write_text("hello\n")
    return [
        server.url("/gone.tar.gz"),
        "missing/notMNIST_small.tar.gz",
        "notes.txt",
        f"http://127.0.0.1:{dead_port()}/notMNIST_small.tar.gz",
    ]


def test_main_all_sources_fail(server, tmp_path, capsys):
    sources = bad_sources(server, tmp_path)
    write_params(tmp_path, data={"sources": sources, "retries": 1})

    rc = main(["--root", str(tmp_path)])

    err = capsys.readouterr().err
    assert rc == 1
    assert "download: error: no source gave verified content:" in err
    report = err.split("download: error: ", 1)[1]
    for source, reason in zip(sources, REASONS, strict=True):
        assert re.search(rf"^  {re.escape(source)}: {reason}", report, re.M), (source, report)
    assert leftovers(tmp_path / "data" / "raw") == []
    assert not (tmp_path / "reports" / "data" / "download.json").exists()


def test_main_writes_archive_and_report(tiny, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "t.tar.gz").write_bytes(tiny.read_bytes())
    write_params(tmp_path, data={"sources": ["in/t.tar.gz"], "content_digest": None})

    assert main(["--root", str(tmp_path)]) == 0

    out = tmp_path / "data" / "raw" / "notMNIST.tar.gz"
    assert out.read_bytes() == tiny.read_bytes()
    report = json.loads((tmp_path / "reports" / "data" / "download.json").read_text())
    assert report == {
        "source": "in/t.tar.gz",
        "bytes": len(tiny.read_bytes()),
        "archive_sha256": sha256(tiny.read_bytes()),
        "content_digest": content_digest(tiny),
        "content_digest_checked": False,
    }


def test_main_rejects_bad_params(tmp_path, capsys):
    write_params(tmp_path, data={"sources": []})
    assert main(["--root", str(tmp_path)]) == 1
    assert "data.sources: must be a non-empty list" in capsys.readouterr().err


# --------------------------------------------------------------------------- error details


def test_connection_refused_reason_is_visible(tmp_path):
    url = f"http://127.0.0.1:{dead_port()}/x.tar.gz"
    with pytest.raises(StageError) as e:
        fetch(params(url, retries=0), tmp_path / "out.tar.gz", tmp_path)
    assert "refused" in str(e.value).lower()


def test_content_encoding_gzip_saves_the_archive_as_published(server, tiny, tmp_path):
    data = tiny.read_bytes()

    def route(h, n):
        h.send_response(200)
        h.send_header("Content-Encoding", "gzip")  # e.g. Apache's AddEncoding x-gzip .gz
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    url = server.route("/a.tar.gz", route)
    dest = tmp_path / "out.tar.gz"
    info = fetch(params(url), dest, tmp_path)
    assert info["archive_sha256"] == sha256(data)


def test_main_failure_is_one_line_per_source(server, tmp_path, capsys):
    sources = bad_sources(server, tmp_path)
    write_params(tmp_path, data={"sources": sources, "retries": 0})
    assert main(["--root", str(tmp_path)]) == 1
    lines = capsys.readouterr().err.split("download: error: ", 1)[1].splitlines()
    assert lines[0] == "no source gave verified content:"
    assert [line.strip().split(": ", 1)[0] for line in lines[1:]] == sources


# --------------------------------------------------------------------------- data variants

LARGE_URL = "http://yaroslavvb.com/upload/notMNIST/notMNIST_large.tar.gz"


def data_params(path: Path, **values) -> DataParams:
    from pipeline.config import load

    write_params(path, data=values)
    return load(path / "params.yaml", "data", DataParams)


def test_default_variant_is_the_small_mirror_checked_by_digest(tmp_path):
    p = data_params(tmp_path)
    assert p.variant == "small"
    assert p.sources == [
        "../shared/data/notMNIST_small.tar.gz",
        "http://yaroslavvb.com/upload/notMNIST/notMNIST_small.tar.gz",
    ]
    assert p.content_digest == MIRROR_DIGEST


def test_large_variant_is_the_canonical_url_with_no_digest_yet(tmp_path):
    p = data_params(tmp_path, variant="large")
    assert (p.sources, p.content_digest) == ([LARGE_URL], None)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"variant": "huge"}, r"data.variant: 'huge' is not one of \['large', 'small'\]"),
        ({"variant": ""}, "data.variant: must be a name"),
        (
            {"variant": "large", "content_digest": {"small": MIRROR_DIGEST}},
            r"data.content_digest: no entry for variant 'large' \(has \['small'\]\)",
        ),
        (
            {"variant": "large", "content_digest": {"large": "abc"}},
            "data.content_digest: must be 64",
        ),
        ({"sources": {"small": []}}, "data.sources: must be a non-empty list"),
    ],
)
def test_bad_variant_settings_name_the_key(tmp_path, values, message):
    from pipeline.config import load

    write_params(tmp_path, data=values)
    with pytest.raises(StageError, match=message):
        load(tmp_path / "params.yaml", "data", DataParams)


def test_a_plain_list_of_sources_serves_any_variant(tmp_path):
    p = data_params(tmp_path, variant="mine", sources=["a.tar.gz"], content_digest=None)
    assert (p.variant, p.sources, p.content_digest) == ("mine", ["a.tar.gz"], None)


def test_main_fetches_the_chosen_variant(tiny, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "large.tar.gz").write_bytes(tiny.read_bytes())
    data = {
        "variant": "large",
        "sources": {"small": ["in/missing.tar.gz"], "large": ["in/large.tar.gz"]},
        "content_digest": {"small": MIRROR_DIGEST, "large": None},
    }
    write_params(tmp_path, data=data)
    assert main(["--root", str(tmp_path)]) == 0
    assert (tmp_path / "data" / "raw" / "notMNIST.tar.gz").read_bytes() == tiny.read_bytes()
    report = json.loads((tmp_path / "reports" / "data" / "download.json").read_text())
    assert report["source"] == "in/large.tar.gz" and report["content_digest_checked"] is False

    # The large variant's digest, once recorded, is checked like the small one's.
    data["content_digest"]["large"] = "0" * 64
    write_params(tmp_path, data=data)
    assert main(["--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"content digest {content_digest(tiny)} != expected {'0' * 64}" in err


def test_content_digest_forgets_member_headers(tiny, monkeypatch):
    """Bounded memory on large archives: the digest keeps one line per file, not headers."""
    import tarfile

    most = 0
    real_next = tarfile.TarFile.next

    def counting_next(self):
        nonlocal most
        most = max(most, len(self.members))
        return real_next(self)

    monkeypatch.setattr(tarfile.TarFile, "next", counting_next)
    content_digest(tiny)
    assert most <= 1
