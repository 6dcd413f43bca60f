"""Under load: the served champion with many clients at once, the tracking stores with many writers.

    python -m benchmarks.load serve      # the served champion (pipeline.serve), C clients at once
    python -m benchmarks.load tracking   # K writers on a team stack (PostgreSQL + S3 + server)
    python -m benchmarks.load sqlite     # N writers on one SQLite store, as `dvc queue` workers
    python -m benchmarks.load docs       # tables, plots and docs/load.md again from the JSON

`serve` starts `python -m pipeline.serve -m models:/notmnist-classifier@champion` (MLflow's
scoring server with a request-size limit; --server mlflow: `mlflow models serve` as it comes,
no limit) on 127.0.0.1 and drives it from client threads: C = 1, 4, 16 and 64 clients at once,
batches of 1 and of 64 images, each level for a bounded time, first with good requests only,
then with one request in 20 malformed (wrong shape, NaN, strings, a 10 MB body, truncated
JSON). It records throughput, latency percentiles of the good requests, errors by kind, the
status codes the malformed ones got and the server's peak memory (its process tree, from
/proc). Every request loop stops by itself: at its deadline or after --max-requests requests
per client.

`tracking` and `sqlite` (benchmarks/tracking_load.py) start K or N writer processes at once and
afterwards count, through MlflowClient (and boto3 for the bucket), every run, metric step and
artifact the writers sent; after each level, rounds of the writers logging one data set at the
same moment in a new experiment count how often that loses a run. Each subcommand writes
reports/load/<name>.json, a table <name>.md and a plot <name>.png, then fills the generated
blocks of docs/load.md from them (`python -m scripts.docs docs/load.md`; --no-docs: not).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from pipeline.config import ROOT, Paths
from pipeline.serve import MODEL_URI

log = logging.getLogger("benchmarks.load")

HOST = "127.0.0.1"  # the only address any request of this module goes to
CLIENTS = (1, 4, 16, 64)
BATCHES = (1, 64)
MALFORMED_EVERY = 20  # one request in 20 (5%) is malformed in the mixed phase
KINDS = ("shape", "nan", "strings", "huge", "truncated")
HUGE_BYTES = 10 * 2**20
P99_SLACK = 2.0  # the good requests' p99 with malformed traffic at most 2x the p99 without
CHECK_EVERY = 25  # one good answer in 25 is parsed and checked: (batch, 10), finite
OUT = ROOT / "reports" / "load"
DOC = ROOT / "docs" / "load.md"


# --------------------------------------------------------------------------- request bodies


def pixel_strings() -> list[str]:
    """The JSON text of each pixel value 0..255 once normalized, as the models were trained:
    float32 p/255, then (x - 0.5)/0.5, written as the shortest decimal of that float32."""
    x = (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    return [np.format_float_positional(v, unique=True, trim="-") for v in x]


PIXELS = pixel_strings()


def body(images: np.ndarray) -> bytes:
    """An MLflow request, {"inputs": float32 (n, 28, 28) in [-1, 1]}, from uint8 images."""

    def image(pixels: list[list[int]]) -> str:
        return "[" + ",".join("[" + ",".join(PIXELS[p] for p in row) + "]" for row in pixels) + "]"

    return ('{"inputs": [' + ",".join(image(im) for im in images.tolist()) + "]}").encode()


def malformed(kind: str, images: np.ndarray) -> bytes:
    """A request the server must refuse with a 4xx answer, of one of KINDS."""
    if kind == "shape":  # flat images: (n, 784) where (n, 28, 28) is expected
        flat = images.reshape(len(images), -1).astype(np.float32) / 255
        return json.dumps({"inputs": flat.tolist()}).encode()
    if kind == "nan":  # the right shape, every value NaN (Python's json writes NaN)
        return json.dumps({"inputs": np.full(images.shape, np.nan).tolist()}).encode()
    if kind == "strings":
        return json.dumps({"inputs": [[["x"] * 28] * 28] * len(images)}).encode()
    if kind == "huge":  # 10 MB of numbers in one flat list: a shape no image has
        count = HUGE_BYTES // len("-0.99215686,") + 1
        return ('{"inputs": [' + ",".join(["-0.99215686"] * count) + "]}").encode()
    if kind == "truncated":
        good = body(images)
        return good[: len(good) // 2]
    raise ValueError(f"unknown malformed kind {kind!r}")


def test_images(root: Path, count: int = 1024, seed: int = 0) -> tuple[np.ndarray, str]:
    """Up to `count` uint8 (28, 28) images of the test split under root (data/clean and
    data/split), else random glyphs; and where they came from."""
    paths = Paths(root)
    images_file, split_file = paths.clean_dir / "images.npy", paths.split_dir / "split.csv"
    if images_file.is_file():
        images = np.load(images_file, mmap_mode="r")
        rows = np.arange(len(images))
        if split_file.is_file():
            import pandas as pd

            table = pd.read_csv(split_file, usecols=["split"])
            if len(table) == len(images):
                rows = np.flatnonzero(table["split"].to_numpy() == "test")
        rows = np.random.default_rng(seed).permutation(rows)[:count]
        return np.ascontiguousarray(images[np.sort(rows)]), f"{images_file} (test split)"
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, 28, 28), dtype=np.uint8), "random uint8 glyphs"


@dataclass
class Plan:
    """What each client sends: good bodies in turn, and every `every`-th request malformed
    (0: never), the kinds in turn."""

    batch: int
    good: list[bytes]
    bad: dict[str, bytes]
    every: int = 0

    @classmethod
    def build(cls, images: np.ndarray, batch: int, every: int = 0, bodies: int = 16) -> Plan:
        groups = [images[(i * batch + np.arange(batch)) % len(images)] for i in range(bodies)]
        bad = {kind: malformed(kind, groups[0]) for kind in KINDS}
        return cls(batch, [body(g) for g in groups], bad, every)

    def pick(self, client: int, i: int) -> tuple[str, bytes]:
        if self.every and (i + client) % self.every == self.every - 1:
            kind = KINDS[((i + client) // self.every + client) % len(KINDS)]
            return kind, self.bad[kind]
        return "good", self.good[(i + client) % len(self.good)]


# --------------------------------------------------------------------------- the server


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log_path: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def default_store() -> str:
    return f"sqlite:///{ROOT / 'mlflow.db'}"


def store_dir(tracking_uri: str) -> Path:
    """Where the server runs: beside a SQLite store (relative artifact paths resolve there)."""
    if tracking_uri.startswith("sqlite:///"):
        return Path(tracking_uri.removeprefix("sqlite:///").split("?")[0]).resolve().parent
    return ROOT


def ping(url: str, timeout_s: float = 5.0) -> bool:
    """Whether GET /ping answers 200."""
    conn = http.client.HTTPConnection(HOST, int(url.rsplit(":", 1)[1]), timeout=timeout_s)
    try:
        conn.request("GET", "/ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


SERVERS = {
    "project": ["-m", "pipeline.serve", "-m", MODEL_URI, "--host", HOST],
    "mlflow": ["-m", "mlflow", "models", "serve", "-m", MODEL_URI, "--env-manager", "local"]
    + ["-h", HOST],
}


def server_command(kind: str, workers: int = 1) -> str:
    """The command line `served` starts, as a user would type it (port left out)."""
    return " ".join(["python", *SERVERS[kind]] + (["-w", str(workers)] if workers != 1 else []))


@contextlib.contextmanager
def served(
    tracking_uri: str,
    log_path: Path,
    workers: int = 1,
    start_timeout_s: float = 240,
    kind: str = "project",
) -> Iterator[Server]:
    """The champion served on a free loopback port until the block ends: `python -m
    pipeline.serve` (kind "project"), or `mlflow models serve` as it comes (kind "mlflow").

    Its own process group (the uvicorn workers stop with it); the log goes to log_path.
    """
    port = free_port()
    cmd = [sys.executable, *SERVERS[kind], "-p", str(port), "-w", str(workers)]
    # The server starts `uvicorn` from PATH: this environment's bin folder, as when activated.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "PATH": path}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=store_dir(tracking_uri),
            env=env,
            start_new_session=True,
        )
    server = Server(f"http://{HOST}:{port}", port, proc, log_path)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not ping(server.url, 2.0):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{' '.join(cmd[1:4])} did not start:\n{tail}")
            time.sleep(0.5)
        yield server
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL after 30 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants, from /proc."""
    parent, rss = {}, {}
    page = os.sysconf("SC_PAGE_SIZE")
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # from field 3 (state) on
        parent[int(entry.name)], rss[int(entry.name)] = int(fields[1]), int(fields[21]) * page
    tree, todo = set(), [pid]
    children: dict[int, list[int]] = {}
    for p, pp in parent.items():
        children.setdefault(pp, []).append(p)
    while todo:
        p = todo.pop()
        if p in rss and p not in tree:
            tree.add(p)
            todo += children.get(p, [])
    return sum(rss[p] for p in tree)


