"""Predict from image files, and the champion served over HTTP by `mlflow models serve`."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageDraw, ImageFont

from pipeline import predict
from pipeline.config import LETTERS, TASKS, Paths
from pipeline.data import glyph
from pipeline.training.loop import normalize
from pipeline.training.model import load_model as load_model

FONT = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans-Bold.ttf"
LINE = re.compile(
    r"^(?P<path>.+): (?P<letter>[A-J]) (?P<p>\d+\.\d\d)% \(top 3: (?P<top>[A-J] \d+\.\d\d%"
    r"(, [A-J] \d+\.\d\d%){2})\)$"
)


def letter_canvas(letter: str = "K", size=(160, 120)) -> np.ndarray:
    """A white letter on black with a wide margin, off-center; uint8 (H, W)."""
    canvas = Image.new("L", size, 0)
    face = ImageFont.truetype(str(FONT), 64)
    ImageDraw.Draw(canvas).text((60, 55), letter, fill=255, font=face, anchor="mm")
    return np.asarray(canvas)


REFERENCE = letter_canvas()
EXPECTED = predict.prepare(Image.fromarray(REFERENCE))


# The preprocessing, by input kind


def test_reference_glyph_fills_the_frame():
    assert EXPECTED.shape == (28, 28) and EXPECTED.dtype == np.uint8
    ink = EXPECTED > 0
    assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()
    assert EXPECTED[14, 0] > 128  # the K's stem on the left edge
    assert EXPECTED[14, 27] == 0  # between its arms: background


def test_notmnist_like_glyph_is_kept_as_it_is():
    # Already 28x28, white on black, filling the frame (as glyph.fit_frame makes it).
    x = glyph.fit_frame(REFERENCE)
    assert x.min() == 0 and x.max() == 255
    assert (x >= predict.CROP_INK).any(1).all() and (x >= predict.CROP_INK).any(0).all()
    np.testing.assert_array_equal(predict.prepare(Image.fromarray(x)), x)


def rgba(ink: int) -> Image.Image:
    """The letter in `ink` (0 or 255) on a fully transparent canvas."""
    pixels = np.zeros((*REFERENCE.shape, 4), np.uint8)
    pixels[..., :3] = ink
    pixels[..., 3] = REFERENCE
    return Image.fromarray(pixels, "RGBA")


def gray16() -> Image.Image:
    return Image.fromarray(REFERENCE.astype(np.uint16) * 257)


def palette() -> Image.Image:
    return Image.fromarray(255 - REFERENCE).convert("RGB").convert("P", palette=Image.ADAPTIVE)


def colored() -> Image.Image:
    """Dark blue ink on cream paper."""
    a = REFERENCE[..., None].astype(float) / 255
    ink, paper = np.array([20, 30, 120]), np.array([250, 240, 210])
    return Image.fromarray(np.round(a * ink + (1 - a) * paper).astype(np.uint8), "RGB")


def huge() -> Image.Image:
    return Image.fromarray(REFERENCE).resize((4000, 3000), Image.Resampling.BILINEAR)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """1 for the same glyph; about 0 for another letter, -1 for the inverted one."""
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


@pytest.mark.parametrize(
    "make, fmt, exact",
    [
        (lambda: Image.fromarray(255 - REFERENCE), "PNG", True),  # black on white
        (lambda: rgba(0), "PNG", True),  # black ink on transparent
        (lambda: rgba(255), "PNG", True),  # white ink on transparent
        (gray16, "PNG", True),  # 16-bit grayscale
        (palette, "PNG", True),
        (colored, "PNG", False),  # RGB, rounded to 8 bits
        (colored, "JPEG", False),  # lossy: ringing moves the crop by a pixel or so
        (lambda: Image.fromarray(255 - REFERENCE), "JPEG", False),
        (huge, "PNG", False),  # 4000x3000: wider antialiased edges
    ],
    ids=[
        "inverted",
        "rgba-dark",
        "rgba-light",
        "16-bit",
        "palette",
        "color-png",
        "color-jpeg",
        "gray-jpeg",
        "huge",
    ],
)
def test_every_kind_of_image_becomes_the_same_glyph(tmp_path, make, fmt, exact):
    path = tmp_path / f"x.{fmt.lower()}"
    make().save(path, fmt)
    x = predict.read_image(path)
    assert x.shape == (28, 28) and x.dtype == np.uint8
    if exact:
        np.testing.assert_array_equal(x, EXPECTED)
    else:
        assert correlation(x, EXPECTED) > 0.9


def test_correlation_tells_glyphs_apart():
    other = predict.prepare(Image.fromarray(letter_canvas("B")))
    assert abs(correlation(other, EXPECTED)) < 0.5
    assert correlation(255 - EXPECTED, EXPECTED) < -0.9


def test_16_bit_png_is_read_as_16_bit(tmp_path):
    path = tmp_path / "g16.png"
    gray16().save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # not silently 8-bit: the scaling branch ran


def test_palette_with_a_transparent_background(tmp_path):
    image = Image.fromarray(REFERENCE).convert("P")  # index 0 is black: make it transparent
    path = tmp_path / "p.png"
    image.save(path, transparency=0)
    np.testing.assert_array_equal(predict.read_image(path), EXPECTED)


def test_tiny_image_still_gives_a_glyph(tmp_path):
    path = tmp_path / "tiny.png"
    Image.fromarray(REFERENCE).resize((8, 6), Image.Resampling.BILINEAR).save(path)
    x = predict.read_image(path)
    assert x.shape == (28, 28) and x.max() >= 200


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.png", None, "no such file"),
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image Pillow can read"),
        ("notes.png", b"hello, not an image", "not an image Pillow can read"),
        ("blank.png", "blank", "one gray level"),
        ("folder.png", "dir", "not a file"),
    ],
)
def test_unreadable_inputs_raise_one_line(tmp_path, name, content, message):
    path = tmp_path / name
    if content == "blank":
        Image.new("L", (40, 30), 200).save(path)
    elif content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises((OSError, ValueError), match=message) as e:
        predict.read_image(path)
    assert "\n" not in str(e.value)


def test_truncated_png(tmp_path):
    good = io.BytesIO()
    Image.fromarray(REFERENCE).save(good, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(ValueError, match="cannot decode the image"):
        predict.read_image(path)


def test_gray_paper_at_mid_range():
    # Ink 0, paper exactly halfway between the darkest and lightest pixels, one light speck.
    pixels = np.where(REFERENCE > 127, 0, 127).astype(np.uint8)
    pixels[0, 0] = 254
    x = predict.prepare(Image.fromarray(pixels))
    assert correlation(x, EXPECTED) > 0.9


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(REFERENCE).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", REFERENCE.size // 3)  # so it counts as huge
    with pytest.raises(ValueError, match="too large: Image size"):
        predict.read_image(path)


def test_describe_formats_the_top_three():
    probs = np.array([0.01, 0.02, 0.9, 0.0, 0.05, 0.0, 0.02, 0.0, 0.0, 0.0])
    assert predict.describe(probs) == "C 90.00% (top 3: C 90.00%, E 5.00%, B 2.00%)"


# The command line on a tiny trained project


def run_cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = predict.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Good files of three kinds and a bad one of each kind."""
    d = tmp_path_factory.mktemp("images")
    Image.fromarray(255 - REFERENCE).save(d / "k.png")
    colored().save(d / "k.jpg", quality=90)
    Image.fromarray(letter_canvas("B")).save(d / "b.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x13" * 64)
    (d / "text.png").write_text("not an image")
    return d


