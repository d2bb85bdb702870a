"""The public Kaggle kernels' RLE functions, verbatim: the baseline of the codec tests and benches.

These are the ``rle_encode`` / ``rle_decode`` that most Airbus kernels copy (``img.T.flatten()``
and a diff; a Python loop over the runs). The project never uses them: ``module_preprocessing``
is the codec. Tests check bit-identity against them; ``bench/`` measures speed against them.
"""
from __future__ import annotations

import numpy as np


def kernel_rle_encode(img):
    """img: numpy array, 1 - mask, 0 - background. Returns run length as a string."""
    pixels = img.T.flatten()
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def kernel_rle_decode(mask_rle, shape=(768, 768)):
    """mask_rle: run-length as string formatted (start length); shape: (height, width)."""
    s = mask_rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (s[0:][::2], s[1:][::2])]
    starts -= 1
    ends = starts + lengths
    img = np.zeros(shape[0] * shape[1], dtype=np.uint8)
    for lo, hi in zip(starts, ends):
        img[lo:hi] = 1
    return img.reshape(shape).T