class PeakMemory:
    """Samples tree_rss(pid) every `every_s` in a thread while the block runs; .peak in bytes."""

    def __init__(self, pid: int, every_s: float = 0.2):
        self.pid, self.every_s, self.peak = pid, every_s, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, tree_rss(self.pid))
            if self._done.wait(self.every_s):
                return

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss(self.pid))


# --------------------------------------------------------------------------- clients


@dataclass
class Tally:
    """One client's requests: latencies of the good ones answered 200, errors, malformed."""

    latencies: list[float] = field(default_factory=list)
    sent: Counter = field(default_factory=Counter)  # good / malformed kind -> requests
    errors: Counter = field(default_factory=Counter)  # good requests not answered right
    statuses: dict = field(default_factory=dict)  # malformed kind -> Counter(status)
    bad_seconds: dict = field(default_factory=dict)  # malformed kind -> seconds to answer

    def merge(self, other: Tally) -> None:
        self.latencies += other.latencies
        for kind, seconds in other.bad_seconds.items():
            self.bad_seconds.setdefault(kind, []).extend(seconds)
        self.sent.update(other.sent)
        self.errors.update(other.errors)
        for kind, counts in other.statuses.items():
            self.statuses.setdefault(kind, Counter()).update(counts)


def post(conn: http.client.HTTPConnection, data: bytes) -> tuple[int | str, float, bytes]:
    """POST /invocations: (status, or "timeout"/"connection"; seconds; the answer's bytes)."""
    start = time.perf_counter()
    try:
        conn.request(
            "POST", "/invocations", body=data, headers={"Content-Type": "application/json"}
        )
        response = conn.getresponse()
        answer = response.read()
        return response.status, time.perf_counter() - start, answer
    except TimeoutError:
        return "timeout", time.perf_counter() - start, b""
    except (OSError, http.client.HTTPException):
        return "connection", time.perf_counter() - start, b""


