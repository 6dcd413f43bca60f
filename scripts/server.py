"""A team's tracking stack on one machine: PostgreSQL, an S3 endpoint, an MLflow server.

    python -m scripts.server start [--dir .server] [--port 5000]   # prints what to export
    python -m scripts.server stop [--dir .server]

`start` runs a throwaway PostgreSQL cluster (initdb in a temporary folder, as the `postgres`
user when run as root, since the server refuses root), moto's S3 server (in memory: its
objects go when it stops) with one bucket, and `mlflow server` on PostgreSQL with its
artifacts in that bucket, all on 127.0.0.1. It writes `<dir>/env` (the variables to export)
and `<dir>/state.json` (what `stop` stops). The stages and DVC find everything through the
standard variables (MLFLOW_TRACKING_URI, AWS_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL, AWS_*), so
a real PostgreSQL, S3 or MinIO is the same set-up with other values.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUCKET = "notmnist"
# moto accepts any credentials; a real store takes its own from the same variables.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
HOST = "127.0.0.1"


class StackError(Exception):
    """A step of the stack failed; the message says which, and where its log is."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def pg_bin() -> Path:
    """The PostgreSQL server's programs: $PG_BIN, Debian's newest, or initdb on PATH."""
    if os.environ.get("PG_BIN"):
        return Path(os.environ["PG_BIN"])
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        found.sort(key=lambda path: int(path.split("/")[4]))
        return Path(found[-1]).parent
    if shutil.which("initdb"):
        return Path(shutil.which("initdb")).parent
    raise StackError("PostgreSQL server not found (apt-get install postgresql, or set PG_BIN)")


def as_postgres(cmd: list[str]) -> list[str]:
    """As root, `cmd` run as the postgres user (PostgreSQL refuses root), by util-linux's
    runuser, which lives in /usr/sbin: found there too when PATH leaves the sbin folders out."""
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if runuser is None:
        raise StackError("runuser not found (util-linux): needed to start PostgreSQL as root")
    return [runuser, "-u", "postgres", "--", *cmd]


def check(cmd: list[str], what: str, **kw) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if done.returncode:
        raise StackError(f"{what} failed: {(done.stderr or done.stdout).strip()}")


def start_postgres(folder: Path, state: dict) -> str:
    """A new cluster on a free port; returns its SQLAlchemy URI."""
    bindir = pg_bin()
    base = Path(tempfile.mkdtemp(prefix="notmnist-pg-"))
    state["pg_dir"] = str(base)
    state["pg_ctl"] = [str(bindir / "pg_ctl"), "-D", str(base / "data")]
    save(folder, state)
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    password, port = secrets.token_hex(12), free_port()
    pwfile = base / "pw"
    pwfile.write_text(password)
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    data = base / "data"
    check(
        as_postgres(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                "mlflow",
                "-E",
                "UTF8",
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--no-instructions",
            ]
        ),
        "initdb",
    )
    pwfile.unlink()
    options = f"-p {port} -c listen_addresses={HOST} -c unix_socket_directories={base}"
    check(
        as_postgres(
            [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(base / "postgres.log"),
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "start",
            ]
        ),
        f"PostgreSQL (log: {base / 'postgres.log'})",
    )
    env = dict(os.environ, PGPASSWORD=password)
    check(
        [str(bindir / "createdb"), "-h", HOST, "-p", str(port), "-U", "mlflow", "mlflow"],
        "createdb",
        env=env,
    )
    return f"postgresql://mlflow:{password}@{HOST}:{port}/mlflow"


def save(folder: Path, state: dict) -> None:
    """What runs so far: `stop` stops it even when `start` itself was killed half-way."""
    (folder / "state.json").write_text(json.dumps(state, indent=1))


def spawn(cmd: list[str], log: Path, env: dict, state: dict, name: str) -> subprocess.Popen:
    """A process in its own session (Ctrl-C in this terminal leaves it), stopped as a group."""
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
    state["pids"][name] = proc.pid
    save(log.parent, state)
    return proc


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 180) -> None:
    import requests

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{url} exited with {proc.returncode}; log: {log}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.5)
    raise StackError(f"{url} did not answer within {timeout_s:.0f} s; log: {log}")


