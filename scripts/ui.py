"""`make ui`: MLflow's UI on this project's store, opened on the runs page (model training).

    python -m scripts.ui [--root DIR] [--port 5001]        # serves until Ctrl-C
    python -m scripts.ui --screenshots docs/img [--root DIR]  # saves the docs' PNGs, then stops

It starts `mlflow server` on the project's store (sqlite:///<root>/mlflow.db, artifacts in
<root>/mlartifacts, or MLFLOW_TRACKING_URI / NOTMNIST_MLFLOW_ARTIFACTS as the stages use them)
on 127.0.0.1 and prints the link of the experiment's runs page. MLflow 3.17's UI opens an
experiment on its GenAI pages (traces: none here) unless the URL asks for
`workflowType=machine_learning`, as this link does. When MLFLOW_TRACKING_URI names an http(s)
server, nothing is started: the link is that server's.

--screenshots drives headless Chromium (Playwright, with the system's chromium; nothing is
downloaded) through the runs page, a task's candidates, the chart view, a comparison of two
candidates and the model registry, and saves one PNG of each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from pipeline import tracking
from pipeline.config import MlflowParams, StageError, load

HOST = "127.0.0.1"
PORT = 5001
CHROMIUM_ENV = "NOTMNIST_CHROMIUM"  # the browser --screenshots and the tests drive
# Local storage the UI reads: its assistant panel and the registry's pop-up stay closed, so
# that they cover nothing. A user's browser shows them once.
QUIET_UI = {
    "mlflow.assistant.fab.autoOpenedOnFirstLoad_v1": "true",
    "mlflow.assistant.panelOpen_v1": "false",
    "_mlflow_model_registry_promo_modal_dismissed_v1": "true",
}


class UiError(Exception):
    """Something a user can fix; printed as one line."""


def project_store(root: Path) -> tuple[str, str, str | None]:
    """(tracking URI, experiment name, artifact location) of the project at `root`.

    A local store that does not exist yet is an error: `mlflow server` would create an empty one.
    """
    uri = tracking.tracking_uri(root)
    params = tracking.project_dir(root) / "params.yaml"
    try:
        experiment = load(params, "mlflow", MlflowParams).experiment
    except StageError as e:
        raise UiError(str(e)) from None
    db = tracking.sqlite_path(uri)
    if db is not None and not db.is_file():
        raise UiError(f"no MLflow store at {db} yet: run the pipeline first (make repro)")
    return uri, experiment, tracking.artifact_location(uri)


def check_port(port: int) -> None:
    """Fail in one line when `port` is taken on HOST (else mlflow's own error: pages of it)."""
    with socket.socket() as s:
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise UiError(
                f"port {port} on {HOST} is in use ({e.strerror}): stop what listens there, or "
                f"choose another port (make ui UI_PORT=..., --port)"
            ) from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(uri: str, artifacts: str | None, port: int, log: Path) -> subprocess.Popen:
    """`mlflow server` on the store, in a session of its own: stop() ends it and its workers."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    if artifacts:  # where runs the UI creates would put theirs (the stages' runs say their own)
        cmd += ["--artifacts-destination", artifacts]
    cmd += ["--host", HOST, "--port", str(port), "--workers", "1"]
    with log.open("w") as out:
        return subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **tracking.server_env()},
            start_new_session=True,
        )


def wait_ready(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    """Until the server answers /health; a server that exits or never answers is an error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UiError(f"mlflow server exited with {proc.returncode}; its log: {log}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        time.sleep(0.5)
    raise UiError(f"mlflow server did not answer within {timeout_s:.0f} s; its log: {log}")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL to whatever is left after 10 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def experiment_url(url: str, experiment: str) -> str:
    """The runs page of `experiment` on the server at `url`, in model-training mode."""
    try:
        answer = requests.get(
            f"{url}/api/2.0/mlflow/experiments/get-by-name",
            params={"experiment_name": experiment},
            timeout=30,
        )
    except requests.RequestException as e:
        raise UiError(f"MLflow server {url} does not answer ({type(e).__name__})") from None
    if answer.status_code == 404:
        raise UiError(f"no experiment '{experiment}' at {url} yet: run the pipeline first")
    if not answer.ok:
        raise UiError(f"MLflow server {url} answered {answer.status_code} ({answer.reason})")
    experiment_id = answer.json()["experiment"]["experiment_id"]
    return tracking.RUNS_PAGE.format(uri=url, id=experiment_id)


@contextlib.contextmanager
def serving(root: Path, port: int):
    """(runs page URL, server process, its log) while an MLflow UI serves the project's runs.

    On an http(s) MLFLOW_TRACKING_URI: that server's page and no process, nothing started.
    Otherwise a local `mlflow server`, stopped on the way out; its log is kept when it failed.
    """
    uri, experiment, artifacts = project_store(root)
    if uri.startswith(("http://", "https://")):
        yield experiment_url(uri.rstrip("/"), experiment), None, None
        return
    check_port(port)
    fd, name = tempfile.mkstemp(prefix="notmnist-ui-", suffix=".log")
    os.close(fd)
    log = Path(name)
    proc = start_server(uri, artifacts, port, log)
    ready = False
    try:
        url = f"http://{HOST}:{port}"
        wait_ready(url, proc, log)
        ready = True
        yield experiment_url(url, experiment), proc, log
    finally:
        failed = not ready or proc.poll() is not None  # its log says why
        stop(proc)
        if not failed:
            log.unlink(missing_ok=True)


def serve(root: Path, port: int) -> None:
    """Print the runs page's link; serve it until Ctrl-C (SIGINT or SIGTERM)."""
    with serving(root, port) as (url, proc, log):
        if proc is None:
            print(f"MLflow server (MLFLOW_TRACKING_URI), runs page:\n  {url}", flush=True)
            return
        print(f"MLflow UI on the runs of {root}, until Ctrl-C:\n  {url}", flush=True)
        while proc.poll() is None:
            time.sleep(0.5)
        raise UiError(f"mlflow server exited with {proc.returncode}; its log: {log}")


@contextlib.contextmanager
def interruptible():
    """SIGINT and SIGTERM raise KeyboardInterrupt, so that the server is stopped on the way out
    (SIGINT too when a shell started this in the background, ignoring it); restored after."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


# -- the browser: Playwright driving the system's Chromium (--screenshots, tests/test_ui.py)


def chromium() -> str:
    """The system's Chromium: $NOTMNIST_CHROMIUM, Debian's `chromium`, else Ubuntu's or Google
    Chrome (GitHub's runners have it)."""
    names = ("chromium", "chromium-browser", "google-chrome")
    path = os.environ.get(CHROMIUM_ENV) or next(filter(None, map(shutil.which, names)), None)
    if not path:
        raise UiError(f"chromium not found: apt-get install chromium, or set {CHROMIUM_ENV}")
    return path


@contextlib.contextmanager
def browser_page(storage: dict | None = None, width: int = 1440, height: int = 900):
    """A page of a fresh headless Chromium whose local storage holds QUIET_UI and `storage`.

    Playwright only drives the system's browser: it never downloads one of its own.
    """
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise UiError("playwright is not installed: pip install -r requirements.txt") from None
    args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium's sandbox refuses root
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=args)
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            items = {**QUIET_UI, **(storage or {})}
            context.add_init_script(
                f"for (const [k, v] of Object.entries({json.dumps(items)})) "
                "localStorage.setItem(k, v);"
            )
            page = context.new_page()
            page.set_default_timeout(90_000)  # the first page load takes ~10 s on a busy host
            yield page
        except PlaywrightError as e:  # e.g. a page that never showed what was awaited
            lines = str(e).splitlines()
            awaited = [line.strip() for line in lines if "waiting for" in line][:1]
            raise UiError(" ".join(["the UI in Chromium:", lines[0], *awaited])) from None
        finally:
            browser.close()


def run_row(page, name: str):
    """The runs table's row of the run named `name`: its pinned part (checkbox, name, colour)."""
    return page.locator("[role=row]", has=page.get_by_role("link", name=name, exact=True)).first


def row_text(page, name: str) -> str:
    """The text of every column of the run named `name` (the table draws a row in parts)."""
    row_id = run_row(page, name).get_attribute("row-id")
    return "\n".join(page.locator(f"[role=row][row-id='{row_id}']").all_inner_texts())


def open_runs(page, url: str) -> None:
    """The runs page at `url`, once its table shows a run."""
    page.goto(url)
    page.locator("[role=row] [col-id='attributes.`Run Name`'] a").first.wait_for()


def expand(page, task: str) -> list[str]:
    """Open `task`'s parent run in the table; returns its candidates' run names, as listed."""
    run_row(page, task).locator("[col-id='attributes.`Run Name`'] button").first.click()
    children = page.get_by_role("link", name=re.compile(rf"^{re.escape(task)} "))
    children.first.wait_for()
    return children.all_inner_texts()


def set_columns(page, shown: dict[str, bool]) -> None:
    """Show or hide the table's columns by name (Columns menu); widen Source to its text."""
    page.get_by_role("button", name="Columns", exact=True).click()
    for name, show in shown.items():
        node = page.locator(".du-bois-light-tree-treenode", has=page.locator(f"[title='{name}']"))
        if ("checkbox-checked" in node.get_attribute("class")) != show:
            node.locator(".du-bois-light-tree-checkbox").click()
    page.keyboard.press("Escape")
    page.locator(".ag-header-cell[col-id='attributes.`Source`'] .ag-header-cell-resize").dblclick()


def compare(page, names: list[str]) -> None:
    """Select the runs `names` in the table and open MLflow's comparison of them."""
    for name in names:
        run_row(page, name).locator("input.ag-checkbox-input").click()
    page.get_by_role("button", name="Compare", exact=True).click()
    page.get_by_text(f"Comparing {len(names)} Runs").wait_for()


def metric_curves(page, key: str, names: list[str]) -> list[str]:
    """From the comparison, the metric page of `key`, once each run is in its legend and its
    curve is drawn; returns the runs whose curves are drawn, sorted (a run's faint unsmoothed
    copy counts with it). Runs are told apart by name, not colour: MLflow colours a run by a
    hash of its id into 29 colours, so two runs can share one. A click on the link that leaves
    the comparison open is made again."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    link, metric_page = page.get_by_role("link", name=key, exact=True), re.compile(r"#/metric\?")
    for attempt in (1, 2, 3):  # a click while the comparison re-renders can be lost
        if not metric_page.search(page.url):
            link.click()
        try:  # the link sets the URL as it is clicked
            page.wait_for_url(metric_page, timeout=5_000)
            break
        except PlaywrightTimeout:
            if attempt == 3:
                raise AssertionError(f"{key}: its link did not open the metric page") from None
    drawn = (  # plotly binds each trace's data to its SVG group
        "() => [...new Set([...document.querySelectorAll('.js-plotly-plot .scatterlayer .trace')]"
        ".filter(g => g.querySelector('.js-line')?.getAttribute('d'))"
        ".map(g => g.__data__[0].trace.name))].sort()"
    )
    for attempt in (1, 2):
        for name in names:
            page.get_by_text(f"{name} ({key})", exact=True).wait_for()
        try:  # the curves are drawn after the legend
            page.wait_for_function(f"n => ({drawn})().length >= n", arg=len(names), timeout=45_000)
            break
        except PlaywrightTimeout:
            if attempt == 2:
                raise AssertionError(f"{key}: curves drawn for {page.evaluate(drawn)}") from None
            page.reload()  # the legend came but not the curves: load the page once more
    return page.evaluate(drawn)


def chart_sections(page, url: str) -> list[tuple[str, str]]:
    """The chart view's sections, top to bottom: (title, its text: chart titles and values)."""
    page.goto(f"{url}&compareRunsMode=CHART")
    header = page.locator("[data-testid='experiment-view-compare-runs-section-header']")
    header.first.wait_for()
    page.locator(".js-plotly-plot").first.wait_for()  # the charts are drawn after the sections
    found = []
    for section in page.locator(".du-bois-light-collapse-item", has=header).all():
        found.append((section.locator(header).inner_text().split("\n")[0], section.inner_text()))
    return found


def open_registry(page, url: str, model: str) -> None:
    """The model registry's list of models, once it shows `model`."""
    page.goto(url.split("/#/")[0] + "/#/models")
    page.get_by_role("link", name=model, exact=True).wait_for()


def screenshots(url: str, folder: Path, task: str = "task2") -> list[Path]:
    """PNGs of the runs page, the chart view, `task`'s candidates, the val_loss curves of two
    of them (MLflow's comparison) and the model registry; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    saved = []

    def shot(page, name: str) -> None:
        time.sleep(2)  # charts and fonts finish drawing
        page.screenshot(path=folder / name)
        saved.append(folder / name)

    ml = {"mlflow.workflowType_v1": json.dumps("machine_learning")}  # the sidebar, on every page
    with browser_page(storage=ml, width=1600) as page:
        open_runs(page, url)
        set_columns(page, {"Dataset": False, "Version": True, "Description": True})
        shot(page, "runs.png")
        page.set_viewport_size({"width": 1600, "height": 1500})  # the first sections
        chart_sections(page, url)
        shot(page, "charts.png")
        page.set_viewport_size({"width": 1600, "height": 900})
        open_runs(page, f"{url}&compareRunsMode=TABLE")
        names = expand(page, task)
        shot(page, "task.png")
        compare(page, names[:2])
        metric_curves(page, "val_loss", names[:2])
        shot(page, "compare.png")
        open_registry(page, url, "notmnist-classifier")
        page.get_by_role("link", name="notmnist-classifier", exact=True).click()
        page.get_by_text("champion").first.wait_for()  # its versions, their tags and aliases
        shot(page, "registry.png")
    return saved


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.ui",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", type=Path, default=Path("."), help="the project (default: .)")
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help=f"the UI's port on {HOST} (default {PORT}; with --screenshots, a free one)",
    )
    p.add_argument(
        "--screenshots",
        type=Path,
        metavar="DIR",
        help="save PNGs of the UI's pages into DIR, then stop (needs chromium and playwright)",
    )
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    root = args.root.resolve()
    try:
        with interruptible():
            if args.screenshots:
                port = args.port if args.port is not None else free_port()
                with serving(root, port) as (url, _, _):
                    for path in screenshots(url, args.screenshots):
                        print(path, flush=True)
            else:
                serve(root, PORT if args.port is None else args.port)
    except UiError as e:
        print(f"ui: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: the way to stop serving; the server is stopped
        print("stopped", flush=True)
        return 130 if args.screenshots else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
