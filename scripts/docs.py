"""Fill the generated blocks of README.md and docs/*.md from the files the pipeline writes.

No result figure in the documentation is typed by hand. A figure sits between two HTML comments
(invisible on GitHub) that name the block that writes it:

    <!-- timing:start -->
    (a table written by this script)
    <!-- timing:end -->

or, inside a sentence, `<!-- value:start metrics.json task7/test_accuracy pct -->96.07%<!--
value:end -->`. The word before `:start` names a function in BLOCKS; the words after it (shell
quoting) are its arguments, file names relative to `reports/`. `python -m scripts.docs` rewrites
every block; `--check` only compares and exits 1 naming each block that differs; `--links` also
checks every relative link and #anchor.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ROOT

BLOCK = re.compile(
    r"<!-- (?P<name>[a-z][a-z0-9_]*):start(?P<args>[^>]*?)\s*-->(?P<body>.*?)"
    r"<!-- (?P=name):end -->",
    re.S,
)
LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.S)
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)
# The stages that redo the original coursework (the rest go beyond it): their sum is the
# figure the speed goal is about.
ORIGINAL_STAGES = (
    "download",
    "clean",
    "validate",
    "split",
    "train_task2",
    "train_task3",
    "train_task4",
    "train_task5",
    "evaluate",
    "report",
    "gate",
)
LARGE = 529_000  # notMNIST_large, roughly: the size benchmarks/scale.py projects its fits to


class DocsError(Exception):
    """A block that cannot be written: a missing file or key, an unknown block or argument."""


@dataclass(frozen=True)
class Context:
    """Where a block is written: the project root and the Markdown file that holds it."""

    root: Path
    doc: Path

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    def read_json(self, name: str):
        path = self.reports / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise DocsError(f"no file reports/{name}") from None
        except json.JSONDecodeError as error:
            raise DocsError(f"reports/{name} is not JSON: {error}") from None

    def link(self, name: str) -> str:
        """A link from the document to reports/<name>, relative, as GitHub resolves it."""
        return os.path.relpath(self.reports / name, self.doc.parent).replace(os.sep, "/")


# ----------------------------------------------------------------------------- formatting


def pct(x: float | None, digits: int = 2) -> str:
    return "" if x is None else f"{100 * x:.{digits}f}%"


def interval(ci: list[float]) -> str:
    return f"[{100 * ci[0]:.2f}, {100 * ci[1]:.2f}]"


def secs(x: float) -> str:
    return f"{x:,.1f} s"


def mib(x: float) -> str:
    return f"{x:,.0f} MiB"


def yes(flag: bool | None) -> str:
    return "" if flag is None else ("met" if flag else "**not met**")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def options(args: tuple[str, ...], allowed: set[str]) -> tuple[list[str], dict[str, str]]:
    """Split a block's arguments into plain words and key=value options."""
    words, opts = [], {}
    for arg in args:
        key, sep, value = arg.partition("=")
        if sep and key in allowed:
            opts[key] = value
        elif sep:
            raise DocsError(f"unknown option {key!r} (known: {', '.join(sorted(allowed))})")
        else:
            words.append(arg)
    return words, opts


