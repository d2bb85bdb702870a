"""CSV -> dataset dicts at train_v2 scale: time and peak memory, against decode + pycocotools encode.

Builds a CSV the size of Kaggle's train_ship_segmentations_v2.csv (231,723 rows over 192,556
ImageIds: 42,556 ship images with 81,723 masks, 150,000 ship-free) by resampling whole images
of the real rows in ../shared/airbus-sample/segmentations_subset.csv, then times
``module_preprocessing.load_dataset_dicts`` (no image reads) in fresh subprocesses, which also
report their peak RSS: the first call on it in the process (after numba's one-off start-up,
timed separately on a 3-row CSV) and the same call again. Baseline, measured in the same run:
each mask decoded (the Kaggle kernel's ``rle_decode``) and encoded with
``pycocotools.mask.encode`` (+ ``toBbox``), timed on a sample of ship rows and scaled to all
81,723 (``--full-baseline`` runs all of them).

    .venv/bin/python bench/bench_dataset_dicts.py [--repeats 3] [--baseline-rows 4000] [--full-baseline]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SUBSET_CSV = REPO.parent / "shared" / "airbus-sample" / "segmentations_subset.csv"
TRAIN_V2_ROWS, TRAIN_V2_IMAGES, TRAIN_V2_SHIP_ROWS = 231_723, 192_556, 81_723


from kaggle_kernels import kernel_rle_decode  # noqa: E402  (bench/ is on sys.path when run as a script)


def make_train_scale_csv(source_csv: str | os.PathLike, out_csv: str | os.PathLike, n_rows: int = TRAIN_V2_ROWS,
                         n_images: int = TRAIN_V2_IMAGES, n_ship_rows: int = TRAIN_V2_SHIP_ROWS,
                         seed: int = 0) -> Path:
    """Write a Kaggle-format CSV of ``n_rows`` rows over ``n_images`` ImageIds, ``n_ship_rows`` of them masks.

    Ship images are drawn with replacement, whole (all their masks, which never overlap), from
    the real images of ``source_csv``; the last one drawn is cut to hit ``n_ship_rows`` exactly.
    New ImageIds are unique random 9-hex-digit names; rows are sorted by ImageId, as Kaggle's.
    """
    n_ship_images = n_images - (n_rows - n_ship_rows)
    source = pd.read_csv(source_csv, dtype=str, keep_default_na=False)
    ships = source[source.EncodedPixels != ""].groupby("ImageId", sort=True).EncodedPixels.apply(list).tolist()
    rng = np.random.default_rng(seed)
    drawn, total = [], 0
    while len(drawn) < n_ship_images:
        masks = ships[rng.integers(len(ships))]
        room = n_ship_rows - total - (n_ship_images - len(drawn) - 1)  # leave one mask per image still to draw
        masks = masks[:max(1, min(len(masks), room))]
        drawn.append(masks)
        total += len(masks)
    if total != n_ship_rows:  # top up the last images with extra masks of their own source image when short
        raise RuntimeError(f"drew {total} ship rows, wanted {n_ship_rows}; change the seed")
    names = set()
    while len(names) < n_images:
        names.update(f"{v:09x}.jpg" for v in rng.integers(0, 16 ** 9, n_images - len(names)).tolist())
    names = sorted(names)
    order = rng.permutation(n_images)
    ids = [names[k] for k in order]
    rows = [(ids[k], rle) for k, masks in enumerate(drawn) for rle in masks]
    rows += [(image_id, "") for image_id in ids[n_ship_images:]]
    frame = pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"]).sort_values("ImageId", kind="stable")
    frame.to_csv(out_csv, index=False)
    return Path(out_csv)


CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
import module_preprocessing
from detectron2.structures import BoxMode  # the import (torch) is not part of the conversion
from module_progress import peak_rss_mb  # VmHWM: this program's own peak, not the forking parent's
rss_imports = peak_rss_mb()
start = time.perf_counter()  # numba's start-up: its import and loading the compiled kernels (compiling them, the first time)
module_preprocessing.load_dataset_dicts({tiny!r}, {images!r}, check_images="off")
startup = time.perf_counter() - start
start = time.perf_counter()
dicts = module_preprocessing.load_dataset_dicts({csv!r}, {images!r}, check_images="off")
seconds = time.perf_counter() - start
images, annotations = len(dicts), sum(len(d["annotations"]) for d in dicts)
del dicts
start = time.perf_counter()  # the same again in this process (memory already mapped)
module_preprocessing.load_dataset_dicts({csv!r}, {images!r}, check_images="off")
again = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "again_seconds": again, "startup_seconds": startup, "images": images,
                  "annotations": annotations, "peak_rss_mb": peak_rss_mb(),
                  "rss_after_imports_mb": rss_imports}}))
"""


