"""Classify letter images with the registered champion or a model file.

    python -m pipeline.predict IMAGE... [--model models/<task>.pt]

Each PNG or JPEG, of any size and mode, is made into a 28x28 notMNIST-like glyph (see
`prepare`), and one line per file is printed: the letter, its probability and the top 3. A
file that is missing or cannot be read gets one error line on stderr; the others are still
answered, and the exit code is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline import tracking
from pipeline.cli import one_line
from pipeline.config import LETTERS, ROOT, Paths, StageError
from pipeline.data import glyph
from pipeline.evaluation.scoring import ALIAS, REGISTERED_MODEL
from pipeline.files import read_json

LIGHT_BORDER = 0.9  # this share of light border pixels means dark ink on a light background
CROP_INK = (
    32  # after the levels are set, the crop keeps pixels this bright: not paper or JPEG noise
)
TOP = 3


def to_gray(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> float32 luminance in 0..255 (ITU-R 601-2, Pillow's "L").

    16-bit and 32-bit integer images are scaled from 0..65535. Transparent pixels are filled
    with the background that contrasts with the opaque ones (black behind light ink, white
    behind dark ink), so a glyph drawn on a transparent canvas stays visible.
    """
    image = ImageOps.exif_transpose(image)  # a phone photo's orientation tag
    if image.mode.startswith("I"):  # I;16, I;16B, I;16L, I: 16-bit PNGs
        return np.clip(np.asarray(image, np.float32) / 257, 0, 255)
    if image.mode == "F":
        return np.clip(np.asarray(image, np.float32), 0, 255)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        gray = np.asarray(rgba.convert("L"), np.float32)
        alpha = np.asarray(rgba.getchannel("A"), np.float32) / 255
        if alpha.sum() == 0:
            return np.zeros_like(gray)  # nothing opaque: blank
        background = 0.0 if (gray * alpha).sum() / alpha.sum() >= 128 else 255.0
        return gray * alpha + background * (1 - alpha)
    return np.asarray(image.convert("L"), np.float32)


def prepare(image: Image.Image) -> np.ndarray:
    """An image of one letter -> a 28x28 uint8 white-on-black glyph, as notMNIST draws them.

    1. luminance in 0..255 (`to_gray`: any mode, alpha, 16 bits);
    2. polarity: a pixel is light when it is above the middle of the image's range; when at
       least 90% of the outermost pixels are light, the background is light and the image is
       inverted, giving a white glyph on black (notMNIST's);
    3. levels: the median of the dark outermost pixels (the background: paper, a shadow)
       becomes black and the lightest pixel white;
    4. cropped to the bounding box of the pixels >= 32 (paper texture and JPEG noise stay
       below) and stretched to 28x28 on each axis, without margin (`pipeline.data.glyph.fit_frame`:
       notMNIST glyphs fill their frame so).

    notMNIST's own test images (their glyph touches the frame) come out unchanged in 83% of
    cases; 0.8% are inverted (solid blocks, inverted fonts), which 75% instead of 90% in step
    2 would make 4%.

    Raises ValueError for an image with a single gray level (nothing to read).
    """
    gray = to_gray(image)
    if gray.max() - gray.min() < 1:
        raise ValueError("the image has one gray level: no glyph")
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    if (border >= (gray.min() + gray.max()) / 2).mean() >= LIGHT_BORDER:
        gray, border = 255 - gray, 255 - border
    middle, top = (gray.min() + gray.max()) / 2, gray.max()
    background = float(np.median(border[border <= middle]))  # never empty: see the 90% rule
    gray = np.clip((gray - background) * (255 / (top - background)), 0, 255)
    return glyph.fit_frame(np.round(gray).astype(np.uint8), CROP_INK)


def read_image(path: Path) -> np.ndarray:
    """A file -> its 28x28 glyph; OSError or ValueError with a one-line reason."""
    if not path.is_file():
        raise OSError("no such file" if not path.exists() else "not a file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return prepare(image)
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read (PNG or JPEG expected)") from None
    except PermissionError:
        raise OSError("permission denied") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"too large: {one_line(e)}") from None
    except (OSError, SyntaxError) as e:  # truncated or corrupt data
        raise ValueError(f"cannot decode the image ({one_line(e)})") from None