def answer_ok(answer: bytes, batch: int) -> bool:
    try:
        predictions = np.asarray(json.loads(answer)["predictions"], dtype=np.float64)
    except (ValueError, KeyError, TypeError):
        return False
    return predictions.shape == (batch, 10) and bool(np.isfinite(predictions).all())


def record(
    tally: Tally, kind: str, status: int | str, seconds: float, answer: bytes, batch: int
) -> None:
    """One request's outcome into the tally."""
    tally.sent[kind] += 1
    if kind != "good":
        tally.statuses.setdefault(kind, Counter())[str(status)] += 1
        tally.bad_seconds.setdefault(kind, []).append(seconds)
    elif status != 200:
        tally.errors[status if isinstance(status, str) else f"http_{status}"] += 1
    elif tally.sent["good"] % CHECK_EVERY == 1 and not answer_ok(answer, batch):
        tally.errors["bad_answer"] += 1
    else:
        tally.latencies.append(seconds)


def client(
    index: int,
    port: int,
    plan: Plan,
    deadline: float,
    max_requests: int,
    timeout_s: float,
    tally: Tally,
) -> None:
    """One client: requests one after another on a kept-alive connection until the deadline or
    max_requests; a new connection after a failed request or a refused one (which may close)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    try:
        for i in range(max_requests):
            if time.monotonic() >= deadline:
                break
            kind, data = plan.pick(index, i)
            status, seconds, answer = post(conn, data)
            record(tally, kind, status, seconds, answer, plan.batch)
            if status != 200:
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=timeout_s)
    finally:
        conn.close()


def percentile_ms(latencies: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(latencies) * 1000, q)) if latencies else None


def run_phase(
    server: Server,
    plan: Plan,
    clients: int,
    seconds: float,
    max_requests: int = 100_000,
    timeout_s: float = 60,
) -> dict:
    """`clients` client threads at once for `seconds` (each stops by itself); the figures."""
    tallies = [Tally() for _ in range(clients)]
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(
            target=client,
            daemon=True,
            args=(i, server.port, plan, deadline, max_requests, timeout_s, tallies[i]),
        )
        for i in range(clients)
    ]
    with PeakMemory(server.proc.pid) as memory:
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:  # a request in flight at the deadline ends within timeout_s
            t.join(timeout=max(0.0, deadline - time.monotonic()) + timeout_s + 10)
        wall = time.perf_counter() - start
    total = Tally()
    for t in tallies:
        total.merge(t)
    return summarize(
        total, plan, clients, wall, memory.peak, server, stuck=sum(t.is_alive() for t in threads)
    )


def summarize(
    total: Tally, plan: Plan, clients: int, wall: float, peak: int, server: Server, stuck: int
) -> dict:
    answered = len(total.latencies)
    bad_sent = sum(n for kind, n in total.sent.items() if kind != "good")
    refused = sum(
        n
        for c in total.statuses.values()
        for s, n in c.items()
        if s.isdigit() and 400 <= int(s) < 500
    )
    return {
        "batch": plan.batch,
        "clients": clients,
        "malformed_every": plan.every,
        "seconds": wall,
        "good_sent": total.sent["good"],
        "answered": answered,
        "req_per_s": answered / wall,
        "images_per_s": answered * plan.batch / wall,
        "p50_ms": percentile_ms(total.latencies, 50),
        "p95_ms": percentile_ms(total.latencies, 95),
        "p99_ms": percentile_ms(total.latencies, 99),
        "max_ms": max(total.latencies) * 1000 if total.latencies else None,
        "errors": dict(total.errors),
        "malformed_sent": bad_sent,
        "malformed_4xx": refused,
        "malformed": {kind: dict(c) for kind, c in sorted(total.statuses.items())},
        "malformed_ms": {k: percentile_ms(v, 50) for k, v in sorted(total.bad_seconds.items())},
        "peak_rss_mib": peak / 2**20,
        "server_alive": server.proc.poll() is None and ping(server.url),
        "clients_stuck": stuck,
    }


# --------------------------------------------------------------------------- the benchmark


def warm_up(server: Server, plan: Plan, requests: int = 10) -> None:
    """A few sequential requests before timing a batch size: the first ones load lazily."""
    conn = http.client.HTTPConnection(HOST, server.port, timeout=120)
    try:
        for i in range(requests):
            status, _, answer = post(conn, plan.good[i % len(plan.good)])
            if status != 200:
                raise RuntimeError(f"warm-up request answered {status}: {answer[:300]!r}")
    finally:
        conn.close()


def serve_levels(server: Server, images: np.ndarray, args: argparse.Namespace) -> list[dict]:
    """Every (batch, C), good requests only then with malformed ones: one result each."""
    levels = []
    for batch in args.batches:
        clean, mixed = Plan.build(images, batch), Plan.build(images, batch, MALFORMED_EVERY)
        warm_up(server, clean)
        for clients in args.clients:
            for plan in (clean, mixed):
                what = "malformed 1 in 20" if plan.every else "good only"
                log.info("batch %d, %d client(s), %s: %.0f s", batch, clients, what, args.seconds)
                level = run_phase(
                    server, plan, clients, args.seconds, args.max_requests, args.timeout
                )
                log.info(
                    "  %.1f req/s, p99 %s ms, errors %s, malformed 4xx %d/%d, peak %.0f MiB",
                    level["req_per_s"],
                    fmt(level["p99_ms"]),
                    level["errors"] or "none",
                    level["malformed_4xx"],
                    level["malformed_sent"],
                    level["peak_rss_mib"],
                )
                levels.append(level)
                if not level["server_alive"]:
                    log.error("the server stopped answering: no further levels")
                    return levels
    return levels


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


# --------------------------------------------------------------------------- results


def analyse(levels: list[dict]) -> dict:
    """Per batch size: the C at which p99 doubles against the fewest clients, and the good
    requests' p99 with malformed traffic over without; the malformed requests' answers."""
    by_batch = {}
    for batch in sorted({lv["batch"] for lv in levels}):
        clean = {
            lv["clients"]: lv for lv in levels if lv["batch"] == batch and not lv["malformed_every"]
        }
        mixed = {
            lv["clients"]: lv for lv in levels if lv["batch"] == batch and lv["malformed_every"]
        }
        by_batch[str(batch)] = by_clients(clean, mixed)
    statuses: dict[str, Counter] = {}
    for lv in levels:
        for kind, counts in lv["malformed"].items():
            statuses.setdefault(kind, Counter()).update(counts)
    errors = Counter()
    for lv in levels:
        errors.update(lv["errors"])
    sent = sum(lv["malformed_sent"] for lv in levels)
    refused = sum(lv["malformed_4xx"] for lv in levels)
    lowest = min(lv["clients"] for lv in levels)
    alone: dict[str, list[float]] = {}  # seconds to answer with no other client's requests
    for lv in levels:
        for kind, ms in lv.get("malformed_ms", {}).items():
            if lv["clients"] == lowest and ms is not None:
                alone.setdefault(kind, []).append(ms)
    return {
        "by_batch": by_batch,
        "malformed": {
            "sent": sent,
            "refused_4xx": refused,
            "all_4xx": sent == refused,
            "by_kind": {k: dict(sorted(c.items())) for k, c in sorted(statuses.items())},
            "clients": lowest,
            "answer_ms": {k: float(np.median(v)) for k, v in sorted(alone.items())},
        },
        "good_request_errors": dict(errors),
        "server_alive_throughout": all(lv["server_alive"] for lv in levels),
        "peak_rss_mib": max(lv["peak_rss_mib"] for lv in levels),
    }


def by_clients(clean: dict[int, dict], mixed: dict[int, dict]) -> dict:
    """One batch size's levels ({C: level}, without and with malformed requests): the C at
    which p99 doubles against the fewest clients, and p99 with malformed over without."""
    base_c = min(clean or mixed)
    base = clean[base_c]["p99_ms"] if clean else None
    doubled = [c for c in sorted(clean) if base and (clean[c]["p99_ms"] or 0) >= 2 * base]
    ratios = {
        c: mixed[c]["p99_ms"] / clean[c]["p99_ms"]
        for c in sorted(mixed)
        if c in clean and mixed[c]["p99_ms"] and clean[c]["p99_ms"]
    }
    best = max((clean or mixed).values(), key=lambda lv: lv["images_per_s"])
    over = [c for c, r in ratios.items() if r > P99_SLACK]
    return {
        "base_clients": base_c,
        "base_p99_ms": base,
        "p99_doubles_at_clients": doubled[0] if doubled else None,
        "doubled_text": f"C = {doubled[0]}" if doubled else f"no C up to {max(clean or mixed)}",
        "mixed_over_clean_p99": {str(c): r for c, r in ratios.items()},
        "mixed_p99_within_2x": not over,
        "mixed_text": (
            f"{min(ratios.values()):.2f}x to {max(ratios.values()):.2f}x; "
            + (
                f"over {P99_SLACK:g}x at C = {', '.join(map(str, over))}"
                if over
                else f"within {P99_SLACK:g}x"
            )
            if ratios
            else "not measured"
        ),  # fmt: skip
        "best_images_per_s": best["images_per_s"],
        "best_clients": best["clients"],
    }


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def machine() -> dict:
    """What the numbers were measured on."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "platform": platform.platform(terse=True),
        "python": platform.python_version(),
        **{name: package(name) for name in ("torch", "mlflow", "numpy")},
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def machine_line(m: dict, after: dict | None = None) -> str:
    load = f"load average {m['load_average']} before"
    if after:
        load += f" and {after['load_average']} after"
    return (
        f"{m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), {m['platform']}, "
        f"Python {m['python']}, torch {m['torch']}, MLflow {m['mlflow']}; {load}"
    )


