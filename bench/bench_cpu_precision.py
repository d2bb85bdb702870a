#!/usr/bin/env python
"""CPU speed by precision and memory layout, for the classifier and the detector, on this CPU.

What ``CLASSIFIER.PRECISION auto`` and the detector's CPU inference should use depends on the CPU:
AVX-512-BF16 / AMX run bfloat16 natively, AVX2 machines emulate it (slowly). This script measures,
against the plain fp32 path as the baseline of the same run:

- classifier training s/step (ResNet at ``CLASSIFIER.IMAGE_SIZE``, batch ``CLASSIFIER.BATCH_SIZE``):
  fp32, fp32 channels-last, bf16 autocast (contiguous and channels-last);
- classifier prediction images/s: fp32, channels-last, bf16, int8 (FX static quantization, x86
  engine: fbgemm on AVX2, oneDNN where there is VNNI);
- detector inference images/s at the last stage's size: ``torch.no_grad`` fp32 (baseline),
  ``torch.inference_mode``, channels-last, bf16 autocast; agreement with fp32 as the mean mask IoU
  over matched instances (greedy, IoU > 0.5) and the share of fp32 instances matched.

The models are the config's architectures with random init (the classifier briefly trained so
its activations are not degenerate; the detector's outputs come from its random weights, which
is enough to compare precisions on the same inputs). Emulate an AVX2-only CPU on an AVX-512 one
with ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` (PyTorch's and oneDNN's dispatch).

    python bench/bench_cpu_precision.py --config configs/demo.yaml
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python bench/bench_cpu_precision.py --config configs/demo.yaml
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import module_config  # noqa: E402


def best_of(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def classifier_training(arch: str, size: int, batch: int, steps: int) -> dict:
    import torchvision

    model = getattr(torchvision.models, arch)(num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 2, (batch,))
    out = {}
    for name, channels_last, bf16 in (("fp32", False, False), ("fp32 channels-last", True, False),
                                      ("bf16 autocast", False, True), ("bf16 channels-last", True, True)):
        memory = torch.channels_last if channels_last else torch.contiguous_format
        model.to(memory_format=memory)
        xx = x.contiguous(memory_format=memory)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                loss = torch.nn.functional.cross_entropy(model(xx).float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        step()  # warm-up
        out[name] = best_of(step, steps)
        print(f"classifier training {arch} @ {size}px batch {batch}, {name}: {out[name]:.3f} s/step "
              f"({out['fp32'] / out[name]:.2f}x fp32)", flush=True)
    model.to(memory_format=torch.contiguous_format)
    return out


def classifier_prediction(cfg, tmp: Path, rounds: int) -> dict:
    import module_classifier
    import module_synthetic
    from module_preprocessing import load_dataset_dicts

    data = module_synthetic.generate_dataset(tmp / "data", n_train=96, n_test=0, seed=5,
                                             image_size=cfg.DATA.IMAGE_SIZE, empty_fraction=0.5)
    dicts = load_dataset_dicts(data["train_csv"], data["train_images"], image_size=cfg.DATA.IMAGE_SIZE)
    small = module_config.get_cfg(None, [
        "PATHS.RUNS_DIR", str(tmp / "runs"), "PATHS.RUN_NAME", "p", "DATA.IMAGE_SIZE", str(cfg.DATA.IMAGE_SIZE),
        "CLASSIFIER.ARCH", cfg.CLASSIFIER.ARCH, "CLASSIFIER.IMAGE_SIZE", str(cfg.CLASSIFIER.IMAGE_SIZE),
        "CLASSIFIER.PRETRAINED", "False", "CLASSIFIER.EPOCHS", "1", "CLASSIFIER.BATCH_SIZE", "16",
        "CLASSIFIER.NUM_WORKERS", "0", "CLASSIFIER.PRECISION", "int8", "CLASSIFIER.INT8_CALIBRATION_IMAGES", "32"])
    paths = module_classifier.train_classifier(small, dicts[:64], dicts[64:], fresh=True)
    learner = module_classifier.load_classifier(paths["export"])
    files = [d["file_name"] for d in dicts]
    out, reference = {}, None
    for name in ("fp32", "bf16", "int8"):
        def run():
            return module_classifier.predict_p_ship(learner, files, batch_size=16, progress=False, precision=name)

        p_ship = run()["p_ship"].to_numpy()  # warm-up
        reference = p_ship if reference is None else reference
        seconds = best_of(run, rounds)
        out[name] = {"images_per_s": len(files) / seconds, "max_abs_diff_to_fp32": float(np.abs(p_ship - reference).max())}
        print(f"classifier prediction {small.CLASSIFIER.ARCH} @ {small.CLASSIFIER.IMAGE_SIZE}px, {name} (channels-last): "
              f"{out[name]['images_per_s']:.1f} images/s ({out[name]['images_per_s'] / out['fp32']['images_per_s']:.2f}x "
              f"fp32), max |p - p_fp32| {out[name]['max_abs_diff_to_fp32']:.4f}", flush=True)
    return out


def _mask_agreement(reference: list[dict], other: list[dict]) -> tuple[float, float]:
    """Mean mask IoU over instances matched greedily (IoU > 0.5) and the share of reference ones matched."""
    from module_metric import iou_masks, match_greedy

    ious, n_ref = [], 0
    for a, b in zip(reference, other):
        n_ref += len(a["masks"])
        if len(a["masks"]) and len(b["masks"]):
            matched = match_greedy(iou_masks(a["masks"], b["masks"]))
            ious += [v for v in matched.tolist() if v > 0]
    return (float(np.mean(ious)) if ious else float("nan")), (len(ious) / n_ref if n_ref else float("nan"))


def detector_inference(cfg, images: list[np.ndarray], rounds: int, weights: str | None = None) -> dict:
    from detectron2.modeling import build_model

    import module_inference

    if weights:  # a trained detector: the comparison of masks means what it says
        model = module_inference.load_detector(cfg, weights)
        size = model.input_size
    else:
        size = module_config.get_stages(cfg)[-1].size
        torch.manual_seed(0)
        model = build_model(module_config.get_model_cfg(cfg)).eval()
        model.input_size = size
        # Random heads score everything near the threshold: lower it so there are masks to compare.
        model.roi_heads.box_predictor.test_score_thresh = 0.0
    variants = {}

    def predict(grad_context, channels_last=False, bf16=False):
        def run():
            with grad_context(), torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                inputs = module_inference.to_model_inputs(images, size, model.input_format)
                outputs = model.inference(inputs)
            return [module_inference._instances_to_prediction(o["instances"]) for o in outputs]
        if channels_last:
            model.to(memory_format=torch.channels_last)
        try:
            result = run()
            seconds = best_of(run, rounds)
        finally:
            model.to(memory_format=torch.contiguous_format)
        return result, len(images) / seconds

    reference, base = predict(torch.no_grad)
    for name, args in (("inference_mode", dict(grad_context=torch.inference_mode)),
                       ("channels-last", dict(grad_context=torch.inference_mode, channels_last=True)),
                       ("bf16 autocast", dict(grad_context=torch.inference_mode, bf16=True))):
        result, ips = predict(**args)
        iou, matched = _mask_agreement(reference, result)
        variants[name] = {"images_per_s": ips, "speedup": ips / base, "mean_mask_iou": iou, "matched": matched}
        print(f"detector inference @ {size}px, {name}: {ips:.2f} images/s ({ips / base:.2f}x no_grad fp32), "
              f"mean mask IoU {iou:.4f} over matched instances, {matched:.1%} of fp32 instances matched", flush=True)
    variants["no_grad fp32"] = {"images_per_s": base, "speedup": 1.0, "mean_mask_iou": 1.0, "matched": 1.0}
    return variants


def main(argv=None) -> dict:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--arch", default=None, help="classifier architecture (default CLASSIFIER.ARCH)")
    parser.add_argument("--weights", default=None, help="a trained detector checkpoint of the config (default: random init)")
    parser.add_argument("--images", default=None, help="a folder of images for the detector (default: generated ones)")
    args = parser.parse_args(argv)
    cfg = module_config.get_cfg(args.config, ["MODEL.DEVICE", "cpu"])
    import module_classifier

    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"{module_classifier.cpu_has_native_bf16()}, torch threads {torch.get_num_threads()}, "
          f"quantized engines {torch.backends.quantized.supported_engines}", flush=True)
    report = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "native_bf16": module_classifier.cpu_has_native_bf16()}
    report["classifier_training"] = classifier_training(args.arch or cfg.CLASSIFIER.ARCH, cfg.CLASSIFIER.IMAGE_SIZE,
                                                        cfg.CLASSIFIER.BATCH_SIZE, args.steps)
    with tempfile.TemporaryDirectory() as tmp:
        report["classifier_prediction"] = classifier_prediction(cfg, Path(tmp), args.rounds)
        from module_files import list_images, read_image

        images = [read_image(p) for p in list_images(args.images or Path(tmp) / "data" / "train_v2")[:8]]
    report["detector_inference"] = detector_inference(cfg, images, args.rounds, args.weights)
    return report


if __name__ == "__main__":
    main()