def lookup(data, path: str):
    """data at a '/'-separated path; '*' takes every value below that point, as a flat list."""
    parts = [part for part in path.split("/") if part]
    for i, part in enumerate(parts):
        if part == "*":
            values = data.values() if isinstance(data, dict) else data
            found = [lookup(value, "/".join(parts[i + 1 :])) for value in values]
            return [x for item in found for x in (item if isinstance(item, list) else [item])]
        try:
            data = data[int(part)] if isinstance(data, list) else data[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise DocsError(f"no key {path!r}") from None
    return data


# ----------------------------------------------------------------------------- blocks


def block_value(ctx: Context, name: str, path: str, form: str = "raw") -> str:
    """One figure from a JSON file, inside a sentence: `value FILE KEY/PATH [FORMAT]`."""
    x = lookup(ctx.read_json(name), path)
    forms = {
        "raw": str,
        "pct": pct,
        "pct1": lambda v: pct(v, 1),
        "points": lambda v: f"{100 * v:.2f} points",
        "int": lambda v: f"{v:,}",
        "s": secs,
        "mib": mib,
        "x": lambda v: f"{v:.2f}x",
        "len": lambda v: f"{len(v):,}",
        "range": lambda v: f"{min(v):,.1f}-{max(v):,.1f} s",
    }
    if form not in forms:
        raise DocsError(f"unknown format {form!r} (known: {', '.join(forms)})")
    return forms[form](x)


def block_table(ctx: Context, *args: str) -> str:
    """A table copied from a generated Markdown file: `table FILE HEADING [columns=] [rows=]`.

    columns: 1-based, e.g. 1-4,6; rows: the first cells to keep, separated by ';'. Relative
    links are rebased onto the document.
    """
    words, opts = options(args, {"columns", "rows"})
    if len(words) != 2:
        raise DocsError("table takes FILE HEADING [columns=...] [rows=...]")
    name, heading = words
    path = ctx.reports / name
    if not path.exists():
        raise DocsError(f"no file reports/{name}")
    lines = section_table(path.read_text(), heading, name)
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in lines]
    header, body = rows[0], rows[2:]
    if "rows" in opts:
        keep = [r.strip() for r in opts["rows"].split(";")]
        missing = [r for r in keep if r not in {row[0] for row in body}]
        if missing:
            raise DocsError(f"no row {missing[0]!r} in the table under {heading!r}")
        body = [row for row in body if row[0] in keep]
    if "columns" in opts:
        picked = column_numbers(opts["columns"], len(header))
        header = [header[i] for i in picked]
        body = [[row[i] for i in picked] for row in body]
    text = table(header, body)
    return rebase(text, path.parent, ctx.doc.parent)


def section_table(text: str, heading: str, name: str) -> list[str]:
    """The lines of the first table under `heading` (before the next heading)."""
    lines = text.splitlines()
    wanted = re.compile(r"#+\s+" + re.escape(heading))
    starts = [i for i, line in enumerate(lines) if wanted.fullmatch(line)]
    if not starts:
        raise DocsError(f"no heading {heading!r} in reports/{name}")
    found: list[str] = []
    for line in lines[starts[0] + 1 :]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            found.append(line)
        elif found:
            break
    if len(found) < 2:
        raise DocsError(f"no table under {heading!r} in reports/{name}")
    return found


def column_numbers(spec: str, count: int) -> list[int]:
    picked = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        picked += range(int(low), int(high or low) + 1)
    if not picked or min(picked) < 1 or max(picked) > count:
        raise DocsError(f"columns={spec}: the table has {count} columns")
    return [i - 1 for i in picked]


def rebase(text: str, source: Path, target: Path) -> str:
    """Rewrite relative links written from folder `source` so they work from folder `target`."""

    def move(match: re.Match) -> str:
        link = match.group("target")
        if re.match(r"[a-z][a-z0-9+.-]*:|#|/", link):
            return match.group(0)
        path, sep, anchor = link.partition("#")
        moved = os.path.relpath(source / path, target).replace(os.sep, "/")
        return match.group(0).replace(f"({link}", f"({moved}{sep}{anchor}", 1)

    return LINK.sub(move, text)


def block_metrics(ctx: Context) -> str:
    """Test metrics per task from reports/metrics.json, and how they stand to the original's."""
    metrics = ctx.read_json("metrics.json")
    seeds = ctx.read_json("seeds/seeds.json").get("tasks", {})
    rows, outside = [], []
    for task, m in metrics.items():
        original = seeds.get(task, {}).get("original")
        lo, hi = m["test_accuracy_ci95"]
        if original is not None and not lo <= original <= hi:
            outside.append(task)
        rows.append(
            [
                task,
                pct(m["test_accuracy"]),
                interval(m["test_accuracy_ci95"]),
                pct(m["test_unique_accuracy"]),
                f"{m['test_unique_images']:,}",
                pct(m["val_accuracy"]),
                f"{m['test_loss']:.4f}",
                pct(original),
            ]
        )
    header = [
        "task",
        "test accuracy",
        "95% interval",
        "without train duplicates",
        "images",
        "val accuracy",
        "test loss",
        "original",
    ]
    compared = [t for t in metrics if seeds.get(t, {}).get("original") is not None]
    verdict = (
        f"The original's test accuracy lies inside the reproduced model's 95% interval for "
        f"{len(compared) - len(outside)} of its {len(compared)} tasks"
        + (f" (outside: {', '.join(outside)})." if outside else ".")
    )
    return table(header, rows) + "\n\n" + verdict