def start(folder: Path, port: int) -> dict:
    """The whole stack; returns the variables a client exports."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "state.json").exists():
        raise StackError(f"{folder / 'state.json'} exists: stop that stack first")
    state: dict = {"pids": {}}
    try:
        db = start_postgres(folder, state)
        s3 = f"http://{HOST}:{free_port()}"
        base_env = dict(os.environ, **S3_ENV, AWS_ENDPOINT_URL=s3, MLFLOW_S3_ENDPOINT_URL=s3)
        cmd = [sys.executable, __file__, "s3", "--port", s3.rsplit(":", 1)[1]]
        proc = spawn(cmd, folder / "s3.log", base_env, state, "s3")
        wait_http(s3, proc, folder / "s3.log")
        make_bucket(s3)
        uri = f"http://{HOST}:{port or free_port()}"
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            db,
            "--artifacts-destination",
            f"s3://{BUCKET}/mlflow",
            "--host",
            HOST,
            "--port",
            uri.rsplit(":", 1)[1],
            "--workers",
            "1",
        ]
        from pipeline.tracking import server_env

        proc = spawn(cmd, folder / "mlflow.log", {**base_env, **server_env()}, state, "mlflow")
        wait_http(f"{uri}/health", proc, folder / "mlflow.log")
        runs = runs_page(uri)
    except BaseException:
        stop_state(state)
        (folder / "state.json").unlink(missing_ok=True)
        raise
    env = {
        "MLFLOW_TRACKING_URI": uri,
        "AWS_ENDPOINT_URL": s3,
        "MLFLOW_S3_ENDPOINT_URL": s3,
        **S3_ENV,
    }
    state.update(env=env, backend_store_uri=db, dvc_remote=f"s3://{BUCKET}/dvc")
    state["runs_page"] = runs
    save(folder, state)
    lines = [f"export {k}={v}" for k, v in env.items()]
    (folder / "env").write_text("\n".join(lines) + "\n")
    return state


def runs_page(uri: str) -> str:
    """The link of the project's experiment's runs page on the server, in model-training mode
    (MLflow 3.17's UI opens an experiment on its GenAI pages otherwise). The experiment is made
    here, as the first stage would make it, so that the link works before any run."""
    from mlflow import MlflowClient

    from pipeline import tracking
    from pipeline.config import ROOT, MlflowParams, load

    name = load(ROOT / "params.yaml", "mlflow", MlflowParams).experiment
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is None:
        tags = {tracking.KIND_TAG: tracking.KIND_TRAINING}
        return tracking.RUNS_PAGE.format(uri=uri, id=client.create_experiment(name, tags=tags))
    return tracking.RUNS_PAGE.format(uri=uri, id=found.experiment_id)


def make_bucket(endpoint: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, **s3_client_args()).create_bucket(Bucket=BUCKET)


def s3_client_args() -> dict:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


def running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie does not), reaping it if it is our child."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def stop_state(state: dict) -> None:
    """Stop what `state` lists, whatever has already gone."""
    for name in ("mlflow", "s3"):
        pid = state["pids"].get(name)
        if pid is None:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)  # the server and its workers
        deadline = time.monotonic() + 10  # a throwaway stack: no need to wait long
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # whatever did not stop
    if state.get("pg_ctl"):
        subprocess.run(
            as_postgres([*state["pg_ctl"], "-m", "fast", "-w", "stop"]), capture_output=True
        )
    if state.get("pg_dir"):
        shutil.rmtree(state["pg_dir"], ignore_errors=True)


def stop(folder: Path) -> bool:
    path = folder / "state.json"
    if not path.exists():
        return False
    stop_state(json.loads(path.read_text()))
    path.unlink()
    (folder / "env").unlink(missing_ok=True)
    return True


def serve_s3(port: int) -> None:
    """moto's S3 endpoint in the foreground until SIGTERM."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address=HOST, port=port, verbose=False)
    server.start()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scripts.server",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("start", "stop"):
        c = sub.add_parser(name)
        c.add_argument("--dir", type=Path, default=Path(".server"), help="state and logs")
    sub.choices["start"].add_argument(
        "--port", type=int, default=5000, help="MLflow's port (0: any free one)"
    )
    sub.choices["start"].add_argument("--json", action="store_true", help="print the state")
    sub.add_parser("s3").add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    if args.command == "s3":
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        serve_s3(args.port)
        return 0
    folder = args.dir.resolve()
    if args.command == "stop":
        print("stopped" if stop(folder) else f"nothing to stop in {folder}")
        return 0
    try:
        state = start(folder, args.port)
    except StackError as e:
        print(f"server: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(state))
        return 0
    env = state["env"]
    print(
        f"MLflow server: {env['MLFLOW_TRACKING_URI']} (runs in PostgreSQL, artifacts in "
        f"s3://{BUCKET}/mlflow)"
    )
    print(f"S3 endpoint: {env['AWS_ENDPOINT_URL']} (bucket {BUCKET}, in memory)")
    print(f"Its runs page in MLflow's UI (model training):\n  {state['runs_page']}")
    print(f"\nIn each shell that runs the pipeline:\n  source {folder / 'env'}")
    print(f"DVC remote on the same store:\n  dvc remote add -d --local team {state['dvc_remote']}")
    print(f"Stop it all: make server-stop (python -m scripts.server stop --dir {folder})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
