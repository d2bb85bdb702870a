#!/usr/bin/env python
"""One short GPU check of the real configuration: training and inference speed, peak GPU memory.

Prints, and writes as JSON (``--json``):

- detector training s/iter at ``--size`` (768) with AMP off and on: the project's stage trainer
  (``module_train.build_stage_trainer``) against a raw detectron2 ``DefaultTrainer`` on the same
  model config, dataset dicts and mapper (the baseline, measured in the same run); the ratio;
- detector inference images/s at ``--size`` (``module_inference.predict_instances``, batched);
- classifier images/s (``module_classifier.predict_p_ship`` on an exported learner, at
  ``CLASSIFIER.PRECISION`` auto: fp16 autocast on CUDA);
- the peak GPU memory of each (``torch.cuda.max_memory_allocated``; 0 on CPU).

The data is generated (``module_synthetic``, Kaggle-sized 768 px tiles); the models are the real
config's architectures (``configs/airbus.yaml``: ResNet-34 classifier, R50-FPN Mask R-CNN) with
random init, since the machine has no network (the speed of a layer does not depend on its
weights; BatchNorm stands in for FrozenBN in the detector's backbone, see ``get_model_cfg``).
``bench/device_check.sh`` runs it on the lent GPU in under 8 minutes; ``--tiny`` runs the same
code at 64 px with ``configs/tiny.yaml`` on a CPU in a minute (the test suite does, so the script
is known to work before it meets a GPU).

    python bench/device_check.py --json device_check.json            # GPU: the real sizes
    python bench/device_check.py --tiny --json /tmp/check.json        # CPU: the same code, tiny
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import module_config  # noqa: E402
import module_synthetic  # noqa: E402
from bench.bench_train import run_default_trainer, run_project_trainer  # noqa: E402
from module_preprocessing import load_dataset_dicts  # noqa: E402


def peak_memory_mb(reset: bool = False) -> float:
    """Peak GPU memory since the last reset, MB (0 on CPU)."""
    if not torch.cuda.is_available():
        return 0.0
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2 ** 20
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return peak


def detector_training(config: str, size: int, iters: int, warmup: int, dicts, runs_dir: Path,
                      extra: list[str]) -> dict:
    """s/iter and peak memory of the project's trainer and DefaultTrainer, AMP off and on."""
    out = {}
    for amp in (False, True):
        if amp and not torch.cuda.is_available():
            continue  # AMPTrainer is CUDA-only in detectron2
        cfg = module_config.get_cfg(config, [
            *extra, "PATHS.RUNS_DIR", str(runs_dir), "PATHS.RUN_NAME", f"amp{int(amp)}",
            # a low LR, warmed up over the whole run: random init at 0.01 diverged within 30 iterations
            # on the H200 (NaN boxes); the speed of a step does not depend on the LR
            "DETECTOR.STAGES", f"[[{size}, {iters}, 0.0005, {iters}]]", "DETECTOR.EVAL_PERIOD", "0",
            "SOLVER.CHECKPOINT_PERIOD", "100000", "DETECTOR.LOG_PERIOD", "1000", "SOLVER.AMP.ENABLED", str(amp)])
        stage = module_config.get_stage(cfg, 1)
        peak_memory_mb(reset=True)
        ours = run_project_trainer(cfg, stage, dicts, warmup)
        ours_mb = peak_memory_mb(reset=True)
        raw = run_default_trainer(cfg, stage, dicts, runs_dir / f"raw_amp{int(amp)}", warmup)
        raw_mb = peak_memory_mb(reset=True)
        key = "amp" if amp else "fp32"
        out[key] = {"module_train_s_per_iter": ours, "default_trainer_s_per_iter": raw, "ratio": ours / raw,
                    "module_train_peak_mb": ours_mb, "default_trainer_peak_mb": raw_mb,
                    "images_per_s": cfg.SOLVER.IMS_PER_BATCH / ours, "batch": cfg.SOLVER.IMS_PER_BATCH}
        print(f"detector training {key} @ {size}px, batch {cfg.SOLVER.IMS_PER_BATCH}: module_train {ours:.3f} s/iter "
              f"({ours_mb:.0f} MB peak), DefaultTrainer {raw:.3f} s/iter ({raw_mb:.0f} MB), ratio {ours / raw:.3f}",
              flush=True)
    return out


def detector_inference(config: str, size: int, images, batch: int, rounds: int, extra: list[str]) -> dict:
    """images/s of batched predict_instances on a random-init detector of the config."""
    from detectron2.modeling import build_model

    import module_inference

    cfg = module_config.get_cfg(config, [*extra, "DETECTOR.STAGES", f"[[{size}, 1, 0.01, 0]]"])
    model = build_model(module_config.get_model_cfg(cfg)).eval()
    model.input_size = size
    module_inference.predict_instances(model, images[:batch], batch_size=batch)  # warm-up
    peak_memory_mb(reset=True)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        module_inference.predict_instances(model, images, batch_size=batch)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    result = {"images_per_s": len(images) / statistics.median(times), "batch": batch, "peak_mb": peak_memory_mb(True)}
    print(f"detector inference @ {size}px, batch {batch}: {result['images_per_s']:.1f} images/s "
          f"({result['peak_mb']:.0f} MB peak)", flush=True)
    return result