def block_seeds(ctx: Context) -> str:
    """The seed study from reports/seeds/seeds.json: spread per task, the original against it."""
    study = ctx.read_json("seeds/seeds.json")
    rows, agree, compared = [], 0, 0
    for task, t in study["tasks"].items():
        within = t.get("original_within_2sd")
        if t.get("original") is not None:
            compared += 1
            agree += bool(within)
        rows.append(
            [
                task,
                pct(t.get("original")),
                f"{100 * t['mean']:.2f} +- {100 * t['sd']:.2f}",
                pct(t["min"]),
                pct(t["max"]),
                "" if within is None else ("yes" if within else "**no**"),
                "" if t.get("original_z") is None else f"{t['original_z']:+.2f}",
                ", ".join(f"{k}: {v}" for k, v in t["chosen"].items()),
            ]
        )
    header = [
        "task",
        "original",
        "mean +- sd",
        "min",
        "max",
        "original within mean +- 2 sd",
        "z of original",
        "chosen (number of seeds)",
    ]
    seeds = ", ".join(str(s) for s in study["seeds"])
    return (
        table(header, rows)
        + f"\n\n{study['n']} training seeds (`base.seed` {seeds}), {study['jobs']} queue "
        f"workers, {secs(study['wall_seconds'])} of wall time. The original's number lies "
        f"within mean +- 2 sd of the seeds for {agree} of its {compared} tasks."
    )


def block_robustness(ctx: Context, *conditions: str) -> str:
    """Test accuracy per condition and model from reports/robustness.json (all, or those named)."""
    data = ctx.read_json("robustness.json")
    known = {c["name"]: c for c in data["conditions"]}
    names = list(conditions) or list(known)
    for name in names:
        if name not in known:
            raise DocsError(f"no condition {name!r} in reports/robustness.json")
    models = list(data["results"])
    rows = [
        [name, f"{known[name]['images']:,}"]
        + [f"{100 * data['results'][m][name]['accuracy']:.2f}" for m in models]
        for name in names
    ]
    note = f"Test accuracy in %; {len(data['fonts'])} fonts drawn."
    return table(["condition", "images", *models], rows) + "\n\n" + note


def stage_order(root: Path) -> list[str]:
    """The stages in dvc.yaml's order (read as text: no YAML library needed for the keys)."""
    path = root / "dvc.yaml"
    if not path.exists():
        return []
    section = re.search(r"^stages:\s*\n(.*?)(?=^\S|\Z)", path.read_text(), re.M | re.S)
    return re.findall(r"^  ([A-Za-z0-9_-]+):\s*$", section.group(1), re.M) if section else []


def block_timing(ctx: Context) -> str:
    """Each stage's seconds and peak memory in the last `dvc repro`, from reports/timing/."""
    files = sorted((ctx.reports / "timing").glob("*.json"))
    if not files:
        raise DocsError("no file reports/timing/*.json")
    stages = {}
    for path in files:
        record = json.loads(path.read_text())
        stages[record.get("stage", path.stem)] = record
    order = stage_order(ctx.root)
    names = [s for s in order if s in stages] + sorted(s for s in stages if s not in order)
    names = [s for s in names if not order or s in order]  # not the seed study's own record
    rows = []
    for name in names:
        record = stages[name]
        epochs = [
            x
            for key, v in record.items()
            if key.startswith("task")
            for x in lookup(v, "epoch_seconds/*")
        ]
        span = f"{min(epochs):.1f}-{max(epochs):.1f}" if epochs else ""
        rows.append([f"`{name}`", f"{record['seconds']:,.1f}", f"{record['peak_rss_mib']:,}", span])
    original = [s for s in names if s in ORIGINAL_STAGES]
    peak = max(names, key=lambda s: stages[s]["peak_rss_mib"])
    machine = next((stages[s]["numerics"] for s in names if "numerics" in stages[s]), None)
    text = table(["stage", "seconds", "peak memory (MiB)", "epochs (s)"], rows)
    text += (
        f"\n\nAll stages: {secs(sum(stages[s]['seconds'] for s in names))}; the stages that "
        f"reproduce the original: {secs(sum(stages[s]['seconds'] for s in original))}. Largest "
        f"peak: {mib(stages[peak]['peak_rss_mib'])} (`{peak}`). Seconds inside each stage "
        "(Python start-up and imports not included); peak resident memory of the stage's "
        f"process and its workers; {stages[names[0]]['cpus']} CPU cores"
    )
    if machine:
        text += (
            f", {machine['cpu_model']}, {machine['mode']} numerics ({machine['isa']} kernels), "
            f"{machine['threads']} threads, torch {machine['torch']}, device {machine['device']}"
        )
    return text + "."