@pytest.fixture
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def champion_task(root: Path) -> str:
    return json.loads((root / "reports" / "registry.json").read_text())["task"]


def test_champion_answers_each_file(trained_project, images, no_tracking_env):
    root, _ = trained_project
    files = [images / "k.png", images / "k.jpg", images / "b.png"]
    code, out, err = run_cli(*files, "--root", root)
    assert code == 0, err
    task = champion_task(root)
    assert err.strip() == (
        f"model: {root / 'models' / f'{task}.pt'} (notmnist-classifier@champion version 1 "
        f"(sqlite:///{root / 'mlflow.db'}))"
    )
    lines = out.strip().splitlines()
    assert [LINE.match(line)["path"] for line in lines] == [str(f) for f in files]

    # The same numbers as the model file on the same glyphs.
    model, _ = load_model(root / "models" / f"{task}.pt")
    for path, line in zip(files, lines, strict=True):
        with torch.no_grad():
            scores = model(normalize(predict.read_image(path)[None]))
        probs = (scores if model.cfg.softmax_output else torch.softmax(scores, 1))[0].double()
        assert line == f"{path}: {predict.describe(probs.numpy())}"
        assert LINE.match(line)["letter"] == LETTERS[int(probs.argmax())]


def test_bad_files_get_one_line_each_and_the_rest_are_answered(
    trained_project, images, no_tracking_env
):
    root, _ = trained_project
    files = [
        images / "missing.png",
        images / "k.png",
        images / "broken.jpg",
        images / "text.png",
        images / "b.png",
    ]
    code, out, err = run_cli(*files, "--root", root)
    assert code == 1
    assert [LINE.match(x)["path"] for x in out.strip().splitlines()] == [
        str(images / "k.png"),
        str(images / "b.png"),
    ]
    errors = err.strip().splitlines()[1:]  # after the model line
    assert errors == [
        f"{images / 'missing.png'}: error: no such file",
        f"{images / 'broken.jpg'}: error: " + errors[1].split(": error: ")[1],
        f"{images / 'text.png'}: error: not an image Pillow can read (PNG or JPEG expected)",
    ]
    assert errors[1].split(": error: ")[1].startswith(("cannot decode", "not an image"))