def errors_text(errors: dict) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in sorted(errors.items())) or "0"


def statuses_text(statuses: dict) -> str:
    return (
        ", ".join(
            f"{kind}: " + "/".join(f"{s} x{n}" for s, n in counts.items())
            for kind, counts in statuses.items()
        )
        or "-"
    )


def markdown(result: dict) -> str:
    """serve.md: one row per level, the malformed requests' answers, what was found."""
    a, m = result["analysis"], result["machine"]
    lines = [
        "# The served champion under load",
        "",
        f"`{result['command']}`, {result['date']}, on {machine_line(m, result['machine_after'])}.",
        f"Model `{MODEL_URI}` (version {result['model_version']}) from `{result['tracking_uri']}`,"
        f" served by `{result['server']}` on {HOST}; clients are "
        f"threads of one process on the same machine, one kept-alive connection each. Images: "
        f"{result['images']}. Each level ran {result['seconds']:g} s, first good requests only, "
        f"then with one request in {MALFORMED_EVERY} malformed ({', '.join(KINDS)}). Latency "
        "percentiles are of the good requests answered 200, and req/s and images/s count them "
        "over the level's wall time (the time clients spent on malformed requests included); "
        "peak RSS is the server's process tree, sampled every 0.2 s. The load average shows "
        "how busy the machine was besides.",
        "",
        "| batch | clients | traffic | req/s | images/s | p50 ms | p95 ms | p99 ms | errors "
        "| malformed: status x count | server peak RSS MiB |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | ---: |",
    ]
    for lv in result["levels"]:
        traffic = f"1 in {lv['malformed_every']} malformed" if lv["malformed_every"] else "good"
        lines.append(
            f"| {lv['batch']} | {lv['clients']} | {traffic} | {lv['req_per_s']:,.1f} "
            f"| {lv['images_per_s']:,.0f} | {fmt(lv['p50_ms'])} | {fmt(lv['p95_ms'])} "
            f"| {fmt(lv['p99_ms'])} | {errors_text(lv['errors'])} "
            f"| {statuses_text(lv['malformed'])} | {lv['peak_rss_mib']:,.0f} |"
        )
    lines += ["", *summary_table(a), "", *malformed_table(a), "", "## Findings", "",
              *findings(a), "", "![throughput, p99 and memory](serve.png)", ""]  # fmt: skip
    return "\n".join(lines)