def block_speed(ctx: Context, section: str) -> str:
    """A section of the committed speed benchmark (reports/speed/): `speed SECTION`."""
    sections = {
        "suite": speed_suite,
        "sweep": speed_sweep,
        "profile": speed_profile,
        "numerics": speed_numerics,
        "startup": speed_startup,
        "spin": speed_spin,
    }
    if section not in sections:
        raise DocsError(f"unknown speed section {section!r} (known: {', '.join(sections)})")
    name = "speed/spin.json" if section == "spin" else "speed/train_speed.json"
    run = ctx.read_json(name)
    if section not in run:
        raise DocsError(f"no {section!r} in reports/{name}")
    machine = (
        f"torch {run['torch']}, {run['threads']} threads, {run['cpus']} CPUs, "
        f"{run['fingerprint']['mode']} numerics ({run['fingerprint']['isa']} kernels)"
    )
    text_file = name.replace(".json", ".txt")
    source = f"[`reports/{text_file}`]({ctx.link(text_file)})"
    return sections[section](run[section]) + f"\n\nMeasured with {machine}; as printed: {source}."


def speed_suite(suite: dict) -> str:
    original, project = suite["original"], suite["project"]
    tasks = ", ".join(f"{task} {pct(t['test_accuracy'])}" for task, t in original["tasks"].items())
    rows = [
        [
            f"the original's protocol, its style (Tasks 2-5, {original['epochs']} epochs)",
            secs(original["seconds"]),
        ],
        ["the project's `dvc repro --force`, every stage", secs(project["total_s"])],
        ["of which the stages that reproduce the original", secs(suite["original_stages_s"])],
        [
            "of which the stages beyond it: " + ", ".join(suite["beyond_stages"]),
            secs(suite["beyond_stages_s"]),
        ],
    ]
    stages = [
        [f"`{name}`", f"{s:,.1f}", f"{project['peak_rss_mib'].get(name, 0):,}"]
        for name, s in project["stages"].items()
    ]
    ratio = suite["ratio"]
    return (
        table(["run", "seconds"], rows)
        + f"\n\nReproducing stages over the original's protocol: {ratio:.3f}, so the original "
        f"takes {1 / ratio:.2f}x as long (goal at most {suite['goal_ratio']:.3f}: "
        f"{yes(ratio <= suite['goal_ratio'])}; stretch {suite['stretch_ratio']:.3f}: "
        f"{yes(ratio <= suite['stretch_ratio'])}). Test accuracy of the original's protocol: "
        f"{tasks}.\n\n"
        + table(["stage in `dvc repro --force`", "wall seconds", "peak RSS (MiB)"], stages)
    )


def speed_sweep(sweep: dict) -> str:
    rows = [
        [k, f"{w['wall_s']:,.1f}", f"{w['stage_s']:,.1f}", f"{w['peak_rss_mib']:,}"]
        for k, w in sweep["workers"].items()
    ]
    same = "byte-identical" if sweep["identical"] else "**different**"
    return (
        table(["workers", "wall s", "in-stage s", "peak RSS (MiB)"], rows)
        + f"\n\nTask 2's stage ({sweep['candidates']} candidates), a fresh process each: "
        f"speed-up from 1 to 2 workers {sweep['speedup']:.2f}x; outputs {same}."
    )


