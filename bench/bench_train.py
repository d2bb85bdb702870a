#!/usr/bin/env python
"""Training speed: the project's stage trainer against a raw detectron2 ``DefaultTrainer``.

Both train the same model config (a stage of ``--config``) on the same dataset dicts through the
same mapper (`module_train.ShipDatasetMapper`), so the ratio measures what the project's trainer
adds (its hooks: input-size guard, atomic checkpointer, validation hook between evaluations,
writers). One uncounted warm-up run of the project's trainer first (a process's first training
pays one-off costs); then runs alternate A/B/A/B to spread the noise of a shared CPU; s/iter is
the median time between consecutive ``after_step`` calls after ``--warmup`` iterations. Target:
ratio <= 1.05.

Then the data loader: images/s through the mapper alone (reading the JPEG, resize, flips,
rotation, lighting, masks -> Instances) against images/s of the model step, and detectron2's
own ``DatasetMapper`` on the same dicts for reference. The loader is not the bottleneck when
its throughput is well above the model's (with NUM_WORKERS 0 its time adds to each step; with
workers it overlaps).

    python bench/bench_train.py                                   # demo config, last stage size
    python bench/bench_train.py --config configs/airbus.yaml --size 256 --iters 20 MODEL.WEIGHTS ""
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from detectron2.data import DatasetMapper, build_detection_train_loader  # noqa: E402
from detectron2.engine import DefaultTrainer, HookBase  # noqa: E402

import module_synthetic  # noqa: E402
import module_train  # noqa: E402
from module_config import get_cfg  # noqa: E402
from module_preprocessing import load_dataset_dicts  # noqa: E402
import module_config  # noqa: E402


class StepTimes(HookBase):
    """Wall-clock time of every iteration (between consecutive after_step calls)."""

    def __init__(self):
        self.stamps: list[float] = []

    def before_train(self):
        self.stamps = [time.perf_counter()]

    def after_step(self):
        self.stamps.append(time.perf_counter())

    def seconds_per_iter(self, warmup: int) -> float:
        gaps = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        # the last step of our trainer also runs the end-of-stage validation: not a training step
        return statistics.median(gaps[warmup:-1])


def run_project_trainer(cfg, stage, dicts, warmup) -> float:
    trainer = module_train.build_stage_trainer(cfg, stage, dicts, [], init_weights="", resume=False)
    timer = StepTimes()
    trainer.register_hooks([timer])
    trainer.train(0, stage.iterations)
    return timer.seconds_per_iter(warmup)


def run_default_trainer(cfg, stage, dicts, out_dir, warmup) -> float:
    model_cfg = module_config.get_model_cfg(cfg, stage).clone()
    model_cfg.defrost()
    model_cfg.OUTPUT_DIR = str(out_dir)
    model_cfg.TEST.EVAL_PERIOD = 0
    model_cfg.DATASETS.TEST = ()  # DefaultTrainer evaluates them after training: nothing to evaluate
    model_cfg.SOLVER.CHECKPOINT_PERIOD = cfg.SOLVER.CHECKPOINT_PERIOD
    model_cfg.freeze()

    class RawTrainer(DefaultTrainer):
        @classmethod
        def build_train_loader(cls, c):
            return build_detection_train_loader(
                dicts, mapper=module_train.ShipDatasetMapper(cfg, stage.size, is_train=True),
                total_batch_size=c.SOLVER.IMS_PER_BATCH, aspect_ratio_grouping=False, num_workers=c.DATALOADER.NUM_WORKERS,
            )

    trainer = RawTrainer(model_cfg)
    timer = StepTimes()
    trainer.register_hooks([timer])
    trainer.train()
    return timer.seconds_per_iter(warmup)


def mapper_images_per_second(mapper, dicts, n_images: int) -> float:
    start = time.perf_counter()
    for i in range(n_images):
        mapper(dicts[i % len(dicts)])
    return n_images / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--size", type=int, default=None, help="input size (default: the config's last stage)")
    parser.add_argument("--iters", type=int, default=16, help="iterations per run")
    parser.add_argument("--warmup", type=int, default=3, help="iterations left out of each median")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds")
    parser.add_argument("--images", type=int, default=48, help="synthetic training images (ship images only)")
    parser.add_argument("--loader-images", type=int, default=100, help="images pushed through the mappers")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args(argv)
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = get_cfg(args.config, args.opts)
        size = args.size or module_config.get_stages(base)[-1].size
        image_size = base.DATA.IMAGE_SIZE
        module_synthetic.generate_dataset(tmp / "data", n_train=args.images * 3, n_test=0, seed=1, image_size=image_size, empty_fraction=0.5)
        dicts = load_dataset_dicts(tmp / "data" / "train_ship_segmentations_v2.csv", tmp / "data" / "train_v2", image_size=image_size)
        dicts = [d for d in dicts if d["annotations"]][: args.images]
        cfg = get_cfg(args.config, [
            *args.opts, "PATHS.RUNS_DIR", str(tmp / "runs"), "DETECTOR.STAGES", f"[[{size}, {args.iters}, 0.01, 2]]",
            "DETECTOR.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "100000", "DETECTOR.LOG_PERIOD", "20",
        ])
        stage = module_config.get_stage(cfg, 1)
        print(f"config {args.config}: {cfg.MODEL.RESNETS.DEPTH}-layer ResNet FPN, input {size}x{size}, "
              f"batch {cfg.SOLVER.IMS_PER_BATCH}, {len(dicts)} images, {args.iters} iterations per run, "
              f"torch threads {torch.get_num_threads()}, device {cfg.MODEL.DEVICE}")

        # A warm-up run first, not counted: the first training in a process can pay one-off costs
        # (once, on an AVX2-only EPYC, its median step took 6.1 s against 0.39 s in the next run; the
        # cause was not found), which would land on whichever side runs first.
        warm = run_project_trainer(cfg, stage, dicts, args.warmup)
        print(f"warm-up run (not counted): module_train trainer {warm:.3f} s/iter")
        ours, raw = [], []
        for r in range(args.rounds):
            ours.append(run_project_trainer(cfg, stage, dicts, args.warmup))
            print(f"round {r + 1}: module_train trainer {ours[-1]:.3f} s/iter")
            raw.append(run_default_trainer(cfg, stage, dicts, tmp / f"raw{r}", args.warmup))
            print(f"round {r + 1}: detectron2 DefaultTrainer {raw[-1]:.3f} s/iter")
        ours_s, raw_s = statistics.median(ours), statistics.median(raw)
        print(f"\ns/iter: module_train {ours_s:.3f}, DefaultTrainer {raw_s:.3f}, ratio {ours_s / raw_s:.3f} (target <= 1.05)")

        mapper = module_train.ShipDatasetMapper(cfg, size, is_train=True)
        model_cfg = module_config.get_model_cfg(cfg, stage)
        d2_mapper = DatasetMapper(model_cfg, is_train=True)
        mapper_images_per_second(mapper, dicts, 5)  # warm the page cache
        ours_ips = mapper_images_per_second(mapper, dicts, args.loader_images)
        d2_ips = mapper_images_per_second(d2_mapper, dicts, args.loader_images)
        model_ips = cfg.SOLVER.IMS_PER_BATCH / ours_s
        print(f"data loader (1 process): ShipDatasetMapper {ours_ips:.1f} images/s, detectron2 DatasetMapper "
              f"(resize + h-flip only) {d2_ips:.1f} images/s")
        print(f"model step: {model_ips:.2f} images/s -> loader/model throughput ratio {ours_ips / model_ips:.1f}x; "
              f"mapping takes {100 * model_ips / ours_ips:.1f}% of a step with NUM_WORKERS 0")


if __name__ == "__main__":
    main()
