"""Shared fixtures: the real Kaggle sample, and the tiny pipeline of ``configs/tiny.yaml``.

The real Kaggle sample in ``../shared/airbus-sample`` (skipped where absent)::

    def test_something(airbus_sample):           # Path of the sample folder
        csv = airbus_sample / "train_ship_segmentations.csv"

``airbus_sample`` skips the test with a reason when the folder is missing (a user's fresh clone).
Never copy the sample into the project; never read its ``eval/`` folder.

The tiny pipeline: every test that needs a config, generated data or trained models builds on
``configs/tiny.yaml`` (64 px synthetic tiles, a narrow Mask R-CNN, one classifier epoch) through
these fixtures, never on a copied list of overrides::

    def test_something(tiny_cfg):
        cfg = tiny_cfg("DETECTOR.EVAL_PERIOD", "0")   # tiny.yaml + temporary run folder + overrides

- ``tiny_dataset``: the tiny config's generated Kaggle-format dataset, made once per session
  (read-only for tests: a test that generates or changes data passes its own ``input_dir``);
- ``tiny_cfg``: a factory of frozen tiny configs whose run folder is the test's ``tmp_path``;
  ``make_tiny_cfg`` the same for module- or session-scoped fixtures (they give the run folder);
- ``tiny_paths``: the overrides that point a command line at the same folders as ``tiny_cfg``;
- ``tiny_trained``: a tiny run whose classifier and detector were trained, once per session.
"""
from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
AIRBUS_SAMPLE = REPO_ROOT.parent / "shared" / "airbus-sample"
TINY_CONFIG = REPO_ROOT / "configs" / "tiny.yaml"

# Tests import the flat ``module_*.py`` siblings from the repo root, whatever the working folder.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real Kaggle sample not found: {path} (see ../shared/airbus-sample/README.md)")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder (where the ``module_*.py`` files and ``configs/`` are)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def airbus_sample() -> Path:
    """The real Kaggle sample folder (``images/``, ``train_ship_segmentations.csv``, ...)."""
    return _require(AIRBUS_SAMPLE)


@pytest.fixture(scope="session")
def airbus_images(airbus_sample: Path) -> Path:
    """Folder of the 64 original 768x768 train_v2 JPEGs."""
    return _require(airbus_sample / "images")


@pytest.fixture(scope="session")
def airbus_truth_csv(airbus_sample: Path) -> Path:
    """Complete Kaggle-format ground truth of ``airbus_images`` (``ImageId,EncodedPixels``)."""
    return _require(airbus_sample / "train_ship_segmentations.csv")


@pytest.fixture(scope="session")
def segmentations_subset_csv(airbus_sample: Path) -> Path:
    """72,359 real train_v2 RLE rows (no images): for codec and scale tests."""
    return _require(airbus_sample / "segmentations_subset.csv")


# ---------------------------------------------------------------- the tiny pipeline (configs/tiny.yaml)
@pytest.fixture(scope="session")
def tiny_config() -> Path:
    """``configs/tiny.yaml``: what every test that needs a pipeline config builds on."""
    return TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """The input folder of ``configs/tiny.yaml``'s synthetic Kaggle-format dataset (its ``SYNTH``
    keys: 32 train and 8 test tiles of 64 px), generated once per session by
    ``module_synthetic.prepare_synthetic_input``. Read-only: tests must not change it."""
    import module_config
    import module_synthetic

    input_dir = tmp_path_factory.mktemp("tiny_input")
    module_synthetic.prepare_synthetic_input(module_config.get_cfg(TINY_CONFIG, ["PATHS.INPUT_DIR", str(input_dir)]))
    return input_dir


def _path_overrides(runs_dir: Path, input_dir: Path) -> list[str]:
    return ["PATHS.RUNS_DIR", str(runs_dir), "PATHS.INPUT_DIR", str(input_dir)]


@pytest.fixture(scope="session")
def make_tiny_cfg(tiny_dataset):
    """``make_tiny_cfg(runs_dir, *overrides, input_dir=None)``: the frozen config of
    ``configs/tiny.yaml`` with its run folder under ``runs_dir``, its input in ``input_dir``
    (default: the shared ``tiny_dataset``) and ``overrides`` (``KEY VALUE`` or ``KEY=VALUE``) last."""
    import module_config

    def make(runs_dir, *overrides: str, input_dir=None):
        paths = _path_overrides(Path(runs_dir), Path(input_dir) if input_dir else tiny_dataset)
        return module_config.get_cfg(TINY_CONFIG, paths + [str(o) for o in overrides])

    return make


@pytest.fixture()
def tiny_cfg(make_tiny_cfg, tmp_path):
    """``tiny_cfg(*overrides, input_dir=None)``: :func:`make_tiny_cfg` with the run folder in the
    test's ``tmp_path / "runs"``."""
    return lambda *overrides, input_dir=None: make_tiny_cfg(tmp_path / "runs", *overrides, input_dir=input_dir)


@pytest.fixture()
def tiny_paths(tiny_dataset, tmp_path) -> list[str]:
    """The command-line overrides that point at ``tiny_cfg``'s folders (run folder in ``tmp_path /
    "runs"``, the shared ``tiny_dataset`` as input): ``["PATHS.RUNS_DIR", ..., "PATHS.INPUT_DIR", ...]``."""
    return _path_overrides(tmp_path / "runs", tiny_dataset)


@pytest.fixture(scope="session")
def tiny_trained(tmp_path_factory, tiny_dataset):
    """A run of ``configs/tiny.yaml`` on ``tiny_dataset`` whose classifier and detector were
    trained through their modules' functions, once per session (one 64 px detector stage, for time).

    Attributes: ``cfg``; ``opts``, the overrides that give a command line (``--config
    configs/tiny.yaml``) the same config; ``input_dir``; ``train_dicts``, ``val_dicts``;
    ``classifier`` and ``detector``, what the two training functions returned.
    """
    import module_classifier
    import module_config
    import module_preprocessing
    import module_train

    opts = _path_overrides(tmp_path_factory.mktemp("tiny_trained") / "runs", tiny_dataset)
    opts += ["DETECTOR.STAGES", "[[64, 3, 0.01, 0]]"]
    cfg = module_config.get_cfg(TINY_CONFIG, opts)
    train_dicts, val_dicts = module_preprocessing.get_train_val_dicts(cfg)
    classifier = module_classifier.train_classifier(cfg, train_dicts, val_dicts)
    detector = module_train.train_detector(cfg, train_dicts, val_dicts)
    return types.SimpleNamespace(cfg=cfg, opts=opts, input_dir=tiny_dataset, train_dicts=train_dicts,
                                 val_dicts=val_dicts, classifier=classifier, detector=detector)