def speed_profile(profile: dict) -> str:
    rows = [
        [
            "before: gather and flip per batch, `loss.item()` per step, for-loop SGD",
            f"{profile['before']['ms_per_step']:.2f}",
        ],
        [
            "after: `fit` (blocks of batches, fused SGD, a divergence check every 50 steps)",
            f"{profile['after']['ms_per_step']:.2f}",
        ],
        [
            "floor: the two large products and the fused update alone",
            f"{profile['floor']['ms_per_step']:.2f}",
        ],
    ]
    rows += [
        [f"&nbsp;&nbsp;{part.replace('_', ' ')}", f"{ms:.2f}"]
        for part, ms in profile["floor"]["parts_ms_per_step"].items()
    ]
    ops = [
        [
            f"`{op['op']}`",
            f"{op['calls_per_step']:.2f}",
            f"{op['self_us_per_step']:.0f}",
            pct(op["share"], 1),
        ]
        for op in profile["after"]["top_ops"][:6]
    ]
    after_floor = profile["after"]["ms_per_step"] / profile["floor"]["ms_per_step"]
    return (
        table(["one Task 2 step (hidden 1000, batch 32)", "ms per step"], rows)
        + f"\n\nBefore over after: {profile['speedup']:.2f}x; after over the floor: "
        f"{after_floor:.2f}x. Median of {profile['repeats']} runs of {profile['steps']} steps. "
        "Where the step goes now:\n\n"
        + table(["operation", "calls per step", "us per step", "share"], ops)
    )


def speed_numerics(numerics: dict) -> str:
    modes = {k: v for k, v in numerics.items() if isinstance(v, dict) and "fingerprint" in v}
    rows = [
        [mode, m["fingerprint"]["isa"], f"{m['median_epoch_s']:.3f}", f"{m['last_train_loss']:.6f}"]
        for mode, m in modes.items()
    ]
    return (
        table(["mode", "ATen kernels", "median s per epoch", "last loss"], rows)
        + f"\n\nA Task 2 epoch, {numerics['epochs']} epochs per mode, each mode a fresh process; "
        f"portable over native: {numerics['ratio']:.2f}."
    )


def speed_startup(startup: dict) -> str:
    entries = {**startup["baseline"], **startup["stages"]}
    rows = [
        [
            f"`{name}`",
            f"{e['import_s']:.2f}",
            f"{e['wall_s']:.2f}",
            ", ".join(f"{pkg} {s:.2f}" for pkg, s in list(e["heaviest"].items())[:3]),
        ]
        for name, e in entries.items()
    ]
    return (
        table(["process (a stage: `--help`)", "imports s", "wall s", "heaviest imports (s)"], rows)
        + f"\n\nMedian of {startup['repeats']} runs of `python -X importtime`."
    )


def speed_spin(spin: dict) -> str:
    settings = {k: v for k, v in spin.items() if isinstance(v, dict) and "spin_count" in v}
    rows = [
        [
            name,
            f"{int(s['spin_count']):,}",
            f"{s['median_epoch_s']:.2f}",
            f"{s['last_train_loss']:.6f}",
        ]
        for name, s in settings.items()
    ]
    losses = {s["last_train_loss"] for s in settings.values()}
    same = "the same in every process" if len(losses) == 1 else "**different**"
    return (
        table(["setting", "`GOMP_SPINCOUNT`", "median s per epoch", "last loss"], rows)
        + f"\n\nTask 7 epochs, {spin['epochs']} per process, {spin['rounds']} alternating rounds "
        f"per setting: stage over default {spin['ratio']:.2f}x; last loss {same}."
    )