def summary_table(a: dict) -> list[str]:
    """## Summary: per batch size, the figures docs/load.md shows."""
    batches = list(a["by_batch"])
    rows = {
        "p99 with the fewest clients": lambda b: (
            f"{fmt(b['base_p99_ms'])} ms at C = {b['base_clients']}"
        ),
        "p99 at least doubled by": lambda b: b["doubled_text"],
        "most images/s": lambda b: f"{b['best_images_per_s']:,.0f} at C = {b['best_clients']}",
        f"p99 with {100 / MALFORMED_EVERY:g}% malformed over without": lambda b: b["mixed_text"],
    }
    lines = ["## Summary", "", "| | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "| --- |" + " --- |" * len(batches)]  # fmt: skip
    for name, cell in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(a["by_batch"][b]) for b in batches) + " |")
    return lines


def malformed_table(a: dict) -> list[str]:
    """## Malformed requests: per kind, what the server answered and how long it took."""
    mal = a["malformed"]
    lines = ["## Malformed requests", "",
             f"| kind | sent | answers (status x count) | median ms to answer at C = "
             f"{mal.get('clients', 1)} |", "| --- | ---: | --- | ---: |"]  # fmt: skip
    for kind, counts in mal["by_kind"].items():
        answers = ", ".join(
            (f"{s} x{n}" if s.isdigit() and 400 <= int(s) < 500 else f"**{s}** x{n}")
            for s, n in counts.items()
        )
        ms = mal.get("answer_ms", {}).get(kind)
        lines.append(f"| {kind} | {sum(counts.values()):,} | {answers} | {fmt(ms, 0)} |")
    return lines


