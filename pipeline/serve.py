"""Serve a model over HTTP: MLflow's scoring server, with a limit on the request size.

    python -m pipeline.serve                        # the champion on 127.0.0.1:5001
    python -m pipeline.serve -m runs:/<id>/model -p 5002 --workers 2 --max-body-mib 8

The same application as `mlflow models serve --env-manager local` (MLflow's scoring server:
`/invocations`, `/ping`, `/health`, `/version`, the same answers), run by uvicorn, with one
layer in front: a request body over --max-body-mib gets 413 before any of it is parsed. A
body is read whole before MLflow parses it, so without a limit one 10 MB request holds a
worker for most of a second while the good requests wait (docs/load.md).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile

from pipeline.cli import one_line
from pipeline.config import ROOT

MODEL_URI = "models:/notmnist-classifier@champion"
MODEL_ENV = "NOTMNIST_SERVE_MODEL_PATH"  # the downloaded model folder, for each worker
LIMIT_ENV = "NOTMNIST_SERVE_MAX_BODY_BYTES"
MAX_BODY_MIB = 4.0  # about 500 images of 28x28 as JSON numbers


class BodyLimit:
    """ASGI middleware: a request body over max_bytes gets 413 and never reaches the app.

    A declared Content-Length over the limit is refused before the body is read; a body
    without one (chunked) is read up to the limit, then refused. The body that passes is
    handed on whole, as the app would have read it.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.max_bytes:
            return await self.refuse(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.refuse(send)
            more = message.get("more_body", False)
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        handed = False

        async def replay():
            nonlocal handed
            if handed:
                return await receive()
            handed = True
            return whole

        return await self.app(scope, replay, send)

    async def refuse(self, send) -> None:
        answer = json.dumps(
            {
                "error_code": "REQUEST_LIMIT_EXCEEDED",
                "message": f"request body over the server's limit of {self.max_bytes} bytes",
            }
        ).encode()
        # The connection stays open: uvicorn reads the rest of the body and drops it, so a
        # client still sending gets this answer rather than a broken pipe.
        headers = [(b"content-type", b"application/json")]
        headers.append((b"content-length", str(len(answer)).encode()))
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": answer})


def app():
    """The application each uvicorn worker builds: MLflow's scoring server behind BodyLimit."""
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(os.environ[MODEL_ENV])
    return BodyLimit(scoring_server.init(model), int(os.environ[LIMIT_ENV]))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-m",
        "--model-uri",
        default=MODEL_URI,
        help="any MLflow model URI (default: %(default)s, from MLFLOW_TRACKING_URI or this "
        "project's mlflow.db)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address (default: %(default)s)")
    p.add_argument("-p", "--port", type=int, default=5001, help="port (default: %(default)s)")
    p.add_argument(
        "-w", "--workers", type=int, default=1, help="uvicorn workers (default: %(default)s)"
    )
    p.add_argument(
        "--max-body-mib",
        type=float,
        default=MAX_BODY_MIB,
        help="larger request bodies get 413 unread (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.workers < 1 or args.max_body_mib <= 0:
        p.error("--workers must be at least 1 and --max-body-mib above 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import mlflow

    from pipeline import tracking

    uri = tracking.tracking_uri(ROOT)
    store = tracking.sqlite_path(uri)
    if store is not None and not store.is_file():  # MLflow would make an empty one
        print(f"serve: error: no MLflow store at {store} (run the pipeline first)", file=sys.stderr)
        return 1
    mlflow.set_tracking_uri(uri)
    # One line says what is served; MLflow's download progress bar would draw over the log.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    with tempfile.TemporaryDirectory(prefix="serve-") as folder:  # gone when the server stops
        try:
            path = mlflow.artifacts.download_artifacts(args.model_uri, dst_path=folder)
        except Exception as e:  # a missing alias, store or run: one line
            print(f"serve: error: model {args.model_uri}: {one_line(e)}", file=sys.stderr)
            return 1
        run_server(args, path)
    return 0


def run_server(args: argparse.Namespace, path: str) -> None:
    """uvicorn with `workers` processes, each building `app` on the model folder `path`."""
    import uvicorn

    os.environ[MODEL_ENV] = path
    os.environ[LIMIT_ENV] = str(int(args.max_body_mib * 2**20))
    # uvicorn stops gracefully on SIGINT or SIGTERM, then raises the signal again under the
    # handlers it found: these make that an exit, so the downloaded model folder is removed.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda n, frame: sys.exit(128 + n))
    print(
        f"serve: {args.model_uri} on http://{args.host}:{args.port}/invocations "
        f"({args.workers} worker(s), bodies up to {args.max_body_mib:g} MiB)",
        file=sys.stderr,
    )
    uvicorn.run(
        "pipeline.serve:app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level="warning",
    )


if __name__ == "__main__":
    sys.exit(main())
