"""Short versions of benchmarks/load.py: counts under load (nothing lost, malformed requests
refused, the server still up), never timings.

The writers here log no dataset input: two writers logging the same data set for the first
time in an experiment at the same moment race in MLflow (one gets a UNIQUE constraint error),
which depends on timing; the benchmark measures it, a test could only flake on it. For the
same reason they run with MLflow's usage telemetry off: its thread edits os.environ while a
request may be reading it (a KeyError now and then, in any process that uses MLflow).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from benchmarks import load, tracking_load

FOUR_XX = re.compile(r"4\d\d")


def test_request_bodies_are_what_they_claim():
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    x = np.asarray(json.loads(load.body(images))["inputs"], dtype=np.float32)
    expected = (images.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    np.testing.assert_array_equal(x, expected)  # the same float32 values the models trained on
    assert x.shape == (3, 28, 28) and x.min() >= -1 and x.max() <= 1
    shape = json.loads(load.malformed("shape", images))["inputs"]
    assert np.asarray(shape).shape == (3, 784)
    assert np.isnan(np.asarray(json.loads(load.malformed("nan", images))["inputs"])).all()
    assert len(load.malformed("huge", images)) >= load.HUGE_BYTES
    with pytest.raises(ValueError):
        json.loads(load.malformed("truncated", images))
    plan = load.Plan.build(images, batch=2, every=5)
    kinds = [plan.pick(0, i)[0] for i in range(5 * len(load.KINDS))]
    assert kinds.count("good") == 4 * len(load.KINDS)
    assert sorted(k for k in kinds if k != "good") == sorted(load.KINDS)


@pytest.fixture(scope="module")
def server(trained_project, tmp_path_factory):
    """The tiny project's champion served as the benchmark serves it (python -m pipeline.serve);
    stopped pass or fail."""
    _, uri = trained_project
    with load.served(uri, tmp_path_factory.mktemp("load") / "serve.log") as server:
        yield server


def test_served_champion_under_load(trained_project, server):
    """C = 1 and 4 clients for 1.5 s each, batches of 1 and 64, one request in 5 malformed:
    every good request answered right, every malformed one 4xx, the server up throughout."""
    images, _ = load.test_images(trained_project[0], count=128)
    levels = []
    for batch in (1, 64):
        plan = load.Plan.build(images, batch, every=5)
        load.warm_up(server, plan, requests=2)
        for clients in (1, 4):
            levels.append(load.run_phase(server, plan, clients, 1.5, max_requests=200))
    statuses = {}  # every kind at least once, whatever the timing above
    conn = load.http.client.HTTPConnection(load.HOST, server.port, timeout=60)
    for kind in load.KINDS:
        statuses[kind] = load.post(conn, plan.bad[kind])[0]
        conn.close()
    assert load.ping(server.url) and server.proc.poll() is None
    assert all(400 <= s < 500 for s in statuses.values()), statuses
    assert statuses["huge"] == 413  # pipeline.serve's size limit: refused before it is read
    for lv in levels:
        assert lv["server_alive"] and lv["clients_stuck"] == 0
        assert lv["errors"] == {}, lv["errors"]
        assert lv["answered"] == lv["good_sent"] > 0
        assert lv["malformed_sent"] > 0
        for kind, counts in lv["malformed"].items():
            assert all(FOUR_XX.fullmatch(s) for s in counts), (kind, lv["malformed"])
        assert lv["peak_rss_mib"] > 0
    assert load.analyse(levels)["server_alive_throughout"]


def test_served_champion_refuses_nan_pixels(trained_project, server):
    images, _ = load.test_images(trained_project[0], count=4)
    conn = load.http.client.HTTPConnection(load.HOST, server.port, timeout=60)
    status, _, answer = load.post(conn, load.malformed("nan", images))
    conn.close()
    assert 400 <= status < 500, answer[:200]
    assert b"finite" in answer, answer[:200]


def test_served_model_folder_is_removed_when_the_server_stops(
    trained_project, tmp_path, monkeypatch
):
    """pipeline.serve downloads the model into a temporary folder; SIGTERM stops the server
    gracefully (exit 143) and the folder goes with it."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with load.served(trained_project[1], tmp_path / "logs" / "serve.log") as server:
        assert [p.name[:6] for p in tmp_path.iterdir() if p.name != "logs"] == ["serve-"]
    assert server.proc.returncode == 128 + 15
    assert [p.name for p in tmp_path.iterdir()] == ["logs"]
    log = (tmp_path / "logs" / "serve.log").read_text()
    assert log.startswith("serve: models:/notmnist-classifier@champion on http://127.0.0.1:")
    assert "Downloading artifacts" not in log  # no progress bar in the log


def test_sqlite_store_loses_no_run_of_two_concurrent_stages(tmp_path):
    settings = {"units": 1, "epochs": 3, "children": 2, "artifact_kib": 4, "no_dataset": True}
    (lv,) = tracking_load.sqlite_levels([2], settings, tmp_path, telemetry=False)
    assert lv["errors"] == {} and lv["locked_errors"] == 0, lv["messages"]
    assert lv["expected_runs"] == lv["runs_sent"] == lv["complete"] == lv["finished"] == 2 * 3
    assert lv["runs_in_store"] == 6 and lv["lost_runs"] == 0
    assert lv["steps_found"] == lv["steps_sent"] > 2 * 2 * 3 * len(tracking_load.EPOCH_METRICS)
    assert lv["steps_duplicated"] == 0 and lv["params_found"] == lv["params_sent"]
    assert lv["artifacts_found"] == lv["artifacts_sent"]
    assert lv["versions_found"] == lv["versions_sent"] == 2