def block_scale(ctx: Context) -> str:
    """The committed scaling benchmark (reports/scale/scale.json): seconds, memory, goals."""
    run = ctx.read_json("scale/scale.json")
    analysis, sizes = run["analysis"], [str(n) for n in run["sizes"]]
    largest = sizes[-1]
    order = ("download", "clean_1", "clean_2", "validate", "split", "epoch")
    stages = sorted(analysis["stages"], key=lambda s: order.index(s) if s in order else len(order))
    rows = []
    for stage in stages:
        fit = analysis["stages"][stage]
        times = [secs(run["runs"][n][stage]["seconds"]) for n in sizes]
        peak = run["runs"][largest][stage]["peak_rss_mib"]
        rows.append(
            [
                stage,
                *times,
                f"{fit['projected_seconds']:,.0f} s",
                f"{peak:,.0f}",
                f"{fit['projected_peak_rss_mib']:,.0f}",
            ]
        )
    header = [
        "stage",
        *(f"N = {int(n):,}" for n in sizes),
        f"projected to {LARGE:,}",
        f"peak MiB at {int(largest):,}",
        "projected peak MiB",
    ]
    goals = analysis["goals"]
    rounds = ", ".join(f"{x:.2f}x" for x in analysis["clean_speedup_per_try"])
    epoch_peaks = run["runs"][largest]["epoch"].get("tries_peak_rss_mib", [])
    return (
        table(header, rows)
        + f"\n\n{run['repeats']} runs of every stage, the stages in turn; seconds are the stage "
        f"process's wall time, start-up included (the run of median seconds), on "
        f"{run['machine']['cpus']} CPUs. `clean_1` and `clean_2`: `clean.workers` 1 and 2; "
        "`epoch`: one Task 2 epoch on the train split, its validation pass included. Goals:\n\n"
        f"- time linear in N: {yes(goals['time_linear'])} (in CPU seconds: "
        f"{yes(goals['cpu_time_linear'])});\n"
        f"- projected peak memory under 4 GB: {yes(goals['rss_under_4gb_at_529k'])}"
        + (
            f" (the epoch's peaks at {int(largest):,}: "
            f"{min(epoch_peaks):,.0f}-{max(epoch_peaks):,.0f} MiB)"
            if epoch_peaks
            else ""
        )
        + f";\n- `clean` with 2 processes at least 1.7x as fast as with 1: "
        f"{yes(goals['clean_2_processes_1_7x'])}, {analysis['clean_speedup']:.2f}x, the median "
        f"of the rounds' ratios (rounds: {rounds}; median seconds over median seconds: "
        f"{analysis['clean_speedup_of_medians']:.2f}x; after start-up: "
        f"{analysis['clean_speedup_after_startup']:.2f}x; at most "
        f"{analysis['clean_speedup_cpu_bound']:.2f}x from CPU time).\n\n"
        f"Every figure per size: [`reports/scale/scale.md`]({ctx.link('scale/scale.md')})."
    )


def block_gpu(ctx: Context) -> str:
    """The committed GPU run (reports/gpu/gpu.json) beside the CPU's seed study."""
    run = ctx.read_json("gpu/gpu.json")
    study = ctx.read_json("seeds/seeds.json")["tasks"]
    rows = []
    for r in run["runs"]:
        task = r["run"].split()[0]
        seeds = study.get(task)
        against = ""
        if seeds and seeds["sd"]:
            z = (r["test_accuracy"] - seeds["mean"]) / seeds["sd"]
            inside = seeds["min"] <= r["test_accuracy"] <= seeds["max"]
            against = f"z = {z:+.1f}, {'inside' if inside else 'outside'} the seeds' range"
        rows.append(
            [
                r["run"],
                str(r["epochs"]),
                f"{r['seconds']:,.2f}",
                pct(r["test_accuracy"]),
                pct(r["cpu_test_accuracy"]),
                secs(r["cpu_stage_seconds"]),
                against,
            ]
        )
    header = [
        "run",
        "epochs",
        "seconds",
        "test accuracy",
        "CPU run of then: test accuracy",
        "CPU stage seconds then",
        "against the CPU seed study",
    ]
    return (
        table(header, rows)
        + f"\n\n{run['device']}, torch {run['torch']}; default params and split, the training "
        "code as the stages run it (MLflow aside)."
    )


BLOCKS = {
    "value": block_value,
    "table": block_table,
    "metrics": block_metrics,
    "seeds": block_seeds,
    "robustness": block_robustness,
    "timing": block_timing,
    "speed": block_speed,
    "scale": block_scale,
    "gpu": block_gpu,
}


# ----------------------------------------------------------------------------- filling