def findings(a: dict) -> list[str]:
    """The analysis in sentences (serve.md and docs/load.md)."""
    out = []
    for batch, b in a["by_batch"].items():
        out.append(
            f"- Batch {batch}: p99 {fmt(b['base_p99_ms'])} ms at C = {b['base_clients']}, at "
            f"least doubled by {b['doubled_text']}; at most {b['best_images_per_s']:,.0f} "
            f"images/s (C = {b['best_clients']}). The good requests' p99 with malformed traffic "
            f"over without: {b['mixed_text']}."
        )
    mal = a["malformed"]
    kinds = "; ".join(
        f"{k}: " + ", ".join(f"{s} x{n}" for s, n in c.items()) for k, c in mal["by_kind"].items()
    )
    took = ", ".join(f"{k} {fmt(ms, 0)} ms" for k, ms in mal.get("answer_ms", {}).items())
    out.append(
        f"- Malformed requests: {mal['refused_4xx']:,} of {mal['sent']:,} answered 4xx "
        f"({'all' if mal['all_4xx'] else '**not all**'}); by kind: {kinds}. Median time to "
        f"answer one at C = {mal.get('clients', 1)}: {took or '-'}."
    )
    alive = "answered /ping after every level" if a["server_alive_throughout"] else "**went down**"
    out.append(
        f"- The server {alive}; good requests not answered 200: "
        f"{errors_text(a['good_request_errors'])}; its peak RSS "
        f"{a['peak_rss_mib']:,.0f} MiB."
    )
    return out


