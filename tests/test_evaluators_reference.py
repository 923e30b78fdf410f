"""Edge cases of the evaluators checked against the reference formulas."""

import numpy as np

from cldro_jax.evaluators import knn


def test_knn_classify_with_no_queries_returns_empty_scores():
    # Zero queries is a valid input (an empty shard): (0, C) scores, not a ZeroDivisionError
    # from the query chunking.
    bank = np.eye(5, 3, dtype=np.float32) + 0.1
    scores = knn.knn_classify(bank, np.arange(5) % 2, np.zeros((0, 3), np.float32),
                              num_classes=2, k=3, temperature=0.5)
    assert scores.shape == (0, 2) and scores.dtype == np.float32