def champion(paths: Paths) -> tuple[Path, str]:
    """models/<task>.pt of the registered champion, and where that was found.

    The registry holds the model as MLflow logged it (torch.export's pt2); the project's own
    file of the same training run loads with weights_only=True, without MLflow. The alias's
    run must be the parent run the training stage recorded for that task, else
    models/<task>.pt is not the champion.
    Without a local MLflow store (a fresh clone), reports/registry.json, which `evaluate`
    wrote when it set the alias, names it.
    """
    uri = tracking.tracking_uri(paths.root)
    local = uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None
    if local is not None and not Path(local).is_file():
        record = read_json(paths.root / "reports" / "registry.json")
        task, run_id, version = record["task"], record["run_id"], record["version"]
        where = "reports/registry.json"
    else:
        import mlflow
        from mlflow.exceptions import MlflowException

        tracking.check_server(uri)
        try:
            found = mlflow.MlflowClient(tracking_uri=uri).get_model_version_by_alias(
                REGISTERED_MODEL, ALIAS
            )
        except MlflowException as e:
            raise StageError(
                f"no {REGISTERED_MODEL}@{ALIAS} in {uri} ({one_line(e)[:200]}); run "
                "`dvc repro evaluate` or pass --model"
            ) from None
        task, run_id, version = found.tags.get("task"), found.run_id, found.version
        where = uri
    if not task:
        raise StageError(f"{REGISTERED_MODEL} version {version} has no task tag")
    recorded = tracking.recorded_run_id(paths, task)
    if recorded != run_id:
        raise StageError(
            f"{REGISTERED_MODEL}@{ALIAS} (version {version}) is run {run_id}, but "
            f"models/{task}.pt comes from run {recorded}: run `dvc repro evaluate` or pass --model"
        )
    return paths.models / f"{task}.pt", f"{REGISTERED_MODEL}@{ALIAS} version {version} ({where})"


def load_model_file(path: Path):
    """The model in a models/<task>.pt file; StageError in one line if it is not one."""
    from pipeline.training.model import load_model

    if not path.is_file():
        raise StageError(f"model {path}: no such file")
    try:
        model, _ = load_model(path)
    except Exception as e:  # noqa: BLE001 - any unreadable or foreign file, said in one line
        reason = one_line(e)[:200]
        raise StageError(f"model {path}: not a model file of this project ({reason})") from None
    return model


@torch.no_grad()
def probabilities(model, glyphs: np.ndarray) -> np.ndarray:
    """(N, 28, 28) uint8 glyphs -> (N, 10) class probabilities."""
    from pipeline.training.loop import normalize

    out = model(normalize(glyphs))
    return (out if model.cfg.softmax_output else torch.softmax(out, 1)).double().numpy()


def describe(probs: np.ndarray) -> str:
    """'C 97.31% (top 3: C 97.31%, G 1.52%, E 0.60%)'."""
    order = np.argsort(-probs, kind="stable")[:TOP]
    top = ", ".join(f"{LETTERS[i]} {100 * probs[i]:.2f}%" for i in order)
    return f"{LETTERS[order[0]]} {100 * probs[order[0]]:.2f}% (top {TOP}: {top})"


def run(files: list[Path], model_path: Path | None, root: Path, save_dir: Path | None) -> int:
    paths = Paths(root)
    try:
        if model_path is None:
            model_path, source = champion(paths)
        else:
            source = "--model"
        model = load_model_file(model_path)
    except StageError as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 1
    print(f"model: {model_path} ({source})", file=sys.stderr)
    failed = 0
    for path in files:
        try:
            image = read_image(path)
        except (OSError, ValueError) as e:
            print(f"{path}: error: {e}", file=sys.stderr)
            failed += 1
            continue
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(save_dir / f"{path.stem}.png")
        print(f"{path}: {describe(probabilities(model, image[None])[0])}", flush=True)
    return 1 if failed else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.predict",
        description="Print the letter (A-J) in each image, its probability and the top 3. "
        "Images: PNG or JPEG, any size and mode; each is made into a 28x28 white-on-black glyph "
        "stretched to fill the frame, as notMNIST's are. Default model: the registered "
        f"{REGISTERED_MODEL}@{ALIAS} (its models/<task>.pt). Exit code 1 if any file failed.",
    )
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="PNG or JPEG files")
    p.add_argument("--model", type=Path, help="a models/<task>.pt file instead of the champion")
    p.add_argument(
        "--root",
        type=Path,
        default=ROOT,
        help="project folder (models/, reports/, mlflow.db) (default: %(default)s)",
    )
    p.add_argument(
        "--save-inputs",
        type=Path,
        metavar="DIR",
        help="also write each 28x28 glyph the model sees to DIR/<name>.png",
    )
    args = p.parse_args(argv)
    return run(args.images, args.model, args.root.resolve(), args.save_inputs)


if __name__ == "__main__":
    sys.exit(main())
