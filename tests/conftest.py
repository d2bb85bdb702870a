"""Shared fixtures: the real Kaggle sample in ``../shared/airbus-sample`` (skipped where absent).

    def test_something(airbus_sample):           # Path of the sample folder
        csv = airbus_sample / "train_ship_segmentations.csv"

``airbus_sample`` skips the test with a reason when the folder is missing (a user's fresh clone).
Never copy the sample into the project; never read its ``eval/`` folder.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
AIRBUS_SAMPLE = REPO_ROOT.parent / "shared" / "airbus-sample"

# Tests import the flat ``module_*.py`` siblings from the repo root, whatever the working folder.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real Kaggle sample not found: {path} (see ../shared/airbus-sample/README.md)")
    return path


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
