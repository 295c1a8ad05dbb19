"""Images as the pipeline delivers them: uint8 RGB arrays of one square size.

Files are decoded on use, not at load time, so a large real data set does not sit in memory;
other sizes are resized on the shortest edge and centre-cropped, as the CLIP image processor does.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

ImageSource = np.ndarray | str | os.PathLike


def read_rgb(source: ImageSource, size: int) -> np.ndarray:
    """`source` (an HWC uint8 array or an image file) as a (size, size, 3) uint8 array."""
    if isinstance(source, np.ndarray):
        if source.shape == (size, size, 3) and source.dtype == np.uint8:
            return source
        image = Image.fromarray(np.asarray(source, dtype=np.uint8)).convert("RGB")
    else:
        with Image.open(source) as opened:
            image = opened.convert("RGB")
    return np.asarray(ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC))