def plot(result: dict, path: Path) -> None:
    """Images/s, p99 and the server's peak RSS against C, per batch size and traffic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    panels = (
        ("images_per_s", "throughput", "images/s answered"),
        ("p99_ms", "p99 latency of good requests", "ms (log scale)"),
        ("peak_rss_mib", "server memory (process tree)", "peak RSS MiB"),
    )
    for ax, (key, title, ylabel) in zip(axes, panels, strict=True):
        for i, batch in enumerate(sorted({lv["batch"] for lv in result["levels"]})):
            for every, style in ((0, "-o"), (MALFORMED_EVERY, "--s")):
                rows = [
                    lv
                    for lv in result["levels"]
                    if lv["batch"] == batch
                    and lv["malformed_every"] == every
                    and lv[key] is not None
                ]
                label = f"batch {batch}, " + ("good only" if not every else "5% malformed")
                ax.plot(
                    [lv["clients"] for lv in rows],
                    [lv[key] for lv in rows],
                    style,
                    color=f"C{i}",
                    label=label,
                    alpha=1.0 if not every else 0.7,
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["clients"], [str(c) for c in result["clients"]])
        if key == "p99_ms":
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.set_xlabel("clients at once (C)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    m = result["machine"]
    fig.suptitle(
        f"{result['server']}: {m['cpu']}, {m['usable_cores']} "
        f"cores, load average {m['load_average']} before, "
        f"{result['machine_after']['load_average']} after",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- docs/load.md


def refresh_docs(doc: Path) -> bool:
    """Fill the page's generated blocks from reports/ with the project's docs script
    (`python -m scripts.docs PAGE`), as for every other page; False (and a warning) if that
    fails or the script is missing."""
    if not (ROOT / "scripts" / "docs.py").is_file() or not doc.is_file():
        log.warning("%s not refreshed: run `python -m scripts.docs %s`", doc, rel(doc))
        return False
    done = subprocess.run([sys.executable, "-m", "scripts.docs", str(doc)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if done.returncode:
        log.warning("scripts.docs did not refresh %s:\n%s", doc, done.stderr.strip())
        return False
    log.info("refreshed %s (python -m scripts.docs)", rel(doc))
    return True


def rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def write(out: Path, name: str, result: dict, md: str) -> None:
    """<out>/<name>.json and <name>.md."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    (out / f"{name}.md").write_text(md)
    log.info("wrote %s and %s", out / f"{name}.json", out / f"{name}.md")


# --------------------------------------------------------------------------- main


def champion_version(tracking_uri: str) -> str:
    """The registered version the alias points at (checked before serving: a clear error)."""
    from mlflow import MlflowClient

    name, alias = MODEL_URI.removeprefix("models:/").split("@")
    found = MlflowClient(tracking_uri).get_model_version_by_alias(name, alias)
    return f"{found.version}, run {found.run_id}"


def image_root(images: Path | None, tracking_uri: str) -> Path:
    """--images, else the store's project, else this one, whichever has clean images."""
    for root in (images, store_dir(tracking_uri), ROOT):
        if root and (Paths(root).clean_dir / "images.npy").is_file():
            return root
    return images or ROOT  # none has: random glyphs


def serve_main(args: argparse.Namespace, argv: list[str]) -> int:
    images, source = test_images(image_root(args.images, args.tracking_uri))
    before = machine()
    model_version = champion_version(args.tracking_uri)
    log.info("serving %s (version %s) from %s", MODEL_URI, model_version, args.tracking_uri)
    with tempfile.TemporaryDirectory(prefix="load-serve-") as tmp:
        log_path = Path(tmp) / "serve.log"
        with served(args.tracking_uri, log_path, args.workers, kind=args.server) as server:
            levels = serve_levels(server, images, args)
    result = {
        "command": "python -m benchmarks.load " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": before,
        "machine_after": machine(),
        "tracking_uri": args.tracking_uri,
        "model_version": model_version,
        "workers": args.workers,
        "server": server_command(args.server, args.workers),
        "images": source,
        "seconds": args.seconds,
        "clients": args.clients,
        "batches": args.batches,
        "levels": levels,
    }
    result["analysis"] = analyse(levels)
    write(args.out, "serve", result, markdown(result))
    plot(result, args.out / "serve.png")
    return 0 if result["analysis"]["server_alive_throughout"] else 1


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out",
        type=Path,
        default=OUT,
        help="where the JSON, tables and plots go (default: %(default)s)",
    )
    p.add_argument(
        "--docs",
        type=Path,
        default=DOC,
        help="the page whose generated blocks are filled afterwards with `python -m "
        "scripts.docs PAGE` (default: %(default)s)",
    )
    p.add_argument("--no-docs", action="store_true", help="leave the docs page alone")


def serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        default=default_store(),
        help="the store holding the registered champion (default: %(default)s)",
    )
    p.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=list(CLIENTS),
        help="clients at once, one level each (default: %(default)s)",
    )
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=list(BATCHES),
        help="images per request (default: %(default)s)",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=20.0,
        help="seconds per level and traffic kind (default: %(default)s: at one client, some "
        "300 batches of 64, so that p99 is not the slowest one or two)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="the server's uvicorn workers (default: %(default)s, MLflow's own)",
    )
    p.add_argument(
        "--server",
        choices=sorted(SERVERS),
        default="project",
        help="project: python -m pipeline.serve (MLflow's scoring server, bodies over its "
        "limit refused unread); mlflow: mlflow models serve, no limit (default: %(default)s)",
    )
    p.add_argument(
        "--max-requests",
        type=int,
        default=100_000,
        help="at most this many requests per client and level (default: %(default)s)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds a client waits for one answer (default: %(default)s)",
    )
    p.add_argument(
        "--images",
        type=Path,
        help="a project root whose data/clean/images.npy (test split) is sent "
        "(default: the store's folder, else this project, else random glyphs)",
    )


def parse_args(argv: list[str]) -> argparse.Namespace:
    from benchmarks import tracking_load

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.load",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    parsers = {
        "serve": sub.add_parser("serve", help="the served champion under C clients at once"),
        "tracking": sub.add_parser("tracking", help="K writers on a team stack at once"),
        "sqlite": sub.add_parser("sqlite", help="N writers on one SQLite store at once"),
        "docs": sub.add_parser(
            "docs",
            help="redraw the tables and plots and refresh docs/load.md from the JSON results",
        ),
    }
    serve_args(parsers["serve"])
    tracking_load.tracking_args(parsers["tracking"])
    tracking_load.sqlite_args(parsers["sqlite"])
    for parser in parsers.values():
        common_args(parser)
    args = p.parse_args(argv)
    if args.command == "serve" and (
        min(args.clients) < 1 or min(args.batches) < 1 or args.seconds <= 0 or args.max_requests < 1
    ):
        p.error("--clients, --batches, --max-requests must be >= 1 and --seconds > 0")
    return args


def redraw(args: argparse.Namespace, argv: list[str]) -> int:
    """Analysis, tables and plots again from the measurements in --out's JSON files (nothing
    is measured)."""
    from benchmarks import tracking_load

    for name in ("serve", "tracking", "sqlite"):
        path = args.out / f"{name}.json"
        if not path.is_file():
            continue
        result = json.loads(path.read_text())
        if name == "serve":  # the analysis again from the measured levels, as is the verdict
            result["analysis"] = analyse(result["levels"])
            write(args.out, name, result, markdown(result))
            plot(result, args.out / "serve.png")
        else:
            result["verdict"] = tracking_load.verdict(name, result)
            races = [lv["race"] for lv in result["levels"] if "race" in lv]
            letter = "K" if name == "tracking" else "N"
            result["race_rounds"] = tracking_load.race_rounds(races, letter)
            write(args.out, name, result, tracking_load.markdown(name, result))
            tracking_load.plot(name, result, args.out / f"{name}.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    from benchmarks import tracking_load

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="load: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    run = {
        "serve": serve_main,
        "tracking": tracking_load.tracking_main,
        "sqlite": tracking_load.sqlite_main,
        "docs": redraw,
    }[args.command]
    code = run(args, argv)
    if not args.no_docs:
        refresh_docs(args.docs)
    return code


if __name__ == "__main__":
    sys.exit(main())