@pytest.mark.parametrize("task", TASKS)
def test_model_option_picks_a_file(trained_project, images, task):
    root, _ = trained_project
    code, out, err = run_cli(images / "k.png", "--model", root / "models" / f"{task}.pt")
    assert code == 0 and LINE.match(out.strip())
    assert err.strip() == f"model: {root / 'models' / f'{task}.pt'} (--model)"


def test_unknown_model_is_one_line(trained_project, images, tmp_path):
    root, _ = trained_project
    code, out, err = run_cli(images / "k.png", "--model", tmp_path / "nope.pt")
    assert (code, out) == (1, "")
    assert err == f"predict: error: model {tmp_path / 'nope.pt'}: no such file\n"
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04not a model")
    code, out, err = run_cli(images / "k.png", "--model", junk)
    assert code == 1 and out == ""
    assert err.startswith(f"predict: error: model {junk}: not a model file of this project (")
    assert err.count("\n") == 1


def test_champion_that_is_not_the_model_file_is_refused(trained_project, images, no_tracking_env):
    root, _ = trained_project
    task = champion_task(root)
    path = root / "reports" / "train" / task / "mlflow.json"
    record = path.read_text()
    path.write_text(json.dumps({"parent_run_id": "f" * 32}))  # as if retrained since
    try:
        code, out, err = run_cli(images / "k.png", "--root", root)
    finally:
        path.write_text(record)
    assert (code, out) == (1, "")
    assert re.fullmatch(
        rf"predict: error: notmnist-classifier@champion \(version 1\) is run \w+, but "
        rf"models/{task}.pt comes from run f{{32}}: run `dvc repro evaluate` or pass --model\n",
        err,
    )


def test_without_a_store_the_champion_comes_from_registry_json(
    trained_project, images, tmp_path, no_tracking_env
):
    root, _ = trained_project
    copy = tmp_path / "clone"  # a fresh clone after `dvc pull`: files, no mlflow.db
    for part in ("models", "reports/train", "reports/eval"):
        shutil.copytree(root / part, copy / part)
    shutil.copy(root / "reports" / "registry.json", copy / "reports" / "registry.json")
    code, out, err = run_cli(images / "k.png", "--root", copy)
    assert code == 0, err
    task = champion_task(root)
    assert err.strip() == (
        f"model: {copy / 'models' / f'{task}.pt'} (notmnist-classifier@champion version 1 "
        "(reports/registry.json))"
    )
    assert not (copy / "mlflow.db").exists()


def test_save_inputs_writes_the_glyphs(trained_project, images, tmp_path, no_tracking_env):
    root, _ = trained_project
    code, _, _ = run_cli(images / "k.png", "--root", root, "--save-inputs", tmp_path / "seen")
    assert code == 0
    saved = np.asarray(Image.open(tmp_path / "seen" / "k.png"))
    np.testing.assert_array_equal(saved, EXPECTED)


def test_command_line_in_a_subprocess(trained_project, images, tmp_path):
    root, _ = trained_project
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.predict",
            str(images / "k.png"),
            str(tmp_path / "gone.png"),
            "--root",
            str(root),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 1
    assert LINE.match(done.stdout.strip())
    assert done.stderr.strip().splitlines()[-1] == f"{tmp_path / 'gone.png'}: error: no such file"


# `mlflow models serve` on loopback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trained_project, tmp_path_factory):
    """`mlflow models serve` of the champion on a free loopback port; stopped pass or fail."""
    root, uri = trained_project
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        "models:/notmnist-classifier@champion",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    # The server starts `uvicorn` from PATH: the environment's bin folder, as when activated.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PATH": path}
    with log_path.open("w") as log:
        # Its own process group: the server's workers stop with it.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                with contextlib.suppress(requests.RequestException):
                    if requests.get(f"{url}/ping", timeout=2).ok:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow models serve did not start:\n{log_path.read_text()}")
                time.sleep(0.5)
            yield url
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_served_champion_answers_like_the_model_file(trained_project, server):
    root, _ = trained_project
    from pipeline.evaluation.perturb import load_test_split

    images, _ = load_test_split(Paths(root))
    x = normalize(images[:5])  # float32 (5, 28, 28) in [-1, 1]
    body = {"inputs": x.numpy().tolist()}
    response = requests.post(f"{server}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    served = np.asarray(response.json()["predictions"], dtype=np.float64)
    model, _ = load_model(root / "models" / f"{champion_task(root)}.pt")
    with torch.no_grad():
        expected = model(x).double().numpy()
    assert served.shape == (5, 10)
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)


def test_served_champion_rejects_a_wrong_shape(server):
    response = requests.post(f"{server}/invocations", json={"inputs": [[0.0] * 784]}, timeout=60)
    assert 400 <= response.status_code < 500
    assert response.json().get("error_code")
