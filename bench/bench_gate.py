#!/usr/bin/env python
"""The scene gate's cost a slice, and where it goes: the classifier on in-memory slices.

``module_detect`` scores every slice of a scene with the run's classifier
(``module_classifier.predict_p_ship_arrays``, called once per ``DETECT.CHUNK_TILES`` slices);
on a GPU the fifteenth session measured 3.9 ms a slice for the demo's classifier, more than on a
2-core CPU, where the detector it saves costs little (BENCHMARKS.md, "GPU"). This prints, on
``--n`` generated slices of the run's ``DATA.IMAGE_SIZE`` in calls of ``DETECT.CHUNK_TILES``, at
``CLASSIFIER.PRECISION`` on the classifier's device (cuda where there is one), ms a slice for:

* **fastai test_dl** (the baseline; the gate before the fifteenth session, without the identity
  resampling below): ``module_classifier.prediction_dataloader`` over ``PILImage`` items of the
  reduced slices, then the same forward passes, the model converted to channels-last and back at
  each call;
* **direct, converting each call**: ``predict_p_ship_arrays`` (the same tensors without fastai's
  DataLoader and per-item dispatch; p_ship identical, printed), the model converted as above;
* **the gate (direct)**: the same with the model channels-last once, as
  ``module_inference.build_p_ship_array_fn`` leaves it;
* **model alone**: the forward passes on batches already prepared on the device (a floor);
* **preparation alone**: the direct path's batches without the model (reduce, stack, normalise);
* **identity resampling alone**: what every path did until the sixteenth session and now skips
  (``module_classifier._only_resamples``: fastai's flip and rotation transform, the identity at the
  test split, resampling each batch onto its own grid), timed on the prepared batches.

    .venv/bin/python bench/bench_gate.py [--config configs/demo.yaml] [--run runs/demo] [--n 320] [KEY VALUE ...]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import module_classifier  # noqa: E402
import module_config  # noqa: E402
import module_synthetic  # noqa: E402
from module_files import reduce_image  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--run", default=None, help="run folder with the classifier (default the config's)")
    parser.add_argument("--n", type=int, default=320, help="slices timed per round")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (the best is printed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def make_slices(size: int, n: int, seed: int) -> list[np.ndarray]:
    """``n`` generated sea slices of ``size`` px, a fifth with ships (cut from scenes of 4 x 4 slices)."""
    rng = np.random.default_rng(seed)
    slices = []
    while len(slices) < n:
        image, _ = module_synthetic.render_scene(rng, 4 * size, 4 * size, int(rng.integers(0, 4)), scale=size / 768)
        slices += [np.ascontiguousarray(image[r:r + size, c:c + size]) for r in range(0, 4 * size, size)
                   for c in range(0, 4 * size, size)]
    return slices[:n]


def best_ms(fn, slices: list, chunk: int, rounds: int, count: int | None = None) -> tuple[float, np.ndarray]:
    """The best round's ms a slice of ``fn`` called on ``chunk`` of ``slices`` at a time (``count``
    slices in all: ``len(slices)`` unless they are batches), and its output."""
    fn(slices[:chunk])  # warm-up: CUDA context, cuDNN, oneDNN primitives
    times = []
    for _ in range(rounds):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = [fn(slices[i:i + chunk]) for i in range(0, len(slices), chunk)]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 1e3 * min(times) / (count or len(slices)), (np.concatenate(out) if out and out[0] is not None else None)


def main(args: argparse.Namespace) -> dict:
    opts = list(args.opts or [])
    if args.run:
        run = Path(args.run)
        opts += ["PATHS.RUNS_DIR", str(run.parent), "PATHS.RUN_NAME", run.name]
    cfg = module_config.get_cfg(args.config, opts)
    learner = module_classifier.load_classifier(module_config.get_classifier_path(cfg))
    device = next(learner.model.parameters()).device
    precision = cfg.CLASSIFIER.PRECISION
    chunk, batch_size = int(cfg.DETECT.CHUNK_TILES), int(cfg.CLASSIFIER.BATCH_SIZE)
    reduce_to = module_classifier._opener_size(learner)
    slices = make_slices(int(cfg.DATA.IMAGE_SIZE), args.n, args.seed)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}; classifier on {device} at "
          f"{module_classifier.resolve_precision(precision, device)}, input {reduce_to} px; {len(slices)} slices of "
          f"{cfg.DATA.IMAGE_SIZE} px in calls of {chunk} (DETECT.CHUNK_TILES), batches of {batch_size}")

    def fastai_test_dl(images):
        items = [module_classifier.PILImage.create(reduce_image(image, reduce_to)) for image in images]
        return module_classifier._predict_batches(learner, items, batch_size, False, 0, False, precision)

    def direct(images):
        return module_classifier.predict_p_ship_arrays(learner, images, batch_size=batch_size, precision=precision)

    prepared = [b for i in range(0, len(slices), chunk)
                for b in module_classifier._array_batches(learner, slices[i:i + chunk], batch_size)]
    # the model the gate runs: the learner's (contiguous, as loaded: each call converts it and
    # back), or its int8 copy (CLASSIFIER.PRECISION int8: predict_p_ship_arrays runs that one)
    int8 = module_classifier.resolve_precision(precision, device) == "int8"
    model = module_classifier.int8_model(learner) if int8 else learner.model.eval()

    def model_alone(batches):
        with torch.inference_mode():
            for batch in batches:
                batch = batch.as_subclass(torch.Tensor).contiguous(memory_format=torch.channels_last)
                module_classifier._forward_views(model, batch, module_classifier.TTA_FLIP_DIMS[:1], precision, device)
        return None

    def preparation_alone(images):
        for _ in module_classifier._array_batches(learner, images, batch_size):
            pass
        return None

    resamplers = [t for t in learner.dls.valid.after_batch.fs if module_classifier._only_resamples(t)]

    def resampling_alone(batches):
        for batch in batches:
            for tfm in resamplers:
                tfm(batch, split_idx=1)
        return None

    results = {}
    baseline, p_baseline = best_ms(fastai_test_dl, slices, chunk, args.rounds)
    results["direct, converting each call"], _ = best_ms(direct, slices, chunk, args.rounds)
    learner.model.to(memory_format=torch.channels_last)  # as module_inference.build_p_ship_array_fn leaves it
    results["the gate (direct)"], p_direct = best_ms(direct, slices, chunk, args.rounds)
    results["model alone"], _ = best_ms(model_alone, prepared, 1, args.rounds, len(slices))
    results["preparation alone"], _ = best_ms(preparation_alone, slices, chunk, args.rounds)
    if resamplers:
        results["identity resampling alone"], _ = best_ms(resampling_alone, prepared, 1, args.rounds, len(slices))
    print(f"{'fastai test_dl (baseline)':<30} {baseline:6.2f} ms a slice")
    for name, ms in results.items():
        print(f"{name:<30} {ms:6.2f} ms a slice   {baseline / ms:5.2f}x the baseline's speed")
    print(f"p_ship, direct against the baseline: max |difference| {float(np.abs(p_direct - p_baseline).max()):.2e}")
    return {"baseline_ms": baseline, **{f"{k}_ms": v for k, v in results.items()}}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
