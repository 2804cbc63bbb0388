"""The worth of a model's codes for telling digits apart: a linear probe and a k-nearest-neighbour
classifier, both trained on the codes of the training images and scored on those of the test images.
scikit-learn does the fitting."""

from __future__ import annotations

import warnings

import numpy as np


def linear_probe_accuracy(
    train_codes: np.ndarray, train_labels: np.ndarray, test_codes: np.ndarray, test_labels: np.ndarray
) -> float:
    """Test accuracy of multinomial logistic regression (L2, C = 1, lbfgs, at most 1,000 iterations) on
    codes standardised with the training codes' mean and standard deviation."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    with warnings.catch_warnings():  # near-separable codes may stop at max_iter; the accuracy is still what it is
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(train_codes, train_labels)
    return float(probe.score(test_codes, test_labels))


def knn_accuracy(
    train_codes: np.ndarray, train_labels: np.ndarray, test_codes: np.ndarray, test_labels: np.ndarray, k: int = 5
) -> float:
    """Test accuracy of a majority vote among the k nearest training codes (Euclidean, codes as they are)."""
    from sklearn.neighbors import KNeighborsClassifier

    return float(KNeighborsClassifier(n_neighbors=k).fit(train_codes, train_labels).score(test_codes, test_labels))
