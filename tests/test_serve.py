"""pipeline.serve: the request-size limit in front of MLflow's scoring server (the served
champion itself is driven by tests/test_load.py)."""

import asyncio
import json

import pytest
from mlflow import MlflowClient

from pipeline import serve


def call(limit: int, headers: dict[bytes, bytes], chunks: list[bytes]):
    """Run one HTTP request through BodyLimit around an app that echoes the body's length;
    return (status, answer, whether the app was called)."""
    called, sent = [], []

    async def app(scope, receive, send):
        message = await receive()
        called.append(message)
        body = json.dumps({"length": len(message["body"])}).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "headers": list(headers.items())}
    asyncio.run(serve.BodyLimit(app, limit)(scope, receive, send))
    return sent[0]["status"], json.loads(sent[1]["body"]), bool(called)


def test_declared_length_over_the_limit_is_refused_unread():
    status, answer, called = call(100, {b"content-length": b"101"}, [b"x" * 101])
    assert (status, called) == (413, False)
    assert answer["error_code"] == "REQUEST_LIMIT_EXCEEDED" and "100 bytes" in answer["message"]


def test_chunked_body_over_the_limit_is_refused():
    status, _, called = call(100, {b"transfer-encoding": b"chunked"}, [b"x" * 60, b"x" * 60])
    assert (status, called) == (413, False)


def test_body_within_the_limit_reaches_the_app_whole():
    chunks = [b"x" * 60, b"y" * 40]
    assert call(100, {b"content-length": b"100"}, chunks) == (200, {"length": 100}, True)
    assert call(100, {}, chunks) == (200, {"length": 100}, True)


def test_a_false_declared_length_does_not_pass_a_larger_body():
    status, _, called = call(100, {b"content-length": b"10"}, [b"x" * 80, b"x" * 80])
    assert (status, called) == (413, False)


def test_other_scopes_pass_through():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(serve.BodyLimit(app, 1)({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]


def test_missing_store_is_one_line_and_not_created(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert serve.main([]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"serve: error: no MLflow store at {tmp_path / 'mlflow.db'} (run the pipeline first)"
    ]
    assert not (tmp_path / "mlflow.db").exists()


def test_missing_model_is_one_line(tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # an empty store
    capsys.readouterr()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert serve.main(["-m", "models:/no-such-model@champion"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("serve: error: model models:/no-such-model")


@pytest.mark.parametrize("argv", [["--workers", "0"], ["--max-body-mib", "0"]])
def test_bad_settings_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        serve.parse_args(argv)
    assert e.value.code == 2 and "must be" in capsys.readouterr().err


def test_help_names_the_limit(capsys):
    with pytest.raises(SystemExit):
        serve.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "python -m pipeline.serve" in out and "--max-body-mib" in out and "413" in out
