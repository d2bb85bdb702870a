#!/usr/bin/env python
"""RLE codec speed on real Kaggle rows, against the public kernels' functions in the same run.

Rows: every ship row of ../shared/airbus-sample/segmentations_subset.csv (real train_v2 masks, 768x768).
- encode: ``module_rle.rle_encode`` against the kernels' ``rle_encode`` (``img.T.flatten()``
  and a diff), both on the same decoded masks (C-ordered uint8, as a model's output is). Goal >= 5x.
- decode: ``module_rle.rle_decode`` against the kernels' ``rle_decode`` (zeros, then a
  Python loop over the runs). Goal >= 2x. Also printed: the floor of any decoder that returns a
  fresh mask, allocating and zeroing 768x768 uint8 (``np.zeros``).
Both outputs are checked identical to the kernels' on every row timed.

    .venv/bin/python bench/bench_rle.py [--rows 20000] [--repeat 3]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import module_rle  # noqa: E402
from kaggle_kernels import kernel_rle_decode, kernel_rle_encode  # noqa: E402

SUBSET_CSV = REPO_ROOT.parent / "shared" / "airbus-sample" / "segmentations_subset.csv"


def best_time(fn, items, repeat: int) -> float:
    """Best-of-``repeat`` seconds per item of ``fn`` over ``items``."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - start)
    return best / len(items)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", default=str(SUBSET_CSV), help="Kaggle-format CSV of real rows")
    parser.add_argument("--rows", type=int, default=20000, help="ship rows timed (0: all)")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many passes")
    return parser


def main(args: argparse.Namespace) -> dict:
    rles = pd.read_csv(args.csv, dtype=str, keep_default_na=False)["EncodedPixels"]
    rles = [r for r in rles.tolist() if r]
    if args.rows:
        rles = rles[: args.rows]
    masks = [np.ascontiguousarray(kernel_rle_decode(r)) for r in rles]
    for rle, mask in zip(rles, masks):  # same results before timing anything
        assert module_rle.rle_encode(mask) == kernel_rle_encode(mask) == rle
        assert np.array_equal(module_rle.rle_decode(rle), mask)
    print(f"{len(rles)} real ship rows of {args.csv}, 768x768; best of {args.repeat}; outputs identical")

    kernel_encode = best_time(kernel_rle_encode, masks, args.repeat)
    ours_encode = best_time(module_rle.rle_encode, masks, args.repeat)
    kernel_decode = best_time(kernel_rle_decode, rles, args.repeat)
    ours_decode = best_time(module_rle.rle_decode, rles, args.repeat)
    floor = best_time(lambda _: np.zeros((768, 768), np.uint8), rles, args.repeat)
    figures = {"encode_kernel_us": kernel_encode * 1e6, "encode_ours_us": ours_encode * 1e6,
               "encode_ratio": kernel_encode / ours_encode, "decode_kernel_us": kernel_decode * 1e6,
               "decode_ours_us": ours_decode * 1e6, "decode_ratio": kernel_decode / ours_decode,
               "decode_floor_us": floor * 1e6}
    print(f"encode: kernel {figures['encode_kernel_us']:8.1f} us/mask | ours {figures['encode_ours_us']:8.1f} us/mask"
          f" | {figures['encode_ratio']:.1f}x (goal >= 5x)")
    print(f"decode: kernel {figures['decode_kernel_us']:8.1f} us/mask | ours {figures['decode_ours_us']:8.1f} us/mask"
          f" | {figures['decode_ratio']:.1f}x (goal >= 2x)")
    print(f"decode floor (np.zeros 768x768 uint8): {figures['decode_floor_us']:.1f} us/mask")
    return figures


if __name__ == "__main__":
    main(get_args_parser().parse_args())
