"""Perturbed test images and letters from fonts: the robustness conditions.

The test split's images (uint8, white glyph on black) under each condition:
- shifts of k px right, left, down and up: integer moves, black fills the gap (exact);
- rotations by +a (counter-clockwise) and -a degrees about the center, and scalings about the
  center: Pillow's bilinear resampling with black fill, the same bytes on every machine;
- Gaussian noise of standard deviation s * 255, rounded and clipped to 0..255, drawn from a
  NumPy generator seeded with (base.seed, level);
- inverted contrast: 255 - x.

Out of distribution: the letters A-J drawn white on black from every text font the
environment has, cropped to the glyph and stretched to 28x28 as notMNIST glyphs are
(`pipeline.data.glyph.fit_frame`): first the TrueType fonts matplotlib ships (DejaVu, STIX, Computer
Modern), then, with `robustness.system_fonts`, those matplotlib's font manager finds on the
system (fontconfig's `fc-list` and the usual font folders), each set in sorted path order.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline import cli, tracking
from pipeline.config import (
    LETTERS,
    SIZE,
    MlflowParams,
    Paths,
    RobustnessParams,
    StageError,
    load,
)
from pipeline.data import glyph
from pipeline.data.decode import load_clean
from pipeline.training.loop import normalize, predict_batched

log = logging.getLogger(__name__)


BILINEAR = Image.Resampling.BILINEAR

SAMPLE_FONTS = 6  # font rows in the sample grid


@dataclass(frozen=True)
class Condition:
    name: str  # also an MLflow metric name: letters, digits, spaces, dots
    description: str
    apply: object  # (N, 28, 28) uint8 -> (N, 28, 28) uint8


def shift(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """Move every image dx px right and dy px down (negative: left, up); black comes in."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = images[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def _each(images: np.ndarray, f) -> np.ndarray:
    return np.stack([np.asarray(f(Image.fromarray(x, "L"))) for x in images])


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate about the center, counter-clockwise for positive degrees."""
    return _each(images, lambda im: im.rotate(degrees, resample=BILINEAR, fillcolor=0))


def scale(images: np.ndarray, factor: float) -> np.ndarray:
    """Scale about the center: 0.8 shrinks the glyph inside a black frame, 1.2 crops it."""
    c, a = SIZE / 2, 1 / factor  # each output pixel samples the input at a * (x - c) + c
    data = (a, 0, c - a * c, 0, a, c - a * c)
    return _each(
        images,
        lambda im: im.transform((SIZE, SIZE), Image.Transform.AFFINE, data, BILINEAR, fillcolor=0),
    )


def noise(images: np.ndarray, std: float, seed: int, level: int) -> np.ndarray:
    """Add Gaussian noise of standard deviation std * 255; round and clip to 0..255."""
    rng = np.random.default_rng([seed, level])
    noisy = images + rng.normal(0.0, std * 255, images.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def conditions(p: RobustnessParams, seed: int) -> list[Condition]:
    """The test-split conditions in report order, the unchanged split first."""
    out = [Condition("clean", "the test split as it is", lambda x: x)]
    for k in p.shifts:
        for way, dx, dy in (("right", k, 0), ("left", -k, 0), ("down", 0, k), ("up", 0, -k)):
            out.append(
                Condition(
                    f"shift {way} {k}",
                    f"moved {k} px {way}, black fills the gap",
                    partial(shift, dx=dx, dy=dy),
                )
            )
    for a in p.rotations:
        for sense, degrees in (("ccw", a), ("cw", -a)):
            text = f"rotated {a:g} degrees {sense} about the center, bilinear"
            out.append(Condition(f"rotate {a:g} {sense}", text, partial(rotate, degrees=degrees)))
    for f in p.scales:
        out.append(
            Condition(
                f"scale {f:g}",
                f"scaled {f:g}x about the center, bilinear",
                partial(scale, factor=f),
            )
        )
    for level, s in enumerate(p.noise_std):
        out.append(
            Condition(
                f"noise {s:g}",
                f"Gaussian noise, std {s:g} of the 0-255 range",
                partial(noise, std=s, seed=seed, level=level),
            )
        )
    if p.invert:
        out.append(Condition("inverted", "black glyph on white: 255 - x", lambda x: 255 - x))
    return out


@dataclass(frozen=True)
class Font:
    name: str  # full name in the font's name table, e.g. "DejaVu Sans Bold"
    path: Path
    source: str  # "matplotlib" or "system"

    def as_dict(self) -> dict:
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        shown = self.path.name if self.source == "matplotlib" else str(self.path)
        return {"name": self.name, "source": self.source, "file": shown, "sha256": digest}


def font_files(system: bool) -> list[tuple[str, Path]]:
    """(source, path) of every candidate font file: matplotlib's, then the system's, sorted."""
    import matplotlib
    from matplotlib import font_manager

    bundled = sorted((Path(matplotlib.get_data_path()) / "fonts" / "ttf").glob("*.ttf"))
    found = sorted({Path(f).resolve() for f in font_manager.findSystemFonts()}) if system else []
    return [("matplotlib", p) for p in bundled] + [("system", p) for p in found]


def text_font_name(path: Path) -> tuple[str | None, str]:
    """(full name, "") for a font that draws A-J as letters, else (None, why not).

    Its character map must send A-J to ten distinct glyphs not named as something else:
    that drops fonts without Latin capitals (STIX size variants), symbol fonts that put
    other shapes at those codes (cmex10's delimiters) and fallback fonts that draw one box
    for a whole block (Last Resort).
    """
    from fontTools.ttLib import TTFont

    try:
        font = TTFont(path, fontNumber=0, lazy=True)
        cmap = font.getBestCmap() or {}
        name = font["name"].getBestFullName()
    except Exception as e:  # noqa: BLE001 - any unreadable font is skipped with its reason
        return None, f"unreadable ({cli.one_line(e)[:80]})"
    glyphs = [cmap.get(ord(c)) for c in LETTERS]
    if None in glyphs:
        return None, "no glyph for some of A-J"
    if len(set(glyphs)) < len(glyphs):
        return None, "one glyph for several of A-J"
    for g, c in zip(glyphs, LETTERS, strict=True):
        if not (g == c or g.startswith(f"{c}.") or g.lower().startswith(("uni", "glyph", "cid"))):
            return None, f"{c} is drawn as '{g}'"
    return (name or path.stem), ""


def find_fonts(system: bool) -> tuple[list[Font], list[dict]]:
    """The text fonts to render (first file of each full name wins), and the files skipped."""
    fonts, skipped, names = [], [], set()
    for source, path in font_files(system):
        name, why = text_font_name(path)
        if name in names:
            name, why = None, "a font of the same name came first"
        if name is None:
            skipped.append(
                {
                    "file": path.name if source == "matplotlib" else str(path),
                    "source": source,
                    "reason": why,
                }
            )
            continue
        names.add(name)
        fonts.append(Font(name, path, source))
    return fonts, skipped


def render_letter(font: Font, letter: str, size: int) -> np.ndarray:
    """One letter drawn white on black at `size` px, fitted to 28x28 like notMNIST."""
    face = ImageFont.truetype(str(font.path), size, layout_engine=ImageFont.Layout.BASIC)
    canvas = Image.new("L", (4 * size, 4 * size), 0)  # room for swashes and descenders
    ImageDraw.Draw(canvas).text((2 * size, 2 * size), letter, fill=255, font=face, anchor="mm")
    return glyph.fit_frame(np.asarray(canvas))


def render_fonts(fonts: list[Font], size: int) -> tuple[list[Font], np.ndarray, np.ndarray]:
    """(fonts drawn, images (F*10, 28, 28), labels): A-J per font; a font that fails is left out."""
    kept, images = [], []
    for font in fonts:
        try:
            images.append(np.stack([render_letter(font, c, size) for c in LETTERS]))
        except (OSError, ValueError) as e:  # FreeType cannot read it, or a letter is blank
            log.info("font %s (%s) left out: %s", font.name, font.path, cli.one_line(e))
            continue
        kept.append(font)
    labels = np.tile(np.arange(len(LETTERS)), len(kept))
    stacked = np.concatenate(images) if images else np.zeros((0, SIZE, SIZE), np.uint8)
    return kept, stacked, labels


def font_sets(fonts: list[Font], images: np.ndarray, labels: np.ndarray) -> list[tuple]:
    """One condition per font source that has fonts: (condition, images, labels)."""
    out = []
    for source in ("matplotlib", "system"):
        rows = np.flatnonzero(np.repeat([f.source == source for f in fonts], len(LETTERS)))
        if len(rows):
            text = f"A-J from {len(rows) // len(LETTERS)} {source} fonts, fitted like notMNIST"
            out.append((Condition(f"fonts {source}", text, None), images[rows], labels[rows]))
    return out


def load_test_split(paths: Paths) -> tuple[np.ndarray, np.ndarray]:
    """The test split's uint8 images and class ids, in split.csv order."""
    images, index = load_clean(paths.clean_dir)
    table = pd.read_csv(paths.split_dir / "split.csv", dtype={"path": str})
    if not table["path"].equals(index["path"]):
        raise StageError(f"{paths.split_dir}/split.csv does not match {paths.clean_dir}/index.csv")
    rows = (table["split"] == "test").to_numpy()
    return images[rows], index["class_id"].to_numpy()[rows]


def correct(model, images: np.ndarray, labels: np.ndarray) -> int:
    """How many images the model labels right."""
    out = predict_batched(model, normalize(images))
    return int((out.argmax(1) == torch.as_tensor(labels)).sum())


def score_conditions(models: dict, sets: list[tuple[Condition, np.ndarray, np.ndarray]]) -> dict:
    """{task: {condition: {"correct", "images", "accuracy"}}} over every model and set."""
    out = {}
    for task, model in models.items():
        out[task] = {}
        for cond, images, labels in sets:
            hits = correct(model, images, labels)
            out[task][cond.name] = {
                "correct": hits,
                "images": len(labels),
                "accuracy": hits / len(labels),
            }
    return out


def sample_rows(sets, fonts: list[Font], font_images: np.ndarray, labels: np.ndarray):
    """(row labels, (R, 10, 28, 28) images): the first test image of each letter under every
    test condition, then A-J of a few fonts spread over the font list."""
    first = [
        int(np.flatnonzero(labels == c)[0]) if (labels == c).any() else -1
        for c in range(len(LETTERS))
    ]
    names, rows = [], []
    for cond, images, _ in sets:
        if cond.name.startswith("fonts "):
            continue
        blank = np.zeros((SIZE, SIZE), np.uint8)
        rows.append(np.stack([images[i] if i >= 0 else blank for i in first]))
        names.append(cond.name)
    n = len(fonts)
    spread = {i * (n - 1) // (SAMPLE_FONTS - 1) for i in range(SAMPLE_FONTS)} if n else set()
    for k in sorted(spread):
        rows.append(font_images[k * len(LETTERS) : (k + 1) * len(LETTERS)])
        names.append(fonts[k].name)
    return names, np.stack(rows)


def log_robustness(client, runs: dict[str, str], results: dict, paths: Paths) -> None:
    """robustness.json, the plot and one metric per condition into each task's parent run."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    for task, run_id in runs.items():
        for path in (paths.robustness, paths.plots / "robustness.png"):
            client.log_artifact(run_id, str(path), artifact_path="robustness")
        metrics = [  # a chart section of their own, after the task's results
            Metric(f"{tracking.ROBUSTNESS_SECTION}/{name}", r["accuracy"], now, 0)
            for name, r in results[task].items()
        ]
        client.log_batch(run_id, metrics=metrics)


def robustness_runs(paths: Paths, tasks) -> tuple[object, dict[str, str]]:
    """The MLflow client and each task's parent run; fails before any work if one is missing."""
    import mlflow

    experiment = load(paths.params, "mlflow", MlflowParams).experiment
    uri = tracking.tracking_uri(paths.root)
    tracking.check_server(uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    return client, {t: tracking.parent_run(client, paths, t, experiment) for t in tasks}
