"""The package's shape: imports point down, one source per default, one list of each stage's code.

Layers, top to bottom: the DVC stages (pipeline/stages/) and the commands a user runs
(predict, serve, seeds, verify); the library under them (pipeline/data/, pipeline/training/,
pipeline/evaluation/ and the core modules in pipeline/). Read from the source with `ast`, so
nothing is imported.
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.config import ROOT
from pipeline.training import sweep
from tests import test_cli

PACKAGE = ROOT / "pipeline"
COMMANDS = {"pipeline.predict", "pipeline.serve", "pipeline.seeds", "pipeline.verify"}
# Names every stage module or logger-holding module defines by convention.
CONVENTIONAL = {"main", "log", "run", "TITLE", "candidates"}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package.parent): p for p in sorted(package.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The project modules a module imports (a `from a import b` names a.b when it is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module in known:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return found - {"pipeline"}


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(package)
    return {name: imports(path, set(mods)) for name, path in mods.items()}


def layer(name: str) -> str:
    if name.startswith("pipeline.stages."):
        return "stage"
    return "command" if name in COMMANDS else "library"


def problems(edges: dict[str, set[str]]) -> list[str]:
    """Arrows from the library up to a stage or command, between the tops, and circles."""
    found = []
    for a, targets in edges.items():
        for b in sorted(targets):
            if layer(b) != "library" and a != b:
                found.append(f"{a} ({layer(a)}) imports {b} ({layer(b)})")
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append("circle: " + " -> ".join(path[path.index(nxt) :] + [nxt]))
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_imports_point_down_and_never_in_a_circle():
    assert problems(graph()) == []


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pipeline" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pipeline"


def test_the_import_check_finds_a_planted_upward_arrow_and_a_circle(tmp_path):
    package = write_package(
        tmp_path,
        {
            "__init__.py": "",
            "stages/__init__.py": "",
            "stages/clean.py": "from pipeline import files\n",
            "files.py": "from pipeline.stages import clean\n",  # library -> stage
            "a.py": "from pipeline import b\n",
            "b.py": "from pipeline.a import x\n",  # a <-> b
            "predict.py": "from pipeline.stages.clean import main\n",  # command -> stage
        },
    )
    found = problems(graph(package))
    assert "pipeline.files (library) imports pipeline.stages.clean (stage)" in found
    assert "pipeline.predict (command) imports pipeline.stages.clean (stage)" in found
    assert any(p.startswith("circle: pipeline.a -> pipeline.b -> pipeline.a") for p in found)


PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
SECTIONS = test_cli.SECTIONS  # each params.yaml section and the dataclass that reads it


def defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def drift(section: str, cls) -> list[str]:
    values = PARAMS[section]
    return [
        f"{section}.{key}: {cls.__name__} says {value!r}, "
        f"params.yaml {values.get(key, 'nothing')!r}"
        for key, value in defaults(cls).items()
        if key not in values or values[key] != value
    ]


def test_every_section_of_params_yaml_has_its_dataclass():
    assert set(SECTIONS) == set(PARAMS)


@pytest.mark.parametrize("section", SECTIONS)
def test_dataclass_defaults_are_params_yaml_s_values(section):
    """params.yaml is the one source of every default: a default that differs is a drift."""
    assert drift(section, SECTIONS[section]) == []
    config.load(ROOT / "params.yaml", section, SECTIONS[section])  # and it loads, validated


def test_a_drifted_default_is_found():
    @dataclasses.dataclass(frozen=True)
    class Drifted:
        min_mean_pixel: float = 5.0

    assert drift("validate", Drifted) == [
        "validate.min_mean_pixel: Drifted says 5.0, params.yaml 2.0"
    ]


def closure(name: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [name]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += edges.get(node, ())
    return seen


def module_file(name: str) -> str:
    path = modules()[name]
    return str(path.relative_to(ROOT))


def expand(deps: list[str]) -> set[str]:
    """dvc.yaml's code deps as module files: a folder stands for its modules."""
    files = set()
    for dep in deps:
        path = ROOT / dep
        files |= {str(p.relative_to(ROOT)) for p in path.glob("*.py")} if path.is_dir() else {dep}
    return files


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def code_deps(stage: dict) -> list[str]:
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage["deps"]]
    return [d for d in deps if d.startswith("pipeline/")]


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_lists_exactly_the_code_each_stage_imports(stage):
    """A stage reruns when a module it imports changes, and not for a module it doesn't."""
    module = STAGES[stage]["cmd"].split()[2]
    needed = {module_file(m) for m in closure(module, graph()) if m != "pipeline"}
    listed = code_deps(STAGES[stage])
    assert not needed - expand(listed), f"{stage}: imports but does not list"
    for dep in listed:
        assert expand([dep]) & needed, f"{stage}: lists {dep} but imports none of it"


def test_the_job_key_digests_code_every_training_stage_lists():
    for stage in (s for s in STAGES if s.startswith("train_")):
        assert set(sweep.CODE) <= set(code_deps(STAGES[stage])), stage
    assert {str(p.relative_to(ROOT)) for p in sweep.code_files()} == expand(list(sweep.CODE))


def public_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return {n for n in names if not n.startswith("_")} - CONVENTIONAL


def test_no_public_name_is_also_a_module_s_name():
    """`loop.evaluate` beside `stages/evaluate.py` reads as one thing: names say which."""
    bases = {name.rsplit(".", 1)[-1] for name in modules()}
    clashes = [
        f"{module}.{public}"
        for module, path in modules().items()
        for public in sorted(public_names(path) & bases)
    ]
    assert clashes == []


def test_no_two_modules_define_the_same_public_name():
    seen: dict[str, str] = {}
    clashes = []
    for name, path in modules().items():
        for public in sorted(public_names(path)):
            if public in seen:
                clashes.append(f"{public}: {seen[public]} and {name}")
            seen.setdefault(public, name)
    assert clashes == []


MAX_LINES = 60


def long_functions(path: Path) -> list[str]:
    """Functions over MAX_LINES lines, unless a `# long: why` comment opens their body."""
    lines = path.read_text().splitlines()
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.FunctionDef) and node.end_lineno - node.lineno + 1 > MAX_LINES:
            body = lines[node.lineno : node.body[0].lineno + 2]
            if not any(line.strip().startswith("# long:") for line in body):
                found.append(f"{path.name} {node.name}")
    return found


def test_functions_fit_in_view():
    assert [f for path in modules().values() for f in long_functions(path)] == []