def classifier_inference(config: str, paths, rounds: int, runs_dir: Path, extra: list[str]) -> dict:
    """images/s of predict_p_ship (no TTA) with the config's classifier, trained for a few batches."""
    import module_classifier

    # labels made up (no masks): the cell loss (training only) stays off; prediction is the same model
    cfg = module_config.get_cfg(config, [*extra, "PATHS.RUNS_DIR", str(runs_dir), "PATHS.RUN_NAME", "classifier",
                                         "CLASSIFIER.PRETRAINED", "False", "CLASSIFIER.EPOCHS", "1",
                                         "CLASSIFIER.CELL_LOSS_WEIGHT", "0"])
    half = len(paths) // 2
    dicts = [{"file_name": str(p), "image_id": Path(p).name, "annotations": [{}] if k % 2 else []}
             for k, p in enumerate(paths)]
    exported = module_classifier.train_classifier(cfg, dicts[:half], dicts[half:], fresh=True)["export"]
    learner = module_classifier.load_classifier(exported)
    module_classifier.predict_p_ship(learner, paths[:cfg.CLASSIFIER.BATCH_SIZE], batch_size=cfg.CLASSIFIER.BATCH_SIZE,
                                     progress=False)  # warm-up
    peak_memory_mb(reset=True)
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        module_classifier.predict_p_ship(learner, paths, batch_size=cfg.CLASSIFIER.BATCH_SIZE, progress=False,
                                         num_workers=cfg.CLASSIFIER.NUM_WORKERS, precision=cfg.CLASSIFIER.PRECISION)
        times.append(time.perf_counter() - started)
    device = next(learner.model.parameters()).device
    result = {"images_per_s": len(paths) / statistics.median(times), "image_size": cfg.CLASSIFIER.IMAGE_SIZE,
              "arch": cfg.CLASSIFIER.ARCH, "precision": module_classifier.resolve_precision(cfg.CLASSIFIER.PRECISION, device),
              "peak_mb": peak_memory_mb(True)}
    print(f"classifier {cfg.CLASSIFIER.ARCH} @ {cfg.CLASSIFIER.IMAGE_SIZE}px ({result['precision']}): "
          f"{result['images_per_s']:.1f} images/s ({result['peak_mb']:.0f} MB peak)", flush=True)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="configs/tiny.yaml at 64 px: the same code, on a CPU")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--iters", type=int, default=None, help="training iterations per run")
    args = parser.parse_args(argv)
    from module_files import read_image

    if args.tiny:
        config, size, image_size, iters, warmup, n_images, rounds = "configs/tiny.yaml", 64, 64, 6, 2, 16, 1
        extra = ["MODEL.DEVICE", "cpu"]
    else:
        config, size, image_size, iters, warmup, n_images, rounds = "configs/airbus.yaml", 768, 768, 30, 8, 64, 3
        extra = ["MODEL.WEIGHTS", "", "DATALOADER.NUM_WORKERS", "8", "CLASSIFIER.NUM_WORKERS", "8"]
    iters = args.iters or iters
    started = time.time()
    report = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__, "config": config}
    print(f"device check on {report['device']} (torch {torch.__version__}, CPU {report['cpu_capability']})", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        module_synthetic.generate_dataset(tmp / "data", n_train=n_images * 2, n_test=0, seed=3, image_size=image_size,
                                          empty_fraction=0.5)
        dicts = load_dataset_dicts(tmp / "data" / "train_ship_segmentations_v2.csv", tmp / "data" / "train_v2",
                                   image_size=image_size)
        ship_dicts = [d for d in dicts if d["annotations"]][:n_images]
        images = [read_image(d["file_name"]) for d in dicts[:n_images]]
        checks = {
            "detector_training": lambda: detector_training(config, size, iters, warmup, ship_dicts, tmp / "runs", extra),
            "detector_inference": lambda: detector_inference(config, size, images, 8, rounds, extra),
            "classifier_inference": lambda: classifier_inference(config, [d["file_name"] for d in dicts], rounds,
                                                                 tmp / "runs", extra),
        }
        failed = []
        for name, check in checks.items():
            try:  # one failing check must not lose the others' figures: device time is short
                report[name] = check()
            except Exception as error:  # noqa: BLE001 - reported, and the script exits non-zero below
                traceback.print_exc()
                report[name] = {"error": f"{type(error).__name__}: {error}"}
                failed.append(name)
    report["seconds"] = time.time() - started
    print(f"device check done in {report['seconds']:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    if failed:
        raise SystemExit(f"device check: {', '.join(failed)} failed (the traceback is above)")
    return report


if __name__ == "__main__":
    main()
