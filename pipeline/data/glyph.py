"""Letter images shaped like notMNIST's: a white glyph on black, stretched to fill 28x28.

notMNIST glyphs fill their frame: in notMNIST_small the glyph's bounding box spans all 28 rows
in 99% of the images and all 28 columns in 94%, whatever the letter (an "I" is as wide as a
"D"), and the corners are black in 83%. The box is that of every pixel above black: with it,
98.8% of the test images span all 28 rows and columns (92.6% with pixels >= 32). So a glyph is
cropped to the bounding box of its non-black pixels and stretched on each axis to 28x28, with
no margin and its aspect ratio not kept.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.config import SIZE

INK = 1  # any pixel above black belongs to the glyph, as in notMNIST


def fit_frame(gray: np.ndarray, ink: int = INK) -> np.ndarray:
    """A white-on-black uint8 image -> its glyph's bounding box stretched to 28x28 (uint8).

    The resize is Pillow's bilinear filter (antialiased when shrinking), which works in
    fixed-point arithmetic on 8-bit images: the same bytes on every machine.
    Raises ValueError when no pixel reaches `ink`.
    """
    mask = np.asarray(gray) >= ink
    if not mask.any():
        raise ValueError("no glyph: the image is blank")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    crop = np.ascontiguousarray(gray[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], np.uint8)
    image = Image.fromarray(crop, "L").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.array(image)  # writable: torch warns on read-only arrays
