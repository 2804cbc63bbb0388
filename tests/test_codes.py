"""The linear probe and k-NN accuracy on codes with known answers."""

import numpy as np
import pytest

from pipeline.evaluation.codes import knn_accuracy, linear_probe_accuracy


def codes(rng, count, separable):
    labels = rng.integers(0, 10, count)
    points = rng.normal(size=(count, 10))
    if separable:
        points += 8.0 * np.eye(10)[labels]  # each class sits far out along its own axis
    return points, labels


@pytest.mark.parametrize("score", [linear_probe_accuracy, knn_accuracy])
def test_separable_codes_are_classified_almost_perfectly(score):
    rng = np.random.default_rng(0)
    assert score(*codes(rng, 3000, True), *codes(rng, 1000, True)) > 0.99


@pytest.mark.parametrize("score", [linear_probe_accuracy, knn_accuracy])
def test_random_codes_are_at_chance(score):
    rng = np.random.default_rng(0)
    assert score(*codes(rng, 3000, False), *codes(rng, 2000, False)) == pytest.approx(0.1, abs=0.03)
