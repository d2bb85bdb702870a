"""bench/bench_detect.py's matching of instances (plain logic: which ships two lists share)."""
import numpy as np

import module_detect
from bench.bench_detect import match, matched_of, on_ship_cells


def _ship(row, col, height, width, score=1.0, scene=64):
    mask = np.zeros((scene, scene), bool)
    mask[row:row + height, col:col + width] = True
    return module_detect.mask_to_detection(mask, 0, 0, score).to_json()


def test_matched_of_names_the_matched_instances_one_to_one():
    truth = [_ship(2, 2, 6, 10), _ship(30, 30, 8, 4), _ship(50, 10, 5, 5)]
    found = [_ship(2, 2, 6, 9, 0.9),   # the first ship, IoU 0.9
             _ship(30, 30, 8, 1, 0.8),  # a quarter of the second: IoU 0.25
             _ship(2, 3, 6, 9, 0.7)]    # the first ship again: one to one, no second match
    assert matched_of(truth, found, 0.5) == {0}
    assert match(truth, found, 0.5) == 1
    assert matched_of(truth, found, 0.2) == {0, 1}
    assert matched_of(truth, [], 0.5) == set()


def test_on_ship_cells_keeps_the_ships_centred_in_those_cells():
    ships = [_ship(2, 2, 6, 10), _ship(40, 40, 6, 6)]
    assert on_ship_cells(ships, [[0, 0]], 32) == [ships[0]]
    assert on_ship_cells(ships, [[1, 1]], 32) == [ships[1]]