def render(text: str, ctx: Context) -> tuple[str, list[str]]:
    """The text with every block rewritten, and one line per block that could not be."""
    errors: list[str] = []
    fences = [m.span() for m in FENCE.finditer(text)]

    def fill(match: re.Match) -> str:
        if any(start <= match.start() < end for start, end in fences):
            return match.group(0)  # an example in a code block, not a block
        name, body = match.group("name"), match.group("body")
        label = block_label(text, match, ctx)
        try:
            if name not in BLOCKS:
                raise DocsError(f"unknown block (known: {', '.join(BLOCKS)})")
            markdown = BLOCKS[name](ctx, *shlex.split(match.group("args")))
        except (DocsError, TypeError, KeyError, ValueError) as error:
            errors.append(f"{label}: {error}")
            return match.group(0)
        inner = f"\n\n{markdown.strip()}\n\n" if body.startswith("\n") else markdown
        start = match.group(0)[: match.start("body") - match.start()]
        return f"{start}{inner}<!-- {name}:end -->"

    filled = BLOCK.sub(fill, text)
    opened = re.findall(r"<!-- ([a-z][a-z0-9_]*):start", FENCE.sub("", text))
    closed = [m.group("name") for m in BLOCK.finditer(FENCE.sub("", text))]
    if len(opened) != len(closed):
        errors.append(f"{relative(ctx.doc, ctx.root)}: a block's start has no matching end")
    return filled, errors


def block_label(text: str, match: re.Match, ctx: Context) -> str:
    line = text.count("\n", 0, match.start()) + 1
    args = match.group("args").strip()
    name = f"{match.group('name')} {args}".strip()
    return f"{relative(ctx.doc, ctx.root)}:{line}: block '{name}'"


def relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def differences(old: str, new: str, ctx: Context) -> list[str]:
    """One line per block whose text differs between old and new (same blocks, same order)."""
    found = []
    for before, after in zip(BLOCK.finditer(old), BLOCK.finditer(new), strict=True):
        if before.group(0) != after.group(0):
            found.append(f"{block_label(old, before, ctx)} differs from what reports/ says")
    return found


def documents(root: Path) -> list[Path]:
    """README.md and every page under docs/."""
    return [p for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))] if p.exists()]


# ----------------------------------------------------------------------------- links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation removed, '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def without_code(text: str) -> str:
    """The text with fenced blocks and code spans blanked (same line numbers)."""
    blank = lambda m: re.sub(r"[^\n]", " ", m.group(0))  # noqa: E731
    return CODE_SPAN.sub(blank, FENCE.sub(blank, text))


def anchors(text: str) -> set[str]:
    """Every #anchor the headings of a Markdown text give, duplicates numbered -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for match in HEADING.finditer(FENCE.sub("", text)):
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def broken_links(path: Path, root: Path) -> list[str]:
    """One line per relative link or #anchor in a Markdown file that leads nowhere."""
    text = path.read_text()
    plain = without_code(text)
    problems = []
    for match in LINK.finditer(plain):
        target = match.group("target")
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        line = plain.count("\n", 0, match.start()) + 1
        where = f"{relative(path, root)}:{line}: {target}"
        if not dest.exists():
            problems.append(f"{where}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{where}: no heading gives #{anchor}")
    return problems


# ----------------------------------------------------------------------------- command


def run(root: Path, paths: list[Path], check: bool, show_diff: bool, links: bool) -> list[str]:
    """Fill (or with check, compare) every block; the problems found, one line each."""
    problems, updates = [], {}
    for path in paths:
        ctx = Context(root=root, doc=path.resolve())
        old = path.read_text()
        new, errors = render(old, ctx)
        problems += errors
        if new != old:
            if check:
                problems += differences(old, new, ctx)
                if show_diff:
                    sys.stdout.writelines(
                        difflib.unified_diff(
                            old.splitlines(True), new.splitlines(True), str(path), "generated"
                        )
                    )
            updates[path] = new
        if links:
            problems += broken_links(path, root)
    if not check and not problems:
        for path, new in updates.items():
            path.write_text(new)
            print(f"docs: wrote {relative(path, root)}")
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.docs",
        description="Fill the generated blocks of README.md and docs/*.md from reports/.",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        type=Path,
        help="Markdown files to fill (default: README.md and docs/*.md under --root)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 naming each block that differs from what reports/ says",
    )
    parser.add_argument(
        "--diff", action="store_true", help="with --check, also print the changes as a diff"
    )
    parser.add_argument(
        "--links",
        action="store_true",
        help="also check that every relative link and #anchor leads to a file and a heading",
    )
    parser.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="project root holding reports/, README.md and docs/ (default: this project)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = args.root.resolve()
    paths = args.paths or documents(root)
    problems = run(root, paths, args.check, args.diff, args.links)
    for line in problems:
        print(f"docs: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