def baseline_per_row(rles: list[str]) -> float:
    """Seconds per ship row: kernel decode + pycocotools encode + toBbox + area + the annotation dict."""
    from pycocotools import mask as mask_util

    start = time.perf_counter()
    for rle in rles:
        coco = mask_util.encode(np.asfortranarray(kernel_rle_decode(rle)))
        bbox = mask_util.toBbox(coco).tolist()
        {"bbox": bbox, "segmentation": {"size": coco["size"], "counts": coco["counts"].decode()},
         "area": int(mask_util.area(coco)), "category_id": 0, "iscrowd": 0}
    return (time.perf_counter() - start) / len(rles)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=str(SUBSET_CSV), help="real rows to resample")
    parser.add_argument("--baseline-rows", type=int, default=4000, help="ship rows timed for the baseline")
    parser.add_argument("--full-baseline", action="store_true", help="time the baseline on all 81,723 ship rows")
    parser.add_argument("--repeats", type=int, default=3,
                        help="conversion runs (fresh process each) and baseline runs; the best of each kept")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(args: argparse.Namespace) -> dict:
    if not Path(args.source).is_file():
        print(f"skipped: {args.source} not found (the real Kaggle sample, ../shared/airbus-sample)")
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "train_ship_segmentations_v2.csv"
        images = Path(tmp) / "train_v2"
        images.mkdir()
        start = time.perf_counter()
        make_train_scale_csv(args.source, csv, seed=args.seed)
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
        print(f"train_v2-scale CSV: {len(frame):,} rows, {frame.ImageId.nunique():,} ImageIds, "
              f"{(frame.EncodedPixels != '').sum():,} masks, {csv.stat().st_size / 2**20:.1f} MiB "
              f"(built in {time.perf_counter() - start:.1f} s)")
        tiny = Path(tmp) / "three_rows.csv"
        frame.head(3).to_csv(tiny, index=False)
        runs = []
        for _ in range(args.repeats):
            code = CHILD.format(repo=str(REPO), csv=str(csv), tiny=str(tiny), images=str(images))
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        best = min(runs, key=lambda r: r["seconds"])
        print(f"load_dataset_dicts (no image reads), first call in a fresh process: {best['seconds']:.2f} s best of "
              f"{args.repeats} ({', '.join(format(r['seconds'], '.2f') for r in runs)}); {best['images']:,} dicts, "
              f"{best['annotations']:,} annotations; peak RSS {max(r['peak_rss_mb'] for r in runs):.0f} MB "
              f"(of which {best['rss_after_imports_mb']:.0f} MB after importing detectron2/torch)")
        print(f"  the same call again in that process: {', '.join(format(r['again_seconds'], '.2f') for r in runs)} s")
        print(f"  numba start-up before it (import, loading the compiled kernels; a 3-row CSV): "
              f"{', '.join(format(r['startup_seconds'], '.2f') for r in runs)} s (once per process; "
              "compiling them the first time on a machine takes longer)")
        ship_rles = frame.EncodedPixels[frame.EncodedPixels != ""].tolist()
        sample = ship_rles if args.full_baseline else ship_rles[:: max(1, len(ship_rles) // args.baseline_rows)]
        per_row = min(baseline_per_row(sample) for _ in range(1 if args.full_baseline else args.repeats))
        baseline = per_row * len(ship_rles)
        how = "measured on all rows" if args.full_baseline else \
            f"{per_row * 1e6:.0f} us/row, best of {args.repeats}, on {len(sample):,} rows x {len(ship_rles):,}"
        print(f"baseline, kernel rle_decode + pycocotools encode per mask: {baseline:.1f} s ({how})")
        first_call = best["seconds"] + best["startup_seconds"]
        median = statistics.median(r["seconds"] for r in runs)
        print(f"speed-up: {baseline / best['seconds']:.0f}x  (goal >= 50x; <= 5 s; <= 2 GB peak RSS); "
              f"{baseline / median:.0f}x for the median run ({median:.2f} s); "
              f"{baseline / first_call:.0f}x counting numba's start-up")
        return {"seconds": best["seconds"], "startup_seconds": best["startup_seconds"],
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "baseline_s": baseline}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
