#!/usr/bin/env python
"""Download the pretrained weights a real-data run needs into the caches the libraries read.

The pipeline never downloads at run time on its own schedule; this script does it once, ahead
of time (the Docker image runs it at build time, so the container works offline):

- the detector's ``MODEL.WEIGHTS`` (COCO Mask R-CNN R50-FPN, a ``detectron2://`` URL) goes where
  detectron2's ``PathManager`` caches it: ``$FVCORE_CACHE`` or ``~/.torch/iopath_cache``, then the
  URL's path, i.e. ``~/.torch/iopath_cache/detectron2/COCO-InstanceSegmentation/
  mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl``;
- the classifier's ImageNet weights (``CLASSIFIER.ARCH``, torchvision's ``DEFAULT`` weights, which
  fastai's ``vision_learner(pretrained=True)`` loads) go into the torch hub cache:
  ``$TORCH_HOME/hub/checkpoints`` (``~/.cache/torch/hub/checkpoints`` by default).

Both downloads go through the libraries' own cache functions, so the paths are theirs by
construction. ``--dry-run`` prints where the files go without downloading. ``--make-folders``
also creates the folders they go into (an image built with ``PREFETCH_WEIGHTS=0`` has them, owned
by its user, so the files can be mounted in one by one). ``--check`` downloads nothing either: it
names each missing file, where it goes and where it comes from, and exits 1 if any is missing
(the container's entrypoint runs it).

Usage: python tools/prefetch_weights.py [--config configs/airbus.yaml] [--dry-run | --make-folders | --check]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: repo modules

D2_PREFIX = "detectron2://"
D2_URL = "https://dl.fbaipublicfiles.com/detectron2/"  # what detectron2's handler maps the prefix to


def detector_url(weights: str) -> str:
    """The download URL of ``weights`` (a ``detectron2://`` or https URL)."""
    return D2_URL + weights[len(D2_PREFIX):] if weights.startswith(D2_PREFIX) else weights


def detector_cache_path(weights: str) -> Path:
    """Where detectron2's PathManager keeps ``weights`` (a ``detectron2://`` or https URL)."""
    from iopath.common.file_io import get_cache_dir

    return Path(get_cache_dir()) / urlparse(detector_url(weights)).path.lstrip("/")


def classifier_weights(arch: str):
    """torchvision's ``DEFAULT`` weights enum member for ``arch`` (what fastai loads)."""
    import torchvision

    return torchvision.models.get_model_weights(arch).DEFAULT


def classifier_cache_path(arch: str) -> Path:
    """Where ``torch.hub`` keeps the ImageNet weights of ``arch``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(classifier_weights(arch).url).path).name


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/airbus.yaml",
                        help="config whose MODEL.WEIGHTS and CLASSIFIER.ARCH are fetched")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the cache paths only")
    mode.add_argument("--make-folders", action="store_true",
                      help="print the cache paths and create their folders; download nothing")
    mode.add_argument("--check", action="store_true",
                      help="download nothing; name each missing file and where it goes; exit 1 if any")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    return parser


def main(args: argparse.Namespace) -> dict[str, Path]:
    from module_config import get_cfg

    cfg = get_cfg(args.config, args.opts)
    targets: dict[str, Path] = {}
    if cfg.MODEL.WEIGHTS.startswith((D2_PREFIX, "https://", "http://")):
        targets["detector"] = detector_cache_path(cfg.MODEL.WEIGHTS)
    targets["classifier"] = classifier_cache_path(cfg.CLASSIFIER.ARCH)
    if args.check:
        urls = {"detector": detector_url(cfg.MODEL.WEIGHTS),
                "classifier": classifier_weights(cfg.CLASSIFIER.ARCH).url}
        missing = [name for name, path in targets.items() if not path.is_file()]
        for name in missing:
            print(f"WARNING: {name} weights missing: {targets[name]}\n"
                  f"    put {targets[name].name} there (from {urls[name]})", flush=True)
        if missing:
            print(f"WARNING: {args.config} needs them (pretrained weights); copy or mount each file at its "
                  "path, or run `python tools/prefetch_weights.py` where the network allows. Configs "
                  "without pretrained weights (demo, tiny) run without them.", flush=True)
            raise SystemExit(1)
        print(f"pretrained weights present: {', '.join(str(p) for p in targets.values())}", flush=True)
        return targets
    for name, path in targets.items():
        print(f"{name}: {path}", flush=True)
        if args.make_folders:
            path.parent.mkdir(parents=True, exist_ok=True)
    if args.dry_run or args.make_folders:
        return targets

    if "detector" in targets:
        from detectron2.utils.file_io import PathManager

        local = Path(PathManager.get_local_path(cfg.MODEL.WEIGHTS))
        if local.resolve() != targets["detector"].resolve():
            raise RuntimeError(f"detectron2 cached {cfg.MODEL.WEIGHTS} at {local}, expected {targets['detector']}")
    classifier_weights(cfg.CLASSIFIER.ARCH).get_state_dict(progress=False)  # downloads into the hub cache
    missing = [str(p) for p in targets.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"weights missing after download: {missing}")
    for name, path in targets.items():
        print(f"{name}: {path} ({os.path.getsize(path) / 2**20:.0f} MiB)", flush=True)
    return targets


if __name__ == "__main__":
    main(get_args_parser().parse_args())
